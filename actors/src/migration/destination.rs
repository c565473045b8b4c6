//! The destination side of a migration: one actor per arriving VM, a state machine advanced
//! one step per message from the source. Until `Commit` arrives, any failure or a lost
//! connection discards the copy; after it, the VM is ours and runs here.
//!
//! Every step that an answer about the outcome depends on is in the host's journal before
//! the step takes effect: `Preparing` before `Prepared` goes out, `Committed` before the
//! vCPUs run (see `crate::journal`). A failure here is told to the source with its reason
//! before the connection closes, so the operator reads what went wrong, not "peer closed".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use ferry_transport::control::{ControlError, ControlReceiver, ControlSender, KeepaliveTask};
use ferry_transport::data::{DataListener, DataReceiver, ReceiverConfig, SessionId};
use ferry_transport::negotiate::Transport;
use ferry_transport::negotiate::{Capabilities, Plan};
use ferry_transport::pages::PageReceiver;
use ferry_transport::rdma::{RdmaListener, RdmaReceiver, RdmaReceiverConfig};
use ferry_transport::workers::WorkerPlacement;

use ferry_runtime::GuestRam;

use super::memory;
use super::protocol::{Hello, ToDestination, ToSource};
use super::{DestinationOutcome, MigrationId, MigrationReport, Stage};
use crate::announce;
use crate::host_actor::{
    AdmitIncoming, ConsoleLogClaim, HostActor, IncomingFinished, MigrationUpdate, PrepareIncoming,
};
use crate::journal::{Journal, MigrationRecord, Phase, Role, VmRecord};
use crate::lifecycle::Lifecycle;
use crate::settings::{Fault, HostSettings};
use crate::vm_actor::{EndMigrateIn, GetInfo, IncomingRam, LoadIncomingState, VmActor};

