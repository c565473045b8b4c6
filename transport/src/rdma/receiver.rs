//! The destination side of an RDMA transfer: guest memory registered for remote write, one
//! queue pair per source worker accepted through librdmacm, and one light thread per queue
//! pair that sees only the round markers (the writes land without it) and acknowledges them.

use std::net::SocketAddr;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_access_flags, rdma_accept, rdma_bind_addr, rdma_cm_event_type, rdma_get_src_port,
    rdma_listen, rdma_reject,
};

use super::RdmaError;
use super::connection::{Connection, Depth, conn_param};
use super::message::{Hello, Message, Totals};
use super::table::{MemoryTable, RemoteRegion};
use super::verbs::{
    CmId, EventChannel, MemoryRegion, ProtectionDomain, check, event_name, sockaddr_of,
};
use crate::data::{ReceiveError, SessionId, Timeouts};
use crate::failure::FirstError;
use crate::memory::{MappedMemory, PAGE_SIZE};
use crate::stats::{FrameCounts, StatsHandle, TransferStats};

/// Where RDMA connections are accepted. Bind it to an address of the RDMA device's netdev
/// (not a wildcard: the device is found from the address), publish its
/// [`RdmaReceiver::table`], then the source connects.
#[derive(Debug)]
pub struct RdmaListener {
    // The id before the channel it lives on.
    id: CmId,
    channel: EventChannel,
    addr: SocketAddr,
}

impl RdmaListener {
    /// Listens on `addr` (port 0: any free port).
    pub fn bind(addr: SocketAddr) -> Result<Self, RdmaError> {
        if addr.ip().is_unspecified() {
            return Err(RdmaError::Setup {
                reason: format!(
                    "cannot listen for RDMA on the wildcard address {addr}: name an address of the RDMA device's network interface"
                ),
            });
        }
        let channel = EventChannel::new()?;
        let id = CmId::new(&channel)?;
        let mut sockaddr = sockaddr_of(addr);
        // SAFETY: the id is live; `sockaddr` is a valid socket address for the call.
        let rc = unsafe { rdma_bind_addr(id.raw(), ptr::from_mut(&mut sockaddr).cast()) };
        check(rc, "rdma_bind_addr").map_err(|e| match e {
            RdmaError::Verbs { source, .. } => RdmaError::Setup {
                reason: format!("cannot bind RDMA to {addr}: {source}"),
            },
            other => other,
        })?;
        if id.context().is_null() {
            return Err(RdmaError::Setup {
                reason: format!("no RDMA device serves {}", addr.ip()),
            });
        }
        // SAFETY: the id is live and bound.
        check(unsafe { rdma_listen(id.raw(), 16) }, "rdma_listen")?;
        // SAFETY: the id is live and bound.
        let port = u16::from_be(unsafe { rdma_get_src_port(id.raw()) });
        Ok(Self {
            id,
            channel,
            addr: SocketAddr::new(addr.ip(), port),
        })
    }

    /// The address the source connects to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// How the RDMA receiver runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaReceiverConfig {
    /// Transfer session; must match the sender's.
    pub session: SessionId,
    /// Queue pairs expected (the sender's worker count).
    pub streams: usize,
    /// Time limits: `connect` for all queue pairs to connect, `idle` for silence from the
    /// source (it sends keepalives), `stall` for a send to complete.
    pub timeouts: Timeouts,
    /// Whether the memory handed to [`RdmaReceiver::start`] is all zero (freshly mapped), so
    /// the source may skip never-sent zero pages. Say `false` for memory with content.
    pub zeroed: bool,
}

impl RdmaReceiverConfig {
    /// Defaults for `streams` queue pairs in `session`, into fresh (zero) memory.
    pub fn new(session: SessionId, streams: usize) -> Self {
        Self {
            session,
            streams,
            timeouts: Timeouts::default(),
            zeroed: true,
        }
    }
}

#[derive(Debug)]
struct Shared {
    failure: FirstError<RdmaError>,
    /// Streams whose `Finish` arrived.
    finished: AtomicUsize,
    /// Per stream: finished, so its disconnect is expected.
    done: Mutex<Vec<bool>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn fail(&self, error: RdmaError) {
        self.failure.set(error, "RDMA receive");
    }

