//! The source side of a migration.
//!
//! The actor drives the stages with the destination over the control channel; bulk copies
//! run on the transport's pinned copy workers inside blocking tasks, and their completion
//! comes back as a message. Rule of the switch-over: before `Commit` is sent, any failure
//! resumes the VM here (rollback); after it, the VM is resumed here only on the
//! destination's durable word that it never ran it (see `crate::journal`): a discarded
//! copy, or no record at all in the very journal that accepted the migration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use ferry_runtime::DirtySet;
use ferry_transport::control::{
    ClientTls, ControlChannel, ControlError, ControlSender, KeepaliveTask,
};
use ferry_transport::data::{GateHold, GateRef, SendError, SenderConfig, SessionId};
use ferry_transport::memory::GuestRegions;
use ferry_transport::negotiate::{
    Capabilities, NegotiateError, Plan, Preference, Transport, choose_for,
};
use ferry_transport::pages::{Connected, PageSender, Targets, connect_sender};
use ferry_transport::rdma::{MemoryTable, RdmaSenderConfig};
use ferry_transport::stats::{StatsHandle, TransferStats};
use ferry_transport::workers::WorkerPlacement;

use super::convergence::{Decision, RoundOutcome, SWITCH_OVER_OVERHEAD_MS, decide};
use super::memory::{self, to_transport_ranges};
use super::protocol::{Hello, MigratingDisk, ToDestination, ToSource};
use super::{
    DestinationOutcome, DiskCopyReport, Encryption, MigrationId, MigrationOptions, MigrationReport,
    RoundReport, Stage, TransportChoice,
};
use crate::control_server::control_config;
use crate::host_actor::{CancelRequest, HostActor, MigrationUpdate, VmStateChanged};
use crate::journal::{Journal, MigrationRecord, Phase, Role};
use crate::settings::{HostSettings, Peer};
use crate::vm_actor::{
    DirtyLog, DiskLog, EndMigrateOut, Freeze, Frozen, OutgoingVm, SetThrottle, VmActor,
};

type Sender = PageSender<GuestRegions>;

/// How often progress is published while copying.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Pause between in-doubt queries.
const QUERY_RETRY: Duration = Duration::from_millis(500);
/// Granularity of the disk-write bitmap of a storage migration.
const DISK_CHUNK: u64 = ferry_runtime::devices::virtio::block::dirty_blocks::DEFAULT_CHUNK;

/// After a failure seen here (a data stream broke, a timeout), how long the control channel
/// may still deliver the destination's own reason before the report is final.
const REASON_GRACE: Duration = Duration::from_secs(2);

/// The source migration actor.
pub struct SourceMigration {
    id: MigrationId,
    settings: Arc<HostSettings>,
    peer: Peer,
    options: MigrationOptions,
    vm: Addr<VmActor>,
    outgoing: OutgoingVm,
    host: Addr<HostActor>,
    journal: Arc<Journal>,
    /// This migration's journal record, once copying began.
    record: Option<MigrationRecord>,
    /// Taken over by a restarted hostd after its commit went out: it only asks.
    recovering: bool,
    report: MigrationReport,
    started: Instant,
    control: Option<ControlSender>,
    /// Keeps the control channel's keepalive running while the channel is in use.
    keepalive: Option<KeepaliveTask>,
    plan: Option<Plan>,
    /// Capabilities offered in the hello, to negotiate with the destination's.
    plan_capabilities: Option<Capabilities>,
    /// Whether the control channel ran under mutual TLS (`None`: not connected yet, or
    /// taken over after a restart), which later queries of the destination then require.
    control_was_tls: Option<bool>,
    /// Whether the data streams are to be encrypted, decided once the control channel is up.
    encrypt_data: bool,
    /// When the hello went out, to measure the round trip.
    hello_sent: Option<Instant>,
    /// Round trip of the control channel, without the destination's thinking time.
    rtt: Duration,
    /// The destination journal that accepted the migration.
    journal_id: Option<uuid::Uuid>,
    data: Option<Sender>,
    data_stats: Option<StatsHandle>,
    /// Totals when the current round started, to report per-round numbers.
    round_base: TransferStats,
    round_started: Instant,
    throttle: u8,
    paused_at: Option<Instant>,
    /// This migration's hold on the host's switch-over gate, from the pause until the
    /// switch-over ends one way or another.
    switching: Option<GateHold>,
    commit_sent_at: Option<Instant>,
    cancel_requested: bool,
    /// The outcome is decided; nothing but the final report remains.
    done: bool,
    /// A rollback whose report waits for the destination's reason (see `REASON_GRACE`):
    /// the final stage and status, and the error seen here.
    awaiting_reason: Option<(Stage, &'static str, String)>,
    /// Compute + storage: disk blocks written since the last round, still to send.
    disk_pending: Vec<ferry_transport::memory::PageRange>,
    /// Compute + storage: the pages still to send while the destination flushes its disks.
    pending_pages: Option<DirtySet>,
    /// Where each disk goes (`Ok(None)`: compute only), or why the options name no valid
    /// placement.
    storage: Result<Option<Vec<String>>, String>,
    /// Compute + storage: disks (slot indices) whose blocks the round in flight carries.
    round_disks: Vec<usize>,
    /// When the first round began.
    copy_started: Option<Instant>,
}

impl std::fmt::Debug for SourceMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceMigration")
            .field("id", &self.id)
            .field("stage", &self.report.stage)
            .finish_non_exhaustive()
    }
}

