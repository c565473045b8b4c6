//! Maintenance mode and evacuation across real hostd processes, each in a network namespace
//! of its own (three on one switch, or two on a veth pair). Needs /dev/kvm and root.

use std::path::Path;
use std::time::Duration;

use ferry_runtime::content::{self, Content};
use ferry_tests::{HostSpec, TestCluster, assert_consecutive_from_one};

fn cluster(hosts: Vec<HostSpec>) -> TestCluster {
    TestCluster::in_namespaces(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        hosts,
    )
}

fn create(cluster: &TestCluster, name: &str, guest: &str, extra: &[&str]) {
    let mut args = vec![
        "vm", "create", name, "--host", "alpha", "--guest", guest, "--memory", "64M",
    ];
    args.extend_from_slice(extra);
    cluster.ferryctl_ok(&args);
}

fn progress(cluster: &TestCluster, vm: &str) -> u64 {
    cluster
        .vm(vm)
        .and_then(|v| v["guest_progress"].as_u64())
        .unwrap_or(0)
}

fn maintenance_of(cluster: &TestCluster, host: &str) -> serde_json::Value {
    cluster.ferryctl_ok(&["host", "show", host]).json()["maintenance"].clone()
}

/// Six VMs of three kinds leave alpha for beta and gamma, spread by free memory, whole;
/// alpha then refuses new VMs (also after its hostd restarts) until maintenance ends.
#[test]
fn maintenance_evacuates_every_vm_and_refuses_new_ones_until_it_ends() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta"),
        HostSpec::new("gamma"),
    ]);
    for name in ["c1", "c2"] {
        create(&cluster, name, "counter", &["--ticks-per-sec", "20"]);
    }
    for name in ["v1", "v2"] {
        create(&cluster, name, "verify", &[]);
    }
    for name in ["d1", "d2"] {
        create(
            &cluster,
            name,
            "dirty",
            &["--working-set", "4M", "--rate", "2000"],
        );
    }
    cluster.wait_for("guests at work", Duration::from_secs(60), |c| {
        c.ticks("c1").len() >= 3
            && c.ticks("c2").len() >= 3
            && progress(c, "v1") >= 1
            && progress(c, "v2") >= 1
    });

    let result = cluster.ferryctl(&["host", "maintenance", "enter", "alpha", "--json"]);
    let report = result.json();
    assert_eq!(result.code, Some(0), "{report:#}");
    assert_eq!(report["total"], 6, "{report:#}");
    assert_eq!(report["moved"], 6, "{report:#}");
    assert_eq!(report["stayed"], 0, "{report:#}");
    let mut on = std::collections::BTreeMap::<String, usize>::new();
    for vm in report["vms"].as_array().unwrap() {
        assert_eq!(vm["outcome"], "moved", "{vm:#}");
        assert_eq!(vm["move"], "compute_only", "{vm:#}");
        assert!(vm["total_ms"].as_f64().unwrap() > 0.0, "{vm:#}");
        *on.entry(vm["to"].as_str().unwrap().into()).or_default() += 1;
    }
    // Six equal VMs on two empty hosts: the most-free-memory rule alternates.
    assert_eq!(on.get("beta"), Some(&3), "{report:#}");
    assert_eq!(on.get("gamma"), Some(&3), "{report:#}");
    assert!(cluster.vms_on("alpha").is_empty());
    assert!(maintenance_of(&cluster, "alpha").is_object());

    // The guests carry on, whole: ticks consecutive, verify finds no bad page.
    let arrived = [progress(&cluster, "v1"), progress(&cluster, "v2")];
    cluster.wait_for("guests after evacuation", Duration::from_secs(60), |c| {
        progress(c, "v1") >= arrived[0] + 2 && progress(c, "v2") >= arrived[1] + 2
    });
    for name in ["c1", "c2"] {
        assert_consecutive_from_one(&cluster.ticks(name));
    }
    for name in ["v1", "v2", "d1", "d2"] {
        let vm = cluster.vm(name).unwrap();
        assert_eq!(vm["guest_failures"], 0, "{vm:#}");
        assert_ne!(vm["host"], "alpha", "{vm:#}");
    }

    // No new VM on alpha, with the reason, and the mode survives a hostd restart.
    let refused = |cluster: &TestCluster| {
        let result = cluster.ferryctl(&[
            "vm", "create", "late", "--host", "alpha", "--guest", "counter", "--memory", "32M",
        ]);
        assert_ne!(result.code, Some(0), "{result:?}");
        assert!(
            result.stderr.contains("maintenance mode"),
            "{}",
            result.stderr
        );
    };
    refused(&cluster);
    // Nor an incoming migration.
    let result = cluster.ferryctl(&["migrate", "c1", "--to", "alpha", "--json"]);
    assert_eq!(result.code, Some(1), "{result:?}");
    let back = result.json();
    assert!(
        back["error"]
            .as_str()
            .is_some_and(|e| e.contains("maintenance mode")),
        "{back:#}"
    );
    cluster.kill("alpha");
    cluster.restart("alpha");
    assert!(maintenance_of(&cluster, "alpha").is_object());
    refused(&cluster);
    let listed = cluster.ferryctl_ok(&["host", "list"]).stdout;
    assert!(listed.contains("in maintenance"), "{listed}");
    let hosts = cluster.ferryctl_ok(&["host", "list", "--json"]).json();
    let alpha = hosts
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "alpha"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&alpha["up"], &alpha["maintenance"], &alpha["vms"]),
        (&true.into(), &true.into(), &0.into()),
        "{hosts:#}"
    );

    cluster.ferryctl_ok(&["host", "maintenance", "exit", "alpha"]);
    assert!(maintenance_of(&cluster, "alpha").is_null());
    cluster.ferryctl_ok(&[
        "vm", "create", "late", "--host", "alpha", "--guest", "counter", "--memory", "32M",
    ]);
    // `--no-evacuate` only sets the mode.
    let result = cluster.ferryctl(&["host", "maintenance", "enter", "alpha", "--no-evacuate"]);
    assert_eq!(result.code, Some(0), "{result:?}");
    assert_eq!(cluster.vms_on("alpha"), ["late"]);
    assert!(maintenance_of(&cluster, "alpha").is_object());
}

