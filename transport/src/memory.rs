//! Guest memory as the transport sees it: pages addressed by guest page frame number (PFN),
//! read on the source and written on the destination.
//!
//! [`GuestRegions`] works directly on the host mappings of guest memory (for example an mmap
//! of a memfd) without extra copies. [`VecMemory`] is a safe, self-contained implementation
//! for tests and benchmarks.

use std::any::Any;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Most buffers one gathered write takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A run of `count` pages starting at page frame `first_pfn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageRange {
    /// First guest page frame number (guest physical address >> 12).
    pub first_pfn: u64,
    /// Number of pages.
    pub count: u64,
}

impl PageRange {
    /// A range of `count` pages from `first_pfn`.
    pub const fn new(first_pfn: u64, count: u64) -> Self {
        Self { first_pfn, count }
    }

    /// One past the last PFN, or `None` if that overflows.
    pub fn end_pfn(&self) -> Option<u64> {
        self.first_pfn.checked_add(self.count)
    }

    /// Size of the range in bytes.
    pub fn bytes(&self) -> u64 {
        self.count.saturating_mul(PAGE_SIZE as u64)
    }
}

impl From<(u64, u64)> for PageRange {
    fn from((first_pfn, count): (u64, u64)) -> Self {
        Self { first_pfn, count }
    }
}

/// A guest memory access failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Some pages of the range are not backed by any region.
    #[error("pages {first_pfn:#x}..{first_pfn:#x}+{count} are not backed by guest memory")]
    Unmapped {
        /// First PFN of the access.
        first_pfn: u64,
        /// Pages in the access.
        count: u64,
    },
    /// A buffer handed to a page access is not a whole number of pages.
    #[error("buffer of {len} bytes is not a whole number of {PAGE_SIZE}-byte pages")]
    PartialPage {
        /// Buffer length.
        len: usize,
    },
    /// A region passed to a constructor is unusable.
    #[error(
        "guest memory region {index} (guest address {guest_phys_addr:#x}) is invalid: {reason}"
    )]
    InvalidRegion {
        /// Index in the list given.
        index: usize,
        /// Its guest physical base.
        guest_phys_addr: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two regions cover the same guest addresses.
    #[error("guest memory regions at {first:#x} and {second:#x} overlap")]
    OverlappingRegions {
        /// Base of the lower region.
        first: u64,
        /// Base of the region overlapping it.
        second: u64,
    },
    /// Writing destination memory through its file failed.
    #[error("cannot write page {first_pfn:#x} through the guest memory file")]
    WriteFile {
        /// First PFN of the write.
        first_pfn: u64,
        /// The pwrite error.
        #[source]
        source: io::Error,
    },
    /// Reading source memory through its file failed.
    #[error("cannot read page {first_pfn:#x} through the guest memory file")]
    ReadFile {
        /// First PFN of the read.
        first_pfn: u64,
        /// The pread error.
        #[source]
        source: io::Error,
    },
    /// Prefaulting destination memory failed.
    #[error("prefaulting pages {first_pfn:#x}..{first_pfn:#x}+{count} failed")]
    Prefault {
        /// First PFN.
        first_pfn: u64,
        /// Pages.
        count: u64,
        /// The madvise error.
        #[source]
        source: io::Error,
    },
}

/// Memory the sender reads pages from. Implementations must tolerate the guest writing the
/// memory while it is read: a page read while it changes may be torn, which is fine because
/// dirty tracking makes the migration send it again.
pub trait PageSource: Send + Sync {
    /// Checks that every page of `range` exists, so bad input fails before anything is sent.
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError>;

    /// Copies `dst.len() / PAGE_SIZE` pages starting at `first_pfn` into `dst`.
    fn read_pages(&self, first_pfn: u64, dst: &mut [u8]) -> Result<(), MemoryError>;
}

/// Memory the receiver writes pages into. Several receiver threads write concurrently, each
/// to different pages.
pub trait PageSink: Send + Sync {
    /// Checks that every page of `range` exists, so a frame is rejected before any of it is
    /// written.
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError>;

    /// Writes `src.len() / PAGE_SIZE` pages starting at `first_pfn`.
    fn write_pages(&self, first_pfn: u64, src: &[u8]) -> Result<(), MemoryError>;

    /// Writes consecutive pages from several buffers, each a whole number of pages, starting
    /// at `first_pfn`: one call for a run that arrives in pieces. Implementations with a
    /// cheaper gathered write (`pwritev`) override it.
    fn write_pages_vectored(&self, first_pfn: u64, pieces: &[&[u8]]) -> Result<(), MemoryError> {
        let mut pfn = first_pfn;
        for piece in pieces {
            self.write_pages(pfn, piece)?;
            pfn += whole_pages(piece.len())?;
        }
        Ok(())
    }

    /// Makes the pages of `range` read as zero.
    fn zero_pages(&self, range: PageRange) -> Result<(), MemoryError>;

    /// Hint that `range` is about to be written: an implementation may populate the backing
    /// pages in one go, which costs far less than taking one page fault per page.
    fn prefault(&self, range: PageRange) -> Result<(), MemoryError> {
        let _ = range;
        Ok(())
    }
}

impl<T: PageSource + ?Sized> PageSource for Arc<T> {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        (**self).check_range(range)
    }
    fn read_pages(&self, first_pfn: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read_pages(first_pfn, dst)
    }
}

impl<T: PageSink + ?Sized> PageSink for Arc<T> {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        (**self).check_range(range)
    }
    fn write_pages(&self, first_pfn: u64, src: &[u8]) -> Result<(), MemoryError> {
        (**self).write_pages(first_pfn, src)
    }
    fn write_pages_vectored(&self, first_pfn: u64, pieces: &[&[u8]]) -> Result<(), MemoryError> {
        (**self).write_pages_vectored(first_pfn, pieces)
    }
    fn zero_pages(&self, range: PageRange) -> Result<(), MemoryError> {
        (**self).zero_pages(range)
    }
    fn prefault(&self, range: PageRange) -> Result<(), MemoryError> {
        (**self).prefault(range)
    }
}

fn whole_pages(len: usize) -> Result<u64, MemoryError> {
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::PartialPage { len });
    }
    Ok((len / PAGE_SIZE) as u64)
}

/// A contiguous mapping of guest memory in this process, for hardware that reads or writes
/// it directly (RDMA registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First guest page frame.
    pub first_pfn: u64,
    /// Pages.
    pub pages: u64,
    /// Host address of the first page.
    pub host_addr: *mut u8,
}

/// Memory whose pages sit in mappings of this process, which a NIC may be given direct
/// access to.
///
/// # Safety
///
/// Implementations promise that every [`Mapping`] returned stays mapped, readable and
/// writable for as long as the object lives, and that no Rust reference points into it.
pub unsafe trait MappedMemory: Send + Sync {
    /// The mappings, in ascending guest-physical order.
    fn mappings(&self) -> Vec<Mapping>;
}

/// One mapping of guest memory into this process, as the VMM provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRegion {
    /// Guest physical address of the first byte; page aligned.
    pub guest_phys_addr: u64,
    /// Host virtual address of the first byte; page aligned.
    pub host_addr: *mut u8,
    /// Length in bytes; a multiple of [`PAGE_SIZE`].
    pub len: usize,
    /// The shared file (memfd) mapped there, if any. Destination writes then go through
    /// `pwrite` instead of the mapping: a fresh page filled by `pwrite` is allocated without
    /// being zeroed first and without a page fault, which here costs less than half of a
    /// store through the mapping (about 0.45 s per GiB against 1.15 s).
    pub file: Option<RegionFile>,
}

/// The file behind a [`RawRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionFile {
    /// An open descriptor of the file, writable.
    pub fd: RawFd,
    /// Offset in the file of the region's first byte; page aligned.
    pub offset: u64,
}

