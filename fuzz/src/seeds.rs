//! Valid encodings to start mutating from, made by the same code that writes them.

use ferry_actors::migration::protocol::{ToDestination, ToSource};
use ferry_runtime::DirtySet;
use ferry_runtime::state::samples::sample_vm;
use ferry_transport::memory::{PAGE_SIZE, PageRange, VecMemory};
use ferry_transport::negotiate::{Capabilities, choose};
use ferry_transport::wire::{self, ChannelKind, Hello, MessageType, Welcome, flags};
use ferry_vmm::protocol::{ProcessInfo, Request, Response};

fn frame(kind: MessageType, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_frame(&mut out, wire::HANDSHAKE_VERSION, kind, flags, payload)
        .expect("seed frame");
    out
}

fn control(message: &impl serde::Serialize, compress: bool) -> Vec<u8> {
    let plain = postcard::to_stdvec(message).expect("seed message");
    if compress {
        let packed = lz4_flex::block::compress_prepend_size(&plain);
        frame(MessageType::Control, flags::LZ4, &packed)
    } else {
        frame(MessageType::Control, 0, &plain)
    }
}

/// Control channel traffic: greetings and migration messages, plain and compressed.
pub fn control_frames() -> Vec<Vec<u8>> {
    let caps = Capabilities::without_rdma(vec!["127.0.0.1:7000".parse().expect("addr")], 2);
    let plan = choose(&caps, &caps).expect("seed plan");
    let hello = Hello {
        versions: vec![1, 2],
        channel: ChannelKind::Control,
    };
    let mut seeds = vec![
        frame(
            MessageType::Hello,
            flags::TLS,
            &wire::encode_hello(&hello).expect("hello"),
        ),
        frame(
            MessageType::Welcome,
            0,
            &wire::encode_welcome(Welcome { version: 1 }),
        ),
        frame(MessageType::Abandon, 0, wire::encode_reason("no thanks")),
        frame(MessageType::Keepalive, 0, &[]),
    ];
    let to_destination = [
        ToDestination::Prepare { plan },
        ToDestination::DataPath {
            rdma: false,
            fallback: Some("rdma: connection refused: falling back to tcp+lz4".into()),
        },
        ToDestination::RoundDone {
            round: 3,
            pages: 1000,
        },
        ToDestination::Commit,
        ToDestination::FlushDisks,
        ToDestination::Abort {
            reason: "cancelled by the operator".into(),
        },
        ToDestination::Query {
            id: uuid::Uuid::from_u128(0x1234_5678_9abc_def0),
        },
        ToDestination::State {
            blob: vec![7; 300],
            console: b"tick 1\ntick 2\n".to_vec(),
            console_total: 14,
            memory_hash: Some([9; 16]),
            disk_hashes: vec![[1; 16]],
            was_running: true,
        },
    ];
    for message in &to_destination {
        seeds.push(control(message, false));
        seeds.push(control(message, true));
    }
    let to_source = [
        ToSource::Accepted {
            capabilities: caps,
            journal: uuid::Uuid::from_u128(42),
            admission_us: 120,
        },
        ToSource::Refused {
            reason: "no room".into(),
        },
        ToSource::Prepared {
            data_addrs: vec!["127.0.0.1:7001".parse().expect("addr")],
            rdma: None,
        },
        ToSource::Prepared {
            data_addrs: vec!["10.0.0.2:7001".parse().expect("addr")],
            rdma: Some(Ok(ferry_transport::rdma::MemoryTable {
                listen: "10.0.0.2:7002".parse().expect("addr"),
                regions: vec![ferry_transport::rdma::RemoteRegion {
                    guest_phys_addr: 0,
                    len: 1 << 30,
                    addr: 0x7f00_0000_0000,
                    rkey: 0x1234,
                }],
                zeroed: true,
            })),
        },
        ToSource::DisksFlushed,
        ToSource::Ready {
            memory_verified: Some(true),
        },
        ToSource::Failed {
            reason: "disk full".into(),
        },
    ];
    for message in &to_source {
        seeds.push(control(message, false));
        seeds.push(control(message, true));
    }
    seeds
}

