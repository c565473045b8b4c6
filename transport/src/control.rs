//! The control channel between the two hosts of a migration: serde-encoded messages in the
//! same frames as the data streams, on its own TCP connection, as async tokio code for the
//! actor layer.
//!
//! An idle channel sends keepalive frames, and a receive that hears nothing — not even a
//! keepalive — within the idle timeout fails, so a dead peer surfaces as an error rather
//! than a migration that waits forever.
//!
//! ```
//! # use ferry_transport::control::{ControlChannel, ControlConfig};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let server = tokio::spawn(async move {
//!     let mut channel = ControlChannel::accept(&listener, ControlConfig::default()).await?;
//!     let question: String = channel.recv().await?;
//!     channel.send(&(question.len() as u32)).await?;
//!     Ok::<_, ferry_transport::control::ControlError>(())
//! });
//! let mut channel = ControlChannel::connect(addr, ControlConfig::default()).await?;
//! channel.send(&"how long is this?".to_string()).await?;
//! let answer: u32 = channel.recv().await?;
//! assert_eq!(answer, 17);
//! server.await??;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::codec::{Decoder, Encoder, Framed, FramedRead, FramedWrite};

use crate::tls::{HostTls, PeerIdentity, describe_io};
use crate::wire::{
    self, ChannelKind, FrameError, HEADER_LEN, Header, Hello, MessageType, PayloadError,
    VersionError, Welcome, flags,
};

/// Control channel settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlConfig {
    /// Connecting and greeting.
    pub handshake_timeout: Duration,
    /// How often an idle channel sends a keepalive.
    pub keepalive_interval: Duration,
    /// A receive that hears nothing for this long fails.
    pub idle_timeout: Duration,
    /// A send that cannot complete for this long fails (the peer stopped reading).
    pub send_timeout: Duration,
    /// Largest message accepted or sent, after decompression.
    pub max_message_len: u32,
    /// Messages longer than this are lz4-compressed when that makes them smaller.
    pub compress_above: usize,
    /// Protocol versions offered (connecting) or accepted (answering); normally
    /// [`wire::PROTOCOL_VERSIONS`], narrowed or widened only to test mixed-version clusters.
    pub versions: &'static [u16],
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(15),
            send_timeout: Duration::from_secs(15),
            max_message_len: wire::MAX_PAYLOAD_LEN,
            compress_above: 4096,
            versions: wire::PROTOCOL_VERSIONS,
        }
    }
}

