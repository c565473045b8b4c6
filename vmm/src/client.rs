//! hostd's side of a VMM socket: typed calls, one at a time on one connection, and console
//! feeds on connections of their own.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use ferry_runtime::{DirtySet, GuestRam};

use crate::frames::{self, FrameIoError};
use crate::protocol::{
    CreateSpec, EmptySpec, FrozenState, IncomingState, ProcessInfo, Request, Response,
    VMM_PROTOCOL_VERSIONS, VmmError, VmmInfo,
};

/// A console feed: where it starts, the retained history from there, and what follows.
pub type ConsoleFeed = (u64, Vec<u8>, Receiver<Vec<u8>>);

/// Longest a request may take before the VMM counts as hung (a memory hash of a large VM
/// under `--verify` is the slowest request).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A call to a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    /// Nothing answers on the socket.
    #[error("cannot connect to the VMM at {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The connection failed (the VMM process died, hung or spoke garbage).
    #[error("VMM at {socket}")]
    Io {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: FrameIoError,
    },
    /// The VMM refused or failed the request and said why.
    #[error(transparent)]
    Refused(#[from] VmmError),
    /// The VMM answered something that does not fit the request.
    #[error("VMM at {socket} answered {got} to {request}")]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// The request.
        request: &'static str,
        /// The answer.
        got: String,
    },
}

impl VmmClientError {
    /// Whether the VMM process is gone (or unreachable), as opposed to refusing a request.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            VmmClientError::Connect { .. } | VmmClientError::Io { .. }
        )
    }
}

/// A connection to one VMM process.
#[derive(Debug)]
pub struct VmmClient {
    stream: UnixStream,
    socket: PathBuf,
    process: ProcessInfo,
}

fn open(socket: &Path) -> Result<(UnixStream, ProcessInfo), VmmClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| VmmClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let io = |source| VmmClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| io(FrameIoError::Io(e)))?;
    frames::send(
        &mut stream,
        &Request::Hello {
            versions: VMM_PROTOCOL_VERSIONS.to_vec(),
        },
    )
    .map_err(io)?;
    match frames::recv::<Response>(&mut stream).map_err(io)? {
        Response::Hello { process, .. } => Ok((stream, process)),
        Response::Error(error) => Err(error.into()),
        other => Err(VmmClientError::Protocol {
            socket: socket.to_path_buf(),
            request: "Hello",
            got: format!("{other:?}"),
        }),
    }
}

impl VmmClient {
    /// Connects and greets the VMM serving `socket`.
    pub fn connect(socket: &Path) -> Result<Self, VmmClientError> {
        let (stream, process) = open(socket)?;
        Ok(VmmClient {
            stream,
            socket: socket.to_path_buf(),
            process,
        })
    }

    /// The VMM process, as it introduced itself.
    pub fn process(&self) -> &ProcessInfo {
        &self.process
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn call(&mut self, request: &Request) -> Result<Response, VmmClientError> {
        let io = |source| VmmClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        frames::send(&mut self.stream, request).map_err(io)?;
        match frames::recv::<Response>(&mut self.stream).map_err(io)? {
            Response::Error(error) => Err(error.into()),
            answer => Ok(answer),
        }
    }

    fn unexpected(&self, request: &'static str, got: Response) -> VmmClientError {
        VmmClientError::Protocol {
            socket: self.socket.clone(),
            request,
            got: format!("{got:?}"),
        }
    }

    fn done(&mut self, request: Request, name: &'static str) -> Result<(), VmmClientError> {
        match self.call(&request)? {
            Response::Done => Ok(()),
            other => Err(self.unexpected(name, other)),
        }
    }

    fn info_answer(
        &mut self,
        request: Request,
        name: &'static str,
    ) -> Result<VmmInfo, VmmClientError> {
        match self.call(&request)? {
            Response::Info(info) => Ok(*info),
            other => Err(self.unexpected(name, other)),
        }
    }

    fn dirty(&mut self, request: Request, name: &'static str) -> Result<DirtySet, VmmClientError> {
        match self.call(&request)? {
            Response::Dirty(set) => Ok(set),
            other => Err(self.unexpected(name, other)),
        }
    }

    /// Builds the VM.
    pub fn create(&mut self, spec: CreateSpec) -> Result<VmmInfo, VmmClientError> {
        self.info_answer(Request::Create(Box::new(spec)), "Create")
    }

    /// Builds an empty VM for an arriving migration.
    pub fn create_empty(&mut self, spec: EmptySpec) -> Result<VmmInfo, VmmClientError> {
        self.info_answer(Request::CreateEmpty(Box::new(spec)), "CreateEmpty")
    }

    /// What the VM is and how it does.
    pub fn info(&mut self) -> Result<VmmInfo, VmmClientError> {
        self.info_answer(Request::Info, "Info")
    }

    /// Runs the vCPUs.
    pub fn resume(&mut self) -> Result<(), VmmClientError> {
        self.done(Request::Resume, "Resume")
    }

    /// Parks the vCPUs.
    pub fn pause(&mut self) -> Result<(), VmmClientError> {
        self.done(Request::Pause, "Pause")
    }

    /// Sets the throttle.
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), VmmClientError> {
        self.done(Request::SetThrottle(percent), "SetThrottle")
    }

