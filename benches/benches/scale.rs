//! How a migration's cost grows with the VM's size: idle VMs of 1, 4 and 8 GiB with half
//! their memory holding mixed content (40% zero, 30% text, 20% random, 10% sparse pages),
//! migrated by Ferry at its defaults (plain, as QEMU) and by QEMU 7.2 at its best setting
//! (no bandwidth cap, multifd), in the same run.
//!
//! Content up to 2 GiB sits from 4 MiB; more continues at 4 GiB (above the PCI hole, where
//! both Ferry and QEMU's `pc` machine put RAM beyond 3 GiB), in files of at most 1 GiB.
//! Ferry preloads them; QEMU gets the first as the workload kernel's multiboot module and the
//! rest through its generic loader device (multiboot modules must lie below 4 GiB, and QEMU
//! takes no file of 2 GiB or more for either).
//!
//! Run: `cargo bench -p ferry-benches --bench scale`
//!
//! - `FERRY_BENCH_SIZES_GIB`: VM sizes (default `1,4,8`).
//! - `FERRY_BENCH_RUNS`: migrations per case (default 3); the table shows medians.
//! - `FERRY_BENCH_QEMU`, `FERRY_BENCH_NO_QEMU=1`, `FERRY_BENCH_QEMU_CHANNELS`: as in the
//!   migration benchmark.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ferry_benches::qemu::{self, Preset};
use ferry_benches::{Table, env_number, median};
use ferry_runtime::content::{self, Content};
use ferry_runtime::guest::multiboot_workload;
use ferry_runtime::layout::HIGH_MEMORY_START;
use ferry_runtime::{GuestOptions, TestGuest};
use hostd::api_types::{CreateVmRequest, MigrateRequest};
use hostd::client::Client;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where the content starts (as in the migration benchmark).
const CONTENT_AT: u64 = 4 * MIB;
/// Content below the PCI hole; the rest goes from 4 GiB.
const LOW_CONTENT_MAX: u64 = 2 * GIB;
/// Largest content file: QEMU reads a multiboot module's size into an `int` and a loader
/// file with one `read`, so neither takes 2 GiB.
const CHUNK: u64 = GIB;
const IDLE_TICKS_PER_SEC: u32 = 10;

/// One VM size's content: files and where they go.
struct Layout {
    size: u64,
    parts: Vec<(PathBuf, u64)>,
}

impl Layout {
    fn content(&self) -> u64 {
        self.size / 2
    }
}

/// Writes (or reuses) the content files for a VM of `size` bytes under `dir`: pieces of at
/// most [`CHUNK`], placed from `CONTENT_AT` up to [`LOW_CONTENT_MAX`], then from 4 GiB.
fn layout(dir: &Path, size: u64) -> Result<Layout, Box<dyn Error>> {
    let content = size / 2;
    let low = content.min(LOW_CONTENT_MAX);
    let mut pieces = Vec::new();
    for (start, bytes) in [(CONTENT_AT, low), (HIGH_MEMORY_START, content - low)] {
        let mut offset = 0;
        while offset < bytes {
            let len = CHUNK.min(bytes - offset);
            pieces.push((start + offset, len));
            offset += len;
        }
    }
    let mut parts = Vec::new();
    for (index, (at, bytes)) in pieces.into_iter().enumerate() {
        let file = dir.join(format!("content-{index}-{}M.bin", bytes / MIB));
        if !file.exists() {
            eprintln!("scale bench: writing {} MiB of content", bytes / MIB);
            content::write_file(&file, Content::Mixed, bytes, 0x5ca1e + index as u64)?;
        }
        parts.push((file, at));
    }
    Ok(Layout { size, parts })
}

