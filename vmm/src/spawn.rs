//! Starting a VMM process that does not die with its parent: its own process group (no
//! signal sent to hostd's group — a Ctrl-C, a `kill -- -PGID`, a terminal hangup — reaches
//! it), no parent-death signal, standard output and error to a log file, and hostd's answer
//! only once its socket answers.
//!
//! A process group, not a session: with the scheduler's autogroups (on by default in many
//! kernels, and here), every new session is its own scheduling group, weighed like all of
//! hostd together. A busy guest's VMM then takes half the CPU from the copy workers that
//! migrate it, where a thread of hostd's group took its share per thread; the migration
//! benchmark lost about a fifth of its speed that way. Group signals are what a session
//! would have protected against, and a group of its own does that too.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{VmmClient, VmmClientError};

/// How long a new VMM may take to answer on its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the VMM a VM of the same name had here may take to let go of the socket path:
/// a VM that has just migrated away, or come back, has its old VMM ending while its new one
/// is wanted.
pub const PREDECESSOR_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a VMM: a program and the arguments that make it one (`hostd vmm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmProgram {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before `--socket PATH`.
    pub args: Vec<OsString>,
}

impl VmmProgram {
    /// This very executable, run as a VMM (every Ferry binary that starts VMs serves as
    /// one when its first argument is `vmm`).
    pub fn this_executable() -> io::Result<Self> {
        Ok(VmmProgram {
            program: std::env::current_exe()?,
            args: vec![OsString::from("vmm")],
        })
    }
}

/// Starting a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The log file cannot be opened.
    #[error("cannot open the VMM log {path}")]
    Log {
        /// The log.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The process cannot be started.
    #[error("cannot start the VMM process {program}")]
    Start {
        /// The program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// It exited before answering.
    #[error("the VMM process exited ({status}) before it answered; its log {log} says: {tail}")]
    Exited {
        /// How it ended.
        status: std::process::ExitStatus,
        /// Its log.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// It did not answer in time.
    #[error("the VMM process did not answer on {socket} within {START_TIMEOUT:?}")]
    Timeout {
        /// The socket.
        socket: PathBuf,
    },
    /// It answered, but not as a VMM should.
    #[error(transparent)]
    Greeting(VmmClientError),
    /// Another process still serves the socket path.
    #[error("another VMM process still serves {socket} after {waited:?}")]
    Occupied {
        /// The socket.
        socket: PathBuf,
        /// How long it was given to let go.
        waited: Duration,
    },
}

/// Waits until nothing answers on `socket`: a VMM that is ending removes its socket before
/// it exits, and one that died leaves a path nothing listens on (the new VMM removes it).
fn wait_for_predecessor(socket: &Path, wait: Duration) -> Result<(), SpawnError> {
    let deadline = Instant::now() + wait;
    while std::os::unix::net::UnixStream::connect(socket).is_ok() {
        if Instant::now() >= deadline {
            return Err(SpawnError::Occupied {
                socket: socket.to_path_buf(),
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Starts a VMM serving `socket`, logging to `log`; returns the child and a connection.
/// A VMM still ending on that path (the VM's previous life on this host) is waited for, up
/// to [`PREDECESSOR_TIMEOUT`].
pub fn spawn(
    program: &VmmProgram,
    socket: &Path,
    log: &Path,
) -> Result<(Child, VmmClient), SpawnError> {
    spawn_waiting(program, socket, log, PREDECESSOR_TIMEOUT)
}

/// [`spawn`], giving a VMM still on `socket` up to `predecessor` to let go.
pub fn spawn_waiting(
    program: &VmmProgram,
    socket: &Path,
    log: &Path,
    predecessor: Duration,
) -> Result<(Child, VmmClient), SpawnError> {
    wait_for_predecessor(socket, predecessor)?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| SpawnError::Log {
            path: log.to_path_buf(),
            source,
        })?;
    let stderr = log_file.try_clone().map_err(|source| SpawnError::Log {
        path: log.to_path_buf(),
        source,
    })?;
    let mut command = Command::new(&program.program);
    command
        .args(&program.args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(stderr);
    // A process group of its own (see the module docs for why not a session).
    command.process_group(0);
    let mut child = command.spawn().map_err(|source| SpawnError::Start {
        program: program.program.clone(),
        source,
    })?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(SpawnError::Exited {
                status,
                log: log.to_path_buf(),
                tail: log_tail(log),
            });
        }
        match VmmClient::connect(socket) {
            // Another process answering on that path is not the one just started.
            Ok(client) if client.process().pid == child.id() => return Ok((child, client)),
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(VmmClientError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(_) | Err(VmmClientError::Connect { .. }) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SpawnError::Timeout {
                    socket: socket.to_path_buf(),
                });
            }
            Err(other) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SpawnError::Greeting(other));
            }
        }
    }
}

/// The VMM processes serving a socket under `dir`.
pub fn vmms_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_vmm = args.iter().any(|a| *a == b"vmm");
        let serves_under = args
            .windows(2)
            .any(|w| w[0] == b"--socket" && String::from_utf8_lossy(w[1]).starts_with(&needle));
        if is_vmm && serves_under && pid != std::process::id() {
            found.push(pid);
        }
    }
    found
}

/// SIGKILLs every VMM process serving a socket under `dir` (a test cluster's or the demo's
/// directory): they outlive hostd by design, so whoever made the directory takes them down.
pub fn kill_vmms_under(dir: &Path) {
    for pid in vmms_under(dir) {
        // SAFETY: kill(2) with a valid signal on a VMM process under our directory.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}
