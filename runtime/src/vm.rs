//! One virtual machine: KVM VM and vCPUs, guest RAM, devices, boot, run control, dirty
//! tracking, and state capture/restore.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY, kvm_cpuid_entry2,
    kvm_mp_state, kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::boot::kernel::{BootError, BootModule, load_kernel};
use crate::boot::tables::{EntryMode, entry_regs, entry_sregs, write_system_tables};
use crate::cpu::{CpuFeatures, IncompatibleCpu, check_compatible, hide_features};
use crate::devices::{
    Console, DeviceStateError, Devices, Disk, DiskError, DiskInfo, DiskSpec, Nic, NicError,
    NicInfo, NicSpec, SerialError, TestDevice,
};
use crate::dirty::DirtySet;
use crate::dirty_log::{DirtyLog, DirtyLogError, DirtyLogMode};
use crate::guest::{GuestError, TestGuest, guest_code, guest_params};
use crate::layout;
use crate::memory::{GuestRam, MemoryError};
use crate::state::{
    StateIoctlError, VmIdentity, VmShape, VmState, apply_platform, apply_vcpu, capture_platform,
    capture_vcpu, readable_msrs,
};
use crate::vcpu::{
    RunControl, Vcpu, VcpuRunState, VcpuStop, exit_all, install_kick_handler, pause_all,
    resume_all, set_throttle,
};

/// Address KVM needs for its real-mode TSS on Intel hosts (three pages below the BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Upper bound on vCPUs per VM.
pub const MAX_VCPUS: u32 = 64;

