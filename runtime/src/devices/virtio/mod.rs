//! virtio devices (virtio 1.x, "modern" only) and the virtio-mmio transport they sit behind.
//!
//! The split follows Firecracker's: the transport (`mmio`) knows registers, feature
//! negotiation, device status and queue configuration, and is shared by every device; a
//! device (`block`) knows its configuration space, its features and what a request on its
//! queues means. Queues are rust-vmm's `virtio-queue`, which validates ring addresses and
//! walks descriptor chains (bounded by the queue size, so a looping chain ends).
//! `net` is virtio-net on a TAP. `super::disk` and `super::nic` put them in a VM.

pub mod block;
pub mod mmio;
pub mod net;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The feature every modern device offers and every driver of one must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt cause: the device used buffers.
pub const INTERRUPT_USED_RING: u32 = 1;
/// Interrupt cause: the configuration changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// A request on a queue went wrong in a way the device can report only to the VMM (the
/// driver gets the buffer back with nothing written, or an error status where it can).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The queue itself is unusable (ring addresses out of guest memory, say).
    #[error("virtqueue error: {0}")]
    Queue(virtio_queue::Error),
    /// A descriptor chain does not have the shape a request needs.
    #[error("malformed request in descriptor chain {head}: {reason}")]
    Malformed {
        /// Head index of the chain.
        head: u16,
        /// What is wrong.
        reason: String,
    },
}

/// A driver's read of `data.len()` bytes at `offset` of a device's configuration space
/// `config`; bytes past its end read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// What a virtio device is, to its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1: network, 2: block).
    fn device_type(&self) -> u32;
    /// Features offered.
    fn features(&self) -> u64;
    /// Largest size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device's configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes configuration space (ignored by devices with no writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver accepted `features` and set DRIVER_OK.
    fn activate(&mut self, features: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// Serves what the driver made available on queue `index`. Returns whether the driver
    /// should be interrupted.
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, DeviceError>;
}