#[derive(Debug)]
struct Region {
    first_pfn: u64,
    pages: u64,
    host_addr: *mut u8,
    file: Option<RegionFile>,
    /// One bit per page, set while the page is known to still hold the zeros it started with.
    /// Lets a zero-page marker skip touching memory that was never written, which would
    /// otherwise fault in a page just to store zeros in it.
    known_zero: Option<Box<[AtomicU64]>>,
}

/// Guest memory regions mapped in this process, accessed in place. Implements both
/// [`PageSource`] (reads copy out with `ptr::copy_nonoverlapping`, never through a reference,
/// since the guest may be writing) and [`PageSink`].
pub struct GuestRegions {
    regions: Vec<Region>,
    /// Whatever keeps the mappings alive (see [`GuestRegions::holding`]).
    owners: Vec<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for GuestRegions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRegions")
            .field("regions", &self.regions)
            .field("owners", &self.owners.len())
            .finish()
    }
}

// SAFETY: the raw pointers refer to shared guest memory that the constructor's caller promised
// stays mapped for the object's lifetime; every access goes through raw-pointer copies of
// whole pages, so sharing them between threads is no different from the guest's own vCPUs
// sharing the memory.
unsafe impl Send for GuestRegions {}
// SAFETY: as for Send; no method hands out references into the memory.
unsafe impl Sync for GuestRegions {}

impl Region {
    /// Host address of page `page` of the region. Callers pass in-bounds pages (checked by
    /// `for_each_piece`), so the wrapping arithmetic never actually wraps.
    fn page_ptr(&self, page: u64) -> *mut u8 {
        self.host_addr.wrapping_add(page as usize * PAGE_SIZE)
    }
}

impl GuestRegions {
    /// Wraps existing mappings of guest memory.
    ///
    /// # Safety
    ///
    /// For every region, `host_addr..host_addr + len` must be a readable and writable mapping
    /// that stays mapped (not unmapped, not remapped, not shrunk — for a memfd, not truncated)
    /// for as long as the returned object or any clone of an `Arc` holding it lives. Nothing
    /// else in the process may hold a Rust reference (`&[u8]`/`&mut [u8]`) into that memory
    /// while this object accesses it; raw-pointer or volatile access by others (the guest,
    /// other VMM code) is allowed. When `file` is given, `fd` must stay open for as long, be
    /// writable, and be the shared file mapped at `host_addr` from `offset` (so writes to the
    /// file are the writes to the mapping).
    pub unsafe fn new(regions: &[RawRegion]) -> Result<Self, MemoryError> {
        Self::build(regions, false)
    }

