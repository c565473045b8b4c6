//! Helpers shared by the integration tests: page content generators, a watchdog, and a TCP
//! proxy that injects faults between a data sender and receiver.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use ferry_transport::data::Timeouts;
use ferry_transport::memory::{PAGE_SIZE, RawRegion, RegionFile};

/// Kinds of page content the transfer must carry unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    Random,
    Text,
    Sparse,
    Mixed,
}

pub const ALL_CONTENT: [Content; 5] = [
    Content::Zero,
    Content::Random,
    Content::Text,
    Content::Sparse,
    Content::Mixed,
];

/// Deterministic xorshift generator: no dependency, reproducible failures.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "guest",
    "memory",
    "page",
    "migration",
    "the",
    "of",
    "kernel",
    "socket",
    "buffer",
    "dirty",
    "vcpu",
    "and",
];

pub fn fill_page(page: &mut [u8], kind: Content, rng: &mut XorShift) {
    match kind {
        Content::Zero => page.fill(0),
        Content::Random => {
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        Content::Text => {
            let mut at = 0;
            while at < page.len() {
                let word = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
                let n = word.len().min(page.len() - at);
                page[at..at + n].copy_from_slice(&word[..n]);
                at += n;
                if at < page.len() {
                    page[at] = b' ';
                    at += 1;
                }
            }
        }
        Content::Sparse => {
            page.fill(0);
            for _ in 0..8 {
                let at = (rng.next() % page.len() as u64) as usize;
                page[at] = rng.next() as u8 | 1;
            }
        }
        Content::Mixed => {
            let kind = match rng.next() % 10 {
                0..=3 => Content::Zero,
                4..=6 => Content::Text,
                7..=8 => Content::Random,
                _ => Content::Sparse,
            };
            fill_page(page, kind, rng);
        }
    }
}

pub fn content(pages: usize, kind: Content, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    for page in bytes.chunks_exact_mut(PAGE_SIZE) {
        fill_page(page, kind, &mut rng);
    }
    bytes
}

/// Short timeouts so fault tests end in well under a second or two.
pub fn quick_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        keepalive_interval: Duration::from_millis(50),
        idle: Duration::from_millis(600),
        stall: Duration::from_millis(400),
    }
}

/// Runs `f` on a thread and fails the test if it does not return within `limit`: a hang
/// is a failure, not a stuck CI run.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the closure returned without sending"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {limit:?}: hang")
        }
    }
}

/// What the proxy does to the sender-to-receiver direction.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Close both connections after this many bytes.
    CloseAfter(usize),
    /// Stop reading and forwarding (both directions) after this many bytes, keeping the
    /// connections open.
    StallAfter(usize),
    /// Flip one bit of the byte at this offset.
    CorruptAt(usize),
}

/// A TCP proxy in front of `target` that applies `fault` to the first connection through it
/// (later connections pass untouched).
pub struct Proxy {
    pub addr: SocketAddr,
    /// Every byte sent from sender to receiver through the proxy, up to 256 MiB.
    pub capture: Arc<std::sync::Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

const CAPTURE_LIMIT: usize = 256 << 20;

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Proxy {
    pub fn start(target: SocketAddr, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_accept = Arc::clone(&stop);
        let capture = Arc::new(std::sync::Mutex::new(Vec::new()));
        let capturing = Arc::clone(&capture);
        listener.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            let mut first = true;
            while !stop_accept.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let server = TcpStream::connect(target).unwrap();
                        let fault = if first { fault } else { Fault::None };
                        first = false;
                        relay(
                            (client, server),
                            fault,
                            Arc::clone(&stop_accept),
                            Arc::clone(&capturing),
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            addr,
            capture,
            stop,
        }
    }
}

type Capture = Arc<std::sync::Mutex<Vec<u8>>>;

fn relay(
    (client, server): (TcpStream, TcpStream),
    fault: Fault,
    stop: Arc<AtomicBool>,
    capture: Capture,
) {
    let stalled = Arc::new(AtomicBool::new(false));
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    {
        let stalled = Arc::clone(&stalled);
        let stop = Arc::clone(&stop);
        thread::spawn(move || pump(client, server, fault, (&stalled, &stop), Some(capture)));
    }
    thread::spawn(move || pump(s2, c2, Fault::None, (&stalled, &stop), None));
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Fault,
    (stalled, stop): (&AtomicBool, &AtomicBool),
    capture: Option<Capture>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    loop {
        if stop.load(Ordering::Acquire) {
            break;
        }
        if stalled.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        let chunk = &mut buf[..n];
        match fault {
            Fault::None => {}
            Fault::CloseAfter(limit) if total + n >= limit => {
                let keep = limit.saturating_sub(total);
                let _ = to.write_all(&chunk[..keep]);
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            Fault::StallAfter(limit) if total + n >= limit => {
                let keep = limit.saturating_sub(total);
                let _ = to.write_all(&chunk[..keep]);
                stalled.store(true, Ordering::Release);
                // Keep both sockets open and unread until the test ends.
                while !stop.load(Ordering::Acquire) {
                    thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Fault::CorruptAt(at) if at >= total && at < total + n => chunk[at - total] ^= 0x10,
            _ => {}
        }
        total += n;
        if let Some(capture) = &capture {
            let mut capture = capture.lock().unwrap();
            if capture.len() + n <= CAPTURE_LIMIT {
                capture.extend_from_slice(chunk);
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A shared memfd mapping, as the runtime backs guest memory.
pub struct Memfd {
    pub fd: i32,
    pub addr: *mut u8,
    pub len: usize,
}

impl Memfd {
    pub fn new(len: usize) -> Memfd {
        // SAFETY: creates a new anonymous file; no memory is passed.
        let fd = unsafe { libc::memfd_create(c"ferry-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: sizes the file just created.
        assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
        // SAFETY: a new shared mapping of that file; no existing memory is affected.
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
        assert_ne!(addr, libc::MAP_FAILED);
        Memfd {
            fd,
            addr: addr.cast(),
            len,
        }
    }

    pub fn region(&self, through_file: bool) -> RawRegion {
        let file = through_file.then_some(RegionFile {
            fd: self.fd,
            offset: 0,
        });
        RawRegion {
            guest_phys_addr: 0,
            host_addr: self.addr,
            len: self.len,
            file,
        }
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` created, once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
        // SAFETY: closes what `new` opened, once.
        unsafe { libc::close(self.fd) };
    }
}
