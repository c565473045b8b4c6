//! Transport throughput on loopback, against a plain TCP socket pump measured in the same
//! run. Prints one table.
//!
//! Source and destination memory are memfd mappings, as the runtime's guest memory is; the
//! destination is a fresh memfd for every run, so its page faults are part of the cost, as
//! they are in a real migration. Sender and receiver share this machine's CPUs.
//!
//! The fragmented rows send a quarter of that memory (256 MiB by default) as many short
//! ranges with gaps between them, the way a guest that dirties every other page leaves its
//! dirty set: what matters there is the cost per range, not per byte.
//!
//! Environment: `FERRY_BENCH_MIB` (transfer size, default 1024), `FERRY_BENCH_REPEATS`
//! (runs per row, median reported, default 3), `FERRY_BENCH_ONLY` (comma-separated
//! substrings of "case compression workers" selecting rows), `FERRY_BENCH_PAGES_PER_FRAME`
//! (sender frame size, default the library's) and `FERRY_BENCH_VERBOSE` (print every run).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_benches::{Table, gb_per_s, median, process_cpu_time};
use ferry_runtime::content::{self, Content};
use ferry_transport::data::{
    CompressionPolicy, DataListener, DataReceiver, DataSender, Prefault, ReceiverConfig,
    SenderConfig, SessionId,
};
use ferry_transport::memory::{GuestRegions, PAGE_SIZE, PageRange, RawRegion, RegionFile};
use ferry_transport::stats::TransferStats;
use ferry_transport::workers::{WorkerPlacement, available_cpus};

/// A shared memfd mapping, like the runtime's guest memory.
struct Mapping {
    addr: *mut u8,
    len: usize,
    fd: libc::c_int,
}

impl Mapping {
    fn memfd(len: usize) -> Mapping {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; no memory is passed.
        let fd = unsafe { libc::memfd_create(c"ferry-bench".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is the memfd just created.
        let rc = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a new shared mapping of the whole memfd; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // Transparent huge pages cost milliseconds per fault in a fresh process here.
        // SAFETY: advice on the mapping just created.
        unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
        Mapping {
            addr: addr.cast(),
            len,
            fd,
        }
    }

    /// The whole mapping as one guest region at address 0; with `through_file`, writes go
    /// through the memfd rather than the mapping.
    fn region(&self, through_file: bool) -> RawRegion {
        let file = through_file.then_some(RegionFile {
            fd: self.fd,
            offset: 0,
        });
        RawRegion {
            guest_phys_addr: 0,
            host_addr: self.addr,
            len: self.len,
            file,
        }
    }

    fn pages_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for len bytes while self lives, and the &mut self
        // borrow ensures no GuestRegions over it is in use meanwhile (callers fill memory
        // before building one).
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `memfd` mapped, once; nothing uses the mapping any more.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
        // SAFETY: closing what `memfd` opened, once.
        unsafe { libc::close(self.fd) };
    }
}

/// Fills benchmark memory with the shared synthetic content (same seed every run).
fn fill(memory: &mut [u8], content: Content) {
    content::fill(memory, content, 0x2545_f491_4f6c_dd1d);
}

struct Sample {
    elapsed: Duration,
    cpu: Duration,
    guest_bytes: u64,
    wire_bytes: u64,
}

fn pin(cpu: usize) {
    assert!(
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu }),
        "cannot pin to CPU {cpu}"
    );
}

