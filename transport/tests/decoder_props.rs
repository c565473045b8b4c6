//! Property tests of every decoder that sees bytes from the network: whatever arrives, they
//! return a value or an error — never panic — and never allocate more than the frame limit.
//! Bounded case counts keep this part of the normal `cargo test` run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use ferry_transport::control::FrameCodec;
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
