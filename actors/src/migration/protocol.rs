//! Messages between the source and destination migration actors over the control channel.
//!
//! The source speaks [`ToDestination`], the destination answers with [`ToSource`]. A new
//! control connection starts with `Hello` (a migration), `Query` (the source asking how an
//! earlier migration ended, after losing the connection during switch-over) or `Describe`
//! (a host placing the VMs it evacuates asks what this host can take).
//!
//! Versions: this message set is the one of the protocol version the control channel agreed
//! in its greeting (`ferry_transport::wire::PROTOCOL_VERSIONS`), which is frozen and comes
//! before any of these messages. Postcard is not self-describing, so any change to these
//! types is a new protocol version, and a host keeps speaking the older versions it lists.

use std::net::SocketAddr;

use ferry_runtime::cpu::CpuFeatures;
use ferry_runtime::{VmIdentity, VmShape};
use ferry_transport::negotiate::{Capabilities, Plan};
use serde::{Deserialize, Serialize};

use super::{DestinationOutcome, MigrationId};

/// What the destination must know to decide whether it can take the VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Migration ID.
    pub id: MigrationId,
    /// Source host name.
    pub source_host: String,
    /// The VM's identity (kept unchanged on the destination).
    pub identity: VmIdentity,
    /// vCPUs, memory and the CPUID the VM was given.
    pub shape: VmShape,
    /// Feature flags of that CPUID, for the compatibility check and its message.
    pub cpu_features: CpuFeatures,
    /// Networks the VM is attached to.
    pub networks: Vec<String>,
    /// The network of each of the VM's NICs, in slot order: the destination must have a
    /// bridge on each.
    pub nics: Vec<String>,
    /// What the VM booted (for display).
    pub boot: String,
    /// IPv4 address the VM uses, if known (for the gratuitous ARP after switch-over).
    pub ip: Option<std::net::Ipv4Addr>,
    /// Source transport capabilities.
    pub capabilities: Capabilities,
    /// Whether the source will send a memory hash to compare.
    pub verify: bool,
    /// The VM's disks, in slot order.
    pub disks: Vec<MigratingDisk>,
}

impl Hello {
    /// Whether the disks move (compute + storage): then every one has a target.
    pub fn moves_storage(&self) -> bool {
        self.disks.iter().any(|d| d.target.is_some())
    }
}

/// A disk of a migrating VM, as the destination must find it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigratingDisk {
    /// Datastore and file.
    pub disk: crate::datastore::DiskRef,
    /// Identity of that datastore on the source.
    pub identity: String,
    /// Image size, bytes.
    pub size: u64,
    /// Bytes the image holds on the source (for the free-space check of a storage move).
    #[serde(default)]
    pub allocated: u64,
    /// Compute + storage: the destination datastore it moves to (`None`: it stays on a
    /// shared datastore).
    #[serde(default)]
    pub target: Option<String>,
}

/// Source → destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToDestination {
    /// Stage verify: here is the VM, can you take it?
    Hello(Box<Hello>),
    /// Stage prepare: build the empty VM and listen for data with this plan.
    Prepare {
        /// The negotiated plan (both sides compute it; the source's copy is authoritative).
        plan: Plan,
    },
    /// The data path the source connected: RDMA, or TCP (the plan's, or the fallback after
    /// RDMA setup failed, with why). The destination drops the receiver not used.
    DataPath {
        /// Whether the RDMA queue pairs carry the pages.
        rdma: bool,
        /// Why RDMA was planned and TCP is used.
        fallback: Option<String>,
    },
    /// A pre-copy round finished (informational; the data itself is on the data streams).
    RoundDone {
        /// Round number, 1-based.
        round: u32,
        /// Pages in the round.
        pages: u64,
    },
    /// Stage stop-and-copy is complete: all memory has been sent and acknowledged; this is
    /// the rest of the VM.
    State {
        /// `ferry_runtime::state::blob` of the `VmState`.
        blob: Vec<u8>,
        /// Recent console output, so the destination's console shows the whole story.
        console: Vec<u8>,
        /// Console bytes in the VM's life so far (followers keep their place).
        console_total: u64,
        /// xxh3-128 of guest memory at the pause, with `--verify`.
        memory_hash: Option<[u8; 16]>,
        /// Per moved disk, xxh3-128 of the source image at the pause, with `--verify` of a
        /// storage migration.
        disk_hashes: Vec<[u8; 16]>,
        /// Whether the VM was running (resume it) or paused (keep it paused).
        was_running: bool,
    },
    /// Compute + storage, before the pause: make the disk blocks received so far durable,
    /// so the flush inside the guest's pause has only the last ones to write.
    FlushDisks,
    /// Switch-over: the source has given up the VM; run it.
    Commit,
    /// The migration is abandoned; discard the copy.
    Abort {
        /// Why.
        reason: String,
    },
    /// How did migration `id` end? (after a lost connection during switch-over)
    Query {
        /// The migration.
        id: MigrationId,
    },
    /// What can this host take? (placement for an evacuation; answered with `Description`)
    Describe,
}

