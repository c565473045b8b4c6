//! HostActor: one per hostd. The inventory of VMs, the resources they use, admission control
//! for new VMs and for migrations in and out, the cluster's other hosts, and the record of
//! migrations (including, on the destination side, how each ended — the answer a source needs
//! after losing the connection during switch-over).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use actix::prelude::*;
use ferry_runtime::cpu::{CpuFeatures, check_compatible};
use ferry_runtime::devices::NicSpec;
use ferry_runtime::vm::RunState;
use ferry_runtime::{Boot, DirtyLogMode, Preload, VmIdentity};
use ferry_transport::data::SharedCap;
use ferry_vmm::{CreateSpec, EmptySpec, VmmClient};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::datastore::{Datastore, DatastoreInfo, DiskRef, DiskRequest, VmDisk};
use crate::evacuation::{Candidate, Evacuation, EvacuationReport, MigrationEnded, StopEvacuation};
use crate::journal::{EvacuationRecord, Journal, MaintenanceRecord, Phase, Role, VmRecord};
use crate::lifecycle::{Event, Lifecycle};
use crate::metrics::{self, HostGauges, HostMetrics};
use crate::migration::protocol::Hello;
use crate::migration::source::SourceMigration;
use crate::migration::{DestinationOutcome, MigrationId, MigrationOptions, MigrationReport, Stage};
use crate::placement::{DatastoreFacts, DiskNeeds, HostFacts, VmNeeds};
use crate::reattach;
use crate::settings::{Fault, HostSettings};
use crate::vm_actor::{
    BeginMigrateOut, FollowConsole, GetCpuFeatures, GetInfo, Operate, VmActor, VmActorError,
    VmAttachments, VmInfo, VmmProcess, lifecycle_of,
};
use ferry_runtime::DiskSpec;

/// Outcomes remembered for in-doubt queries.
const OUTCOMES_KEPT: usize = 1024;
/// Finished migrations kept for `GET /migrations`.
const REPORTS_KEPT: usize = 256;

/// What kind of failure, for the API's status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed or invalid request.
    BadRequest,
    /// No such VM, host or migration.
    NotFound,
    /// Not possible in the current state (or name taken, or no resources).
    Conflict,
    /// Something failed while doing it.
    Internal,
    /// The request did not prove who sent it (API only).
    Unauthorized,
}

/// An error with the kind the API maps to a status code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
#[error("{message}")]
pub struct HostError {
    /// Kind.
    pub kind: ErrorKind,
    /// For the operator.
    pub message: String,
}

impl HostError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        HostError {
            kind,
            message: message.into(),
        }
    }

    fn not_found_vm(host: &str, name: &str) -> Self {
        Self::new(
            ErrorKind::NotFound,
            format!("no VM named '{name}' on host '{host}'"),
        )
    }
}

impl From<VmActorError> for HostError {
    fn from(e: VmActorError) -> Self {
        let kind = match e {
            VmActorError::InvalidTransition(_) | VmActorError::Gone(..) => ErrorKind::Conflict,
            _ => ErrorKind::Internal,
        };
        HostError::new(kind, e.to_string())
    }
}

impl From<MailboxError> for HostError {
    fn from(e: MailboxError) -> Self {
        HostError::new(ErrorKind::Internal, format!("internal actor error: {e}"))
    }
}

/// A request to create a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name (letters, digits, `-`, `_`, `.`; at most 64).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, bytes.
    pub memory: u64,
    /// What to boot.
    pub boot: Boot,
    /// Files to copy into memory first.
    pub preloads: Vec<Preload>,
    /// Network to attach to (default: the host's first network, if any).
    pub network: Option<String>,
    /// The VM's IPv4 address, if known (used for gratuitous ARP after migration).
    pub ip: Option<Ipv4Addr>,
    /// Start it at once (default) or leave it created.
    pub start: bool,
    /// Disks, in slot order.
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    /// CPU features withheld from this VM on top of the host's hidden ones.
    #[serde(default)]
    pub hide_cpu_features: Vec<String>,
}

/// What the API shows about a host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostInfo {
    /// Name.
    pub name: String,
    /// hostd's process ID.
    pub pid: u32,
    /// When this hostd started, milliseconds since the Unix epoch (VMs may be older: they
    /// outlive hostd).
    pub started_unix_ms: u64,
    /// Datacenter.
    pub datacenter: Option<String>,
    /// Memory for VMs, bytes.
    pub memory_total: u64,
    /// Memory used by VMs (including arriving ones), bytes.
    pub memory_used: u64,
    /// CPU features offered to VMs (names of the known ones).
    pub cpu_features: Vec<String>,
    /// Features withheld by configuration.
    pub hidden_cpu_features: Vec<String>,
    /// Networks.
    pub networks: Vec<String>,
    /// The bridge of each network that has one here (its VMs get a NIC on it).
    #[serde(default)]
    pub bridges: std::collections::BTreeMap<String, String>,
    /// Datastores, with their paths, identities and space.
    pub datastores: Vec<DatastoreInfo>,
    /// Copy-worker CPUs.
    pub copy_cpus: Vec<usize>,
    /// Other hosts.
    pub peers: Vec<String>,
    /// Whether this host has a certificate of the cluster CA (mutual TLS with its peers).
    #[serde(default)]
    pub tls: bool,
    /// The encryption of migrations out of here when the operator names none.
    #[serde(default)]
    pub default_encryption: String,
    /// VMs here.
    pub vms: Vec<VmInfo>,
    /// Migrations in flight (in or out).
    pub migrations: Vec<MigrationReport>,
    /// In maintenance mode (no new VMs, no incoming migrations) since when.
    #[serde(default)]
    pub maintenance: Option<MaintenanceRecord>,
    /// The latest evacuation of this hostd's life, if any.
    #[serde(default)]
    pub evacuation: Option<EvacuationReport>,
}

/// Maintenance mode and the evacuation, as the API shows them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MaintenanceStatus {
    /// Host.
    pub host: String,
    /// Since when it is in maintenance, if it is.
    pub maintenance: Option<MaintenanceRecord>,
    /// The latest evacuation of this hostd's life, if any.
    pub evacuation: Option<EvacuationReport>,
}

#[derive(Debug)]
struct VmEntry {
    /// `None` while the VM is being built.
    addr: Option<Addr<VmActor>>,
    memory: u64,
    state: Lifecycle,
    migration: Option<MigrationId>,
}

#[derive(Debug)]
struct MigrationEntry {
    report: MigrationReport,
    cancel: Option<Recipient<CancelRequest>>,
}

/// How an arriving VM ended, as this process knows it, with the destination's share of the
/// guest's pause when it resumed the VM.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Outcome {
    outcome: DestinationOutcome,
    resumed_after_commit_ms: Option<f64>,
}

/// The host.
#[derive(Debug)]
pub struct HostActor {
    settings: Arc<HostSettings>,
    features: CpuFeatures,
    journal: Arc<Journal>,
    datastores: BTreeMap<String, Datastore>,
    vms: BTreeMap<String, VmEntry>,
    migrations: BTreeMap<MigrationId, MigrationEntry>,
    /// Outcomes of this process's life (older ones and earlier lives: the journal).
    outcomes: BTreeMap<MigrationId, Outcome>,
    /// When this hostd started, milliseconds since the Unix epoch.
    started_unix_ms: u64,
    /// Maintenance mode (as recorded in the journal).
    maintenance: Option<MaintenanceRecord>,
    /// The running evacuation, and the latest report of this process's life.
    evacuation: (Option<Addr<Evacuation>>, Option<EvacuationReport>),
    /// Prometheus metrics.
    metrics: HostMetrics,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The path of a VM's console log in a state directory.
pub fn console_log_path(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(format!("{vm}.console.log"))
}

/// What was at a console log's path before an arriving VM opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Previously {
    Absent,
    File {
        len: u64,
    },
    /// Something that is not a regular file: opening it fails, and it is never touched.
    Other,
}

/// The console log an arriving VM writes to, and what the path held before, so that a
/// discarded copy leaves the state directory exactly as it was.
#[derive(Debug)]
pub struct ConsoleLogClaim {
    path: PathBuf,
    previously: Previously,
}

impl ConsoleLogClaim {
    fn take(path: PathBuf) -> Self {
        let previously = match std::fs::symlink_metadata(&path) {
            Err(_) => Previously::Absent,
            Ok(meta) if meta.is_file() => Previously::File { len: meta.len() },
            Ok(_) => Previously::Other,
        };
        ConsoleLogClaim { path, previously }
    }

    /// Undoes what the arriving VM did to the file: removes it if it was new, cuts it back
    /// to its old length otherwise.
    pub fn release(self) -> std::io::Result<()> {
        match self.previously {
            Previously::Absent => match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Previously::File { len } => std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)?
                .set_len(len),
            Previously::Other => Ok(()),
        }
    }
}

/// Starts the VMM process of VM `name` (its socket and log in the state directory).
pub fn start_vmm(settings: &HostSettings, name: &str) -> Result<(Child, VmmClient), String> {
    let dir = settings.vmm_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("creating the VMM directory {}: {e}", dir.display()))?;
    let program = settings
        .vmm_program()
        .map_err(|e| format!("finding the VMM program: {e}"))?;
    ferry_vmm::spawn(
        &program,
        &settings.vmm_socket(name),
        &settings.vmm_log(name),
    )
    .map_err(|e| ferry_transport::report(&e))
}

