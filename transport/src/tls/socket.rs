//! A data stream's socket, plain or TLS, that one thread reads while another writes.
//!
//! The data plane reads a stream on one thread (frames, or acknowledgements) and writes it
//! on another, through clones of one socket. A rustls connection is a single state machine,
//! so the clones of a TLS socket share it behind a mutex that is held only while records
//! are encrypted or decrypted, never across a blocking socket call: a reader waiting for
//! bytes does not hold up a writer. Ciphertext goes out in the order it was made because
//! every write to the socket happens under a second lock, the one the sealing takes first.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustls::{ClientConnection, Connection, ServerConnection};

use super::{HostTls, PeerIdentity, TlsError, describe_io};

/// Plaintext sealed per record batch: small enough to keep in cache, large enough that the
/// per-call cost vanishes.
const SEAL_CHUNK: usize = 256 * 1024;
/// Ciphertext read from the socket at a time.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug)]
struct Tls {
    conn: Mutex<Connection>,
    /// Held while ciphertext is made and written, so records reach the socket in order.
    write: Mutex<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic mid-record leaves a connection that fails its next use with a TLS error,
    // which is what the caller should see.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connected data socket.
#[derive(Debug)]
pub struct DataSocket {
    tcp: TcpStream,
    tls: Option<Arc<Tls>>,
    /// Ciphertext read from the socket and not yet given to the connection (this clone's):
    /// `cipher[cipher_at..cipher_len]`.
    cipher: Vec<u8>,
    cipher_at: usize,
    cipher_len: usize,
}

impl DataSocket {
    /// A plaintext socket.
    pub fn plain(tcp: TcpStream) -> Self {
        Self {
            tcp,
            tls: None,
            cipher: Vec::new(),
            cipher_at: 0,
            cipher_len: 0,
        }
    }

    /// Completes a TLS handshake as the connecting side, checking that the peer is `peer`.
    /// The socket's read timeout is the tick; the handshake gives up after `limit`.
    pub fn connect_tls(
        tcp: TcpStream,
        identity: &HostTls,
        peer: &str,
        limit: Duration,
    ) -> Result<(Self, PeerIdentity), String> {
        let name = HostTls::server_name(peer).map_err(|e: TlsError| e.to_string())?;
        let conn = ClientConnection::new(identity.client_config(), name)
            .map_err(|e| super::describe_rustls(&e, false))?;
        Self::handshake(tcp, conn.into(), limit)
    }

    /// Completes a TLS handshake as the accepting side.
    pub fn accept_tls(
        tcp: TcpStream,
        identity: &HostTls,
        limit: Duration,
    ) -> Result<(Self, PeerIdentity), String> {
        let conn = ServerConnection::new(identity.server_config())
            .map_err(|e| super::describe_rustls(&e, false))?;
        Self::handshake(tcp, conn.into(), limit)
    }

    fn handshake(
        mut tcp: TcpStream,
        mut conn: Connection,
        limit: Duration,
    ) -> Result<(Self, PeerIdentity), String> {
        let deadline = Instant::now() + limit;
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(format!("TLS handshake did not complete within {limit:?}"));
                    }
                }
                Err(e) => {
                    // Let the peer read the alert rustls queued, so it learns why too, and
                    // read what it still sends, so the close is a FIN and not a reset that
                    // could destroy the alert on its way.
                    let _ = conn.write_tls(&mut tcp);
                    drain(&mut tcp);
                    return Err(describe_io(&e));
                }
            }
        }
        // Whatever the handshake left to send (the client's Finished).
        while conn.wants_write() {
            conn.write_tls(&mut tcp).map_err(|e| describe_io(&e))?;
        }
        conn.set_buffer_limit(None);
        let identity = PeerIdentity::of(&conn).ok_or("the peer presented no certificate")?;
        let socket = Self {
            tcp,
            tls: Some(Arc::new(Tls {
                conn: Mutex::new(conn),
                write: Mutex::new(()),
            })),
            cipher: Vec::new(),
            cipher_at: 0,
            cipher_len: 0,
        };
        Ok((socket, identity))
    }

    /// Another handle on the same stream (and TLS session).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
            cipher: Vec::new(),
            cipher_at: 0,
            cipher_len: 0,
        })
    }

    /// The TCP socket underneath, for socket options.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// See [`TcpStream::set_read_timeout`].
    pub fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(limit)
    }

    /// See [`TcpStream::set_write_timeout`].
    pub fn set_write_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(limit)
    }

    /// See [`TcpStream::shutdown`]; a TLS stream ends without `close_notify`, as every data
    /// stream's end is agreed in frames (`Finish`) before it.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }

    /// Seals `plain` and writes the records straight from the connection to the socket.
    /// The connection stays locked while a full socket blocks the write; a reader of the
    /// same stream then waits, which costs nothing here: the sender's reader only takes
    /// acknowledgements, and the receiver reads and writes on one thread.
    fn seal_and_write(&mut self, tls: &Tls, plain: &[u8]) -> io::Result<()> {
        let _order = lock(&tls.write);
        let mut conn = lock(&tls.conn);
        conn.writer().write_all(plain).map_err(described)?;
        while conn.wants_write() {
            conn.write_tls(&mut self.tcp).map_err(described)?;
        }
        Ok(())
    }

    /// Writes what the connection itself wants to send (a key update answer, an alert).
    fn flush_pending(&mut self, tls: &Tls) -> io::Result<()> {
        self.seal_and_write(tls, &[])
    }
}