    fn failure(&self) -> Option<Arc<RdmaError>> {
        self.failure.get()
    }

    fn failed(&self) -> bool {
        self.failure.is_set()
    }
}

/// Receives pages written by an [`RdmaSender`](super::RdmaSender): registers the sink's
/// memory, accepts the queue pairs and acknowledges every round.
#[derive(Debug)]
pub struct RdmaReceiver {
    table: MemoryTable,
    streams: usize,
    shared: Arc<Shared>,
    stats: StatsHandle,
    thread: Option<thread::JoinHandle<()>>,
}

/// What the receiving thread owns, in drop order: connections (queue pairs), then the
/// registrations, the protection domain, the listener, and the memory last.
struct Owned<K: ?Sized> {
    _regions: Vec<MemoryRegion>,
    pd: ProtectionDomain,
    listener: RdmaListener,
    _sink: Arc<K>,
}

impl RdmaReceiver {
    /// Registers every mapping of `sink` for remote write and starts accepting the source's
    /// queue pairs on `listener`. Returns at once with the [`MemoryTable`] to send.
    pub fn start<K: MappedMemory + ?Sized + 'static>(
        listener: RdmaListener,
        sink: Arc<K>,
        config: RdmaReceiverConfig,
    ) -> Result<Self, ReceiveError> {
        let rdma = |error| ReceiveError::Rdma(Arc::new(error));
        if config.streams == 0 || config.streams > usize::from(u16::MAX) {
            return Err(ReceiveError::Config {
                reason: format!("{} streams; need 1..=65535", config.streams),
            });
        }
        config
            .timeouts
            .validate()
            .map_err(|reason| ReceiveError::Config { reason })?;
        let pd = ProtectionDomain::new(listener.id.context()).map_err(rdma)?;
        let access =
            ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        let mut regions = Vec::new();
        let mut table = Vec::new();
        for mapping in sink.mappings() {
            let len = mapping.pages as usize * PAGE_SIZE;
            // SAFETY: MappedMemory promises the mapping stays valid while `sink` lives; the
            // receiving thread holds `sink` until after the registration is dropped. No
            // Rust reference points into it (MappedMemory's contract), so the NIC writing it
            // breaks no aliasing rule.
            let region = unsafe { pd.register(mapping.host_addr, len, access) }.map_err(rdma)?;
            table.push(RemoteRegion {
                guest_phys_addr: mapping.first_pfn * PAGE_SIZE as u64,
                len: len as u64,
                addr: mapping.host_addr as u64,
                rkey: region.rkey(),
            });
            regions.push(region);
        }
        let table = MemoryTable {
            listen: listener.local_addr(),
            regions: table,
            zeroed: config.zeroed,
        };
        let shared = Arc::new(Shared {
            failure: FirstError::default(),
            finished: AtomicUsize::new(0),
            done: Mutex::new(vec![false; config.streams]),
        });
        let stats = StatsHandle::new(config.streams, 0);
        let owned = Owned {
            _regions: regions,
            pd,
            listener,
            _sink: sink,
        };
        let thread = {
            let shared = Arc::clone(&shared);
            let stats = stats.clone();
            let config = config.clone();
            thread::Builder::new()
                .name("ferry-rdma-rx".into())
                .spawn(move || {
                    if let Err(error) = serve(&owned, &config, &shared, &stats) {
                        shared.fail(error);
                    }
                    drop(owned);
                })
                .map_err(|source| {
                    ReceiveError::Workers(crate::workers::WorkerError::Spawn {
                        name: "ferry-rdma-rx".into(),
                        source,
                    })
                })?
        };
        Ok(Self {
            table,
            streams: config.streams,
            shared,
            stats,
            thread: Some(thread),
        })
    }

    /// What the source needs to write into this memory: send it in the Prepared step.
    pub fn table(&self) -> &MemoryTable {
        &self.table
    }

    /// Statistics so far (from the source's running totals in each marker).
    pub fn stats(&self) -> TransferStats {
        self.stats.snapshot()
    }

    /// A handle for reading statistics from another thread.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Whether every queue pair has finished (or the transfer failed).
    pub fn is_finished(&self) -> bool {
        self.shared.failed() || self.shared.finished.load(Ordering::Acquire) >= self.streams
    }

    /// Fails the transfer: the source is told `reason` on every queue pair.
    pub fn abort(&self, reason: &str) {
        self.shared.fail(RdmaError::Aborted {
            reason: reason.into(),
        });
    }

    /// Waits until the source finished (every page is in memory) or the transfer failed.
    pub fn wait(mut self) -> Result<TransferStats, ReceiveError> {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        match self.shared.failure() {
            Some(error) => Err(ReceiveError::Rdma(error)),
            None => Ok(self.stats.snapshot()),
        }
    }
}

