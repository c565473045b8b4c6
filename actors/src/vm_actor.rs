//! VmActor: owns one runtime VM and its lifecycle. It runs on its own arbiter (thread), so
//! the few milliseconds a dirty-log fetch or state capture take never stall the host's API.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use actix::prelude::*;
use ferry_runtime::cpu::CpuFeatures;
use ferry_runtime::state::blob;
use ferry_runtime::{DirtySet, GuestRam, Vm, VmError, VmIdentity, VmShape, VmState};
use serde::{Deserialize, Serialize};

use crate::lifecycle::{Event, InvalidTransition, Lifecycle, next};

/// Errors from VM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmActorError {
    /// Not allowed in the VM's current state.
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// The runtime refused or failed.
    #[error(transparent)]
    Runtime(#[from] VmError),
    /// The VM's runtime is gone (stopped).
    #[error("VM '{0}' is stopped")]
    Gone(String),
    /// Incoming state could not be decoded or did not match.
    #[error("incoming VM state rejected: {0}")]
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
}

/// Host-side facts about a VM that are not part of the runtime VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAttachments {
    /// Network name.
    pub network: Option<String>,
    /// IPv4 address.
    pub ip: Option<Ipv4Addr>,
}

/// Owns a VM.
#[derive(Debug)]
pub struct VmActor {
    name: String,
    host: String,
    vm: Option<Vm>,
    lifecycle: Lifecycle,
    attachments: VmAttachments,
    /// Info kept after the runtime VM is gone.
    last_info: Option<VmInfo>,
}

impl VmActor {
    /// A freshly created VM (lifecycle `Created`).
    pub fn new(vm: Vm, host: &str, attachments: VmAttachments) -> Self {
        Self::with_lifecycle(vm, host, attachments, Lifecycle::Created)
    }

    /// The empty copy of an arriving VM (lifecycle `MigratingIn`).
    pub fn incoming(vm: Vm, host: &str, attachments: VmAttachments) -> Self {
        Self::with_lifecycle(vm, host, attachments, Lifecycle::MigratingIn)
    }

