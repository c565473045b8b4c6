//! Compute + storage migration: Ferry's `--datastore` against QEMU's `--copy-storage-all`
//! sequence, in one run on this machine.
//!
//! The VM: 256 MiB of RAM, 1 vCPU, a 4 GiB raw image holding 2 GiB of mixed data (40% zero,
//! 30% text, 20% random, 10% sparse pages, written out, so the zeros are allocated), moved
//! over loopback from one host's local datastore to the other's. Cases:
//! - idle: the `counter` guest (Ferry) / the workload kernel's counter (QEMU); no disk I/O;
//! - writing (Ferry only: the QEMU guest has no disk driver): the `disk` guest writing
//!   `FERRY_BENCH_DISK_RATE` 4 KiB blocks a second (default 2000, 8 MB/s) throughout.
//!
//! QEMU 7.2, by hand over QMP as libvirt does it: the destination (`-incoming defer`) exports
//! its empty image with `nbd-server-start` + `block-export-add`; the source runs
//! `blockdev-mirror` (sync full) into it, waits until the job is ready, migrates (best
//! settings: no bandwidth cap, multifd), and cancels the job at the switch. Its figure is
//! from `blockdev-mirror` until the destination runs.
//!
//! Run: `cargo bench -p ferry-benches --bench storage` (`FERRY_BENCH_RUNS`, default 3;
//! `FERRY_BENCH_NO_QEMU=1` skips QEMU).

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ferry_actors::migration::MigrationReport;
use ferry_benches::qemu::{self, Preset};
use ferry_benches::{Table, env_number, median};
use ferry_runtime::content::{self, Content};
use ferry_runtime::guest::multiboot_workload;
use ferry_runtime::{GuestOptions, TestGuest};
use hostd::api_types::{CreateVmRequest, MigrateRequest};
use hostd::client::Client;

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 256 * MIB;
const IMAGE: u64 = 4 << 30;
const DATA: u64 = 2 << 30;

/// A 4 GiB image whose first 2 GiB hold the mixed content.
fn write_image(path: &Path) -> Result<(), Box<dyn Error>> {
    content::write_file(path, Content::Mixed, DATA, 0x0570_7a9e)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(IMAGE)?;
    Ok(())
}

fn ferry_runs(
    client: &Client,
    dir: &Path,
    guest: &str,
    disk_rate: Option<u64>,
    runs: u64,
) -> Result<Vec<MigrationReport>, Box<dyn Error>> {
    let name = format!("bench-{guest}");
    let file = format!("{name}.raw");
    let alpha_disks = dir.join("alpha").join("disks");
    write_image(&alpha_disks.join(&file))?;
    let request = CreateVmRequest {
        name: name.clone(),
        guest: guest.into(),
        vcpus: 1,
        memory: Some(format!("{}M", MEMORY / MIB)),
        options: GuestOptions {
            disk_rate,
            ..Default::default()
        },
        disks: vec![format!("alpha-local:{file}")],
        start: true,
        ..Default::default()
    };
    client.create_vm("alpha", &request)?;
    std::thread::sleep(Duration::from_secs(1));
    let reports = ferry_benches::cluster::migrate_back_and_forth(
        client,
        &name,
        runs,
        &format!("storage bench: Ferry, {guest}"),
        |to| MigrateRequest {
            to: to.into(),
            datastore: Some(format!("{to}-local")),
            ..Default::default()
        },
    )?;
    let (_, info) = client.find_vm(&name)?;
    if info.guest_failures != 0 {
        return Err(format!(
            "the {guest} guest reported {} failures",
            info.guest_failures
        )
        .into());
    }
    client.operate(&name, "stop")?;
    Ok(reports)
}

fn median_by<T>(items: &[T], field: impl Fn(&T) -> f64) -> f64 {
    median(&items.iter().map(field).collect::<Vec<_>>())
}

fn range(values: impl Iterator<Item = f64> + Clone) -> String {
    let min = values.clone().fold(f64::INFINITY, f64::min);
    let max = values.fold(0.0, f64::max);
    format!("{min:.0}-{max:.0}")
}

