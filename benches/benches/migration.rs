//! Whole live migrations, Ferry and QEMU side by side in one run.
//!
//! The VM: 1 GiB of RAM with 512 MiB of mixed content (40% zero, 30% text, 20% random, 10%
//! sparse pages) preloaded, running (a) the idle `counter` guest (10 ticks/s), (b) the
//! `dirty` guest rewriting a 64 MiB working set at 20,000 pages/s (78 MiB/s), or (c) the
//! `dirty` guest rewriting a 256 MiB working set as fast as its vCPU goes ("busy"). QEMU's
//! defaults (a 128 MiB/s cap, no auto-converge) never finish (c), so it runs at QEMU's best
//! setting only.
//!
//! - Ferry: two hostd (each a full daemon: API, control listener, data streams on
//!   loopback; run as threads of this process), driven through the API like `ferryctl`;
//!   1 and 2 streams, each plain and under mutual TLS (AES-256-GCM), in the same run.
//! - QEMU 7.2: the same guest as a multiboot kernel with the content as its module, migrated
//!   over loopback with QMP, with its default settings and with its best ones (no bandwidth
//!   cap, multifd). See `ferry_benches::qemu`.
//!
//! Run: `cargo bench -p ferry-benches --bench migration`
//!
//! - `FERRY_BENCH_RUNS`: migrations per case (default 3); the table shows medians.
//! - `FERRY_BENCH_WORKLOADS`: which of `idle,dirty,busy` to run (default all three).
//! - `FERRY_BENCH_QEMU`: the QEMU binary (default `qemu-system-x86_64`); `FERRY_BENCH_NO_QEMU=1`
//!   skips QEMU.
//! - `FERRY_BENCH_QEMU_CHANNELS`: multifd channels of QEMU's best preset (default 2).

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ferry_actors::migration::MigrationReport;
use ferry_benches::qemu::{self, Preset, QemuMigrationReport};
use ferry_benches::{Table, env_number, median};
use ferry_runtime::content::{self, Content};
use ferry_runtime::guest::multiboot_workload;
use ferry_runtime::{GuestOptions, TestGuest};
use hostd::api_types::{CreateVmRequest, MigrateRequest};
use hostd::client::Client;

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 1 << 30;
const CONTENT_BYTES: u64 = 512 * MIB;
const CONTENT_SEED: u64 = 0x00c0_ffee;
/// Where Ferry preloads the content; the dirty working set goes above it, as in the QEMU
/// guest, which places its working set above its module.
const CONTENT_AT: u64 = 4 * MIB;
const IDLE_TICKS_PER_SEC: u32 = 10;
const DIRTY_WORKING_SET: u64 = 64 * MIB;
const DIRTY_PAGES_PER_SEC: u64 = 20_000;
const BUSY_WORKING_SET: u64 = 256 * MIB;

/// How Ferry migrates in one row of the table.
#[derive(Debug, Clone, Copy)]
struct FerryCase {
    streams: u16,
    encrypted: bool,
}

impl FerryCase {
    fn describe(self) -> String {
        format!(
            "Ferry (tcp, {} stream{}, {}, 300 ms target)",
            self.streams,
            if self.streams == 1 { "" } else { "s" },
            if self.encrypted {
                "mutual TLS"
            } else {
                "plain"
            }
        )
    }
}

const FERRY_CASES: [FerryCase; 4] = [
    FerryCase {
        streams: 1,
        encrypted: false,
    },
    FerryCase {
        streams: 1,
        encrypted: true,
    },
    FerryCase {
        streams: 2,
        encrypted: false,
    },
    FerryCase {
        streams: 2,
        encrypted: true,
    },
];

