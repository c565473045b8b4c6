//! Payload of a `Pages` frame: a run of consecutive guest pages, each sent as a zero
//! marker, lz4 block or raw bytes.
//!
//! ```text
//! seq u64 | first_pfn u64 | count u32 | count x (encoding u8, length u16) | page data...
//! ```
//!
//! All integers little endian. The table has a fixed size per page so the sender can place
//! page data before it knows how each page encodes, and build the frame in place with no
//! second copy.

use lz4_flex::block::{
    CompressTable, compress_into_with_table, decompress_into, get_maximum_output_size,
};

use crate::memory::{MemoryError, PAGE_SHIFT, PAGE_SIZE, PageRange, PageSink, PageSource};
use crate::stats::FrameCounts;
use crate::wire::{self, HEADER_LEN, MessageType, PayloadError};

/// Most pages one frame may carry; bounds every receive buffer.
pub const MAX_PAGES_PER_FRAME: u32 = 256;
const BATCH_HEADER_LEN: usize = 20;
const ENTRY_LEN: usize = 3;

/// Largest `Pages` payload for frames of up to `pages` pages.
pub const fn max_batch_payload(pages: u32) -> usize {
    BATCH_HEADER_LEN + pages as usize * (ENTRY_LEN + PAGE_SIZE)
}

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

    /// Reads `count` pages from `first_pfn` and returns the sealed frame.
    pub(crate) fn encode<S: PageSource + ?Sized>(
        &mut self,
        source: &S,
        seq: u64,
        first_pfn: u64,
        count: u32,
        compress: bool,
    ) -> Result<(&[u8], EncodeReport), MemoryError> {
        debug_assert!(count >= 1 && count <= self.max_pages);
        let mut report = EncodeReport::default();
        let table_start = HEADER_LEN + BATCH_HEADER_LEN;
        let mut cursor = table_start + count as usize * ENTRY_LEN;
        for index in 0..count as usize {
            let page = &mut self.frame[cursor..cursor + PAGE_SIZE];
            source.read_pages(first_pfn + index as u64, page)?;
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
        }
        self.frame[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&seq.to_le_bytes());
        self.frame[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&first_pfn.to_le_bytes());
        self.frame[HEADER_LEN + 16..HEADER_LEN + 20].copy_from_slice(&count.to_le_bytes());
        let frame = &mut self.frame[..cursor];
        // Cannot fail: the type is valid, no flags are set and the payload is far below the limit.
        let _ = wire::seal_frame(frame, self.version, MessageType::Pages, 0);
        report.counts.guest_bytes = u64::from(count) * PAGE_SIZE as u64;
        report.counts.wire_bytes = cursor as u64;
        Ok((&self.frame[..cursor], report))
    }
}

/// A parsed, structurally valid `Pages` payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchView<'a> {
    pub seq: u64,
    pub first_pfn: u64,
    pub count: u32,
    entries: &'a [u8],
    data: &'a [u8],
}

fn malformed(reason: String) -> PayloadError {
    PayloadError::Malformed {
        kind: MessageType::Pages,
        reason,
    }
}

/// Parses and checks a `Pages` payload: sizes, encodings and lengths must add up exactly.
/// Does not allocate.
pub(crate) fn parse_batch(payload: &[u8]) -> Result<BatchView<'_>, PayloadError> {
    let Some((head, rest)) = payload.split_first_chunk::<BATCH_HEADER_LEN>() else {
        return Err(malformed(format!(
            "{} bytes is shorter than the batch header",
            payload.len()
        )));
    };
    let (seq, rest_head) = head.split_at(8);
    let (pfn, count) = rest_head.split_at(8);
    let seq = u64::from_le_bytes(seq.try_into().unwrap_or_default());
    let first_pfn = u64::from_le_bytes(pfn.try_into().unwrap_or_default());
    let count = u32::from_le_bytes(count.try_into().unwrap_or_default());
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(malformed(format!(
            "page count {count} is outside 1..={MAX_PAGES_PER_FRAME}"
        )));
    }
    // Guest physical addresses fit in 64 bits, so page frame numbers have 12 bits fewer.
    if first_pfn
        .checked_add(u64::from(count))
        .is_none_or(|end| end > u64::MAX >> PAGE_SHIFT)
    {
        return Err(malformed(format!(
            "pages {first_pfn:#x}+{count} run past the guest address space"
        )));
    }
    let table_len = count as usize * ENTRY_LEN;
    if rest.len() < table_len {
        return Err(malformed(format!(
            "{} bytes cannot hold a table of {count} pages",
            rest.len()
        )));
    }
    let (entries, data) = rest.split_at(table_len);
    let mut expected = 0usize;
    for (index, entry) in entries.chunks_exact(ENTRY_LEN).enumerate() {
        let len = usize::from(u16::from_le_bytes([entry[1], entry[2]]));
        let valid = match entry[0] {
            ZERO => len == 0,
            RAW => len == PAGE_SIZE,
            LZ4 => len > 0 && len < PAGE_SIZE,
            _ => false,
        };
        if !valid {
            return Err(malformed(format!(
                "page {index} has encoding {} with length {len}",
                entry[0]
            )));
        }
        expected += len;
    }
    if expected != data.len() {
        return Err(malformed(format!(
            "table describes {expected} bytes of page data but {} follow",
            data.len()
        )));
    }
    Ok(BatchView {
        seq,
        first_pfn,
        count,
        entries,
        data,
    })
}

