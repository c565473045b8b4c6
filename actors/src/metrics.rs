//! The host's Prometheus metrics (`GET /metrics`), with the Prometheus project's own client
//! crate: migrations by role and outcome, the bytes they moved, histograms of downtime and
//! total time, and, read off the host at each scrape, VMs by state, the guest memory they
//! hold, migrations in progress and maintenance mode.
//!
//! Counters count what this hostd process saw end (they start at zero when hostd starts, as
//! Prometheus expects of a restarted target); the journal keeps the history.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::lifecycle::Lifecycle;
use crate::migration::MigrationReport;

/// Which end of a migration this host was.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Role {
    /// The VM left this host (or was to).
    Source,
    /// The VM arrived here (or was to).
    Destination,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    role: &'static str,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

type Histograms = Family<RoleLabels, Histogram, fn() -> Histogram>;

fn downtime_histogram() -> Histogram {
    // 1 ms .. about 8 s
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

fn total_histogram() -> Histogram {
    // 100 ms .. about 7 min
    Histogram::new(exponential_buckets(0.1, 2.0, 13))
}

/// What the host is at the moment of a scrape.
#[derive(Clone, Debug, Default)]
pub struct HostGauges {
    /// Every VM's state (VMs being built count as created).
    pub vm_states: Vec<Lifecycle>,
    /// Guest memory of the VMs on this host, bytes.
    pub memory_bytes: u64,
    /// Migrations in flight leaving this host.
    pub outgoing: usize,
    /// Migrations in flight arriving here.
    pub incoming: usize,
    /// Whether the host is in maintenance mode.
    pub maintenance: bool,
}

/// The host's metrics registry.
#[derive(Debug)]
pub struct HostMetrics {
    registry: Registry,
    migrations: Family<OutcomeLabels, Counter>,
    guest_bytes: Family<RoleLabels, Counter>,
    wire_bytes: Family<RoleLabels, Counter>,
    downtime: Histograms,
    total: Histograms,
    vms: Family<StateLabels, Gauge>,
    memory: Gauge,
    in_progress: Family<RoleLabels, Gauge>,
    maintenance: Gauge,
}

impl Default for HostMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HostMetrics {
    /// An empty registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let migrations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "migrations",
            "Migrations that ended, by this host's role and the outcome",
            migrations.clone(),
        );
        let guest_bytes = Family::<RoleLabels, Counter>::default();
        registry.register(
            "migration_guest_bytes",
            "Guest memory and disk bytes moved by migrations that ended (before compression)",
            guest_bytes.clone(),
        );
        let wire_bytes = Family::<RoleLabels, Counter>::default();
        registry.register(
            "migration_wire_bytes",
            "Bytes on the data streams for migrations that ended",
            wire_bytes.clone(),
        );
        let downtime: Histograms = Family::new_with_constructor(downtime_histogram);
        registry.register(
            "migration_downtime_seconds",
            "How long the guest was stopped, per migration that ended (seconds)",
            downtime.clone(),
        );
        let total: Histograms = Family::new_with_constructor(total_histogram);
        registry.register(
            "migration_duration_seconds",
            "Total time of each migration that ended (seconds)",
            total.clone(),
        );
        let vms = Family::<StateLabels, Gauge>::default();
        registry.register("vms", "VMs on this host by state", vms.clone());
        let memory = Gauge::default();
        registry.register(
            "vm_memory_bytes",
            "Guest memory of the VMs on this host (bytes)",
            memory.clone(),
        );
        let in_progress = Family::<RoleLabels, Gauge>::default();
        registry.register(
            "migrations_in_progress",
            "Migrations in flight, by this host's role",
            in_progress.clone(),
        );
        let maintenance = Gauge::default();
        registry.register(
            "host_maintenance",
            "1 while the host is in maintenance mode",
            maintenance.clone(),
        );
        Self {
            registry,
            migrations,
            guest_bytes,
            wire_bytes,
            downtime,
            total,
            vms,
            memory,
            in_progress,
            maintenance,
        }
    }

    /// Counts a migration that has just ended (call once per migration and role).
    pub fn migration_ended(&self, role: Role, report: &MigrationReport) {
        self.migrations
            .get_or_create(&OutcomeLabels {
                role: role.label(),
                outcome: report.status.clone(),
            })
            .inc();
        let labels = RoleLabels { role: role.label() };
        self.guest_bytes
            .get_or_create(&labels)
            .inc_by(report.guest_bytes);
        self.wire_bytes
            .get_or_create(&labels)
            .inc_by(report.wire_bytes);
        if let Some(ms) = report.downtime_ms {
            self.downtime.get_or_create(&labels).observe(ms / 1000.0);
        }
        self.total
            .get_or_create(&labels)
            .observe(report.total_ms / 1000.0);
    }

    /// The registry in the OpenMetrics text format, with the gauges set from `now`.
    pub fn render(&self, now: &HostGauges) -> String {
        for state in Lifecycle::ALL {
            let n = now.vm_states.iter().filter(|s| **s == state).count();
            self.vms
                .get_or_create(&StateLabels {
                    state: state.label(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.memory
            .set(i64::try_from(now.memory_bytes).unwrap_or(i64::MAX));
        for (role, n) in [
            (Role::Source, now.outgoing),
            (Role::Destination, now.incoming),
        ] {
            self.in_progress
                .get_or_create(&RoleLabels { role: role.label() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.maintenance.set(i64::from(now.maintenance));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The content type of [`HostMetrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, line_start: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no sample {line_start} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn an_ended_migration_moves_the_counters_and_histograms() {
        let metrics = HostMetrics::new();
        let before = metrics.render(&HostGauges::default());
        assert!(!before.contains("ferry_migrations_total"), "{before}");
        assert!(
            before.contains("ferry_vms{state=\"running\"} 0"),
            "{before}"
        );
        let report = MigrationReport {
            status: "completed".into(),
            guest_bytes: 1 << 20,
            wire_bytes: 4096,
            downtime_ms: Some(3.0),
            total_ms: 1500.0,
            ..MigrationReport::default()
        };
        metrics.migration_ended(Role::Source, &report);
        metrics.migration_ended(Role::Source, &report);
        let gauges = HostGauges {
            vm_states: vec![Lifecycle::Running, Lifecycle::Running, Lifecycle::Paused],
            memory_bytes: 3 << 30,
            outgoing: 1,
            incoming: 0,
            maintenance: true,
        };
        let text = metrics.render(&gauges);
        let at = |s: &str| sample(&text, s);
        assert_eq!(
            at("ferry_migrations_total{role=\"source\",outcome=\"completed\"} "),
            2.0
        );
        assert_eq!(
            at("ferry_migration_guest_bytes_total{role=\"source\"} "),
            2.0 * f64::from(1u32 << 20)
        );
        assert_eq!(
            at("ferry_migration_downtime_seconds_count{role=\"source\"} "),
            2.0
        );
        assert_eq!(
            at("ferry_migration_downtime_seconds_bucket{le=\"0.004\",role=\"source\"} "),
            2.0
        );
        assert_eq!(
            at("ferry_migration_downtime_seconds_bucket{le=\"0.002\",role=\"source\"} "),
            0.0
        );
        assert_eq!(at("ferry_vms{state=\"running\"} "), 2.0);
        assert_eq!(at("ferry_vms{state=\"crashed\"} "), 0.0);
        assert_eq!(at("ferry_vm_memory_bytes "), 3.0 * f64::from(1u32 << 30));
        assert_eq!(at("ferry_migrations_in_progress{role=\"source\"} "), 1.0);
        assert_eq!(at("ferry_host_maintenance "), 1.0);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