/// A control channel failure.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// TCP connect failed.
    #[error("cannot connect the control channel to {addr}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Accepting the connection failed.
    #[error("cannot accept a control channel connection")]
    Accept(#[source] io::Error),
    /// Setting socket options failed.
    #[error("cannot configure the control channel socket")]
    Configure(#[source] io::Error),
    /// Connect or greeting took too long.
    #[error("control channel handshake did not complete within {after:?}")]
    HandshakeTimeout {
        /// The handshake timeout.
        after: Duration,
    },
    /// The peer's greeting does not fit.
    #[error("control channel handshake rejected: {reason}")]
    Handshake {
        /// What did not fit.
        reason: String,
    },
    /// TLS failed or is missing where it must be: who the peer is cannot be proved, or the
    /// peer refused this host.
    #[error("control channel TLS: {reason}")]
    Tls {
        /// Why, in words for the operator.
        reason: String,
    },
    /// No protocol version in common.
    #[error("control channel cannot agree on a protocol version")]
    Version(#[source] VersionError),
    /// The message does not serialize.
    #[error("cannot encode a control message")]
    Encode(#[source] postcard::Error),
    /// The message does not deserialize as the type asked for.
    #[error("cannot decode a control message as {expected}")]
    Decode {
        /// The type asked for.
        expected: &'static str,
        /// The postcard error.
        #[source]
        source: postcard::Error,
    },
    /// A message over the size limit.
    #[error("control message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// Writing failed.
    #[error("cannot send on the control channel")]
    Send(#[source] io::Error),
    /// The peer did not take a message in time.
    #[error("control channel send did not complete within {after:?}; the peer stopped reading")]
    SendTimeout {
        /// The send timeout.
        after: Duration,
    },
    /// Reading failed.
    #[error("cannot receive on the control channel")]
    Receive(#[source] io::Error),
    /// A frame failed validation.
    #[error("bad frame on the control channel")]
    Frame(#[source] FrameError),
    /// A payload is malformed.
    #[error("bad payload on the control channel")]
    Payload(#[source] PayloadError),
    /// Nothing arrived for too long.
    #[error("nothing received on the control channel for {after:?}; the peer or the link is dead")]
    Idle {
        /// The idle timeout.
        after: Duration,
    },
    /// The peer closed the connection.
    #[error("the peer closed the control channel")]
    PeerClosed,
    /// The peer gave up and said why.
    #[error("the peer abandoned the control channel: {reason}")]
    PeerAbandoned {
        /// The peer's reason.
        reason: String,
    },
    /// A frame type that does not belong on a control channel.
    #[error("unexpected {kind:?} frame on the control channel")]
    Unexpected {
        /// The frame type.
        kind: MessageType,
    },
}

fn is_tls(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

/// Decodes the payload of a `Control` frame with these `flags` as a `T`: lz4 first when the
/// flag says so, never inflating past `max_len` (nor [`wire::MAX_PAYLOAD_LEN`]).
pub fn decode_message<T: DeserializeOwned>(
    flags: u8,
    payload: &[u8],
    max_len: u32,
) -> Result<T, ControlError> {
    let decode = |bytes: &[u8]| {
        postcard::from_bytes(bytes).map_err(|source| ControlError::Decode {
            expected: std::any::type_name::<T>(),
            source,
        })
    };
    if flags & flags::LZ4 == 0 {
        return decode(payload);
    }
    let max = max_len.min(wire::MAX_PAYLOAD_LEN);
    let malformed = |reason: String| {
        ControlError::Payload(PayloadError::Malformed {
            kind: MessageType::Control,
            reason,
        })
    };
    let (size, _) = lz4_flex::block::uncompressed_size(payload)
        .map_err(|error| malformed(format!("bad lz4 size prefix: {error}")))?;
    // Checked before decompressing so a forged size cannot trigger a huge allocation.
    if size > max as usize {
        return Err(ControlError::MessageTooLarge { len: size, max });
    }
    let plain = lz4_flex::block::decompress_size_prepended(payload)
        .map_err(|error| malformed(format!("bad lz4 data: {error}")))?;
    decode(&plain)
}

/// Errors from the codec: the stream's own I/O errors, or bad frames.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Reading or writing the socket failed.
    #[error("control channel I/O failed")]
    Io(#[from] io::Error),
    /// A frame failed validation.
    #[error("bad control channel frame")]
    Frame(#[source] FrameError),
}

impl From<CodecError> for ControlError {
    fn from(error: CodecError) -> Self {
        match error {
            // Over TLS, a peer that goes away without close_notify (killed, or dropping the
            // connection) reads as an unexpected EOF: it closed, as over plain TCP.
            CodecError::Io(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
                ControlError::PeerClosed
            }
            CodecError::Io(source) if is_tls(&source) => ControlError::Tls {
                reason: describe_io(&source),
            },
            CodecError::Io(source) => ControlError::Receive(source),
            CodecError::Frame(source) => ControlError::Frame(source),
        }
    }
}

/// A received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFrame {
    /// Its validated header.
    pub header: Header,
    /// Its payload.
    pub payload: Bytes,
}

/// A frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundFrame {
    /// Protocol version to write.
    pub version: u16,
    /// Message type.
    pub kind: MessageType,
    /// Flag bits.
    pub flags: u8,
    /// Payload.
    pub payload: Bytes,
}

/// tokio codec for Ferry frames: validates each header before buffering its payload, so a
/// peer cannot make it buffer more than `max_payload` bytes per frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_payload: u32,
}

impl FrameCodec {
    /// A codec accepting payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload }
    }
}

impl Decoder for FrameCodec {
    type Item = InboundFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<InboundFrame>, CodecError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = Header::decode(src, self.max_payload).map_err(CodecError::Frame)?;
        let len = header.frame_len();
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(len);
        wire::verify_frame(&header, &frame).map_err(CodecError::Frame)?;
        frame.advance(HEADER_LEN);
        Ok(Some(InboundFrame {
            header,
            payload: frame.freeze(),
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<InboundFrame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let needed =
                    Header::decode(src, self.max_payload).map_or(HEADER_LEN, |h| h.frame_len());
                Err(CodecError::Frame(FrameError::Truncated {
                    needed,
                    available: src.len(),
                }))
            }
        }
    }
}

impl Encoder<OutboundFrame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: OutboundFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        dst.extend_from_slice(&frame.payload);
        wire::seal_frame(&mut dst[start..], frame.version, frame.kind, frame.flags)
            .map_err(CodecError::Frame)
    }
}

#[derive(Debug)]
struct Writer {
    frames: Mutex<FramedWrite<WriteHalf<Box<dyn Io>>, FrameCodec>>,
    version: u16,
    config: ControlConfig,
}

impl Writer {
    async fn send_frame(
        &self,
        kind: MessageType,
        flags: u8,
        payload: Bytes,
    ) -> Result<(), ControlError> {
        let frame = OutboundFrame {
            version: self.version,
            kind,
            flags,
            payload,
        };
        let mut frames = self.frames.lock().await;
        match timeout(self.config.send_timeout, frames.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(CodecError::Io(source))) => Err(ControlError::Send(source)),
            Ok(Err(CodecError::Frame(source))) => Err(ControlError::Frame(source)),
            Err(_) => Err(ControlError::SendTimeout {
                after: self.config.send_timeout,
            }),
        }
    }
}

/// The sending half of a control channel; clone it to send from several tasks.
#[derive(Debug, Clone)]
pub struct ControlSender {
    writer: Arc<Writer>,
}

impl ControlSender {
    /// Sends one message.
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), ControlError> {
        let encoded = postcard::to_stdvec(message).map_err(ControlError::Encode)?;
        let max = self
            .writer
            .config
            .max_message_len
            .min(wire::MAX_PAYLOAD_LEN);
        if encoded.len() > max as usize {
            return Err(ControlError::MessageTooLarge {
                len: encoded.len(),
                max,
            });
        }
        let (flags, payload) = if encoded.len() > self.writer.config.compress_above {
            let packed = lz4_flex::block::compress_prepend_size(&encoded);
            if packed.len() < encoded.len() {
                (flags::LZ4, packed)
            } else {
                (0, encoded)
            }
        } else {
            (0, encoded)
        };
        self.writer
            .send_frame(MessageType::Control, flags, Bytes::from(payload))
            .await
    }

    /// Tells the peer this side gives up and why, then closes the sending direction.
    pub async fn abandon(&self, reason: &str) -> Result<(), ControlError> {
        let payload = Bytes::copy_from_slice(wire::encode_reason(reason));
        self.writer
            .send_frame(MessageType::Abandon, 0, payload)
            .await?;
        self.close().await
    }

    /// Closes the sending direction; the peer's next receive reports the close.
    pub async fn close(&self) -> Result<(), ControlError> {
        let mut frames = self.writer.frames.lock().await;
        match timeout(self.writer.config.send_timeout, frames.close()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(match error {
                CodecError::Io(source) => ControlError::Send(source),
                CodecError::Frame(source) => ControlError::Frame(source),
            }),
            Err(_) => Err(ControlError::SendTimeout {
                after: self.writer.config.send_timeout,
            }),
        }
    }
}

/// The receiving half of a control channel.
#[derive(Debug)]
pub struct ControlReceiver {
    frames: FramedRead<ReadHalf<Box<dyn Io>>, FrameCodec>,
    config: ControlConfig,
}

impl ControlReceiver {
    /// Receives the next message as a `T`. Keepalives are consumed silently. Cancel-safe:
    /// dropping the future loses no message.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ControlError> {
        loop {
            let frame = match timeout(self.config.idle_timeout, self.frames.next()).await {
                Err(_) => {
                    return Err(ControlError::Idle {
                        after: self.config.idle_timeout,
                    });
                }
                Ok(None) => return Err(ControlError::PeerClosed),
                Ok(Some(frame)) => frame?,
            };
            match frame.header.kind {
                MessageType::Keepalive => {}
                MessageType::Control => return self.decode(frame),
                MessageType::Abandon => {
                    return Err(ControlError::PeerAbandoned {
                        reason: wire::decode_reason(&frame.payload),
                    });
                }
                kind => return Err(ControlError::Unexpected { kind }),
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, frame: InboundFrame) -> Result<T, ControlError> {
        decode_message(
            frame.header.flags,
            &frame.payload,
            self.config.max_message_len,
        )
    }
}

/// A connected, greeted control channel. Use it whole, or [`ControlChannel::into_split`] it
/// to send and receive from different tasks.
#[derive(Debug)]
pub struct ControlChannel {
    sender: ControlSender,
    receiver: ControlReceiver,
    version: u16,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
    keepalive: KeepaliveTask,
}

/// Stops the keepalive task when the channel goes away.
#[derive(Debug)]
pub struct KeepaliveTask(JoinHandle<()>);

impl Drop for KeepaliveTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the connecting side brings to the control channel's security.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// This host's identity; `None`: it has no certificate and offers no TLS.
    pub identity: Option<HostTls>,
    /// The host dialled: its certificate must name it.
    pub peer: String,
    /// Fail rather than go on in the clear with a peer that has no certificate.
    pub required: bool,
}

impl ControlChannel {
    /// Connects to `addr` and greets the peer, in the clear.
    pub async fn connect(addr: SocketAddr, config: ControlConfig) -> Result<Self, ControlError> {
        Self::connect_secure(addr, config, &ClientTls::default()).await
    }

    /// Connects to `addr` and greets the peer, upgrading to mutual TLS when both sides
    /// have certificates.
    pub async fn connect_secure(
        addr: SocketAddr,
        config: ControlConfig,
        tls: &ClientTls,
    ) -> Result<Self, ControlError> {
        if tls.required && tls.identity.is_none() {
            return Err(no_certificate());
        }
        let stream = match timeout(config.handshake_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ControlError::Connect { addr, source }),
            Err(_) => {
                return Err(ControlError::HandshakeTimeout {
                    after: config.handshake_timeout,
                });
            }
        };
        Self::client_secure(stream, config, tls).await
    }

    /// Accepts one connection on `listener` and answers its greeting, in the clear.
    pub async fn accept(
        listener: &TcpListener,
        config: ControlConfig,
    ) -> Result<Self, ControlError> {
        let (stream, _) = listener.accept().await.map_err(ControlError::Accept)?;
        Self::server(stream, config).await
    }

    /// Greets the peer over an already connected stream, as the connecting side, in the
    /// clear.
    pub async fn client(stream: TcpStream, config: ControlConfig) -> Result<Self, ControlError> {
        Self::client_secure(stream, config, &ClientTls::default()).await
    }

    /// Greets the peer over an already connected stream, as the connecting side: offers TLS
    /// when this host has a certificate, and upgrades when the peer accepts.
    pub async fn client_secure(
        stream: TcpStream,
        config: ControlConfig,
        tls: &ClientTls,
    ) -> Result<Self, ControlError> {
        if tls.required && tls.identity.is_none() {
            return Err(no_certificate());
        }
        let peer = configure(&stream, &config)?;
        let mut framed = Framed::new(stream, FrameCodec::new(config.max_message_len));
        let hello = Hello {
            versions: config.versions.to_vec(),
            channel: ChannelKind::Control,
        };
        let payload = wire::encode_hello(&hello).map_err(ControlError::Payload)?;
        let offer = if tls.identity.is_some() {
            flags::TLS
        } else {
            0
        };
        let greeting = async {
            framed
                .send(greeting_frame(MessageType::Hello, offer, payload))
                .await
                .map_err(send_error)?;
            match framed.next().await {
                None => Err(ControlError::PeerClosed),
                Some(Err(error)) => Err(error.into()),
                Some(Ok(frame)) => match frame.header.kind {
                    MessageType::Welcome => {
                        let Welcome { version } =
                            wire::decode_welcome(&frame.payload).map_err(ControlError::Payload)?;
                        if config.versions.contains(&version) {
                            Ok((version, frame.header.flags & flags::TLS != 0))
                        } else {
                            Err(ControlError::Handshake {
                                reason: format!("peer chose version {version}, never offered"),
                            })
                        }
                    }
                    MessageType::Abandon => Err(ControlError::PeerAbandoned {
                        reason: wire::decode_reason(&frame.payload),
                    }),
                    kind => Err(ControlError::Unexpected { kind }),
                },
            }
        };
        let (version, upgrade) = within(config.handshake_timeout, greeting).await?;
        let (io, identity): (Box<dyn Io>, _) = match (upgrade, &tls.identity) {
            (true, Some(host)) => {
                let name = HostTls::server_name(&tls.peer).map_err(|e| ControlError::Tls {
                    reason: e.to_string(),
                })?;
                let connector = tokio_rustls::TlsConnector::from(host.client_config());
                let stream = unframe(framed)?;
                let stream = within(config.handshake_timeout, async {
                    connector
                        .connect(name, stream)
                        .await
                        .map_err(|e| ControlError::Tls {
                            reason: describe_io(&e),
                        })
                })
                .await?;
                let identity = PeerIdentity::of(stream.get_ref().1);
                (Box::new(stream), identity)
            }
            (true, None) => {
                return Err(ControlError::Handshake {
                    reason: "the peer upgraded to TLS, which this side never offered".into(),
                });
            }
            (false, Some(_)) if tls.required => {
                let reason = format!(
                    "encryption is required, and {} has no TLS certificate configured",
                    tls.peer
                );
                let _ = framed
                    .send(greeting_frame(
                        MessageType::Abandon,
                        0,
                        wire::encode_reason(&reason).to_vec(),
                    ))
                    .await;
                return Err(ControlError::Tls { reason });
            }
            (false, _) => (Box::new(unframe(framed)?), None),
        };
        Ok(Self::assemble(io, (version, peer, identity), config))
    }

    /// Answers the greeting of a peer that connected to us, in the clear.
    pub async fn server(stream: TcpStream, config: ControlConfig) -> Result<Self, ControlError> {
        Self::server_secure(stream, config, None).await
    }

    /// Answers the greeting of a peer that connected to us. With an identity, this host
    /// takes only peers that offer TLS, and upgrades: the peer must show a certificate of
    /// the cluster CA for one of its hosts.
    pub async fn server_secure(
        stream: TcpStream,
        config: ControlConfig,
        identity: Option<&HostTls>,
    ) -> Result<Self, ControlError> {
        let peer = configure(&stream, &config)?;
        let mut framed = Framed::new(stream, FrameCodec::new(config.max_message_len));
        let greeting = async {
            let frame = match framed.next().await {
                None => return Err(ControlError::PeerClosed),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(frame)) => frame,
            };
            if frame.header.kind != MessageType::Hello {
                return Err(ControlError::Unexpected {
                    kind: frame.header.kind,
                });
            }
            let offered = frame.header.flags & flags::TLS != 0;
            let hello = wire::decode_hello(&frame.payload).map_err(ControlError::Payload)?;
            let refusal = if hello.channel != ChannelKind::Control {
                Some(ControlError::Handshake {
                    reason: "this port takes a control channel, not a data stream".into(),
                })
            } else if identity.is_some() && !offered {
                Some(ControlError::Tls {
                    reason: "this host requires mutual TLS on its control channel, and the connecting host offered none (it has no [tls] certificate configured)".into(),
                })
            } else {
                None
            };
            let negotiated = wire::negotiate_version(config.versions, &hello.versions);
            let (error, reason) = match (refusal, negotiated) {
                (None, Ok(version)) => {
                    let upgrade = identity.is_some();
                    let payload = wire::encode_welcome(Welcome { version }).to_vec();
                    let flags = if upgrade { flags::TLS } else { 0 };
                    framed
                        .send(greeting_frame(MessageType::Welcome, flags, payload))
                        .await
                        .map_err(send_error)?;
                    return Ok((version, upgrade));
                }
                (Some(error), _) => {
                    let reason = match &error {
                        ControlError::Tls { reason } => reason.clone(),
                        other => crate::report(other),
                    };
                    (error, reason)
                }
                (None, Err(source)) => {
                    // Said from the peer's side, where "this side" would be ambiguous.
                    let reason = format!(
                        "no common protocol version: the accepting host speaks {:?}, the connecting host speaks {:?}; upgrade the older host",
                        config.versions, hello.versions
                    );
                    (ControlError::Version(source), reason)
                }
            };
            let _ = framed
                .send(greeting_frame(
                    MessageType::Abandon,
                    0,
                    wire::encode_reason(&reason).to_vec(),
                ))
                .await;
            Err(error)
        };
        let (version, upgrade) = within(config.handshake_timeout, greeting).await?;
        let (io, identity): (Box<dyn Io>, _) = match identity.filter(|_| upgrade) {
            Some(host) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(host.server_config());
                let stream = unframe(framed)?;
                let stream = within(config.handshake_timeout, async {
                    match acceptor.accept(stream).into_fallible().await {
                        Ok(stream) => Ok(stream),
                        Err((error, mut stream)) => {
                            // The alert went out; reading what the peer still sends before
                            // closing keeps the close a FIN, where unread data would make it
                            // a reset that can destroy the alert on its way.
                            drain(&mut stream).await;
                            Err(ControlError::Tls {
                                reason: describe_io(&error),
                            })
                        }
                    }
                })
                .await?;
                let identity = PeerIdentity::of(stream.get_ref().1);
                (Box::new(stream), identity)
            }
            None => (Box::new(unframe(framed)?), None),
        };
        Ok(Self::assemble(io, (version, peer, identity), config))
    }

    fn assemble(
        io: Box<dyn Io>,
        (version, peer, identity): (u16, SocketAddr, Option<PeerIdentity>),
        config: ControlConfig,
    ) -> Self {
        let (read, write) = tokio::io::split(io);
        let codec = FrameCodec::new(config.max_message_len);
        let frames = FramedRead::new(read, codec);
        let writer = Arc::new(Writer {
            frames: Mutex::new(FramedWrite::new(write, codec)),
            version,
            config,
        });
        let keepalive = KeepaliveTask(tokio::spawn(keep_alive(
            Arc::downgrade(&writer),
            config.keepalive_interval,
        )));
        Self {
            sender: ControlSender { writer },
            receiver: ControlReceiver { frames, config },
            version,
            peer,
            identity,
            keepalive,
        }
    }

    /// Who the peer proved to be, when the channel runs over TLS.
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_ref()
    }

    /// The protocol version agreed.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Sends one message.
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), ControlError> {
        self.sender.send(message).await
    }

    /// Receives the next message as a `T`.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ControlError> {
        self.receiver.recv().await
    }

    /// Tells the peer this side gives up and why, then closes the sending direction.
    pub async fn abandon(&self, reason: &str) -> Result<(), ControlError> {
        self.sender.abandon(reason).await
    }

    /// Closes the sending direction.
    pub async fn close(&self) -> Result<(), ControlError> {
        self.sender.close().await
    }

    /// Separates the halves. Keepalives go on while the returned task guard lives and any
    /// sender clone exists; keep the guard as long as the channel is in use.
    pub fn into_split(self) -> (ControlSender, ControlReceiver, KeepaliveTask) {
        (self.sender, self.receiver, self.keepalive)
    }
}

