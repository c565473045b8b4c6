//! A switch-over goes first: the senders of one host share a [`SwitchOverGate`], and while
//! one of them holds it (its guest is paused and its last pages are going out), the others
//! wait before each frame. Their copy loses a few milliseconds; the paused guest gets the
//! CPUs and the link to itself, where otherwise its switch-over queues behind the other
//! migrations' copy threads at every hand-off.
//!
//! A wait is bounded ([`MAX_WAIT`] per frame), so a switch-over that takes long (a slow
//! destination, a lost link) slows the others instead of stalling them into their timeouts.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::SessionId;

/// Longest a frame waits for another sender's switch-over.
pub const MAX_WAIT: Duration = Duration::from_millis(250);

/// The gate the senders of one host share.
#[derive(Debug, Default)]
pub struct SwitchOverGate {
    holders: Mutex<Vec<SessionId>>,
    changed: Condvar,
}

impl SwitchOverGate {
    /// An open gate.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Holds the gate for `owner`'s switch-over until the returned hold is dropped.
    pub fn hold(self: &Arc<Self>, owner: SessionId) -> GateHold {
        self.holders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(owner);
        GateHold {
            gate: Arc::clone(self),
            owner,
        }
    }

    /// Waits, at most `limit`, until the gate is open or `me` holds it too; whether another
    /// sender held it (and this one waited for it, or gave up waiting).
    pub fn wait_turn(&self, me: SessionId, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut holders = self.holders.lock().unwrap_or_else(PoisonError::into_inner);
        let mut held_back = false;
        // A holder never waits, not even for another holder: two switch-overs at once would
        // otherwise hold each other back.
        while !holders.is_empty() && !holders.contains(&me) {
            held_back = true;
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            holders = self
                .changed
                .wait_timeout(holders, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        held_back
    }
}

/// A sender's hold on the gate (see [`SwitchOverGate::hold`]); released on drop.
#[derive(Debug)]
pub struct GateHold {
    gate: Arc<SwitchOverGate>,
    owner: SessionId,
}

impl Drop for GateHold {
    fn drop(&mut self) {
        let mut holders = self
            .gate
            .holders
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = holders.iter().position(|&h| h == self.owner) {
            holders.remove(at);
        }
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);

    #[test]
    fn the_holder_passes_and_the_others_wait_for_its_release() {
        let gate = SwitchOverGate::new();
        assert!(
            !gate.wait_turn(B, MAX_WAIT),
            "an open gate lets anyone pass"
        );
        let hold = gate.hold(A);
        assert!(!gate.wait_turn(A, MAX_WAIT), "the holder passes");
        let (passed_tx, passed_rx) = std::sync::mpsc::channel();
        let waiter = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                let waited = gate.wait_turn(B, Duration::from_secs(60));
                passed_tx.send(()).unwrap();
                waited
            })
        };
        // Still held: B has not passed (it would within a minute only if released).
        assert!(passed_rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(hold);
        passed_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("B passes once A lets go");
        assert!(waiter.join().unwrap(), "B had to wait");
    }

    #[test]
    fn a_wait_is_bounded() {
        let gate = SwitchOverGate::new();
        let _hold = gate.hold(A);
        let started = Instant::now();
        assert!(gate.wait_turn(B, Duration::from_millis(20)));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn two_holders_pass_each_other_and_each_release_counts() {
        let gate = SwitchOverGate::new();
        let a = gate.hold(A);
        let b = gate.hold(B);
        // Two switch-overs at once: neither holds the other back.
        assert!(!gate.wait_turn(A, Duration::ZERO));
        assert!(!gate.wait_turn(B, Duration::ZERO));
        assert!(
            gate.wait_turn(SessionId(3), Duration::ZERO),
            "a third sender waits"
        );
        drop(a);
        assert!(gate.wait_turn(A, Duration::ZERO), "B still holds it");
        drop(b);
        assert!(!gate.wait_turn(A, Duration::ZERO));
        assert!(!gate.wait_turn(B, Duration::ZERO));
    }
}
