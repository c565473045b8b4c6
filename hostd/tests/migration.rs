//! Live migration between real hostd processes, driven by ferryctl. Needs /dev/kvm and root.

use std::path::Path;
use std::time::Duration;

use ferry_tests::{Capture, HostSpec, TestCluster, assert_consecutive_from_one};

fn cluster(hosts: Vec<HostSpec>) -> TestCluster {
    TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        hosts,
    )
}

fn migrate(cluster: &TestCluster, vm: &str, to: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", vm, "--to", to, "--json"];
    args.extend_from_slice(extra);
    let result = cluster.ferryctl(&args);
    let report = result.json();
    assert_eq!(
        report["status"], "completed",
        "migration failed: {report:#}"
    );
    assert_eq!(result.code, Some(0));
    report
}

/// A migration that must not complete: ferryctl exits 1; its report.
fn migrate_fails(cluster: &TestCluster, vm: &str, to: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", vm, "--to", to, "--json"];
    args.extend_from_slice(extra);
    let result = cluster.ferryctl(&args);
    assert_eq!(result.code, Some(1), "{result:?}");
    result.json()
}

#[test]
fn counter_migrates_there_and_back_without_gap_or_repeat() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let created = cluster
        .ferryctl_ok(&[
            "vm",
            "create",
            "c1",
            "--host",
            "alpha",
            "--guest",
            "counter",
            "--memory",
            "128M",
            "--ticks-per-sec",
            "50",
            "--json",
        ])
        .json();
    cluster.wait_for("ticks", Duration::from_secs(10), |c| {
        c.ticks("c1").len() >= 20
    });
    // An operator following the console keeps following across both migrations.
    let mut follower = cluster.ferryctl_spawn(&["vm", "console", "c1"]);

    let there = migrate(&cluster, "c1", "beta", &[]);
    for key in [
        "source",
        "destination",
        "transport",
        "transport_reason",
        "streams",
        "total_ms",
        "downtime_ms",
        "rounds",
        "guest_bytes",
        "wire_bytes",
        "zero_pages",
        "throttle_pct",
        "error",
    ] {
        assert!(there.get(key).is_some(), "report lacks {key}: {there:#}");
    }
    assert_eq!(there["source"], "alpha");
    assert_eq!(there["destination"], "beta");
    assert_eq!(there["transport"], "tcp+lz4");
    assert!(
        there["transport_reason"]
            .as_str()
            .unwrap()
            .contains("no RDMA device")
    );
    // The pause is real and no longer than the migration; it covers at least the time the
    // last pages and the state took to go out.
    let downtime = there["downtime_ms"].as_f64().unwrap();
    assert!(
        downtime > 0.0 && downtime <= there["total_ms"].as_f64().unwrap(),
        "{there:#}"
    );
    assert!(
        downtime >= there["source_downtime_ms"].as_f64().unwrap(),
        "{there:#}"
    );
    assert_eq!(
        cluster.vms_on("alpha"),
        Vec::<String>::new(),
        "source released the VM"
    );
    assert_eq!(cluster.vms_on("beta"), vec!["c1".to_string()]);
    let before = cluster.ticks("c1").len();
    cluster.wait_for("ticks on beta", Duration::from_secs(10), |c| {
        c.ticks("c1").len() >= before + 20
    });

    migrate(&cluster, "c1", "alpha", &[]);
    let before = cluster.ticks("c1").len();
    cluster.wait_for("ticks back on alpha", Duration::from_secs(10), |c| {
        c.ticks("c1").len() >= before + 20
    });

    let ticks = cluster.ticks("c1");
    assert_consecutive_from_one(&ticks);
    follower.kill().unwrap();
    let output = follower.wait_with_output().unwrap();
    let followed = String::from_utf8_lossy(&output.stdout);
    // The follower was killed mid-stream: its last line may be cut.
    let complete = &followed[..followed.rfind('\n').map_or(0, |i| i + 1)];
    let followed: Vec<u64> = complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect();
    assert_consecutive_from_one(&followed);
    assert!(
        followed.len() >= ticks.len() - 5,
        "the follower kept up across migrations: {} of {}",
        followed.len(),
        ticks.len()
    );
    let now = cluster.vm("c1").expect("VM exists");
    assert_eq!(now["host"], "alpha");
    assert_eq!(now["state"], "running");
    for key in ["name", "uuid", "mac"] {
        assert_eq!(now[key], created[key], "identity field {key} changed");
    }
}