/// Ends a VMM that holds nothing worth keeping (its VM failed to build).
fn stop_vmm(mut child: Child, vmm: VmmClient) {
    if vmm.shutdown().is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl HostActor {
    /// A host with these settings, CPU features (the host's, less hidden ones) and journal.
    pub fn new(
        settings: HostSettings,
        features: CpuFeatures,
        journal: Arc<Journal>,
        datastores: BTreeMap<String, Datastore>,
    ) -> Self {
        HostActor {
            settings: Arc::new(settings),
            features,
            journal: Arc::clone(&journal),
            datastores,
            vms: BTreeMap::new(),
            migrations: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            started_unix_ms: unix_ms(),
            maintenance: journal.maintenance().unwrap_or_else(|error| {
                // Unreadable: the safe side is to take nothing new until the operator
                // looks (`maintenance exit` rewrites the record).
                tracing::error!(%error, "reading the maintenance mode failed; assuming maintenance");
                Some(MaintenanceRecord { since_unix_ms: unix_ms() })
            }),
            evacuation: (None, None),
            metrics: HostMetrics::new(),
        }
    }

    /// Refuses what a host in maintenance does not take.
    fn check_not_in_maintenance(&self, what: &str) -> Result<(), String> {
        match self.maintenance {
            Some(_) => Err(format!(
                "host '{}' is in maintenance mode and takes no {what} (end it with: ferryctl host maintenance exit {})",
                self.settings.name, self.settings.name
            )),
            None => Ok(()),
        }
    }

    fn memory_used(&self) -> u64 {
        self.vms
            .values()
            .filter(|e| !matches!(e.state, Lifecycle::Stopped | Lifecycle::Crashed))
            .map(|e| e.memory)
            .sum()
    }

    fn active_migrations(&self) -> usize {
        self.migrations
            .values()
            .filter(|m| !m.report.is_final())
            .count()
    }

    fn vm_addr(&self, name: &str) -> Result<Addr<VmActor>, HostError> {
        match self.vms.get(name) {
            Some(VmEntry {
                addr: Some(addr), ..
            }) => Ok(addr.clone()),
            Some(_) => Err(HostError::new(
                ErrorKind::Conflict,
                format!("VM '{name}' is still being created"),
            )),
            None => Err(HostError::not_found_vm(&self.settings.name, name)),
        }
    }

    fn check_name(&self, name: &str) -> Result<(), HostError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(HostError::new(
                ErrorKind::BadRequest,
                format!("invalid VM name '{name}': use 1-64 letters, digits, '-', '_' or '.'"),
            ));
        }
        if let Some(entry) = self.vms.get(name)
            && entry.state != Lifecycle::Stopped
        {
            return Err(HostError::new(
                ErrorKind::Conflict,
                format!(
                    "a VM named '{name}' already exists on host '{}'",
                    self.settings.name
                ),
            ));
        }
        Ok(())
    }

    fn check_memory(&self, wanted: u64) -> Result<(), String> {
        let free = self.settings.memory.saturating_sub(self.memory_used());
        if wanted > free {
            return Err(format!(
                "host '{}' has {} MiB of VM memory free, the VM needs {} MiB",
                self.settings.name,
                free >> 20,
                wanted >> 20
            ));
        }
        Ok(())
    }

    fn remember_outcome(
        &mut self,
        id: MigrationId,
        outcome: DestinationOutcome,
        resumed_after_commit_ms: Option<f64>,
    ) {
        self.outcomes.insert(
            id,
            Outcome {
                outcome,
                resumed_after_commit_ms,
            },
        );
        while self.outcomes.len() > OUTCOMES_KEPT {
            self.outcomes.pop_first();
        }
    }

    fn prune_reports(&mut self) {
        let finished: Vec<MigrationId> = self
            .migrations
            .iter()
            .filter(|(_, m)| m.report.is_final())
            .map(|(id, _)| *id)
            .collect();
        let excess = finished.len().saturating_sub(REPORTS_KEPT);
        for id in finished.into_iter().take(excess) {
            self.migrations.remove(&id);
        }
    }

    /// The settings.
    pub fn settings(&self) -> &HostSettings {
        &self.settings
    }
}

impl Actor for HostActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(host = %self.settings.name, "host actor started");
        // Find the VMs that outlived the last hostd before answering anything: requests wait
        // in the mailbox meanwhile.
        let settings = Arc::clone(&self.settings);
        let journal = Arc::clone(&self.journal);
        let began = std::time::Instant::now();
        ctx.wait(
            actix_rt::task::spawn_blocking(move || reattach::discover(&settings, &journal))
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(Ok(found)) => {
                        let discovered_ms = began.elapsed().as_secs_f64() * 1e3;
                        let vms = found.live.len();
                        act.reattach(found, ctx);
                        tracing::info!(
                            vms,
                            discovered_ms,
                            reattached_ms = began.elapsed().as_secs_f64() * 1e3,
                            "VMs found again"
                        );
                        act.resume_evacuation(ctx);
                    }
                    Ok(Err(error)) => {
                        tracing::error!(%error, "reading the journal at start failed")
                    }
                    Err(error) => tracing::error!(%error, "reattaching VMs failed"),
                }),
        );
    }
}

impl HostActor {
    /// Takes over what [`reattach::discover`] found.
    fn reattach(&mut self, found: reattach::Found, ctx: &mut Context<Self>) {
        for note in &found.notes {
            tracing::warn!(host = %self.settings.name, "{note}");
        }
        for record in &found.settled {
            tracing::warn!(migration = %record.id, vm = %record.vm, role = ?record.role, phase = ?record.phase, "migration left open by the previous hostd, settled");
        }
        for live in found.live {
            let name = live.info.identity.name.clone();
            let (attachments, stale) = match &live.record {
                Some(record) => (
                    VmAttachments {
                        network: record.info.network.clone(),
                        ip: record.info.ip,
                        disks: record.info.disks.iter().map(VmDisk::reference).collect(),
                    },
                    record.stale,
                ),
                None => {
                    tracing::warn!(vm = %name, pid = live.client.process().pid, "VMM process with no record: reattached all the same");
                    (
                        VmAttachments {
                            network: None,
                            ip: None,
                            disks: Vec::new(),
                        },
                        false,
                    )
                }
            };
            let mut client = live.client;
            let interrupted = found
                .settled
                .iter()
                .find(|r| r.vm == name && r.role == Role::Source);
            let in_doubt = found.in_doubt.iter().any(|r| r.vm == name);
            if !in_doubt && (live.info.tracking || live.info.throttle > 0) {
                // A migration out of here died with the previous hostd before its commit:
                // the VM is as it was, without the migration's tracking and throttle.
                let cleared = client.set_throttle(0).and_then(|()| client.stop_tracking());
                if let Err(error) = cleared {
                    tracing::error!(vm = %name, error = %ferry_transport::report(&error), "clearing an interrupted migration's tracking failed");
                }
            }
            let mut run_state = live.info.run_state;
            if let Some(record) = interrupted
                && record.was_running
                && run_state == RunState::Paused
            {
                tracing::warn!(vm = %name, migration = %record.id, "resuming the VM: hostd restarted during its migration, before the switch-over");
                match client.resume() {
                    Ok(()) => run_state = RunState::Running,
                    Err(error) => {
                        tracing::error!(vm = %name, error = %ferry_transport::report(&error), "resuming failed")
                    }
                }
            }
            if let Some(record) = interrupted {
                let mut report = MigrationReport::starting(
                    record.id,
                    &name,
                    &self.settings.name,
                    &record.peer,
                    0,
                );
                report.stage = Some(Stage::RolledBack);
                report.status = "rolled_back".into();
                report.error = Some(format!(
                    "hostd restarted during the migration, before the switch-over; the VM stayed on '{}'",
                    self.settings.name
                ));
                self.migrations.insert(
                    record.id,
                    MigrationEntry {
                        report,
                        cancel: None,
                    },
                );
            }
            if found.resume.contains(&name) && run_state == RunState::Paused {
                tracing::info!(vm = %name, "resuming an arrived VM whose commit is on record");
                if let Err(error) = client.resume() {
                    tracing::error!(vm = %name, error = %ferry_transport::report(&error), "resuming failed");
                }
            }
            let state = if stale {
                Lifecycle::Stale
            } else if found.resume.contains(&name) {
                Lifecycle::Running
            } else {
                lifecycle_of(run_state)
            };
            tracing::info!(vm = %name, pid = client.process().pid, %state, "VM reattached");
            let actor = VmActor::new(
                client,
                VmmProcess::Adopted,
                &self.settings.name,
                attachments,
                (name.clone(), state),
            );
            let addr = actor.observed_by(ctx.address().recipient()).spawn();
            self.vms.insert(
                name.clone(),
                VmEntry {
                    addr: Some(addr.clone()),
                    memory: live.info.shape.memory,
                    state,
                    migration: None,
                },
            );
            if live.record.is_none() || found.resume.contains(&name) {
                self.record_vm_later(addr.clone(), stale);
            }
            if let Some(record) = found.in_doubt.iter().find(|r| r.vm == name) {
                self.recover_in_doubt(record.clone(), addr, ctx);
            }
        }
        for record in found.crashed {
            let name = record.info.name.clone();
            let why = format!(
                "VMM process {} was gone when hostd started: it ended while hostd was down, how is unknown",
                record.info.vmm_pid.unwrap_or(0)
            );
            tracing::error!(vm = %name, "{why}");
            let addr = VmActor::crashed(record.info.clone(), why).spawn();
            self.vms.insert(
                name,
                VmEntry {
                    addr: Some(addr),
                    memory: record.info.memory,
                    state: Lifecycle::Crashed,
                    migration: None,
                },
            );
        }
        if let Err(error) = self.journal.prune() {
            tracing::warn!(error = %ferry_transport::report(&error), "pruning the journal failed");
        }
    }

