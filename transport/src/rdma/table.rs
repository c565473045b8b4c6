//! What the destination tells the source about its registered memory, and how a run of
//! pages maps onto the two sides' regions.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::memory::{PAGE_SIZE, PageRange};

/// One registered region of destination guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRegion {
    /// Guest-physical address of its first byte.
    pub guest_phys_addr: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
    /// Address of its first byte in the destination process, as registered.
    pub addr: u64,
    /// Remote key of the registration.
    pub rkey: u32,
}

/// The destination's side of an RDMA transfer, sent to the source in the Prepared step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryTable {
    /// Where the destination accepts RDMA connections.
    pub listen: SocketAddr,
    /// Its registered guest memory.
    pub regions: Vec<RemoteRegion>,
    /// Whether that memory is all zero now (fresh), so never-sent zero pages may be skipped.
    pub zeroed: bool,
}

/// A contiguous run of pages on one side: first page frame and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub first_pfn: u64,
    pub pages: u64,
}

impl Span {
    fn end(&self) -> u64 {
        self.first_pfn + self.pages
    }
}

impl From<&RemoteRegion> for Span {
    fn from(region: &RemoteRegion) -> Self {
        Span {
            first_pfn: region.guest_phys_addr / PAGE_SIZE as u64,
            pages: region.len / PAGE_SIZE as u64,
        }
    }
}

/// One RDMA WRITE: `pages` pages from page `local_page` of local span `local` to page
/// `remote_page` of remote span `remote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub local: usize,
    pub local_page: u64,
    pub remote: usize,
    pub remote_page: u64,
    pub pages: u64,
}

fn find(spans: &[Span], pfn: u64) -> Option<usize> {
    spans
        .iter()
        .position(|span| span.first_pfn <= pfn && pfn < span.end())
}

/// Splits `run` into writes of at most `max_pages` pages, none crossing a region boundary of
/// either side. Fails, naming the page, if part of the run is missing on either side.
pub(crate) fn pieces(
    local: &[Span],
    remote: &[Span],
    run: PageRange,
    max_pages: u64,
) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let Some(end) = run.end_pfn() else {
        return Err(format!(
            "page run {:#x}+{} overflows",
            run.first_pfn, run.count
        ));
    };
    let mut pfn = run.first_pfn;
    while pfn < end {
        let l =
            find(local, pfn).ok_or_else(|| format!("page {pfn:#x} is not in the source memory"))?;
        let r = find(remote, pfn).ok_or_else(|| {
            format!("page {pfn:#x} is not in the destination's registered memory")
        })?;
        let pages = (end - pfn)
            .min(local[l].end() - pfn)
            .min(remote[r].end() - pfn)
            .min(max_pages.max(1));
        out.push(Piece {
            local: l,
            local_page: pfn - local[l].first_pfn,
            remote: r,
            remote_page: pfn - remote[r].first_pfn,
            pages,
        });
        pfn += pages;
    }
    Ok(out)
}

impl MemoryTable {
    /// Checks the table against the source's spans: every source page must have a place.
    pub(crate) fn validate(&self, local: &[Span]) -> Result<Vec<Span>, String> {
        let mut remote = Vec::with_capacity(self.regions.len());
        for (i, region) in self.regions.iter().enumerate() {
            if region.len == 0
                || !region.len.is_multiple_of(PAGE_SIZE as u64)
                || !region.guest_phys_addr.is_multiple_of(PAGE_SIZE as u64)
                || region.addr.checked_add(region.len).is_none()
            {
                return Err(format!(
                    "destination region {i} ({:#x}+{:#x}) is not a whole number of pages",
                    region.guest_phys_addr, region.len
                ));
            }
            remote.push(Span::from(region));
        }
        for span in local {
            pieces(
                local,
                &remote,
                PageRange::new(span.first_pfn, span.pages),
                u64::MAX,
            )?;
        }
        Ok(remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first_pfn: u64, pages: u64) -> Span {
        Span { first_pfn, pages }
    }

    #[test]
    fn runs_split_at_both_sides_boundaries_and_the_size_cap() {
        let local = [span(0, 10), span(10, 10)];
        let remote = [span(0, 15), span(15, 5)];
        let got = pieces(&local, &remote, PageRange::new(8, 10), 4).unwrap();
        let shape: Vec<_> = got
            .iter()
            .map(|p| (p.local, p.local_page, p.remote, p.remote_page, p.pages))
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 8, 0, 8, 2),
                (1, 0, 0, 10, 4),
                (1, 4, 0, 14, 1),
                (1, 5, 1, 0, 3)
            ]
        );
        assert_eq!(got.iter().map(|p| p.pages).sum::<u64>(), 10);
    }

    #[test]
    fn missing_pages_are_named() {
        let local = [span(0, 10)];
        let remote = [span(0, 5)];
        let err = pieces(&local, &remote, PageRange::new(3, 4), 64).unwrap_err();
        assert!(err.contains("0x5") && err.contains("destination"), "{err}");
        let err = pieces(&local, &remote, PageRange::new(12, 1), 64).unwrap_err();
        assert!(err.contains("source"), "{err}");
    }

    #[test]
    fn a_table_must_cover_the_source() {
        let table = |len| MemoryTable {
            listen: "10.0.0.2:1".parse().unwrap(),
            regions: vec![RemoteRegion {
                guest_phys_addr: 0,
                len,
                addr: 0x7f00_0000_0000,
                rkey: 1,
            }],
            zeroed: true,
        };
        let local = [span(0, 16)];
        assert_eq!(
            table(16 * PAGE_SIZE as u64).validate(&local).unwrap(),
            vec![span(0, 16)]
        );
        assert!(table(8 * PAGE_SIZE as u64).validate(&local).is_err());
        assert!(
            table(100)
                .validate(&local)
                .unwrap_err()
                .contains("whole number")
        );
    }
}
