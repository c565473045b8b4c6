//! Live migration: the two migration actors (source and destination roles), the messages
//! they exchange, and the decisions they make.
//!
//! Stages, each a message between the two hosts and a log line on both:
//! verify → prepare → pre-copy rounds → stop-and-copy → ready → commit → resumed, or at any
//! point before commit: abort → rollback. See `docs/design.md` for why the switch-over is safe.

pub mod convergence;
pub mod destination;
pub mod memory;
pub mod protocol;
pub mod source;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifies one migration on both hosts.
pub type MigrationId = Uuid;

/// Whether a migration's memory and disks are encrypted on the wire, as vMotion's setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// Encrypt, or fail at verify if either host cannot (has no certificate).
    #[default]
    Required,
    /// Encrypt when both hosts can; otherwise go on in the clear and say so.
    Opportunistic,
    /// Plain TCP for the data streams; hosts with certificates still authenticate each
    /// other on the control channel.
    Disabled,
}

impl Encryption {
    /// The name as configuration and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::Required => "required",
            Encryption::Opportunistic => "opportunistic",
            Encryption::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for Encryption {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "required" => Ok(Encryption::Required),
            "opportunistic" => Ok(Encryption::Opportunistic),
            "disabled" => Ok(Encryption::Disabled),
            other => Err(format!(
                "'{other}' is not an encryption mode (required, opportunistic, disabled)"
            )),
        }
    }
}

/// Which data path a migration may take (`--transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportChoice {
    /// RDMA when both hosts have a usable device and the migration allows it, TCP otherwise.
    #[default]
    Auto,
    /// TCP streams.
    Tcp,
    /// RDMA, or fail at verify saying why not.
    Rdma,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(TransportChoice::Auto),
            "tcp" => Ok(TransportChoice::Tcp),
            "rdma" => Ok(TransportChoice::Rdma),
            other => Err(format!("'{other}' is not a transport (auto, tcp, rdma)")),
        }
    }
}

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOptions {
    /// Largest acceptable pause of the guest.
    pub downtime_ms: u64,
    /// Data streams (copy workers) to offer.
    pub streams: u16,
    /// Compare a hash of guest memory on both sides before switching over.
    pub verify: bool,
    /// Pre-copy rounds after which the guest is stopped regardless.
    pub max_rounds: u32,
    /// Allow throttling the guest so the migration converges.
    pub auto_converge: bool,
    /// Cap on the memory copy, bytes per second on the wire over all streams together
    /// (`None`: as fast as the link goes).
    pub max_bandwidth: Option<u64>,
    /// Compute + storage: move every disk to this datastore of the destination while the
    /// VM runs (`None`: compute only, the disks stay on a shared datastore).
    #[serde(default)]
    pub datastore: Option<String>,
    /// Compute + storage, per disk: the destination datastore of the disk named by the key
    /// (`FILE` or `DATASTORE:FILE`); disks not named go to `datastore`.
    #[serde(default)]
    pub disk_targets: std::collections::BTreeMap<String, String>,
    /// After a storage migration, keep the source images instead of deleting them.
    #[serde(default)]
    pub keep_source_disks: bool,
    /// Encryption of the data streams (`None`: the cluster's default, which is `required`
    /// when this host has a certificate and `disabled` when it has none).
    #[serde(default)]
    pub encryption: Option<Encryption>,
    /// The data path: `auto` (the default), `tcp` or `rdma`.
    #[serde(default)]
    pub transport: TransportChoice,
    /// A cap this migration shares with others running at the same time (an evacuation's
    /// `total_bandwidth`): not part of a request, set by whoever starts the migrations.
    #[serde(skip)]
    pub shared_cap: Option<ferry_transport::data::SharedCap>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            downtime_ms: 300,
            streams: 2,
            verify: false,
            max_rounds: 30,
            auto_converge: true,
            max_bandwidth: None,
            datastore: None,
            disk_targets: Default::default(),
            keep_source_disks: false,
            encryption: None,
            transport: TransportChoice::Auto,
            shared_cap: None,
        }
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Connecting to the destination and checking it can take the VM.
    Verify,
    /// The destination builds an empty VM of the same shape.
    Prepare,
    /// Copying memory while the guest runs.
    PreCopy,
    /// Guest paused; last pages and device state.
    StopAndCopy,
    /// Waiting for the destination to load the state.
    SwitchOver,
    /// Done: the VM runs on the destination.
    Completed,
    /// Failed before the switch; the VM runs on the source as before.
    RolledBack,
    /// Cancelled by the operator; the VM runs on the source as before.
    Cancelled,
    /// The destination refused the VM; nothing moved.
    Refused,
    /// The switch-over was sent but its outcome could not be confirmed; the VM stays paused
    /// on the source until the destination answers (it never runs on both).
    InDoubt,
    /// The VM's VMM process on the source ended during the migration: the VM crashed there,
    /// and the migration stopped (the destination discarded its copy).
    Failed,
    /// The destination committed the switch-over and then lost the VM. The source keeps its
    /// copy paused (`stale`): running it would take the guest back in time, so only the
    /// operator can (`ferryctl vm recover NAME --from-stale-copy`).
    LostAfterSwitchOver,
}