    /// Takes over a migration out of here whose commit went out before hostd restarted:
    /// the VM stays paused while the destination is asked (see `SourceMigration::recovering`).
    fn recover_in_doubt(
        &mut self,
        record: crate::journal::MigrationRecord,
        vm: Addr<VmActor>,
        ctx: &mut Context<Self>,
    ) {
        let Some(peer) = self.settings.peers.get(&record.peer).cloned() else {
            tracing::error!(migration = %record.id, vm = %record.vm, peer = %record.peer, "the destination of an in-doubt migration is not in the cluster configuration any more; the VM stays paused until it is");
            return;
        };
        if let Some(entry) = self.vms.get_mut(&record.vm) {
            entry.migration = Some(record.id);
        }
        let settings = Arc::clone(&self.settings);
        let journal = Arc::clone(&self.journal);
        let id = record.id;
        let name = record.vm.clone();
        ctx.spawn(
            async move { vm.send(BeginMigrateOut).await.map(|r| (r, vm)) }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let (mut outgoing, vm) = match result {
                        Ok((Ok(outgoing), vm)) => (outgoing, vm),
                        Ok((Err(e), _)) => {
                            return tracing::error!(migration = %id, vm = %name, error = %e, "cannot take over the in-doubt migration");
                        }
                        Err(e) => {
                            return tracing::error!(migration = %id, vm = %name, error = %e, "cannot take over the in-doubt migration");
                        }
                    };
                    outgoing.was_running = record.was_running;
                    if let Some(entry) = act.vms.get_mut(&name) {
                        entry.state = Lifecycle::MigratingOut;
                    }
                    let migration = SourceMigration::recovering(
                        record,
                        (settings, peer),
                        vm,
                        outgoing,
                        (ctx.address(), journal),
                    );
                    let report = migration.report().clone();
                    let addr = migration.start();
                    act.migrations.insert(
                        id,
                        MigrationEntry {
                            report,
                            cancel: Some(addr.recipient()),
                        },
                    );
                }),
        );
    }

    /// Records a VM in the inventory once its actor can say what it is.
    fn record_vm_later(&self, addr: Addr<VmActor>, stale: bool) {
        let journal = Arc::clone(&self.journal);
        actix_rt::spawn(async move {
            if let Ok(info) = addr.send(GetInfo).await {
                let name = info.name.clone();
                let record = VmRecord { info, stale };
                let written = actix_rt::task::spawn_blocking(move || journal.put_vm(&record)).await;
                if let Ok(Err(error)) = written {
                    tracing::error!(vm = %name, error = %ferry_transport::report(&error), "recording the VM failed");
                }
            }
        });
    }

    /// Forgets a VM in the inventory (gone to another host).
    fn forget_vm(&self, name: &str) {
        actix_rt::spawn(remove_vm_record(
            Arc::clone(&self.journal),
            name.to_string(),
        ));
    }
}

/// Removes a VM's inventory record (off the actor's thread); a failure is logged.
async fn remove_vm_record(journal: Arc<Journal>, name: String) {
    let written = actix_rt::task::spawn_blocking({
        let name = name.clone();
        move || journal.remove_vm(&name)
    })
    .await;
    if let Ok(Err(error)) = written {
        tracing::error!(vm = %name, error = %ferry_transport::report(&error), "removing the VM's record failed");
    }
}

/// Creates a VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, HostError>")]
pub struct CreateVm(pub VmSpec);

impl Handler<CreateVm> for HostActor {
    type Result = ResponseActFuture<Self, Result<VmInfo, HostError>>;