fn run() -> Result<(), Box<dyn Error>> {
    let runs = env_number("FERRY_BENCH_RUNS", 3)?;
    let disk_rate = env_number("FERRY_BENCH_DISK_RATE", 2000)?;
    let baseline = qemu::Baseline::from_env()?;
    let version = &baseline.version;
    let dir = tempfile::Builder::new()
        .prefix("ferry-storage-bench")
        .tempdir_in("/var/tmp")?;
    let client = ferry_benches::cluster::start(dir.path(), "storage-bench", true)?;
    let mut table = Table::new([
        "case",
        "migrator",
        "total ms",
        "range",
        "downtime ms",
        "disk MiB sent",
        "wire MiB",
        "rounds",
    ]);
    for (label, guest, rate) in [
        ("idle", "counter", None),
        ("writing", "disk", Some(disk_rate)),
    ] {
        let reports = ferry_runs(&client, dir.path(), guest, rate, runs)?;
        let case = match rate {
            Some(rate) => format!("{label} ({rate} writes/s)"),
            None => label.to_string(),
        };
        table.row([
            case,
            "Ferry (--datastore)".to_string(),
            format!("{:.0}", median_by(&reports, |r| r.total_ms)),
            range(reports.iter().map(|r| r.total_ms)),
            format!(
                "{:.1}",
                median_by(&reports, |r| r.downtime_ms.unwrap_or(0.0))
            ),
            format!(
                "{:.0}",
                median_by(&reports, |r| r.disk_bytes as f64) / MIB as f64
            ),
            format!(
                "{:.0}",
                median_by(&reports, |r| r.wire_bytes as f64) / MIB as f64
            ),
            format!("{:.0}", median_by(&reports, |r| r.rounds.len() as f64)),
        ]);
    }
    if baseline.enabled {
        let tsc_khz = qemu::host_tsc_khz()?;
        let guest = TestGuest::Counter { ticks_per_sec: 10 };
        let kernel = multiboot_workload::build(&guest, MEMORY, tsc_khz)?;
        let kernel_path = dir.path().join("counter.elf");
        std::fs::write(&kernel_path, &kernel.elf)?;
        let module = dir.path().join("module.bin");
        std::fs::write(&module, vec![0u8; 4096])?;
        let source_image = dir.path().join("qemu-source.raw");
        write_image(&source_image)?;
        let destination_image = dir.path().join("qemu-destination.raw");
        let mut spec = baseline.spec(
            (&kernel_path, &module),
            MEMORY,
            tsc_khz,
            &dir.path().join("qemu"),
        );
        spec.disks = Some((source_image, destination_image.clone()));
        let mut reports = Vec::new();
        for run in 1..=runs {
            eprintln!("storage bench: QEMU, idle, run {run}/{runs}");
            let _ = std::fs::remove_file(&destination_image);
            std::fs::File::create(&destination_image)?.set_len(IMAGE)?;
            reports.push(qemu::migrate(&spec, Preset::BEST)?);
        }
        let total = |r: &qemu::QemuMigrationReport| r.with_storage_ms.unwrap_or(0) as f64;
        table.row([
            "idle".to_string(),
            format!("QEMU 7.2 (mirror + migrate, {})", Preset::BEST.describe()),
            format!("{:.0}", median_by(&reports, total)),
            range(reports.iter().map(total)),
            format!("{:.1}", median_by(&reports, |r| r.downtime_ms as f64)),
            "-".into(),
            "-".into(),
            format!(
                "mirror ready after {:.0} ms",
                median_by(&reports, |r| r.mirror_ready_ms.unwrap_or(0) as f64)
            ),
        ]);
    }
    println!(
        "Compute + storage migration over loopback: {} MiB RAM, 1 vCPU, a {} GiB raw image with {} GiB of mixed data\n\
         Ferry vs {version}; {runs} run(s) per case, medians; load average at the end: {}\n\
         total: Ferry from the migrate request until the destination runs the VM; QEMU from \
         blockdev-mirror until the destination runs. downtime: Ferry from the pause until the \
         destination confirmed it runs the VM; QEMU its downtime. disk MiB sent: Ferry's disk \
         blocks sent over all rounds (before lz4); wire: all of Ferry's bytes on the wire.\n{}",
        MEMORY / MIB,
        IMAGE >> 30,
        DATA >> 30,
        ferry_benches::load_average(),
        table.render()
    );
    Ok(())
}

fn main() -> ExitCode {
    ferry_vmm::run_if_vmm();
    ferry_benches::report_outcome("storage bench", run)
}
