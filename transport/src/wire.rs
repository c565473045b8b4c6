//! The frame format shared by the control channel and the data streams.
//!
//! Every frame is a fixed 20-byte header followed by a payload:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FRRY"
//!      4     8  checksum: xxh3-64 of bytes 12.. (rest of the header + payload), little endian
//!     12     2  protocol version, little endian
//!     14     1  message type (0 is Invalid and never sent)
//!     15     1  flags (bits not defined for the message type must be zero)
//!     16     4  payload length, little endian, at most the receiver's limit
//! ```
//!
//! The checksum sits before the fields it covers so that the covered bytes are contiguous
//! with the payload and one pass over `frame[12..]` verifies everything but the magic, which
//! is compared exactly anyway. A corrupted length therefore fails the checksum instead of
//! silently re-framing the stream.
//!
//! Decoding validates the header before anything is allocated for the payload, so no input
//! can make a decoder allocate more than its payload limit.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 20;
/// Offset of the first byte covered by the checksum.
const CHECKSUM_START: usize = 12;
/// Protocol-wide upper bound on a payload; endpoints may configure a lower one.
pub const MAX_PAYLOAD_LEN: u32 = 16 * 1024 * 1024;
/// Longest reason an `Abandon` frame carries; longer ones are cut at a character boundary.
pub const MAX_REASON_LEN: usize = 1024;

/// Protocol versions this build speaks, ascending.
pub const PROTOCOL_VERSIONS: &[u16] = &[1];
/// Version written in `Hello`/`Welcome` frames and in `Abandon` frames sent before a version
/// is agreed. It is frozen so that peers of any later version can still parse a greeting.
pub const HANDSHAKE_VERSION: u16 = 1;

/// What a frame carries. The discriminants are the wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum MessageType {
    /// Never sent; a zeroed header decodes to this and is rejected.
    Invalid = 0,
    /// First frame on every connection: versions spoken and what the connection is for.
    Hello = 1,
    /// Answer to `Hello`: the version both sides will use.
    Welcome = 2,
    /// A serde-encoded control message (postcard), optionally lz4-compressed.
    Control = 3,
    /// A batch of guest pages, from one or more runs, on a data stream (layout in `data`).
    Pages = 4,
    /// Barrier request on a data stream; answered by `Ack` once every earlier page is written.
    Flush = 5,
    /// Receiver's answer to `Flush` or `Finish`.
    Ack = 6,
    /// Sent on an otherwise idle connection so the peer can tell idle from dead.
    Keepalive = 7,
    /// The sender of this frame gives up; the payload says why.
    Abandon = 8,
    /// The data sender has nothing more to send; answered by `Ack`, then the stream closes.
    Finish = 9,
}

impl MessageType {
    /// Every type a peer may legitimately send (all but `Invalid`).
    pub const ALL: [MessageType; 9] = [
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::Control,
        MessageType::Pages,
        MessageType::Flush,
        MessageType::Ack,
        MessageType::Keepalive,
        MessageType::Abandon,
        MessageType::Finish,
    ];

    /// Parses a wire value.
    pub fn from_wire(value: u8) -> Result<Self, FrameError> {
        Ok(match value {
            0 => return Err(FrameError::InvalidMessageType),
            1 => MessageType::Hello,
            2 => MessageType::Welcome,
            3 => MessageType::Control,
            4 => MessageType::Pages,
            5 => MessageType::Flush,
            6 => MessageType::Ack,
            7 => MessageType::Keepalive,
            8 => MessageType::Abandon,
            9 => MessageType::Finish,
            found => return Err(FrameError::UnknownMessageType { found }),
        })
    }

    /// Flag bits this message type may carry.
    pub fn allowed_flags(self) -> u8 {
        match self {
            MessageType::Control => flags::LZ4,
            MessageType::Hello | MessageType::Welcome => flags::TLS,
            _ => 0,
        }
    }
}

