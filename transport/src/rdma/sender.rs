//! The source side of an RDMA transfer: one queue pair per copy worker, each worker pinned,
//! turning page runs into RDMA WRITEs from registered source memory straight into the
//! destination's registered guest memory.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, SendTimeoutError, Sender, bounded};
use rdma_sys::{
    ibv_access_flags, rdma_cm_event_type, rdma_connect, rdma_resolve_addr, rdma_resolve_route,
};

use super::connection::{Connection, Depth, conn_param};
use super::message::{Hello, Message, Totals};
use super::table::{MemoryTable, Span, pieces};
use super::verbs::{
    CmId, EventChannel, MemoryRegion, ProtectionDomain, check, event_name, sockaddr_of,
};
use super::{LinkInfo, RdmaError};
use crate::data::{SendError, SessionId, Timeouts};
use crate::failure::FirstError;
use crate::memory::{MappedMemory, PAGE_SIZE, PageRange};
use crate::stats::{FrameCounts, StatsHandle, TransferStats, thread_cpu_time};
use crate::workers::{PinnedThread, WorkerPlacement, spawn_pinned};

/// How the RDMA sender runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSenderConfig {
    /// Transfer session; must match the receiver's.
    pub session: SessionId,
    /// Copy workers (one queue pair each) and their CPUs.
    pub workers: WorkerPlacement,
    /// Time limits: `connect` bounds address and route resolution and each connection,
    /// `stall` a wait for completions or an acknowledgement, `keepalive_interval` how often an
    /// idle worker says it is alive.
    pub timeouts: Timeouts,
    /// Largest single RDMA WRITE, in pages.
    pub pages_per_write: u32,
    /// Most writes in flight per queue pair.
    pub outstanding: u32,
    /// One signalled completion per this many writes.
    pub signal_every: u32,
}

impl RdmaSenderConfig {
    /// Defaults for `workers` queue pairs in `session`: writes of up to 64 pages (256 KiB),
    /// 32 in flight per queue pair, one completion per 8.
    pub fn new(session: SessionId, workers: WorkerPlacement) -> Self {
        Self {
            session,
            workers,
            timeouts: Timeouts::default(),
            pages_per_write: 64,
            outstanding: 32,
            signal_every: 8,
        }
    }

    fn validate(&self) -> Result<(), SendError> {
        let config = |reason: String| Err(SendError::Config { reason });
        if self.pages_per_write == 0 || self.pages_per_write > (1 << 18) {
            return config(format!(
                "pages_per_write {} is outside 1..=262144",
                self.pages_per_write
            ));
        }
        if self.signal_every == 0 || self.outstanding < 2 * self.signal_every {
            return config(format!(
                "outstanding ({}) must be at least twice signal_every ({}), which must be positive",
                self.outstanding, self.signal_every
            ));
        }
        self.timeouts.validate().or_else(config)?;
        self.workers.validate().map_err(SendError::Workers)
    }
}

/// Source memory as the workers see it: spans, addresses, keys, and which pages were ever
/// written to the destination.
#[derive(Debug)]
struct Local {
    spans: Vec<Span>,
    addrs: Vec<u64>,
    lkeys: Vec<u32>,
    remote: Vec<Span>,
    remote_addrs: Vec<u64>,
    rkeys: Vec<u32>,
    /// One bit per source page, per span: set once the page has been written.
    sent: Vec<Box<[AtomicU64]>>,
    /// Whether the destination memory was all zero at the start.
    zeroed: bool,
}

enum Job {
    Write(Vec<PageRange>),
    Marker { ticket: u64, finish: bool },
}

#[derive(Debug)]
struct Shared {
    failure: FirstError<RdmaError>,
    /// Highest ticket acknowledged per worker.
    done: Mutex<Vec<u64>>,
    changed: Condvar,
    /// Set when the `Finish` markers go out (the destination then disconnects as soon as it
    /// acknowledged, which the workers, not the watcher, tell from a failure) and when the
    /// sender is torn down: disconnects are then expected.
    disconnects_expected: AtomicBool,
    stop: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn fail(&self, error: RdmaError) {
        self.failure.set(error, "RDMA transfer");
        let _done = lock(&self.done);
        self.changed.notify_all();
    }

