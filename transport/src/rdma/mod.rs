//! RDMA: device discovery, and the verbs data path that moves guest pages with RDMA WRITE.
//!
//! The destination registers its guest memory for remote write ([`RdmaReceiver::start`]) and
//! hands the source a [`MemoryTable`] (guest-physical base, length, address and rkey per
//! region) over the control channel. The source registers its own guest memory for local
//! read and connects one reliable-connected queue pair per copy worker through librdmacm
//! ([`RdmaSender::connect`]). Each worker turns the page runs it is given into RDMA WRITEs
//! straight from source guest memory into destination guest memory: no intermediate copy,
//! no destination CPU on the data path, many writes per signalled completion, a bounded
//! number of work requests in flight.
//!
//! Ordering: at [`RdmaSender::flush`] every queue pair sends a small marker (a SEND) behind
//! its writes. On an RC queue pair a SEND is delivered only after the writes posted before
//! it have been placed, so when the destination sees the marker on every queue pair, the
//! round is in its memory; it acknowledges each marker, and `flush` returns when every
//! acknowledgement is in, with the same meaning as over TCP.
//!
//! Integrity: the NIC reads live guest pages, so there is no per-page checksum on this
//! path; correctness rests on dirty tracking (fetch-and-clear before the pages are read) and
//! on the memory hash of `--verify`. Pages never sent before and all-zero now are skipped:
//! fresh destination memory is zero. A page that becomes zero after it was sent is sent.

mod connection;
mod discovery;
mod memlock;
mod message;
mod receiver;
mod sender;
mod table;
mod verbs;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use discovery::{LinkLayer, PortState, RdmaDevice, RdmaPort, discover};
pub use memlock::{MemlockLimit, memlock_limit, raise_memlock_limit};
pub use receiver::{RdmaListener, RdmaReceiver, RdmaReceiverConfig};
pub use sender::{RdmaSender, RdmaSenderConfig};
pub use table::{MemoryTable, RemoteRegion};

use serde::{Deserialize, Serialize};

/// Whether this build can move pages over RDMA. Discovery works regardless.
pub const DATA_PATH_AVAILABLE: bool = true;

/// The RDMA link a transfer uses, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// Device name, e.g. `rxe0`.
    pub device: String,
    /// Port number.
    pub port: u8,
    /// Source GID of the connection.
    pub gid: String,
    /// Path MTU in bytes.
    pub mtu: u32,
}

impl std::fmt::Display for LinkInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} port {} gid {} mtu {}",
            self.device, self.port, self.gid, self.mtu
        )
    }
}

/// An RDMA failure: setup, registration, a queue pair or a completion in error, a peer that
/// went away.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// `ibv_get_device_list` failed for a reason other than "no RDMA support".
    #[error("cannot list RDMA devices (ibv_get_device_list)")]
    ListDevices {
        /// The errno it left.
        #[source]
        source: io::Error,
    },
    /// A verbs or librdmacm call failed.
    #[error("rdma: {call} failed")]
    Verbs {
        /// The call.
        call: &'static str,
        /// Its errno.
        #[source]
        source: io::Error,
    },
    /// Memory registration failed (most often: the locked-memory limit is too low).
    #[error("rdma: cannot register {bytes} bytes of memory ({})", memlock::hint(*.bytes))]
    Register {
        /// Bytes asked for.
        bytes: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Connection setup ended in an event other than the one expected.
    #[error("rdma: {detail} ({event} from {peer})")]
    Connection {
        /// The peer.
        peer: SocketAddr,
        /// librdmacm's name of the event.
        event: String,
        /// What it means.
        detail: String,
    },
    /// Connection setup timed out.
    #[error("rdma: no {waiting_for} from {peer} within {after:?}")]
    Timeout {
        /// The event waited for.
        waiting_for: String,
        /// The peer.
        peer: SocketAddr,
        /// How long.
        after: Duration,
    },
    /// A work request completed with an error status: the queue pair is in error state.
    #[error("rdma stream {stream}: {what} completed with error: {status}")]
    Completion {
        /// Stream (queue pair) index.
        stream: usize,
        /// What the work request was.
        what: &'static str,
        /// libibverbs' words for the status.
        status: String,
    },
    /// The peer disconnected before the transfer finished.
    #[error("rdma stream {stream}: the peer disconnected ({event})")]
    Disconnected {
        /// Stream index.
        stream: usize,
        /// The connection event.
        event: String,
    },
    /// Nothing arrived from the peer for too long.
    #[error("rdma stream {stream}: nothing from the peer for {after:?} while {waiting_for}")]
    Idle {
        /// Stream index.
        stream: usize,
        /// What was awaited.
        waiting_for: &'static str,
        /// How long.
        after: Duration,
    },
    /// The peer broke the protocol.
    #[error("rdma stream {stream}: {reason}")]
    Protocol {
        /// Stream index.
        stream: usize,
        /// What was wrong.
        reason: String,
    },
    /// The peer gave up and said why.
    #[error("rdma: the {side} abandoned the transfer: {reason}")]
    Abandoned {
        /// "source" or "destination".
        side: &'static str,
        /// Its reason.
        reason: String,
    },
    /// This side gave up.
    #[error("rdma: transfer aborted: {reason}")]
    Aborted {
        /// Why.
        reason: String,
    },
    /// The two sides' memory layouts do not fit, or the setup cannot work.
    #[error("rdma: {reason}")]
    Setup {
        /// What is wrong.
        reason: String,
    },
}
