//! Payload of a `Pages` frame: up to [`MAX_PAGES_PER_FRAME`] guest pages taken from one or
//! more runs of consecutive pages (a scatter list), each page sent as a zero marker, an lz4
//! block or raw bytes.
//!
//! ```text
//! seq u64 | pages u32 | runs u32
//!         | runs x (first_pfn u64, count u32)
//!         | pages x (encoding u8, length u16)
//!         | page data...
//! ```
//!
//! All integers little endian. The run list says where the pages go: `runs` runs, listed in
//! ascending guest order with at least one page between two runs (touching runs are one
//! run), each at least one page long, their counts adding up to `pages`. The table then has
//! one entry per page, the pages of the first run first, and the page data follows in the
//! same order.
//!
//! Carrying several runs per frame is what makes a fragmented dirty set cheap: a guest that
//! dirties every other page leaves runs of one page, and one frame per run would pay the
//! per-frame costs (queueing, header, checksum, system calls on both sides) for every page.
//!
//! The run list and the table have a fixed size per run and per page, so the sender can
//! place page data before it knows how each page encodes, and build the frame in place with
//! no second copy. The strict rules on runs make every accepted frame mean exactly one thing:
//! no page is written twice by one frame, and the receiver checks every run against its
//! memory before writing any page.

use lz4_flex::block::{
    CompressTable, compress_into_with_table, decompress_into, get_maximum_output_size,
};

use crate::memory::{MemoryError, PAGE_SHIFT, PAGE_SIZE, PageRange, PageSink, PageSource};
use crate::stats::FrameCounts;
use crate::wire::{self, HEADER_LEN, MessageType};

/// Most pages one frame may carry; bounds every receive buffer.
pub const MAX_PAGES_PER_FRAME: u32 = 256;
/// `seq`, `pages` and `runs`.
const FIXED_LEN: usize = 16;
/// One entry of the run list: `first_pfn` and `count`.
const RUN_LEN: usize = 12;
/// One entry of the page table: encoding and length.
const ENTRY_LEN: usize = 3;

/// Largest `Pages` payload for frames of up to `pages` pages: as many runs as pages (every
/// page on its own), each page raw.
pub const fn max_batch_payload(pages: u32) -> usize {
    FIXED_LEN + pages as usize * (RUN_LEN + ENTRY_LEN + PAGE_SIZE)
}

/// One past the largest page frame number: guest physical addresses fit in 64 bits, so page
/// frame numbers have 12 bits fewer.
const PFN_LIMIT: u64 = u64::MAX >> PAGE_SHIFT;

const ZERO: u8 = 0;
const RAW: u8 = 1;
const LZ4: u8 = 2;

/// Whether a page is all zero. Ors 64-byte blocks so the compiler can vectorise, and stops
/// at the first non-zero block so data pages cost almost nothing.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|block| {
        block.chunks_exact(16).fold(0u128, |acc, word| {
            acc | u128::from_ne_bytes(word.try_into().unwrap_or_default())
        }) == 0
    })
}

/// Why a `Pages` payload was rejected. Nothing of a rejected frame is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagesError {
    /// The payload ends inside its fixed part, run list or page table.
    #[error("{available} bytes cannot hold the {part} ({needed} bytes)")]
    Truncated {
        /// Which part does not fit.
        part: &'static str,
        /// Bytes needed up to the end of that part.
        needed: usize,
        /// Bytes in the payload.
        available: usize,
    },
    /// The page count is zero or above the limit.
    #[error("page count {pages} is outside 1..={MAX_PAGES_PER_FRAME}")]
    PageCount {
        /// The declared page count.
        pages: u32,
    },
    /// More runs than pages (some run would be empty), or no run at all.
    #[error(
        "run count {runs} is outside 1..={pages}: each run holds at least one of the {pages} pages"
    )]
    RunCount {
        /// The declared run count.
        runs: u32,
        /// The declared page count.
        pages: u32,
    },
    /// A run of zero pages.
    #[error("run {run} at page {first_pfn:#x} is empty")]
    EmptyRun {
        /// Index of the run in the list.
        run: usize,
        /// Its first page.
        first_pfn: u64,
    },
    /// A run that ends beyond the largest guest physical address.
    #[error("run {run} (pages {first_pfn:#x}+{count}) runs past the guest address space")]
    PastAddressSpace {
        /// Index of the run in the list.
        run: usize,
        /// Its first page.
        first_pfn: u64,
        /// Its page count.
        count: u32,
    },
    /// A run that starts before the previous one ends: overlapping, repeated or out of order.
    #[error(
        "run {run} starts at page {first_pfn:#x}, before the end {previous_end:#x} of the run before it: runs must ascend without overlapping"
    )]
    RunOverlaps {
        /// Index of the run in the list.
        run: usize,
        /// Its first page.
        first_pfn: u64,
        /// One past the last page of the run before it.
        previous_end: u64,
    },
    /// A run that starts right where the previous one ends; the two must be sent as one.
    #[error(
        "run {run} at page {first_pfn:#x} continues the run before it; touching runs must be one run"
    )]
    RunsTouch {
        /// Index of the run in the list.
        run: usize,
        /// Its first page.
        first_pfn: u64,
    },
    /// The runs hold a different number of pages than the frame declares.
    #[error("the runs hold {in_runs} pages but the frame declares {pages}")]
    CountMismatch {
        /// The declared page count.
        pages: u32,
        /// Pages in the runs, added up.
        in_runs: u64,
    },
    /// A table entry with an unknown encoding, or a length that does not fit its encoding.
    #[error("page {page} has encoding {encoding} with length {len}")]
    BadEntry {
        /// Index of the page in the frame.
        page: usize,
        /// The encoding byte.
        encoding: u8,
        /// The declared length.
        len: u16,
    },
    /// The page data is not exactly as long as the table says.
    #[error("the table describes {described} bytes of page data but {actual} follow")]
    DataLength {
        /// Bytes the table describes.
        described: usize,
        /// Bytes present.
        actual: usize,
    },
    /// A compressed page is not valid lz4.
    #[error("page {page} is not valid lz4: {reason}")]
    Lz4 {
        /// Index of the page in the frame.
        page: usize,
        /// The decompressor's complaint.
        reason: String,
    },
    /// A compressed page does not decompress to exactly one page.
    #[error("page {page} decompresses to {len} bytes instead of {PAGE_SIZE}")]
    Lz4Length {
        /// Index of the page in the frame.
        page: usize,
        /// Bytes it decompressed to.
        len: usize,
    },
}