/// Destination → source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToSource {
    /// Verify passed; these are the destination's transport capabilities.
    Accepted {
        /// Destination capabilities.
        capabilities: Capabilities,
        /// Identity of the destination's migration journal: later answers about this
        /// migration are trusted only from the same journal.
        journal: uuid::Uuid,
        /// Microseconds the destination spent deciding, so the source can tell the round
        /// trip of the link from the time spent thinking.
        admission_us: u64,
    },
    /// Verify failed; nothing was built.
    Refused {
        /// Why, in words for the operator.
        reason: String,
    },
    /// The empty VM exists and data receivers listen here.
    Prepared {
        /// Data addresses to connect the streams to.
        data_addrs: Vec<SocketAddr>,
        /// With an RDMA plan: the registered guest memory and where to connect, or why the
        /// destination could not set RDMA up (the source then falls back to TCP).
        rdma: Option<Result<ferry_transport::rdma::MemoryTable, String>>,
    },
    /// Answer to `FlushDisks`: the blocks received so far are durable.
    DisksFlushed,
    /// State loaded (and memory verified, if asked); ready to run on commit.
    Ready {
        /// With verify: whether the hashes matched (a mismatch is sent as `Failed`).
        memory_verified: Option<bool>,
    },
    /// Something failed on the destination; the copy is discarded.
    Failed {
        /// What.
        reason: String,
    },
    /// After commit: the VM runs (or is kept paused) here.
    Resumed {
        /// From receiving `Commit` to the vCPUs running (recording the commit durably
        /// included): the destination's share of the guest's pause.
        resumed_after_commit_ms: f64,
    },
    /// Answer to `Query`.
    Outcome {
        /// What the destination knows.
        outcome: DestinationOutcome,
        /// The journal that answered (see `Accepted::journal`).
        journal: uuid::Uuid,
        /// As in `Resumed`, when the destination resumed the VM.
        resumed_after_commit_ms: Option<f64>,
    },
    /// Answer to `Describe`.
    Description(Box<crate::placement::HostFacts>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_postcard() {
        let caps = Capabilities::without_rdma(vec!["127.0.0.1:1".parse().unwrap()], 2);
        let hello = ToDestination::Hello(Box::new(Hello {
            id: MigrationId::new_v4(),
            source_host: "a".into(),
            identity: VmIdentity::new("vm"),
            shape: VmShape {
                vcpus: 2,
                memory: 1 << 30,
                cpuid: vec![],
            },
            cpu_features: CpuFeatures::default(),
            networks: vec!["net".into()],
            nics: vec!["net".into()],
            boot: "counter".into(),
            ip: None,
            disks: vec![MigratingDisk {
                disk: crate::datastore::DiskRef {
                    datastore: "shared".into(),
                    file: "vm.raw".into(),
                    read_only: false,
                },
                identity: "id".into(),
                size: 1 << 20,
                allocated: 4096,
                target: Some("local".into()),
            }],
            capabilities: caps.clone(),
            verify: true,
        }));
        let bytes = postcard::to_stdvec(&hello).unwrap();
        let back: ToDestination = postcard::from_bytes(&bytes).unwrap();
        match back {
            ToDestination::Hello(h) => {
                assert_eq!(h.shape.memory, 1 << 30);
                assert!(h.verify && h.moves_storage());
            }
            other => panic!("{other:?}"),
        }
        let answer = ToSource::Outcome {
            outcome: DestinationOutcome::Discarded,
            journal: uuid::Uuid::new_v4(),
            resumed_after_commit_ms: None,
        };
        let bytes = postcard::to_stdvec(&answer).unwrap();
        assert!(matches!(
            postcard::from_bytes::<ToSource>(&bytes).unwrap(),
            ToSource::Outcome {
                outcome: DestinationOutcome::Discarded,
                ..
            }
        ));
    }
}