/// Frame flag bits.
pub mod flags {
    /// The payload of a `Control` frame is lz4 block data with its decompressed size prepended.
    pub const LZ4: u8 = 0x01;
    /// On a control `Hello`: the connecting host has a certificate and offers mutual TLS.
    /// On `Welcome`: the accepting host takes the offer; TLS begins right after the frame.
    pub const TLS: u8 = 0x02;
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version the frame was written with.
    pub version: u16,
    /// What the payload is.
    pub kind: MessageType,
    /// Flag bits, already checked against [`MessageType::allowed_flags`].
    pub flags: u8,
    /// Payload length in bytes, already checked against the limit.
    pub payload_len: u32,
    /// Checksum as read from the wire (not yet verified).
    pub checksum: u64,
}

impl Header {
    /// Validates the first [`HEADER_LEN`] bytes of `bytes` as a header. The checksum is only
    /// read here; [`verify_frame`] checks it once the payload has arrived.
    pub fn decode(bytes: &[u8], max_payload: u32) -> Result<Header, FrameError> {
        let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        };
        let magic: [u8; 4] = field(header, 0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let checksum = u64::from_le_bytes(field(header, 4));
        let version = u16::from_le_bytes(field(header, 12));
        if !PROTOCOL_VERSIONS.contains(&version) {
            return Err(FrameError::UnsupportedVersion {
                found: version,
                supported: PROTOCOL_VERSIONS,
            });
        }
        let kind = MessageType::from_wire(header[14])?;
        let flags = header[15];
        if flags & !kind.allowed_flags() != 0 {
            return Err(FrameError::UnknownFlags { kind, flags });
        }
        let payload_len = u32::from_le_bytes(field(header, 16));
        let max = max_payload.min(MAX_PAYLOAD_LEN);
        if payload_len > max {
            return Err(FrameError::Oversized {
                kind,
                len: u64::from(payload_len),
                max,
            });
        }
        Ok(Header {
            version,
            kind,
            flags,
            payload_len,
            checksum,
        })
    }

    /// Total frame length (header + payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

fn field<const N: usize>(header: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&header[at..at + N]);
    out
}

/// Checks the checksum of a complete frame (`frame.len() == header.frame_len()`).
pub fn verify_frame(header: &Header, frame: &[u8]) -> Result<(), FrameError> {
    if frame.len() < header.frame_len() {
        return Err(FrameError::Truncated {
            needed: header.frame_len(),
            available: frame.len(),
        });
    }
    let actual = xxh3_64(&frame[CHECKSUM_START..header.frame_len()]);
    if actual != header.checksum {
        return Err(FrameError::BadChecksum {
            kind: header.kind,
            expected: header.checksum,
            actual,
        });
    }
    Ok(())
}

/// A complete, verified frame borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The validated header.
    pub header: Header,
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Decodes and verifies exactly one frame at the start of `bytes`; returns it and the number
/// of bytes it occupies. Incomplete input is [`FrameError::Truncated`].
pub fn decode_frame(bytes: &[u8], max_payload: u32) -> Result<(Frame<'_>, usize), FrameError> {
    let header = Header::decode(bytes, max_payload)?;
    verify_frame(&header, bytes)?;
    let len = header.frame_len();
    Ok((
        Frame {
            header,
            payload: &bytes[HEADER_LEN..len],
        },
        len,
    ))
}

/// Appends a complete frame carrying `payload` to `out`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    version: u16,
    kind: MessageType,
    flags: u8,
    payload: &[u8],
) -> Result<(), FrameError> {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    out.extend_from_slice(payload);
    seal_frame(&mut out[start..], version, kind, flags)
}

