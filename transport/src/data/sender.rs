//! The sending side of a data transfer: copy workers, one stream each, fed from one shared
//! bounded queue, plus one light thread per stream reading the receiver's acknowledgements.
//!
//! A shared queue lets whichever worker is free take the next frame, so a slow stream does
//! not hold the others up; and since every frame carries at most `pages_per_frame` pages,
//! whether from one run or from many, frames cost about the same and the workers stay
//! balanced. A barrier puts one token per worker into the queue behind everything sent so
//! far; a worker that takes a token sends its `Flush` frame and then waits until every token
//! has been taken, so no worker can take two.

use std::net::{Shutdown, SocketAddr, TcpStream};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, bounded};

use super::batch::{BatchEncoder, MAX_PAGES_PER_FRAME};
use super::gate::{self, SwitchOverGate};
use super::pace::{MIN_BANDWIDTH, Pacer, SharedCap};
use super::policy::{CompressionPolicy, Decider};
use super::stream::{self, FrameReader, StreamError};
use super::{SessionId, Timeouts};
use crate::memory::{MemoryError, PAGE_SIZE, PageRange, PageSource};
use crate::stats::{StatsHandle, TransferStats, thread_cpu_time};
use crate::tls::HostTls;
use crate::tls::socket::DataSocket;
use crate::wire::{self, ChannelKind, MessageType};
use crate::workers::{PinnedThread, WorkerError, WorkerPlacement, spawn_pinned};

/// How the sender runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// Transfer session; must match the receiver's.
    pub session: SessionId,
    /// Copy workers (one stream each) and their CPUs.
    pub workers: WorkerPlacement,
    /// When to compress non-zero pages. `Adaptive` measures which mode moves data faster
    /// from this worker's point of view; it cannot see a receiver on the same host competing
    /// for the CPUs it spends on compression, so for same-host transfers (network namespaces,
    /// say) prefer `None`. Over loopback addresses `Adaptive` means `None`.
    pub compression: CompressionPolicy,
    /// Pages per frame, `1..=MAX_PAGES_PER_FRAME`, counted over all the runs a frame
    /// carries. Larger frames mean fewer system calls on both sides (the receiver writes a
    /// run of pages with one call); smaller ones keep a frame in the worker's cache between
    /// copy, checksum and send. The default, 128 pages (512 KiB), used the least CPU per GiB
    /// in the transport benchmark here.
    pub pages_per_frame: u32,
    /// Frames queued per worker before [`DataSender::send`] blocks (back-pressure): the
    /// shared queue holds `queue_depth * workers` frames.
    pub queue_depth: usize,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Cap on the bytes all streams together put on the wire per second (`None`: no cap).
    pub max_bandwidth: Option<u64>,
    /// A cap this sender shares with others (see [`SharedCap`]); kept as well as
    /// `max_bandwidth`, so the sender goes at the lower of the two.
    pub shared_cap: Option<SharedCap>,
    /// The gate this host's senders share: while another sender holds it for its
    /// switch-over, each frame waits (bounded) before it goes.
    pub gate: Option<GateRef>,
    /// Page ranges counted on their own as well (each disk of a storage migration, say):
    /// [`TransferStats::accounts`] has one entry per range. No frame mixes pages of two
    /// accounts, or of an account and outside any, so the figures are exact. At most
    /// [`MAX_ACCOUNTS`], not overlapping.
    pub accounts: Vec<PageRange>,
    /// Encrypt every stream with mutual TLS as this host, to the host named (whose
    /// certificate the receiver must show); `None`: plain TCP.
    pub tls: Option<(HostTls, String)>,
}

/// A [`SwitchOverGate`] in a [`SenderConfig`]; equal only to itself.
#[derive(Clone, Debug)]
pub struct GateRef(pub Arc<SwitchOverGate>);

impl PartialEq for GateRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for GateRef {}

/// Most accounts a sender keeps.
pub const MAX_ACCOUNTS: usize = 64;

impl SenderConfig {
    /// Defaults for `workers` streams in `session`.
    pub fn new(session: SessionId, workers: WorkerPlacement) -> Self {
        Self {
            session,
            workers,
            compression: CompressionPolicy::default(),
            pages_per_frame: 128,
            queue_depth: 4,
            timeouts: Timeouts::default(),
            max_bandwidth: None,
            shared_cap: None,
            gate: None,
            accounts: Vec::new(),
            tls: None,
        }
    }