impl Stage {
    /// Whether the migration is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Stage::Completed
                | Stage::RolledBack
                | Stage::Cancelled
                | Stage::Refused
                | Stage::Failed
                | Stage::LostAfterSwitchOver
        )
    }
}

/// One pre-copy round. The copy made with the guest paused is reported separately
/// (`final_pages`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Pages sent.
    pub pages: u64,
    /// Guest bytes sent.
    pub bytes: u64,
    /// Duration in milliseconds.
    pub duration_ms: f64,
}

/// Live progress and, once final, the report of a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Migration ID.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// `running`, `completed`, `rolled_back`, `cancelled`, `refused`, `failed` (the VM
    /// crashed on the source), `in_doubt` or `lost_after_switch_over`.
    pub status: String,
    /// Current stage.
    pub stage: Option<Stage>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Source host.
    pub source: String,
    /// Destination host.
    pub destination: String,
    /// `tcp+lz4`, `tcp` or `rdma`, once negotiated.
    pub transport: Option<String>,
    /// Why that transport.
    pub transport_reason: Option<String>,
    /// What protects the data streams, and why: `tls1.3 aes-256-gcm`, or
    /// `none (disabled by the operator)`.
    #[serde(default)]
    pub encryption: Option<String>,
    /// What protects the control channel: `mutual TLS (…)` or `plain TCP (…)`.
    #[serde(default)]
    pub control_channel: Option<String>,
    /// The RDMA link used (device, port, GID, MTU), when the transport is RDMA.
    #[serde(default)]
    pub rdma_link: Option<ferry_transport::rdma::LinkInfo>,
    /// Data streams in use.
    pub streams: u16,
    /// Protocol version the two hosts agreed on.
    pub protocol_version: Option<u16>,
    /// Round trip of the control channel, measured at verify.
    pub control_rtt_ms: Option<f64>,
    /// Bandwidth cap on the memory copy, bytes per second (`None`: uncapped).
    pub max_bandwidth: Option<u64>,
    /// A cap shared with the other migrations of an evacuation, bytes per second.
    #[serde(default)]
    pub shared_bandwidth: Option<u64>,
    /// Pre-copy round in progress or last done (1-based; 0 before the first).
    pub round: u32,
    /// Data left to send: during a pre-copy round, what the round has still to send (live);
    /// between rounds, the dirty set the last fetch found.
    pub remaining_bytes: u64,
    /// Bytes the current pre-copy round set out to send (round one: the populated memory
    /// and the disks' data, known from the start).
    #[serde(default)]
    pub round_bytes: u64,
    /// Of those, sent so far.
    #[serde(default)]
    pub round_sent_bytes: u64,
    /// Guest bytes per second: live during a round, then over the last round.
    pub rate_bytes_per_s: f64,
    /// Estimated time to finish the round (live) or the next one, at the current rate.
    pub eta_ms: Option<f64>,
    /// Time since the migration started (total when final).
    pub total_ms: f64,
    /// How long the guest was stopped: from the pause on the source to its vCPUs running
    /// again, on the destination (switch-over) or here (rollback); 0 when it was never
    /// paused. `None` while that is not known yet (or, for a VM lost after the switch-over,
    /// when the destination cannot say when it resumed it).
    pub downtime_ms: Option<f64>,
    /// Guest pause on the source until all memory and state had been sent and the memory
    /// acknowledged (the part of the downtime the source sees; what QEMU reports as its
    /// downtime).
    pub source_downtime_ms: Option<f64>,
    /// Pre-copy rounds.
    pub rounds: Vec<RoundReport>,
    /// Pages sent during stop-and-copy.
    pub final_pages: u64,
    /// Guest memory bytes moved.
    pub guest_bytes: u64,
    /// Bytes on the wire for memory.
    pub wire_bytes: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Highest throttle applied to the guest, in percent.
    pub throttle_pct: u8,
    /// With `--verify`: whether both sides' memory hashes matched.
    pub memory_verified: Option<bool>,
    /// Bytes of VM state (registers, devices) sent at switch-over.
    pub state_bytes: u64,
    /// How the disks move: "shared" (compute only: they stay on a datastore both hosts
    /// share, and only their lock changes hands) or "none" (the VM has no disks).
    #[serde(default)]
    pub storage: Option<String>,
    /// The VM's disks, as `DATASTORE:FILE`.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Compute + storage: bytes of disk blocks sent, over all rounds and the final copy
    /// (before compression; included in `guest_bytes`).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Compute + storage: of those, bytes sent with the guest paused.
    #[serde(default)]
    pub disk_final_bytes: u64,
    /// Compute + storage: each disk's copy, in slot order.
    #[serde(default)]
    pub disk_copies: Vec<DiskCopyReport>,
}

