//! Fragmented dirty sets: many short ranges in one `send` share frames and still land byte
//! for byte, and a receiver refuses `Pages` frames whose scatter list is malformed, writing
//! nothing of them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{Content, Memfd, XorShift, content, quick_timeouts, within};
use ferry_transport::data::{
    CompressionPolicy, DataListener, DataReceiver, DataSender, PagesError, ReceiveError,
    ReceiverConfig, SenderConfig, SessionId, StreamError,
};
use ferry_transport::memory::{
    GuestRegions, MemoryError, PAGE_SIZE, PageRange, PageSink, PageSource, VecMemory,
};
use ferry_transport::stats::TransferStats;
use ferry_transport::wire::{self, ChannelKind, Hello, MessageType};
use ferry_transport::workers::WorkerPlacement;

/// Byte every page of a sink starts with, so a page written by mistake shows.
const STALE: u8 = 0xEE;

/// Ranges of 1 to `longest` pages with gaps of 1 to 4 pages, ascending, inside `pages`.
fn fragmented(pages: u64, longest: u64, seed: u64) -> Vec<PageRange> {
    let mut rng = XorShift(seed | 1);
    let mut ranges = Vec::new();
    let mut pfn = rng.next() % 3;
    while pfn < pages {
        let count = (1 + rng.next() % longest).min(pages - pfn);
        ranges.push(PageRange::new(pfn, count));
        pfn += count + 1 + rng.next() % 4;
    }
    ranges
}

fn send<S, K>(
    source: Arc<S>,
    sink: Arc<K>,
    ranges: &[PageRange],
    streams: usize,
    policy: CompressionPolicy,
    pages_per_frame: u32,
) -> (TransferStats, TransferStats)
where
    S: PageSource + 'static,
    K: PageSink + 'static,
{
    let session = SessionId::random();
    let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let receiver = DataReceiver::start(
        listener,
        sink,
        ReceiverConfig::new(session, WorkerPlacement::unpinned(streams)),
    )
    .unwrap();
    let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(streams));
    config.compression = policy;
    config.pages_per_frame = pages_per_frame;
    let mut sender = DataSender::connect(&[addr], source, config).unwrap();
    sender.send(ranges).unwrap();
    sender.flush().unwrap();
    let sent = sender.finish().unwrap();
    (sent, receiver.wait().unwrap())
}

/// Sent pages hold the source's bytes; every other page still holds its stale bytes.
fn assert_only_ranges_written(got: &[u8], source: &[u8], stale: &[u8], ranges: &[PageRange]) {
    let mut sent = vec![false; got.len() / PAGE_SIZE];
    for range in ranges {
        for pfn in range.first_pfn..range.first_pfn + range.count {
            sent[pfn as usize] = true;
        }
    }
    for (page, &was_sent) in sent.iter().enumerate() {
        let bytes = page * PAGE_SIZE..(page + 1) * PAGE_SIZE;
        let want = if was_sent { source } else { stale };
        assert!(
            got[bytes.clone()] == want[bytes],
            "page {page} (sent: {was_sent}) differs"
        );
    }
}

#[test]
fn scattered_sends_arrive_byte_for_byte_in_shared_frames() {
    within(Duration::from_secs(30), "scattered sends", || {
        let pages = 2048u64;
        let bytes = content(pages as usize, Content::Mixed, 41);
        let stale = vec![STALE; bytes.len()];
        for (longest, streams, policy, per_frame) in [
            (1, 1, CompressionPolicy::None, 128),
            (1, 3, CompressionPolicy::Lz4, 16),
            (3, 2, CompressionPolicy::Lz4, 128),
            (5, 2, CompressionPolicy::None, 7),
            (5, 4, CompressionPolicy::Adaptive, 256),
        ] {
            let ranges = fragmented(pages, longest, longest + 17);
            let total: u64 = ranges.iter().map(|r| r.count).sum();
            let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
            let sink = Arc::new(VecMemory::from_bytes(0, &stale).unwrap());
            let (sent, received) = send(
                source,
                Arc::clone(&sink),
                &ranges,
                streams,
                policy,
                per_frame,
            );
            let case = format!("runs up to {longest}, {streams} streams, {per_frame} pages/frame");
            assert_only_ranges_written(&sink.to_vec(), &bytes, &stale, &ranges);
            assert_eq!(sent.total.pages(), total, "{case}");
            assert_eq!(sent.total.guest_bytes, total * PAGE_SIZE as u64, "{case}");
            assert_eq!(received.total.pages(), total, "{case}");
            assert_eq!(received.total.wire_bytes, sent.total.wire_bytes, "{case}");
            assert_eq!(
                (sent.total.pages_zero, sent.total.pages_compressed),
                (received.total.pages_zero, received.total.pages_compressed),
                "{case}"
            );
            // Ascending ranges fill every frame but the last: as few frames as for one range.
            assert_eq!(
                sent.total.frames,
                total.div_ceil(u64::from(per_frame)),
                "{case}: {} ranges",
                ranges.len()
            );
            assert_eq!(received.total.frames, sent.total.frames, "{case}");
        }
    });
}