fn transport_label(plan: &Plan) -> String {
    match &plan.transport {
        Transport::Rdma { .. } => "rdma".into(),
        Transport::Tcp {
            compression: Some(_),
            ..
        } => "tcp+lz4".into(),
        Transport::Tcp {
            compression: None, ..
        } => "tcp".into(),
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    ferry_transport::report(error)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The smallest downtime target a switch-over to a peer `rtt` away can meet: what the
/// convergence model reserves for the switch-over itself, plus the round trip.
pub fn downtime_floor_ms(rtt: Duration) -> u64 {
    (SWITCH_OVER_OVERHEAD_MS + ms(rtt)).ceil() as u64
}

impl SourceMigration {
    /// A migration of `outgoing` (already marked migrating by its VmActor) to `peer`.
    pub fn new(
        id: MigrationId,
        settings: Arc<HostSettings>,
        peer: Peer,
        options: MigrationOptions,
        vm: Addr<VmActor>,
        outgoing: OutgoingVm,
        (host, journal): (Addr<HostActor>, Arc<Journal>),
    ) -> Self {
        let mut report = MigrationReport::starting(
            id,
            &outgoing.identity.name,
            &settings.name,
            &peer.name,
            options.streams,
        );
        report.max_bandwidth = options.max_bandwidth;
        report.shared_bandwidth = options.shared_cap.as_ref().map(|cap| cap.rate());
        let storage = crate::datastore::storage_targets(
            &outgoing.attachments.disks,
            options.datastore.as_deref(),
            &options.disk_targets,
        );
        SourceMigration {
            id,
            settings,
            peer,
            options,
            vm,
            outgoing,
            host,
            journal,
            record: None,
            recovering: false,
            report,
            started: Instant::now(),
            control: None,
            keepalive: None,
            plan: None,
            plan_capabilities: None,
            control_was_tls: None,
            encrypt_data: false,
            hello_sent: None,
            rtt: Duration::ZERO,
            journal_id: None,
            data: None,
            data_stats: None,
            round_base: TransferStats::default(),
            round_started: Instant::now(),
            throttle: 0,
            paused_at: None,
            switching: None,
            commit_sent_at: None,
            cancel_requested: false,
            done: false,
            awaiting_reason: None,
            disk_pending: Vec::new(),
            pending_pages: None,
            storage,
            round_disks: Vec::new(),
            copy_started: None,
        }
    }

    /// Whether the disks move too (compute + storage).
    fn moves_storage(&self) -> bool {
        matches!(self.storage, Ok(Some(_)))
    }

    /// Why this migration cannot go over RDMA although both hosts have it, if it cannot: a
    /// storage migration (its disk blocks come from file mappings, which RDMA cannot
    /// register for long), or a locked-memory limit too low to register guest memory.
    fn rdma_obstacle(&self, ours: &Capabilities, theirs: &Capabilities) -> Option<String> {
        if self.moves_storage() {
            return Some(
                "a storage migration reads disk blocks through file mappings, which RDMA cannot register; RDMA carries compute-only migrations".into(),
            );
        }
        if let Some(cap) =
            self.options
                .max_bandwidth
                .or(self.options.shared_cap.as_ref().map(|c| c.rate()))
        {
            return Some(format!(
                "a bandwidth cap ({cap} B/s) is kept by pacing frames on TCP; RDMA writes are not paced"
            ));
        }
        let bytes = self.outgoing.ram.size();
        if let Some(why) = ours.memlock.and_then(|limit| limit.shortfall(bytes)) {
            return Some(format!(
                "rdma on the source '{}': {why}",
                self.settings.name
            ));
        }
        if let Some(why) = theirs.memlock.and_then(|limit| limit.shortfall(bytes)) {
            return Some(format!(
                "rdma on the destination '{}': {why}",
                self.peer.name
            ));
        }
        None
    }

    /// Counts a round (pre-copy, or the final copy when `final_copy`) that just landed for
    /// every disk it carried.
    fn disks_landed(&mut self, final_copy: bool) {
        let now = self
            .copy_started
            .map_or(0.0, |started| ms(started.elapsed()));
        for index in std::mem::take(&mut self.round_disks) {
            if let Some(copy) = self.report.disk_copies.get_mut(index) {
                copy.rounds += u32::from(!final_copy);
                copy.time_ms = now;
            }
        }
    }

    /// The migration a restarted hostd finds recorded with its commit sent and no outcome:
    /// it asks the destination, as the migration before the restart would have, and never
    /// resumes the VM without a durable "not committed".
    pub fn recovering(
        record: MigrationRecord,
        (settings, peer): (Arc<HostSettings>, Peer),
        vm: Addr<VmActor>,
        outgoing: OutgoingVm,
        (host, journal): (Addr<HostActor>, Arc<Journal>),
    ) -> Self {
        let mut migration = SourceMigration::new(
            record.id,
            settings,
            peer,
            MigrationOptions::default(),
            vm,
            outgoing,
            (host, journal),
        );
        migration.recovering = true;
        migration.journal_id = record.peer_journal;
        // When the pause began died with the previous hostd: the downtime is unknown.
        migration.commit_sent_at = Some(Instant::now());
        migration.record = Some(record);
        migration
    }

    /// Moves the journal record to `phase`, off the actor's thread (a failure is logged: the
    /// phases written this way are outcomes, which the in-memory report carries too).
    fn persist(&mut self, ctx: &mut Context<Self>, phase: Phase) {
        let Some(record) = self.record.as_ref().map(|r| r.with_phase(phase)) else {
            return;
        };
        self.record = Some(record.clone());
        let journal = Arc::clone(&self.journal);
        let id = self.id;
        ctx.spawn(
            async move {
                let written =
                    actix_rt::task::spawn_blocking(move || journal.record(&record)).await;
                if let Ok(Err(error)) = written {
                    tracing::error!(migration = %id, error = %ferry_transport::report(&error), "recording the migration failed");
                }
            }
            .into_actor(self),
        );
    }

    fn stage(&mut self, stage: Stage) {
        if self.report.stage != Some(stage) {
            tracing::info!(migration = %self.id, vm = %self.report.vm, ?stage, "migration stage");
        }
        self.report.stage = Some(stage);
        self.publish();
    }

    fn publish(&mut self) {
        let totals = self.data_stats.as_ref().map(|s| s.snapshot());
        self.report.refresh(self.started, totals.as_ref());
        if let Some(totals) = totals.as_ref().filter(|_| self.round_running()) {
            self.round_progress(totals);
        }
        self.host.do_send(MigrationUpdate(self.report.clone()));
    }

    /// Whether a pre-copy round's copy is under way.
    fn round_running(&self) -> bool {
        self.report.stage == Some(Stage::PreCopy)
            && self.report.rounds.len() < self.report.round as usize
    }

    /// Live figures of the round under way: sent of planned, what is left, the rate since
    /// the round began and when it will end at that rate.
    fn round_progress(&mut self, totals: &TransferStats) {
        let sent = totals
            .total
            .guest_bytes
            .saturating_sub(self.round_base.total.guest_bytes)
            .min(self.report.round_bytes);
        let left = self.report.round_bytes - sent;
        self.report.round_sent_bytes = sent;
        self.report.remaining_bytes = left;
        let seconds = self.round_started.elapsed().as_secs_f64();
        if seconds >= 0.1 && sent > 0 {
            self.report.rate_bytes_per_s = sent as f64 / seconds;
            self.report.eta_ms = Some(left as f64 / self.report.rate_bytes_per_s * 1000.0);
        }
    }

    /// The report as it stands.
    pub fn report(&self) -> &MigrationReport {
        &self.report
    }

    /// Sends a control message; the actor processes nothing else until it is out, so
    /// messages leave in protocol order.
    fn send(&mut self, ctx: &mut Context<Self>, message: ToDestination) {
        let Some(control) = self.control.clone() else {
            return;
        };
        ctx.wait(
            async move { control.send(&message).await }
                .into_actor(self)
                .map(|result, act, ctx| {
                    if let Err(e) = result {
                        act.connection_lost(ctx, format!("control channel: {}", error_chain(&e)));
                    }
                }),
        );
    }

    /// The guest's pause from `paused_at` to its resumption on the destination:
    /// `Commit` leaves here, crosses the link (half the round trip) and takes the
    /// destination `resumed_after_commit_ms` to act on.
    fn switch_over_downtime(&self, resumed_after_commit_ms: Option<f64>) -> Option<f64> {
        let paused = self.paused_at?;
        let committed = self.commit_sent_at?;
        Some(ms(committed.duration_since(paused)) + ms(self.rtt) / 2.0 + resumed_after_commit_ms?)
    }

    /// Anything failed before commit: undo and report. A failure the destination reported
    /// (`from_destination`) is final at once; one seen here waits a moment for the
    /// destination's own reason, which is usually the cause.
    fn fail(&mut self, ctx: &mut Context<Self>, stage: Stage, error: String) {
        self.fail_with(ctx, stage, error, false);
    }

    fn fail_with(
        &mut self,
        ctx: &mut Context<Self>,
        stage: Stage,
        error: String,
        from_destination: bool,
    ) {
        self.switching = None;
        if self.done {
            return;
        }
        if self.commit_sent_at.is_some() {
            // Too late to roll back on our own: find out what the destination did.
            self.in_doubt(ctx, error);
            return;
        }
        self.done = true;
        self.persist(ctx, Phase::Discarded);
        tracing::warn!(migration = %self.id, vm = %self.report.vm, %error, ?stage, "migration failed, rolling back");
        let (final_stage, status) = match stage {
            Stage::Cancelled => (Stage::Cancelled, "cancelled"),
            Stage::Refused => (Stage::Refused, "refused"),
            _ => (Stage::RolledBack, "rolled_back"),
        };
        let listening = !from_destination && self.control.is_some();
        if let Some(control) = self.control.take() {
            let reason = error.clone();
            actix_rt::spawn(async move {
                let _ = control.send(&ToDestination::Abort { reason }).await;
                let _ = control.close().await;
            });
        }
        if let Some(data) = self.data.take() {
            discard(data);
        }
        self.awaiting_reason = Some((final_stage, status, error));
        let was_running = self.outgoing.was_running;
        let vm = self.vm.clone();
        let host = self.host.clone();
        let name = self.report.vm.clone();
        ctx.wait(
            async move { vm.send(EndMigrateOut::RollBack { was_running }).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    // The guest runs again (or stays paused as the operator left it).
                    act.report.downtime_ms = match act.paused_at {
                        Some(paused) if was_running => Some(ms(paused.elapsed())),
                        // The pause began in an earlier hostd's life.
                        _ if act.recovering => None,
                        _ => Some(0.0),
                    };
                    let failure = match result {
                        Ok(Ok(info)) => {
                            host.do_send(VmStateChanged {
                                vm: name,
                                state: info.state,
                            });
                            None
                        }
                        Ok(Err(e)) => Some((vm_crashed(&e), e.to_string())),
                        Err(e) => Some((false, e.to_string())),
                    };
                    if let Some((crashed, failure)) = failure {
                        tracing::error!(migration = %act.id, error = %failure, "rollback failed");
                        if let Some((stage, status, error)) = &mut act.awaiting_reason {
                            if crashed {
                                *stage = Stage::Failed;
                                *status = "failed";
                                error.push_str(&format!(
                                    "; the VM's VMM process on '{}' ended during the migration: the VM crashed there (`ferryctl vm show {}` says how)",
                                    act.settings.name, act.report.vm
                                ));
                            } else {
                                error.push_str(&format!("; and rolling back failed: {failure}"));
                            }
                        }
                    }
                    act.report.throttle_pct = act.report.throttle_pct.max(act.throttle);
                    if listening {
                        ctx.run_later(REASON_GRACE, |act, ctx| act.finish_rollback(ctx, None));
                    } else {
                        act.finish_rollback(ctx, None);
                    }
                }),
        );
    }

    /// Makes the rollback's report final, with the destination's reason if it sent one.
    fn finish_rollback(&mut self, ctx: &mut Context<Self>, destination_reason: Option<String>) {
        let Some((stage, status, error)) = self.awaiting_reason.take() else {
            return;
        };
        self.report.error = Some(match destination_reason {
            Some(reason) => format!("destination failed: {reason} (seen here: {error})"),
            None => error,
        });
        self.report.stage = Some(stage);
        self.report.status = status.into();
        self.publish();
        ctx.stop();
    }

    fn connection_lost(&mut self, ctx: &mut Context<Self>, error: String) {
        let stage = self.report.stage.unwrap_or(Stage::Verify);
        self.fail(ctx, stage, error);
    }

    /// Verify passed: measure the round trip, check the downtime target can be met, then
    /// agree on the transport and ask the destination to prepare.
    fn accepted(
        &mut self,
        ctx: &mut Context<Self>,
        capabilities: Capabilities,
        journal: uuid::Uuid,
        admission_us: u64,
    ) {
        self.journal_id = Some(journal);
        if let Some(sent) = self.hello_sent {
            self.rtt = sent
                .elapsed()
                .saturating_sub(Duration::from_micros(admission_us));
            self.report.control_rtt_ms = Some(ms(self.rtt));
        }
        let floor = downtime_floor_ms(self.rtt);
        if self.options.downtime_ms < floor {
            let reason = format!(
                "downtime target {} ms is below what a switch-over to '{}' can take: at least {floor} ms ({SWITCH_OVER_OVERHEAD_MS} ms for the state and the confirmation, plus the {:.2} ms round trip); use --downtime-ms {floor} or more",
                self.options.downtime_ms,
                self.peer.name,
                ms(self.rtt)
            );
            return self.fail(ctx, Stage::Refused, reason);
        }
        let ours = self
            .plan_capabilities
            .clone()
            .unwrap_or_else(|| Capabilities::without_rdma(Vec::new(), self.options.streams));
        let preference = match self.options.transport {
            TransportChoice::Auto => Preference::Auto,
            TransportChoice::Tcp => Preference::Tcp {
                why: "TCP requested by the operator".into(),
            },
            TransportChoice::Rdma => Preference::Rdma,
        };
        let mut planned = choose_for(&ours, &capabilities, self.encrypt_data, &preference);
        if let Ok(plan) = &planned
            && matches!(plan.transport, Transport::Rdma { .. })
            && let Some(why) = self.rdma_obstacle(&ours, &capabilities)
        {
            planned = if preference == Preference::Rdma {
                Err(NegotiateError::RdmaUnavailable { why })
            } else {
                choose_for(
                    &ours,
                    &capabilities,
                    self.encrypt_data,
                    &Preference::Tcp { why },
                )
            };
        }
        match planned {
            Ok(plan) => {
                self.report.transport = Some(transport_label(&plan));
                self.report.transport_reason = Some(plan.reason.clone());
                self.report.streams = plan.streams;
                self.plan = Some(plan.clone());
                self.stage(Stage::Prepare);
                self.send(ctx, ToDestination::Prepare { plan });
            }
            Err(e) => self.fail(ctx, Stage::Refused, format!("no common transport: {e}")),
        }
    }

    /// Connects the data streams, starts dirty logging and the first round.
    fn start_copy(
        &mut self,
        ctx: &mut Context<Self>,
        addrs: Vec<std::net::SocketAddr>,
        rdma: Option<Result<MemoryTable, String>>,
    ) {
        let Some(plan) = self.plan.clone() else {
            return self.fail(ctx, Stage::Prepare, "no transport plan".into());
        };
        let mut early_fallback = None;
        let table = match (&plan.transport, rdma) {
            (Transport::Rdma { .. }, Some(Ok(table))) => Some(table),
            (Transport::Rdma { .. }, Some(Err(reason))) => {
                early_fallback = Some(reason);
                None
            }
            (Transport::Rdma { .. }, None) => {
                early_fallback = Some("the destination published no RDMA memory table".into());
                None
            }
            _ => None,
        };
        if let Some(reason) = &early_fallback
            && self.options.transport == TransportChoice::Rdma
        {
            return self.fail(
                ctx,
                Stage::Prepare,
                format!("RDMA was requested and cannot be set up: {reason}"),
            );
        }
        let moves_storage = self.moves_storage();
        let mut mappings = Vec::new();
        if moves_storage {
            for (index, disk) in self.outgoing.disks.iter().enumerate() {
                match memory::DiskMapping::open(index, &disk.path, false) {
                    Ok(mapping) => mappings.push(mapping),
                    Err(e) => {
                        return self.fail(
                            ctx,
                            Stage::Prepare,
                            format!("mapping disk image {}: {e}", disk.path.display()),
                        );
                    }
                }
            }
        }
        let source = match memory::source(Arc::clone(&self.outgoing.ram), mappings) {
            Ok(source) => source,
            Err(e) => return self.fail(ctx, Stage::Prepare, error_chain(&e)),
        };
        let streams = usize::from(plan.streams);
        let placement = if self.settings.copy_cpus.is_empty() {
            WorkerPlacement::unpinned(streams)
        } else {
            WorkerPlacement::pinned(streams, self.settings.copy_cpus.clone())
        };
        let rdma_config = RdmaSenderConfig::new(session_of(self.id), placement.clone());
        let mut config = SenderConfig::new(session_of(self.id), placement);
        config.max_bandwidth = self.options.max_bandwidth;
        config.shared_cap = self.options.shared_cap.clone();
        config.gate = Some(GateRef(Arc::clone(&self.settings.switch_over_gate)));
        if plan.encrypted {
            let Some(identity) = self.settings.tls.clone() else {
                return self.fail(
                    ctx,
                    Stage::Prepare,
                    "the plan encrypts the data streams, and this host has no certificate".into(),
                );
            };
            config.tls = Some((identity, self.peer.name.clone()));
        }
        if moves_storage {
            config.accounts = (0..self.outgoing.disks.len())
                .map(memory::disk_pages)
                .collect();
        }
        let vm = self.vm.clone();
        let mut record = MigrationRecord::new(
            self.id,
            &self.report.vm,
            (Role::Source, &self.peer.name),
            Phase::Preparing,
        );
        record.was_running = self.outgoing.was_running;
        record.peer_journal = self.journal_id;
        if moves_storage && !self.options.keep_source_disks {
            record.source_images = self.outgoing.disks.iter().map(|d| d.path.clone()).collect();
        }
        self.record = Some(record.clone());
        let journal = Arc::clone(&self.journal);
        let transport_choice = self.options.transport;
        let connect = async move {
            // On record before the VM is touched: a restarted hostd then knows to give it
            // back its throttle, its tracking and (if it was running) its vCPUs.
            actix_rt::task::spawn_blocking(move || journal.record(&record))
                .await
                .map_err(|e| format!("journal task failed: {e}"))?
                .map_err(|e| format!("recording the migration: {}", error_chain(&e)))?;
            let connected = actix_rt::task::spawn_blocking(move || {
                let targets = Targets {
                    rdma: table.as_ref().map(|table| (table, rdma_config)),
                    tcp_addrs: &addrs,
                    tcp: config,
                };
                connect_sender(targets, source)
            })
            .await
            .map_err(|e| format!("copy worker start failed: {e}"))?
            .map_err(|e| format!("connecting the data streams: {}", error_chain(&e)))?;
            let Connected { sender, fallback } = connected;
            let fallback = match (early_fallback, fallback) {
                (Some(early), _) => Some(format!("{early}: falling back to tcp+lz4")),
                (None, later) => later,
            };
            if let (Some(reason), TransportChoice::Rdma) = (&fallback, transport_choice) {
                discard(sender);
                return Err(format!("RDMA was requested and cannot be set up: {reason}"));
            }
            // Round one comes with tracking already on: a page is either populated when the
            // VM reads its backing, or written later and in a later fetch.
            let first_round = vm
                .send(DirtyLog::Start)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("starting dirty-page tracking: {e}"))?;
            let mut ranges = to_transport_ranges(first_round.ranges());
            let mut disk_bytes = 0;
            if moves_storage {
                // The disks' round one likewise: recording on, then the images' data.
                let extents = vm
                    .send(DiskLog::Start { chunk: DISK_CHUNK })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("starting disk-write tracking: {e}"))?;
                let blocks = memory::disk_ranges(&extents);
                disk_bytes = blocks.iter().map(|r| r.bytes()).sum();
                ranges.extend(blocks);
            }
            Ok::<_, String>(((sender, fallback), ranges, disk_bytes))
        };
        ctx.wait(
            connect
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(((sender, _), _, _)) if act.done => discard(sender),
                    Ok(((sender, fallback), first_round, disk_bytes)) => {
                        act.data_path_chosen(ctx, &sender, fallback);
                        act.report.disk_bytes += disk_bytes;
                        act.data_stats = Some(sender.stats_handle());
                        act.data = Some(sender);
                        act.stage(Stage::PreCopy);
                        act.copy_started = Some(Instant::now());
                        // Round one: everything ever written. Never-touched memory and disk
                        // holes are zero on both sides already.
                        act.run_round(ctx, first_round);
                    }
                    Err(e) => act.fail(ctx, Stage::Prepare, e),
                }),
        );
    }

    /// Reports the data path connected (RDMA with its link, or TCP and why) and tells the
    /// destination, which drops the receiver not used.
    fn data_path_chosen(
        &mut self,
        ctx: &mut Context<Self>,
        sender: &Sender,
        fallback: Option<String>,
    ) {
        let rdma = sender.link().cloned();
        match (&rdma, &fallback) {
            (Some(link), _) => {
                self.report.transport = Some("rdma".into());
                if let Some(reason) = &mut self.report.transport_reason {
                    reason.push_str(&format!("; link {link}"));
                }
            }
            (None, Some(why)) => {
                self.report.transport = Some("tcp+lz4".into());
                self.report.transport_reason = Some(why.clone());
            }
            (None, None) => {}
        }
        self.report.rdma_link = rdma.clone();
        self.send(
            ctx,
            ToDestination::DataPath {
                rdma: rdma.is_some(),
                fallback,
            },
        );
    }

    fn run_round(
        &mut self,
        ctx: &mut Context<Self>,
        ranges: Vec<ferry_transport::memory::PageRange>,
    ) {
        let Some(mut sender) = self.data.take() else {
            return self.fail(ctx, Stage::PreCopy, "data sender missing".into());
        };
        self.report.round += 1;
        self.round_disks = memory::disks_in(&ranges);
        self.round_base = sender.stats();
        self.round_started = Instant::now();
        let planned: u64 = ranges.iter().map(|r| r.bytes()).sum();
        self.report.round_bytes = planned;
        self.report.round_sent_bytes = 0;
        self.report.remaining_bytes = planned;
        self.publish();
        let pages: u64 = ranges.iter().map(|r| r.count).sum();
        ctx.spawn(
            actix_rt::task::spawn_blocking(move || {
                let result = sender.send(&ranges).and_then(|()| sender.flush());
                (sender, result)
            })
            .into_actor(self)
            .map(move |joined, act, ctx| match joined {
                Ok((sender, _)) if act.done => discard(sender),
                Ok((sender, Ok(()))) => {
                    act.data = Some(sender);
                    act.round_done(ctx, pages);
                }
                Ok((sender, Err(e))) => {
                    act.data = Some(sender);
                    act.fail(
                        ctx,
                        Stage::PreCopy,
                        format!("copying memory: {}", error_chain(&e)),
                    );
                }
                Err(e) => act.fail(ctx, Stage::PreCopy, format!("copy task failed: {e}")),
            }),
        );
    }

    fn round_done(&mut self, ctx: &mut Context<Self>, pages: u64) {
        let seconds = self.round_started.elapsed().as_secs_f64();
        self.disks_landed(false);
        let stats = self.data.as_ref().map(|s| s.stats()).unwrap_or_default();
        let bytes = stats.total.guest_bytes - self.round_base.total.guest_bytes;
        self.report.round_sent_bytes = self.report.round_bytes;
        self.report.rounds.push(RoundReport {
            pages,
            bytes,
            duration_ms: seconds * 1000.0,
        });
        self.report.rate_bytes_per_s = if seconds > 0.0 {
            bytes as f64 / seconds
        } else {
            0.0
        };
        if self.cancel_requested {
            return self.fail(ctx, Stage::Cancelled, "cancelled by the operator".into());
        }
        let round = self.report.round;
        let control = self.control.clone();
        let vm = self.vm.clone();
        let moves_storage = self.moves_storage();
        // One future: the progress message leaves before anything that follows the fetch
        // (actix runs the newest `ctx.wait` future first, so two would run backwards).
        let work = async move {
            if let Some(control) = control {
                control
                    .send(&ToDestination::RoundDone { round, pages })
                    .await
                    .map_err(|e| format!("control channel: {}", error_chain(&e)))?;
            }
            let pages = vm
                .send(DirtyLog::Fetch)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("fetching dirty pages: {e}"))?;
            let blocks = if moves_storage {
                let extents = vm
                    .send(DiskLog::Fetch)
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("fetching written disk blocks: {e}"))?;
                memory::disk_ranges(&extents)
            } else {
                Vec::new()
            };
            Ok::<_, String>((pages, blocks))
        };
        ctx.wait(
            work
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let (dirty, blocks) = match result {
                        Ok(dirty) => dirty,
                        Err(e) => return act.fail(ctx, Stage::PreCopy, e),
                    };
                    let block_bytes: u64 = blocks.iter().map(|r| r.bytes()).sum();
                    let dirty_bytes = dirty.bytes() + block_bytes;
                    act.report.remaining_bytes = dirty_bytes;
                    let decision = decide(
                        RoundOutcome {
                            rounds_done: act.report.round,
                            sent_bytes: bytes,
                            seconds,
                            dirty_bytes,
                            throttle: act.throttle,
                        },
                        act.options.downtime_ms,
                        act.options.max_rounds,
                        act.options.auto_converge,
                    );
                    let rate = act.report.rate_bytes_per_s.max(1.0);
                    act.report.eta_ms = Some(dirty_bytes as f64 / rate * 1000.0);
                    match decision {
                        Decision::Continue { throttle } => {
                            if throttle != act.throttle {
                                tracing::info!(migration = %act.id, throttle, "throttling the guest to converge");
                                act.throttle = throttle;
                                act.report.throttle_pct = act.report.throttle_pct.max(throttle);
                                act.vm.do_send(SetThrottle(throttle));
                            }
                            let mut ranges = to_transport_ranges(dirty.ranges());
                            act.report.disk_bytes += block_bytes;
                            ranges.extend(blocks);
                            act.run_round(ctx, ranges);
                        }
                        Decision::StopAndCopy {
                            expected_downtime_ms,
                            forced,
                        } => {
                            if forced {
                                tracing::warn!(migration = %act.id, expected_downtime_ms, "round limit reached; stopping the guest above the downtime target");
                            }
                            act.disk_pending = blocks;
                            if act.moves_storage() {
                                // The destination makes the copied blocks durable first,
                                // so its flush inside the pause has only the last ones.
                                act.pending_pages = Some(dirty);
                                act.send(ctx, ToDestination::FlushDisks);
                            } else {
                                act.stop_and_copy(ctx, dirty);
                            }
                        }
                    }
                }),
        );
    }

    /// What a reason starts with when this actor took the migration over after a restart.
    fn restart_prefix(&self) -> &'static str {
        if self.recovering {
            "hostd restarted during the migration, in the switch-over; "
        } else {
            ""
        }
    }

    /// Pauses the guest (one step: pause, last dirty pages, state), then sends the last
    /// pages and the state.
    ///
    /// The journal learns "the commit may go out" first, before the pause, so its fsync is
    /// not part of the guest's downtime. A restarted hostd that finds that record asks the
    /// destination before anything else; if the commit never went out, the destination
    /// answers that it discarded its copy, and the VM resumes here.
    fn stop_and_copy(&mut self, ctx: &mut Context<Self>, pending: DirtySet) {
        self.stage(Stage::StopAndCopy);
        // Until the switch-over ends, this host's other migrations hold their copy back.
        self.switching = Some(self.settings.switch_over_gate.hold(session_of(self.id)));
        let vm = self.vm.clone();
        let verify = self.options.verify;
        let moves_storage = self.moves_storage();
        let record = self.record.as_ref().map(|r| r.with_phase(Phase::Committed));
        self.record = record.clone();
        let journal = Arc::clone(&self.journal);
        ctx.wait(
            async move {
                if let Some(record) = record {
                    actix_rt::task::spawn_blocking(move || journal.record(&record))
                        .await
                        .map_err(|e| {
                            crate::vm_actor::VmActorError::BadState(format!(
                                "journal task failed: {e}"
                            ))
                        })?
                        .map_err(|e| {
                            crate::vm_actor::VmActorError::BadState(format!(
                                "cannot record the coming commit durably: {}",
                                error_chain(&e)
                            ))
                        })?;
                }
                vm.send(Freeze {
                    hash_memory: verify,
                    hash_disks: verify && moves_storage,
                })
                .await
                .map_err(|e| crate::vm_actor::VmActorError::BadState(e.to_string()))?
            }
            .into_actor(self)
            .map(move |result, act, ctx| match result {
                Ok(frozen) => {
                    act.paused_at = Some(frozen.paused_at);
                    if act.done {
                        // Failed meanwhile: the rollback resumes the guest.
                        return;
                    }
                    act.send_last_pages(ctx, pending, frozen);
                }
                Err(e) => act.fail(ctx, Stage::StopAndCopy, format!("pausing the VM: {e}")),
            }),
        );
    }

    fn send_last_pages(&mut self, ctx: &mut Context<Self>, pending: DirtySet, frozen: Frozen) {
        let Some(mut sender) = self.data.take() else {
            return self.fail(ctx, Stage::StopAndCopy, "data sender missing".into());
        };
        let Some(control) = self.control.clone() else {
            return self.fail(ctx, Stage::StopAndCopy, "control channel missing".into());
        };
        let was_running = self.outgoing.was_running;
        let mut blocks = std::mem::take(&mut self.disk_pending);
        if self.moves_storage() {
            // Disk blocks the last round left and those written since; a block in both is
            // sent twice, both times as the paused guest left it.
            blocks.extend(memory::disk_ranges(&frozen.dirty_disks));
        }
        let final_disk_bytes: u64 = blocks.iter().map(|r| r.bytes()).sum();
        self.report.disk_bytes += final_disk_bytes;
        self.report.disk_final_bytes = final_disk_bytes;
        self.round_disks = memory::disks_in(&blocks);
        for (copy, bytes) in self
            .report
            .disk_copies
            .iter_mut()
            .zip(memory::bytes_per_disk(&blocks))
        {
            copy.final_bytes = bytes;
        }
        let disk_hashes = frozen.disk_hashes.clone();
        let work = async move {
            let frozen_ms = ms(frozen.paused_at.elapsed());
            // What the last round left plus what changed since: each page once.
            let mut all = pending;
            all.union_with(&frozen.dirty).map_err(|e| e.to_string())?;
            let mut ranges = to_transport_ranges(all.ranges());
            ranges.extend(blocks);
            let pages: u64 = ranges.iter().map(|r| r.count).sum();
            let copy = actix_rt::task::spawn_blocking(move || {
                sender.send(&ranges)?;
                sender.flush()?;
                sender.finish()
            });
            // The state travels while the last pages do: the destination loads it only
            // once every data stream has ended cleanly, i.e. after all memory arrived.
            let state_bytes = frozen.state.blob.len() as u64;
            control
                .send(&ToDestination::State {
                    blob: frozen.state.blob,
                    console: frozen.state.console,
                    console_total: frozen.state.console_total,
                    memory_hash: frozen.state.memory_hash.map(u128::to_le_bytes),
                    disk_hashes,
                    was_running,
                })
                .await
                .map_err(|e| format!("sending the VM state: {}", error_chain(&e)))?;
            let totals = copy
                .await
                .map_err(|e| format!("copy task failed: {e}"))?
                .map_err(|e: SendError| format!("copying the last pages: {}", error_chain(&e)))?;
            let sent_ms = ms(frozen.paused_at.elapsed());
            tracing::info!(pages, frozen_ms, sent_ms, "stop-and-copy done");
            Ok::<_, String>((pages, totals, state_bytes, sent_ms))
        };
        ctx.wait(work.into_actor(self).map(|result, act, ctx| match result {
            Ok(_) if act.done => {}
            Ok((pages, totals, state_bytes, sent_ms)) => {
                act.report.final_pages = pages;
                act.report.remaining_bytes = 0;
                act.report.refresh(act.started, Some(&totals));
                act.disks_landed(true);
                act.report.source_downtime_ms = Some(sent_ms);
                act.data_stats = None;
                act.report.state_bytes = state_bytes;
                act.stage(Stage::SwitchOver);
            }
            Err(e) => act.fail(ctx, Stage::StopAndCopy, e),
        }));
    }

    /// Sends the commit (already on record since stop-and-copy began).
    fn commit(&mut self, ctx: &mut Context<Self>) {
        if self.record.as_ref().map(|r| r.phase) != Some(Phase::Committed) {
            return self.fail(ctx, Stage::SwitchOver, "the commit is not on record".into());
        }
        self.commit_sent_at = Some(Instant::now());
        self.send(ctx, ToDestination::Commit);
    }

    /// The destination runs the VM: release it here.
    fn complete(&mut self, ctx: &mut Context<Self>, resumed_after_commit_ms: Option<f64>) {
        self.switching = None;
        if self.done {
            return;
        }
        self.done = true;
        self.persist(ctx, Phase::Resumed);
        self.report.downtime_ms = self.switch_over_downtime(resumed_after_commit_ms);
        if self.recovering {
            // The pause began in an earlier hostd's life.
            self.report.downtime_ms = None;
        }
        self.report.stage = Some(Stage::Completed);
        self.report.status = "completed".into();
        self.report.error = None;
        tracing::info!(
            migration = %self.id,
            vm = %self.report.vm,
            downtime_ms = self.report.downtime_ms,
            "migration completed"
        );
        if let Some(control) = self.control.take() {
            actix_rt::spawn(async move {
                let _ = control.close().await;
            });
        }
        // The migration is over when the destination runs the VM: the report says so now,
        // and the source copy's teardown (its VMM process ending) is not part of it.
        self.publish();
        let vm = self.vm.clone();
        // Compute + storage: the images now live on the destination; the source's go, as
        // vMotion removes them, unless the operator keeps them. From the record, which a
        // restarted hostd that asked its way here has too.
        let obsolete = self
            .record
            .as_ref()
            .map(|r| r.source_images.clone())
            .unwrap_or_default();
        ctx.wait(
            async move {
                let ended = vm.send(EndMigrateOut::Complete).await;
                for image in obsolete {
                    if let Err(error) = std::fs::remove_file(&image) {
                        tracing::error!(image = %image.display(), %error, "removing the source image after a storage migration failed");
                    }
                }
                ended
            }
                .into_actor(self)
                .map(|result, act, ctx| {
                    match result {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(migration = %act.id, error = %e, "releasing the source copy failed")
                        }
                        Err(e) => {
                            tracing::error!(migration = %act.id, error = %e, "releasing the source copy failed")
                        }
                    }
                    ctx.stop();
                }),
        );
    }

    /// The destination committed and then lost the VM (or can no longer say whether it ran
    /// it): this copy is older than what the guest did there. It stays paused, marked stale;
    /// only the operator can run it.
    fn lost(&mut self, ctx: &mut Context<Self>, why: String, resumed_after_commit_ms: Option<f64>) {
        self.switching = None;
        if self.done {
            return;
        }
        self.done = true;
        self.persist(ctx, Phase::Lost);
        self.report.downtime_ms = self.switch_over_downtime(resumed_after_commit_ms);
        if self.recovering {
            self.report.downtime_ms = None;
        }
        let message = format!(
            "{why}. The VM's copy on '{}' is stale and stays paused; `ferryctl vm recover {} --from-stale-copy` runs it, and its guest then goes back to the moment of the switch-over",
            self.settings.name, self.report.vm
        );
        tracing::error!(migration = %self.id, vm = %self.report.vm, "{message}");
        self.report.error = Some(message);
        self.report.stage = Some(Stage::LostAfterSwitchOver);
        self.report.status = "lost_after_switch_over".into();
        let vm = self.vm.clone();
        let host = self.host.clone();
        let name = self.report.vm.clone();
        ctx.wait(
            async move { vm.send(EndMigrateOut::Stale).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    match result {
                        Ok(Ok(info)) => host.do_send(VmStateChanged {
                            vm: name,
                            state: info.state,
                        }),
                        Ok(Err(e)) => {
                            tracing::error!(migration = %act.id, error = %e, "marking the copy stale failed")
                        }
                        Err(e) => {
                            tracing::error!(migration = %act.id, error = %e, "marking the copy stale failed")
                        }
                    }
                    act.publish();
                    ctx.stop();
                }),
        );
    }

    /// The commit went out but its confirmation did not come back: ask the destination
    /// until it says whether it runs the VM. Meanwhile the VM stays paused here.
    fn in_doubt(&mut self, ctx: &mut Context<Self>, error: String) {
        self.switching = None;
        if self.report.stage == Some(Stage::InDoubt) {
            return;
        }
        tracing::warn!(migration = %self.id, %error, "switch-over confirmation lost; asking the destination");
        self.report.error = Some(format!(
            "{error}; asking the destination how the switch-over ended"
        ));
        self.report.status = "in_doubt".into();
        self.control = None;
        self.stage(Stage::InDoubt);
        let addr = self.peer.control_addr;
        let config = control_config(&self.settings);
        // An answer decides whether the VM resumes here: it must come from the destination
        // itself whenever the migration's channel could prove that.
        let tls = ClientTls {
            required: self.control_was_tls.unwrap_or(self.settings.tls.is_some()),
            ..self.control_tls()
        };
        let id = self.id;
        let deadline = Instant::now() + self.settings.migration.in_doubt_timeout;
        let query = async move {
            loop {
                let asked = async {
                    let mut channel = ControlChannel::connect_secure(addr, config, &tls).await?;
                    channel.send(&ToDestination::Query { id }).await?;
                    channel.recv::<ToSource>().await
                }
                .await;
                if let Ok(ToSource::Outcome {
                    outcome,
                    journal,
                    resumed_after_commit_ms,
                }) = asked
                    && outcome != DestinationOutcome::InProgress
                {
                    return Some((outcome, journal, resumed_after_commit_ms));
                }
                if Instant::now() >= deadline {
                    return None;
                }
                actix_rt::time::sleep(QUERY_RETRY).await;
            }
        };
        ctx.spawn(query.into_actor(self).map(|answer, act, ctx| {
            let peer = act.peer.name.clone();
            let same_journal = |journal| act.journal_id == Some(journal);
            match answer {
                Some((DestinationOutcome::Owned, _, resumed)) => act.complete(ctx, resumed),
                Some((DestinationOutcome::Discarded, journal, _)) if same_journal(journal) => {
                    // Durably discarded before it ever ran: the VM is ours again.
                    act.commit_sent_at = None;
                    let why = format!(
                        "{}switch-over not completed: '{peer}' discarded its copy before running it",
                        act.restart_prefix()
                    );
                    act.fail(ctx, Stage::SwitchOver, why);
                }
                Some((DestinationOutcome::Unknown, journal, _)) if same_journal(journal) => {
                    // The journal that accepted the migration records every migration before
                    // it can commit: no record, no commit.
                    act.commit_sent_at = None;
                    let why = format!(
                        "{}switch-over not completed: '{peer}' has no record of the migration, so it never prepared the VM",
                        act.restart_prefix()
                    );
                    act.fail(ctx, Stage::SwitchOver, why);
                }
                Some((DestinationOutcome::Lost, _, resumed)) => act.lost(
                    ctx,
                    format!(
                        "'{peer}' committed the switch-over and then lost the VM (its VMM process ended); the guest may have run there"
                    ),
                    resumed,
                ),
                Some((outcome, journal, _)) => act.lost(
                    ctx,
                    format!(
                        "'{peer}' answers {outcome:?} from journal {journal}, but journal {} accepted the migration: its records were replaced, so whether the guest ran there cannot be known",
                        act.journal_id.map_or_else(|| "none".to_string(), |j| j.to_string())
                    ),
                    None,
                ),
                None => {
                    let message = format!(
                        "destination unreachable for {:?} after the switch-over was sent; the VM stays paused on '{}' and is not resumed anywhere by Ferry until '{peer}' answers (query migration {})",
                        act.settings.migration.in_doubt_timeout, act.settings.name, act.id
                    );
                    tracing::error!(migration = %act.id, "{message}");
                    act.report.error = Some(message);
                    act.publish();
                    // Keep asking in the background at a slower pace.
                    act.report.stage = Some(Stage::SwitchOver);
                    ctx.run_later(Duration::from_secs(5), |act, ctx| act.in_doubt(ctx, "still in doubt".into()));
                }
            }
        }));
    }
}

