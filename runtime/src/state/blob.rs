//! Versioned, checksummed state blobs: `magic | version | length | crc32 | payload`.
//!
//! The payload is postcard. Decoding checks, in order, that the header is complete, the magic
//! is Ferry's, the version is one this build reads, the length is within the cap and matches
//! the bytes present, and the checksum matches — so a truncated, corrupted or foreign blob is
//! refused with an error naming which check failed, before the payload is parsed.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// First bytes of every blob.
pub const BLOB_MAGIC: [u8; 8] = *b"FERRYVMS";
/// Format version this build writes and reads.
pub const BLOB_VERSION: u32 = 2;
/// Largest payload accepted (vCPU state is ~10 KiB per vCPU; memory never goes in a blob).
pub const MAX_BLOB_PAYLOAD: u64 = 64 << 20;
/// Header length in bytes.
pub const BLOB_HEADER_LEN: usize = 28;

/// Why a blob could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Fewer bytes than a header.
    #[error("state blob is truncated: {len} bytes, the header alone needs {BLOB_HEADER_LEN}")]
    TooShort {
        /// Bytes present.
        len: usize,
    },
    /// Not a Ferry state blob.
    #[error("not a Ferry state blob (magic {found:02x?}, expected \"FERRYVMS\")")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// Written by an incompatible version.
    #[error(
        "state blob format version {found} is not supported (this build reads version {BLOB_VERSION})"
    )]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
    },
    /// Declared payload over the cap.
    #[error("state blob declares a {len}-byte payload, over the {MAX_BLOB_PAYLOAD}-byte limit")]
    TooLarge {
        /// Declared length.
        len: u64,
    },
    /// Payload shorter or longer than declared.
    #[error(
        "state blob payload is {got} bytes but the header declares {declared}: the blob is truncated or has trailing data"
    )]
    LengthMismatch {
        /// Declared length.
        declared: u64,
        /// Bytes present after the header.
        got: u64,
    },
    /// Checksum mismatch: the blob was corrupted.
    #[error(
        "state blob is corrupted: crc32 {computed:#010x} does not match the header's {expected:#010x}"
    )]
    Checksum {
        /// From the header.
        expected: u32,
        /// Over the payload.
        computed: u32,
    },
    /// Payload did not parse (a bug or a different build with the same version).
    #[error("state blob payload does not decode")]
    Decode(#[source] postcard::Error),
    /// Value could not be encoded.
    #[error("encoding state failed")]
    Encode(#[source] postcard::Error),
}

/// Encodes `value` as a blob.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, BlobError> {
    let payload = postcard::to_stdvec(value).map_err(BlobError::Encode)?;
    if payload.len() as u64 > MAX_BLOB_PAYLOAD {
        return Err(BlobError::TooLarge {
            len: payload.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(BLOB_HEADER_LEN + payload.len());
    out.extend_from_slice(&BLOB_MAGIC);
    out.extend_from_slice(&BLOB_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a blob made by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BlobError> {
    let header = bytes
        .get(..BLOB_HEADER_LEN)
        .ok_or(BlobError::TooShort { len: bytes.len() })?;
    let field = |range: std::ops::Range<usize>| &header[range];
    let mut magic = [0u8; 8];
    magic.copy_from_slice(field(0..8));
    if magic != BLOB_MAGIC {
        return Err(BlobError::BadMagic { found: magic });
    }
    let version = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
    if version != BLOB_VERSION {
        return Err(BlobError::UnsupportedVersion { found: version });
    }
    let declared = u64::from_le_bytes(field(12..20).try_into().unwrap_or_default());
    if declared > MAX_BLOB_PAYLOAD {
        return Err(BlobError::TooLarge { len: declared });
    }
    let payload = &bytes[BLOB_HEADER_LEN..];
    if payload.len() as u64 != declared {
        return Err(BlobError::LengthMismatch {
            declared,
            got: payload.len() as u64,
        });
    }
    let expected = u32::from_le_bytes(field(20..24).try_into().unwrap_or_default());
    let computed = crc32fast::hash(payload);
    if expected != computed {
        return Err(BlobError::Checksum { expected, computed });
    }
    postcard::from_bytes(payload).map_err(BlobError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(&(42u32, "state".to_string(), vec![1u8; 100])).unwrap()
    }

    #[test]
    fn round_trip() {
        let decoded: (u32, String, Vec<u8>) = decode(&sample()).unwrap();
        assert_eq!(decoded, (42, "state".into(), vec![1; 100]));
    }

    #[test]
    fn each_kind_of_damage_has_its_error() {
        let blob = sample();
        type T = (u32, String, Vec<u8>);
        assert!(matches!(
            decode::<T>(&blob[..10]),
            Err(BlobError::TooShort { len: 10 })
        ));
        assert!(matches!(
            decode::<T>(&blob[..blob.len() - 1]),
            Err(BlobError::LengthMismatch { .. })
        ));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(
            decode::<T>(&longer),
            Err(BlobError::LengthMismatch { .. })
        ));
        let mut foreign = blob.clone();
        foreign[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        assert!(matches!(
            decode::<T>(&foreign),
            Err(BlobError::BadMagic { .. })
        ));
        let mut version = blob.clone();
        version[8] = 99;
        assert!(matches!(
            decode::<T>(&version),
            Err(BlobError::UnsupportedVersion { found: 99 })
        ));
        let mut huge = blob.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<T>(&huge),
            Err(BlobError::TooLarge { .. })
        ));
        let mut flipped = blob.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            decode::<T>(&flipped),
            Err(BlobError::Checksum { .. })
        ));
        // A valid frame around a payload of the wrong shape.
        let wrong = encode(&1u8).unwrap();
        assert!(matches!(decode::<T>(&wrong), Err(BlobError::Decode(_))));
        // Messages name the problem.
        let text = decode::<T>(&flipped).unwrap_err().to_string();
        assert!(text.contains("corrupted"), "{text}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 1u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            assert!(decode::<(u32, String, Vec<u8>)>(&bytes).is_err());
            // With a valid header but random payload.
            let mut framed = BLOB_MAGIC.to_vec();
            framed.extend_from_slice(&BLOB_VERSION.to_le_bytes());
            framed.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            framed.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
            framed.extend_from_slice(&[0; 4]);
            framed.extend_from_slice(&bytes);
            let _ = decode::<(u32, String, Vec<u8>)>(&framed);
        }
    }
}
