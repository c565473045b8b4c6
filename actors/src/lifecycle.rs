//! The lifecycle of a VM on a host, as an explicit transition table.
//!
//! `Created → Running ⇄ Paused → Stopped`, plus `MigratingOut` (the VM is leaving this host;
//! it may be running or paused underneath), `MigratingIn` (an empty copy waiting for the
//! VM to arrive) and `Stale` (the paused copy left on a source whose destination committed
//! the switch-over and then lost the VM: it runs again only by an explicit operator recovery,
//! since its guest would go back in time). Every change goes through [`next`], so an operation that makes no sense in
//! the current state is refused with a clear error instead of half-happening.

use serde::{Deserialize, Serialize};

/// Where a VM is in its life on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Built, not yet started.
    Created,
    /// Running.
    Running,
    /// Paused by the operator.
    Paused,
    /// Gone (stopped, or migrated away, or a discarded incoming copy).
    Stopped,
    /// Being migrated to another host.
    MigratingOut,
    /// Arriving from another host; not runnable yet.
    MigratingIn,
    /// The copy paused at a switch-over whose destination then lost the VM. Older than what
    /// the guest last did there; runs only through an explicit recovery.
    Stale,
    /// Its VMM process ended without being asked to: the VM is gone. Kept, with how the
    /// process ended, until the operator stops (removes) it.
    Crashed,
}

/// Something that changes a VM's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Start or resume the vCPUs.
    Resume,
    /// Pause the vCPUs.
    Pause,
    /// Stop the VM for good.
    Stop,
    /// A migration to another host begins.
    MigrateOutBegin,
    /// The migration failed or was cancelled; the VM continues here as before.
    MigrateOutRollback {
        /// Whether the VM was running when the migration began.
        was_running: bool,
    },
    /// The destination has the VM; this copy is released.
    MigrateOutComplete,
    /// The arrived VM is switched on (it was running on the source).
    MigrateInResume,
    /// The arrived VM is kept paused (it was paused on the source).
    MigrateInKeepPaused,
    /// The incoming copy is discarded.
    MigrateInDiscard,
    /// The destination committed the switch-over and then lost the VM: this copy is stale.
    MigrateOutLost,
    /// The operator runs the stale copy anyway, accepting that its guest goes back in time.
    RecoverStale,
    /// The VMM process ended on its own (killed, or it failed).
    VmmExited,
}

/// An event that is not allowed in a state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot {event} a VM that is {state}")]
pub struct InvalidTransition {
    /// Current state.
    pub state: Lifecycle,
    /// Rejected event.
    pub event: Event,
}

impl Lifecycle {
    /// Every state, for reports that list all of them (metrics show zeros too).
    pub const ALL: [Lifecycle; 8] = [
        Lifecycle::Created,
        Lifecycle::Running,
        Lifecycle::Paused,
        Lifecycle::Stopped,
        Lifecycle::MigratingOut,
        Lifecycle::MigratingIn,
        Lifecycle::Stale,
        Lifecycle::Crashed,
    ];

    /// The state's name in machine output (as serialized).
    pub fn label(self) -> &'static str {
        match self {
            Lifecycle::Created => "created",
            Lifecycle::Running => "running",
            Lifecycle::Paused => "paused",
            Lifecycle::Stopped => "stopped",
            Lifecycle::MigratingOut => "migrating_out",
            Lifecycle::MigratingIn => "migrating_in",
            Lifecycle::Stale => "stale",
            Lifecycle::Crashed => "crashed",
        }
    }
}

impl std::fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lifecycle::Created => "created",
            Lifecycle::Running => "running",
            Lifecycle::Paused => "paused",
            Lifecycle::Stopped => "stopped",
            Lifecycle::MigratingOut => "migrating out",
            Lifecycle::MigratingIn => "migrating in",
            Lifecycle::Stale => "stale",
            Lifecycle::Crashed => "crashed",
        })
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Event::Resume => "resume",
            Event::Pause => "pause",
            Event::Stop => "stop",
            Event::MigrateOutBegin => "migrate",
            Event::MigrateOutRollback { .. } => "roll back the migration of",
            Event::MigrateOutComplete => "complete the migration of",
            Event::MigrateInResume => "resume the arriving",
            Event::MigrateInKeepPaused => "keep paused the arriving",
            Event::MigrateInDiscard => "discard the arriving",
            Event::MigrateOutLost => "mark stale",
            Event::RecoverStale => "recover from a stale copy",
            Event::VmmExited => "lose the VMM process of",
        })
    }
}

