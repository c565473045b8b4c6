//! The `net` guest's memory layout, its conversation with a peer, and the host-side reading of
//! what it says it did.
//!
//! The guest drives the VM's first virtio-net device with a polling driver of its own: a
//! 16-entry receive queue with a 2 KiB buffer per entry, and a transmit queue it uses one frame
//! at a time. At a steady rate it sends numbered `DATA` frames (sequence 0, 1, 2, ...) to its
//! peer, and it answers every `ECHO_REQUEST` with an `ECHO_REPLY` of the same sequence number
//! to whoever sent it. It learns the peer's MAC from the first request; before that, `DATA`
//! frames go to the broadcast address.
//!
//! Frames are Ethernet with the IEEE "local experimental" ethertype 0x88B5 and a 60-byte
//! minimum length: `dst[6] src[6] 0x88B5 | "FYNT" kind[1] pad[5] seq[8] extra[8] | zeros`.
//! `extra` is, in a `DATA` frame, the echo requests the guest has answered so far.

use super::params::offsets;
use super::{GuestError, GuestParams};
use crate::layout::{self, DATA_START, GUEST_STATE};
use crate::memory::GuestRam;

/// The ethertype of the conversation.
pub const ETHERTYPE: u16 = 0x88B5;
/// Bytes 14..18 of every conversation frame.
pub const MAGIC: [u8; 4] = *b"FYNT";
/// A numbered frame from the guest.
pub const KIND_DATA: u8 = 1;
/// A request the guest answers.
pub const KIND_ECHO_REQUEST: u8 = 2;
/// The guest's answer.
pub const KIND_ECHO_REPLY: u8 = 3;
/// Length of every conversation frame.
pub const FRAME_LEN: usize = 60;
/// Failure value: no usable virtio-net device at the expected address.
pub const NET_NO_DEVICE: u32 = 0xFFFF_FFFC;
/// The `net` guest's default rate of numbered frames.
pub const DEFAULT_FRAMES_PER_SEC: u64 = 100;

/// Entries of each of the guest driver's queues.
pub const NET_QUEUE_SIZE: u32 = 16;
/// Bytes of each receive buffer.
pub const RX_BUFFER: u64 = 2048;

/// Offsets inside the driver's area.
pub mod area {
    /// Receive descriptor table.
    pub const RX_DESC: u64 = 0x0;
    /// Receive available ring.
    pub const RX_AVAIL: u64 = 0x100;
    /// Receive used ring.
    pub const RX_USED: u64 = 0x1000;
    /// Transmit descriptor table.
    pub const TX_DESC: u64 = 0x2000;
    /// Transmit available ring.
    pub const TX_AVAIL: u64 = 0x2100;
    /// Transmit used ring.
    pub const TX_USED: u64 = 0x3000;
    /// The frame being sent (virtio-net header, then the frame).
    pub const TX_BUF: u64 = 0x4000;
    /// Receive buffers, [`super::RX_BUFFER`] bytes each.
    pub const RX_BUFS: u64 = 0x5000;
    /// Size of the area.
    pub const SIZE: u64 = RX_BUFS + super::NET_QUEUE_SIZE as u64 * super::RX_BUFFER;
}

/// Offsets of the guest's counters in its state page.
pub mod state {
    /// `DATA` frames sent: the next sequence number.
    pub const SENT: u64 = 0;
    /// Echo requests answered.
    pub const ANSWERED: u64 = 8;
    /// Frames received.
    pub const RECEIVED: u64 = 16;
    /// Frames received that were not conversation requests.
    pub const IGNORED: u64 = 24;
    /// The peer's MAC (6 bytes; broadcast until a request came).
    pub const PEER: u64 = 32;
    /// Sequence number of the last request answered.
    pub const LAST_ECHO: u64 = 40;
    /// The guest's own MAC, as read from the device.
    pub const MAC: u64 = 48;
}

