//! The `disk` guest on a real virtio-blk device in a real KVM VM: it writes and checks its
//! blocks with 0 mismatches, the image holds what it says it wrote, a second VM cannot open
//! the image, a block changed behind its back is caught, and the device's state moves to a
//! new VM at whatever moment the guest is paused, with the image lock handed over.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_runtime::devices::virtio::block::DiskImage;
use ferry_runtime::guest::disk::{DISK_BLOCK, DiskGuestView};
use ferry_runtime::{Boot, DiskSpec, TestGuest, Vm, VmConfig, VmError};

const MIB: u64 = 1 << 20;

fn disk_guest(writes_per_sec: Option<u64>) -> Boot {
    Boot::Guest(TestGuest::Disk {
        seed: 7,
        blocks: None,
        writes_per_sec,
    })
}

fn image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    DiskImage::create_sparse(&path, size).unwrap();
    path
}

fn config(name: &str, path: &Path) -> VmConfig {
    let mut config = VmConfig::new(name, 1, 64 * MIB);
    config.disks.push(DiskSpec {
        path: path.to_path_buf(),
        read_only: false,
        id: "ferry-test".into(),
        lock: true,
    });
    config
}

/// Waits for `writes` more completed writes than now (the guest reports every 64).
fn wait_for_writes(vm: &Vm, writes: u32) -> u32 {
    let from = vm.test_device().state().progress;
    let (state, ok) = vm
        .test_device()
        .wait_until(Duration::from_secs(60), |s| s.progress >= from + writes);
    assert!(ok, "the disk guest stalled: {state:?}");
    state.progress
}

fn wrong_blocks(vm: &Vm, path: &Path) -> (usize, Vec<u64>) {
    let view = DiskGuestView::read(vm.ram()).unwrap();
    let file = File::open(path).unwrap();
    (view.written(), view.wrong_blocks(&file))
}

#[test]
fn the_disk_guest_runs_ten_seconds_without_a_mismatch_and_the_image_holds_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 8 * MIB);
    let mut vm = Vm::create(&config("disk", &path), &disk_guest(None), &[]).unwrap();
    vm.resume().unwrap();
    let started = Instant::now();
    wait_for_writes(&vm, 256);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    vm.pause().unwrap();
    let state = vm.test_device().state();
    assert_eq!(state.failure_count, 0, "{:?}", state.failures);
    assert!(
        state.exits.is_empty(),
        "the guest stopped: {:?}",
        state.exits
    );
    let (written, wrong) = wrong_blocks(&vm, &path);
    assert!(written > 0);
    assert!(
        wrong.is_empty(),
        "blocks not as the guest wrote them: {wrong:?}"
    );
    let disk = &vm.disks()[0];
    assert!(disk.counters.writes >= 256 && disk.counters.reads > 0 && disk.counters.flushes > 0);
    assert_eq!(disk.counters.malformed + disk.counters.failed, 0);
    assert!(disk.locked);
    // And it goes on after a pause.
    vm.resume().unwrap();
    wait_for_writes(&vm, 64);
    assert_eq!(vm.test_device().state().failure_count, 0);
}

#[test]
fn a_block_changed_behind_the_guests_back_is_caught_by_the_guest_and_the_host_check() {
    let dir = tempfile::tempdir().unwrap();
    // Few blocks, so the guest reads the damaged one back soon.
    let path = image(dir.path(), 64 * DISK_BLOCK);
    let mut vm = Vm::create(&config("damaged", &path), &disk_guest(None), &[]).unwrap();
    vm.resume().unwrap();
    wait_for_writes(&vm, 256);
    vm.pause().unwrap();
    let view = DiskGuestView::read(vm.ram()).unwrap();
    let victim = view
        .generations
        .iter()
        .position(|&g| g != 0)
        .expect("a written block") as u64;
    // Change one word of it, as a lost or misplaced write would leave it.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xa5; 8], victim * DISK_BLOCK + 64)
        .unwrap();
    let (_, wrong) = wrong_blocks(&vm, &path);
    assert_eq!(
        wrong,
        vec![victim],
        "the host check sees exactly the damage"
    );
    // The guest sees it when it reads the block back (unless it rewrites it first, which
    // repairs it: then the next damage is caught; a few tries make it certain).
    let mut caught = false;
    for _ in 0..50 {
        vm.resume().unwrap();
        let (state, seen) = vm
            .test_device()
            .wait_until(Duration::from_secs(2), |s| s.failure_count > 0);
        if seen {
            assert!(
                state.failures.iter().all(|&b| u64::from(b) < 64),
                "{:?}",
                state.failures
            );
            caught = true;
            break;
        }
        vm.pause().unwrap();
        let view = DiskGuestView::read(vm.ram()).unwrap();
        let victim = view.generations.iter().position(|&g| g != 0).unwrap() as u64;
        file.write_all_at(&[0xa5; 8], victim * DISK_BLOCK + 64)
            .unwrap();
    }
    assert!(caught, "the guest never reported the damaged block");
}