/// Fills in the header of a frame whose payload has already been written after
/// [`HEADER_LEN`] reserved bytes: `frame` is the whole frame, header space included.
/// Building the payload in place saves a copy of every data frame.
pub fn seal_frame(
    frame: &mut [u8],
    version: u16,
    kind: MessageType,
    flags: u8,
) -> Result<(), FrameError> {
    let Some(payload_len) = frame.len().checked_sub(HEADER_LEN) else {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            available: frame.len(),
        });
    };
    if payload_len > MAX_PAYLOAD_LEN as usize {
        return Err(FrameError::Oversized {
            kind,
            len: payload_len as u64,
            max: MAX_PAYLOAD_LEN,
        });
    }
    if kind == MessageType::Invalid {
        return Err(FrameError::InvalidMessageType);
    }
    if flags & !kind.allowed_flags() != 0 {
        return Err(FrameError::UnknownFlags { kind, flags });
    }
    frame[0..4].copy_from_slice(&MAGIC);
    frame[12..14].copy_from_slice(&version.to_le_bytes());
    frame[14] = kind as u8;
    frame[15] = flags;
    frame[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let checksum = xxh3_64(&frame[CHECKSUM_START..]);
    frame[4..12].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The input ends before the frame does.
    #[error("frame truncated: needed {needed} bytes but only {available} arrived")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error(
        "bad frame magic {found:02x?} (expected \"FRRY\"): the peer is not a Ferry endpoint or the stream lost framing"
    )]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 4],
    },
    /// The header names a protocol version this build does not speak.
    #[error("frame uses protocol version {found}, but this build speaks only {supported:?}")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
        /// Versions this build speaks.
        supported: &'static [u16],
    },
    /// Message type 0.
    #[error("frame has message type 0 (Invalid): the sender wrote an uninitialised header")]
    InvalidMessageType,
    /// A message type this build does not know.
    #[error("frame has unknown message type {found}")]
    UnknownMessageType {
        /// The wire value.
        found: u8,
    },
    /// Flag bits not defined for the message type.
    #[error("{kind:?} frame carries undefined flag bits {flags:#04x}")]
    UnknownFlags {
        /// The message type.
        kind: MessageType,
        /// The flags byte.
        flags: u8,
    },
    /// The payload is larger than the limit.
    #[error("{kind:?} frame payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// The message type.
        kind: MessageType,
        /// Payload length declared or attempted.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The checksum does not match: corrupted in transit.
    #[error(
        "{kind:?} frame checksum mismatch (header {expected:#018x}, computed {actual:#018x}): data corrupted in transit"
    )]
    BadChecksum {
        /// The message type.
        kind: MessageType,
        /// Checksum in the header.
        expected: u64,
        /// Checksum of the bytes received.
        actual: u64,
    },
}

/// What a connection is for, stated in its `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelKind {
    /// The control channel of a migration.
    Control,
    /// One of the bulk page streams of a data transfer.
    Data {
        /// Transfer session the stream belongs to; the receiver rejects other sessions.
        session: u64,
        /// Index of this stream, `0..streams`.
        stream: u16,
        /// Number of streams the sender opens.
        streams: u16,
    },
}

/// Payload of a `Hello` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Every protocol version the sender speaks.
    pub versions: Vec<u16>,
    /// What the connection is for.
    pub channel: ChannelKind,
}

/// Payload of a `Welcome` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides use from now on.
    pub version: u16,
}

/// Picks the highest version both sides speak.
pub fn negotiate_version(ours: &[u16], theirs: &[u16]) -> Result<u16, VersionError> {
    ours.iter()
        .filter(|v| theirs.contains(v))
        .max()
        .copied()
        .ok_or_else(|| VersionError::NoCommonVersion {
            ours: ours.to_vec(),
            theirs: theirs.to_vec(),
        })
}

/// Version negotiation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The two sides share no protocol version.
    #[error(
        "no common protocol version: this side speaks {ours:?}, the peer speaks {theirs:?}; upgrade the older host"
    )]
    NoCommonVersion {
        /// Versions this side speaks.
        ours: Vec<u16>,
        /// Versions the peer speaks.
        theirs: Vec<u16>,
    },
}

/// A frame's payload does not have the structure its message type requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Structurally invalid payload.
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed {
        /// The message type.
        kind: MessageType,
        /// What is wrong.
        reason: String,
    },
    /// Serde decoding failed.
    #[error("cannot decode {kind:?} payload")]
    Decode {
        /// The message type.
        kind: MessageType,
        /// The postcard error.
        #[source]
        source: postcard::Error,
    },
    /// Serde encoding failed.
    #[error("cannot encode {kind:?} payload")]
    Encode {
        /// The message type.
        kind: MessageType,
        /// The postcard error.
        #[source]
        source: postcard::Error,
    },
}

