//! What a host is and knows, as the actors need it (hostd builds this from the TOML cluster
//! configuration).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::migration::MigrationOptions;

/// How this host is attached to one of the cluster's networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPort {
    /// The interface announcements go out on for VMs without a NIC (none: none are sent).
    pub interface: Option<String>,
    /// The Linux bridge the VMs' TAPs join: VMs on this network get a virtio-net NIC.
    pub bridge: Option<String>,
}

/// Another host of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Host name.
    pub name: String,
    /// Where its migration control channel listens.
    pub control_addr: SocketAddr,
    /// Its datacenter.
    pub datacenter: Option<String>,
}

/// Deliberate failures for tests of the rollback paths. Set only through the
/// `FERRY_FAULT` environment variable of a test's hostd; never in configuration files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Destination: drop the control connection when the VM state arrives (the source is
    /// paused in stop-and-copy).
    DropControlOnState,
    /// Destination: run the VM on commit but drop the connection instead of confirming (the
    /// source must find out by asking, and must not resume meanwhile).
    DropControlOnCommit,
    /// Destination: as `DropControlOnCommit`, and answer no query either, as if a partition
    /// cut the hosts apart right after the commit; with `heals`, queries are answered again
    /// [`PARTITION_HEALS_AFTER`] after the commit.
    PartitionAfterCommit {
        /// Whether the partition ends.
        heals: bool,
    },
    /// Destination: change one byte of the arrived memory before comparing hashes.
    CorruptArrivingMemory,
    /// Destination: change one byte of the first moved disk image before comparing hashes.
    CorruptArrivingDisk,
    /// Destination: fail to build the arriving VM, as when the host runs out of memory.
    FailPrepare,
    /// Destination: reject the arrived VM state.
    RejectState,
    /// Destination: load the arrived state (disks locked, NICs on their bridges), then fail
    /// instead of saying it is ready: the latest a destination can fail before the commit.
    FailAfterLoad,
    /// Destination: wait [`SLOW_STATE_LOAD`] before loading the arrived state (the source
    /// holds the guest paused meanwhile).
    SlowStateLoad,
}

/// How long `SlowStateLoad` waits.
pub const SLOW_STATE_LOAD: Duration = Duration::from_secs(5);

impl Fault {
    const ALL: [(&'static str, Fault); 10] = [
        ("slow-state-load", Fault::SlowStateLoad),
        ("drop-control-on-state", Fault::DropControlOnState),
        ("drop-control-on-commit", Fault::DropControlOnCommit),
        (
            "partition-after-commit",
            Fault::PartitionAfterCommit { heals: false },
        ),
        (
            "partition-after-commit-healing",
            Fault::PartitionAfterCommit { heals: true },
        ),
        ("corrupt-arriving-memory", Fault::CorruptArrivingMemory),
        ("corrupt-arriving-disk", Fault::CorruptArrivingDisk),
        ("fail-prepare", Fault::FailPrepare),
        ("reject-state", Fault::RejectState),
        ("fail-after-load", Fault::FailAfterLoad),
    ];

    /// Parses a `FERRY_FAULT` value.
    pub fn parse(text: &str) -> Result<Fault, String> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, fault)| *fault)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|(name, _)| *name).collect();
                format!("unknown FERRY_FAULT '{text}' (known: {})", known.join(", "))
            })
    }
}

/// How long a healing `PartitionAfterCommit` lasts.
pub const PARTITION_HEALS_AFTER: Duration = Duration::from_secs(3);

/// When the partition of a `PartitionAfterCommit` fault began (process-wide: fault
/// injection only).
static PARTITIONED_AT: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

impl Fault {
    /// Records that the injected partition begins now.
    pub fn partition_begins() {
        *PARTITIONED_AT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
    }

    /// Whether the injected partition (if this fault is one) keeps queries from arriving.
    pub fn blocks_queries(self) -> bool {
        match self {
            Fault::PartitionAfterCommit { heals: false } => true,
            Fault::PartitionAfterCommit { heals: true } => PARTITIONED_AT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some_and(|at| at.elapsed() < PARTITION_HEALS_AFTER),
            _ => false,
        }
    }
}

/// Timeouts and limits of migrations on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationLimits {
    /// Defaults for options the operator does not give.
    pub defaults: MigrationOptions,
    /// Migrations (in or out) at once; more are refused.
    pub max_concurrent: usize,
    /// Connecting to a peer.
    pub connect_timeout: Duration,
    /// A control channel silent for this long is dead.
    pub io_timeout: Duration,
    /// After a lost switch-over confirmation, how long the source keeps asking the
    /// destination before reporting the migration in doubt.
    pub in_doubt_timeout: Duration,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits {
            defaults: MigrationOptions::default(),
            max_concurrent: 2,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(15),
            in_doubt_timeout: Duration::from_secs(30),
        }
    }
}

