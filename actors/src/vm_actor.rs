//! VmActor: one per VM, the VM's actor in hostd and the proxy of its VMM process
//! (`ferry_vmm`). The VM itself — KVM, vCPUs, devices, memory — lives in that process and
//! outlives hostd; this actor drives it over its socket, maps its memory when a migration
//! needs it, and notices when the process ends. It runs on its own arbiter (thread), so the
//! few milliseconds a dirty-log fetch or a state capture take never stall the host's API.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use crate::datastore::{DiskRef, VmDisk};
use actix::prelude::*;
use ferry_runtime::cpu::CpuFeatures;
use ferry_runtime::vm::RunState;
use ferry_runtime::{DirtySet, GuestRam, VmIdentity, VmShape};
use ferry_vmm::protocol::{ProcessInfo, VmmErrorKind};
use ferry_vmm::{IncomingState, VmmClient, VmmClientError, VmmInfo};
use serde::{Deserialize, Serialize};

use crate::lifecycle::{Event, InvalidTransition, Lifecycle, next};

/// Errors from VM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmActorError {
    /// Not allowed in the VM's current state.
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// The VMM refused or failed.
    #[error(transparent)]
    Vmm(#[from] VmmClientError),
    /// The VM is gone (stopped, or its VMM process ended).
    #[error("VM '{0}' is {1}")]
    Gone(String, Lifecycle),
    /// Incoming state could not be decoded or did not match.
    #[error("{0}")]
    BadState(String),
}

/// What the API shows about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// MAC address.
    pub mac: String,
    /// Host it is on.
    pub host: String,
    /// Lifecycle state.
    pub state: Lifecycle,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// What it booted.
    pub guest: String,
    /// Network it is attached to.
    pub network: Option<String>,
    /// Its IPv4 address, if configured.
    pub ip: Option<Ipv4Addr>,
    /// Current throttle, percent.
    pub throttle_pct: u8,
    /// Latest progress value the guest reported through the test device.
    pub guest_progress: u32,
    /// Failed checks the guest reported.
    pub guest_failures: u64,
    /// Exit statuses per vCPU of guests that finished.
    pub guest_exits: BTreeMap<u32, u32>,
    /// Bytes of console output.
    pub console_bytes: u64,
    /// Process ID of its VMM process (while it has one).
    pub vmm_pid: Option<u32>,
    /// When that process started, milliseconds since the Unix epoch.
    pub vmm_started_unix_ms: Option<u64>,
    /// How the VMM process ended, when the VM crashed.
    pub crash: Option<String>,
    /// Disks, in slot order.
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    /// NICs, in slot order: network, bridge, this host's TAP, frames moved.
    #[serde(default)]
    pub nics: Vec<ferry_runtime::devices::NicInfo>,
}

/// Host-side facts about a VM that are not part of the runtime VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAttachments {
    /// Network name.
    pub network: Option<String>,
    /// IPv4 address.
    pub ip: Option<Ipv4Addr>,
    /// Disks, by datastore and file.
    #[serde(default)]
    pub disks: Vec<DiskRef>,
}

/// How this hostd knows the VMM process: it started it (and can reap it), or found it
/// running (started by an earlier hostd).
#[derive(Debug)]
pub enum VmmProcess {
    /// Started by this hostd.
    Child(Child),
    /// Started by an earlier hostd; watched through a connection of its own.
    Adopted,
}

/// The VM's actor.
#[derive(Debug)]
pub struct VmActor {
    name: String,
    host: String,
    vmm: Option<VmmClient>,
    socket: PathBuf,
    process: ProcessInfo,
    /// Until `started` hands it to the watcher thread.
    watch: Option<VmmProcess>,
    /// Guest memory mapped here, for migrations.
    ram: Option<Arc<GuestRam>>,
    lifecycle: Lifecycle,
    attachments: VmAttachments,
    /// Info kept after the VMM is gone.
    last_info: Option<VmInfo>,
    crash: Option<String>,
    /// Told when the VM changes state on its own (its VMM process ended).
    observer: Option<Recipient<crate::host_actor::VmStateChanged>>,
}

