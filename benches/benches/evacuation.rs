//! Evacuating a host: 8 idle VMs of 512 MiB (half of it mixed content) leave alpha for beta
//! and gamma, three hosts each in a network namespace of its own on one switch (a bridge in
//! a fourth namespace). Three ways:
//!
//! - Ferry's maintenance mode (`host maintenance enter alpha`): placement by free memory,
//!   at most `max_concurrent` (2) migrations at once on each host, largest first;
//! - Ferry one VM at a time, to beta and gamma in turn, as a script looping over
//!   `ferryctl migrate` would (the sum of the migrations' own times: a script with no gap);
//! - QEMU 7.2 one guest at a time, at its best setting (no bandwidth cap, multifd), as a
//!   libvirt user migrating guests one by one would: the sum of the migrations' total-time.
//!   QEMU runs over loopback in the root namespace (its harness boots each guest there);
//!   loopback costs no more than a veth pair.
//!
//! hostd is this benchmark's own executable run as a daemon (`evacuation hostd CONFIG
//! HOST`) inside each namespace, and its VMMs are this executable too (`evacuation vmm ...`).
//!
//! Run: `cargo bench -p ferry-benches --bench evacuation`
//!
//! - `FERRY_BENCH_VMS`: VMs to evacuate (default 8).
//! - `FERRY_BENCH_CONCURRENT`: every host's `max_concurrent` (default 2, Ferry's default).
//! - `FERRY_BENCH_RUNS`: runs per case (default 3); the table shows medians.
//! - `FERRY_BENCH_QEMU`, `FERRY_BENCH_NO_QEMU=1`, `FERRY_BENCH_QEMU_CHANNELS`: as in the
//!   migration benchmark.

use std::error::Error;
use std::path::Path;
use std::process::{Child, ExitCode};
use std::time::Duration;

use ferry_actors::evacuation::EvacuationReport;
use ferry_benches::qemu::{self, Preset};
use ferry_benches::{Table, env_number, median};
use ferry_runtime::content::{self, Content};
use ferry_runtime::guest::multiboot_workload;
use ferry_runtime::{GuestOptions, TestGuest};
use ferry_tests::Netns;
use hostd::api_types::{CreateVmRequest, MaintenanceRequest, MigrateRequest};
use hostd::client::Client;
use hostd::config::Cluster;

const MIB: u64 = 1 << 20;
const VM_MEMORY: u64 = 512 * MIB;
const CONTENT: u64 = 256 * MIB;
/// Where the content starts (as in the migration benchmark).
const CONTENT_AT: u64 = 4 * MIB;
const IDLE_TICKS_PER_SEC: u32 = 10;
const HOSTS: [&str; 3] = ["alpha", "beta", "gamma"];
const CONTROL_PORT: u16 = 7711;

/// The three hostd processes in their namespaces; stopped, with their VMMs, on drop.
struct Hosts {
    _netns: Netns,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SAFETY: kill(2) on our own child (`ip netns exec` execs hostd in place).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        ferry_vmm::spawn::kill_vmms_under(&self.dir);
    }
}

