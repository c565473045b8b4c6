//! When to compress.
//!
//! lz4 compresses text-like pages at well under a gigabyte per second per core, slower than a
//! fast link (loopback moves several GB/s), so compressing "whenever a page shrinks" can make
//! a transfer slower; on a slow link it makes it faster. Which one holds depends on the link,
//! the content and how busy the CPUs are, none of which a model predicts well (a cost model
//! based on the time spent blocked in `write` mistakes a CPU-starved receiver for a slow
//! link). So the adaptive policy measures instead: each worker runs windows of frames with and
//! without compression, keeps the throughput each achieved (guest bytes per second of the
//! worker's time, blocking included), uses the better mode, and re-measures the other one
//! regularly so it follows changes in content and load.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the sender treats non-zero pages. Zero pages are always sent as markers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompressionPolicy {
    /// Never compress.
    None,
    /// Compress every page, keep the result when it is smaller.
    Lz4,
    /// Compress when measurement shows it moves more guest bytes per second.
    #[default]
    Adaptive,
}

/// Frames per measurement window.
const WINDOW: u32 = 8;
/// Windows in the better mode between two windows re-measuring the other one.
const EXPLOIT_WINDOWS: u32 = 8;
/// Weight of the newest window in a mode's throughput estimate.
const SMOOTHING: f64 = 0.5;

/// Per-worker compression decision state.
#[derive(Debug, Clone)]
pub(crate) struct Decider {
    policy: CompressionPolicy,
    /// Estimated guest bytes per nanosecond: index 0 without, 1 with compression.
    rate: [Option<f64>; 2],
    compressing: bool,
    window_frames: u32,
    window_bytes: u64,
    window_time: Duration,
    /// Windows since the mode not in use was last measured.
    since_probe: u32,
}

impl Decider {
    pub(crate) fn new(policy: CompressionPolicy) -> Self {
        Self {
            policy,
            rate: [None, None],
            // Start by measuring compression: it is the mode that pays on real links.
            compressing: true,
            window_frames: 0,
            window_bytes: 0,
            window_time: Duration::ZERO,
            since_probe: 0,
        }
    }

    /// Whether to compress the next frame.
    pub(crate) fn compress_next(&self) -> bool {
        match self.policy {
            CompressionPolicy::None => false,
            CompressionPolicy::Lz4 => true,
            CompressionPolicy::Adaptive => self.compressing,
        }
    }

    /// Records a frame carrying `data_bytes` of non-zero pages that took the worker `busy`
    /// (encoding and sending, including time blocked on the peer) in the mode
    /// [`Decider::compress_next`] gave. Zero pages are left out: they cost the same either
    /// way, and a window that happened to hold many would flatter its mode.
    pub(crate) fn observe_frame(&mut self, data_bytes: u64, busy: Duration) {
        if self.policy != CompressionPolicy::Adaptive {
            return;
        }
        self.window_frames += 1;
        self.window_bytes += data_bytes;
        self.window_time += busy;
        if self.window_frames < WINDOW {
            return;
        }
        let (bytes, time) = (self.window_bytes, self.window_time);
        self.window_frames = 0;
        self.window_bytes = 0;
        self.window_time = Duration::ZERO;
        if bytes == 0 {
            return; // only zero pages: nothing learnt about compression
        }
        let measured = bytes as f64 / time.as_nanos().max(1) as f64;
        let mode = usize::from(self.compressing);
        self.rate[mode] =
            Some(self.rate[mode].map_or(measured, |old| old + SMOOTHING * (measured - old)));
        self.compressing = self.choose();
    }

    fn choose(&mut self) -> bool {
        let (Some(plain), Some(packed)) = (self.rate[0], self.rate[1]) else {
            // Measure whichever mode has no estimate yet.
            return self.rate[1].is_none();
        };
        let better = packed > plain;
        if self.compressing != better {
            // Just measured the worse mode: go back to the better one.
            self.since_probe = 0;
            return better;
        }
        self.since_probe += 1;
        if self.since_probe >= EXPLOIT_WINDOWS {
            self.since_probe = 0;
            return !better;
        }
        better
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `frames` frames through `decider`, each costing what `cost(compressing)` says for
    /// 1 MiB of guest memory; returns how many were compressed.
    fn simulate(decider: &mut Decider, frames: usize, cost: impl Fn(bool) -> Duration) -> usize {
        let mut compressed = 0;
        for _ in 0..frames {
            let compress = decider.compress_next();
            compressed += usize::from(compress);
            decider.observe_frame(1 << 20, cost(compress));
        }
        compressed
    }

    #[test]
    fn fixed_policies_ignore_measurements() {
        let slow = |_| Duration::from_millis(1);
        assert_eq!(
            simulate(&mut Decider::new(CompressionPolicy::None), 100, slow),
            0
        );
        assert_eq!(
            simulate(&mut Decider::new(CompressionPolicy::Lz4), 100, slow),
            100
        );
    }

    #[test]
    fn adaptive_mostly_skips_compression_when_it_slows_the_worker() {
        // Fast link: sending 1 MiB raw takes 0.25 ms; compressing it takes 1.5 ms.
        let mut decider = Decider::new(CompressionPolicy::Adaptive);
        let cost = |compress| Duration::from_micros(if compress { 1_600 } else { 250 });
        let compressed = simulate(&mut decider, 1000, cost);
        // The first window measures compression, then one window in every EXPLOIT_WINDOWS + 1.
        assert!(
            compressed <= 1000 / (EXPLOIT_WINDOWS as usize + 1) + 2 * WINDOW as usize,
            "{compressed}"
        );
        assert!(!decider.compress_next() || decider.since_probe == 0);
    }

    #[test]
    fn adaptive_mostly_compresses_when_it_speeds_the_worker_up() {
        // Slow link: 1 MiB raw takes 8 ms to send; compressed, 1.5 + 3.5 ms.
        let mut decider = Decider::new(CompressionPolicy::Adaptive);
        let cost = |compress| Duration::from_micros(if compress { 5_000 } else { 8_000 });
        let compressed = simulate(&mut decider, 1000, cost);
        assert!(
            compressed >= 1000 - 1000 / (EXPLOIT_WINDOWS as usize + 1) - 2 * WINDOW as usize,
            "{compressed}"
        );
    }

    #[test]
    fn windows_of_zero_pages_teach_nothing() {
        let mut decider = Decider::new(CompressionPolicy::Adaptive);
        for _ in 0..10 * WINDOW {
            decider.observe_frame(0, Duration::from_micros(10));
        }
        assert_eq!(decider.rate, [None, None]);
        assert!(decider.compress_next(), "still measuring compression first");
    }

    #[test]
    fn adaptive_follows_a_change_of_conditions() {
        let mut decider = Decider::new(CompressionPolicy::Adaptive);
        simulate(&mut decider, 500, |compress| {
            Duration::from_micros(if compress { 5_000 } else { 8_000 })
        });
        // The link got fast (or the content incompressible): compression now costs.
        let late = {
            simulate(&mut decider, 500, |compress| {
                Duration::from_micros(if compress { 2_000 } else { 300 })
            });
            simulate(&mut decider, 400, |compress| {
                Duration::from_micros(if compress { 2_000 } else { 300 })
            })
        };
        assert!(late <= 400 / 3, "still compressing {late} of 400 frames");
    }
}