    fn failure(&self) -> Option<Arc<RdmaError>> {
        self.failure.get()
    }

    fn failed(&self) -> bool {
        self.failure.is_set()
    }
}

/// Sends guest pages over RDMA to an [`RdmaReceiver`](super::RdmaReceiver), with the same
/// calls and the same meaning of `flush` as [`DataSender`](crate::data::DataSender).
#[derive(Debug)]
pub struct RdmaSender<S: MappedMemory + ?Sized + 'static> {
    config: RdmaSenderConfig,
    local: Arc<Local>,
    jobs: Vec<Sender<Job>>,
    workers: Vec<PinnedThread<()>>,
    watcher: Option<thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    stats: StatsHandle,
    ticket: u64,
    next_worker: usize,
    link: LinkInfo,
    // Dropped after the workers (which own the queue pairs) have been joined in `shutdown`.
    _regions: Vec<MemoryRegion>,
    _pd: Arc<ProtectionDomain>,
    _channel: Arc<EventChannel>,
    _source: Arc<S>,
}

fn rdma(error: RdmaError) -> SendError {
    SendError::Rdma(Arc::new(error))
}

/// Whether a page holds only zeros. The copy (rather than a reference) is because the guest
/// may be writing it.
fn page_is_zero(addr: u64) -> bool {
    let mut page = [0u64; PAGE_SIZE / 8];
    // SAFETY: `addr` is the start of a page of a registered source mapping, which stays
    // mapped while the sender lives; the copy goes to a local buffer.
    unsafe { ptr::copy_nonoverlapping(addr as *const u64, page.as_mut_ptr(), page.len()) };
    page.iter().all(|&word| word == 0)
}

