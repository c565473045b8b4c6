//! VM disks between real hostd processes: datastores, `--disk`, image locks across hosts,
//! and compute-only migration over a shared datastore with the `disk` guest writing
//! throughout. Needs /dev/kvm and root.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::{HostSpec, TestCluster};
use serde_json::Value;

fn cluster(hosts: Vec<HostSpec>) -> TestCluster {
    TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        hosts,
    )
}

fn create_disk_vm(cluster: &TestCluster, name: &str, disk: &str, rate: &str) -> Value {
    cluster
        .ferryctl_ok(&[
            "vm",
            "create",
            name,
            "--host",
            "alpha",
            "--guest",
            "disk",
            "--memory",
            "64M",
            "--disk",
            disk,
            "--disk-rate",
            rate,
            "--json",
        ])
        .json()
}

fn progress(cluster: &TestCluster, vm: &str) -> u64 {
    cluster
        .vm(vm)
        .and_then(|v| v["guest_progress"].as_u64())
        .unwrap_or(0)
}

fn wait_for_writes(cluster: &TestCluster, vm: &str, more: u64) {
    let from = progress(cluster, vm);
    cluster.wait_for("disk writes", Duration::from_secs(60), |c| {
        progress(c, vm) >= from + more
    });
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn compute_only_migration_over_a_shared_datastore_there_and_back_while_the_guest_writes() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let shared = cluster.dir().join("shared");
    let created = create_disk_vm(&cluster, "d1", "shared:d1.raw,size=16M", "0");
    assert_eq!(created["disks"][0]["datastore"], "shared", "{created:#}");
    assert_eq!(created["disks"][0]["file"], "d1.raw");
    assert_eq!(files_in(&shared), vec!["d1.raw"]);
    wait_for_writes(&cluster, "d1", 256);

    // The datastore is listed with its path, space and identity, the same on both hosts.
    let (_, alpha) = cluster.api_get("alpha", "/v1/host");
    let (_, beta) = cluster.api_get("beta", "/v1/host");
    let listed = |host: &Value| {
        host["datastores"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "shared")
            .cloned()
            .unwrap_or_else(|| panic!("no shared datastore: {host:#}"))
    };
    assert_eq!(listed(&alpha)["identity"], listed(&beta)["identity"]);
    assert!(listed(&alpha)["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(listed(&alpha)["path"], shared.display().to_string());

    // Another VM, on either host, cannot open the image while d1 holds it.
    for host in ["alpha", "beta"] {
        let second = cluster.ferryctl(&[
            "vm",
            "create",
            "intruder",
            "--host",
            host,
            "--guest",
            "disk",
            "--memory",
            "64M",
            "--disk",
            "shared:d1.raw",
        ]);
        assert_ne!(second.code, Some(0));
        assert!(
            second.stderr.contains("in use by another VM"),
            "{host}: {}",
            second.stderr
        );
    }

    for (leg, to) in ["beta", "alpha", "beta"].into_iter().enumerate() {
        let writes_before = cluster.vm("d1").unwrap()["disks"][0]["counters"]["writes"]
            .as_u64()
            .unwrap();
        let mut args = vec!["migrate", "d1", "--to", to, "--json"];
        if leg == 1 {
            args.push("--verify");
        }
        let report = cluster.ferryctl(&args).json();
        assert_eq!(report["status"], "completed", "leg {leg}: {report:#}");
        assert_eq!(report["storage"], "shared", "{report:#}");
        assert_eq!(report["disks"], serde_json::json!(["shared:d1.raw"]));
        let vm = cluster.vm("d1").unwrap();
        assert_eq!(vm["host"], to);
        let disk = &vm["disks"][0];
        assert_eq!(disk["locked"], true, "{vm:#}");
        assert_eq!(disk["path"], shared.join("d1.raw").display().to_string());
        // The device's counters came along with its state.
        assert!(disk["counters"]["writes"].as_u64().unwrap() >= writes_before);
        wait_for_writes(&cluster, "d1", 128);
        let vm = cluster.vm("d1").unwrap();
        assert_eq!(vm["guest_failures"], 0, "leg {leg}: {vm:#}");
        // No copy: the one image, and nothing in either host's local datastore.
        assert_eq!(files_in(&shared), vec!["d1.raw"]);
        for host in ["alpha", "beta"] {
            assert!(files_in(&cluster.dir().join(host).join("disks")).is_empty());
        }
    }
    // The source gave the image up for good: a new VM on alpha still cannot have it
    // (beta holds it), and once d1 stops, the image is free.
    cluster.ferryctl_ok(&["vm", "stop", "d1"]);
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        "after",
        "--host",
        "alpha",
        "--guest",
        "disk",
        "--memory",
        "64M",
        "--disk",
        "shared:d1.raw",
    ]);
}

