//! Runtime benchmarks on /dev/kvm: vCPU pause latency, dirty-log fetch cost, state capture
//! and restore, and save/restore of a 1 GiB VM. Prints one table per measurement.
//!
//! Run: `cargo bench -p ferry-benches --bench runtime`
//! (`FERRY_BENCH_SNAPSHOT_DIR` picks where the disk snapshot goes; default: target dir.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_benches::{Table, median};
use ferry_runtime::content::{self, Content};
use ferry_runtime::dirty_log::DirtyLogMode;
use ferry_runtime::layout::DATA_START;
use ferry_runtime::snapshot::{self, SaveOptions};
use ferry_runtime::state::blob;
use ferry_runtime::{Boot, Preload, TestGuest, Vm, VmConfig, VmState};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn busy_guest(working_set: u64) -> Boot {
    Boot::Guest(TestGuest::Dirty {
        start: None,
        working_set,
        pages_per_sec: None,
        passes: 0,
    })
}

fn pause_latency() {
    let mut table = Table::new([
        "vCPUs (all busy at CPL 3)",
        "pauses",
        "median µs",
        "p99 µs",
        "max µs",
    ]);
    for vcpus in [1, 2] {
        let config = VmConfig::new("pause", vcpus, 64 * MIB);
        let mut vm = Vm::create(&config, &busy_guest(16 * MIB), &[]).expect("create VM");
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(50));
        let mut samples = Vec::new();
        for _ in 0..1000 {
            std::thread::sleep(Duration::from_micros(500));
            samples.push(micros(vm.pause().expect("pause")));
            vm.resume().expect("resume");
        }
        table.row([
            vcpus.to_string(),
            samples.len().to_string(),
            format!("{:.0}", median(&samples)),
            format!("{:.0}", percentile(&samples, 0.99)),
            format!("{:.0}", percentile(&samples, 1.0)),
        ]);
    }
    println!(
        "vCPU pause latency (pause() call until every vCPU is out of KVM_RUN)\n{}\n",
        table.render()
    );
}

fn dirty_fetch() {
    let mut table = Table::new([
        "mode",
        "VM",
        "dirty pages",
        "fetch+clear all-dirty ms",
        "ms per GiB",
        "fetch clean ms",
    ]);
    for (mode, name) in [
        (DirtyLogMode::Bitmap, "bitmap (GET_DIRTY_LOG)"),
        (DirtyLogMode::ManualProtect, "manual protect, 1 GiB chunks"),
    ] {
        let memory = GIB;
        let mut config = VmConfig::new("dirty", 1, memory);
        config.dirty_log = mode;
        let working_set = memory - DATA_START;
        let mut vm = Vm::create(&config, &busy_guest(working_set), &[]).expect("create VM");
        vm.begin_tracking().expect("dirty log");
        vm.resume().expect("resume");
        let mut full = Vec::new();
        let mut clean = Vec::new();
        let mut pages = Vec::new();
        for _ in 0..5 {
            // Wait until the guest has written every page at least once since the last fetch
            // (it reports each completed pass).
            let passes = vm.test_device().state().progress;
            let (_, ok) = vm
                .test_device()
                .wait_until(Duration::from_secs(30), |s| s.progress >= passes + 2);
            assert!(ok, "dirty guest stalled");
            vm.pause().expect("pause");
            let start = Instant::now();
            let set = vm.fetch_dirty().expect("fetch");
            full.push(millis(start.elapsed()));
            pages.push(set.count() as f64);
            let start = Instant::now();
            let _ = vm.fetch_dirty().expect("fetch");
            clean.push(millis(start.elapsed()));
            vm.resume().expect("resume");
        }
        let full_ms = median(&full);
        table.row([
            name.to_string(),
            "1 GiB".into(),
            format!("{:.0}", median(&pages)),
            format!("{full_ms:.2}"),
            format!("{:.2}", full_ms * GIB as f64 / memory as f64),
            format!("{:.2}", median(&clean)),
        ]);
    }
    println!(
        "Dirty-set fetch-and-clear (guest paused; median of 5; includes merging VMM writes)\n{}\n",
        table.render()
    );
}