    fn with_lifecycle(
        vm: Vm,
        host: &str,
        attachments: VmAttachments,
        lifecycle: Lifecycle,
    ) -> Self {
        VmActor {
            name: vm.identity().name.clone(),
            host: host.to_string(),
            vm: Some(vm),
            lifecycle,
            attachments,
            last_info: None,
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

    fn vm(&mut self) -> Result<&mut Vm, VmActorError> {
        self.vm
            .as_mut()
            .ok_or_else(|| VmActorError::Gone(self.name.clone()))
    }

    fn transition(&mut self, event: Event) -> Result<Lifecycle, VmActorError> {
        let to = next(self.lifecycle, event)?;
        if to != self.lifecycle {
            tracing::info!(vm = %self.name, from = %self.lifecycle, to = %to, "VM state change");
        }
        self.lifecycle = to;
        Ok(to)
    }

    fn info(&self) -> VmInfo {
        match &self.vm {
            Some(vm) => {
                let reports = vm.test_device().state();
                VmInfo {
                    name: self.name.clone(),
                    uuid: vm.identity().uuid.to_string(),
                    mac: vm.identity().mac_string(),
                    host: self.host.clone(),
                    state: self.lifecycle,
                    vcpus: vm.shape().vcpus,
                    memory: vm.shape().memory,
                    guest: vm.boot_description().to_string(),
                    network: self.attachments.network.clone(),
                    ip: self.attachments.ip,
                    throttle_pct: vm.throttle(),
                    guest_progress: reports.progress,
                    guest_failures: reports.failure_count,
                    guest_exits: reports.exits,
                    console_bytes: vm.console().total_bytes(),
                }
            }
            None => {
                let mut info = self.last_info.clone().unwrap_or(VmInfo {
                    name: self.name.clone(),
                    uuid: String::new(),
                    mac: String::new(),
                    host: self.host.clone(),
                    state: self.lifecycle,
                    vcpus: 0,
                    memory: 0,
                    guest: String::new(),
                    network: None,
                    ip: None,
                    throttle_pct: 0,
                    guest_progress: 0,
                    guest_failures: 0,
                    guest_exits: BTreeMap::new(),
                    console_bytes: 0,
                });
                info.state = self.lifecycle;
                info
            }
        }
    }

    /// Stops the runtime VM and frees its memory, keeping the last info for display.
    fn release(&mut self) {
        if self.vm.is_some() {
            let mut info = self.info();
            info.throttle_pct = 0;
            self.last_info = Some(info);
        }
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
    }
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.release();
        // The arbiter was created for this actor alone.
        Arbiter::current().stop();
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

/// An operator lifecycle operation: `Resume`, `Pause` or `Stop`.
#[derive(Debug, Message)]
#[rtype(result = "Result<VmInfo, VmActorError>")]
pub struct Operate(pub Event);

impl Handler<Operate> for VmActor {
    type Result = Result<VmInfo, VmActorError>;

    fn handle(&mut self, Operate(event): Operate, _: &mut Self::Context) -> Self::Result {
        let to = next(self.lifecycle, event)?;
        match event {
            Event::Resume | Event::RecoverStale => self.vm()?.resume()?,
            Event::Pause => {
                self.vm()?.pause()?;
            }
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
        debug_assert_eq!(self.lifecycle, to);
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
        Ok(self.vm()?.console().follow_from(msg.offset))
    }
}

/// What the source side of a migration needs from the VM.
#[derive(Debug, Clone)]
pub struct OutgoingVm {
    /// Guest RAM, kept mapped for the copy workers.
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
        let attachments = self.attachments.clone();
        let vm = self.vm()?;
        let outgoing = OutgoingVm {
            ram: vm.ram_handle(),
            identity: vm.identity().clone(),
            shape: vm.shape().clone(),
            cpu_features: vm.cpu_features(),
            boot: vm.boot_description().to_string(),
            was_running,
            attachments,
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
        let vm = self.vm()?;
        Ok(match op {
            DirtyLog::Start => vm.begin_tracking()?,
            DirtyLog::Fetch => vm.fetch_dirty()?,
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
        self.vm()?.set_throttle(percent);
        Ok(())
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
    /// Registers, devices, console.
    pub state: CapturedState,
}

/// Stop-and-copy on the source: pauses the vCPUs (lifecycle stays `MigratingOut`), takes the
/// last dirty pages and captures the state — one message, so the guest's pause is not
/// stretched by round trips between actors.
#[derive(Debug, Message)]
#[rtype(result = "Result<Frozen, VmActorError>")]
pub struct Freeze {
    /// Hash guest memory too (`--verify`).
    pub hash_memory: bool,
}

impl Handler<Freeze> for VmActor {
    type Result = Result<Frozen, VmActorError>;

    fn handle(&mut self, msg: Freeze, _: &mut Self::Context) -> Self::Result {
        let paused_at = Instant::now();
        let vm = self.vm()?;
        vm.pause()?;
        vm.set_throttle(0);
        let dirty = vm.fetch_dirty()?;
        let state = vm.capture_state()?;
        let blob = blob::encode(&state).map_err(|e| VmActorError::BadState(e.to_string()))?;
        Ok(Frozen {
            paused_at,
            dirty,
            state: CapturedState {
                blob,
                console: vm.console().history(),
                console_total: vm.console().total_bytes(),
                memory_hash: msg.hash_memory.then(|| vm.ram().hash()),
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
                let vm = self.vm()?;
                vm.set_throttle(0);
                if vm.dirty_log_enabled() {
                    vm.stop_dirty_log()?;
                }
                if was_running {
                    vm.resume()?;
                } else {
                    vm.pause()?;
                }
                self.transition(event)?;
            }
            EndMigrateOut::Complete => {
                next(self.lifecycle, Event::MigrateOutComplete)?;
                self.release();
                self.transition(Event::MigrateOutComplete)?;
            }
            EndMigrateOut::Stale => {
                next(self.lifecycle, Event::MigrateOutLost)?;
                let vm = self.vm()?;
                vm.set_throttle(0);
                if vm.dirty_log_enabled() {
                    vm.stop_dirty_log()?;
                }
                self.transition(Event::MigrateOutLost)?;
            }
        }
        Ok(self.info())
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
        Ok(self.vm()?.ram_handle())
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
        let name = self.name.clone();
        let vm = self.vm()?;
        let state: VmState =
            blob::decode(&msg.blob).map_err(|e| VmActorError::BadState(e.to_string()))?;
        if state.identity != *vm.identity() {
            return Err(VmActorError::BadState(format!(
                "state is for VM '{}' ({}), this is '{name}'",
                state.identity.name, state.identity.uuid
            )));
        }
        let verified = match msg.memory_hash {
            Some(expected) => {
                let local = vm.ram().hash();
                if local != expected {
                    return Err(VmActorError::BadState(format!(
                        "memory hash mismatch: destination {local:032x}, source {expected:032x}"
                    )));
                }
                Some(true)
            }
            None => None,
        };
        vm.restore_state(&state)?;
        vm.console().seed_history(&msg.console, msg.console_total);
        Ok(verified)
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
                    self.vm()?.resume()?;
                }
                self.transition(event)?;
            }
            EndMigrateIn::Discard => {
                next(self.lifecycle, Event::MigrateInDiscard)?;
                self.release();
                self.transition(Event::MigrateInDiscard)?;
                ctx.stop();
            }
        }
        Ok(self.info())
    }
}