/// Fills the net fields of `params` for a NIC whose registers are at `nic_base`.
pub fn net_params(
    params: &mut GuestParams,
    memory: u64,
    frames_per_sec: u64,
    tsc_hz: u64,
    nic_base: Option<u64>,
) -> Result<(), GuestError> {
    let invalid = |problem: String| GuestError::InvalidParameter {
        guest: "net",
        problem,
    };
    let base = nic_base.ok_or_else(|| {
        invalid("the net guest needs a NIC (put the VM on a network with a bridge)".into())
    })?;
    if DATA_START + area::SIZE > memory.min(layout::LOW_MEMORY_END) {
        return Err(invalid(format!(
            "the driver's area needs memory up to {:#x}",
            DATA_START + area::SIZE
        )));
    }
    if !(1..=100_000).contains(&frames_per_sec) {
        return Err(invalid(format!(
            "{frames_per_sec} frames per second, allowed 1..=100000"
        )));
    }
    params.virtio_base = base;
    params.net_area = DATA_START;
    params.tsc_per_frame = (tsc_hz / frames_per_sec).max(1);
    debug_assert_eq!(
        offsets::NET_AREA as usize,
        std::mem::offset_of!(GuestParams, net_area)
    );
    Ok(())
}

/// A conversation frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// `KIND_*`.
    pub kind: u8,
    /// Sequence number.
    pub seq: u64,
    /// For `DATA`: echo requests answered so far.
    pub extra: u64,
}

impl Frame {
    /// The frame's bytes.
    pub fn to_bytes(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0..6].copy_from_slice(&self.dst);
        b[6..12].copy_from_slice(&self.src);
        b[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        b[14..18].copy_from_slice(&MAGIC);
        b[18] = self.kind;
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.extra.to_le_bytes());
        b
    }

    /// Parses a frame; `None` if it is not part of the conversation.
    pub fn parse(bytes: &[u8]) -> Option<Frame> {
        if bytes.len() < 40 || bytes[12..14] != ETHERTYPE.to_be_bytes() || bytes[14..18] != MAGIC {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        Some(Frame {
            dst: bytes[0..6].try_into().ok()?,
            src: bytes[6..12].try_into().ok()?,
            kind: bytes[18],
            seq: word(24),
            extra: word(32),
        })
    }
}

/// What a `net` guest says it has done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetGuestView {
    /// `DATA` frames sent.
    pub sent: u64,
    /// Echo requests answered.
    pub answered: u64,
    /// Frames received.
    pub received: u64,
    /// Frames received that were not requests.
    pub ignored: u64,
    /// The peer it talks to (broadcast before the first request).
    pub peer: [u8; 6],
    /// Its own MAC, as its device reports it.
    pub mac: [u8; 6],
}

impl NetGuestView {
    /// Reads the view out of guest memory.
    pub fn read(ram: &GuestRam) -> Result<NetGuestView, crate::memory::MemoryError> {
        let mut raw = [0u8; 64];
        ram.read(GUEST_STATE, &mut raw)?;
        let word = |at: u64| {
            let at = at as usize;
            u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or([0; 8]))
        };
        let mac = |at: u64| -> [u8; 6] {
            let at = at as usize;
            raw[at..at + 6].try_into().unwrap_or([0; 6])
        };
        Ok(NetGuestView {
            sent: word(state::SENT),
            answered: word(state::ANSWERED),
            received: word(state::RECEIVED),
            ignored: word(state::IGNORED),
            peer: mac(state::PEER),
            mac: mac(state::MAC),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_strangers_are_not_frames() {
        let frame = Frame {
            dst: [0xff; 6],
            src: [0x52, 0x54, 0, 1, 2, 3],
            kind: KIND_DATA,
            seq: 77,
            extra: 5,
        };
        let bytes = frame.to_bytes();
        assert_eq!(&bytes[12..14], &[0x88, 0xb5]);
        assert_eq!(Frame::parse(&bytes), Some(frame));
        let mut other = bytes;
        other[14] = b'X';
        assert_eq!(Frame::parse(&other), None);
        assert_eq!(Frame::parse(&bytes[..30]), None);
    }

    #[test]
    fn the_area_fits_below_the_end_of_a_small_vm() {
        let mut params = GuestParams::new(1);
        net_params(&mut params, 16 << 20, 100, 1_000_000_000, Some(0xd000_0000)).unwrap();
        assert_eq!(params.tsc_per_frame, 10_000_000);
        assert!(net_params(&mut params, 16 << 20, 100, 1, None).is_err());
        assert!(net_params(&mut params, 16 << 20, 0, 1, Some(1)).is_err());
    }
}