fn ferry_runs(
    client: &Client,
    layout: &Layout,
    runs: u64,
) -> Result<Vec<ferry_actors::migration::MigrationReport>, Box<dyn Error>> {
    let name = format!("scale-{}g", layout.size / GIB);
    let request = CreateVmRequest {
        name: name.clone(),
        guest: "counter".into(),
        vcpus: 1,
        memory: Some(format!("{}M", layout.size / MIB)),
        options: GuestOptions {
            ticks_per_sec: Some(IDLE_TICKS_PER_SEC),
            ..Default::default()
        },
        preloads: layout
            .parts
            .iter()
            .map(|(file, at)| format!("{}@{at:#x}", file.display()))
            .collect(),
        start: true,
        ..Default::default()
    };
    client.create_vm("alpha", &request)?;
    std::thread::sleep(Duration::from_secs(1));
    let reports = ferry_benches::cluster::migrate_back_and_forth(
        client,
        &name,
        runs,
        &format!("scale bench: Ferry, {} GiB", layout.size / GIB),
        |to| MigrateRequest {
            to: to.into(),
            ..Default::default()
        },
    )?;
    for report in &reports {
        eprintln!(
            "  total {:.0} ms, rounds (MiB in ms): {}, final {} pages, downtime {:.1} ms",
            report.total_ms,
            report
                .rounds
                .iter()
                .map(|r| format!("{:.0} in {:.0}", r.bytes as f64 / MIB as f64, r.duration_ms))
                .collect::<Vec<_>>()
                .join(", "),
            report.final_pages,
            report.downtime_ms.unwrap_or(f64::NAN)
        );
    }
    client.operate(&name, "stop")?;
    Ok(reports)
}

fn range(values: &[f64]) -> String {
    format!(
        "{:.0}-{:.0}",
        values.iter().copied().fold(f64::INFINITY, f64::min),
        values.iter().copied().fold(0.0, f64::max)
    )
}

