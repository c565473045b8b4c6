//! Messages over a unix socket in Ferry's wire frames: a checksummed, versioned,
//! length-capped header before every postcard payload, and file descriptors passed beside a
//! frame with `SCM_RIGHTS`. Blocking I/O: each connection has a thread on each end.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use ferry_transport::wire::{self, HEADER_LEN, Header, MessageType};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest message either side accepts (a 64 GiB VM's dirty bitmap is 2 MiB; a state blob
/// with its console history well under that).
pub const MAX_MESSAGE: u32 = wire::MAX_PAYLOAD_LEN;

/// Framing failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The socket failed.
    #[error("VMM socket I/O failed")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the VMM socket was closed by the other side")]
    Closed,
    /// A frame failed validation.
    #[error("bad frame on the VMM socket")]
    Frame(#[source] wire::FrameError),
    /// A payload did not decode as the message expected.
    #[error("cannot decode a VMM message as {expected}")]
    Decode {
        /// The type asked for.
        expected: &'static str,
        /// Cause.
        #[source]
        source: postcard::Error,
    },
    /// A message did not encode.
    #[error("cannot encode a VMM message")]
    Encode(#[source] postcard::Error),
    /// A frame that does not carry a message.
    #[error("unexpected {kind:?} frame on the VMM socket")]
    UnexpectedKind {
        /// Its type.
        kind: MessageType,
    },
    /// A descriptor was expected beside a frame and did not come.
    #[error("the VMM sent no file descriptor with its answer")]
    NoDescriptor,
}

/// Writes `message` as one frame.
pub fn send<T: Serialize>(stream: &mut UnixStream, message: &T) -> Result<(), FrameIoError> {
    let payload = postcard::to_stdvec(message).map_err(FrameIoError::Encode)?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    wire::encode_frame(
        &mut frame,
        wire::HANDSHAKE_VERSION,
        MessageType::Control,
        0,
        &payload,
    )
    .map_err(FrameIoError::Frame)?;
    stream.write_all(&frame)?;
    Ok(())
}

/// Reads one frame and decodes it as a `T`.
pub fn recv<T: DeserializeOwned>(stream: &mut UnixStream) -> Result<T, FrameIoError> {
    read_message(stream)
}

/// Reads one frame from any reader and decodes it as a `T`: what [`recv`] does on the
/// socket, and what the decoders' fuzz target runs.
pub fn read_message<T: DeserializeOwned, R: Read>(reader: &mut R) -> Result<T, FrameIoError> {
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = reader.read_exact(&mut header) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameIoError::Closed
        } else {
            FrameIoError::Io(e)
        });
    }
    let parsed = Header::decode(&header, MAX_MESSAGE).map_err(FrameIoError::Frame)?;
    let mut frame = vec![0u8; parsed.frame_len()];
    frame[..HEADER_LEN].copy_from_slice(&header);
    reader.read_exact(&mut frame[HEADER_LEN..])?;
    wire::verify_frame(&parsed, &frame).map_err(FrameIoError::Frame)?;
    if parsed.kind != MessageType::Control {
        return Err(FrameIoError::UnexpectedKind { kind: parsed.kind });
    }
    postcard::from_bytes(&frame[HEADER_LEN..]).map_err(|source| FrameIoError::Decode {
        expected: std::any::type_name::<T>(),
        source,
    })
}

/// Passes `file` to the peer (one marker byte carries it).
pub fn send_fd(stream: &UnixStream, file: &File) -> Result<(), FrameIoError> {
    stream
        .send_with_fd(&[1u8][..], file.as_raw_fd())
        .map_err(|e| FrameIoError::Io(io::Error::from_raw_os_error(e.errno())))?;
    Ok(())
}

/// Receives a descriptor passed with [`send_fd`].
pub fn recv_fd(stream: &UnixStream) -> Result<File, FrameIoError> {
    let mut marker = [0u8; 1];
    let (_, file) = stream
        .recv_with_fd(&mut marker)
        .map_err(|e| FrameIoError::Io(io::Error::from_raw_os_error(e.errno())))?;
    file.ok_or(FrameIoError::NoDescriptor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_socket_pair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        send(&mut a, &("hello".to_string(), 42u32)).unwrap();
        let (text, n): (String, u32) = recv(&mut b).unwrap();
        assert_eq!((text.as_str(), n), ("hello", 42));

        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        send_fd(&a, &file).unwrap();
        let got = recv_fd(&b).unwrap();
        assert_eq!(got.metadata().unwrap().len(), 4096);

        drop(a);
        assert!(matches!(recv::<u32>(&mut b), Err(FrameIoError::Closed)));
    }

    #[test]
    fn a_damaged_frame_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let payload = postcard::to_stdvec(&7u64).unwrap();
        let mut frame = Vec::new();
        wire::encode_frame(&mut frame, 1, MessageType::Control, 0, &payload).unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        a.write_all(&frame).unwrap();
        assert!(matches!(recv::<u64>(&mut b), Err(FrameIoError::Frame(_))));
    }
}