#[test]
fn disks_a_host_does_not_share_are_refused_at_verify_and_the_vm_keeps_running() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        // Claims the datastore `shared` but has its own directory there: another identity.
        HostSpec::new("beta").shared_dir("beta-shared"),
    ]);
    create_disk_vm(&cluster, "local", "alpha-local:l.raw,size=4M", "200");
    create_disk_vm(&cluster, "fake", "shared:f.raw,size=4M", "200");
    wait_for_writes(&cluster, "local", 64);
    for (vm, says) in [
        ("local", "host 'beta' has no datastore 'alpha-local'"),
        ("fake", "datastore 'shared' is not shared"),
    ] {
        let result = cluster.ferryctl(&["migrate", vm, "--to", "beta", "--json"]);
        let report = result.json();
        assert_ne!(result.code, Some(0));
        assert_ne!(report["status"], "completed", "{report:#}");
        let error = report["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{vm}: {error}");
        let now = cluster.vm(vm).unwrap();
        assert_eq!(now["host"], "alpha");
        assert_eq!(now["state"], "running", "{now:#}");
        assert_eq!(now["disks"][0]["locked"], true);
    }
    wait_for_writes(&cluster, "fake", 64);
    assert_eq!(cluster.vm("fake").unwrap()["guest_failures"], 0);
    // Nothing was made on beta.
    assert!(files_in(&cluster.dir().join("beta-shared")).is_empty());
    assert!(files_in(&cluster.dir().join("beta").join("disks")).is_empty());
}

#[test]
fn bad_disk_requests_are_refused_with_the_reason_and_leave_nothing_behind() {
    let cluster = cluster(vec![HostSpec::new("alpha")]);
    for (disk, says) in [
        ("nowhere:x.raw,size=1M", "has no datastore 'nowhere'"),
        ("shared:missing.raw", "does not exist; give a size"),
        ("shared:../escape.raw,size=1M", "not a valid image name"),
        ("shared", "DATASTORE:FILE"),
    ] {
        let result = cluster.ferryctl(&[
            "vm", "create", "bad", "--host", "alpha", "--guest", "disk", "--disk", disk,
        ]);
        assert_ne!(result.code, Some(0), "{disk}");
        assert!(result.stderr.contains(says), "{disk}: {}", result.stderr);
    }
    // A VM that cannot be built (too little memory for its guest's table here: 5 MiB and a
    // 1 GiB disk) takes the image it created away with it.
    let result = cluster.ferryctl(&[
        "vm",
        "create",
        "bad",
        "--host",
        "alpha",
        "--guest",
        "dirty",
        "--memory",
        "4M",
        "--working-set",
        "64M",
        "--disk",
        "shared:gone.raw,size=1G",
    ]);
    assert_ne!(result.code, Some(0));
    assert!(files_in(&cluster.dir().join("shared")).is_empty());
}

/// Takes the image's write lock as another VM would, as soon as nobody holds it.
fn grab_lock_when_free(path: &Path, timeout: Duration) -> Option<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // SAFETY: a zeroed flock is valid; the fields that matter are set.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: fcntl on an open descriptor with a valid flock; does not block.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
            return Some(file);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// The handover's worst moment: the source has let the lock go and someone else takes it
/// before the destination can. The destination must not run the VM without it, the
/// migration rolls back, and the source takes its lock back (once the other holder lets go)
/// and runs on, its guest's disk intact.
#[test]
fn a_destination_that_cannot_take_the_disk_lock_rolls_back_and_the_source_takes_it_back() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("slow-state-load"),
    ]);
    create_disk_vm(&cluster, "h1", "shared:h1.raw,size=8M", "0");
    wait_for_writes(&cluster, "h1", 128);
    let image = cluster.dir().join("shared").join("h1.raw");
    let migration = cluster.ferryctl_spawn(&["migrate", "h1", "--to", "beta", "--json"]);
    let held = grab_lock_when_free(&image, Duration::from_secs(60))
        .expect("the source never let the image go");
    // Hold it until the destination has tried and failed, then let the source have it.
    cluster.wait_for(
        "the destination's lock failure",
        Duration::from_secs(30),
        |c| c.log("beta").contains("cannot take the disk locks"),
    );
    drop(held);
    let output = migration.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("in use by another VM"),
        "{report:#}"
    );
    let vm = cluster.vm("h1").unwrap();
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running", "{vm:#}");
    assert_eq!(vm["disks"][0]["locked"], true);
    wait_for_writes(&cluster, "h1", 128);
    assert_eq!(cluster.vm("h1").unwrap()["guest_failures"], 0);
    assert!(cluster.vms_on("beta").is_empty());
}