#[test]
fn unordered_and_overlapping_ranges_still_arrive() {
    within(Duration::from_secs(20), "unordered ranges", || {
        let pages = 64u64;
        let bytes = content(pages as usize, Content::Mixed, 3);
        let stale = vec![STALE; bytes.len()];
        let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
        let sink = Arc::new(VecMemory::from_bytes(0, &stale).unwrap());
        let ranges = [
            PageRange::new(40, 3),
            PageRange::new(10, 1),
            PageRange::new(12, 1),
            PageRange::new(11, 1), // fills the gap it left, out of order
            PageRange::new(12, 4), // overlaps
            PageRange::new(60, 4),
            PageRange::new(0, 1),
        ];
        let (sent, _) = send(
            source,
            Arc::clone(&sink),
            &ranges,
            2,
            CompressionPolicy::Lz4,
            8,
        );
        assert_only_ranges_written(&sink.to_vec(), &bytes, &stale, &ranges);
        assert_eq!(
            sent.total.pages(),
            ranges.iter().map(|r| r.count).sum::<u64>()
        );
    });
}

#[test]
fn every_other_page_into_memfd_memory_through_the_file_and_the_mapping() {
    within(Duration::from_secs(20), "memfd scatter", || {
        let pages = 1024usize;
        let bytes = content(pages, Content::Mixed, 29);
        let zeros = vec![0u8; bytes.len()];
        let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
        let every_other: Vec<PageRange> = (0..pages as u64 / 2)
            .map(|i| PageRange::new(2 * i + 1, 1))
            .collect();
        for through_file in [true, false] {
            let memfd = Memfd::new(pages * PAGE_SIZE);
            // SAFETY: a fresh memfd is all zero; the mapping and descriptor outlive `sink`,
            // which is dropped at the end of this iteration before `memfd`.
            let sink = Arc::new(
                unsafe { GuestRegions::new_zeroed(&[memfd.region(through_file)]) }.unwrap(),
            );
            send(
                Arc::clone(&source),
                Arc::clone(&sink),
                &every_other,
                2,
                CompressionPolicy::None,
                128,
            );
            let mut got = vec![0u8; bytes.len()];
            PageSource::read_pages(&*sink, 0, &mut got).unwrap();
            assert_only_ranges_written(&got, &bytes, &zeros, &every_other);
            drop(sink);
        }
    });
}

/// A data peer speaking the protocol by hand: greets the receiver as stream 0 of 1, then
/// sends `payload` as a `Pages` frame. Returns the socket, to read what the receiver says.
fn hand_made_sender(addr: std::net::SocketAddr, session: SessionId, payload: &[u8]) -> TcpStream {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let hello = wire::encode_hello(&Hello {
        versions: wire::PROTOCOL_VERSIONS.to_vec(),
        channel: ChannelKind::Data {
            session: session.0,
            stream: 0,
            streams: 1,
        },
    })
    .unwrap();
    let mut frame = Vec::new();
    wire::encode_frame(
        &mut frame,
        wire::HANDSHAKE_VERSION,
        MessageType::Hello,
        0,
        &hello,
    )
    .unwrap();
    socket.write_all(&frame).unwrap();
    let welcome = read_frame(&mut socket);
    assert_eq!(welcome.0, MessageType::Welcome);
    let version = wire::decode_welcome(&welcome.1).unwrap().version;
    frame.clear();
    wire::encode_frame(&mut frame, version, MessageType::Pages, 0, payload).unwrap();
    socket.write_all(&frame).unwrap();
    socket
}

