//! End-to-end transfers over loopback: every content kind through several streams, into a
//! heap sink and into raw guest regions, with barriers in between.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ALL_CONTENT, Content, Memfd, content, within};
use ferry_transport::data::{
    CompressionPolicy, DataListener, DataReceiver, DataSender, Prefault, ReceiverConfig,
    SenderConfig, SessionId,
};
use ferry_transport::memory::{
    GuestRegions, PAGE_SIZE, PageRange, PageSink, PageSource, RawRegion, VecMemory,
};
use ferry_transport::stats::TransferStats;
use ferry_transport::workers::{WorkerPlacement, available_cpus};

fn loopback() -> DataListener {
    DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Sends `ranges` from `source` into `sink` over `streams` streams, flushing once, then
/// finishes; returns both sides' statistics.
fn transfer<S, K>(
    source: Arc<S>,
    sink: Arc<K>,
    ranges: Vec<PageRange>,
    streams: usize,
    policy: CompressionPolicy,
) -> (TransferStats, TransferStats)
where
    S: PageSource + 'static,
    K: PageSink + 'static,
{
    transfer_accounted(source, sink, ranges, streams, policy, Vec::new())
}

/// [`transfer`], with the sender keeping `accounts`.
fn transfer_accounted<S, K>(
    source: Arc<S>,
    sink: Arc<K>,
    ranges: Vec<PageRange>,
    streams: usize,
    policy: CompressionPolicy,
    accounts: Vec<PageRange>,
) -> (TransferStats, TransferStats)
where
    S: PageSource + 'static,
    K: PageSink + 'static,
{
    let session = SessionId::random();
    let listener = loopback();
    let addr = listener.local_addr();
    let cpus = available_cpus();
    let receiver = DataReceiver::start(
        listener,
        sink,
        ReceiverConfig::new(session, WorkerPlacement::pinned(streams, cpus.clone())),
    )
    .unwrap();
    let mut config = SenderConfig::new(session, WorkerPlacement::pinned(streams, cpus));
    config.compression = policy;
    config.pages_per_frame = 16;
    config.accounts = accounts;
    let mut sender = DataSender::connect(&[addr], source, config).unwrap();
    sender.send(&ranges).unwrap();
    sender.flush().unwrap();
    let sent = sender.finish().unwrap();
    let received = receiver.wait().unwrap();
    (sent, received)
}

#[test]
fn every_content_kind_arrives_byte_for_byte_through_several_streams() {
    within(Duration::from_secs(30), "content transfers", || {
        for (seed, kind) in ALL_CONTENT.into_iter().enumerate() {
            for streams in [1, 3] {
                let pages = 300;
                let bytes = content(pages, kind, seed as u64 + 1);
                let source = Arc::new(VecMemory::from_bytes(1000, &bytes).unwrap());
                let sink = Arc::new(VecMemory::new(1000, pages as u64));
                let (sent, received) = transfer(
                    source,
                    Arc::clone(&sink),
                    vec![PageRange::new(1000, pages as u64)],
                    streams,
                    CompressionPolicy::Lz4,
                );
                assert!(
                    sink.to_vec() == bytes,
                    "{kind:?} over {streams} streams differs"
                );
                assert_eq!(sent.total.guest_bytes, (pages * PAGE_SIZE) as u64);
                assert_eq!(received.total.guest_bytes, sent.total.guest_bytes);
                assert_eq!(received.total.wire_bytes, sent.total.wire_bytes);
                assert_eq!(sent.total.pages(), pages as u64);
                assert_eq!(
                    (
                        sent.total.pages_zero,
                        sent.total.pages_compressed,
                        sent.total.pages_raw
                    ),
                    (
                        received.total.pages_zero,
                        received.total.pages_compressed,
                        received.total.pages_raw
                    )
                );
                assert_eq!(sent.streams.len(), streams);
                match kind {
                    Content::Zero => assert_eq!(sent.total.pages_zero, pages as u64),
                    Content::Random => assert_eq!(sent.total.pages_raw, pages as u64),
                    Content::Text | Content::Sparse => {
                        assert_eq!(sent.total.pages_compressed, pages as u64)
                    }
                    Content::Mixed => {
                        assert!(sent.total.pages_zero > 0 && sent.total.pages_compressed > 0)
                    }
                }
                if kind == Content::Zero {
                    assert!(
                        sent.total.wire_bytes < 16 * PAGE_SIZE as u64,
                        "zero pages travel as markers"
                    );
                }
            }
        }
    });
}

#[test]
fn every_compression_policy_delivers_mixed_content() {
    within(Duration::from_secs(20), "policy transfers", || {
        let pages = 512;
        let bytes = content(pages, Content::Mixed, 99);
        for policy in [
            CompressionPolicy::None,
            CompressionPolicy::Lz4,
            CompressionPolicy::Adaptive,
        ] {
            let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
            let sink = Arc::new(VecMemory::new(0, pages as u64));
            let (sent, _) = transfer(
                source,
                Arc::clone(&sink),
                vec![PageRange::new(0, pages as u64)],
                2,
                policy,
            );
            assert!(sink.to_vec() == bytes, "{policy:?} corrupted the content");
            if policy == CompressionPolicy::None {
                assert_eq!(sent.total.pages_compressed, 0);
            }
        }
    });
}

#[test]
fn accounts_count_exactly_their_own_pages_even_inside_one_range() {
    within(Duration::from_secs(20), "accounted transfer", || {
        // Random, then zero, then text pages (the zero ones fall inside frames the random
        // ones would otherwise share), sent as one range.
        let mut bytes = content(100, Content::Random, 5);
        bytes.extend(content(100, Content::Zero, 6));
        bytes.extend(content(100, Content::Text, 7));
        let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
        let sink = Arc::new(VecMemory::new(0, 300));
        let accounts = vec![PageRange::new(95, 105), PageRange::new(200, 100)];
        let (sent, received) = transfer_accounted(
            source,
            Arc::clone(&sink),
            vec![PageRange::new(0, 300)],
            2,
            CompressionPolicy::Lz4,
            accounts,
        );
        assert!(
            sink.to_vec() == bytes,
            "accounted transfer corrupted the content"
        );
        assert!(received.accounts.is_empty());
        let [zeroes, text] = sent.accounts.as_slice() else {
            panic!("expected two accounts, got {:?}", sent.accounts);
        };
        assert_eq!((zeroes.pages(), zeroes.pages_zero), (105, 100));
        assert_eq!(zeroes.guest_bytes, 105 * PAGE_SIZE as u64);
        assert_eq!((text.pages(), text.pages_zero), (100, 0));
        assert!(text.pages_compressed > 0, "text pages went uncompressed");
        let accounted = zeroes.wire_bytes + text.wire_bytes;
        assert!(
            accounted < sent.total.wire_bytes && zeroes.frames + text.frames < sent.total.frames,
            "the random pages outside every account were counted in one"
        );
        assert!(text.wire_bytes < text.guest_bytes);
    });
}

#[test]
fn scattered_ranges_and_repeated_rounds_land_between_barriers() {
    within(Duration::from_secs(20), "rounds", || {
        let pages = 256u64;
        let session = SessionId::random();
        let first = content(pages as usize, Content::Mixed, 5);
        let source = Arc::new(VecMemory::from_bytes(0, &first).unwrap());
        let sink = Arc::new(VecMemory::new(0, pages));
        let listener = loopback();
        let addr = listener.local_addr();
        let receiver = DataReceiver::start(
            listener,
            Arc::clone(&sink),
            ReceiverConfig::new(session, WorkerPlacement::unpinned(2)),
        )
        .unwrap();
        let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(2));
        config.pages_per_frame = 7;
        let mut sender = DataSender::connect(&[addr], Arc::clone(&source), config).unwrap();
        sender.send(&[PageRange::new(0, pages)]).unwrap();
        sender.flush().unwrap();
        assert!(sink.to_vec() == first, "round 1");

        // Round 2: the "guest" rewrote a scattered set of pages, some to zero.
        let dirty: Vec<PageRange> = vec![
            PageRange::new(3, 1),
            PageRange::new(10, 20),
            PageRange::new(200, 56),
        ];
        let mut rng = common::XorShift(77);
        for range in &dirty {
            for pfn in range.first_pfn..range.first_pfn + range.count {
                let mut page = vec![0u8; PAGE_SIZE];
                let kind = if pfn % 3 == 0 {
                    Content::Zero
                } else {
                    Content::Random
                };
                common::fill_page(&mut page, kind, &mut rng);
                source.write_pages(pfn, &page).unwrap();
            }
        }
        sender.send(&dirty).unwrap();
        sender.flush().unwrap();
        assert!(sink.to_vec() == source.to_vec(), "round 2");
        // Empty rounds and repeated barriers are fine.
        sender.send(&[]).unwrap();
        sender.flush().unwrap();
        sender.flush().unwrap();
        sender.finish().unwrap();
        receiver.wait().unwrap();
    });
}