/// What encoding one frame did, for statistics.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EncodeReport {
    pub counts: FrameCounts,
}

/// Builds `Pages` frames in a buffer reused for every frame of a worker.
pub(crate) struct BatchEncoder {
    frame: Vec<u8>,
    lz4_out: Vec<u8>,
    table: CompressTable,
    version: u16,
    max_pages: u32,
}

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder")
            .field("max_pages", &self.max_pages)
            .field("version", &self.version)
            .finish()
    }
}

impl BatchEncoder {
    pub(crate) fn new(max_pages: u32, version: u16) -> Self {
        Self {
            // Never resized afterwards: growing a Vec zero-fills, a cost per frame we avoid by
            // tracking the used length ourselves.
            frame: vec![0; HEADER_LEN + max_batch_payload(max_pages)],
            lz4_out: vec![0; get_maximum_output_size(PAGE_SIZE)],
            table: CompressTable::small(),
            version,
            max_pages,
        }
    }

    /// Reads the pages of `runs` and returns the sealed frame. `runs` must follow the frame
    /// format's rules (ascending, gaps between runs, none empty) and hold at most the
    /// encoder's page limit. The sender's packing guarantees that (its tests check); were the
    /// ordering rules broken anyway, the receiver would refuse the frame, not misapply it.
    pub(crate) fn encode<S: PageSource + ?Sized>(
        &mut self,
        source: &S,
        seq: u64,
        runs: &[PageRange],
        compress: bool,
    ) -> Result<(&[u8], EncodeReport), MemoryError> {
        let pages: u64 = runs.iter().map(|run| run.count).sum();
        debug_assert!(!runs.is_empty() && pages <= u64::from(self.max_pages));
        debug_assert!(
            runs.windows(2)
                .all(|pair| pair[0].first_pfn + pair[0].count < pair[1].first_pfn)
        );
        let mut report = EncodeReport::default();
        let runs_start = HEADER_LEN + FIXED_LEN;
        let table_start = runs_start + runs.len() * RUN_LEN;
        let mut cursor = table_start + pages as usize * ENTRY_LEN;
        let mut index = 0usize;
        for (slot, run) in self.frame[runs_start..table_start]
            .chunks_exact_mut(RUN_LEN)
            .zip(runs)
        {
            slot[..8].copy_from_slice(&run.first_pfn.to_le_bytes());
            slot[8..].copy_from_slice(&(run.count as u32).to_le_bytes());
        }
        for run in runs {
            for pfn in run.first_pfn..run.first_pfn + run.count {
                let page = &mut self.frame[cursor..cursor + PAGE_SIZE];
                source.read_pages(pfn, page)?;
                let (encoding, len) = if is_zero(page) {
                    report.counts.pages_zero += 1;
                    (ZERO, 0)
                } else if compress {
                    match compress_into_with_table(page, &mut self.lz4_out, &mut self.table) {
                        Ok(len) if len < PAGE_SIZE => {
                            self.frame[cursor..cursor + len].copy_from_slice(&self.lz4_out[..len]);
                            report.counts.pages_compressed += 1;
                            (LZ4, len)
                        }
                        _ => {
                            report.counts.pages_raw += 1;
                            (RAW, PAGE_SIZE)
                        }
                    }
                } else {
                    report.counts.pages_raw += 1;
                    (RAW, PAGE_SIZE)
                };
                let entry = table_start + index * ENTRY_LEN;
                self.frame[entry] = encoding;
                self.frame[entry + 1..entry + 3].copy_from_slice(&(len as u16).to_le_bytes());
                cursor += len;
                index += 1;
            }
        }
        let fixed = &mut self.frame[HEADER_LEN..runs_start];
        fixed[..8].copy_from_slice(&seq.to_le_bytes());
        fixed[8..12].copy_from_slice(&(pages as u32).to_le_bytes());
        fixed[12..16].copy_from_slice(&(runs.len() as u32).to_le_bytes());
        let frame = &mut self.frame[..cursor];
        // Cannot fail: the type is valid, no flags are set and the payload is far below the limit.
        let _ = wire::seal_frame(frame, self.version, MessageType::Pages, 0);
        report.counts.guest_bytes = pages * PAGE_SIZE as u64;
        report.counts.wire_bytes = cursor as u64;
        Ok((&self.frame[..cursor], report))
    }
}

