//! `ferry-rdma-check`: the RDMA data path tested over real verbs, inside the soft-RoCE guest
//! that `tests/rxe/run.sh` boots (KVM does not run there, so this works below the KVM
//! boundary: two processes, source and destination, each with a memfd "guest memory").
//!
//! - `ferry-rdma-check suite --addr IP`: every check, each against a fresh destination
//!   process; prints `RESULT name PASS|FAIL detail` per check and `N passed, N failed`.
//! - `ferry-rdma-check bench --addr IP`: RDMA and TCP through the same transport API on the
//!   same region; prints a table of throughput and CPU time per GiB.
//! - `ferry-rdma-check dest ...`: the destination process the other two start.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::process::{Child, Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::data::{
    CompressionPolicy, DataListener, DataReceiver, ReceiverConfig, SenderConfig, SessionId,
    Timeouts,
};
use ferry_transport::memory::{GuestRegions, PAGE_SIZE, PageRange, RawRegion, RegionFile};
use ferry_transport::negotiate::{self, Capabilities, Transport};
use ferry_transport::pages::{Connected, PageReceiver, PageSender, Targets, connect_sender};
use ferry_transport::rdma::{
    self, MemoryTable, RdmaListener, RdmaReceiver, RdmaReceiverConfig, RdmaSenderConfig,
};
use ferry_transport::workers::WorkerPlacement;
use serde::{Deserialize, Serialize};

const STREAMS: usize = 2;

/// Generous limits: everything here runs under TCG emulation.
fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(20),
        keepalive_interval: Duration::from_secs(1),
        idle: Duration::from_secs(30),
        stall: Duration::from_secs(30),
    }
}

/// A memfd mapped shared: the "guest memory" of one side.
struct Memfd {
    fd: RawFd,
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through raw-pointer copies of whole
// pages; threads writing it concurrently is what guest vCPUs do to guest memory.
unsafe impl Send for Memfd {}
// SAFETY: as for Send: no method hands out references into the mapping.
unsafe impl Sync for Memfd {}

impl Memfd {
    /// A new zero-filled file, inheritable by a child process.
    fn create(len: usize) -> Result<Self, String> {
        // SAFETY: creates a new anonymous file; no memory is passed.
        let fd = unsafe { libc::memfd_create(c"ferry-rdma-check".as_ptr(), 0) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: sizes the file just created.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
        }
        Self::map(fd, len)
    }

    fn map(fd: RawFd, len: usize) -> Result<Self, String> {
        // SAFETY: a new shared mapping of the file; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            addr: addr.cast(),
            len,
        })
    }

    fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Guest memory over this mapping. `fresh`: all zero and written only by the transfer.
    fn regions(&self, fresh: bool) -> Arc<GuestRegions> {
        let region = RawRegion {
            guest_phys_addr: 0,
            host_addr: self.addr,
            len: self.len,
            file: Some(RegionFile {
                fd: self.fd,
                offset: 0,
            }),
        };
        // The mapping lives until process exit (Memfd values are never dropped while a
        // transfer runs: each lives for its whole check), and this program holds no Rust
        // reference into it; it reads and writes it through raw pointers only.
        let regions = if fresh {
            // SAFETY: as above; the file is new, so all zero.
            unsafe { GuestRegions::new_zeroed(&[region]) }
        } else {
            // SAFETY: as above.
            unsafe { GuestRegions::new(&[region]) }
        };
        Arc::new(regions.expect("one valid region"))
    }

    fn write_page(&self, page: u64, fill: impl Fn(usize) -> u8) {
        let mut buf = [0u8; PAGE_SIZE];
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = fill(i);
        }
        let at = self.addr.wrapping_add(page as usize * PAGE_SIZE);
        // SAFETY: the page is inside the mapping; raw copy, no reference into it.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), at, PAGE_SIZE) };
    }

    fn read_page(&self, page: u64) -> [u8; PAGE_SIZE] {
        let mut buf = [0u8; PAGE_SIZE];
        let at = self.addr.wrapping_add(page as usize * PAGE_SIZE);
        // SAFETY: as in write_page.
        unsafe { std::ptr::copy_nonoverlapping(at, buf.as_mut_ptr(), PAGE_SIZE) };
        buf
    }
}

/// Deterministic page content: a byte pattern from the page number and a round, or zeros.
fn content(page: u64, round: u64) -> impl Fn(usize) -> u8 {
    let mut x =
        page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    let mut bytes = [0u8; 64];
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    move |i| bytes[i % 64] ^ (i / 64) as u8
}

