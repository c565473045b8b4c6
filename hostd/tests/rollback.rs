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
        [
            "completed",
            "rolled_back",
            "cancelled",
            "refused",
            "failed",
            "lost_after_switch_over",
        ]
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
    // A dead host cannot say why: the report says what was seen, naming it.
    let error = report["error"].as_str().unwrap_or("");
    assert!(error.contains("beta") || error.contains("data"), "{error}");
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert_eq!(
        downtime, 0.0,
        "killed in pre-copy: the guest never stopped: {report:#}"
    );
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
    // Beta dropped the control connection and its data streams with the same reason:
    // whichever alpha read first, the report names beta and what happened.
    let error = report["error"].as_str().unwrap_or("");
    assert!(
        error.contains("'beta'")
            && (error.contains("closed the control channel")
                || error.contains("control channel dropped")),
        "{error}"
    );
    // The guest was paused in stop-and-copy until the rollback resumed it.
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0, "{report:#}");
    assert!(
        cluster.log("beta").contains("fault injection"),
        "the fault fired"
    );
    assert_back_on_source(&cluster, "s1", true);
    assert_nothing_left_on(&cluster, "beta", "s1");
}

/// A rollback after a long pause reports the whole pause: beta takes 5 s to load the state,
/// and its hostd is killed 1.5 s into that, with the guest paused on alpha all along.
#[test]
fn a_rollback_after_a_long_pause_reports_the_whole_pause() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("slow-state-load"),
    ]);
    counter_vm(&cluster, "lp", "128M", 0);
    let id = start_migration(&cluster, "lp", "beta");
    // The stage reads switch_over only once the guest is paused.
    cluster.wait_for(
        "the guest paused for the switch-over",
        Duration::from_secs(30),
        |c| migration(c, &id)["stage"] == "switch_over",
    );
    let paused_for_at_least = Duration::from_millis(1500);
    std::thread::sleep(paused_for_at_least);
    cluster.kill("beta");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(
        downtime >= paused_for_at_least.as_secs_f64() * 1000.0
            && downtime <= report["total_ms"].as_f64().unwrap(),
        "the guest was paused at least {paused_for_at_least:?}: {report:#}"
    );
    assert_back_on_source(&cluster, "lp", false);
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
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("cancelled by the operator"),
        "{report:#}"
    );
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

/// Nothing of a discarded arriving VM is left in beta's state directory.
fn assert_nothing_left_on(cluster: &TestCluster, host: &str, vm: &str) {
    let leftovers: Vec<String> = std::fs::read_dir(cluster.state_dir(host))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(vm))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "{host} kept files of the discarded VM: {leftovers:?}"
    );
}

/// Every way the destination can fail before the switch-over: the source rolls back, and
/// the report carries the destination's own reason, not "the peer closed the channel".
/// The guest's pause is reported as it was: none when it never stopped, at least until all
/// memory was sent when it did.
#[test]
fn destination_failures_reach_the_operator_with_their_reason() {
    struct Case {
        fault: Option<&'static str>,
        extra: &'static [&'static str],
        expect: &'static [&'static str],
        paused: bool,
    }
    let cases = [
        // Out of resources while building the arriving VM.
        Case {
            fault: Some("fail-prepare"),
            extra: &[],
            expect: &["host 'beta' cannot build the VM", "Cannot allocate memory"],
            paused: false,
        },
        // The state does not load.
        Case {
            fault: Some("reject-state"),
            extra: &[],
            expect: &["incoming VM state rejected"],
            paused: true,
        },
        // The memory that arrived is not what was sent.
        Case {
            fault: Some("corrupt-arriving-memory"),
            extra: &["--verify"],
            expect: &["memory hash mismatch"],
            paused: true,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let beta = match case.fault {
            Some(fault) => HostSpec::new("beta").fault(fault),
            None => HostSpec::new("beta"),
        };
        let cluster = cluster(vec![HostSpec::new("alpha"), beta]);
        let name = format!("r{i}");
        counter_vm(&cluster, &name, "64M", 0);
        let mut args = vec!["migrate", name.as_str(), "--to", "beta", "--json"];
        args.extend_from_slice(case.extra);
        let result = cluster.ferryctl(&args);
        assert_eq!(result.code, Some(1), "{result:?}");
        let report = result.json();
        assert_eq!(report["status"], "rolled_back", "{report:#}");
        let error = report["error"].as_str().unwrap_or("");
        for text in case.expect {
            assert!(
                error.contains(text),
                "{:?}: '{text}' not in: {error}",
                case.fault
            );
        }
        assert!(!error.contains("closed the control channel"), "{error}");
        let downtime = report["downtime_ms"].as_f64().expect("downtime reported");
        if case.paused {
            let sent = report["source_downtime_ms"].as_f64().unwrap_or(0.0);
            assert!(
                downtime > 0.0 && downtime >= sent,
                "the guest was paused until at least all memory was sent ({sent} ms): {report:#}"
            );
            assert!(
                downtime <= report["total_ms"].as_f64().unwrap(),
                "{report:#}"
            );
        } else {
            assert_eq!(downtime, 0.0, "the guest never stopped: {report:#}");
        }
        assert_back_on_source(&cluster, &name, true);
        assert_nothing_left_on(&cluster, "beta", &name);
    }
}