/// A destination that rejects the arriving state does so after the source gave up its image
/// lock: the source must take it back before its guest runs again, and lose no write.
#[test]
fn a_state_rejected_after_the_handover_began_gives_the_lock_back_to_the_source() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("reject-state"),
    ]);
    create_disk_vm(&cluster, "r1", "shared:r1.raw,size=8M", "0");
    wait_for_writes(&cluster, "r1", 128);
    let report = cluster
        .ferryctl(&["migrate", "r1", "--to", "beta", "--json"])
        .json();
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    let vm = cluster.vm("r1").unwrap();
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running", "{vm:#}");
    assert_eq!(vm["disks"][0]["locked"], true, "{vm:#}");
    wait_for_writes(&cluster, "r1", 128);
    assert_eq!(cluster.vm("r1").unwrap()["guest_failures"], 0);
}

/// The VMM keeps the disk (and its lock) when hostd dies; the restarted hostd lists it again.
#[test]
fn a_disk_vm_outlives_a_killed_hostd_and_keeps_its_disk_and_lock() {
    let mut cluster = cluster(vec![HostSpec::new("alpha")]);
    create_disk_vm(&cluster, "k1", "shared:k1.raw,size=8M", "500");
    wait_for_writes(&cluster, "k1", 64);
    cluster.kill("alpha");
    // Still held while no hostd runs.
    let image = cluster.dir().join("shared").join("k1.raw");
    assert!(
        grab_lock_when_free(&image, Duration::from_millis(200)).is_none(),
        "the VMM let the image go when hostd died"
    );
    cluster.restart("alpha");
    let vm = cluster.vm("k1").unwrap();
    assert_eq!(vm["state"], "running", "{vm:#}");
    assert_eq!(vm["disks"][0]["datastore"], "shared");
    assert_eq!(vm["disks"][0]["file"], "k1.raw");
    assert_eq!(vm["disks"][0]["locked"], true);
    wait_for_writes(&cluster, "k1", 64);
    assert_eq!(cluster.vm("k1").unwrap()["guest_failures"], 0);
}

