//! One interface over both data paths: a [`PageSender`] and a [`PageReceiver`] are either the
//! TCP streams of [`data`](crate::data) or the RDMA queue pairs of [`rdma`](crate::rdma), with
//! the same calls and the same meaning of `flush`. [`connect_sender`] tries RDMA when the
//! plan says so and falls back to TCP, with the reason, when RDMA setup fails: a setup
//! failure is not a failed transfer.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::data::{DataReceiver, DataSender, ReceiveError, SendError, SenderConfig};
use crate::memory::{MappedMemory, PageRange, PageSource};
use crate::rdma::{LinkInfo, MemoryTable, RdmaReceiver, RdmaSender, RdmaSenderConfig};
use crate::stats::{StatsHandle, TransferStats};

/// The sending side of either data path.
#[derive(Debug)]
pub enum PageSender<S: PageSource + MappedMemory + ?Sized + 'static> {
    /// TCP streams.
    Tcp(DataSender<S>),
    /// RDMA queue pairs.
    Rdma(RdmaSender<S>),
}

impl<S: PageSource + MappedMemory + ?Sized + 'static> PageSender<S> {
    /// Queues `ranges`; see [`DataSender::send`].
    pub fn send(&mut self, ranges: &[PageRange]) -> Result<(), SendError> {
        match self {
            PageSender::Tcp(tcp) => tcp.send(ranges),
            PageSender::Rdma(rdma) => rdma.send(ranges),
        }
    }

    /// Returns once every page sent so far is in the destination's memory.
    pub fn flush(&mut self) -> Result<(), SendError> {
        match self {
            PageSender::Tcp(tcp) => tcp.flush(),
            PageSender::Rdma(rdma) => rdma.flush(),
        }
    }

    /// Completes the transfer (as `flush`) and stops the workers.
    pub fn finish(self) -> Result<TransferStats, SendError> {
        match self {
            PageSender::Tcp(tcp) => tcp.finish(),
            PageSender::Rdma(rdma) => rdma.finish(),
        }
    }

    /// Gives up, telling the receiver `reason`.
    pub fn abort(self, reason: &str) -> TransferStats {
        match self {
            PageSender::Tcp(tcp) => tcp.abort(reason),
            PageSender::Rdma(rdma) => rdma.abort(reason),
        }
    }

    /// Statistics so far.
    pub fn stats(&self) -> TransferStats {
        match self {
            PageSender::Tcp(tcp) => tcp.stats(),
            PageSender::Rdma(rdma) => rdma.stats(),
        }
    }

    /// A handle for reading statistics from another thread.
    pub fn stats_handle(&self) -> StatsHandle {
        match self {
            PageSender::Tcp(tcp) => tcp.stats_handle(),
            PageSender::Rdma(rdma) => rdma.stats_handle(),
        }
    }

    /// Streams (TCP connections or queue pairs).
    pub fn streams(&self) -> usize {
        match self {
            PageSender::Tcp(tcp) => tcp.streams(),
            PageSender::Rdma(rdma) => rdma.streams(),
        }
    }

    /// The RDMA link, when this is the RDMA path.
    pub fn link(&self) -> Option<&LinkInfo> {
        match self {
            PageSender::Tcp(_) => None,
            PageSender::Rdma(rdma) => Some(rdma.link()),
        }
    }
}

/// The receiving side of either data path.
#[derive(Debug)]
pub enum PageReceiver {
    /// TCP streams.
    Tcp(DataReceiver),
    /// RDMA queue pairs.
    Rdma(RdmaReceiver),
}

impl PageReceiver {
    /// Statistics so far.
    pub fn stats(&self) -> TransferStats {
        match self {
            PageReceiver::Tcp(tcp) => tcp.stats(),
            PageReceiver::Rdma(rdma) => rdma.stats(),
        }
    }

    /// A handle for reading statistics from another thread.
    pub fn stats_handle(&self) -> StatsHandle {
        match self {
            PageReceiver::Tcp(tcp) => tcp.stats_handle(),
            PageReceiver::Rdma(rdma) => rdma.stats_handle(),
        }
    }

    /// Whether the transfer has ended, successfully or not.
    pub fn is_finished(&self) -> bool {
        match self {
            PageReceiver::Tcp(tcp) => tcp.is_finished(),
            PageReceiver::Rdma(rdma) => rdma.is_finished(),
        }
    }

    /// Gives up, telling the sender `reason`.
    pub fn abort(&self, reason: &str) {
        match self {
            PageReceiver::Tcp(tcp) => tcp.abort(reason),
            PageReceiver::Rdma(rdma) => rdma.abort(reason),
        }
    }

    /// Waits for the end of the transfer.
    pub fn wait(self) -> Result<TransferStats, ReceiveError> {
        match self {
            PageReceiver::Tcp(tcp) => tcp.wait(),
            PageReceiver::Rdma(rdma) => rdma.wait(),
        }
    }
}

/// Where and how to connect.
#[derive(Debug)]
pub struct Targets<'a> {
    /// The destination's RDMA table, when the plan chose RDMA, with the RDMA settings.
    pub rdma: Option<(&'a MemoryTable, RdmaSenderConfig)>,
    /// The destination's TCP data addresses, for TCP or the fallback.
    pub tcp_addrs: &'a [SocketAddr],
    /// TCP settings.
    pub tcp: SenderConfig,
}

/// What [`connect_sender`] ended up with.
#[derive(Debug)]
pub struct Connected<S: PageSource + MappedMemory + ?Sized + 'static> {
    /// The sender.
    pub sender: PageSender<S>,
    /// Why RDMA was planned but TCP is used, e.g. `rdma: connection refused …: falling back
    /// to tcp+lz4`.
    pub fallback: Option<String>,
}

/// Connects over RDMA when `targets.rdma` is given and setup succeeds; otherwise, or when it
/// fails, over TCP. A failed RDMA setup is reported in [`Connected::fallback`], not as an
/// error; only a TCP failure is an error.
pub fn connect_sender<S: PageSource + MappedMemory + ?Sized + 'static>(
    targets: Targets<'_>,
    source: Arc<S>,
) -> Result<Connected<S>, SendError> {
    let mut fallback = None;
    if let Some((table, config)) = targets.rdma {
        match RdmaSender::connect(table, Arc::clone(&source), config) {
            Ok(sender) => {
                return Ok(Connected {
                    sender: PageSender::Rdma(sender),
                    fallback: None,
                });
            }
            Err(error) => {
                let label = match targets.tcp.compression {
                    crate::data::CompressionPolicy::None => "tcp",
                    _ => "tcp+lz4",
                };
                // The RDMA error itself, without the "transfer failed" of its wrapper.
                let reason = match &error {
                    SendError::Rdma(inner) => crate::report(&**inner),
                    other => crate::report(other),
                };
                let text = format!("{reason}: falling back to {label}");
                tracing::warn!(reason = %text, "RDMA setup failed");
                fallback = Some(text);
            }
        }
    }
    let sender = DataSender::connect(targets.tcp_addrs, source, targets.tcp)?;
    Ok(Connected {
        sender: PageSender::Tcp(sender),
        fallback,
    })
}