/// Whether a VM operation failed because the VM's VMM process is gone.
fn vm_crashed(error: &crate::vm_actor::VmActorError) -> bool {
    use crate::vm_actor::VmActorError;
    let crashed = crate::lifecycle::Lifecycle::Crashed;
    match error {
        VmActorError::Gone(_, state) => *state == crashed,
        VmActorError::InvalidTransition(refused) => refused.state == crashed,
        VmActorError::Vmm(e) => e.is_gone(),
        VmActorError::BadState(_) => false,
    }
}

/// Drops a data sender that outlived its migration (the migration failed while a copy ran),
/// off the actor's thread since closing streams can block.
fn discard(sender: Sender) {
    actix_rt::task::spawn_blocking(move || drop(sender.abort("migration ended")));
}

fn session_of(id: MigrationId) -> SessionId {
    SessionId(id.as_u64_pair().0)
}

/// How the disks move, for the report: "none", "shared", or "copied to DS[, DS2...]".
fn storage_label(hello: &Hello) -> String {
    if hello.disks.is_empty() {
        return "none".into();
    }
    let mut targets: Vec<&str> = hello
        .disks
        .iter()
        .filter_map(|d| d.target.as_deref())
        .collect();
    if targets.is_empty() {
        return "shared".into();
    }
    targets.sort_unstable();
    targets.dedup();
    format!("copied to {}", targets.join(", "))
}