impl<S: MappedMemory + ?Sized + 'static> RdmaSender<S> {
    /// Connects `config.workers.count` queue pairs to the receiver that published `table`,
    /// registering `source`'s mappings for local read first.
    pub fn connect(
        table: &MemoryTable,
        source: Arc<S>,
        config: RdmaSenderConfig,
    ) -> Result<Self, SendError> {
        config.validate()?;
        let peer = table.listen;
        let timeouts = config.timeouts;
        let mappings = source.mappings();
        let spans: Vec<Span> = mappings
            .iter()
            .map(|m| Span {
                first_pfn: m.first_pfn,
                pages: m.pages,
            })
            .collect();
        let remote = table
            .validate(&spans)
            .map_err(|reason| rdma(RdmaError::Setup { reason }))?;
        let channel = Arc::new(EventChannel::new().map_err(rdma)?);
        let streams = config.workers.count;
        let depth = Depth {
            outstanding: config.outstanding,
            signal_every: config.signal_every,
        };
        let failure = FirstError::default();
        let cancel = failure.flag();
        let mut pd: Option<Arc<ProtectionDomain>> = None;
        let mut regions = Vec::new();
        let mut connections = Vec::with_capacity(streams);
        let ms = timeouts.connect.as_millis().clamp(1, i32::MAX as u128) as i32;
        for stream in 0..streams {
            let id = CmId::new(&channel).map_err(rdma)?;
            let mut dst = sockaddr_of(peer);
            // SAFETY: the id is live; `dst` is a valid socket address for the call.
            let rc = unsafe {
                rdma_resolve_addr(
                    id.raw(),
                    ptr::null_mut(),
                    ptr::from_mut(&mut dst).cast(),
                    ms,
                )
            };
            check(rc, "rdma_resolve_addr").map_err(rdma)?;
            drop(
                channel
                    .expect(
                        id.raw(),
                        rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
                        timeouts.connect,
                        peer,
                    )
                    .map_err(rdma)?,
            );
            // SAFETY: the id is live with its address resolved.
            let rc = unsafe { rdma_resolve_route(id.raw(), ms) };
            check(rc, "rdma_resolve_route").map_err(rdma)?;
            drop(
                channel
                    .expect(
                        id.raw(),
                        rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
                        timeouts.connect,
                        peer,
                    )
                    .map_err(rdma)?,
            );
            let domain = match &pd {
                Some(domain) if domain.context() == id.context() => Arc::clone(domain),
                Some(_) => {
                    return Err(rdma(RdmaError::Setup {
                        reason: format!("the routes to {peer} go through different RDMA devices"),
                    }));
                }
                None => {
                    let domain = Arc::new(ProtectionDomain::new(id.context()).map_err(rdma)?);
                    for mapping in &mappings {
                        // SAFETY: MappedMemory promises the mapping stays valid while
                        // `source` lives, and the sender holds `source` until after the
                        // registration is dropped. Local read access only.
                        let region = unsafe {
                            domain.register(
                                mapping.host_addr,
                                (mapping.pages as usize) * PAGE_SIZE,
                                ibv_access_flags(0),
                            )
                        }
                        .map_err(rdma)?;
                        regions.push(region);
                    }
                    pd = Some(Arc::clone(&domain));
                    domain
                }
            };
            let connection =
                Connection::new(stream, id, &domain, depth, Arc::clone(&cancel)).map_err(rdma)?;
            let hello = Hello {
                session: config.session.0,
                stream: stream as u16,
                streams: streams as u16,
            }
            .encode();
            let mut param = conn_param(&hello);
            // SAFETY: the id is live with its route resolved and its queue pair created;
            // `param` and the private data it points to are valid for the call.
            let rc = unsafe { rdma_connect(connection.id().raw(), &mut param) };
            check(rc, "rdma_connect").map_err(rdma)?;
            drop(
                channel
                    .expect(
                        connection.id().raw(),
                        rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
                        timeouts.connect,
                        peer,
                    )
                    .map_err(rdma)?,
            );
            connections.push(connection);
        }
        let Some(pd) = pd else {
            return Err(SendError::Config {
                reason: "zero workers".into(),
            });
        };
        let link = connections[0].id().describe();
        let local = Arc::new(Local {
            addrs: mappings.iter().map(|m| m.host_addr as u64).collect(),
            lkeys: regions.iter().map(MemoryRegion::lkey).collect(),
            sent: spans
                .iter()
                .map(|s| {
                    (0..s.pages.div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            spans,
            remote_addrs: table.regions.iter().map(|r| r.addr).collect(),
            rkeys: table.regions.iter().map(|r| r.rkey).collect(),
            remote,
            zeroed: table.zeroed,
        });
        let shared = Arc::new(Shared {
            failure,
            done: Mutex::new(vec![0; streams]),
            changed: Condvar::new(),
            disconnects_expected: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let ids: Vec<usize> = connections.iter().map(|c| c.id().raw() as usize).collect();
        let stats = StatsHandle::new(streams, 0);
        let watcher = {
            let channel = Arc::clone(&channel);
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("ferry-rdma-tx-cm".into())
                .spawn(move || watch(&channel, &ids, &shared))
                .map_err(|source| {
                    SendError::Workers(crate::workers::WorkerError::Spawn {
                        name: "ferry-rdma-tx-cm".into(),
                        source,
                    })
                })?
        };
        let mut sender = Self {
            config,
            local,
            jobs: Vec::with_capacity(streams),
            workers: Vec::with_capacity(streams),
            watcher: Some(watcher),
            shared,
            stats,
            ticket: 0,
            next_worker: 0,
            link,
            _regions: regions,
            _pd: pd,
            _channel: channel,
            _source: source,
        };
        for connection in connections {
            let index = connection.stream;
            let (queue, jobs) = bounded(4);
            let worker = Worker {
                connection,
                local: Arc::clone(&sender.local),
                shared: Arc::clone(&sender.shared),
                stats: sender.stats.clone(),
                timeouts,
                pages_per_write: u64::from(sender.config.pages_per_write),
                totals: Totals::default(),
                last_sent: Instant::now(),
            };
            let cpu = sender.config.workers.cpu_for(index);
            sender.jobs.push(queue);
            sender.workers.push(
                spawn_pinned(format!("ferry-rdma-tx-{index}"), cpu, move || {
                    worker.run(&jobs)
                })
                .map_err(SendError::Workers)?,
            );
        }
        Ok(sender)
    }

    /// The RDMA link in use: device, port, GID, MTU.
    pub fn link(&self) -> &LinkInfo {
        &self.link
    }

    /// Number of queue pairs.
    pub fn streams(&self) -> usize {
        self.workers.len()
    }

    /// Statistics so far.
    pub fn stats(&self) -> TransferStats {
        self.stats.snapshot()
    }

    /// A handle for reading statistics from another thread.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    fn check_alive(&self) -> Result<(), SendError> {
        match self.shared.failure() {
            Some(error) => Err(SendError::Rdma(error)),
            None => Ok(()),
        }
    }

    fn dispatch(&mut self, worker: usize, mut job: Job) -> Result<(), SendError> {
        let stall = self.config.timeouts.stall;
        let started = Instant::now();
        loop {
            self.check_alive()?;
            match self.jobs[worker].send_timeout(job, Duration::from_millis(200)) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(back)) => {
                    if started.elapsed() >= stall {
                        return Err(SendError::NoProgress {
                            waiting_for: "an RDMA worker to take work",
                            after: stall,
                        });
                    }
                    job = back;
                }
                Err(SendTimeoutError::Disconnected(_)) => {
                    self.check_alive()?;
                    return Err(rdma(RdmaError::Aborted {
                        reason: "an RDMA worker stopped".into(),
                    }));
                }
            }
        }
    }

    /// Queues `ranges` for writing; like [`DataSender::send`](crate::data::DataSender::send),
    /// returning is no promise of delivery. Every range is checked against both sides'
    /// memory first.
    pub fn send(&mut self, ranges: &[PageRange]) -> Result<(), SendError> {
        self.check_alive()?;
        for &range in ranges {
            pieces(&self.local.spans, &self.local.remote, range, u64::MAX).map_err(|reason| {
                rdma(RdmaError::Setup {
                    reason: format!(
                        "cannot send pages {:#x}+{}: {reason}",
                        range.first_pfn, range.count
                    ),
                })
            })?;
        }
        // Jobs of about 1 MiB, dealt round-robin: the NICs do the copying, so the workers
        // need no work stealing to stay balanced.
        const JOB_PAGES: u64 = 256;
        let mut job = Vec::new();
        let mut pages = 0;
        for &range in ranges {
            let mut first = range.first_pfn;
            let mut left = range.count;
            while left > 0 {
                let take = left.min(JOB_PAGES - pages);
                job.push(PageRange::new(first, take));
                pages += take;
                first += take;
                left -= take;
                if pages == JOB_PAGES {
                    let worker = self.next_worker;
                    self.next_worker = (worker + 1) % self.jobs.len();
                    self.dispatch(worker, Job::Write(std::mem::take(&mut job)))?;
                    pages = 0;
                }
            }
        }
        if !job.is_empty() {
            let worker = self.next_worker;
            self.next_worker = (worker + 1) % self.jobs.len();
            self.dispatch(worker, Job::Write(job))?;
        }
        Ok(())
    }

    /// Returns once every page sent so far is in the destination's memory: each queue pair
    /// sent a marker behind its writes and the destination acknowledged every one.
    pub fn flush(&mut self) -> Result<(), SendError> {
        self.marker(false)
    }

    fn marker(&mut self, finish: bool) -> Result<(), SendError> {
        self.check_alive()?;
        self.ticket += 1;
        let ticket = self.ticket;
        for worker in 0..self.jobs.len() {
            self.dispatch(worker, Job::Marker { ticket, finish })?;
        }
        // Each worker bounds its own waits by the stall timeout; this is the backstop.
        let limit = self.config.timeouts.stall * 2;
        let started = Instant::now();
        let mut done = lock(&self.shared.done);
        loop {
            if let Some(error) = self.shared.failure() {
                return Err(SendError::Rdma(error));
            }
            if done.iter().all(|&t| t >= ticket) {
                return Ok(());
            }
            if started.elapsed() >= limit {
                return Err(SendError::NoProgress {
                    waiting_for: "the destination to acknowledge an RDMA round",
                    after: started.elapsed(),
                });
            }
            let (guard, _) = self
                .shared
                .changed
                .wait_timeout(done, Duration::from_millis(200))
                .unwrap_or_else(PoisonError::into_inner);
            done = guard;
        }
    }

    /// Tells the destination the transfer is complete (behind every write, as `flush`),
    /// waits for its acknowledgements and stops the workers.
    pub fn finish(mut self) -> Result<TransferStats, SendError> {
        self.shared
            .disconnects_expected
            .store(true, Ordering::Release);
        let result = self.marker(true);
        self.shutdown();
        result.map(|()| self.stats.snapshot())
    }

    /// Gives up: every queue pair sends an `Abandon` carrying `reason`, then disconnects.
    pub fn abort(mut self, reason: &str) -> TransferStats {
        self.shared.fail(RdmaError::Aborted {
            reason: reason.into(),
        });
        self.shutdown();
        self.stats.snapshot()
    }

    fn shutdown(&mut self) {
        self.jobs.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        self.shared
            .disconnects_expected
            .store(true, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

impl<S: MappedMemory + ?Sized + 'static> Drop for RdmaSender<S> {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.shared.fail(RdmaError::Aborted {
                reason: "the sender was dropped".into(),
            });
        }
        self.shutdown();
    }
}