impl VmActor {
    /// Tells `observer` of state changes nobody asked for.
    pub fn observed_by(mut self, observer: Recipient<crate::host_actor::VmStateChanged>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The actor of the VM served by `vmm`, in `lifecycle` (`Created` for a new VM,
    /// `MigratingIn` for an arriving copy, what it was for a reattached one).
    pub fn new(
        vmm: VmmClient,
        watch: VmmProcess,
        host: &str,
        attachments: VmAttachments,
        (name, lifecycle): (String, Lifecycle),
    ) -> Self {
        VmActor {
            name,
            host: host.to_string(),
            socket: vmm.socket().to_path_buf(),
            process: vmm.process().clone(),
            vmm: Some(vmm),
            watch: Some(watch),
            ram: None,
            lifecycle,
            attachments,
            last_info: None,
            crash: None,
            observer: None,
        }
    }

    /// The actor of a VM whose VMM is gone: it shows as `crashed`, with `why`.
    pub fn crashed(last: VmInfo, why: String) -> Self {
        VmActor {
            name: last.name.clone(),
            host: last.host.clone(),
            vmm: None,
            socket: PathBuf::new(),
            process: ProcessInfo {
                pid: last.vmm_pid.unwrap_or(0),
                started_unix_ms: last.vmm_started_unix_ms.unwrap_or(0),
                has_vm: false,
            },
            watch: None,
            ram: None,
            lifecycle: Lifecycle::Crashed,
            attachments: VmAttachments {
                network: last.network.clone(),
                ip: last.ip,
                disks: last.disks.iter().map(VmDisk::reference).collect(),
            },
            last_info: Some(last),
            crash: Some(why),
            observer: None,
        }
    }

    /// Records that the VM was resumed before the actor took it over.
    pub fn mark_started(&mut self) {
        if let Ok(to) = next(self.lifecycle, Event::Resume) {
            self.lifecycle = to;
        }
    }

    /// Starts the actor on a new arbiter of its own.
    pub fn spawn(self) -> Addr<VmActor> {
        let arbiter = Arbiter::new();
        VmActor::start_in_arbiter(&arbiter.handle(), move |_| self)
    }

    fn vmm(&mut self) -> Result<&mut VmmClient, VmActorError> {
        let (name, state) = (self.name.clone(), self.lifecycle);
        self.vmm.as_mut().ok_or(VmActorError::Gone(name, state))
    }

    fn transition(&mut self, event: Event) -> Result<Lifecycle, VmActorError> {
        let to = next(self.lifecycle, event)?;
        if to != self.lifecycle {
            tracing::info!(vm = %self.name, from = %self.lifecycle, to = %to, "VM state change");
        }
        self.lifecycle = to;
        Ok(to)
    }

    fn describe(&self, info: &VmmInfo) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            uuid: info.identity.uuid.to_string(),
            mac: info.identity.mac_string(),
            host: self.host.clone(),
            state: self.lifecycle,
            vcpus: info.shape.vcpus,
            memory: info.shape.memory,
            guest: info.boot.clone(),
            network: self.attachments.network.clone(),
            ip: self.attachments.ip,
            throttle_pct: info.throttle,
            guest_progress: info.test.progress,
            guest_failures: info.test.failure_count,
            guest_exits: info.test.exits.clone(),
            console_bytes: info.console_bytes,
            vmm_pid: Some(self.process.pid),
            vmm_started_unix_ms: Some(self.process.started_unix_ms),
            crash: None,
            disks: self
                .attachments
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| VmDisk::describe(d, info.disks.get(i)))
                .collect(),
            nics: info.nics.clone(),
        }
    }

    fn info(&mut self) -> VmInfo {
        let live = match self.vmm.as_mut() {
            Some(vmm) => vmm.info().ok(),
            None => None,
        };
        let mut info = match live {
            Some(live) => {
                let info = self.describe(&live);
                self.last_info = Some(info.clone());
                info
            }
            None => self.last_info.clone().unwrap_or(VmInfo {
                name: self.name.clone(),
                uuid: String::new(),
                mac: String::new(),
                host: self.host.clone(),
                state: self.lifecycle,
                vcpus: 0,
                memory: 0,
                guest: String::new(),
                network: self.attachments.network.clone(),
                ip: self.attachments.ip,
                throttle_pct: 0,
                guest_progress: 0,
                guest_failures: 0,
                guest_exits: BTreeMap::new(),
                console_bytes: 0,
                vmm_pid: None,
                vmm_started_unix_ms: None,
                crash: None,
                disks: self
                    .attachments
                    .disks
                    .iter()
                    .map(|d| VmDisk::describe(d, None))
                    .collect(),
                nics: Vec::new(),
            }),
        };
        info.state = self.lifecycle;
        info.crash = self.crash.clone();
        if self.vmm.is_none() {
            info.vmm_pid = None;
            info.throttle_pct = 0;
        }
        info
    }

    /// The last info seen, with the current lifecycle: for answers on the critical path of a
    /// migration, where another round trip to the VMM would lengthen the guest's pause.
    fn info_cached(&mut self) -> VmInfo {
        match self.last_info.clone() {
            Some(mut info) => {
                info.state = self.lifecycle;
                info.crash = self.crash.clone();
                info
            }
            None => self.info(),
        }
    }

    /// Stops the VM for good: its VMM stops it and ends. Keeps the last info for display.
    fn release(&mut self) {
        let _ = self.info();
        self.ram = None;
        if let Some(vmm) = self.vmm.take()
            && let Err(error) = vmm.shutdown()
        {
            tracing::warn!(vm = %self.name, error = %ferry_transport::report(&error), "stopping the VMM failed");
        }
    }

    /// Guest memory, mapped here once and kept for the copy workers.
    fn ram(&mut self) -> Result<Arc<GuestRam>, VmActorError> {
        if let Some(ram) = &self.ram {
            return Ok(Arc::clone(ram));
        }
        let ram = Arc::new(self.vmm()?.memory()?);
        self.ram = Some(Arc::clone(&ram));
        Ok(ram)
    }

    /// Watches the VMM process and tells this actor when it ends.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        let Some(process) = self.watch.take() else {
            return;
        };
        let addr = ctx.address();
        let socket = self.socket.clone();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vmm-watch-{name}"))
            .spawn(move || {
                let how = match process {
                    VmmProcess::Child(mut child) => match child.wait() {
                        Ok(status) => describe_exit(status),
                        Err(e) => format!("its status could not be read: {e}"),
                    },
                    VmmProcess::Adopted => {
                        // An idle connection of our own ends when the process does.
                        if let Ok(client) = VmmClient::connect(&socket) {
                            client.wait_closed();
                        }
                        "exited (how is unknown: an earlier hostd started it)".to_string()
                    }
                };
                addr.do_send(VmmExited(how));
            });
        if let Err(error) = spawned {
            tracing::error!(vm = %self.name, %error, "cannot watch the VMM process");
        }
    }
}

