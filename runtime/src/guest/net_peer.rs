//! The `net` guest's peer: a program on the same Ethernet segment that sends numbered echo
//! requests to the guest's MAC, and counts what comes back: the guest's numbered `DATA`
//! frames, its echo replies, and announcements (RARP) of its MAC.
//!
//! It reads and writes raw frames through an `AF_PACKET` socket bound to one interface. The
//! socket can be opened inside a named network namespace ([`Peer::start`] with a namespace):
//! a socket stays in the namespace it was made in, so only the opening happens on a thread
//! moved there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::net::{Frame, KIND_DATA, KIND_ECHO_REPLY, KIND_ECHO_REQUEST};

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_RARP: u16 = 0x8035;

/// What the peer has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Echo requests sent.
    pub requests: u64,
    /// Echo replies received.
    pub replies: u64,
    /// Replies whose sequence number was not above the one before.
    pub reply_reorders: u64,
    /// The highest reply sequence number.
    pub last_reply: Option<u64>,
    /// Requests never answered, below the highest answered one.
    pub replies_missing: u64,
    /// `DATA` frames received.
    pub data: u64,
    /// `DATA` frames whose sequence number was not above the one before.
    pub data_reorders: u64,
    /// The highest `DATA` sequence number.
    pub last_data: Option<u64>,
    /// `DATA` sequence numbers skipped.
    pub data_missing: u64,
    /// RARP frames from the guest's MAC.
    pub announces: u64,
    /// Other frames from the guest's MAC.
    pub other: u64,
}

/// Opening the peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A system call failed.
    #[error("net peer: {operation} failed: {source}")]
    Sys {
        /// What was attempted.
        operation: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn sys(operation: impl Into<String>) -> impl FnOnce(std::io::Error) -> PeerError {
    let operation = operation.into();
    move |source| PeerError::Sys { operation, source }
}

/// Runs `f` on a thread moved into network namespace `netns` (`/run/netns/NAME`, as
/// `ip netns add` makes), or on this thread if `None`.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let Some(netns) = netns else {
        return f();
    };
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: setns on a descriptor of a network namespace file; it moves only this
        // thread, which ends after `f`.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("the thread in the namespace panicked"))?
}

/// A raw packet socket bound to `interface` of this thread's namespace, seeing every frame
/// on it (`ETH_P_ALL`), with a 50 ms receive timeout and a receive buffer large enough that
/// bursts are not dropped in the socket (a frame lost there is one a test would blame on the
/// network); also the interface's MAC and index.
pub fn packet_socket(interface: &str) -> std::io::Result<(OwnedFd, [u8; 6], i32)> {
    let name = std::ffi::CString::new(interface).map_err(std::io::Error::other)?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::other(format!("no interface '{interface}'")));
    }
    // SAFETY: plain socket(2); checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: valid address of the given length.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; SIOCGIFHWADDR fills ifru_hwaddr.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a valid ifreq for the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl filled the hardware address.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mac = [0, 1, 2, 3, 4, 5].map(|i| hw[i] as u8);
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // Root may go past rmem_max; an unprivileged caller keeps the default.
    let room: libc::c_int = 64 << 20;
    // SAFETY: a valid option value and size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const room).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    Ok((socket, mac, index as i32))
}

#[derive(Debug)]
struct Inner {
    socket: OwnedFd,
    guest: [u8; 6],
    stats: Mutex<PeerStats>,
    stop: AtomicBool,
}