/// Compute + storage: the disk moves to the destination's own datastore while the guest
/// writes as fast as it can; the copy equals the source at the pause (`--verify` compares
/// the images' hashes), the source image is deleted, and the guest finds every block it
/// wrote. And back again, to the first host's local datastore.
#[test]
fn compute_and_storage_migration_to_a_local_datastore_while_the_guest_writes_heavily() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let alpha_local = cluster.dir().join("alpha").join("disks");
    let beta_local = cluster.dir().join("beta").join("disks");
    create_disk_vm(&cluster, "s1", "alpha-local:s1.raw,size=32M", "0");
    wait_for_writes(&cluster, "s1", 512);
    for (leg, (to, datastore, from_dir, to_dir)) in [
        ("beta", "beta-local", &alpha_local, &beta_local),
        ("alpha", "alpha-local", &beta_local, &alpha_local),
    ]
    .into_iter()
    .enumerate()
    {
        // There by --datastore, back by naming the disk's target.
        let disk_target = format!("s1.raw={datastore}");
        let mut args = vec!["migrate", "s1", "--to", to, "--json"];
        if leg == 0 {
            args.extend(["--datastore", datastore, "--verify"]);
        } else {
            args.extend(["--disk-target", &disk_target]);
        }
        let report = cluster.ferryctl(&args).json();
        assert_eq!(report["status"], "completed", "leg {leg}: {report:#}");
        assert_eq!(report["storage"], format!("copied to {datastore}"));
        // At least what the guest wrote went over (it wrote 512+ blocks of 4 KiB first).
        assert!(
            report["disk_bytes"].as_u64().unwrap() >= 512 * 4096,
            "{report:#}"
        );
        assert!(
            report["disk_final_bytes"].as_u64().unwrap() <= report["disk_bytes"].as_u64().unwrap()
        );
        // The disk's own figures: the only disk, so all the disk bytes are its own; the
        // guest kept writing, so blocks went in more than the first round.
        let copy = &report["disk_copies"][0];
        let from = if leg == 0 {
            "alpha-local"
        } else {
            "beta-local"
        };
        assert_eq!(copy["disk"], format!("{from}:s1.raw"), "{report:#}");
        assert_eq!(copy["target"], format!("{datastore}:s1.raw"));
        assert_eq!(copy["bytes"], report["disk_bytes"], "{report:#}");
        assert_eq!(copy["final_bytes"], report["disk_final_bytes"]);
        let wire = copy["wire_bytes"].as_u64().unwrap();
        assert!(
            wire > 0 && wire < report["wire_bytes"].as_u64().unwrap(),
            "{report:#}"
        );
        assert!(copy["rounds"].as_u64().unwrap() >= 1, "{report:#}");
        assert!(copy["time_ms"].as_f64().unwrap() > 0.0, "{report:#}");
        assert!(copy["time_ms"].as_f64().unwrap() <= report["total_ms"].as_f64().unwrap());
        if leg == 0 {
            assert_eq!(report["memory_verified"], true, "{report:#}");
        }
        let vm = cluster.vm("s1").unwrap();
        assert_eq!(vm["host"], to);
        assert_eq!(vm["disks"][0]["datastore"], datastore, "{vm:#}");
        assert_eq!(vm["disks"][0]["locked"], true);
        assert_eq!(
            vm["disks"][0]["path"],
            to_dir.join("s1.raw").display().to_string()
        );
        // Deleted once the destination runs the VM, just after the report says so.
        cluster.wait_for("the source image deleted", Duration::from_secs(10), |_| {
            files_in(from_dir).is_empty()
        });
        assert_eq!(files_in(to_dir), vec!["s1.raw"]);
        wait_for_writes(&cluster, "s1", 256);
        let vm = cluster.vm("s1").unwrap();
        assert_eq!(vm["guest_failures"], 0, "leg {leg}: {vm:#}");
    }
}

/// A VM with two disks, each moved to a datastore of its own (`--disk-target`), one of them
/// from a host's local datastore to the shared one; the idle second disk arrives byte for
/// byte, its holes as holes, and its own figures show exactly what it held. Placements that
/// cannot work are refused before the VM is touched, and say why.
#[test]
fn each_disk_moves_to_its_own_target_datastore() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let alpha_local = cluster.dir().join("alpha").join("disks");
    // The second disk: 1 MiB of pattern, 1 MiB of written zeros, then 6 MiB of hole.
    let mut content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    content.resize(2 << 20, 0);
    let second = alpha_local.join("t2.raw");
    std::fs::write(&second, &content).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&second)
        .unwrap();
    file.set_len(8 << 20).unwrap();
    drop(file);
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        "t1",
        "--host",
        "alpha",
        "--guest",
        "disk",
        "--memory",
        "64M",
        "--disk",
        "alpha-local:t1.raw,size=16M",
        "--disk",
        "alpha-local:t2.raw",
        "--disk-rate",
        "0",
    ]);
    wait_for_writes(&cluster, "t1", 512);
    for (args, says) in [
        (
            vec!["--disk-target", "t1.raw=beta-local"],
            "disk alpha-local:t2.raw has no target datastore",
        ),
        (
            vec![
                "--datastore",
                "beta-local",
                "--disk-target",
                "nope.raw=shared",
            ],
            "the VM has no disk 'nope.raw' (its disks: alpha-local:t1.raw, alpha-local:t2.raw)",
        ),
        (vec!["--keep-source-disks"], "storage migration only"),
        (vec!["--disk-target", "t1.raw"], "not FILE=DATASTORE"),
    ] {
        let mut full = vec!["migrate", "t1", "--to", "beta"];
        full.extend(args.iter().copied());
        let result = cluster.ferryctl(&full);
        assert_ne!(result.code, Some(0), "{args:?}");
        assert!(result.stderr.contains(says), "{args:?}: {}", result.stderr);
    }
    assert_eq!(cluster.vm("t1").unwrap()["state"], "running");

    let report = cluster
        .ferryctl(&[
            "migrate",
            "t1",
            "--to",
            "beta",
            "--disk-target",
            "t1.raw=beta-local",
            "--disk-target",
            "alpha-local:t2.raw=shared",
            "--verify",
            "--json",
        ])
        .json();
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_eq!(report["storage"], "copied to beta-local, shared");
    let second_copy = &report["disk_copies"][1];
    assert_eq!(second_copy["target"], "shared:t2.raw", "{report:#}");
    assert_eq!(
        second_copy["bytes"],
        2 << 20,
        "only what the image held: {report:#}"
    );
    assert_eq!(second_copy["zero_blocks"], 256, "{report:#}");
    assert_eq!(
        second_copy["rounds"], 1,
        "nothing wrote it after the first pass"
    );
    assert_eq!(second_copy["final_bytes"], 0);
    let first = report["disk_copies"][0]["bytes"].as_u64().unwrap();
    assert_eq!(
        first + (2 << 20),
        report["disk_bytes"].as_u64().unwrap(),
        "{report:#}"
    );
    let vm = cluster.vm("t1").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["disks"][0]["datastore"], "beta-local", "{vm:#}");
    assert_eq!(vm["disks"][1]["datastore"], "shared", "{vm:#}");
    cluster.wait_for("the source images deleted", Duration::from_secs(10), |_| {
        files_in(&alpha_local).is_empty()
    });
    let moved = cluster.dir().join("shared").join("t2.raw");
    let arrived = std::fs::read(&moved).unwrap();
    assert_eq!(arrived.len(), 8 << 20);
    assert!(
        arrived[..2 << 20] == content[..],
        "the idle disk arrived changed"
    );
    assert!(arrived[2 << 20..].iter().all(|&b| b == 0));
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&moved).unwrap().blocks() * 512;
    assert!(
        allocated <= (1 << 20) + (64 << 10),
        "zero blocks and holes landed as holes: {allocated} bytes allocated"
    );
    wait_for_writes(&cluster, "t1", 256);
    assert_eq!(cluster.vm("t1").unwrap()["guest_failures"], 0);
}