/// How a process ended, in words.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => format!("ended ({status})"),
    }
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.watch(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // hostd stopping (a restart, an upgrade) leaves the VM running in its VMM process;
        // only an explicit stop, a completed migration or a discarded copy ends it.
        self.ram = None;
        self.vmm = None;
        // The arbiter was created for this actor alone.
        Arbiter::current().stop();
    }
}

/// The VMM process ended.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct VmmExited(String);

impl Handler<VmmExited> for VmActor {
    type Result = ();

    fn handle(&mut self, VmmExited(how): VmmExited, _: &mut Self::Context) {
        if self.vmm.is_none() {
            // Asked to end (stop, migrated away, discarded): nothing crashed.
            return;
        }
        tracing::error!(vm = %self.name, pid = self.process.pid, %how, "the VM's VMM process ended; the VM crashed");
        self.vmm = None;
        self.ram = None;
        self.crash = Some(format!("VMM process {} {how}", self.process.pid));
        if self.transition(Event::VmmExited).is_err() {
            self.lifecycle = Lifecycle::Crashed;
        }
        if let Some(observer) = &self.observer {
            observer.do_send(crate::host_actor::VmStateChanged {
                vm: self.name.clone(),
                state: Lifecycle::Crashed,
            });
        }
    }
}

/// Current info.
#[derive(Debug, Message)]
#[rtype(result = "VmInfo")]
pub struct GetInfo;

impl Handler<GetInfo> for VmActor {
    type Result = MessageResult<GetInfo>;

    fn handle(&mut self, _: GetInfo, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.info())
    }
}

/// An operator lifecycle operation: `Resume`, `Pause`, `Stop` or `RecoverStale`.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, VmActorError>")]
pub struct Operate(pub Event);