/// Writes `record` to the journal off the actor's thread (it fsyncs).
/// How often a storage migration's destination writes arrived blocks back during the copy.
const BACKGROUND_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Flushes the images a storage migration wrote and compares them with the source's
/// hashes, when the source sent any.
fn check_moved_images(images: &[std::path::PathBuf], hashes: &[[u8; 16]]) -> Result<(), String> {
    use ferry_runtime::devices::virtio::block::DiskImage;
    for (index, path) in images.iter().enumerate() {
        let image =
            DiskImage::open_unlocked(path, false).map_err(|e| ferry_transport::report(&e))?;
        image
            .flush()
            .map_err(|e| format!("flushing the moved image {}: {e}", path.display()))?;
        if let Some(expected) = hashes.get(index) {
            let expected = u128::from_le_bytes(*expected);
            let local = ferry_runtime::devices::disk::hash_image(&image)
                .map_err(|e| format!("hashing the moved image {}: {e}", path.display()))?;
            if local != expected {
                return Err(format!(
                    "disk hash mismatch for {}: destination {local:032x}, source {expected:032x}",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// Fault injection: flips the first byte of a moved image.
fn corrupt_first_byte(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    tracing::warn!(image = %path.display(), "fault injection: changing one byte of the moved image");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 0)
        .map_err(|e| e.to_string())?;
    file.write_all_at(&[byte[0] ^ 0x5a], 0)
        .map_err(|e| e.to_string())
}

async fn persist(journal: Arc<Journal>, record: MigrationRecord) -> Result<(), String> {
    let phase = record.phase;
    actix_rt::task::spawn_blocking(move || journal.record(&record))
        .await
        .map_err(|e| format!("journal task failed: {e}"))?
        .map_err(|e| {
            format!(
                "cannot record phase {phase:?} durably: {}",
                ferry_transport::report(&e)
            )
        })
}

/// The destination migration actor.
pub struct DestinationMigration {
    id: MigrationId,
    hello: Box<Hello>,
    settings: Arc<HostSettings>,
    host: Addr<HostActor>,
    journal: Arc<Journal>,
    /// This migration's journal record, once written.
    record: Option<MigrationRecord>,
    control: Option<ControlSender>,
    receiver_half: Option<ControlReceiver>,
    _keepalive: KeepaliveTask,
    /// The control channel's TLS cipher, when it ran under mutual TLS; the data streams of
    /// an encrypted migration negotiate the same (same hosts, same configuration).
    cipher: Option<String>,
    report: MigrationReport,
    started: Instant,
    vm: Option<Addr<VmActor>>,
    /// The arriving VM's memory (for fault injection only).
    ram: Option<Arc<GuestRam>>,
    /// The console log file the arriving VM writes, to restore if the copy is discarded.
    console_log: Option<ConsoleLogClaim>,
    /// Images this migration created (compute + storage): removed if the copy is dropped.
    created_images: Vec<std::path::PathBuf>,
    /// A background flush of those images is running.
    flushing: Arc<std::sync::atomic::AtomicBool>,
    data: Option<PageReceiver>,
    /// With an RDMA plan, the TCP receiver that takes over if the source falls back (until
    /// `DataPath` says which one is used).
    standby: Option<PageReceiver>,
    /// Resume at commit (the VM was running on the source) or keep it paused.
    run_after_commit: bool,
    owned: bool,
    done: bool,
}

impl std::fmt::Debug for DestinationMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationMigration")
            .field("id", &self.id)
            .field("stage", &self.report.stage)
            .finish_non_exhaustive()
    }
}

impl DestinationMigration {
    /// A migration that arrived with `hello` on a control channel split into its halves.
    pub fn new(
        hello: Box<Hello>,
        settings: Arc<HostSettings>,
        (host, journal): (Addr<HostActor>, Arc<Journal>),
        (control, receiver, keepalive): (ControlSender, ControlReceiver, KeepaliveTask),
        cipher: Option<String>,
    ) -> Self {
        let mut report = MigrationReport::starting(
            hello.id,
            &hello.identity.name,
            &hello.source_host,
            &settings.name,
            hello.capabilities.max_streams,
        );
        report.control_channel = Some(super::control_channel_label(cipher.as_deref()));
        DestinationMigration {
            id: hello.id,
            hello,
            settings,
            host,
            journal,
            record: None,
            control: Some(control),
            receiver_half: Some(receiver),
            _keepalive: keepalive,
            cipher,
            report,
            started: Instant::now(),
            vm: None,
            ram: None,
            console_log: None,
            created_images: Vec::new(),
            flushing: Arc::default(),
            data: None,
            standby: None,
            run_after_commit: true,
            owned: false,
            done: false,
        }
    }

    fn stage(&mut self, stage: Stage) {
        if self.report.stage != Some(stage) {
            tracing::info!(migration = %self.id, vm = %self.report.vm, ?stage, "incoming migration stage");
        }
        self.report.stage = Some(stage);
        self.publish();
    }

    fn publish(&mut self) {
        let totals = self.data.as_ref().map(|d| d.stats());
        self.report.refresh(self.started, totals.as_ref());
        self.host.do_send(MigrationUpdate(self.report.clone()));
    }

    fn reply(&mut self, ctx: &mut Context<Self>, message: ToSource) {
        let Some(control) = self.control.clone() else {
            return;
        };
        ctx.wait(
            async move { control.send(&message).await }
                .into_actor(self)
                .map(|result, act, ctx| {
                    if let Err(e) = result {
                        act.discard(
                            ctx,
                            format!("control channel: {}", ferry_transport::report(&e)),
                        );
                    }
                }),
        );
    }

    /// Sends a final message, closes the channel, then stops the actor, in that order (the
    /// source must see the message before the close).
    fn send_last(&mut self, ctx: &mut Context<Self>, message: ToSource) {
        let control = self.control.take();
        ctx.wait(
            async move {
                if let Some(control) = control {
                    let _ = control.send(&message).await;
                    let _ = control.close().await;
                }
            }
            .into_actor(self)
            .map(|(), _, ctx| ctx.stop()),
        );
    }

    /// Tells the source why this side fails, then drops the copy.
    fn fail(&mut self, ctx: &mut Context<Self>, reason: String) {
        let last_word = ToSource::Failed {
            reason: reason.clone(),
        };
        self.drop_copy(ctx, reason, Some(last_word));
    }

    /// Drops the arriving copy (before commit) and ends the actor, after a failure the
    /// source told us about or that ended the connection.
    fn discard(&mut self, ctx: &mut Context<Self>, reason: String) {
        self.drop_copy(ctx, reason, None);
    }

    /// Drops the arriving copy: first `last_word` to the source (so its operator reads the
    /// reason before anything else breaks), then the data receivers, the VM, its console log
    /// as it was before; the journal says `Discarded`. One future, so the steps keep their
    /// order (actix runs the newest `ctx.wait` future first).
    fn drop_copy(&mut self, ctx: &mut Context<Self>, reason: String, last_word: Option<ToSource>) {
        if self.done {
            return;
        }
        self.done = true;
        if self.owned {
            // After commit the VM is ours whatever happens to the connection.
            tracing::warn!(migration = %self.id, %reason, "control channel lost after switch-over; the VM keeps running here");
            ctx.stop();
            return;
        }
        tracing::warn!(migration = %self.id, vm = %self.report.vm, %reason, "discarding the incoming VM");
        let data = self.data.take();
        let standby = self.standby.take();
        let data_reason = format!("destination '{}': {reason}", self.settings.name);
        self.report.error = Some(reason);
        self.report.stage = Some(Stage::RolledBack);
        self.report.status = "rolled_back".into();
        let control = self.control.take();
        self.ram = None;
        let vm = self.vm.take();
        let host = self.host.clone();
        let id = self.id;
        let name = self.report.vm.clone();
        let console_log = self.console_log.take();
        let created_images = std::mem::take(&mut self.created_images);
        let record = self.record.as_ref().map(|r| r.with_phase(Phase::Discarded));
        let journal = Arc::clone(&self.journal);
        ctx.wait(
            async move {
                // Nothing left behind in the target datastore, before anything else: once
                // the source reads the reason, its operator may look. (Unlinking an image the
                // receivers or the VMM still have open is fine; the space goes when they end.)
                for image in created_images {
                    if let Err(error) = std::fs::remove_file(&image) {
                        tracing::warn!(image = %image.display(), %error, "removing a partial image failed");
                    }
                }
                if let (Some(control), Some(message)) = (&control, last_word) {
                    let _ = control.send(&message).await;
                }
                drop(control);
                if let Some(data) = data {
                    // The reason travels on the data streams too, in case the source reads
                    // those before the control channel.
                    data.abort(&data_reason);
                    actix_rt::task::spawn_blocking(move || drop(data.wait()));
                }
                if let Some(standby) = standby {
                    standby.abort(&data_reason);
                    actix_rt::task::spawn_blocking(move || drop(standby.wait()));
                }
                if let Some(vm) = vm {
                    let _ = vm.send(EndMigrateIn::Discard).await;
                }
                // The VM (and its file) is gone: leave the log as it was before.
                if let Some(claim) = console_log
                    && let Err(error) = claim.release()
                {
                    tracing::warn!(%error, "restoring the console log of a discarded VM failed");
                }
                if let Some(record) = record
                    && let Err(error) = persist(journal, record).await
                {
                    // A restart settles a `Preparing` record as discarded all the same.
                    tracing::warn!(migration = %id, %error, "journal");
                }
                host.do_send(IncomingFinished {
                    id,
                    vm: name,
                    outcome: DestinationOutcome::Discarded,
                    state: Lifecycle::Stopped,
                    resumed_after_commit_ms: None,
                });
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                act.publish();
                ctx.stop();
            }),
        );
    }

    /// Makes the blocks received so far durable, then tells the source (which pauses the
    /// guest only after that).
    fn flush_disks(&mut self, ctx: &mut Context<Self>) {
        let images = self.created_images.clone();
        ctx.wait(
            actix_rt::task::spawn_blocking(move || {
                for image in &images {
                    std::fs::File::open(image)
                        .and_then(|f| f.sync_data())
                        .map_err(|e| format!("flushing the new image {}: {e}", image.display()))?;
                }
                Ok::<_, String>(())
            })
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok(Ok(())) => act.reply(ctx, ToSource::DisksFlushed),
                Ok(Err(reason)) => act.fail(ctx, reason),
                Err(e) => act.fail(ctx, format!("flush task failed: {e}")),
            }),
        );
    }

    /// Writes the blocks that arrived so far back to the images while the guest still runs
    /// on the source (every `BACKGROUND_FLUSH_INTERVAL`), so the flushes before and inside
    /// the pause have little left to do.
    fn flush_images_in_background(&self) {
        use std::sync::atomic::Ordering;
        if self.created_images.is_empty() || self.flushing.swap(true, Ordering::SeqCst) {
            return;
        }
        let images = self.created_images.clone();
        let flushing = Arc::clone(&self.flushing);
        actix_rt::task::spawn_blocking(move || {
            for image in &images {
                if let Ok(file) = std::fs::File::open(image)
                    && let Err(error) = file.sync_data()
                {
                    tracing::warn!(image = %image.display(), %error, "background flush failed (the flush before the commit will say so)");
                }
            }
            flushing.store(false, Ordering::SeqCst);
        });
    }

    fn capabilities(&self) -> Capabilities {
        let addrs = self.settings.data_addrs.clone();
        let streams = self.hello.capabilities.max_streams.max(1);
        self.settings.capabilities(addrs, streams)
    }

    fn prepare(&mut self, ctx: &mut Context<Self>, plan: Plan) {
        self.stage(Stage::Prepare);
        self.report.streams = plan.streams;
        self.report.transport_reason = Some(plan.reason.clone());
        let tls = match (plan.encrypted, &self.settings.tls) {
            (false, _) => None,
            (true, Some(identity)) => Some((identity.clone(), self.hello.source_host.clone())),
            (true, None) => {
                return self.fail(
                    ctx,
                    "the plan encrypts the data streams, and this host has no certificate".into(),
                );
            }
        };
        self.report.encryption = Some(match (&self.cipher, plan.encrypted) {
            (Some(cipher), true) => cipher.clone(),
            (None, true) => "tls".into(),
            (_, false) => "none (the source's choice)".into(),
        });
        let host = self.host.clone();
        let hello = self.hello.clone();
        let report = self.report.clone();
        let settings = Arc::clone(&self.settings);
        let session = SessionId(self.id.as_u64_pair().0);
        let streams = usize::from(plan.streams);
        let rdma_planned = matches!(plan.transport, Transport::Rdma { .. });
        let journal = Arc::clone(&self.journal);
        let journal_again = Arc::clone(&self.journal);
        let record = MigrationRecord::new(
            self.id,
            &self.hello.identity.name,
            (Role::Destination, &self.hello.source_host),
            Phase::Preparing,
        );
        let work = async move {
            // Before anything is built: every migration that could reach a commit is on
            // record, so "no record" from this journal proves it never did.
            persist(journal, record.clone()).await?;
            let (vm, console_log, created) = host
                .send(PrepareIncoming { hello, report })
                .await
                .map_err(|e| e.to_string())??;
            let mut record = record;
            if !created.is_empty() {
                // On record before any block arrives: a restarted hostd that discards this
                // arrival removes them too.
                record.created_images = created.clone();
                persist(Arc::clone(&journal_again), record.clone()).await?;
            }
            let ram = vm
                .send(IncomingRam)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let mut mappings = Vec::new();
            for (index, image) in created.iter().enumerate() {
                mappings.push(
                    memory::DiskMapping::open(index, image, true)
                        .map_err(|e| format!("mapping the new image {}: {e}", image.display()))?,
                );
            }
            let sink = memory::fresh_destination(Arc::clone(&ram), mappings)
                .map_err(|e| ferry_transport::report(&e))?;
            let bind: SocketAddr = settings
                .data_addrs
                .first()
                .copied()
                .unwrap_or_else(|| SocketAddr::new(settings.control_addr.ip(), 0));
            let listener = DataListener::bind(bind).map_err(|e| ferry_transport::report(&e))?;
            let addr = listener.local_addr();
            let placement = if settings.copy_cpus.is_empty() {
                WorkerPlacement::unpinned(streams)
            } else {
                WorkerPlacement::pinned(streams, settings.copy_cpus.clone())
            };
            let mut config = ReceiverConfig::new(session, placement);
            config.tls = tls;
            let rdma = rdma_planned.then(|| {
                start_rdma(bind, Arc::clone(&sink), session, streams)
                    .map_err(|e| format!("rdma on the destination: {e}"))
            });
            let receiver = DataReceiver::start(listener, sink, config)
                .map_err(|e| ferry_transport::report(&e))?;
            Ok::<_, String>((
                record,
                (vm, ram, console_log, created),
                (receiver, rdma),
                addr,
            ))
        };
        ctx.wait(work.into_actor(self).map(|result, act, ctx| match result {
            Ok((record, (vm, ram, console_log, created), (receiver, rdma), addr)) => {
                act.created_images = created;
                if !act.created_images.is_empty() {
                    // Write the arriving blocks back while they arrive, so neither the flush
                    // before the pause nor the one inside it has much left to do.
                    ctx.run_interval(BACKGROUND_FLUSH_INTERVAL, |act, _| {
                        if !act.done {
                            act.flush_images_in_background();
                        }
                    });
                }
                act.record = Some(record);
                act.vm = Some(vm);
                act.ram = Some(ram);
                act.console_log = Some(console_log);
                let tcp = PageReceiver::Tcp(receiver);
                let rdma = match rdma {
                    Some(Ok(receiver)) => {
                        let table = receiver.table().clone();
                        act.data = Some(PageReceiver::Rdma(receiver));
                        act.standby = Some(tcp);
                        Some(Ok(table))
                    }
                    Some(Err(reason)) => {
                        tracing::warn!(migration = %act.id, %reason, "RDMA setup failed; offering TCP");
                        act.data = Some(tcp);
                        Some(Err(reason))
                    }
                    None => {
                        act.data = Some(tcp);
                        None
                    }
                };
                act.stage(Stage::PreCopy);
                act.reply(
                    ctx,
                    ToSource::Prepared {
                        data_addrs: vec![addr],
                        rdma,
                    },
                );
            }
            Err(reason) => {
                // What PrepareIncoming built (if anything) is released by the host's own
                // error path; a record written here is settled by `discard`.
                act.record = Some(MigrationRecord::new(
                    act.id,
                    &act.hello.identity.name,
                    (Role::Destination, &act.hello.source_host),
                    Phase::Preparing,
                ));
                act.fail(ctx, reason)
            }
        }));
    }

    /// The source connected one data path: keep its receiver, drop the other.
    fn data_path(&mut self, rdma: bool, fallback: Option<String>) {
        let rdma_is_primary = matches!(self.data, Some(PageReceiver::Rdma(_)));
        let unused = if rdma_is_primary && !rdma {
            // RDMA setup failed on the source's side: TCP carries the pages.
            let unused = self.data.take();
            self.data = self.standby.take();
            unused
        } else {
            self.standby.take()
        };
        if let Some(unused) = unused {
            // Its threads end within a poll interval; never join them on the actor's thread.
            unused.abort("the source connected the other data path");
            actix_rt::task::spawn_blocking(move || drop(unused.wait()));
        }
        if rdma {
            self.report.transport = Some("rdma".into());
        }
        if let Some(reason) = fallback {
            self.report.transport = Some("tcp+lz4".into());
            self.report.transport_reason = Some(reason);
        }
        self.publish();
    }

    fn load_state(
        &mut self,
        ctx: &mut Context<Self>,
        blob: Vec<u8>,
        (console, console_total): (Vec<u8>, u64),
        (memory_hash, disk_hashes): (Option<[u8; 16]>, Vec<[u8; 16]>),
    ) {
        self.stage(Stage::SwitchOver);
        let created = self.created_images.clone();
        let Some(data) = self.data.take() else {
            return self.discard(ctx, "state arrived before the data streams".into());
        };
        let Some(vm) = self.vm.clone() else {
            return self.discard(ctx, "state arrived before the VM was prepared".into());
        };
        let fault = self.settings.fault;
        let ram = self.ram.clone();
        let work = async move {
            // The source closed its streams after the last acknowledged page: all memory is
            // here once every receiver ends cleanly.
            let waiting = Instant::now();
            let stats = actix_rt::task::spawn_blocking(move || data.wait())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("receiving memory: {}", ferry_transport::report(&e)))?;
            let received_ms = waiting.elapsed().as_secs_f64() * 1e3;
            if !created.is_empty() {
                // The moved disks: durable here before the source may delete its images,
                // and, with --verify, equal to the source's at the pause.
                actix_rt::task::spawn_blocking(move || {
                    if fault == Some(Fault::CorruptArrivingDisk) {
                        corrupt_first_byte(&created[0])?;
                    }
                    check_moved_images(&created, &disk_hashes)
                })
                .await
                .map_err(|e| e.to_string())??;
            }
            if fault == Some(Fault::CorruptArrivingMemory)
                && let Some(ram) = ram
            {
                tracing::warn!("fault injection: changing one byte of the arrived memory");
                let gpa = ferry_runtime::layout::DATA_START;
                let mut byte = [0u8];
                ram.read(gpa, &mut byte).map_err(|e| e.to_string())?;
                ram.write(gpa, &[byte[0] ^ 0x5a])
                    .map_err(|e| e.to_string())?;
            }
            if fault == Some(Fault::RejectState) {
                return Err("incoming VM state rejected: fault injection".to_string());
            }
            if fault == Some(Fault::SlowStateLoad) {
                tracing::warn!("fault injection: waiting before loading the state");
                actix_rt::time::sleep(crate::settings::SLOW_STATE_LOAD).await;
            }
            let loading = Instant::now();
            let verified = vm
                .send(LoadIncomingState {
                    blob,
                    console,
                    console_total,
                    memory_hash: memory_hash.map(u128::from_le_bytes),
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            tracing::info!(
                received_ms,
                load_ms = loading.elapsed().as_secs_f64() * 1e3,
                "incoming state loaded"
            );
            if fault == Some(Fault::FailAfterLoad) {
                return Err(
                    "the destination failed after loading the state: fault injection".to_string(),
                );
            }
            Ok::<_, String>((stats, verified))
        };
        ctx.wait(work.into_actor(self).map(|result, act, ctx| match result {
            Ok((stats, verified)) => {
                act.report.guest_bytes = stats.total.guest_bytes;
                act.report.wire_bytes = stats.total.wire_bytes;
                act.report.zero_pages = stats.total.pages_zero;
                act.report.memory_verified = verified;
                act.reply(
                    ctx,
                    ToSource::Ready {
                        memory_verified: verified,
                    },
                );
            }
            Err(reason) => act.fail(ctx, reason),
        }));
    }

    fn commit(&mut self, ctx: &mut Context<Self>, run: bool) {
        let Some(vm) = self.vm.clone() else {
            return self.discard(ctx, "commit without a VM".into());
        };
        let Some(record) = self.record.clone() else {
            return self.fail(ctx, "commit before the migration was recorded".into());
        };
        let received = Instant::now();
        // From here the VM is ours: never discard it again, whatever the connection does.
        self.owned = true;
        let host = self.host.clone();
        let journal = Arc::clone(&self.journal);
        let id = self.id;
        let name = self.report.vm.clone();
        let mac = self.hello.identity.mac;
        let ip = self.hello.ip;
        // A VM with a NIC announces itself through its own TAP when it resumes (the VMM
        // does it); only a VM without one is announced on the host's interface, which is
        // not the port the bridges must learn for a VM with a NIC.
        let interface = self
            .hello
            .networks
            .first()
            .filter(|_| self.hello.nics.is_empty())
            .and_then(|net| self.settings.networks.get(net))
            .and_then(|port| port.interface.clone());
        tracing::info!(migration = %id, vm = %name, run, "commit received; taking over the VM");
        let work = async move {
            // Durable before the vCPUs run: after a crash this host still answers "committed
            // here" and the source never resumes its copy on its own.
            let mut committed = record.with_phase(Phase::Committed);
            committed.was_running = run;
            // With the VM's own inventory record in the same transaction: a hostd killed
            // right after this finds the VM with its disks and network, not a bare process.
            let info = vm.send(GetInfo).await.map_err(|e| (false, e.to_string()))?;
            let arrival = VmRecord { info, stale: false };
            let writing = (Arc::clone(&journal), committed.clone());
            actix_rt::task::spawn_blocking(move || writing.0.record_with_vm(&writing.1, &arrival))
                .await
                .map_err(|e| (false, format!("journal task failed: {e}")))?
                .map_err(|e| {
                    (
                        false,
                        format!(
                            "cannot record phase Committed durably: {}",
                            ferry_transport::report(&e)
                        ),
                    )
                })?;
            let info = vm
                .send(EndMigrateIn::Own { run })
                .await
                .map_err(|e| (true, e.to_string()))?;
            let state = match info {
                Ok(info) => info.state,
                Err(e) => return Err((true, format!("resuming the VM: {e}"))),
            };
            let resumed_ms = received.elapsed().as_secs_f64() * 1e3;
            tracing::info!(migration = %id, vm = %name, %state, resumed_ms, "VM taken over");
            host.do_send(IncomingFinished {
                id,
                vm: name,
                outcome: DestinationOutcome::Owned,
                state,
                resumed_after_commit_ms: Some(resumed_ms),
            });
            // Off the confirmation's path: `Committed` is on record, which is what safety
            // needs, and this process answers from memory until it has this too.
            let mut resumed = committed.with_phase(Phase::Resumed);
            resumed.resumed_after_commit_ms = Some(resumed_ms);
            actix_rt::spawn(async move {
                if let Err(error) = persist(journal, resumed).await {
                    tracing::warn!(migration = %id, %error, "journal");
                }
            });
            Ok(resumed_ms)
        };
        // Announcing the MAC is not on the guest's critical path: after the confirmation.
        let announce = move || {
            if let Some(interface) = interface {
                let frames = announce::frames(mac, ip);
                if let Err(e) = announce::send(&interface, &frames) {
                    tracing::warn!(error = %e, "announcing the VM's MAC address failed");
                }
            }
        };
        ctx.wait(work.into_actor(self).map(move |result, act, ctx| {
            match result {
                Ok(resumed_after_commit_ms) => {
                    act.report.stage = Some(Stage::Completed);
                    act.report.status = "completed".into();
                    act.publish();
                    if matches!(
                        act.settings.fault,
                        Some(Fault::DropControlOnCommit | Fault::PartitionAfterCommit { .. })
                    ) {
                        tracing::warn!(migration = %act.id, "fault injection: dropping the control channel after commit");
                        Fault::partition_begins();
                        act.control = None;
                        act.done = true;
                        ctx.stop();
                        return;
                    }
                    // Confirm, then close: in this order, so the source never sees the close
                    // first and has to ask how the switch-over ended.
                    if let Some(control) = act.control.take() {
                        let id = act.id;
                        actix_rt::spawn(async move {
                            let confirmation = ToSource::Resumed {
                                resumed_after_commit_ms,
                            };
                            if let Err(e) = control.send(&confirmation).await {
                                tracing::warn!(migration = %id, error = %ferry_transport::report(&e), "confirming the switch-over failed; the source will ask");
                            }
                            let _ = control.close().await;
                            announce();
                        });
                    }
                }
                Err((false, reason)) => {
                    // The commit is not on record, so the VM must not run here: the source
                    // learns that this copy was discarded and resumes its own.
                    tracing::error!(migration = %act.id, %reason, "cannot take the VM over");
                    act.owned = false;
                    return act.fail(ctx, reason);
                }
                Err((true, reason)) => {
                    tracing::error!(migration = %act.id, %reason, "switch-over failed after commit");
                    act.report.error = Some(reason);
                    act.publish();
                    act.control = None;
                }
            }
            act.done = true;
            ctx.stop();
        }));
    }
}

impl Actor for DestinationMigration {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(migration = %self.id, vm = %self.report.vm, from = %self.report.source, "incoming migration");
        self.publish();
        if let Some(receiver) = self.receiver_half.take() {
            ctx.add_stream(futures_util::stream::unfold(
                Some(receiver),
                |receiver| async move {
                    let mut receiver = receiver?;
                    let message = receiver.recv::<ToDestination>().await;
                    let keep = message.is_ok().then_some(receiver);
                    Some((message, keep))
                },
            ));
        }
        let host = self.host.clone();
        let hello = self.hello.clone();
        let asked = Instant::now();
        ctx.wait(
            async move { host.send(AdmitIncoming(hello)).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let verdict = result.map_err(|e| e.to_string()).and_then(|r| r);
                    match verdict {
                        Ok(()) => {
                            let capabilities = act.capabilities();
                            let accepted = ToSource::Accepted {
                                capabilities,
                                journal: act.journal.id(),
                                admission_us: asked.elapsed().as_micros() as u64,
                            };
                            act.reply(ctx, accepted);
                        }
                        Err(reason) => {
                            tracing::info!(migration = %act.id, %reason, "refusing incoming VM");
                            act.report.stage = Some(Stage::Refused);
                            act.report.status = "refused".into();
                            act.report.error = Some(reason.clone());
                            act.done = true;
                            act.host.do_send(IncomingFinished {
                                id: act.id,
                                vm: act.report.vm.clone(),
                                outcome: DestinationOutcome::Discarded,
                                state: Lifecycle::Stopped,
                                resumed_after_commit_ms: None,
                            });
                            act.publish();
                            act.send_last(ctx, ToSource::Refused { reason });
                        }
                    }
                }),
        );
    }
}

