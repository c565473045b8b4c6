//! KVM dirty-page logging over the VM's memory slots.
//!
//! Two modes, chosen when the VM is created:
//! - `Bitmap`: `KVM_GET_DIRTY_LOG` returns and clears a slot's bitmap in one call, holding
//!   KVM's MMU lock for the whole slot.
//! - `ManualProtect` (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): the get only reads; pages are
//!   re-protected with `KVM_CLEAR_DIRTY_LOG` in chunks, so a large VM never stalls the guest
//!   for a whole-slot walk.
//!
//! Pages the VMM wrote itself are merged in from vm-memory's bitmaps, so a fetch misses
//! neither guest nor VMM writes.

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1,
    kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::dirty::DirtySet;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages re-protected per `KVM_CLEAR_DIRTY_LOG` call (1 GiB of guest memory).
pub const CLEAR_CHUNK_PAGES: u64 = 256 * 1024;

/// How dirty pages are fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirtyLogMode {
    /// Get-and-clear per slot.
    #[default]
    Bitmap,
    /// Get, then clear in chunks.
    ManualProtect,
}

/// Errors from dirty logging.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The host KVM lacks manual dirty-log protection.
    #[error("this host's KVM does not support manual dirty-log protection; use the bitmap mode")]
    ManualProtectUnsupported,
    /// A dirty-log ioctl failed.
    #[error("{operation} failed for memory slot {slot}")]
    Ioctl {
        /// Which ioctl.
        operation: &'static str,
        /// Memory slot.
        slot: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Tracking was not started.
    #[error("dirty-page tracking is not running; start it first")]
    NotStarted,
}

/// Dirty logging state of one VM.
#[derive(Debug)]
pub struct DirtyLog {
    mode: DirtyLogMode,
    enabled: bool,
}

fn region_descriptor(
    slot: u32,
    gpa: u64,
    len: u64,
    host_addr: u64,
    log: bool,
) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host_addr,
    }
}

impl DirtyLog {
    /// Enables `mode` on the VM (must happen before memory slots exist for manual mode).
    pub fn new(vm: &VmFd, mode: DirtyLogMode) -> Result<Self, DirtyLogError> {
        if mode == DirtyLogMode::ManualProtect {
            let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
            if supported & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
                return Err(DirtyLogError::ManualProtectUnsupported);
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            vm.enable_cap(&cap).map_err(|e| DirtyLogError::Ioctl {
                operation: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                slot: 0,
                source: e.into(),
            })?;
        }
        Ok(DirtyLog {
            mode,
            enabled: false,
        })
    }

    /// The mode.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// Whether tracking is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Registers (or re-registers) every RAM region as a memory slot, with logging on or off.
    pub fn set_slots(&mut self, vm: &VmFd, ram: &GuestRam, log: bool) -> Result<(), DirtyLogError> {
        for (slot, region) in ram.regions().iter().enumerate() {
            let slot = slot as u32;
            let descriptor = region_descriptor(slot, region.gpa, region.len, region.host_addr, log);
            // SAFETY: the host range is guest RAM mapped by `ram`, which the VM owns and keeps
            // mapped for as long as the slot exists (the VM drops the VmFd before the RAM).
            unsafe { vm.set_user_memory_region(descriptor) }.map_err(|e| DirtyLogError::Ioctl {
                operation: "KVM_SET_USER_MEMORY_REGION",
                slot,
                source: e.into(),
            })?;
        }
        self.enabled = log;
        Ok(())
    }

    /// Starts tracking: from now on every guest and VMM write is recorded.
    pub fn start(&mut self, vm: &VmFd, ram: &GuestRam) -> Result<(), DirtyLogError> {
        ram.take_vmm_writes();
        self.set_slots(vm, ram, true)
    }

    /// Stops tracking.
    pub fn stop(&mut self, vm: &VmFd, ram: &GuestRam) -> Result<(), DirtyLogError> {
        self.set_slots(vm, ram, false)
    }

    /// Returns the pages written since the last fetch (or since `start`) and resets tracking
    /// for them.
    pub fn fetch_and_clear(
        &mut self,
        vm: &VmFd,
        ram: &GuestRam,
    ) -> Result<DirtySet, DirtyLogError> {
        if !self.enabled {
            return Err(DirtyLogError::NotStarted);
        }
        let mut set = DirtySet::empty(&ram.layout());
        for (slot, region) in ram.regions().iter().enumerate() {
            let slot = slot as u32;
            let mut bits =
                vm.get_dirty_log(slot, region.len as usize)
                    .map_err(|e| DirtyLogError::Ioctl {
                        operation: "KVM_GET_DIRTY_LOG",
                        slot,
                        source: e.into(),
                    })?;
            if self.mode == DirtyLogMode::ManualProtect {
                clear_in_chunks(vm, slot, region.len / PAGE_SIZE, &mut bits)?;
            }
            // Same layout by construction (one slot per RAM region); a mismatch is a bug.
            if let Err(error) = set.merge_region_words(slot as usize, &bits) {
                tracing::error!(%error, "dirty bitmap size mismatch");
            }
        }
        for (index, words) in ram.take_vmm_writes().iter().enumerate() {
            if let Err(error) = set.merge_region_words(index, words) {
                tracing::error!(%error, "VMM write bitmap size mismatch");
            }
        }
        Ok(set)
    }
}

fn clear_in_chunks(
    vm: &VmFd,
    slot: u32,
    pages: u64,
    bits: &mut [u64],
) -> Result<(), DirtyLogError> {
    let mut first = 0u64;
    while first < pages {
        let count = CLEAR_CHUNK_PAGES.min(pages - first);
        let words = &mut bits[(first / 64) as usize..];
        if words
            .iter()
            .take(count.div_ceil(64) as usize)
            .any(|&w| w != 0)
        {
            let clear = kvm_clear_dirty_log {
                slot,
                num_pages: count as u32,
                first_page: first,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: words.as_mut_ptr().cast(),
                },
            };
            // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which points into `bits`
            // with at least that many bits left (CLEAR_CHUNK_PAGES is a multiple of 64 and the
            // bitmap covers the whole slot); the struct is fully initialised.
            let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret < 0 {
                return Err(DirtyLogError::Ioctl {
                    operation: "KVM_CLEAR_DIRTY_LOG",
                    slot,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        first += count;
    }
    Ok(())
}