impl Handler<Operate> for VmActor {
    type Result = Result<VmInfo, VmActorError>;

    fn handle(&mut self, Operate(event): Operate, _: &mut Self::Context) -> Self::Result {
        next(self.lifecycle, event)?;
        match event {
            Event::Resume | Event::RecoverStale => self.vmm()?.resume()?,
            Event::Pause => self.vmm()?.pause()?,
            Event::Stop => self.release(),
            _ => {
                return Err(InvalidTransition {
                    state: self.lifecycle,
                    event,
                }
                .into());
            }
        }
        self.transition(event)?;
        Ok(self.info())
    }
}

/// Console output from an absolute offset, the offset it starts at, and a live feed.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, Vec<u8>, Receiver<Vec<u8>>), VmActorError>")]
pub struct FollowConsole {
    /// Absolute byte offset to start from (0: all retained history).
    pub offset: u64,
}

impl Handler<FollowConsole> for VmActor {
    type Result = Result<(u64, Vec<u8>, Receiver<Vec<u8>>), VmActorError>;

    fn handle(&mut self, msg: FollowConsole, _: &mut Self::Context) -> Self::Result {
        self.vmm()?;
        Ok(VmmClient::follow_console(&self.socket, msg.offset)?)
    }
}

/// What the source side of a migration needs from the VM.
#[derive(Debug, Clone)]
pub struct OutgoingVm {
    /// Guest RAM, mapped here for the copy workers.
    pub ram: Arc<GuestRam>,
    /// Identity.
    pub identity: VmIdentity,
    /// Shape (with CPUID).
    pub shape: VmShape,
    /// CPU features of the CPUID.
    pub cpu_features: CpuFeatures,
    /// Boot description.
    pub boot: String,
    /// Whether it was running when the migration began.
    pub was_running: bool,
    /// Network and IP.
    pub attachments: VmAttachments,
    /// The disks as the VMM has them.
    pub disks: Vec<ferry_runtime::DiskInfo>,
    /// The NICs as the VMM has them.
    pub nics: Vec<ferry_runtime::devices::NicInfo>,
}

/// The CPU features of the VM's CPUID (what a host must offer to take it).
#[derive(Debug, Message)]
#[rtype(result = "Result<CpuFeatures, VmActorError>")]
pub struct GetCpuFeatures;

impl Handler<GetCpuFeatures> for VmActor {
    type Result = Result<CpuFeatures, VmActorError>;

    fn handle(&mut self, _: GetCpuFeatures, _: &mut Self::Context) -> Self::Result {
        Ok(self.vmm()?.info()?.cpu_features)
    }
}

/// Begins migrating the VM away: lifecycle → `MigratingOut`.
#[derive(Debug, Message)]
#[rtype(result = "Result<OutgoingVm, VmActorError>")]
pub struct BeginMigrateOut;

impl Handler<BeginMigrateOut> for VmActor {
    type Result = Result<OutgoingVm, VmActorError>;

    fn handle(&mut self, _: BeginMigrateOut, _: &mut Self::Context) -> Self::Result {
        let was_running = self.lifecycle == Lifecycle::Running;
        next(self.lifecycle, Event::MigrateOutBegin)?;
        let info = self.vmm()?.info()?;
        let ram = self.ram()?;
        let outgoing = OutgoingVm {
            ram,
            identity: info.identity,
            shape: info.shape,
            cpu_features: info.cpu_features,
            boot: info.boot,
            was_running,
            attachments: self.attachments.clone(),
            disks: info.disks,
            nics: info.nics,
        };
        self.transition(Event::MigrateOutBegin)?;
        Ok(outgoing)
    }
}

/// Dirty-log control for migration. Both operations answer with the pages the next round
/// must send.
#[derive(Debug, Message)]
#[rtype(result = "Result<DirtySet, VmActorError>")]
pub enum DirtyLog {
    /// Start tracking; the answer is round one: every populated page, read after tracking
    /// went on (see `Vm::begin_tracking`).
    Start,
    /// Fetch and clear: the pages written since the last answer.
    Fetch,
}

impl Handler<DirtyLog> for VmActor {
    type Result = Result<DirtySet, VmActorError>;