#[test]
fn many_barriers_over_four_streams() {
    within(Duration::from_secs(30), "barrier stress", || {
        let pages = 400u64;
        let session = SessionId::random();
        let source = Arc::new(
            VecMemory::from_bytes(0, &content(pages as usize, Content::Random, 21)).unwrap(),
        );
        let sink = Arc::new(VecMemory::new(0, pages));
        let listener = loopback();
        let addr = listener.local_addr();
        let receiver = DataReceiver::start(
            listener,
            Arc::clone(&sink),
            ReceiverConfig::new(session, WorkerPlacement::unpinned(4)),
        )
        .unwrap();
        let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(4));
        config.pages_per_frame = 3;
        config.queue_depth = 1;
        let mut sender = DataSender::connect(&[addr], Arc::clone(&source), config).unwrap();
        let mut rng = common::XorShift(5);
        for round in 0..60u64 {
            // Rewrite a few pages, send them (sometimes fewer frames than streams), flush, check.
            let first = rng.next() % (pages - 10);
            let count = 1 + rng.next() % 10;
            let mut fresh = vec![0u8; count as usize * PAGE_SIZE];
            for page in fresh.chunks_exact_mut(PAGE_SIZE) {
                common::fill_page(page, Content::Mixed, &mut rng);
            }
            source.write_pages(first, &fresh).unwrap();
            let ranges = if round == 0 {
                vec![PageRange::new(0, pages)]
            } else {
                vec![PageRange::new(first, count)]
            };
            sender.send(&ranges).unwrap();
            sender.flush().unwrap();
            if round == 0 || round % 10 == 9 {
                assert!(sink.to_vec() == source.to_vec(), "round {round}");
            }
        }
        let sent = sender.finish().unwrap();
        let received = receiver.wait().unwrap();
        assert_eq!(sent.total.pages(), received.total.pages());
        assert!(sink.to_vec() == source.to_vec());
    });
}