/// Data stream traffic: greetings, barriers and page frames of every content kind.
pub fn data_frames() -> Vec<Vec<u8>> {
    let hello = Hello {
        versions: vec![1],
        channel: ChannelKind::Data {
            session: 77,
            stream: 1,
            streams: 2,
        },
    };
    let mut seeds = vec![
        frame(
            MessageType::Hello,
            0,
            &wire::encode_hello(&hello).expect("hello"),
        ),
        frame(MessageType::Flush, 0, &wire::encode_ticket(5)),
        frame(MessageType::Ack, 0, &wire::encode_ticket(5)),
        frame(MessageType::Finish, 0, &wire::encode_ticket(6)),
    ];
    seeds.extend(page_frames());
    seeds
}

/// Whole `Pages` frames: zero, text (compressible) and random pages, in one run and in several.
pub fn page_frames() -> Vec<Vec<u8>> {
    let pages = 16;
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    let mut state = 0x1234_5678_u64;
    for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
        match i % 4 {
            0 => {}
            1 => page
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"ferry moves pages "[j % 18]),
            2 => page.iter_mut().for_each(|b| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }),
            _ => page[100] = 1,
        }
    }
    let source = VecMemory::from_bytes(0, &bytes).expect("seed memory");
    let mut seeds = Vec::new();
    for compress in [false, true] {
        for runs in [
            vec![PageRange::new(0, 8)],
            vec![
                PageRange::new(1, 2),
                PageRange::new(6, 3),
                PageRange::new(12, 1),
            ],
        ] {
            seeds.push(
                ferry_transport::data::sample_frames(&source, &runs, compress).expect("seed frame"),
            );
        }
    }
    seeds
}

/// State blobs.
pub fn state_blobs() -> Vec<Vec<u8>> {
    let vm = sample_vm();
    let mut small = vm.clone();
    small.vcpus.truncate(1);
    small.devices.disks.clear();
    [vm, small]
        .iter()
        .map(|state| ferry_runtime::state::blob::encode(state).expect("seed blob"))
        .collect()
}

/// Snapshot files with a small memory image.
pub fn snapshots() -> Vec<Vec<u8>> {
    let mut state = sample_vm();
    state.shape.memory = 2 * PAGE_SIZE as u64;
    let memory = vec![0x5a; 2 * PAGE_SIZE];
    vec![ferry_runtime::snapshot::sample_file(&state, &memory)]
}

/// Cluster configurations as shipped.
pub fn configs() -> Vec<Vec<u8>> {
    let demo = hostd::demo::demo_config("/tmp/fuzz", [7701, 7711, 7702, 7712], ["br-a", "br-b"]);
    vec![
        demo.into_bytes(),
        include_bytes!("../../configs/two-hosts.toml").to_vec(),
        include_bytes!("../../configs/two-datacenters.toml").to_vec(),
    ]
}

/// Messages on a VMM socket, both ways.
pub fn vmm_frames() -> Vec<Vec<u8>> {
    let requests = [
        Request::Hello { versions: vec![1] },
        Request::Info,
        Request::Pause,
        Request::Resume,
        Request::SetThrottle(40),
        Request::BeginTracking,
        Request::FetchDirty,
        Request::Shutdown,
    ];
    let ram = [(0u64, 64 * PAGE_SIZE as u64)];
    let responses = [
        Response::Hello {
            version: 1,
            process: ProcessInfo {
                pid: 4242,
                started_unix_ms: 1_700_000_000_000,
                has_vm: true,
            },
        },
        Response::Done,
        Response::Dirty(DirtySet::full(&ram)),
        Response::DiskExtents(vec![vec![(0, 65536), (1 << 20, 4096)]]),
        Response::ConsoleChunk(b"tick 9\n".to_vec()),
    ];
    requests
        .iter()
        .map(|r| control(r, false))
        .chain(responses.iter().map(|r| control(r, false)))
        .collect()
}