/// A parsed, structurally valid `Pages` payload, borrowed from the frame. Only
/// [`PagesFrame::parse`] makes one, so every value obeys the format's rules.
#[derive(Clone, Copy)]
pub struct PagesFrame<'a> {
    seq: u64,
    pages: u32,
    runs: &'a [u8],
    entries: &'a [u8],
    data: &'a [u8],
}

impl std::fmt::Debug for PagesFrame<'_> {
    // The runs, not the (up to a megabyte of) page data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesFrame")
            .field("seq", &self.seq)
            .field("pages", &self.pages)
            .field("runs", &self.runs().collect::<Vec<_>>())
            .field("data_len", &self.data.len())
            .finish()
    }
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().unwrap_or_default())
}

fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

fn decode_run(entry: &[u8]) -> PageRange {
    PageRange::new(read_u64(&entry[..8]), u64::from(read_u32(&entry[8..])))
}

impl<'a> PagesFrame<'a> {
    /// Parses and checks a `Pages` payload: the counts, every run (not empty, inside the
    /// guest address space, ascending with gaps, adding up to the page count), every table
    /// entry, and the data length, which must match the table exactly. Does not allocate.
    /// Whether the runs exist in the destination memory is for [`PagesDecoder`] to check.
    pub fn parse(payload: &'a [u8]) -> Result<Self, PagesError> {
        let truncated = |part, needed| PagesError::Truncated {
            part,
            needed,
            available: payload.len(),
        };
        let Some((fixed, rest)) = payload.split_first_chunk::<FIXED_LEN>() else {
            return Err(truncated("frame header", FIXED_LEN));
        };
        let seq = read_u64(&fixed[..8]);
        let pages = read_u32(&fixed[8..12]);
        let run_count = read_u32(&fixed[12..16]);
        if pages == 0 || pages > MAX_PAGES_PER_FRAME {
            return Err(PagesError::PageCount { pages });
        }
        if run_count == 0 || run_count > pages {
            return Err(PagesError::RunCount {
                runs: run_count,
                pages,
            });
        }
        // Both counts are at most MAX_PAGES_PER_FRAME now, so these products are small.
        let runs_len = run_count as usize * RUN_LEN;
        let table_len = pages as usize * ENTRY_LEN;
        if rest.len() < runs_len {
            return Err(truncated("run list", FIXED_LEN + runs_len));
        }
        let (runs, rest) = rest.split_at(runs_len);
        if rest.len() < table_len {
            return Err(truncated("page table", FIXED_LEN + runs_len + table_len));
        }
        let (entries, data) = rest.split_at(table_len);

        let mut previous_end: Option<u64> = None;
        let mut in_runs = 0u64;
        for (run, entry) in runs.chunks_exact(RUN_LEN).enumerate() {
            let range = decode_run(entry);
            if range.count == 0 {
                return Err(PagesError::EmptyRun {
                    run,
                    first_pfn: range.first_pfn,
                });
            }
            let Some(end) = range.end_pfn().filter(|&end| end <= PFN_LIMIT) else {
                return Err(PagesError::PastAddressSpace {
                    run,
                    first_pfn: range.first_pfn,
                    count: range.count as u32,
                });
            };
            match previous_end {
                Some(previous_end) if range.first_pfn < previous_end => {
                    return Err(PagesError::RunOverlaps {
                        run,
                        first_pfn: range.first_pfn,
                        previous_end,
                    });
                }
                Some(previous_end) if range.first_pfn == previous_end => {
                    return Err(PagesError::RunsTouch {
                        run,
                        first_pfn: range.first_pfn,
                    });
                }
                _ => {}
            }
            previous_end = Some(end);
            // At most MAX_PAGES_PER_FRAME runs of at most u32::MAX pages: no overflow.
            in_runs += range.count;
        }
        if in_runs != u64::from(pages) {
            return Err(PagesError::CountMismatch { pages, in_runs });
        }

        let mut described = 0usize;
        for (page, entry) in entries.chunks_exact(ENTRY_LEN).enumerate() {
            let len = u16::from_le_bytes([entry[1], entry[2]]);
            let valid = match entry[0] {
                ZERO => len == 0,
                RAW => usize::from(len) == PAGE_SIZE,
                LZ4 => len > 0 && usize::from(len) < PAGE_SIZE,
                _ => false,
            };
            if !valid {
                return Err(PagesError::BadEntry {
                    page,
                    encoding: entry[0],
                    len,
                });
            }
            described += usize::from(len);
        }
        if described != data.len() {
            return Err(PagesError::DataLength {
                described,
                actual: data.len(),
            });
        }
        Ok(Self {
            seq,
            pages,
            runs,
            entries,
            data,
        })
    }

    /// Sequence number of the frame on its stream.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Pages carried, over all runs.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Where the pages go, in frame order.
    pub fn runs(&self) -> impl ExactSizeIterator<Item = PageRange> + '_ {
        self.runs.chunks_exact(RUN_LEN).map(decode_run)
    }

    fn encoding(&self, page: usize) -> u8 {
        self.entries[page * ENTRY_LEN]
    }
}

