//! Choosing the data transport for a migration from what both hosts can do.
//!
//! Each side describes itself with [`Capabilities`] (sent over the control channel);
//! [`choose`] is a pure, deterministic function of the two, so both sides can compute the
//! same [`Plan`] and the report can say why it was chosen.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::memory::PAGE_SIZE;
use crate::rdma::{self, LinkLayer, RdmaDevice, RdmaError};
use crate::wire::{self, VersionError};

/// Page compression a receiver can decode (raw and zero-marker pages always work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompressionKind {
    /// lz4 block compression per page.
    Lz4,
}

/// What one host can do, as stated during negotiation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Protocol versions spoken.
    pub protocol_versions: Vec<u16>,
    /// RDMA devices found (for the report as much as for the choice).
    pub rdma_devices: Vec<RdmaDevice>,
    /// Whether this host's build can move pages over RDMA.
    pub rdma_data_path: bool,
    /// Addresses this host accepts TCP data streams on (the destination's matter).
    pub tcp_data_addrs: Vec<SocketAddr>,
    /// Compression kinds this host can decode.
    pub compression: Vec<CompressionKind>,
    /// Most data streams this host is willing to run.
    pub max_streams: u16,
    /// Guest page size in bytes.
    pub page_size: u32,
    /// The locked-memory limit RDMA registration runs into on this host.
    #[serde(default)]
    pub memlock: Option<rdma::MemlockLimit>,
}

impl Capabilities {
    /// This host's capabilities: discovers RDMA devices, and offers `tcp_data_addrs` and up to
    /// `max_streams` streams. A failure to list RDMA devices is returned so the caller can log
    /// it; use [`Capabilities::without_rdma`] to go on without RDMA.
    pub fn local(tcp_data_addrs: Vec<SocketAddr>, max_streams: u16) -> Result<Self, RdmaError> {
        let mut caps = Self::without_rdma(tcp_data_addrs, max_streams);
        caps.rdma_devices = rdma::discover()?;
        caps.rdma_data_path = rdma::DATA_PATH_AVAILABLE;
        caps.memlock = Some(rdma::memlock_limit());
        Ok(caps)
    }

    /// This host's capabilities with RDMA left out.
    pub fn without_rdma(tcp_data_addrs: Vec<SocketAddr>, max_streams: u16) -> Self {
        Self {
            protocol_versions: wire::PROTOCOL_VERSIONS.to_vec(),
            rdma_devices: Vec::new(),
            rdma_data_path: false,
            tcp_data_addrs,
            compression: vec![CompressionKind::Lz4],
            max_streams,
            page_size: PAGE_SIZE as u32,
            memlock: None,
        }
    }
}

/// The data transport chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// RDMA between one active port on each side.
    Rdma {
        /// Device on the source.
        source_device: String,
        /// Port on the source.
        source_port: u8,
        /// Device on the destination.
        destination_device: String,
        /// Port on the destination.
        destination_port: u8,
    },
    /// Parallel TCP streams.
    Tcp {
        /// Destination addresses; stream `i` connects to `addrs[i % addrs.len()]`.
        addrs: Vec<SocketAddr>,
        /// Compression the sender may use; `None` means raw and zero pages only.
        compression: Option<CompressionKind>,
    },
}

