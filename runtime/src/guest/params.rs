//! The parameter block the VMM writes at [`crate::layout::PARAMS`] for the built-in guests.
//!
//! The guest code reads fields at fixed offsets (taken from this struct with `offset_of!`
//! when the code is assembled), so the VMM does all arithmetic (rates to TSC intervals, table
//! sizes) and the guest stays a few dozen instructions.

use std::mem::{offset_of, size_of};

use vm_memory::ByteValued;

/// Magic at the start of the block: "FERRYPRM".
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"FERRYPRM");
/// Layout version of [`GuestParams`].
pub const PARAMS_VERSION: u32 = 3;

/// Parameters for the built-in guests. All addresses are guest-physical (the guest runs
/// identity-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestParams {
    /// [`PARAMS_MAGIC`].
    pub magic: u64,
    /// [`PARAMS_VERSION`].
    pub version: u32,
    /// Number of vCPUs running the guest.
    pub vcpus: u32,
    /// Where the guest keeps its own state (the counter's N).
    pub state_addr: u64,
    /// `counter`: TSC cycles between ticks.
    pub tick_period_tsc: u64,
    /// `dirty`: first byte of the working set.
    pub ws_start: u64,
    /// `dirty`: pages in the working set.
    pub ws_pages: u64,
    /// `dirty`: TSC cycles between two page writes of one vCPU; 0 means unlimited.
    pub tsc_per_page_per_vcpu: u64,
    /// `dirty`: passes over the working set before the guest reports completion; 0 = forever.
    pub passes: u64,
    /// `verify`: address of the generation table (one u64 per checked page).
    pub gen_table: u64,
    /// `verify`: first checked page.
    pub verify_start: u64,
    /// `verify`: number of checked pages.
    pub verify_pages: u64,
    /// `verify`: seed mixed into every page's content.
    pub seed: u64,
    /// `verify`: page updates per round.
    pub updates_per_round: u64,
    /// `verify`: page checks per round.
    pub checks_per_round: u64,
    /// `disk`, `net`: guest-physical address of the virtio device's registers.
    pub virtio_base: u64,
    /// `disk`: the driver's area (rings, request header, buffers; see `disk_layout`).
    pub disk_area: u64,
    /// `disk`: blocks (4 KiB) of the disk the guest writes and checks.
    pub disk_blocks: u64,
    /// `disk`: TSC cycles between two block writes; 0 means unlimited.
    pub tsc_per_write: u64,
    /// `net`: the driver's area (rings and buffers; see `net::area`).
    pub net_area: u64,
    /// `net`: TSC cycles between two numbered frames.
    pub tsc_per_frame: u64,
}

// SAFETY: GuestParams is repr(C), made only of integers, and has no padding (checked by the
// layout test below), so any byte pattern is a valid value.
unsafe impl ByteValued for GuestParams {}

/// Byte offsets of the fields the guest code reads.
pub mod offsets {
    use super::*;

    /// `vcpus` (u32).
    pub const VCPUS: i32 = offset_of!(GuestParams, vcpus) as i32;
    /// `state_addr`.
    pub const STATE_ADDR: i32 = offset_of!(GuestParams, state_addr) as i32;
    /// `tick_period_tsc`.
    pub const TICK_PERIOD: i32 = offset_of!(GuestParams, tick_period_tsc) as i32;
    /// `ws_start`.
    pub const WS_START: i32 = offset_of!(GuestParams, ws_start) as i32;
    /// `ws_pages`.
    pub const WS_PAGES: i32 = offset_of!(GuestParams, ws_pages) as i32;
    /// `tsc_per_page_per_vcpu`.
    pub const TSC_PER_PAGE: i32 = offset_of!(GuestParams, tsc_per_page_per_vcpu) as i32;
    /// `passes`.
    pub const PASSES: i32 = offset_of!(GuestParams, passes) as i32;
    /// `gen_table`.
    pub const GEN_TABLE: i32 = offset_of!(GuestParams, gen_table) as i32;
    /// `verify_start`.
    pub const VERIFY_START: i32 = offset_of!(GuestParams, verify_start) as i32;
    /// `verify_pages`.
    pub const VERIFY_PAGES: i32 = offset_of!(GuestParams, verify_pages) as i32;
    /// `seed`.
    pub const SEED: i32 = offset_of!(GuestParams, seed) as i32;
    /// `updates_per_round`.
    pub const UPDATES: i32 = offset_of!(GuestParams, updates_per_round) as i32;
    /// `checks_per_round`.
    pub const CHECKS: i32 = offset_of!(GuestParams, checks_per_round) as i32;
    /// `virtio_base`.
    pub const VIRTIO_BASE: i32 = offset_of!(GuestParams, virtio_base) as i32;
    /// `disk_area`.
    pub const DISK_AREA: i32 = offset_of!(GuestParams, disk_area) as i32;
    /// `disk_blocks`.
    pub const DISK_BLOCKS: i32 = offset_of!(GuestParams, disk_blocks) as i32;
    /// `tsc_per_write`.
    pub const TSC_PER_WRITE: i32 = offset_of!(GuestParams, tsc_per_write) as i32;
    /// `net_area`.
    pub const NET_AREA: i32 = offset_of!(GuestParams, net_area) as i32;
    /// `tsc_per_frame`.
    pub const TSC_PER_FRAME: i32 = offset_of!(GuestParams, tsc_per_frame) as i32;
}

impl GuestParams {
    /// A block with magic and version set and everything else zero.
    pub fn new(vcpus: u32) -> Self {
        GuestParams {
            magic: PARAMS_MAGIC,
            version: PARAMS_VERSION,
            vcpus,
            ..Default::default()
        }
    }

    /// The bytes the VMM writes into guest memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

const _: () = assert!(size_of::<GuestParams>() <= 4096);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable_and_has_no_padding() {
        // The guest code depends on these exact offsets; changing them needs a new version.
        assert_eq!(offset_of!(GuestParams, magic), 0);
        assert_eq!(offset_of!(GuestParams, version), 8);
        assert_eq!(offsets::VCPUS, 12);
        assert_eq!(offsets::STATE_ADDR, 16);
        assert_eq!(offsets::TICK_PERIOD, 24);
        assert_eq!(offsets::WS_START, 32);
        assert_eq!(offsets::WS_PAGES, 40);
        assert_eq!(offsets::TSC_PER_PAGE, 48);
        assert_eq!(offsets::PASSES, 56);
        assert_eq!(offsets::GEN_TABLE, 64);
        assert_eq!(offsets::VERIFY_START, 72);
        assert_eq!(offsets::VERIFY_PAGES, 80);
        assert_eq!(offsets::SEED, 88);
        assert_eq!(offsets::UPDATES, 96);
        assert_eq!(offsets::CHECKS, 104);
        assert_eq!(offsets::VIRTIO_BASE, 112);
        assert_eq!(offsets::DISK_AREA, 120);
        assert_eq!(offsets::DISK_BLOCKS, 128);
        assert_eq!(offsets::TSC_PER_WRITE, 136);
        assert_eq!(offsets::NET_AREA, 144);
        assert_eq!(offsets::TSC_PER_FRAME, 152);
        assert_eq!(size_of::<GuestParams>(), 160);
    }

    #[test]
    fn bytes_start_with_magic_and_version() {
        let bytes = GuestParams::new(3).to_bytes();
        assert_eq!(&bytes[..8], b"FERRYPRM");
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 3);
    }
}
