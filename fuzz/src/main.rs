//! `ferry-fuzz`: runs every decoder's fuzz target for a number of inputs and prints a table.
//!
//!     cargo run --release -p ferry-fuzz -- --inputs 10000000
//!     cargo run --release -p ferry-fuzz -- --seconds 30 "control channel"

use std::process::ExitCode;
use std::time::Duration;

use ferry_fuzz::{ALLOC_CAP, Budget, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() -> ExitCode {
    let mut inputs = 10_000_000u64;
    let mut seconds = f64::INFINITY;
    let mut seed = 0x5eed_u64;
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match arg.as_str() {
            "--inputs" => inputs = value("--inputs").parse().expect("--inputs N"),
            "--seconds" => seconds = value("--seconds").parse().expect("--seconds S"),
            "--seed" => seed = value("--seed").parse().expect("--seed N"),
            "--help" | "-h" => {
                println!("ferry-fuzz [--inputs N] [--seconds S] [--seed N] [TARGET...]");
                return ExitCode::SUCCESS;
            }
            name => only.push(name.to_string()),
        }
    }
    let budget = Budget {
        inputs,
        time: Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX),
    };
    println!(
        "{:<16} {:>12} {:>9} {:>12} {:>11} {:>13}  failures",
        "target", "inputs", "seconds", "inputs/s", "slowest", "largest alloc"
    );
    let mut failed = false;
    for target in ferry_fuzz::all() {
        if !only.is_empty() && !only.iter().any(|o| o == target.name) {
            continue;
        }
        let outcome = ferry_fuzz::run(&target, budget, seed);
        let secs = outcome.elapsed.as_secs_f64();
        println!(
            "{:<16} {:>12} {:>9.1} {:>12.0} {:>9.2}ms {:>10} KiB  {}",
            target.name,
            outcome.inputs,
            secs,
            outcome.inputs as f64 / secs.max(1e-9),
            outcome.slowest.as_secs_f64() * 1e3,
            outcome.largest_alloc >> 10,
            outcome.failures.len()
        );
        for failure in &outcome.failures {
            println!("  {failure}");
        }
        failed |= !outcome.failures.is_empty();
    }
    println!("(cap on a single allocation: {} MiB)", ALLOC_CAP >> 20);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