/// Errors from building or operating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm failed (is KVM available and do you have permission to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl needed to build or run the VM failed.
    #[error("{operation} failed")]
    Kvm {
        /// What was attempted.
        operation: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A configuration value is unusable.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// The vCPU count is out of range.
    #[error("{vcpus} vCPUs requested; a VM has 1..={MAX_VCPUS}")]
    InvalidVcpuCount {
        /// Requested count.
        vcpus: u32,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Built-in guest parameters.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Reading a kernel, module or preload file.
    #[error("reading {path} failed")]
    ReadFile {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Serial device.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// Restoring device state.
    #[error(transparent)]
    Devices(#[from] DeviceStateError),
    /// A disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A NIC.
    #[error(transparent)]
    Nic(#[from] NicError),
    /// Dirty tracking.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// Reading or writing vCPU/VM state.
    #[error(transparent)]
    State(#[from] StateIoctlError),
    /// The host cannot run this VM's CPU model.
    #[error(transparent)]
    IncompatibleCpu(#[from] IncompatibleCpu),
    /// The operation is not valid in the VM's current state.
    #[error("cannot {operation} VM '{name}' while it is {state:?}")]
    InvalidRunState {
        /// What was attempted.
        operation: &'static str,
        /// VM name.
        name: String,
        /// Current state.
        state: RunState,
    },
    /// State from a VM of another shape.
    #[error(
        "state is for a VM with {state_vcpus} vCPUs and {state_memory} bytes, this VM has {vcpus} and {memory}"
    )]
    ShapeMismatch {
        /// vCPUs in the state.
        state_vcpus: u32,
        /// Memory in the state.
        state_memory: u64,
        /// This VM's vCPUs.
        vcpus: u32,
        /// This VM's memory.
        memory: u64,
    },
    /// A vCPU did not leave the guest when asked.
    #[error("vCPU {vcpu} did not stop within 10 s of being paused")]
    PauseTimeout {
        /// The vCPU.
        vcpu: u32,
    },
    /// Creating a thread or log file failed.
    #[error("{operation} failed")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { operation, source }
}

/// Lifecycle of a runtime VM (the actor layer adds migration states on top).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Built, never run.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked; state can be read or written.
    Paused,
    /// vCPU threads gone; only memory and final state remain.
    Stopped,
}

/// A module file for a multiboot kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleFile {
    /// The file.
    pub path: PathBuf,
    /// Its command line.
    pub cmdline: String,
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// A built-in test guest.
    Guest(TestGuest),
    /// An ELF kernel (multiboot v1 32-bit, or 64-bit).
    Kernel {
        /// Kernel image.
        image: PathBuf,
        /// Command line.
        cmdline: String,
        /// Multiboot modules.
        modules: Vec<ModuleFile>,
    },
}

impl Boot {
    /// Short description for listings.
    pub fn describe(&self) -> String {
        match self {
            Boot::Guest(guest) => guest.name().to_string(),
            Boot::Kernel { image, .. } => image.display().to_string(),
        }
    }
}

impl ModuleFile {
    /// Parses `PATH` or `PATH=CMDLINE` (the command line defaults to the path).
    pub fn parse(spec: &str) -> ModuleFile {
        let (path, cmdline) = spec.split_once('=').unwrap_or((spec, ""));
        ModuleFile {
            path: PathBuf::from(path),
            cmdline: if cmdline.is_empty() {
                path.to_string()
            } else {
                cmdline.to_string()
            },
        }
    }
}

/// Workload parameters an operator may give for a built-in guest; unset ones keep the
/// guest's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestOptions {
    /// `counter`: ticks per second.
    pub ticks_per_sec: Option<u32>,
    /// `dirty`: working set, bytes.
    pub working_set: Option<u64>,
    /// `dirty`: first byte of the working set.
    pub working_set_start: Option<u64>,
    /// `dirty`: pages per second (None: unlimited); `net`: numbered frames per second.
    pub rate: Option<u64>,
    /// `dirty`: passes before exiting (0 or None: forever).
    pub passes: Option<u64>,
    /// `verify`, `disk`: pattern seed.
    pub seed: Option<u64>,
    /// `disk`: block writes per second (0: as fast as the disk goes).
    pub disk_rate: Option<u64>,
    /// Kernel command line.
    pub cmdline: String,
    /// Multiboot modules as `PATH` or `PATH=CMDLINE`.
    pub modules: Vec<String>,
}

impl Boot {
    /// What `--guest NAME` means: a built-in guest (`counter`, `dirty`, `verify`, `disk`, `net`) with
    /// `options` applied, or else the path of an ELF kernel.
    pub fn from_guest(name: &str, memory: u64, options: &GuestOptions) -> Result<Boot, String> {
        if let Some(mut guest) = TestGuest::with_defaults(name, memory) {
            match &mut guest {
                TestGuest::Counter { ticks_per_sec } => {
                    if let Some(rate) = options.ticks_per_sec {
                        *ticks_per_sec = rate;
                    }
                }
                TestGuest::Dirty {
                    start,
                    working_set,
                    pages_per_sec,
                    passes,
                } => {
                    if let Some(size) = options.working_set {
                        *working_set = size;
                    }
                    *start = options.working_set_start;
                    *pages_per_sec = options.rate;
                    *passes = options.passes.unwrap_or(0);
                }
                TestGuest::Verify { seed, .. } => {
                    if let Some(value) = options.seed {
                        *seed = value;
                    }
                }
                TestGuest::Disk {
                    seed,
                    writes_per_sec,
                    ..
                } => {
                    if let Some(value) = options.seed {
                        *seed = value;
                    }
                    if let Some(rate) = options.disk_rate {
                        *writes_per_sec = (rate != 0).then_some(rate);
                    }
                }
                TestGuest::Net { frames_per_sec } => {
                    if let Some(rate) = options.rate {
                        *frames_per_sec = rate;
                    }
                }
            }
            return Ok(Boot::Guest(guest));
        }
        let image = PathBuf::from(name);
        if !image.is_file() {
            return Err(format!(
                "guest '{name}' is neither a built-in guest (counter, dirty, verify, disk, net) nor a kernel file"
            ));
        }
        Ok(Boot::Kernel {
            image,
            cmdline: options.cmdline.clone(),
            modules: options
                .modules
                .iter()
                .map(|m| ModuleFile::parse(m))
                .collect(),
        })
    }
}

/// A file copied into guest memory before boot, like an initrd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preload {
    /// The file.
    pub path: PathBuf,
    /// Guest-physical address.
    pub gpa: u64,
}