#[test]
fn guest_regions_on_both_sides() {
    within(Duration::from_secs(20), "raw regions", || {
        // Two regions with a hole, as a VM with an MMIO gap would have.
        let pages = 96usize;
        let bytes = content(pages, Content::Mixed, 8);
        let mut source_buf = vec![0u8; (pages + 1) * PAGE_SIZE];
        let mut sink_buf = vec![0u8; (pages + 1) * PAGE_SIZE];
        let layout = |buf: &mut Vec<u8>| {
            let base = buf.as_mut_ptr();
            let aligned = base.wrapping_add(base.align_offset(PAGE_SIZE));
            [
                RawRegion {
                    guest_phys_addr: 0,
                    host_addr: aligned,
                    len: 32 * PAGE_SIZE,
                    file: None,
                },
                RawRegion {
                    guest_phys_addr: 0x10_0000,
                    host_addr: aligned.wrapping_add(32 * PAGE_SIZE),
                    len: 64 * PAGE_SIZE,
                    file: None,
                },
            ]
        };
        let source_regions = layout(&mut source_buf);
        let sink_regions = layout(&mut sink_buf);
        // SAFETY: the regions lie inside buffers that outlive both objects (they are dropped
        // at the end of this closure, after the transfer has finished and the objects are
        // gone), and the buffers are not touched through references meanwhile.
        let source = Arc::new(unsafe { GuestRegions::new(&source_regions) }.unwrap());
        // SAFETY: as above; the sink buffer is freshly zeroed by vec!.
        let sink = Arc::new(unsafe { GuestRegions::new_zeroed(&sink_regions) }.unwrap());
        source.write_pages(0, &bytes[..32 * PAGE_SIZE]).unwrap();
        source.write_pages(0x100, &bytes[32 * PAGE_SIZE..]).unwrap();
        let ranges = source.ranges();
        transfer(
            Arc::clone(&source),
            Arc::clone(&sink),
            ranges,
            2,
            CompressionPolicy::Adaptive,
        );
        let mut back = vec![0u8; pages * PAGE_SIZE];
        PageSource::read_pages(&*sink, 0, &mut back[..32 * PAGE_SIZE]).unwrap();
        PageSource::read_pages(&*sink, 0x100, &mut back[32 * PAGE_SIZE..]).unwrap();
        assert!(back == bytes);
        drop((source, sink));
        drop((source_buf, sink_buf));
    });
}