    /// Like [`GuestRegions::new`] for destination memory that is freshly mapped and therefore
    /// all zero. Zero-page markers then skip pages this object has not written, so fresh
    /// memory is not faulted in just to store zeros.
    ///
    /// # Safety
    ///
    /// Everything required by [`GuestRegions::new`], and in addition: every byte of every
    /// region is zero now, and nothing but this object writes the memory while it is used
    /// (true for the destination of a migration until the VM is resumed).
    pub unsafe fn new_zeroed(regions: &[RawRegion]) -> Result<Self, MemoryError> {
        Self::build(regions, true)
    }

    fn build(regions: &[RawRegion], zeroed: bool) -> Result<Self, MemoryError> {
        let mut built = Vec::with_capacity(regions.len());
        for (index, region) in regions.iter().enumerate() {
            let invalid = |reason| MemoryError::InvalidRegion {
                index,
                guest_phys_addr: region.guest_phys_addr,
                reason,
            };
            if region.host_addr.is_null() {
                return Err(invalid("host address is null"));
            }
            if region.len == 0 {
                return Err(invalid("length is zero"));
            }
            if !region.guest_phys_addr.is_multiple_of(PAGE_SIZE as u64)
                || !(region.host_addr as usize).is_multiple_of(PAGE_SIZE)
                || !region.len.is_multiple_of(PAGE_SIZE)
            {
                return Err(invalid("address or length is not page aligned"));
            }
            if region
                .guest_phys_addr
                .checked_add(region.len as u64)
                .is_none()
            {
                return Err(invalid(
                    "region extends past the end of the guest address space",
                ));
            }
            if let Some(file) = region.file {
                if file.fd < 0 {
                    return Err(invalid("file descriptor is negative"));
                }
                if file.offset % PAGE_SIZE as u64 != 0
                    || file.offset.checked_add(region.len as u64).is_none()
                {
                    return Err(invalid("file offset is not page aligned or overflows"));
                }
            }
            let pages = (region.len / PAGE_SIZE) as u64;
            let known_zero = zeroed.then(|| {
                (0..pages.div_ceil(64))
                    .map(|_| AtomicU64::new(u64::MAX))
                    .collect()
            });
            built.push(Region {
                first_pfn: region.guest_phys_addr >> PAGE_SHIFT,
                pages,
                host_addr: region.host_addr,
                file: region.file,
                known_zero,
            });
        }
        built.sort_by_key(|r| r.first_pfn);
        for pair in built.windows(2) {
            if pair[0].first_pfn + pair[0].pages > pair[1].first_pfn {
                return Err(MemoryError::OverlappingRegions {
                    first: pair[0].first_pfn << PAGE_SHIFT,
                    second: pair[1].first_pfn << PAGE_SHIFT,
                });
            }
        }
        Ok(Self {
            regions: built,
            owners: Vec::new(),
        })
    }

    /// Keeps `owner` (typically the VMM object that owns the mappings and the memfd) alive
    /// for as long as this object lives, so callers need no wrapper type to uphold the
    /// constructor's lifetime obligation.
    pub fn holding(mut self, owner: Arc<dyn Any + Send + Sync>) -> Self {
        self.owners.push(owner);
        self
    }

    /// Total pages across all regions.
    pub fn page_count(&self) -> u64 {
        self.regions.iter().map(|r| r.pages).sum()
    }

    /// The ranges of guest pages covered, in ascending order.
    pub fn ranges(&self) -> Vec<PageRange> {
        self.regions
            .iter()
            .map(|r| PageRange::new(r.first_pfn, r.pages))
            .collect()
    }

    /// Splits `range` into the pieces that fall in each region, calling `f(region, page
    /// offset in region, pages, offset of the piece in the range)`. Fails before calling `f`
    /// if any page is unmapped.
    fn for_each_piece(
        &self,
        range: PageRange,
        mut f: impl FnMut(&Region, u64, u64, u64) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        self.check(range)?;
        let mut pfn = range.first_pfn;
        let mut done = 0;
        while done < range.count {
            let region = self.region_of(pfn).ok_or(MemoryError::Unmapped {
                first_pfn: pfn,
                count: 1,
            })?;
            let offset = pfn - region.first_pfn;
            let pages = (region.pages - offset).min(range.count - done);
            f(region, offset, pages, done)?;
            pfn += pages;
            done += pages;
        }
        Ok(())
    }

    fn region_of(&self, pfn: u64) -> Option<&Region> {
        let index = self
            .regions
            .partition_point(|r| r.first_pfn + r.pages <= pfn);
        self.regions.get(index).filter(|r| r.first_pfn <= pfn)
    }

    fn check(&self, range: PageRange) -> Result<(), MemoryError> {
        let unmapped = MemoryError::Unmapped {
            first_pfn: range.first_pfn,
            count: range.count,
        };
        let end = range.end_pfn().ok_or(MemoryError::Unmapped {
            first_pfn: range.first_pfn,
            count: range.count,
        })?;
        let mut pfn = range.first_pfn;
        while pfn < end {
            let Some(region) = self.region_of(pfn) else {
                return Err(unmapped);
            };
            pfn = region.first_pfn + region.pages;
        }
        Ok(())
    }

