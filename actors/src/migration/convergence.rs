//! When to stop pre-copy, and how hard to throttle a guest that dirties memory faster than
//! the link carries it (QEMU's auto-converge, vMotion's stun-during-page-send).
//!
//! After each round the source knows how many pages are dirty and the rate the last round
//! achieved. If sending the dirty pages would take no longer than the downtime target, the
//! pause is acceptable, and the question is whether one more round makes it shorter for a
//! fair price. A round that sent S bytes while the guest dirtied D predicts that the next
//! one, sending D, leaves about D·(D/S): one more round costs about the pause it replaces
//! and shrinks it by D/S. So while what is left would take a noticeable share of the
//! target (a twentieth: 15 ms at the default 300 ms), it goes on if the set shrinks by a
//! quarter or more; if it does not (the guest rewrites its working set as fast as it is
//! sent) and auto-converge is on, it goes on with the guest throttled, in three quick steps
//! (50%, 75%, 99%) because the pause already fits and only a hard throttle lets a busy guest
//! fall behind the link. Otherwise it stops the guest and sends the rest.
//!
//! If the pause does not fit and the guest dirtied more than half of what the round moved,
//! pre-copy is not gaining: the throttle starts at 20% and rises 10 points per such round up
//! to 99%. After the round limit it stops the guest regardless, and the report shows the
//! downtime that cost.

/// First throttle step.
pub const THROTTLE_INITIAL: u8 = 20;
/// Increase per non-converging round.
pub const THROTTLE_INCREMENT: u8 = 10;
/// Highest throttle.
pub const THROTTLE_MAX: u8 = 99;
/// Below `target / WORTHWHILE_SHARE` of copy time, another round is not worth its cost.
pub const WORTHWHILE_SHARE: f64 = 20.0;
/// Within the target, another round pays when the last one left at most this share of what
/// it sent dirty (the pause shrinks by a quarter or more).
pub const SHRINK_WORTH: f64 = 0.75;
/// Throttle steps that shorten a pause which already fits the target.
pub const POLISH_THROTTLE: [u8; 3] = [50, 75, THROTTLE_MAX];
/// Time the switch-over itself costs besides sending pages (state, handshake), assumed when
/// estimating downtime.
pub const SWITCH_OVER_OVERHEAD_MS: f64 = 15.0;

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Run another pre-copy round, with this throttle.
    Continue {
        /// Throttle for the next round, percent.
        throttle: u8,
    },
    /// Pause the guest and copy the rest.
    StopAndCopy {
        /// Expected downtime at the measured rate.
        expected_downtime_ms: f64,
        /// Whether the round limit forced it (downtime may exceed the target).
        forced: bool,
    },
}

/// Inputs of a decision.
#[derive(Clone, Copy, Debug)]
pub struct RoundOutcome {
    /// Rounds done so far (1 after the first).
    pub rounds_done: u32,
    /// Bytes the last round sent.
    pub sent_bytes: u64,
    /// How long it took, seconds.
    pub seconds: f64,
    /// Bytes dirtied meanwhile (to be sent next).
    pub dirty_bytes: u64,
    /// Throttle during the last round.
    pub throttle: u8,
}

