//! Guest RAM as the transport's page source and sink.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use ferry_runtime::GuestRam;
use ferry_transport::memory::{GuestRegions, MemoryError, PageRange, RawRegion, RegionFile};

fn raw_regions(ram: &GuestRam) -> Vec<RawRegion> {
    ram.regions()
        .iter()
        .map(|region| RawRegion {
            guest_phys_addr: region.gpa,
            host_addr: region.host_addr as *mut u8,
            len: region.len as usize,
            file: Some(RegionFile {
                fd: ram.memfd().as_raw_fd(),
                offset: region.file_offset,
            }),
        })
        .collect()
}

/// The source side: memory the running guest keeps writing, and the disk images a storage
/// migration copies (read with `pread`, like memory). The returned object holds `ram` and
/// `disks`, so the mappings, the memfd and the image files outlive every copy worker.
pub fn source(
    ram: Arc<GuestRam>,
    disks: Vec<DiskMapping>,
) -> Result<Arc<GuestRegions>, MemoryError> {
    let mut raw = raw_regions(&ram);
    raw.extend(disks.iter().map(DiskMapping::raw));
    // SAFETY: the memory regions are the VM's memfd mappings, kept mapped (and the memfd
    // open) by `ram`; the disk regions are mappings of the image files kept mapped and open
    // by `disks`; the returned object holds both. Runtime code touches guest memory only
    // through vm-memory's volatile copies, and nothing in this process holds references into
    // the image mappings.
    let regions = unsafe { GuestRegions::new(&raw) }?;
    Ok(Arc::new(regions.holding(ram).holding(Arc::new(disks))))
}

/// The destination side: the freshly created, all-zero memory of an arriving VM, which
/// nothing else writes until it is resumed, and the fresh (all-hole) images of a storage
/// migration, written with `pwrite`; zero blocks are skipped and stay holes.
pub fn fresh_destination(
    ram: Arc<GuestRam>,
    disks: Vec<DiskMapping>,
) -> Result<Arc<GuestRegions>, MemoryError> {
    let mut raw = raw_regions(&ram);
    raw.extend(disks.iter().map(DiskMapping::raw));
    // SAFETY: as for `source`; in addition the VM was just created from a fresh memfd (all
    // zero), the images were just created sparse (all zero), and neither is used by anything
    // else before the transfer completes (the VM runs, and its disks are served, only after
    // every receiver has finished).
    let regions = unsafe { GuestRegions::new_zeroed(&raw) }?;
    Ok(Arc::new(regions.holding(ram).holding(Arc::new(disks))))
}

/// Where disk `index`'s bytes are in the transfer's address space: far above any guest RAM,
/// 4 TiB apart, so a storage migration's blocks travel as pages of their own regions.
pub fn disk_base(index: usize) -> u64 {
    DISK_SPACE_BASE + index as u64 * DISK_SPACE_STRIDE
}

/// First address of the disks' space (64 TiB, beyond any RAM a VM here has).
pub const DISK_SPACE_BASE: u64 = 1 << 46;
/// Space per disk: the largest image a storage migration moves.
pub const DISK_SPACE_STRIDE: u64 = 1 << 42;

/// A disk image mapped into this process for a storage copy.
#[derive(Debug)]
pub struct DiskMapping {
    file: std::fs::File,
    addr: *mut u8,
    len: usize,
    base: u64,
}

// SAFETY: the mapping is shared file memory accessed only through the transport's raw copies;
// the pointer is not tied to a thread.
unsafe impl Send for DiskMapping {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for DiskMapping {}

impl DiskMapping {
    /// Maps image `index` at `path` (`writable` on a destination). Its size must be a
    /// whole number of pages and at most [`DISK_SPACE_STRIDE`].
    pub fn open(index: usize, path: &std::path::Path, writable: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        let len = file.metadata()?.len();
        let page = ferry_transport::memory::PAGE_SIZE as u64;
        if len == 0 || !len.is_multiple_of(page) || len > DISK_SPACE_STRIDE {
            return Err(std::io::Error::other(format!(
                "{} is {len} bytes; a storage migration moves images of whole 4 KiB pages up to 4 TiB",
                path.display()
            )));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of an open file, of its current length; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DiskMapping {
            file,
            addr: addr.cast(),
            len: len as usize,
            base: disk_base(index),
        })
    }