impl Preload {
    /// Parses `FILE@ADDRESS` (address in hex `0x...`, decimal, or a size like `512M`).
    pub fn parse(spec: &str) -> Result<Preload, String> {
        let (path, addr) = spec
            .rsplit_once('@')
            .ok_or_else(|| format!("preload '{spec}' must be FILE@ADDRESS, e.g. data.bin@512M"))?;
        let gpa = crate::units::parse_address(addr)?;
        if path.is_empty() {
            return Err(format!("preload '{spec}' names no file"));
        }
        Ok(Preload {
            path: PathBuf::from(path),
            gpa,
        })
    }
}

/// How to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name, UUID, MAC.
    pub identity: VmIdentity,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM in bytes.
    pub memory: u64,
    /// Dirty logging mode.
    pub dirty_log: DirtyLogMode,
    /// File the console output is appended to.
    pub console_log: Option<PathBuf>,
    /// CPU features to withhold from a new VM (the host's baseline); ignored on restore,
    /// where the VM keeps the CPUID it was given.
    pub hidden_cpu_features: Vec<String>,
    /// Disks, in virtio slot order.
    pub disks: Vec<DiskSpec>,
    /// NICs, in the virtio slots after the disks.
    pub nics: Vec<NicSpec>,
}

impl VmConfig {
    /// A config with defaults: fresh identity, bitmap dirty logging, no console log.
    pub fn new(name: &str, vcpus: u32, memory: u64) -> Self {
        VmConfig {
            identity: VmIdentity::new(name),
            vcpus,
            memory,
            dirty_log: DirtyLogMode::Bitmap,
            console_log: None,
            hidden_cpu_features: Vec::new(),
            disks: Vec::new(),
            nics: Vec::new(),
        }
    }
}

/// The CPU features KVM on this host can give a VM, less `hidden` ones.
pub fn host_cpu_features(hidden: &[String]) -> Result<CpuFeatures, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut entries = cpuid.as_slice().to_vec();
    hide_features(&mut entries, hidden).map_err(VmError::InvalidConfig)?;
    Ok(CpuFeatures::from_cpuid(&entries))
}

/// A running (or runnable) VM.
#[derive(Debug)]
pub struct Vm {
    identity: VmIdentity,
    shape: VmShape,
    boot: String,
    // Field order matters on drop: vCPUs and the VM fd go before the RAM they map.
    vcpus: Vec<Vcpu>,
    control: Arc<RunControl>,
    vm_fd: VmFd,
    _kvm: Kvm,
    devices: Arc<Devices>,
    dirty_log: DirtyLog,
    msr_indices: Vec<u32>,
    tsc_khz: u32,
    run_state: RunState,
    ram: Arc<GuestRam>,
}

impl Vm {
    /// Builds a VM and boots `boot` into it, after copying `preloads` into memory. The VM is
    /// left `Created`; call [`Vm::resume`] to run it.
    pub fn create(config: &VmConfig, boot: &Boot, preloads: &[Preload]) -> Result<Vm, VmError> {
        let mut vm = Self::build(config, None, boot.describe())?;
        for preload in preloads {
            vm.ram.load_file(&preload.path, preload.gpa)?;
        }
        vm.boot(boot)?;
        Ok(vm)
    }

    /// Builds an empty, paused VM with the shape and identity of `state`, ready for memory to
    /// be written into [`Vm::ram`] and then [`Vm::restore_state`]. Refuses a host whose CPU
    /// lacks features the VM was given.
    pub fn create_for_restore(
        state: &VmState,
        dirty_log: DirtyLogMode,
        console_log: Option<PathBuf>,
    ) -> Result<Vm, VmError> {
        Self::create_empty(
            &state.identity,
            &state.shape,
            &state.boot,
            dirty_log,
            console_log,
            &[],
            &[],
        )
    }

    /// Builds an empty, paused VM of a given identity and shape (what a migration
    /// destination prepares before any memory arrives), with `disks` opened (their locks
    /// taken only if their specs say so) and `nics` created (on their bridges only if their
    /// specs say so).
    pub fn create_empty(
        identity: &VmIdentity,
        shape: &VmShape,
        boot: &str,
        dirty_log: DirtyLogMode,
        console_log: Option<PathBuf>,
        disks: &[DiskSpec],
        nics: &[NicSpec],
    ) -> Result<Vm, VmError> {
        let config = VmConfig {
            identity: identity.clone(),
            vcpus: shape.vcpus,
            memory: shape.memory,
            dirty_log,
            console_log,
            hidden_cpu_features: Vec::new(),
            disks: disks.to_vec(),
            nics: nics.to_vec(),
        };
        let mut vm = Self::build(&config, Some(&shape.cpuid), boot.to_string())?;
        vm.run_state = RunState::Paused;
        Ok(vm)
    }

