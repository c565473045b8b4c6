//! Which pages a live copy sends, checked against a model: whatever the schedule of writes,
//! a copy that sends round one from `begin_tracking`, every later round from `fetch_dirty`,
//! and the last round after the writer has stopped ends with a destination equal to the
//! source. That is: every page whose final content is not zero is sent after its last
//! write. Real VMs on /dev/kvm, as CI has.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_runtime::layout::{DATA_START, PAGE_SIZE};
use ferry_runtime::{Boot, DirtySet, GuestRam, TestGuest, Vm, VmConfig};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
/// Pages the schedules write: few, so writes collide and re-dirty pages already sent.
const PAGES: u64 = 48;
const PAGE: usize = PAGE_SIZE as usize;

/// The destination of the model: the pages it has received (anything else reads as zero,
/// as fresh destination memory does).
#[derive(Default)]
struct Destination {
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Destination {
    fn receive(&mut self, ram: &GuestRam, gpa: u64) {
        let mut page = vec![0u8; PAGE];
        ram.read(gpa, &mut page).expect("page inside RAM");
        self.pages.insert(gpa, page);
    }

    /// Every page of RAM that differs between source and destination.
    fn differences(&self, ram: &GuestRam) -> Vec<u64> {
        let mut wrong = Vec::new();
        let mut page = vec![0u8; PAGE];
        let zero = vec![0u8; PAGE];
        for (start, len) in ram.layout() {
            let mut gpa = start;
            while gpa < start + len {
                ram.read(gpa, &mut page).expect("page inside RAM");
                let arrived = self.pages.get(&gpa).unwrap_or(&zero);
                if *arrived != page {
                    wrong.push(gpa);
                }
                gpa += PAGE_SIZE;
            }
        }
        wrong
    }
}

/// One VMM write: page index, offset in the page, length, byte value (0 zeroes it again).
#[derive(Clone, Copy, Debug)]
struct Write {
    page: u64,
    offset: usize,
    len: usize,
    value: u8,
}

impl Write {
    fn apply(&self, ram: &GuestRam) {
        let gpa = DATA_START + self.page * PAGE_SIZE + self.offset as u64;
        ram.write(gpa, &vec![self.value; self.len])
            .expect("write inside RAM");
    }
}

fn write_strategy() -> impl Strategy<Value = Write> {
    (0..PAGES, 0..PAGE, 1..=PAGE, any::<u8>()).prop_map(|(page, offset, len, value)| Write {
        page,
        offset,
        len: len.min(PAGE - offset),
        // Whole-page zero writes make pages that were sent with data zero again.
        value: if value < 32 { 0 } else { value },
    })
}

/// A VM whose guest never runs: only the VMM writes its memory, so the schedule is exact.
fn idle_vm() -> Vm {
    let boot = Boot::Guest(TestGuest::Counter { ticks_per_sec: 1 });
    Vm::create(&VmConfig::new("selection", 1, 8 * MIB), &boot, &[]).expect("create VM")
}

/// Sends `set` page by page, applying the writes scheduled for each step as it goes.
fn send_round(
    ram: &GuestRam,
    set: &DirtySet,
    destination: &mut Destination,
    writes: &mut impl Iterator<Item = (usize, Write)>,
    step: &mut usize,
    pending: &mut Option<(usize, Write)>,
) {
    let mut apply_due = |step: usize| {
        loop {
            let next = pending.take().or_else(|| writes.next());
            match next {
                Some((at, write)) if at <= step => write.apply(ram),
                other => {
                    *pending = other;
                    return;
                }
            }
        }
    };
    for gpa in set.pages() {
        apply_due(*step);
        destination.receive(ram, gpa);
        *step += 1;
    }
    apply_due(*step);
    *step += 1;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random writes before tracking, between and inside rounds (between any two page
    /// copies), with 1–5 rounds before the last: the destination ends equal to the source.
    #[test]
    fn every_write_reaches_the_destination(
        before in proptest::collection::vec(write_strategy(), 0..24),
        during in proptest::collection::vec((0usize..600, write_strategy()), 0..120),
        rounds in 1usize..=5,
    ) {
        let mut vm = idle_vm();
        let ram = vm.ram_handle();
        for write in &before {
            write.apply(&ram);
        }
        let mut schedule = during.clone();
        schedule.sort_by_key(|(at, _)| *at);
        let mut writes = schedule.into_iter();
        let mut pending = None;
        let mut step = 0;
        let mut destination = Destination::default();

        let mut set = vm.begin_tracking().expect("tracking");
        for _ in 0..rounds {
            send_round(&ram, &set, &mut destination, &mut writes, &mut step, &mut pending);
            set = vm.fetch_dirty().expect("fetch");
        }
        // The writer stops (the guest is paused): the rest of the schedule happens first,
        // then the last fetch, and the last round goes out with nothing writing any more.
        for (_, write) in pending.take().into_iter().chain(writes) {
            write.apply(&ram);
        }
        let last = vm.fetch_dirty().expect("last fetch");
        set.union_with(&last).expect("same layout");
        for gpa in set.pages() {
            destination.receive(&ram, gpa);
        }
        let wrong = destination.differences(&ram);
        prop_assert!(wrong.is_empty(), "pages lost or stale on the destination: {wrong:x?}");
    }
}

/// The order `begin_tracking` fixes is what the test above relies on: read the populated
/// ranges before tracking starts, and a page first written in between is lost. The model
/// catches it.
#[test]
fn reading_the_backing_before_tracking_starts_loses_pages() {
    let mut vm = idle_vm();
    let ram = vm.ram_handle();
    let populated_too_early = ram.populated_ranges();
    let fresh = Write {
        page: 7,
        offset: 0,
        len: 16,
        value: 0xab,
    };
    fresh.apply(&ram);
    let _ = vm.begin_tracking().expect("tracking");
    let mut destination = Destination::default();
    for range in &populated_too_early {
        for i in 0..range.pages {
            destination.receive(&ram, range.gpa + i * PAGE_SIZE);
        }
    }
    let last = vm.fetch_dirty().expect("fetch");
    for gpa in last.pages() {
        destination.receive(&ram, gpa);
    }
    assert_eq!(
        destination.differences(&ram),
        vec![DATA_START + 7 * PAGE_SIZE],
        "the page written between the read and the start of tracking is the one lost"
    );
}

/// A writer thread racing the copy, so writes also land inside `begin_tracking` and inside
/// every fetch. Like a guest filling its memory, it writes pages for the first time along a
/// moving front, and rewrites pages behind it: still nothing is lost.
#[test]
fn a_concurrent_writer_loses_nothing() {
    let boot = Boot::Guest(TestGuest::Counter { ticks_per_sec: 1 });
    let memory = 64 * MIB;
    let data_pages = (memory - DATA_START) / PAGE_SIZE;
    for seed in 0..4u64 {
        let mut vm = Vm::create(&VmConfig::new("racing", 1, memory), &boot, &[]).expect("VM");
        let ram = vm.ram_handle();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let ram = Arc::clone(&ram);
            let stop = Arc::clone(&stop);
            let written = Arc::clone(&written);
            std::thread::spawn(move || {
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut writes = 0u64;
                let mut front = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = if writes.is_multiple_of(2) {
                        front = (front + 1) % data_pages;
                        front
                    } else {
                        x % (front + 1)
                    };
                    let write = Write {
                        page,
                        offset: (x >> 20) as usize % PAGE,
                        len: 8,
                        value: (x >> 40) as u8 | 1,
                    };
                    write.apply(&ram);
                    writes += 1;
                    written.store(writes, Ordering::Relaxed);
                    if writes.is_multiple_of(64) {
                        // About a fresh page every few microseconds: the front is still
                        // moving while the rounds run.
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                writes
            })
        };
        // However the machine schedules the two threads: tracking starts with the writer
        // under way, and rounds go on until it has written a good deal during them.
        let wait_for_writes = |at_least: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while written.load(Ordering::Relaxed) < at_least {
                assert!(std::time::Instant::now() < deadline, "the writer never ran");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for_writes(100);
        let mut destination = Destination::default();
        let mut set = vm.begin_tracking().expect("tracking");
        let during = written.load(Ordering::Relaxed) + 5000;
        let mut rounds = 0;
        while rounds < 6 || written.load(Ordering::Relaxed) < during {
            for gpa in set.pages() {
                destination.receive(&ram, gpa);
            }
            set = vm.fetch_dirty().expect("fetch");
            rounds += 1;
            if rounds >= 6 {
                wait_for_writes(during);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().expect("writer");
        set.union_with(&vm.fetch_dirty().expect("last fetch"))
            .expect("same layout");
        for gpa in set.pages() {
            destination.receive(&ram, gpa);
        }
        assert!(writes >= during);
        let wrong = destination.differences(&ram);
        assert!(wrong.is_empty(), "seed {seed}: pages lost: {wrong:x?}");
    }
}

/// The worst moment with a real guest: the `verify` guest is still filling its memory when
/// tracking starts. After rounds and a last copy with the guest paused, the state moves to
/// a second VM, which runs on and checks every page: no check may fail.
#[test]
fn a_guest_filling_its_memory_arrives_whole() {
    let memory = 256 * MIB;
    let boot = Boot::Guest(TestGuest::Verify {
        seed: 7,
        pages: None,
    });
    for delay_ms in [0u64, 20, 80] {
        let mut source =
            Vm::create(&VmConfig::new("filling", 1, memory), &boot, &[]).expect("create VM");
        source.resume().expect("run");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let ram = source.ram_handle();
        let mut target = Vm::create_empty(
            source.identity(),
            source.shape(),
            source.boot_description(),
            ferry_runtime::DirtyLogMode::Bitmap,
            None,
            &[],
            &[],
        )
        .expect("empty VM");
        let copy = |target: &Vm, set: &DirtySet| {
            let mut buf = vec![0u8; 256 * PAGE];
            for range in set.ranges() {
                let mut at = range.gpa;
                while at < range.end() {
                    let len = (range.end() - at).min(buf.len() as u64) as usize;
                    ram.read(at, &mut buf[..len]).expect("read");
                    target.ram().write(at, &buf[..len]).expect("write");
                    at += len as u64;
                }
            }
        };
        let mut set = source.begin_tracking().expect("tracking");
        for _ in 0..3 {
            copy(&target, &set);
            set = source.fetch_dirty().expect("fetch");
        }
        source.pause().expect("pause");
        set.union_with(&source.fetch_dirty().expect("last fetch"))
            .expect("same layout");
        copy(&target, &set);
        assert_eq!(
            target.ram().hash(),
            source.ram().hash(),
            "delay {delay_ms} ms"
        );
        let state = source.capture_state().expect("state");
        drop(source);
        target.restore_state(&state).expect("restore");
        let passes = target.test_device().state().progress;
        target.resume().expect("run the copy");
        let (reports, done) = target
            .test_device()
            .wait_until(Duration::from_secs(60), |s| s.progress >= passes + 2);
        assert!(
            done,
            "delay {delay_ms} ms: the copy stopped making progress: {reports:?}"
        );
        assert_eq!(
            reports.failure_count, 0,
            "delay {delay_ms} ms: the guest found lost or stale pages: {reports:?}"
        );
    }
}
