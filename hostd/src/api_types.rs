//! Request and response bodies of hostd's HTTP API, shared by the server and `ferryctl`.

use std::net::Ipv4Addr;

use ferry_actors::datastore::DiskRequest;
use ferry_actors::host_actor::{ErrorKind, VmSpec};
use ferry_actors::migration::MigrationOptions;
use ferry_runtime::units::parse_size;

use crate::config::parse_bandwidth;
use ferry_runtime::{Boot, GuestOptions, Preload};
use serde::{Deserialize, Serialize};

/// Default guest memory when a request names none.
pub const DEFAULT_MEMORY: &str = "256M";

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// `POST /v1/vms`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// VM name.
    pub name: String,
    /// `counter`, `dirty`, `verify`, `disk`, or the path (on the host) of an ELF kernel.
    pub guest: String,
    /// vCPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Memory, e.g. `256M`.
    #[serde(default)]
    pub memory: Option<String>,
    /// Built-in guest and kernel options.
    #[serde(default)]
    pub options: GuestOptions,
    /// `dirty` working set as a size, e.g. `64M` (convenience over `options.working_set`).
    #[serde(default)]
    pub working_set: Option<String>,
    /// Files to preload, `FILE@ADDRESS` (paths on the host).
    #[serde(default)]
    pub preloads: Vec<String>,
    /// Network (default: the host's first).
    #[serde(default)]
    pub network: Option<String>,
    /// IPv4 address of the VM.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Start at once.
    #[serde(default = "yes")]
    pub start: bool,
    /// Disks, each `DATASTORE:FILE[,size=SIZE][,ro]` (created sparse if missing).
    #[serde(default)]
    pub disks: Vec<String>,
    /// CPU features to withhold from this VM beyond the host's baseline (a per-VM EVC
    /// mask: the VM can then move to hosts that lack them).
    #[serde(default)]
    pub hide_cpu_features: Vec<String>,
}

impl CreateVmRequest {
    /// The VM spec, or what is wrong with the request.
    pub fn to_spec(&self) -> Result<VmSpec, String> {
        let memory_text = self.memory.as_deref().unwrap_or(DEFAULT_MEMORY);
        let memory = parse_size(memory_text).map_err(|e| format!("memory: {e}"))?;
        let mut options = self.options.clone();
        if let Some(size) = &self.working_set {
            options.working_set = Some(parse_size(size).map_err(|e| format!("working set: {e}"))?);
        }
        let boot = Boot::from_guest(&self.guest, memory, &options)?;
        let preloads = self
            .preloads
            .iter()
            .map(|p| Preload::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let disks = self
            .disks
            .iter()
            .map(|d| DiskRequest::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmSpec {
            disks,
            name: self.name.clone(),
            vcpus: self.vcpus,
            memory,
            boot,
            preloads,
            network: self.network.clone(),
            ip: self.ip,
            start: self.start,
            hide_cpu_features: self.hide_cpu_features.clone(),
        })
    }
}

/// `POST /v1/vms/{name}/migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination host (required for a migration; absent in an evacuation's options).
    #[serde(default)]
    pub to: String,
    /// Downtime target, ms.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Data streams.
    #[serde(default)]
    pub streams: Option<u16>,
    /// Compare memory hashes before switching over.
    #[serde(default)]
    pub verify: bool,
    /// Round limit.
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// Throttle the guest to converge.
    #[serde(default)]
    pub auto_converge: Option<bool>,
    /// Bandwidth cap on the memory copy, e.g. `200M` (200 MB/s); `none` lifts the host's
    /// default cap.
    #[serde(default)]
    pub max_bandwidth: Option<String>,
    /// Compute + storage: move every disk to this datastore of the destination.
    #[serde(default)]
    pub datastore: Option<String>,
    /// Compute + storage, per disk: `{"FILE" (or "DATASTORE:FILE"): "DS"}`; disks not named
    /// go to `datastore`.
    #[serde(default)]
    pub disk_targets: std::collections::BTreeMap<String, String>,
    /// After a storage migration, keep the source images.
    #[serde(default)]
    pub keep_source_disks: bool,
    /// `required`, `opportunistic` or `disabled`; the cluster's default when absent.
    #[serde(default)]
    pub encryption: Option<String>,
    /// `auto` (the default), `tcp` or `rdma`.
    #[serde(default)]
    pub transport: Option<String>,
}

impl MigrateRequest {
    /// Options with the host's defaults filled in, or what is wrong with the request.
    pub fn options(&self, defaults: &MigrationOptions) -> Result<MigrationOptions, String> {
        let max_bandwidth = match self.max_bandwidth.as_deref().map(str::trim) {
            None => defaults.max_bandwidth,
            Some("none" | "unlimited") => None,
            Some(text) => Some(parse_bandwidth(text).map_err(|e| format!("max_bandwidth: {e}"))?),
        };
        Ok(MigrationOptions {
            downtime_ms: self.downtime_ms.unwrap_or(defaults.downtime_ms),
            streams: self.streams.unwrap_or(defaults.streams),
            verify: self.verify,
            max_rounds: self.max_rounds.unwrap_or(defaults.max_rounds),
            auto_converge: self.auto_converge.unwrap_or(defaults.auto_converge),
            max_bandwidth,
            datastore: self.datastore.clone(),
            disk_targets: self.disk_targets.clone(),
            keep_source_disks: self.keep_source_disks,
            encryption: match self.encryption.as_deref() {
                None => defaults.encryption,
                Some(text) => Some(text.parse().map_err(|e| format!("encryption: {e}"))?),
            },
            transport: match self.transport.as_deref() {
                None => defaults.transport,
                Some(text) => text.parse().map_err(|e| format!("transport: {e}"))?,
            },
            shared_cap: None,
        })
    }
}

/// `POST /v1/host/maintenance/enter`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    /// Migrate every VM off the host (default); `false` only sets the mode.
    #[serde(default = "evacuate_by_default")]
    pub evacuate: bool,
    /// Options for every migration of the evacuation, as for one migration without `to`;
    /// `datastore` is where disks go that no destination shares.
    #[serde(default)]
    pub options: MigrateRequest,
    /// A cap on all of the evacuation's migrations together, e.g. `"200M"` (bytes per
    /// second on the wire): concurrent migrations share it, and one that ends leaves its
    /// share to the others. `options.max_bandwidth` still caps each migration on its own.
    #[serde(default)]
    pub total_bandwidth: Option<String>,
}

impl MaintenanceRequest {
    /// The shared cap the request asks for, or what is wrong with it.
    pub fn total_bandwidth(&self) -> Result<Option<u64>, String> {
        match self.total_bandwidth.as_deref().map(str::trim) {
            None | Some("none" | "unlimited") => Ok(None),
            Some(text) => parse_bandwidth(text)
                .map(Some)
                .map_err(|e| format!("total_bandwidth: {e}")),
        }
    }
}

fn evacuate_by_default() -> bool {
    true
}

/// `POST /v1/vms/{name}/recover`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// Run the stale copy a lost switch-over left paused here, knowing that its guest goes
    /// back to the moment of the switch-over. Must be `true`.
    #[serde(default)]
    pub from_stale_copy: bool,
}

/// Every error response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for the operator.
    pub error: String,
    /// Category.
    pub kind: ErrorKind,
}
