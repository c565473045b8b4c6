//! The virtio-mmio transport (virtio 1.x, 4.2, version 2 register layout): flat registers at
//! a fixed base, no discovery. One transport per device; it owns the device's queues.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{DeviceError, INTERRUPT_USED_RING, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::memory::GuestMemory;

/// Size of a transport's register window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5946_5246; // "FRFY"

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the queue-notify register: where an ioeventfd goes.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// What a register write asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioEffect {
    /// Nothing beyond the register change.
    None,
    /// The driver notified queue `index`: serve it.
    Notify(usize),
    /// The driver acknowledged interrupts; the line may drop if none are left.
    InterruptAcked,
}

/// A queue's state as saved (the crate's own `QueueState` has no serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size offered.
    pub max_size: u16,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Configured and enabled.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// The transport's state, as saved in a snapshot or sent in a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Feature-word selectors.
    pub device_features_sel: u32,
    /// Feature-word selectors.
    pub driver_features_sel: u32,
    /// Selected queue.
    pub queue_sel: u32,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
}

/// Restoring a transport failed: the state does not fit this device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// Features accepted that this device does not offer.
    #[error(
        "the saved state accepted features {extra:#x} that this device does not offer (it offers {offered:#x})"
    )]
    Features {
        /// The surplus bits.
        extra: u64,
        /// What the device offers.
        offered: u64,
    },
    /// A different number or size of queues.
    #[error(
        "the saved state has {saved} queue(s) of sizes {sizes:?}; this device has {expected:?}"
    )]
    Queues {
        /// Queues saved.
        saved: usize,
        /// Their maximum sizes.
        sizes: Vec<u16>,
        /// This device's.
        expected: Vec<u16>,
    },
    /// A queue the crate refuses (bad size, misaligned rings).
    #[error("saved queue {index} is invalid: {reason}")]
    Queue {
        /// Which.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// A virtio device behind its virtio-mmio registers.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    queues: Vec<Queue>,
    status: u32,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `device` in reset state; fails if the device asks for a queue size the virtio spec
    /// does not allow (not a power of two, or above 32768).
    pub fn new(device: D) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            queues,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Pending interrupt causes (the line is up while non-zero).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Whether the driver has set DRIVER_OK (and not reset the device since).
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            return self.device.read_config(offset - reg::CONFIG, data);
        }
        let value = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| q.ready())
                .into(),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        // Registers are 32-bit; narrower or wider accesses see the low bytes.
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEffect {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return MmioEffect::None;
        }
        let mut bytes = [0u8; 4];
        for (dst, src) in bytes.iter_mut().zip(data) {
            *dst = *src;
        }
        let value = u32::from_le_bytes(bytes);
        // Queue and feature setup only before the driver is done (virtio 1.x, 4.2.2.2).
        let configuring = !self.driver_ok();
        let features_open = self.status & status::FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                1 => {
                    self.acked_features =
                        (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if configuring => {
                if let Some(queue) = self.selected() {
                    queue.set_size(value as u16);
                }
            }
            reg::QUEUE_READY if configuring => {
                if let Some(queue) = self.selected() {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if configuring => {
                let high = offset == reg::QUEUE_DESC_HIGH;
                if let Some(queue) = self.selected() {
                    queue.set_desc_table_address((!high).then_some(value), high.then_some(value));
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if configuring => {
                let high = offset == reg::QUEUE_DRIVER_HIGH;
                if let Some(queue) = self.selected() {
                    queue.set_avail_ring_address((!high).then_some(value), high.then_some(value));
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if configuring => {
                let high = offset == reg::QUEUE_DEVICE_HIGH;
                if let Some(queue) = self.selected() {
                    queue.set_used_ring_address((!high).then_some(value), high.then_some(value));
                }
            }
            reg::QUEUE_NOTIFY => {
                let index = value as usize;
                let usable = self.driver_ok() && self.queues.get(index).is_some_and(Queue::ready);
                return if usable {
                    MmioEffect::Notify(index)
                } else {
                    MmioEffect::None
                };
            }
            reg::INTERRUPT_ACK => {
                self.interrupt_status &= !value;
                return MmioEffect::InterruptAcked;
            }
            reg::STATUS => self.set_status(value),
            _ => {}
        }
        MmioEffect::None
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable = self.acked_features & !offered == 0
                && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // The driver reads FEATURES_OK back and sees that it did not stick.
                value &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            self.device.activate(self.acked_features);
        }
        self.status = value;
    }

    /// Serves queue `index` (after a notification, or to drain it) and raises the interrupt
    /// cause if the driver is to be told. Returns whether to interrupt.
    pub fn process(&mut self, index: usize, memory: &GuestMemory) -> Result<bool, DeviceError> {
        let running = self.driver_ok();
        let Some(queue) = self.queues.get_mut(index) else {
            return Ok(false);
        };
        if !running || !queue.ready() {
            return Ok(false);
        }
        let interrupt = self.device.process(index, queue, memory)?;
        if interrupt {
            self.interrupt_status |= INTERRUPT_USED_RING;
        }
        Ok(interrupt)
    }

    /// The transport's state.
    pub fn snapshot(&self) -> TransportState {
        TransportState {
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Takes over a saved state, checking it fits this device: accepted features a subset
    /// of those offered, the same queues, each one valid. Nothing changes on error.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let offered = self.device.features();
        let extra = state.acked_features & !offered;
        if extra != 0 {
            return Err(RestoreError::Features { extra, offered });
        }
        let expected = self.device.queue_max_sizes().to_vec();
        let sizes: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if sizes != expected {
            return Err(RestoreError::Queues {
                saved: state.queues.len(),
                sizes,
                expected,
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, saved)| {
                Queue::try_from(QueueState::from(*saved)).map_err(|e| RestoreError::Queue {
                    index,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.status = state.status;
        self.acked_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        if self.driver_ok() {
            self.device.activate(self.acked_features);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with two queues and a 4-byte configuration space, recording what it is told.
    #[derive(Debug, Default)]
    struct Probe {
        activated: Option<u64>,
        resets: u32,
        config: [u8; 4],
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn activate(&mut self, features: u64) {
            self.activated = Some(features);
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn process(
            &mut self,
            _: usize,
            _: &mut Queue,
            _: &GuestMemory,
        ) -> Result<bool, DeviceError> {
            Ok(true)
        }
    }

    fn read32(t: &MmioTransport<Probe>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport<Probe>, offset: u64, value: u32) -> MmioEffect {
        t.write(offset, &value.to_le_bytes())
    }

    /// The driver's side of initialisation (virtio 1.x, 3.1.1), accepting `features`.
    fn negotiate(t: &mut MmioTransport<Probe>, features: u64) -> u32 {
        write32(t, reg::STATUS, status::ACKNOWLEDGE);
        write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, reg::DRIVER_FEATURES_SEL, 0);
        write32(t, reg::DRIVER_FEATURES, features as u32);
        write32(t, reg::DRIVER_FEATURES_SEL, 1);
        write32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        write32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        read32(t, reg::STATUS)
    }

    #[test]
    fn identity_registers_and_features_by_word() {
        let mut t = MmioTransport::new(Probe::default()).unwrap();
        assert_eq!(read32(&t, reg::MAGIC), MAGIC);
        assert_eq!(read32(&t, reg::VERSION), 2);
        assert_eq!(read32(&t, reg::DEVICE_ID), 42);
        assert_eq!(read32(&t, reg::DEVICE_FEATURES), 0b101);
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(read32(&t, reg::DEVICE_FEATURES), 0);
        write32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read32(&t, reg::QUEUE_NUM_MAX), 8);
        write32(&mut t, reg::QUEUE_SEL, 5);
        assert_eq!(read32(&t, reg::QUEUE_NUM_MAX), 0, "no such queue");
        t.device_mut().config = [1, 2, 3, 4];
        let mut byte = [0u8; 1];
        t.read(reg::CONFIG + 2, &mut byte);
        assert_eq!(byte, [3]);
    }

    #[test]
    fn features_ok_sticks_only_for_an_acceptable_set() {
        let mut t = MmioTransport::new(Probe::default()).unwrap();
        // A legacy driver (no VERSION_1) is refused.
        let status = negotiate(&mut t, 0b1);
        assert_eq!(status & status::FEATURES_OK, 0);
        write32(&mut t, reg::STATUS, 0);
        // Features the device never offered are refused.
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(status & status::FEATURES_OK, 0);
        write32(&mut t, reg::STATUS, 0);
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100);
        assert_ne!(status & status::FEATURES_OK, 0);
        // Once FEATURES_OK is set, the accepted set is frozen.
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        write32(&mut t, reg::DRIVER_FEATURES, 0b1);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 0b100);
        write32(&mut t, reg::STATUS, status | status::DRIVER_OK);
        assert_eq!(t.device().activated, Some(VIRTIO_F_VERSION_1 | 0b100));
    }

    #[test]
    fn notifications_count_only_for_ready_queues_of_a_running_device_and_reset_clears() {
        let mut t = MmioTransport::new(Probe::default()).unwrap();
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1);
        write32(&mut t, reg::QUEUE_SEL, 0);
        write32(&mut t, reg::QUEUE_NUM, 16);
        write32(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        write32(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        write32(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        write32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(
            write32(&mut t, reg::QUEUE_NOTIFY, 0),
            MmioEffect::None,
            "not before DRIVER_OK"
        );
        write32(&mut t, reg::STATUS, status | status::DRIVER_OK);
        assert_eq!(write32(&mut t, reg::QUEUE_NOTIFY, 0), MmioEffect::Notify(0));
        assert_eq!(
            write32(&mut t, reg::QUEUE_NOTIFY, 1),
            MmioEffect::None,
            "queue 1 is not ready"
        );
        assert_eq!(write32(&mut t, reg::QUEUE_NOTIFY, 9), MmioEffect::None);
        // Queue setup is closed once the driver is running.
        write32(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.snapshot().queues[0].size, 16);
        write32(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.device().resets, 1);
        assert!(!t.snapshot().queues[0].ready);
        assert_eq!(t.acked_features(), 0);
    }

    #[test]
    fn state_round_trips_and_a_foreign_state_is_refused() {
        let mut t = MmioTransport::new(Probe::default()).unwrap();
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b1);
        write32(&mut t, reg::QUEUE_NUM, 8);
        write32(&mut t, reg::QUEUE_DESC_LOW, 0x4000);
        write32(&mut t, reg::QUEUE_DRIVER_LOW, 0x5000);
        write32(&mut t, reg::QUEUE_DEVICE_LOW, 0x6000);
        write32(&mut t, reg::QUEUE_READY, 1);
        write32(&mut t, reg::STATUS, status | status::DRIVER_OK);
        let state = t.snapshot();
        let mut other = MmioTransport::new(Probe::default()).unwrap();
        other.restore(&state).unwrap();
        assert_eq!(other.snapshot(), state);
        assert_eq!(other.device().activated, Some(VIRTIO_F_VERSION_1 | 0b1));

        let mut foreign = state.clone();
        foreign.acked_features |= 0b10;
        assert!(matches!(
            MmioTransport::new(Probe::default())
                .unwrap()
                .restore(&foreign),
            Err(RestoreError::Features { extra: 0b10, .. })
        ));
        let mut fewer = state.clone();
        fewer.queues.pop();
        assert!(matches!(
            MmioTransport::new(Probe::default())
                .unwrap()
                .restore(&fewer),
            Err(RestoreError::Queues { .. })
        ));
        let mut misaligned = state;
        misaligned.queues[0].desc_table = 0x4001;
        assert!(matches!(
            MmioTransport::new(Probe::default())
                .unwrap()
                .restore(&misaligned),
            Err(RestoreError::Queue { index: 0, .. })
        ));
    }
}
