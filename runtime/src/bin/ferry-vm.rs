//! `ferry-vm`: run one VM on this host, save it to a file while it runs, restore it in a new
//! process. The single-host counterpart of `hostd`, for trying the runtime on its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_runtime::devices::virtio::block::DiskImage;
use ferry_runtime::guest::elf_image;
use ferry_runtime::snapshot::{self, SaveOptions};
use ferry_runtime::units::{format_bytes, parse_size};
use ferry_runtime::{
    Boot, DirtyLogMode, DiskSpec, GuestOptions, Preload, VcpuRunState, VcpuStop, Vm, VmConfig,
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "ferry-vm",
    version,
    about = "Run, save and restore a single Ferry VM on this host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM and run it; optionally save it to a file while it runs.
    Run(Box<RunArgs>),
    /// Restore a VM saved with `run --save` and run it.
    Restore(RestoreArgs),
    /// Print what a snapshot file holds.
    Inspect {
        /// Snapshot file.
        file: PathBuf,
    },
    /// Write one of the built-in probe kernels (for `--guest ELF` or QEMU's `-kernel`).
    WriteProbe {
        /// Which kernel.
        kind: ProbeKind,
        /// Output file.
        out: PathBuf,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ProbeKind {
    /// 32-bit multiboot v1 kernel that prints its command line and first module.
    Multiboot,
    /// 64-bit ELF kernel that prints its command line.
    Elf64,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DirtyMode {
    /// KVM_GET_DIRTY_LOG get-and-clear.
    Bitmap,
    /// Manual protect, cleared in chunks.
    Manual,
}

impl From<DirtyMode> for DirtyLogMode {
    fn from(mode: DirtyMode) -> Self {
        match mode {
            DirtyMode::Bitmap => DirtyLogMode::Bitmap,
            DirtyMode::Manual => DirtyLogMode::ManualProtect,
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// counter, dirty, verify, or the path of an ELF kernel.
    #[arg(long)]
    guest: String,
    /// Guest memory (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// VM name.
    #[arg(long, default_value = "vm")]
    name: String,
    /// counter: ticks per second.
    #[arg(long, default_value_t = 10)]
    ticks_per_sec: u32,
    /// dirty: working set size (default: half of workload memory).
    #[arg(long, value_parser = parse_size)]
    working_set: Option<u64>,
    /// dirty: pages per second across all vCPUs (default: unlimited).
    #[arg(long)]
    rate: Option<u64>,
    /// dirty: passes before the guest exits (0 = forever).
    #[arg(long, default_value_t = 0)]
    passes: u64,
    /// verify, disk: pattern seed.
    #[arg(long)]
    seed: Option<u64>,
    /// A raw disk image, created sparse with --disk-size if missing (repeatable).
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Size of disk images this run creates.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    disk_size: u64,
    /// disk: block writes per second (0: as fast as the disk goes; default 200).
    #[arg(long)]
    disk_rate: Option<u64>,
    /// ELF kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Multiboot module, as PATH or PATH=CMDLINE (repeatable).
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Copy FILE into guest memory at ADDR before boot, as FILE@ADDR (repeatable).
    #[arg(long = "preload")]
    preloads: Vec<String>,
    /// Write console output to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Stop after this many seconds (default: when the guest exits).
    #[arg(long)]
    run_for: Option<f64>,
    /// Save the VM to this file.
    #[arg(long, requires = "save_after")]
    save: Option<PathBuf>,
    /// Seconds to run before saving.
    #[arg(long, requires = "save")]
    save_after: Option<f64>,
    /// Save only once the guest has also reported this much progress (built-in guests:
    /// passes), so a slow or loaded machine changes when, not what.
    #[arg(long, requires = "save")]
    save_at_progress: Option<u32>,
    /// Keep the VM running after the save (a checkpoint) instead of stopping it.
    #[arg(long)]
    keep_running: bool,
    /// Dirty logging mode.
    #[arg(long, value_enum, default_value_t = DirtyMode::Bitmap)]
    dirty_log: DirtyMode,
    /// Print a JSON report on stdout when done.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// Snapshot file written by `run --save`.
    file: PathBuf,
    /// Write console output to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Stop after this many seconds (default: when the guest exits).
    #[arg(long)]
    run_for: Option<f64>,
    /// Stop only once the guest has also reported this much progress.
    #[arg(long)]
    until_progress: Option<u32>,
    /// Dirty logging mode.
    #[arg(long, value_enum, default_value_t = DirtyMode::Bitmap)]
    dirty_log: DirtyMode,
    /// Print a JSON report on stdout when done.
    #[arg(long)]
    json: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Restore(args) => restore(args),
        Command::Inspect { file } => inspect(&file),
        Command::WriteProbe { kind, out } => write_probe(kind, &out),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("ferry-vm: error: {error:#}");
            std::process::exit(2);
        }
    }
}

fn boot_from_args(args: &RunArgs) -> Result<Boot> {
    let options = GuestOptions {
        ticks_per_sec: Some(args.ticks_per_sec),
        working_set: args.working_set,
        working_set_start: None,
        rate: args.rate,
        passes: Some(args.passes),
        seed: args.seed,
        disk_rate: args.disk_rate,
        cmdline: args.cmdline.clone(),
        modules: args.modules.clone(),
    };
    Boot::from_guest(&args.guest, args.memory, &options).map_err(anyhow::Error::msg)
}

/// Streams console output to stdout until the returned guard is dropped.
fn stream_console(vm: &Vm) -> std::thread::JoinHandle<()> {
    let (history, rx) = vm.console().follow();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let _ = out.write_all(&history);
        let _ = out.flush();
        while let Ok(chunk) = rx.recv() {
            let _ = out.write_all(&chunk);
            let _ = out.flush();
        }
    })
}

/// The longest a run waits for the guest to reach a progress it was asked to reach.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs until no vCPU is running guest code any more, or until `deadline` has passed and
/// the guest has reported at least `progress` (each only if given); fails if the guest
/// does not reach `progress` within [`PROGRESS_TIMEOUT`].
fn run_until(vm: &Vm, deadline: Option<Instant>, progress: Option<u32>) -> Result<()> {
    let started = Instant::now();
    loop {
        let all_done = vm
            .vcpu_states()
            .iter()
            .all(|s| matches!(s, VcpuRunState::Finished(_)));
        let reported = vm.test_device().state().progress;
        let time_up = deadline.map(|d| Instant::now() >= d);
        let far_enough = progress.map(|p| reported >= p);
        let conditions_met = match (time_up, far_enough) {
            (None, None) => false,
            (time, far) => time.unwrap_or(true) && far.unwrap_or(true),
        };
        if all_done || conditions_met {
            return Ok(());
        }
        if let Some(wanted) = progress
            && started.elapsed() > PROGRESS_TIMEOUT
        {
            anyhow::bail!(
                "the guest reported progress {reported} in {PROGRESS_TIMEOUT:?}, not the {wanted} asked for"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish_report(vm: &Vm) -> serde_json::Value {
    let test = vm.test_device().state();
    json!({
        "name": vm.identity().name,
        "uuid": vm.identity().uuid.to_string(),
        "mac": vm.identity().mac_string(),
        "console_bytes": vm.console().total_bytes(),
        "guest_exits": test.exits,
        "failures": test.failure_count,
        "first_failures": test.failures,
        "progress": test.progress,
        "vcpus": vm.vcpu_states().iter().map(|s| format!("{s:?}")).collect::<Vec<_>>(),
    })
}

/// Exit code: 0 if no vCPU reported a failure or non-zero status, 1 otherwise.
fn exit_code(vm: &Vm) -> i32 {
    let test = vm.test_device().state();
    let crashed = vm.vcpu_states().iter().any(
        |s| matches!(s, VcpuRunState::Finished(stop) if !matches!(stop, VcpuStop::GuestExit(0))),
    );
    i32::from(test.failure_count > 0 || crashed)
}

fn run(args: RunArgs) -> Result<i32> {
    let boot = boot_from_args(&args)?;
    let preloads = args
        .preloads
        .iter()
        .map(|s| Preload::parse(s).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let mut config = VmConfig::new(&args.name, args.vcpus, args.memory);
    config.dirty_log = args.dirty_log.into();
    config.console_log = args.console.clone();
    for (index, path) in args.disks.iter().enumerate() {
        DiskImage::create_sparse(path, args.disk_size)?;
        config.disks.push(DiskSpec {
            path: path.clone(),
            read_only: false,
            id: format!("ferry-disk-{index}"),
            lock: true,
        });
    }
    let mut vm = Vm::create(&config, &boot, &preloads).context("creating the VM")?;
    let streamer = args.console.is_none().then(|| stream_console(&vm));
    let started = Instant::now();
    vm.resume()?;
    let mut report = json!({});
    if let (Some(path), Some(after)) = (&args.save, args.save_after) {
        run_until(
            &vm,
            Some(started + Duration::from_secs_f64(after)),
            args.save_at_progress,
        )?;
        let options = SaveOptions {
            keep_running: args.keep_running,
            ..SaveOptions::default()
        };
        let save = snapshot::save(&mut vm, path, &options)
            .with_context(|| format!("saving to {}", path.display()))?;
        eprintln!(
            "saved {} to {}: {} rounds, {} written, downtime {:.1} ms, total {:.1} ms",
            args.name,
            path.display(),
            save.rounds.len(),
            format_bytes(save.bytes_written),
            save.downtime_ms,
            save.total_ms
        );
        report["save"] = serde_json::to_value(&save)?;
        if !args.keep_running {
            report["result"] = finish_report(&vm);
            drop(vm);
            if let Some(streamer) = streamer {
                let _ = streamer.join();
            }
            if args.json {
                println!("{report}");
            }
            return Ok(0);
        }
    }
    run_until(
        &vm,
        args.run_for
            .map(|secs| started + Duration::from_secs_f64(secs)),
        None,
    )?;
    vm.pause()?;
    report["result"] = finish_report(&vm);
    let code = exit_code(&vm);
    drop(vm);
    if let Some(streamer) = streamer {
        let _ = streamer.join();
    }
    if args.json {
        println!("{report}");
    }
    Ok(code)
}

fn restore(args: RestoreArgs) -> Result<i32> {
    let (mut vm, restore_report) =
        snapshot::restore(&args.file, args.dirty_log.into(), args.console.clone())
            .with_context(|| format!("restoring {}", args.file.display()))?;
    eprintln!(
        "restored {} from {} in {:.1} ms ({} read)",
        vm.identity().name,
        args.file.display(),
        restore_report.total_ms,
        format_bytes(restore_report.bytes_read)
    );
    let streamer = args.console.is_none().then(|| stream_console(&vm));
    let started = Instant::now();
    vm.resume()?;
    run_until(
        &vm,
        args.run_for
            .map(|secs| started + Duration::from_secs_f64(secs)),
        args.until_progress,
    )?;
    vm.pause()?;
    let report = json!({
        "restore": restore_report,
        "result": finish_report(&vm),
    });
    let code = exit_code(&vm);
    drop(vm);
    if let Some(streamer) = streamer {
        let _ = streamer.join();
    }
    if args.json {
        println!("{report}");
    }
    Ok(code)
}

fn inspect(file: &Path) -> Result<i32> {
    let state = snapshot::read_state(file)?;
    let report = json!({
        "name": state.identity.name,
        "uuid": state.identity.uuid.to_string(),
        "mac": state.identity.mac_string(),
        "boot": state.boot,
        "vcpus": state.shape.vcpus,
        "memory": state.shape.memory,
        "cpu_features": ferry_runtime::CpuFeatures::from_cpuid(&state.shape.cpuid).names(),
        "rip": state.vcpus.iter().map(|v| format!("{:#x}", v.regs.rip)).collect::<Vec<_>>(),
        "msrs_per_vcpu": state.vcpus.first().map(|v| v.msrs.len()),
        "guest_reports": state.devices.test,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

fn write_probe(kind: ProbeKind, out: &Path) -> Result<i32> {
    let image = match kind {
        ProbeKind::Multiboot => elf_image::multiboot_probe(),
        ProbeKind::Elf64 => elf_image::elf64_probe(),
    }
    .map_err(|e| anyhow::anyhow!("assembling the probe kernel: {e}"))?;
    std::fs::write(out, image).with_context(|| format!("writing {}", out.display()))?;
    Ok(0)
}
