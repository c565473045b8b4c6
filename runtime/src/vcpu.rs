//! vCPU threads: each vCPU runs its blocking `KVM_RUN` loop on its own thread, and the VM
//! pauses them by asking, then kicking.
//!
//! A kick is a real-time signal whose handler sets `immediate_exit` in the vCPU's `kvm_run`
//! page. If the thread is inside `KVM_RUN`, the signal makes it return `EINTR`; if it is about
//! to enter, `immediate_exit` makes the entry return `EINTR` at once — so no kick is lost in
//! the window between checking the pause flag and entering the guest. Returning through
//! `EINTR` also completes any pending port I/O inside KVM, so state read afterwards is exact.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::unix::thread::JoinHandleExt;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::devices::{Devices, PortEffect};

/// How long `pause` waits before kicking a vCPU again (a kick can only be "lost" if the
/// thread was between loop iterations, and then the retry catches it).
const REKICK_INTERVAL: Duration = Duration::from_millis(10);
/// Running time between two throttle interruptions of a vCPU.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);
/// Give up on a vCPU that does not stop within this time (a KVM bug or a wedged host).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a guest's sleep request parks its vCPU in one go.
const MAX_IDLE_SLEEP: Duration = Duration::from_secs(1);

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a const-initialised thread-local read and a volatile
    // store into memory that stays mapped while the pointer is set.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by this same thread to its vCPU's mmapped kvm_run page
        // and cleared before that mapping can go away, so the field address is valid.
        let field = unsafe { &raw mut (*run).immediate_exit };
        // SAFETY: as above; a single-byte volatile store the kernel reads on KVM_RUN entry.
        unsafe { field.write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), std::io::Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    match INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
    {
        Ok(()) => Ok(()),
        Err(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
    }
}

/// Why a vCPU stopped running guest code for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest reported an exit status through the test device.
    GuestExit(u32),
    /// Triple fault / shutdown.
    Shutdown,
    /// `HLT` with no in-kernel irqchip to wake it.
    Halted,
    /// KVM reported an error or an exit the VMM cannot handle.
    Failed(String),
}

/// Where a vCPU thread is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Not yet started or parked by a pause.
    Parked,
    /// In its `KVM_RUN` loop.
    Running,
    /// Done (see [`VcpuStop`]); the thread waits only for the VM to stop.
    Finished(VcpuStop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Want {
    Run = 0,
    Pause = 1,
    Exit = 2,
}

#[derive(Debug)]
struct ControlState {
    want: Want,
    vcpus: Vec<VcpuRunState>,
}

/// Shared between the VM and its vCPU threads.
#[derive(Debug)]
pub(crate) struct RunControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Mirror of `state.want`, read by running vCPUs without taking the lock.
    want: AtomicU8,
    /// Percentage of time vCPUs are kept out of the guest (0 = no throttling).
    throttle: AtomicU8,
    /// pthread IDs of the live vCPU threads, by index: every kick (pause, throttle, exit)
    /// goes through this list, under its lock, so none can hit a thread already joined.
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    /// Whether a throttle timer thread is running.
    throttler: Mutex<bool>,
}

impl RunControl {
    pub(crate) fn new(vcpus: usize) -> Self {
        RunControl {
            state: Mutex::new(ControlState {
                want: Want::Pause,
                vcpus: vec![VcpuRunState::Parked; vcpus],
            }),
            changed: Condvar::new(),
            want: AtomicU8::new(Want::Pause as u8),
            throttle: AtomicU8::new(0),
            threads: Mutex::new(vec![None; vcpus]),
            throttler: Mutex::new(false),
        }
    }

    pub(crate) fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    fn threads(&self) -> MutexGuard<'_, Vec<Option<libc::pthread_t>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the kick signal to the vCPU threads at `indices`.
    fn kick(&self, indices: impl IntoIterator<Item = usize>) {
        let threads = self.threads();
        for index in indices {
            if let Some(Some(thread)) = threads.get(index) {
                // SAFETY: the ID is of a live vCPU thread: IDs are removed (under this lock)
                // before their threads are joined.
                let err = unsafe { libc::pthread_kill(*thread, kick_signal()) };
                if err != 0 {
                    tracing::warn!(vcpu = index, errno = err, "kicking vCPU failed");
                }
            }
        }
    }

    fn kick_all(&self) {
        let count = self.threads().len();
        self.kick(0..count);
    }