    /// Populates the backing pages of `range` with `MADV_POPULATE_WRITE`, one system call
    /// per region piece instead of one page fault per page. Content is not changed.
    pub fn populate(&self, range: PageRange) -> Result<(), MemoryError> {
        self.for_each_piece(range, |region, offset, pages, _| {
            Self::populate_piece(region, offset, pages)
        })
    }

    fn populate_piece(region: &Region, offset: u64, pages: u64) -> Result<(), MemoryError> {
        let bytes = pages as usize * PAGE_SIZE;
        let addr = region.page_ptr(offset);
        // SAFETY: madvise only reads the address range; MADV_POPULATE_WRITE faults pages in
        // as if written without changing their content, on a range inside the mapping.
        let rc = unsafe { libc::madvise(addr.cast(), bytes, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(MemoryError::Prefault {
                first_pfn: region.first_pfn + offset,
                count: pages,
                source: err,
            });
        }
        // Kernels before 5.14 lack MADV_POPULATE_WRITE; an atomic no-op write per page
        // faults the page in without disturbing a concurrent writer.
        for page in 0..bytes / PAGE_SIZE {
            // SAFETY: the byte is inside the mapping (page < pages); AtomicU8 has the
            // alignment of u8, and the mapping is only accessed through raw pointers.
            let byte = unsafe { AtomicU8::from_ptr(addr.wrapping_add(page * PAGE_SIZE)) };
            byte.fetch_or(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes through the file: `pwrite` until done, since it may write less than asked.
    /// Reads pages through the region's file: the kernel copies them out of the page cache,
    /// so a mapping this process never touched (a VMM's memory shared with hostd) costs no
    /// page fault per page.
    fn read_file(
        region: &Region,
        file: RegionFile,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), MemoryError> {
        let mut done = 0;
        while done < dst.len() {
            let at = file.offset + offset * PAGE_SIZE as u64 + done as u64;
            let rest = &mut dst[done..];
            // SAFETY: pread writes at most `rest.len()` bytes into a live, exclusively borrowed
            // slice, from the file the constructor's caller vouched is behind this region; the
            // range lies inside the region because for_each_piece bounds `offset`.
            let read = unsafe {
                libc::pread(
                    file.fd,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    at as libc::off_t,
                )
            };
            if read < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(MemoryError::ReadFile {
                    first_pfn: region.first_pfn + offset,
                    source: err,
                });
            }
            if read == 0 {
                let source = io::Error::new(io::ErrorKind::UnexpectedEof, "pread read nothing");
                return Err(MemoryError::ReadFile {
                    first_pfn: region.first_pfn + offset,
                    source,
                });
            }
            done += read as usize;
        }
        Ok(())
    }

    fn write_file(
        region: &Region,
        file: RegionFile,
        offset: u64,
        src: &[u8],
    ) -> Result<(), MemoryError> {
        let mut done = 0;
        while done < src.len() {
            let at = file.offset + offset * PAGE_SIZE as u64 + done as u64;
            let rest = &src[done..];
            // SAFETY: pwrite reads `rest.len()` bytes from a live slice and writes them to the
            // file, which the constructor's caller vouched is the file behind this region; the
            // range lies inside the region because for_each_piece bounds `offset`.
            let written = unsafe {
                libc::pwrite(file.fd, rest.as_ptr().cast(), rest.len(), at as libc::off_t)
            };
            if written < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(MemoryError::WriteFile {
                    first_pfn: region.first_pfn + offset,
                    source: err,
                });
            }
            if written == 0 {
                let source = io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing");
                return Err(MemoryError::WriteFile {
                    first_pfn: region.first_pfn + offset,
                    source,
                });
            }
            done += written as usize;
        }
        Ok(())
    }

    /// `pwritev` of `pieces` to consecutive pages from `offset`; a short write finishes with
    /// plain writes of what is left.
    fn write_file_vectored(
        region: &Region,
        file: RegionFile,
        offset: u64,
        pieces: &[&[u8]],
    ) -> Result<(), MemoryError> {
        let iovecs: Vec<libc::iovec> = pieces
            .iter()
            .map(|piece| libc::iovec {
                iov_base: piece.as_ptr().cast_mut().cast(),
                iov_len: piece.len(),
            })
            .collect();
        let total: usize = pieces.iter().map(|piece| piece.len()).sum();
        let at = file.offset + offset * PAGE_SIZE as u64;
        let written = loop {
            // SAFETY: every iovec describes a live slice of `pieces`, which pwritev only reads;
            // the file range lies inside the region (checked by the caller).
            let written = unsafe {
                libc::pwritev(
                    file.fd,
                    iovecs.as_ptr(),
                    iovecs.len() as libc::c_int,
                    at as libc::off_t,
                )
            };
            if written >= 0 {
                break written as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(MemoryError::WriteFile {
                    first_pfn: region.first_pfn + offset,
                    source: err,
                });
            }
        };
        if written == total {
            return Ok(());
        }
        // Rare: finish byte-exactly with pwrite from where pwritev stopped.
        let mut skip = written;
        let mut page_offset = offset;
        for piece in pieces {
            if skip >= piece.len() {
                skip -= piece.len();
                page_offset += (piece.len() / PAGE_SIZE) as u64;
                continue;
            }
            let whole = skip / PAGE_SIZE * PAGE_SIZE;
            Self::write_file(
                region,
                file,
                page_offset + (whole / PAGE_SIZE) as u64,
                &piece[whole..],
            )?;
            skip = 0;
            page_offset += (piece.len() / PAGE_SIZE) as u64;
        }
        Ok(())
    }

    fn clear_known_zero(region: &Region, offset: u64, pages: u64) {
        let Some(bits) = &region.known_zero else {
            return;
        };
        let mut page = offset;
        let end = offset + pages;
        while page < end {
            let word = (page / 64) as usize;
            let first_bit = page % 64;
            let span = (64 - first_bit).min(end - page);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << first_bit
            };
            // Only stores pay for the atomic: most writes land on pages whose bits are already
            // clear after the first round.
            if bits[word].load(Ordering::Relaxed) & mask != 0 {
                bits[word].fetch_and(!mask, Ordering::Relaxed);
            }
            page += span;
        }
    }
}

// SAFETY: the constructor's contract (see `GuestRegions::new`) is exactly this trait's.
unsafe impl MappedMemory for GuestRegions {
    fn mappings(&self) -> Vec<Mapping> {
        self.regions
            .iter()
            .map(|region| Mapping {
                first_pfn: region.first_pfn,
                pages: region.pages,
                host_addr: region.host_addr,
            })
            .collect()
    }
}

impl PageSource for GuestRegions {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        self.check(range)
    }

