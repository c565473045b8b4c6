//! A VM's NIC: a virtio-net device behind its virtio-mmio window, on a TAP that is a port of a
//! Linux bridge of this host, served by an I/O thread of its own (never a vCPU).
//!
//! Quiescing works as for a disk: the I/O thread moves frames only under the device lock and a
//! quiesced NIC moves none, so once [`Nic::quiesce`] returns, every frame the driver made
//! available is either sent, with its used entry written, or untouched in the ring; the one
//! frame the device may hold for want of a receive buffer is part of [`NicState`]. Frames that
//! arrive while the NIC is quiesced wait in the TAP's kernel queue.
//!
//! In a migration the destination creates its TAP when it builds the empty VM, but keeps it
//! down and off the bridge until the state arrives ([`Nic::attach`], before the commit), so a
//! destination whose bridge is missing fails before the switch-over. A NIC restored from a
//! migrated state announces the VM's MAC through its TAP when it first runs, four times in the
//! first 300 ms (QEMU's `announce-self` sends five rounds over 550 ms), so the bridges learn
//! the MAC's new port.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::slot::{Next, SlotFds, SlotThread};
use super::virtio::VirtioDevice;
use super::virtio::mmio::{MmioEffect, MmioTransport, RestoreError, TransportState};
use super::virtio::net::tap::{Tap, TapError};
use super::virtio::net::{Net, NetCounters, announce};
use crate::memory::GuestRam;

/// When a migrated NIC announces itself, after it first runs.
const ANNOUNCE_AFTER: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(300),
];

/// A NIC as the VM is given it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// The cluster network it is on (for the operator).
    pub network: String,
    /// The bridge of this host its TAP joins.
    pub bridge: String,
    /// The MAC in the device's configuration space.
    pub mac: [u8; 6],
    /// The VM's IPv4 address, if known: announcements include a gratuitous ARP for it.
    pub ip: Option<Ipv4Addr>,
    /// Join the bridge on open; false for a migration's destination, which joins it when the
    /// state has arrived.
    pub attach: bool,
}

/// A NIC's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    /// Transport registers, features, queues.
    pub transport: TransportState,
    /// The frame received but not yet delivered for want of a buffer: carried over, so a
    /// migration loses no frame the device had taken.
    pub pending: Option<Vec<u8>>,
    /// Frames moved so far.
    pub counters: NetCounters,
}

/// A NIC as listed to the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// Network.
    pub network: String,
    /// Bridge.
    pub bridge: String,
    /// The TAP's name on this host.
    pub tap: String,
    /// Whether the TAP is a port of the bridge.
    pub attached: bool,
    /// MAC, `52:54:00:..`.
    pub mac: String,
    /// Frames moved.
    pub counters: NetCounters,
}