fn greeting_frame(kind: MessageType, flags: u8, payload: Vec<u8>) -> OutboundFrame {
    OutboundFrame {
        version: wire::HANDSHAKE_VERSION,
        kind,
        flags,
        payload: Bytes::from(payload),
    }
}

fn send_error(error: CodecError) -> ControlError {
    match error {
        CodecError::Io(source) => ControlError::Send(source),
        CodecError::Frame(source) => ControlError::Frame(source),
    }
}

/// What a control channel runs over: a TCP stream, or TLS on one.
trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug> Io for T {}

/// The stream under a greeting's framing. The peer sends nothing past its greeting before
/// the answer, so nothing may be left buffered; bytes there would be lost to the upgrade.
fn unframe(framed: Framed<TcpStream, FrameCodec>) -> Result<TcpStream, ControlError> {
    let parts = framed.into_parts();
    if !parts.read_buf.is_empty() {
        return Err(ControlError::Handshake {
            reason: format!(
                "the peer sent {} bytes past its greeting before the answer",
                parts.read_buf.len()
            ),
        });
    }
    Ok(parts.io)
}

fn no_certificate() -> ControlError {
    ControlError::Tls {
        reason: "encryption is required, and this host has no TLS certificate configured".into(),
    }
}

/// Reads and drops whatever arrives, until the peer closes or a moment passes.
async fn drain(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut scratch = [0u8; 4096];
    let _ = timeout(Duration::from_millis(300), async {
        while stream.read(&mut scratch).await.is_ok_and(|n| n > 0) {}
    })
    .await;
}

