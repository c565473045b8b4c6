//! One virtio-blk request: a descriptor chain of a 16-byte header the device reads, data, and
//! a status byte the device writes (virtio 1.x, 5.2.6).
//!
//! Whatever the driver put in the chain, serving it never panics: addresses outside guest
//! memory, chains that loop (the queue walks at most its size in descriptors), lengths that
//! overflow, a missing status byte — each is a [`DeviceError::Malformed`] the device answers
//! by returning the chain with nothing written; a well-formed request the device cannot carry
//! out (a sector past the end, a write to a read-only image) gets an error status.

use std::io::{Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};

use super::image::{DiskImage, SECTOR_SIZE};
use crate::devices::virtio::DeviceError;
use crate::memory::GuestMemory;

/// Largest data part of one request; larger ones get an error status (the device offers
/// `size_max`/`seg_max` accordingly).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// What a request did, for the device's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Read this many bytes.
    Read(usize),
    /// Wrote `len` bytes at byte `offset` of the image.
    Written {
        /// Where.
        offset: u64,
        /// How many.
        len: usize,
    },
    /// Flushed.
    Flushed,
    /// Returned the device ID.
    Identified,
    /// Answered with an error status.
    Failed(u8),
}

fn malformed(head: u16, reason: impl Into<String>) -> DeviceError {
    DeviceError::Malformed {
        head,
        reason: reason.into(),
    }
}

/// Serves one chain; returns what it did and the bytes it wrote into the chain (the used
/// length).
pub fn serve(
    chain: DescriptorChain<&GuestMemory>,
    memory: &GuestMemory,
    image: &DiskImage,
    serial: &[u8; VIRTIO_BLK_ID_BYTES as usize],
) -> Result<(Served, u32), DeviceError> {
    let head = chain.head_index();
    let mut reader = Reader::new(memory, chain.clone())
        .map_err(|e| malformed(head, format!("readable part: {e}")))?;
    let mut writer =
        Writer::new(memory, chain).map_err(|e| malformed(head, format!("writable part: {e}")))?;
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| malformed(head, "no 16-byte request header"))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let writable = writer.available_bytes();
    if writable == 0 {
        return Err(malformed(head, "no status byte"));
    }
    let mut status_writer = writer
        .split_at(writable - 1)
        .map_err(|e| malformed(head, format!("status byte: {e}")))?;
    let data = &mut writer;
    let in_range = |len: usize| {
        len.is_multiple_of(SECTOR_SIZE as usize)
            && len <= MAX_REQUEST_BYTES
            && sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len as u64))
                .is_some_and(|end| end <= image.size())
    };
    let (served, status, data_written) = match kind {
        VIRTIO_BLK_T_IN => {
            let len = data.available_bytes();
            if !in_range(len) {
                (
                    Served::Failed(VIRTIO_BLK_S_IOERR as u8),
                    VIRTIO_BLK_S_IOERR,
                    0,
                )
            } else {
                let mut buf = vec![0u8; len];
                match image.read_at(&mut buf, sector * SECTOR_SIZE) {
                    Ok(()) => {
                        data.write_all(&buf)
                            .map_err(|e| malformed(head, format!("writing read data: {e}")))?;
                        (Served::Read(len), VIRTIO_BLK_S_OK, len)
                    }
                    Err(_) => (
                        Served::Failed(VIRTIO_BLK_S_IOERR as u8),
                        VIRTIO_BLK_S_IOERR,
                        0,
                    ),
                }
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = reader.available_bytes();
            if image.read_only() || !in_range(len) {
                (
                    Served::Failed(VIRTIO_BLK_S_IOERR as u8),
                    VIRTIO_BLK_S_IOERR,
                    0,
                )
            } else {
                let mut buf = vec![0u8; len];
                reader
                    .read_exact(&mut buf)
                    .map_err(|e| malformed(head, format!("reading write data: {e}")))?;
                match image.write_at(&buf, sector * SECTOR_SIZE) {
                    Ok(()) => (
                        Served::Written {
                            offset: sector * SECTOR_SIZE,
                            len,
                        },
                        VIRTIO_BLK_S_OK,
                        0,
                    ),
                    Err(_) => (
                        Served::Failed(VIRTIO_BLK_S_IOERR as u8),
                        VIRTIO_BLK_S_IOERR,
                        0,
                    ),
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => match image.flush() {
            Ok(()) => (Served::Flushed, VIRTIO_BLK_S_OK, 0),
            Err(_) => (
                Served::Failed(VIRTIO_BLK_S_IOERR as u8),
                VIRTIO_BLK_S_IOERR,
                0,
            ),
        },
        VIRTIO_BLK_T_GET_ID => {
            let len = data.available_bytes().min(serial.len());
            data.write_all(&serial[..len])
                .map_err(|e| malformed(head, format!("writing the ID: {e}")))?;
            (Served::Identified, VIRTIO_BLK_S_OK, len)
        }
        _ => (
            Served::Failed(VIRTIO_BLK_S_UNSUPP as u8),
            VIRTIO_BLK_S_UNSUPP,
            0,
        ),
    };
    status_writer
        .write_all(&[status as u8])
        .map_err(|e| malformed(head, format!("writing the status: {e}")))?;
    Ok((served, data_written as u32 + 1))
}
