//! One data connection: socket set-up, frame reading that survives read timeouts, frame
//! writing with stall detection, and the greeting.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};

use super::Timeouts;
use super::batch::PagesError;
use crate::memory::MemoryError;
use crate::tls::socket::DataSocket;
use crate::wire::{
    self, ChannelKind, FrameError, HEADER_LEN, Header, Hello, MessageType, PayloadError,
    VersionError, Welcome,
};

/// A failure on one data stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// TCP connect failed.
    #[error("stream {stream}: cannot connect to {addr}")]
    Connect {
        /// Stream index.
        stream: usize,
        /// Destination address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting socket options failed.
    #[error("stream {stream}: cannot configure the socket")]
    Configure {
        /// Stream index.
        stream: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed: the peer is not who it must be, or refused this host.
    #[error("stream {stream}: TLS: {reason}")]
    Tls {
        /// Stream index.
        stream: usize,
        /// Why, in words for the operator.
        reason: String,
    },
    /// The handshake did not complete in time.
    #[error("stream {stream}: no handshake answer from the peer within {after:?}")]
    HandshakeTimeout {
        /// Stream index.
        stream: usize,
        /// The time waited.
        after: Duration,
    },
    /// The peer's greeting does not fit this transfer.
    #[error("stream {stream}: handshake rejected: {reason}")]
    Handshake {
        /// Stream index.
        stream: usize,
        /// What did not fit.
        reason: String,
    },
    /// No protocol version in common.
    #[error("stream {stream}: cannot agree on a protocol version")]
    Version {
        /// Stream index.
        stream: usize,
        /// The versions each side speaks.
        #[source]
        source: VersionError,
    },
    /// A send made no progress within the stall timeout.
    #[error("stream {stream}: the peer stopped reading (a send made no progress for {after:?})")]
    Stalled {
        /// Stream index.
        stream: usize,
        /// The stall timeout.
        after: Duration,
    },
    /// Nothing, not even a keepalive, arrived within the idle timeout.
    #[error(
        "stream {stream}: nothing received from the peer for {after:?}; the peer or the link is dead"
    )]
    Idle {
        /// Stream index.
        stream: usize,
        /// The idle timeout.
        after: Duration,
    },
    /// Writing a frame failed.
    #[error("stream {stream}: cannot send a {kind:?} frame")]
    Write {
        /// Stream index.
        stream: usize,
        /// What was being sent.
        kind: MessageType,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading from the socket failed.
    #[error("stream {stream}: cannot receive from the peer")]
    Read {
        /// Stream index.
        stream: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection at a frame boundary before the transfer finished.
    #[error("stream {stream}: the peer closed the connection before the transfer finished")]
    PeerClosed {
        /// Stream index.
        stream: usize,
    },
    /// A frame failed validation (including truncation by a closed connection).
    #[error("stream {stream}: bad frame from the peer")]
    Frame {
        /// Stream index.
        stream: usize,
        /// What was wrong with it.
        #[source]
        source: FrameError,
    },
    /// A frame's payload is malformed.
    #[error("stream {stream}: bad frame payload from the peer")]
    Payload {
        /// Stream index.
        stream: usize,
        /// What was wrong with it.
        #[source]
        source: PayloadError,
    },
    /// A `Pages` frame breaks the format's rules (its scatter list, table or page data).
    #[error("stream {stream}: bad Pages frame from the peer")]
    Pages {
        /// Stream index.
        stream: usize,
        /// What was wrong with it.
        #[source]
        source: PagesError,
    },
    /// A frame arrived out of sequence.
    #[error("stream {stream}: page frame {got} arrived where frame {expected} was due")]
    Sequence {
        /// Stream index.
        stream: usize,
        /// The sequence number due.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
    /// A frame type that makes no sense at this point.
    #[error("stream {stream}: unexpected {kind:?} frame {context}")]
    Unexpected {
        /// Stream index.
        stream: usize,
        /// The frame type.
        kind: MessageType,
        /// Where it arrived.
        context: &'static str,
    },
    /// The peer sent `Abandon`.
    #[error("stream {stream}: the peer abandoned the transfer: {reason}")]
    PeerAbandoned {
        /// Stream index.
        stream: usize,
        /// The peer's reason.
        reason: String,
    },
    /// Reading source memory failed.
    #[error("stream {stream}: cannot read guest memory")]
    ReadMemory {
        /// Stream index.
        stream: usize,
        /// The memory error.
        #[source]
        source: MemoryError,
    },
    /// Writing destination memory failed.
    #[error("stream {stream}: cannot write guest memory")]
    WriteMemory {
        /// Stream index.
        stream: usize,
        /// The memory error.
        #[source]
        source: MemoryError,
    },
    /// This side gave up, on request or because the transfer failed elsewhere.
    #[error("transfer aborted: {reason}")]
    Aborted {
        /// Why.
        reason: String,
    },
}

/// Applies the options every data socket needs: no Nagle delay for the small barrier
/// frames, send timeouts for stall detection, read timeouts as the keepalive tick, kernel
/// keepalive and a user timeout so even a blocked kernel send gives up on a dead peer.
pub(crate) fn configure_socket(socket: &TcpStream, timeouts: &Timeouts) -> io::Result<()> {
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(timeouts.stall))?;
    socket.set_read_timeout(Some(timeouts.keepalive_interval))?;
    let sock = SockRef::from(socket);
    // Kernel keepalive counts whole seconds; below one second it would be rejected.
    let second = Duration::from_secs(1);
    let keepalive = TcpKeepalive::new()
        .with_time(timeouts.idle.max(second))
        .with_interval(timeouts.keepalive_interval.max(second))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(timeouts.stall.max(timeouts.idle)))?;
    Ok(())
}

