//! QEMU as the migration baseline: two `qemu-system-x86_64` processes on this machine, a
//! source running Ferry's workload kernel and a destination waiting for it, driven over QMP
//! the way a management layer drives QEMU's live migration.
//!
//! The guest is [`ferry_runtime::guest::multiboot_workload`]'s kernel booted with
//! `-kernel KERNEL -initrd MODULE`, so QEMU migrates the same workload code, memory size and
//! memory content as Ferry. Both QEMUs run
//!
//! ```text
//! qemu-system-x86_64 -accel kvm -cpu qemu64,-pni -m MIB -smp 1 -nographic -display none
//!     -monitor none -nic none -no-reboot -serial file:ROLE.serial
//!     -device isa-debug-exit,iobase=0x500,iosize=4
//!     -qmp unix:ROLE.qmp,server=on,wait=off -kernel KERNEL -initrd MODULE -append CMDLINE
//! ```
//!
//! and the destination adds `-incoming defer`, so migration capabilities can be set on it
//! before it listens (multifd must be on at both ends before `migrate`). `-cpu host` fails
//! on this host's KVM (an MSR it cannot set), hence `qemu64` without PNI. `-nic none` drops
//! the default NIC and its iPXE ROM, which the guest never uses. The debug-exit device sits
//! on Ferry's test-device exit port, so a guest that takes an exception or cannot place its
//! working set makes QEMU exit (reported as [`QemuError::Exited`]) instead of hanging.
//!
//! Each [`migrate`] boots both QEMUs, waits for the workload's banner on the source's serial
//! console and for the workload to make progress, applies the [`Preset`], migrates over
//! loopback TCP, and then checks that the destination is running and that the workload's
//! progress word (read with the HMP `xp` command) keeps growing there, and for `counter`
//! that its ticks continue on the destination's console. Both QEMUs are killed when the
//! call returns, whatever happened.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_runtime::guest::multiboot_workload::{self, Banner};
use serde_json::{Value, json};

/// The QEMU binary used when none is given.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// The QEMU side of a benchmark, as the environment chooses it: `FERRY_BENCH_NO_QEMU=1`
/// skips QEMU, `FERRY_BENCH_QEMU` names the binary (default [`DEFAULT_QEMU`]) and
/// `FERRY_BENCH_QEMU_CHANNELS` the multifd channels of the best preset (default
/// [`BEST_MULTIFD_CHANNELS`]).
#[derive(Clone, Debug)]
pub struct Baseline {
    /// Whether QEMU runs at all.
    pub enabled: bool,
    /// The binary.
    pub binary: PathBuf,
    /// What it says its version is ("QEMU skipped" when it does not run).
    pub version: String,
    /// multifd channels of [`Preset::Best`].
    pub channels: u64,
}

impl Baseline {
    /// Reads the environment (and asks the binary its version when QEMU runs).
    pub fn from_env() -> Result<Baseline, Box<dyn std::error::Error>> {
        let enabled = std::env::var_os("FERRY_BENCH_NO_QEMU").is_none();
        let binary = PathBuf::from(
            std::env::var_os("FERRY_BENCH_QEMU").unwrap_or_else(|| DEFAULT_QEMU.into()),
        );
        let version = if enabled {
            qemu_version(&binary)?
        } else {
            "QEMU skipped".into()
        };
        let channels = crate::env_number("FERRY_BENCH_QEMU_CHANNELS", BEST_MULTIFD_CHANNELS)?;
        Ok(Baseline {
            enabled,
            binary,
            version,
            channels,
        })
    }

    /// A VM for this baseline's binary: `kernel` (the workload, written to a file) with
    /// `module`, `memory` bytes of RAM, the host's TSC rate on its command line, and its
    /// sockets and logs under `work_dir`.
    pub fn spec(
        &self,
        (kernel, module): (&Path, &Path),
        memory: u64,
        tsc_khz: u64,
        work_dir: &Path,
    ) -> QemuSpec {
        let mut spec = QemuSpec::new(kernel, module, &format!("tsc_khz={tsc_khz}"), work_dir);
        spec.qemu = self.binary.clone();
        spec.memory_mib = memory >> 20;
        spec
    }
}