/// Watches the connection events: a peer that disconnects (or a device that goes away)
/// before the transfer is over fails it.
fn watch(channel: &EventChannel, ids: &[usize], shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let event = match channel.next(Duration::from_millis(200)) {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(error) => {
                shared.fail(error);
                return;
            }
        };
        let kind = event.kind();
        let stream = ids
            .iter()
            .position(|&id| id == event.id() as usize)
            .unwrap_or(0);
        drop(event);
        let fatal = matches!(
            kind,
            rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED
                | rdma_cm_event_type::RDMA_CM_EVENT_DEVICE_REMOVAL
                | rdma_cm_event_type::RDMA_CM_EVENT_TIMEWAIT_EXIT
        );
        let expected = || shared.disconnects_expected.load(Ordering::Acquire);
        if fatal && !expected() {
            // A queue pair in error state disconnects too: give the workers a moment to
            // report the completion status, and an Abandon from the peer a moment to
            // arrive, which say more than "disconnected".
            thread::sleep(Duration::from_millis(300));
            if expected() {
                continue;
            }
            shared.fail(RdmaError::Disconnected {
                stream,
                event: event_name(kind),
            });
        }
    }
}

struct Worker {
    connection: Connection,
    local: Arc<Local>,
    shared: Arc<Shared>,
    stats: StatsHandle,
    timeouts: Timeouts,
    pages_per_write: u64,
    totals: Totals,
    last_sent: Instant,
}

