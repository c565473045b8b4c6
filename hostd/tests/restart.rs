//! VMs live in VMM processes of their own and outlive hostd: a killed or restarted hostd
//! finds them again; a VMM process that dies is reported as crashed, never forgotten. Real
//! hostd and VMM processes; needs /dev/kvm and root.

use std::path::Path;
use std::time::Duration;

use ferry_tests::{
    HostSpec, TestCluster, assert_consecutive_from_one, kill_process, process_alive,
};

fn cluster() -> TestCluster {
    TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        vec![HostSpec::new("alpha"), HostSpec::new("beta")],
    )
}

fn counter_vm(cluster: &TestCluster, name: &str) -> serde_json::Value {
    let created = cluster
        .ferryctl_ok(&[
            "vm",
            "create",
            name,
            "--host",
            "alpha",
            "--guest",
            "counter",
            "--memory",
            "64M",
            "--ticks-per-sec",
            "50",
            "--json",
        ])
        .json();
    cluster.wait_for("ticks", Duration::from_secs(10), |c| {
        c.ticks(name).len() >= 10
    });
    created
}

fn pid_of(vm: &serde_json::Value) -> u32 {
    vm["vmm_pid"].as_u64().expect("a VMM process id") as u32
}

/// The guest keeps ticking into its console log while alpha's hostd is down, however it went
/// down; when hostd is back the VM is reattached: same process, running, every tick there.
fn survives(stop: impl FnOnce(&mut TestCluster)) {
    let mut cluster = cluster();
    let created = counter_vm(&cluster, "r1");
    let pid = pid_of(&created);
    assert!(process_alive(pid));
    stop(&mut cluster);
    let before = cluster.logged_ticks("alpha", "r1").len();
    cluster.wait_for("ticks while hostd is down", Duration::from_secs(10), |c| {
        c.logged_ticks("alpha", "r1").len() >= before + 25
    });
    cluster.restart("alpha");
    let vm = cluster.vm("r1").expect("the VM is known again");
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running", "{vm:#}");
    assert_eq!(pid_of(&vm), pid, "the same VMM process");
    let host = cluster.ferryctl_ok(&["host", "show", "alpha"]).json();
    assert!(
        host["started_unix_ms"].as_u64() > vm["vmm_started_unix_ms"].as_u64(),
        "hostd restarted under the running VM: {host:#}"
    );
    let now = cluster.ticks("r1").len();
    cluster.wait_for("ticks after the restart", Duration::from_secs(10), |c| {
        c.ticks("r1").len() >= now + 10
    });
    assert_consecutive_from_one(&cluster.ticks("r1"));
    // Reattached means fully driven: it migrates there and back.
    for to in ["beta", "alpha"] {
        let result = cluster.ferryctl(&["migrate", "r1", "--to", to, "--json"]);
        assert_eq!(result.json()["status"], "completed", "{result:?}");
    }
    assert!(
        !process_alive(pid),
        "the first VMM process ended with the move"
    );
    let now = cluster.ticks("r1").len();
    cluster.wait_for("ticks after the moves", Duration::from_secs(10), |c| {
        c.ticks("r1").len() >= now + 10
    });
    assert_consecutive_from_one(&cluster.ticks("r1"));
}

#[test]
fn a_vm_outlives_its_hostd_killed_and_is_reattached() {
    survives(|cluster| cluster.kill("alpha"));
}

#[test]
fn a_vm_outlives_a_graceful_hostd_restart() {
    survives(|cluster| cluster.terminate("alpha"));
}

/// `vm stop` ends the VMM process; the VM is gone from the inventory across restarts too.
#[test]
fn stop_still_stops_after_a_restart() {
    let mut cluster = cluster();
    let pid = pid_of(&counter_vm(&cluster, "s1"));
    cluster.terminate("alpha");
    cluster.restart("alpha");
    cluster.ferryctl_ok(&["vm", "stop", "s1"]);
    cluster.wait_for("the VMM process to end", Duration::from_secs(10), |_| {
        !process_alive(pid)
    });
    assert!(
        !cluster.state_dir("alpha").join("vmm/s1.sock").exists(),
        "its socket went with it"
    );
    cluster.kill("alpha");
    cluster.restart("alpha");
    assert!(
        cluster.vms_on("alpha").is_empty(),
        "a stopped VM stays stopped"
    );
    assert_eq!(cluster.memory_used("alpha"), 0);
}

/// A VMM process killed under a running hostd: the VM is reported crashed, with the signal;
/// its memory is no longer counted; `vm stop` removes it.
#[test]
fn a_killed_vmm_is_reported_crashed_with_its_signal() {
    let cluster = cluster();
    let pid = pid_of(&counter_vm(&cluster, "k1"));
    kill_process(pid);
    cluster.wait_for("the crash to be seen", Duration::from_secs(10), |c| {
        c.vm("k1").is_some_and(|v| v["state"] == "crashed")
    });
    let vm = cluster.vm("k1").unwrap();
    let crash = vm["crash"].as_str().unwrap_or("");
    assert!(crash.contains("killed by signal 9"), "{vm:#}");
    assert_eq!(
        cluster.memory_used("alpha"),
        0,
        "a crashed VM holds no memory"
    );
    let resume = cluster.ferryctl(&["vm", "resume", "k1"]);
    assert_eq!(
        resume.code,
        Some(2),
        "a crashed VM cannot be resumed: {resume:?}"
    );
    cluster.ferryctl_ok(&["vm", "stop", "k1"]);
    assert_eq!(cluster.vm("k1").unwrap()["state"], "stopped");
}

/// A VMM process that dies while hostd is down: the restarted hostd reports the VM
/// crashed (it cannot know how the process ended) and clears the dead socket.
#[test]
fn a_vmm_that_died_while_hostd_was_down_is_crashed_not_forgotten() {
    let mut cluster = cluster();
    let pid = pid_of(&counter_vm(&cluster, "d1"));
    cluster.kill("alpha");
    kill_process(pid);
    cluster.wait_for("the VMM to be gone", Duration::from_secs(10), |_| {
        !process_alive(pid)
    });
    let socket = cluster.state_dir("alpha").join("vmm/d1.sock");
    assert!(socket.exists(), "a killed VMM leaves its socket behind");
    cluster.restart("alpha");
    let vm = cluster.vm("d1").expect("the crashed VM is still listed");
    assert_eq!(vm["state"], "crashed", "{vm:#}");
    assert!(
        vm["crash"]
            .as_str()
            .unwrap_or("")
            .contains("while hostd was down"),
        "{vm:#}"
    );
    assert!(!socket.exists(), "the dead socket was cleared");
    assert!(
        cluster
            .log("alpha")
            .contains("no VMM process serves it any more"),
        "the cleanup is logged"
    );
}