fn read_frame(socket: &mut TcpStream) -> (MessageType, Vec<u8>) {
    let mut bytes = vec![0u8; wire::HEADER_LEN];
    socket.read_exact(&mut bytes).unwrap();
    let header = wire::Header::decode(&bytes, wire::MAX_PAYLOAD_LEN).unwrap();
    bytes.resize(header.frame_len(), 0);
    socket.read_exact(&mut bytes[wire::HEADER_LEN..]).unwrap();
    let (frame, _) = wire::decode_frame(&bytes, wire::MAX_PAYLOAD_LEN).unwrap();
    (frame.header.kind, frame.payload.to_vec())
}

/// A `Pages` payload in the documented layout, every page raw and filled with 0x11.
fn pages_payload(pages: u32, runs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0u64.to_le_bytes()); // seq
    out.extend_from_slice(&pages.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for (first_pfn, count) in runs {
        out.extend_from_slice(&first_pfn.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
    }
    for _ in 0..pages {
        out.push(1); // raw
        out.extend_from_slice(&(PAGE_SIZE as u16).to_le_bytes());
    }
    out.resize(out.len() + pages as usize * PAGE_SIZE, 0x11);
    out
}

/// Sends `payload` to a fresh receiver of a 16-page sink; returns the receiver's error, the
/// reason it sent back, and the sink's content.
fn refused(payload: &[u8]) -> (Arc<StreamError>, String, Vec<u8>) {
    let session = SessionId::random();
    let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let sink = Arc::new(VecMemory::new(0, 16));
    let mut config = ReceiverConfig::new(session, WorkerPlacement::unpinned(1));
    config.timeouts = quick_timeouts();
    let receiver = DataReceiver::start(listener, Arc::clone(&sink), config).unwrap();
    let mut socket = hand_made_sender(addr, session, payload);
    let reason = loop {
        match read_frame(&mut socket) {
            (MessageType::Abandon, payload) => break wire::decode_reason(&payload),
            (MessageType::Keepalive, _) => {}
            (kind, _) => panic!("receiver answered a bad frame with {kind:?}"),
        }
    };
    let Err(ReceiveError::Transfer(error)) = receiver.wait() else {
        panic!("the receiver accepted a malformed frame");
    };
    (error, reason, sink.to_vec())
}

#[test]
fn malformed_scatter_lists_are_refused_with_specific_errors_and_write_nothing() {
    within(Duration::from_secs(20), "malformed scatter lists", || {
        let cases: [(&str, Vec<u8>); 5] = [
            ("overlapping runs", pages_payload(4, &[(2, 3), (4, 1)])),
            ("out of order runs", pages_payload(2, &[(9, 1), (3, 1)])),
            ("count mismatch", pages_payload(3, &[(2, 1), (5, 1)])),
            ("too many runs", {
                let mut payload = pages_payload(2, &[(2, 1), (5, 1)]);
                payload[12..16].copy_from_slice(&3u32.to_le_bytes());
                payload
            }),
            ("run outside the sink", pages_payload(2, &[(3, 1), (16, 1)])),
        ];
        for (case, payload) in cases {
            let (error, reason, sink) = refused(&payload);
            match (case, &*error) {
                (
                    "overlapping runs",
                    StreamError::Pages {
                        source:
                            PagesError::RunOverlaps {
                                run: 1,
                                first_pfn: 4,
                                previous_end: 5,
                            },
                        ..
                    },
                )
                | (
                    "out of order runs",
                    StreamError::Pages {
                        source:
                            PagesError::RunOverlaps {
                                run: 1,
                                first_pfn: 3,
                                previous_end: 10,
                            },
                        ..
                    },
                )
                | (
                    "count mismatch",
                    StreamError::Pages {
                        source:
                            PagesError::CountMismatch {
                                pages: 3,
                                in_runs: 2,
                            },
                        ..
                    },
                )
                | (
                    "too many runs",
                    StreamError::Pages {
                        source: PagesError::RunCount { runs: 3, pages: 2 },
                        ..
                    },
                )
                | (
                    "run outside the sink",
                    StreamError::WriteMemory {
                        source:
                            MemoryError::Unmapped {
                                first_pfn: 16,
                                count: 1,
                            },
                        ..
                    },
                ) => {}
                _ => panic!(
                    "{case}: unexpected error {}",
                    ferry_transport::report(&*error)
                ),
            }
            // The sender learns why, in the same words.
            let source = std::error::Error::source(&*error).unwrap().to_string();
            assert!(reason.contains(&source), "{case}: {reason}");
            assert!(
                sink.iter().all(|&b| b == 0),
                "{case}: something was written"
            );
        }
    });
}
