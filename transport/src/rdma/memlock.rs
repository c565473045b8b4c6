//! The locked-memory limit: RDMA registration pins every page it covers, and an unprivileged
//! process may pin only up to `RLIMIT_MEMLOCK`.

use serde::{Deserialize, Serialize};

/// This process's locked-memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemlockLimit {
    /// Soft limit in bytes (`None`: unlimited).
    pub soft: Option<u64>,
    /// Hard limit in bytes (`None`: unlimited).
    pub hard: Option<u64>,
    /// Whether the process has `CAP_IPC_LOCK`, which lifts the limit.
    pub privileged: bool,
}

impl MemlockLimit {
    /// Why registering `bytes` would fail, or `None` if it fits.
    pub fn shortfall(&self, bytes: u64) -> Option<String> {
        if self.privileged {
            return None;
        }
        match self.soft {
            Some(limit) if limit < bytes => Some(format!(
                "registering {} needs that much locked memory, and RLIMIT_MEMLOCK is {} (hard limit {}); raise it (ulimit -l, LimitMEMLOCK= in a systemd unit) or grant CAP_IPC_LOCK",
                mib(bytes),
                mib(limit),
                self.hard.map_or_else(|| "unlimited".to_string(), mib)
            )),
            _ => None,
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

fn limit_value(raw: libc::rlim_t) -> Option<u64> {
    (raw != libc::RLIM_INFINITY).then_some(raw)
}

/// Bit of `CAP_IPC_LOCK` in a capability mask (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

fn has_ipc_lock() -> bool {
    // CapEff in /proc/self/status is a hex mask; CAP_IPC_LOCK is bit 14.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << CAP_IPC_LOCK) != 0)
}

/// This process's limit as it stands.
pub fn memlock_limit() -> MemlockLimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a valid local.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    let (soft, hard) = if rc == 0 {
        (limit_value(limit.rlim_cur), limit_value(limit.rlim_max))
    } else {
        (Some(0), Some(0))
    };
    MemlockLimit {
        soft,
        hard,
        privileged: has_ipc_lock(),
    }
}

/// Raises the soft limit to the hard limit, as a daemon that registers guest memory should
/// at start; returns the limit afterwards.
pub fn raise_memlock_limit() -> MemlockLimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a valid local.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur != limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit; raising soft to hard needs no privilege.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK");
        }
    }
    memlock_limit()
}

/// A hint for a failed registration of `bytes`.
pub(crate) fn hint(bytes: u64) -> String {
    memlock_limit()
        .shortfall(bytes)
        .unwrap_or_else(|| "the locked-memory limit allows it; see the cause".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortfall_names_the_limit_and_the_need() {
        let low = MemlockLimit {
            soft: Some(8 << 20),
            hard: Some(64 << 20),
            privileged: false,
        };
        let why = low.shortfall(1 << 30).unwrap();
        assert!(
            why.contains("1024 MiB")
                && why.contains("is 8 MiB")
                && why.contains("hard limit 64 MiB"),
            "{why}"
        );
        assert_eq!(low.shortfall(4 << 20), None);
        assert_eq!(
            MemlockLimit {
                privileged: true,
                ..low
            }
            .shortfall(1 << 40),
            None
        );
        let unlimited = MemlockLimit {
            soft: None,
            hard: None,
            privileged: false,
        };
        assert_eq!(unlimited.shortfall(1 << 40), None);
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let after = raise_memlock_limit();
        assert_eq!(after.soft, after.hard);
    }
}
