//! The test device: ports through which built-in guests report an exit status per vCPU, failed
//! checks (e.g. the page number of a wrong page), and progress. Host code can wait on it.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::layout::{TEST_PORT_EXIT, TEST_PORT_FAIL, TEST_PORT_PROGRESS, TEST_PORT_SLEEP};

/// Failure values kept (the count keeps going).
pub const MAX_RECORDED_FAILURES: usize = 1024;

/// What the guest has reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestDeviceState {
    /// Exit status per vCPU that has finished.
    pub exits: BTreeMap<u32, u32>,
    /// The first reported failure values.
    pub failures: Vec<u32>,
    /// Number of failures reported.
    pub failure_count: u64,
    /// Latest progress value.
    pub progress: u32,
    /// Number of progress reports.
    pub progress_reports: u64,
}

/// What a port write means for the vCPU that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// Keep running.
    Continue,
    /// The vCPU's workload ended with this status; stop running it.
    Exit(u32),
    /// Park the vCPU for about this many TSC cycles (or until the VM pauses), then go on.
    Sleep(u32),
}

/// The device, shared between vCPU threads and observers.
#[derive(Debug, Default)]
pub struct TestDevice {
    state: Mutex<TestDeviceState>,
    changed: Condvar,
}

impl TestDevice {
    /// Whether `port` belongs to the device.
    pub fn handles(port: u16) -> bool {
        matches!(
            port,
            TEST_PORT_EXIT | TEST_PORT_FAIL | TEST_PORT_PROGRESS | TEST_PORT_SLEEP
        )
    }

    fn lock(&self) -> MutexGuard<'_, TestDeviceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles a guest write of `data` (1, 2 or 4 bytes, little-endian) to `port` by `vcpu`.
    pub fn write(&self, vcpu: u32, port: u16, data: &[u8]) -> PortEffect {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        if port == TEST_PORT_SLEEP {
            // No state: a sleep leaves nothing behind to migrate.
            return PortEffect::Sleep(value);
        }
        let mut state = self.lock();
        let effect = match port {
            TEST_PORT_EXIT => {
                state.exits.insert(vcpu, value);
                PortEffect::Exit(value)
            }
            TEST_PORT_FAIL => {
                state.failure_count += 1;
                if state.failures.len() < MAX_RECORDED_FAILURES {
                    state.failures.push(value);
                }
                PortEffect::Continue
            }
            TEST_PORT_PROGRESS => {
                state.progress = value;
                state.progress_reports += 1;
                PortEffect::Continue
            }
            _ => PortEffect::Continue,
        };
        drop(state);
        self.changed.notify_all();
        effect
    }

    /// A copy of the current state.
    pub fn state(&self) -> TestDeviceState {
        self.lock().clone()
    }

    /// Replaces the state (restore).
    pub fn restore(&self, state: &TestDeviceState) {
        *self.lock() = state.clone();
        self.changed.notify_all();
    }

    /// Waits until `done(state)` holds or `timeout` passes; returns the last state seen and
    /// whether the condition held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&TestDeviceState) -> bool,
    ) -> (TestDeviceState, bool) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if done(&state) {
                return (state.clone(), true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (state.clone(), false);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_record_exit_failures_and_progress() {
        let dev = TestDevice::default();
        assert_eq!(
            dev.write(0, TEST_PORT_PROGRESS, &7u32.to_le_bytes()),
            PortEffect::Continue
        );
        assert_eq!(dev.write(0, TEST_PORT_FAIL, &[5, 1]), PortEffect::Continue);
        assert_eq!(
            dev.write(1, TEST_PORT_SLEEP, &5000u32.to_le_bytes()),
            PortEffect::Sleep(5000)
        );
        assert_eq!(
            dev.write(1, TEST_PORT_EXIT, &3u32.to_le_bytes()),
            PortEffect::Exit(3)
        );
        let state = dev.state();
        assert_eq!(state.progress, 7);
        assert_eq!(state.failures, vec![0x105]);
        assert_eq!(state.exits.get(&1), Some(&3));
        let (_, held) = dev.wait_until(Duration::from_millis(1), |s| s.progress == 8);
        assert!(!held);
        for _ in 0..MAX_RECORDED_FAILURES + 5 {
            dev.write(0, TEST_PORT_FAIL, &[1]);
        }
        let state = dev.state();
        assert_eq!(state.failures.len(), MAX_RECORDED_FAILURES);
        assert_eq!(state.failure_count, MAX_RECORDED_FAILURES as u64 + 6);
        let other = TestDevice::default();
        other.restore(&state);
        assert_eq!(other.state(), state);
    }
}
