//! The cluster configuration: a TOML file (loaded with the `config` crate, overridable by
//! `FERRYCFG_*` environment variables such as `FERRYCFG_MIGRATION__DOWNTIME_MS=100`) that
//! names the hosts, their addresses and resources, the networks, datastores and datacenters,
//! and migration defaults. Every problem is reported with the file, the key and what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_actors::migration::MigrationOptions;
use ferry_actors::settings::{Fault, HostSettings, MigrationLimits, NetworkPort, Peer};
use ferry_runtime::units::parse_size;
use serde::Deserialize;

/// Environment variable prefix for overrides (`FERRYCFG_` + key path with `__` separators).
pub const ENV_PREFIX: &str = "FERRYCFG";

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or has unknown keys or wrong types.
    #[error("{file}: {message}")]
    Load {
        /// The file.
        file: String,
        /// The parser's message (it names the key).
        message: String,
    },
    /// A value is invalid.
    #[error("{file}: key `{key}`: {problem}")]
    Invalid {
        /// The file.
        file: String,
        /// Key path, e.g. `hosts[1].api`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationSection {
    downtime_ms: Option<u64>,
    streams: Option<u16>,
    max_rounds: Option<u32>,
    auto_converge: Option<bool>,
    max_bandwidth: Option<String>,
    max_concurrent: Option<usize>,
    connect_timeout_ms: Option<u64>,
    io_timeout_ms: Option<u64>,
    in_doubt_timeout_ms: Option<u64>,
    encryption: Option<String>,
    /// `auto`, `tcp` or `rdma`.
    transport: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    /// PEM of the cluster CA certificate.
    ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkAttachment {
    name: String,
    /// Interface announcements go out on for VMs without a NIC; none means none are sent.
    #[serde(default)]
    interface: Option<String>,
    /// The Linux bridge VMs' TAPs join: VMs on this network get a virtio-net NIC.
    #[serde(default)]
    bridge: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatastoreAttachment {
    name: String,
    /// The datastore's root directory on this host.
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSection {
    name: String,
    #[serde(default)]
    datacenter: Option<String>,
    #[serde(default)]
    api: Option<String>,
    #[serde(default)]
    api_token_file: Option<String>,
    control: String,
    #[serde(default)]
    data: Vec<String>,
    #[serde(default)]
    tls_cert: Option<String>,
    #[serde(default)]
    tls_key: Option<String>,
    #[serde(default)]
    cpus: Vec<usize>,
    memory: String,
    #[serde(default)]
    networks: Vec<NetworkAttachment>,
    #[serde(default)]
    datastores: Vec<DatastoreAttachment>,
    #[serde(default)]
    hide_cpu_features: Vec<String>,
    #[serde(default)]
    max_concurrent: Option<usize>,
    #[serde(default)]
    state_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    cluster: ClusterSection,
    #[serde(default)]
    migration: MigrationSection,
    #[serde(default)]
    tls: TlsSection,
    #[serde(default)]
    datacenters: Vec<Named>,
    #[serde(default)]
    networks: Vec<Named>,
    #[serde(default)]
    datastores: Vec<Named>,
    hosts: Vec<HostSection>,
}

/// One host, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Name.
    pub name: String,
    /// Datacenter.
    pub datacenter: Option<String>,
    /// HTTP API address on TCP (`None`: only the unix socket in the state directory).
    pub api: Option<SocketAddr>,
    /// The file holding the bearer token every request on the TCP API must carry.
    pub api_token_file: Option<PathBuf>,
    /// This host's certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Migration control address.
    pub control: SocketAddr,
    /// Data addresses.
    pub data: Vec<SocketAddr>,
    /// Copy-worker CPUs.
    pub cpus: Vec<usize>,
    /// VM memory, bytes.
    pub memory: u64,
    /// Networks and how this host is attached to them.
    pub networks: BTreeMap<String, NetworkPort>,
    /// Datastores: name → root directory on this host.
    pub datastores: BTreeMap<String, PathBuf>,
    /// Hidden CPU features.
    pub hide_cpu_features: Vec<String>,
    /// Migrations (in and out) this host runs at once, if not the cluster's
    /// `[migration] max_concurrent`.
    pub max_concurrent: Option<usize>,
    /// State directory.
    pub state_dir: PathBuf,
}

/// The cluster, validated.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// File it came from.
    pub file: PathBuf,
    /// Cluster name.
    pub name: String,
    /// Hosts, in file order.
    pub hosts: Vec<HostConfig>,
    /// Migration limits and defaults.
    pub migration: MigrationLimits,
    /// Datacenter names.
    pub datacenters: Vec<String>,
    /// The cluster CA certificate (PEM file), when hosts have certificates.
    pub tls_ca: Option<PathBuf>,
}

impl Cluster {
    /// Loads and validates `file` (with environment overrides).
    pub fn load(file: &Path) -> Result<Cluster, ConfigError> {
        let display = file.display().to_string();
        if !file.is_file() {
            return Err(ConfigError::Load {
                file: display,
                message: "no such file".into(),
            });
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(file).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize::<ClusterFile>())
            .map_err(|e| ConfigError::Load {
                file: display.clone(),
                message: e.to_string(),
            })?;
        validate(file, raw)
    }

    /// Loads a configuration from TOML text (the demo's embedded default).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Cluster, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize::<ClusterFile>())
            .map_err(|e| ConfigError::Load {
                file: origin.display().to_string(),
                message: e.to_string(),
            })?;
        validate(origin, raw)
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Result<&HostConfig, ConfigError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| ConfigError::Invalid {
                file: self.file.display().to_string(),
                key: "hosts".into(),
                problem: format!(
                    "no host named '{name}' (hosts in this file: {})",
                    self.hosts
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The settings `hostd --host NAME` runs with. Checks the things only this machine can
    /// check (that the copy-worker CPUs exist).
    pub fn host_settings(
        &self,
        name: &str,
        fault: Option<Fault>,
    ) -> Result<HostSettings, ConfigError> {
        let host = self.host(name)?;
        let index = self.hosts.iter().position(|h| h.name == name).unwrap_or(0);
        let available = ferry_transport::workers::available_cpus();
        if let Some(cpu) = host.cpus.iter().find(|cpu| !available.contains(cpu)) {
            return Err(ConfigError::Invalid {
                file: self.file.display().to_string(),
                key: format!("hosts[{index}].cpus"),
                problem: format!(
                    "CPU {cpu} does not exist on this machine (available: {})",
                    available
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let peers = self
            .hosts
            .iter()
            .filter(|h| h.name != name)
            .map(|h| {
                (
                    h.name.clone(),
                    Peer {
                        name: h.name.clone(),
                        control_addr: h.control,
                        datacenter: h.datacenter.clone(),
                    },
                )
            })
            .collect();
        let tls = match (&host.tls, &self.tls_ca) {
            (Some((cert, key)), Some(ca)) => {
                let others: Vec<String> = self
                    .hosts
                    .iter()
                    .filter(|h| h.name != name)
                    .map(|h| h.name.clone())
                    .collect();
                let files = ferry_transport::tls::TlsFiles { ca, cert, key };
                Some(
                    ferry_transport::tls::HostTls::load(name, files, &others).map_err(|e| {
                        ConfigError::Invalid {
                            file: self.file.display().to_string(),
                            key: format!("hosts[{index}].tls_cert"),
                            problem: ferry_transport::report(&e),
                        }
                    })?,
                )
            }
            _ => None,
        };
        Ok(HostSettings {
            switch_over_gate: ferry_transport::data::SwitchOverGate::new(),
            name: host.name.clone(),
            datacenter: host.datacenter.clone(),
            control_addr: host.control,
            data_addrs: host.data.clone(),
            copy_cpus: host.cpus.clone(),
            memory: host.memory,
            networks: host.networks.clone(),
            datastores: host.datastores.clone(),
            hidden_cpu_features: host.hide_cpu_features.clone(),
            state_dir: host.state_dir.clone(),
            migration: MigrationLimits {
                max_concurrent: host.max_concurrent.unwrap_or(self.migration.max_concurrent),
                ..self.migration.clone()
            },
            peers,
            fault,
            protocol_versions: ferry_transport::wire::PROTOCOL_VERSIONS,
            claimed_rdma: None,
            vmm_program: None,
            tls,
        })
    }
}

/// A bandwidth cap as operators write it (`200M` = 200 MB/s), at least the transport's
/// smallest.
pub fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let rate = ferry_runtime::units::parse_rate(text)?;
    let least = ferry_transport::data::MIN_BANDWIDTH;
    if rate < least {
        return Err(format!(
            "{} is below the smallest cap, {}",
            ferry_runtime::units::format_rate(rate),
            ferry_runtime::units::format_rate(least)
        ));
    }
    Ok(rate)
}

fn validate(file: &Path, raw: ClusterFile) -> Result<Cluster, ConfigError> {
    let display = file.display().to_string();
    let invalid = |key: String, problem: String| ConfigError::Invalid {
        file: display.clone(),
        key,
        problem,
    };
    if raw.cluster.name.trim().is_empty() {
        return Err(invalid("cluster.name".into(), "must not be empty".into()));
    }
    if raw.hosts.is_empty() {
        return Err(invalid("hosts".into(), "the cluster has no hosts".into()));
    }
    let unique = |items: &[Named], key: &str| -> Result<BTreeSet<String>, ConfigError> {
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let _ = &item.description;
            if !seen.insert(item.name.clone()) {
                return Err(invalid(
                    format!("{key}[{i}].name"),
                    format!("duplicate {key} name '{}'", item.name),
                ));
            }
        }
        Ok(seen)
    };
    let datacenters = unique(&raw.datacenters, "datacenters")?;
    let networks = unique(&raw.networks, "networks")?;
    let datastores = unique(&raw.datastores, "datastores")?;

    let m = &raw.migration;
    let defaults = MigrationOptions::default();
    let limits_default = MigrationLimits::default();
    let ms = |value: Option<u64>, default: Duration, key: &str| -> Result<Duration, ConfigError> {
        match value {
            Some(0) => Err(invalid(
                format!("migration.{key}"),
                "must be greater than 0".into(),
            )),
            Some(v) => Ok(Duration::from_millis(v)),
            None => Ok(default),
        }
    };
    let migration = MigrationLimits {
        defaults: MigrationOptions {
            downtime_ms: match m.downtime_ms {
                Some(0) => {
                    return Err(invalid(
                        "migration.downtime_ms".into(),
                        "must be greater than 0".into(),
                    ));
                }
                Some(v) => v,
                None => defaults.downtime_ms,
            },
            streams: match m.streams {
                Some(0) => {
                    return Err(invalid(
                        "migration.streams".into(),
                        "must be at least 1".into(),
                    ));
                }
                Some(v) => v,
                None => defaults.streams,
            },
            verify: false,
            max_rounds: m.max_rounds.unwrap_or(defaults.max_rounds).max(1),
            auto_converge: m.auto_converge.unwrap_or(defaults.auto_converge),
            max_bandwidth: match &m.max_bandwidth {
                None => None,
                Some(text) => Some(
                    parse_bandwidth(text)
                        .map_err(|problem| invalid("migration.max_bandwidth".into(), problem))?,
                ),
            },
            datastore: None,
            disk_targets: Default::default(),
            keep_source_disks: false,
            encryption: match &m.encryption {
                None => None,
                Some(text) => Some(
                    text.parse()
                        .map_err(|problem| invalid("migration.encryption".into(), problem))?,
                ),
            },
            transport: match &m.transport {
                None => Default::default(),
                Some(text) => text
                    .parse()
                    .map_err(|problem| invalid("migration.transport".into(), problem))?,
            },
            shared_cap: None,
        },
        max_concurrent: m
            .max_concurrent
            .unwrap_or(limits_default.max_concurrent)
            .max(1),
        connect_timeout: ms(
            m.connect_timeout_ms,
            limits_default.connect_timeout,
            "connect_timeout_ms",
        )?,
        io_timeout: ms(m.io_timeout_ms, limits_default.io_timeout, "io_timeout_ms")?,
        in_doubt_timeout: ms(
            m.in_doubt_timeout_ms,
            limits_default.in_doubt_timeout,
            "in_doubt_timeout_ms",
        )?,
    };

    let mut names = BTreeSet::new();
    let mut addresses: BTreeMap<SocketAddr, String> = BTreeMap::new();
    let mut hosts = Vec::with_capacity(raw.hosts.len());
    for (i, h) in raw.hosts.into_iter().enumerate() {
        let key = |field: &str| format!("hosts[{i}].{field}");
        if h.name.is_empty()
            || !h
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                key("name"),
                format!(
                    "'{}' is not a valid host name (letters, digits, '-', '_', '.')",
                    h.name
                ),
            ));
        }
        if !names.insert(h.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("duplicate host name '{}'", h.name),
            ));
        }
        let addr = |text: &str, field: &str| -> Result<SocketAddr, ConfigError> {
            text.parse().map_err(|_| {
                invalid(
                    key(field),
                    format!("'{text}' is not an address (expected IP:PORT, e.g. 127.0.0.1:7701)"),
                )
            })
        };
        let api = h.api.as_deref().map(|a| addr(a, "api")).transpose()?;
        let control = addr(&h.control, "control")?;
        let fixed = api
            .map(|a| (a, "api"))
            .into_iter()
            .chain([(control, "control")]);
        for (a, field) in fixed {
            if a.port() == 0 {
                return Err(invalid(
                    key(field),
                    "needs a fixed port (other hosts connect to it)".into(),
                ));
            }
            if let Some(other) = addresses.insert(a, format!("{}.{field}", h.name)) {
                return Err(invalid(
                    key(field),
                    format!("{a} is already used by {other}"),
                ));
            }
        }
        let data = h
            .data
            .iter()
            .enumerate()
            .map(|(j, d)| addr(d, &format!("data[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let memory = parse_size(&h.memory).map_err(|p| invalid(key("memory"), p))?;
        if memory < ferry_runtime::layout::MIN_MEMORY {
            return Err(invalid(
                key("memory"),
                format!("{} is less than the smallest VM (4 MiB)", h.memory),
            ));
        }
        if let Some(dc) = &h.datacenter
            && !datacenters.contains(dc)
        {
            return Err(invalid(
                key("datacenter"),
                format!("datacenter '{dc}' is not defined under [[datacenters]]"),
            ));
        }
        let mut attached = BTreeMap::new();
        for (j, net) in h.networks.into_iter().enumerate() {
            if !networks.contains(&net.name) {
                return Err(invalid(
                    key(&format!("networks[{j}].name")),
                    format!("network '{}' is not defined under [[networks]]", net.name),
                ));
            }
            if let Some(bridge) = &net.bridge
                && (bridge.is_empty() || bridge.len() > 15 || bridge.contains(['/', ' ', '\0']))
            {
                return Err(invalid(
                    key(&format!("networks[{j}].bridge")),
                    format!("'{bridge}' is not an interface name (1 to 15 bytes, no '/' or space)"),
                ));
            }
            attached.insert(
                net.name,
                NetworkPort {
                    interface: net.interface,
                    bridge: net.bridge,
                },
            );
        }
        let mut stores = BTreeMap::new();
        for (j, ds) in h.datastores.into_iter().enumerate() {
            if !datastores.contains(&ds.name) {
                return Err(invalid(
                    key(&format!("datastores[{j}].name")),
                    format!(
                        "datastore '{}' is not defined under [[datastores]]",
                        ds.name
                    ),
                ));
            }
            let path = PathBuf::from(&ds.path);
            if !path.is_absolute() {
                return Err(invalid(
                    key(&format!("datastores[{j}].path")),
                    format!("'{}' is not an absolute path", ds.path),
                ));
            }
            if stores.insert(ds.name.clone(), path).is_some() {
                return Err(invalid(
                    key(&format!("datastores[{j}].name")),
                    format!("datastore '{}' is listed twice", ds.name),
                ));
            }
        }
        for (j, feature) in h.hide_cpu_features.iter().enumerate() {
            if !ferry_runtime::cpu::is_known_feature(feature) {
                return Err(invalid(
                    key(&format!("hide_cpu_features[{j}]")),
                    format!("unknown CPU feature '{feature}'"),
                ));
            }
        }
        let state_dir = h
            .state_dir
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("ferry").join(&h.name));
        let api_token_file = h.api_token_file.as_deref().map(|f| beside(file, f));
        if api.is_some() && api_token_file.is_none() {
            return Err(invalid(
                key("api"),
                "a TCP API must authenticate its clients: set api_token_file to a file holding the bearer token (or leave api out: the API is always served on the unix socket api.sock in the state directory)".into(),
            ));
        }
        let tls = match (h.tls_cert.as_deref(), h.tls_key.as_deref()) {
            (Some(cert), Some(key)) => Some((beside(file, cert), beside(file, key))),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    key("tls_key"),
                    "tls_cert is set, tls_key is not".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    key("tls_cert"),
                    "tls_key is set, tls_cert is not".into(),
                ));
            }
        };
        if tls.is_some() && raw.tls.ca.is_none() {
            return Err(invalid(
                "tls.ca".into(),
                format!(
                    "host '{}' has a certificate, and no cluster CA is configured",
                    h.name
                ),
            ));
        }
        hosts.push(HostConfig {
            name: h.name,
            datacenter: h.datacenter,
            api,
            api_token_file,
            tls,
            control,
            data,
            cpus: h.cpus,
            memory,
            networks: attached,
            datastores: stores,
            hide_cpu_features: h.hide_cpu_features,
            max_concurrent: h.max_concurrent.map(|n| n.max(1)),
            state_dir,
        });
    }
    Ok(Cluster {
        file: file.to_path_buf(),
        name: raw.cluster.name,
        hosts,
        migration,
        datacenters: datacenters.into_iter().collect(),
        tls_ca: raw.tls.ca.as_deref().map(|ca| beside(file, ca)),
    })
}