    fn validate(&self) -> Result<(), SendError> {
        let config = |reason: String| Err(SendError::Config { reason });
        if self.pages_per_frame == 0 || self.pages_per_frame > MAX_PAGES_PER_FRAME {
            return config(format!(
                "pages_per_frame {} is outside 1..={MAX_PAGES_PER_FRAME}",
                self.pages_per_frame
            ));
        }
        if self.queue_depth == 0 {
            return config("queue_depth is zero".into());
        }
        if let Some(rate) = self.max_bandwidth
            && rate < MIN_BANDWIDTH
        {
            return config(format!(
                "max_bandwidth {rate} B/s is below the smallest cap, {MIN_BANDWIDTH} B/s"
            ));
        }
        if self.accounts.len() > MAX_ACCOUNTS {
            return config(format!(
                "{} accounts; at most {MAX_ACCOUNTS}",
                self.accounts.len()
            ));
        }
        for (i, a) in self.accounts.iter().enumerate() {
            let Some(end) = a.end_pfn().filter(|_| a.count > 0) else {
                return config(format!(
                    "account {i} ({:#x}+{}) is empty or overflows",
                    a.first_pfn, a.count
                ));
            };
            if let Some(j) = self.accounts[..i]
                .iter()
                .position(|b| a.first_pfn < b.first_pfn + b.count && b.first_pfn < end)
            {
                return config(format!("accounts {j} and {i} overlap"));
            }
        }
        self.timeouts.validate().or_else(config)?;
        self.workers.validate().map_err(SendError::Workers)
    }
}

/// A send-side failure.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The configuration cannot work.
    #[error("invalid data sender configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// No destination address.
    #[error("no destination address to connect the data streams to")]
    NoAddress,
    /// Copy workers could not be started.
    #[error("cannot start the copy workers")]
    Workers(#[source] WorkerError),
    /// A range handed to `send` is not in the source memory.
    #[error("cannot send pages {:#x}+{}: not in the source memory", .range.first_pfn, .range.count)]
    Range {
        /// The range.
        range: PageRange,
        /// The memory error.
        #[source]
        source: MemoryError,
    },
    /// A stream failed, which fails the whole transfer.
    #[error("data transfer failed")]
    Transfer(#[source] Arc<StreamError>),
    /// The RDMA data path failed, which fails the whole transfer.
    #[error("RDMA data transfer failed")]
    Rdma(#[source] Arc<crate::rdma::RdmaError>),
    /// No worker took work and no acknowledgement arrived for too long.
    #[error("no progress for {after:?} while {waiting_for}; the receiver or the link is stuck")]
    NoProgress {
        /// What was being waited for.
        waiting_for: &'static str,
        /// How long.
        after: Duration,
    },
}

enum Job {
    /// One frame's runs: ascending, with gaps between them, at most `pages_per_frame` pages.
    Pages {
        runs: Vec<PageRange>,
        /// The account all of them are in, if any.
        account: Option<usize>,
    },
    Flush {
        ticket: u64,
    },
    Finish {
        ticket: u64,
    },
}

/// State shared by the caller, the workers and the acknowledgement readers.
#[derive(Debug)]
struct Shared {
    failed: AtomicBool,
    failure: Mutex<Option<Arc<StreamError>>>,
    /// Highest ticket acknowledged per stream.
    acked: Mutex<Vec<u64>>,
    changed: Condvar,
    /// Ticket of the `Finish` barrier once finishing started; after its acknowledgement a
    /// closed connection is the normal end.
    finish_ticket: AtomicU64,
    /// Bumped whenever anything moves, so waits can tell slow from stuck.
    progress: AtomicU64,
    /// Workers waiting at the current flush barrier: (ticket, how many have arrived).
    barrier: Mutex<(u64, usize)>,
    barrier_changed: Condvar,
    /// Clones of every stream socket, to unblock all threads at once on failure.
    sockets: Vec<DataSocket>,
    /// The writing side of every stream. Workers hold the lock while writing a frame, so
    /// that an `Abandon` sent on failure never lands in the middle of one.
    writers: Vec<Mutex<DataSocket>>,
    version: u16,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking worker cannot leave these plain values inconsistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn fail(&self, error: StreamError) {
        let reason = crate::report(&error);
        {
            let mut failure = lock(&self.failure);
            if failure.is_some() {
                return;
            }
            tracing::warn!(error = %reason, "data transfer failed");
            *failure = Some(Arc::new(error));
            self.failed.store(true, Ordering::Release);
        }
        for (writer, socket) in self.writers.iter().zip(&self.sockets) {
            // A worker holding the lock is mid-frame, possibly blocked on a stalled peer: skip
            // the courtesy rather than wait; the shutdown below tells the peer anyway.
            if let Ok(mut writer) = writer.try_lock() {
                stream::send_abandon(&mut writer, self.version, &reason);
            }
            // Write side only: a FIN after the Abandon lets the receiver read the reason, where
            // closing both sides could reset the connection and lose it.
            let _ = socket.shutdown(Shutdown::Write);
        }
        let _acked = lock(&self.acked);
        self.changed.notify_all();
    }

    fn failure(&self) -> Option<Arc<StreamError>> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.failure).clone()
    }

    fn acknowledge(&self, stream: usize, ticket: u64) {
        let mut acked = lock(&self.acked);
        acked[stream] = acked[stream].max(ticket);
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
    }
}