    fn read_pages(&self, first_pfn: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let count = whole_pages(dst.len())?;
        let base = dst.as_mut_ptr();
        let len = dst.len();
        self.for_each_piece(
            PageRange::new(first_pfn, count),
            |region, offset, pages, done| {
                if let Some(file) = region.file {
                    let start = done as usize * PAGE_SIZE;
                    let end = start + pages as usize * PAGE_SIZE;
                    debug_assert!(end <= len);
                    // SAFETY: `start..end` lies inside `dst` (done + pages <= count), which
                    // this function borrows exclusively; pieces never overlap.
                    let piece = unsafe {
                        std::slice::from_raw_parts_mut(base.wrapping_add(start), end - start)
                    };
                    return Self::read_file(region, file, offset, piece);
                }
                // SAFETY: the source lies inside the region (for_each_piece bounds it) and the
                // destination inside `dst` (done + pages <= count); they cannot overlap because
                // `dst` is a Rust slice the caller owns, while guest memory is never borrowed as one.
                // The guest may write the source concurrently: a torn page is acceptable (see
                // PageSource), and no reference to guest memory is formed.
                unsafe {
                    ptr::copy_nonoverlapping(
                        region.page_ptr(offset),
                        base.wrapping_add(done as usize * PAGE_SIZE),
                        pages as usize * PAGE_SIZE,
                    );
                }
                Ok(())
            },
        )
    }
}

impl PageSink for GuestRegions {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        self.check(range)
    }

    fn write_pages(&self, first_pfn: u64, src: &[u8]) -> Result<(), MemoryError> {
        let count = whole_pages(src.len())?;
        self.for_each_piece(
            PageRange::new(first_pfn, count),
            |region, offset, pages, done| {
                let piece = &src[done as usize * PAGE_SIZE..(done + pages) as usize * PAGE_SIZE];
                if let Some(file) = region.file {
                    Self::write_file(region, file, offset, piece)?;
                    Self::clear_known_zero(region, offset, pages);
                    return Ok(());
                }
                // SAFETY: source is inside `src`, destination inside the region (both bounded by
                // for_each_piece); `src` is ordinary process memory, never guest memory, so they do
                // not overlap.
                unsafe {
                    ptr::copy_nonoverlapping(piece.as_ptr(), region.page_ptr(offset), piece.len());
                }
                Self::clear_known_zero(region, offset, pages);
                Ok(())
            },
        )
    }

    fn write_pages_vectored(&self, first_pfn: u64, pieces: &[&[u8]]) -> Result<(), MemoryError> {
        let mut pages = 0;
        for piece in pieces {
            pages += whole_pages(piece.len())?;
        }
        let range = PageRange::new(first_pfn, pages);
        self.check(range)?;
        let region = self.region_of(first_pfn).ok_or(MemoryError::Unmapped {
            first_pfn,
            count: pages,
        })?;
        let offset = first_pfn - region.first_pfn;
        match region.file {
            // One gathered system call, when the run lies in one file-backed region.
            Some(file) if offset + pages <= region.pages && pieces.len() <= MAX_IOVECS => {
                Self::write_file_vectored(region, file, offset, pieces)?;
                Self::clear_known_zero(region, offset, pages);
                Ok(())
            }
            _ => {
                let mut pfn = first_pfn;
                for piece in pieces {
                    self.write_pages(pfn, piece)?;
                    pfn += (piece.len() / PAGE_SIZE) as u64;
                }
                Ok(())
            }
        }
    }

    fn zero_pages(&self, range: PageRange) -> Result<(), MemoryError> {
        self.for_each_piece(range, |region, offset, pages, _| {
            for page in offset..offset + pages {
                if let Some(bits) = &region.known_zero
                    && bits[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
                {
                    continue;
                }
                if let Some(file) = region.file {
                    Self::write_file(region, file, page, &[0; PAGE_SIZE])?;
                    continue;
                }
                // SAFETY: the page is inside the region (page < offset + pages, bounded by
                // for_each_piece), a mapping the constructor's caller vouched for.
                unsafe { ptr::write_bytes(region.page_ptr(page), 0, PAGE_SIZE) };
            }
            Ok(())
        })
    }

    fn prefault(&self, range: PageRange) -> Result<(), MemoryError> {
        // File-backed regions are written with pwrite, which allocates without zero-filling;
        // populating them first costs a zero-fill per page, more than it gains except when
        // the memory is cold (docs/design.md, "Landing pages").
        self.for_each_piece(range, |region, offset, pages, _| {
            if region.file.is_some() {
                Ok(())
            } else {
                Self::populate_piece(region, offset, pages)
            }
        })
    }
}