/// One disk of a compute + storage migration, as the source sent it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskCopyReport {
    /// The disk on the source, `DATASTORE:FILE`.
    pub disk: String,
    /// Where it goes on the destination, `DATASTORE:FILE`.
    pub target: String,
    /// Image size, bytes.
    pub size: u64,
    /// Bytes the source image held when the copy began (only those are read: holes stay
    /// holes).
    pub allocated: u64,
    /// Bytes of blocks sent, over all rounds and the final copy (4 KiB pages, whatever their
    /// encoding).
    pub bytes: u64,
    /// Bytes on the wire for them, frame headers included.
    pub wire_bytes: u64,
    /// 4 KiB blocks sent as zero markers (they land as holes).
    pub zero_blocks: u64,
    /// Of `bytes`, those sent with the guest paused.
    pub final_bytes: u64,
    /// Pre-copy rounds that carried blocks of this disk (the first pass is round 1).
    pub rounds: u32,
    /// From the start of the copy until the last round (or the stop-and-copy) that carried
    /// blocks of this disk had landed on the destination.
    pub time_ms: f64,
    /// The copy workers' time on this disk's blocks, summed over streams.
    pub busy_ms: f64,
}

/// What protected a migration's control channel, for its report: `cipher` is the TLS
/// cipher when it ran under mutual TLS.
pub fn control_channel_label(cipher: Option<&str>) -> String {
    match cipher {
        Some(cipher) => format!("mutual TLS ({cipher})"),
        None => "plain TCP (no mutual TLS: a host has no certificate)".into(),
    }
}

impl MigrationReport {
    /// The report of a migration that has just begun.
    pub fn starting(
        id: MigrationId,
        vm: &str,
        source: &str,
        destination: &str,
        streams: u16,
    ) -> Self {
        MigrationReport {
            id: id.to_string(),
            vm: vm.to_string(),
            status: "running".into(),
            stage: Some(Stage::Verify),
            source: source.to_string(),
            destination: destination.to_string(),
            streams,
            ..Default::default()
        }
    }

    /// Updates the elapsed time and, when data streams exist, the byte and page totals.
    pub fn refresh(
        &mut self,
        started: std::time::Instant,
        totals: Option<&ferry_transport::stats::TransferStats>,
    ) {
        if let Some(stats) = totals {
            self.guest_bytes = stats.total.guest_bytes;
            self.wire_bytes = stats.total.wire_bytes;
            self.zero_pages = stats.total.pages_zero;
            for (copy, account) in self.disk_copies.iter_mut().zip(&stats.accounts) {
                copy.bytes = account.guest_bytes;
                copy.wire_bytes = account.wire_bytes;
                copy.zero_blocks = account.pages_zero;
                copy.busy_ms = account.busy.as_secs_f64() * 1000.0;
            }
        }
        self.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    }

    /// Whether the report is final.
    pub fn is_final(&self) -> bool {
        self.stage.is_some_and(Stage::is_final)
    }
}

/// Outcome of a migration as the destination remembers it (answers in-doubt queries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestinationOutcome {
    /// The VM was resumed (or kept paused) here: the destination owns it.
    Owned,
    /// The incoming copy was discarded before any commit: the source owns the VM.
    Discarded,
    /// Still in progress.
    InProgress,
    /// The commit was recorded here, then the VM was lost (its VMM process ended): it may have
    /// run here, so the source's paused copy is stale and must not resume on its own.
    Lost,
    /// The journal that answers has no record of the migration. It proves the migration
    /// never reached `Prepared` there only if it is the journal the source talked to.
    Unknown,
}