fn state_capture_restore() {
    let mut table = Table::new(["operation (2 vCPUs, paused)", "median µs", "p99 µs", "note"]);
    let config = VmConfig::new("state", 2, 64 * MIB);
    let mut vm = Vm::create(&config, &busy_guest(16 * MIB), &[]).expect("create VM");
    vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().expect("pause");
    let mut capture = Vec::new();
    let mut state: Option<VmState> = None;
    for _ in 0..200 {
        let start = Instant::now();
        state = Some(vm.capture_state().expect("capture"));
        capture.push(micros(start.elapsed()));
    }
    let state = state.expect("captured");
    let mut encode = Vec::new();
    let mut decode = Vec::new();
    let mut bytes = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        bytes = blob::encode(&state).expect("encode");
        encode.push(micros(start.elapsed()));
        let start = Instant::now();
        let _: VmState = blob::decode(&bytes).expect("decode");
        decode.push(micros(start.elapsed()));
    }
    let mut target = Vm::create_for_restore(&state, DirtyLogMode::Bitmap, None).expect("target");
    let mut restore = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        target.restore_state(&state).expect("restore");
        restore.push(micros(start.elapsed()));
    }
    let msrs = state.vcpus[0].msrs.len();
    for (name, samples, note) in [
        ("capture_state", &capture, format!("{msrs} MSRs per vCPU")),
        ("encode blob", &encode, format!("{} bytes", bytes.len())),
        ("decode blob (crc + postcard)", &decode, String::new()),
        ("restore_state", &restore, String::new()),
    ] {
        table.row([
            name.to_string(),
            format!("{:.0}", median(samples)),
            format!("{:.0}", percentile(samples, 0.99)),
            note,
        ]);
    }
    println!("VM state capture and restore\n{}\n", table.render());
}

fn save_restore(dir: &std::path::Path, label: &str) -> Vec<String> {
    let content_file = dir.join("ferry-bench-content.bin");
    content::write_file(&content_file, Content::Mixed, 512 * MIB, 11).expect("content file");
    let config = VmConfig::new("save", 1, GIB);
    let preload = Preload {
        path: content_file.clone(),
        gpa: 512 * MIB,
    };
    let boot = Boot::Guest(TestGuest::Counter { ticks_per_sec: 100 });
    let mut vm = Vm::create(&config, &boot, &[preload]).expect("create VM");
    vm.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.join("ferry-bench.snap");
    let save = snapshot::save(&mut vm, &snap, &SaveOptions::default()).expect("save");
    drop(vm);
    let start = Instant::now();
    let (restored, report) = snapshot::restore(&snap, DirtyLogMode::Bitmap, None).expect("restore");
    let restore_ms = millis(start.elapsed());
    assert_eq!(
        report.memory_hash, save.memory_hash,
        "restored memory differs"
    );
    drop(restored);
    let _ = std::fs::remove_file(&snap);
    let _ = std::fs::remove_file(&content_file);
    vec![
        label.to_string(),
        save.rounds.len().to_string(),
        format!("{:.0}", save.rounds[0].millis),
        format!("{:.0}", save.total_ms),
        format!("{:.1}", save.downtime_ms),
        format!("{:.0}", save.bytes_written as f64 / MIB as f64),
        format!("{restore_ms:.0}"),
    ]
}

fn main() {
    pause_latency();
    dirty_fetch();
    state_capture_restore();
    let mut table = Table::new([
        "1 GiB VM, 512 MiB mixed content, counter running",
        "rounds",
        "first round ms",
        "save total ms",
        "downtime ms",
        "MiB written",
        "restore ms",
    ]);
    table.row(save_restore(
        std::path::Path::new("/dev/shm"),
        "snapshot on tmpfs (/dev/shm)",
    ));
    let disk_dir = std::env::var_os("FERRY_BENCH_SNAPSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    table.row(save_restore(&disk_dir, "snapshot on disk (ext4)"));
    println!(
        "Save while running and restore (restore = new VM + read + verify hash + load state)\n{}",
        table.render()
    );
}
