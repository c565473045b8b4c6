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
    assert!(there["downtime_ms"].as_f64().unwrap() < 300.0, "{there:#}");
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

#[test]
fn dirty_guest_at_unlimited_rate_converges_by_throttling() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    // Random content under the working set keeps every dirtied page incompressible, so the
    // link, not lz4, sets the pace, and the guest outruns it.
    let content = cluster.dir().join("random.bin");
    ferry_runtime::content::write_file(
        &content,
        ferry_runtime::content::Content::Random,
        768 << 20,
        5,
    )
    .unwrap();
    let preload = format!("{}@2M", content.display());
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        "d1",
        "--host",
        "alpha",
        "--guest",
        "dirty",
        "--memory",
        "1G",
        "--working-set",
        "768M",
        "--vcpus",
        "2",
        "--preload",
        &preload,
    ]);
    std::thread::sleep(Duration::from_millis(500));
    // Two vCPUs dirtying 768 MiB of incompressible pages outrun the loopback link here.
    let report = migrate(&cluster, "d1", "beta", &["--downtime-ms", "300"]);
    let throttle = report["throttle_pct"].as_u64().unwrap();
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(throttle > 0, "expected throttling to converge: {report:#}");
    assert!(
        downtime <= 300.0,
        "downtime {downtime} ms over the 300 ms target: {report:#}"
    );
    assert!(
        report["rounds"].as_array().unwrap().len() >= 2,
        "{report:#}"
    );
    let vm = cluster.vm("d1").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["state"], "running");
    assert_eq!(
        vm["throttle_pct"], 0,
        "throttle is not carried to the destination"
    );
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
    let capture = Capture::start(&pair.names[0], &pair.interfaces[0], Duration::from_secs(8));
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
    let frames = capture.frames();
    let rarp = frames
        .iter()
        .any(|f| f.len() >= 14 && f[6..12] == mac[..] && f[12..14] == [0x80, 0x35]);
    let garp = frames.iter().any(|f| {
        f.len() >= 42
            && f[6..12] == mac[..]
            && f[12..14] == [0x08, 0x06]
            && f[28..32] == [10, 77, 99, 9]
    });
    assert!(
        rarp,
        "no RARP announcement with the VM's MAC arrived over the veth ({} frames)",
        frames.len()
    );
    assert!(
        garp,
        "no gratuitous ARP for the VM's IP arrived over the veth"
    );
}