impl Drop for RdmaReceiver {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if !self.is_finished() {
                self.shared.fail(RdmaError::Aborted {
                    reason: "the receiver was dropped".into(),
                });
            }
            let _ = thread.join();
        }
    }
}

fn depth() -> Depth {
    // The destination posts no writes: only acknowledgements and an abandon.
    Depth {
        outstanding: 4,
        signal_every: 1,
    }
}

/// Accepts the queue pairs, then runs one thread per queue pair and watches for disconnects
/// until every stream finished or the transfer failed.
fn serve<K: ?Sized>(
    owned: &Owned<K>,
    config: &RdmaReceiverConfig,
    shared: &Arc<Shared>,
    stats: &StatsHandle,
) -> Result<(), RdmaError> {
    let channel = &owned.listener.channel;
    let peer = owned.listener.addr;
    let timeouts = config.timeouts;
    let deadline = Instant::now() + timeouts.connect;
    let mut pending: Vec<Option<Connection>> = (0..config.streams).map(|_| None).collect();
    let mut established = vec![false; config.streams];
    while established.iter().any(|e| !e) {
        if let Some(error) = shared.failure() {
            return Err(RdmaError::Aborted {
                reason: crate::report(&*error),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RdmaError::Timeout {
                waiting_for: format!(
                    "RDMA connection of every stream ({} of {} connected)",
                    established.iter().filter(|e| **e).count(),
                    config.streams
                ),
                peer,
                after: timeouts.connect,
            });
        }
        let Some(event) = channel.next(left.min(Duration::from_millis(200)))? else {
            continue;
        };
        let (kind, id, data) = (event.kind(), event.id(), event.private_data());
        drop(event);
        match kind {
            rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST => {
                let id = CmId::adopt(id);
                let verdict = Hello::decode(&data).and_then(|hello| {
                    if hello.session != config.session.0 {
                        Err(format!(
                            "connect request for transfer {:#x}, this one is {:#x}",
                            hello.session, config.session.0
                        ))
                    } else if usize::from(hello.streams) != config.streams {
                        Err(format!(
                            "the source runs {} streams, this receiver expects {}",
                            hello.streams, config.streams
                        ))
                    } else if usize::from(hello.stream) >= config.streams
                        || pending[usize::from(hello.stream)].is_some()
                    {
                        Err(format!(
                            "stream {} is out of range or already connected",
                            hello.stream
                        ))
                    } else {
                        Ok(usize::from(hello.stream))
                    }
                });
                match verdict {
                    Ok(stream) => {
                        let connection =
                            Connection::new(stream, id, &owned.pd, depth(), shared.failure.flag())?;
                        let mut param = conn_param(&[]);
                        // SAFETY: the id is a live connect request with its queue pair
                        // created; `param` is valid for the call.
                        let rc = unsafe { rdma_accept(connection.id().raw(), &mut param) };
                        check(rc, "rdma_accept")?;
                        pending[stream] = Some(connection);
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "rejecting an RDMA connection");
                        let text = reason.as_bytes();
                        // SAFETY: the id is a live connect request; the reason bytes are
                        // valid for the call (librdmacm copies them).
                        unsafe {
                            rdma_reject(id.raw(), text.as_ptr().cast(), text.len().min(140) as u8)
                        };
                    }
                }
            }
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED => {
                if let Some(stream) = pending
                    .iter()
                    .position(|c| c.as_ref().is_some_and(|c| c.id().raw() == id))
                {
                    established[stream] = true;
                }
            }
            other => {
                if let Some(stream) = pending
                    .iter()
                    .position(|c| c.as_ref().is_some_and(|c| c.id().raw() == id))
                {
                    return Err(RdmaError::Disconnected {
                        stream,
                        event: event_name(other),
                    });
                }
            }
        }
    }
    let ids: Vec<usize> = pending
        .iter()
        .map(|c| c.as_ref().map_or(0, |c| c.id().raw() as usize))
        .collect();
    let mut threads = Vec::with_capacity(config.streams);
    for connection in pending.into_iter().flatten() {
        let for_thread = Arc::clone(shared);
        let stats = stats.clone();
        let spawned = thread::Builder::new()
            .name(format!("ferry-rdma-rx-{}", connection.stream))
            .spawn(move || acknowledge(connection, &for_thread, &stats, timeouts));
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(source) => {
                shared.fail(RdmaError::Verbs {
                    call: "spawn",
                    source,
                });
                break;
            }
        }
    }
    // Watch the connection events until done.
    loop {
        if shared.failed() || shared.finished.load(Ordering::Acquire) >= config.streams {
            break;
        }
        let Some(event) = channel.next(Duration::from_millis(200))? else {
            continue;
        };
        let (kind, id) = (event.kind(), event.id() as usize);
        drop(event);
        if matches!(
            kind,
            rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED
                | rdma_cm_event_type::RDMA_CM_EVENT_DEVICE_REMOVAL
        ) && let Some(stream) = ids.iter().position(|&i| i == id)
            && !lock(&shared.done)[stream]
        {
            // Give the stream's thread a moment to take an Abandon that arrived before the
            // disconnect, so the source's reason wins over "disconnected".
            thread::sleep(Duration::from_millis(100));
            if !lock(&shared.done)[stream] {
                shared.fail(RdmaError::Disconnected {
                    stream,
                    event: event_name(kind),
                });
            }
        }
    }
    for handle in threads {
        let _ = handle.join();
    }
    Ok(())
}