    fn handle(&mut self, CreateVm(spec): CreateVm, ctx: &mut Self::Context) -> Self::Result {
        let identity = VmIdentity::new(&spec.name);
        let checked = (|| {
            self.check_not_in_maintenance("new VMs")
                .map_err(|m| HostError::new(ErrorKind::Conflict, m))?;
            self.check_name(&spec.name)?;
            if spec.vcpus == 0 {
                return Err(HostError::new(
                    ErrorKind::BadRequest,
                    "a VM needs at least one vCPU",
                ));
            }
            self.check_memory(spec.memory)
                .map_err(|m| HostError::new(ErrorKind::Conflict, m))?;
            let network = match &spec.network {
                Some(net) if !self.settings.networks.contains_key(net) => {
                    return Err(HostError::new(
                        ErrorKind::BadRequest,
                        format!(
                            "network '{net}' is not present on host '{}' (it has: {})",
                            self.settings.name,
                            self.settings
                                .networks
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                Some(net) => Some(net.clone()),
                None => self.settings.networks.keys().next().cloned(),
            };
            if let Some(unknown) = spec
                .hide_cpu_features
                .iter()
                .find(|f| !ferry_runtime::cpu::is_known_feature(f))
            {
                return Err(HostError::new(
                    ErrorKind::BadRequest,
                    format!("unknown CPU feature '{unknown}' to hide"),
                ));
            }
            // A network with a bridge here gives the VM a NIC on it.
            let nics: Vec<NicSpec> = network
                .iter()
                .filter_map(|net| {
                    Some(NicSpec {
                        network: net.clone(),
                        bridge: self.settings.bridge(net)?.to_string(),
                        mac: identity.mac,
                        ip: spec.ip,
                        attach: true,
                    })
                })
                .collect();
            let disks = self.resolve_disks(&spec.disks, &nics)?;
            Ok((network, disks, nics))
        })();
        let (network, disks, nics) = match checked {
            Ok(checked) => checked,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        self.vms.insert(
            spec.name.clone(),
            VmEntry {
                addr: None,
                memory: spec.memory,
                state: Lifecycle::Created,
                migration: None,
            },
        );
        let create = CreateSpec {
            identity,
            vcpus: spec.vcpus,
            memory: spec.memory,
            boot: spec.boot.clone(),
            preloads: spec.preloads.clone(),
            dirty_log: DirtyLogMode::Bitmap,
            console_log: Some(console_log_path(&self.settings.state_dir, &spec.name)),
            hidden_cpu_features: {
                let mut hidden = self.settings.hidden_cpu_features.clone();
                hidden.extend(spec.hide_cpu_features.iter().cloned());
                hidden
            },
            disks: disks.specs,
            nics,
            start: spec.start,
        };
        let host = self.settings.name.clone();
        let attachments = VmAttachments {
            network,
            ip: spec.ip,
            disks: disks.refs,
        };
        let created_images = disks.created;
        let name = spec.name.clone();
        let settings = Arc::clone(&self.settings);
        let observer = ctx.address().recipient();
        let build = async move {
            // Starting a process, loading preloads and booting: blocking work, off the
            // actor's thread.
            let built = actix_rt::task::spawn_blocking(move || {
                let (child, mut vmm) = start_vmm(&settings, &create.identity.name)?;
                match vmm.create(create) {
                    Ok(_) => Ok((child, vmm)),
                    Err(e) => {
                        let message = ferry_transport::report(&e);
                        stop_vmm(child, vmm);
                        Err(message)
                    }
                }
            })
            .await;
            match built {
                Ok(Ok((child, vmm))) => {
                    let mut actor = VmActor::new(
                        vmm,
                        VmmProcess::Child(child),
                        &host,
                        attachments,
                        (spec.name.clone(), Lifecycle::Created),
                    );
                    if spec.start {
                        // Already resumed by the VMM; record it.
                        actor.mark_started();
                    }
                    Ok(actor.observed_by(observer).spawn())
                }
                Ok(Err(message)) => {
                    // Nothing left behind: images this request created go again.
                    for image in &created_images {
                        if let Err(error) = std::fs::remove_file(image) {
                            tracing::warn!(image = %image.display(), %error, "removing a disk image of a VM that was not created failed");
                        }
                    }
                    Err(HostError::new(
                        ErrorKind::BadRequest,
                        format!("cannot create VM: {message}"),
                    ))
                }
                Err(e) => Err(HostError::new(
                    ErrorKind::Internal,
                    format!("VM creation task failed: {e}"),
                )),
            }
        };
        let started = spec.start;
        Box::pin(build.into_actor(self).then(move |result, act, _| {
            let addr = match result {
                Ok(addr) => {
                    if let Some(entry) = act.vms.get_mut(&name) {
                        entry.addr = Some(addr.clone());
                        entry.state = if started {
                            Lifecycle::Running
                        } else {
                            Lifecycle::Created
                        };
                    }
                    act.record_vm_later(addr.clone(), false);
                    Ok(addr)
                }
                Err(e) => {
                    act.vms.remove(&name);
                    Err(e)
                }
            };
            async move { Ok(addr?.send(GetInfo).await?) }.into_actor(act)
        }))
    }
}

/// All VMs.
#[derive(Debug, Message)]
#[rtype(result = "Vec<VmInfo>")]
pub struct ListVms;

impl Handler<ListVms> for HostActor {
    type Result = ResponseFuture<Vec<VmInfo>>;

    fn handle(&mut self, _: ListVms, _: &mut Self::Context) -> Self::Result {
        let addrs: Vec<Addr<VmActor>> = self.vms.values().filter_map(|e| e.addr.clone()).collect();
        Box::pin(async move {
            join_all(addrs.iter().map(|a| a.send(GetInfo)))
                .await
                .into_iter()
                .filter_map(Result::ok)
                .collect()
        })
    }
}

/// One VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, HostError>")]
pub struct GetVm(pub String);

impl Handler<GetVm> for HostActor {
    type Result = ResponseFuture<Result<VmInfo, HostError>>;

    fn handle(&mut self, GetVm(name): GetVm, _: &mut Self::Context) -> Self::Result {
        let addr = self.vm_addr(&name);
        Box::pin(async move { Ok(addr?.send(GetInfo).await?) })
    }
}

/// Pause, resume or stop a VM.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, HostError>")]
pub struct OperateVm {
    /// VM name.
    pub name: String,
    /// `Resume`, `Pause` or `Stop`.
    pub event: Event,
}

impl Handler<OperateVm> for HostActor {
    type Result = ResponseActFuture<Self, Result<VmInfo, HostError>>;

    fn handle(&mut self, msg: OperateVm, _: &mut Self::Context) -> Self::Result {
        let addr = self.vm_addr(&msg.name);
        let name = msg.name.clone();
        let event = msg.event;
        let journal = Arc::clone(&self.journal);
        Box::pin(
            async move {
                let info = addr?.send(Operate(event)).await??;
                if info.state == Lifecycle::Stopped {
                    // Stopped is answered once it is durable: a hostd killed right after
                    // must not find the VM's record and call it crashed.
                    remove_vm_record(journal, info.name.clone()).await;
                }
                Ok(info)
            }
            .into_actor(self)
            .map(move |result: Result<VmInfo, HostError>, act, _| {
                if let (Ok(info), Some(entry)) = (&result, act.vms.get_mut(&name)) {
                    entry.state = info.state;
                    // Recovered from a stale copy: an ordinary VM again.
                    if info.state == Lifecycle::Running
                        && event == Event::RecoverStale
                        && let Some(addr) = entry.addr.clone()
                    {
                        act.record_vm_later(addr, false);
                    }
                }
                result
            }),
        )
    }
}

/// Console output of a VM from an absolute offset, with a live feed.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, Vec<u8>, Receiver<Vec<u8>>), HostError>")]
pub struct ConsoleOf {
    /// VM name.
    pub name: String,
    /// Absolute byte offset to start from.
    pub offset: u64,
}

impl Handler<ConsoleOf> for HostActor {
    type Result = ResponseFuture<Result<(u64, Vec<u8>, Receiver<Vec<u8>>), HostError>>;

    fn handle(&mut self, msg: ConsoleOf, _: &mut Self::Context) -> Self::Result {
        let addr = self.vm_addr(&msg.name);
        let offset = msg.offset;
        Box::pin(async move { Ok(addr?.send(FollowConsole { offset }).await??) })
    }
}

/// Host summary.
#[derive(Debug, Message)]
#[rtype(result = "HostInfo")]
pub struct GetHostInfo;

impl Handler<GetHostInfo> for HostActor {
    type Result = ResponseFuture<HostInfo>;

    fn handle(&mut self, _: GetHostInfo, _: &mut Self::Context) -> Self::Result {
        let s = &self.settings;
        let mut info = HostInfo {
            name: s.name.clone(),
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            datacenter: s.datacenter.clone(),
            memory_total: s.memory,
            memory_used: self.memory_used(),
            cpu_features: self
                .features
                .names()
                .iter()
                .map(|n| n.to_string())
                .collect(),
            hidden_cpu_features: s.hidden_cpu_features.clone(),
            networks: s.networks.keys().cloned().collect(),
            bridges: s.bridges(),
            datastores: self.datastores.values().map(Datastore::info).collect(),
            copy_cpus: s.copy_cpus.clone(),
            peers: s.peers.keys().cloned().collect(),
            tls: s.tls.is_some(),
            default_encryption: s.default_encryption().as_str().into(),
            vms: Vec::new(),
            migrations: self
                .migrations
                .values()
                .filter(|m| !m.report.is_final())
                .map(|m| m.report.clone())
                .collect(),
            maintenance: self.maintenance.clone(),
            evacuation: self.evacuation.1.clone(),
        };
        let addrs: Vec<Addr<VmActor>> = self.vms.values().filter_map(|e| e.addr.clone()).collect();
        Box::pin(async move {
            info.vms = join_all(addrs.iter().map(|a| a.send(GetInfo)))
                .await
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            info
        })
    }
}

/// Starts migrating a VM of this host to another host.
#[derive(Debug, Message)]
#[rtype(result = "Result<MigrationReport, HostError>")]
pub struct StartMigration {
    /// VM name.
    pub vm: String,
    /// Destination host.
    pub to: String,
    /// Options (unset fields take the host's defaults).
    pub options: MigrationOptions,
}

impl Handler<StartMigration> for HostActor {
    type Result = ResponseActFuture<Self, Result<MigrationReport, HostError>>;

    fn handle(&mut self, msg: StartMigration, _: &mut Self::Context) -> Self::Result {
        let checked = (|| {
            let addr = self.vm_addr(&msg.vm)?;
            if msg.to == self.settings.name {
                return Err(HostError::new(
                    ErrorKind::BadRequest,
                    format!("VM '{}' is already on host '{}'", msg.vm, msg.to),
                ));
            }
            let peer = self.settings.peers.get(&msg.to).cloned().ok_or_else(|| {
                HostError::new(
                    ErrorKind::NotFound,
                    format!(
                        "no host named '{}' in the cluster (hosts: {})",
                        msg.to,
                        std::iter::once(self.settings.name.clone())
                            .chain(self.settings.peers.keys().cloned())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            if let Some(id) = self.vms.get(&msg.vm).and_then(|e| e.migration) {
                return Err(HostError::new(
                    ErrorKind::Conflict,
                    format!("VM '{}' is already migrating (migration {id})", msg.vm),
                ));
            }
            if self.active_migrations() >= self.settings.migration.max_concurrent {
                return Err(HostError::new(
                    ErrorKind::Conflict,
                    format!(
                        "host '{}' already runs {} migrations, its limit",
                        self.settings.name, self.settings.migration.max_concurrent
                    ),
                ));
            }
            if msg.options.keep_source_disks
                && msg.options.datastore.is_none()
                && msg.options.disk_targets.is_empty()
            {
                return Err(HostError::new(
                    ErrorKind::BadRequest,
                    "keep_source_disks applies to a storage migration only (give a datastore or disk targets)",
                ));
            }
            if msg.options.streams == 0 || msg.options.downtime_ms == 0 {
                return Err(HostError::new(
                    ErrorKind::BadRequest,
                    "streams and downtime must be at least 1",
                ));
            }
            Ok((addr, peer))
        })();
        let (vm_addr, peer) = match checked {
            Ok(v) => v,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let id = MigrationId::new_v4();
        // Reserve the VM for this migration before anything asynchronous happens.
        if let Some(entry) = self.vms.get_mut(&msg.vm) {
            entry.migration = Some(id);
        }
        let settings = Arc::clone(&self.settings);
        let vm_name = msg.vm.clone();
        let placement = (
            msg.options.datastore.clone(),
            msg.options.disk_targets.clone(),
        );
        Box::pin(
            async move {
                // Where the disks go is checked before the VM is touched: a bad placement
                // is the operator's error, not a failed migration.
                let info = vm_addr.send(GetInfo).await?;
                let disks: Vec<DiskRef> = info.disks.iter().map(VmDisk::reference).collect();
                if let Err(e) =
                    crate::datastore::storage_targets(&disks, placement.0.as_deref(), &placement.1)
                {
                    return Ok((Err(HostError::new(ErrorKind::BadRequest, e)), vm_addr));
                }
                let begun = vm_addr
                    .send(BeginMigrateOut)
                    .await?
                    .map_err(HostError::from);
                Ok::<_, MailboxError>((begun, vm_addr))
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                let failed = |act: &mut Self, error: HostError| {
                    if let Some(entry) = act.vms.get_mut(&vm_name) {
                        entry.migration = None;
                    }
                    Err(error)
                };
                let (outgoing, vm_addr) = match result {
                    Ok((Ok(outgoing), addr)) => (outgoing, addr),
                    Ok((Err(e), _)) => return failed(act, e),
                    Err(e) => return failed(act, e.into()),
                };
                if let Some(entry) = act.vms.get_mut(&vm_name) {
                    entry.state = Lifecycle::MigratingOut;
                }
                let migration = SourceMigration::new(
                    id,
                    settings,
                    peer,
                    msg.options,
                    vm_addr,
                    outgoing,
                    (ctx.address(), Arc::clone(&act.journal)),
                );
                let report = migration.report().clone();
                let addr = migration.start();
                act.migrations.insert(
                    id,
                    MigrationEntry {
                        report: report.clone(),
                        cancel: Some(addr.recipient()),
                    },
                );
                Ok(report)
            }),
        )
    }
}

/// A migration actor's latest report.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct MigrationUpdate(pub MigrationReport);

impl Handler<MigrationUpdate> for HostActor {
    type Result = ();

    fn handle(&mut self, MigrationUpdate(report): MigrationUpdate, _: &mut Self::Context) {
        let Ok(id) = report.id.parse::<MigrationId>() else {
            return;
        };
        let is_source = report.source == self.settings.name;
        if report.is_final() && is_source {
            if let Some(entry) = self.vms.get_mut(&report.vm) {
                entry.migration = None;
            }
            match report.stage {
                Some(Stage::Completed) => {
                    // The VM lives on the destination now.
                    self.vms.remove(&report.vm);
                    self.forget_vm(&report.vm);
                }
                Some(Stage::LostAfterSwitchOver) => {
                    if let Some(addr) = self.vms.get(&report.vm).and_then(|e| e.addr.clone()) {
                        self.record_vm_later(addr, true);
                    }
                }
                _ => {}
            }
        }
        let was_final = self
            .migrations
            .get(&id)
            .is_some_and(|m| m.report.is_final());
        if report.is_final() && !was_final {
            let role = if is_source {
                metrics::Role::Source
            } else {
                metrics::Role::Destination
            };
            self.metrics.migration_ended(role, &report);
            // An evacuation starts its next VM as soon as a slot frees, not at its next poll.
            if let Some(evacuation) = self.evacuation.0.as_ref().filter(|_| is_source) {
                evacuation.do_send(MigrationEnded);
            }
        }
        let entry = self.migrations.entry(id).or_insert(MigrationEntry {
            report: report.clone(),
            cancel: None,
        });
        entry.report = report;
        if entry.report.is_final() {
            entry.cancel = None;
        }
        self.prune_reports();
    }
}

/// A source VM's lifecycle after a rollback (cached for admission).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct VmStateChanged {
    /// VM name.
    pub vm: String,
    /// New state.
    pub state: Lifecycle,
}

impl Handler<VmStateChanged> for HostActor {
    type Result = ();

    fn handle(&mut self, msg: VmStateChanged, _: &mut Self::Context) {
        if let Some(entry) = self.vms.get_mut(&msg.vm) {
            entry.state = msg.state;
        }
    }
}

/// The host's metrics in the OpenMetrics text format.
#[derive(Debug, Message)]
#[rtype(result = "String")]
pub struct RenderMetrics;

impl Handler<RenderMetrics> for HostActor {
    type Result = String;

    fn handle(&mut self, _: RenderMetrics, _: &mut Self::Context) -> Self::Result {
        let in_flight = |outgoing: bool| {
            self.migrations
                .values()
                .filter(|m| !m.report.is_final())
                .filter(|m| (m.report.source == self.settings.name) == outgoing)
                .count()
        };
        let gauges = HostGauges {
            vm_states: self.vms.values().map(|e| e.state).collect(),
            memory_bytes: self.memory_used(),
            outgoing: in_flight(true),
            incoming: in_flight(false),
            maintenance: self.maintenance.is_some(),
        };
        self.metrics.render(&gauges)
    }
}

/// One migration's report.
#[derive(Debug, Message)]
#[rtype(result = "Result<MigrationReport, HostError>")]
pub struct GetMigration(pub String);

impl Handler<GetMigration> for HostActor {
    type Result = Result<MigrationReport, HostError>;

    fn handle(&mut self, GetMigration(id): GetMigration, _: &mut Self::Context) -> Self::Result {
        let parsed = id.parse::<MigrationId>().map_err(|_| {
            HostError::new(
                ErrorKind::BadRequest,
                format!("'{id}' is not a migration ID"),
            )
        })?;
        self.migrations
            .get(&parsed)
            .map(|m| m.report.clone())
            .ok_or_else(|| {
                HostError::new(
                    ErrorKind::NotFound,
                    format!("no migration {id} on host '{}'", self.settings.name),
                )
            })
    }
}

/// All migrations this host knows of (recent finished ones too).
#[derive(Debug, Message)]
#[rtype(result = "Vec<MigrationReport>")]
pub struct ListMigrations;

impl Handler<ListMigrations> for HostActor {
    type Result = MessageResult<ListMigrations>;

    fn handle(&mut self, _: ListMigrations, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.migrations.values().map(|m| m.report.clone()).collect())
    }
}

/// Asks a migration actor to cancel.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), String>")]
pub struct CancelRequest;

/// Cancels the migration of a VM (only before switch-over).
#[derive(Debug, Message)]
#[rtype(result = "Result<MigrationReport, HostError>")]
pub struct CancelMigration(pub String);

impl Handler<CancelMigration> for HostActor {
    type Result = ResponseFuture<Result<MigrationReport, HostError>>;

    fn handle(
        &mut self,
        CancelMigration(vm): CancelMigration,
        _: &mut Self::Context,
    ) -> Self::Result {
        let found = self
            .migrations
            .values()
            .find(|m| m.report.vm == vm && !m.report.is_final() && m.cancel.is_some())
            .map(|m| (m.report.clone(), m.cancel.clone()));
        let host = self.settings.name.clone();
        Box::pin(async move {
            let Some((report, Some(cancel))) = found else {
                return Err(HostError::new(
                    ErrorKind::NotFound,
                    format!("no migration of VM '{vm}' is in progress from host '{host}'"),
                ));
            };
            cancel
                .send(CancelRequest)
                .await
                // The migration actor is gone: it just finished, one way or the other.
                .map_err(|_| {
                    HostError::new(
                        ErrorKind::Conflict,
                        format!(
                            "too late to cancel: migration {} of VM '{vm}' has already ended",
                            report.id
                        ),
                    )
                })?
                .map_err(|m| HostError::new(ErrorKind::Conflict, m))?;
            Ok(report)
        })
    }
}

/// Destination, stage verify: can this host take the VM?
#[derive(Debug, Message)]
#[rtype(result = "Result<(), String>")]
pub struct AdmitIncoming(pub Box<Hello>);

impl Handler<AdmitIncoming> for HostActor {
    type Result = Result<(), String>;

    fn handle(
        &mut self,
        AdmitIncoming(hello): AdmitIncoming,
        _: &mut Self::Context,
    ) -> Self::Result {
        self.admit(&hello)
    }
}

/// Destination, stage prepare: build the empty VM and reserve its resources.
#[derive(Debug, Message)]
#[rtype(result = "Result<(Addr<VmActor>, ConsoleLogClaim, Vec<PathBuf>), String>")]
pub struct PrepareIncoming {
    /// The source's description.
    pub hello: Box<Hello>,
    /// Initial report for the destination's record.
    pub report: MigrationReport,
}

impl Handler<PrepareIncoming> for HostActor {
    type Result =
        ResponseActFuture<Self, Result<(Addr<VmActor>, ConsoleLogClaim, Vec<PathBuf>), String>>;

    fn handle(&mut self, msg: PrepareIncoming, ctx: &mut Self::Context) -> Self::Result {
        let hello = msg.hello;
        if let Err(reason) = self.admit(&hello) {
            return Box::pin(fut::ready(Err(reason)));
        }
        let arriving = match self.arriving_disks(&hello) {
            Ok(arriving) => arriving,
            Err(message) => return Box::pin(fut::ready(Err(message))),
        };
        let nics = match self.arriving_nics(&hello) {
            Ok(nics) => nics,
            Err(message) => return Box::pin(fut::ready(Err(message))),
        };
        let id = hello.id;
        let name = hello.identity.name.clone();
        self.vms.insert(
            name.clone(),
            VmEntry {
                addr: None,
                memory: hello.shape.memory,
                state: Lifecycle::MigratingIn,
                migration: Some(id),
            },
        );
        self.remember_outcome(id, DestinationOutcome::InProgress, None);
        self.migrations.insert(
            id,
            MigrationEntry {
                report: msg.report,
                cancel: None,
            },
        );
        let host = self.settings.name.clone();
        let console = console_log_path(&self.settings.state_dir, &name);
        let claim = ConsoleLogClaim::take(console.clone());
        let name_for_build = name.clone();
        let attachments = VmAttachments {
            network: hello.networks.first().cloned(),
            ip: hello.ip,
            disks: arriving.refs,
        };
        let disks = arriving.specs;
        let to_create = arriving.create;
        let created: Vec<PathBuf> = to_create.iter().map(|(path, _)| path.clone()).collect();
        let remove_created = move |created: &[PathBuf]| {
            for image in created {
                if let Err(error) = std::fs::remove_file(image) {
                    tracing::warn!(image = %image.display(), %error, "removing a partial image failed");
                }
            }
        };
        let fault = self.settings.fault;
        let settings = Arc::clone(&self.settings);
        let observer = ctx.address().recipient();
        let build = async move {
            let built = actix_rt::task::spawn_blocking(move || {
                if fault == Some(Fault::FailPrepare) {
                    tracing::warn!("fault injection: failing to build the arriving VM");
                    let error = ferry_runtime::memory::MemoryError::CreateMemfd {
                        size: hello.shape.memory,
                        source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                    };
                    return Err(ferry_transport::report(&error));
                }
                // Compute + storage: fresh sparse images in the target datastore, which the
                // bulk copy fills (its zero blocks stay holes).
                for (index, (path, size)) in to_create.iter().enumerate() {
                    if let Err(e) =
                        ferry_runtime::devices::virtio::block::DiskImage::create_new_sparse(
                            path, *size,
                        )
                    {
                        remove_created(&created[..index]);
                        return Err(ferry_transport::report(&e));
                    }
                }
                let fail = |message: String| {
                    remove_created(&created);
                    message
                };
                let (child, mut vmm) = start_vmm(&settings, &hello.identity.name).map_err(fail)?;
                let empty = EmptySpec {
                    identity: hello.identity.clone(),
                    shape: hello.shape.clone(),
                    boot: hello.boot.clone(),
                    dirty_log: DirtyLogMode::Bitmap,
                    console_log: Some(console),
                    disks,
                    nics,
                };
                match vmm.create_empty(empty) {
                    Ok(_) => Ok((child, vmm, created)),
                    Err(e) => {
                        let message = ferry_transport::report(&e);
                        stop_vmm(child, vmm);
                        Err(fail(message))
                    }
                }
            })
            .await;
            match built {
                Ok(Ok((child, vmm, created))) => {
                    let actor = VmActor::new(
                        vmm,
                        VmmProcess::Child(child),
                        &host,
                        attachments,
                        (name_for_build, Lifecycle::MigratingIn),
                    );
                    Ok((actor.observed_by(observer).spawn(), claim, created))
                }
                Ok(Err(message)) => {
                    if let Err(error) = claim.release() {
                        tracing::warn!(%error, "restoring the console log failed");
                    }
                    Err(format!("host '{host}' cannot build the VM: {message}"))
                }
                Err(e) => Err(format!("VM build task failed: {e}")),
            }
        };
        Box::pin(build.into_actor(self).map(move |result, act, _| {
            match &result {
                Ok((addr, _, _)) => {
                    if let Some(entry) = act.vms.get_mut(&name) {
                        entry.addr = Some(addr.clone());
                    }
                }
                Err(_) => {
                    act.vms.remove(&name);
                    act.remember_outcome(id, DestinationOutcome::Discarded, None);
                }
            }
            result
        }))
    }
}

/// Room a storage migration leaves free in the target datastore beyond what it copies.
const STORAGE_MARGIN: u64 = 64 << 20;

/// An arriving VM's disks on this host.
struct ArrivingDisks {
    specs: Vec<DiskSpec>,
    refs: Vec<DiskRef>,
    /// Images to create (compute + storage): path and size.
    create: Vec<(PathBuf, u64)>,
}

/// A new VM's disks, resolved on this host.
struct ResolvedDisks {
    specs: Vec<DiskSpec>,
    refs: Vec<DiskRef>,
    /// Images created for this VM (removed again if it cannot be built).
    created: Vec<PathBuf>,
}

impl HostActor {
    fn datastore(&self, name: &str) -> Result<&Datastore, String> {
        self.datastores.get(name).ok_or_else(|| {
            format!(
                "host '{}' has no datastore '{name}' (it has: {})",
                self.settings.name,
                if self.datastores.is_empty() {
                    "none".to_string()
                } else {
                    self.datastores
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )
        })
    }

    /// Checks a new VM's disk requests (they share the virtio slots with its `nics`) and
    /// creates the images that are missing.
    fn resolve_disks(
        &self,
        requests: &[DiskRequest],
        nics: &[NicSpec],
    ) -> Result<ResolvedDisks, HostError> {
        let bad = |m: String| HostError::new(ErrorKind::BadRequest, m);
        let max = ferry_runtime::layout::MAX_VIRTIO_DEVICES;
        if requests.len() + nics.len() > max {
            let nics = match nics {
                [] => String::new(),
                [nic] => format!(" and a NIC on network '{}'", nic.network),
                more => format!(" and {} NICs", more.len()),
            };
            return Err(bad(format!(
                "a VM has at most {max} virtio devices: {} disks{nics} were asked for",
                requests.len()
            )));
        }
        let mut resolved = ResolvedDisks {
            specs: Vec::new(),
            refs: Vec::new(),
            created: Vec::new(),
        };
        let result = (|| {
            for request in requests {
                request.check().map_err(bad)?;
                let store = self.datastore(&request.datastore).map_err(bad)?;
                let path = store.image_path(&request.file);
                if resolved.specs.iter().any(|d: &DiskSpec| d.path == path) {
                    return Err(bad(format!(
                        "disk {}:{} is given twice",
                        request.datastore, request.file
                    )));
                }
                if !path.exists() {
                    let size = request.size.ok_or_else(|| {
                        bad(format!(
                            "disk image {}:{} does not exist; give a size to create it ({}:{},size=4G)",
                            request.datastore, request.file, request.datastore, request.file
                        ))
                    })?;
                    ferry_runtime::devices::virtio::block::DiskImage::create_sparse(&path, size)
                        .map_err(|e| bad(ferry_transport::report(&e)))?;
                    resolved.created.push(path.clone());
                }
                resolved.specs.push(DiskSpec {
                    path,
                    read_only: request.read_only,
                    id: request.file.clone(),
                    lock: true,
                });
                resolved.refs.push(DiskRef {
                    datastore: request.datastore.clone(),
                    file: request.file.clone(),
                    read_only: request.read_only,
                });
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(resolved),
            Err(e) => {
                for image in &resolved.created {
                    let _ = std::fs::remove_file(image);
                }
                Err(e)
            }
        }
    }

    /// An arriving VM's disks on this host: every one on a datastore this host shares with
    /// the source (same identity), with its image there, of the same size. Compute-only
    /// migration moves no disk, so anything else is refused at verify.
    /// The arriving VM's NICs as this host builds them: each on this host's bridge for its
    /// network, kept off it until the state is in. Refused if a network has no bridge here.
    fn arriving_nics(&self, hello: &Hello) -> Result<Vec<NicSpec>, String> {
        hello
            .nics
            .iter()
            .map(|network| {
                let bridge = self
                    .settings
                    .bridge(network)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        format!(
                            "the VM has a NIC on network '{network}', which has no bridge on host '{}'",
                            self.settings.name
                        )
                    })?;
                Ok(NicSpec {
                    network: network.clone(),
                    bridge,
                    mac: hello.identity.mac,
                    ip: hello.ip,
                    attach: false,
                })
            })
            .collect()
    }

    fn arriving_disks(&self, hello: &Hello) -> Result<ArrivingDisks, String> {
        if hello.moves_storage() {
            return self.disks_moving_to(hello);
        }
        let specs = hello
            .disks
            .iter()
            .map(|m| {
                let store = self.datastore(&m.disk.datastore).map_err(|e| {
                    format!("{e}; a compute-only migration needs every disk on a datastore both hosts share")
                })?;
                // Read now, not at start: what is mounted there may have changed.
                let store = Datastore::open(&store.name, &store.path).map_err(|e| e.to_string())?;
                if store.identity != m.identity {
                    return Err(format!(
                        "datastore '{}' is not shared: host '{}' sees identity {} at {}, host '{}' sees {}; a compute-only migration needs the same storage on both hosts",
                        m.disk.datastore,
                        self.settings.name,
                        store.identity,
                        store.path.display(),
                        hello.source_host,
                        m.identity
                    ));
                }
                let path = store.image_path(&m.disk.file);
                let size = std::fs::metadata(&path).map(|md| md.len()).map_err(|e| {
                    format!(
                        "disk image {}:{} is not there on host '{}' ({}: {e})",
                        m.disk.datastore,
                        m.disk.file,
                        self.settings.name,
                        path.display()
                    )
                })?;
                if size != m.size {
                    return Err(format!(
                        "disk image {}:{} is {size} bytes on host '{}' but {} on '{}'",
                        m.disk.datastore, m.disk.file, self.settings.name, m.size, hello.source_host
                    ));
                }
                Ok(DiskSpec {
                    path,
                    read_only: m.disk.read_only,
                    id: m.disk.file.clone(),
                    lock: false,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ArrivingDisks {
            specs,
            refs: hello.disks.iter().map(|m| m.disk.clone()).collect(),
            create: Vec::new(),
        })
    }

    /// Compute + storage: every disk gets a new image in its target datastore here, which
    /// must exist, have room for what the source images moving to it hold (plus a margin),
    /// and not have an image of that name already.
    fn disks_moving_to(&self, hello: &Hello) -> Result<ArrivingDisks, String> {
        let mut arriving = ArrivingDisks {
            specs: Vec::new(),
            refs: Vec::new(),
            create: Vec::new(),
        };
        let mut stores: BTreeMap<&str, (Datastore, u64)> = BTreeMap::new();
        for m in &hello.disks {
            let Some(target) = m.target.as_deref() else {
                return Err(format!(
                    "disk {} has no target datastore: a storage migration moves every disk",
                    m.disk.name()
                ));
            };
            if !stores.contains_key(target) {
                let store = self.datastore(target)?;
                let store = Datastore::open(&store.name, &store.path).map_err(|e| e.to_string())?;
                stores.insert(target, (store, STORAGE_MARGIN));
            }
            let (store, needed) = stores.get_mut(target).expect("inserted above");
            *needed += m.allocated;
            if !m
                .size
                .is_multiple_of(ferry_transport::memory::PAGE_SIZE as u64)
            {
                return Err(format!(
                    "disk image {} is {} bytes; a storage migration moves images of whole 4 KiB pages",
                    m.disk.name(),
                    m.size
                ));
            }
            let path = store.image_path(&m.disk.file);
            if path.exists() || arriving.create.iter().any(|(p, _)| *p == path) {
                return Err(format!(
                    "datastore '{target}' on host '{}' already has an image named '{}' ({}); Ferry does not overwrite it",
                    self.settings.name,
                    m.disk.file,
                    path.display()
                ));
            }
            arriving.specs.push(DiskSpec {
                path: path.clone(),
                read_only: m.disk.read_only,
                id: m.disk.file.clone(),
                lock: false,
            });
            arriving.refs.push(DiskRef {
                datastore: target.to_string(),
                file: m.disk.file.clone(),
                read_only: m.disk.read_only,
            });
            arriving.create.push((path, m.size));
        }
        for (target, (store, needed)) in &stores {
            let free = store.info().free_bytes;
            if free < *needed {
                return Err(format!(
                    "datastore '{target}' on host '{}' has {} free; the disks moving there need {} (what their images hold, plus a {} margin)",
                    self.settings.name,
                    ferry_runtime::units::format_bytes(free),
                    ferry_runtime::units::format_bytes(*needed),
                    ferry_runtime::units::format_bytes(STORAGE_MARGIN)
                ));
            }
        }
        Ok(arriving)
    }

    /// Stage verify on the destination: name free, memory, CPU features, networks, limits.
    fn admit(&self, hello: &Hello) -> Result<(), String> {
        self.check_not_in_maintenance("incoming migrations")?;
        let name = &hello.identity.name;
        if self
            .vms
            .get(name)
            .is_some_and(|e| e.state != Lifecycle::Stopped)
        {
            return Err(format!(
                "host '{}' already has a VM named '{name}'",
                self.settings.name
            ));
        }
        self.check_memory(hello.shape.memory)?;
        check_compatible(&hello.cpu_features, &self.features)
            .map_err(|e| format!("host '{}': {e}", self.settings.name))?;
        for network in &hello.networks {
            if !self.settings.networks.contains_key(network) {
                return Err(format!(
                    "network '{network}' is not present on host '{}'",
                    self.settings.name
                ));
            }
        }
        self.arriving_nics(hello)?;
        self.arriving_disks(hello)?;
        // The arriving migration has published its own report by now: it does not count
        // against the limit it is being checked for.
        let others = self
            .migrations
            .iter()
            .filter(|(id, m)| **id != hello.id && !m.report.is_final())
            .count();
        if others >= self.settings.migration.max_concurrent {
            return Err(format!(
                "host '{}' already runs {} migrations, its limit",
                self.settings.name, self.settings.migration.max_concurrent
            ));
        }
        Ok(())
    }
}

/// Destination: how an arriving VM ended up.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct IncomingFinished {
    /// Migration.
    pub id: MigrationId,
    /// VM name.
    pub vm: String,
    /// Owned (running or paused here) or discarded.
    pub outcome: DestinationOutcome,
    /// Lifecycle after it.
    pub state: Lifecycle,
    /// From receiving `Commit` to the VM running, when it was resumed here.
    pub resumed_after_commit_ms: Option<f64>,
}

impl Handler<IncomingFinished> for HostActor {
    type Result = ();

    fn handle(&mut self, msg: IncomingFinished, _: &mut Self::Context) {
        self.remember_outcome(msg.id, msg.outcome, msg.resumed_after_commit_ms);
        match msg.outcome {
            DestinationOutcome::Owned => {
                if let Some(entry) = self.vms.get_mut(&msg.vm) {
                    entry.state = msg.state;
                    entry.migration = None;
                    if let Some(addr) = entry.addr.clone() {
                        self.record_vm_later(addr, false);
                    }
                }
            }
            _ => {
                if self
                    .vms
                    .get(&msg.vm)
                    .is_some_and(|e| e.migration == Some(msg.id))
                {
                    self.vms.remove(&msg.vm);
                }
            }
        }
    }
}

/// What a destination answers when asked how a migration ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutcomeAnswer {
    /// What it knows.
    pub outcome: DestinationOutcome,
    /// The journal the answer comes from.
    pub journal: uuid::Uuid,
    /// From receiving `Commit` to the VM running, when it resumed it.
    pub resumed_after_commit_ms: Option<f64>,
}

/// Destination: what do we know about migration `id`? From this process's memory, else from
/// the journal, which outlives restarts.
#[derive(Debug, Message)]
#[rtype(result = "OutcomeAnswer")]
pub struct QueryOutcome(pub MigrationId);

impl Handler<QueryOutcome> for HostActor {
    type Result = MessageResult<QueryOutcome>;

    fn handle(&mut self, QueryOutcome(id): QueryOutcome, _: &mut Self::Context) -> Self::Result {
        let journal = self.journal.id();
        if let Some(known) = self.outcomes.get(&id) {
            return MessageResult(OutcomeAnswer {
                outcome: known.outcome,
                journal,
                resumed_after_commit_ms: known.resumed_after_commit_ms,
            });
        }
        let (outcome, resumed_after_commit_ms) = match self.journal.get(id) {
            Ok(None) => (DestinationOutcome::Unknown, None),
            // Asked about a migration out of here: this host is no destination of it.
            Ok(Some(record)) if record.role == Role::Source => (DestinationOutcome::Unknown, None),
            Ok(Some(record)) => (
                match record.phase {
                    Phase::Preparing | Phase::Committed => DestinationOutcome::InProgress,
                    Phase::Resumed => DestinationOutcome::Owned,
                    Phase::Discarded => DestinationOutcome::Discarded,
                    Phase::Lost => DestinationOutcome::Lost,
                },
                record.resumed_after_commit_ms,
            ),
            Err(error) => {
                // No answer is better than a wrong one: the source keeps asking.
                tracing::error!(migration = %id, error = %ferry_transport::report(&error), "reading the journal");
                (DestinationOutcome::InProgress, None)
            }
        };
        MessageResult(OutcomeAnswer {
            outcome,
            journal,
            resumed_after_commit_ms,
        })
    }
}

/// The host's settings (for the control server and the API).
#[derive(Debug, Message)]
#[rtype(result = "Arc<HostSettings>")]
pub struct GetSettings;

impl Handler<GetSettings> for HostActor {
    type Result = MessageResult<GetSettings>;

    fn handle(&mut self, _: GetSettings, _: &mut Self::Context) -> Self::Result {
        MessageResult(Arc::clone(&self.settings))
    }
}

/// Resolves to an event name for lifecycle operations from the API.
pub fn parse_operation(op: &str) -> Option<Event> {
    match op {
        "pause" => Some(Event::Pause),
        "resume" | "start" => Some(Event::Resume),
        "stop" => Some(Event::Stop),
        _ => None,
    }
}

/// What this host can take, for another host's placement (`Describe`).
#[derive(Debug, Message)]
#[rtype(result = "HostFacts")]
pub struct DescribeHost;

impl Handler<DescribeHost> for HostActor {
    type Result = MessageResult<DescribeHost>;

    fn handle(&mut self, _: DescribeHost, _: &mut Self::Context) -> Self::Result {
        MessageResult(HostFacts {
            name: self.settings.name.clone(),
            memory_free: self.settings.memory.saturating_sub(self.memory_used()),
            cpu: self.features.clone(),
            networks: self.settings.networks.keys().cloned().collect(),
            bridged: self.settings.bridges().into_keys().collect(),
            datastores: self
                .datastores
                .values()
                .map(|d| {
                    let info = d.info();
                    DatastoreFacts {
                        name: info.name,
                        identity: info.identity,
                        free_bytes: info.free_bytes,
                    }
                })
                .collect(),
            maintenance: self.maintenance.is_some(),
            max_concurrent: self.settings.migration.max_concurrent,
            active_migrations: self.active_migrations(),
        })
    }
}

/// Puts the host in maintenance mode (durably), and with `evacuate` moves its VMs away.
#[derive(Debug, Message)]
#[rtype(result = "Result<MaintenanceStatus, HostError>")]
pub struct EnterMaintenance {
    /// Migrate every VM off the host.
    pub evacuate: bool,
    /// A cap on all of the evacuation's migrations together, bytes per second.
    pub total_bandwidth: Option<u64>,
    /// Where disks that no destination shares move to (`None`: such VMs stay).
    pub datastore: Option<String>,
    /// Options for every migration.
    pub options: MigrationOptions,
}

impl HostActor {
    fn maintenance_status(&self) -> MaintenanceStatus {
        MaintenanceStatus {
            host: self.settings.name.clone(),
            maintenance: self.maintenance.clone(),
            evacuation: self.evacuation.1.clone(),
        }
    }

    fn set_maintenance(&mut self, mode: Option<MaintenanceRecord>) -> Result<(), HostError> {
        self.journal.set_maintenance(mode.as_ref()).map_err(|e| {
            HostError::new(
                ErrorKind::Internal,
                format!(
                    "recording the maintenance mode: {}",
                    ferry_transport::report(&e)
                ),
            )
        })?;
        tracing::info!(host = %self.settings.name, on = mode.is_some(), "maintenance mode");
        self.maintenance = mode;
        Ok(())
    }

    /// What placement needs of every VM here, and why a VM cannot move at all.
    fn candidates(&self) -> impl Future<Output = Vec<Candidate>> + use<> {
        let vms: Vec<(String, u64, Lifecycle, Option<Addr<VmActor>>)> = self
            .vms
            .iter()
            .map(|(name, e)| (name.clone(), e.memory, e.state, e.addr.clone()))
            .collect();
        let identities: BTreeMap<String, String> = self
            .datastores
            .iter()
            .map(|(name, d)| (name.clone(), d.identity.clone()))
            .collect();
        async move {
            let mut candidates = Vec::new();
            for (name, memory, state, addr) in vms {
                let mut needs = VmNeeds {
                    name: name.clone(),
                    memory,
                    cpu: Default::default(),
                    networks: Vec::new(),
                    nics: Vec::new(),
                    disks: Vec::new(),
                };
                let obstacle = match (state, addr) {
                    (Lifecycle::Running | Lifecycle::Paused | Lifecycle::Created, Some(addr)) => {
                        match (addr.send(GetInfo).await, addr.send(GetCpuFeatures).await) {
                            (Ok(info), Ok(Ok(cpu))) => {
                                needs.cpu = cpu;
                                needs.networks = info.network.into_iter().collect();
                                needs.nics = info.nics.iter().map(|n| n.network.clone()).collect();
                                needs.disks = info
                                    .disks
                                    .iter()
                                    .map(|d| DiskNeeds {
                                        datastore: d.datastore.clone(),
                                        identity: identities
                                            .get(&d.datastore)
                                            .cloned()
                                            .unwrap_or_default(),
                                        allocated: d.allocated,
                                    })
                                    .collect();
                                None
                            }
                            (_, Ok(Err(e))) => Some(format!("cannot read its CPU features: {e}")),
                            _ => Some("its actor did not answer".into()),
                        }
                    }
                    (Lifecycle::Created | Lifecycle::Running | Lifecycle::Paused, None) => {
                        Some("it is still being created".into())
                    }
                    (state, _) => Some(format!(
                        "it is {} and cannot migrate",
                        lifecycle_name(state)
                    )),
                };
                candidates.push(Candidate { needs, obstacle });
            }
            candidates
        }
    }
}

fn lifecycle_name(state: Lifecycle) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{state:?}"))
}

impl Handler<EnterMaintenance> for HostActor {
    type Result = ResponseActFuture<Self, Result<MaintenanceStatus, HostError>>;

    fn handle(&mut self, msg: EnterMaintenance, _: &mut Self::Context) -> Self::Result {
        if self.evacuation.0.as_ref().is_some_and(Addr::connected) {
            return Box::pin(fut::ready(Err(HostError::new(
                ErrorKind::Conflict,
                format!("host '{}' is already being evacuated", self.settings.name),
            ))));
        }
        if msg.options.streams == 0 || msg.options.downtime_ms == 0 {
            return Box::pin(fut::ready(Err(HostError::new(
                ErrorKind::BadRequest,
                "streams and downtime must be at least 1",
            ))));
        }
        if let Some(Err(e)) = msg.total_bandwidth.map(SharedCap::new) {
            return Box::pin(fut::ready(Err(HostError::new(ErrorKind::BadRequest, e))));
        }
        if self.maintenance.is_none()
            && let Err(e) = self.set_maintenance(Some(MaintenanceRecord {
                since_unix_ms: unix_ms(),
            }))
        {
            return Box::pin(fut::ready(Err(e)));
        }
        if !msg.evacuate {
            return Box::pin(fut::ready(Ok(self.maintenance_status())));
        }
        let record = EvacuationRecord {
            since_unix_ms: unix_ms(),
            options: msg.options,
            datastore: msg.datastore,
            total_bandwidth: msg.total_bandwidth,
        };
        // Durable before it starts, so that a restarted hostd carries it on.
        if let Err(e) = self.journal.set_evacuation(Some(&record)) {
            return Box::pin(fut::ready(Err(HostError::new(
                ErrorKind::Internal,
                format!("recording the evacuation: {}", ferry_transport::report(&e)),
            ))));
        }
        Box::pin(
            self.start_evacuation(record)
                .map(|started, act, _| started.map(|()| act.maintenance_status())),
        )
    }
}

impl HostActor {
    /// Places the VMs here and starts the evacuation of `record` (already in the journal).
    fn start_evacuation(
        &mut self,
        record: EvacuationRecord,
    ) -> impl ActorFuture<Self, Output = Result<(), HostError>> + use<> {
        self.candidates()
            .into_actor(self)
            .map(move |candidates, act, ctx| {
                if act.maintenance.is_none() {
                    return Err(HostError::new(
                        ErrorKind::Conflict,
                        "maintenance mode ended before the evacuation began",
                    ));
                }
                let mut options = record.options;
                options.shared_cap = record
                    .total_bandwidth
                    .and_then(|rate| SharedCap::new(rate).ok());
                let evacuation = Evacuation::new(
                    ctx.address(),
                    Arc::clone(&act.settings),
                    candidates,
                    (record.datastore, options),
                );
                act.evacuation.1 = Some(evacuation.report().clone());
                act.evacuation.0 = Some(evacuation.start());
                Ok(())
            })
    }

    /// At start: carries on the evacuation the previous hostd left unfinished, once the
    /// migrations it left open are settled (a VM whose migration is still being recovered
    /// would otherwise count as "already migrating" and stay).
    fn resume_evacuation(&mut self, ctx: &mut Context<Self>) {
        if self.maintenance.is_none() {
            return;
        }
        match self.journal.evacuation() {
            Ok(Some(record)) => self.resume_when_settled(record, ctx, 0),
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "reading the unfinished evacuation failed; run maintenance enter again");
            }
        }
    }

    /// Starts `record` once no migration is open, or after [`RESUME_WAITS`] looks.
    fn resume_when_settled(
        &mut self,
        record: EvacuationRecord,
        ctx: &mut Context<Self>,
        waited: u32,
    ) {
        if self.active_migrations() > 0 && waited < RESUME_WAITS {
            ctx.run_later(RESUME_PAUSE, move |act, ctx| {
                act.resume_when_settled(record, ctx, waited + 1);
            });
            return;
        }
        tracing::info!(
            host = %self.settings.name,
            since_unix_ms = record.since_unix_ms,
            "resuming the evacuation that the last hostd left unfinished"
        );
        ctx.spawn(self.start_evacuation(record).map(|started, _, _| {
            if let Err(error) = started {
                tracing::warn!(%error, "the evacuation was not resumed");
            }
        }));
    }

    fn forget_evacuation(&self) {
        if let Err(error) = self.journal.set_evacuation(None) {
            tracing::error!(%error, "removing the finished evacuation from the journal failed");
        }
    }
}

/// How often, and how many times, a restarted hostd looks whether the migrations it found
/// open are settled before it resumes an evacuation (then it resumes anyway).
const RESUME_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);
const RESUME_WAITS: u32 = 120;

/// Ends maintenance mode; an evacuation in progress starts no more migrations (those
/// running finish).
#[derive(Debug, Message)]
#[rtype(result = "Result<MaintenanceStatus, HostError>")]
pub struct ExitMaintenance;

impl Handler<ExitMaintenance> for HostActor {
    type Result = Result<MaintenanceStatus, HostError>;

    fn handle(&mut self, _: ExitMaintenance, _: &mut Self::Context) -> Self::Result {
        if let Some(evacuation) = &self.evacuation.0 {
            evacuation.do_send(StopEvacuation);
        }
        self.set_maintenance(None)?;
        self.forget_evacuation();
        Ok(self.maintenance_status())
    }
}

/// Maintenance mode and the latest evacuation.
#[derive(Debug, Message)]
#[rtype(result = "MaintenanceStatus")]
pub struct GetMaintenance;

impl Handler<GetMaintenance> for HostActor {
    type Result = MessageResult<GetMaintenance>;

    fn handle(&mut self, _: GetMaintenance, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.maintenance_status())
    }
}

/// The evacuation's latest report.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct EvacuationUpdate(pub EvacuationReport);

impl Handler<EvacuationUpdate> for HostActor {
    type Result = ();

    fn handle(&mut self, EvacuationUpdate(report): EvacuationUpdate, _: &mut Self::Context) {
        if report.is_finished() {
            self.evacuation.0 = None;
            self.forget_evacuation();
        }
        self.evacuation.1 = Some(report);
    }
}