#[test]
fn verify_guest_sees_no_mismatch_and_memory_hashes_match() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    cluster.ferryctl_ok(&[
        "vm", "create", "v1", "--host", "alpha", "--guest", "verify", "--memory", "256M",
    ]);
    cluster.wait_for("verify passes", Duration::from_secs(20), |c| {
        c.vm("v1")
            .is_some_and(|v| v["guest_progress"].as_u64() >= Some(2))
    });
    let report = migrate(&cluster, "v1", "beta", &["--verify"]);
    assert_eq!(report["memory_verified"], true, "{report:#}");
    let arrived = cluster.vm("v1").unwrap()["guest_progress"]
        .as_u64()
        .unwrap();
    cluster.wait_for(
        "verify passes after migration",
        Duration::from_secs(20),
        |c| {
            c.vm("v1")
                .is_some_and(|v| v["guest_progress"].as_u64() >= Some(arrived + 3))
        },
    );
    let vm = cluster.vm("v1").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(
        vm["guest_failures"], 0,
        "the guest found a lost or stale page: {vm:#}"
    );
    // And back, into a new VMM process on alpha.
    let report = migrate(&cluster, "v1", "alpha", &["--verify"]);
    assert_eq!(report["memory_verified"], true, "{report:#}");
    let arrived = cluster.vm("v1").unwrap()["guest_progress"]
        .as_u64()
        .unwrap();
    cluster.wait_for(
        "verify passes back on alpha",
        Duration::from_secs(20),
        |c| {
            c.vm("v1")
                .is_some_and(|v| v["guest_progress"].as_u64() >= Some(arrived + 3))
        },
    );
    let vm = cluster.vm("v1").unwrap();
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["guest_failures"], 0, "{vm:#}");
}

/// The worst moment for page selection: the migration starts while the `verify` guest is
/// still writing its memory for the first time. Whatever the delay, nothing is lost: the
/// guest's own checks find no bad page on the destination, and with `--verify` the memory
/// hashes of both sides agree before the switch.
#[test]
fn verify_guest_migrated_while_filling_its_memory_arrives_whole() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    for (i, delay_ms) in [0u64, 50, 100, 200, 400].into_iter().enumerate() {
        let name = format!("fill{delay_ms}");
        cluster.ferryctl_ok(&[
            "vm", "create", &name, "--host", "alpha", "--guest", "verify", "--memory", "1G",
        ]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let check_hashes = i % 2 == 0;
        let extra: &[&str] = if check_hashes { &["--verify"] } else { &[] };
        let report = migrate(&cluster, &name, "beta", extra);
        if check_hashes {
            assert_eq!(report["memory_verified"], true, "{report:#}");
        }
        let arrived = cluster.vm(&name).unwrap()["guest_progress"]
            .as_u64()
            .unwrap();
        cluster.wait_for("verify passes on beta", Duration::from_secs(60), |c| {
            c.vm(&name)
                .is_some_and(|v| v["guest_progress"].as_u64() >= Some(arrived + 2))
        });
        let vm = cluster.vm(&name).unwrap();
        assert_eq!(vm["host"], "beta");
        assert_eq!(
            vm["guest_failures"], 0,
            "started {delay_ms} ms after create: the guest found lost or stale pages: {vm:#}"
        );
        cluster.ferryctl_ok(&["vm", "stop", &name]);
    }
}

