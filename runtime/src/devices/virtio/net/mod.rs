//! virtio-net (virtio 1.x, 5.1): one receive and one transmit queue, the VM's MAC, an MTU and
//! a link-up status in the configuration space, no offloads.
//!
//! Frames come from and go to a [`FrameIo`] backend (a TAP device in a VM, a pair of queues in
//! the unit tests). The device offers no checksum or segmentation offload and no mergeable
//! receive buffers, so every frame is at most [`MAX_FRAME`] bytes, the 12-byte
//! `virtio_net_hdr_v1` in front of it is all zeros but `num_buffers` = 1, and one receive chain
//! holds one frame.
//!
//! Whatever the driver puts in a chain, the device never panics: a chain of more than
//! [`MAX_CHAIN`] descriptors or one that loops, addresses outside guest memory, a transmit
//! chain without a header or with a frame larger than the MTU allows, a receive chain too small
//! for a frame, are each a [`DeviceError::Malformed`], counted and logged; the chain goes back
//! to the driver with nothing written and no frame is sent.
//!
//! A frame read from the backend when the driver has no receive buffer posted stays in the
//! device (one frame at most, [`Net::pending`]) until the driver posts one; the backend is not
//! read meanwhile, so frames wait in the TAP's own queue. That one frame is device state and
//! migrates with it.

