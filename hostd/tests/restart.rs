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

/// A counter VM on alpha whose first pre-copy round takes a while: 1.4 GiB of random
/// content that does not compress.
fn big_counter_vm(cluster: &TestCluster, name: &str) {
    let file = cluster.dir().join(format!("{name}-random.bin"));
    ferry_runtime::content::write_file(
        &file,
        ferry_runtime::content::Content::Random,
        1400 << 20,
        7,
    )
    .unwrap();
    let preload = format!("{}@64M", file.display());
    cluster.ferryctl_ok(&[
        "vm",
        "create",
        name,
        "--host",
        "alpha",
        "--guest",
        "counter",
        "--memory",
        "1600M",
        "--ticks-per-sec",
        "50",
        "--preload",
        &preload,
    ]);
    cluster.wait_for("ticks", Duration::from_secs(10), |c| {
        c.ticks(name).len() >= 10
    });
}

fn start_migration(cluster: &TestCluster, vm: &str) -> String {
    let (status, body) = cluster.api_post(
        "alpha",
        &format!("/v1/vms/{vm}/migrate"),
        r#"{"to":"beta"}"#,
    );
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

fn report(cluster: &TestCluster, id: &str) -> serde_json::Value {
    cluster.api_get("alpha", &format!("/v1/migrations/{id}")).1
}

/// Waits until migration `id` has ended, however; returns its report.
fn wait_final(cluster: &TestCluster, id: &str) -> serde_json::Value {
    cluster.wait_for("the migration to end", Duration::from_secs(60), |c| {
        [
            "completed",
            "rolled_back",
            "failed",
            "lost_after_switch_over",
        ]
        .contains(&report(c, id)["status"].as_str().unwrap_or(""))
    });
    report(cluster, id)
}

/// Beta holds nothing of the VM: no VM, no memory, no VMM process.
fn beta_holds_nothing(cluster: &TestCluster) {
    cluster.wait_for("beta to let go", Duration::from_secs(30), |c| {
        c.vms_on("beta").is_empty()
            && c.memory_used("beta") == 0
            && ferry_vmm::spawn::vmms_under(&c.state_dir("beta")).is_empty()
    });
}

/// The VM runs on alpha, its ticks consecutive from 1.
fn running_on_alpha(cluster: &TestCluster, name: &str) {
    cluster.wait_for("the VM to run on alpha", Duration::from_secs(30), |c| {
        c.vm(name)
            .is_some_and(|v| v["host"] == "alpha" && v["state"] == "running")
    });
    let now = cluster.ticks(name).len();
    cluster.wait_for("ticks on alpha", Duration::from_secs(10), |c| {
        c.ticks(name).len() >= now + 10
    });
    assert_consecutive_from_one(&cluster.ticks(name));
}

/// The source's hostd dies in pre-copy. The VM never stopped (its VMM runs on); the
/// restarted hostd finds the migration on record before its commit, gives the VM back its
/// tracking and throttle, and reports the migration rolled back; beta discarded its copy.
#[test]
fn source_hostd_killed_in_pre_copy_leaves_the_vm_on_the_source() {
    let mut cluster = cluster();
    big_counter_vm(&cluster, "sp");
    let id = start_migration(&cluster, "sp");
    cluster.wait_for("pre-copy under way", Duration::from_secs(30), |c| {
        let r = report(c, &id);
        r["stage"] == "pre_copy" && r["guest_bytes"].as_u64() > Some(64 << 20)
    });
    cluster.kill("alpha");
    cluster.restart("alpha");
    running_on_alpha(&cluster, "sp");
    let after = report(&cluster, &id);
    assert_eq!(after["status"], "rolled_back", "{after:#}");
    assert!(
        after["error"]
            .as_str()
            .unwrap_or("")
            .contains("hostd restarted"),
        "{after:#}"
    );
    assert_eq!(cluster.vm("sp").unwrap()["throttle_pct"], 0);
    beta_holds_nothing(&cluster);
}

/// The source's hostd dies while the guest is paused for the switch-over, before the
/// commit (beta is slow to load the state). The restarted hostd resumes the VM where it
/// was; beta discards its copy.
#[test]
fn source_hostd_killed_with_the_guest_paused_resumes_it_on_the_source() {
    let mut cluster = TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        vec![
            HostSpec::new("alpha"),
            HostSpec::new("beta").fault("slow-state-load"),
        ],
    );
    counter_vm(&cluster, "ss");
    let id = start_migration(&cluster, "ss");
    cluster.wait_for(
        "the guest paused for the switch-over",
        Duration::from_secs(30),
        |c| report(c, &id)["stage"] == "switch_over",
    );
    let before = cluster.logged_ticks("alpha", "ss").len();
    cluster.kill("alpha");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        cluster.logged_ticks("alpha", "ss").len(),
        before,
        "the guest is paused"
    );
    cluster.restart("alpha");
    running_on_alpha(&cluster, "ss");
    let after = report(&cluster, &id);
    assert_eq!(after["status"], "rolled_back", "{after:#}");
    let error = after["error"].as_str().unwrap_or("");
    assert!(
        error.contains("hostd restarted during the migration")
            && error.contains("'beta' discarded its copy"),
        "{after:#}"
    );
    beta_holds_nothing(&cluster);
}

