//! Built-in test guests: small programs the runtime assembles and runs at native speed.
//!
//! - `counter` prints `tick N` on the serial port at a steady rate and keeps N in memory; a
//!   restored or migrated guest must continue at N+1.
//! - `dirty` writes one word into every page of a working set at a bounded page rate, so a
//!   test knows exactly which pages the guest touched.
//! - `verify` fills its memory with content derived from each page's index and a per-page
//!   generation, keeps bumping generations and re-checking every page, and reports any page
//!   whose content is wrong through the test device: it catches a lost or stale page.
//! - `disk` drives the VM's first virtio-blk disk with its own polling driver, writes and
//!   reads back blocks with per-block generations, and reports a wrong block ([`disk`]).
//! - `net` drives the VM's first virtio-net NIC with its own polling driver: it sends
//!   numbered frames to a peer and answers the peer's numbered echo requests ([`net`]).
//!
//! A `verify` page `p` of generation `g` holds 512 words `w[i] = base + i * VERIFY_STEP` with
//! `base = ((p << 32) ^ g) * VERIFY_MIX ^ seed`. The generation table (one u64 per page) is
//! itself guest memory, so the guest also keeps the sum of all generations in a register and
//! checks the table against it once per pass.

mod code;
pub mod disk;
pub mod elf_image;
pub mod multiboot_workload;
pub mod net;
mod net_code;
pub mod net_peer;
mod params;

use serde::{Deserialize, Serialize};

pub use code::{
    EXCEPTION_EXIT_BASE, GuestCode, VERIFY_MIX, VERIFY_STEP, VERIFY_TABLE_MISMATCH, guest_code,
};
pub use params::{GuestParams, PARAMS_MAGIC, PARAMS_VERSION};

use crate::layout::{self, DATA_START, PAGE_SIZE};

/// Which built-in guest to run, with its workload parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestGuest {
    /// Prints `tick N` lines.
    Counter {
        /// Ticks per second (1..=100000).
        ticks_per_sec: u32,
    },
    /// Dirties a working set.
    Dirty {
        /// First byte of the working set; `None` means the start of workload memory.
        start: Option<u64>,
        /// Working set in bytes (a multiple of the page size).
        working_set: u64,
        /// Page writes per second across all vCPUs; `None` means as fast as possible.
        pages_per_sec: Option<u64>,
        /// Passes over the working set before the guest reports completion; 0 = forever.
        passes: u64,
    },
    /// Fills, updates and checks memory.
    Verify {
        /// Mixed into every page's content.
        seed: u64,
        /// Pages to check; `None` means all workload memory below 3 GiB.
        pages: Option<u64>,
    },
    /// Writes, reads back and checks blocks of the first disk.
    Disk {
        /// Mixed into every block's content.
        seed: u64,
        /// Blocks (4 KiB) to use; `None` means the whole disk, or what the table fits.
        blocks: Option<u64>,
        /// Block writes per second; `None` means as fast as the disk goes.
        writes_per_sec: Option<u64>,
    },
    /// Talks to a peer through the first NIC.
    Net {
        /// Numbered frames per second (1..=100000).
        frames_per_sec: u64,
    },
}

impl TestGuest {
    /// The guest's name as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self {
            TestGuest::Counter { .. } => "counter",
            TestGuest::Dirty { .. } => "dirty",
            TestGuest::Verify { .. } => "verify",
            TestGuest::Disk { .. } => "disk",
            TestGuest::Net { .. } => "net",
        }
    }

    /// A guest by name with default parameters for a VM of `memory` bytes.
    pub fn with_defaults(name: &str, memory: u64) -> Option<TestGuest> {
        match name {
            "counter" => Some(TestGuest::Counter { ticks_per_sec: 10 }),
            "dirty" => Some(TestGuest::Dirty {
                start: None,
                working_set: (memory.saturating_sub(DATA_START) / 2).max(PAGE_SIZE) / PAGE_SIZE
                    * PAGE_SIZE,
                pages_per_sec: None,
                passes: 0,
            }),
            "verify" => Some(TestGuest::Verify {
                seed: 0x5eed_f00d_cafe_d00d,
                pages: None,
            }),
            "disk" => Some(TestGuest::Disk {
                seed: 0xd15c_5eed_0000_0001,
                blocks: None,
                writes_per_sec: Some(DEFAULT_DISK_WRITES_PER_SEC),
            }),
            "net" => Some(TestGuest::Net {
                frames_per_sec: net::DEFAULT_FRAMES_PER_SEC,
            }),
            _ => None,
        }
    }
}