/// The console log cannot be created on the destination (a directory sits where it goes):
/// the reason reaches the operator, and what was there stays untouched.
#[test]
fn destination_that_cannot_create_the_console_log_says_so() {
    let cluster = cluster(vec![HostSpec::new("alpha"), HostSpec::new("beta")]);
    counter_vm(&cluster, "c9", "64M", 0);
    let blocker = cluster.state_dir("beta").join("c9.console.log");
    std::fs::create_dir_all(&blocker).unwrap();
    let result = cluster.ferryctl(&["migrate", "c9", "--to", "beta", "--json"]);
    let report = result.json();
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    let error = report["error"].as_str().unwrap_or("");
    assert!(
        error.contains("cannot build the VM") && error.contains("console"),
        "{error}"
    );
    assert!(
        blocker.is_dir(),
        "the directory in the way was left as it was"
    );
    assert_back_on_source(&cluster, "c9", true);
}

/// A VM that lived on beta before comes back: the migration fails at the last step, and its
/// old console log on beta is left exactly as it was.
#[test]
fn a_discarded_return_leaves_the_old_console_log_as_it_was() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("reject-state"),
    ]);
    counter_vm(&cluster, "back", "64M", 0);
    let old = cluster.state_dir("beta").join("back.console.log");
    std::fs::write(&old, b"an earlier life\n").unwrap();
    let result = cluster.ferryctl(&["migrate", "back", "--to", "beta", "--json"]);
    assert_eq!(result.json()["status"], "rolled_back");
    assert_eq!(std::fs::read(&old).unwrap(), b"an earlier life\n");
    assert_back_on_source(&cluster, "back", true);
}

