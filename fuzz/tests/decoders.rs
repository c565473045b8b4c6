//! Every decoder under a bounded fuzz run: no input panics, hangs or allocates past the cap.
//! (`cargo run --release -p ferry-fuzz` runs the same targets for ten million inputs each.)

use std::time::Duration;

use ferry_fuzz::{Budget, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn no_input_breaks_any_decoder() {
    let budget = Budget {
        inputs: 300_000,
        time: Duration::from_secs(4),
    };
    let mut failures = Vec::new();
    for target in ferry_fuzz::all() {
        // A fixed generator seed: every run tries the same inputs (a slow machine just the
        // first ones), so a failure here is the code's, never the luck of the draw; the long
        // runs of `ferry-fuzz --seed N` explore further.
        let seed = 0x5eed;
        let outcome = ferry_fuzz::run(&target, budget, seed);
        assert!(outcome.inputs > 0, "{}: ran nothing", target.name);
        assert!(
            outcome.largest_alloc > 0,
            "{}: the allocation counter saw nothing",
            target.name
        );
        eprintln!(
            "{}: {} inputs in {:.1} s (seed {seed})",
            target.name,
            outcome.inputs,
            outcome.elapsed.as_secs_f64()
        );
        failures.extend(outcome.failures);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_harness_catches_a_panicking_decoder() {
    let target = ferry_fuzz::Target {
        name: "broken",
        seeds: vec![vec![0u8; 8]],
        run: Box::new(|input| {
            if input.first() == Some(&0xff) {
                panic!("a decoder bug");
            }
            let _big = vec![0u8; input.len() * 1000];
        }),
        fixup: None,
    };
    let outcome = ferry_fuzz::run(
        &target,
        Budget {
            inputs: 1_000_000,
            time: Duration::from_secs(10),
        },
        7,
    );
    assert!(!outcome.failures.is_empty(), "a panic went unnoticed");
    assert!(
        outcome.failures[0].contains("panicked"),
        "{:?}",
        outcome.failures
    );
}
