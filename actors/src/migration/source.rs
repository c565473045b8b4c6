//! The source side of a migration.
//!
//! The actor drives the stages with the destination over the control channel; bulk copies
//! run on the transport's pinned copy workers inside blocking tasks, and their completion
//! comes back as a message. Rule of the switch-over: before `Commit` is sent, any failure
//! resumes the VM here (rollback); after it, the VM is never resumed here unless the
//! destination confirms it discarded its copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use ferry_runtime::DirtySet;
use ferry_transport::control::{ControlChannel, ControlError, ControlSender, KeepaliveTask};
use ferry_transport::data::{DataSender, SendError, SenderConfig, SessionId};
use ferry_transport::memory::GuestRegions;
use ferry_transport::negotiate::{Capabilities, Plan, Transport, choose};
use ferry_transport::stats::{StatsHandle, TransferStats};
use ferry_transport::workers::WorkerPlacement;

use super::convergence::{Decision, RoundOutcome, decide};
use super::memory::{self, to_transport_ranges};
use super::protocol::{Hello, MIGRATION_PROTOCOL_VERSION, ToDestination, ToSource};
use super::{
    DestinationOutcome, MigrationId, MigrationOptions, MigrationReport, RoundReport, Stage,
};
use crate::control_server::control_config;
use crate::host_actor::{CancelRequest, HostActor, MigrationUpdate, VmStateChanged};
use crate::settings::{HostSettings, Peer};
use crate::vm_actor::{DirtyLog, EndMigrateOut, Freeze, OutgoingVm, SetThrottle, VmActor};

type Sender = DataSender<GuestRegions>;

/// How often progress is published while copying.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Pause between in-doubt queries.
const QUERY_RETRY: Duration = Duration::from_millis(500);

/// The source migration actor.
pub struct SourceMigration {
    id: MigrationId,
    settings: Arc<HostSettings>,
    peer: Peer,
    options: MigrationOptions,
    vm: Addr<VmActor>,
    outgoing: OutgoingVm,
    host: Addr<HostActor>,
    report: MigrationReport,
    started: Instant,
    control: Option<ControlSender>,
    /// Keeps the control channel's keepalive running while the channel is in use.
    keepalive: Option<KeepaliveTask>,
    plan: Option<Plan>,
    /// Capabilities offered in the hello, to negotiate with the destination's.
    plan_capabilities: Option<Capabilities>,
    data: Option<Sender>,
    data_stats: Option<StatsHandle>,
    /// Totals when the current round started, to report per-round numbers.
    round_base: TransferStats,
    round_started: Instant,
    throttle: u8,
    paused_at: Option<Instant>,
    commit_sent: bool,
    cancel_requested: bool,
    done: bool,
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

impl SourceMigration {
    /// A migration of `outgoing` (already marked migrating by its VmActor) to `peer`.
    pub fn new(
        id: MigrationId,
        settings: Arc<HostSettings>,
        peer: Peer,
        options: MigrationOptions,
        vm: Addr<VmActor>,
        outgoing: OutgoingVm,
        host: Addr<HostActor>,
    ) -> Self {
        let report = MigrationReport::starting(
            id,
            &outgoing.identity.name,
            &settings.name,
            &peer.name,
            options.streams,
        );
        SourceMigration {
            id,
            settings,
            peer,
            options,
            vm,
            outgoing,
            host,
            report,
            started: Instant::now(),
            control: None,
            keepalive: None,
            plan: None,
            plan_capabilities: None,
            data: None,
            data_stats: None,
            round_base: TransferStats::default(),
            round_started: Instant::now(),
            throttle: 0,
            paused_at: None,
            commit_sent: false,
            cancel_requested: false,
            done: false,
        }
    }

    fn stage(&mut self, stage: Stage) {
        if self.report.stage != Some(stage) {
            tracing::info!(migration = %self.id, vm = %self.report.vm, ?stage, "migration stage");
        }
        self.report.stage = Some(stage);
        self.publish();
    }