/// Encodes a `Hello` payload.
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, PayloadError> {
    postcard::to_stdvec(hello).map_err(|source| PayloadError::Encode {
        kind: MessageType::Hello,
        source,
    })
}

/// Decodes a `Hello` payload.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, PayloadError> {
    postcard::from_bytes(payload).map_err(|source| PayloadError::Decode {
        kind: MessageType::Hello,
        source,
    })
}

/// Encodes a `Welcome` payload.
pub fn encode_welcome(welcome: Welcome) -> [u8; 2] {
    welcome.version.to_le_bytes()
}

/// Decodes a `Welcome` payload.
pub fn decode_welcome(payload: &[u8]) -> Result<Welcome, PayloadError> {
    let bytes: [u8; 2] = payload.try_into().map_err(|_| PayloadError::Malformed {
        kind: MessageType::Welcome,
        reason: format!("expected 2 bytes, got {}", payload.len()),
    })?;
    Ok(Welcome {
        version: u16::from_le_bytes(bytes),
    })
}

/// Encodes the ticket carried by `Flush`, `Ack` and `Finish`.
pub fn encode_ticket(ticket: u64) -> [u8; 8] {
    ticket.to_le_bytes()
}

/// Decodes the ticket carried by `Flush`, `Ack` and `Finish`.
pub fn decode_ticket(kind: MessageType, payload: &[u8]) -> Result<u64, PayloadError> {
    let bytes: [u8; 8] = payload.try_into().map_err(|_| PayloadError::Malformed {
        kind,
        reason: format!("expected an 8-byte ticket, got {} bytes", payload.len()),
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// Encodes an `Abandon` reason, cut to [`MAX_REASON_LEN`] bytes.
pub fn encode_reason(reason: &str) -> &[u8] {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

/// Decodes an `Abandon` reason; invalid UTF-8 is replaced rather than rejected because the
/// reason is only ever shown to people.
pub fn decode_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(MAX_REASON_LEN)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: MessageType, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, 1, kind, flags, payload).expect("encodes");
        out
    }

    #[test]
    fn every_message_type_round_trips() {
        for kind in MessageType::ALL {
            let payload: Vec<u8> = (0..(kind as u8 as usize * 37)).map(|i| i as u8).collect();
            let flags = kind.allowed_flags();
            let bytes = frame(kind, flags, &payload);
            let (decoded, used) = decode_frame(&bytes, MAX_PAYLOAD_LEN).expect("decodes");
            assert_eq!(used, bytes.len());
            assert_eq!(decoded.header.kind, kind);
            assert_eq!(decoded.header.flags, flags);
            assert_eq!(decoded.header.version, 1);
            assert_eq!(decoded.payload, &payload[..]);
        }
    }

    #[test]
    fn typed_payloads_round_trip() {
        let hello = Hello {
            versions: vec![1, 7],
            channel: ChannelKind::Data {
                session: 9,
                stream: 2,
                streams: 4,
            },
        };
        assert_eq!(decode_hello(&encode_hello(&hello).unwrap()).unwrap(), hello);
        let control = Hello {
            versions: vec![1],
            channel: ChannelKind::Control,
        };
        assert_eq!(
            decode_hello(&encode_hello(&control).unwrap()).unwrap(),
            control
        );
        assert_eq!(
            decode_welcome(&encode_welcome(Welcome { version: 3 })).unwrap(),
            Welcome { version: 3 }
        );
        for kind in [MessageType::Flush, MessageType::Ack, MessageType::Finish] {
            assert_eq!(
                decode_ticket(kind, &encode_ticket(u64::MAX - 1)).unwrap(),
                u64::MAX - 1
            );
        }
        assert_eq!(decode_reason(encode_reason("disk full")), "disk full");
        let long = "é".repeat(MAX_REASON_LEN);
        assert!(encode_reason(&long).len() <= MAX_REASON_LEN);
        assert!(decode_reason(encode_reason(&long)).starts_with('é'));
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut bytes = frame(MessageType::Keepalive, 0, b"");
        bytes[0] = b'X';
        assert_eq!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::BadMagic { found: *b"XRRY" }
        );
    }

    #[test]
    fn bad_version_is_reported() {
        let mut bytes = frame(MessageType::Keepalive, 0, b"");
        bytes[12..14].copy_from_slice(&77u16.to_le_bytes());
        assert_eq!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::UnsupportedVersion {
                found: 77,
                supported: PROTOCOL_VERSIONS
            }
        );
    }

    #[test]
    fn invalid_and_unknown_types_are_reported() {
        let mut bytes = frame(MessageType::Keepalive, 0, b"");
        bytes[14] = 0;
        assert_eq!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::InvalidMessageType
        );
        bytes[14] = 200;
        assert_eq!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::UnknownMessageType { found: 200 }
        );
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(&mut out, 1, MessageType::Invalid, 0, b"").unwrap_err(),
            FrameError::InvalidMessageType
        );
    }

    #[test]
    fn undefined_flags_are_reported() {
        let mut bytes = frame(MessageType::Pages, 0, b"");
        bytes[15] = flags::LZ4;
        assert_eq!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::UnknownFlags {
                kind: MessageType::Pages,
                flags: flags::LZ4
            }
        );
    }

    #[test]
    fn oversized_length_is_reported_before_the_payload_arrives() {
        let mut bytes = frame(MessageType::Control, 0, b"");
        bytes[16..20].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        assert_eq!(
            Header::decode(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::Oversized {
                kind: MessageType::Control,
                len: u64::from(MAX_PAYLOAD_LEN) + 1,
                max: MAX_PAYLOAD_LEN
            }
        );
        let small = frame(MessageType::Control, 0, &[0; 100]);
        assert_eq!(
            decode_frame(&small, 99).unwrap_err(),
            FrameError::Oversized {
                kind: MessageType::Control,
                len: 100,
                max: 99
            }
        );
        let mut out = vec![0u8; HEADER_LEN + MAX_PAYLOAD_LEN as usize + 1];
        assert!(matches!(
            seal_frame(&mut out, 1, MessageType::Control, 0),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn bad_checksum_is_reported() {
        let mut bytes = frame(MessageType::Control, 0, b"hello world");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert!(matches!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::BadChecksum {
                kind: MessageType::Control,
                ..
            }
        ));
        // A flipped length bit is caught by the checksum too, not just by re-framing.
        let mut bytes = frame(MessageType::Control, 0, b"hello world");
        bytes[16] ^= 0x01;
        bytes.push(0);
        assert!(matches!(
            decode_frame(&bytes, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::BadChecksum { .. }
        ));
    }

    #[test]
    fn truncated_input_is_reported() {
        let bytes = frame(MessageType::Control, 0, b"hello world");
        assert_eq!(
            decode_frame(&bytes[..7], MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::Truncated {
                needed: HEADER_LEN,
                available: 7
            }
        );
        assert_eq!(
            decode_frame(&bytes[..bytes.len() - 1], MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::Truncated {
                needed: bytes.len(),
                available: bytes.len() - 1
            }
        );
    }

    #[test]
    fn malformed_payloads_are_reported() {
        assert!(matches!(
            decode_welcome(&[1]),
            Err(PayloadError::Malformed { .. })
        ));
        assert!(matches!(
            decode_ticket(MessageType::Ack, &[1, 2, 3]),
            Err(PayloadError::Malformed { .. })
        ));
        assert!(matches!(
            decode_hello(&[0xff, 0xff, 0xff]),
            Err(PayloadError::Decode { .. })
        ));
        assert_eq!(decode_reason(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn version_negotiation_picks_highest_common() {
        assert_eq!(negotiate_version(&[1, 2, 3], &[2, 3, 4]), Ok(3));
        assert_eq!(negotiate_version(&[1], &[1]), Ok(1));
        assert_eq!(negotiate_version(&[3, 1], &[1, 3]), Ok(3));
        let err = negotiate_version(&[1], &[2, 3]).unwrap_err();
        assert_eq!(
            err,
            VersionError::NoCommonVersion {
                ours: vec![1],
                theirs: vec![2, 3]
            }
        );
        assert!(err.to_string().contains("[1]") && err.to_string().contains("[2, 3]"));
        assert!(negotiate_version(&[1], &[]).is_err());
    }
}