/// Writes parsed frames into a sink, decompressing into a staging area first so that a frame
/// whose compressed data turns out bad is rejected before any of it is written.
#[derive(Debug, Default)]
pub(crate) struct BatchDecoder {
    staging: Vec<u8>,
}

impl BatchDecoder {
    /// Decodes every page of `batch`, then writes them all. `prefault` asks the sink to
    /// populate the data pages first.
    pub(crate) fn apply<K: PageSink + ?Sized>(
        &mut self,
        batch: &BatchView<'_>,
        sink: &K,
        prefault: bool,
    ) -> Result<FrameCounts, ApplyError> {
        let count = batch.count as usize;
        let range = PageRange::new(batch.first_pfn, u64::from(batch.count));
        sink.check_range(range).map_err(ApplyError::Memory)?;
        let mut counts = FrameCounts {
            guest_bytes: range.bytes(),
            ..FrameCounts::default()
        };

        let mut offsets = [0u32; MAX_PAGES_PER_FRAME as usize];
        let mut offset = 0usize;
        for (index, entry) in batch.entries.chunks_exact(ENTRY_LEN).enumerate() {
            offsets[index] = offset as u32;
            let len = usize::from(u16::from_le_bytes([entry[1], entry[2]]));
            if entry[0] == LZ4 {
                if self.staging.len() < count * PAGE_SIZE {
                    self.staging
                        .resize(MAX_PAGES_PER_FRAME as usize * PAGE_SIZE, 0);
                }
                let slot = &mut self.staging[index * PAGE_SIZE..(index + 1) * PAGE_SIZE];
                match decompress_into(&batch.data[offset..offset + len], slot) {
                    Ok(PAGE_SIZE) => {}
                    Ok(other) => {
                        return Err(ApplyError::Payload(malformed(format!(
                            "page {index} decompresses to {other} bytes instead of {PAGE_SIZE}"
                        ))));
                    }
                    Err(err) => {
                        return Err(ApplyError::Payload(malformed(format!(
                            "page {index} is not valid lz4: {err}"
                        ))));
                    }
                }
            }
            offset += len;
        }

        // Write each run of non-zero pages with one sink call: raw pages straight from the
        // frame, compressed ones from their staging slots.
        let mut start = 0usize;
        while start < count {
            let zero = batch.entries[start * ENTRY_LEN] == ZERO;
            let mut end = start + 1;
            while end < count && (batch.entries[end * ENTRY_LEN] == ZERO) == zero {
                end += 1;
            }
            let range = PageRange::new(batch.first_pfn + start as u64, (end - start) as u64);
            if zero {
                counts.pages_zero += range.count;
                sink.zero_pages(range).map_err(ApplyError::Memory)?;
                start = end;
                continue;
            }
            let mut pieces: [&[u8]; MAX_PAGES_PER_FRAME as usize] =
                [&[]; MAX_PAGES_PER_FRAME as usize];
            let mut used = 0;
            let mut page = start;
            while page < end {
                let raw = batch.entries[page * ENTRY_LEN] == RAW;
                let mut last = page + 1;
                while last < end && (batch.entries[last * ENTRY_LEN] == RAW) == raw {
                    last += 1;
                }
                let pages = last - page;
                pieces[used] = if raw {
                    counts.pages_raw += pages as u64;
                    let from = offsets[page] as usize;
                    &batch.data[from..from + pages * PAGE_SIZE]
                } else {
                    counts.pages_compressed += pages as u64;
                    &self.staging[page * PAGE_SIZE..last * PAGE_SIZE]
                };
                used += 1;
                page = last;
            }
            if prefault {
                sink.prefault(range).map_err(ApplyError::Memory)?;
            }
            sink.write_pages_vectored(range.first_pfn, &pieces[..used])
                .map_err(ApplyError::Memory)?;
            start = end;
        }
        Ok(counts)
    }
}

/// Why a frame could not be written.
#[derive(Debug)]
pub(crate) enum ApplyError {
    Payload(PayloadError),
    Memory(MemoryError),
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

