//! Ferry's transport: moving guest memory and control messages between two hosts.
//!
//! It knows nothing of KVM or actors. It moves pages between a [`memory::PageSource`] on
//! one host and a [`memory::PageSink`] on the other, and serde messages over a control
//! channel.
//!
//! - [`wire`]: the frame format (magic, version, type, flags, length, checksum) and version
//!   negotiation.
//! - [`negotiate`]: capabilities of each host and the deterministic choice of transport.
//! - [`rdma`]: RDMA device discovery (libibverbs); the RDMA data path comes later.
//! - [`memory`]: the guest memory abstraction, over raw mappings or a heap buffer.
//! - [`data`]: the bulk data plane, N TCP streams on CPU-pinned copy workers.
//! - [`control`]: the async control channel.
//! - [`workers`], [`stats`]: worker placement and transfer statistics.
//!
//! A complete transfer over loopback:
//!
//! ```
//! use std::sync::Arc;
//! use ferry_transport::data::{DataListener, DataReceiver, DataSender, ReceiverConfig, SenderConfig, SessionId};
//! use ferry_transport::memory::{PageRange, VecMemory, PAGE_SIZE};
//! use ferry_transport::workers::WorkerPlacement;
//!
//! let source = Arc::new(VecMemory::from_bytes(0, &vec![7u8; 16 * PAGE_SIZE]).unwrap());
//! let sink = Arc::new(VecMemory::new(0, 16));
//! let session = SessionId::random();
//!
//! let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
//! let addr = listener.local_addr();
//! let receiver = DataReceiver::start(
//!     listener,
//!     Arc::clone(&sink),
//!     ReceiverConfig::new(session, WorkerPlacement::unpinned(2)),
//! )
//! .unwrap();
//!
//! let mut sender =
//!     DataSender::connect(&[addr], source, SenderConfig::new(session, WorkerPlacement::unpinned(2))).unwrap();
//! sender.send(&[PageRange::new(0, 16)]).unwrap();
//! sender.flush().unwrap(); // everything sent so far is now in the sink
//! assert_eq!(sink.to_vec(), vec![7u8; 16 * PAGE_SIZE]);
//! let sent = sender.finish().unwrap();
//! let received = receiver.wait().unwrap();
//! assert_eq!(sent.total.guest_bytes, received.total.guest_bytes);
//! ```

pub mod control;
pub mod data;
mod failure;
pub mod memory;
pub mod negotiate;
pub mod pages;
pub mod rdma;
pub mod stats;
pub mod tls;
pub mod wire;
pub mod workers;

/// Formats an error with its chain of causes, `outer: inner: innermost`, as reports and
/// logs should show it.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