/// The outcome of negotiation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Protocol version both sides use.
    pub version: u16,
    /// How pages travel.
    pub transport: Transport,
    /// Number of data streams (one copy worker per stream on each side).
    pub streams: u16,
    /// Guest page size.
    pub page_size: u32,
    /// Why this transport, in words fit for a migration report.
    pub reason: String,
    /// Whether the data streams run under mutual TLS.
    pub encrypted: bool,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Negotiation found no workable plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateError {
    /// No protocol version in common.
    #[error("cannot agree on a protocol version")]
    Version(#[source] VersionError),
    /// The hosts use different page sizes.
    #[error(
        "page sizes differ: source uses {source_size} bytes, destination {destination_size} bytes"
    )]
    PageSizeMismatch {
        /// Source page size.
        source_size: u32,
        /// Destination page size.
        destination_size: u32,
    },
    /// A side offers zero streams.
    #[error("the {side} offers zero data streams; configure at least one")]
    NoStreams {
        /// "source" or "destination".
        side: &'static str,
    },
    /// The operator asked for RDMA and it is out.
    #[error("RDMA was requested and cannot be used: {why}")]
    RdmaUnavailable {
        /// Why not.
        why: String,
    },
    /// Neither RDMA nor TCP is possible.
    #[error(
        "no data transport possible: the destination offers no TCP data address and RDMA is out ({rdma})"
    )]
    NoTransport {
        /// Why RDMA was not possible.
        rdma: String,
    },
}

/// Which data path the operator asked for (`--transport`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Preference {
    /// RDMA when both hosts can, TCP otherwise.
    #[default]
    Auto,
    /// TCP, for the reason given (the operator's choice, or a migration RDMA cannot carry).
    Tcp {
        /// Why, in words for the report.
        why: String,
    },
    /// RDMA or nothing: negotiation fails if RDMA is out.
    Rdma,
}

/// Picks the transport: RDMA when both sides have an active port of the same link layer and
/// the RDMA data path, otherwise TCP (lz4-compressed when the destination can decode it);
/// streams are the smaller offer.
pub fn choose(source: &Capabilities, destination: &Capabilities) -> Result<Plan, NegotiateError> {
    choose_for(source, destination, false, &Preference::Auto)
}

/// [`choose`] for a migration whose data streams are `encrypted` or not, as the operator
/// `prefers`. RDMA streams cannot carry TLS, so an encrypted migration never takes RDMA, and
/// the reason says so.
pub fn choose_for(
    source: &Capabilities,
    destination: &Capabilities,
    encrypted: bool,
    prefers: &Preference,
) -> Result<Plan, NegotiateError> {
    let version =
        wire::negotiate_version(&source.protocol_versions, &destination.protocol_versions)
            .map_err(NegotiateError::Version)?;
    if source.page_size != destination.page_size {
        return Err(NegotiateError::PageSizeMismatch {
            source_size: source.page_size,
            destination_size: destination.page_size,
        });
    }
    if source.max_streams == 0 {
        return Err(NegotiateError::NoStreams { side: "source" });
    }
    if destination.max_streams == 0 {
        return Err(NegotiateError::NoStreams {
            side: "destination",
        });
    }
    let streams = source.max_streams.min(destination.max_streams);
    let streams_note = if source.max_streams == destination.max_streams {
        format!("{streams} stream{}", plural(streams))
    } else {
        format!(
            "{streams} stream{} (source offers {}, destination {})",
            plural(streams),
            source.max_streams,
            destination.max_streams
        )
    };
    let plan = |transport, reason| Plan {
        version,
        transport,
        streams,
        page_size: source.page_size,
        reason,
        encrypted,
    };

    let rdma_outcome = match prefers {
        Preference::Tcp { why } => Err(why.clone()),
        Preference::Auto | Preference::Rdma => rdma_pair(source, destination).and_then(|pair| {
            if encrypted {
                Err("RDMA streams cannot carry TLS, and this migration is encrypted".to_string())
            } else {
                Ok(pair)
            }
        }),
    };
    if let (Preference::Rdma, Err(why)) = (prefers, &rdma_outcome) {
        return Err(NegotiateError::RdmaUnavailable { why: why.clone() });
    }
    match rdma_outcome {
        Ok((transport, why)) => Ok(plan(transport, format!("RDMA over {streams_note}: {why}"))),
        Err(why_not) => {
            if destination.tcp_data_addrs.is_empty() {
                return Err(NegotiateError::NoTransport { rdma: why_not });
            }
            let lz4 = destination.compression.contains(&CompressionKind::Lz4);
            let (compression, label) = if lz4 {
                (Some(CompressionKind::Lz4), "lz4-compressed TCP".to_string())
            } else {
                (
                    None,
                    "uncompressed TCP (destination cannot decode lz4)".to_string(),
                )
            };
            let transport = Transport::Tcp {
                addrs: destination.tcp_data_addrs.clone(),
                compression,
            };
            Ok(plan(
                transport,
                format!("{label} over {streams_note}: {why_not}"),
            ))
        }
    }
}