#[test]
fn memfd_guest_memory_through_the_mapping_and_through_the_file() {
    within(Duration::from_secs(20), "memfd", || {
        let pages = 512usize;
        let bytes = content(pages, Content::Mixed, 13);
        let source_memfd = Memfd::new(pages * PAGE_SIZE);
        // SAFETY: the mapping outlives `source`, dropped below before `source_memfd`.
        let source = Arc::new(unsafe { GuestRegions::new(&[source_memfd.region(false)]) }.unwrap());
        source.write_pages(0, &bytes).unwrap();
        for through_file in [false, true] {
            let sink_memfd = Memfd::new(pages * PAGE_SIZE);
            // SAFETY: a fresh memfd is all zero; the mapping and descriptor outlive `sink`,
            // which is dropped at the end of this iteration before `sink_memfd`.
            let sink = Arc::new(
                unsafe { GuestRegions::new_zeroed(&[sink_memfd.region(through_file)]) }.unwrap(),
            );
            transfer(
                Arc::clone(&source),
                Arc::clone(&sink),
                vec![PageRange::new(0, pages as u64)],
                2,
                CompressionPolicy::Adaptive,
            );
            let mut back = vec![0u8; pages * PAGE_SIZE];
            PageSource::read_pages(&*sink, 0, &mut back).unwrap();
            assert!(back == bytes, "through_file = {through_file}");
            drop(sink);
        }
        drop(source);
    });
}

#[test]
fn prefault_off_and_on_give_the_same_result() {
    within(Duration::from_secs(20), "prefault", || {
        for prefault in [Prefault::None, Prefault::PerFrame] {
            let pages = 128u64;
            let bytes = content(pages as usize, Content::Random, 3);
            let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
            let sink = Arc::new(VecMemory::new(0, pages));
            let session = SessionId::random();
            let listener = loopback();
            let addr = listener.local_addr();
            let mut receiver_config = ReceiverConfig::new(session, WorkerPlacement::unpinned(1));
            receiver_config.prefault = prefault;
            let receiver =
                DataReceiver::start(listener, Arc::clone(&sink), receiver_config).unwrap();
            let mut sender = DataSender::connect(
                &[addr],
                source,
                SenderConfig::new(session, WorkerPlacement::unpinned(1)),
            )
            .unwrap();
            sender.send(&[PageRange::new(0, pages)]).unwrap();
            sender.finish().unwrap();
            receiver.wait().unwrap();
            assert!(sink.to_vec() == bytes);
        }
    });
}

