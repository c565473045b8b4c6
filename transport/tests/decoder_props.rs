//! Property tests of every decoder that sees bytes from the network: whatever arrives, they
//! return a value or an error — never panic — and never allocate more than the frame limit.
//! Bounded case counts keep this part of the normal `cargo test` run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use ferry_transport::control::FrameCodec;
use ferry_transport::data::{MAX_PAGES_PER_FRAME, PagesDecoder, PagesFrame, max_batch_payload};
use ferry_transport::memory::{PAGE_SIZE, PageRange, VecMemory};
use ferry_transport::wire::{self, FrameError, HEADER_LEN, MessageType};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

/// Records the largest single allocation made by the current thread while tracking is on.
struct TrackingAllocator;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the thread-locals may already be gone while a thread shuts down.
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout, which the caller guarantees valid.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|largest| largest.set(0));
    TRACKING.with(|tracking| tracking.set(true));
    f();
    TRACKING.with(|tracking| tracking.set(false));
    LARGEST.with(Cell::get)
}

const LIMIT: u32 = 64 * 1024;

/// A valid frame of any type with an arbitrary payload, as raw bytes.
fn valid_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0..MessageType::ALL.len(),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(kind, payload)| {
            let kind = MessageType::ALL[kind];
            let mut out = Vec::new();
            wire::encode_frame(&mut out, 1, kind, kind.allowed_flags(), &payload).unwrap();
            out
        })
}

/// Arbitrary bytes, biased to look like frames: a valid header prefix with random fields.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        (
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(fields, rest)| {
                let mut out = wire::MAGIC.to_vec();
                out.extend_from_slice(&fields);
                out.extend_from_slice(&rest);
                out
            }),
        (valid_frame(), any::<usize>(), any::<u8>()).prop_map(|(mut frame, at, bit)| {
            let at = at % frame.len();
            frame[at] ^= 1 << (bit % 8);
            frame
        }),
        (valid_frame(), any::<usize>())
            .prop_map(|(frame, cut)| frame[..cut % frame.len()].to_vec()),
    ]
}

/// Pages in the sink the `Pages` properties write into; runs are drawn a little beyond it.
const SINK_PAGES: u64 = 32;
/// What every sink page holds before a frame is applied, so any write shows.
const STALE: u8 = 0xEE;

/// One page of the valid frames: zero, raw (patterned) or lz4-compressed text.
fn page_content(kind: u8, seed: u8) -> Vec<u8> {
    match kind % 3 {
        0 => vec![0; PAGE_SIZE],
        1 => (0..PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(seed | 1) ^ (i >> 8) as u8)
            .collect(),
        _ => (0..PAGE_SIZE)
            .map(|i| b"page of text "[i % 13] ^ (seed & 1))
            .collect(),
    }
}

/// A `Pages` payload in the documented layout, encoded here independently of the sender:
/// `seq | pages | runs | (first_pfn, count) x runs | (encoding, length) x pages | data`.
fn pages_payload(runs: &[PageRange], contents: &[(u8, u8)]) -> Vec<u8> {
    let pages: u64 = runs.iter().map(|r| r.count).sum();
    let mut out = Vec::new();
    out.extend_from_slice(&9u64.to_le_bytes());
    out.extend_from_slice(&(pages as u32).to_le_bytes());
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for run in runs {
        out.extend_from_slice(&run.first_pfn.to_le_bytes());
        out.extend_from_slice(&(run.count as u32).to_le_bytes());
    }
    let mut data = Vec::new();
    for &(kind, seed) in &contents[..pages as usize] {
        let page = page_content(kind, seed);
        let (encoding, bytes) = match kind % 3 {
            0 => (0u8, Vec::new()),
            1 => (1, page),
            _ => (2, lz4_flex::block::compress(&page)),
        };
        out.push(encoding);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        data.extend_from_slice(&bytes);
    }
    out.extend_from_slice(&data);
    out
}

/// Runs inside the sink, ascending with gaps, from (gap before, length) pairs.
fn valid_runs() -> impl Strategy<Value = Vec<PageRange>> {
    proptest::collection::vec((0u64..3, 1u64..4), 1..8).prop_map(|shape| {
        let mut runs = Vec::new();
        let mut pfn = 0;
        for (index, (gap, count)) in shape.into_iter().enumerate() {
            pfn += if index == 0 { gap } else { gap + 1 };
            if pfn + count > SINK_PAGES {
                break;
            }
            runs.push(PageRange::new(pfn, count));
            pfn += count;
        }
        if runs.is_empty() {
            runs.push(PageRange::new(0, 1));
        }
        runs
    })
}