/// A bandwidth cap far below what the guest dirties makes throttling certain on any
/// machine: the cap bounds how fast a round can go (a slow machine only makes rounds
/// slower), and the guest re-dirties its whole working set within a round however slowly
/// it runs. The cap holds over every round, and the memory arrives intact.
#[test]
fn a_bandwidth_cap_below_the_dirty_rate_makes_throttling_certain() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        "d1",
        "--host",
        "alpha",
        "--guest",
        "dirty",
        "--memory",
        "64M",
        "--working-set",
        "4M",
        "--rate",
        "10000",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let cap = 4_000_000.0; // 4 MB/s: a 4 MiB working set takes about a second a round
    let report = migrate(
        &cluster,
        "d1",
        "beta",
        &["--max-bandwidth", "4M", "--max-rounds", "4", "--verify"],
    );
    assert_eq!(report["max_bandwidth"], 4_000_000, "{report:#}");
    assert_eq!(report["memory_verified"], true, "{report:#}");
    let throttle = report["throttle_pct"].as_u64().unwrap();
    assert!(
        throttle >= 20,
        "expected the guest to be throttled: {report:#}"
    );
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        4,
        "the round limit ended pre-copy: {report:#}"
    );
    // Each round starts unpaced by at most one frame (512 KiB) and a 20 ms burst.
    let slack = 600_000.0;
    for round in rounds {
        let bytes = round["bytes"].as_f64().unwrap();
        let seconds = round["duration_ms"].as_f64().unwrap() / 1e3;
        assert!(
            bytes <= cap * seconds + slack,
            "a round moved {bytes} bytes in {seconds:.3} s, over the 4 MB/s cap: {report:#}"
        );
    }
    let copying: f64 = rounds
        .iter()
        .map(|r| r["duration_ms"].as_f64().unwrap() / 1e3)
        .sum::<f64>()
        + report["source_downtime_ms"].as_f64().unwrap() / 1e3;
    let wire = report["wire_bytes"].as_f64().unwrap();
    assert!(
        wire <= cap * copying + slack * (rounds.len() + 1) as f64,
        "{wire} bytes on the wire in {copying:.3} s of copying: {report:#}"
    );
    let vm = cluster.vm("d1").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["state"], "running");
    assert_eq!(
        vm["throttle_pct"], 0,
        "throttle is not carried to the destination"
    );
}