impl Inner {
    fn stats(&self) -> MutexGuard<'_, PeerStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running peer.
#[derive(Debug)]
pub struct Peer {
    inner: Arc<Inner>,
    mac: [u8; 6],
    threads: Vec<JoinHandle<()>>,
}

impl Peer {
    /// Starts a peer on `interface` (in namespace `netns`, if given) talking to the guest with
    /// MAC `guest`, sending `requests_per_sec` echo requests a second (0: none).
    pub fn start(
        netns: Option<&str>,
        interface: &str,
        guest: [u8; 6],
        requests_per_sec: u64,
    ) -> Result<Peer, PeerError> {
        let owned = interface.to_string();
        let (socket, mac, index) = in_netns(netns, move || packet_socket(&owned))
            .map_err(sys(format!("opening a packet socket on {interface}")))?;
        let inner = Arc::new(Inner {
            socket,
            guest,
            stats: Mutex::new(PeerStats::default()),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        let receiver = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("net-peer-rx".into())
                .spawn(move || receive(&receiver))
                .map_err(sys("spawning the receiver"))?,
        );
        if requests_per_sec > 0 {
            let sender = Arc::clone(&inner);
            let period = Duration::from_secs_f64(1.0 / requests_per_sec as f64);
            threads.push(
                std::thread::Builder::new()
                    .name("net-peer-tx".into())
                    .spawn(move || request(&sender, mac, index, period))
                    .map_err(sys("spawning the sender"))?,
            );
        }
        Ok(Peer {
            inner,
            mac,
            threads,
        })
    }

    /// The peer's own MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What it has seen so far.
    pub fn stats(&self) -> PeerStats {
        self.inner.stats().clone()
    }

    /// Stops it; returns what it saw.
    pub fn stop(mut self) -> PeerStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn request(inner: &Inner, mac: [u8; 6], index: i32, period: Duration) {
    let mut next = Instant::now();
    let mut seq = 0u64;
    while !inner.stop.load(Ordering::Relaxed) {
        let frame = Frame {
            dst: inner.guest,
            src: mac,
            kind: KIND_ECHO_REQUEST,
            seq,
            extra: 0,
        }
        .to_bytes();
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&inner.guest);
        // SAFETY: buffer and address valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                inner.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent == frame.len() as isize {
            inner.stats().requests += 1;
            seq += 1;
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > period * 16 {
            // Descheduled for a while: go on at the rate, do not burst.
            next = now;
        }
    }
}

/// One more number `seq` of a sequence whose highest so far is `last` (`None`: none yet, and
/// `first` is the number expected first): counts it out of order if not above `last`, else
/// the numbers it skipped.
fn follow(last: &mut Option<u64>, reorders: &mut u64, missing: &mut u64, seq: u64, first: u64) {
    match *last {
        Some(at) if seq <= at => *reorders += 1,
        at => {
            *missing += seq - at.map_or(first, |at| at + 1);
            *last = Some(seq);
        }
    }
}

fn receive(inner: &Inner) {
    let mut buf = [0u8; 2048];
    while !inner.stop.load(Ordering::Relaxed) {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::recv(
                inner.socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if n < 14 {
            continue;
        }
        let bytes = &buf[..n as usize];
        if bytes[6..12] != inner.guest {
            continue;
        }
        let mut stats = inner.stats();
        if bytes[12..14] == ETH_P_RARP.to_be_bytes() {
            stats.announces += 1;
            continue;
        }
        let stats = &mut *stats;
        match Frame::parse(bytes) {
            Some(frame) if frame.kind == KIND_DATA => {
                stats.data += 1;
                // The guest numbered frames before the peer listened: count from the first.
                let first = frame.seq;
                follow(
                    &mut stats.last_data,
                    &mut stats.data_reorders,
                    &mut stats.data_missing,
                    frame.seq,
                    first,
                );
            }
            Some(frame) if frame.kind == KIND_ECHO_REPLY => {
                stats.replies += 1;
                // The peer's requests start at 0.
                follow(
                    &mut stats.last_reply,
                    &mut stats.reply_reorders,
                    &mut stats.replies_missing,
                    frame.seq,
                    0,
                );
            }
            _ => stats.other += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::follow;

    #[test]
    fn a_sequence_counts_skips_and_what_comes_out_of_order() {
        let (mut last, mut reorders, mut missing) = (None, 0, 0);
        for seq in [5, 6, 9, 8, 9, 10] {
            follow(&mut last, &mut reorders, &mut missing, seq, 5);
        }
        assert_eq!((last, reorders, missing), (Some(10), 2, 2));
        let (mut last, mut reorders, mut missing) = (None, 0, 0);
        follow(&mut last, &mut reorders, &mut missing, 3, 0);
        assert_eq!(
            (last, reorders, missing),
            (Some(3), 0, 3),
            "0, 1 and 2 never came"
        );
    }
}