#[test]
fn bad_ranges_fail_before_anything_is_sent() {
    within(Duration::from_secs(10), "bad range", || {
        let session = SessionId::random();
        let source = Arc::new(VecMemory::new(0, 8));
        let sink = Arc::new(VecMemory::new(0, 8));
        let listener = loopback();
        let addr = listener.local_addr();
        let receiver = DataReceiver::start(
            listener,
            Arc::clone(&sink),
            ReceiverConfig::new(session, WorkerPlacement::unpinned(1)),
        )
        .unwrap();
        let mut sender = DataSender::connect(
            &[addr],
            source,
            SenderConfig::new(session, WorkerPlacement::unpinned(1)),
        )
        .unwrap();
        let err = sender
            .send(&[PageRange::new(0, 4), PageRange::new(6, 4)])
            .unwrap_err();
        assert!(
            ferry_transport::report(&err)
                .contains("cannot send pages 0x6+4: not in the source memory"),
            "{err}"
        );
        assert_eq!(sender.stats().total.frames, 0);
        // The transfer is still healthy.
        sender.send(&[PageRange::new(0, 8)]).unwrap();
        sender.finish().unwrap();
        assert_eq!(
            receiver.wait().unwrap().total.guest_bytes,
            8 * PAGE_SIZE as u64
        );
    });
}

#[test]
fn invalid_configurations_are_rejected_with_reasons() {
    let session = SessionId::random();
    let source = Arc::new(VecMemory::new(0, 1));
    let addr = "127.0.0.1:9".parse().unwrap();
    let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(1));
    config.pages_per_frame = 0;
    let err = DataSender::connect(&[addr], Arc::clone(&source), config).unwrap_err();
    assert!(
        err.to_string()
            .contains("pages_per_frame 0 is outside 1..=256"),
        "{err}"
    );
    let err = DataSender::connect(
        &[],
        Arc::clone(&source),
        SenderConfig::new(session, WorkerPlacement::unpinned(1)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no destination address"), "{err}");
    let err = DataSender::connect(
        &[addr],
        source,
        SenderConfig::new(session, WorkerPlacement::unpinned(0)),
    )
    .unwrap_err();
    assert!(
        ferry_transport::report(&err).contains("worker count is zero"),
        "{err}"
    );
}

/// A bandwidth cap holds over all streams together: moving N bytes at rate R takes at least
/// about N / R, on any machine (a slower one only takes longer), and the data still arrives
/// whole. A cap below the smallest is refused up front.
#[test]
fn a_bandwidth_cap_paces_every_stream_together() {
    within(Duration::from_secs(60), "capped transfer", || {
        let pages = 2048; // 8 MiB of random pages: incompressible, raw on the wire
        let bytes = content(pages, Content::Random, 11);
        let source = Arc::new(VecMemory::from_bytes(0, &bytes).unwrap());
        let sink = Arc::new(VecMemory::new(0, pages as u64));
        let session = SessionId::random();
        let listener = loopback();
        let addr = listener.local_addr();
        let receiver = DataReceiver::start(
            listener,
            Arc::clone(&sink),
            ReceiverConfig::new(session, WorkerPlacement::unpinned(3)),
        )
        .unwrap();
        let rate = 16_000_000u64;
        let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(3));
        config.compression = CompressionPolicy::None;
        config.max_bandwidth = Some(rate);
        let started = std::time::Instant::now();
        let mut sender = DataSender::connect(&[addr], source, config).unwrap();
        sender.send(&[PageRange::new(0, pages as u64)]).unwrap();
        sender.flush().unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        let sent = sender.finish().unwrap();
        receiver.wait().unwrap();
        assert!(sink.to_vec() == bytes, "capped transfer arrived damaged");
        // One frame may go out unpaced at each end, and a 20 ms burst is allowed.
        let frame = 128.0 * PAGE_SIZE as f64;
        let least = (sent.total.wire_bytes as f64 - 2.0 * frame) / rate as f64 - 0.02;
        assert!(
            elapsed >= least,
            "{} wire bytes in {elapsed:.3} s exceed the cap of {rate} B/s (needed {least:.3} s)",
            sent.total.wire_bytes
        );

        let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(1));
        config.max_bandwidth = Some(1000);
        let error = DataSender::connect(&[addr], Arc::new(VecMemory::new(0, 1)), config)
            .expect_err("a cap of 1000 B/s is refused");
        assert!(error.to_string().contains("max_bandwidth"), "{error}");
    });
}
