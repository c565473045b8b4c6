//! The targets: each feeds an input to a decoder exactly as the process would meet it.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use ferry_actors::migration::protocol::{ToDestination, ToSource};
use ferry_transport::control::{FrameCodec, decode_message};
use ferry_transport::data::{MAX_PAGES_PER_FRAME, PagesDecoder, PagesFrame, max_batch_payload};
use ferry_transport::memory::VecMemory;
use ferry_transport::wire::{self, HEADER_LEN, MessageType};
use ferry_vmm::protocol::{Request, Response};
use tokio_util::codec::Decoder;

use crate::{Target, seeds};

/// Every target.
pub fn all() -> Vec<Target> {
    vec![
        control_channel(),
        data_stream(),
        pages_payload(),
        state_blob(),
        snapshot_file(),
        config_loader(),
        vmm_socket(),
    ]
}

/// Makes the header of a mutated frame valid again (length and checksum over what follows),
/// so the payload's decoder is reached.
fn reseal_frame(input: &mut [u8]) {
    if input.len() < HEADER_LEN || input.len() - HEADER_LEN > wire::MAX_PAYLOAD_LEN as usize {
        return;
    }
    if let Ok(kind) = MessageType::from_wire(input[14]) {
        let flags = input[15] & kind.allowed_flags();
        let _ = wire::seal_frame(input, wire::HANDSHAKE_VERSION, kind, flags);
    }
}

fn control_payload(flags: u8, payload: &[u8]) {
    let max = wire::MAX_PAYLOAD_LEN;
    let _ = decode_message::<ToDestination>(flags, payload, max);
    let _ = decode_message::<ToSource>(flags, payload, max);
}

/// The control channel's codec, then whatever its frames carry.
fn control_channel() -> Target {
    Target {
        name: "control channel",
        seeds: seeds::control_frames(),
        run: Box::new(|input| {
            let mut codec = FrameCodec::new(wire::MAX_PAYLOAD_LEN);
            let mut buf = BytesMut::from(input);
            for _ in 0..8 {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => match frame.header.kind {
                        MessageType::Control => control_payload(frame.header.flags, &frame.payload),
                        MessageType::Hello => {
                            let _ = wire::decode_hello(&frame.payload);
                        }
                        MessageType::Welcome => {
                            let _ = wire::decode_welcome(&frame.payload);
                        }
                        MessageType::Abandon => {
                            let _ = wire::decode_reason(&frame.payload);
                        }
                        _ => {}
                    },
                    Ok(None) => {
                        let _ = codec.decode_eof(&mut buf);
                        return;
                    }
                    Err(_) => return,
                }
            }
        }),
        fixup: Some(reseal_frame),
    }
}

fn apply_pages(payload: &[u8], decoder: &mut PagesDecoder, sink: &VecMemory) {
    if let Ok(frame) = PagesFrame::parse(payload) {
        let _ = decoder.write(&frame, sink, false);
    }
}

/// A data stream's frames as the receiver meets them: header, checksum, then pages into
/// guest memory, tickets, greetings.
fn data_stream() -> Target {
    let sink = VecMemory::new(0, 64);
    let mut decoder = PagesDecoder::default();
    let decoder = std::cell::RefCell::new(std::mem::take(&mut decoder));
    Target {
        name: "data stream",
        seeds: seeds::data_frames(),
        run: Box::new(move |input| {
            let max = max_batch_payload(MAX_PAGES_PER_FRAME) as u32;
            let Ok((frame, _)) = wire::decode_frame(input, max) else {
                return;
            };
            match frame.header.kind {
                MessageType::Pages => {
                    apply_pages(frame.payload, &mut decoder.borrow_mut(), &sink);
                }
                MessageType::Hello => {
                    let _ = wire::decode_hello(frame.payload);
                }
                kind @ (MessageType::Flush | MessageType::Ack | MessageType::Finish) => {
                    let _ = wire::decode_ticket(kind, frame.payload);
                }
                MessageType::Abandon => {
                    let _ = wire::decode_reason(frame.payload);
                }
                _ => {}
            }
        }),
        fixup: Some(reseal_frame),
    }
}

/// A pages payload straight into the parser, past any checksum.
fn pages_payload() -> Target {
    let sink = VecMemory::new(0, 64);
    let decoder = std::cell::RefCell::new(PagesDecoder::default());
    Target {
        name: "pages frame",
        seeds: seeds::page_frames()
            .into_iter()
            .map(|f| f[HEADER_LEN..].to_vec())
            .collect(),
        run: Box::new(move |input| apply_pages(input, &mut decoder.borrow_mut(), &sink)),
        fixup: None,
    }
}

/// Makes a mutated state blob's length and checksum fit its payload again.
fn reseal_blob(input: &mut [u8]) {
    let header = ferry_runtime::state::blob::BLOB_HEADER_LEN;
    if input.len() < header {
        return;
    }
    let payload_len = (input.len() - header) as u64;
    let crc = crc32fast::hash(&input[header..]);
    input[12..20].copy_from_slice(&payload_len.to_le_bytes());
    input[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// A VM state blob, as a destination receives it.
fn state_blob() -> Target {
    Target {
        name: "state blob",
        seeds: seeds::state_blobs(),
        run: Box::new(|input| {
            let _ = ferry_runtime::state::blob::decode::<ferry_runtime::state::VmState>(input);
        }),
        fixup: Some(reseal_blob),
    }
}

/// A file in memory (memfd) that the snapshot reader opens by path like any other.
struct MemFile {
    fd: OwnedFd,
    path: PathBuf,
}

impl MemFile {
    fn new() -> Self {
        let name = c"ferry-fuzz-snapshot";
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = PathBuf::from(format!("/proc/self/fd/{raw}"));
        Self { fd, path }
    }

    fn set(&self, bytes: &[u8]) -> &Path {
        // SAFETY: ftruncate on our own descriptor.
        unsafe { libc::ftruncate(self.fd.as_raw_fd(), 0) };
        let mut file = std::fs::File::from(self.fd.try_clone().expect("dup memfd"));
        let _ = std::io::Seek::rewind(&mut file);
        let _ = file.write_all(bytes);
        &self.path
    }
}

/// A snapshot file, as `ferryctl snapshot` and restore read it.
fn snapshot_file() -> Target {
    let file = MemFile::new();
    Target {
        name: "snapshot file",
        seeds: seeds::snapshots(),
        run: Box::new(move |input| {
            let _ = ferry_runtime::snapshot::read_state(file.set(input));
        }),
        fixup: Some(ferry_runtime::snapshot::reseal_header),
    }
}

/// The cluster configuration loader, on whatever text the bytes make.
fn config_loader() -> Target {
    Target {
        name: "config loader",
        seeds: seeds::configs(),
        run: Box::new(|input| {
            let text = String::from_utf8_lossy(input);
            let _ = hostd::config::Cluster::from_toml(&text, Path::new("fuzz.toml"));
        }),
        fixup: None,
    }
}

/// The VMM socket protocol, both directions.
fn vmm_socket() -> Target {
    Target {
        name: "vmm socket",
        seeds: seeds::vmm_frames(),
        run: Box::new(|input| {
            let _ = ferry_vmm::frames::read_message::<Request, _>(&mut &input[..]);
            let _ = ferry_vmm::frames::read_message::<Response, _>(&mut &input[..]);
        }),
        fixup: Some(reseal_frame),
    }
}