/// Cancelling once the switch-over has begun is refused as a conflict (409, "too late"),
/// never as an internal error: at a commit whose confirmation is held up (certain, with a
/// partition that heals after 3 s), and in a loop racing migrations to their end.
#[test]
fn cancel_at_the_switch_over_is_a_conflict_never_an_internal_error() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("partition-after-commit-healing"),
        HostSpec::new("gamma"),
    ]);
    counter_vm(&cluster, "late", "64M", 0);
    let id = start_migration(&cluster, "late", "beta");
    cluster.wait_for("the commit to be in doubt", Duration::from_secs(30), |c| {
        migration(c, &id)["status"] == "in_doubt"
    });
    let (status, body) = cluster.api_post("alpha", "/v1/vms/late/migrate/cancel", "{}");
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("too late"),
        "{body}"
    );
    let cancelled = cluster.ferryctl(&["migrate-cancel", "late"]);
    assert_eq!(cancelled.code, Some(2), "{cancelled:?}");
    assert!(cancelled.stderr.contains("too late"), "{cancelled:?}");
    assert_eq!(wait_final(&cluster, &id)["status"], "completed");

    // Racing: cancels from the last stages until the migration is over.
    for round in 0..5 {
        let name = format!("race{round}");
        counter_vm(&cluster, &name, "128M", 0);
        let (status, body) = cluster.api_post(
            "alpha",
            &format!("/v1/vms/{name}/migrate"),
            r#"{"to":"gamma"}"#,
        );
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        let mut answers = std::collections::BTreeMap::new();
        loop {
            let (status, body) =
                cluster.api_post("alpha", &format!("/v1/vms/{name}/migrate/cancel"), "{}");
            assert_ne!(status, 500, "cancel answered an internal error: {body}");
            if status == 409 {
                let message = body["error"].as_str().unwrap_or("");
                assert!(message.contains("too late"), "{body}");
            }
            *answers.entry(status).or_insert(0) += 1;
            let report = migration(&cluster, &id);
            if ["completed", "rolled_back", "cancelled"]
                .contains(&report["status"].as_str().unwrap_or(""))
            {
                break;
            }
        }
        // After the end, nothing is in progress to cancel.
        let (status, body) =
            cluster.api_post("alpha", &format!("/v1/vms/{name}/migrate/cancel"), "{}");
        assert_eq!(status, 404, "{body}");
        cluster.ferryctl_ok(&["vm", "stop", &name]);
        eprintln!("round {round}: cancel answers {answers:?}");
    }
}

/// The confirmation is lost and beta answers no query for a few seconds (a partition that
/// heals). Alpha keeps its copy paused, then learns that beta runs the VM and completes.
/// The reported downtime is the guest's real pause, which ended on beta long before alpha
/// heard of it: not the time alpha spent asking.
#[test]
fn an_in_doubt_switch_over_that_completes_reports_the_real_pause() {
    let cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("partition-after-commit-healing"),
    ]);
    counter_vm(&cluster, "h1", "64M", 0);
    let result = cluster.ferryctl(&["migrate", "h1", "--to", "beta", "--json"]);
    let report = result.json();
    assert_eq!(report["status"], "completed", "{report:#}");
    assert!(cluster.log("beta").contains("leaving a query unanswered"));
    let downtime = report["downtime_ms"].as_f64().unwrap();
    let total = report["total_ms"].as_f64().unwrap();
    // Beta ignored queries for 3 s after running the VM: all of that is after the pause
    // ended, so it is in the total and not in the downtime.
    assert!(
        downtime > 0.0 && downtime + 3000.0 <= total,
        "downtime {downtime} ms, total {total} ms: {report:#}"
    );
    assert!(downtime >= report["source_downtime_ms"].as_f64().unwrap());
    let vm = cluster.vm("h1").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["state"], "running");
    assert!(cluster.vms_on("alpha").is_empty());
}

/// Beta runs the VM on commit, the confirmation is lost in a partition, and beta's hostd is
/// killed and restarted while still cut off. The VM's VMM process outlived that hostd, so the
/// restarted one reattaches it and answers from its journal: the VM is here. Alpha completes
/// and releases its copy; the guest ran on without a gap and never went back in time.
#[test]
fn destination_hostd_killed_after_commit_keeps_the_vm_and_the_source_completes() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("partition-after-commit"),
    ]);
    counter_vm(&cluster, "p2", "64M", 0);
    let id = start_migration(&cluster, "p2", "beta");
    cluster.wait_for("the VM to run on beta", Duration::from_secs(30), |c| {
        c.log("beta").contains("VM taken over")
    });
    cluster.wait_for("alpha to be in doubt", Duration::from_secs(30), |c| {
        migration(c, &id)["status"] == "in_doubt"
    });
    let (status, on_beta) = cluster.api_get("beta", "/v1/vms/p2");
    assert_eq!(status, 200, "{on_beta}");
    let pid = on_beta["vmm_pid"].as_u64().unwrap();
    cluster.kill("beta");
    let before = cluster.logged_ticks("beta", "p2").len();
    cluster.wait_for(
        "ticks on beta with its hostd down",
        Duration::from_secs(10),
        |c| c.logged_ticks("beta", "p2").len() >= before + 10,
    );
    cluster.restart("beta");
    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "completed", "{report:#}");
    let vm = cluster.vm("p2").unwrap();
    assert_eq!(vm["host"], "beta");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vmm_pid"].as_u64(), Some(pid), "the same VMM process");
    assert!(
        cluster.vms_on("alpha").is_empty(),
        "alpha released its copy"
    );
    let now = cluster.ticks("p2").len();
    cluster.wait_for("ticks on beta", Duration::from_secs(10), |c| {
        c.ticks("p2").len() >= now + 10
    });
    assert_consecutive_from_one(&cluster.ticks("p2"));
}

