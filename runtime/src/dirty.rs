//! A set of guest pages, stored as one bitmap per RAM region and read back as page ranges.
//!
//! This is what dirty tracking returns and what migration pushes: a few bits per page keeps a
//! 64 GiB guest's set at 2 MiB, and range iteration skips clean 64-page words in one step.

use serde::{Deserialize, Serialize};

use crate::layout::PAGE_SIZE;

/// A run of consecutive guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageRange {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u64,
}

impl PageRange {
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Guest-physical address one past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.bytes()
    }
}

/// The pages of one RAM region, one bit per page (bit `i` of word `i / 64` is page `i`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RegionBits {
    gpa: u64,
    pages: u64,
    words: Vec<u64>,
}

impl RegionBits {
    fn new(gpa: u64, len: u64) -> Self {
        let pages = len / PAGE_SIZE;
        RegionBits {
            gpa,
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    fn page_index(&self, gpa: u64) -> Option<u64> {
        let index = gpa.checked_sub(self.gpa)? / PAGE_SIZE;
        (index < self.pages).then_some(index)
    }

    /// Clears bits past the region's last page so whole-word operations never invent pages.
    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }
}

/// A set of guest pages over a fixed RAM layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtySet {
    regions: Vec<RegionBits>,
}

/// A region bitmap had the wrong number of words for the layout it was merged into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("dirty bitmap for region {region} has {got} words, expected {expected}")]
pub struct BitmapSizeError {
    /// Index of the RAM region.
    pub region: usize,
    /// Words supplied.
    pub got: usize,
    /// Words the region needs.
    pub expected: usize,
}

impl DirtySet {
    /// An empty set over RAM regions given as `(gpa, length)`.
    pub fn empty(ram: &[(u64, u64)]) -> Self {
        DirtySet {
            regions: ram
                .iter()
                .map(|&(gpa, len)| RegionBits::new(gpa, len))
                .collect(),
        }
    }

    /// The set of every page of the RAM regions.
    pub fn full(ram: &[(u64, u64)]) -> Self {
        let mut set = Self::empty(ram);
        for region in &mut set.regions {
            region.words.fill(u64::MAX);
            region.trim();
        }
        set
    }

    /// The RAM layout `(gpa, length)` this set covers.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.gpa, r.pages * PAGE_SIZE))
            .collect()
    }

    /// Adds the page containing `gpa`; addresses outside RAM are ignored and reported.
    pub fn insert(&mut self, gpa: u64) -> bool {
        for region in &mut self.regions {
            if let Some(index) = region.page_index(gpa) {
                region.words[(index / 64) as usize] |= 1 << (index % 64);
                return true;
            }
        }
        false
    }

    /// Adds every page overlapping `[gpa, gpa + len)` (the parts outside RAM are ignored),
    /// a word at a time.
    pub fn insert_range(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let end = gpa.saturating_add(len).div_ceil(PAGE_SIZE);
        for region in &mut self.regions {
            let base = region.gpa / PAGE_SIZE;
            let lo = first.max(base) - base;
            let hi = end.min(base + region.pages).saturating_sub(base);
            let mut page = lo;
            while page < hi {
                let bit = page % 64;
                let take = (64 - bit).min(hi - page);
                let mask = if take == 64 {
                    u64::MAX
                } else {
                    ((1u64 << take) - 1) << bit
                };
                region.words[(page / 64) as usize] |= mask;
                page += take;
            }
        }
    }

    /// Whether the page containing `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.regions.iter().any(|region| {
            region
                .page_index(gpa)
                .is_some_and(|i| region.words[(i / 64) as usize] & (1 << (i % 64)) != 0)
        })
    }

    /// ORs a bitmap for region `region` (the format of `KVM_GET_DIRTY_LOG`) into the set.
    pub fn merge_region_words(
        &mut self,
        region: usize,
        words: &[u64],
    ) -> Result<(), BitmapSizeError> {
        let expected = self.regions.get(region).map_or(0, |r| r.words.len());
        if words.len() != expected {
            return Err(BitmapSizeError {
                region,
                got: words.len(),
                expected,
            });
        }
        let target = &mut self.regions[region];
        for (dst, src) in target.words.iter_mut().zip(words) {
            *dst |= src;
        }
        target.trim();
        Ok(())
    }

    /// Adds every page of `other` (which must cover the same layout).
    pub fn union_with(&mut self, other: &DirtySet) -> Result<(), BitmapSizeError> {
        for (index, region) in other.regions.iter().enumerate() {
            self.merge_region_words(index, &region.words)?;
        }
        Ok(())
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        for region in &mut self.regions {
            region.words.fill(0);
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Bytes of guest memory the set covers.
    pub fn bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    /// Whether the set has no pages.
    pub fn is_empty(&self) -> bool {
        self.regions.iter().flat_map(|r| &r.words).all(|&w| w == 0)
    }

    /// The set as maximal runs of consecutive pages, in ascending address order.
    pub fn ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.regions.iter().flat_map(region_ranges)
    }

    /// The individual page addresses in the set, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges()
            .flat_map(|r| (0..r.pages).map(move |i| r.gpa + i * PAGE_SIZE))
    }
}

/// Runs of set bits in one region; a run may span words.
fn region_ranges(region: &RegionBits) -> impl Iterator<Item = PageRange> + '_ {
    let mut next_page = 0u64;
    std::iter::from_fn(move || {
        let start = find_bit(&region.words, next_page, region.pages, true)?;
        let end = find_bit(&region.words, start, region.pages, false).unwrap_or(region.pages);
        next_page = end;
        Some(PageRange {
            gpa: region.gpa + start * PAGE_SIZE,
            pages: end - start,
        })
    })
}

