//! A VM's disk: a virtio-blk device behind its virtio-mmio window, the eventfd KVM signals
//! when the driver notifies the queue (an ioeventfd: the vCPU does not even exit to the
//! VMM), the eventfd that raises the device's interrupt line in the in-kernel IOAPIC (an
//! irqfd), and the I/O thread that serves requests off the vCPU threads.
//!
//! Quiescing is what makes the device's state safe to capture. The I/O thread serves a
//! queue only under the device lock, and a quiesced device serves nothing (a notification
//! that arrives meanwhile is remembered). So once [`Disk::quiesce`] returns, no request is
//! half done: every request the driver made available is either complete, with its used
//! entry written, or not started, still in the available ring. The queue state says which,
//! and a restored device serves the unstarted ones when it first runs — nothing lost,
//! nothing done twice.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::slot::{Next, SlotFds, SlotThread};
use super::virtio::VirtioDevice;
use super::virtio::block::{Block, BlockCounters, DiskImage, Extent, ImageError};
use super::virtio::mmio::{MmioEffect, MmioTransport, RestoreError, TransportState};
use crate::memory::GuestRam;

/// A disk as the VM is given it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The raw image.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Device ID the guest reads (`VIRTIO_BLK_T_GET_ID`), at most 20 bytes used.
    pub id: String,
    /// Take the image's lock on open; false for a migration's destination, which takes it
    /// when the source has let it go.
    pub lock: bool,
}

/// A disk's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Transport registers, features, queues.
    pub transport: TransportState,
    /// Requests served so far (carried so the counters survive a migration).
    pub counters: BlockCounters,
}