/// Creates the VM on alpha and migrates it `runs` times, alternating direction.
fn ferry_runs(
    client: &Client,
    content: &Path,
    (guest, case): (&TestGuest, FerryCase),
    runs: u64,
) -> Result<Vec<MigrationReport>, Box<dyn Error>> {
    let name = format!(
        "bench-{}-{}{}",
        guest.name(),
        case.streams,
        if case.encrypted { "-tls" } else { "" }
    );
    let mut options = GuestOptions::default();
    let mut working_set = None;
    match guest {
        TestGuest::Counter { ticks_per_sec } => options.ticks_per_sec = Some(*ticks_per_sec),
        TestGuest::Dirty {
            working_set: size,
            pages_per_sec,
            ..
        } => {
            options.rate = *pages_per_sec;
            options.working_set_start = Some(CONTENT_AT + CONTENT_BYTES);
            working_set = Some(format!("{}M", size / MIB));
        }
        TestGuest::Verify { .. } | TestGuest::Disk { .. } | TestGuest::Net { .. } => {
            return Err(format!("{} is not a memory benchmark workload", guest.name()).into());
        }
    }
    let request = CreateVmRequest {
        name: name.clone(),
        guest: guest.name().into(),
        vcpus: 1,
        memory: Some(format!("{}M", MEMORY / MIB)),
        options,
        working_set,
        preloads: vec![format!("{}@{CONTENT_AT:#x}", content.display())],
        start: true,
        ..Default::default()
    };
    client.create_vm("alpha", &request)?;
    std::thread::sleep(Duration::from_secs(1));
    let reports = ferry_benches::cluster::migrate_back_and_forth(
        client,
        &name,
        runs,
        &format!("migration bench: Ferry, {}", guest.name()),
        |to| MigrateRequest {
            to: to.into(),
            streams: Some(case.streams),
            encryption: Some(
                if case.encrypted {
                    "required"
                } else {
                    "disabled"
                }
                .into(),
            ),
            ..Default::default()
        },
    )?;
    let expected = if case.encrypted {
        "tls1.3 aes-256-gcm"
    } else {
        "none (disabled by the operator)"
    };
    if let Some(report) = reports
        .iter()
        .find(|r| r.encryption.as_deref() != Some(expected))
    {
        return Err(format!("Ferry migration used {:?}", report.encryption).into());
    }
    client.operate(&name, "stop")?;
    Ok(reports)
}

fn median_by<T>(items: &[T], field: impl Fn(&T) -> f64) -> f64 {
    median(&items.iter().map(field).collect::<Vec<_>>())
}