    /// Starts dirty tracking; returns round one (see `Vm::begin_tracking`).
    pub fn begin_tracking(&mut self) -> Result<DirtySet, VmmClientError> {
        self.dirty(Request::BeginTracking, "BeginTracking")
    }

    /// The pages written since the last answer.
    pub fn fetch_dirty(&mut self) -> Result<DirtySet, VmmClientError> {
        self.dirty(Request::FetchDirty, "FetchDirty")
    }

    /// Starts recording disk writes; per disk, the extents holding data.
    pub fn begin_disk_tracking(
        &mut self,
        chunk: u64,
    ) -> Result<Vec<Vec<(u64, u64)>>, VmmClientError> {
        self.extents(Request::BeginDiskTracking { chunk }, "BeginDiskTracking")
    }

    /// Per disk, the extents written since the last answer.
    pub fn fetch_dirty_blocks(&mut self) -> Result<Vec<Vec<(u64, u64)>>, VmmClientError> {
        self.extents(Request::FetchDirtyBlocks, "FetchDirtyBlocks")
    }

    fn extents(
        &mut self,
        request: Request,
        name: &'static str,
    ) -> Result<Vec<Vec<(u64, u64)>>, VmmClientError> {
        match self.call(&request)? {
            Response::DiskExtents(extents) => Ok(extents),
            other => Err(self.unexpected(name, other)),
        }
    }

    /// Stops dirty tracking.
    pub fn stop_tracking(&mut self) -> Result<(), VmmClientError> {
        self.done(Request::StopTracking, "StopTracking")
    }

    /// Stop-and-copy's one step in the VMM.
    pub fn freeze(
        &mut self,
        hash_memory: bool,
        hash_disks: bool,
    ) -> Result<FrozenState, VmmClientError> {
        match self.call(&Request::Freeze {
            hash_memory,
            hash_disks,
        })? {
            Response::Frozen(state) => Ok(*state),
            other => Err(self.unexpected("Freeze", other)),
        }
    }

    /// Loads an arrived state.
    pub fn load_state(&mut self, state: IncomingState) -> Result<Option<bool>, VmmClientError> {
        match self.call(&Request::LoadState(Box::new(state)))? {
            Response::Loaded { verified } => Ok(verified),
            other => Err(self.unexpected("LoadState", other)),
        }
    }

    /// Maps the VM's memory into this process.
    pub fn memory(&mut self) -> Result<GuestRam, VmmClientError> {
        let size = match self.call(&Request::Memory)? {
            Response::Memory { size } => size,
            other => return Err(self.unexpected("Memory", other)),
        };
        let io = |source| VmmClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        let memfd = frames::recv_fd(&self.stream).map_err(io)?;
        GuestRam::from_memfd(memfd, size).map_err(|e| VmmClientError::Protocol {
            socket: self.socket.clone(),
            request: "Memory",
            got: ferry_transport::report(&e),
        })
    }

    /// Blocks until the VMM closes this connection, which it does only by ending: a watch on
    /// a process this one did not start (and so cannot wait for).
    pub fn wait_closed(mut self) {
        use std::io::Read;
        let _ = self.stream.set_read_timeout(None);
        let mut buf = [0u8; 64];
        while let Ok(n) = self.stream.read(&mut buf) {
            if n == 0 {
                return;
            }
        }
    }

    /// Stops the VM for good; the process ends.
    pub fn shutdown(mut self) -> Result<(), VmmClientError> {
        match self.call(&Request::Shutdown) {
            Ok(_) => Ok(()),
            // It may exit before its answer is read: gone is what was asked for.
            Err(VmmClientError::Io {
                source: FrameIoError::Closed,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Console output from `offset` on: where it starts, the retained history, and a feed
    /// of what follows (until the VM stops), on a connection of its own.
    pub fn follow_console(socket: &Path, offset: u64) -> Result<ConsoleFeed, VmmClientError> {
        let (mut stream, _) = open(socket)?;
        let io = |source| VmmClientError::Io {
            socket: socket.to_path_buf(),
            source,
        };
        // A quiet guest is not a dead VMM: the feed waits as long as it has to.
        stream
            .set_read_timeout(None)
            .map_err(|e| io(FrameIoError::Io(e)))?;
        frames::send(&mut stream, &Request::FollowConsole { offset }).map_err(io)?;
        let (start, history) = match frames::recv::<Response>(&mut stream).map_err(io)? {
            Response::ConsoleStart { offset, history } => (offset, history),
            Response::Error(error) => return Err(error.into()),
            other => {
                return Err(VmmClientError::Protocol {
                    socket: socket.to_path_buf(),
                    request: "FollowConsole",
                    got: format!("{other:?}"),
                });
            }
        };
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("vmm-console".into())
            .spawn(move || {
                while let Ok(Response::ConsoleChunk(chunk)) = frames::recv::<Response>(&mut stream)
                {
                    if tx.send(chunk).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| io(FrameIoError::Io(e)))?;
        Ok((start, history, rx))
    }
}