    fn raw(&self) -> RawRegion {
        RawRegion {
            guest_phys_addr: self.base,
            host_addr: self.addr,
            len: self.len,
            file: Some(RegionFile {
                fd: self.file.as_raw_fd(),
                offset: 0,
            }),
        }
    }
}

impl Drop for DiskMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once, when nothing uses it any more
        // (the regions holding it are gone).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Disk extents (per disk, byte ranges) as the transport's page ranges in the disks' space.
pub fn disk_ranges(extents: &[Vec<(u64, u64)>]) -> Vec<PageRange> {
    let page = ferry_transport::memory::PAGE_SIZE as u64;
    let mut ranges = Vec::new();
    for (index, disk) in extents.iter().enumerate() {
        for &(offset, len) in disk {
            let first = offset / page;
            let end = (offset + len).div_ceil(page);
            if end > first {
                ranges.push(PageRange::new(
                    (disk_base(index) / page) + first,
                    end - first,
                ));
            }
        }
    }
    ranges
}

/// Disk `index`'s whole space, as page frames (one account of a storage migration's sender).
pub fn disk_pages(index: usize) -> PageRange {
    let page = ferry_transport::memory::PAGE_SIZE as u64;
    PageRange::new(disk_base(index) / page, DISK_SPACE_STRIDE / page)
}

/// The disk whose space page frame `pfn` is in, if any.
fn disk_of(pfn: u64) -> Option<usize> {
    let addr = pfn.checked_mul(ferry_transport::memory::PAGE_SIZE as u64)?;
    let index = addr.checked_sub(DISK_SPACE_BASE)? / DISK_SPACE_STRIDE;
    usize::try_from(index).ok()
}

/// The disks (slot indices, ascending) that `ranges` carry blocks of.
pub fn disks_in(ranges: &[PageRange]) -> Vec<usize> {
    let mut disks: Vec<usize> = ranges
        .iter()
        .filter(|r| r.count > 0)
        .filter_map(|r| disk_of(r.first_pfn))
        .collect();
    disks.sort_unstable();
    disks.dedup();
    disks
}

/// Bytes of disk blocks in `ranges`, per disk (slot index; as long as the highest disk
/// they carry).
pub fn bytes_per_disk(ranges: &[PageRange]) -> Vec<u64> {
    let mut bytes = Vec::new();
    for range in ranges {
        if let Some(index) = disk_of(range.first_pfn) {
            if bytes.len() <= index {
                bytes.resize(index + 1, 0);
            }
            bytes[index] += range.bytes();
        }
    }
    bytes
}

/// Converts the runtime's page ranges (by address) into the transport's (by frame number).
pub fn to_transport_ranges(
    ranges: impl Iterator<Item = ferry_runtime::PageRange>,
) -> Vec<PageRange> {
    ranges
        .map(|r| PageRange::new(r.gpa / ferry_transport::memory::PAGE_SIZE as u64, r.pages))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_blocks_are_told_apart_by_disk_and_from_memory() {
        let ranges = disk_ranges(&[vec![(0, 8192), (1 << 20, 100)], vec![], vec![(4096, 4096)]]);
        let memory = PageRange::new(0x100, 4);
        let mut all = vec![memory];
        all.extend(ranges.iter().copied());
        assert_eq!(disks_in(&all), [0, 2]);
        assert_eq!(bytes_per_disk(&all), [3 * 4096, 0, 4096]);
        assert_eq!(disks_in(&[memory]), Vec::<usize>::new());
        for (index, range) in [(0, ranges[0]), (2, ranges[2])] {
            let account = disk_pages(index);
            assert!(
                range.first_pfn >= account.first_pfn
                    && range.end_pfn() <= account.end_pfn()
                    && disk_of(account.end_pfn().unwrap()) == Some(index + 1)
            );
        }
    }
}