#[test]
fn a_second_vm_on_the_same_image_is_refused_and_the_first_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 8 * MIB);
    let mut first = Vm::create(&config("first", &path), &disk_guest(Some(500)), &[]).unwrap();
    first.resume().unwrap();
    let error = Vm::create(&config("second", &path), &disk_guest(None), &[]).unwrap_err();
    assert!(matches!(error, VmError::Disk(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("in use by another VM") && text.contains("disk.raw"),
        "{text}"
    );
    wait_for_writes(&first, 64);
    assert_eq!(first.test_device().state().failure_count, 0);
    // Read-only use is refused too while a writer holds it.
    let mut read_only = config("reader", &path);
    read_only.disks[0].read_only = true;
    assert!(Vm::create(&read_only, &disk_guest(None), &[]).is_err());
}

/// Moves a paused VM into a new one in this process: memory, state, and the disk's lock;
/// the new VM's disk is the image at `path`.
fn move_vm(source: &mut Vm, path: &Path) -> Vm {
    source.pause().unwrap();
    let state = source.capture_state().unwrap();
    let mut spec = config("moved", path).disks;
    spec[0].lock = false;
    let mut target = Vm::create_empty(
        source.identity(),
        source.shape(),
        source.boot_description(),
        ferry_runtime::DirtyLogMode::Bitmap,
        None,
        &spec,
        &[],
    )
    .unwrap();
    // While the source holds the lock of a shared image, the target cannot take it.
    if source.disks()[0].path == path {
        assert!(target.lock_disks().is_err());
    }
    common::copy_memory(source.ram(), target.ram());
    target.restore_state(&state).unwrap();
    source.release_disks().unwrap();
    target.lock_disks().unwrap();
    target
}

#[test]
fn the_device_moves_to_a_new_vm_at_any_moment_of_heavy_writing_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 * MIB);
    let mut vm = Vm::create(&config("mover", &path), &disk_guest(None), &[]).unwrap();
    vm.resume().unwrap();
    wait_for_writes(&vm, 64);
    // Each hop pauses the guest wherever it is: between requests, mid-fill, and (every
    // other hop, made certain by holding the device's I/O first) with a request the guest
    // posted that the source never served, which the new VM must serve exactly once.
    for hop in 0..12u64 {
        std::thread::sleep(Duration::from_millis(hop * 7 % 40));
        if hop % 2 == 1 {
            vm.hold_device_io();
            // Read once held: a request being served when the hold came completes first,
            // and counts before this read, not after it.
            let writes = vm.disks()[0].counters.writes;
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(
                vm.disks()[0].counters.writes,
                writes,
                "held I/O is not served"
            );
        }
        let mut next = move_vm(&mut vm, &path);
        let (_, wrong) = wrong_blocks(&next, &path);
        assert!(wrong.is_empty(), "hop {hop}: {wrong:?}");
        let before = next.disks()[0].counters;
        next.resume().unwrap();
        drop(vm);
        vm = next;
        wait_for_writes(&vm, 64);
        let state = vm.test_device().state();
        assert_eq!(state.failure_count, 0, "hop {hop}: {:?}", state.failures);
        assert!(vm.disks()[0].counters.writes > before.writes);
    }
    vm.pause().unwrap();
    let (written, wrong) = wrong_blocks(&vm, &path);
    assert!(written > 0 && wrong.is_empty(), "{wrong:?}");
}

#[test]
fn the_disk_guest_without_a_disk_is_refused_at_create() {
    let error = Vm::create(
        &VmConfig::new("nodisk", 1, 64 * MIB),
        &disk_guest(None),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("needs a disk"), "{error}");
}