/// The VM's disks as the destination must find them: each with its datastore's identity
/// here (read from the datastore's root; a datastore this host cannot open gets an identity
/// no host has, so the destination refuses the migration and says which datastore).
fn migrating_disks(
    settings: &HostSettings,
    outgoing: &OutgoingVm,
    targets: Option<&[String]>,
) -> Vec<MigratingDisk> {
    outgoing
        .attachments
        .disks
        .iter()
        .enumerate()
        .map(|(i, disk)| {
            let identity = settings
                .datastores
                .get(&disk.datastore)
                .ok_or_else(|| format!("datastore '{}' is not configured", disk.datastore))
                .and_then(|path| {
                    crate::datastore::Datastore::open(&disk.datastore, path)
                        .map_err(|e| e.to_string())
                })
                .map(|ds| ds.identity)
                .unwrap_or_else(|error| {
                    tracing::error!(%error, "datastore of a migrating disk unreadable here");
                    format!("unreadable on the source: {error}")
                });
            MigratingDisk {
                disk: disk.clone(),
                identity,
                size: outgoing.disks.get(i).map_or(0, |d| d.size),
                allocated: outgoing.disks.get(i).map_or(0, |d| d.allocated),
                target: targets.and_then(|t| t.get(i)).cloned(),
            }
        })
        .collect()
}

