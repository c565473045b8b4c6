//! The bulk data plane: guest pages over N parallel TCP streams, one per copy worker.
//!
//! The sender ([`DataSender`]) packs the page ranges of each `send` into frames of up to
//! [`SenderConfig::pages_per_frame`] pages — a frame carries several runs of pages when the
//! ranges are short, so a fragmented dirty set does not cost a frame per range — and puts
//! them on a bounded queue shared by its copy workers (back-pressure: `send` blocks while it
//! is full); whichever worker is free takes the next frame, reads its pages from a
//! [`PageSource`](crate::memory::PageSource), encodes them (zero marker, lz4 or raw) and
//! writes them to its own stream. On the other side one thread per stream
//! ([`DataReceiver`]) verifies each frame ([`PagesFrame`]) and writes it into a
//! [`PageSink`](crate::memory::PageSink) ([`PagesDecoder`]).
//!
//! Ordering: pages sent before a [`DataSender::flush`] have landed when it returns. Between
//! two flushes, frames on different streams land in any order, so a page sent twice between
//! flushes (for example in two pre-copy rounds with no flush in between) may end up with
//! either content. Flush between rounds.
//!
//! Failure: any error on any stream fails the whole transfer on both sides. Blocking calls
//! are bounded by [`Timeouts`]; nothing waits forever.

mod batch;
mod gate;
mod pace;
mod policy;
mod receiver;
mod sender;
mod stream;

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use batch::{
    ApplyPagesError, MAX_PAGES_PER_FRAME, PagesDecoder, PagesError, PagesFrame, max_batch_payload,
    sample_frames,
};
pub use gate::{GateHold, SwitchOverGate};
pub use pace::{MIN_BANDWIDTH, SharedCap};
pub use policy::CompressionPolicy;
pub use receiver::{DataListener, DataReceiver, Prefault, ReceiveError, ReceiverConfig};
pub use sender::{DataSender, GateRef, SendError, SenderConfig};
pub use stream::StreamError;

/// Time limits that turn a dead or stalled peer into an error instead of a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Connecting a stream and completing its handshake; on the receiver, waiting for all
    /// streams to connect.
    pub connect: Duration,
    /// How often an idle side sends a keepalive frame (and how often blocked reads wake up).
    pub keepalive_interval: Duration,
    /// A peer that sends nothing, not even a keepalive, for this long is considered dead.
    pub idle: Duration,
    /// A send that makes no progress for this long means the peer stopped reading.
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(1),
            idle: Duration::from_secs(10),
            stall: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    /// Checks the relations the keepalive scheme relies on.
    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("connect", self.connect),
            ("keepalive_interval", self.keepalive_interval),
            ("idle", self.idle),
            ("stall", self.stall),
        ]
        .into_iter()
        .find(|(_, value)| value.is_zero());
        if let Some((name, _)) = zero {
            return Err(format!("timeout {name} is zero"));
        }
        if self.idle <= self.keepalive_interval {
            return Err(format!(
                "idle timeout {:?} must exceed the keepalive interval {:?}, or an idle but healthy peer looks dead",
                self.idle, self.keepalive_interval
            ));
        }
        Ok(())
    }
}

/// Identifies one data transfer, so a receiver rejects streams that belong to another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A session id that is unpredictable enough to tell transfers apart.
    pub fn random() -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        hasher.write_u128(now.as_nanos());
        hasher.write_u32(std::process::id());
        Self(hasher.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_validation() {
        assert!(Timeouts::default().validate().is_ok());
        let bad = Timeouts {
            idle: Duration::from_millis(100),
            keepalive_interval: Duration::from_millis(100),
            ..Timeouts::default()
        };
        assert!(bad.validate().unwrap_err().contains("must exceed"));
        let zero = Timeouts {
            stall: Duration::ZERO,
            ..Timeouts::default()
        };
        assert_eq!(zero.validate().unwrap_err(), "timeout stall is zero");
    }

    #[test]
    fn session_ids_differ() {
        assert_ne!(SessionId::random(), SessionId::random());
    }
}