/// Guest memory in an ordinary heap allocation, for tests and benchmarks. Safe to share
/// between threads: pages are copied word by word with relaxed atomics, so even a (contract
/// violating) concurrent write of the same page is a well-defined race, not undefined
/// behaviour.
#[derive(Debug)]
pub struct VecMemory {
    first_pfn: u64,
    words: Box<[AtomicU64]>,
}

const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

impl VecMemory {
    /// `pages` zero pages starting at `first_pfn`.
    pub fn new(first_pfn: u64, pages: u64) -> Self {
        let words = (0..pages as usize * WORDS_PER_PAGE)
            .map(|_| AtomicU64::new(0))
            .collect();
        Self { first_pfn, words }
    }

    /// Memory starting at `first_pfn` holding `bytes` (a whole number of pages).
    pub fn from_bytes(first_pfn: u64, bytes: &[u8]) -> Result<Self, MemoryError> {
        let pages = whole_pages(bytes.len())?;
        let memory = Self::new(first_pfn, pages);
        memory.store(0, bytes);
        Ok(memory)
    }

    /// The pages covered.
    pub fn range(&self) -> PageRange {
        PageRange::new(self.first_pfn, (self.words.len() / WORDS_PER_PAGE) as u64)
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.words.len() * 8];
        self.load(0, &mut out);
        out
    }

    fn word_index(&self, range: PageRange) -> Result<usize, MemoryError> {
        let unmapped = || MemoryError::Unmapped {
            first_pfn: range.first_pfn,
            count: range.count,
        };
        let own = self.range();
        let end = range.end_pfn().ok_or_else(unmapped)?;
        if range.first_pfn < own.first_pfn || end > own.first_pfn + own.count {
            return Err(unmapped());
        }
        Ok((range.first_pfn - own.first_pfn) as usize * WORDS_PER_PAGE)
    }

    fn store(&self, first_word: usize, bytes: &[u8]) {
        for (word, chunk) in self.words[first_word..].iter().zip(bytes.chunks_exact(8)) {
            word.store(
                u64::from_ne_bytes(chunk.try_into().unwrap_or_default()),
                Ordering::Relaxed,
            );
        }
    }

    fn load(&self, first_word: usize, out: &mut [u8]) {
        for (word, chunk) in self.words[first_word..].iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
    }
}

impl PageSource for VecMemory {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        self.word_index(range).map(|_| ())
    }

    fn read_pages(&self, first_pfn: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let start = self.word_index(PageRange::new(first_pfn, whole_pages(dst.len())?))?;
        self.load(start, dst);
        Ok(())
    }
}