impl Actor for SourceMigration {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(PROGRESS_INTERVAL, |act, _| {
            if !act.done {
                act.publish();
            }
        });
        if self.recovering {
            tracing::warn!(migration = %self.id, vm = %self.report.vm, to = %self.peer.name, "hostd restarted in this migration's switch-over (its commit may have gone out); asking the destination");
            self.report.stage = Some(Stage::SwitchOver);
            return self.in_doubt(
                ctx,
                "hostd restarted in the switch-over (the commit may have gone out)".into(),
            );
        }
        tracing::info!(migration = %self.id, vm = %self.report.vm, to = %self.peer.name, "migration starting");
        self.publish();
        let targets = match self.storage.clone() {
            Ok(targets) => targets,
            Err(e) => return self.fail(ctx, Stage::Refused, e),
        };
        let addr = self.peer.control_addr;
        let config = control_config(&self.settings);
        let capabilities = self.settings.capabilities(Vec::new(), self.options.streams);
        let hello = Hello {
            id: self.id,
            source_host: self.settings.name.clone(),
            identity: self.outgoing.identity.clone(),
            shape: self.outgoing.shape.clone(),
            cpu_features: self.outgoing.cpu_features.clone(),
            networks: self.outgoing.attachments.network.iter().cloned().collect(),
            nics: self
                .outgoing
                .nics
                .iter()
                .map(|n| n.network.clone())
                .collect(),
            boot: self.outgoing.boot.clone(),
            ip: self.outgoing.attachments.ip,
            capabilities: capabilities.clone(),
            verify: self.options.verify,
            disks: migrating_disks(&self.settings, &self.outgoing, targets.as_deref()),
        };
        self.report.storage = Some(storage_label(&hello));
        self.report.disks = hello.disks.iter().map(|d| d.disk.name()).collect();
        self.report.disk_copies = hello
            .disks
            .iter()
            .filter_map(|d| {
                Some(DiskCopyReport {
                    disk: d.disk.name(),
                    target: format!("{}:{}", d.target.as_ref()?, d.disk.file),
                    size: d.size,
                    allocated: d.allocated,
                    ..DiskCopyReport::default()
                })
            })
            .collect();
        let peer = self.peer.name.clone();
        let tls = self.control_tls();
        ctx.wait(
            async move { ControlChannel::connect_secure(addr, config, &tls).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(channel) => {
                        act.report.protocol_version = Some(channel.version());
                        let cipher = channel.peer_identity().map(|p| p.cipher.clone());
                        act.control_was_tls = Some(cipher.is_some());
                        let decision = data_encryption(
                            act.encryption(),
                            cipher.as_deref(),
                            act.settings.tls.is_some(),
                            &peer,
                        );
                        act.encrypt_data = decision.encrypt;
                        if act.encryption() == Encryption::Required && !decision.encrypt {
                            return act.fail(ctx, Stage::Refused, decision.label);
                        }
                        act.report.encryption = Some(decision.label);
                        act.report.control_channel =
                            Some(super::control_channel_label(cipher.as_deref()));
                        let (sender, receiver, keepalive) = channel.into_split();
                        act.control = Some(sender);
                        act.keepalive = Some(keepalive);
                        ctx.add_stream(futures_util::stream::unfold(
                            Some(receiver),
                            |receiver| async move {
                                let mut receiver = receiver?;
                                let message = receiver.recv::<ToSource>().await;
                                let keep = message.is_ok().then_some(receiver);
                                Some((message, keep))
                            },
                        ));
                        act.plan_capabilities = Some(capabilities);
                        act.hello_sent = Some(Instant::now());
                        act.send(ctx, ToDestination::Hello(Box::new(hello)));
                    }
                    // The destination turned the connection down and said why (no protocol
                    // version in common, say): nothing was started, so it is a refusal.
                    Err(ControlError::PeerAbandoned { reason }) => act.fail(
                        ctx,
                        Stage::Refused,
                        format!("host '{peer}' refused the connection: {reason}"),
                    ),
                    // Nothing was started: who the peer is, or whether it can encrypt, was
                    // settled before anything about the VM went out.
                    Err(ControlError::Tls { reason }) => {
                        act.fail(ctx, Stage::Refused, format!("host '{peer}': {reason}"))
                    }
                    Err(e) => act.fail(
                        ctx,
                        Stage::Verify,
                        format!("cannot reach host '{peer}' at {addr}: {}", error_chain(&e)),
                    ),
                }),
        );
    }
}