/// A path from the configuration: relative ones are relative to the file's directory.
fn beside(file: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    file.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "test"

[migration]
downtime_ms = 200

[[datacenters]]
name = "dc1"

[[networks]]
name = "vmnet"

[[datastores]]
name = "shared"

[[hosts]]
name = "alpha"
datacenter = "dc1"
api = "127.0.0.1:7701"
api_token_file = "/etc/ferry/alpha.token"
control = "127.0.0.1:7711"
data = ["127.0.0.1:0"]
memory = "2G"
networks = [{ name = "vmnet", interface = "lo" }]
datastores = [{ name = "shared", path = "/srv/ferry/shared" }]

[[hosts]]
name = "beta"
api = "127.0.0.1:7702"
api_token_file = "beta.token"
control = "127.0.0.1:7712"
memory = "1G"
"#;

    fn load(text: &str) -> Result<Cluster, ConfigError> {
        Cluster::from_toml(text, Path::new("cluster.toml"))
    }

    fn problem(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config_loads() {
        let cluster = load(GOOD).unwrap();
        assert_eq!(cluster.hosts.len(), 2);
        assert_eq!(cluster.migration.defaults.downtime_ms, 200);
        let alpha = cluster.host("alpha").unwrap();
        assert_eq!(alpha.memory, 2 << 30);
        assert_eq!(
            alpha
                .networks
                .get("vmnet")
                .and_then(|n| n.interface.as_deref()),
            Some("lo")
        );
        let settings = cluster.host_settings("beta", None).unwrap();
        assert_eq!(settings.peers.len(), 1);
        assert_eq!(
            settings.peers["alpha"].control_addr,
            "127.0.0.1:7711".parse().unwrap()
        );
    }

    #[test]
    fn each_problem_names_file_key_and_cause() {
        let unknown = problem(&GOOD.replace("memory = \"1G\"", "memory = \"1G\"\nmemroy = 3"));
        assert!(
            unknown.starts_with("cluster.toml:") && unknown.contains("memroy"),
            "{unknown}"
        );
        let duplicate = problem(&GOOD.replace("name = \"beta\"", "name = \"alpha\""));
        assert!(
            duplicate.contains("hosts[1].name")
                && duplicate.contains("duplicate host name 'alpha'"),
            "{duplicate}"
        );
        let address = problem(&GOOD.replace("127.0.0.1:7712", "127.0.0.1:99999"));
        assert!(
            address.contains("hosts[1].control") && address.contains("not an address"),
            "{address}"
        );
        let port = problem(&GOOD.replace("127.0.0.1:7712", "127.0.0.1:0"));
        assert!(port.contains("fixed port"), "{port}");
        let clash = problem(&GOOD.replace("127.0.0.1:7712", "127.0.0.1:7701"));
        assert!(clash.contains("already used by alpha.api"), "{clash}");
        let size = problem(&GOOD.replace("memory = \"1G\"", "memory = \"lots\""));
        assert!(
            size.contains("hosts[1].memory") && size.contains("not a size"),
            "{size}"
        );
        let dc = problem(&GOOD.replace("datacenter = \"dc1\"", "datacenter = \"dc9\""));
        assert!(
            dc.contains("hosts[0].datacenter") && dc.contains("dc9"),
            "{dc}"
        );
        let net =
            problem(&GOOD.replace("name = \"vmnet\", interface", "name = \"nope\", interface"));
        assert!(net.contains("hosts[0].networks[0].name"), "{net}");
        let feature = problem(&GOOD.replace(
            "memory = \"1G\"",
            "memory = \"1G\"\nhide_cpu_features = [\"warp-drive\"]",
        ));
        assert!(
            feature.contains("hide_cpu_features[0]") && feature.contains("warp-drive"),
            "{feature}"
        );
        let syntax = problem("[cluster\nname=");
        assert!(syntax.starts_with("cluster.toml:"), "{syntax}");
        let zero = problem(&GOOD.replace("downtime_ms = 200", "downtime_ms = 0"));
        assert!(zero.contains("migration.downtime_ms"), "{zero}");
    }

    #[test]
    fn security_keys_resolve_beside_the_file_and_are_checked() {
        let cluster = Cluster::from_toml(GOOD, Path::new("/etc/ferry/cluster.toml")).unwrap();
        let beta = cluster.host("beta").unwrap();
        assert_eq!(
            beta.api_token_file.as_deref(),
            Some(Path::new("/etc/ferry/beta.token"))
        );
        let with_tls = GOOD.replace(
            "memory = \"1G\"",
            "memory = \"1G\"\ntls_cert = \"b.pem\"\ntls_key = \"b.key\"",
        ) + "\n[tls]\nca = \"ca.pem\"\n";
        let tls = load(&with_tls).unwrap();
        assert_eq!(tls.tls_ca.as_deref(), Some(Path::new("ca.pem")));
        assert!(tls.host("beta").unwrap().tls.is_some());
        let mode = load(&GOOD.replace(
            "downtime_ms = 200",
            "downtime_ms = 200\nencryption = \"opportunistic\"",
        ))
        .unwrap();
        assert_eq!(
            mode.migration.defaults.encryption,
            Some(ferry_actors::migration::Encryption::Opportunistic)
        );
        let open = problem(&GOOD.replace("api_token_file = \"beta.token\"\n", ""));
        assert!(
            open.contains("hosts[1].api") && open.contains("must authenticate"),
            "{open}"
        );
    }

    #[test]
    fn shipped_example_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for file in ["two-hosts.toml", "two-datacenters.toml"] {
            let cluster = Cluster::load(&dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(cluster.hosts.len(), 2, "{file}");
        }
        let demo = crate::demo::demo_config("/tmp/x", [1, 2, 3, 4], ["br-a", "br-b"]);
        load(&demo).unwrap();
    }

    #[test]
    fn unknown_host_and_missing_cpus_are_refused() {
        let cluster = load(GOOD).unwrap();
        let missing = cluster
            .host_settings("gamma", None)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("no host named 'gamma'") && missing.contains("alpha, beta"),
            "{missing}"
        );
        let cpus =
            load(&GOOD.replace("memory = \"1G\"", "memory = \"1G\"\ncpus = [0, 4096]")).unwrap();
        let err = cpus.host_settings("beta", None).unwrap_err().to_string();
        assert!(
            err.contains("hosts[1].cpus") && err.contains("CPU 4096 does not exist"),
            "{err}"
        );
    }
}
