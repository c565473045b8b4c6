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

/// The source side: memory the running guest keeps writing. The returned object holds
/// `ram`, so the mappings and the memfd outlive every copy worker.
pub fn source(ram: Arc<GuestRam>) -> Result<Arc<GuestRegions>, MemoryError> {
    // SAFETY: the regions are the VM's memfd mappings, kept mapped (and the memfd open) by
    // `ram`, which the returned object holds; runtime code touches guest memory only through
    // vm-memory's volatile copies, never through references.
    let regions = unsafe { GuestRegions::new(&raw_regions(&ram)) }?;
    Ok(Arc::new(regions.holding(ram)))
}

/// The destination side: the freshly created, all-zero memory of an arriving VM, which
/// nothing else writes until it is resumed.
pub fn fresh_destination(ram: Arc<GuestRam>) -> Result<Arc<GuestRegions>, MemoryError> {
    // SAFETY: as for `source`; in addition the VM was just created from a fresh memfd (all
    // zero) and is not run before the transfer completes (the destination migration actor
    // resumes it only after every receiver has finished).
    let regions = unsafe { GuestRegions::new_zeroed(&raw_regions(&ram)) }?;
    Ok(Arc::new(regions.holding(ram)))
}

/// Converts the runtime's page ranges (by address) into the transport's (by frame number).
pub fn to_transport_ranges(
    ranges: impl Iterator<Item = ferry_runtime::PageRange>,
) -> Vec<PageRange> {
    ranges
        .map(|r| PageRange::new(r.gpa / ferry_transport::memory::PAGE_SIZE as u64, r.pages))
        .collect()
}
