//! Transfer statistics, per stream (one stream per copy worker) and in total.
//!
//! Workers update lock-free counters as they go, so a progress display can take a snapshot
//! from another thread at any time through a [`StatsHandle`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one stream (or the whole transfer) has moved so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Guest memory covered by the pages moved (4096 per page, whatever their encoding).
    pub guest_bytes: u64,
    /// Bytes on the wire, frame headers included.
    pub wire_bytes: u64,
    /// Pages sent as they are.
    pub pages_raw: u64,
    /// Pages sent lz4-compressed.
    pub pages_compressed: u64,
    /// All-zero pages sent as a marker only.
    pub pages_zero: u64,
    /// Frames of any kind.
    pub frames: u64,
    /// Wall-clock time spent working (not waiting for work).
    pub busy: Duration,
    /// CPU time consumed by the stream's thread.
    pub cpu_time: Duration,
}

impl StreamStats {
    /// Pages of any encoding.
    pub fn pages(&self) -> u64 {
        self.pages_raw + self.pages_compressed + self.pages_zero
    }

    /// Adds `other` into `self`.
    pub fn accumulate(&mut self, other: &StreamStats) {
        self.guest_bytes += other.guest_bytes;
        self.wire_bytes += other.wire_bytes;
        self.pages_raw += other.pages_raw;
        self.pages_compressed += other.pages_compressed;
        self.pages_zero += other.pages_zero;
        self.frames += other.frames;
        self.busy += other.busy;
        self.cpu_time += other.cpu_time;
    }
}

/// Statistics of a transfer: one entry per stream, and their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStats {
    /// Per stream, in stream order.
    pub streams: Vec<StreamStats>,
    /// Sum over all streams.
    pub total: StreamStats,
    /// Per account of the sender's configuration (`SenderConfig::accounts`), in its order:
    /// the frames whose pages lie in that account's range, over all streams (`busy` is the
    /// workers' time on them, summed). Empty on a receiver.
    #[serde(default)]
    pub accounts: Vec<StreamStats>,
}

/// Live counters of one stream.
#[derive(Debug, Default)]
pub(crate) struct StreamCounters {
    guest_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    pages_raw: AtomicU64,
    pages_compressed: AtomicU64,
    pages_zero: AtomicU64,
    frames: AtomicU64,
    busy_ns: AtomicU64,
    cpu_ns: AtomicU64,
}

/// Counts of one frame's pages, added to the counters in one go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FrameCounts {
    pub guest_bytes: u64,
    pub wire_bytes: u64,
    pub pages_raw: u64,
    pub pages_compressed: u64,
    pub pages_zero: u64,
}

impl StreamCounters {
    pub(crate) fn add_frame(&self, counts: &FrameCounts) {
        // Relaxed is enough: each counter is read on its own, for display.
        self.guest_bytes
            .fetch_add(counts.guest_bytes, Ordering::Relaxed);
        self.wire_bytes
            .fetch_add(counts.wire_bytes, Ordering::Relaxed);
        self.pages_raw
            .fetch_add(counts.pages_raw, Ordering::Relaxed);
        self.pages_compressed
            .fetch_add(counts.pages_compressed, Ordering::Relaxed);
        self.pages_zero
            .fetch_add(counts.pages_zero, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `pages` zero pages that needed no transfer at all (fresh destination memory).
    pub(crate) fn add_zero_skipped(&self, pages: u64) {
        self.guest_bytes
            .fetch_add(pages * crate::memory::PAGE_SIZE as u64, Ordering::Relaxed);
        self.pages_zero.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn add_busy(&self, busy: Duration) {
        self.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_cpu_time(&self, cpu: Duration) {
        self.cpu_ns.store(cpu.as_nanos() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StreamStats {
        StreamStats {
            guest_bytes: self.guest_bytes.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            pages_raw: self.pages_raw.load(Ordering::Relaxed),
            pages_compressed: self.pages_compressed.load(Ordering::Relaxed),
            pages_zero: self.pages_zero.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            cpu_time: Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A cheap, clonable view of a transfer's live statistics.
#[derive(Debug, Clone)]
pub struct StatsHandle {
    streams: Arc<[StreamCounters]>,
    accounts: Arc<[StreamCounters]>,
}

impl StatsHandle {
    pub(crate) fn new(streams: usize, accounts: usize) -> Self {
        let counters = |n| (0..n).map(|_| StreamCounters::default()).collect();
        Self {
            streams: counters(streams),
            accounts: counters(accounts),
        }
    }

    pub(crate) fn stream(&self, index: usize) -> &StreamCounters {
        &self.streams[index]
    }

    /// Counters of account `index`, if there is one.
    pub(crate) fn account(&self, index: Option<usize>) -> Option<&StreamCounters> {
        index.and_then(|i| self.accounts.get(i))
    }

    /// The statistics as of now.
    pub fn snapshot(&self) -> TransferStats {
        let streams: Vec<StreamStats> = self.streams.iter().map(StreamCounters::snapshot).collect();
        let mut total = StreamStats::default();
        for stream in &streams {
            total.accumulate(stream);
        }
        TransferStats {
            streams,
            total,
            accounts: self.accounts.iter().map(StreamCounters::snapshot).collect(),
        }
    }
}

/// CPU time consumed so far by the calling thread.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `now`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_streams() {
        let handle = StatsHandle::new(2, 1);
        let frame = FrameCounts {
            guest_bytes: 8192,
            wire_bytes: 100,
            pages_raw: 0,
            pages_compressed: 1,
            pages_zero: 1,
        };
        handle.stream(0).add_frame(&frame);
        handle.stream(1).add_frame(&frame);
        handle.stream(1).add_busy(Duration::from_millis(3));
        let stats = handle.snapshot();
        assert_eq!(stats.streams.len(), 2);
        assert_eq!(stats.total.guest_bytes, 16384);
        assert_eq!(stats.total.pages(), 4);
        assert_eq!(stats.total.frames, 2);
        assert_eq!(stats.total.busy, Duration::from_millis(3));
        assert_eq!(stats.accounts, vec![StreamStats::default()]);
        handle.account(Some(0)).unwrap().add_frame(&frame);
        assert!(handle.account(Some(1)).is_none() && handle.account(None).is_none());
        assert_eq!(handle.snapshot().accounts[0].guest_bytes, 8192);
    }

    #[test]
    fn thread_cpu_time_advances() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
