//! The VMM process: one VM, served on a unix socket until it is shut down. It outlives the
//! hostd that started it; a restarted hostd connects again and carries on.
//!
//! One thread per connection. The VM sits behind one lock, so requests from several
//! connections (hostd, a restarted hostd, console followers) never interleave inside the
//! runtime; a console feed takes the lock only to subscribe.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_runtime::devices::Console;
use ferry_runtime::state::blob;
use ferry_runtime::{Vm, VmConfig, VmError, VmState};

use crate::frames::{self, FrameIoError};
use crate::protocol::{
    CreateSpec, EmptySpec, FrozenState, IncomingState, ProcessInfo, Request, Response,
    VMM_PROTOCOL_VERSIONS, VmmError, VmmErrorKind, VmmInfo,
};

/// Starting the VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another live VMM answers on the socket.
    #[error("another VMM process already serves {0}")]
    InUse(PathBuf),
    /// The socket cannot be created.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

struct Server {
    vm: Mutex<Option<Vm>>,
    console: Mutex<Option<Console>>,
    socket: PathBuf,
    started_unix_ms: u64,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error and its causes, for the operator.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    ferry_transport::report(error)
}

fn runtime_error(error: VmError) -> VmmError {
    VmmError::new(VmmErrorKind::Runtime, chain(&error))
}

fn no_vm() -> VmmError {
    VmmError::new(VmmErrorKind::InvalidState, "this VMM holds no VM yet")
}

/// Serves `socket` until a `Shutdown` request ends the process.
pub fn serve(socket: &Path) -> Result<(), ServeError> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(ServeError::InUse(socket.to_path_buf()));
        }
        // A socket file nothing listens on: a VMM that died. Its path is free again.
        let _ = std::fs::remove_file(socket);
    }
    let listener = UnixListener::bind(socket).map_err(|source| ServeError::Bind {
        path: socket.to_path_buf(),
        source,
    })?;
    // Only hostd's user may drive the VM.
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    let server = Arc::new(Server {
        vm: Mutex::new(None),
        console: Mutex::new(None),
        socket: socket.to_path_buf(),
        started_unix_ms: now_unix_ms(),
    });
    tracing::info!(socket = %socket.display(), pid = std::process::id(), "VMM serving");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let server = Arc::clone(&server);
                std::thread::spawn(move || {
                    if let Err(error) = server.connection(stream) {
                        tracing::debug!(error = %chain(&error), "VMM connection ended");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "accepting a VMM connection failed"),
        }
    }
    Ok(())
}

impl Server {
    fn process(&self) -> ProcessInfo {
        ProcessInfo {
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            has_vm: lock(&self.vm).is_some(),
        }
    }

