//! The messages between hostd and a VMM process: one request enum, one response enum, one
//! error type. Carried in Ferry's wire frames (magic, checksum, version, length cap) over a
//! unix socket, postcard-encoded.
//!
//! Versions: every connection opens with `Request::Hello`, whose layout (variant 0, a list
//! of versions) is frozen so a hostd of any build can talk to a VMM of any other: after an
//! upgrade, a new hostd reattaches to VMM processes an older build started. The answer names
//! the version both use; everything else belongs to that version, and any change to it is a
//! new version.

use std::path::PathBuf;

use ferry_runtime::cpu::CpuFeatures;
use ferry_runtime::devices::test_device::TestDeviceState;
use ferry_runtime::devices::{NicInfo, NicSpec};
use ferry_runtime::vm::RunState;
use ferry_runtime::{
    Boot, DirtyLogMode, DirtySet, DiskInfo, DiskSpec, Preload, VmIdentity, VmShape,
};
use serde::{Deserialize, Serialize};

/// Versions of this message set this build speaks, ascending.
pub const VMM_PROTOCOL_VERSIONS: &[u32] = &[3];

/// What the VMM should build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSpec {
    /// Name, UUID, MAC.
    pub identity: VmIdentity,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM, bytes.
    pub memory: u64,
    /// What to boot.
    pub boot: Boot,
    /// Files to copy into memory first.
    pub preloads: Vec<Preload>,
    /// Dirty logging mode.
    pub dirty_log: DirtyLogMode,
    /// File the console output is appended to.
    pub console_log: Option<PathBuf>,
    /// CPU features withheld from the VM.
    pub hidden_cpu_features: Vec<String>,
    /// Disks, in virtio slot order.
    pub disks: Vec<DiskSpec>,
    /// NICs, in the virtio slots after the disks.
    pub nics: Vec<NicSpec>,
    /// Start the vCPUs at once.
    pub start: bool,
}

/// An empty, paused VM for an arriving migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmptySpec {
    /// The arriving VM's identity.
    pub identity: VmIdentity,
    /// Its shape, CPUID included.
    pub shape: VmShape,
    /// What it booted (for display).
    pub boot: String,
    /// Dirty logging mode.
    pub dirty_log: DirtyLogMode,
    /// File the console output is appended to.
    pub console_log: Option<PathBuf>,
    /// The arriving VM's disks, opened without their locks (taken at `LoadState`, once the
    /// source has let them go).
    pub disks: Vec<DiskSpec>,
    /// The arriving VM's NICs, their TAPs made but kept off their bridges (joined at
    /// `LoadState`, once the source is paused).
    pub nics: Vec<NicSpec>,
}

/// hostd → VMM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// First on every connection. Frozen: variant 0, this one field.
    Hello {
        /// Versions the client speaks.
        versions: Vec<u32>,
    },
    /// Build the VM (once per process).
    Create(Box<CreateSpec>),
    /// Build an empty VM for an arriving migration (once per process).
    CreateEmpty(Box<EmptySpec>),
    /// What the VM is and how it does.
    Info,
    /// Run the vCPUs (taking the disks' locks first, if a handover gave them away).
    Resume,
    /// Park the vCPUs.
    Pause,
    /// Keep the vCPUs out of the guest for this percentage of the time.
    SetThrottle(u8),
    /// Start dirty tracking; the answer is round one of a live copy.
    BeginTracking,
    /// The pages written since the last answer.
    FetchDirty,
    /// Stop dirty tracking (if on), of memory and disks.
    StopTracking,
    /// Start recording disk writes in `chunk`-byte units; the answer is, per disk, the
    /// extents its image holds data in (a storage copy's first round).
    BeginDiskTracking {
        /// Granularity, bytes.
        chunk: u64,
    },
    /// Per disk, the extents written since the last answer.
    FetchDirtyBlocks,
    /// Stop-and-copy in one step: pause, throttle off, last dirty pages, state; then the
    /// disks flushed and their locks let go for the destination.
    Freeze {
        /// Hash guest memory too.
        hash_memory: bool,
        /// Hash the disk images too (`--verify` of a storage migration; a shared disk is
        /// the same file on both hosts, nothing to compare).
        hash_disks: bool,
    },
    /// Load an arrived state into the empty VM, comparing memory first if a hash is given,
    /// take the disks' locks and put the NICs' TAPs on their bridges.
    LoadState(Box<IncomingState>),
    /// The guest memory's memfd (sent with the answer as an `SCM_RIGHTS` descriptor).
    Memory,
    /// Turn this connection into a feed of console output from an absolute offset.
    FollowConsole {
        /// Absolute offset (0: all retained history).
        offset: u64,
    },
    /// Stop the VM for good and end the process.
    Shutdown,
}

/// State arriving with the last pages of a migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IncomingState {
    /// `ferry_runtime::state::blob` of the `VmState`.
    pub blob: Vec<u8>,
    /// Console history.
    pub console: Vec<u8>,
    /// Console bytes in the VM's life so far.
    pub console_total: u64,
    /// xxh3-128 of the source's memory, to compare first.
    pub memory_hash: Option<[u8; 16]>,
}

/// What stop-and-copy takes from the paused VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrozenState {
    /// Pages written since the last fetch.
    pub dirty: DirtySet,
    /// Encoded `VmState`.
    pub blob: Vec<u8>,
    /// Console history.
    pub console: Vec<u8>,
    /// Console bytes in the VM's life.
    pub console_total: u64,
    /// Memory hash, if asked.
    pub memory_hash: Option<[u8; 16]>,
    /// Per disk, the extents written since the last fetch (empty unless disk writes are
    /// being recorded).
    pub dirty_disks: Vec<Vec<(u64, u64)>>,
    /// Per disk, the image's hash, if a memory hash was asked.
    pub disk_hashes: Vec<[u8; 16]>,
    /// Microseconds the VMM took (pause, fetch, capture, hash).
    pub took_us: u64,
}