/// Hosts upgraded one at a time: a host that also speaks a newer version agrees with an
/// older one on the version both speak; one that shares none refuses at verify, naming both
/// version lists, and the VM stays where it was.
#[test]
fn hosts_of_different_versions_agree_or_refuse_naming_both() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("newer").protocol_versions("1,2"),
        HostSpec::new("future").protocol_versions("2"),
    ]);
    for name in ["u1", "u2"] {
        cluster.ferryctl_ok(&[
            "vm", "create", name, "--host", "alpha", "--guest", "counter", "--memory", "64M",
        ]);
    }
    let report = migrate(&cluster, "u1", "newer", &[]);
    assert_eq!(report["protocol_version"], 1, "{report:#}");

    let refused = cluster.ferryctl(&["migrate", "u2", "--to", "future", "--json"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    let report = refused.json();
    assert_eq!(report["status"], "refused", "{report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("'future' refused")
            && error.contains("accepting host speaks [2]")
            && error.contains("connecting host speaks [1]"),
        "both version lists named: {error}"
    );
    let vm = cluster.vm("u2").unwrap();
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running");
}

/// A downtime target no switch-over can meet is refused at verify with the smallest one
/// this pair of hosts can reach, instead of spinning through every round.
#[test]
fn the_operators_transport_choice_is_followed_or_refused_with_the_reason() {
    // This machine has no RDMA device: auto takes TCP and says why, tcp says it was asked
    // for, and rdma is refused at verify with nothing moved.
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    cluster.ferryctl_ok(&[
        "vm", "create", "t2", "--host", "alpha", "--guest", "counter", "--memory", "64M",
    ]);
    let report = migrate(&cluster, "t2", "beta", &[]);
    assert_eq!(report["transport"], "tcp+lz4", "{report:#}");
    let reason = report["transport_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("no RDMA device on either host"),
        "{report:#}"
    );
    assert!(report["rdma_link"].is_null(), "{report:#}");
    let report = migrate(&cluster, "t2", "alpha", &["--transport", "tcp"]);
    let reason = report["transport_reason"].as_str().unwrap_or("");
    assert!(
        reason.ends_with("TCP requested by the operator"),
        "{report:#}"
    );
    let report = migrate_fails(&cluster, "t2", "beta", &["--transport", "rdma"]);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(
        report["error"].as_str().unwrap_or(""),
        "no common transport: RDMA was requested and cannot be used: no RDMA device on either host",
        "{report:#}"
    );
    let vm = cluster.vm("t2").unwrap();
    assert_eq!(
        (&vm["host"], &vm["state"]),
        (&"alpha".into(), &"running".into())
    );
    // The API names a transport it does not know.
    let (status, body) = cluster.api_post(
        "alpha",
        "/v1/vms/t2/migrate",
        r#"{"to": "beta", "transport": "carrier-pigeon"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("'carrier-pigeon' is not a transport (auto, tcp, rdma)"),
        "{body}"
    );
}

#[test]
fn a_planned_rdma_path_that_cannot_be_set_up_falls_back_to_tcp_and_says_why() {
    // Both hosts claim an active RDMA port, so an unencrypted compute-only migration plans
    // RDMA; this machine has no RDMA support, so the destination cannot set it up, and the
    // migration carries on over TCP with the reason. Asked for RDMA only, it rolls back.
    let cluster = cluster(vec![
        HostSpec::new("alpha").claim_rdma("rxe-claimed0"),
        HostSpec::new("beta").claim_rdma("rxe-claimed1"),
    ]);
    cluster.ferryctl_ok(&[
        "vm", "create", "r1", "--host", "alpha", "--guest", "counter", "--memory", "64M",
    ]);
    // Encrypted (the default here): RDMA is out for TLS, whatever the devices.
    let report = migrate(&cluster, "r1", "beta", &[]);
    let reason = report["transport_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("RDMA streams cannot carry TLS"),
        "{report:#}"
    );
    let report = migrate(&cluster, "r1", "alpha", &["--encryption", "disabled"]);
    assert_eq!(report["transport"], "tcp+lz4", "{report:#}");
    let reason = report["transport_reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("rdma on the destination: ")
            && reason.ends_with(": falling back to tcp+lz4"),
        "{report:#}"
    );
    assert!(report["rdma_link"].is_null(), "{report:#}");
    // The destination's record of it says the same.
    let (status, incoming) = cluster.api_get(
        "alpha",
        &format!("/v1/migrations/{}", report["id"].as_str().unwrap()),
    );
    assert_eq!(status, 200, "{incoming}");
    assert_eq!(incoming["transport"], "tcp+lz4", "{incoming:#}");
    assert_eq!(
        incoming["transport_reason"], report["transport_reason"],
        "{incoming:#}"
    );
    // RDMA or nothing: the plan is RDMA, the setup fails, nothing is copied, the VM stays.
    let report = migrate_fails(
        &cluster,
        "r1",
        "beta",
        &["--encryption", "disabled", "--transport", "rdma"],
    );
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    let error = report["error"].as_str().unwrap_or("");
    assert!(
        error.contains("RDMA was requested and cannot be set up: rdma on the destination"),
        "{report:#}"
    );
    let vm = cluster.vm("r1").unwrap();
    assert_eq!(
        (&vm["host"], &vm["state"]),
        (&"alpha".into(), &"running".into())
    );
    assert!(cluster.vms_on("beta").is_empty());
    // And it still migrates afterwards.
    let report = migrate(&cluster, "r1", "beta", &["--encryption", "disabled"]);
    assert_eq!(report["status"], "completed", "{report:#}");
}

#[test]
fn a_locked_memory_limit_too_low_for_registration_is_named_at_verify() {
    // beta may lock only 8 MiB and lacks CAP_IPC_LOCK: registering a 64 MiB VM's memory
    // there cannot succeed, and verify says so before anything is copied.
    let cluster = cluster(vec![
        HostSpec::new("alpha").claim_rdma("rxe-claimed0"),
        HostSpec::new("beta")
            .claim_rdma("rxe-claimed1")
            .memlock_limit(8 << 20),
    ]);
    cluster.ferryctl_ok(&[
        "vm", "create", "l1", "--host", "alpha", "--guest", "counter", "--memory", "64M",
    ]);
    let needle = "rdma on the destination 'beta': registering 64 MiB needs that much locked memory, and RLIMIT_MEMLOCK is 8 MiB (hard limit 8 MiB)";
    let report = migrate_fails(
        &cluster,
        "l1",
        "beta",
        &["--encryption", "disabled", "--transport", "rdma"],
    );
    assert_eq!(report["status"], "refused", "{report:#}");
    assert!(
        report["error"].as_str().unwrap_or("").contains(needle),
        "{report:#}"
    );
    assert!(cluster.vms_on("beta").is_empty());
    // Auto: TCP, for that reason.
    let report = migrate(&cluster, "l1", "beta", &["--encryption", "disabled"]);
    let reason = report["transport_reason"].as_str().unwrap_or("");
    assert!(reason.contains(needle), "{report:#}");
    assert_eq!(report["transport"], "tcp+lz4", "{report:#}");
}

#[test]
fn a_downtime_target_below_the_switch_over_floor_is_refused_with_the_floor() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    cluster.ferryctl_ok(&[
        "vm", "create", "t1", "--host", "alpha", "--guest", "counter", "--memory", "64M",
    ]);
    let report = migrate_fails(&cluster, "t1", "beta", &["--downtime-ms", "5"]);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert_eq!(report["rounds"].as_array().unwrap().len(), 0, "{report:#}");
    let error = report["error"].as_str().unwrap();
    let floor: u64 = error
        .split("--downtime-ms ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the floor is named: {error}"));
    assert!(floor >= 15, "{error}");
    let vm = cluster.vm("t1").unwrap();
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running");
}