fn plural(n: u16) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The RDMA pairing to use, or why there is none.
fn rdma_pair(
    source: &Capabilities,
    destination: &Capabilities,
) -> Result<(Transport, String), String> {
    match (
        source.rdma_devices.is_empty(),
        destination.rdma_devices.is_empty(),
    ) {
        (true, true) => return Err("no RDMA device on either host".into()),
        (true, false) => return Err("no RDMA device on source".into()),
        (false, true) => return Err("no RDMA device on destination".into()),
        (false, false) => {}
    }
    let active = |caps: &Capabilities| -> Vec<(String, u8, LinkLayer)> {
        caps.rdma_devices
            .iter()
            .flat_map(|dev| {
                dev.usable_ports()
                    .map(move |port| (dev.name.clone(), port.number, port.link_layer))
            })
            .collect()
    };
    let (source_ports, destination_ports) = (active(source), active(destination));
    match (source_ports.is_empty(), destination_ports.is_empty()) {
        (true, true) => return Err("no active RDMA port on either host".into()),
        (true, false) => return Err("RDMA device on source has no active port".into()),
        (false, true) => return Err("RDMA device on destination has no active port".into()),
        (false, false) => {}
    }
    let pair = source_ports.iter().find_map(|s| {
        destination_ports
            .iter()
            .find(|d| d.2 == s.2)
            .map(|d| (s.clone(), d.clone()))
    });
    let Some(((source_device, source_port, layer), (destination_device, destination_port, _))) =
        pair
    else {
        return Err(format!(
            "RDMA link layers differ (source {:?}, destination {:?})",
            source_ports[0].2, destination_ports[0].2
        ));
    };
    match (source.rdma_data_path, destination.rdma_data_path) {
        (false, false) => {
            return Err("both hosts have RDMA, but neither build has the RDMA data path".into());
        }
        (false, true) => {
            return Err("RDMA on both hosts, but the source build has no RDMA data path".into());
        }
        (true, false) => {
            return Err(
                "RDMA on both hosts, but the destination build has no RDMA data path".into(),
            );
        }
        (true, true) => {}
    }
    let why = format!(
        "{source_device} port {source_port} on source and {destination_device} port {destination_port} on destination are active ({layer:?})"
    );
    Ok((
        Transport::Rdma {
            source_device,
            source_port,
            destination_device,
            destination_port,
        },
        why,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::{PortState, RdmaPort};

    fn device(name: &str, state: PortState, link_layer: LinkLayer) -> RdmaDevice {
        RdmaDevice {
            name: name.into(),
            node_guid: 1,
            ports: vec![RdmaPort {
                number: 1,
                state,
                link_layer,
                active_mtu: 4096,
            }],
            problem: None,
        }
    }

    fn host(devices: Vec<RdmaDevice>, data_path: bool, streams: u16) -> Capabilities {
        let mut caps = Capabilities::without_rdma(vec!["127.0.0.1:7000".parse().unwrap()], streams);
        caps.rdma_devices = devices;
        caps.rdma_data_path = data_path;
        caps
    }

    fn active(name: &str) -> Vec<RdmaDevice> {
        vec![device(name, PortState::Active, LinkLayer::Ethernet)]
    }

    #[test]
    fn rdma_when_both_sides_can() {
        let plan = choose(
            &host(active("rxe0"), true, 4),
            &host(active("rxe1"), true, 4),
        )
        .unwrap();
        assert_eq!(
            plan.transport,
            Transport::Rdma {
                source_device: "rxe0".into(),
                source_port: 1,
                destination_device: "rxe1".into(),
                destination_port: 1
            }
        );
        assert_eq!(plan.streams, 4);
        assert_eq!(
            plan.reason,
            "RDMA over 4 streams: rxe0 port 1 on source and rxe1 port 1 on destination are active (Ethernet)"
        );
    }

    #[test]
    fn an_encrypted_migration_never_takes_rdma_and_says_why() {
        let (source, destination) = (host(active("rxe0"), true, 4), host(active("rxe1"), true, 4));
        let plan = choose_for(&source, &destination, true, &Preference::Auto).unwrap();
        assert!(matches!(plan.transport, Transport::Tcp { .. }));
        assert!(plan.encrypted);
        assert!(
            plan.reason.contains("RDMA streams cannot carry TLS"),
            "{}",
            plan.reason
        );
        // Where RDMA was out anyway, the reason stays the first shortfall.
        let plan = choose_for(
            &host(vec![], true, 4),
            &destination,
            true,
            &Preference::Auto,
        )
        .unwrap();
        assert!(
            plan.reason.contains("no RDMA device on source"),
            "{}",
            plan.reason
        );
    }

    #[test]
    fn the_operators_transport_preference_is_followed_or_refused() {
        let (source, destination) = (host(active("rxe0"), true, 2), host(active("rxe1"), true, 2));
        let tcp = Preference::Tcp {
            why: "TCP requested by the operator".into(),
        };
        let plan = choose_for(&source, &destination, false, &tcp).unwrap();
        assert!(matches!(plan.transport, Transport::Tcp { .. }));
        assert!(
            plan.reason.ends_with("TCP requested by the operator"),
            "{}",
            plan.reason
        );
        let plan = choose_for(&source, &destination, false, &Preference::Rdma).unwrap();
        assert!(matches!(plan.transport, Transport::Rdma { .. }));
        let err = choose_for(
            &host(vec![], true, 2),
            &destination,
            false,
            &Preference::Rdma,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "RDMA was requested and cannot be used: no RDMA device on source"
        );
        let err = choose_for(&source, &destination, true, &Preference::Rdma).unwrap_err();
        assert!(err.to_string().contains("cannot carry TLS"), "{err}");
    }

    #[test]
    fn tcp_with_reason_for_every_rdma_shortfall() {
        let down = || vec![device("mlx5_0", PortState::Down, LinkLayer::InfiniBand)];
        let ib = || vec![device("mlx5_0", PortState::Active, LinkLayer::InfiniBand)];
        let cases: Vec<(Capabilities, Capabilities, &str)> = vec![
            (
                host(vec![], true, 2),
                host(vec![], true, 2),
                "no RDMA device on either host",
            ),
            (
                host(vec![], true, 2),
                host(active("b"), true, 2),
                "no RDMA device on source",
            ),
            (
                host(active("a"), true, 2),
                host(vec![], true, 2),
                "no RDMA device on destination",
            ),
            (
                host(down(), true, 2),
                host(down(), true, 2),
                "no active RDMA port on either host",
            ),
            (
                host(down(), true, 2),
                host(active("b"), true, 2),
                "RDMA device on source has no active port",
            ),
            (
                host(active("a"), true, 2),
                host(down(), true, 2),
                "RDMA device on destination has no active port",
            ),
            (
                host(ib(), true, 2),
                host(active("b"), true, 2),
                "RDMA link layers differ (source InfiniBand, destination Ethernet)",
            ),
            (
                host(active("a"), false, 2),
                host(active("b"), false, 2),
                "both hosts have RDMA, but neither build has the RDMA data path",
            ),
            (
                host(active("a"), false, 2),
                host(active("b"), true, 2),
                "RDMA on both hosts, but the source build has no RDMA data path",
            ),
            (
                host(active("a"), true, 2),
                host(active("b"), false, 2),
                "RDMA on both hosts, but the destination build has no RDMA data path",
            ),
        ];
        for (source, destination, why) in cases {
            let plan = choose(&source, &destination).unwrap();
            assert_eq!(
                plan.transport,
                Transport::Tcp {
                    addrs: destination.tcp_data_addrs.clone(),
                    compression: Some(CompressionKind::Lz4)
                },
                "{why}"
            );
            assert_eq!(
                plan.reason,
                format!("lz4-compressed TCP over 2 streams: {why}")
            );
        }
    }

    #[test]
    fn streams_are_the_smaller_offer() {
        let plan = choose(&host(vec![], false, 8), &host(vec![], false, 3)).unwrap();
        assert_eq!(plan.streams, 3);
        assert_eq!(
            plan.reason,
            "lz4-compressed TCP over 3 streams (source offers 8, destination 3): no RDMA device on either host"
        );
        let plan = choose(&host(vec![], false, 1), &host(vec![], false, 5)).unwrap();
        assert_eq!(plan.streams, 1);
        assert!(
            plan.reason
                .starts_with("lz4-compressed TCP over 1 stream (source offers 1, destination 5)")
        );
    }

    #[test]
    fn no_lz4_on_destination_means_uncompressed_tcp() {
        let mut destination = host(vec![], false, 2);
        destination.compression.clear();
        let plan = choose(&host(vec![], false, 2), &destination).unwrap();
        assert!(matches!(
            plan.transport,
            Transport::Tcp {
                compression: None,
                ..
            }
        ));
        assert!(
            plan.reason
                .starts_with("uncompressed TCP (destination cannot decode lz4)")
        );
    }

    #[test]
    fn impossible_combinations_are_errors() {
        let mut old = host(vec![], false, 2);
        old.protocol_versions = vec![9];
        assert!(matches!(
            choose(&host(vec![], false, 2), &old),
            Err(NegotiateError::Version(_))
        ));

        let mut huge = host(vec![], false, 2);
        huge.page_size = 2 * 1024 * 1024;
        assert_eq!(
            choose(&host(vec![], false, 2), &huge),
            Err(NegotiateError::PageSizeMismatch {
                source_size: 4096,
                destination_size: 2 * 1024 * 1024
            })
        );
        assert_eq!(
            choose(&host(vec![], false, 0), &host(vec![], false, 2)),
            Err(NegotiateError::NoStreams { side: "source" })
        );
        assert_eq!(
            choose(&host(vec![], false, 2), &host(vec![], false, 0)),
            Err(NegotiateError::NoStreams {
                side: "destination"
            })
        );

        let mut unreachable = host(active("b"), false, 2);
        unreachable.tcp_data_addrs.clear();
        let err = choose(&host(active("a"), true, 2), &unreachable).unwrap_err();
        assert_eq!(
            err,
            NegotiateError::NoTransport {
                rdma: "RDMA on both hosts, but the destination build has no RDMA data path".into()
            }
        );
        // With RDMA possible, a missing TCP address does not matter.
        let mut rdma_only = host(active("b"), true, 2);
        rdma_only.tcp_data_addrs.clear();
        assert!(matches!(
            choose(&host(active("a"), true, 2), &rdma_only)
                .unwrap()
                .transport,
            Transport::Rdma { .. }
        ));
    }

    #[test]
    fn choice_is_deterministic_and_local_capabilities_pick_tcp_here() {
        let source = Capabilities::local(vec![], 2).expect("rdma discovery");
        let destination =
            Capabilities::local(vec!["127.0.0.1:1".parse().unwrap()], 4).expect("rdma discovery");
        let first = choose(&source, &destination).unwrap();
        assert_eq!(first, choose(&source, &destination).unwrap());
        // This build has no RDMA data path, so whatever the hardware, TCP is chosen.
        assert!(matches!(first.transport, Transport::Tcp { .. }));
        assert_eq!(first.to_string(), first.reason);
    }
}