/// What hostd shows about a VM, as its VMM reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmmInfo {
    /// Name, UUID, MAC.
    pub identity: VmIdentity,
    /// vCPUs, memory, CPUID.
    pub shape: VmShape,
    /// What it booted.
    pub boot: String,
    /// The runtime's run state.
    pub run_state: RunState,
    /// Current throttle, percent.
    pub throttle: u8,
    /// The test device's reports.
    pub test: TestDeviceState,
    /// Bytes of console output in the VM's life.
    pub console_bytes: u64,
    /// Feature flags of the VM's CPUID.
    pub cpu_features: CpuFeatures,
    /// Whether dirty tracking is on.
    pub tracking: bool,
    /// Disks, in slot order.
    pub disks: Vec<DiskInfo>,
    /// NICs, in slot order.
    pub nics: Vec<NicInfo>,
}

/// The VMM process itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its process ID.
    pub pid: u32,
    /// When it started, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Whether it holds a VM yet.
    pub has_vm: bool,
}

/// VMM → hostd.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`. Frozen: variant 0.
    Hello {
        /// The version both speak.
        version: u32,
        /// The process.
        process: ProcessInfo,
    },
    /// Done, nothing to return.
    Done,
    /// Answer to `Info`, `Create`, `CreateEmpty`.
    Info(Box<VmmInfo>),
    /// Answer to `BeginTracking` and `FetchDirty`.
    Dirty(DirtySet),
    /// Answer to `BeginDiskTracking` and `FetchDirtyBlocks`: per disk, `(offset, length)`.
    DiskExtents(Vec<Vec<(u64, u64)>>),
    /// Answer to `Freeze`.
    Frozen(Box<FrozenState>),
    /// Answer to `LoadState`: whether memory was verified.
    Loaded {
        /// `Some(true)` when a hash was given and matched.
        verified: Option<bool>,
    },
    /// Answer to `Memory`: the memfd follows as an `SCM_RIGHTS` descriptor.
    Memory {
        /// Its size, bytes.
        size: u64,
    },
    /// First answer to `FollowConsole`.
    ConsoleStart {
        /// Absolute offset of `history`'s first byte.
        offset: u64,
        /// Retained output from there on.
        history: Vec<u8>,
    },
    /// More console output, until the VM stops.
    ConsoleChunk(Vec<u8>),
    /// The request failed.
    Error(VmmError),
}

/// What kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmmErrorKind {
    /// The request makes no sense now (no VM yet, a VM already, wrong order).
    InvalidState,
    /// The runtime refused or failed.
    Runtime,
    /// The arrived state was rejected.
    BadState,
    /// No common protocol version.
    Version,
}

/// A failed request, with what went wrong in words for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct VmmError {
    /// Kind.
    pub kind: VmmErrorKind,
    /// For the operator.
    pub message: String,
}

impl VmmError {
    /// An error of `kind`.
    pub fn new(kind: VmmErrorKind, message: impl Into<String>) -> Self {
        VmmError {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opening exchange must stay decodable by every later build: its bytes are fixed.
    #[test]
    fn the_opening_exchange_is_frozen() {
        let hello = postcard::to_stdvec(&Request::Hello { versions: vec![1] }).unwrap();
        assert_eq!(hello, [0, 1, 1]);
        let answer = postcard::to_stdvec(&Response::Hello {
            version: 1,
            process: ProcessInfo {
                pid: 7,
                started_unix_ms: 9,
                has_vm: true,
            },
        })
        .unwrap();
        assert_eq!(answer, [0, 1, 7, 9, 1]);
    }

    #[test]
    fn requests_and_answers_round_trip() {
        let spec = CreateSpec {
            identity: VmIdentity::new("vm"),
            vcpus: 2,
            memory: 64 << 20,
            boot: Boot::Guest(ferry_runtime::TestGuest::Counter { ticks_per_sec: 5 }),
            preloads: vec![],
            dirty_log: DirtyLogMode::Bitmap,
            console_log: Some("/tmp/x.log".into()),
            hidden_cpu_features: vec!["sse2".into()],
            disks: vec![DiskSpec {
                path: "/srv/ferry/shared/vm.raw".into(),
                read_only: false,
                id: "vm.raw".into(),
                lock: true,
            }],
            nics: vec![ferry_runtime::devices::NicSpec {
                network: "vmnet".into(),
                bridge: "br-vmnet".into(),
                mac: [0x52, 0x54, 0, 1, 2, 3],
                ip: None,
                attach: true,
            }],
            start: true,
        };
        let bytes = postcard::to_stdvec(&Request::Create(Box::new(spec.clone()))).unwrap();
        match postcard::from_bytes::<Request>(&bytes).unwrap() {
            Request::Create(back) => assert_eq!(*back, spec),
            other => panic!("{other:?}"),
        }
        let error = Response::Error(VmmError::new(VmmErrorKind::BadState, "nope"));
        let bytes = postcard::to_stdvec(&error).unwrap();
        assert!(matches!(
            postcard::from_bytes::<Response>(&bytes).unwrap(),
            Response::Error(VmmError {
                kind: VmmErrorKind::BadState,
                ..
            })
        ));
    }
}