impl SourceMigration {
    /// The encryption mode of this migration.
    fn encryption(&self) -> Encryption {
        self.options
            .encryption
            .unwrap_or_else(|| self.settings.default_encryption())
    }

    /// How this host connects to the destination's control port.
    fn control_tls(&self) -> ClientTls {
        ClientTls {
            identity: self.settings.tls.clone(),
            peer: self.peer.name.clone(),
            required: self.encryption() == Encryption::Required,
        }
    }
}

/// Whether the data streams are encrypted, and the words for the report.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DataEncryption {
    pub(crate) encrypt: bool,
    pub(crate) label: String,
}

/// Decides the data streams' encryption from the mode and what the control channel became
/// (`cipher`: its TLS cipher, if it runs under mutual TLS). `required` has already failed
/// the connection if TLS was not possible.
pub(crate) fn data_encryption(
    mode: Encryption,
    cipher: Option<&str>,
    have_certificate: bool,
    peer: &str,
) -> DataEncryption {
    let (encrypt, label) = match (mode, cipher) {
        (Encryption::Disabled, _) => (false, "none (disabled by the operator)".to_string()),
        (Encryption::Required | Encryption::Opportunistic, Some(cipher)) => {
            (true, cipher.to_string())
        }
        (Encryption::Opportunistic, None) if !have_certificate => (
            false,
            "none (opportunistic: this host has no certificate)".to_string(),
        ),
        (Encryption::Opportunistic, None) => (
            false,
            format!("none (opportunistic: {peer} has no certificate)"),
        ),
        (Encryption::Required, None) => (
            false,
            "none (required, but the control channel is not under TLS)".to_string(),
        ),
    };
    DataEncryption { encrypt, label }
}

