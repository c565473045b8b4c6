//! hostd's Prometheus metrics: `/metrics` parses as Prometheus text (read by an independent
//! parser) and its counters and gauges follow what the hosts did. Needs /dev/kvm and root.

use std::path::Path;

use ferry_tests::{HostSpec, TestCluster};
use prometheus_parse::{Sample, Scrape, Value};

fn scrape(cluster: &TestCluster, host: &str) -> Scrape {
    let (status, text) = cluster.api_text(host, "/metrics");
    assert_eq!(status, 200, "{text}");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

/// The value of a counter or gauge sample (0 when the series does not exist yet).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a counter or gauge: {other:?}"),
        })
        .sum()
}

/// How many observations a histogram holds (its +Inf bucket).
fn observations(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let histogram = scrape
        .samples
        .iter()
        .find(|s| matches(s, name, labels))
        .unwrap_or_else(|| panic!("no histogram {name} {labels:?}"));
    match &histogram.value {
        Value::Histogram(buckets) => buckets
            .iter()
            .find(|b| b.less_than == f64::INFINITY)
            .map_or(0.0, |b| b.count),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[test]
fn metrics_parse_as_prometheus_text_and_follow_migrations() {
    let cluster = TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        vec![HostSpec::new("alpha"), HostSpec::new("beta")],
    );
    cluster.ferryctl_ok(&[
        "vm", "create", "m1", "--host", "alpha", "--guest", "counter", "--memory", "64M",
    ]);
    let completed = [("role", "source"), ("outcome", "completed")];
    let before = scrape(&cluster, "alpha");
    assert_eq!(value(&before, "ferry_migrations_total", &completed), 0.0);
    assert_eq!(value(&before, "ferry_vms", &[("state", "running")]), 1.0);
    assert_eq!(
        value(&before, "ferry_vm_memory_bytes", &[]),
        64.0 * 1048576.0
    );
    assert_eq!(value(&before, "ferry_host_maintenance", &[]), 0.0);

    cluster.ferryctl_ok(&["migrate", "m1", "--to", "beta", "--json"]);
    let alpha = scrape(&cluster, "alpha");
    assert_eq!(
        value(&alpha, "ferry_migrations_total", &completed),
        1.0,
        "{}",
        cluster.api_text("alpha", "/metrics").1
    );
    let source = [("role", "source")];
    assert!(value(&alpha, "ferry_migration_guest_bytes_total", &source) > 0.0);
    assert!(value(&alpha, "ferry_migration_wire_bytes_total", &source) > 0.0);
    assert_eq!(
        observations(&alpha, "ferry_migration_downtime_seconds", &source),
        1.0,
        "{}",
        cluster.api_text("alpha", "/metrics").1
    );
    assert_eq!(
        observations(&alpha, "ferry_migration_duration_seconds", &source),
        1.0
    );
    assert_eq!(value(&alpha, "ferry_vms", &[("state", "running")]), 0.0);
    assert_eq!(value(&alpha, "ferry_vm_memory_bytes", &[]), 0.0);
    assert_eq!(value(&alpha, "ferry_migrations_in_progress", &source), 0.0);
    let beta = scrape(&cluster, "beta");
    assert_eq!(
        value(
            &beta,
            "ferry_migrations_total",
            &[("role", "destination"), ("outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(value(&beta, "ferry_vms", &[("state", "running")]), 1.0);
    assert_eq!(value(&beta, "ferry_vm_memory_bytes", &[]), 64.0 * 1048576.0);

    // A refused migration counts under its own outcome.
    let refused = cluster.ferryctl(&["migrate", "m1", "--to", "alpha", "--transport", "rdma"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    let beta = scrape(&cluster, "beta");
    assert_eq!(
        value(
            &beta,
            "ferry_migrations_total",
            &[("role", "source"), ("outcome", "refused")]
        ),
        1.0
    );
    cluster.ferryctl_ok(&["host", "maintenance", "enter", "alpha", "--no-evacuate"]);
    assert_eq!(
        value(&scrape(&cluster, "alpha"), "ferry_host_maintenance", &[]),
        1.0
    );
}