/// A storage migration that fails before the switch-over: the source runs on its untouched
/// disk, and the target datastore holds nothing the migration made. A destination that
/// already has an image of that name is refused at verify and keeps it.
#[test]
fn a_storage_migration_that_fails_leaves_nothing_in_the_target_datastore() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("reject-state"),
    ]);
    let beta_local = cluster.dir().join("beta").join("disks");
    create_disk_vm(&cluster, "f1", "alpha-local:f1.raw,size=16M", "0");
    wait_for_writes(&cluster, "f1", 256);
    let report = cluster
        .ferryctl(&[
            "migrate",
            "f1",
            "--to",
            "beta",
            "--datastore",
            "beta-local",
            "--json",
        ])
        .json();
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert!(
        files_in(&beta_local).is_empty(),
        "{:?}",
        files_in(&beta_local)
    );
    let vm = cluster.vm("f1").unwrap();
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running", "{vm:#}");
    assert_eq!(vm["disks"][0]["locked"], true);
    assert_eq!(
        files_in(&cluster.dir().join("alpha").join("disks")),
        vec!["f1.raw"]
    );
    wait_for_writes(&cluster, "f1", 256);
    assert_eq!(cluster.vm("f1").unwrap()["guest_failures"], 0);

    std::fs::write(beta_local.join("f1.raw"), b"someone else's").unwrap();
    for (datastore, says) in [
        ("beta-local", "already has an image named 'f1.raw'"),
        ("nowhere", "has no datastore 'nowhere'"),
    ] {
        let result = cluster.ferryctl(&[
            "migrate",
            "f1",
            "--to",
            "beta",
            "--datastore",
            datastore,
            "--json",
        ]);
        let report = result.json();
        assert_ne!(report["status"], "completed");
        let error = report["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{datastore}: {error}");
    }
    assert_eq!(
        std::fs::read(beta_local.join("f1.raw")).unwrap(),
        b"someone else's"
    );
    assert_eq!(cluster.vm("f1").unwrap()["state"], "running");
}

/// `--verify` compares the moved images with the source's, not only the memory: one byte
/// changed in beta's copy of the disk rolls the migration back, naming the image.
#[test]
fn verify_catches_a_moved_image_that_differs_from_the_source() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("corrupt-arriving-disk"),
    ]);
    let beta_local = cluster.dir().join("beta").join("disks");
    create_disk_vm(&cluster, "h1", "alpha-local:h1.raw,size=16M", "0");
    wait_for_writes(&cluster, "h1", 256);
    let result = cluster.ferryctl(&[
        "migrate",
        "h1",
        "--to",
        "beta",
        "--datastore",
        "beta-local",
        "--verify",
        "--json",
    ]);
    assert_eq!(result.code, Some(1), "{result:?}");
    let report = result.json();
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("disk hash mismatch") && error.contains("h1.raw"),
        "{report:#}"
    );
    assert!(
        cluster.log("beta").contains("fault injection"),
        "the fault fired"
    );
    assert!(
        files_in(&beta_local).is_empty(),
        "{:?}",
        files_in(&beta_local)
    );
    assert_source_runs_on(&cluster, "h1");
}