/// The first bit index in `from..limit` whose value is `set`, skipping whole words at a time.
fn find_bit(words: &[u64], from: u64, limit: u64, set: bool) -> Option<u64> {
    let mut index = from;
    while index < limit {
        let word = words[(index / 64) as usize];
        let word = if set { word } else { !word };
        // Ignore bits below `index` in this word.
        let candidates = word & (u64::MAX << (index % 64));
        if candidates != 0 {
            let found = index - index % 64 + u64::from(candidates.trailing_zeros());
            return (found < limit).then_some(found);
        }
        index = index - index % 64 + 64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn naive_ranges(set: &DirtySet) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        for (gpa, len) in set.layout() {
            let mut page = gpa;
            while page < gpa + len {
                if set.contains(page) {
                    match out.last_mut() {
                        Some(last) if last.end() == page => last.pages += 1,
                        _ => out.push(PageRange {
                            gpa: page,
                            pages: 1,
                        }),
                    }
                }
                page += PAGE_SIZE;
            }
        }
        out
    }

    #[test]
    fn empty_and_full_sets() {
        let layout = [(0, 3 * MIB), (4 << 30, MIB + 3 * PAGE_SIZE)];
        let empty = DirtySet::empty(&layout);
        assert!(empty.is_empty());
        assert_eq!(empty.ranges().count(), 0);
        let full = DirtySet::full(&layout);
        assert_eq!(full.count(), (4 * MIB) / PAGE_SIZE + 3);
        assert_eq!(
            full.ranges().collect::<Vec<_>>(),
            vec![
                PageRange { gpa: 0, pages: 768 },
                PageRange {
                    gpa: 4 << 30,
                    pages: 259
                }
            ]
        );
    }

    #[test]
    fn ranges_span_word_boundaries_and_stop_at_region_ends() {
        let layout = [(0, MIB)];
        let mut set = DirtySet::empty(&layout);
        // Pages 60..=130 cross two word boundaries; 200 is alone; 255 is the last page.
        set.insert_range(60 * PAGE_SIZE, 71 * PAGE_SIZE);
        set.insert(200 * PAGE_SIZE + 17);
        set.insert(255 * PAGE_SIZE);
        assert!(!set.insert(MIB), "address past RAM must be refused");
        let ranges: Vec<_> = set.ranges().collect();
        assert_eq!(
            ranges,
            vec![
                PageRange {
                    gpa: 60 * PAGE_SIZE,
                    pages: 71
                },
                PageRange {
                    gpa: 200 * PAGE_SIZE,
                    pages: 1
                },
                PageRange {
                    gpa: 255 * PAGE_SIZE,
                    pages: 1
                },
            ]
        );
        assert_eq!(set.count(), 73);
        assert_eq!(set.pages().count(), 73);
    }

    #[test]
    fn ranges_match_a_naive_scan_for_pseudorandom_sets() {
        let layout = [(0, 2 * MIB), (4 << 30, 5 * PAGE_SIZE * 64 + 7 * PAGE_SIZE)];
        let mut seed = 0x1234_5678_9abc_def0u64;
        for density in [1u64, 8, 32, 60, 64] {
            let mut set = DirtySet::empty(&layout);
            for (gpa, len) in layout {
                let mut page = gpa;
                while page < gpa + len {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if (seed >> 58) < density {
                        set.insert(page);
                    }
                    page += PAGE_SIZE;
                }
            }
            let fast: Vec<_> = set.ranges().collect();
            assert_eq!(fast, naive_ranges(&set), "density {density}");
            assert_eq!(fast.iter().map(|r| r.pages).sum::<u64>(), set.count());
        }
    }

    #[test]
    fn inserting_a_range_equals_inserting_its_pages() {
        let layout = [(0, 3 * MIB), (4 << 30, MIB + 3 * PAGE_SIZE)];
        let cases = [
            (0, 1),
            (5, PAGE_SIZE),
            (PAGE_SIZE - 1, 2),
            (63 * PAGE_SIZE, 3 * PAGE_SIZE),
            (10 * PAGE_SIZE + 7, 200 * PAGE_SIZE),
            (3 * MIB - PAGE_SIZE, 2 << 30),
            ((4 << 30) + 60 * PAGE_SIZE, 300 * PAGE_SIZE),
            (0, 8 << 30),
        ];
        for (gpa, len) in cases {
            let mut fast = DirtySet::empty(&layout);
            fast.insert_range(gpa, len);
            let mut slow = DirtySet::empty(&layout);
            let mut page = gpa - gpa % PAGE_SIZE;
            while page < gpa + len {
                slow.insert(page);
                page += PAGE_SIZE;
            }
            assert_eq!(fast, slow, "range {gpa:#x}+{len:#x}");
        }
    }

    #[test]
    fn merging_kvm_bitmaps_ors_and_trims() {
        let layout = [(0, 100 * PAGE_SIZE)];
        let mut set = DirtySet::empty(&layout);
        set.merge_region_words(0, &[0b1010, u64::MAX]).unwrap();
        // Region has 100 pages: bits 100..127 of the second word must be dropped.
        assert_eq!(set.count(), 2 + 36);
        assert_eq!(
            set.merge_region_words(0, &[0]),
            Err(BitmapSizeError {
                region: 0,
                got: 1,
                expected: 2
            })
        );
        let mut other = DirtySet::empty(&layout);
        other.insert(0);
        set.union_with(&other).unwrap();
        assert!(set.contains(0));
        set.clear();
        assert!(set.is_empty());
    }
}