/// Setting up or operating a NIC failed.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// The TAP or the bridge.
    #[error("NIC {index} (network '{network}'): {source}")]
    Tap {
        /// Which NIC.
        index: usize,
        /// Its network.
        network: String,
        /// Cause.
        #[source]
        source: TapError,
    },
    /// An eventfd, KVM registration or thread could not be made.
    #[error("{operation} for NIC {index} failed: {source}")]
    Setup {
        /// Which NIC.
        index: usize,
        /// What was attempted.
        operation: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Saved state does not fit this NIC.
    #[error("NIC {index}: {reason}")]
    Restore {
        /// Which NIC.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The saved state has another number of NICs.
    #[error("the saved state has {saved} NIC(s), this VM has {present}")]
    Count {
        /// In the state.
        saved: usize,
        /// Here.
        present: usize,
    },
}

#[derive(Debug)]
struct Core {
    transport: MmioTransport<Net<Tap>>,
    quiesced: bool,
    /// Restored from a migrated state: announce when first running.
    arrived: bool,
    /// Announcements still to send, at these times.
    announce_at: Vec<Instant>,
}

#[derive(Debug)]
struct Shared {
    core: Mutex<Core>,
    ram: Arc<GuestRam>,
    irq: EventFd,
    index: usize,
    spec: NicSpec,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves frames both ways, sends announcements that are due, and says what to wait for
    /// next. The caller holds the lock.
    fn serve(&self, core: &mut Core) -> Next {
        if core.quiesced {
            return Next::IDLE;
        }
        let queues = core.transport.device().queue_max_sizes().len();
        for queue in (0..queues).rev() {
            match core.transport.process(queue, self.ram.memory()) {
                Ok(true) => {
                    if let Err(e) = self.irq.write(1) {
                        tracing::warn!(nic = self.index, error = %e, "raising the NIC interrupt failed");
                    }
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(nic = self.index, %error, "virtio-net queue unusable");
                }
            }
        }
        let now = Instant::now();
        while core.announce_at.first().is_some_and(|&at| at <= now) {
            core.announce_at.remove(0);
            for frame in announce::frames(self.spec.mac, self.spec.ip) {
                if let Err(error) = core.transport.device_mut().announce(&frame) {
                    tracing::warn!(nic = self.index, %error, "announcing the VM's MAC failed");
                }
            }
        }
        let device = core.transport.device();
        let fd =
            (core.transport.driver_ok() && device.wants_frames()).then(|| device.backend().fd());
        let timeout = core
            .announce_at
            .first()
            .map(|&at| at.saturating_duration_since(now));
        Next::Wait { fd, timeout }
    }
}

/// One NIC of a running VM.
#[derive(Debug)]
pub struct Nic {
    shared: Arc<Shared>,
    io: SlotThread,
}

impl Nic {
    /// Creates NIC `index` in virtio slot `slot`: its TAP (on the bridge if the spec says so),
    /// its ioeventfd and irqfd, and its I/O thread (quiesced: it moves nothing until
    /// [`Nic::resume`]). Fails if the bridge does not exist, even when not joining it yet.
    pub fn open(
        index: usize,
        slot: usize,
        spec: &NicSpec,
        vm_fd: &VmFd,
        ram: Arc<GuestRam>,
    ) -> Result<Nic, NicError> {
        let tap_error = |source| NicError::Tap {
            index,
            network: spec.network.clone(),
            source,
        };
        if !super::virtio::net::tap::bridge_exists(&spec.bridge) {
            return Err(tap_error(TapError::NoBridge(spec.bridge.clone())));
        }
        let mut tap = Tap::create().map_err(tap_error)?;
        if spec.attach {
            tap.attach(&spec.bridge).map_err(tap_error)?;
        }
        let setup = |(operation, source)| NicError::Setup {
            index,
            operation,
            source,
        };
        let transport = MmioTransport::new(Net::new(spec.mac, tap)).map_err(|e| {
            setup((
                "building the virtqueues",
                std::io::Error::other(e.to_string()),
            ))
        })?;
        let (fds, irq) = SlotFds::register(vm_fd, slot).map_err(setup)?;
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                transport,
                quiesced: true,
                arrived: false,
                announce_at: Vec::new(),
            }),
            ram,
            irq,
            index,
            spec: spec.clone(),
        });
        let io = {
            let shared = Arc::clone(&shared);
            // A notification that comes while quiesced needs no memory: the first serve after
            // the resume looks at every queue anyway.
            fds.start(format!("nic{index}"), move |_notified| {
                let mut core = shared.lock();
                shared.serve(&mut core)
            })
            .map_err(|e| setup(("spawning the I/O thread", e)))?
        };
        Ok(Nic { shared, io })
    }

    /// Whether `gpa` is in this NIC's register window.
    pub fn claims(&self, gpa: u64) -> bool {
        self.io.claims(gpa)
    }

    /// A vCPU reads a register.
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        self.shared.lock().transport.read(self.io.offset(gpa), data);
    }

    /// A vCPU writes a register.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) {
        let effect = self
            .shared
            .lock()
            .transport
            .write(self.io.offset(gpa), data);
        // DRIVER_OK or a reset changes what the I/O thread waits for.
        self.io.wake();
        if let MmioEffect::Notify(_) = effect {
            self.io.notify();
        }
    }

    /// Stops moving frames; when this returns none is half moved.
    pub fn quiesce(&self) {
        self.shared.lock().quiesced = true;
    }

    /// Moves frames again, starting with what waited meanwhile; a NIC that arrived in a
    /// migration starts announcing the VM's MAC.
    pub fn resume(&self) {
        let mut core = self.shared.lock();
        core.quiesced = false;
        if std::mem::take(&mut core.arrived) {
            let now = Instant::now();
            core.announce_at = ANNOUNCE_AFTER.iter().map(|&after| now + after).collect();
        }
        self.shared.serve(&mut core);
        drop(core);
        self.io.wake();
    }

    /// Joins the bridge (a migration's destination, once the state is in).
    pub fn attach(&self) -> Result<(), NicError> {
        let mut core = self.shared.lock();
        core.transport
            .device_mut()
            .backend_mut()
            .attach(&self.shared.spec.bridge)
            .map_err(|source| NicError::Tap {
                index: self.shared.index,
                network: self.shared.spec.network.clone(),
                source,
            })
    }

    /// The device's state. Meaningful only while quiesced.
    pub fn state(&self) -> NicState {
        let core = self.shared.lock();
        NicState {
            transport: core.transport.snapshot(),
            pending: core.transport.device().pending(),
            counters: core.transport.device().counters(),
        }
    }

    /// Loads saved state into this (quiesced) NIC; it announces the VM when it first runs.
    pub fn restore(&self, state: &NicState) -> Result<(), NicError> {
        let index = self.shared.index;
        let mut core = self.shared.lock();
        core.transport
            .restore(&state.transport)
            .map_err(|e: RestoreError| NicError::Restore {
                index,
                reason: e.to_string(),
            })?;
        let device = core.transport.device_mut();
        device
            .set_pending(state.pending.as_deref())
            .map_err(|reason| NicError::Restore { index, reason })?;
        device.set_counters(state.counters);
        core.arrived = true;
        Ok(())
    }

    /// What the operator sees of this NIC.
    pub fn info(&self) -> NicInfo {
        let core = self.shared.lock();
        let net = core.transport.device();
        NicInfo {
            network: self.shared.spec.network.clone(),
            bridge: self.shared.spec.bridge.clone(),
            tap: net.backend().name().to_string(),
            attached: net.backend().bridge().is_some(),
            mac: net.mac().map(|b| format!("{b:02x}")).join(":"),
            counters: net.counters(),
        }
    }
}