/// Incompressible page content (xorshift over the whole page), for the benchmark.
fn noise(page: u64) -> impl Fn(usize) -> u8 {
    let mut x = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = vec![0u8; PAGE_SIZE];
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    move |i| bytes[i]
}

/// The value after `name` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The value after `name` in `args`, parsed; an error names the flag.
fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    flag(args, name)
        .ok_or_else(|| format!("{name} is missing"))?
        .parse()
        .map_err(|e| format!("{name}: {e}"))
}

/// `error` as a check's detail if it says one of the `clear` things an operator can act on,
/// with the time since `since`; otherwise a failure.
fn clear_error(
    error: String,
    clear: &[&str],
    (since_what, since): (&str, Instant),
) -> Result<String, String> {
    if clear.iter().any(|c| error.contains(c)) {
        Ok(format!(
            "{:.1} s {since_what}: {error}",
            since.elapsed().as_secs_f64()
        ))
    } else {
        Err(format!("unclear error: {error}"))
    }
}

/// Compares the two memories page by page; names the first difference.
fn compare(source: &Memfd, destination: &Memfd) -> Result<(), String> {
    let mut differing = 0u64;
    let mut first = None;
    for page in 0..source.pages() {
        if source.read_page(page) != destination.read_page(page) {
            differing += 1;
            first.get_or_insert(page);
        }
    }
    match first {
        None => Ok(()),
        Some(page) => Err(format!(
            "{differing} pages differ, the first is page {page:#x}"
        )),
    }
}

/// What the destination publishes (the Prepared step).
#[derive(Debug, Serialize, Deserialize)]
struct Prepared {
    caps: Capabilities,
    table: Option<MemoryTable>,
}

/// What the source decides.
#[derive(Debug, Serialize, Deserialize)]
enum Use {
    Rdma,
    Tcp,
}

/// How the destination ends.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    result: Result<u64, String>,
    cpu: Duration,
}

fn send_line<T: Serialize>(stream: &mut TcpStream, value: &T) -> Result<(), String> {
    let mut line = serde_json::to_string(value).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("control write: {e}"))
}

fn read_line<T: for<'de> Deserialize<'de>>(
    reader: &mut BufReader<TcpStream>,
    timeout: Duration,
) -> Result<T, String> {
    reader
        .get_ref()
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("the destination closed the control connection".into()),
        Ok(_) => {
            serde_json::from_str(&line).map_err(|e| format!("bad control message {line:?}: {e}"))
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!("timed out after {timeout:?}"))
        }
        Err(e) => Err(format!("control read: {e}")),
    }
}

