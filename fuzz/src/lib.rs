//! Fuzz targets for every decoder that reads bytes from outside the process, on stable Rust.
//!
//! cargo-fuzz needs a nightly toolchain, which this project does not have; so each target is
//! driven here by a small mutation engine: inputs start from valid encodings (seeds made by
//! the same code that writes them), then take a few random edits (bit flips, interesting
//! integers in length fields, insertions, deletions, splices, truncation). A target can also
//! repair the checksum of a mutated input, so that half the inputs get past the integrity
//! check and reach the parser behind it.
//!
//! Every input runs under `catch_unwind`; a panic, an input that takes longer than
//! [`HANG_LIMIT`], or a single allocation larger than [`ALLOC_CAP`] (counted by
//! [`CountingAlloc`], which the binaries install) is a failure, reported with the input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod seeds;
mod targets;

pub use targets::all;

/// The largest single allocation any decoder may make for one input: the biggest thing a
/// peer may legitimately send (a 64 MiB state blob) with room to spare.
pub const ALLOC_CAP: usize = 80 << 20;
/// An input that takes this long is a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(2);

static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, remembering the largest request since [`reset_largest`].
#[derive(Debug)]
pub struct CountingAlloc;

// SAFETY: every call goes to the system allocator unchanged; the counter has no effect on
// what is allocated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Starts counting the largest allocation afresh.
pub fn reset_largest() {
    LARGEST.store(0, Ordering::Relaxed);
}

/// The largest allocation since [`reset_largest`] (0 without [`CountingAlloc`] installed).
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

/// Feeds one input to a decoder.
pub type Decoder = Box<dyn Fn(&[u8])>;

/// One decoder under test.
pub struct Target {
    /// Its name in reports.
    pub name: &'static str,
    /// Valid encodings to start from.
    pub seeds: Vec<Vec<u8>>,
    /// Feeds one input to the decoder; errors are fine, panics are not.
    pub run: Decoder,
    /// Repairs the integrity check of a mutated input, if the format has one.
    pub fixup: Option<fn(&mut [u8])>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("seeds", &self.seeds.len())
            .finish_non_exhaustive()
    }
}

/// How long to fuzz a target: whichever limit comes first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Inputs.
    pub inputs: u64,
    /// Wall time.
    pub time: Duration,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Inputs run.
    pub inputs: u64,
    /// Time taken.
    pub elapsed: Duration,
    /// The slowest input.
    pub slowest: Duration,
    /// The largest single allocation of any input.
    pub largest_alloc: usize,
    /// Failures, each with the input (hex, first 256 bytes).
    pub failures: Vec<String>,
}

/// Deterministic xorshift64*: a failure is reproduced by the same seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    16 << 20,
];

const INTERESTING_U64: [u64; 8] = [
    0,
    1,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    64 << 20,
    i64::MAX as u64,
    u64::MAX,
];

/// Applies one to four random edits to `input`.
pub fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut Rng) {
    let edits = 1 + (rng.next_u64().trailing_zeros() as usize).min(3);
    for _ in 0..edits {
        let len = input.len();
        match rng.below(11) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let at = rng.below(len);
                input[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            3 if len >= 4 => {
                let at = rng.below(len - 3);
                let value = match rng.below(3) {
                    0 => len as u32,
                    1 => (len as u32).wrapping_add(1),
                    _ => INTERESTING_U32[rng.below(INTERESTING_U32.len())],
                };
                input[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            4 if len >= 8 => {
                let at = rng.below(len - 7);
                let value = INTERESTING_U64[rng.below(INTERESTING_U64.len())];
                input[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            5 => {
                let at = rng.below(len + 1);
                let count = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..count).map(|_| rng.next_u64() as u8).collect();
                input.splice(at..at, bytes);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                input.drain(at..end);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(64)).min(len);
                let copy = input[at..end].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            8 if len > 0 => input.truncate(rng.below(len)),
            9 if !seeds.is_empty() && len > 0 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let at = rng.below(len);
                    let from = rng.below(other.len());
                    input.truncate(at);
                    input.extend_from_slice(&other[from..]);
                }
            }
            _ => {
                let count = 1 + rng.below(8);
                input.extend((0..count).map(|_| rng.next_u64() as u8));
            }
        }
    }
}

fn hex(input: &[u8]) -> String {
    input.iter().take(256).map(|b| format!("{b:02x}")).collect()
}

/// Fuzzes `target` within `budget`, from generator seed `seed`.
pub fn run(target: &Target, budget: Budget, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut outcome = Outcome::default();
    let started = Instant::now();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut input = Vec::new();
    while outcome.inputs < budget.inputs {
        // Checking the clock every input would cost more than some decoders do.
        if outcome.inputs % 256 == 0 && started.elapsed() >= budget.time {
            break;
        }
        input.clear();
        if target.seeds.is_empty() || rng.below(64) == 0 {
            let len = rng.below(257);
            input.extend((0..len).map(|_| rng.next_u64() as u8));
        } else {
            input.extend_from_slice(&target.seeds[rng.below(target.seeds.len())]);
            mutate(&mut input, &target.seeds, &mut rng);
            if let Some(fixup) = target.fixup
                && rng.below(2) == 0
            {
                fixup(&mut input);
            }
        }
        reset_largest();
        let began = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let took = began.elapsed();
        let allocated = largest();
        outcome.inputs += 1;
        outcome.slowest = outcome.slowest.max(took);
        outcome.largest_alloc = outcome.largest_alloc.max(allocated);
        let failure = if result.is_err() {
            Some("panicked")
        } else if took > HANG_LIMIT {
            Some("took longer than the hang limit")
        } else if allocated > ALLOC_CAP {
            Some("allocated beyond the cap")
        } else {
            None
        };
        if let Some(what) = failure {
            outcome.failures.push(format!(
                "{}: input {} {what} ({took:?}, largest allocation {allocated} bytes): {}",
                target.name,
                outcome.inputs,
                hex(&input)
            ));
            if outcome.failures.len() >= 5 {
                break;
            }
        }
    }
    std::panic::set_hook(previous);
    outcome.elapsed = started.elapsed();
    outcome
}
