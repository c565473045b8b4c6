//! Fault cases: each must end in a clear error on both sides, quickly, and never report a
//! partial transfer as success.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{Content, Fault, Proxy, content, quick_timeouts, within};
use ferry_transport::data::{
    CompressionPolicy, DataListener, DataReceiver, DataSender, ReceiveError, ReceiverConfig,
    SendError, SenderConfig, SessionId,
};
use ferry_transport::memory::{MemoryError, PAGE_SIZE, PageRange, PageSink, PageSource, VecMemory};
use ferry_transport::report;
use ferry_transport::workers::WorkerPlacement;

const PAGES: u64 = 4096; // 16 MiB: far more than socket buffers hold, so faults hit mid-transfer

struct Setup {
    sender: Result<DataSender<VecMemory>, SendError>,
    receiver: DataReceiver,
    sink: Arc<VecMemory>,
    _proxy: Option<Proxy>,
}

fn setup(fault: Fault, streams: usize, sink: Arc<dyn PageSinkDyn>) -> Setup {
    let session = SessionId::random();
    let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = listener.local_addr();
    let mut receiver_config = ReceiverConfig::new(session, WorkerPlacement::unpinned(streams));
    receiver_config.timeouts = quick_timeouts();
    let receiver = DataReceiver::start(listener, Arc::clone(&sink), receiver_config).unwrap();
    let proxy = (!matches!(fault, Fault::None)).then(|| Proxy::start(target, fault));
    let addr = proxy.as_ref().map_or(target, |p| p.addr);
    let source =
        Arc::new(VecMemory::from_bytes(0, &content(PAGES as usize, Content::Random, 11)).unwrap());
    let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(streams));
    config.timeouts = quick_timeouts();
    config.compression = CompressionPolicy::None;
    config.pages_per_frame = 16;
    let sender = DataSender::connect(&[addr], source, config);
    Setup {
        sender,
        receiver,
        sink: sink.as_vec(),
        _proxy: proxy,
    }
}

/// Lets tests use either a plain sink or one that blocks.
trait PageSinkDyn: PageSink {
    fn as_vec(&self) -> Arc<VecMemory>;
}

impl PageSinkDyn for Arc<VecMemory> {
    fn as_vec(&self) -> Arc<VecMemory> {
        Arc::clone(self)
    }
}

fn plain_sink() -> Arc<dyn PageSinkDyn> {
    Arc::new(Arc::new(VecMemory::new(0, PAGES)))
}

/// Pushes everything, then flushes and finishes; returns the first error.
fn push_all(sender: &mut DataSender<VecMemory>) -> Result<(), SendError> {
    sender.send(&[PageRange::new(0, PAGES)])?;
    sender.flush()
}