/// The guest TSC rate in kHz, as a Ferry VM sees it: QEMU's guest runs at the host's rate
/// too (no TSC scaling here), so the workload kernel paces itself with this.
pub fn host_tsc_khz() -> Result<u64, ferry_runtime::VmError> {
    use ferry_runtime::{Boot, TestGuest, Vm, VmConfig};
    let probe = Vm::create(
        &VmConfig::new("tsc-probe", 1, ferry_runtime::layout::MIN_MEMORY),
        &Boot::Guest(TestGuest::Counter { ticks_per_sec: 1 }),
        &[],
    )?;
    Ok(u64::from(probe.tsc_khz()))
}
/// `max-bandwidth` of [`Preset::Best`] in bytes/s: far above what loopback carries, i.e.
/// unlimited (QEMU's default is 128 MiB/s).
pub const BEST_MAX_BANDWIDTH: u64 = 100_000_000_000;
/// `multifd-channels` of [`Preset::Best`]: one per core of this 2-core machine.
pub const BEST_MULTIFD_CHANNELS: u64 = 2;

/// How QEMU's migration is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Nothing changed: 128 MiB/s bandwidth cap, one stream, 300 ms downtime limit.
    Defaults,
    /// `max-bandwidth` [`BEST_MAX_BANDWIDTH`], multifd with the given channel count on both
    /// sides; the downtime limit stays at its 300 ms default.
    Best {
        /// `multifd-channels`.
        multifd_channels: u64,
    },
}

impl Preset {
    /// The best settings with [`BEST_MULTIFD_CHANNELS`].
    pub const BEST: Preset = Preset::Best {
        multifd_channels: BEST_MULTIFD_CHANNELS,
    };

    /// A short description for tables.
    pub fn describe(&self) -> String {
        match self {
            Preset::Defaults => "defaults".into(),
            Preset::Best { multifd_channels } => {
                format!("best (no bw cap, multifd x{multifd_channels})")
            }
        }
    }
}

/// One VM to boot in QEMU and migrate.
#[derive(Clone, Debug)]
pub struct QemuSpec {
    /// QEMU binary (a name looked up in `PATH`, or a path).
    pub qemu: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The multiboot workload kernel (ELF32).
    pub kernel: PathBuf,
    /// The module with the preloaded memory content.
    pub module: PathBuf,
    /// Kernel command line, e.g. `tsc_khz=2445434`.
    pub cmdline: String,
    /// Directory for QMP sockets, serial logs and QEMU's stderr.
    pub work_dir: PathBuf,
    /// How long the workload runs on the source, after it made its first progress, before
    /// the migration starts.
    pub settle: Duration,
    /// Longest wait for each step (boot, migration, checks on the destination).
    pub timeout: Duration,
    /// A raw disk on each side (source image, destination image): then [`migrate`] moves
    /// it as libvirt's `--copy-storage-all` does (see [`migrate`]).
    pub disks: Option<(PathBuf, PathBuf)>,
    /// More memory content for the source, as (file, guest-physical address): QEMU's generic
    /// loader (`-device loader,file=F,addr=A,force-raw=on`) puts it where multiboot modules
    /// cannot go (above 4 GiB).
    pub loads: Vec<(PathBuf, u64)>,
}

impl QemuSpec {
    /// A spec with the default binary, a 1 GiB VM, 2 s settle time and 120 s step timeout.
    pub fn new(kernel: &Path, module: &Path, cmdline: &str, work_dir: &Path) -> Self {
        QemuSpec {
            qemu: PathBuf::from(DEFAULT_QEMU),
            memory_mib: 1024,
            kernel: kernel.to_path_buf(),
            module: module.to_path_buf(),
            cmdline: cmdline.to_string(),
            work_dir: work_dir.to_path_buf(),
            settle: Duration::from_secs(2),
            timeout: Duration::from_secs(120),
            disks: None,
            loads: Vec::new(),
        }
    }
}