/// A VM that needs a CPU feature no other host offers stays on alpha, running, with the
/// reason; the others move; ferryctl exits 1.
#[test]
fn an_evacuation_leaves_an_unplaceable_vm_running_and_names_why() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").hide(&["sse2"]),
        HostSpec::new("gamma").hide(&["sse2"]),
    ]);
    // Created with the other hosts' baseline (per-VM mask): movable.
    for name in ["c1", "c2"] {
        create(
            &cluster,
            name,
            "counter",
            &["--ticks-per-sec", "20", "--hide-cpu-feature", "sse2"],
        );
    }
    // Created with all of alpha's features: no other host can take it.
    create(&cluster, "pinned", "counter", &["--ticks-per-sec", "20"]);
    cluster.wait_for("ticks", Duration::from_secs(60), |c| {
        ["c1", "c2", "pinned"]
            .iter()
            .all(|vm| c.ticks(vm).len() >= 3)
    });

    let result = cluster.ferryctl(&["host", "maintenance", "enter", "alpha", "--json"]);
    let report = result.json();
    assert_eq!(result.code, Some(1), "{report:#}");
    assert_eq!(report["moved"], 2, "{report:#}");
    assert_eq!(report["stayed"], 1, "{report:#}");
    let pinned = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pinned")
        .unwrap()
        .clone();
    assert_eq!(pinned["outcome"], "stayed", "{pinned:#}");
    let reason = pinned["reason"].as_str().unwrap();
    for part in ["beta", "gamma", "sse2"] {
        assert!(reason.contains(part), "reason lacks {part}: {reason}");
    }
    assert_eq!(cluster.vms_on("alpha"), ["pinned"]);
    let vm = cluster.vm("pinned").unwrap();
    assert_eq!(vm["state"], "running", "{vm:#}");
    let before = cluster.ticks("pinned").len();
    cluster.wait_for("pinned keeps ticking", Duration::from_secs(30), |c| {
        c.ticks("pinned").len() > before
    });
    for name in ["c1", "c2", "pinned"] {
        assert_consecutive_from_one(&cluster.ticks(name));
    }
}

/// A destination that runs one migration at a time takes an evacuation's VMs one by one
/// (its own arriving migration does not count against its limit).
#[test]
fn a_destination_limited_to_one_migration_takes_the_vms_one_by_one() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").max_concurrent(1),
    ]);
    for name in ["c1", "c2", "c3"] {
        create(&cluster, name, "counter", &["--ticks-per-sec", "20"]);
    }
    cluster.wait_for("ticks", Duration::from_secs(60), |c| {
        ["c1", "c2", "c3"].iter().all(|vm| c.ticks(vm).len() >= 3)
    });
    let result = cluster.ferryctl(&["host", "maintenance", "enter", "alpha", "--json"]);
    let report = result.json();
    assert_eq!(result.code, Some(0), "{report:#}");
    assert_eq!(report["moved"], 3, "{report:#}");
    assert_eq!(cluster.vms_on("beta").len(), 3);
    for name in ["c1", "c2", "c3"] {
        assert_consecutive_from_one(&cluster.ticks(name));
    }
}