/// The physical baseline: one thread writes `bytes` into a loopback socket in 1 MiB writes,
/// another reads them, on different CPUs. `into_fresh_memfd` makes the reader read straight
/// into a fresh memfd mapping instead of a reused buffer, to show what page faults cost.
fn raw_pump(bytes: usize, into_fresh_memfd: bool) -> Sample {
    const CHUNK: usize = 1 << 20;
    let cpus = available_cpus();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader_cpu = cpus[1 % cpus.len()];
    let reader = thread::spawn(move || {
        pin(reader_cpu);
        let (mut socket, _) = listener.accept().unwrap();
        let mut target = into_fresh_memfd.then(|| Mapping::memfd(bytes));
        let mut buffer = vec![0u8; CHUNK];
        let mut received = 0;
        while received < bytes {
            let n = match &mut target {
                Some(mapping) => socket.read(&mut mapping.pages_mut()[received..]).unwrap(),
                None => socket.read(&mut buffer).unwrap(),
            };
            assert!(n > 0, "pump closed early");
            received += n;
        }
        Instant::now()
    });
    pin(cpus[0]);
    let mut socket = TcpStream::connect(addr).unwrap();
    let mut chunk = vec![0u8; CHUNK];
    content::fill(&mut chunk, Content::Random, 7);
    let cpu = process_cpu_time();
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = CHUNK.min(bytes - sent);
        socket.write_all(&chunk[..n]).unwrap();
        sent += n;
    }
    let finished = reader.join().unwrap();
    Sample {
        elapsed: finished - started,
        cpu: process_cpu_time() - cpu,
        guest_bytes: bytes as u64,
        wire_bytes: bytes as u64,
    }
}

/// Which pages one run sends, all in one `send` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// The whole memory as one range.
    Contiguous,
    /// Ranges of `run` pages separated by `gap` unsent pages, from the start of memory until
    /// a quarter of it is covered.
    Fragmented { run: u64, gap: u64 },
}