impl StreamHandler<Result<ToSource, ControlError>> for SourceMigration {
    fn handle(&mut self, message: Result<ToSource, ControlError>, ctx: &mut Self::Context) {
        if self.done {
            // Rolled back on a failure seen here: the destination's reason, if it comes now,
            // is what the operator should read.
            if self.awaiting_reason.is_some() {
                match message {
                    Ok(ToSource::Failed { reason }) => self.finish_rollback(ctx, Some(reason)),
                    Ok(_) => {}
                    Err(_) => self.finish_rollback(ctx, None),
                }
            }
            return;
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                return self.connection_lost(
                    ctx,
                    format!(
                        "control channel to '{}': {}",
                        self.peer.name,
                        error_chain(&e)
                    ),
                );
            }
        };
        match (self.report.stage, message) {
            (
                Some(Stage::Verify),
                ToSource::Accepted {
                    capabilities,
                    journal,
                    admission_us,
                },
            ) => self.accepted(ctx, capabilities, journal, admission_us),
            (Some(Stage::Verify), ToSource::Refused { reason }) => self.fail_with(
                ctx,
                Stage::Refused,
                format!("destination refused: {reason}"),
                true,
            ),
            (Some(Stage::Prepare), ToSource::Prepared { data_addrs, rdma }) => {
                self.start_copy(ctx, data_addrs, rdma)
            }
            (Some(Stage::PreCopy), ToSource::DisksFlushed) if self.pending_pages.is_some() => {
                if self.cancel_requested {
                    return self.fail(ctx, Stage::Cancelled, "cancelled by the operator".into());
                }
                if let Some(pending) = self.pending_pages.take() {
                    self.stop_and_copy(ctx, pending);
                }
            }
            (Some(Stage::SwitchOver), ToSource::Ready { memory_verified }) => {
                self.report.memory_verified = memory_verified;
                if self.cancel_requested {
                    return self.fail(ctx, Stage::Cancelled, "cancelled by the operator".into());
                }
                // Point of no return: from here the destination may run the VM. On record
                // first, so a restarted hostd never resumes this copy without asking.
                tracing::info!(migration = %self.id, "destination ready; committing the switch-over");
                self.commit(ctx);
            }
            (
                Some(Stage::SwitchOver),
                ToSource::Resumed {
                    resumed_after_commit_ms,
                },
            ) if self.commit_sent_at.is_some() => self.complete(ctx, Some(resumed_after_commit_ms)),
            (stage, ToSource::Failed { reason }) => {
                let stage = stage.unwrap_or(Stage::Verify);
                self.fail_with(ctx, stage, format!("destination failed: {reason}"), true)
            }
            (stage, other) => {
                let stage = stage.unwrap_or(Stage::Verify);
                self.fail(
                    ctx,
                    stage,
                    format!("protocol error: unexpected {other:?} in stage {stage:?}"),
                )
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.awaiting_reason.is_some() {
            return self.finish_rollback(ctx, None);
        }
        if !self.done {
            self.connection_lost(
                ctx,
                format!("host '{}' closed the control channel", self.peer.name),
            );
        }
    }
}

impl Handler<CancelRequest> for SourceMigration {
    type Result = Result<(), String>;

