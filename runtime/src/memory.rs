//! Guest RAM: one memfd, mapped as one vm-memory region per RAM range.
//!
//! memfd backing (rather than anonymous memory) lets a later stage hand the same pages to
//! another mapping or process without copying. vm-memory's `AtomicBitmap` records every page
//! the VMM itself writes (devices, preload, parameter block), because KVM's dirty log only
//! sees writes made by the guest.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use xxhash_rust::xxh3::Xxh3;

use crate::dirty::{DirtySet, PageRange};
use crate::layout::{self, MIN_MEMORY, PAGE_SIZE};

/// Guest memory with VMM-write tracking.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors from creating or accessing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not usable.
    #[error(
        "guest memory size {size} bytes is invalid: it must be a multiple of 4096 and at least {min} MiB"
    )]
    InvalidSize {
        /// Requested size in bytes.
        size: u64,
        /// Minimum in MiB.
        min: u64,
    },
    /// `memfd_create` or `ftruncate` failed.
    #[error("creating the {size}-byte memfd for guest memory failed")]
    CreateMemfd {
        /// Requested size in bytes.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("mapping guest memory failed")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// A guest-physical range is not entirely backed by RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// Reading a file into guest memory failed.
    #[error("loading {path} into guest memory at {gpa:#x} failed")]
    Load {
        /// The file.
        path: String,
        /// Where it was going.
        gpa: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One contiguous guest-physical RAM range and where it is mapped in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
    /// Offset of the region in the memfd ([`GuestRam::memfd`]).
    pub file_offset: u64,
}

/// The guest's RAM.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemory,
    memfd: File,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM laid out by [`layout::ram_ranges`].
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::check_size(size)?;
        let memfd =
            create_memfd(size).map_err(|source| MemoryError::CreateMemfd { size, source })?;
        Self::map(memfd, size)
    }

    /// Maps the guest RAM another process created, from its memfd (the VMM process shares
    /// it with hostd, which copies pages in and out during a migration). The memfd must be
    /// `size` bytes, laid out as [`GuestRam::new`] lays it out.
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self, MemoryError> {
        Self::check_size(size)?;
        let actual = memfd
            .metadata()
            .map_err(|source| MemoryError::CreateMemfd { size, source })?
            .len();
        if actual != size {
            return Err(MemoryError::CreateMemfd {
                size,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the memfd holds {actual} bytes"),
                ),
            });
        }
        Self::map(memfd, size)
    }

    fn check_size(size: u64) -> Result<(), MemoryError> {
        if size < MIN_MEMORY || !size.is_multiple_of(PAGE_SIZE) || size > layout::MAX_IDENTITY_MAP {
            return Err(MemoryError::InvalidSize {
                size,
                min: MIN_MEMORY >> 20,
            });
        }
        Ok(())
    }

    fn map(memfd: File, size: u64) -> Result<Self, MemoryError> {
        let mut file_offset = 0u64;
        let mut regions = Vec::new();
        for (gpa, len) in layout::ram_ranges(size) {
            let clone = memfd
                .try_clone()
                .map_err(|source| MemoryError::CreateMemfd { size, source })?;
            let mapping = MmapRegion::<AtomicBitmap>::from_file(
                FileOffset::new(clone, file_offset),
                len as usize,
            )
            .map_err(|e| MemoryError::Map(e.into()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or(MemoryError::OutOfRange { gpa, len })?;
            regions.push(region);
            file_offset += len;
        }
        let memory = GuestMemory::from_regions(regions).map_err(|e| MemoryError::Map(e.into()))?;
        Ok(GuestRam {
            memory,
            memfd,
            size,
        })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM layout as `(gpa, length)` pairs.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        layout::ram_ranges(self.size)
    }

    /// The vm-memory view, for reads and writes that must be tracked.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The memfd backing all regions (regions are consecutive in it, in address order).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Where each RAM range is mapped in this process.
    pub fn regions(&self) -> Vec<RamRegion> {
        let mut file_offset = 0;
        self.memory
            .iter()
            .map(|region| {
                let info = RamRegion {
                    gpa: region.start_addr().0,
                    len: region.len(),
                    host_addr: region.as_ptr() as u64,
                    file_offset,
                };
                file_offset += region.len();
                info
            })
            .collect()
    }

    /// Checks that `[gpa, gpa + len)` lies inside one RAM region.
    pub fn check_range(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let inside = layout::ram_ranges(self.size)
            .iter()
            .any(|&(start, size)| gpa >= start && gpa.saturating_add(len) <= start + size);
        if inside {
            Ok(())
        } else {
            Err(MemoryError::OutOfRange { gpa, len })
        }
    }

    /// Writes `data` at `gpa` (tracked as a VMM write).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check_range(gpa, data.len() as u64)?;
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: data.len() as u64,
            })
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check_range(gpa, buf.len() as u64)?;
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Copies a file into guest memory at `gpa`, the way a boot loader places an initrd.
    /// Returns the number of bytes loaded. All-zero blocks are skipped (fresh RAM is zero)
    /// but still count as written.
    pub fn load_file(&self, path: &Path, gpa: u64) -> Result<u64, MemoryError> {
        let load_err = |source| MemoryError::Load {
            path: path.display().to_string(),
            gpa,
            source,
        };
        let mut file = File::open(path).map_err(load_err)?;
        let len = file.seek(SeekFrom::End(0)).map_err(load_err)?;
        file.seek(SeekFrom::Start(0)).map_err(load_err)?;
        self.check_range(gpa, len)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let want = buf.len().min((len - done) as usize);
            file.read_exact(&mut buf[..want]).map_err(load_err)?;
            if !is_zero(&buf[..want]) {
                self.write(gpa + done, &buf[..want])?;
            } else {
                self.mark_written(gpa + done, want as u64);
            }
            done += want as u64;
        }
        Ok(len)
    }

    /// Records that the VMM changed `[gpa, gpa + len)` by a path vm-memory did not see.
    pub fn mark_written(&self, gpa: u64, len: u64) {
        for region in self.memory.iter() {
            let start = region.start_addr().0;
            let end = start + region.len();
            let lo = gpa.max(start);
            let hi = gpa.saturating_add(len).min(end);
            if lo < hi {
                MmapRegion::bitmap(region)
                    .set_addr_range((lo - start) as usize, (hi - lo) as usize);
            }
        }
    }

    /// Takes (and clears) the per-region bitmaps of pages the VMM wrote.
    pub fn take_vmm_writes(&self) -> Vec<Vec<u64>> {
        self.memory
            .iter()
            .map(|region| MmapRegion::bitmap(region).get_and_reset())
            .collect()
    }

    /// Guest-physical ranges whose backing pages exist. Everything outside them has never
    /// been written and reads as zero, so copies can skip it without touching (and faulting
    /// in) the memory — about 5 µs per page on this host.
    pub fn populated_ranges(&self) -> Vec<PageRange> {
        let mut ranges = Vec::new();
        let mut file_offset = 0u64;
        for (gpa, len) in self.layout() {
            let end = file_offset + len;
            let mut at = file_offset;
            while at < end {
                let Some(data) = seek(&self.memfd, at, libc::SEEK_DATA).filter(|&d| d < end) else {
                    break;
                };
                let hole = seek(&self.memfd, data, libc::SEEK_HOLE)
                    .unwrap_or(end)
                    .min(end);
                ranges.push(PageRange {
                    gpa: gpa + (data - file_offset),
                    pages: (hole - data).div_ceil(PAGE_SIZE),
                });
                at = hole;
            }
            file_offset = end;
        }
        ranges
    }

    /// [`GuestRam::populated_ranges`] as a page set over this RAM's layout.
    pub fn populated_set(&self) -> DirtySet {
        let mut set = DirtySet::empty(&self.layout());
        for range in self.populated_ranges() {
            set.insert_range(range.gpa, range.bytes());
        }
        set
    }

    /// xxh3-128 of all RAM in address order. Read through bounded copies so it is well
    /// defined even if the guest runs meanwhile (the result is then meaningless, not unsafe).
    /// Unpopulated ranges are hashed as the zeros they read as, without touching them.
    pub fn hash(&self) -> u128 {
        let mut hasher = Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let zeros = vec![0u8; 1 << 20];
        let populated = self.populated_ranges();
        let mut next = populated.iter().peekable();
        for (gpa, len) in self.layout() {
            let mut at = gpa;
            let end = gpa + len;
            while at < end {
                // Skip finished populated ranges; find whether `at` is inside one.
                while next.peek().is_some_and(|r| r.end() <= at) {
                    next.next();
                }
                let (chunk_end, populated) = match next.peek() {
                    Some(r) if r.gpa <= at => (r.end().min(end), true),
                    Some(r) => (r.gpa.min(end), false),
                    None => (end, false),
                };
                let chunk = (chunk_end - at).min(buf.len() as u64) as usize;
                if populated {
                    // The range is inside RAM by construction.
                    if self.read(at, &mut buf[..chunk]).is_ok() {
                        hasher.update(&buf[..chunk]);
                    }
                } else {
                    hasher.update(&zeros[..chunk]);
                }
                at += chunk as u64;
            }
        }
        hasher.digest128()
    }
}

