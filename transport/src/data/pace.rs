//! A bandwidth cap shared by every copy worker of a sender: each frame waits for its turn
//! before it is written, so all streams together never exceed the rate, however many there
//! are and however the frames fall among them.
//!
//! The rule is the generic cell rate algorithm over bytes: a virtual "next free" instant
//! advances by `len / rate` for every frame; a frame may go once the clock has caught up to
//! within a small burst allowance. Written here rather than taken from a crate: the known
//! rate limiters (governor, for one) count cells in `u32` bursts and are built for async
//! callers, while this needs byte-granular, blocking pacing for plain threads, in a few lines.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Slowest cap accepted: below this a single full frame would take longer to pace than the
/// streams' stall timeouts allow.
pub const MIN_BANDWIDTH: u64 = 1_000_000;

/// How far ahead of the rate a sender may run after being idle: a few frames' worth at
/// common caps, small against any round.
const BURST: Duration = Duration::from_millis(20);

/// Paces writes to `rate` bytes per second.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `bytes_per_sec` (at least [`MIN_BANDWIDTH`]; the caller validates).
    pub fn new(bytes_per_sec: u64) -> Self {
        Pacer {
            rate: bytes_per_sec.max(1) as f64,
            next_free: Mutex::new(None),
        }
    }

    /// How long a frame of `bytes` must wait if it is ready at `now`; books its slot.
    pub fn reserve(&self, bytes: usize, now: Instant) -> Duration {
        let mut next_free = self
            .next_free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let start = match *next_free {
            Some(at) if at > now => at,
            _ => now,
        };
        *next_free = Some(start + Duration::from_secs_f64(bytes as f64 / self.rate));
        start.saturating_duration_since(now).saturating_sub(BURST)
    }

    /// Blocks until a frame of `bytes` may be written.
    pub fn admit(&self, bytes: usize) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// A cap shared by several senders (the migrations of an evacuation, say): together they
/// put at most its rate on the wire, however many run at once, and a migration that ends
/// leaves its share to the others at once. Clones are the same cap; two caps are equal
/// only when they are the same one.
#[derive(Clone, Debug)]
pub struct SharedCap(Arc<Pacer>);

impl SharedCap {
    /// A cap of `bytes_per_sec`, or why it is not one (below [`MIN_BANDWIDTH`]).
    pub fn new(bytes_per_sec: u64) -> Result<Self, String> {
        if bytes_per_sec < MIN_BANDWIDTH {
            return Err(format!(
                "a shared cap of {bytes_per_sec} B/s is below the smallest cap, {MIN_BANDWIDTH} B/s"
            ));
        }
        Ok(SharedCap(Arc::new(Pacer::new(bytes_per_sec))))
    }

    /// The rate, bytes per second.
    pub fn rate(&self) -> u64 {
        self.0.rate as u64
    }

    pub(crate) fn pacer(&self) -> Arc<Pacer> {
        Arc::clone(&self.0)
    }
}

impl PartialEq for SharedCap {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedCap {}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a clock that never moves on its own, the waits are exactly what the rate says:
    /// after the burst allowance, each frame waits for the bytes before it.
    #[test]
    fn frames_wait_for_the_bytes_booked_before_them() {
        let pacer = Pacer::new(1_000_000);
        let now = Instant::now();
        // 1 MB/s: 10 kB take 10 ms; the first frames fit the burst.
        assert_eq!(pacer.reserve(10_000, now), Duration::ZERO);
        assert_eq!(pacer.reserve(10_000, now), Duration::ZERO);
        assert_eq!(pacer.reserve(10_000, now), Duration::ZERO);
        let fourth = pacer.reserve(10_000, now);
        assert!(
            (Duration::from_millis(9)..=Duration::from_millis(11)).contains(&fourth),
            "{fourth:?}"
        );
        // A sender that idles for a second gets no more than the burst back.
        let later = now + Duration::from_secs(2);
        assert_eq!(pacer.reserve(10_000, later), Duration::ZERO);
        assert_eq!(pacer.reserve(10_000, later), Duration::ZERO);
        assert_eq!(pacer.reserve(10_000, later), Duration::ZERO);
        assert!(pacer.reserve(10_000, later) > Duration::from_millis(5));
    }

    /// Over any run of frames, what went out is at most rate × time + burst, whatever the
    /// number of threads sharing the pacer.
    #[test]
    fn threads_sharing_a_pacer_stay_under_the_rate_together() {
        let pacer = std::sync::Arc::new(Pacer::new(20_000_000));
        let frame = 200_000;
        let frames_per_thread = 10;
        let started = Instant::now();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let pacer = std::sync::Arc::clone(&pacer);
                std::thread::spawn(move || {
                    for _ in 0..frames_per_thread {
                        pacer.admit(frame);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let total = (3 * frames_per_thread * frame) as f64;
        // The last frame is admitted, not sent: it does not count against the time.
        let paced = total - frame as f64;
        let allowed = 20e6 * (elapsed + BURST.as_secs_f64());
        assert!(
            paced <= allowed,
            "{paced} bytes admitted in {elapsed:.3} s at 20 MB/s (at most {allowed})"
        );
    }
}