/// The source's VMM process dies in pre-copy: the migration fails and says the VM crashed
/// on alpha; beta discards its copy.
#[test]
fn a_source_vmm_killed_mid_migration_fails_it_and_says_so() {
    let cluster = cluster();
    big_counter_vm(&cluster, "sv");
    let pid = pid_of(&cluster.vm("sv").unwrap());
    let id = start_migration(&cluster, "sv");
    cluster.wait_for("pre-copy under way", Duration::from_secs(30), |c| {
        let r = report(c, &id);
        r["stage"] == "pre_copy" && r["guest_bytes"].as_u64() > Some(64 << 20)
    });
    kill_process(pid);
    let after = wait_final(&cluster, &id);
    assert_eq!(after["status"], "failed", "{after:#}");
    assert!(
        after["error"].as_str().unwrap_or("").contains("crashed"),
        "{after:#}"
    );
    let vm = cluster.vm("sv").unwrap();
    assert_eq!(vm["state"], "crashed", "{vm:#}");
    assert!(vm["crash"].as_str().unwrap_or("").contains("signal 9"));
    beta_holds_nothing(&cluster);
}

/// The destination's VMM process dies while the VM arrives: beta discards it, alpha rolls
/// back, and the guest never noticed.
#[test]
fn a_destination_vmm_killed_mid_migration_rolls_back() {
    let cluster = cluster();
    big_counter_vm(&cluster, "dv");
    let id = start_migration(&cluster, "dv");
    let mut arriving = None;
    cluster.wait_for("the arriving VM on beta", Duration::from_secs(30), |c| {
        let (status, vm) = c.api_get("beta", "/v1/vms/dv");
        arriving = (status == 200).then(|| vm["vmm_pid"].as_u64()).flatten();
        arriving.is_some() && report(c, &id)["stage"] == "pre_copy"
    });
    kill_process(arriving.unwrap() as u32);
    let after = wait_final(&cluster, &id);
    assert_eq!(after["status"], "rolled_back", "{after:#}");
    assert!(
        after["error"]
            .as_str()
            .unwrap_or("")
            .contains("destination failed"),
        "{after:#}"
    );
    running_on_alpha(&cluster, "dv");
    beta_holds_nothing(&cluster);
}

/// The source's hostd dies after its commit went out, before it heard back (the answer is
/// held up by a partition that heals after 3 s). The restarted hostd finds the commit on
/// record, keeps the VM paused, asks beta, learns beta runs it, and releases its copy:
/// the guest never ran twice and never went back.
#[test]
fn source_hostd_killed_after_its_commit_asks_before_anything_else() {
    let mut cluster = TestCluster::loopback(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        vec![
            HostSpec::new("alpha"),
            HostSpec::new("beta").fault("partition-after-commit-healing"),
        ],
    );
    let pid = pid_of(&counter_vm(&cluster, "sc"));
    let id = start_migration(&cluster, "sc");
    cluster.wait_for("alpha to be in doubt", Duration::from_secs(30), |c| {
        report(c, &id)["status"] == "in_doubt"
    });
    cluster.kill("alpha");
    let paused_at = cluster.logged_ticks("alpha", "sc").len();
    cluster.restart("alpha");
    let after = wait_final(&cluster, &id);
    assert_eq!(after["status"], "completed", "{after:#}");
    assert!(
        cluster
            .log("alpha")
            .contains("hostd restarted in this migration's switch-over"),
        "alpha took the migration over"
    );
    cluster.wait_for(
        "alpha's copy to be released",
        Duration::from_secs(10),
        |_| !process_alive(pid),
    );
    assert_eq!(
        cluster.logged_ticks("alpha", "sc").len(),
        paused_at,
        "alpha's copy never ran again"
    );
    let vm = cluster.vm("sc").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["state"], "running");
    assert!(cluster.vms_on("alpha").is_empty());
    let now = cluster.ticks("sc").len();
    cluster.wait_for("ticks on beta", Duration::from_secs(10), |c| {
        c.ticks("sc").len() >= now + 10
    });
    assert_consecutive_from_one(&cluster.ticks("sc"));
}