/// The state after `event` in `state`, or why it is not allowed.
pub fn next(state: Lifecycle, event: Event) -> Result<Lifecycle, InvalidTransition> {
    use Event as E;
    use Lifecycle as L;
    let to = match (state, event) {
        (L::Created | L::Paused | L::Running, E::Resume) => L::Running,
        (L::Running | L::Paused, E::Pause) => L::Paused,
        (L::Created | L::Running | L::Paused, E::Stop) => L::Stopped,
        (L::Running | L::Paused, E::MigrateOutBegin) => L::MigratingOut,
        (L::MigratingOut, E::MigrateOutRollback { was_running: true }) => L::Running,
        (L::MigratingOut, E::MigrateOutRollback { was_running: false }) => L::Paused,
        (L::MigratingOut, E::MigrateOutComplete) => L::Stopped,
        (L::MigratingIn, E::MigrateInResume) => L::Running,
        (L::MigratingIn, E::MigrateInKeepPaused) => L::Paused,
        (L::MigratingIn, E::MigrateInDiscard) => L::Stopped,
        (L::MigratingOut, E::MigrateOutLost) => L::Stale,
        (L::Stale, E::RecoverStale) => L::Running,
        (L::Stale | L::Crashed, E::Stop) => L::Stopped,
        (L::Crashed, E::MigrateInDiscard) => L::Stopped,
        (
            L::Created | L::Running | L::Paused | L::MigratingOut | L::MigratingIn | L::Stale,
            E::VmmExited,
        ) => L::Crashed,
        _ => return Err(InvalidTransition { state, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [Lifecycle; 8] = Lifecycle::ALL;
    const EVENTS: [Event; 13] = [
        Event::Resume,
        Event::Pause,
        Event::Stop,
        Event::MigrateOutBegin,
        Event::MigrateOutRollback { was_running: true },
        Event::MigrateOutRollback { was_running: false },
        Event::MigrateOutComplete,
        Event::MigrateInResume,
        Event::MigrateInKeepPaused,
        Event::MigrateInDiscard,
        Event::MigrateOutLost,
        Event::RecoverStale,
        Event::VmmExited,
    ];

    /// Labels are the serialized names.
    #[test]
    fn labels_are_the_serialized_names() {
        for state in STATES {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.label()));
        }
    }

    /// The whole table, written out: every (state, event) pair not listed is refused.
    #[test]
    fn transition_table() {
        use Event as E;
        use Lifecycle as L;
        let allowed = [
            (L::Created, E::Resume, L::Running),
            (L::Created, E::Stop, L::Stopped),
            (L::Running, E::Resume, L::Running),
            (L::Running, E::Pause, L::Paused),
            (L::Running, E::Stop, L::Stopped),
            (L::Running, E::MigrateOutBegin, L::MigratingOut),
            (L::Paused, E::Resume, L::Running),
            (L::Paused, E::Pause, L::Paused),
            (L::Paused, E::Stop, L::Stopped),
            (L::Paused, E::MigrateOutBegin, L::MigratingOut),
            (
                L::MigratingOut,
                E::MigrateOutRollback { was_running: true },
                L::Running,
            ),
            (
                L::MigratingOut,
                E::MigrateOutRollback { was_running: false },
                L::Paused,
            ),
            (L::MigratingOut, E::MigrateOutComplete, L::Stopped),
            (L::MigratingIn, E::MigrateInResume, L::Running),
            (L::MigratingIn, E::MigrateInKeepPaused, L::Paused),
            (L::MigratingIn, E::MigrateInDiscard, L::Stopped),
            (L::MigratingOut, E::MigrateOutLost, L::Stale),
            (L::Stale, E::RecoverStale, L::Running),
            (L::Stale, E::Stop, L::Stopped),
            (L::Crashed, E::Stop, L::Stopped),
            (L::Crashed, E::MigrateInDiscard, L::Stopped),
            (L::Created, E::VmmExited, L::Crashed),
            (L::Running, E::VmmExited, L::Crashed),
            (L::Paused, E::VmmExited, L::Crashed),
            (L::MigratingOut, E::VmmExited, L::Crashed),
            (L::MigratingIn, E::VmmExited, L::Crashed),
            (L::Stale, E::VmmExited, L::Crashed),
        ];
        for state in STATES {
            for event in EVENTS {
                let expected = allowed
                    .iter()
                    .find(|(s, e, _)| *s == state && *e == event)
                    .map(|(_, _, to)| *to);
                match (next(state, event), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{state:?} + {event:?}"),
                    (Err(e), None) => assert_eq!(e, InvalidTransition { state, event }),
                    (got, want) => panic!("{state:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn a_migrating_vm_cannot_be_migrated_paused_or_stopped() {
        for event in [
            Event::MigrateOutBegin,
            Event::Pause,
            Event::Stop,
            Event::Resume,
        ] {
            assert!(next(Lifecycle::MigratingOut, event).is_err());
            assert!(next(Lifecycle::MigratingIn, event).is_err());
        }
        let err = next(Lifecycle::MigratingOut, Event::MigrateOutBegin).unwrap_err();
        assert_eq!(err.to_string(), "cannot migrate a VM that is migrating out");
    }

    #[test]
    fn a_stale_copy_neither_resumes_nor_migrates() {
        for event in [Event::Resume, Event::Pause, Event::MigrateOutBegin] {
            assert!(next(Lifecycle::Stale, event).is_err(), "{event:?}");
        }
        assert_eq!(
            next(Lifecycle::Stale, Event::RecoverStale),
            Ok(Lifecycle::Running)
        );
    }

    #[test]
    fn stopped_is_final() {
        for event in EVENTS {
            assert!(next(Lifecycle::Stopped, event).is_err());
        }
    }
}