fn run() -> Result<(), Box<dyn Error>> {
    let runs = env_number("FERRY_BENCH_RUNS", 3)?;
    let sizes: Vec<u64> = std::env::var("FERRY_BENCH_SIZES_GIB")
        .unwrap_or_else(|_| "1,4,8".into())
        .split(',')
        .map(|s| s.trim().parse::<u64>().map(|g| g * GIB))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("FERRY_BENCH_SIZES_GIB: {e}"))?;
    let largest = sizes.iter().copied().max().unwrap_or(GIB);
    let baseline = qemu::Baseline::from_env()?;
    let version = &baseline.version;
    let dir = tempfile::Builder::new()
        .prefix("ferry-scale-bench")
        .tempdir_in("/var/tmp")?;
    let tsc_khz = qemu::host_tsc_khz()?;

    let mut table = Table::new([
        "VM",
        "content",
        "system, settings",
        "total ms",
        "total min-max",
        "ms per GiB of content",
        "downtime ms",
        "wire MiB",
        "Ferry / QEMU",
    ]);
    let client = ferry_benches::cluster::start_sized(
        dir.path(),
        "scale",
        false,
        &format!("{}G", largest / GIB + 1),
    )?;
    let mut growth = Vec::new();
    for &size in &sizes {
        let layout = layout(dir.path(), size)?;
        let content_gib = layout.content() as f64 / GIB as f64;
        let reports = ferry_runs(&client, &layout, runs);
        if reports.is_err() {
            ferry_vmm::spawn::kill_vmms_under(dir.path());
        }
        let reports = reports?;
        let totals: Vec<f64> = reports.iter().map(|r| r.total_ms).collect();
        let ferry_total = median(&totals);
        let downtimes: Vec<f64> = reports
            .iter()
            .map(|r| r.downtime_ms.unwrap_or(f64::NAN))
            .collect();
        let wire: Vec<f64> = reports.iter().map(|r| r.wire_bytes as f64).collect();
        let mut qemu_total = None;
        let mut qemu_row = None;
        if baseline.enabled {
            let guest = TestGuest::Counter {
                ticks_per_sec: IDLE_TICKS_PER_SEC,
            };
            let kernel = multiboot_workload::build(&guest, size, tsc_khz)?;
            let kernel_path = dir.path().join(format!("counter-{}g.elf", size / GIB));
            std::fs::write(&kernel_path, &kernel.elf)?;
            let (module, _) = &layout.parts[0];
            let mut spec = baseline.spec(
                (&kernel_path, module),
                size,
                tsc_khz,
                &dir.path().join("qemu"),
            );
            spec.loads = layout.parts[1..].to_vec();
            spec.timeout = Duration::from_secs(300);
            let preset = Preset::Best {
                multifd_channels: baseline.channels,
            };
            let mut reports = Vec::new();
            for run in 1..=runs {
                eprintln!(
                    "scale bench: QEMU, {} GiB, {}, run {run}/{runs}",
                    size / GIB,
                    preset.describe()
                );
                let report = qemu::migrate(&spec, preset).map_err(|e| {
                    let stderr = std::fs::read_to_string(spec.work_dir.join("source.stderr"))
                        .unwrap_or_default();
                    format!("{e}; the source QEMU's stderr: {}", stderr.trim())
                })?;
                reports.push(report);
            }
            let totals: Vec<f64> = reports.iter().map(|r| r.total_ms as f64).collect();
            let total = median(&totals);
            qemu_total = Some(total);
            qemu_row = Some([
                format!("{} GiB", size / GIB),
                format!("{content_gib:.1} GiB"),
                format!("QEMU 7.2 ({})", preset.describe()),
                format!("{total:.0}"),
                range(&totals),
                format!("{:.0}", total / content_gib),
                format!(
                    "{:.1}",
                    median(
                        &reports
                            .iter()
                            .map(|r| r.downtime_ms as f64)
                            .collect::<Vec<_>>()
                    )
                ),
                format!(
                    "{:.0}",
                    median(
                        &reports
                            .iter()
                            .map(|r| r.transferred_bytes as f64)
                            .collect::<Vec<_>>()
                    ) / MIB as f64
                ),
                "-".into(),
            ]);
        }
        table.row([
            format!("{} GiB", size / GIB),
            format!("{content_gib:.1} GiB"),
            "Ferry (defaults, plain)".into(),
            format!("{ferry_total:.0}"),
            range(&totals),
            format!("{:.0}", ferry_total / content_gib),
            format!("{:.1}", median(&downtimes)),
            format!("{:.0}", median(&wire) / MIB as f64),
            qemu_total.map_or("-".into(), |q| format!("{:.2}", ferry_total / q)),
        ]);
        if let Some(row) = qemu_row {
            table.row(row);
        }
        growth.push((size, ferry_total, qemu_total));
    }
    println!(
        "Live migration over loopback of idle VMs (counter, {IDLE_TICKS_PER_SEC} ticks/s, 1 vCPU) \
         with half their memory holding mixed content; Ferry vs {version} at its best \
         setting; {runs} run(s) per case, medians; load average at the end: {}\n\
         total: Ferry from the migrate request until the destination confirmed the VM runs; \
         QEMU its total-time. downtime: Ferry's guest pause (source pause to destination \
         running), QEMU's own downtime figure. wire: Ferry's memory bytes on the wire, QEMU's \
         ram.transferred.\n{}",
        ferry_benches::load_average(),
        table.render()
    );
    if let Some(&(base_size, base_ferry, base_qemu)) = growth.first() {
        println!("Growth against the smallest VM (x times the size → x times the total time):");
        for &(size, ferry, qemu) in &growth[1..] {
            println!(
                "  {} GiB: size ×{:.0}; Ferry ×{:.2}{}",
                size / GIB,
                size as f64 / base_size as f64,
                ferry / base_ferry,
                match (qemu, base_qemu) {
                    (Some(q), Some(b)) => format!("; QEMU ×{:.2}", q / b),
                    _ => String::new(),
                }
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // The hostd threads below start VMM processes as this executable with `vmm`.
    ferry_vmm::run_if_vmm();
    ferry_benches::report_outcome("scale bench", run)
}