/// Runs a greeting step, bounded by the handshake timeout.
async fn within<T>(
    limit: Duration,
    step: impl std::future::Future<Output = Result<T, ControlError>>,
) -> Result<T, ControlError> {
    match timeout(limit, step).await {
        Ok(result) => result,
        Err(_) => Err(ControlError::HandshakeTimeout { after: limit }),
    }
}

fn configure(stream: &TcpStream, config: &ControlConfig) -> Result<SocketAddr, ControlError> {
    stream.set_nodelay(true).map_err(ControlError::Configure)?;
    let peer = stream.peer_addr().map_err(ControlError::Configure)?;
    let second = Duration::from_secs(1);
    let keepalive = TcpKeepalive::new()
        .with_time(config.idle_timeout.max(second))
        .with_interval(config.keepalive_interval.max(second))
        .with_retries(3);
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(&keepalive)
        .map_err(ControlError::Configure)?;
    sock.set_tcp_user_timeout(Some(config.send_timeout.max(config.idle_timeout)))
        .map_err(ControlError::Configure)?;
    Ok(peer)
}

/// Sends a keepalive every `interval` while the channel exists. Sending one even when
/// messages flow is simpler than tracking the last send, and costs 20 bytes per interval.
async fn keep_alive(writer: Weak<Writer>, interval: Duration) {
    let mut next = Instant::now() + interval;
    loop {
        tokio::time::sleep_until(next).await;
        next += interval;
        let Some(writer) = writer.upgrade() else {
            return;
        };
        if writer
            .send_frame(MessageType::Keepalive, 0, Bytes::new())
            .await
            .is_err()
        {
            return;
        }
    }
}
