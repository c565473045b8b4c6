//! Guest RAM as the transport's page source and sink.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use ferry_runtime::GuestRam;
use ferry_transport::memory::{
    GuestRegions, MemoryError, PageRange, PageSink, PageSource, RawRegion, RegionFile,
};

/// A VM's RAM for the copy workers. Holding the `Arc<GuestRam>` keeps the mappings alive for
/// as long as any worker can touch them, whatever happens to the VM meanwhile.
#[derive(Debug)]
pub struct GuestMemory {
    regions: GuestRegions,
    _ram: Arc<GuestRam>,
}

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

impl GuestMemory {
    /// The source side: memory the running guest keeps writing.
    pub fn source(ram: Arc<GuestRam>) -> Result<Arc<Self>, MemoryError> {
        // SAFETY: the regions are the VM's memfd mappings, kept mapped (and the memfd open)
        // by `ram`, which this object holds; runtime code only accesses guest memory through
        // vm-memory's volatile copies, never through references.
        let regions = unsafe { GuestRegions::new(&raw_regions(&ram)) }?;
        Ok(Arc::new(GuestMemory { regions, _ram: ram }))
    }

    /// The destination side: the freshly created, all-zero memory of the arriving VM, which
    /// nothing else writes until the VM is resumed.
    pub fn fresh_destination(ram: Arc<GuestRam>) -> Result<Arc<Self>, MemoryError> {
        // SAFETY: as for `source`; in addition the VM was just created from a fresh memfd
        // (all zero) and is not run before the transfer completes (the migration actor
        // resumes it only after the receivers finished).
        let regions = unsafe { GuestRegions::new_zeroed(&raw_regions(&ram)) }?;
        Ok(Arc::new(GuestMemory { regions, _ram: ram }))
    }
}

impl PageSource for GuestMemory {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        PageSource::check_range(&self.regions, range)
    }

    fn read_pages(&self, first_pfn: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.regions.read_pages(first_pfn, dst)
    }
}

impl PageSink for GuestMemory {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        PageSink::check_range(&self.regions, range)
    }

    fn write_pages(&self, first_pfn: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.regions.write_pages(first_pfn, src)
    }

    fn zero_pages(&self, range: PageRange) -> Result<(), MemoryError> {
        self.regions.zero_pages(range)
    }

    fn prefault(&self, range: PageRange) -> Result<(), MemoryError> {
        self.regions.prefault(range)
    }
}

/// Converts the runtime's page ranges (by address) into the transport's (by frame number).
pub fn to_transport_ranges(
    ranges: impl Iterator<Item = ferry_runtime::PageRange>,
) -> Vec<PageRange> {
    ranges
        .map(|r| PageRange::new(r.gpa / ferry_transport::memory::PAGE_SIZE as u64, r.pages))
        .collect()
}