/// Why a parsed `Pages` frame could not be written. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyPagesError {
    /// Its content is bad (compressed data that does not decompress to a page).
    #[error("the frame's page data is malformed")]
    Malformed(#[source] PagesError),
    /// A run is not in the destination memory, or writing it failed.
    #[error("cannot write the frame's pages into guest memory")]
    Memory(#[source] MemoryError),
}

/// Writes parsed `Pages` frames into a sink: the receiving half of the data plane, usable
/// without sockets (tests, tools). Decompresses into a staging area first, and checks every
/// run against the sink, so that a frame whose compressed data turns out bad, or that names
/// a page the sink lacks, is rejected before any of it is written.
pub struct PagesDecoder {
    /// Decompressed pages, at the page's index in the frame; grown once, to the frame limit.
    staging: Vec<u8>,
    /// Where each page of the current frame starts in its page data.
    offsets: [u32; MAX_PAGES_PER_FRAME as usize],
}

impl Default for PagesDecoder {
    fn default() -> Self {
        Self {
            staging: Vec::new(),
            offsets: [0; MAX_PAGES_PER_FRAME as usize],
        }
    }
}

impl std::fmt::Debug for PagesDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesDecoder")
            .field("staging", &self.staging.len())
            .finish_non_exhaustive()
    }
}

/// Whole `Pages` frames (header and payload) of `runs` of `source`, compressed or not, as a
/// copy worker writes them: seeds for the decoders' fuzz target.
#[doc(hidden)]
pub fn sample_frames<S: PageSource + ?Sized>(
    source: &S,
    runs: &[PageRange],
    compress: bool,
) -> Result<Vec<u8>, MemoryError> {
    let pages: u64 = runs.iter().map(|r| r.count).sum();
    let mut encoder = BatchEncoder::new(pages.clamp(1, u64::from(MAX_PAGES_PER_FRAME)) as u32, 1);
    encoder
        .encode(source, 0, runs, compress)
        .map(|(frame, _)| frame.to_vec())
}

impl PagesDecoder {
    /// Writes every page of `frame` into `sink`; with `prefault`, asks the sink to populate
    /// the data pages of each run first.
    pub fn write<K: PageSink + ?Sized>(
        &mut self,
        frame: &PagesFrame<'_>,
        sink: &K,
        prefault: bool,
    ) -> Result<(), ApplyPagesError> {
        self.apply(frame, sink, prefault).map(|_| ())
    }

    /// [`PagesDecoder::write`], returning what the frame held, for statistics.
    pub(crate) fn apply<K: PageSink + ?Sized>(
        &mut self,
        frame: &PagesFrame<'_>,
        sink: &K,
        prefault: bool,
    ) -> Result<FrameCounts, ApplyPagesError> {
        for run in frame.runs() {
            sink.check_range(run).map_err(ApplyPagesError::Memory)?;
        }
        let mut offset = 0usize;
        for (page, entry) in frame.entries.chunks_exact(ENTRY_LEN).enumerate() {
            self.offsets[page] = offset as u32;
            let len = usize::from(u16::from_le_bytes([entry[1], entry[2]]));
            if entry[0] == LZ4 {
                if self.staging.is_empty() {
                    self.staging
                        .resize(MAX_PAGES_PER_FRAME as usize * PAGE_SIZE, 0);
                }
                let slot = &mut self.staging[page * PAGE_SIZE..(page + 1) * PAGE_SIZE];
                match decompress_into(&frame.data[offset..offset + len], slot) {
                    Ok(PAGE_SIZE) => {}
                    Ok(len) => {
                        return Err(ApplyPagesError::Malformed(PagesError::Lz4Length {
                            page,
                            len,
                        }));
                    }
                    Err(err) => {
                        return Err(ApplyPagesError::Malformed(PagesError::Lz4 {
                            page,
                            reason: err.to_string(),
                        }));
                    }
                }
            }
            offset += len;
        }

        // Everything is checked and decoded: from here on only the sink can fail.
        let mut counts = FrameCounts {
            guest_bytes: u64::from(frame.pages) * PAGE_SIZE as u64,
            ..FrameCounts::default()
        };
        let mut first_page = 0usize;
        for run in frame.runs() {
            let pages = first_page..first_page + run.count as usize;
            self.write_run(frame, sink, run.first_pfn, pages, prefault, &mut counts)
                .map_err(ApplyPagesError::Memory)?;
            first_page += run.count as usize;
        }
        Ok(counts)
    }