/// One queue pair: count each marker's totals, acknowledge it; stop at `Finish`.
fn acknowledge(
    mut connection: Connection,
    shared: &Shared,
    stats: &StatsHandle,
    timeouts: Timeouts,
) {
    let stream = connection.stream;
    let mut last = Totals::default();
    loop {
        if let Some(error) = shared.failure() {
            if !matches!(
                *error,
                RdmaError::Completion { .. }
                    | RdmaError::Disconnected { .. }
                    | RdmaError::Abandoned { .. }
            ) {
                let reason = crate::report(&*error);
                if connection.send(&Message::Abandon { reason }).is_ok() {
                    let _ = connection.drain_final(Duration::from_secs(1));
                }
            }
            return;
        }
        let message = match connection.next_message(Duration::from_millis(200), "source") {
            Ok(Some(message)) => message,
            Ok(None) => {
                if connection.last_heard.elapsed() >= timeouts.idle {
                    shared.fail(RdmaError::Idle {
                        stream,
                        waiting_for: "a marker or keepalive from the source",
                        after: timeouts.idle,
                    });
                }
                continue;
            }
            Err(error) => {
                shared.fail(error);
                continue;
            }
        };
        let (ticket, totals, finish) = match message {
            Message::Round { ticket, totals } => (ticket, totals, false),
            Message::Finish { ticket, totals } => (ticket, totals, true),
            Message::Keepalive => continue,
            other => {
                shared.fail(RdmaError::Protocol {
                    stream,
                    reason: format!("unexpected {other:?} from the source"),
                });
                continue;
            }
        };
        let counters = stats.stream(stream);
        let written = totals.pages_written.saturating_sub(last.pages_written);
        counters.add_frame(&FrameCounts {
            guest_bytes: written * PAGE_SIZE as u64,
            wire_bytes: written * PAGE_SIZE as u64,
            pages_raw: written,
            pages_compressed: 0,
            pages_zero: 0,
        });
        counters.add_zero_skipped(totals.pages_skipped.saturating_sub(last.pages_skipped));
        last = totals;
        if finish {
            lock(&shared.done)[stream] = true;
        }
        let acked = connection
            .send(&Message::Ack { ticket })
            .and_then(|()| connection.drain(timeouts.stall));
        if let Err(error) = acked {
            shared.fail(error);
            continue;
        }
        if finish {
            shared.finished.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
}
