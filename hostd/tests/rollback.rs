//! Failures before the switch-over leave the VM running on the source, unchanged, and nothing
//! on the destination; a lost confirmation after it never runs the VM twice. Real hostd
//! processes; needs /dev/kvm and root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_runtime::content::{self, Content};
use ferry_tests::{HostSpec, TestCluster, assert_consecutive_from_one};

fn cluster(hosts: Vec<HostSpec>) -> TestCluster {
    TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        hosts,
    )
}

/// A counter VM on alpha; with `random_mib`, that much incompressible content is preloaded so
/// the first pre-copy round takes a while.
fn counter_vm(cluster: &TestCluster, name: &str, memory: &str, random_mib: u64) {
    let mut args: Vec<String> = [
        "vm",
        "create",
        name,
        "--host",
        "alpha",
        "--guest",
        "counter",
        "--memory",
        memory,
        "--ticks-per-sec",
        "50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if random_mib > 0 {
        let file: PathBuf = cluster.dir().join(format!("{name}-random.bin"));
        content::write_file(&file, Content::Random, random_mib << 20, 99).expect("content file");
        args.push("--preload".into());
        args.push(format!("{}@64M", file.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.ferryctl_ok(&args);
    cluster.wait_for("ticks", Duration::from_secs(10), |c| {
        c.ticks(name).len() >= 10
    });
}

/// The VM runs on alpha, ticking on without gap, and beta holds nothing.
fn assert_back_on_source(cluster: &TestCluster, name: &str, beta_alive: bool) {
    let vm = cluster.vm(name).expect("VM still exists");
    assert_eq!(vm["host"], "alpha", "{vm:#}");
    assert_eq!(vm["state"], "running", "{vm:#}");
    let before = cluster.ticks(name).len();
    cluster.wait_for("ticks after rollback", Duration::from_secs(10), |c| {
        c.ticks(name).len() >= before + 10
    });
    assert_consecutive_from_one(&cluster.ticks(name));
    if beta_alive {
        assert!(cluster.vms_on("beta").is_empty(), "a copy lingers on beta");
        assert_eq!(cluster.memory_used("beta"), 0, "beta still reserves memory");
    }
}

fn start_migration(cluster: &TestCluster, vm: &str, to: &str) -> String {
    let (status, body) = cluster.api_post(
        "alpha",
        &format!("/v1/vms/{vm}/migrate"),
        &format!("{{\"to\":\"{to}\"}}"),
    );
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("migration id").to_string()
}

fn migration(cluster: &TestCluster, id: &str) -> serde_json::Value {
    let (status, body) = cluster.api_get("alpha", &format!("/v1/migrations/{id}"));
    assert_eq!(status, 200, "{body}");
    body
}

fn wait_final(cluster: &TestCluster, id: &str) -> serde_json::Value {
    let mut report = serde_json::Value::Null;
    cluster.wait_for("migration to end", Duration::from_secs(60), |c| {
        report = migration(c, id);
        ["completed", "rolled_back", "cancelled", "refused"]
            .contains(&report["status"].as_str().unwrap_or(""))
    });
    report
}

#[test]
fn destination_killed_during_precopy_rolls_back() {
    let mut cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    counter_vm(&cluster, "k1", "1600M", 1400);
    let id = start_migration(&cluster, "k1", "beta");
    cluster.wait_for("pre-copy under way", Duration::from_secs(30), |c| {
        let r = migration(c, &id);
        r["stage"] == "pre_copy" && r["guest_bytes"].as_u64() > Some(64 << 20)
    });
    cluster.kill("beta");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert!(report["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_back_on_source(&cluster, "k1", false);
    assert!(!cluster.is_running("beta"));
}

#[test]
fn control_connection_dropped_during_stop_and_copy_rolls_back() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("drop-control-on-state"),
    ]);
    counter_vm(&cluster, "s1", "128M", 0);
    let result = cluster.ferryctl(&["migrate", "s1", "--to", "beta", "--json"]);
    assert_eq!(result.code, Some(1), "{result:?}");
    let report = result.json();
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert!(
        cluster.log("beta").contains("fault injection"),
        "the fault fired"
    );
    assert_back_on_source(&cluster, "s1", true);
}

#[test]
fn destination_without_enough_memory_refuses_at_verify() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").memory("64M"),
    ]);
    counter_vm(&cluster, "m1", "256M", 0);
    let result = cluster.ferryctl(&["migrate", "m1", "--to", "beta", "--json"]);
    let report = result.json();
    assert_eq!(report["status"], "refused", "{report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("memory") && error.contains("beta"),
        "{error}"
    );
    assert_eq!(report["guest_bytes"], 0, "nothing moved");
    assert_back_on_source(&cluster, "m1", true);
}

#[test]
fn destination_lacking_a_cpu_feature_refuses_at_verify() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").hide(&["sse2"]),
    ]);
    counter_vm(&cluster, "f1", "64M", 0);
    let result = cluster.ferryctl(&["migrate", "f1", "--to", "beta", "--json"]);
    let report = result.json();
    assert_eq!(report["status"], "refused", "{report:#}");
    assert!(
        report["error"].as_str().unwrap().contains("sse2"),
        "{report:#}"
    );
    assert_back_on_source(&cluster, "f1", true);
}

#[test]
fn cancel_during_precopy_rolls_back() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    counter_vm(&cluster, "x1", "1600M", 1400);
    let id = start_migration(&cluster, "x1", "beta");
    cluster.wait_for("pre-copy under way", Duration::from_secs(30), |c| {
        migration(c, &id)["stage"] == "pre_copy"
    });
    let cancelled = cluster.ferryctl(&["migrate-cancel", "x1"]);
    assert_eq!(cancelled.code, Some(0), "{cancelled:?}");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "cancelled", "{report:#}");
    assert_back_on_source(&cluster, "x1", true);
    // Nothing to cancel any more.
    let again = cluster.ferryctl(&["migrate-cancel", "x1"]);
    assert_eq!(again.code, Some(2));
    assert!(again.stderr.contains("no migration"), "{again:?}");
}

#[test]
fn lost_switch_over_confirmation_is_resolved_by_asking_never_by_guessing() {
    // beta runs the VM on commit but drops the connection instead of confirming: alpha must
    // not resume its copy; it asks beta, learns beta owns the VM, and completes.
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("drop-control-on-commit"),
    ]);
    counter_vm(&cluster, "q1", "64M", 0);
    let result = cluster.ferryctl(&["migrate", "q1", "--to", "beta", "--json"]);
    let report = result.json();
    assert_eq!(report["status"], "completed", "{report:#}");
    assert!(
        cluster.log("alpha").contains("asking the destination"),
        "alpha went through the in-doubt path"
    );
    assert!(
        cluster.vms_on("alpha").is_empty(),
        "the VM is not on alpha any more"
    );
    let vm = cluster.vm("q1").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["state"], "running");
    let before = cluster.ticks("q1").len();
    cluster.wait_for("ticks on beta", Duration::from_secs(10), |c| {
        c.ticks("q1").len() >= before + 10
    });
    assert_consecutive_from_one(&cluster.ticks("q1"));
}