/// What one QEMU migration did, as QEMU's `query-migrate` reports it on the source plus
/// what the harness measured.
#[derive(Clone, Debug, PartialEq)]
pub struct QemuMigrationReport {
    /// Final status (`completed`).
    pub status: String,
    /// `total-time`: from `migrate` until the source completed, ms.
    pub total_ms: u64,
    /// `downtime`: the guest was stopped this long, ms.
    pub downtime_ms: u64,
    /// `setup-time`, ms.
    pub setup_ms: u64,
    /// `ram.transferred`: bytes QEMU sent for RAM.
    pub transferred_bytes: u64,
    /// `ram.dirty-sync-count`: dirty-bitmap syncs, i.e. the first full pass, each further
    /// pass, and the final one while stopped.
    pub dirty_sync_count: u64,
    /// `ram.duplicate`: pages sent as a zero-page marker.
    pub zero_pages: u64,
    /// `ram.mbps` at the end.
    pub mbps: f64,
    /// Measured by the harness: from sending `migrate` until the destination reported
    /// `running`, ms (polled, so a few ms coarse).
    pub until_destination_runs_ms: u64,
    /// The workload's progress word on the source just before the migration and on the
    /// destination at the end of the checks.
    pub progress: (u64, u64),
    /// With disks: from `blockdev-mirror` until the mirror job was ready, ms.
    pub mirror_ready_ms: Option<u64>,
    /// With disks: from `blockdev-mirror` until the destination ran, ms (the whole move).
    pub with_storage_ms: Option<u64>,
}