/// One host.
#[derive(Clone, Debug)]
pub struct HostSettings {
    /// Host name.
    pub name: String,
    /// Datacenter.
    pub datacenter: Option<String>,
    /// Where the migration control channel listens.
    pub control_addr: SocketAddr,
    /// Where data receivers bind (port 0: any free port).
    pub data_addrs: Vec<SocketAddr>,
    /// CPUs the copy workers are pinned to (empty: not pinned).
    pub copy_cpus: Vec<usize>,
    /// Memory available to VMs, bytes.
    pub memory: u64,
    /// Networks present here, with how this host is attached to each.
    pub networks: BTreeMap<String, NetworkPort>,
    /// Datastores reachable from here: name → root directory on this host.
    pub datastores: BTreeMap<String, PathBuf>,
    /// CPU features withheld from VMs created here and not offered to arriving VMs.
    pub hidden_cpu_features: Vec<String>,
    /// Where console logs go.
    pub state_dir: PathBuf,
    /// Migration limits and defaults.
    pub migration: MigrationLimits,
    /// The other hosts.
    pub peers: BTreeMap<String, Peer>,
    /// Test-only fault injection.
    pub fault: Option<Fault>,
    /// Host-to-host protocol versions this host speaks (normally all this build has; a test
    /// narrows or widens them to stand in for another Ferry version).
    pub protocol_versions: &'static [u16],
    /// Test-only: an RDMA device this host claims to have besides those it finds, standing
    /// in for hardware this machine lacks, so that negotiation plans RDMA and the setup
    /// failure and its fallback run for real.
    pub claimed_rdma: Option<ferry_transport::rdma::RdmaDevice>,
    /// How to start a VM's VMM process (`None`: this executable, as `EXE vmm`).
    pub vmm_program: Option<ferry_vmm::VmmProgram>,
    /// This host's certificate in the cluster (`None`: it has none, and speaks plain TCP
    /// to its peers).
    pub tls: Option<ferry_transport::tls::HostTls>,
    /// The gate this host's outgoing migrations share, so that a switch-over goes first
    /// (see [`ferry_transport::data::SwitchOverGate`]).
    pub switch_over_gate: std::sync::Arc<ferry_transport::data::SwitchOverGate>,
}

impl HostSettings {
    /// The bridge this host attaches `network` to, if it has one (its VMs get a NIC on it).
    pub fn bridge(&self, network: &str) -> Option<&str> {
        self.networks.get(network)?.bridge.as_deref()
    }

    /// Every network with a bridge here, and its bridge.
    pub fn bridges(&self) -> BTreeMap<String, String> {
        self.networks
            .iter()
            .filter_map(|(name, port)| Some((name.clone(), port.bridge.clone()?)))
            .collect()
    }

    /// What this host can do for a migration's data: its RDMA devices (discovery failing is
    /// logged and means none), TCP on `addrs`, up to `streams` streams.
    pub fn capabilities(
        &self,
        addrs: Vec<std::net::SocketAddr>,
        streams: u16,
    ) -> ferry_transport::negotiate::Capabilities {
        use ferry_transport::negotiate::Capabilities;
        let mut caps = Capabilities::local(addrs.clone(), streams).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "RDMA discovery failed; offering TCP only");
            Capabilities::without_rdma(addrs, streams)
        });
        if let Some(device) = &self.claimed_rdma {
            caps.rdma_devices.push(device.clone());
            caps.rdma_data_path = true;
        }
        caps
    }

    /// The encryption a migration out of here uses when the operator names none: required
    /// with a certificate, disabled without one.
    pub fn default_encryption(&self) -> crate::migration::Encryption {
        match (&self.migration.defaults.encryption, &self.tls) {
            (Some(mode), _) => *mode,
            (None, Some(_)) => crate::migration::Encryption::Required,
            (None, None) => crate::migration::Encryption::Disabled,
        }
    }

    /// Where VMM sockets and VMM logs live.
    pub fn vmm_dir(&self) -> PathBuf {
        self.state_dir.join("vmm")
    }

    /// The socket of VM `name`'s VMM.
    pub fn vmm_socket(&self, name: &str) -> PathBuf {
        self.vmm_dir().join(format!("{name}.sock"))
    }

    /// The log of VM `name`'s VMM.
    pub fn vmm_log(&self, name: &str) -> PathBuf {
        self.vmm_dir().join(format!("{name}.log"))
    }

    /// The program that starts VMMs.
    pub fn vmm_program(&self) -> std::io::Result<ferry_vmm::VmmProgram> {
        match &self.vmm_program {
            Some(program) => Ok(program.clone()),
            None => ferry_vmm::VmmProgram::this_executable(),
        }
    }
}