fn start_storage_migration(cluster: &TestCluster, vm: &str, body: &str) -> String {
    let (status, answer) = cluster.api_post("alpha", &format!("/v1/vms/{vm}/migrate"), body);
    assert_eq!(status, 202, "{answer}");
    answer["id"].as_str().expect("migration id").to_string()
}

fn migration(cluster: &TestCluster, id: &str) -> Value {
    cluster.api_get("alpha", &format!("/v1/migrations/{id}")).1
}

fn wait_final(cluster: &TestCluster, id: &str) -> Value {
    let mut report = Value::Null;
    cluster.wait_for("migration to end", Duration::from_secs(60), |c| {
        report = migration(c, id);
        ["completed", "rolled_back", "cancelled", "refused", "failed"]
            .contains(&report["status"].as_str().unwrap_or(""))
    });
    report
}

/// A VM whose disk holds about 20 MiB, and a 4 MB/s cap: its disk copy takes seconds on any
/// machine, so the test can act in the middle of it.
fn slow_storage_migration(cluster: &TestCluster, vm: &str) -> String {
    create_disk_vm(cluster, vm, &format!("alpha-local:{vm}.raw,size=32M"), "0");
    wait_for_writes(cluster, vm, 8192);
    let id = start_storage_migration(
        cluster,
        vm,
        r#"{"to":"beta","datastore":"beta-local","max_bandwidth":"4M"}"#,
    );
    let beta_local = cluster.dir().join("beta").join("disks");
    cluster.wait_for("the disk copy under way", Duration::from_secs(30), |c| {
        migration(c, &id)["stage"] == "pre_copy" && !files_in(&beta_local).is_empty()
    });
    id
}

fn assert_source_runs_on(cluster: &TestCluster, vm: &str) {
    let now = cluster.vm(vm).unwrap();
    assert_eq!(now["host"], "alpha", "{now:#}");
    assert_eq!(now["state"], "running", "{now:#}");
    assert_eq!(now["disks"][0]["locked"], true);
    assert_eq!(
        files_in(&cluster.dir().join("alpha").join("disks")),
        vec![format!("{vm}.raw")]
    );
    wait_for_writes(cluster, vm, 256);
    assert_eq!(cluster.vm(vm).unwrap()["guest_failures"], 0);
}

#[test]
fn a_storage_migration_cancelled_mid_copy_leaves_nothing_in_the_target_datastore() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let id = slow_storage_migration(&cluster, "c1");
    cluster.ferryctl_ok(&["migrate-cancel", "c1"]);
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "cancelled", "{report:#}");
    let beta_local = cluster.dir().join("beta").join("disks");
    cluster.wait_for("the partial image removed", Duration::from_secs(10), |_| {
        files_in(&beta_local).is_empty()
    });
    assert_source_runs_on(&cluster, "c1");
}

/// The data streams break mid disk copy (the control channel stays up): both sides see the
/// transfer fail, the source keeps running on its untouched disk, and the destination removes
/// the partial image.
#[test]
fn a_data_stream_cut_mid_disk_copy_rolls_back_and_leaves_nothing_in_the_target_datastore() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let id = slow_storage_migration(&cluster, "d1");
    let cut = cluster.cut_data_streams("beta");
    assert!(cut >= 1, "no data stream to cut");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("copying memory"),
        "{report:#}"
    );
    let beta_local = cluster.dir().join("beta").join("disks");
    cluster.wait_for("the partial image removed", Duration::from_secs(10), |_| {
        files_in(&beta_local).is_empty()
    });
    assert!(cluster.vms_on("beta").is_empty());
    assert_source_runs_on(&cluster, "d1");
}

#[test]
fn a_destination_killed_mid_disk_copy_rolls_back_and_its_restart_removes_the_partial_image() {
    let mut cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let id = slow_storage_migration(&cluster, "k1");
    cluster.kill("beta");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert_source_runs_on(&cluster, "k1");
    // The killed hostd could not clean up; the restarted one settles the arrival it finds
    // on record as discarded, and removes the image it had created.
    cluster.restart("beta");
    let beta_local = cluster.dir().join("beta").join("disks");
    cluster.wait_for("the partial image removed", Duration::from_secs(20), |_| {
        files_in(&beta_local).is_empty()
    });
    assert!(cluster.vms_on("beta").is_empty());
}