/// Errors from driving QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The QEMU binary is not installed.
    #[error(
        "QEMU binary `{binary}` not found: install Debian's qemu-system-x86 package, or point FERRY_BENCH_QEMU at qemu-system-x86_64"
    )]
    QemuMissing {
        /// The binary that was looked for.
        binary: String,
    },
    /// Running QEMU failed for another reason.
    #[error("starting `{binary}` failed")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A QEMU process exited while it should have been running.
    #[error(
        "the {role} QEMU exited ({status}); its stderr: {stderr}; its serial console ends: {serial}"
    )]
    Exited {
        /// `source` or `destination`.
        role: &'static str,
        /// Exit status.
        status: String,
        /// What QEMU printed.
        stderr: String,
        /// The guest's last console output.
        serial: String,
    },
    /// Talking QMP failed.
    #[error("QMP to the {role} QEMU: {operation} failed")]
    Qmp {
        /// `source` or `destination`.
        role: &'static str,
        /// What was being done.
        operation: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered something that is not a QMP reply.
    #[error("QMP to the {role} QEMU: unexpected reply to {command}: {reply}")]
    BadReply {
        /// `source` or `destination`.
        role: &'static str,
        /// The command.
        command: String,
        /// What came back.
        reply: String,
    },
    /// QEMU refused a command.
    #[error("QMP to the {role} QEMU: `{command}` failed: {class}: {desc}")]
    Command {
        /// `source` or `destination`.
        role: &'static str,
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The migration ended without completing.
    #[error("QEMU migration ended with status `{status}`: {error}")]
    MigrationFailed {
        /// Final status.
        status: String,
        /// QEMU's error description.
        error: String,
    },
    /// The workload stopped making progress.
    #[error("the guest's workload is not running on the {role}: {detail}")]
    GuestStalled {
        /// `source` or `destination`.
        role: &'static str,
        /// What was seen.
        detail: String,
    },
    /// A local file operation failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// Runs `qemu --version`; returns its first line, or [`QemuError::QemuMissing`].
pub fn qemu_version(qemu: &Path) -> Result<String, QemuError> {
    let output = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| spawn_error(qemu, source))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn spawn_error(qemu: &Path, source: std::io::Error) -> QemuError {
    let binary = qemu.display().to_string();
    if source.kind() == std::io::ErrorKind::NotFound {
        QemuError::QemuMissing { binary }
    } else {
        QemuError::Spawn { binary, source }
    }
}

/// A small QMP client: one JSON object per line each way; replies carry the `id` of their
/// command, asynchronous events (which have none) are skipped.
#[derive(Debug)]
struct Qmp {
    role: &'static str,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Qmp {
    fn connect(
        role: &'static str,
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<Qmp, QemuError> {
        let qmp_io = |operation: &str| {
            let operation = operation.to_string();
            move |source| QemuError::Qmp {
                role,
                operation,
                source,
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(qmp_io("setting the socket timeout"))?;
        let writer = stream.try_clone().map_err(qmp_io("cloning the socket"))?;
        let mut qmp = Qmp {
            role,
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
        };
        let greeting = qmp.read_message("the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::BadReply {
                role,
                command: "the greeting".into(),
                reply: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read_message(&mut self, waiting_for: &str) -> Result<Value, QemuError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QemuError::Qmp {
                role: self.role,
                operation: format!("reading the reply to {waiting_for}"),
                source,
            })?;
        if read == 0 {
            return Err(QemuError::Qmp {
                role: self.role,
                operation: format!("reading the reply to {waiting_for}"),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|_| QemuError::BadReply {
            role: self.role,
            command: waiting_for.to_string(),
            reply: line.trim_end().to_string(),
        })
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns its `return`.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QemuError::Qmp {
                role: self.role,
                operation: format!("sending {command}"),
                source,
            })?;
        loop {
            let reply = self.read_message(command)?;
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(result) = reply.get("return") {
                return Ok(result.clone());
            }
            let error = reply.get("error");
            let field = |name: &str| {
                error
                    .and_then(|e| e.get(name))
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            return Err(QemuError::Command {
                role: self.role,
                command: command.to_string(),
                class: field("class"),
                desc: field("desc"),
            });
        }
    }

    /// Runs an HMP command line and returns its text output.
    fn human(&mut self, command_line: &str) -> Result<String, QemuError> {
        let output = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        output
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QemuError::BadReply {
                role: self.role,
                command: command_line.to_string(),
                reply: output.to_string(),
            })
    }

    /// The u64 at guest-physical `gpa`.
    fn read_u64(&mut self, gpa: u64) -> Result<u64, QemuError> {
        let text = self.human(&format!("xp /1gx {gpa:#x}"))?;
        // "00000000001c0000: 0x0000000000000041"
        text.split_once(": ")
            .and_then(|(_, value)| {
                u64::from_str_radix(value.trim().trim_start_matches("0x"), 16).ok()
            })
            .ok_or_else(|| QemuError::BadReply {
                role: self.role,
                command: format!("xp {gpa:#x}"),
                reply: text.clone(),
            })
    }

    fn run_status(&mut self) -> Result<String, QemuError> {
        let status = self.execute("query-status", Value::Null)?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string())
    }
}

/// One QEMU process; killed on drop.
#[derive(Debug)]
struct QemuProcess {
    role: &'static str,
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
    qmp_socket: PathBuf,
}

impl QemuProcess {
    fn start(
        spec: &QemuSpec,
        role: &'static str,
        incoming: bool,
    ) -> Result<QemuProcess, QemuError> {
        let serial = spec.work_dir.join(format!("{role}.serial"));
        let stderr = spec.work_dir.join(format!("{role}.stderr"));
        let qmp_socket = spec.work_dir.join(format!("{role}.qmp"));
        for stale in [&serial, &qmp_socket] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_error(format!("removing {}", stale.display()))(e));
                }
                _ => {}
            }
        }
        let stderr_file =
            File::create(&stderr).map_err(io_error(format!("creating {}", stderr.display())))?;
        let mut command = Command::new(&spec.qemu);
        command
            .args(["-accel", "kvm", "-cpu", "qemu64,-pni"])
            .args(["-m", &spec.memory_mib.to_string(), "-smp", "1"])
            .args(["-nographic", "-display", "none", "-monitor", "none"])
            .args(["-nic", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-device", "isa-debug-exit,iobase=0x500,iosize=4"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.module)
            .args(["-append", &spec.cmdline]);
        if let Some((source_image, destination_image)) = &spec.disks {
            let image = if incoming {
                destination_image
            } else {
                source_image
            };
            command
                .arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=f0,cache.direct=off",
                    image.display()
                ))
                .args(["-blockdev", "driver=raw,file=f0,node-name=d0"])
                .args(["-device", "virtio-blk-pci,drive=d0"]);
        }
        if !incoming {
            for (file, addr) in &spec.loads {
                command.arg("-device").arg(format!(
                    "loader,file={},addr={addr:#x},force-raw=on",
                    file.display()
                ));
            }
        }
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .map_err(|source| spawn_error(&spec.qemu, source))?;
        Ok(QemuProcess {
            role,
            child,
            serial,
            stderr,
            qmp_socket,
        })
    }

    /// Fails with [`QemuError::Exited`] if the process has ended.
    fn check_alive(&mut self) -> Result<(), QemuError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(status.to_string())),
            Err(e) => Err(self.exited(format!("unknown: {e}"))),
        }
    }

    fn exited(&self, status: String) -> QemuError {
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        QemuError::Exited {
            role: self.role,
            status,
            stderr: stderr.trim().to_string(),
            serial: tail(&self.console(), 300),
        }
    }

    fn console(&self) -> String {
        std::fs::read(&self.serial)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Connects to the QMP socket once QEMU has created it.
    fn qmp(&mut self, timeout: Duration) -> Result<Qmp, QemuError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            match UnixStream::connect(&self.qmp_socket) {
                Ok(stream) => return Qmp::connect(self.role, stream, timeout),
                Err(_) if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(QemuError::Qmp {
                        role: self.role,
                        operation: format!("connecting to {}", self.qmp_socket.display()),
                        source,
                    });
                }
            }
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Already gone is fine; there is nothing more to do about a kill that fails.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str, chars: usize) -> String {
    let skip = text.chars().count().saturating_sub(chars);
    text.chars()
        .skip(skip)
        .collect::<String>()
        .trim()
        .to_string()
}