fn process_cpu() -> Duration {
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into a valid local.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

// ---- the destination process ------------------------------------------------------------

/// `dest --control PORT --addr IP --fd FD --pages N --session S --mode MODE`
fn destination(args: &[String]) -> Result<(), String> {
    let control: u16 = arg(args, "--control")?;
    let ip: IpAddr = arg(args, "--addr")?;
    let fd: RawFd = arg(args, "--fd")?;
    let pages: usize = arg(args, "--pages")?;
    let session = SessionId(arg(args, "--session")?);
    let mode = flag(args, "--mode").ok_or("dest needs --mode")?;
    let memory = Memfd::map(fd, pages * PAGE_SIZE)?;
    let sink = memory.regions(true);
    let mut stream =
        TcpStream::connect(("127.0.0.1", control)).map_err(|e| format!("control connect: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);

    let tcp_listener = DataListener::bind(SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
    let tcp_addr = tcp_listener.local_addr();
    let mut caps =
        Capabilities::local(vec![tcp_addr], STREAMS as u16).map_err(|e| e.to_string())?;
    let mut rdma_receiver = None;
    let mut _idle_listener = None;
    let mut table = None;
    match mode {
        "normal" | "refused" | "bad-rkey" => {
            let listener = RdmaListener::bind(SocketAddr::new(ip, 0))
                .map_err(|e| ferry_transport::report(&e))?;
            let mut config = RdmaReceiverConfig::new(session, STREAMS);
            config.timeouts = timeouts();
            let receiver = RdmaReceiver::start(listener, Arc::clone(&sink), config)
                .map_err(|e| ferry_transport::report(&e))?;
            let mut published = receiver.table().clone();
            if mode == "refused" {
                // Point the source at a port nothing listens on: RDMA setup fails there.
                published
                    .listen
                    .set_port(published.listen.port().wrapping_add(7));
            }
            if mode == "bad-rkey" {
                for region in &mut published.regions {
                    region.rkey ^= 0x5a5a;
                }
            }
            table = Some(published);
            rdma_receiver = Some(receiver);
        }
        "no-accept" => {
            // Listens, but never accepts: a destination that hangs before registering.
            let listener = RdmaListener::bind(SocketAddr::new(ip, 0))
                .map_err(|e| ferry_transport::report(&e))?;
            table = Some(MemoryTable {
                listen: listener.local_addr(),
                regions: vec![rdma::RemoteRegion {
                    guest_phys_addr: 0,
                    len: (pages * PAGE_SIZE) as u64,
                    addr: memory.addr as u64,
                    rkey: 0,
                }],
                zeroed: true,
            });
            _idle_listener = Some(listener);
        }
        "no-rdma" => {
            caps = Capabilities::without_rdma(vec![tcp_addr], STREAMS as u16);
        }
        "silent" => {
            // Never publishes anything.
            std::thread::sleep(Duration::from_secs(600));
            return Ok(());
        }
        other => return Err(format!("unknown mode {other}")),
    }
    // Both paths listen: the source says which one it connected (RDMA, or TCP when the
    // plan or RDMA setup says so); the other is dropped.
    let mut tcp_config = ReceiverConfig::new(session, WorkerPlacement::unpinned(STREAMS));
    tcp_config.timeouts = timeouts();
    let tcp_receiver = if mode == "no-accept" {
        None
    } else {
        Some(
            DataReceiver::start(tcp_listener, Arc::clone(&sink), tcp_config)
                .map_err(|e| ferry_transport::report(&e))?,
        )
    };
    send_line(&mut stream, &Prepared { caps, table })?;
    let choice: Use = read_line(&mut reader, Duration::from_secs(600))?;
    let receiver = match (choice, rdma_receiver, tcp_receiver) {
        (Use::Rdma, Some(receiver), _) => PageReceiver::Rdma(receiver),
        (Use::Tcp, _, Some(receiver)) => PageReceiver::Tcp(receiver),
        _ => {
            // no-accept: keep the listener and never take the connection.
            std::thread::sleep(Duration::from_secs(600));
            return Ok(());
        }
    };
    let cpu = process_cpu();
    let result = receiver
        .wait()
        .map(|stats| stats.total.guest_bytes)
        .map_err(|e| ferry_transport::report(&e));
    if let Err(e) = &result {
        eprintln!("destination ({mode}): {e}");
    }
    send_line(
        &mut stream,
        &Outcome {
            result,
            cpu: process_cpu().saturating_sub(cpu),
        },
    )?;
    Ok(())
}

/// `src --control PORT --pages N --session S`: a source process that writes rounds of the
/// whole region to the destination the parent runs, until it is killed.
fn source_process(args: &[String]) -> Result<(), String> {
    let control: u16 = arg(args, "--control")?;
    let pages: u64 = arg(args, "--pages")?;
    let session = SessionId(arg(args, "--session")?);
    let memory = Memfd::create(pages as usize * PAGE_SIZE)?;
    for page in 0..pages {
        memory.write_page(page, noise(page));
    }
    let stream =
        TcpStream::connect(("127.0.0.1", control)).map_err(|e| format!("control connect: {e}"))?;
    let mut reader = BufReader::new(stream);
    let table: MemoryTable = read_line(&mut reader, Duration::from_secs(60))?;
    let mut config = RdmaSenderConfig::new(session, WorkerPlacement::unpinned(STREAMS));
    config.timeouts = timeouts();
    let mut sender =
        ferry_transport::rdma::RdmaSender::connect(&table, memory.regions(false), config)
            .map_err(|e| ferry_transport::report(&e))?;
    loop {
        sender
            .send(&[PageRange::new(0, pages)])
            .and_then(|()| sender.flush())
            .map_err(|e| ferry_transport::report(&e))?;
    }
}

// ---- the source side: one destination per check ------------------------------------------

struct Peer {
    child: Child,
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    memory: Memfd,
    session: SessionId,
}

impl Peer {
    fn start(addr: IpAddr, pages: u64, mode: &str) -> Result<Self, String> {
        let memory = Memfd::create(pages as usize * PAGE_SIZE)?;
        let control = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = control.local_addr().map_err(|e| e.to_string())?.port();
        let session = SessionId::random();
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args([
                "dest",
                "--control",
                &port.to_string(),
                "--addr",
                &addr.to_string(),
            ])
            .args([
                "--fd",
                &memory.fd.to_string(),
                "--pages",
                &pages.to_string(),
            ])
            .args(["--session", &session.0.to_string(), "--mode", mode])
            .spawn()
            .map_err(|e| format!("cannot start the destination: {e}"))?;
        control.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match control.accept() {
                Ok((stream, _)) => break stream,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(format!(
                        "the destination never connected its control channel: {e}"
                    ));
                }
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        Ok(Self {
            child,
            reader,
            stream,
            memory,
            session,
        })
    }

    fn prepared(&mut self, timeout: Duration) -> Result<Prepared, String> {
        read_line(&mut self.reader, timeout)
            .map_err(|e| format!("no Prepared from the destination (its memory registration): {e}"))
    }

    fn outcome(&mut self) -> Result<Outcome, String> {
        read_line(&mut self.reader, Duration::from_secs(120))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Negotiates as a migration does and connects: RDMA if the plan says so and setup works,
/// TCP otherwise. Returns the sender and the words for how it was chosen.
fn connect(
    peer: &mut Peer,
    source: &Arc<GuestRegions>,
    prepared: &Prepared,
) -> Result<(PageSender<GuestRegions>, String), String> {
    connect_with(peer, source, prepared, CompressionPolicy::Lz4)
}

fn connect_with(
    peer: &mut Peer,
    source: &Arc<GuestRegions>,
    prepared: &Prepared,
    compression: CompressionPolicy,
) -> Result<(PageSender<GuestRegions>, String), String> {
    let ours = Capabilities::local(Vec::new(), STREAMS as u16).map_err(|e| e.to_string())?;
    let plan = negotiate::choose(&ours, &prepared.caps).map_err(|e| e.to_string())?;
    let placement = WorkerPlacement::pinned(STREAMS, ferry_transport::workers::available_cpus());
    let mut rdma_config = RdmaSenderConfig::new(peer.session, placement.clone());
    rdma_config.timeouts = Timeouts {
        connect: Duration::from_secs(5),
        ..timeouts()
    };
    let mut tcp_config = SenderConfig::new(peer.session, placement);
    tcp_config.timeouts = timeouts();
    tcp_config.compression = compression;
    let rdma = match (&plan.transport, &prepared.table) {
        (Transport::Rdma { .. }, Some(table)) => Some((table, rdma_config)),
        _ => None,
    };
    let Connected { sender, fallback } = connect_sender(
        Targets {
            rdma,
            tcp_addrs: &prepared.caps.tcp_data_addrs,
            tcp: tcp_config,
        },
        Arc::clone(source),
    )
    .map_err(|e| ferry_transport::report(&e))?;
    let used = match sender {
        PageSender::Rdma(_) => Use::Rdma,
        PageSender::Tcp(_) => Use::Tcp,
    };
    send_line(&mut peer.stream, &used)?;
    let how = match (&sender, fallback) {
        (PageSender::Rdma(rdma), _) => format!("rdma ({})", rdma.link()),
        (PageSender::Tcp(_), Some(why)) => why,
        (PageSender::Tcp(_), None) => plan.reason.clone(),
    };
    Ok((sender, how))
}

// ---- checks ------------------------------------------------------------------------------

struct Check {
    addr: IpAddr,
    pages: u64,
}

impl Check {
    fn rdma_peer(&self, mode: &str) -> Result<(Peer, Arc<GuestRegions>, Memfd), String> {
        let peer = Peer::start(self.addr, self.pages, mode)?;
        let memory = Memfd::create(self.pages as usize * PAGE_SIZE)?;
        let source = memory.regions(false);
        Ok((peer, source, memory))
    }

    /// Round one over half the pages (the rest zero, skipped), then rounds of changed
    /// pages, some turned to zero; byte for byte after each flush.
    fn rounds(&self) -> Result<String, String> {
        let (mut peer, source, memory) = self.rdma_peer("normal")?;
        for page in (0..self.pages).filter(|p| p % 2 == 0) {
            memory.write_page(page, content(page, 0));
        }
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, how) = connect(&mut peer, &source, &prepared)?;
        if !matches!(sender, PageSender::Rdma(_)) {
            return Err(format!("expected RDMA, got: {how}"));
        }
        sender
            .send(&[PageRange::new(0, self.pages)])
            .map_err(|e| ferry_transport::report(&e))?;
        sender.flush().map_err(|e| ferry_transport::report(&e))?;
        compare(&memory, &peer.memory).map_err(|e| format!("round 1: {e}"))?;
        let skipped = sender.stats().total.pages_zero;
        if skipped < self.pages / 2 {
            return Err(format!(
                "round 1 skipped {skipped} zero pages, expected at least {}",
                self.pages / 2
            ));
        }
        for round in 1..=3u64 {
            // 1 page in 7 changes; 1 in 5 of those becomes zero (it was sent: must be
            // sent again as zeros).
            let mut dirty = Vec::new();
            for page in (round..self.pages).step_by(7) {
                if page % 5 == 0 {
                    memory.write_page(page, |_| 0);
                } else {
                    memory.write_page(page, content(page, round));
                }
                dirty.push(PageRange::new(page, 1));
            }
            sender
                .send(&dirty)
                .map_err(|e| ferry_transport::report(&e))?;
            sender.flush().map_err(|e| ferry_transport::report(&e))?;
            compare(&memory, &peer.memory).map_err(|e| format!("round {}: {e}", round + 1))?;
        }
        let sent = sender.finish().map_err(|e| ferry_transport::report(&e))?;
        let outcome = peer.outcome()?;
        let received = outcome.result.map_err(|e| format!("destination: {e}"))?;
        if received != sent.total.guest_bytes {
            return Err(format!(
                "destination counted {received} bytes, source {}",
                sent.total.guest_bytes
            ));
        }
        Ok(format!(
            "4 rounds, {} pages written, {} zero pages skipped, {how}",
            sent.total.pages_raw, sent.total.pages_zero
        ))
    }

    /// The worst moment: a writer keeps changing pages while the NIC reads them. Each round
    /// fetches and clears the writer's dirty bits before sending those pages (as KVM's dirty
    /// log does); after the writer stops, a last round, and the memories must be equal.
    fn live_writer(&self) -> Result<String, String> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let (mut peer, source, memory) = self.rdma_peer("normal")?;
        let memory = Arc::new(memory);
        let words = self.pages.div_ceil(64) as usize;
        let dirty: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let pages = self.pages;
        let writer = {
            let (memory, dirty, stop) =
                (Arc::clone(&memory), Arc::clone(&dirty), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1du64;
                let mut writes = 0u64;
                while !stop.load(Ordering::Acquire) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A hot eighth of memory takes half the writes.
                    let page = if x & 1 == 0 {
                        (x >> 1) % (pages / 8)
                    } else {
                        (x >> 1) % pages
                    };
                    writes += 1;
                    memory.write_page(page, content(page, writes));
                    dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
                    if writes.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                writes
            })
        };
        let fetch = || -> Vec<PageRange> {
            let mut ranges = Vec::new();
            for (i, word) in dirty.iter().enumerate() {
                let mut bits = word.swap(0, Ordering::AcqRel);
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    ranges.push(PageRange::new(i as u64 * 64 + bit, 1));
                }
            }
            ranges
        };
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, _) = connect(&mut peer, &source, &prepared)?;
        let result = (|| -> Result<(), String> {
            // Round one: all of memory (tracking is already on: the writer sets bits).
            sender
                .send(&[PageRange::new(0, pages)])
                .map_err(|e| ferry_transport::report(&e))?;
            sender.flush().map_err(|e| ferry_transport::report(&e))?;
            for _ in 0..4 {
                let ranges = fetch();
                sender
                    .send(&ranges)
                    .map_err(|e| ferry_transport::report(&e))?;
                sender.flush().map_err(|e| ferry_transport::report(&e))?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        let writes = writer
            .join()
            .map_err(|_| "the writer panicked".to_string())?;
        result?;
        let last = fetch();
        sender
            .send(&last)
            .map_err(|e| ferry_transport::report(&e))?;
        sender.finish().map_err(|e| ferry_transport::report(&e))?;
        peer.outcome()?
            .result
            .map_err(|e| format!("destination: {e}"))?;
        compare(&memory, &peer.memory)?;
        Ok(format!(
            "{writes} page writes during 5 rounds, {} pages in the last round; memories equal",
            last.len()
        ))
    }

    /// Every other page dirty: many one-page writes.
    fn fragmented(&self) -> Result<String, String> {
        let (mut peer, source, memory) = self.rdma_peer("normal")?;
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, _) = connect(&mut peer, &source, &prepared)?;
        let mut dirty = Vec::new();
        for page in (0..self.pages).step_by(2) {
            memory.write_page(page, content(page, 9));
            dirty.push(PageRange::new(page, 1));
        }
        sender
            .send(&dirty)
            .map_err(|e| ferry_transport::report(&e))?;
        sender.flush().map_err(|e| ferry_transport::report(&e))?;
        compare(&memory, &peer.memory)?;
        let stats = sender.finish().map_err(|e| ferry_transport::report(&e))?;
        peer.outcome()?
            .result
            .map_err(|e| format!("destination: {e}"))?;
        if stats.total.frames < self.pages / 2 {
            return Err(format!(
                "{} writes for {} separate pages",
                stats.total.frames,
                self.pages / 2
            ));
        }
        Ok(format!("{} one-page writes", stats.total.frames))
    }

    /// The destination is killed while pages move: the source fails with a clear error,
    /// and does not hang.
    fn killed(&self) -> Result<String, String> {
        let (mut peer, source, memory) = self.rdma_peer("normal")?;
        for page in 0..self.pages {
            memory.write_page(page, content(page, 3));
        }
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, _) = connect(&mut peer, &source, &prepared)?;
        sender
            .send(&[PageRange::new(0, 16)])
            .map_err(|e| ferry_transport::report(&e))?;
        sender.flush().map_err(|e| ferry_transport::report(&e))?;
        // Kill it while the whole region is being written (on a machine fast enough to
        // finish first, the loop below keeps writing until the loss shows).
        let pid = peer.child.id() as libc::pid_t;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            // SAFETY: signals the destination child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let started = Instant::now();
        let mut error = None;
        for _ in 0..50 {
            let result = sender
                .send(&[PageRange::new(0, self.pages)])
                .and_then(|()| sender.flush());
            if let Err(e) = result {
                error = Some(ferry_transport::report(&e));
                break;
            }
        }
        let _ = killer.join();
        peer.kill();
        let Some(error) = error else {
            return Err("the source kept sending to a killed destination".into());
        };
        let clear = [
            "disconnected",
            "completed with error",
            "no progress",
            "nothing from the peer",
        ];
        clear_error(error, &clear, ("after the writes began", started))
    }

    /// The source is killed while it writes: the destination fails with a clear error and
    /// does not hang.
    fn source_killed(&self) -> Result<String, String> {
        let memory = Memfd::create(self.pages as usize * PAGE_SIZE)?;
        let session = SessionId::random();
        let listener = RdmaListener::bind(SocketAddr::new(self.addr, 0))
            .map_err(|e| ferry_transport::report(&e))?;
        let mut config = RdmaReceiverConfig::new(session, STREAMS);
        config.timeouts = timeouts();
        let receiver = RdmaReceiver::start(listener, memory.regions(true), config)
            .map_err(|e| ferry_transport::report(&e))?;
        let control = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = control.local_addr().map_err(|e| e.to_string())?.port();
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "src",
                "--control",
                &port.to_string(),
                "--pages",
                &self.pages.to_string(),
            ])
            .args(["--session", &session.0.to_string()])
            .spawn()
            .map_err(|e| format!("cannot start the source: {e}"))?;
        let (mut stream, _) = control.accept().map_err(|e| e.to_string())?;
        send_line(&mut stream, receiver.table())?;
        // Wait for a round to land, so the kill comes while pages move.
        let deadline = Instant::now() + Duration::from_secs(60);
        while receiver.stats().total.pages_raw == 0 {
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("no round arrived from the source".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let killed = Instant::now();
        match receiver.wait() {
            Ok(_) => Err("the destination finished although the source was killed".into()),
            Err(e) => clear_error(
                ferry_transport::report(&e),
                &[
                    "disconnected",
                    "completed with error",
                    "nothing from the peer",
                ],
                ("after the kill", killed),
            ),
        }
    }

    /// The destination publishes a wrong remote key: the first write completes with an
    /// error status, the queue pair goes to error state, and both sides fail with the reason.
    fn completion_error(&self) -> Result<String, String> {
        let (mut peer, source, memory) = self.rdma_peer("bad-rkey")?;
        memory.write_page(3, content(3, 1));
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, _) = connect(&mut peer, &source, &prepared)?;
        let result = sender
            .send(&[PageRange::new(0, 64)])
            .and_then(|()| sender.flush());
        let error = match result {
            Ok(()) => return Err("writes with a wrong rkey succeeded".into()),
            Err(e) => ferry_transport::report(&e),
        };
        if !error.contains("completed with error") && !error.contains("disconnected") {
            return Err(format!("unclear error: {error}"));
        }
        drop(sender);
        let destination = match peer.outcome()?.result {
            Ok(_) => return Err("the destination finished after a failed write".into()),
            Err(e) => e,
        };
        Ok(format!("source: {error}; destination: {destination}"))
    }

    /// A destination that listens but never takes the connection (nor registers): the
    /// source's setup times out, and the migration falls back to TCP... here there is no
    /// TCP receiver, so the error itself is checked.
    fn no_accept(&self) -> Result<String, String> {
        let (mut peer, source, _memory) = self.rdma_peer("no-accept")?;
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let Some(table) = prepared.table.as_ref() else {
            return Err("no table".into());
        };
        send_line(&mut peer.stream, &Use::Rdma)?;
        let mut config = RdmaSenderConfig::new(peer.session, WorkerPlacement::unpinned(STREAMS));
        config.timeouts = Timeouts {
            connect: Duration::from_secs(5),
            ..timeouts()
        };
        let started = Instant::now();
        match ferry_transport::rdma::RdmaSender::connect(table, Arc::clone(&source), config) {
            Ok(_) => Err("connected to a destination that never accepts".into()),
            Err(e) => clear_error(
                ferry_transport::report(&e),
                &["within", "unreachable", "rejected"],
                ("after connecting began", started),
            ),
        }
    }

    /// A destination that never publishes its registered memory: the source's wait for the
    /// Prepared step times out with an error that says so.
    fn never_registers(&self) -> Result<String, String> {
        let (mut peer, _source, _memory) = self.rdma_peer("silent")?;
        match peer.prepared(Duration::from_secs(3)) {
            Ok(_) => Err("a silent destination published a table".into()),
            Err(e) if e.contains("timed out") && e.contains("registration") => Ok(e),
            Err(e) => Err(format!("unclear error: {e}")),
        }
    }

    /// The destination has no RDMA device: negotiation picks TCP and says why.
    fn fallback_no_device(&self) -> Result<String, String> {
        self.tcp_transfer("no-rdma", "no RDMA device on destination")
    }

    /// RDMA is planned but setup fails (nothing listens): TCP carries the transfer and the
    /// reason names the failure.
    fn fallback_setup(&self) -> Result<String, String> {
        self.tcp_transfer("refused", "falling back to tcp+lz4")
    }

    fn tcp_transfer(&self, mode: &str, expect: &str) -> Result<String, String> {
        let (mut peer, source, memory) = self.rdma_peer(mode)?;
        for page in (0..self.pages).step_by(3) {
            memory.write_page(page, content(page, 5));
        }
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, how) = connect(&mut peer, &source, &prepared)?;
        if !matches!(sender, PageSender::Tcp(_)) || !how.contains(expect) {
            return Err(format!("expected TCP because {expect:?}, got: {how}"));
        }
        sender
            .send(&[PageRange::new(0, self.pages)])
            .map_err(|e| ferry_transport::report(&e))?;
        sender.finish().map_err(|e| ferry_transport::report(&e))?;
        peer.outcome()?
            .result
            .map_err(|e| format!("destination: {e}"))?;
        compare(&memory, &peer.memory)?;
        Ok(how)
    }

    /// The source aborts: the destination fails with the source's reason.
    fn abort_reason(&self) -> Result<String, String> {
        let (mut peer, source, memory) = self.rdma_peer("normal")?;
        memory.write_page(1, content(1, 1));
        let prepared = peer.prepared(Duration::from_secs(60))?;
        let (mut sender, _) = connect(&mut peer, &source, &prepared)?;
        sender
            .send(&[PageRange::new(0, 16)])
            .map_err(|e| ferry_transport::report(&e))?;
        sender.flush().map_err(|e| ferry_transport::report(&e))?;
        sender.abort("operator cancelled the migration");
        let outcome = peer.outcome()?;
        match outcome.result {
            Ok(_) => Err("the destination finished after an abort".into()),
            Err(e) if e.contains("operator cancelled the migration") => Ok(e),
            Err(e) => Err(format!("the reason did not arrive: {e}")),
        }
    }

    /// Discovery: this guest's rxe device is found with an active port and offered, and two
    /// such hosts plan RDMA.
    fn discovery(&self) -> Result<String, String> {
        let caps = Capabilities::local(vec![SocketAddr::new(self.addr, 1)], 2)
            .map_err(|e| e.to_string())?;
        let device = caps
            .rdma_devices
            .iter()
            .find(|d| d.usable_ports().next().is_some())
            .ok_or_else(|| format!("no device with an active port: {:?}", caps.rdma_devices))?;
        if !caps.rdma_data_path {
            return Err("the build does not offer the RDMA data path".into());
        }
        let plan = negotiate::choose(&caps, &caps).map_err(|e| e.to_string())?;
        if !matches!(plan.transport, Transport::Rdma { .. }) {
            return Err(format!("two RDMA hosts planned {}", plan.reason));
        }
        let encrypted = negotiate::choose_for(&caps, &caps, true, &negotiate::Preference::Auto)
            .map_err(|e| e.to_string())?;
        if matches!(encrypted.transport, Transport::Rdma { .. })
            || !encrypted.reason.contains("TLS")
        {
            return Err(format!("an encrypted plan took RDMA: {}", encrypted.reason));
        }
        let limit = rdma::raise_memlock_limit();
        Ok(format!(
            "{} ({:?}); plan: {}; memlock {:?}",
            device.name, device.ports, plan.reason, limit.soft
        ))
    }
}