    fn publish(&mut self) {
        let totals = self.data_stats.as_ref().map(|s| s.snapshot().total);
        self.report.refresh(self.started, totals);
        self.host.do_send(MigrationUpdate(self.report.clone()));
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

    /// Anything failed before commit: undo and report.
    fn fail(&mut self, ctx: &mut Context<Self>, stage: Stage, error: String) {
        if self.done {
            return;
        }
        if self.commit_sent {
            // Too late to roll back on our own: find out what the destination did.
            self.in_doubt(ctx, error);
            return;
        }
        self.done = true;
        tracing::warn!(migration = %self.id, vm = %self.report.vm, %error, ?stage, "migration failed, rolling back");
        self.report.error = Some(error.clone());
        self.report.stage = Some(match stage {
            Stage::Cancelled | Stage::Refused => stage,
            _ => Stage::RolledBack,
        });
        self.report.status = match stage {
            Stage::Cancelled => "cancelled",
            Stage::Refused => "refused",
            _ => "rolled_back",
        }
        .into();
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
        let was_running = self.outgoing.was_running;
        let vm = self.vm.clone();
        let host = self.host.clone();
        let name = self.report.vm.clone();
        ctx.wait(
            async move { vm.send(EndMigrateOut::RollBack { was_running }).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    match result {
                        Ok(Ok(info)) => host.do_send(VmStateChanged {
                            vm: name,
                            state: info.state,
                        }),
                        Ok(Err(e)) => {
                            act.report.error = Some(format!(
                                "{}; and rolling back failed: {e}",
                                act.report.error.clone().unwrap_or_default()
                            ));
                            tracing::error!(migration = %act.id, error = %e, "rollback failed");
                        }
                        Err(e) => {
                            tracing::error!(migration = %act.id, error = %e, "rollback failed")
                        }
                    }
                    act.report.throttle_pct = act.report.throttle_pct.max(act.throttle);
                    act.publish();
                    ctx.stop();
                }),
        );
    }

    fn connection_lost(&mut self, ctx: &mut Context<Self>, error: String) {
        let stage = self.report.stage.unwrap_or(Stage::Verify);
        self.fail(ctx, stage, error);
    }