    /// Writes the frame's pages `pages` (indices in the frame) to consecutive guest pages
    /// from `first_pfn`: each stretch of zero pages with one `zero_pages`, each stretch of
    /// data pages with one sink write, raw pages straight from the frame and compressed ones
    /// from their staging slots.
    fn write_run<K: PageSink + ?Sized>(
        &self,
        frame: &PagesFrame<'_>,
        sink: &K,
        first_pfn: u64,
        pages: std::ops::Range<usize>,
        prefault: bool,
        counts: &mut FrameCounts,
    ) -> Result<(), MemoryError> {
        let mut start = pages.start;
        while start < pages.end {
            let zero = frame.encoding(start) == ZERO;
            let mut end = start + 1;
            while end < pages.end && (frame.encoding(end) == ZERO) == zero {
                end += 1;
            }
            let range = PageRange::new(
                first_pfn + (start - pages.start) as u64,
                (end - start) as u64,
            );
            if zero {
                counts.pages_zero += range.count;
                sink.zero_pages(range)?;
                start = end;
                continue;
            }
            let mut pieces: [&[u8]; MAX_PAGES_PER_FRAME as usize] =
                [&[]; MAX_PAGES_PER_FRAME as usize];
            let mut used = 0;
            let mut page = start;
            while page < end {
                let raw = frame.encoding(page) == RAW;
                let mut last = page + 1;
                while last < end && (frame.encoding(last) == RAW) == raw {
                    last += 1;
                }
                let stretch = last - page;
                pieces[used] = if raw {
                    counts.pages_raw += stretch as u64;
                    let from = self.offsets[page] as usize;
                    &frame.data[from..from + stretch * PAGE_SIZE]
                } else {
                    counts.pages_compressed += stretch as u64;
                    &self.staging[page * PAGE_SIZE..last * PAGE_SIZE]
                };
                used += 1;
                page = last;
            }
            if prefault {
                sink.prefault(range)?;
            }
            if used == 1 {
                // Always so for the one-page runs of a fragmented dirty set: a plain write
                // spares the gathered write's set-up (an iovec list per call).
                sink.write_pages(range.first_pfn, pieces[0])?;
            } else {
                sink.write_pages_vectored(range.first_pfn, &pieces[..used])?;
            }
            start = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;

    fn mixed_source() -> VecMemory {
        let mut bytes = vec![0u8; 6 * PAGE_SIZE];
        // page 0 zero; page 1 text-like; page 2 pseudo-random; page 3 zero; page 4 sparse; page 5 random
        let text = b"the quick brown fox jumps over the lazy dog ";
        for (i, b) in bytes[PAGE_SIZE..2 * PAGE_SIZE].iter_mut().enumerate() {
            *b = text[i % text.len()];
        }
        let mut x = 0x9e3779b97f4a7c15u64;
        for page in [2usize, 5] {
            for b in &mut bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        bytes[4 * PAGE_SIZE + 100] = 1;
        bytes[4 * PAGE_SIZE + 4000] = 2;
        VecMemory::from_bytes(40, &bytes).unwrap()
    }

    /// Encodes `runs` of `source` into one frame and checks the frame's framing.
    fn encode_frame(
        encoder: &mut BatchEncoder,
        source: &VecMemory,
        runs: &[PageRange],
        compress: bool,
    ) -> (Vec<u8>, FrameCounts) {
        let (frame, report) = encoder.encode(source, 7, runs, compress).unwrap();
        let frame = frame.to_vec();
        let (decoded, used) = wire::decode_frame(&frame, wire::MAX_PAYLOAD_LEN).unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(decoded.header.kind, MessageType::Pages);
        (frame[HEADER_LEN..].to_vec(), report.counts)
    }

    fn round_trip(compress: bool) -> (FrameCounts, FrameCounts) {
        let source = mixed_source();
        let mut encoder = BatchEncoder::new(8, 1);
        let runs = [PageRange::new(40, 6)];
        let (payload, sent) = encode_frame(&mut encoder, &source, &runs, compress);
        let frame = PagesFrame::parse(&payload).unwrap();
        assert_eq!((frame.seq(), frame.pages()), (7, 6));
        assert_eq!(frame.runs().collect::<Vec<_>>(), runs);
        let sink = VecMemory::new(40, 6);
        // Stale content: page 43 is zero in the source, so the zero marker must clear it.
        sink.write_pages(43, &[0xAA; PAGE_SIZE]).unwrap();
        let counts = PagesDecoder::default().apply(&frame, &sink, false).unwrap();
        assert_eq!(sink.to_vec(), source.to_vec());
        assert_eq!(counts.guest_bytes, 6 * PAGE_SIZE as u64);
        (sent, counts)
    }

    #[test]
    fn mixed_pages_round_trip_with_compression() {
        let (sent, received) = round_trip(true);
        assert_eq!(
            (sent.pages_zero, sent.pages_compressed, sent.pages_raw),
            (2, 2, 2)
        );
        assert_eq!(
            (
                received.pages_zero,
                received.pages_compressed,
                received.pages_raw
            ),
            (2, 2, 2)
        );
        assert!(sent.wire_bytes < 3 * PAGE_SIZE as u64);
    }

    #[test]
    fn mixed_pages_round_trip_without_compression() {
        let (sent, received) = round_trip(false);
        assert_eq!(
            (sent.pages_zero, sent.pages_compressed, sent.pages_raw),
            (2, 0, 4)
        );
        assert_eq!((received.pages_zero, received.pages_raw), (2, 4));
    }

    #[test]
    fn scattered_runs_land_where_they_belong_and_nowhere_else() {
        // Pages 40..46 of the mixed source, sent as three runs with gaps: 40, 42..44, 45.
        let source = mixed_source();
        let runs = [
            PageRange::new(40, 1),
            PageRange::new(42, 2),
            PageRange::new(45, 1),
        ];
        for compress in [false, true] {
            let mut encoder = BatchEncoder::new(8, 1);
            let (payload, sent) = encode_frame(&mut encoder, &source, &runs, compress);
            assert_eq!(sent.guest_bytes, 4 * PAGE_SIZE as u64);
            let frame = PagesFrame::parse(&payload).unwrap();
            assert_eq!(frame.pages(), 4);
            assert_eq!(frame.runs().collect::<Vec<_>>(), runs);
            let sink = VecMemory::new(40, 6);
            let stale = vec![0xAAu8; 6 * PAGE_SIZE];
            sink.write_pages(40, &stale).unwrap();
            let received = PagesDecoder::default().apply(&frame, &sink, true).unwrap();
            assert_eq!(received.pages_zero, sent.pages_zero);
            let got = sink.to_vec();
            let want = source.to_vec();
            for page in 0..6 {
                let bytes = page * PAGE_SIZE..(page + 1) * PAGE_SIZE;
                if [1, 4].contains(&page) {
                    assert_eq!(
                        got[bytes.clone()],
                        stale[bytes],
                        "gap page {page} was written"
                    );
                } else {
                    assert_eq!(got[bytes.clone()], want[bytes], "page {page} differs");
                }
            }
        }
    }

    #[test]
    fn one_page_runs_fill_a_whole_frame() {
        // Every other page of 512: the shape a fragmented dirty set has.
        let bytes: Vec<u8> = (0..512)
            .flat_map(|page| page_of(page as u8, page as u8))
            .collect();
        let source = VecMemory::from_bytes(0, &bytes).unwrap();
        let runs: Vec<PageRange> = (0..MAX_PAGES_PER_FRAME as u64)
            .map(|run| PageRange::new(2 * run, 1))
            .collect();
        let mut encoder = BatchEncoder::new(MAX_PAGES_PER_FRAME, 1);
        let (payload, _) = encode_frame(&mut encoder, &source, &runs, true);
        assert!(payload.len() <= max_batch_payload(MAX_PAGES_PER_FRAME));
        let frame = PagesFrame::parse(&payload).unwrap();
        let sink = VecMemory::new(0, 512);
        PagesDecoder::default().write(&frame, &sink, false).unwrap();
        let got = sink.to_vec();
        for (page, chunk) in got.chunks_exact(PAGE_SIZE).enumerate() {
            if page % 2 == 0 {
                assert!(chunk == &bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]);
            } else {
                assert!(chunk.iter().all(|&b| b == 0), "gap page {page} was written");
            }
        }
    }

    #[test]
    fn largest_frame_fits_the_receive_limit() {
        let bytes: Vec<u8> = (0..512).flat_map(|page| page_of(2, page as u8)).collect();
        let source = VecMemory::from_bytes(0, &bytes).unwrap();
        let runs: Vec<PageRange> = (0..MAX_PAGES_PER_FRAME as u64)
            .map(|run| PageRange::new(2 * run, 1))
            .collect();
        let mut encoder = BatchEncoder::new(MAX_PAGES_PER_FRAME, 1);
        let (payload, _) = encode_frame(&mut encoder, &source, &runs, false);
        assert_eq!(payload.len(), max_batch_payload(MAX_PAGES_PER_FRAME));
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE_SIZE - 1] = 0;
        page[0] = 0x80;
        assert!(!is_zero(&page));
    }

    /// A payload with these counts, runs and table entries, followed by `data` bytes of 0x11.
    fn payload(pages: u32, runs: &[(u64, u32)], entries: &[(u8, u16)], data: usize) -> Vec<u8> {
        payload_with_run_count(pages, runs.len() as u32, runs, entries, data)
    }

    fn payload_with_run_count(
        pages: u32,
        run_count: u32,
        runs: &[(u64, u32)],
        entries: &[(u8, u16)],
        data: usize,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&pages.to_le_bytes());
        out.extend_from_slice(&run_count.to_le_bytes());
        for (first_pfn, count) in runs {
            out.extend_from_slice(&first_pfn.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        for (encoding, len) in entries {
            out.push(*encoding);
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.resize(out.len() + data, 0x11);
        out
    }

    fn raw(pages: usize) -> Vec<(u8, u16)> {
        vec![(RAW, PAGE_SIZE as u16); pages]
    }

    #[test]
    fn malformed_payloads_are_rejected_with_specific_errors() {
        use PagesError as E;
        let huge = u64::MAX >> PAGE_SHIFT;
        let too_many = MAX_PAGES_PER_FRAME + 1;
        let cases: Vec<(Vec<u8>, E)> = vec![
            (
                vec![0u8; 10],
                E::Truncated {
                    part: "frame header",
                    needed: 16,
                    available: 10,
                },
            ),
            (payload(0, &[], &[], 0), E::PageCount { pages: 0 }),
            (
                payload(too_many, &[(5, too_many)], &[], 0),
                E::PageCount { pages: too_many },
            ),
            // Too many runs: more than pages, and more than any frame may have.
            (
                payload(2, &[(5, 1), (7, 1), (9, 1)], &raw(2), 0),
                E::RunCount { runs: 3, pages: 2 },
            ),
            (
                payload_with_run_count(1, u32::MAX, &[(5, 1)], &raw(1), 0),
                E::RunCount {
                    runs: u32::MAX,
                    pages: 1,
                },
            ),
            (
                payload_with_run_count(1, 0, &[], &raw(1), 0),
                E::RunCount { runs: 0, pages: 1 },
            ),
            (
                payload_with_run_count(2, 2, &[(5, 2)], &[], 0),
                E::Truncated {
                    part: "run list",
                    needed: 40,
                    available: 28,
                },
            ),
            (
                payload(2, &[(5, 2)], &raw(1), 0),
                E::Truncated {
                    part: "page table",
                    needed: 34,
                    available: 31,
                },
            ),
            (
                payload(2, &[(5, 0), (7, 2)], &raw(2), 0),
                E::EmptyRun {
                    run: 0,
                    first_pfn: 5,
                },
            ),
            (
                payload(2, &[(huge, 2)], &raw(2), 0),
                E::PastAddressSpace {
                    run: 0,
                    first_pfn: huge,
                    count: 2,
                },
            ),
            (
                payload(2, &[(u64::MAX, 2)], &raw(2), 0),
                E::PastAddressSpace {
                    run: 0,
                    first_pfn: u64::MAX,
                    count: 2,
                },
            ),
            // Overlapping runs: the second starts inside the first.
            (
                payload(4, &[(5, 3), (6, 1)], &raw(4), 0),
                E::RunOverlaps {
                    run: 1,
                    first_pfn: 6,
                    previous_end: 8,
                },
            ),
            // The same page twice.
            (
                payload(2, &[(5, 1), (5, 1)], &raw(2), 0),
                E::RunOverlaps {
                    run: 1,
                    first_pfn: 5,
                    previous_end: 6,
                },
            ),
            // Out of order, even without overlap.
            (
                payload(2, &[(9, 1), (5, 1)], &raw(2), 0),
                E::RunOverlaps {
                    run: 1,
                    first_pfn: 5,
                    previous_end: 10,
                },
            ),
            (
                payload(2, &[(5, 1), (6, 1)], &raw(2), 0),
                E::RunsTouch {
                    run: 1,
                    first_pfn: 6,
                },
            ),
            // Count mismatch, both ways.
            (
                payload(3, &[(5, 1), (7, 1)], &raw(3), 0),
                E::CountMismatch {
                    pages: 3,
                    in_runs: 2,
                },
            ),
            (
                payload(2, &[(5, 1), (7, 4)], &raw(2), 0),
                E::CountMismatch {
                    pages: 2,
                    in_runs: 5,
                },
            ),
            (
                payload(1, &[(5, u32::MAX)], &raw(1), 0),
                E::CountMismatch {
                    pages: 1,
                    in_runs: u64::from(u32::MAX),
                },
            ),
            (
                payload(1, &[(5, 1)], &[(7, 0)], 0),
                E::BadEntry {
                    page: 0,
                    encoding: 7,
                    len: 0,
                },
            ),
            (
                payload(1, &[(5, 1)], &[(ZERO, 5)], 5),
                E::BadEntry {
                    page: 0,
                    encoding: ZERO,
                    len: 5,
                },
            ),
            (
                payload(2, &[(5, 1), (9, 1)], &[(ZERO, 0), (RAW, 100)], 100),
                E::BadEntry {
                    page: 1,
                    encoding: RAW,
                    len: 100,
                },
            ),
            (
                payload(1, &[(5, 1)], &[(LZ4, 4096)], 4096),
                E::BadEntry {
                    page: 0,
                    encoding: LZ4,
                    len: 4096,
                },
            ),
            (
                payload(1, &[(5, 1)], &[(LZ4, 0)], 0),
                E::BadEntry {
                    page: 0,
                    encoding: LZ4,
                    len: 0,
                },
            ),
            (
                payload(1, &[(5, 1)], &raw(1), 4000),
                E::DataLength {
                    described: 4096,
                    actual: 4000,
                },
            ),
            (
                payload(1, &[(5, 1)], &[(ZERO, 0)], 1),
                E::DataLength {
                    described: 0,
                    actual: 1,
                },
            ),
        ];
        for (bytes, expected) in cases {
            let err = PagesFrame::parse(&bytes).unwrap_err();
            assert_eq!(err, expected, "{err}");
            assert!(!err.to_string().is_empty());
        }
        // The largest legal run ends exactly at the top of the address space.
        let top = payload(2, &[(huge - 2, 2)], &[(ZERO, 0), (ZERO, 0)], 0);
        assert!(PagesFrame::parse(&top).is_ok());
    }

    #[test]
    fn bad_lz4_data_writes_nothing() {
        // A good raw page in one run, then an lz4 page in another that is garbage: nothing
        // may be written, not even the first run.
        let mut bytes = payload(2, &[(5, 1), (7, 1)], &[(RAW, 4096), (LZ4, 10)], 0);
        bytes.extend(std::iter::repeat_n(0x11u8, 4096));
        bytes.extend([0xF0u8; 10]);
        let frame = PagesFrame::parse(&bytes).unwrap();
        let sink = VecMemory::new(5, 3);
        let err = PagesDecoder::default()
            .apply(&frame, &sink, false)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ApplyPagesError::Malformed(PagesError::Lz4 { page: 1, .. })
            ),
            "{err:?}"
        );
        assert!(sink.to_vec().iter().all(|&b| b == 0));
    }

    #[test]
    fn lz4_of_the_wrong_size_writes_nothing() {
        let short = lz4_flex::block::compress(&[3u8; 100]);
        let mut bytes = payload(1, &[(5, 1)], &[(LZ4, short.len() as u16)], 0);
        bytes.extend_from_slice(&short);
        let frame = PagesFrame::parse(&bytes).unwrap();
        let sink = VecMemory::new(5, 1);
        let err = PagesDecoder::default().apply(&frame, &sink, false);
        assert!(matches!(
            err,
            Err(ApplyPagesError::Malformed(PagesError::Lz4Length {
                page: 0,
                len: 100
            }))
        ));
        assert!(sink.to_vec().iter().all(|&b| b == 0));
    }

    #[test]
    fn runs_outside_the_sink_write_nothing() {
        // Sink pages 5..9. In each case one run fits and the other does not: the one that
        // fits must not be written either, and the error names the one that does not.
        let sink = VecMemory::new(5, 4);
        for (runs, outside) in [
            ([(5u64, 1u32), (9, 1)], (9u64, 1u32)),
            ([(5, 1), (8, 2)], (8, 2)),
            ([(2, 1), (6, 1)], (2, 1)),
        ] {
            let pages = runs[0].1 + runs[1].1;
            let mut bytes = payload(pages, &runs, &raw(pages as usize), 0);
            bytes.extend(std::iter::repeat_n(0x11u8, pages as usize * PAGE_SIZE));
            let frame = PagesFrame::parse(&bytes).unwrap();
            let result = PagesDecoder::default().apply(&frame, &sink, false);
            let Err(ApplyPagesError::Memory(MemoryError::Unmapped { first_pfn, count })) = result
            else {
                panic!("{runs:?} was not refused as outside the sink: {result:?}");
            };
            assert_eq!((first_pfn, count), (outside.0, u64::from(outside.1)));
            assert!(
                sink.to_vec().iter().all(|&b| b == 0),
                "{runs:?} wrote something"
            );
        }
        // Both inside: written.
        let mut bytes = payload(3, &[(5, 1), (7, 2)], &raw(3), 0);
        bytes.extend(std::iter::repeat_n(0x11u8, 3 * PAGE_SIZE));
        let frame = PagesFrame::parse(&bytes).unwrap();
        PagesDecoder::default().write(&frame, &sink, true).unwrap();
        let got = sink.to_vec();
        assert!(got[..PAGE_SIZE].iter().all(|&b| b == 0x11));
        assert!(got[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(got[2 * PAGE_SIZE..].iter().all(|&b| b == 0x11));
    }

    fn page_of(kind: u8, seed: u8) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        match kind % 4 {
            0 => {}
            1 => page
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = ((i as u8) / 16) ^ seed),
            2 => {
                let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for b in &mut page {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            _ => page[usize::from(seed) * 16] = 1,
        }
        page
    }

    /// Runs with gaps from (gap before, length) pairs, starting at page `base`.
    fn runs_from(base: u64, shape: &[(u64, u64)]) -> Vec<PageRange> {
        let mut pfn = base;
        let mut runs = Vec::with_capacity(shape.len());
        for (index, &(gap, count)) in shape.iter().enumerate() {
            // A gap of at least one page between runs, as the format requires.
            pfn += if index == 0 { gap } else { gap + 1 };
            runs.push(PageRange::new(pfn, count));
            pfn += count;
        }
        runs
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn batch_parser_and_writer_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            if let Ok(frame) = PagesFrame::parse(&bytes) {
                let sink = VecMemory::new(0, 8);
                let _ = PagesDecoder::default().apply(&frame, &sink, true);
            }
        }

        #[test]
        fn any_page_mix_in_any_scatter_round_trips(
            shape in proptest::collection::vec((0u64..4, 1u64..6), 1..24),
            seeds in proptest::collection::vec((0u8..4, proptest::prelude::any::<u8>()), 220),
            compress in proptest::prelude::any::<bool>(),
        ) {
            let runs = runs_from(3, &shape);
            let end = runs.last().map_or(3, |run| run.first_pfn + run.count);
            let total = (end - 3) as usize;
            let bytes: Vec<u8> =
                seeds[..total].iter().flat_map(|&(kind, seed)| page_of(kind, seed)).collect();
            let source = VecMemory::from_bytes(3, &bytes).unwrap();
            let mut encoder = BatchEncoder::new(MAX_PAGES_PER_FRAME, 1);
            let (payload, sent) = encode_frame(&mut encoder, &source, &runs, compress);
            let frame = PagesFrame::parse(&payload).unwrap();
            proptest::prop_assert!(frame.runs().eq(runs.iter().copied()));
            let sink = VecMemory::new(3, total as u64);
            let stale = vec![0x5Au8; total * PAGE_SIZE];
            sink.write_pages(3, &stale).unwrap();
            let received = PagesDecoder::default().apply(&frame, &sink, false).unwrap();
            proptest::prop_assert_eq!(received, FrameCounts { wire_bytes: 0, ..sent });
            let got = sink.to_vec();
            for page in 0..total {
                let pfn = 3 + page as u64;
                let bytes_of = page * PAGE_SIZE..(page + 1) * PAGE_SIZE;
                let sent_page =
                    runs.iter().any(|run| (run.first_pfn..run.first_pfn + run.count).contains(&pfn));
                let want = if sent_page { &bytes } else { &stale };
                proptest::prop_assert!(
                    got[bytes_of.clone()] == want[bytes_of],
                    "page {} (sent: {})", pfn, sent_page
                );
            }
        }
    }
}