fn start_hosts(dir: &Path, concurrent: u64) -> Result<(Hosts, Client), Box<dyn Error>> {
    let netns = Netns::switched(HOSTS.len());
    let mut text = format!(
        "[cluster]\nname = \"evacuation\"\n[migration]\nencryption = \"disabled\"\nmax_concurrent = {concurrent}\n[tls]\nca = \"certs/ca.pem\"\n[[networks]]\nname = \"vmnet\"\n",
    );
    for (i, host) in HOSTS.iter().enumerate() {
        text.push_str(&format!(
            "[[hosts]]\nname = \"{host}\"\ncontrol = \"{addr}:{CONTROL_PORT}\"\ndata = [\"{addr}:0\"]\nmemory = \"6G\"\nnetworks = [{{ name = \"vmnet\", interface = \"{interface}\" }}]\ntls_cert = \"certs/{host}.pem\"\ntls_key = \"certs/{host}.key\"\nstate_dir = \"{dir}/{host}\"\n",
            addr = netns.addrs[i],
            interface = netns.interfaces[i],
            dir = dir.display(),
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text)?;
    let cluster = Cluster::load(&path)?;
    hostd::certs::init(&cluster, &dir.join("certs"))?;
    let mut hosts = Hosts {
        _netns: netns,
        children: Vec::new(),
        dir: dir.to_path_buf(),
    };
    for (i, host) in HOSTS.iter().enumerate() {
        let child = ferry_benches::spawn_hostd(
            Some(&hosts._netns.names[i]),
            &path,
            host,
            &dir.join(format!("{host}.log")),
        )?;
        hosts.children.push(child);
    }
    // The API is each host's unix socket, which the root namespace reaches.
    let client = Client::new(cluster);
    for host in HOSTS {
        let mut tries = 0;
        while client.host_info(host).is_err() {
            tries += 1;
            if tries > 400 {
                let log = std::fs::read_to_string(dir.join(format!("{host}.log")))?;
                return Err(format!("hostd {host} did not start: {log}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok((hosts, client))
}

fn vm_names(vms: u64) -> Vec<String> {
    (1..=vms).map(|i| format!("e{i}")).collect()
}

/// Moves every VM not on alpha back to it, one at a time (not measured).
fn bring_home(client: &Client, names: &[String]) -> Result<(), Box<dyn Error>> {
    for name in names {
        let (host, _) = client.find_vm(name)?;
        if host.name == "alpha" {
            continue;
        }
        let (source, started) = client.migrate(
            name,
            &MigrateRequest {
                to: "alpha".into(),
                ..Default::default()
            },
        )?;
        let report = client.wait_migration(&source, &started.id, |_| {})?;
        if report.status != "completed" {
            return Err(format!(
                "{name} back to alpha: {}: {:?}",
                report.status, report.error
            )
            .into());
        }
    }
    Ok(())
}

/// One evacuation of alpha through maintenance mode; alpha leaves maintenance after it.
fn evacuate(client: &Client) -> Result<EvacuationReport, Box<dyn Error>> {
    client.enter_maintenance(
        "alpha",
        &MaintenanceRequest {
            evacuate: true,
            options: MigrateRequest::default(),
            total_bandwidth: None,
        },
    )?;
    let report = client.wait_evacuation("alpha", |_| {})?;
    client.exit_maintenance("alpha")?;
    if report.moved != report.total {
        let why: Vec<String> = report
            .vms
            .iter()
            .filter_map(|v| v.reason.as_ref().map(|r| format!("{}: {r}", v.name)))
            .collect();
        return Err(format!("the evacuation left VMs on alpha: {}", why.join("; ")).into());
    }
    Ok(report)
}

/// One VM at a time, to beta and gamma in turn: (sum of total ms, downtimes ms, wire bytes).
fn one_at_a_time(
    client: &Client,
    names: &[String],
) -> Result<(f64, Vec<f64>, u64), Box<dyn Error>> {
    let mut total = 0.0;
    let mut downtimes = Vec::new();
    let mut wire = 0;
    for (i, name) in names.iter().enumerate() {
        let to = if i % 2 == 0 { "beta" } else { "gamma" };
        let (source, started) = client.migrate(
            name,
            &MigrateRequest {
                to: to.into(),
                ..Default::default()
            },
        )?;
        let report = client.wait_migration(&source, &started.id, |_| {})?;
        if report.status != "completed" {
            return Err(format!("{name} to {to}: {}: {:?}", report.status, report.error).into());
        }
        total += report.total_ms;
        downtimes.push(report.downtime_ms.unwrap_or(f64::NAN));
        wire += report.wire_bytes;
    }
    Ok((total, downtimes, wire))
}

fn range(values: &[f64]) -> String {
    format!(
        "{:.2}-{:.2}",
        values.iter().copied().fold(f64::INFINITY, f64::min) / 1e3,
        values.iter().copied().fold(0.0, f64::max) / 1e3
    )
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// One row: case, system, total s, range, per VM s, max downtime, wire MiB, vs QEMU.
struct Row {
    system: String,
    totals_ms: Vec<f64>,
    max_downtime_ms: f64,
    wire_bytes: f64,
}

fn run() -> Result<(), Box<dyn Error>> {
    let runs = env_number("FERRY_BENCH_RUNS", 3)?;
    let vms = env_number("FERRY_BENCH_VMS", 8)?;
    let concurrent = env_number("FERRY_BENCH_CONCURRENT", 2)?;
    let baseline = qemu::Baseline::from_env()?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-evacuation-bench")
        .tempdir_in("/var/tmp")?;
    let module = dir.path().join("content.bin");
    content::write_file(&module, Content::Mixed, CONTENT, 0xe7ac)?;
    let names = vm_names(vms);

    let mut rows = Vec::new();
    {
        let (_hosts, client) = start_hosts(dir.path(), concurrent)?;
        for name in &names {
            client.create_vm(
                "alpha",
                &CreateVmRequest {
                    name: name.clone(),
                    guest: "counter".into(),
                    vcpus: 1,
                    memory: Some(format!("{}M", VM_MEMORY / MIB)),
                    options: GuestOptions {
                        ticks_per_sec: Some(IDLE_TICKS_PER_SEC),
                        ..Default::default()
                    },
                    preloads: vec![format!("{}@{CONTENT_AT:#x}", module.display())],
                    start: true,
                    ..Default::default()
                },
            )?;
        }
        std::thread::sleep(Duration::from_secs(1));

        let mut evacuations = Vec::new();
        for run in 1..=runs {
            eprintln!("evacuation bench: Ferry maintenance mode, run {run}/{runs}");
            let report = evacuate(&client)?;
            let per_vm: Vec<String> = report
                .vms
                .iter()
                .map(|v| {
                    let m = v.migration.as_ref();
                    format!(
                        "{}→{} {:.0} ms (pause {:.1})",
                        v.name,
                        v.to.as_deref().unwrap_or("?"),
                        m.map_or(f64::NAN, |m| m.total_ms),
                        m.and_then(|m| m.downtime_ms).unwrap_or(f64::NAN)
                    )
                })
                .collect();
            eprintln!(
                "  {:.0} ms in all; {}",
                report.elapsed_ms,
                per_vm.join(", ")
            );
            evacuations.push(report);
            bring_home(&client, &names)?;
        }
        let migrations = |r: &EvacuationReport| {
            r.vms
                .iter()
                .filter_map(|v| v.migration.clone())
                .collect::<Vec<_>>()
        };
        rows.push(Row {
            system: "Ferry, maintenance mode (defaults, plain)".into(),
            totals_ms: evacuations.iter().map(|r| r.elapsed_ms).collect(),
            max_downtime_ms: max(&evacuations
                .iter()
                .flat_map(|r| {
                    migrations(r)
                        .into_iter()
                        .map(|m| m.downtime_ms.unwrap_or(f64::NAN))
                })
                .collect::<Vec<_>>()),
            wire_bytes: median(
                &evacuations
                    .iter()
                    .map(|r| migrations(r).iter().map(|m| m.wire_bytes as f64).sum())
                    .collect::<Vec<f64>>(),
            ),
        });

        let mut sequential = Vec::new();
        for run in 1..=runs {
            eprintln!("evacuation bench: Ferry one at a time, run {run}/{runs}");
            let result = one_at_a_time(&client, &names)?;
            eprintln!("  {:.0} ms in all", result.0);
            sequential.push(result);
            bring_home(&client, &names)?;
        }
        rows.push(Row {
            system: "Ferry, one VM at a time (defaults, plain)".into(),
            totals_ms: sequential.iter().map(|r| r.0).collect(),
            max_downtime_ms: max(&sequential
                .iter()
                .flat_map(|r| r.1.clone())
                .collect::<Vec<_>>()),
            wire_bytes: median(&sequential.iter().map(|r| r.2 as f64).collect::<Vec<_>>()),
        });
        for name in &names {
            client.operate(name, "stop")?;
        }
    }

    if baseline.enabled {
        let tsc_khz = qemu::host_tsc_khz()?;
        let guest = TestGuest::Counter {
            ticks_per_sec: IDLE_TICKS_PER_SEC,
        };
        let kernel = multiboot_workload::build(&guest, VM_MEMORY, tsc_khz)?;
        let kernel_path = dir.path().join("counter.elf");
        std::fs::write(&kernel_path, &kernel.elf)?;
        let mut spec = baseline.spec(
            (&kernel_path, &module),
            VM_MEMORY,
            tsc_khz,
            &dir.path().join("qemu"),
        );
        spec.settle = Duration::from_millis(500);
        let preset = Preset::Best {
            multifd_channels: baseline.channels,
        };
        let mut totals = Vec::new();
        let mut downtimes = Vec::new();
        let mut wire = Vec::new();
        for run in 1..=runs {
            eprintln!(
                "evacuation bench: QEMU one at a time, {}, run {run}/{runs}",
                preset.describe()
            );
            let mut total = 0.0;
            let mut bytes = 0.0;
            for _ in &names {
                let report = qemu::migrate(&spec, preset)?;
                total += report.total_ms as f64;
                bytes += report.transferred_bytes as f64;
                downtimes.push(report.downtime_ms as f64);
            }
            eprintln!("  {total:.0} ms in all");
            totals.push(total);
            wire.push(bytes);
        }
        rows.push(Row {
            system: format!(
                "QEMU {} one guest at a time ({})",
                baseline
                    .version
                    .split_whitespace()
                    .nth(3)
                    .unwrap_or(&baseline.version),
                preset.describe()
            ),
            totals_ms: totals,
            max_downtime_ms: max(&downtimes),
            wire_bytes: median(&wire),
        });
    }

    let qemu_total = baseline
        .enabled
        .then(|| rows.last().map(|r| median(&r.totals_ms)))
        .flatten();
    let mut table = Table::new([
        "system, settings",
        "total s",
        "total min-max s",
        "s per VM",
        "max downtime ms",
        "wire MiB",
        "vs QEMU",
    ]);
    for row in &rows {
        let total = median(&row.totals_ms);
        table.row([
            row.system.clone(),
            format!("{:.2}", total / 1e3),
            range(&row.totals_ms),
            format!("{:.2}", total / 1e3 / vms as f64),
            format!("{:.1}", row.max_downtime_ms),
            format!("{:.0}", row.wire_bytes / MIB as f64),
            qemu_total.map_or("-".into(), |q| format!("{:.2}", total / q)),
        ]);
    }
    println!(
        "Evacuating {vms} idle VMs (counter, {IDLE_TICKS_PER_SEC} ticks/s, 1 vCPU, {} MiB with \
         {} MiB of mixed content) from alpha to beta and gamma, three hosts in network \
         namespaces on one switch; {runs} run(s) per case, medians; load average at the end: \
         {}\ntotal: the evacuation from `maintenance enter` until its last VM ran on its \
         destination (hostd's clock); one at a time, the sum of each migration's total (Ferry: \
         request to destination running; QEMU: its total-time).\n{}",
        VM_MEMORY / MIB,
        CONTENT / MIB,
        ferry_benches::load_average(),
        table.render()
    );
    Ok(())
}

fn main() -> ExitCode {
    // This executable is also each namespace's hostd and the VMMs hostd starts.
    ferry_vmm::run_if_vmm();
    if let Some(code) = ferry_benches::run_if_hostd("evacuation bench") {
        return code;
    }
    ferry_benches::report_outcome("evacuation bench", run)
}