impl PageSink for VecMemory {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        self.word_index(range).map(|_| ())
    }

    fn write_pages(&self, first_pfn: u64, src: &[u8]) -> Result<(), MemoryError> {
        let start = self.word_index(PageRange::new(first_pfn, whole_pages(src.len())?))?;
        self.store(start, src);
        Ok(())
    }

    fn zero_pages(&self, range: PageRange) -> Result<(), MemoryError> {
        let start = self.word_index(range)?;
        for word in &self.words[start..start + range.count as usize * WORDS_PER_PAGE] {
            word.store(0, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| (i / 7) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn vec_memory_round_trips_and_bounds_checks() {
        let data = pattern(4, 3);
        let memory = VecMemory::from_bytes(10, &data).unwrap();
        let mut page = vec![0; 2 * PAGE_SIZE];
        memory.read_pages(11, &mut page).unwrap();
        assert_eq!(page, data[PAGE_SIZE..3 * PAGE_SIZE]);
        assert!(matches!(
            memory.read_pages(13, &mut page),
            Err(MemoryError::Unmapped { .. })
        ));
        assert!(matches!(
            memory.read_pages(9, &mut page[..PAGE_SIZE]),
            Err(MemoryError::Unmapped { .. })
        ));
        assert!(matches!(
            memory.read_pages(10, &mut page[..100]),
            Err(MemoryError::PartialPage { len: 100 })
        ));
        memory.zero_pages(PageRange::new(12, 1)).unwrap();
        memory.write_pages(10, &[7; PAGE_SIZE]).unwrap();
        let all = memory.to_vec();
        assert!(all[..PAGE_SIZE].iter().all(|&b| b == 7));
        assert_eq!(
            all[PAGE_SIZE..2 * PAGE_SIZE],
            data[PAGE_SIZE..2 * PAGE_SIZE]
        );
        assert!(all[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(PageSource::check_range(&memory, PageRange::new(u64::MAX, 2)).is_err());
    }

    /// Two regions with a hole between them, backed by a heap buffer.
    fn regions(buffer: &mut [u8], zeroed: bool) -> GuestRegions {
        let base = buffer.as_mut_ptr();
        let offset = base.align_offset(PAGE_SIZE);
        let (low, high) = (
            base.wrapping_add(offset),
            base.wrapping_add(offset + 4 * PAGE_SIZE),
        );
        let list = [
            RawRegion {
                guest_phys_addr: 0x10_0000,
                host_addr: high,
                len: 2 * PAGE_SIZE,
                file: None,
            },
            RawRegion {
                guest_phys_addr: 0,
                host_addr: low,
                len: 4 * PAGE_SIZE,
                file: None,
            },
        ];
        let memory = if zeroed {
            // SAFETY: both regions lie inside `buffer` (the callers size it for 6 pages plus
            // alignment), which outlives the returned object in every test; the tests read
            // `buffer` only after dropping the object, and the regions do not overlap.
            unsafe { GuestRegions::new_zeroed(&list) }
        } else {
            // SAFETY: as above.
            unsafe { GuestRegions::new(&list) }
        };
        memory.unwrap()
    }

    #[test]
    fn guest_regions_read_write_and_reject_holes() {
        let mut buffer = vec![0u8; 8 * PAGE_SIZE];
        let memory = regions(&mut buffer, false);
        assert_eq!(memory.page_count(), 6);
        assert_eq!(
            memory.ranges(),
            vec![PageRange::new(0, 4), PageRange::new(0x100, 2)]
        );
        let data = pattern(2, 9);
        memory.write_pages(0x100, &data).unwrap();
        memory.write_pages(2, &data).unwrap();
        let mut back = vec![0; 2 * PAGE_SIZE];
        memory.read_pages(0x100, &mut back).unwrap();
        assert_eq!(back, data);
        memory.read_pages(2, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(matches!(
            memory.read_pages(3, &mut back),
            Err(MemoryError::Unmapped { .. })
        ));
        assert!(PageSink::check_range(&memory, PageRange::new(0, 5)).is_err());
        assert!(PageSink::check_range(&memory, PageRange::new(0x100, 2)).is_ok());
        memory.zero_pages(PageRange::new(0x101, 1)).unwrap();
        memory.read_pages(0x100, &mut back).unwrap();
        assert_eq!(back[..PAGE_SIZE], data[..PAGE_SIZE]);
        assert!(back[PAGE_SIZE..].iter().all(|&b| b == 0));
        // A gathered write that crosses into the hole is refused before anything is written.
        let mut before = vec![0; PAGE_SIZE];
        memory.read_pages(3, &mut before).unwrap();
        let err = memory.write_pages_vectored(3, &[&data[..PAGE_SIZE], &data[..PAGE_SIZE]]);
        assert!(matches!(err, Err(MemoryError::Unmapped { .. })));
        let mut page = vec![0; PAGE_SIZE];
        memory.read_pages(3, &mut page).unwrap();
        assert_eq!(page, before);
        let swapped = [&data[PAGE_SIZE..], &data[..PAGE_SIZE]];
        memory.write_pages_vectored(0x100, &swapped).unwrap();
        memory.read_pages(0x100, &mut back).unwrap();
        assert!(back[..PAGE_SIZE] == data[PAGE_SIZE..] && back[PAGE_SIZE..] == data[..PAGE_SIZE]);
        memory.populate(PageRange::new(0, 4)).unwrap();
        memory.read_pages(2, &mut back).unwrap();
        assert!(back == data, "populate must not change content");
    }

    #[test]
    fn holding_keeps_the_owner_alive_until_the_regions_go() {
        let mut buffer = vec![0u8; 8 * PAGE_SIZE];
        let owner = Arc::new(String::from("mapping owner"));
        let memory = regions(&mut buffer, false).holding(owner.clone());
        assert_eq!(Arc::strong_count(&owner), 2);
        drop(memory);
        assert_eq!(Arc::strong_count(&owner), 1);
    }

    #[test]
    fn zeroed_regions_still_zero_pages_that_were_written() {
        let mut buffer = vec![0u8; 8 * PAGE_SIZE];
        let memory = regions(&mut buffer, true);
        memory.write_pages(1, &[5; PAGE_SIZE]).unwrap();
        memory.zero_pages(PageRange::new(0, 4)).unwrap();
        let mut back = vec![1; 4 * PAGE_SIZE];
        memory.read_pages(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn invalid_regions_are_rejected() {
        let mut buffer = vec![0u8; 4 * PAGE_SIZE];
        let base = buffer.as_mut_ptr();
        let aligned = base.wrapping_add(base.align_offset(PAGE_SIZE));
        let cases = [
            RawRegion {
                guest_phys_addr: 0,
                host_addr: ptr::null_mut(),
                len: PAGE_SIZE,
                file: None,
            },
            RawRegion {
                guest_phys_addr: 0,
                host_addr: aligned,
                len: 0,
                file: None,
            },
            RawRegion {
                guest_phys_addr: 1,
                host_addr: aligned,
                len: PAGE_SIZE,
                file: None,
            },
            RawRegion {
                guest_phys_addr: u64::MAX - 4095,
                host_addr: aligned,
                len: 2 * PAGE_SIZE,
                file: None,
            },
            RawRegion {
                guest_phys_addr: 0,
                host_addr: aligned,
                len: PAGE_SIZE,
                file: Some(RegionFile { fd: -1, offset: 0 }),
            },
            RawRegion {
                guest_phys_addr: 0,
                host_addr: aligned,
                len: PAGE_SIZE,
                file: Some(RegionFile { fd: 0, offset: 100 }),
            },
        ];
        for case in cases {
            // SAFETY: construction fails before any access to the region.
            let result = unsafe { GuestRegions::new(&[case]) };
            assert!(
                matches!(result, Err(MemoryError::InvalidRegion { .. })),
                "{case:?}"
            );
        }
        let overlapping = [
            RawRegion {
                guest_phys_addr: 0,
                host_addr: aligned,
                len: 2 * PAGE_SIZE,
                file: None,
            },
            RawRegion {
                guest_phys_addr: PAGE_SIZE as u64,
                host_addr: aligned,
                len: PAGE_SIZE,
                file: None,
            },
        ];
        // SAFETY: construction fails before any access to the regions.
        let result = unsafe { GuestRegions::new(&overlapping) };
        assert!(matches!(
            result,
            Err(MemoryError::OverlappingRegions { .. })
        ));
    }

    /// A memfd mapped shared, as the runtime maps guest memory.
    struct Memfd {
        fd: RawFd,
        addr: *mut u8,
        len: usize,
    }

    impl Memfd {
        fn new(len: usize) -> Memfd {
            // SAFETY: creates a new anonymous file; no memory is passed.
            let fd = unsafe { libc::memfd_create(c"ferry-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: sizes the file just created.
            assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
            // SAFETY: a new shared mapping of that file; no existing memory is affected.
            let addr = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            Memfd {
                fd,
                addr: addr.cast(),
                len,
            }
        }
    }

    impl Drop for Memfd {
        fn drop(&mut self) {
            // SAFETY: unmaps and closes what `new` created, once.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
            // SAFETY: as above.
            unsafe { libc::close(self.fd) };
        }
    }

    #[test]
    fn file_backed_regions_write_through_the_file_and_read_through_the_mapping() {
        let memfd = Memfd::new(8 * PAGE_SIZE);
        let region = RawRegion {
            guest_phys_addr: 0x4000,
            host_addr: memfd.addr.wrapping_add(2 * PAGE_SIZE),
            len: 4 * PAGE_SIZE,
            file: Some(RegionFile {
                fd: memfd.fd,
                offset: 2 * PAGE_SIZE as u64,
            }),
        };
        // SAFETY: the region is inside the mapping of that memfd at that offset, and both
        // outlive `memory`, which is dropped before `memfd`.
        let memory = unsafe { GuestRegions::new_zeroed(&[region]) }.unwrap();
        let data = pattern(2, 1);
        memory.write_pages(5, &data).unwrap();
        memory.prefault(PageRange::new(4, 4)).unwrap();
        let mut back = vec![0; 4 * PAGE_SIZE];
        memory.read_pages(4, &mut back).unwrap();
        assert!(back[..PAGE_SIZE].iter().all(|&b| b == 0));
        assert_eq!(back[PAGE_SIZE..3 * PAGE_SIZE], data);
        memory.zero_pages(PageRange::new(5, 1)).unwrap();
        memory.read_pages(5, &mut back[..PAGE_SIZE]).unwrap();
        assert!(
            back[..PAGE_SIZE].iter().all(|&b| b == 0),
            "a written page is zeroed through the file"
        );
        let mut from_file = vec![0u8; PAGE_SIZE];
        // SAFETY: reads one page of the memfd into a live buffer.
        let read = unsafe {
            libc::pread(
                memfd.fd,
                from_file.as_mut_ptr().cast(),
                PAGE_SIZE,
                4 * PAGE_SIZE as libc::off_t,
            )
        };
        assert_eq!(read, PAGE_SIZE as isize);
        assert_eq!(
            from_file,
            data[PAGE_SIZE..],
            "pfn 6 sits at file offset 4 pages"
        );
        let (one, two) = (pattern(1, 5), pattern(2, 6));
        memory.write_pages_vectored(4, &[&one, &two]).unwrap();
        let mut back = vec![0; 3 * PAGE_SIZE];
        memory.read_pages(4, &mut back).unwrap();
        assert_eq!(back[..PAGE_SIZE], one);
        assert_eq!(back[PAGE_SIZE..], two);
        let err = memory.write_pages_vectored(6, &[&one, &two]);
        assert!(matches!(err, Err(MemoryError::Unmapped { .. })));
        drop(memory);
    }
}