/// `tick N` values in console output.
fn ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|line| line.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// Polls `check` every `every` until it yields a value, the process dies, or `timeout`.
fn poll<T>(
    process: &mut QemuProcess,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut(&mut QemuProcess) -> Result<Option<T>, QemuError>,
) -> Result<T, QemuError> {
    let started = Instant::now();
    loop {
        process.check_alive()?;
        if let Some(value) = check(process)? {
            return Ok(value);
        }
        if started.elapsed() >= timeout {
            return Err(QemuError::Timeout {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(every);
    }
}

/// Waits until the u64 at `gpa` exceeds `above`; returns it.
fn wait_progress(
    process: &mut QemuProcess,
    qmp: &mut Qmp,
    gpa: u64,
    above: u64,
    timeout: Duration,
) -> Result<u64, QemuError> {
    let role = process.role;
    poll(
        process,
        "workload progress",
        timeout,
        Duration::from_millis(50),
        |_| {
            let value = qmp.read_u64(gpa)?;
            Ok((value > above).then_some(value))
        },
    )
    .map_err(|error| match error {
        QemuError::Timeout { after, .. } => QemuError::GuestStalled {
            role,
            detail: format!(
                "the progress word at {gpa:#x} stayed at or below {above} for {after:?}"
            ),
        },
        other => other,
    })
}

fn apply_preset(qmp: &mut Qmp, preset: Preset, is_source: bool) -> Result<(), QemuError> {
    let Preset::Best { multifd_channels } = preset else {
        return Ok(());
    };
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
    )?;
    let mut parameters = json!({ "multifd-channels": multifd_channels });
    if is_source {
        parameters["max-bandwidth"] = json!(BEST_MAX_BANDWIDTH);
    }
    qmp.execute("migrate-set-parameters", parameters)?;
    Ok(())
}

fn free_loopback_port() -> Result<u16, QemuError> {
    // The port is free when this returns; QEMU binds it a moment later. Another process
    // taking it in between would make `migrate-incoming` fail with a clear error.
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(io_error("finding a free loopback port"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("finding a free loopback port"))?
        .port();
    Ok(port)
}

fn field_u64(value: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Boots the VM of `spec` in a source QEMU, migrates it with `preset` to a destination QEMU
/// on loopback, checks the guest still runs there, and reports. Both QEMUs are gone when
/// this returns.
pub fn migrate(spec: &QemuSpec, preset: Preset) -> Result<QemuMigrationReport, QemuError> {
    std::fs::create_dir_all(&spec.work_dir)
        .map_err(io_error(format!("creating {}", spec.work_dir.display())))?;
    let timeout = spec.timeout;
    let mut source = QemuProcess::start(spec, "source", false)?;
    // The destination boots nothing until the migration arrives; starting it now overlaps
    // its start-up (it reads the module too) with the source's boot.
    let mut destination = QemuProcess::start(spec, "destination", true)?;
    let mut source_qmp = source.qmp(timeout)?;
    let mut destination_qmp = destination.qmp(timeout)?;

    let banner: Banner = poll(
        &mut source,
        "the workload banner on the source's serial console",
        timeout,
        Duration::from_millis(50),
        |process| Ok(multiboot_workload::parse_banner(&process.console())),
    )
    .map_err(|error| match error {
        QemuError::Timeout { what, after } => QemuError::Timeout {
            what: format!("{what} (it shows: {:?})", tail(&source.console(), 300)),
            after,
        },
        other => other,
    })?;
    let progress_gpa = banner.progress_address();
    // A first full pass (or a first tick) before the settle time starts the measurement
    // from the workload's steady state.
    wait_progress(&mut source, &mut source_qmp, progress_gpa, 1, timeout)?;
    std::thread::sleep(spec.settle);
    source.check_alive()?;

    apply_preset(&mut destination_qmp, preset, false)?;
    apply_preset(&mut source_qmp, preset, true)?;
    let uri = format!("tcp:127.0.0.1:{}", free_loopback_port()?);
    destination_qmp.execute("migrate-incoming", json!({ "uri": uri }))?;

    // With disks, libvirt's --copy-storage-all sequence: the destination exports its empty
    // image over NBD, the source mirrors into it and, once the mirror is ready (in sync and
    // mirroring every write), migrates; the job is cancelled at the switch (a ready mirror
    // cancelled completes without pivoting: the destination has the disk).
    let mut mirror = None;
    if spec.disks.is_some() {
        let nbd_port = free_loopback_port()?;
        destination_qmp.execute(
            "nbd-server-start",
            json!({ "addr": { "type": "inet", "data": { "host": "127.0.0.1", "port": nbd_port.to_string() } } }),
        )?;
        destination_qmp.execute(
            "block-export-add",
            json!({ "type": "nbd", "id": "e0", "node-name": "d0", "name": "d0", "writable": true }),
        )?;
        let mirror_started = Instant::now();
        source_qmp.execute(
            "blockdev-add",
            json!({ "driver": "nbd", "node-name": "t0", "export": "d0",
                    "server": { "type": "inet", "host": "127.0.0.1", "port": nbd_port.to_string() } }),
        )?;
        source_qmp.execute(
            "blockdev-mirror",
            json!({ "job-id": "m0", "device": "d0", "target": "t0", "sync": "full" }),
        )?;
        poll(
            &mut source,
            "the disk mirror to be ready",
            timeout,
            Duration::from_millis(10),
            |_| {
                let jobs = source_qmp.execute("query-block-jobs", Value::Null)?;
                let ready = jobs
                    .as_array()
                    .and_then(|jobs| jobs.first())
                    .and_then(|job| job.get("ready"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                Ok(ready.then_some(()))
            },
        )?;
        mirror = Some((mirror_started, mirror_started.elapsed().as_millis() as u64));
    }

    let progress_before = source_qmp.read_u64(progress_gpa)?;
    let source_ticks_before = ticks(&source.console()).last().copied();
    let started = Instant::now();
    source_qmp.execute("migrate", json!({ "uri": uri }))?;
    let info = poll(
        &mut source,
        "the migration to finish",
        timeout,
        Duration::from_millis(10),
        |_| {
            let info = source_qmp.execute("query-migrate", Value::Null)?;
            let status = info.get("status").and_then(Value::as_str).unwrap_or("");
            Ok(matches!(status, "completed" | "failed" | "cancelled").then_some(info))
        },
    )?;
    let status = info
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    if status != "completed" {
        let error = info
            .get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or("no error description")
            .to_string();
        return Err(QemuError::MigrationFailed { status, error });
    }
    poll(
        &mut destination,
        "the destination to run",
        timeout,
        Duration::from_millis(2),
        |_| Ok((destination_qmp.run_status()? == "running").then_some(())),
    )?;
    let until_destination_runs_ms = started.elapsed().as_millis() as u64;
    let with_storage_ms = mirror.map(|(began, _)| began.elapsed().as_millis() as u64);
    if mirror.is_some() {
        source_qmp.execute("block-job-cancel", json!({ "device": "m0" }))?;
        destination_qmp.execute("nbd-server-stop", Value::Null)?;
    }

    let progress_after = wait_progress(
        &mut destination,
        &mut destination_qmp,
        progress_gpa,
        progress_before,
        Duration::from_secs(10).min(timeout),
    )?;
    if let Some(last) = source_ticks_before {
        let role = destination.role;
        poll(
            &mut destination,
            "ticks on the destination's console",
            Duration::from_secs(10).min(timeout),
            Duration::from_millis(50),
            |process| Ok(ticks(&process.console()).into_iter().find(|&t| t > last)),
        )
        .map_err(|error| match error {
            QemuError::Timeout { .. } => QemuError::GuestStalled {
                role,
                detail: format!("no tick after {last} on its console"),
            },
            other => other,
        })?;
    }

    Ok(QemuMigrationReport {
        status,
        total_ms: field_u64(&info, &["total-time"]),
        downtime_ms: field_u64(&info, &["downtime"]),
        setup_ms: field_u64(&info, &["setup-time"]),
        transferred_bytes: field_u64(&info, &["ram", "transferred"]),
        dirty_sync_count: field_u64(&info, &["ram", "dirty-sync-count"]),
        zero_pages: field_u64(&info, &["ram", "duplicate"]),
        mbps: info
            .get("ram")
            .and_then(|ram| ram.get("mbps"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        until_destination_runs_ms,
        progress: (progress_before, progress_after),
        mirror_ready_ms: mirror.map(|(_, ready)| ready),
        with_storage_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_qemu_is_reported_as_such() {
        let error = qemu_version(Path::new("/nonexistent/qemu-system-x86_64")).unwrap_err();
        assert!(matches!(error, QemuError::QemuMissing { .. }), "{error}");
        assert!(error.to_string().contains("qemu-system-x86"));
    }

    #[test]
    fn ticks_and_tail_parse_console_text() {
        assert_eq!(
            ticks("ferry counter guest\ntick 1\ntick 2\ntick"),
            vec![1, 2]
        );
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
    }

    #[test]
    fn presets_describe_themselves() {
        assert_eq!(Preset::Defaults.describe(), "defaults");
        assert!(Preset::BEST.describe().contains("multifd x2"));
    }
}