    /// Keeps a running vCPU out of the guest for its share of a throttle period, waking early
    /// if the VM is paused or stopped meanwhile.
    fn throttle_sleep(&self) {
        let percent = u32::from(self.throttle());
        if percent == 0 {
            return;
        }
        self.sleep_while_running(THROTTLE_PERIOD * percent / (100 - percent));
    }

    /// Waits `duration`, or less if the VM stops wanting its vCPUs to run.
    fn sleep_while_running(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut state = self.lock();
        while state.want == Want::Run {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Parks a vCPU that asked to wait (the test device's sleep port) for `duration`, waking
    /// early if the VM is paused or stopped meanwhile: the caller then re-enters `KVM_RUN`,
    /// which completes the `out` and, if a pause is wanted, returns at once, so a parked vCPU
    /// pauses with exact state like a running one.
    fn idle_sleep(&self, duration: Duration) {
        self.sleep_while_running(duration.min(MAX_IDLE_SLEEP));
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_want(&self, want: Want) {
        let mut state = self.lock();
        state.want = want;
        self.want.store(want as u8, Ordering::SeqCst);
        drop(state);
        self.changed.notify_all();
    }

    fn should_run(&self) -> bool {
        self.want.load(Ordering::SeqCst) == Want::Run as u8
    }

    pub(crate) fn vcpu_states(&self) -> Vec<VcpuRunState> {
        self.lock().vcpus.clone()
    }

    /// Marks a vCPU finished before it ever runs (restored from a state where it had).
    pub(crate) fn mark_finished(&self, index: usize, stop: VcpuStop) {
        self.lock().vcpus[index] = VcpuRunState::Finished(stop);
    }
}

/// One vCPU: its fd (shared with the VM for state access while parked) and its thread.
#[derive(Debug)]
pub(crate) struct Vcpu {
    pub(crate) index: u32,
    pub(crate) fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    pub(crate) fn spawn(
        index: u32,
        fd: VcpuFd,
        control: Arc<RunControl>,
        devices: Arc<Devices>,
    ) -> std::io::Result<Vcpu> {
        let fd = Arc::new(Mutex::new(fd));
        let thread_fd = Arc::clone(&fd);
        let thread_control = Arc::clone(&control);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_thread(index, &thread_fd, &thread_control, &devices))?;
        control.threads()[index as usize] = Some(thread.as_pthread_t());
        Ok(Vcpu {
            index,
            fd,
            thread: Some(thread),
        })
    }

    pub(crate) fn lock_fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sets the throttle percentage, starting the timer thread that interrupts vCPUs every
/// THROTTLE_PERIOD while it is non-zero.
pub(crate) fn set_throttle(control: &Arc<RunControl>, percent: u8) {
    control.throttle.store(percent, Ordering::SeqCst);
    let mut running = control.throttler.lock().unwrap_or_else(|e| e.into_inner());
    if percent == 0 || *running {
        return;
    }
    *running = true;
    let control = Arc::clone(control);
    let spawned = std::thread::Builder::new()
        .name("vcpu-throttle".into())
        .spawn(move || {
            loop {
                std::thread::sleep(THROTTLE_PERIOD);
                let stop = control.throttle() == 0
                    || control.want.load(Ordering::SeqCst) == Want::Exit as u8;
                if stop {
                    *control.throttler.lock().unwrap_or_else(|e| e.into_inner()) = false;
                    return;
                }
                if control.should_run() {
                    control.kick_all();
                }
            }
        });
    if spawned.is_err() {
        tracing::warn!("could not start the throttle timer; the guest runs unthrottled");
        *running = false;
    }
}

/// Lets every vCPU that is not finished run.
pub(crate) fn resume_all(control: &RunControl) {
    control.set_want(Want::Run);
}

/// Stops every vCPU from running guest code and waits until all are parked or finished.
/// Returns how long that took.
pub(crate) fn pause_all(control: &RunControl) -> Result<Duration, u32> {
    let start = Instant::now();
    control.set_want(Want::Pause);
    control.kick_all();
    let mut state = control.lock();
    loop {
        let running: Vec<usize> = state
            .vcpus
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == VcpuRunState::Running)
            .map(|(i, _)| i)
            .collect();
        if running.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > PAUSE_TIMEOUT {
            return Err(running[0] as u32);
        }
        let (guard, timeout) = control
            .changed
            .wait_timeout(state, REKICK_INTERVAL)
            .unwrap_or_else(|e| e.into_inner());
        state = guard;
        if timeout.timed_out() {
            control.kick(running);
        }
    }
}

/// Tells every vCPU thread to exit and joins them.
pub(crate) fn exit_all(control: &RunControl, vcpus: &mut [Vcpu]) {
    control.set_want(Want::Exit);
    control.kick_all();
    // Forget the IDs before joining, so no later kick can reach a finished thread.
    control.threads().fill(None);
    for vcpu in vcpus.iter_mut() {
        if let Some(thread) = vcpu.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(vcpu = vcpu.index, "vCPU thread panicked");
        }
    }
}

enum RunOutcome {
    Kicked,
    Stopped(VcpuStop),
}

fn vcpu_thread(index: u32, fd: &Mutex<VcpuFd>, control: &RunControl, devices: &Devices) {
    let slot = index as usize;
    let tsc_khz = {
        let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
        let run: *mut kvm_run = guard.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run));
        // TSC cycles per millisecond, for sleep requests (asked once: resuming is on the
        // downtime path); 0 (unknown) makes them no-ops.
        guard.get_tsc_khz().unwrap_or(0)
    };
    loop {
        {
            let mut state = control.lock();
            loop {
                match state.want {
                    Want::Exit => {
                        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
                        return;
                    }
                    Want::Run if !matches!(state.vcpus[slot], VcpuRunState::Finished(_)) => break,
                    _ => {
                        if state.vcpus[slot] == VcpuRunState::Running {
                            state.vcpus[slot] = VcpuRunState::Parked;
                            control.changed.notify_all();
                        }
                        state = control
                            .changed
                            .wait(state)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            state.vcpus[slot] = VcpuRunState::Running;
        }
        let outcome = {
            let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
            run_until_kicked((index, tsc_khz), &mut guard, control, devices)
        };
        let mut state = control.lock();
        state.vcpus[slot] = match outcome {
            RunOutcome::Kicked => VcpuRunState::Parked,
            RunOutcome::Stopped(stop) => {
                tracing::info!(vcpu = index, ?stop, "vCPU stopped");
                VcpuRunState::Finished(stop)
            }
        };
        control.changed.notify_all();
    }
}

fn run_until_kicked(
    (index, tsc_khz): (u32, u32),
    fd: &mut VcpuFd,
    control: &RunControl,
    devices: &Devices,
) -> RunOutcome {
    loop {
        if !control.should_run() {
            fd.set_kvm_immediate_exit(1);
        }
        let stop = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match devices.io_out(index, port, data) {
                PortEffect::Continue => continue,
                PortEffect::Sleep(cycles) => {
                    if tsc_khz > 0 {
                        let micros = u64::from(cycles) * 1000 / u64::from(tsc_khz);
                        control.idle_sleep(Duration::from_micros(micros));
                    }
                    continue;
                }
                PortEffect::Exit(status) => VcpuStop::GuestExit(status),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.io_in(port, data);
                continue;
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => {
                devices.mmio_read(gpa, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(gpa, data)) => {
                devices.mmio_write(gpa, data);
                continue;
            }
            Ok(VcpuExit::Hlt) => VcpuStop::Halted,
            Ok(VcpuExit::Shutdown) => VcpuStop::Shutdown,
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                VcpuStop::Failed(format!("VM entry failed: reason {reason:#x} on cpu {cpu}"))
            }
            Ok(VcpuExit::InternalError) => VcpuStop::Failed("KVM internal error".into()),
            Ok(other) => VcpuStop::Failed(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                fd.set_kvm_immediate_exit(0);
                if control.should_run() {
                    // A throttle kick (or a stale pause kick): sit out this vCPU's share.
                    control.throttle_sleep();
                    continue;
                }
                return RunOutcome::Kicked;
            }
            Err(e) if e.errno() == libc::EAGAIN => continue,
            Err(e) => VcpuStop::Failed(format!("KVM_RUN failed: {e}")),
        };
        // Re-enter once with immediate_exit so KVM completes the instruction that exited
        // (e.g. advances RIP past the `out`): state captured later is then exact.
        fd.set_kvm_immediate_exit(1);
        let _ = fd.run();
        fd.set_kvm_immediate_exit(0);
        return RunOutcome::Stopped(stop);
    }
}