    /// Connects the data streams, starts dirty logging and the first round.
    fn start_copy(&mut self, ctx: &mut Context<Self>, addrs: Vec<std::net::SocketAddr>) {
        let Some(plan) = self.plan.clone() else {
            return self.fail(ctx, Stage::Prepare, "no transport plan".into());
        };
        let source = match memory::source(Arc::clone(&self.outgoing.ram)) {
            Ok(source) => source,
            Err(e) => return self.fail(ctx, Stage::Prepare, error_chain(&e)),
        };
        let streams = usize::from(plan.streams);
        let placement = if self.settings.copy_cpus.is_empty() {
            WorkerPlacement::unpinned(streams)
        } else {
            WorkerPlacement::pinned(streams, self.settings.copy_cpus.clone())
        };
        let config = SenderConfig::new(session_of(self.id), placement);
        let vm = self.vm.clone();
        let connect = async move {
            let sender =
                actix_rt::task::spawn_blocking(move || Sender::connect(&addrs, source, config))
                    .await
                    .map_err(|e| format!("copy worker start failed: {e}"))?
                    .map_err(|e| format!("connecting the data streams: {}", error_chain(&e)))?;
            // Round one comes with tracking already on: a page is either populated when the
            // VM reads its backing, or written later and in a later fetch.
            let first_round = vm
                .send(DirtyLog::Start)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("starting dirty-page tracking: {e}"))?;
            Ok::<_, String>((sender, first_round))
        };
        ctx.wait(
            connect
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok((sender, _)) if act.done => discard(sender),
                    Ok((sender, first_round)) => {
                        act.data_stats = Some(sender.stats_handle());
                        act.data = Some(sender);
                        act.stage(Stage::PreCopy);
                        // Round one: everything ever written. Never-touched memory is zero on both
                        // sides already.
                        act.run_round(ctx, to_transport_ranges(first_round.ranges()));
                    }
                    Err(e) => act.fail(ctx, Stage::Prepare, e),
                }),
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
        self.round_base = sender.stats();
        self.round_started = Instant::now();
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
        let stats = self.data.as_ref().map(|s| s.stats()).unwrap_or_default();
        let bytes = stats.total.guest_bytes - self.round_base.total.guest_bytes;
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
        let round = self.report.round;
        self.send(ctx, ToDestination::RoundDone { round, pages });
        if self.cancel_requested {
            return self.fail(ctx, Stage::Cancelled, "cancelled by the operator".into());
        }
        let vm = self.vm.clone();
        ctx.wait(
            async move { vm.send(DirtyLog::Fetch).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let dirty = match result {
                        Ok(Ok(dirty)) => dirty,
                        Ok(Err(e)) => return act.fail(ctx, Stage::PreCopy, format!("fetching dirty pages: {e}")),
                        Err(e) => return act.fail(ctx, Stage::PreCopy, e.to_string()),
                    };
                    act.report.remaining_bytes = dirty.bytes();
                    let decision = decide(
                        RoundOutcome {
                            rounds_done: act.report.round,
                            sent_bytes: bytes,
                            seconds,
                            dirty_bytes: dirty.bytes(),
                            throttle: act.throttle,
                        },
                        act.options.downtime_ms,
                        act.options.max_rounds,
                        act.options.auto_converge,
                    );
                    let rate = act.report.rate_bytes_per_s.max(1.0);
                    act.report.eta_ms = Some(dirty.bytes() as f64 / rate * 1000.0);
                    match decision {
                        Decision::Continue { throttle } => {
                            if throttle != act.throttle {
                                tracing::info!(migration = %act.id, throttle, "throttling the guest to converge");
                                act.throttle = throttle;
                                act.report.throttle_pct = act.report.throttle_pct.max(throttle);
                                act.vm.do_send(SetThrottle(throttle));
                            }
                            act.run_round(ctx, to_transport_ranges(dirty.ranges()));
                        }
                        Decision::StopAndCopy {
                            expected_downtime_ms,
                            forced,
                        } => {
                            if forced {
                                tracing::warn!(migration = %act.id, expected_downtime_ms, "round limit reached; stopping the guest above the downtime target");
                            }
                            act.stop_and_copy(ctx, dirty);
                        }
                    }
                }),
        );
    }

    /// Pauses the guest, sends the last dirty pages and the state.
    fn stop_and_copy(&mut self, ctx: &mut Context<Self>, pending: DirtySet) {
        self.stage(Stage::StopAndCopy);
        let vm = self.vm.clone();
        let Some(mut sender) = self.data.take() else {
            return self.fail(ctx, Stage::StopAndCopy, "data sender missing".into());
        };
        let Some(control) = self.control.clone() else {
            return self.fail(ctx, Stage::StopAndCopy, "control channel missing".into());
        };
        let verify = self.options.verify;
        let was_running = self.outgoing.was_running;
        let work = async move {
            let frozen = vm
                .send(Freeze {
                    hash_memory: verify,
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("pausing the VM: {e}"))?;
            let frozen_ms = frozen.paused_at.elapsed().as_secs_f64() * 1e3;
            // What the last round left plus what changed since: each page once.
            let mut all = pending;
            all.union_with(&frozen.dirty).map_err(|e| e.to_string())?;
            let ranges = to_transport_ranges(all.ranges());
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
                    was_running,
                })
                .await
                .map_err(|e| format!("sending the VM state: {}", error_chain(&e)))?;
            let totals = copy
                .await
                .map_err(|e| format!("copy task failed: {e}"))?
                .map_err(|e: SendError| format!("copying the last pages: {}", error_chain(&e)))?;
            let sent_ms = frozen.paused_at.elapsed().as_secs_f64() * 1e3;
            tracing::info!(pages, frozen_ms, sent_ms, "stop-and-copy done");
            Ok::<_, String>((frozen.paused_at, pages, totals, state_bytes, sent_ms))
        };
        ctx.wait(work.into_actor(self).map(|result, act, ctx| match result {
            Ok(_) if act.done => {}
            Ok((paused_at, pages, totals, state_bytes, sent_ms)) => {
                act.paused_at = Some(paused_at);
                act.report.final_pages = pages;
                act.report.remaining_bytes = 0;
                act.report.guest_bytes = totals.total.guest_bytes;
                act.report.wire_bytes = totals.total.wire_bytes;
                act.report.zero_pages = totals.total.pages_zero;
                act.report.source_downtime_ms = Some(sent_ms);
                act.data_stats = None;
                act.report.state_bytes = state_bytes;
                act.stage(Stage::SwitchOver);
            }
            Err(e) => act.fail(ctx, Stage::StopAndCopy, e),
        }));
    }

    /// The destination runs the VM: release it here.
    fn complete(&mut self, ctx: &mut Context<Self>) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(paused_at) = self.paused_at {
            self.report.downtime_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
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
        let vm = self.vm.clone();
        ctx.wait(
            async move { vm.send(EndMigrateOut::Complete).await }
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
                    act.publish();
                    ctx.stop();
                }),
        );
    }

    /// The commit went out but its confirmation did not come back: ask the destination
    /// until it says whether it runs the VM. Meanwhile the VM stays paused here.
    fn in_doubt(&mut self, ctx: &mut Context<Self>, error: String) {
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
        let id = self.id;
        let deadline = Instant::now() + self.settings.migration.in_doubt_timeout;
        let query = async move {
            loop {
                let asked = async {
                    let mut channel = ControlChannel::connect(addr, config).await?;
                    channel.send(&ToDestination::Query { id }).await?;
                    channel.recv::<ToSource>().await
                }
                .await;
                match asked {
                    Ok(ToSource::Outcome {
                        outcome: DestinationOutcome::InProgress,
                    })
                    | Err(_) => {}
                    Ok(ToSource::Outcome { outcome }) => return Some(outcome),
                    Ok(_) => {}
                }
                if Instant::now() >= deadline {
                    return None;
                }
                actix_rt::time::sleep(QUERY_RETRY).await;
            }
        };
        ctx.spawn(query.into_actor(self).map(|answer, act, ctx| match answer {
            Some(DestinationOutcome::Owned) => act.complete(ctx),
            Some(outcome) => {
                // The destination does not run the VM and never will: it is ours again.
                act.commit_sent = false;
                let why = format!(
                    "switch-over not completed: destination reports {outcome:?}"
                );
                act.fail(ctx, Stage::SwitchOver, why);
            }
            None => {
                let message = format!(
                    "destination unreachable for {:?} after the switch-over was sent; the VM stays paused on '{}' and is not resumed anywhere by Ferry until '{}' answers (query migration {})",
                    act.settings.migration.in_doubt_timeout, act.settings.name, act.peer.name, act.id
                );
                tracing::error!(migration = %act.id, "{message}");
                act.report.error = Some(message);
                act.publish();
                // Keep asking in the background at a slower pace.
                act.report.stage = Some(Stage::SwitchOver);
                ctx.run_later(Duration::from_secs(5), |act, ctx| act.in_doubt(ctx, "still in doubt".into()));
            }
        }));
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

impl Actor for SourceMigration {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(migration = %self.id, vm = %self.report.vm, to = %self.peer.name, "migration starting");
        self.publish();
        ctx.run_interval(PROGRESS_INTERVAL, |act, _| {
            if !act.done {
                act.publish();
            }
        });
        let addr = self.peer.control_addr;
        let config = control_config(&self.settings);
        let capabilities =
            Capabilities::local(Vec::new(), self.options.streams).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "RDMA discovery failed; offering TCP only");
                Capabilities::without_rdma(Vec::new(), self.options.streams)
            });
        let hello = Hello {
            protocol: MIGRATION_PROTOCOL_VERSION,
            id: self.id,
            source_host: self.settings.name.clone(),
            identity: self.outgoing.identity.clone(),
            shape: self.outgoing.shape.clone(),
            cpu_features: self.outgoing.cpu_features.clone(),
            networks: self.outgoing.attachments.network.iter().cloned().collect(),
            boot: self.outgoing.boot.clone(),
            ip: self.outgoing.attachments.ip,
            capabilities: capabilities.clone(),
            verify: self.options.verify,
        };
        let peer = self.peer.name.clone();
        ctx.wait(
            async move { ControlChannel::connect(addr, config).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(channel) => {
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
                        act.send(ctx, ToDestination::Hello(Box::new(hello)));
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

impl StreamHandler<Result<ToSource, ControlError>> for SourceMigration {
    fn handle(&mut self, message: Result<ToSource, ControlError>, ctx: &mut Self::Context) {
        if self.done {
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
            (Some(Stage::Verify), ToSource::Accepted { capabilities }) => {
                let ours = self.plan_capabilities.clone().unwrap_or_else(|| {
                    Capabilities::without_rdma(Vec::new(), self.options.streams)
                });
                match choose(&ours, &capabilities) {
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
            (Some(Stage::Verify), ToSource::Refused { reason }) => self.fail(
                ctx,
                Stage::Refused,
                format!("destination refused: {reason}"),
            ),
            (Some(Stage::Prepare), ToSource::Prepared { data_addrs }) => {
                self.start_copy(ctx, data_addrs)
            }
            (Some(Stage::SwitchOver), ToSource::Ready { memory_verified }) => {
                self.report.memory_verified = memory_verified;
                if self.cancel_requested {
                    return self.fail(ctx, Stage::Cancelled, "cancelled by the operator".into());
                }
                // Point of no return: from here the destination may run the VM.
                tracing::info!(migration = %self.id, "destination ready; committing the switch-over");
                self.commit_sent = true;
                self.send(ctx, ToDestination::Commit);
            }
            (Some(Stage::SwitchOver), ToSource::Resumed) if self.commit_sent => self.complete(ctx),
            (stage, ToSource::Failed { reason }) => {
                let stage = stage.unwrap_or(Stage::Verify);
                self.fail(ctx, stage, format!("destination failed: {reason}"))
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
        if self.commit_sent || self.done {
            return Err("too late to cancel: the switch-over has begun".into());
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