impl StreamHandler<Result<ToDestination, ControlError>> for DestinationMigration {
    fn handle(&mut self, message: Result<ToDestination, ControlError>, ctx: &mut Self::Context) {
        if self.done {
            return;
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                let reason = format!(
                    "control channel from '{}': {}",
                    self.report.source,
                    ferry_transport::report(&e)
                );
                return self.discard(ctx, reason);
            }
        };
        match message {
            ToDestination::Prepare { plan } => self.prepare(ctx, plan),
            ToDestination::DataPath { rdma, fallback } => self.data_path(rdma, fallback),
            ToDestination::RoundDone { round, pages } => {
                self.report.round = round;
                self.report.rounds.push(super::RoundReport {
                    pages,
                    ..Default::default()
                });
                self.publish();
            }
            ToDestination::State {
                blob,
                console,
                console_total,
                memory_hash,
                disk_hashes,
                was_running,
            } => {
                if self.settings.fault == Some(Fault::DropControlOnState) {
                    tracing::warn!(migration = %self.id, "fault injection: dropping the control channel in stop-and-copy");
                    self.control = None;
                    return self.discard(ctx, "fault injection: control channel dropped".into());
                }
                self.report.state_bytes = blob.len() as u64;
                self.run_after_commit = was_running;
                self.load_state(
                    ctx,
                    blob,
                    (console, console_total),
                    (memory_hash, disk_hashes),
                );
            }
            ToDestination::FlushDisks => self.flush_disks(ctx),
            ToDestination::Commit => {
                let run = self.run_after_commit;
                self.commit(ctx, run);
            }
            ToDestination::Abort { reason } => {
                self.discard(ctx, format!("source aborted: {reason}"))
            }
            other => self.fail(ctx, format!("protocol error: unexpected {other:?}")),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if !self.done {
            self.discard(
                ctx,
                format!("host '{}' closed the control channel", self.report.source),
            );
        }
    }
}

/// Listens for the source's queue pairs next to the TCP data address and registers the
/// destination's guest memory for remote write.
fn start_rdma(
    bind: SocketAddr,
    sink: Arc<ferry_transport::memory::GuestRegions>,
    session: SessionId,
    streams: usize,
) -> Result<RdmaReceiver, String> {
    let listener = RdmaListener::bind(SocketAddr::new(bind.ip(), 0))
        .map_err(|e| ferry_transport::report(&e))?;
    RdmaReceiver::start(listener, sink, RdmaReceiverConfig::new(session, streams))
        .map_err(|e| ferry_transport::report(&e))
}