#[test]
fn hosts_in_network_namespaces_joined_by_veth() {
    let cluster = TestCluster::in_namespaces(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        [HostSpec::new("east"), HostSpec::new("west")],
    );
    let created = cluster
        .ferryctl_ok(&[
            "vm",
            "create",
            "n1",
            "--host",
            "east",
            "--guest",
            "counter",
            "--memory",
            "64M",
            "--ticks-per-sec",
            "50",
            "--ip",
            "10.77.99.9",
            "--json",
        ])
        .json();
    cluster.wait_for("ticks", Duration::from_secs(10), |c| {
        c.ticks("n1").len() >= 10
    });
    let pair = cluster.netns().expect("namespaces");
    // Listen on east's side of the veth: west's announcement crosses the link.
    let capture = Capture::start(&pair.names[0], &pair.interfaces[0]);
    let report = migrate(&cluster, "n1", "west", &[]);
    assert_eq!(report["destination"], "west");
    let before = cluster.ticks("n1").len();
    cluster.wait_for("ticks on west", Duration::from_secs(10), |c| {
        c.ticks("n1").len() >= before + 10
    });
    assert_consecutive_from_one(&cluster.ticks("n1"));

    let mac: Vec<u8> = created["mac"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let rarp = |f: &Vec<u8>| f.len() >= 14 && f[6..12] == mac[..] && f[12..14] == [0x80, 0x35];
    let garp = |f: &Vec<u8>| {
        f.len() >= 42
            && f[6..12] == mac[..]
            && f[12..14] == [0x08, 0x06]
            && f[28..32] == [10, 77, 99, 9]
    };
    let frames = capture.frames_when(Duration::from_secs(30), |frames| {
        frames.iter().any(rarp) && frames.iter().any(garp)
    });
    assert!(
        frames.iter().any(rarp),
        "no RARP announcement with the VM's MAC arrived over the veth ({} frames)",
        frames.len()
    );
    assert!(
        frames.iter().any(garp),
        "no gratuitous ARP for the VM's IP arrived over the veth"
    );
}