/// Setting up or operating a disk failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The VM has more disks than virtio slots.
    #[error("a VM has at most {max} virtio devices (disks and NICs), {count} were given")]
    TooMany {
        /// Given.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// An eventfd, KVM registration or thread could not be made.
    #[error("{operation} for disk {index} failed: {source}")]
    Setup {
        /// Which disk.
        index: usize,
        /// What was attempted.
        operation: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Saved state does not fit this disk.
    #[error("disk {index}: {source}")]
    Restore {
        /// Which disk.
        index: usize,
        /// Why.
        #[source]
        source: RestoreError,
    },
    /// The saved state has another number of disks.
    #[error("the saved state has {saved} disk(s), this VM has {present}")]
    Count {
        /// In the state.
        saved: usize,
        /// Here.
        present: usize,
    },
    /// Finding the image's data extents failed.
    #[error("scanning disk image {path} for data failed: {source}")]
    Scan {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `fdatasync` of the image failed.
    #[error("flushing disk image {path} failed: {source}")]
    Flush {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Core {
    transport: MmioTransport<Block>,
    quiesced: bool,
    pending: bool,
}

#[derive(Debug)]
struct Shared {
    core: Mutex<Core>,
    ram: Arc<GuestRam>,
    irq: EventFd,
    index: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves every queue (the caller holds the lock) and raises the interrupt if the driver
    /// wants one.
    fn serve(&self, core: &mut Core) {
        let queues = core.transport.device().queue_max_sizes().len();
        for queue in 0..queues {
            match core.transport.process(queue, self.ram.memory()) {
                Ok(true) => {
                    if let Err(e) = self.irq.write(1) {
                        tracing::warn!(disk = self.index, error = %e, "raising the disk interrupt failed");
                    }
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(disk = self.index, %error, "virtio-blk queue unusable");
                }
            }
        }
    }
}

/// One disk of a running VM.
#[derive(Debug)]
pub struct Disk {
    shared: Arc<Shared>,
    io: SlotThread,
}

impl Disk {
    /// Opens disk `index` of a VM, registers its ioeventfd and irqfd with `vm_fd`, and starts
    /// its I/O thread (quiesced: it serves nothing until [`Disk::resume`]).
    pub fn open(
        index: usize,
        spec: &DiskSpec,
        vm_fd: &VmFd,
        ram: Arc<GuestRam>,
    ) -> Result<Disk, DiskError> {
        let image = if spec.lock {
            DiskImage::open(&spec.path, spec.read_only)?
        } else {
            DiskImage::open_unlocked(&spec.path, spec.read_only)?
        };
        let setup = |(operation, source)| DiskError::Setup {
            index,
            operation,
            source,
        };
        let transport =
            MmioTransport::new(Block::new(image, &spec.id)).map_err(|e| DiskError::Setup {
                index,
                operation: "building the virtqueue",
                source: std::io::Error::other(e.to_string()),
            })?;
        let (fds, irq) = SlotFds::register(vm_fd, index).map_err(setup)?;
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                transport,
                quiesced: true,
                pending: false,
            }),
            ram,
            irq,
            index,
        });
        let io = {
            let shared = Arc::clone(&shared);
            fds.start(format!("disk{index}"), move |notified| {
                let mut core = shared.lock();
                if notified {
                    if core.quiesced {
                        core.pending = true;
                    } else {
                        shared.serve(&mut core);
                    }
                }
                Next::IDLE
            })
            .map_err(|e| setup(("spawning the I/O thread", e)))?
        };
        Ok(Disk { shared, io })
    }

    /// Whether `gpa` is in this disk's register window.
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
        if let MmioEffect::Notify(_) = effect {
            // Only reached if the ioeventfd did not catch the write (it catches all of them
            // once registered); hand it to the I/O thread all the same.
            self.io.notify();
        }
    }

    /// Stops serving requests; when this returns none is in progress.
    pub fn quiesce(&self) {
        self.shared.lock().quiesced = true;
    }

    /// Serves requests again, starting with any the driver made available meanwhile (or,
    /// after a restore, before the state was captured).
    pub fn resume(&self) {
        let mut core = self.shared.lock();
        core.quiesced = false;
        core.pending = false;
        self.shared.serve(&mut core);
    }

    /// The device's state. Meaningful only while quiesced.
    pub fn state(&self) -> DiskState {
        let core = self.shared.lock();
        DiskState {
            transport: core.transport.snapshot(),
            counters: core.transport.device().counters(),
        }
    }

    /// Loads saved state into this (quiesced) disk.
    pub fn restore(&self, state: &DiskState) -> Result<(), DiskError> {
        let mut core = self.shared.lock();
        core.transport
            .restore(&state.transport)
            .map_err(|source| DiskError::Restore {
                index: self.shared.index,
                source,
            })?;
        core.transport.device_mut().set_counters(state.counters);
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        let core = self.shared.lock();
        let image = core.transport.device().image();
        image.flush().map_err(|source| DiskError::Flush {
            path: image.path().to_path_buf(),
            source,
        })
    }

    /// Gives up the image's lock (the guest is paused and the image flushed).
    pub fn unlock(&self) -> Result<(), DiskError> {
        Ok(self
            .shared
            .lock()
            .transport
            .device_mut()
            .image_mut()
            .unlock()?)
    }

    /// Takes the image's lock (before the VM runs here).
    pub fn lock(&self) -> Result<(), DiskError> {
        let mut core = self.shared.lock();
        let image = core.transport.device_mut().image_mut();
        if !image.is_locked() {
            image.lock()?;
        }
        Ok(())
    }

    /// Starts recording the guest's writes in `chunk`-byte units, then returns the extents
    /// of the image that hold data: what a copy must read first. Tracking goes on before the
    /// image is scanned, so a write is either in the scan or recorded.
    pub fn begin_tracking(&self, chunk: u64) -> Result<Vec<Extent>, DiskError> {
        let mut core = self.shared.lock();
        let block = core.transport.device_mut();
        block.start_dirty_tracking(chunk);
        block
            .image()
            .data_extents()
            .map_err(|source| DiskError::Scan {
                path: block.image().path().to_path_buf(),
                source,
            })
    }

    /// Extents written since the last call (or since tracking began); empty if off.
    pub fn fetch_dirty(&self) -> Vec<Extent> {
        self.shared
            .lock()
            .transport
            .device_mut()
            .take_dirty()
            .unwrap_or_default()
    }

    /// Stops recording writes.
    pub fn stop_tracking(&self) {
        self.shared
            .lock()
            .transport
            .device_mut()
            .stop_dirty_tracking();
    }

    /// xxh3-128 of the image's content (for `--verify` of a storage migration).
    pub fn hash(&self) -> Result<u128, DiskError> {
        let core = self.shared.lock();
        let image = core.transport.device().image();
        hash_image(image).map_err(|source| DiskError::Scan {
            path: image.path().to_path_buf(),
            source,
        })
    }

    /// What the operator sees of this disk.
    pub fn info(&self) -> DiskInfo {
        let core = self.shared.lock();
        let block = core.transport.device();
        DiskInfo {
            path: block.image().path().to_path_buf(),
            size: block.image().size(),
            allocated: block.image().allocated(),
            read_only: block.image().read_only(),
            locked: block.image().is_locked(),
            counters: block.counters(),
        }
    }
}

/// A disk as listed to the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The image.
    pub path: PathBuf,
    /// Size, bytes.
    pub size: u64,
    /// Bytes allocated on the filesystem.
    pub allocated: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Holds the image lock.
    pub locked: bool,
    /// Requests served.
    pub counters: BlockCounters,
}

/// xxh3-128 of an image's content, read in 1 MiB pieces.
pub fn hash_image(image: &DiskImage) -> std::io::Result<u128> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < image.size() {
        let n = (image.size() - at).min(buf.len() as u64) as usize;
        image.read_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.digest128())
}
