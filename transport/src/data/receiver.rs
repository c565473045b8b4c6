//! The receiving side of a data transfer: one pinned thread per stream, each verifying
//! frames and writing their pages into the sink, acknowledging barriers once written.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::SockRef;

use super::batch::{
    ApplyPagesError, MAX_PAGES_PER_FRAME, PagesDecoder, PagesFrame, max_batch_payload,
};
use super::stream::{self, FrameReader, StreamError};
use super::{SessionId, Timeouts};
use crate::failure::FirstError;
use crate::memory::PageSink;
use crate::stats::{FrameCounts, StatsHandle, TransferStats, thread_cpu_time};
use crate::tls::HostTls;
use crate::tls::socket::DataSocket;
use crate::wire::{self, ChannelKind, MessageType, Welcome};
use crate::workers::{PinnedThread, WorkerError, WorkerPlacement, spawn_pinned};

/// Whether the receiver populates destination memory before copying pages into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Prefault {
    /// Let the copy fault pages in one at a time.
    None,
    /// Populate each run of data pages with one `MADV_POPULATE_WRITE` before copying
    /// (for sinks that support it, such as [`GuestRegions`](crate::memory::GuestRegions)).
    #[default]
    PerFrame,
}

/// How the receiver runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Transfer session; connections for another session are turned away.
    pub session: SessionId,
    /// Streams expected (one receiving thread each) and their CPUs.
    pub workers: WorkerPlacement,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Populating destination memory ahead of the copy.
    pub prefault: Prefault,
    /// Take only mutual-TLS streams, as this host, from the host named; `None`: plain TCP.
    pub tls: Option<(HostTls, String)>,
}

impl ReceiverConfig {
    /// Defaults for `workers` streams in `session`.
    pub fn new(session: SessionId, workers: WorkerPlacement) -> Self {
        Self {
            session,
            workers,
            timeouts: Timeouts::default(),
            prefault: Prefault::default(),
            tls: None,
        }
    }
}