/// Decides what follows a round.
pub fn decide(
    outcome: RoundOutcome,
    downtime_target_ms: u64,
    max_rounds: u32,
    auto_converge: bool,
) -> Decision {
    let rate = if outcome.seconds > 0.0 {
        outcome.sent_bytes as f64 / outcome.seconds
    } else {
        f64::INFINITY
    };
    let copy_ms = outcome.dirty_bytes as f64 / rate.max(1.0) * 1000.0;
    let expected_downtime_ms = copy_ms + SWITCH_OVER_OVERHEAD_MS;
    if expected_downtime_ms <= downtime_target_ms as f64 {
        // Within the target: one more round while the copy left is a noticeable share of
        // the target and the round pays (see the module's description).
        let noticeable = copy_ms > downtime_target_ms as f64 / WORTHWHILE_SHARE;
        if noticeable && outcome.rounds_done < max_rounds {
            let shrinks = outcome.dirty_bytes as f64 <= outcome.sent_bytes as f64 * SHRINK_WORTH;
            if shrinks {
                return Decision::Continue {
                    throttle: outcome.throttle,
                };
            }
            let harder = POLISH_THROTTLE.iter().find(|&&t| t > outcome.throttle);
            if let Some(&throttle) = harder.filter(|_| auto_converge && outcome.rounds_done >= 2) {
                return Decision::Continue { throttle };
            }
        }
        return Decision::StopAndCopy {
            expected_downtime_ms,
            forced: false,
        };
    }
    if outcome.rounds_done >= max_rounds {
        return Decision::StopAndCopy {
            expected_downtime_ms,
            forced: true,
        };
    }
    // Not gaining: the guest re-dirtied more than half of what the round moved.
    let stalling = outcome.rounds_done >= 2 && outcome.dirty_bytes * 2 > outcome.sent_bytes;
    let throttle = if auto_converge && stalling {
        if outcome.throttle == 0 {
            THROTTLE_INITIAL
        } else {
            outcome
                .throttle
                .saturating_add(THROTTLE_INCREMENT)
                .min(THROTTLE_MAX)
        }
    } else {
        outcome.throttle
    };
    Decision::Continue { throttle }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn round(rounds_done: u32, sent: u64, seconds: f64, dirty: u64, throttle: u8) -> RoundOutcome {
        RoundOutcome {
            rounds_done,
            sent_bytes: sent,
            seconds,
            dirty_bytes: dirty,
            throttle,
        }
    }

    #[test]
    fn another_short_round_while_it_still_shrinks_the_pause() {
        // 1 GB/s; 100 MiB dirty (~105 ms) fits 300 ms, but the round shrank the set 10:1 and
        // 105 ms is a noticeable share of the target: one more round.
        assert_eq!(
            decide(round(1, 1 << 30, 1.07, 100 * MIB, 0), 300, 30, true),
            Decision::Continue { throttle: 0 }
        );
        // ... but not past the round limit.
        assert!(matches!(
            decide(round(30, 1 << 30, 1.07, 100 * MIB, 0), 300, 30, true),
            Decision::StopAndCopy { forced: false, .. }
        ));
    }

    #[test]
    fn stops_when_the_rest_fits_and_another_round_would_not_pay() {
        let stops = |outcome, auto_converge| match decide(outcome, 300, 30, auto_converge) {
            Decision::StopAndCopy {
                expected_downtime_ms,
                forced,
            } => {
                assert!(!forced);
                expected_downtime_ms
            }
            other => panic!("{other:?}"),
        };
        // 1 GB/s; 100 MiB dirty = ~105 ms + overhead < 300 ms, and the round shrank the set
        // by a tenth only (110 MiB sent): without auto-converge nothing makes it shorter.
        let expected = stops(round(2, 110 * MIB, 0.115, 100 * MIB, 0), false);
        assert!((100.0..150.0).contains(&expected), "{expected}");
        // ... and with the throttle already at its highest, neither.
        stops(round(6, 110 * MIB, 0.115, 100 * MIB, THROTTLE_MAX), true);
        // 10 MiB left (~10 ms) is below a twentieth of 300 ms: not worth a round.
        stops(round(2, 20 * MIB, 0.02, 10 * MIB, 0), true);
    }

    /// A guest that rewrites its working set as fast as it is sent fits the target but
    /// never shrinks the set: it is throttled in three steps, and then carries on while the
    /// throttled guest falls behind.
    #[test]
    fn a_busy_guest_that_fits_is_throttled_for_a_shorter_pause() {
        let busy = |rounds_done, throttle| round(rounds_done, 256 * MIB, 0.17, 256 * MIB, throttle);
        assert_eq!(
            decide(busy(2, 0), 300, 30, true),
            Decision::Continue { throttle: 50 }
        );
        assert_eq!(
            decide(busy(3, 50), 300, 30, true),
            Decision::Continue { throttle: 75 }
        );
        assert_eq!(
            decide(busy(4, 75), 300, 30, true),
            Decision::Continue {
                throttle: THROTTLE_MAX
            }
        );
        // Throttled hard, the set shrinks: more rounds at that throttle.
        assert_eq!(
            decide(
                round(5, 256 * MIB, 0.17, 150 * MIB, THROTTLE_MAX),
                300,
                30,
                true
            ),
            Decision::Continue {
                throttle: THROTTLE_MAX
            }
        );
        // The round after the first is where throttling may start, not the first.
        assert!(matches!(
            decide(round(1, 256 * MIB, 0.17, 250 * MIB, 0), 300, 30, true),
            Decision::StopAndCopy { forced: false, .. }
        ));
    }

    #[test]
    fn keeps_copying_while_it_gains_without_throttling() {
        // 1 GiB sent, 400 MiB dirtied: gaining, but 400 MiB needs ~400 ms.
        assert_eq!(
            decide(round(2, 1 << 30, 1.0, 400 * MIB, 0), 300, 30, true),
            Decision::Continue { throttle: 0 }
        );
    }

    #[test]
    fn throttles_progressively_when_the_guest_outruns_the_link() {
        let mut throttle = 0;
        let mut seen = Vec::new();
        for rounds_done in 2..14 {
            match decide(
                round(rounds_done, 100 * MIB, 0.1, 90 * MIB, throttle),
                50,
                30,
                true,
            ) {
                Decision::Continue { throttle: t } => throttle = t,
                other => panic!("{other:?}"),
            }
            seen.push(throttle);
        }
        assert_eq!(&seen[..4], &[20, 30, 40, 50]);
        assert_eq!(*seen.last().unwrap(), THROTTLE_MAX);
        // Without auto-converge the throttle never moves.
        assert_eq!(
            decide(round(5, 100 * MIB, 0.1, 90 * MIB, 0), 50, 30, false),
            Decision::Continue { throttle: 0 }
        );
        // The first round is never judged: it copies all memory, not dirty pages.
        assert_eq!(
            decide(round(1, 100 * MIB, 0.1, 90 * MIB, 0), 50, 30, true),
            Decision::Continue { throttle: 0 }
        );
    }

    #[test]
    fn round_limit_forces_the_stop() {
        match decide(round(30, 100 * MIB, 0.1, 90 * MIB, 99), 50, 30, true) {
            Decision::StopAndCopy { forced, .. } => assert!(forced),
            other => panic!("{other:?}"),
        }
    }
}