impl Pattern {
    fn ranges(self, pages: u64) -> Vec<PageRange> {
        let Pattern::Fragmented { run, gap } = self else {
            return vec![PageRange::new(0, pages)];
        };
        let target = pages / 4;
        let mut ranges = Vec::with_capacity((target / run + 1) as usize);
        let (mut pfn, mut sent) = (0, 0);
        while sent < target && pfn < pages {
            let count = run.min(target - sent).min(pages - pfn);
            ranges.push(PageRange::new(pfn, count));
            sent += count;
            pfn += run + gap;
        }
        ranges
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    workers: usize,
    policy: CompressionPolicy,
    prefault: Prefault,
    /// Populate the whole destination before the clock starts.
    populated: bool,
    /// Write the destination through its memfd (pwrite) rather than its mapping.
    through_file: bool,
    /// The ranges handed to `send`.
    pattern: Pattern,
}

fn ferry(source: &Arc<GuestRegions>, pages: u64, run: Run) -> Sample {
    let cpus = available_cpus();
    // Sender and receiver of a stream sit on different CPUs, as they would on two hosts.
    let receiver_cpus: Vec<usize> = cpus
        .iter()
        .cycle()
        .skip(1)
        .take(cpus.len())
        .copied()
        .collect();
    let mapping = Mapping::memfd(pages as usize * PAGE_SIZE);
    let region = mapping.region(run.through_file);
    // SAFETY: `mapping` outlives `sink` (dropped at the end of this function after the
    // receiver has finished and released its Arc), is freshly created and so all zero, and
    // is accessed only through `sink` meanwhile.
    let sink = Arc::new(unsafe { GuestRegions::new_zeroed(&[region]) }.expect("sink regions"));
    if run.populated {
        sink.populate(PageRange::new(0, pages)).expect("populate");
    }
    let session = SessionId::random();
    let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let mut receiver_config =
        ReceiverConfig::new(session, WorkerPlacement::pinned(run.workers, receiver_cpus));
    receiver_config.prefault = run.prefault;
    let receiver = DataReceiver::start(listener, Arc::clone(&sink), receiver_config).unwrap();
    let mut config = SenderConfig::new(session, WorkerPlacement::pinned(run.workers, cpus));
    config.compression = run.policy;
    config.pages_per_frame = env_number(
        "FERRY_BENCH_PAGES_PER_FRAME",
        config.pages_per_frame as usize,
    ) as u32;
    let mut sender = DataSender::connect(&[addr], Arc::clone(source), config).unwrap();
    let ranges = run.pattern.ranges(pages);

    let cpu = process_cpu_time();
    let started = Instant::now();
    sender.send(&ranges).unwrap();
    let stats: TransferStats = sender.finish().unwrap();
    let elapsed = started.elapsed();
    let cpu = process_cpu_time() - cpu;
    receiver.wait().unwrap();
    drop(sink);
    drop(mapping);
    Sample {
        elapsed,
        cpu,
        guest_bytes: stats.total.guest_bytes,
        wire_bytes: stats.total.wire_bytes,
    }
}

/// The medians of `times` runs of `run`, each preceded by a raw pump run, so that every
/// measurement has a baseline taken under the same conditions: other work on a shared
/// machine moves both. Returns the medians and the median ratio of guest bytes/s to the
/// adjacent pump's.
fn repeat(times: usize, bytes: usize, mut run: impl FnMut() -> Sample) -> (Sample, f64, f64) {
    let verbose = std::env::var_os("FERRY_BENCH_VERBOSE").is_some();
    let mut samples = Vec::with_capacity(times);
    let mut ratios = Vec::with_capacity(times);
    let mut pumps = Vec::with_capacity(times);
    for _ in 0..times {
        let pump = raw_pump(bytes, false);
        let pump_rate = gb_per_s(pump.guest_bytes, pump.elapsed);
        let sample = run();
        let rate = gb_per_s(sample.guest_bytes, sample.elapsed);
        if verbose {
            eprintln!(
                "  sample: {:.3} s, CPU {:.3} s, {rate:.2} GB/s; adjacent pump {pump_rate:.2} GB/s",
                sample.elapsed.as_secs_f64(),
                sample.cpu.as_secs_f64()
            );
        }
        ratios.push(rate / pump_rate);
        pumps.push(pump_rate);
        samples.push(sample);
    }
    let medians = |f: &dyn Fn(&Sample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
    let sample = Sample {
        elapsed: Duration::from_secs_f64(medians(&|s| s.elapsed.as_secs_f64())),
        cpu: Duration::from_secs_f64(medians(&|s| s.cpu.as_secs_f64())),
        guest_bytes: samples[0].guest_bytes,
        wire_bytes: medians(&|s| s.wire_bytes as f64) as u64,
    };
    (sample, median(&ratios), median(&pumps))
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One row of the table.
struct Row {
    label: String,
    content: Option<Content>,
    run: Option<Run>,
    /// For the raw pump rows: read into a fresh memfd instead of a reused buffer.
    pump_into_memfd: bool,
}

fn rows() -> Vec<Row> {
    let default = Run {
        workers: 1,
        policy: CompressionPolicy::Adaptive,
        prefault: Prefault::PerFrame,
        populated: false,
        through_file: true,
        pattern: Pattern::Contiguous,
    };
    let mut rows = vec![
        Row {
            label: "raw TCP pump (1 MiB writes, reused buffer)".into(),
            content: None,
            run: None,
            pump_into_memfd: false,
        },
        Row {
            label: "raw TCP pump into fresh memfd".into(),
            content: None,
            run: None,
            pump_into_memfd: true,
        },
    ];
    for content in [Content::Random, Content::Zero, Content::Mixed] {
        let name = format!("{content:?}").to_lowercase();
        let policies: &[CompressionPolicy] = match content {
            Content::Random => &[CompressionPolicy::Adaptive, CompressionPolicy::Lz4],
            Content::Zero => &[CompressionPolicy::Adaptive],
            Content::Mixed => &[
                CompressionPolicy::None,
                CompressionPolicy::Lz4,
                CompressionPolicy::Adaptive,
            ],
        };
        for &policy in policies {
            for workers in [1, 2, 4] {
                let run = Run {
                    workers,
                    policy,
                    ..default
                };
                rows.push(Row {
                    label: name.clone(),
                    content: Some(content),
                    run: Some(run),
                    pump_into_memfd: false,
                });
            }
        }
        if content == Content::Random {
            let mapped = Run {
                through_file: false,
                ..default
            };
            for (label, run) in [
                (
                    "random, stores via mapping, no prefault",
                    Run {
                        prefault: Prefault::None,
                        ..mapped
                    },
                ),
                ("random, stores via mapping, prefault per frame", mapped),
                (
                    "random, destination populated beforehand",
                    Run {
                        populated: true,
                        ..mapped
                    },
                ),
            ] {
                rows.push(Row {
                    label: label.into(),
                    content: Some(content),
                    run: Some(run),
                    pump_into_memfd: false,
                });
            }
            for (run, gap) in [(1, 1), (3, 1)] {
                for workers in [1, 2, 4] {
                    rows.push(Row {
                        label: format!("random, {run}-page ranges, {gap}-page gaps"),
                        content: Some(content),
                        run: Some(Run {
                            workers,
                            pattern: Pattern::Fragmented { run, gap },
                            ..default
                        }),
                        pump_into_memfd: false,
                    });
                }
            }
        }
    }
    rows
}

fn main() {
    let mib = env_number("FERRY_BENCH_MIB", 1024);
    let repeats = env_number("FERRY_BENCH_REPEATS", 3).max(1);
    // Comma-separated substrings of "label compression workers"; rows matching none are
    // skipped (the raw pump always runs: every row is compared with it).
    let only: Vec<String> = std::env::var("FERRY_BENCH_ONLY")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let bytes = mib << 20;
    let pages = (bytes / PAGE_SIZE) as u64;
    println!(
        "ferry-transport loopback benchmark: {mib} MiB per run, median of {repeats} runs, {} CPUs shared by sender and receiver",
        available_cpus().len()
    );

    // Other work on this machine skews every number; say how busy it was.
    let load_before = ferry_benches::load_average();
    let mut table = Table::new([
        "case",
        "compression",
        "workers",
        "time s",
        "guest GB/s",
        "wire GB/s",
        "vs raw",
        "raw GB/s",
        "wire/guest",
        "CPU s",
    ]);
    let mut source: Option<(Content, Arc<GuestRegions>, Mapping)> = None;
    for row in rows() {
        let compression = row.run.map_or("-".to_string(), |run| match run.policy {
            // The library turns Adaptive into None over loopback (see SenderConfig::compression).
            CompressionPolicy::Adaptive => "adaptive*".to_string(),
            policy => format!("{policy:?}").to_lowercase(),
        });
        let workers = row.run.map_or(1, |run| run.workers);
        let key = format!(
            "{} {} {workers}",
            row.label,
            compression.trim_end_matches('*')
        );
        let is_baseline = row.run.is_none() && !row.pump_into_memfd;
        if !is_baseline && !only.is_empty() && !only.iter().any(|o| key.contains(o.as_str())) {
            continue;
        }
        let sample = match (row.content, row.run) {
            (Some(content), Some(run)) => {
                if source.as_ref().is_none_or(|(have, _, _)| *have != content) {
                    drop(source.take()); // unmap the previous content first
                    let mut mapping = Mapping::memfd(bytes);
                    fill(mapping.pages_mut(), content);
                    // SAFETY: `mapping` is kept next to the regions in `source` and dropped
                    // with them; it is only read through them from here on.
                    let regions = unsafe { GuestRegions::new(&[mapping.region(false)]) }
                        .expect("source regions");
                    source = Some((content, Arc::new(regions), mapping));
                }
                let (_, regions, _) = source.as_ref().expect("source filled above");
                repeat(repeats, bytes, || ferry(regions, pages, run))
            }
            _ => repeat(repeats, bytes, || raw_pump(bytes, row.pump_into_memfd)),
        };
        let (sample, ratio, pump_rate) = sample;
        let guest = gb_per_s(sample.guest_bytes, sample.elapsed);
        table.row([
            row.label,
            compression,
            workers.to_string(),
            format!("{:.3}", sample.elapsed.as_secs_f64()),
            format!("{guest:.2}"),
            format!("{:.2}", gb_per_s(sample.wire_bytes, sample.elapsed)),
            format!("{:.0}%", 100.0 * ratio),
            format!("{pump_rate:.2}"),
            format!(
                "{:.3}",
                sample.wire_bytes as f64 / sample.guest_bytes as f64
            ),
            format!("{:.2}", sample.cpu.as_secs_f64()),
        ]);
    }
    drop(source);
    println!("{}", table.render());
    println!(
        "load average (1/5/15 min) before: {load_before}; after: {}",
        ferry_benches::load_average()
    );
    println!(
        "vs raw = median over runs of guest bytes/s divided by that of a raw TCP pump run (1 MiB writes into a reused buffer)\n\
         just before it, whose median rate is the raw GB/s column. CPU s = user+sys of the whole process (both sides) during the run.\n\
         adaptive* = the default policy, which over loopback compresses nothing (lz4 cannot beat a memory-copy link).\n\
         N-page ranges, M-page gaps = a quarter of the memory sent as that many short ranges in one send; GB/s count the pages sent."
    );
}
