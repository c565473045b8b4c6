//! ferry-runtime: one virtual machine on this host.
//!
//! A [`Vm`] owns a KVM VM with its vCPU threads, memfd-backed guest RAM, a 16550 serial console
//! and a test device. It boots a built-in test guest ([`TestGuest`]) or an ELF kernel, pauses
//! and resumes in tens of microseconds, tracks dirty pages, and captures or restores its
//! complete state ([`VmState`]) — everything live migration needs from a host, and nothing
//! about networks or actors.
//!
//! ```no_run
//! use ferry_runtime::{Boot, TestGuest, Vm, VmConfig};
//!
//! let config = VmConfig::new("demo", 1, 64 << 20);
//! let mut vm = Vm::create(&config, &Boot::Guest(TestGuest::Counter { ticks_per_sec: 10 }), &[])?;
//! vm.resume()?;
//! std::thread::sleep(std::time::Duration::from_secs(1));
//! let pause_took = vm.pause()?;
//! let state = vm.capture_state()?;
//! println!("paused in {pause_took:?}; rip = {:#x}", state.vcpus[0].regs.rip);
//! # Ok::<(), ferry_runtime::VmError>(())
//! ```

pub mod boot;
pub mod content;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod dirty_log;
pub mod guest;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod units;
mod vcpu;
pub mod vm;

pub use cpu::{CpuFeatures, IncompatibleCpu, check_compatible};
pub use devices::{DiskInfo, DiskSpec};
pub use dirty::{DirtySet, PageRange};
pub use dirty_log::DirtyLogMode;
pub use guest::TestGuest;
pub use memory::{GuestRam, RamRegion};
pub use state::{VmIdentity, VmShape, VmState};
pub use vcpu::{VcpuRunState, VcpuStop};
pub use vm::{
    Boot, GuestOptions, ModuleFile, Preload, RunState, Vm, VmConfig, VmError, host_cpu_features,
};