    fn round_trip(compress: bool) -> (FrameCounts, FrameCounts) {
        let source = mixed_source();
        let mut encoder = BatchEncoder::new(8, 1);
        let (frame, report) = encoder.encode(&source, 7, 40, 6, compress).unwrap();
        let (decoded, used) = wire::decode_frame(frame, wire::MAX_PAYLOAD_LEN).unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(decoded.header.kind, MessageType::Pages);
        let batch = parse_batch(decoded.payload).unwrap();
        assert_eq!((batch.seq, batch.first_pfn, batch.count), (7, 40, 6));
        let sink = VecMemory::new(40, 6);
        // Stale content: page 43 is zero in the source, so the zero marker must clear it.
        sink.write_pages(43, &[0xAA; PAGE_SIZE]).unwrap();
        let counts = BatchDecoder::default().apply(&batch, &sink, false).unwrap();
        assert_eq!(sink.to_vec(), source.to_vec());
        assert_eq!(counts.guest_bytes, 6 * PAGE_SIZE as u64);
        (report.counts, counts)
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
    fn zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE_SIZE - 1] = 0;
        page[0] = 0x80;
        assert!(!is_zero(&page));
    }

    fn payload(count: u32, entries: &[(u8, u16)], data: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&5u64.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for (encoding, len) in entries {
            out.push(*encoding);
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.resize(out.len() + data, 0);
        out
    }

    #[test]
    fn malformed_batches_are_rejected() {
        let cases = [
            (vec![0u8; 10], "shorter than the batch header"),
            (payload(0, &[], 0), "outside"),
            (payload(MAX_PAGES_PER_FRAME + 1, &[], 0), "outside"),
            (payload(2, &[(ZERO, 0)], 0), "cannot hold a table"),
            (payload(1, &[(7, 0)], 0), "encoding 7"),
            (payload(1, &[(ZERO, 5)], 5), "encoding 0 with length 5"),
            (payload(1, &[(RAW, 100)], 100), "encoding 1 with length 100"),
            (
                payload(1, &[(LZ4, 4096)], 4096),
                "encoding 2 with length 4096",
            ),
            (
                payload(1, &[(RAW, 4096)], 4000),
                "4096 bytes of page data but 4000",
            ),
        ];
        for (bytes, expected) in cases {
            let err = parse_batch(&bytes).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should mention {expected}"
            );
        }
        let mut huge_pfn = payload(1, &[(ZERO, 0)], 0);
        huge_pfn[8..16].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(
            parse_batch(&huge_pfn)
                .unwrap_err()
                .to_string()
                .contains("past the guest address space")
        );
    }

    #[test]
    fn bad_lz4_data_writes_nothing() {
        // One good raw page followed by an lz4 page that is garbage: nothing may be written.
        let mut bytes = payload(2, &[(RAW, 4096), (LZ4, 10)], 0);
        bytes.extend(std::iter::repeat_n(0x11u8, 4096));
        bytes.extend([0xF0u8; 10]);
        let batch = parse_batch(&bytes).unwrap();
        let sink = VecMemory::new(5, 2);
        let err = BatchDecoder::default()
            .apply(&batch, &sink, false)
            .unwrap_err();
        assert!(matches!(err, ApplyError::Payload(_)));
        assert!(sink.to_vec().iter().all(|&b| b == 0));
    }

    #[test]
    fn pages_outside_the_sink_write_nothing() {
        let mut bytes = payload(2, &[(RAW, 4096), (RAW, 4096)], 0);
        bytes.extend(std::iter::repeat_n(0x11u8, 8192));
        let batch = parse_batch(&bytes).unwrap();
        let sink = VecMemory::new(5, 1);
        assert!(matches!(
            BatchDecoder::default().apply(&batch, &sink, false),
            Err(ApplyError::Memory(_))
        ));
        assert!(sink.to_vec().iter().all(|&b| b == 0));
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn batch_parser_and_writer_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            if let Ok(batch) = parse_batch(&bytes) {
                let sink = VecMemory::new(0, 8);
                let _ = BatchDecoder::default().apply(&batch, &sink, true);
            }
        }

        #[test]
        fn any_page_mix_round_trips(
            kinds in proptest::collection::vec((0u8..4, proptest::prelude::any::<u8>()), 1..40),
            compress in proptest::prelude::any::<bool>(),
        ) {
            let bytes: Vec<u8> = kinds.iter().flat_map(|&(kind, seed)| page_of(kind, seed)).collect();
            let source = VecMemory::from_bytes(3, &bytes).unwrap();
            let mut encoder = BatchEncoder::new(64, 1);
            let (frame, _) = encoder.encode(&source, 0, 3, kinds.len() as u32, compress).unwrap();
            let (decoded, _) = wire::decode_frame(frame, wire::MAX_PAYLOAD_LEN).unwrap();
            let batch = parse_batch(decoded.payload).unwrap();
            let sink = VecMemory::new(3, kinds.len() as u64);
            BatchDecoder::default().apply(&batch, &sink, false).unwrap();
            proptest::prop_assert!(sink.to_vec() == bytes);
        }
    }
}
