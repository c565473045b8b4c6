//! Copy worker threads pinned to configured CPUs.
//!
//! Each data stream is served by one worker thread on each side. Pinning keeps a worker's
//! buffers warm in one core's cache and keeps copy work off the cores the migration wants to
//! leave to the guest's vCPUs.

use std::io;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use serde::{Deserialize, Serialize};

/// How many workers to run and on which CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPlacement {
    /// Number of workers, one per data stream.
    pub count: usize,
    /// CPUs to pin to: worker `i` runs on `cpus[i % cpus.len()]`. Empty means not pinned.
    pub cpus: Vec<usize>,
}

impl WorkerPlacement {
    /// `count` workers pinned round-robin to `cpus`.
    pub fn pinned(count: usize, cpus: Vec<usize>) -> Self {
        Self { count, cpus }
    }

    /// `count` workers left to the scheduler.
    pub fn unpinned(count: usize) -> Self {
        Self {
            count,
            cpus: Vec::new(),
        }
    }

    /// The CPU worker `index` is pinned to, if any.
    pub fn cpu_for(&self, index: usize) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[index % self.cpus.len()])
    }

    /// Checks the count and that every CPU exists on this host.
    pub fn validate(&self) -> Result<(), WorkerError> {
        if self.count == 0 {
            return Err(WorkerError::NoWorkers);
        }
        if self.count > usize::from(u16::MAX) {
            return Err(WorkerError::TooManyWorkers { count: self.count });
        }
        let available = available_cpus();
        for &cpu in &self.cpus {
            if !available.contains(&cpu) {
                return Err(WorkerError::UnknownCpu { cpu, available });
            }
        }
        Ok(())
    }
}

/// Worker set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A placement with zero workers.
    #[error("worker count is zero; at least one copy worker is needed")]
    NoWorkers,
    /// More workers than the wire format can number.
    #[error("{count} workers requested; at most 65535 streams are supported")]
    TooManyWorkers {
        /// Workers requested.
        count: usize,
    },
    /// A configured CPU is not available to this process.
    #[error("CPU {cpu} is not available to this process (available: {available:?})")]
    UnknownCpu {
        /// The CPU asked for.
        cpu: usize,
        /// CPUs this process may run on.
        available: Vec<usize>,
    },
    /// The thread could not be created.
    #[error("cannot start worker thread {name}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The thread started but could not be pinned.
    #[error("cannot pin worker thread {name} to CPU {cpu}")]
    Pin {
        /// Thread name.
        name: String,
        /// The CPU asked for.
        cpu: usize,
    },
}

/// CPUs online on this host. Read from sysfs rather than from the calling thread's
/// affinity mask, which is narrower once that thread has been pinned itself.
pub fn available_cpus() -> Vec<usize> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| parse_cpu_list(list.trim()))
        .unwrap_or_else(|| {
            core_affinity::get_core_ids()
                .unwrap_or_default()
                .into_iter()
                .map(|core| core.id)
                .collect()
        })
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => cpus.extend(first.parse::<usize>().ok()?..=last.parse().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// A started worker thread.
#[derive(Debug)]
pub(crate) struct PinnedThread<T> {
    handle: JoinHandle<Option<T>>,
}

impl<T> PinnedThread<T> {
    /// Waits for the thread; `None` if it panicked.
    pub(crate) fn join(self) -> Option<T> {
        self.handle.join().ok().flatten()
    }
}

/// Starts a thread named `name`, pinned to `cpu` when given, running `work`. Returns once the
/// thread runs on its CPU, so a pinning failure is reported to the caller rather than lost.
pub(crate) fn spawn_pinned<T, F>(
    name: String,
    cpu: Option<usize>,
    work: F,
) -> Result<PinnedThread<T>, WorkerError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (pinned_tx, pinned_rx) = mpsc::sync_channel(1);
    let handle = thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let pinned =
                cpu.is_none_or(|id| core_affinity::set_for_current(core_affinity::CoreId { id }));
            let _ = pinned_tx.send(pinned);
            pinned.then(work)
        })
        .map_err(|source| WorkerError::Spawn {
            name: name.clone(),
            source,
        })?;
    if !pinned_rx.recv().unwrap_or(false) {
        let _ = handle.join();
        return Err(WorkerError::Pin {
            name,
            cpu: cpu.unwrap_or_default(),
        });
    }
    Ok(PinnedThread { handle })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn available_cpus_ignore_the_callers_own_pinning() {
        let all = available_cpus();
        let pinned = spawn_pinned("pinned-caller".into(), Some(all[0]), available_cpus).unwrap();
        assert_eq!(pinned.join(), Some(all));
    }

    #[test]
    fn placement_assigns_cpus_round_robin() {
        let placement = WorkerPlacement::pinned(3, vec![0, 1]);
        assert_eq!(placement.cpu_for(0), Some(0));
        assert_eq!(placement.cpu_for(1), Some(1));
        assert_eq!(placement.cpu_for(2), Some(0));
        assert_eq!(WorkerPlacement::unpinned(2).cpu_for(1), None);
    }

    #[test]
    fn placement_validation_names_the_problem() {
        assert!(matches!(
            WorkerPlacement::unpinned(0).validate(),
            Err(WorkerError::NoWorkers)
        ));
        assert!(matches!(
            WorkerPlacement::unpinned(70_000).validate(),
            Err(WorkerError::TooManyWorkers { count: 70_000 })
        ));
        let err = WorkerPlacement::pinned(1, vec![1000])
            .validate()
            .unwrap_err();
        assert!(matches!(err, WorkerError::UnknownCpu { cpu: 1000, .. }));
        assert!(
            WorkerPlacement::pinned(2, available_cpus())
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn pinned_thread_runs_on_its_cpu() {
        let cpu = available_cpus()[0];
        let thread = spawn_pinned("pin-test".into(), Some(cpu), move || {
            // SAFETY: sched_getcpu has no preconditions.
            unsafe { libc::sched_getcpu() }
        })
        .unwrap();
        assert_eq!(thread.join(), Some(cpu as i32));
        assert!(matches!(
            spawn_pinned("bad-pin".into(), Some(1000), || ()),
            Err(WorkerError::Pin { cpu: 1000, .. })
        ));
    }
}