/// Unmounts a test tmpfs when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_target_datastore_too_small_is_refused_at_verify() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let beta_local = cluster.dir().join("beta").join("disks");
    std::fs::create_dir_all(&beta_local).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&beta_local)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small tmpfs for the test");
    let _unmount = Mounted(beta_local.clone());
    create_disk_vm(&cluster, "big", "alpha-local:big.raw,size=32M", "0");
    wait_for_writes(&cluster, "big", 8192);
    let result = cluster.ferryctl(&[
        "migrate",
        "big",
        "--to",
        "beta",
        "--datastore",
        "beta-local",
        "--json",
    ]);
    let report = result.json();
    assert_ne!(report["status"], "completed", "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("datastore 'beta-local' on host 'beta' has") && error.contains("free"),
        "{error}"
    );
    assert!(files_in(&beta_local).is_empty());
    assert_source_runs_on(&cluster, "big");
}

/// Across datacenters: the hosts are on different subnets, routed through a third namespace,
/// every routed link limited to 100 Mbit/s by `tc tbf`. A compute + storage migration moves
/// the disk between the datacenters' own datastores while the guest writes, with the image
/// hashes compared before the switch-over.
#[test]
fn compute_and_storage_migration_between_routed_rate_limited_datacenters() {
    let cluster = TestCluster::across_datacenters(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        [HostSpec::new("east"), HostSpec::new("west")],
        "100mbit",
    );
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        "dc1",
        "--host",
        "east",
        "--guest",
        "disk",
        "--memory",
        "64M",
        "--disk",
        "east-local:dc1.raw,size=16M",
        "--disk-rate",
        "0",
    ]);
    wait_for_writes(&cluster, "dc1", 2048);
    // The guest writes faster than the link carries; auto-converge slows it.
    let report = cluster
        .ferryctl(&[
            "migrate",
            "dc1",
            "--to",
            "west",
            "--datastore",
            "west-local",
            "--verify",
            "--json",
        ])
        .json();
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_eq!(report["storage"], "copied to west-local");
    assert_eq!(report["memory_verified"], true);
    let vm = cluster.vm("dc1").unwrap();
    assert_eq!(vm["host"], "west");
    assert_eq!(vm["disks"][0]["datastore"], "west-local");
    let east_local = cluster.dir().join("east").join("disks");
    cluster.wait_for("the source image deleted", Duration::from_secs(10), |_| {
        files_in(&east_local).is_empty()
    });
    assert_eq!(
        files_in(&cluster.dir().join("west").join("disks")),
        vec!["dc1.raw"]
    );
    wait_for_writes(&cluster, "dc1", 256);
    assert_eq!(cluster.vm("dc1").unwrap()["guest_failures"], 0);
}

fn has_image(dir: &Path, vm: &str) -> bool {
    files_in(dir).contains(&format!("{vm}.raw"))
}

/// A storage migration to beta-local of a VM whose guest writes its disk heavily.
fn start_storage_move(cluster: &TestCluster, vm: &str) -> String {
    create_disk_vm(cluster, vm, &format!("alpha-local:{vm}.raw,size=8M"), "0");
    wait_for_writes(cluster, vm, 512);
    start_storage_migration(cluster, vm, r#"{"to":"beta","datastore":"beta-local"}"#)
}

/// [`start_storage_move`] to a beta whose fault holds up the commit's confirmation, until
/// alpha is in doubt.
fn storage_move_in_doubt(cluster: &TestCluster, vm: &str) -> String {
    let id = start_storage_move(cluster, vm);
    cluster.wait_for("alpha to be in doubt", Duration::from_secs(60), |c| {
        migration(c, &id)["status"] == "in_doubt"
    });
    id
}

/// After the switch-over of `vm`: it runs on beta on its new image, which holds what the
/// guest wrote; alpha's image is gone.
fn assert_moved_to_beta(cluster: &TestCluster, vm: &str) {
    let now = cluster.vm(vm).unwrap();
    assert_eq!(now["host"], "beta", "{now:#}");
    assert_eq!(now["state"], "running", "{now:#}");
    assert_eq!(now["disks"][0]["datastore"], "beta-local", "{now:#}");
    assert_eq!(now["disks"][0]["locked"], true);
    let alpha_local = cluster.dir().join("alpha").join("disks");
    cluster.wait_for("the source image deleted", Duration::from_secs(20), |_| {
        !has_image(&alpha_local, vm)
    });
    assert!(has_image(&cluster.dir().join("beta").join("disks"), vm));
    wait_for_writes(cluster, vm, 256);
    assert_eq!(cluster.vm(vm).unwrap()["guest_failures"], 0);
}

/// Beta runs the VM on its new image at the commit, the confirmation is lost in a partition,
/// and beta's hostd is killed while cut off and restarted. The restarted hostd settles the
/// arrival as committed: it keeps the VM and its image (only a discarded arrival's images
/// are removed). Alpha learns the outcome by asking, completes, and deletes its image.
#[test]
fn a_destination_hostd_killed_right_after_a_storage_commit_keeps_the_vm_and_its_new_image() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("partition-after-commit"),
    ]);
    let id = storage_move_in_doubt(&cluster, "pc1");
    assert!(cluster.log("beta").contains("VM taken over"));
    let alpha_local = cluster.dir().join("alpha").join("disks");
    assert!(
        has_image(&alpha_local, "pc1"),
        "in doubt, the source keeps its image"
    );
    cluster.kill("beta");
    cluster.restart("beta");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_moved_to_beta(&cluster, "pc1");
    assert!(cluster.vms_on("alpha").is_empty());
}