    fn build(
        config: &VmConfig,
        cpuid: Option<&[kvm_cpuid_entry2]>,
        boot: String,
    ) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::InvalidVcpuCount {
                vcpus: config.vcpus,
            });
        }
        install_kick_handler().map_err(|source| VmError::Io {
            operation: "installing the vCPU kick signal handler",
            source,
        })?;
        let ram = Arc::new(GuestRam::new(config.memory)?);
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut dirty_log = DirtyLog::new(&vm_fd, config.dirty_log)?;
        dirty_log.set_slots(&vm_fd, &ram, false)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let console = match &config.console_log {
            Some(path) => Console::with_log(path).map_err(|source| VmError::Io {
                operation: "opening the console log",
                source,
            })?,
            None => Console::new(),
        };
        if config.disks.len() + config.nics.len() > layout::MAX_VIRTIO_DEVICES {
            return Err(DiskError::TooMany {
                count: config.disks.len() + config.nics.len(),
                max: layout::MAX_VIRTIO_DEVICES,
            }
            .into());
        }
        let disks = config
            .disks
            .iter()
            .enumerate()
            .map(|(index, spec)| Disk::open(index, spec, &vm_fd, Arc::clone(&ram)))
            .collect::<Result<Vec<_>, _>>()?;
        let nics = config
            .nics
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                Nic::open(index, disks.len() + index, spec, &vm_fd, Arc::clone(&ram))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let devices = Arc::new(Devices::with_virtio(console, disks, nics)?);
        vm_fd
            .register_irqfd(devices.serial().irq_eventfd(), layout::SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;

        let host_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpuid: Vec<kvm_cpuid_entry2> = match cpuid {
            Some(given) => {
                check_compatible(
                    &CpuFeatures::from_cpuid(given),
                    &CpuFeatures::from_cpuid(host_cpuid.as_slice()),
                )?;
                given.to_vec()
            }
            None => {
                let mut entries = host_cpuid.as_slice().to_vec();
                hide_features(&mut entries, &config.hidden_cpu_features)
                    .map_err(VmError::InvalidConfig)?;
                entries
            }
        };

        let control = Arc::new(RunControl::new(config.vcpus as usize));
        let mut fds = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let table =
                CpuId::from_entries(&cpuid_for_vcpu(&cpuid, index)).map_err(|_| VmError::Kvm {
                    operation: "building the CPUID table",
                    source: kvm_ioctls::Error::new(libc::E2BIG),
                })?;
            fd.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
            fds.push(fd);
        }
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_indices = readable_msrs(&fds[0], msr_list.as_slice());
        let tsc_khz = fds[0].get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;

        let mut vcpus = Vec::with_capacity(fds.len());
        for (index, fd) in fds.into_iter().enumerate() {
            let vcpu = Vcpu::spawn(index as u32, fd, Arc::clone(&control), Arc::clone(&devices))
                .map_err(|source| VmError::Io {
                    operation: "spawning a vCPU thread",
                    source,
                })?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            identity: config.identity.clone(),
            shape: VmShape {
                vcpus: config.vcpus,
                memory: config.memory,
                cpuid,
            },
            boot,
            vcpus,
            control,
            vm_fd,
            _kvm: kvm,
            devices,
            dirty_log,
            msr_indices,
            tsc_khz,
            run_state: RunState::Created,
            ram,
        })
    }

    fn boot(&mut self, boot: &Boot) -> Result<(), VmError> {
        let code = guest_code();
        let is_test_guest = matches!(boot, Boot::Guest(_));
        write_system_tables(&self.ram, &code.exception_stubs, is_test_guest)?;
        // The exception stubs live in the code blob; kernels get them too until they install
        // their own IDT.
        self.ram.write(layout::CODE, &code.bytes)?;
        match boot {
            Boot::Guest(guest) => {
                let first_disk = self.devices.disks().first().map(|d| d.info().size);
                let first_nic = (!self.devices.nics().is_empty())
                    .then(|| layout::virtio_mmio_base(self.devices.disks().len()));
                let params = guest_params(
                    guest,
                    self.shape.vcpus,
                    self.shape.memory,
                    u64::from(self.tsc_khz),
                    first_disk,
                    first_nic,
                )?;
                self.ram.write(layout::PARAMS, &params.to_bytes())?;
                let entry = match guest {
                    TestGuest::Counter { .. } => code.counter,
                    TestGuest::Dirty { .. } => code.dirty,
                    TestGuest::Verify { .. } => code.verify,
                    TestGuest::Disk { .. } => code.disk,
                    TestGuest::Net { .. } => code.net,
                };
                for vcpu in &self.vcpus {
                    let stack = layout::STACKS + u64::from(vcpu.index + 1) * layout::STACK_SIZE;
                    let regs = entry_regs(
                        EntryMode::User64,
                        entry,
                        stack,
                        u64::from(vcpu.index),
                        layout::PARAMS,
                    );
                    let fd = vcpu.lock_fd();
                    set_entry_state(&fd, EntryMode::User64, &regs)?;
                    fd.set_mp_state(kvm_mp_state {
                        mp_state: KVM_MP_STATE_RUNNABLE,
                    })
                    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
                }
            }
            Boot::Kernel {
                image,
                cmdline,
                modules,
            } => {
                let read = |path: &PathBuf| {
                    std::fs::read(path).map_err(|source| VmError::ReadFile {
                        path: path.display().to_string(),
                        source,
                    })
                };
                let image = read(image)?;
                let modules = modules
                    .iter()
                    .map(|m| {
                        Ok(BootModule {
                            data: read(&m.path)?,
                            cmdline: m.cmdline.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, VmError>>()?;
                let loaded = load_kernel(&self.ram, &image, cmdline, &modules)?;
                // Only the boot processor starts; the others wait for INIT/SIPI from the
                // kernel, as on real hardware.
                let regs = entry_regs(
                    loaded.mode,
                    loaded.entry,
                    layout::KERNEL_STACK_TOP,
                    loaded.magic,
                    loaded.info,
                );
                set_entry_state(&self.vcpus[0].lock_fd(), loaded.mode, &regs)?;
            }
        }
        Ok(())
    }

    /// Name, UUID, MAC.
    pub fn identity(&self) -> &VmIdentity {
        &self.identity
    }

    /// vCPUs, memory, CPUID.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// What the VM booted.
    pub fn boot_description(&self) -> &str {
        &self.boot
    }

    /// Current lifecycle state.
    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// A shared handle to guest RAM, for copy workers that must keep the mapping alive for
    /// as long as they use it, even if the VM goes away meanwhile.
    pub fn ram_handle(&self) -> Arc<GuestRam> {
        Arc::clone(&self.ram)
    }

    /// Serial console output.
    pub fn console(&self) -> &Console {
        self.devices.console()
    }

    /// The test device (guest-reported exits, failures, progress).
    pub fn test_device(&self) -> &TestDevice {
        self.devices.test()
    }

    /// Queues bytes on the serial port's receive side.
    pub fn send_console_input(&self, bytes: &[u8]) -> usize {
        self.devices.serial().enqueue_input(bytes)
    }

    /// Where each vCPU thread is.
    pub fn vcpu_states(&self) -> Vec<VcpuRunState> {
        self.control.vcpu_states()
    }

    /// Guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The CPU features this VM was given.
    pub fn cpu_features(&self) -> CpuFeatures {
        CpuFeatures::from_cpuid(&self.shape.cpuid)
    }

    fn require(&self, operation: &'static str, allowed: &[RunState]) -> Result<(), VmError> {
        if allowed.contains(&self.run_state) {
            Ok(())
        } else {
            Err(VmError::InvalidRunState {
                operation,
                name: self.identity.name.clone(),
                state: self.run_state,
            })
        }
    }

    /// Runs (or continues running) the vCPUs.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.require(
            "resume",
            &[RunState::Created, RunState::Paused, RunState::Running],
        )?;
        self.devices.resume();
        resume_all(&self.control);
        self.run_state = RunState::Running;
        Ok(())
    }

    /// Stops every vCPU from running guest code; returns how long that took.
    pub fn pause(&mut self) -> Result<Duration, VmError> {
        self.require(
            "pause",
            &[RunState::Created, RunState::Paused, RunState::Running],
        )?;
        let took = pause_all(&self.control).map_err(|vcpu| VmError::PauseTimeout { vcpu })?;
        // With no vCPU running no new request can come; once the disks are quiesced none is
        // in progress either, and nothing writes guest memory behind the VMM's back.
        self.devices.quiesce();
        self.devices.console().flush();
        if self.run_state == RunState::Running {
            self.run_state = RunState::Paused;
        }
        Ok(took)
    }

    /// Ends the VM's vCPU threads. Memory stays readable.
    pub fn stop(&mut self) {
        if self.run_state != RunState::Stopped {
            exit_all(&self.control, &mut self.vcpus);
            self.devices.quiesce();
            self.devices.console().flush();
            self.run_state = RunState::Stopped;
        }
    }

    /// Reads the complete non-memory state. The VM must be paused (or never started).
    pub fn capture_state(&self) -> Result<VmState, VmError> {
        self.require(
            "capture the state of",
            &[RunState::Created, RunState::Paused],
        )?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            vcpus.push(capture_vcpu(
                &vcpu.lock_fd(),
                vcpu.index,
                &self.msr_indices,
            )?);
        }
        Ok(VmState {
            identity: self.identity.clone(),
            shape: self.shape.clone(),
            boot: self.boot.clone(),
            vcpus,
            platform: capture_platform(&self.vm_fd)?,
            devices: self.devices.snapshot(),
        })
    }

    /// Loads `state` (captured from a VM of the same shape) into this paused VM.
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), VmError> {
        self.require("restore state into", &[RunState::Created, RunState::Paused])?;
        if state.shape.vcpus != self.shape.vcpus
            || state.shape.memory != self.shape.memory
            || state.vcpus.len() != self.vcpus.len()
        {
            return Err(VmError::ShapeMismatch {
                state_vcpus: state.shape.vcpus,
                state_memory: state.shape.memory,
                vcpus: self.shape.vcpus,
                memory: self.shape.memory,
            });
        }
        apply_platform(&self.vm_fd, &state.platform)?;
        for (vcpu, vcpu_state) in self.vcpus.iter().zip(&state.vcpus) {
            apply_vcpu(&vcpu.lock_fd(), vcpu_state)?;
        }
        self.devices.restore(&state.devices)?;
        for (&index, &status) in &state.devices.test.exits {
            if (index as usize) < self.vcpus.len() {
                self.control
                    .mark_finished(index as usize, VcpuStop::GuestExit(status));
            }
        }
        self.run_state = RunState::Paused;
        Ok(())
    }

    /// Slows the guest down: each vCPU is kept out of the guest for `percent`% of the time
    /// (0 turns throttling off, at most 99). Migration uses this to converge when the guest
    /// dirties memory faster than the link can carry it.
    pub fn set_throttle(&mut self, percent: u8) {
        set_throttle(&self.control, percent.min(99));
    }

    /// The current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.control.throttle()
    }

    /// Starts dirty-page tracking for a live copy (migration or snapshot) and returns the
    /// pages its first round must send: every page whose backing exists.
    ///
    /// The order is the point. Tracking goes on first, and only then is the backing read,
    /// so every page is either already populated when it is read (and sent in round one) or
    /// written later (and in a later fetch). Reading the backing first would lose every
    /// page the guest writes for the first time in between: it would be neither populated
    /// when read nor dirty once tracking started.
    pub fn begin_tracking(&mut self) -> Result<DirtySet, VmError> {
        self.dirty_log.start(&self.vm_fd, &self.ram)?;
        Ok(self.ram.populated_set())
    }

    /// Pages written (by guest or VMM) since tracking started or since the last fetch.
    pub fn fetch_dirty(&mut self) -> Result<DirtySet, VmError> {
        Ok(self.dirty_log.fetch_and_clear(&self.vm_fd, &self.ram)?)
    }

    /// Stops dirty-page tracking.
    pub fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.dirty_log.stop(&self.vm_fd, &self.ram)?;
        Ok(())
    }

    /// Starts recording guest writes on every disk (in `chunk`-byte units) and returns, per
    /// disk, the extents its image holds data in: a storage copy's first round. As with
    /// [`Vm::begin_tracking`], recording starts before the images are scanned.
    pub fn begin_disk_tracking(&self, chunk: u64) -> Result<Vec<Vec<(u64, u64)>>, VmError> {
        let mut all = Vec::new();
        for disk in self.devices.disks() {
            all.push(disk.begin_tracking(chunk)?);
        }
        Ok(all)
    }

    /// Per disk, the extents the guest wrote since the last call.
    pub fn fetch_dirty_blocks(&self) -> Vec<Vec<(u64, u64)>> {
        self.devices.disks().iter().map(Disk::fetch_dirty).collect()
    }

    /// xxh3-128 of every disk image's content.
    pub fn disk_hashes(&self) -> Result<Vec<u128>, VmError> {
        Ok(self
            .devices
            .disks()
            .iter()
            .map(Disk::hash)
            .collect::<Result<_, _>>()?)
    }

    /// Stops recording disk writes.
    pub fn stop_disk_tracking(&self) {
        for disk in self.devices.disks() {
            disk.stop_tracking();
        }
    }

    /// Stops the devices that work off the vCPU threads while the vCPUs go on: requests the
    /// guest makes wait, unserved, until the next resume. Tests use it to catch a guest with
    /// a request in flight at the moment it is paused.
    pub fn hold_device_io(&self) {
        self.devices.quiesce();
    }

    /// The disks, as the operator sees them.
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.devices.disks().iter().map(Disk::info).collect()
    }

    /// The NICs, as the operator sees them.
    pub fn nics(&self) -> Vec<NicInfo> {
        self.devices.nics().iter().map(Nic::info).collect()
    }

    /// Puts every NIC's TAP on its bridge (a migration's destination, before the commit).
    pub fn attach_nics(&self) -> Result<(), VmError> {
        for nic in self.devices.nics() {
            nic.attach()?;
        }
        Ok(())
    }

    /// Flushes every disk and gives up its image lock, for another host to take: the VM
    /// must be paused (so nothing writes the images any more).
    pub fn release_disks(&mut self) -> Result<(), VmError> {
        self.require(
            "release the disks of",
            &[RunState::Paused, RunState::Stopped],
        )?;
        for disk in self.devices.disks() {
            disk.flush()?;
            disk.unlock()?;
        }
        Ok(())
    }

    /// Takes every disk's image lock (before the VM runs here, or runs again after a
    /// handover that failed). Fails, taking none, if another VM holds one.
    pub fn lock_disks(&mut self) -> Result<(), VmError> {
        let disks = self.devices.disks();
        for (taken, disk) in disks.iter().enumerate() {
            if let Err(error) = disk.lock() {
                for earlier in &disks[..taken] {
                    let _ = earlier.unlock();
                }
                return Err(error.into());
            }
        }
        Ok(())
    }

    /// Whether dirty tracking is on.
    pub fn dirty_log_enabled(&self) -> bool {
        self.dirty_log.is_enabled()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_entry_state(
    fd: &VcpuFd,
    mode: EntryMode,
    regs: &kvm_bindings::kvm_regs,
) -> Result<(), VmError> {
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    fd.set_sregs(&entry_sregs(sregs, mode))
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

/// vCPU `index`'s CPUID: the VM's table with this vCPU's APIC ID filled in.
fn cpuid_for_vcpu(cpuid: &[kvm_cpuid_entry2], index: u32) -> Vec<kvm_cpuid_entry2> {
    cpuid
        .iter()
        .map(|entry| {
            let mut entry = *entry;
            match entry.function {
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
                0xb | 0x1f => entry.edx = index,
                _ => {}
            }
            entry
        })
        .collect()
}