/// Reads frames from a socket whose reads time out every keepalive interval. A timeout in
/// the middle of a frame keeps what has arrived, so slow delivery never corrupts framing.
#[derive(Debug)]
pub(crate) struct FrameReader {
    socket: DataSocket,
    stream: usize,
    buf: Vec<u8>,
    filled: usize,
    header: Option<Header>,
    complete: bool,
    max_payload: u32,
    last_progress: Instant,
}

impl FrameReader {
    pub(crate) fn new(socket: DataSocket, stream: usize, max_payload: u32) -> Self {
        Self {
            socket,
            stream,
            buf: vec![0; HEADER_LEN + 64],
            filled: 0,
            header: None,
            complete: false,
            max_payload,
            last_progress: Instant::now(),
        }
    }

    /// Reads until a whole, verified frame has arrived (returns its header; the frame stays
    /// available through [`FrameReader::payload`] until the next call) or until a read times
    /// out (returns `None`; call again later).
    pub(crate) fn poll(&mut self) -> Result<Option<Header>, StreamError> {
        let stream = self.stream;
        if self.complete {
            self.complete = false;
            self.header = None;
            self.filled = 0;
        }
        loop {
            let want = self.header.map_or(HEADER_LEN, |h| h.frame_len());
            if self.filled == want {
                match self.header {
                    None => {
                        let header = Header::decode(&self.buf[..HEADER_LEN], self.max_payload)
                            .map_err(|source| StreamError::Frame { stream, source })?;
                        if self.buf.len() < header.frame_len() {
                            // Bounded by max_payload: the header was validated above.
                            self.buf.resize(header.frame_len(), 0);
                        }
                        self.header = Some(header);
                        continue;
                    }
                    Some(header) => {
                        wire::verify_frame(&header, &self.buf[..want])
                            .map_err(|source| StreamError::Frame { stream, source })?;
                        self.complete = true;
                        return Ok(Some(header));
                    }
                }
            }
            match self.socket.read(&mut self.buf[self.filled..want]) {
                Ok(0) if self.filled == 0 => return Err(StreamError::PeerClosed { stream }),
                Ok(0) => {
                    let source = FrameError::Truncated {
                        needed: want,
                        available: self.filled,
                    };
                    return Err(StreamError::Frame { stream, source });
                }
                Ok(n) => {
                    self.filled += n;
                    self.last_progress = Instant::now();
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(StreamError::Read { stream, source }),
            }
        }
    }

    /// Names the stream in errors once the greeting has told which one it is.
    pub(crate) fn set_stream(&mut self, stream: usize) {
        self.stream = stream;
    }

    /// Payload of the frame the last [`FrameReader::poll`] returned.
    pub(crate) fn payload(&self) -> &[u8] {
        match self.header {
            Some(header) if self.complete => &self.buf[HEADER_LEN..header.frame_len()],
            _ => &[],
        }
    }

    /// Time since bytes last arrived.
    pub(crate) fn idle_for(&self) -> Duration {
        self.last_progress.elapsed()
    }

    /// Discards whatever arrives until the peer closes, an error, or `limit` passes.
    pub(crate) fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let _ = self
            .socket
            .set_read_timeout(Some(limit.max(Duration::from_millis(1))));
        let mut scratch = [0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Waits up to `limit` for the next frame, whatever the read tick.
    pub(crate) fn next_within(&mut self, limit: Duration) -> Result<Option<Header>, StreamError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(header) = self.poll()? {
                return Ok(Some(header));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}

/// Writes a whole frame; a send timeout becomes [`StreamError::Stalled`].
pub(crate) fn write_frame(
    socket: &mut DataSocket,
    frame: &[u8],
    stream: usize,
    kind: MessageType,
    timeouts: &Timeouts,
) -> Result<(), StreamError> {
    socket
        .write_all(frame)
        .map_err(|source| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StreamError::Stalled {
                stream,
                after: timeouts.stall,
            },
            _ => StreamError::Write {
                stream,
                kind,
                source,
            },
        })
}

/// Encodes and writes a small frame (barriers, keepalives, greetings).
pub(crate) fn send_message(
    socket: &mut DataSocket,
    version: u16,
    kind: MessageType,
    payload: &[u8],
    stream: usize,
    timeouts: &Timeouts,
) -> Result<(), StreamError> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    wire::encode_frame(&mut frame, version, kind, 0, payload)
        .map_err(|source| StreamError::Frame { stream, source })?;
    write_frame(socket, &frame, stream, kind, timeouts)
}

/// Best-effort `Abandon` so the peer learns why, without waiting on a peer that may be the
/// reason for giving up.
pub(crate) fn send_abandon(socket: &mut DataSocket, version: u16, reason: &str) {
    let mut frame = Vec::new();
    if wire::encode_frame(
        &mut frame,
        version,
        MessageType::Abandon,
        0,
        wire::encode_reason(reason),
    )
    .is_ok()
    {
        let _ = socket.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = socket.write_all(&frame);
    }
}

/// Sender side of the greeting: `Hello`, then `Welcome` or `Abandon`.
pub(crate) fn greet(
    socket: &mut DataSocket,
    reader: &mut FrameReader,
    channel: ChannelKind,
    stream: usize,
    timeouts: &Timeouts,
) -> Result<u16, StreamError> {
    let hello = Hello {
        versions: wire::PROTOCOL_VERSIONS.to_vec(),
        channel,
    };
    let payload =
        wire::encode_hello(&hello).map_err(|source| StreamError::Payload { stream, source })?;
    send_message(
        socket,
        wire::HANDSHAKE_VERSION,
        MessageType::Hello,
        &payload,
        stream,
        timeouts,
    )?;
    let Some(header) = reader.next_within(timeouts.connect)? else {
        return Err(StreamError::HandshakeTimeout {
            stream,
            after: timeouts.connect,
        });
    };
    match header.kind {
        MessageType::Welcome => {
            let Welcome { version } = wire::decode_welcome(reader.payload())
                .map_err(|source| StreamError::Payload { stream, source })?;
            if !wire::PROTOCOL_VERSIONS.contains(&version) {
                return Err(StreamError::Handshake {
                    stream,
                    reason: format!(
                        "peer chose protocol version {version}, which this side never offered"
                    ),
                });
            }
            Ok(version)
        }
        MessageType::Abandon => Err(StreamError::PeerAbandoned {
            stream,
            reason: wire::decode_reason(reader.payload()),
        }),
        kind => Err(StreamError::Unexpected {
            stream,
            kind,
            context: "instead of Welcome",
        }),
    }
}