/// The source's hostd is killed right after the commit went out (the confirmation held up
/// by a partition that heals after 3 s). A cancel then is refused as too late. The restarted
/// hostd finds the commit on record, asks, learns that beta owns the VM, releases its paused
/// copy, and deletes the source image as the migration would have: the record carries it.
#[test]
fn a_source_hostd_killed_right_after_a_storage_commit_completes_when_restarted() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("partition-after-commit-healing"),
    ]);
    let id = storage_move_in_doubt(&cluster, "pc2");
    let (status, body) = cluster.api_post("alpha", "/v1/vms/pc2/migrate/cancel", "{}");
    assert_eq!(status, 409, "{body}");
    cluster.kill("alpha");
    cluster.restart("alpha");
    cluster.wait_for(
        "alpha to settle the migration",
        Duration::from_secs(60),
        |c| migration(c, &id)["status"] == "completed",
    );
    assert_moved_to_beta(&cluster, "pc2");
    cluster.wait_for("alpha to release its copy", Duration::from_secs(20), |c| {
        c.vms_on("alpha").is_empty()
    });
}

/// Cancels fired at a storage migration from a later moment each time, until it is over:
/// whatever the race decides, exactly one copy of the disk remains, the VM runs on the host
/// that holds it, and the guest finds every block it wrote.
#[test]
fn cancels_racing_a_storage_migration_to_its_end_leave_exactly_one_copy_of_the_disk() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    let alpha_local = cluster.dir().join("alpha").join("disks");
    let beta_local = cluster.dir().join("beta").join("disks");
    let mut outcomes = Vec::new();
    for round in 0..4u64 {
        let vm = format!("race{round}");
        let id = start_storage_move(&cluster, &vm);
        std::thread::sleep(Duration::from_millis(round * 120));
        let report = loop {
            let (status, body) =
                cluster.api_post("alpha", &format!("/v1/vms/{vm}/migrate/cancel"), "{}");
            assert_ne!(status, 500, "cancel answered an internal error: {body}");
            let report = migration(&cluster, &id);
            if ["completed", "rolled_back", "cancelled"]
                .contains(&report["status"].as_str().unwrap_or(""))
            {
                break report;
            }
        };
        let status = report["status"].as_str().unwrap().to_string();
        if status == "completed" {
            assert_moved_to_beta(&cluster, &vm);
        } else {
            cluster.wait_for("the partial image removed", Duration::from_secs(20), |_| {
                !has_image(&beta_local, &vm)
            });
            assert!(has_image(&alpha_local, &vm), "{report:#}");
            let now = cluster.vm(&vm).unwrap();
            assert_eq!(now["host"], "alpha", "{now:#}");
            assert_eq!(now["state"], "running", "{now:#}");
            assert_eq!(now["disks"][0]["locked"], true);
            wait_for_writes(&cluster, &vm, 256);
            assert_eq!(cluster.vm(&vm).unwrap()["guest_failures"], 0);
        }
        cluster.ferryctl_ok(&["vm", "stop", &vm]);
        outcomes.push(status);
    }
    eprintln!("outcomes: {outcomes:?}");
}
