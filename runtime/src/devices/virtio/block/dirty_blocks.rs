//! The dirty-block bitmap: which parts of a disk the guest wrote since the last look, at a
//! fixed chunk granularity (as QEMU's block-dirty-bitmap and mirror job work). A storage
//! migration copies the image in a bulk pass while this records the guest's writes, then
//! copies what it recorded again, round after round, like dirty pages of memory.

/// Default granularity: 64 KiB, QEMU's mirror default, a trade of bitmap size (a 1 TiB disk
/// needs 2 MiB of bits) against bytes copied again for a small write.
pub const DEFAULT_CHUNK: u64 = 64 << 10;

/// A byte range of the image: `(offset, length)`.
pub type Extent = (u64, u64);

/// Dirty chunks of an image of a given size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBlocks {
    chunk: u64,
    size: u64,
    bits: Vec<u64>,
    dirty: u64,
}

impl DirtyBlocks {
    /// Nothing dirty, for an image of `size` bytes tracked in `chunk`-byte units (`chunk`
    /// is rounded up to a power of two of at least 512).
    pub fn new(size: u64, chunk: u64) -> Self {
        let chunk = chunk.max(512).next_power_of_two();
        let chunks = size.div_ceil(chunk);
        DirtyBlocks {
            chunk,
            size,
            bits: vec![0; chunks.div_ceil(64) as usize],
            dirty: 0,
        }
    }

    /// The granularity.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Records a write of `len` bytes at `offset` (the part past the end is ignored).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset / self.chunk;
        let last = (end - 1) / self.chunk;
        for chunk in first..=last {
            let (word, bit) = ((chunk / 64) as usize, chunk % 64);
            if self.bits[word] & (1 << bit) == 0 {
                self.bits[word] |= 1 << bit;
                self.dirty += 1;
            }
        }
    }

    /// Dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
    }

    /// Bytes those chunks cover (the last chunk may be cut by the end of the image): what a
    /// round must copy, for the downtime estimate.
    pub fn dirty_bytes(&self) -> u64 {
        self.extents().iter().map(|&(_, len)| len).sum()
    }

    fn extents(&self) -> Vec<Extent> {
        let mut extents: Vec<Extent> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let bit = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let start = (w as u64 * 64 + bit) * self.chunk;
                let end = (start + self.chunk).min(self.size);
                match extents.last_mut() {
                    Some((s, len)) if *s + *len == start => *len = end - *s,
                    _ => extents.push((start, end - start)),
                }
            }
        }
        extents
    }

    /// The dirty extents, merged and in order, and a clean bitmap.
    pub fn take(&mut self) -> Vec<Extent> {
        let extents = self.extents();
        self.bits.fill(0);
        self.dirty = 0;
        extents
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn writes_mark_whole_chunks_and_neighbours_merge() {
        let mut d = DirtyBlocks::new(1 << 20, 4096);
        d.mark(100, 1); // chunk 0
        d.mark(4095, 2); // chunks 0 and 1
        d.mark(3 * 4096, 4096); // chunk 3 exactly
        d.mark(0, 0); // nothing
        assert_eq!(d.dirty_chunks(), 3);
        assert_eq!(d.dirty_bytes(), 3 * 4096);
        assert_eq!(d.take(), vec![(0, 8192), (12288, 4096)]);
        assert_eq!(d.dirty_chunks(), 0);
        assert!(d.take().is_empty(), "taking clears");
    }

    #[test]
    fn the_end_of_the_image_cuts_the_last_chunk_and_bounds_every_write() {
        let mut d = DirtyBlocks::new(10_000, 4096);
        d.mark(9_000, 5_000);
        d.mark(20_000, 10);
        d.mark(u64::MAX - 5, 100);
        assert_eq!(d.take(), vec![(8192, 10_000 - 8192)]);
        let odd = DirtyBlocks::new(1 << 20, 3000);
        assert_eq!(odd.chunk(), 4096, "rounded up to a power of two");
        assert_eq!(DirtyBlocks::new(1 << 20, 1).chunk(), 512);
    }

    proptest::proptest! {
        /// Against a model (the set of dirty chunks): every written byte is in an extent,
        /// extents are whole chunks (or the image's tail), disjoint, ordered and not adjacent.
        #[test]
        fn extents_cover_exactly_the_written_chunks(
            size in 1u64..(1 << 22),
            chunk_shift in 9u32..17,
            writes in proptest::collection::vec((0u64..(1 << 22), 0u64..(1 << 18)), 0..40),
        ) {
            let chunk = 1u64 << chunk_shift;
            let mut d = DirtyBlocks::new(size, chunk);
            let mut model = BTreeSet::new();
            for &(offset, len) in &writes {
                d.mark(offset, len);
                if len > 0 && offset < size {
                    let end = (offset + len).min(size);
                    for c in offset / chunk..=(end - 1) / chunk {
                        model.insert(c);
                    }
                }
            }
            proptest::prop_assert_eq!(d.dirty_chunks(), model.len() as u64);
            let extents = d.take();
            let mut covered = BTreeSet::new();
            for pair in extents.windows(2) {
                proptest::prop_assert!(pair[0].0 + pair[0].1 < pair[1].0, "{:?}", extents);
            }
            for &(start, len) in &extents {
                proptest::prop_assert!(start.is_multiple_of(chunk) && len > 0);
                proptest::prop_assert!(start + len <= size);
                proptest::prop_assert!(len.is_multiple_of(chunk) || start + len == size);
                for c in start / chunk..(start + len).div_ceil(chunk) {
                    covered.insert(c);
                }
            }
            proptest::prop_assert_eq!(covered, model);
        }
    }
}