/// Sends guest pages over parallel streams to a [`DataReceiver`](super::DataReceiver).
///
/// Blocking: call it from a plain thread (or `spawn_blocking` in async code).
#[derive(Debug)]
pub struct DataSender<S: PageSource + ?Sized + 'static> {
    source: Arc<S>,
    config: SenderConfig,
    version: u16,
    jobs: Option<Sender<Job>>,
    workers: Vec<PinnedThread<()>>,
    readers: Vec<thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    stats: StatsHandle,
    streams: usize,
    ticket: u64,
    done: bool,
}

impl<S: PageSource + ?Sized + 'static> DataSender<S> {
    /// Opens `config.workers.count` streams (stream `i` to `addrs[i % addrs.len()]`), greets
    /// the receiver on each and starts the workers.
    pub fn connect(
        addrs: &[SocketAddr],
        source: Arc<S>,
        config: SenderConfig,
    ) -> Result<Self, SendError> {
        config.validate()?;
        if addrs.is_empty() {
            return Err(SendError::NoAddress);
        }
        let streams = config.workers.count;
        let timeouts = config.timeouts;
        let transfer = |error| SendError::Transfer(Arc::new(error));
        let mut connections = Vec::with_capacity(streams);
        let mut version = wire::HANDSHAKE_VERSION;
        for index in 0..streams {
            let addr = addrs[index % addrs.len()];
            let tcp = TcpStream::connect_timeout(&addr, timeouts.connect).map_err(|source| {
                transfer(StreamError::Connect {
                    stream: index,
                    addr,
                    source,
                })
            })?;
            let configure = |source| {
                transfer(StreamError::Configure {
                    stream: index,
                    source,
                })
            };
            stream::configure_socket(&tcp, &timeouts).map_err(configure)?;
            let mut socket = match &config.tls {
                None => DataSocket::plain(tcp),
                Some((identity, peer)) => {
                    DataSocket::connect_tls(tcp, identity, peer, timeouts.connect)
                        .map_err(|reason| {
                            transfer(StreamError::Tls {
                                stream: index,
                                reason,
                            })
                        })?
                        .0
                }
            };
            let mut reader = FrameReader::new(
                socket.try_clone().map_err(configure)?,
                index,
                ACK_FRAME_LIMIT,
            );
            let channel = ChannelKind::Data {
                session: config.session.0,
                stream: index as u16,
                streams: streams as u16,
            };
            version = stream::greet(&mut socket, &mut reader, channel, index, &timeouts)
                .map_err(transfer)?;
            connections.push((socket, reader));
        }

        let clone_all = || {
            connections
                .iter()
                .map(|(socket, _): &(DataSocket, FrameReader)| socket.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| transfer(StreamError::Configure { stream: 0, source }))
        };
        let sockets = clone_all()?;
        let writers = clone_all()?.into_iter().map(Mutex::new).collect();
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            acked: Mutex::new(vec![0; streams]),
            changed: Condvar::new(),
            finish_ticket: AtomicU64::new(u64::MAX),
            progress: AtomicU64::new(0),
            barrier: Mutex::new((0, 0)),
            barrier_changed: Condvar::new(),
            sockets,
            writers,
            version,
        });
        let stats = StatsHandle::new(streams, config.accounts.len());
        let policy = effective_policy(config.compression, addrs);
        let pacers: Vec<Arc<Pacer>> = config
            .max_bandwidth
            .map(|rate| Arc::new(Pacer::new(rate)))
            .into_iter()
            .chain(config.shared_cap.as_ref().map(SharedCap::pacer))
            .collect();
        let (queue, jobs) = bounded(config.queue_depth * streams);
        let mut sender = Self {
            source,
            config,
            version,
            jobs: Some(queue),
            workers: Vec::with_capacity(streams),
            readers: Vec::with_capacity(streams),
            shared,
            stats,
            streams,
            ticket: 0,
            done: false,
        };
        for (index, (_socket, reader)) in connections.into_iter().enumerate() {
            let worker = Worker {
                stream: index,
                streams,
                jobs: jobs.clone(),
                source: Arc::clone(&sender.source),
                shared: Arc::clone(&sender.shared),
                stats: sender.stats.clone(),
                encoder: BatchEncoder::new(sender.config.pages_per_frame, version),
                decider: Decider::new(policy),
                pacers: pacers.clone(),
                gate: sender
                    .config
                    .gate
                    .clone()
                    .map(|g| (g.0, sender.config.session)),
                timeouts,
                version,
            };
            let cpu = sender.config.workers.cpu_for(index);
            sender.workers.push(
                spawn_pinned(format!("ferry-tx-{index}"), cpu, move || worker.run())
                    .map_err(SendError::Workers)?,
            );
            let shared = Arc::clone(&sender.shared);
            let reader_thread = thread::Builder::new()
                .name(format!("ferry-tx-ack-{index}"))
                .spawn(move || read_acks(index, reader, &shared, timeouts))
                .map_err(|source| {
                    SendError::Workers(WorkerError::Spawn {
                        name: format!("ferry-tx-ack-{index}"),
                        source,
                    })
                })?;
            sender.readers.push(reader_thread);
        }
        Ok(sender)
    }

    /// Protocol version agreed with the receiver.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Number of streams.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Statistics so far.
    pub fn stats(&self) -> TransferStats {
        self.stats.snapshot()
    }

    /// A handle for reading statistics from another thread while this one sends.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Queues `ranges` for sending and returns once all of it is queued; blocks while the
    /// workers' queues are full. Returning is no promise of delivery: that is what
    /// [`DataSender::flush`] is for. Every range is checked against the source first, so a
    /// bad range fails before anything of this call is sent.
    ///
    /// Consecutive ranges share frames: short ranges are packed into frames of up to
    /// [`SenderConfig::pages_per_frame`] pages, so many small ranges (a fragmented dirty set)
    /// cost about as many frames as one range of the same size. Ranges in ascending order
    /// pack best; one that starts before the previous one ends starts a new frame.
    pub fn send(&mut self, ranges: &[PageRange]) -> Result<(), SendError> {
        self.check_alive()?;
        for &range in ranges {
            self.source
                .check_range(range)
                .map_err(|source| SendError::Range { range, source })?;
        }
        let per_frame = u64::from(self.config.pages_per_frame);
        if self.config.accounts.is_empty() {
            return pack_frames(ranges, per_frame, |runs| {
                self.dispatch(Job::Pages {
                    runs,
                    account: None,
                })
            });
        }
        for (account, group) in by_account(ranges, &self.config.accounts) {
            pack_frames(&group, per_frame, |runs| {
                self.dispatch(Job::Pages { runs, account })
            })?;
        }
        Ok(())
    }

    /// Returns once every page sent so far has been written into the receiver's memory, as
    /// the receiver acknowledged on every stream, or fails.
    pub fn flush(&mut self) -> Result<(), SendError> {
        self.check_alive()?;
        self.ticket += 1;
        let ticket = self.ticket;
        self.barrier(ticket, |ticket| Job::Flush { ticket })
    }

    /// Tells the receiver the transfer is complete, behind everything sent so far, waits for
    /// its acknowledgement on every stream (so, like [`DataSender::flush`], every page has
    /// landed) and stops the workers. Returns the final statistics.
    pub fn finish(mut self) -> Result<TransferStats, SendError> {
        self.check_alive()?;
        self.ticket += 1;
        let ticket = self.ticket;
        self.shared.finish_ticket.store(ticket, Ordering::Release);
        let result = self.barrier(ticket, |ticket| Job::Finish { ticket });
        self.done = result.is_ok();
        self.shutdown();
        result.map(|()| self.stats.snapshot())
    }

    /// Gives up: every stream gets an `Abandon` carrying `reason` (where no frame is half
    /// written) and is closed, so the receiver fails too.
    pub fn abort(mut self, reason: &str) -> TransferStats {
        self.shared.fail(StreamError::Aborted {
            reason: reason.into(),
        });
        self.shutdown();
        self.stats.snapshot()
    }

    fn check_alive(&self) -> Result<(), SendError> {
        match self.shared.failure() {
            Some(error) => Err(SendError::Transfer(error)),
            None => Ok(()),
        }
    }

    fn barrier(&mut self, ticket: u64, job: impl Fn(u64) -> Job) -> Result<(), SendError> {
        for _ in 0..self.streams {
            self.dispatch(job(ticket))?;
        }
        self.wait_for_acks(ticket)
    }

    /// Time without any progress after which a wait gives up even though no stream reported
    /// an error; the streams' own timeouts normally fire first.
    fn backstop(&self) -> Duration {
        self.config.timeouts.stall + self.config.timeouts.idle
    }

    fn stalled(&self, waiting_for: &'static str) -> SendError {
        match self.shared.failure() {
            Some(error) => SendError::Transfer(error),
            None => SendError::NoProgress {
                waiting_for,
                after: self.backstop(),
            },
        }
    }

    fn wait_for_acks(&self, ticket: u64) -> Result<(), SendError> {
        let tick = self.config.timeouts.keepalive_interval;
        let mut seen = self.shared.progress.load(Ordering::Relaxed);
        let mut since = Instant::now();
        let mut acked = lock(&self.shared.acked);
        loop {
            if let Some(error) = self.shared.failure() {
                return Err(SendError::Transfer(error));
            }
            if acked.iter().all(|&a| a >= ticket) {
                return Ok(());
            }
            acked = self
                .shared
                .changed
                .wait_timeout(acked, tick)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            let now = self.shared.progress.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() > self.backstop() {
                drop(acked);
                return Err(self.stalled("waiting for the receiver's acknowledgement"));
            }
        }
    }

    /// Queues a job, blocking while the queue is full (back-pressure from the workers,
    /// which block on their sockets when the receiver falls behind).
    fn dispatch(&mut self, job: Job) -> Result<(), SendError> {
        let Some(jobs) = &self.jobs else {
            return Err(self.stalled("queueing pages"));
        };
        let mut job = job;
        let mut seen = self.shared.progress.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            match jobs.send_timeout(job, self.config.timeouts.keepalive_interval) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => {
                    return Err(self.stalled("queueing pages"));
                }
                Err(SendTimeoutError::Timeout(back)) => job = back,
            }
            self.check_alive()?;
            let now = self.shared.progress.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() > self.backstop() {
                return Err(self.stalled("queueing pages"));
            }
        }
    }

    /// Stops every thread; on a transfer that did not finish, closes the streams first.
    fn shutdown(&mut self) {
        if !self.done {
            self.shared.fail(StreamError::Aborted {
                reason: "the sender was stopped before finishing".into(),
            });
        }
        self.jobs = None;
        self.shared.barrier_changed.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl<S: PageSource + ?Sized + 'static> Drop for DataSender<S> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `ranges` cut where an account begins or ends, as runs of consecutive pieces that lie in
/// one account (or in none), in order.
fn by_account(
    ranges: &[PageRange],
    accounts: &[PageRange],
) -> Vec<(Option<usize>, Vec<PageRange>)> {
    // The account `pfn` is in, and where the piece from `pfn` must end: that account's end,
    // or the start of the next account above it.
    let locate = |pfn: u64| {
        let mut next = u64::MAX;
        for (i, a) in accounts.iter().enumerate() {
            let end = a.first_pfn.saturating_add(a.count);
            if (a.first_pfn..end).contains(&pfn) {
                return (Some(i), end);
            }
            if a.first_pfn > pfn {
                next = next.min(a.first_pfn);
            }
        }
        (None, next)
    };
    let mut groups: Vec<(Option<usize>, Vec<PageRange>)> = Vec::new();
    for range in ranges {
        let mut pfn = range.first_pfn;
        let end = range.end_pfn().unwrap_or(u64::MAX);
        while pfn < end {
            let (account, limit) = locate(pfn);
            let piece = PageRange::new(pfn, end.min(limit) - pfn);
            match groups.last_mut() {
                Some((last, pieces)) if *last == account => pieces.push(piece),
                _ => groups.push((account, vec![piece])),
            }
            pfn += piece.count;
        }
    }
    groups
}

/// Cuts `ranges` into frames of at most `per_frame` pages, in order, and hands each frame's
/// runs to `emit`. Frames fill across range boundaries, so short ranges share a frame instead
/// of paying a frame each, while long ranges still cut into full frames. A range that
/// continues the previous run extends it; one that starts before the previous run ends
/// (overlapping, repeated or out of order) starts a new frame, because a frame's runs must
/// ascend with gaps between them.
fn pack_frames<E>(
    ranges: &[PageRange],
    per_frame: u64,
    mut emit: impl FnMut(Vec<PageRange>) -> Result<(), E>,
) -> Result<(), E> {
    let mut runs: Vec<PageRange> = Vec::new();
    let mut pages = 0u64;
    for (index, range) in ranges.iter().enumerate() {
        let mut pfn = range.first_pfn;
        // The caller checked the ranges against the source, so the end fits; saturate
        // rather than trust that blindly.
        let end = range.end_pfn().unwrap_or(u64::MAX);
        while pfn < end {
            let take = (end - pfn).min(per_frame - pages);
            match runs.last_mut() {
                Some(last) if last.first_pfn + last.count == pfn => last.count += take,
                Some(last) if last.first_pfn + last.count > pfn => {
                    emit(std::mem::take(&mut runs))?;
                    pages = 0;
                    continue;
                }
                _ => {
                    if runs.capacity() == 0 {
                        // Each range left adds at most one run to this frame: enough room
                        // up front, and one allocation per frame.
                        runs.reserve_exact((ranges.len() - index).min(per_frame as usize));
                    }
                    runs.push(PageRange::new(pfn, take));
                }
            }
            pages += take;
            pfn += take;
            if pages == per_frame {
                emit(std::mem::take(&mut runs))?;
                pages = 0;
            }
        }
    }
    if !runs.is_empty() {
        emit(runs)?;
    }
    Ok(())
}

/// The policy a worker applies. Over loopback the "link" is a memory copy at several GB/s,
/// which lz4 (well under 1 GB/s per core) can never beat, and the receiver competes for the
/// same CPUs, so adaptive compression there only costs: the transport benchmark measured it
/// slower than no compression in every loopback configuration.
fn effective_policy(policy: CompressionPolicy, addrs: &[SocketAddr]) -> CompressionPolicy {
    if policy == CompressionPolicy::Adaptive && addrs.iter().all(|addr| addr.ip().is_loopback()) {
        CompressionPolicy::None
    } else {
        policy
    }
}

/// Largest frame the receiver sends back (acknowledgements, keepalives, abandon reasons).
const ACK_FRAME_LIMIT: u32 = 4096;

struct Worker<S: PageSource + ?Sized> {
    stream: usize,
    streams: usize,
    jobs: Receiver<Job>,
    source: Arc<S>,
    shared: Arc<Shared>,
    stats: StatsHandle,
    encoder: BatchEncoder,
    decider: Decider,
    /// The bandwidth caps: the sender's own, shared by every worker of the sender, and a
    /// cap shared with other senders; a frame waits for each.
    pacers: Vec<Arc<Pacer>>,
    /// The host's switch-over gate, and this sender's session (which passes it).
    gate: Option<(Arc<SwitchOverGate>, SessionId)>,
    timeouts: Timeouts,
    version: u16,
}

impl<S: PageSource + ?Sized> Worker<S> {
    fn run(mut self) {
        let mut seq = 0u64;
        loop {
            let job = match self.jobs.recv_timeout(self.timeouts.keepalive_interval) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.failed.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(error) = self.message(MessageType::Keepalive, &[]) {
                        self.shared.fail(error);
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if self.shared.failed.load(Ordering::Acquire) {
                return;
            }
            let started = Instant::now();
            let (result, last) = match job {
                Job::Pages { ref runs, account } => (self.pages(seq, runs, account), false),
                Job::Flush { ticket } => (self.flush(ticket), false),
                Job::Finish { ticket } => (
                    self.message(MessageType::Finish, &wire::encode_ticket(ticket)),
                    true,
                ),
            };
            seq += u64::from(matches!(job, Job::Pages { .. }));
            let counters = self.stats.stream(self.stream);
            counters.add_busy(started.elapsed());
            counters.set_cpu_time(thread_cpu_time());
            self.shared.progress.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = result {
                self.shared.fail(error);
                return;
            }
            if last {
                return;
            }
        }
    }

    fn pages(
        &mut self,
        seq: u64,
        runs: &[PageRange],
        account: Option<usize>,
    ) -> Result<(), StreamError> {
        let stream = self.stream;
        if let Some((gate, session)) = &self.gate {
            gate.wait_turn(*session, gate::MAX_WAIT);
        }
        let started = Instant::now();
        let compress = self.decider.compress_next();
        let (frame, report) = self
            .encoder
            .encode(&*self.source, seq, runs, compress)
            .map_err(|source| StreamError::ReadMemory { stream, source })?;
        // After encoding, so the caps count what goes on the wire (compressed or not); the
        // pages were read after the round's dirty-log fetch either way.
        for pacer in &self.pacers {
            pacer.admit(frame.len());
        }
        {
            let mut socket = lock(&self.shared.writers[stream]);
            stream::write_frame(
                &mut socket,
                frame,
                stream,
                MessageType::Pages,
                &self.timeouts,
            )?;
        }
        let data_pages = report.counts.pages_raw + report.counts.pages_compressed;
        self.decider
            .observe_frame(data_pages * PAGE_SIZE as u64, started.elapsed());
        self.stats.stream(stream).add_frame(&report.counts);
        if let Some(counters) = self.stats.account(account) {
            counters.add_frame(&report.counts);
            counters.add_busy(started.elapsed());
        }
        Ok(())
    }

    /// Sends this stream's `Flush`, then waits until every worker has taken its token of the
    /// same barrier, so that no worker takes two. Keeps the stream alive while waiting.
    fn flush(&mut self, ticket: u64) -> Result<(), StreamError> {
        self.message(MessageType::Flush, &wire::encode_ticket(ticket))?;
        let shared = Arc::clone(&self.shared);
        let tick = self.timeouts.keepalive_interval;
        let mut barrier = lock(&shared.barrier);
        if barrier.0 != ticket {
            *barrier = (ticket, 0);
        }
        barrier.1 += 1;
        if barrier.1 >= self.streams {
            shared.barrier_changed.notify_all();
            return Ok(());
        }
        let mut last_sent = Instant::now();
        while barrier.0 == ticket && barrier.1 < self.streams {
            if shared.failed.load(Ordering::Acquire) {
                return Ok(()); // the worker loop sees the failure and stops
            }
            barrier = shared
                .barrier_changed
                .wait_timeout(barrier, tick)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if last_sent.elapsed() >= tick {
                drop(barrier);
                self.message(MessageType::Keepalive, &[])?;
                last_sent = Instant::now();
                barrier = lock(&shared.barrier);
            }
        }
        Ok(())
    }

    fn message(&mut self, kind: MessageType, payload: &[u8]) -> Result<(), StreamError> {
        stream::send_message(
            &mut lock(&self.shared.writers[self.stream]),
            self.version,
            kind,
            payload,
            self.stream,
            &self.timeouts,
        )
    }
}

/// Reads what the receiver sends back on one stream until the transfer ends or fails.
fn read_acks(stream: usize, mut reader: FrameReader, shared: &Shared, timeouts: Timeouts) {
    if let Some(error) = follow_acks(stream, &mut reader, shared, timeouts) {
        shared.fail(error);
    }
    if shared.failed.load(Ordering::Acquire) {
        // Closing a socket with unread data resets the connection, and a reset can destroy
        // the Abandon frame still on its way to the receiver. Reading until the receiver
        // closes (briefly) lets the reason arrive.
        reader.drain(DRAIN_LIMIT);
    }
}

/// How long a failing sender keeps reading so its `Abandon` is not lost to a reset.
const DRAIN_LIMIT: Duration = Duration::from_millis(300);

fn follow_acks(
    stream: usize,
    reader: &mut FrameReader,
    shared: &Shared,
    timeouts: Timeouts,
) -> Option<StreamError> {
    loop {
        if shared.failed.load(Ordering::Acquire) {
            return None;
        }
        match reader.poll() {
            Ok(Some(header)) => match header.kind {
                MessageType::Ack => match wire::decode_ticket(header.kind, reader.payload()) {
                    Ok(ticket) => {
                        shared.acknowledge(stream, ticket);
                        if ticket >= shared.finish_ticket.load(Ordering::Acquire) {
                            return None;
                        }
                    }
                    Err(source) => return Some(StreamError::Payload { stream, source }),
                },
                MessageType::Keepalive => {}
                MessageType::Abandon => {
                    let reason = wire::decode_reason(reader.payload());
                    return Some(StreamError::PeerAbandoned { stream, reason });
                }
                kind => {
                    let context = "from a data receiver";
                    return Some(StreamError::Unexpected {
                        stream,
                        kind,
                        context,
                    });
                }
            },
            Ok(None) if reader.idle_for() > timeouts.idle => {
                return Some(StreamError::Idle {
                    stream,
                    after: timeouts.idle,
                });
            }
            Ok(None) => {}
            Err(error) => return Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames `pack_frames` makes of `ranges`, as (first_pfn, count) runs.
    fn packed(ranges: &[(u64, u64)], per_frame: u64) -> Vec<Vec<(u64, u64)>> {
        let ranges: Vec<PageRange> = ranges.iter().copied().map(PageRange::from).collect();
        let mut frames = Vec::new();
        pack_frames::<()>(&ranges, per_frame, |runs| {
            frames.push(runs.iter().map(|r| (r.first_pfn, r.count)).collect());
            Ok(())
        })
        .unwrap();
        frames
    }

    #[test]
    fn long_ranges_cut_into_full_frames_as_before() {
        assert_eq!(
            packed(&[(0, 300)], 128),
            [vec![(0, 128)], vec![(128, 128)], vec![(256, 44)]]
        );
        assert_eq!(packed(&[(7, 3)], 1), [[(7, 1)], [(8, 1)], [(9, 1)]]);
    }

    #[test]
    fn short_ranges_share_frames_across_range_boundaries() {
        // Every other page: one-page runs fill frames.
        let every_other: Vec<(u64, u64)> = (0..5).map(|i| (2 * i, 1)).collect();
        assert_eq!(
            packed(&every_other, 4),
            [vec![(0, 1), (2, 1), (4, 1), (6, 1)], vec![(8, 1)]]
        );
        // Runs of three with gaps: a range split between two frames.
        assert_eq!(
            packed(&[(0, 3), (5, 3), (10, 3)], 4),
            [vec![(0, 3), (5, 1)], vec![(6, 2), (10, 2)], vec![(12, 1)]]
        );
        // Short ranges, then a long one that fills the frame and continues in full frames.
        assert_eq!(
            packed(&[(0, 1), (2, 1), (10, 20)], 8),
            [vec![(0, 1), (2, 1), (10, 6)], vec![(16, 8)], vec![(24, 6)]]
        );
    }

    #[test]
    fn touching_ranges_merge_and_unordered_ones_start_a_new_frame() {
        assert_eq!(packed(&[(0, 2), (2, 2), (4, 1)], 8), [[(0, 5)]]);
        assert_eq!(
            packed(&[(5, 2), (3, 1), (3, 1), (9, 1)], 8),
            [vec![(5, 2)], vec![(3, 1)], vec![(3, 1), (9, 1)]]
        );
        assert_eq!(packed(&[(5, 4), (6, 1)], 8), [[(5, 4)], [(6, 1)]]);
        assert_eq!(packed(&[(0, 0), (4, 1), (9, 0)], 8), [[(4, 1)]]);
        assert!(packed(&[], 8).is_empty());
    }

    #[test]
    fn an_emit_error_stops_packing() {
        let ranges: Vec<PageRange> = (0..10).map(|i| PageRange::new(2 * i, 1)).collect();
        let mut calls = 0;
        let result = pack_frames(&ranges, 2, |_| {
            calls += 1;
            if calls == 2 {
                Err("queue closed")
            } else {
                Ok(())
            }
        });
        assert_eq!((result, calls), (Err("queue closed"), 2));
    }

    #[test]
    fn ranges_are_cut_at_account_boundaries_and_grouped_in_order() {
        let accounts = [PageRange::new(10, 10), PageRange::new(30, 5)];
        let groups = by_account(
            &[(0, 4), (8, 4), (14, 2), (19, 13), (40, 1)].map(PageRange::from),
            &accounts,
        );
        type Pieces = Vec<(u64, u64)>;
        let shape: Vec<(Option<usize>, Pieces)> = groups
            .into_iter()
            .map(|(a, pieces)| (a, pieces.iter().map(|r| (r.first_pfn, r.count)).collect()))
            .collect();
        assert_eq!(
            shape,
            [
                (None, vec![(0, 4), (8, 2)]),
                (Some(0), vec![(10, 2), (14, 2), (19, 1)]),
                (None, vec![(20, 10)]),
                (Some(1), vec![(30, 2)]),
                (None, vec![(40, 1)]),
            ]
        );
    }

    #[test]
    fn overlapping_or_empty_accounts_are_refused() {
        let mut config = SenderConfig::new(SessionId(1), WorkerPlacement::unpinned(1));
        config.accounts = vec![PageRange::new(0, 8), PageRange::new(7, 2)];
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
        config.accounts = vec![PageRange::new(4, 0)];
        assert!(config.validate().unwrap_err().to_string().contains("empty"));
        config.accounts = vec![PageRange::new(0, 8), PageRange::new(8, 2)];
        assert!(config.validate().is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever the ranges, frames carry exactly their pages in order, each frame obeys
        /// the format's rules, and ascending ranges use as few frames as pages allow.
        #[test]
        fn frames_carry_exactly_the_ranges(
            shape in proptest::collection::vec((0u64..5, 0u64..40), 0..60),
            ascending in proptest::prelude::any::<bool>(),
            per_frame in 1u64..=40,
        ) {
            let mut pfn = 0u64;
            let ranges: Vec<(u64, u64)> = shape
                .iter()
                .map(|&(gap, count)| {
                    // Unordered ranges may go back, overlap and repeat.
                    pfn = if ascending { pfn + gap } else { (pfn + gap * 7) % 50 };
                    let range = (pfn, count);
                    if ascending {
                        pfn += count;
                    }
                    range
                })
                .collect();
            let frames = packed(&ranges, per_frame);
            let pages_of = |&(first, count): &(u64, u64)| first..first + count;
            let expected: Vec<u64> = ranges.iter().flat_map(pages_of).collect();
            let carried: Vec<u64> = frames.iter().flatten().flat_map(pages_of).collect();
            proptest::prop_assert_eq!(&carried, &expected);
            for frame in &frames {
                let pages: u64 = frame.iter().map(|run| run.1).sum();
                proptest::prop_assert!(!frame.is_empty() && pages <= per_frame);
                proptest::prop_assert!(frame.iter().all(|run| run.1 > 0));
                proptest::prop_assert!(
                    frame.windows(2).all(|pair| pair[0].0 + pair[0].1 < pair[1].0)
                );
            }
            if ascending {
                let fewest = (expected.len() as u64).div_ceil(per_frame);
                proptest::prop_assert_eq!(frames.len() as u64, fewest);
            }
        }
    }

    #[test]
    fn adaptive_means_none_over_loopback_only() {
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:1".parse().unwrap();
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(
            effective_policy(CompressionPolicy::Adaptive, &[local, v6]),
            CompressionPolicy::None
        );
        assert_eq!(
            effective_policy(CompressionPolicy::Adaptive, &[local, remote]),
            CompressionPolicy::Adaptive
        );
        assert_eq!(
            effective_policy(CompressionPolicy::Lz4, &[local]),
            CompressionPolicy::Lz4
        );
        assert_eq!(
            effective_policy(CompressionPolicy::None, &[remote]),
            CompressionPolicy::None
        );
    }
}
