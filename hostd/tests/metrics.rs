//! What an operator watches: hostd's Prometheus metrics (`/metrics` parses as Prometheus
//! text, read by an independent parser, and its counters and gauges follow what the hosts
//! did) and a migration's live progress. Needs /dev/kvm and root.

use std::path::Path;
use std::time::Duration;

use ferry_runtime::content::{self, Content};
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

/// Round one's size is known from its start (the populated memory), and the live report
/// counts it down: sent of planned, what is left, the rate and the ETA. A bandwidth cap makes
/// the round last seconds on any machine.
#[test]
fn round_one_progress_is_known_from_its_start() {
    let cluster = TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        vec![HostSpec::new("alpha"), HostSpec::new("beta")],
    );
    let random = cluster.dir().join("random.bin");
    content::write_file(&random, Content::Random, 24 << 20, 7).expect("content file");
    let preload = format!("{}@64M", random.display());
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        "p1",
        "--host",
        "alpha",
        "--guest",
        "counter",
        "--memory",
        "128M",
        "--preload",
        &preload,
    ]);
    let (status, body) = cluster.api_post(
        "alpha",
        "/v1/vms/p1/migrate",
        r#"{"to": "beta", "max_bandwidth": "8M"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("migration id").to_string();
    let report = |c: &TestCluster| c.api_get("alpha", &format!("/v1/migrations/{id}")).1;
    let mut seen = serde_json::Value::Null;
    cluster.wait_for("round one under way", Duration::from_secs(30), |c| {
        seen = report(c);
        seen["stage"] == "pre_copy"
            && seen["round"] == 1
            && seen["round_sent_bytes"].as_u64() > Some(0)
            && seen["eta_ms"].as_f64().is_some()
    });
    let planned = seen["round_bytes"].as_u64().unwrap();
    let sent = seen["round_sent_bytes"].as_u64().unwrap();
    assert!(planned >= 24 << 20, "round one plans the preload: {seen:#}");
    assert!(sent < planned, "{seen:#}");
    assert_eq!(
        seen["remaining_bytes"].as_u64(),
        Some(planned - sent),
        "{seen:#}"
    );
    assert!(seen["rate_bytes_per_s"].as_f64() > Some(0.0), "{seen:#}");
    assert!(seen["eta_ms"].as_f64() > Some(0.0), "{seen:#}");
    // It counts down.
    cluster.wait_for("more of round one sent", Duration::from_secs(30), |c| {
        let now = report(c);
        now["round"] != 1 || now["round_sent_bytes"].as_u64() > Some(sent)
    });
    cluster.wait_for("the migration to end", Duration::from_secs(60), |c| {
        report(c)["status"] == "completed"
    });
}