/// The `disk` guest's default write rate: steady, light traffic.
pub const DEFAULT_DISK_WRITES_PER_SEC: u64 = 200;

/// Errors from configuring a built-in guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    /// A parameter is out of range.
    #[error("invalid {guest} guest parameter: {problem}")]
    InvalidParameter {
        /// Guest name.
        guest: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The VM has more vCPUs than the built-in guest layout has stacks for.
    #[error("built-in guests support at most {max} vCPUs, the VM has {vcpus}")]
    TooManyVcpus {
        /// Requested vCPUs.
        vcpus: u32,
        /// Limit.
        max: u32,
    },
}

/// Where a built-in guest's pages are, for the parameter block and for host-side checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyLayout {
    /// Generation table address.
    pub gen_table: u64,
    /// First checked page.
    pub first_page: u64,
    /// Number of checked pages.
    pub pages: u64,
}

/// Lays out the `verify` guest in RAM ending at `low_end` (RAM below 3 GiB).
pub fn verify_layout(low_end: u64, pages: Option<u64>) -> Result<VerifyLayout, GuestError> {
    let available = low_end.saturating_sub(DATA_START);
    // Each page needs itself plus 8 bytes of table; keep the table page-aligned.
    let max_pages = available / (PAGE_SIZE + 8);
    let pages = pages.unwrap_or(max_pages.saturating_sub(1));
    if pages == 0 || pages > max_pages.saturating_sub(1) {
        return Err(GuestError::InvalidParameter {
            guest: "verify",
            problem: format!(
                "{pages} pages requested, this VM has room for 1..={}",
                max_pages.saturating_sub(1)
            ),
        });
    }
    let table_bytes = (pages * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    Ok(VerifyLayout {
        gen_table: DATA_START,
        first_page: DATA_START + table_bytes,
        pages,
    })
}

/// Builds the parameter block for `guest` on a VM with `vcpus` vCPUs and `memory` bytes,
/// given the guest TSC frequency, the size of the VM's first disk and the register address of
/// its first NIC, if it has them.
pub fn guest_params(
    guest: &TestGuest,
    vcpus: u32,
    memory: u64,
    tsc_khz: u64,
    first_disk: Option<u64>,
    first_nic: Option<u64>,
) -> Result<GuestParams, GuestError> {
    if vcpus > layout::MAX_VCPUS {
        return Err(GuestError::TooManyVcpus {
            vcpus,
            max: layout::MAX_VCPUS,
        });
    }
    let tsc_hz = tsc_khz.max(1) * 1000;
    let low_end = memory.min(layout::LOW_MEMORY_END);
    let mut params = GuestParams::new(vcpus);
    params.state_addr = layout::GUEST_STATE;
    match *guest {
        TestGuest::Counter { ticks_per_sec } => {
            if !(1..=100_000).contains(&ticks_per_sec) {
                return Err(GuestError::InvalidParameter {
                    guest: "counter",
                    problem: format!("{ticks_per_sec} ticks per second, allowed 1..=100000"),
                });
            }
            params.tick_period_tsc = tsc_hz / u64::from(ticks_per_sec);
        }
        TestGuest::Dirty {
            start,
            working_set,
            pages_per_sec,
            passes,
        } => {
            let start = start.unwrap_or(DATA_START);
            let invalid = |problem: String| GuestError::InvalidParameter {
                guest: "dirty",
                problem,
            };
            if !start.is_multiple_of(PAGE_SIZE) || start < DATA_START {
                return Err(invalid(format!(
                    "working set start {start:#x} must be page-aligned and at least {DATA_START:#x}"
                )));
            }
            if working_set == 0 || !working_set.is_multiple_of(PAGE_SIZE) {
                return Err(invalid(format!(
                    "working set of {working_set} bytes must be a non-zero multiple of 4096"
                )));
            }
            let fits = layout::ram_ranges(memory)
                .iter()
                .any(|&(gpa, len)| start >= gpa && start.saturating_add(working_set) <= gpa + len);
            if !fits {
                return Err(invalid(format!(
                    "working set {start:#x}+{working_set:#x} is not inside one RAM range of this {memory}-byte VM"
                )));
            }
            params.ws_start = start;
            params.ws_pages = working_set / PAGE_SIZE;
            params.passes = passes;
            params.tsc_per_page_per_vcpu = match pages_per_sec {
                None => 0,
                Some(0) => return Err(invalid("a page rate of 0 never finishes".into())),
                Some(rate) => (tsc_hz * u64::from(vcpus) / rate).max(1),
            };
        }
        TestGuest::Verify { seed, pages } => {
            let layout = verify_layout(low_end, pages)?;
            params.gen_table = layout.gen_table;
            params.verify_start = layout.first_page;
            params.verify_pages = layout.pages;
            params.seed = seed;
            params.updates_per_round = 16;
            params.checks_per_round = 64;
        }
        TestGuest::Disk {
            seed,
            blocks,
            writes_per_sec,
        } => disk::disk_params(
            &mut params,
            memory,
            seed,
            blocks,
            writes_per_sec,
            tsc_hz,
            first_disk,
        )?,
        TestGuest::Net { frames_per_sec } => {
            net::net_params(&mut params, memory, frames_per_sec, tsc_hz, first_nic)?
        }
    }
    Ok(params)
}

/// Host-side copy of the `verify` pattern: word `i` of page `p` at generation `generation`.
pub fn verify_word(seed: u64, page: u64, generation: u64, word: u64) -> u64 {
    let base = ((page << 32) ^ generation).wrapping_mul(VERIFY_MIX) ^ seed;
    base.wrapping_add(word.wrapping_mul(VERIFY_STEP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_period_follows_tsc() {
        let p = guest_params(
            &TestGuest::Counter { ticks_per_sec: 10 },
            1,
            64 << 20,
            2_000_000,
            None,
            None,
        )
        .unwrap();
        assert_eq!(p.tick_period_tsc, 200_000_000);
        assert!(
            guest_params(
                &TestGuest::Counter { ticks_per_sec: 0 },
                1,
                64 << 20,
                1,
                None,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn dirty_parameters_are_checked() {
        let ok = TestGuest::Dirty {
            start: None,
            working_set: 1 << 20,
            pages_per_sec: Some(1000),
            passes: 1,
        };
        let p = guest_params(&ok, 2, 64 << 20, 1_000_000, None, None).unwrap();
        assert_eq!(p.ws_pages, 256);
        assert_eq!(p.ws_start, DATA_START);
        // 1 GHz, 2 vCPUs sharing 1000 pages/s: each vCPU writes a page every 2 ms.
        assert_eq!(p.tsc_per_page_per_vcpu, 2_000_000);
        for bad in [
            TestGuest::Dirty {
                start: None,
                working_set: 100,
                pages_per_sec: None,
                passes: 0,
            },
            TestGuest::Dirty {
                start: Some(0x1000),
                working_set: 4096,
                pages_per_sec: None,
                passes: 0,
            },
            TestGuest::Dirty {
                start: None,
                working_set: 64 << 20,
                pages_per_sec: None,
                passes: 0,
            },
            TestGuest::Dirty {
                start: None,
                working_set: 4096,
                pages_per_sec: Some(0),
                passes: 0,
            },
        ] {
            assert!(
                guest_params(&bad, 1, 64 << 20, 1_000_000, None, None).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn verify_layout_leaves_room_for_its_table() {
        let l = verify_layout(64 << 20, None).unwrap();
        assert_eq!(l.gen_table, DATA_START);
        assert!(l.first_page >= l.gen_table + l.pages * 8);
        assert!(l.first_page + l.pages * PAGE_SIZE <= 64 << 20);
        assert!(verify_layout(64 << 20, Some(1 << 30)).is_err());
        assert!(verify_layout(64 << 20, Some(0)).is_err());
    }

    #[test]
    fn too_many_vcpus_is_refused() {
        let guest = TestGuest::Counter { ticks_per_sec: 1 };
        assert!(matches!(
            guest_params(&guest, layout::MAX_VCPUS + 1, 64 << 20, 1, None, None),
            Err(GuestError::TooManyVcpus { .. })
        ));
    }
}
