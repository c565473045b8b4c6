//! How long a hostd restart takes with VMs running: until its API answers again, and until
//! every VM is reattached (listed running, with the same VMM process as before).
//!
//! One host, N counter VMs (default 20, 64 MiB each), each in its VMM process. hostd is
//! this benchmark's own executable run as a daemon (`restart hostd CONFIG HOST`), and the
//! VMMs it starts are this executable too (`restart vmm ...`), so nothing else needs to be
//! built. hostd is killed (SIGKILL) or stopped (SIGTERM) and started again; the clock runs
//! from the new process's start.
//!
//! Run: `cargo bench -p ferry-benches --bench restart`; `FERRY_BENCH_VMS` sets N,
//! `FERRY_BENCH_RUNS` the restarts per kind (default 5; the table shows medians and ranges).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use ferry_benches::{Table, env_number, median};
use hostd::api_types::CreateVmRequest;
use hostd::client::Client;
use hostd::config::Cluster;

fn start_hostd(config: &Path, log: &Path) -> Result<Child, Box<dyn Error>> {
    ferry_benches::spawn_hostd(None, config, "alpha", log)
}

fn stop(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

/// (ms until the API answered, ms until every VM was listed running with its old VMM).
fn restart(
    client: &Client,
    config: &Path,
    log: &Path,
    hostd: &mut Child,
    signal: i32,
    pids: &[(String, u64)],
) -> Result<(f64, f64), Box<dyn Error>> {
    stop(hostd, signal);
    let started = Instant::now();
    *hostd = start_hostd(config, log)?;
    let deadline = started + Duration::from_secs(60);
    while client.host_info("alpha").is_err() {
        if Instant::now() > deadline {
            return Err("hostd did not answer within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let answered = started.elapsed();
    loop {
        let (vms, _) = client.list_vms();
        let all = pids.iter().all(|(name, pid)| {
            vms.iter().any(|v| {
                &v.name == name
                    && v.state == ferry_actors::lifecycle::Lifecycle::Running
                    && v.vmm_pid.map(u64::from) == Some(*pid)
            })
        });
        if all {
            break;
        }
        if Instant::now() > deadline {
            return Err("the VMs were not all reattached within 60 s".into());
        }
        // Listing asks every VMM; polling harder would measure the polling.
        std::thread::sleep(Duration::from_millis(10));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(answered), ms(started.elapsed())))
}

fn run() -> Result<(), Box<dyn Error>> {
    let vms = env_number("FERRY_BENCH_VMS", 20)?;
    let runs = env_number("FERRY_BENCH_RUNS", 5)?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-restart-")
        .tempdir()?;
    let dir = if std::env::var_os("FERRY_BENCH_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("restart bench: working in {} (kept)", kept.display());
        tempfile::TempDir::new_in(kept)?
    } else {
        dir
    };
    let port = || -> Result<u16, std::io::Error> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nname = \"bench\"\n[[hosts]]\nname = \"alpha\"\napi = \"127.0.0.1:{}\"\ncontrol = \"127.0.0.1:{}\"\nmemory = \"{}M\"\nstate_dir = \"{}/alpha\"\n",
            port()?,
            port()?,
            64 * vms + 64,
            dir.path().display()
        ),
    )?;
    let log: PathBuf = dir.path().join("hostd.log");
    let client = Client::new(Cluster::load(&config)?);
    let mut hostd = start_hostd(&config, &log)?;
    let result = (|| -> Result<Table, Box<dyn Error>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.host_info("alpha").is_err() {
            if Instant::now() > deadline {
                return Err("hostd did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut pids = Vec::new();
        for i in 0..vms {
            let name = format!("vm{i:02}");
            let info = client.create_vm(
                "alpha",
                &CreateVmRequest {
                    name: name.clone(),
                    guest: "counter".into(),
                    vcpus: 1,
                    memory: Some("64M".into()),
                    start: true,
                    ..Default::default()
                },
            )?;
            pids.push((name, u64::from(info.vmm_pid.unwrap_or(0))));
        }
        eprintln!("restart bench: {vms} VMs running; restarting hostd");
        let mut table = Table::new([
            "restart",
            "VMs",
            "API answers ms",
            "min-max",
            "all reattached ms",
            "min-max",
        ]);
        for (label, signal) in [("SIGKILL", libc::SIGKILL), ("SIGTERM", libc::SIGTERM)] {
            let mut api = Vec::new();
            let mut all = Vec::new();
            for _ in 0..runs {
                let (a, b) = restart(&client, &config, &log, &mut hostd, signal, &pids)?;
                api.push(a);
                all.push(b);
            }
            let spread = |v: &[f64]| {
                let (lo, hi) = v.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
                format!("{lo:.0}-{hi:.0}")
            };
            table.row([
                label.to_string(),
                vms.to_string(),
                format!("{:.0}", median(&api)),
                spread(&api),
                format!("{:.0}", median(&all)),
                spread(&all),
            ]);
        }
        Ok(table)
    })();
    stop(&mut hostd, libc::SIGKILL);
    ferry_vmm::spawn::kill_vmms_under(dir.path());
    let table = result?;
    println!(
        "hostd restart with VMs running (one host, 64 MiB counter VMs, {runs} restart(s) per kind, medians)"
    );
    println!(
        "API answers: from the new hostd's start until GET /v1/host answers; all reattached: until every VM is listed running with the VMM process it had before"
    );
    print!("{}", table.render());
    Ok(())
}

fn main() -> ExitCode {
    // This executable is also the hostd it restarts and the VMMs that hostd starts.
    ferry_vmm::run_if_vmm();
    if let Some(code) = ferry_benches::run_if_hostd("restart bench") {
        return code;
    }
    ferry_benches::report_outcome("restart bench", run)
}