/// `--total-bandwidth` is one cap for the whole evacuation: two migrations that run at the
/// same time share it, so together they stay under it (two caps of that size, one each,
/// would put twice as much on the wire). A cap below the smallest is refused before the
/// host enters maintenance.
#[test]
fn an_evacuations_migrations_share_its_total_bandwidth() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let content_bytes: u64 = 16 << 20;
    for (seed, name) in [(1, "p1"), (2, "p2")] {
        let random = cluster.dir().join(format!("{name}.bin"));
        content::write_file(&random, Content::Random, content_bytes, seed).expect("content");
        let preload = format!("{}@32M", random.display());
        create(&cluster, name, "counter", &["--preload", &preload]);
    }
    cluster.wait_for("ticks", Duration::from_secs(60), |c| {
        ["p1", "p2"].iter().all(|vm| c.ticks(vm).len() >= 2)
    });

    let refused = cluster.ferryctl(&[
        "host",
        "maintenance",
        "enter",
        "alpha",
        "--total-bandwidth",
        "10",
    ]);
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains("total_bandwidth") && refused.stderr.contains("smallest cap"),
        "{}",
        refused.stderr
    );
    assert!(maintenance_of(&cluster, "alpha").is_null());

    let cap = 8_000_000.0;
    let result = cluster.ferryctl(&[
        "host",
        "maintenance",
        "enter",
        "alpha",
        "--total-bandwidth",
        "8M",
        "--json",
    ]);
    let report = result.json();
    assert_eq!(result.code, Some(0), "{report:#}");
    assert_eq!(report["moved"], 2, "{report:#}");
    assert_eq!(report["total_bandwidth"], 8_000_000, "{report:#}");
    let vms = report["vms"].as_array().expect("vms");
    let wire: f64 = vms.iter().map(|v| v["wire_bytes"].as_f64().unwrap()).sum();
    let migrating_ms: f64 = vms.iter().map(|v| v["total_ms"].as_f64().unwrap()).sum();
    let elapsed = report["elapsed_ms"].as_f64().unwrap() / 1e3;
    assert!(
        wire >= 2.0 * content_bytes as f64,
        "both preloads crossed: {report:#}"
    );
    // They ran at the same time (one after the other, the sum of their times would fit in
    // the evacuation's).
    assert!(
        elapsed * 1e3 < migrating_ms,
        "the two migrations overlapped: {report:#}"
    );
    // Together, under the one cap (plus the pacer's 20 ms burst).
    assert!(
        wire <= cap * (elapsed + 0.02) + (1 << 20) as f64,
        "{wire} bytes in {elapsed:.2} s is over the shared {cap} B/s: {report:#}"
    );
    for name in ["p1", "p2"] {
        assert_consecutive_from_one(&cluster.ticks(name));
    }
}

/// A hostd killed in the middle of an evacuation carries it on when it starts again: the
/// VMs it had not moved leave after the restart, the one in flight is settled first, and
/// every VM ends on beta, once, with its ticks consecutive.
#[test]
fn an_evacuation_carries_on_after_its_hostd_restarts() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").max_concurrent(1),
    ]);
    let names = ["r1", "r2", "r3"];
    for (seed, name) in names.iter().enumerate() {
        let random = cluster.dir().join(format!("{name}.bin"));
        content::write_file(&random, Content::Random, 16 << 20, seed as u64).expect("content");
        let preload = format!("{}@32M", random.display());
        create(&cluster, name, "counter", &["--preload", &preload]);
    }
    cluster.wait_for("ticks", Duration::from_secs(60), |c| {
        names.iter().all(|vm| c.ticks(vm).len() >= 2)
    });
    // 16 MiB at 8 MB/s: every migration lasts seconds, whatever the machine.
    let mut follower = cluster.ferryctl_spawn(&[
        "host",
        "maintenance",
        "enter",
        "alpha",
        "--max-bandwidth",
        "8M",
    ]);
    cluster.wait_for("the first VM on beta", Duration::from_secs(60), |c| {
        !c.vms_on("beta").is_empty()
    });
    cluster.kill("alpha");
    let _ = follower.kill();
    let _ = follower.wait();
    cluster.restart("alpha");
    cluster.wait_for("every VM on beta", Duration::from_secs(180), |c| {
        c.vms_on("alpha").is_empty() && c.vms_on("beta").len() == names.len()
    });
    assert!(
        cluster
            .log("alpha")
            .contains("resuming the evacuation that the last hostd left unfinished"),
        "{}",
        cluster.log("alpha")
    );
    assert!(!maintenance_of(&cluster, "alpha").is_null());
    let status = cluster.ferryctl_ok(&["host", "show", "alpha"]).json();
    assert_eq!(
        status["vms"].as_array().map(Vec::len),
        Some(0),
        "{status:#}"
    );
    for name in names {
        assert_consecutive_from_one(&cluster.ticks(name));
    }
    // Finished (the host actor forgets it in the journal as it records it finished), the
    // evacuation is gone: another restart resumes nothing.
    cluster.wait_for(
        "the resumed evacuation to finish",
        Duration::from_secs(30),
        |c| c.ferryctl_ok(&["host", "show", "alpha"]).json()["evacuation"]["state"] == "finished",
    );
    cluster.kill("alpha");
    cluster.restart("alpha");
    let log = cluster.log("alpha");
    assert_eq!(log.matches("resuming the evacuation").count(), 1, "{log}");
}