fn run() -> Result<(), Box<dyn Error>> {
    let runs = env_number("FERRY_BENCH_RUNS", 3)?;
    let baseline = qemu::Baseline::from_env()?;
    let version = &baseline.version;

    let dir = tempfile::Builder::new()
        .prefix("ferry-migration-bench")
        .tempdir()?;
    let module = dir.path().join("content.bin");
    content::write_file(&module, Content::Mixed, CONTENT_BYTES, CONTENT_SEED)?;
    let tsc_khz = qemu::host_tsc_khz()?;

    let workloads = [
        (
            format!("idle (counter, {IDLE_TICKS_PER_SEC} ticks/s)"),
            TestGuest::Counter {
                ticks_per_sec: IDLE_TICKS_PER_SEC,
            },
        ),
        (
            format!(
                "dirty {} MiB at {DIRTY_PAGES_PER_SEC} pages/s",
                DIRTY_WORKING_SET / MIB
            ),
            TestGuest::Dirty {
                start: None,
                working_set: DIRTY_WORKING_SET,
                pages_per_sec: Some(DIRTY_PAGES_PER_SEC),
                passes: 0,
            },
        ),
        (
            format!("busy: dirty {} MiB at native speed", BUSY_WORKING_SET / MIB),
            TestGuest::Dirty {
                start: None,
                working_set: BUSY_WORKING_SET,
                pages_per_sec: None,
                passes: 0,
            },
        ),
    ];
    let chosen =
        std::env::var("FERRY_BENCH_WORKLOADS").unwrap_or_else(|_| "idle,dirty,busy".into());
    let chosen: Vec<&str> = chosen.split(',').map(str::trim).collect();
    if let Some(unknown) = chosen
        .iter()
        .find(|w| !["idle", "dirty", "busy"].contains(w))
    {
        return Err(
            format!("FERRY_BENCH_WORKLOADS: '{unknown}' is not idle, dirty or busy").into(),
        );
    }
    let workloads: Vec<_> = workloads
        .into_iter()
        .zip(["idle", "dirty", "busy"])
        .filter(|(_, key)| chosen.contains(key))
        .map(|(workload, _)| workload)
        .collect();
    let presets = [
        Preset::Defaults,
        Preset::Best {
            multifd_channels: baseline.channels,
        },
    ];

    let mut table = Table::new([
        "guest",
        "system, settings",
        "total ms",
        "total min-max",
        "downtime ms",
        "source-side ms",
        "wire MiB",
        "rounds",
    ]);
    let client = ferry_benches::cluster::start(dir.path(), "bench", false)?;
    for (label, guest) in &workloads {
        for case in FERRY_CASES {
            let reports = ferry_runs(&client, &module, (guest, case), runs);
            if reports.is_err() {
                // VMM processes outlive the hostd threads: take them down before giving up.
                ferry_vmm::spawn::kill_vmms_under(dir.path());
            }
            let reports = reports?;
            let totals: Vec<f64> = reports.iter().map(|r| r.total_ms).collect();
            table.row([
                label.clone(),
                case.describe(),
                format!("{:.0}", median(&totals)),
                format!(
                    "{:.0}-{:.0}",
                    totals.iter().copied().fold(f64::INFINITY, f64::min),
                    totals.iter().copied().fold(0.0, f64::max)
                ),
                format!(
                    "{:.1}",
                    median_by(&reports, |r| r.downtime_ms.unwrap_or(f64::NAN))
                ),
                format!(
                    "{:.1}",
                    median_by(&reports, |r| r.source_downtime_ms.unwrap_or(f64::NAN))
                ),
                format!(
                    "{:.1}",
                    median_by(&reports, |r| r.wire_bytes as f64) / MIB as f64
                ),
                format!("{:.0}", median_by(&reports, |r| r.rounds.len() as f64)),
            ]);
        }
        if !baseline.enabled {
            continue;
        }
        let kernel = multiboot_workload::build(guest, MEMORY, tsc_khz)?;
        let kernel_path = dir.path().join(format!("{}.elf", guest.name()));
        std::fs::write(&kernel_path, &kernel.elf)?;
        let spec = baseline.spec(
            (&kernel_path, &module),
            MEMORY,
            tsc_khz,
            &dir.path().join("qemu"),
        );
        let busy = matches!(
            guest,
            TestGuest::Dirty {
                pages_per_sec: None,
                ..
            }
        );
        for preset in presets {
            if busy && preset == Preset::Defaults {
                continue;
            }
            let mut reports: Vec<QemuMigrationReport> = Vec::new();
            for run in 1..=runs {
                eprintln!(
                    "migration bench: QEMU, {label}, {}, run {run}/{runs}",
                    preset.describe()
                );
                reports.push(qemu::migrate(&spec, preset)?);
            }
            let totals = reports.iter().map(|r| r.total_ms);
            table.row([
                label.clone(),
                format!("QEMU 7.2 ({})", preset.describe()),
                format!("{:.0}", median_by(&reports, |r| r.total_ms as f64)),
                format!(
                    "{}-{}",
                    totals.clone().min().unwrap_or(0),
                    totals.max().unwrap_or(0)
                ),
                "-".into(),
                format!("{:.1}", median_by(&reports, |r| r.downtime_ms as f64)),
                format!(
                    "{:.1}",
                    median_by(&reports, |r| r.transferred_bytes as f64) / MIB as f64
                ),
                format!("{:.0}", median_by(&reports, |r| r.dirty_sync_count as f64)),
            ]);
        }
    }

    println!(
        "Live migration over loopback of a VM with {} MiB RAM, 1 vCPU, {} MiB mixed content\n\
         Ferry vs {version} (-accel kvm -cpu qemu64,-pni); {runs} run(s) per case, medians; \
         load average at the end: {}\n\
         total: Ferry from the migrate request until the destination confirmed the VM runs; \
         QEMU its total-time. downtime: Ferry from the pause on the source until the \
         destination confirmed it runs the VM (QEMU reports no such figure: -). \
         source-side: from the pause until all memory and state were sent and acknowledged, \
         Ferry's counterpart of QEMU's own downtime figure. \
         wire: Ferry memory bytes on the wire; QEMU ram.transferred. rounds: Ferry pre-copy \
         rounds; QEMU dirty-sync-count (passes + final sync).\n{}",
        MEMORY / MIB,
        CONTENT_BYTES / MIB,
        ferry_benches::load_average(),
        table.render()
    );
    Ok(())
}

fn main() -> ExitCode {
    // The hostd threads below start VMM processes as this executable with `vmm`.
    ferry_vmm::run_if_vmm();
    ferry_benches::report_outcome("migration bench", run)
}