impl Worker {
    fn run(mut self, jobs: &crossbeam_channel::Receiver<Job>) {
        let stream = self.connection.stream;
        loop {
            if self.shared.failed() {
                break;
            }
            let job = match jobs.recv_timeout(
                self.timeouts
                    .keepalive_interval
                    .min(Duration::from_millis(200)),
            ) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(error) = self.keepalive() {
                        self.shared.fail(error);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let started = Instant::now();
            let result = match job {
                Job::Write(runs) => runs.iter().try_for_each(|&run| self.write_run(run)),
                Job::Marker { ticket, finish } => self.marker(ticket, finish),
            };
            self.stats.stream(stream).add_busy(started.elapsed());
            self.stats.stream(stream).set_cpu_time(thread_cpu_time());
            if let Err(error) = result {
                self.shared.fail(error);
                break;
            }
        }
        if let Some(error) = self.shared.failure() {
            // Tell the destination why, unless the queue pair itself is what failed.
            if !matches!(
                *error,
                RdmaError::Completion { .. } | RdmaError::Disconnected { .. }
            ) {
                let reason = crate::report(&*error);
                if self.connection.send(&Message::Abandon { reason }).is_ok() {
                    let _ = self.connection.drain_final(Duration::from_secs(1));
                }
            }
        }
        self.stats.stream(stream).set_cpu_time(thread_cpu_time());
    }

    fn keepalive(&mut self) -> Result<(), RdmaError> {
        if self.last_sent.elapsed() < self.timeouts.keepalive_interval {
            return Ok(());
        }
        self.last_sent = Instant::now();
        self.connection.send(&Message::Keepalive)?;
        self.connection.drain(self.timeouts.stall)
    }

    fn marker(&mut self, ticket: u64, finish: bool) -> Result<(), RdmaError> {
        let message = if finish {
            Message::Finish {
                ticket,
                totals: self.totals,
            }
        } else {
            Message::Round {
                ticket,
                totals: self.totals,
            }
        };
        self.connection.send(&message)?;
        self.last_sent = Instant::now();
        self.connection.drain(self.timeouts.stall)?;
        let deadline = Instant::now() + self.timeouts.stall;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RdmaError::Idle {
                    stream: self.connection.stream,
                    waiting_for: "the destination's acknowledgement of a round",
                    after: self.timeouts.stall,
                });
            }
            if self.shared.failed() {
                return Ok(());
            }
            match self
                .connection
                .next_message(left.min(Duration::from_millis(200)), "destination")?
            {
                Some(Message::Ack { ticket: acked }) if acked == ticket => break,
                Some(Message::Ack { ticket: acked }) if acked < ticket => continue,
                None => continue,
                Some(other) => {
                    return Err(RdmaError::Protocol {
                        stream: self.connection.stream,
                        reason: format!(
                            "expected the acknowledgement of round {ticket}, got {other:?}"
                        ),
                    });
                }
            }
        }
        let mut done = lock(&self.shared.done);
        done[self.connection.stream] = ticket;
        self.shared.changed.notify_all();
        Ok(())
    }

    fn write_run(&mut self, run: PageRange) -> Result<(), RdmaError> {
        let local = Arc::clone(&self.local);
        let pieces = pieces(&local.spans, &local.remote, run, self.pages_per_write)
            .map_err(|reason| RdmaError::Setup { reason })?;
        for piece in pieces {
            if local.zeroed {
                // Write only the pages that were sent before or are not zero now; a page
                // never sent and zero now is already right in fresh destination memory.
                let mut start = None;
                let mut skipped = 0;
                for page in piece.local_page..piece.local_page + piece.pages {
                    let bits = &local.sent[piece.local];
                    let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
                    let was_sent = bits[word].load(Ordering::Relaxed) & bit != 0;
                    let addr = local.addrs[piece.local] + page * PAGE_SIZE as u64;
                    let needed = was_sent || !page_is_zero(addr);
                    match (needed, start) {
                        (true, None) => start = Some(page),
                        (false, Some(first)) => {
                            self.post(
                                piece.local,
                                first,
                                page - first,
                                piece.remote,
                                piece.remote_page + (first - piece.local_page),
                            )?;
                            start = None;
                            skipped += 1;
                        }
                        (false, None) => skipped += 1,
                        (true, Some(_)) => {}
                    }
                }
                if let Some(first) = start {
                    let end = piece.local_page + piece.pages;
                    self.post(
                        piece.local,
                        first,
                        end - first,
                        piece.remote,
                        piece.remote_page + (first - piece.local_page),
                    )?;
                }
                if skipped > 0 {
                    self.totals.pages_skipped += skipped;
                    self.stats
                        .stream(self.connection.stream)
                        .add_zero_skipped(skipped);
                }
            } else {
                self.post(
                    piece.local,
                    piece.local_page,
                    piece.pages,
                    piece.remote,
                    piece.remote_page,
                )?;
            }
            if self.last_sent.elapsed() >= self.timeouts.keepalive_interval {
                // Writes are invisible to the destination's CPU; say we are alive.
                self.last_sent = Instant::now();
                self.connection.send(&Message::Keepalive)?;
            }
        }
        Ok(())
    }

    fn post(
        &mut self,
        local: usize,
        page: u64,
        pages: u64,
        remote: usize,
        remote_page: u64,
    ) -> Result<(), RdmaError> {
        let l = &self.local;
        let bytes = pages * PAGE_SIZE as u64;
        let src = (l.addrs[local] + page * PAGE_SIZE as u64, l.lkeys[local]);
        let dst = (
            l.remote_addrs[remote] + remote_page * PAGE_SIZE as u64,
            l.rkeys[remote],
        );
        self.connection
            .write(src, bytes as u32, dst, self.timeouts.stall)?;
        let bits = &l.sent[local];
        for p in page..page + pages {
            bits[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        self.totals.pages_written += pages;
        self.totals.writes += 1;
        self.stats
            .stream(self.connection.stream)
            .add_frame(&FrameCounts {
                guest_bytes: bytes,
                wire_bytes: bytes,
                pages_raw: pages,
                pages_compressed: 0,
                pages_zero: 0,
            });
        Ok(())
    }
}