/// A receive-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The configuration cannot work.
    #[error("invalid data receiver configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen for data streams on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("cannot accept a data stream")]
    Accept(#[source] io::Error),
    /// Not every stream connected in time.
    #[error("only {connected} of {expected} data streams connected within {after:?}")]
    AcceptTimeout {
        /// Streams connected.
        connected: usize,
        /// Streams expected.
        expected: usize,
        /// The connect timeout.
        after: Duration,
    },
    /// Receiving threads could not be started.
    #[error("cannot start the receiving threads")]
    Workers(#[source] WorkerError),
    /// A stream failed, which fails the whole transfer.
    #[error("data transfer failed")]
    Transfer(#[source] Arc<StreamError>),
    /// The RDMA data path failed, which fails the whole transfer.
    #[error("RDMA data transfer failed")]
    Rdma(#[source] Arc<crate::rdma::RdmaError>),
}

/// The listening socket data streams connect to. Bind it first, tell the sender its
/// [`DataListener::local_addr`], then start a [`DataReceiver`] on it.
#[derive(Debug)]
pub struct DataListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl DataListener {
    /// Listens on `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr) -> Result<Self, ReceiveError> {
        let bind = |source| ReceiveError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        Ok(Self { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

#[derive(Debug, Default)]
struct Shared {
    failure: FirstError<StreamError>,
}

impl Shared {
    fn fail(&self, error: StreamError) {
        self.failure.set(error, "data transfer");
    }

    fn failure(&self) -> Option<Arc<StreamError>> {
        self.failure.get()
    }
}

/// Receives a transfer into a sink. Runs on its own threads from [`DataReceiver::start`];
/// [`DataReceiver::wait`] collects the outcome.
#[derive(Debug)]
pub struct DataReceiver {
    supervisor: Option<JoinHandle<Result<(), ReceiveError>>>,
    shared: Arc<Shared>,
    stats: StatsHandle,
}

impl DataReceiver {
    /// Starts accepting `config.workers.count` streams on `listener` and receiving into
    /// `sink`. Returns at once.
    pub fn start<K: PageSink + ?Sized + 'static>(
        listener: DataListener,
        sink: Arc<K>,
        config: ReceiverConfig,
    ) -> Result<Self, ReceiveError> {
        config
            .timeouts
            .validate()
            .map_err(|reason| ReceiveError::Config { reason })?;
        config.workers.validate().map_err(ReceiveError::Workers)?;
        let shared = Arc::new(Shared::default());
        let stats = StatsHandle::new(config.workers.count, 0);
        let supervisor = {
            let shared = Arc::clone(&shared);
            let stats = stats.clone();
            thread::Builder::new()
                .name("ferry-rx-accept".into())
                .spawn(move || supervise(listener, sink, config, shared, stats))
                .map_err(|source| {
                    ReceiveError::Workers(WorkerError::Spawn {
                        name: "ferry-rx-accept".into(),
                        source,
                    })
                })?
        };
        Ok(Self {
            supervisor: Some(supervisor),
            shared,
            stats,
        })
    }

    /// Statistics so far.
    pub fn stats(&self) -> TransferStats {
        self.stats.snapshot()
    }

    /// A handle for reading statistics from another thread.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Whether the transfer has ended, successfully or not.
    pub fn is_finished(&self) -> bool {
        self.supervisor.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Gives up: every stream tells the sender `reason` and closes within one keepalive
    /// interval.
    pub fn abort(&self, reason: &str) {
        self.shared.fail(StreamError::Aborted {
            reason: reason.into(),
        });
    }

    /// Waits until the sender finished on every stream (success) or the transfer failed.
    pub fn wait(mut self) -> Result<TransferStats, ReceiveError> {
        let outcome = match self.supervisor.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            _ => Err(ReceiveError::Transfer(Arc::new(StreamError::Aborted {
                reason: "a receiving thread panicked".into(),
            }))),
        };
        outcome.map(|()| self.stats.snapshot())
    }
}

impl Drop for DataReceiver {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.take() {
            if !supervisor.is_finished() {
                self.shared.fail(StreamError::Aborted {
                    reason: "the receiver was dropped".into(),
                });
            }
            let _ = supervisor.join();
        }
    }
}

/// Accepts every stream, runs them, and reports the transfer's outcome.
fn supervise<K: PageSink + ?Sized + 'static>(
    listener: DataListener,
    sink: Arc<K>,
    config: ReceiverConfig,
    shared: Arc<Shared>,
    stats: StatsHandle,
) -> Result<(), ReceiveError> {
    let streams = config.workers.count;
    let timeouts = config.timeouts;
    let mut threads: Vec<PinnedThread<()>> = Vec::with_capacity(streams);
    let accepted = accept_all(&listener, &config, &shared);
    drop(listener);
    let result = accepted.and_then(|connections| {
        for (index, version, socket, reader) in connections {
            let receiver = StreamReceiver {
                stream: index,
                version,
                socket,
                reader,
                sink: Arc::clone(&sink),
                shared: Arc::clone(&shared),
                stats: stats.clone(),
                timeouts,
                prefault: config.prefault == Prefault::PerFrame,
            };
            let thread = spawn_pinned(
                format!("ferry-rx-{index}"),
                config.workers.cpu_for(index),
                move || receiver.run(),
            )
            .map_err(ReceiveError::Workers);
            match thread {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    shared.fail(StreamError::Aborted {
                        reason: "receiving thread did not start".into(),
                    });
                    return Err(error);
                }
            }
        }
        Ok(())
    });
    for thread in threads {
        let _ = thread.join();
    }
    result?;
    match shared.failure() {
        Some(error) => Err(ReceiveError::Transfer(error)),
        None => Ok(()),
    }
}

type Connection = (usize, u16, DataSocket, FrameReader);

fn accept_all(
    listener: &DataListener,
    config: &ReceiverConfig,
    shared: &Shared,
) -> Result<Vec<Connection>, ReceiveError> {
    let streams = config.workers.count;
    let timeouts = config.timeouts;
    // accept() honours SO_RCVTIMEO on Linux: wake up every tick to check the deadline and
    // aborts instead of blocking forever on a sender that never comes.
    SockRef::from(&listener.listener)
        .set_read_timeout(Some(timeouts.keepalive_interval))
        .map_err(ReceiveError::Accept)?;
    let deadline = Instant::now() + timeouts.connect;
    let mut connections: Vec<Option<Connection>> = (0..streams).map(|_| None).collect();
    let mut connected = 0;
    while connected < streams {
        if let Some(error) = shared.failure() {
            return Err(ReceiveError::Transfer(error));
        }
        if Instant::now() >= deadline {
            return Err(ReceiveError::AcceptTimeout {
                connected,
                expected: streams,
                after: timeouts.connect,
            });
        }
        let socket = match listener.listener.accept() {
            Ok((socket, _)) => socket,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(err) => return Err(ReceiveError::Accept(err)),
        };
        match welcome(socket, config, &connections) {
            Ok(Some(connection)) => {
                let index = connection.0;
                connections[index] = Some(connection);
                connected += 1;
            }
            Ok(None) => {}
            Err(error) => {
                let error = Arc::new(error);
                shared.fail(StreamError::Aborted {
                    reason: crate::report(&*error),
                });
                return Err(ReceiveError::Transfer(error));
            }
        }
    }
    Ok(connections.into_iter().flatten().collect())
}

/// Receiver side of the greeting. `Ok(None)` turns away a connection of another session,
/// which must not disturb this transfer.
fn welcome(
    tcp: TcpStream,
    config: &ReceiverConfig,
    connections: &[Option<Connection>],
) -> Result<Option<Connection>, StreamError> {
    let timeouts = config.timeouts;
    let configure = |source| StreamError::Configure { stream: 0, source };
    tcp.set_nonblocking(false).map_err(configure)?;
    stream::configure_socket(&tcp, &timeouts).map_err(configure)?;
    let (mut socket, impostor) = match &config.tls {
        None => (DataSocket::plain(tcp), None),
        Some((identity, peer)) => match DataSocket::accept_tls(tcp, identity, timeouts.connect) {
            // Turned away, not failed: a connection that cannot prove it comes from the
            // source must not be able to disturb the transfer.
            Err(reason) => {
                tracing::warn!(%reason, "turned away a data stream that failed TLS");
                return Ok(None);
            }
            Ok((socket, identity)) => {
                let impostor = (!identity.is(peer))
                    .then(|| format!("this transfer takes data streams from {peer} only"));
                (socket, impostor)
            }
        },
    };
    let limit = max_batch_payload(MAX_PAGES_PER_FRAME) as u32;
    let mut reader = FrameReader::new(socket.try_clone().map_err(configure)?, 0, limit);
    let Some(header) = reader.next_within(timeouts.connect)? else {
        return Err(StreamError::HandshakeTimeout {
            stream: 0,
            after: timeouts.connect,
        });
    };
    if header.kind != MessageType::Hello {
        return Err(StreamError::Unexpected {
            stream: 0,
            kind: header.kind,
            context: "instead of Hello",
        });
    }
    if let Some(reason) = impostor {
        // After its greeting is read, so that closing leaves nothing unread: a reset could
        // destroy the reason on its way.
        tracing::warn!(%reason, "turned away a data stream from another host");
        stream::send_abandon(&mut socket, wire::HANDSHAKE_VERSION, &reason);
        reader.drain(Duration::from_millis(300));
        return Ok(None);
    }
    let hello = wire::decode_hello(reader.payload())
        .map_err(|source| StreamError::Payload { stream: 0, source })?;
    let ChannelKind::Data {
        session,
        stream: index,
        streams,
    } = hello.channel
    else {
        let reason = "this port takes data streams, not a control channel".to_string();
        stream::send_abandon(&mut socket, wire::HANDSHAKE_VERSION, &reason);
        return Err(StreamError::Handshake { stream: 0, reason });
    };
    let index = usize::from(index);
    if session != config.session.0 {
        tracing::warn!(
            session,
            expected = config.session.0,
            "turned away a data stream of another session"
        );
        stream::send_abandon(
            &mut socket,
            wire::HANDSHAKE_VERSION,
            "unknown transfer session",
        );
        return Ok(None);
    }
    let reject = |socket: &mut DataSocket, reason: String| {
        stream::send_abandon(socket, wire::HANDSHAKE_VERSION, &reason);
        Err(StreamError::Handshake {
            stream: index,
            reason,
        })
    };
    let version = match wire::negotiate_version(wire::PROTOCOL_VERSIONS, &hello.versions) {
        Ok(version) => version,
        Err(source) => {
            stream::send_abandon(&mut socket, wire::HANDSHAKE_VERSION, &source.to_string());
            return Err(StreamError::Version {
                stream: index,
                source,
            });
        }
    };
    if usize::from(streams) != connections.len() {
        return reject(
            &mut socket,
            format!(
                "sender opens {streams} streams, receiver expects {}",
                connections.len()
            ),
        );
    }
    if index >= connections.len() || connections[index].is_some() {
        return reject(
            &mut socket,
            format!("stream index {index} is out of range or already connected"),
        );
    }
    stream::send_message(
        &mut socket,
        wire::HANDSHAKE_VERSION,
        MessageType::Welcome,
        &wire::encode_welcome(Welcome { version }),
        index,
        &timeouts,
    )?;
    reader.set_stream(index);
    Ok(Some((index, version, socket, reader)))
}

struct StreamReceiver<K: PageSink + ?Sized> {
    stream: usize,
    version: u16,
    socket: DataSocket,
    reader: FrameReader,
    sink: Arc<K>,
    shared: Arc<Shared>,
    stats: StatsHandle,
    timeouts: Timeouts,
    prefault: bool,
}

/// What a frame means for the stream.
enum Step {
    Continue,
    Finished,
}

impl<K: PageSink + ?Sized> StreamReceiver<K> {
    fn run(mut self) {
        let mut decoder = PagesDecoder::default();
        let mut expected_seq = 0u64;
        let mut last_sent = Instant::now();
        loop {
            if let Some(failure) = self.shared.failure() {
                stream::send_abandon(&mut self.socket, self.version, &crate::report(&*failure));
                return;
            }
            let step = match self.reader.poll() {
                Ok(Some(header)) => {
                    let started = Instant::now();
                    let step = self.handle(header, &mut decoder, &mut expected_seq, &mut last_sent);
                    let counters = self.stats.stream(self.stream);
                    counters.add_busy(started.elapsed());
                    counters.set_cpu_time(thread_cpu_time());
                    step
                }
                Ok(None) if self.reader.idle_for() > self.timeouts.idle => Err(StreamError::Idle {
                    stream: self.stream,
                    after: self.timeouts.idle,
                }),
                Ok(None) => Ok(Step::Continue),
                Err(error) => Err(error),
            };
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::Finished) => return,
                Err(error) => {
                    stream::send_abandon(&mut self.socket, self.version, &crate::report(&error));
                    self.shared.fail(error);
                    return;
                }
            }
            if last_sent.elapsed() >= self.timeouts.keepalive_interval {
                if let Err(error) = self.send(MessageType::Keepalive, &[]) {
                    self.shared.fail(error);
                    return;
                }
                last_sent = Instant::now();
            }
        }
    }

    fn handle(
        &mut self,
        header: wire::Header,
        decoder: &mut PagesDecoder,
        expected_seq: &mut u64,
        last_sent: &mut Instant,
    ) -> Result<Step, StreamError> {
        let stream = self.stream;
        match header.kind {
            MessageType::Pages => {
                let frame = PagesFrame::parse(self.reader.payload())
                    .map_err(|source| StreamError::Pages { stream, source })?;
                if frame.seq() != *expected_seq {
                    return Err(StreamError::Sequence {
                        stream,
                        expected: *expected_seq,
                        got: frame.seq(),
                    });
                }
                *expected_seq += 1;
                let counts = decoder.apply(&frame, &*self.sink, self.prefault).map_err(
                    |error| match error {
                        ApplyPagesError::Malformed(source) => StreamError::Pages { stream, source },
                        ApplyPagesError::Memory(source) => {
                            StreamError::WriteMemory { stream, source }
                        }
                    },
                )?;
                let counts = FrameCounts {
                    wire_bytes: header.frame_len() as u64,
                    ..counts
                };
                self.stats.stream(stream).add_frame(&counts);
                Ok(Step::Continue)
            }
            MessageType::Flush | MessageType::Finish => {
                let ticket = wire::decode_ticket(header.kind, self.reader.payload())
                    .map_err(|source| StreamError::Payload { stream, source })?;
                // Every earlier frame of this stream has been written by now: frames are
                // handled in order, and writes are plain stores into the sink.
                self.send(MessageType::Ack, &wire::encode_ticket(ticket))?;
                *last_sent = Instant::now();
                Ok(if header.kind == MessageType::Finish {
                    Step::Finished
                } else {
                    Step::Continue
                })
            }
            MessageType::Keepalive => Ok(Step::Continue),
            MessageType::Abandon => Err(StreamError::PeerAbandoned {
                stream,
                reason: wire::decode_reason(self.reader.payload()),
            }),
            kind => Err(StreamError::Unexpected {
                stream,
                kind,
                context: "on a data stream",
            }),
        }
    }

    fn send(&mut self, kind: MessageType, payload: &[u8]) -> Result<(), StreamError> {
        stream::send_message(
            &mut self.socket,
            self.version,
            kind,
            payload,
            self.stream,
            &self.timeouts,
        )
    }
}