fn suite(addr: IpAddr, pages: u64) -> ExitCode {
    let check = Check { addr, pages };
    type CheckFn = fn(&Check) -> Result<String, String>;
    let checks: [(&str, CheckFn); 12] = [
        ("discovery", Check::discovery),
        ("rounds", Check::rounds),
        ("fragmented", Check::fragmented),
        ("pages_change_while_the_nic_reads_them", Check::live_writer),
        ("destination_killed", Check::killed),
        ("source_killed", Check::source_killed),
        ("completion_error", Check::completion_error),
        ("destination_never_accepts", Check::no_accept),
        ("destination_never_registers", Check::never_registers),
        ("fallback_no_rdma_device", Check::fallback_no_device),
        ("fallback_setup_failure", Check::fallback_setup),
        ("abort_reason_reaches_destination", Check::abort_reason),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, run) in checks {
        let started = Instant::now();
        let outcome = run(&check);
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(detail) => {
                passed += 1;
                println!("RESULT {name} PASS ({secs:.1} s) {detail}");
            }
            Err(detail) => {
                failed += 1;
                println!("RESULT {name} FAIL ({secs:.1} s) {detail}");
            }
        }
    }
    println!("RDMA SUMMARY: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// RDMA and TCP through the same API on the same region, `repeats` times each.
fn bench(addr: IpAddr, pages: u64, repeats: usize) -> ExitCode {
    let check = Check { addr, pages };
    println!("BENCH transport  MiB  seconds  MiB/s  source-cpu-s/GiB  dest-cpu-s/GiB");
    let modes = [
        ("rdma", "normal", CompressionPolicy::None),
        ("tcp", "no-rdma", CompressionPolicy::None),
        ("tcp+lz4", "no-rdma", CompressionPolicy::Lz4),
    ];
    for (label, mode, compression) in modes {
        for _ in 0..repeats {
            let run = || -> Result<(f64, f64, f64), String> {
                let (mut peer, source, memory) = check.rdma_peer(mode)?;
                for page in 0..pages {
                    memory.write_page(page, noise(page));
                }
                let prepared = peer.prepared(Duration::from_secs(60))?;
                let (mut sender, _) = connect_with(&mut peer, &source, &prepared, compression)?;
                let cpu = process_cpu();
                let started = Instant::now();
                sender
                    .send(&[PageRange::new(0, pages)])
                    .map_err(|e| ferry_transport::report(&e))?;
                sender.finish().map_err(|e| ferry_transport::report(&e))?;
                let seconds = started.elapsed().as_secs_f64();
                let source_cpu = process_cpu().saturating_sub(cpu).as_secs_f64();
                let outcome = peer.outcome()?;
                outcome.result.map_err(|e| format!("destination: {e}"))?;
                compare(&memory, &peer.memory)?;
                Ok((seconds, source_cpu, outcome.cpu.as_secs_f64()))
            };
            match run() {
                Ok((seconds, source_cpu, dest_cpu)) => {
                    let mib = (pages * PAGE_SIZE as u64) as f64 / (1 << 20) as f64;
                    let gib = mib / 1024.0;
                    println!(
                        "BENCH {label:9} {mib:4.0} {seconds:8.2} {:6.1} {:17.2} {:15.2}",
                        mib / seconds,
                        source_cpu / gib,
                        dest_cpu / gib
                    );
                }
                Err(e) => {
                    println!("BENCH {label:9} FAILED: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let flag =
        |name: &str, default: &str| -> String { flag(&args, name).unwrap_or(default).to_string() };
    let addr = || -> Result<IpAddr, String> {
        flag("--addr", "")
            .parse()
            .map_err(|e| format!("--addr: {e}"))
    };
    let pages = || -> u64 { flag("--mib", "64").parse::<u64>().unwrap_or(64) * 256 };
    let result = match args.get(1).map(String::as_str) {
        Some("dest") => destination(&args[2..]).map(|()| ExitCode::SUCCESS),
        Some("src") => source_process(&args[2..]).map(|()| ExitCode::SUCCESS),
        Some("suite") => addr().map(|addr| suite(addr, pages())),
        Some("bench") => {
            addr().map(|addr| bench(addr, pages(), flag("--repeats", "3").parse().unwrap_or(3)))
        }
        _ => Err("usage: ferry-rdma-check suite|bench --addr IP [--mib N] [--repeats N]".into()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-rdma-check: {e}");
            ExitCode::from(2)
        }
    }
}