fn seek(file: &File, offset: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a valid fd with a valid whence only moves that fd's offset.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    (ret >= 0).then_some(ret as u64)
}

/// Whether a buffer (typically one page) is all zero, a word at a time.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn create_memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    debug_assert!(file.as_raw_fd() >= 0);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096 + 3];
        assert!(is_zero(&page[1..4097]));
        page[4000] = 1;
        assert!(!is_zero(&page[1..4097]));
        page[4000] = 0;
        page[4098] = 1;
        assert!(is_zero(&page[..4096]) && !is_zero(&page));
    }

    #[test]
    fn a_second_mapping_of_the_memfd_sees_the_same_memory() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.write(0x3000, b"shared").unwrap();
        let other = GuestRam::from_memfd(ram.memfd().try_clone().unwrap(), 8 << 20).unwrap();
        let mut back = [0u8; 6];
        other.read(0x3000, &mut back).unwrap();
        assert_eq!(&back, b"shared");
        other.write(0x4000, b"back").unwrap();
        let mut seen = [0u8; 4];
        ram.read(0x4000, &mut seen).unwrap();
        assert_eq!(&seen, b"back");
        assert_eq!(other.hash(), ram.hash());
        assert!(GuestRam::from_memfd(ram.memfd().try_clone().unwrap(), 16 << 20).is_err());
    }

    #[test]
    fn rejects_bad_sizes() {
        for size in [0, MIN_MEMORY - PAGE_SIZE, MIN_MEMORY + 1] {
            assert!(matches!(
                GuestRam::new(size),
                Err(MemoryError::InvalidSize { .. })
            ));
        }
    }

    #[test]
    fn vmm_writes_are_tracked_and_hash_changes() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.take_vmm_writes();
        let before = ram.hash();
        ram.write(0x5000 + 10, b"hello").unwrap();
        let mut back = [0u8; 5];
        ram.read(0x5000 + 10, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        let writes = ram.take_vmm_writes();
        assert_eq!(writes[0][0], 1 << 5);
        assert!(writes[0][1..].iter().all(|&w| w == 0));
        assert_ne!(before, ram.hash());
        // Only the written page is populated; the hash treats holes as zeros.
        let populated = ram.populated_ranges();
        assert_eq!(populated.len(), 1);
        assert!(populated[0].gpa <= 0x5000 && populated[0].end() > 0x5000);
        ram.write(0x5000 + 10, &[0; 5]).unwrap();
        assert_eq!(ram.hash(), before, "zeroed page hashes like a hole");
        assert!(matches!(
            ram.write((8 << 20) - 2, b"xyz"),
            Err(MemoryError::OutOfRange { .. })
        ));
    }
}