    fn handle(&mut self, op: DirtyLog, _: &mut Self::Context) -> Self::Result {
        let vmm = self.vmm()?;
        Ok(match op {
            DirtyLog::Start => vmm.begin_tracking()?,
            DirtyLog::Fetch => vmm.fetch_dirty()?,
        })
    }
}

/// Disk-write recording for a storage migration: per disk, `(offset, length)` extents.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Vec<(u64, u64)>>, VmActorError>")]
pub enum DiskLog {
    /// Start recording; the answer is the extents each image holds data in (round one).
    Start {
        /// Granularity, bytes.
        chunk: u64,
    },
    /// What was written since the last answer.
    Fetch,
}

impl Handler<DiskLog> for VmActor {
    type Result = Result<Vec<Vec<(u64, u64)>>, VmActorError>;

    fn handle(&mut self, op: DiskLog, _: &mut Self::Context) -> Self::Result {
        let vmm = self.vmm()?;
        Ok(match op {
            DiskLog::Start { chunk } => vmm.begin_disk_tracking(chunk)?,
            DiskLog::Fetch => vmm.fetch_dirty_blocks()?,
        })
    }
}

/// Sets the guest throttle (percent).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VmActorError>")]
pub struct SetThrottle(pub u8);

impl Handler<SetThrottle> for VmActor {
    type Result = Result<(), VmActorError>;

    fn handle(&mut self, SetThrottle(percent): SetThrottle, _: &mut Self::Context) -> Self::Result {
        Ok(self.vmm()?.set_throttle(percent)?)
    }
}

/// The VM's state for the destination.
#[derive(Debug)]
pub struct CapturedState {
    /// Encoded `VmState`.
    pub blob: Vec<u8>,
    /// Console history.
    pub console: Vec<u8>,
    /// Bytes the console has received in the VM's life.
    pub console_total: u64,
    /// Memory hash, if asked.
    pub memory_hash: Option<u128>,
}

/// What stop-and-copy needs from the paused VM, in one step.
#[derive(Debug)]
pub struct Frozen {
    /// When the vCPUs were asked to stop.
    pub paused_at: Instant,
    /// Pages written since the last fetch.
    pub dirty: DirtySet,
    /// Per disk, extents written since the last fetch.
    pub dirty_disks: Vec<Vec<(u64, u64)>>,
    /// Per disk, the image's hash (with `--verify`).
    pub disk_hashes: Vec<[u8; 16]>,
    /// Registers, devices, console.
    pub state: CapturedState,
}

/// Stop-and-copy on the source: pauses the vCPUs (lifecycle stays `MigratingOut`), takes the
/// last dirty pages and captures the state — one request to the VMM, so the guest's pause is
/// not stretched by round trips.
#[derive(Debug, Message)]
#[rtype(result = "Result<Frozen, VmActorError>")]
pub struct Freeze {
    /// Hash guest memory too (`--verify`).
    pub hash_memory: bool,
    /// Hash the disk images too (`--verify` of a storage migration).
    pub hash_disks: bool,
}

impl Handler<Freeze> for VmActor {
    type Result = Result<Frozen, VmActorError>;

    fn handle(&mut self, msg: Freeze, _: &mut Self::Context) -> Self::Result {
        let paused_at = Instant::now();
        let frozen = self.vmm()?.freeze(msg.hash_memory, msg.hash_disks)?;
        Ok(Frozen {
            paused_at,
            dirty: frozen.dirty,
            dirty_disks: frozen.dirty_disks,
            disk_hashes: frozen.disk_hashes,
            state: CapturedState {
                blob: frozen.blob,
                console: frozen.console,
                console_total: frozen.console_total,
                memory_hash: frozen.memory_hash.map(u128::from_le_bytes),
            },
        })
    }
}

/// Ends a migration on the source.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, VmActorError>")]
pub enum EndMigrateOut {
    /// The migration failed or was cancelled: the VM continues here as it was.
    RollBack {
        /// Whether to resume it (it was running before).
        was_running: bool,
    },
    /// The destination owns the VM: release this copy.
    Complete,
    /// The destination committed and then lost the VM: keep this copy paused, as `Stale`.
    Stale,
}

impl Handler<EndMigrateOut> for VmActor {
    type Result = Result<VmInfo, VmActorError>;