pub mod announce;
pub mod tap;

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::{DeviceError, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestMemory;

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The MTU the device reports (`VIRTIO_NET_F_MTU`).
pub const MTU: u16 = 1500;
/// Largest frame: the MTU plus the 14-byte Ethernet header (no VLAN tag, no FCS).
pub const MAX_FRAME: usize = MTU as usize + 14;
/// Smallest frame worth the name: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Bytes of `virtio_net_hdr_v1` in front of every frame.
pub const NET_HDR_LEN: usize = 12;
/// Most descriptors in one chain (Linux uses at most `MAX_SKB_FRAGS + 2` = 19).
pub const MAX_CHAIN: usize = 64;

/// Where frames come from and go to.
pub trait FrameIo: Send + std::fmt::Debug {
    /// The next waiting frame, copied into `buf` (which holds [`MAX_FRAME`] + 1 bytes); its
    /// full length, which may exceed the buffer for an oversized frame, or `None` if no
    /// frame is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

/// What the device has done, for the operator and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (without the virtio header).
    pub rx_bytes: u64,
    /// Frames from the backend dropped: larger than [`MAX_FRAME`] or shorter than a header.
    pub rx_dropped: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the backend refused (its queue full, the link gone).
    pub tx_dropped: u64,
    /// Chains returned unserved because they were malformed.
    pub malformed: u64,
    /// Announcements sent for the guest after it arrived.
    pub announced: u64,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net<B> {
    mac: [u8; 6],
    backend: B,
    acked: u64,
    counters: NetCounters,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` that waits for a receive buffer, if any.
    pending: Option<usize>,
    tx_buf: Vec<u8>,
}

fn malformed(head: u16, reason: impl Into<String>) -> DeviceError {
    DeviceError::Malformed {
        head,
        reason: reason.into(),
    }
}

/// Refuses a chain with more than [`MAX_CHAIN`] descriptors or one the queue stopped walking
/// (its last descriptor still says "next": a loop, or longer than the queue).
fn check_chain_length(chain: &DescriptorChain<&GuestMemory>) -> Result<(), DeviceError> {
    let head = chain.head_index();
    let mut count = 0;
    let mut last_has_next = false;
    for desc in chain.clone() {
        count += 1;
        if count > MAX_CHAIN {
            return Err(malformed(
                head,
                format!("chain of more than {MAX_CHAIN} descriptors"),
            ));
        }
        last_has_next = desc.has_next();
    }
    if last_has_next {
        return Err(malformed(
            head,
            "chain loops or is longer than the queue (its last descriptor has NEXT set)",
        ));
    }
    if count == 0 {
        return Err(malformed(head, "empty chain (head outside the table)"));
    }
    Ok(())
}

impl<B: FrameIo> Net<B> {
    /// A device with `mac` on `backend`.
    pub fn new(mac: [u8; 6], backend: B) -> Self {
        Net {
            mac,
            backend,
            acked: 0,
            counters: NetCounters::default(),
            rx_buf: vec![0; MAX_FRAME + 1],
            pending: None,
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The MAC in the configuration space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the device has done.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Carries counters over from the device this one replaces (a migration's source).
    pub fn set_counters(&mut self, counters: NetCounters) {
        self.counters = counters;
    }

    /// The frame read from the backend that waits for a receive buffer.
    pub fn pending(&self) -> Option<Vec<u8>> {
        self.pending.map(|len| self.rx_buf[..len].to_vec())
    }

    /// Takes over a waiting frame (from a migration's source); frames that cannot be one are
    /// refused.
    pub fn set_pending(&mut self, frame: Option<&[u8]>) -> Result<(), String> {
        match frame {
            None => self.pending = None,
            Some(f) if (MIN_FRAME..=MAX_FRAME).contains(&f.len()) => {
                self.rx_buf[..f.len()].copy_from_slice(f);
                self.pending = Some(f.len());
            }
            Some(f) => {
                return Err(format!(
                    "a waiting frame of {} bytes (frames are {MIN_FRAME}..={MAX_FRAME})",
                    f.len()
                ));
            }
        }
        Ok(())
    }

    /// Whether the device wants the backend read: it has no frame waiting for a buffer.
    pub fn wants_frames(&self) -> bool {
        self.pending.is_none()
    }

    /// Sends `frame` as if the guest had (an announcement after a migration); counted.
    pub fn announce(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.backend.send(frame)?;
        self.counters.announced += 1;
        Ok(())
    }

    /// The configuration space (virtio 1.x, 5.1.4): MAC, status, max queue pairs, MTU.
    fn config_space(&self) -> [u8; 12] {
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        config
    }

    /// Fills receive buffers with waiting frames until either runs out.
    fn receive(&mut self, queue: &mut Queue, memory: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used_any = false;
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) if (MIN_FRAME..=MAX_FRAME).contains(&len) => len,
                    Ok(Some(len)) => {
                        self.counters.rx_dropped += 1;
                        tracing::debug!(len, "dropped a frame the VM's MTU does not allow");
                        continue;
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "reading a frame from the network backend failed");
                        break;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                self.pending = Some(len);
                break;
            };
            let head = chain.head_index();
            let written = match self.fill(chain, memory, len) {
                Ok(written) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += len as u64;
                    written
                }
                Err(error) => {
                    // The frame waits for the next buffer; this one goes back empty.
                    self.pending = Some(len);
                    self.counters.malformed += 1;
                    tracing::warn!(%error, "virtio-net receive buffer returned unused");
                    0
                }
            };
            queue
                .add_used(memory, head, written)
                .map_err(DeviceError::Queue)?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Writes the header and the frame in `rx_buf[..len]` into one receive chain.
    fn fill(
        &self,
        chain: DescriptorChain<&GuestMemory>,
        memory: &GuestMemory,
        len: usize,
    ) -> Result<u32, DeviceError> {
        let head = chain.head_index();
        check_chain_length(&chain)?;
        let mut writer = Writer::new(memory, chain)
            .map_err(|e| malformed(head, format!("receive buffer: {e}")))?;
        let room = writer.available_bytes();
        if room < NET_HDR_LEN + len {
            return Err(malformed(
                head,
                format!(
                    "receive buffer of {room} bytes cannot hold a {len}-byte frame and its {NET_HDR_LEN}-byte header"
                ),
            ));
        }
        let mut header = [0u8; NET_HDR_LEN];
        header[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        writer
            .write_all(&header)
            .and_then(|()| writer.write_all(&self.rx_buf[..len]))
            .map_err(|e| malformed(head, format!("writing the frame: {e}")))?;
        Ok((NET_HDR_LEN + len) as u32)
    }

    /// Sends every frame the driver made available.
    fn transmit(&mut self, queue: &mut Queue, memory: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            match self.take_frame(chain, memory) {
                Ok(()) => {
                    let frame = &self.tx_buf[NET_HDR_LEN..];
                    match self.backend.send(frame) {
                        Ok(()) => {
                            self.counters.tx_frames += 1;
                            self.counters.tx_bytes += frame.len() as u64;
                        }
                        Err(error) => {
                            self.counters.tx_dropped += 1;
                            tracing::debug!(%error, "the network backend refused a frame");
                        }
                    }
                }
                Err(error) => {
                    self.counters.malformed += 1;
                    tracing::warn!(%error, "virtio-net transmit chain returned unsent");
                }
            }
            queue
                .add_used(memory, head, 0)
                .map_err(DeviceError::Queue)?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Reads one transmit chain (header and frame) into `tx_buf`, checking its shape.
    fn take_frame(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        memory: &GuestMemory,
    ) -> Result<(), DeviceError> {
        let head = chain.head_index();
        check_chain_length(&chain)?;
        let mut reader = Reader::new(memory, chain)
            .map_err(|e| malformed(head, format!("transmit chain: {e}")))?;
        let total = reader.available_bytes();
        if total < NET_HDR_LEN + MIN_FRAME {
            return Err(malformed(
                head,
                format!(
                    "transmit chain of {total} bytes has no {NET_HDR_LEN}-byte header and Ethernet header"
                ),
            ));
        }
        if total > NET_HDR_LEN + MAX_FRAME {
            return Err(malformed(
                head,
                format!(
                    "frame of {} bytes is larger than the MTU of {MTU} allows ({MAX_FRAME})",
                    total - NET_HDR_LEN
                ),
            ));
        }
        self.tx_buf.resize(total, 0);
        reader
            .read_exact(&mut self.tx_buf)
            .map_err(|e| malformed(head, format!("reading the frame: {e}")))?;
        // No offload was offered: a header asking for one is a driver bug.
        let (flags, gso_type) = (self.tx_buf[0], self.tx_buf[1]);
        if flags != 0 || gso_type != 0 {
            return Err(malformed(
                head,
                format!(
                    "header asks for an offload that was not offered (flags {flags:#x}, gso_type {gso_type})"
                ),
            ));
        }
        Ok(())
    }
}

impl<B: FrameIo> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, features: u64) {
        self.acked = features;
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.pending = None;
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let used_any = match index {
            RX_QUEUE => self.receive(queue, memory)?,
            TX_QUEUE => self.transmit(queue, memory)?,
            _ => false,
        };
        if !used_any {
            return Ok(false);
        }
        queue.needs_notification(memory).map_err(DeviceError::Queue)
    }
}

#[cfg(test)]
mod tests;