#[test]
fn peer_closing_mid_transfer_fails_both_sides() {
    within(Duration::from_secs(15), "close mid-transfer", || {
        let setup = setup(Fault::CloseAfter(3 * 1024 * 1024), 1, plain_sink());
        let mut sender = setup.sender.expect("connects through the proxy");
        let started = Instant::now();
        let sent = push_all(&mut sender);
        let err = sent.expect_err("a cut connection cannot flush");
        let text = report(&err);
        assert!(
            text.contains("closed the connection")
                || text.contains("cannot send")
                || text.contains("cannot receive")
                || text.contains("abandoned"),
            "sender error is not clear: {text}"
        );
        assert!(sender.finish().is_err(), "a failed transfer cannot finish");
        let err = setup
            .receiver
            .wait()
            .expect_err("receiver must not report success");
        let text = report(&err);
        assert!(
            text.contains("frame truncated")
                || text.contains("closed the connection")
                || text.contains("reset by peer"),
            "receiver error is not clear: {text}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Less than everything arrived, and the receiver said so.
        assert!(setup.sink.to_vec() != content(PAGES as usize, Content::Random, 11));
    });
}

#[test]
fn stalled_link_times_out_on_both_sides() {
    within(Duration::from_secs(15), "stalled link", || {
        // Small enough that each of the two streams reaches it whatever the load balance.
        let setup = setup(Fault::StallAfter(256 * 1024), 2, plain_sink());
        let mut sender = setup.sender.expect("connects through the proxy");
        let err = push_all(&mut sender).expect_err("a stalled link cannot flush");
        let text = report(&err);
        assert!(
            text.contains("stopped reading") || text.contains("nothing received from the peer"),
            "sender error is not clear: {text}"
        );
        drop(sender);
        let err = setup
            .receiver
            .wait()
            .expect_err("receiver must not report success");
        let text = report(&err);
        assert!(
            text.contains("nothing received from the peer")
                || text.contains("closed the connection")
                || text.contains("frame truncated")
                || text.contains("abandoned"),
            "receiver error is not clear: {text}"
        );
    });
}

/// A sink whose writes block until released: the receiver stops reading its socket.
struct GatedSink {
    memory: Arc<VecMemory>,
    open: Mutex<bool>,
    opened: Condvar,
    writes: AtomicU64,
}

impl GatedSink {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
    fn wait_open(&self) {
        if self.writes.fetch_add(1, Ordering::Relaxed) < 4 {
            return; // let a few frames through, then block
        }
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

impl PageSink for GatedSink {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        PageSink::check_range(&*self.memory, range)
    }
    fn write_pages(&self, first_pfn: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.wait_open();
        self.memory.write_pages(first_pfn, src)
    }
    fn zero_pages(&self, range: PageRange) -> Result<(), MemoryError> {
        self.wait_open();
        self.memory.zero_pages(range)
    }
}

impl PageSinkDyn for GatedSink {
    fn as_vec(&self) -> Arc<VecMemory> {
        Arc::clone(&self.memory)
    }
}

#[test]
fn receiver_that_stops_reading_applies_back_pressure_then_the_sender_times_out() {
    within(Duration::from_secs(15), "back-pressure", || {
        let gate = Arc::new(GatedSink {
            memory: Arc::new(VecMemory::new(0, PAGES)),
            open: Mutex::new(false),
            opened: Condvar::new(),
            writes: AtomicU64::new(0),
        });
        let setup = setup(Fault::None, 1, Arc::clone(&gate) as Arc<dyn PageSinkDyn>);
        let mut sender = setup.sender.expect("connects");
        let started = Instant::now();
        let err =
            push_all(&mut sender).expect_err("a receiver that stopped reading cannot be flushed");
        let text = report(&err);
        assert!(
            text.contains("stopped reading") || text.contains("nothing received from the peer"),
            "sender error is not clear: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        // Back-pressure bounded what was sent: far less than the 16 MiB asked for.
        let sent = sender.stats().total.wire_bytes;
        assert!(
            sent < PAGES * PAGE_SIZE as u64 / 2,
            "sent {sent} bytes into a receiver that stopped reading"
        );
        drop(sender);
        gate.release();
        let err = setup
            .receiver
            .wait()
            .expect_err("receiver must not report success");
        let text = report(&err);
        assert!(
            text.contains("closed the connection")
                || text.contains("reset by peer")
                || text.contains("frame truncated")
                || text.contains("abandoned")
                || text.contains("cannot receive"),
            "receiver error is not clear: {text}"
        );
    });
}

#[test]
fn corrupted_frame_is_never_written_and_fails_both_sides() {
    within(Duration::from_secs(15), "corruption", || {
        // Frames hold 16 pages (65 KiB) in one run: frame header, 16 bytes of counts, one
        // 12-byte run, a 3-byte table entry per page, then the pages. Corrupt a byte well
        // inside the 3rd frame's data.
        let head = 20 + 16 + 12 + 16 * 3;
        let frame_len = head + 16 * PAGE_SIZE;
        let corrupt_at = 2 * frame_len + head + 5 * PAGE_SIZE + 123 + handshake_bytes();
        let setup = setup(Fault::CorruptAt(corrupt_at), 1, plain_sink());
        let mut sender = setup.sender.expect("connects through the proxy");
        let err = push_all(&mut sender).expect_err("a corrupted transfer cannot flush");
        let text = report(&err);
        // Usually the receiver's reason arrives first ("abandoned: ... checksum mismatch");
        // under load the sender may see the connection drop before reading it.
        assert!(
            (text.contains("abandoned") && text.contains("checksum mismatch"))
                || text.contains("reset by peer")
                || text.contains("Broken pipe")
                || text.contains("closed the connection"),
            "sender error is not clear: {text}"
        );
        let err = setup
            .receiver
            .wait()
            .expect_err("receiver must not report success");
        let text = report(&err);
        assert!(
            text.contains("checksum mismatch"),
            "receiver error is not clear: {text}"
        );
        let expected = content(PAGES as usize, Content::Random, 11);
        let got = setup.sink.to_vec();
        let frame_pages = 16 * PAGE_SIZE;
        assert!(
            got[..2 * frame_pages] == expected[..2 * frame_pages],
            "frames before the bad one landed"
        );
        assert!(
            got[2 * frame_pages..].iter().all(|&b| b == 0),
            "nothing of or after the bad frame was written"
        );
    });
}

/// Bytes of the sender's Hello frame before the first data frame: 20 of header plus a
/// postcard payload whose session id varint varies in length, so this is approximate; the
/// corrupted offset lands in the middle of a page, so a few bytes either way do not matter.
fn handshake_bytes() -> usize {
    30
}

#[test]
fn receiver_abort_reaches_the_sender_with_its_reason() {
    within(Duration::from_secs(15), "receiver abort", || {
        let setup = setup(Fault::None, 2, plain_sink());
        let mut sender = setup.sender.expect("connects");
        sender.send(&[PageRange::new(0, 64)]).unwrap();
        sender.flush().unwrap();
        setup.receiver.abort("destination is shutting down");
        let err = (0..50)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                sender.flush().err()
            })
            .expect("the sender notices the abort");
        assert!(
            report(&err).contains("destination is shutting down"),
            "{}",
            report(&err)
        );
        let err = setup.receiver.wait().unwrap_err();
        assert!(report(&err).contains("destination is shutting down"));
    });
}

#[test]
fn sender_abort_reaches_the_receiver_with_its_reason() {
    within(Duration::from_secs(15), "sender abort", || {
        let setup = setup(Fault::None, 2, plain_sink());
        let mut sender = setup.sender.expect("connects");
        sender.send(&[PageRange::new(0, 64)]).unwrap();
        sender.flush().unwrap();
        sender.abort("source VM crashed");
        let err = setup
            .receiver
            .wait()
            .expect_err("an aborted transfer is not a success");
        assert!(
            report(&err).contains("source VM crashed"),
            "{}",
            report(&err)
        );
    });
}

#[test]
fn sender_dropped_mid_transfer_fails_the_receiver() {
    within(Duration::from_secs(15), "sender dropped", || {
        let setup = setup(Fault::None, 2, plain_sink());
        let mut sender = setup.sender.expect("connects");
        sender.send(&[PageRange::new(0, PAGES)]).unwrap();
        drop(sender);
        let err = setup
            .receiver
            .wait()
            .expect_err("a dropped sender is not a success");
        let text = report(&err);
        // The drop closes the streams wherever they are, possibly in the middle of a frame.
        assert!(
            text.contains("stopped before finishing")
                || text.contains("closed the connection")
                || text.contains("reset by peer")
                || text.contains("frame truncated"),
            "{text}"
        );
    });
}

/// A source whose reads fail past a page: the sender must abandon and tell the receiver.
struct FailingSource {
    memory: VecMemory,
    fail_from: u64,
}

impl PageSource for FailingSource {
    fn check_range(&self, range: PageRange) -> Result<(), MemoryError> {
        PageSource::check_range(&self.memory, range)
    }
    fn read_pages(&self, first_pfn: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        if first_pfn >= self.fail_from {
            return Err(MemoryError::Unmapped {
                first_pfn,
                count: 1,
            });
        }
        self.memory.read_pages(first_pfn, dst)
    }
}

#[test]
fn source_read_failure_abandons_the_transfer_on_both_sides() {
    within(Duration::from_secs(15), "source failure", || {
        let session = SessionId::random();
        let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let sink = Arc::new(VecMemory::new(0, 64));
        let mut receiver_config = ReceiverConfig::new(session, WorkerPlacement::unpinned(1));
        receiver_config.timeouts = quick_timeouts();
        let receiver = DataReceiver::start(listener, sink, receiver_config).unwrap();
        let source = Arc::new(FailingSource {
            memory: VecMemory::new(0, 64),
            fail_from: 40,
        });
        let mut config = SenderConfig::new(session, WorkerPlacement::unpinned(1));
        config.timeouts = quick_timeouts();
        let mut sender = DataSender::connect(&[addr], source, config).unwrap();
        sender.send(&[PageRange::new(0, 64)]).unwrap();
        let err = sender.flush().unwrap_err();
        assert!(
            report(&err).contains("cannot read guest memory"),
            "{}",
            report(&err)
        );
        let err = receiver.wait().unwrap_err();
        let text = report(&err);
        assert!(
            text.contains("abandoned") && text.contains("cannot read guest memory"),
            "{text}"
        );
    });
}

#[test]
fn sender_that_never_connects_times_out_the_receiver() {
    within(Duration::from_secs(10), "accept timeout", || {
        let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut config = ReceiverConfig::new(SessionId::random(), WorkerPlacement::unpinned(2));
        config.timeouts = quick_timeouts();
        config.timeouts.connect = Duration::from_millis(300);
        let receiver =
            DataReceiver::start(listener, Arc::new(VecMemory::new(0, 1)), config).unwrap();
        let err = receiver.wait().unwrap_err();
        assert!(
            matches!(
                err,
                ReceiveError::AcceptTimeout {
                    connected: 0,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "only 0 of 2 data streams connected within 300ms"
        );
    });
}

#[test]
fn wrong_session_is_turned_away() {
    within(Duration::from_secs(10), "wrong session", || {
        let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let mut config = ReceiverConfig::new(SessionId(1), WorkerPlacement::unpinned(1));
        config.timeouts = quick_timeouts();
        config.timeouts.connect = Duration::from_millis(500);
        let receiver =
            DataReceiver::start(listener, Arc::new(VecMemory::new(0, 1)), config).unwrap();
        let mut sender_config = SenderConfig::new(SessionId(2), WorkerPlacement::unpinned(1));
        sender_config.timeouts = quick_timeouts();
        let err = DataSender::connect(&[addr], Arc::new(VecMemory::new(0, 1)), sender_config)
            .unwrap_err();
        assert!(
            report(&err).contains("unknown transfer session"),
            "{}",
            report(&err)
        );
        assert!(matches!(
            receiver.wait(),
            Err(ReceiveError::AcceptTimeout { .. })
        ));
    });
}

#[test]
fn stream_count_mismatch_is_rejected() {
    within(Duration::from_secs(10), "stream mismatch", || {
        let session = SessionId::random();
        let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let mut config = ReceiverConfig::new(session, WorkerPlacement::unpinned(3));
        config.timeouts = quick_timeouts();
        let receiver =
            DataReceiver::start(listener, Arc::new(VecMemory::new(0, 1)), config).unwrap();
        let mut sender_config = SenderConfig::new(session, WorkerPlacement::unpinned(2));
        sender_config.timeouts = quick_timeouts();
        let err = DataSender::connect(&[addr], Arc::new(VecMemory::new(0, 1)), sender_config)
            .unwrap_err();
        assert!(
            report(&err).contains("sender opens 2 streams, receiver expects 3"),
            "{}",
            report(&err)
        );
        let err = receiver.wait().unwrap_err();
        assert!(
            report(&err).contains("sender opens 2 streams, receiver expects 3"),
            "{}",
            report(&err)
        );
    });
}

#[test]
fn connecting_to_nothing_fails_clearly() {
    within(Duration::from_secs(10), "refused", || {
        // Bind then drop to get a port nobody listens on.
        let addr = DataListener::bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .local_addr();
        let mut config = SenderConfig::new(SessionId::random(), WorkerPlacement::unpinned(1));
        config.timeouts = quick_timeouts();
        let err = DataSender::connect(&[addr], Arc::new(VecMemory::new(0, 1)), config).unwrap_err();
        assert!(
            report(&err).contains(&format!("stream 0: cannot connect to {addr}")),
            "{}",
            report(&err)
        );
    });
}