/// The exact scenario that once sent a guest back in time, with the VM really lost: beta
/// runs the VM on commit, the confirmation is lost in a partition, and beta's hostd and the
/// VM's VMM process both die while cut off. When alpha finally gets an answer, it comes from
/// beta's journal: committed here, then lost. Alpha keeps its copy paused and stale, so no
/// tick is ever printed twice; only the operator's explicit recovery runs it again.
#[test]
fn partition_after_commit_and_destination_lost_never_rewinds_the_guest() {
    let mut cluster = cluster(vec![
        HostSpec::new("alpha"),
        HostSpec::new("beta").fault("partition-after-commit"),
    ]);
    counter_vm(&cluster, "p1", "64M", 0);
    let id = start_migration(&cluster, "p1", "beta");
    cluster.wait_for("the VM to run on beta", Duration::from_secs(30), |c| {
        c.log("beta").contains("VM taken over")
    });
    cluster.wait_for("alpha to be in doubt", Duration::from_secs(30), |c| {
        migration(c, &id)["status"] == "in_doubt"
    });
    let (_, on_beta) = cluster.api_get("beta", "/v1/vms/p1");
    let pid = on_beta["vmm_pid"].as_u64().unwrap() as u32;
    // Let the guest run on beta for a while: those ticks exist only there.
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill("beta");
    ferry_tests::kill_process(pid);
    cluster.wait_for("beta's VMM to be gone", Duration::from_secs(10), |_| {
        !ferry_tests::process_alive(pid)
    });
    let beta_ticks = cluster.logged_ticks("beta", "p1");
    cluster.restart("beta");
    assert!(
        cluster.log("beta").contains("settled"),
        "beta's restart settled the committed record"
    );

    let report = wait_final(&cluster, &id);
    assert_eq!(report["status"], "lost_after_switch_over", "{report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("committed the switch-over and then lost the VM")
            && error.contains("--from-stale-copy"),
        "{error}"
    );
    let vm = cluster.vm("p1").expect("the stale copy is still on alpha");
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "stale");

    // The stale copy does not run: its console stops where the switch-over paused it,
    // behind what the guest printed on beta.
    let on_alpha = cluster.ticks("p1");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.ticks("p1"), on_alpha, "the stale copy ran");
    assert_consecutive_from_one(&on_alpha);
    let last_alpha = *on_alpha.last().unwrap();
    assert!(
        beta_ticks.iter().any(|&t| t > last_alpha),
        "beta ran the guest past alpha's last tick {last_alpha}: {:?}",
        &beta_ticks[beta_ticks.len().saturating_sub(3)..]
    );
    // Resuming it the ordinary way is refused; recovery needs the explicit flag.
    let resume = cluster.ferryctl(&["vm", "resume", "p1"]);
    assert_eq!(resume.code, Some(2), "{resume:?}");
    let refused = cluster.ferryctl(&["vm", "recover", "p1"]);
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("--from-stale-copy"), "{refused:?}");
    let recovered = cluster.ferryctl(&["vm", "recover", "p1", "--from-stale-copy"]);
    assert_eq!(recovered.code, Some(0), "{recovered:?}");
    assert!(recovered.stderr.contains("went back"), "{recovered:?}");
    cluster.wait_for("the recovered copy to run", Duration::from_secs(10), |c| {
        c.ticks("p1").len() > on_alpha.len() + 5
    });
    assert_eq!(cluster.vm("p1").unwrap()["state"], "running");
}