/// A storage copy as a migration makes it, in this process: a bulk pass over the image's
/// data extents with write tracking on, rounds of what the guest wrote meanwhile, then the
/// last writes with the guest paused. The guest writes as fast as it can throughout. The
/// copy must equal the source byte for byte, keep the holes, and run the guest on with 0
/// mismatches.
#[test]
fn a_disk_copied_in_rounds_while_the_guest_writes_heavily_arrives_whole_with_its_holes() {
    use ferry_runtime::devices::virtio::block::dirty_blocks::DEFAULT_CHUNK;
    use std::collections::BTreeSet;

    let dir = tempfile::tempdir().unwrap();
    let source_path = image(dir.path(), 16 * MIB);
    let target_path = dir.path().join("target.raw");
    DiskImage::create_sparse(&target_path, 16 * MIB).unwrap();
    let mut vm = Vm::create(&config("copied", &source_path), &disk_guest(None), &[]).unwrap();
    vm.resume().unwrap();
    wait_for_writes(&vm, 256);

    let source = File::open(&source_path).unwrap();
    let target = std::fs::OpenOptions::new()
        .write(true)
        .open(&target_path)
        .unwrap();
    // Pages of the target ever written: a zero page elsewhere is a hole and stays one.
    let mut written = BTreeSet::new();
    let mut copy = |extents: &[(u64, u64)]| {
        let mut page = vec![0u8; 4096];
        for &(offset, len) in extents {
            for at in (offset..offset + len).step_by(4096) {
                source.read_exact_at(&mut page, at).unwrap();
                if page.iter().all(|&b| b == 0) && !written.contains(&at) {
                    continue;
                }
                target.write_all_at(&page, at).unwrap();
                written.insert(at);
            }
        }
    };
    let first = vm.begin_disk_tracking(DEFAULT_CHUNK).unwrap();
    assert_eq!(first.len(), 1);
    assert!(!first[0].is_empty(), "the guest has written data");
    copy(&first[0]);
    for _ in 0..4 {
        wait_for_writes(&vm, 64);
        let dirty = vm.fetch_dirty_blocks();
        assert!(
            !dirty[0].is_empty(),
            "writes since the last round are recorded"
        );
        copy(&dirty[0]);
    }
    // Writes after the last live round make the final copy certain to matter.
    wait_for_writes(&vm, 64);
    vm.pause().unwrap();
    let last = vm.fetch_dirty_blocks();
    let hash = |path: &Path| std::fs::read(path).unwrap();
    assert_ne!(
        hash(&source_path),
        hash(&target_path),
        "before the final copy the target misses the last writes"
    );
    copy(&last[0]);
    assert!(
        hash(&source_path) == hash(&target_path),
        "the copy equals the source"
    );
    vm.stop_disk_tracking();
    let allocated = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    };
    assert!(
        allocated(&target_path) <= allocated(&source_path) + MIB,
        "holes stay holes: target {} bytes allocated, source {}",
        allocated(&target_path),
        allocated(&source_path)
    );

    let mut moved = move_vm(&mut vm, &target_path);
    let (written_blocks, wrong) = wrong_blocks(&moved, &target_path);
    assert!(written_blocks > 0 && wrong.is_empty(), "{wrong:?}");
    moved.resume().unwrap();
    drop(vm);
    wait_for_writes(&moved, 128);
    assert_eq!(moved.test_device().state().failure_count, 0);
    assert!(moved.disks()[0].path == target_path);
}

/// The lock handover as a migration drives it, step by step, with two disks: who holds each
/// image after every step, that a VM takes all of its locks or none, and that a handover
/// that failed gives the locks back to the source, whose guest carries on.
#[test]
fn the_lock_handover_moves_both_locks_together_and_a_failed_one_gives_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let first = image(dir.path(), 4 * MIB);
    let second = dir.path().join("second.raw");
    DiskImage::create_sparse(&second, 4 * MIB).unwrap();
    let mut spec = config("holder", &first);
    spec.disks.push(DiskSpec {
        path: second.clone(),
        read_only: false,
        id: "second".into(),
        lock: true,
    });
    let locked = |vm: &Vm| -> Vec<bool> { vm.disks().iter().map(|d| d.locked).collect() };
    let free = |path: &Path| DiskImage::open(path, false).is_ok();
    let mut source = Vm::create(&spec, &disk_guest(Some(2000)), &[]).unwrap();
    source.resume().unwrap();
    wait_for_writes(&source, 64);
    assert_eq!(locked(&source), [true, true]);

    // Running: the locks cannot be given up (the guest still writes).
    assert!(source.release_disks().is_err());
    assert_eq!(locked(&source), [true, true]);
    assert!(!free(&first) && !free(&second));

    // Paused and flushed: released; the destination takes both.
    source.pause().unwrap();
    source.release_disks().unwrap();
    assert_eq!(locked(&source), [false, false]);
    let mut target_disks = spec.disks.clone();
    for disk in &mut target_disks {
        disk.lock = false;
    }
    let target = Vm::create_empty(
        source.identity(),
        source.shape(),
        source.boot_description(),
        ferry_runtime::DirtyLogMode::Bitmap,
        None,
        &target_disks,
        &[],
    )
    .unwrap();
    assert_eq!(
        locked(&target),
        [false, false],
        "an arriving VM holds no lock yet"
    );
    let mut target = target;
    target.lock_disks().unwrap();
    assert_eq!(locked(&target), [true, true]);
    // The source cannot take them back while the destination holds them.
    assert!(source.lock_disks().is_err());
    assert_eq!(locked(&source), [false, false]);

    // The destination gives up (its state was rejected, say); someone else grabs the second
    // image meanwhile: the source gets neither lock, the first image stays free.
    target.release_disks().unwrap();
    let intruder = DiskImage::open(&second, false).unwrap();
    let error = source.lock_disks().unwrap_err().to_string();
    assert!(error.contains("second.raw"), "{error}");
    assert_eq!(locked(&source), [false, false], "all or none");
    assert!(free(&first));
    drop(intruder);

    // The failed handover ends with the source holding both again, and its guest writing on.
    source.lock_disks().unwrap();
    assert_eq!(locked(&source), [true, true]);
    assert!(target.lock_disks().is_err());
    assert_eq!(locked(&target), [false, false]);
    drop(target);
    source.resume().unwrap();
    wait_for_writes(&source, 64);
    let state = source.test_device().state();
    assert_eq!(state.failure_count, 0, "{:?}", state.failures);
    source.pause().unwrap();
    let (written, wrong) = wrong_blocks(&source, &first);
    assert!(written > 0 && wrong.is_empty(), "{wrong:?}");
}