    fn connection(&self, mut stream: UnixStream) -> Result<(), FrameIoError> {
        let versions = match frames::recv::<Request>(&mut stream)? {
            Request::Hello { versions } => versions,
            other => {
                let error = VmmError::new(
                    VmmErrorKind::InvalidState,
                    format!("a VMM connection must open with Hello, not {other:?}"),
                );
                return frames::send(&mut stream, &Response::Error(error));
            }
        };
        let Some(version) = VMM_PROTOCOL_VERSIONS
            .iter()
            .copied()
            .filter(|v| versions.contains(v))
            .max()
        else {
            let error = VmmError::new(
                VmmErrorKind::Version,
                format!(
                    "no common VMM protocol version: this VMM speaks {VMM_PROTOCOL_VERSIONS:?}, hostd speaks {versions:?}"
                ),
            );
            return frames::send(&mut stream, &Response::Error(error));
        };
        frames::send(
            &mut stream,
            &Response::Hello {
                version,
                process: self.process(),
            },
        )?;
        loop {
            let request = match frames::recv::<Request>(&mut stream) {
                Ok(request) => request,
                Err(FrameIoError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            match request {
                Request::FollowConsole { offset } => return self.feed_console(stream, offset),
                Request::Memory => match self.memory() {
                    Ok((size, memfd)) => {
                        frames::send(&mut stream, &Response::Memory { size })?;
                        frames::send_fd(&stream, &memfd)?;
                    }
                    Err(error) => frames::send(&mut stream, &Response::Error(error))?,
                },
                Request::Shutdown => {
                    self.shut_down();
                    let _ = frames::send(&mut stream, &Response::Done);
                    tracing::info!("VMM shut down");
                    std::process::exit(0);
                }
                request => {
                    let answer = self.handle(request).unwrap_or_else(Response::Error);
                    frames::send(&mut stream, &answer)?;
                }
            }
        }
    }

    /// One request, one answer: the whole match of what the VMM does.
    fn handle(&self, request: Request) -> Result<Response, VmmError> {
        let request = match request {
            Request::Create(spec) => return self.create(&spec),
            Request::CreateEmpty(spec) => return self.create_empty(&spec),
            other => other,
        };
        let mut guard = lock(&self.vm);
        let vm = guard.as_mut().ok_or_else(no_vm)?;
        Ok(match request {
            Request::Info => Response::Info(Box::new(info(vm))),
            Request::Resume => {
                // After a handover that failed, the locks come back before the guest runs
                // (waiting a little for a destination VMM that is still going away).
                lock_disks_waiting(vm).map_err(|e| {
                    VmmError::new(
                        VmmErrorKind::Runtime,
                        format!(
                            "cannot take the disk locks back, so the VM stays paused: {}",
                            chain(&e)
                        ),
                    )
                })?;
                vm.resume().map_err(runtime_error)?;
                Response::Done
            }
            Request::Pause => {
                vm.pause().map_err(runtime_error)?;
                Response::Done
            }
            Request::SetThrottle(percent) => {
                vm.set_throttle(percent);
                Response::Done
            }
            Request::BeginTracking => Response::Dirty(vm.begin_tracking().map_err(runtime_error)?),
            Request::FetchDirty => Response::Dirty(vm.fetch_dirty().map_err(runtime_error)?),
            Request::StopTracking => {
                if vm.dirty_log_enabled() {
                    vm.stop_dirty_log().map_err(runtime_error)?;
                }
                vm.stop_disk_tracking();
                Response::Done
            }
            Request::BeginDiskTracking { chunk } => {
                Response::DiskExtents(vm.begin_disk_tracking(chunk).map_err(runtime_error)?)
            }
            Request::FetchDirtyBlocks => Response::DiskExtents(vm.fetch_dirty_blocks()),
            Request::Freeze {
                hash_memory,
                hash_disks,
            } => Response::Frozen(Box::new(freeze(vm, hash_memory, hash_disks)?)),
            Request::LoadState(state) => Response::Loaded {
                verified: load_state(vm, &state)?,
            },
            Request::Hello { .. } => {
                return Err(VmmError::new(
                    VmmErrorKind::InvalidState,
                    "Hello comes once, first",
                ));
            }
            Request::Create(_)
            | Request::CreateEmpty(_)
            | Request::Memory
            | Request::FollowConsole { .. }
            | Request::Shutdown => unreachable!("handled before"),
        })
    }

    fn install(&self, vm: Vm) -> Result<Response, VmmError> {
        let mut guard = lock(&self.vm);
        if guard.is_some() {
            return Err(VmmError::new(
                VmmErrorKind::InvalidState,
                "this VMM already holds a VM",
            ));
        }
        *lock(&self.console) = Some(vm.console().clone());
        let answer = Response::Info(Box::new(info(&vm)));
        tracing::info!(vm = %vm.identity().name, "VM built");
        *guard = Some(vm);
        Ok(answer)
    }

    fn create(&self, spec: &CreateSpec) -> Result<Response, VmmError> {
        if lock(&self.vm).is_some() {
            return Err(VmmError::new(
                VmmErrorKind::InvalidState,
                "this VMM already holds a VM",
            ));
        }
        let config = VmConfig {
            identity: spec.identity.clone(),
            vcpus: spec.vcpus,
            memory: spec.memory,
            dirty_log: spec.dirty_log,
            console_log: spec.console_log.clone(),
            hidden_cpu_features: spec.hidden_cpu_features.clone(),
            disks: spec.disks.clone(),
            nics: spec.nics.clone(),
        };
        let mut vm = Vm::create(&config, &spec.boot, &spec.preloads).map_err(runtime_error)?;
        if spec.start {
            vm.resume().map_err(runtime_error)?;
        }
        self.install(vm)
    }

    fn create_empty(&self, spec: &EmptySpec) -> Result<Response, VmmError> {
        let vm = Vm::create_empty(
            &spec.identity,
            &spec.shape,
            &spec.boot,
            spec.dirty_log,
            spec.console_log.clone(),
            &spec.disks,
            &spec.nics,
        )
        .map_err(runtime_error)?;
        self.install(vm)
    }

    fn memory(&self) -> Result<(u64, std::fs::File), VmmError> {
        let guard = lock(&self.vm);
        let vm = guard.as_ref().ok_or_else(no_vm)?;
        let memfd = vm.ram().memfd().try_clone().map_err(|e| {
            VmmError::new(
                VmmErrorKind::Runtime,
                format!("duplicating the memory descriptor: {e}"),
            )
        })?;
        Ok((vm.ram().size(), memfd))
    }

    /// Streams console output on this connection until the VM stops or the peer leaves.
    fn feed_console(&self, mut stream: UnixStream, offset: u64) -> Result<(), FrameIoError> {
        let Some(console) = lock(&self.console).clone() else {
            return frames::send(&mut stream, &Response::Error(no_vm()));
        };
        let (start, history, feed) = console.follow_from(offset);
        frames::send(
            &mut stream,
            &Response::ConsoleStart {
                offset: start,
                history,
            },
        )?;
        while let Ok(chunk) = feed.recv() {
            frames::send(&mut stream, &Response::ConsoleChunk(chunk))?;
        }
        Ok(())
    }

    fn shut_down(&self) {
        if let Some(mut vm) = lock(&self.vm).take() {
            vm.stop();
            tracing::info!(vm = %vm.identity().name, "VM stopped");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn info(vm: &Vm) -> VmmInfo {
    VmmInfo {
        identity: vm.identity().clone(),
        shape: vm.shape().clone(),
        boot: vm.boot_description().to_string(),
        run_state: vm.run_state(),
        throttle: vm.throttle(),
        test: vm.test_device().state(),
        console_bytes: vm.console().total_bytes(),
        cpu_features: vm.cpu_features(),
        tracking: vm.dirty_log_enabled(),
        disks: vm.disks(),
        nics: vm.nics(),
    }
}

/// How long a VM that gets its disks back waits for the other holder to let go.
const DISK_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn lock_disks_waiting(vm: &mut Vm) -> Result<(), ferry_runtime::VmError> {
    let deadline = Instant::now() + DISK_LOCK_WAIT;
    loop {
        match vm.lock_disks() {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

fn freeze(vm: &mut Vm, hash_memory: bool, hash_disks: bool) -> Result<FrozenState, VmmError> {
    let started = Instant::now();
    vm.pause().map_err(runtime_error)?;
    vm.set_throttle(0);
    let dirty = vm.fetch_dirty().map_err(runtime_error)?;
    let dirty_disks = vm.fetch_dirty_blocks();
    let state = vm.capture_state().map_err(runtime_error)?;
    vm.release_disks().map_err(runtime_error)?;
    let disk_hashes = if hash_disks {
        vm.disk_hashes()
            .map_err(runtime_error)?
            .into_iter()
            .map(u128::to_le_bytes)
            .collect()
    } else {
        Vec::new()
    };
    let blob =
        blob::encode(&state).map_err(|e| VmmError::new(VmmErrorKind::BadState, chain(&e)))?;
    Ok(FrozenState {
        dirty,
        blob,
        console: vm.console().history(),
        console_total: vm.console().total_bytes(),
        memory_hash: hash_memory.then(|| vm.ram().hash().to_le_bytes()),
        dirty_disks,
        disk_hashes,
        took_us: started.elapsed().as_micros() as u64,
    })
}

fn load_state(vm: &mut Vm, incoming: &IncomingState) -> Result<Option<bool>, VmmError> {
    let bad = |message: String| VmmError::new(VmmErrorKind::BadState, message);
    let state: VmState = blob::decode(&incoming.blob)
        .map_err(|e| bad(format!("incoming VM state rejected: {}", chain(&e))))?;
    if state.identity != *vm.identity() {
        return Err(bad(format!(
            "incoming VM state rejected: it is for VM '{}' ({}), this is '{}'",
            state.identity.name,
            state.identity.uuid,
            vm.identity().name
        )));
    }
    let verified = match incoming.memory_hash {
        Some(expected) => {
            let expected = u128::from_le_bytes(expected);
            let local = vm.ram().hash();
            if local != expected {
                return Err(bad(format!(
                    "memory hash mismatch: destination {local:032x}, source {expected:032x}"
                )));
            }
            Some(true)
        }
        None => None,
    };
    vm.restore_state(&state).map_err(runtime_error)?;
    vm.lock_disks().map_err(|e| {
        bad(format!(
            "the destination cannot take the disk locks: {}",
            chain(&e)
        ))
    })?;
    vm.attach_nics().map_err(|e| {
        bad(format!(
            "the destination cannot put the VM's NICs on their bridges: {}",
            chain(&e)
        ))
    })?;
    vm.console()
        .seed_history(&incoming.console, incoming.console_total);
    Ok(verified)
}