    fn handle(&mut self, _: CancelRequest, ctx: &mut Self::Context) -> Self::Result {
        if self.commit_sent_at.is_some() {
            return Err("too late to cancel: the switch-over has begun".into());
        }
        if self.done {
            return Err("too late to cancel: the migration is already ending".into());
        }
        self.cancel_requested = true;
        // Between messages (verify, prepare) cancel at once; a running round finishes first.
        if matches!(self.report.stage, Some(Stage::Verify | Stage::Prepare)) && self.data.is_none()
        {
            self.fail(ctx, Stage::Cancelled, "cancelled by the operator".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_decides_the_data_streams_and_says_why() {
        let tls = Some("tls1.3 aes-256-gcm");
        let decide = |mode, cipher, have| data_encryption(mode, cipher, have, "beta");
        let required = decide(Encryption::Required, tls, true);
        assert!(required.encrypt);
        assert_eq!(required.label, "tls1.3 aes-256-gcm");
        assert!(decide(Encryption::Opportunistic, tls, true).encrypt);
        let fallback = decide(Encryption::Opportunistic, None, true);
        assert!(!fallback.encrypt);
        assert_eq!(
            fallback.label,
            "none (opportunistic: beta has no certificate)"
        );
        let ours = decide(Encryption::Opportunistic, None, false);
        assert_eq!(
            ours.label,
            "none (opportunistic: this host has no certificate)"
        );
        let disabled = decide(Encryption::Disabled, tls, true);
        assert!(!disabled.encrypt);
        assert_eq!(disabled.label, "none (disabled by the operator)");
        assert!(!decide(Encryption::Required, None, true).encrypt);
    }
}