    fn handle(&mut self, msg: EndMigrateOut, _: &mut Self::Context) -> Self::Result {
        match msg {
            EndMigrateOut::RollBack { was_running } => {
                let event = Event::MigrateOutRollback { was_running };
                next(self.lifecycle, event)?;
                let vmm = self.vmm()?;
                vmm.set_throttle(0)?;
                vmm.stop_tracking()?;
                if was_running {
                    vmm.resume()?;
                } else {
                    vmm.pause()?;
                }
                self.ram = None;
                self.transition(event)?;
            }
            EndMigrateOut::Complete => {
                next(self.lifecycle, Event::MigrateOutComplete)?;
                self.release();
                self.transition(Event::MigrateOutComplete)?;
            }
            EndMigrateOut::Stale => {
                next(self.lifecycle, Event::MigrateOutLost)?;
                let vmm = self.vmm()?;
                vmm.set_throttle(0)?;
                vmm.stop_tracking()?;
                self.ram = None;
                self.transition(Event::MigrateOutLost)?;
            }
        }
        Ok(self.info_cached())
    }
}

/// Guest RAM of an arriving VM, for the receivers.
#[derive(Debug, Message)]
#[rtype(result = "Result<Arc<GuestRam>, VmActorError>")]
pub struct IncomingRam;

impl Handler<IncomingRam> for VmActor {
    type Result = Result<Arc<GuestRam>, VmActorError>;

    fn handle(&mut self, _: IncomingRam, _: &mut Self::Context) -> Self::Result {
        if self.lifecycle != Lifecycle::MigratingIn {
            return Err(VmActorError::BadState(format!(
                "VM '{}' is {}, not arriving",
                self.name, self.lifecycle
            )));
        }
        self.ram()
    }
}

/// Loads the arrived state into the empty VM; with a hash, verifies memory first.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<bool>, VmActorError>")]
pub struct LoadIncomingState {
    /// Encoded `VmState`.
    pub blob: Vec<u8>,
    /// Console history to seed.
    pub console: Vec<u8>,
    /// Console bytes in the VM's life so far.
    pub console_total: u64,
    /// Source memory hash to compare with.
    pub memory_hash: Option<u128>,
}

impl Handler<LoadIncomingState> for VmActor {
    type Result = Result<Option<bool>, VmActorError>;

    fn handle(&mut self, msg: LoadIncomingState, _: &mut Self::Context) -> Self::Result {
        let state = IncomingState {
            blob: msg.blob,
            console: msg.console,
            console_total: msg.console_total,
            memory_hash: msg.memory_hash.map(u128::to_le_bytes),
        };
        match self.vmm()?.load_state(state) {
            Ok(verified) => Ok(verified),
            Err(VmmClientError::Refused(error)) if error.kind == VmmErrorKind::BadState => {
                Err(VmActorError::BadState(error.message))
            }
            Err(other) => Err(other.into()),
        }
    }
}

/// Ends a migration on the destination.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, VmActorError>")]
pub enum EndMigrateIn {
    /// Switch-over: the VM is ours; run it (or keep it paused).
    Own {
        /// Resume the vCPUs.
        run: bool,
    },
    /// Discard the copy.
    Discard,
}

impl Handler<EndMigrateIn> for VmActor {
    type Result = Result<VmInfo, VmActorError>;

    fn handle(&mut self, msg: EndMigrateIn, ctx: &mut Self::Context) -> Self::Result {
        match msg {
            EndMigrateIn::Own { run } => {
                let event = if run {
                    Event::MigrateInResume
                } else {
                    Event::MigrateInKeepPaused
                };
                next(self.lifecycle, event)?;
                if run {
                    self.vmm()?.resume()?;
                }
                // The receivers are done with it.
                self.ram = None;
                self.transition(event)?;
            }
            EndMigrateIn::Discard => {
                next(self.lifecycle, Event::MigrateInDiscard)?;
                self.release();
                self.transition(Event::MigrateInDiscard)?;
                ctx.stop();
            }
        }
        Ok(self.info_cached())
    }
}

/// The run state the VMM reports, as a lifecycle for a VM found running after a restart.
pub fn lifecycle_of(run_state: RunState) -> Lifecycle {
    match run_state {
        RunState::Created => Lifecycle::Created,
        RunState::Running => Lifecycle::Running,
        RunState::Paused => Lifecycle::Paused,
        RunState::Stopped => Lifecycle::Stopped,
    }
}