/// A valid scatter payload with the runs it carries and the content each page should get.
fn valid_pages() -> impl Strategy<Value = (Vec<u8>, Vec<PageRange>, Vec<(u8, u8)>)> {
    (
        valid_runs(),
        proptest::collection::vec((any::<u8>(), any::<u8>()), SINK_PAGES as usize),
    )
        .prop_map(|(runs, contents)| (pages_payload(&runs, &contents), runs, contents))
}

/// Hostile `Pages` payloads: structured fields drawn around every limit (counts, runs in and
/// beyond the sink, overlapping or not, any table entries, any data length), and valid
/// payloads with a bit flipped or cut short.
fn hostile_pages() -> impl Strategy<Value = Vec<u8>> {
    let structured = (
        prop_oneof![1u32..=8, 0u32..=MAX_PAGES_PER_FRAME + 2, any::<u32>()],
        prop_oneof![
            Just(None),
            (0u32..10).prop_map(Some),
            any::<u32>().prop_map(Some)
        ],
        proptest::collection::vec(
            (
                prop_oneof![0u64..SINK_PAGES + 8, any::<u64>()],
                prop_oneof![0u32..5, any::<u32>()],
            ),
            0..8,
        ),
        proptest::collection::vec(
            (
                0u8..4,
                prop_oneof![Just(0u16), Just(PAGE_SIZE as u16), 1u16..64, any::<u16>()],
            ),
            0..12,
        ),
        0usize..3 * PAGE_SIZE,
        any::<u8>(),
    )
        .prop_map(|(pages, run_count, runs, entries, data, fill)| {
            let mut out = Vec::new();
            out.extend_from_slice(&0u64.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
            out.extend_from_slice(&run_count.unwrap_or(runs.len() as u32).to_le_bytes());
            for (first_pfn, count) in runs {
                out.extend_from_slice(&first_pfn.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            for (encoding, len) in entries {
                out.push(encoding);
                out.extend_from_slice(&len.to_le_bytes());
            }
            out.extend((0..data).map(|i| (i as u8).wrapping_mul(fill)));
            out
        });
    prop_oneof![
        structured,
        (valid_pages(), any::<usize>(), any::<u8>()).prop_map(|((mut payload, _, _), at, bit)| {
            let at = at % payload.len();
            payload[at] ^= 1 << (bit % 8);
            payload
        }),
        (valid_pages(), any::<usize>())
            .prop_map(|((payload, _, _), cut)| payload[..cut % payload.len()].to_vec()),
        proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Pages of `runs`, relative to the sink, as a set.
fn in_runs(runs: &[PageRange], pfn: u64) -> bool {
    runs.iter()
        .any(|run| (run.first_pfn..run.first_pfn + run.count).contains(&pfn))
}

proptest! {
    // No failure persistence: a CI run must not write files into the source tree.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frame_decoder_never_panics_or_over_allocates(bytes in hostile_bytes()) {
        let largest = largest_allocation(|| {
            let _ = wire::decode_frame(&bytes, LIMIT);
            let _ = wire::Header::decode(&bytes, LIMIT);
        });
        prop_assert!(largest <= LIMIT as usize + HEADER_LEN, "allocated {largest}");
    }

    #[test]
    fn codec_never_panics_or_over_allocates(bytes in hostile_bytes(), split in any::<usize>()) {
        let largest = largest_allocation(|| {
            let mut codec = FrameCodec::new(LIMIT);
            let mut buffer = BytesMut::new();
            // Arrives in two pieces, as bytes from a socket do.
            let split = split % (bytes.len() + 1);
            buffer.extend_from_slice(&bytes[..split]);
            let first = codec.decode(&mut buffer);
            if first.is_ok() {
                buffer.extend_from_slice(&bytes[split..]);
                while let Ok(Some(_)) = codec.decode(&mut buffer) {}
                let _ = codec.decode_eof(&mut buffer);
            }
        });
        // BytesMut may round capacity up to twice what was asked for.
        prop_assert!(largest <= 2 * (LIMIT as usize + HEADER_LEN), "allocated {largest}");
    }

    #[test]
    fn declared_length_beyond_the_limit_is_refused_before_buffering(len in (LIMIT + 1)..=u32::MAX) {
        let mut bytes = Vec::new();
        wire::encode_frame(&mut bytes, 1, MessageType::Control, 0, b"").unwrap();
        bytes[16..20].copy_from_slice(&len.to_le_bytes());
        let mut buffer = BytesMut::from(&bytes[..]);
        let largest = largest_allocation(|| {
            let result = FrameCodec::new(LIMIT).decode(&mut buffer);
            assert!(matches!(result, Err(ferry_transport::control::CodecError::Frame(FrameError::Oversized { .. }))));
        });
        prop_assert!(largest < 4096, "allocated {largest}");
    }

    #[test]
    fn payload_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let largest = largest_allocation(|| {
            let _ = wire::decode_hello(&bytes);
            let _ = wire::decode_welcome(&bytes);
            let _ = wire::decode_ticket(MessageType::Ack, &bytes);
            let _ = wire::decode_reason(&bytes);
        });
        // A Hello's version list holds at most one entry per payload byte; error messages
        // take a few hundred bytes more.
        prop_assert!(largest <= 4 * bytes.len() + 512, "allocated {largest}");
    }

    /// Whatever a `Pages` payload holds, parsing and writing it never panics, never allocates
    /// beyond the frame limit, and either writes nothing (any error) or only pages inside
    /// its runs.
    #[test]
    fn pages_decoder_never_panics_over_allocates_or_writes_outside_its_runs(
        payload in hostile_pages(),
    ) {
        let sink = VecMemory::from_bytes(0, &vec![STALE; SINK_PAGES as usize * PAGE_SIZE]).unwrap();
        let mut runs = Vec::new();
        let mut parsed = false;
        let mut written = false;
        let parse_allocation = largest_allocation(|| parsed = PagesFrame::parse(&payload).is_ok());
        prop_assert_eq!(parse_allocation, 0, "parsing allocated");
        let largest = largest_allocation(|| {
            if let Ok(frame) = PagesFrame::parse(&payload) {
                runs.extend(frame.runs());
                written = PagesDecoder::default().write(&frame, &sink, true).is_ok();
            }
        });
        prop_assert!(largest <= max_batch_payload(MAX_PAGES_PER_FRAME), "allocated {largest}");
        prop_assert!(parsed || !written);
        let after = sink.to_vec();
        for (pfn, page) in after.chunks_exact(PAGE_SIZE).enumerate() {
            if !written || !in_runs(&runs, pfn as u64) {
                prop_assert!(
                    page.iter().all(|&b| b == STALE),
                    "page {pfn} written (frame accepted: {written})"
                );
            }
        }
    }

    /// Valid scatter payloads, encoded independently of the sender, write exactly their runs.
    #[test]
    fn valid_scatter_payloads_write_exactly_their_runs((payload, runs, contents) in valid_pages()) {
        let frame = PagesFrame::parse(&payload).unwrap();
        prop_assert!(frame.runs().eq(runs.iter().copied()));
        let sink = VecMemory::from_bytes(0, &vec![STALE; SINK_PAGES as usize * PAGE_SIZE]).unwrap();
        PagesDecoder::default().write(&frame, &sink, false).unwrap();
        let after = sink.to_vec();
        let mut next = 0;
        for (pfn, page) in after.chunks_exact(PAGE_SIZE).enumerate() {
            if in_runs(&runs, pfn as u64) {
                let (kind, seed) = contents[next];
                next += 1;
                prop_assert!(page == page_content(kind, seed).as_slice(), "page {pfn} differs");
            } else {
                prop_assert!(page.iter().all(|&b| b == STALE), "gap page {pfn} written");
            }
        }
    }

    #[test]
    fn valid_frames_round_trip(frame in valid_frame()) {
        let (decoded, used) = wire::decode_frame(&frame, LIMIT).unwrap();
        prop_assert_eq!(used, frame.len());
        let mut again = Vec::new();
        wire::encode_frame(&mut again, decoded.header.version, decoded.header.kind, decoded.header.flags, decoded.payload).unwrap();
        prop_assert_eq!(again, frame);
    }

    #[test]
    fn any_single_bit_flip_is_detected(frame in valid_frame(), at in any::<usize>(), bit in 0u8..8) {
        let mut bad = frame.clone();
        let at = at % bad.len();
        bad[at] ^= 1 << bit;
        prop_assert!(wire::decode_frame(&bad, LIMIT).is_err(), "flip at byte {} went unnoticed", at);
    }
}