/// Reads and drops whatever arrives until the peer closes, or 300 ms.
fn drain(tcp: &mut TcpStream) {
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut scratch = [0u8; 4096];
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(50)));
    while Instant::now() < deadline {
        match tcp.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// An I/O error that carries a TLS failure, in the words [`describe_io`] gives it; a
/// connection that has failed fails every later call with the same words.
fn described(error: io::Error) -> io::Error {
    let tls = error
        .get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>());
    if tls {
        io::Error::new(io::ErrorKind::InvalidData, describe_io(&error))
    } else {
        error
    }
}

/// What one pass over the connection found.
enum Opened {
    /// Plaintext for the caller (0: the peer closed the stream cleanly).
    Read(usize),
    /// Nothing to read without more ciphertext from the socket.
    NeedBytes,
    /// The connection failed (bad record, alert); the words for the operator.
    Broken(String),
    /// An I/O-level error from rustls.
    Io(io::Error),
}

impl Read for DataSocket {
    /// Ciphertext goes from the socket into this clone's buffer without the lock, then
    /// into the connection and back out as plaintext straight into `buf`, under it.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.clone() else {
            return self.tcp.read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        if self.cipher.len() < READ_CHUNK {
            self.cipher.resize(READ_CHUNK, 0);
        }
        loop {
            let (opened, flush) = {
                let mut conn = lock(&tls.conn);
                let opened = loop {
                    // Plaintext can be waiting already: the handshake may have read the first
                    // records along with its own messages.
                    match conn.reader().read(buf) {
                        Ok(n) => break Opened::Read(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => break Opened::Io(described(e)),
                    }
                    if self.cipher_at == self.cipher_len {
                        break Opened::NeedBytes;
                    }
                    let mut rest = &self.cipher[self.cipher_at..self.cipher_len];
                    let before = rest.len();
                    if let Err(e) = conn.read_tls(&mut rest) {
                        break Opened::Io(described(e));
                    }
                    self.cipher_at += before - rest.len();
                    if let Err(e) = conn.process_new_packets() {
                        break Opened::Broken(super::describe_rustls(&e, false));
                    }
                };
                (opened, conn.wants_write())
            };
            if flush || matches!(opened, Opened::Broken(_)) {
                // A key update to answer, or the alert that tells the peer why this failed.
                let flushed = self.flush_pending(&tls);
                if matches!(opened, Opened::Read(_) | Opened::NeedBytes) {
                    flushed?;
                }
            }
            match opened {
                Opened::Read(n) => return Ok(n),
                Opened::Broken(reason) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
                }
                Opened::Io(e) => return Err(e),
                Opened::NeedBytes => {
                    let n = self.tcp.read(&mut self.cipher)?;
                    if n == 0 {
                        return Ok(0);
                    }
                    self.cipher_at = 0;
                    self.cipher_len = n;
                }
            }
        }
    }
}

impl Write for DataSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.clone() else {
            return self.tcp.write(buf);
        };
        let n = buf.len().min(SEAL_CHUNK);
        self.seal_and_write(&tls, &buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}
