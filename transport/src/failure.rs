//! The first error of a transfer, shared by all its threads: what comes after it is a
//! consequence, so only the first is kept and reported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug)]
pub(crate) struct FirstError<E> {
    error: Mutex<Option<Arc<E>>>,
    /// Raised with the error; threads poll it (and waits hand it on) to give up at once.
    raised: Arc<AtomicBool>,
}

impl<E> Default for FirstError<E> {
    fn default() -> Self {
        Self {
            error: Mutex::new(None),
            raised: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<E: std::error::Error + 'static> FirstError<E> {
    /// Records `error` unless an error is recorded already, logging it as the failure of
    /// `what`; returns whether it was the first.
    pub(crate) fn set(&self, error: E, what: &'static str) -> bool {
        // Only a plain Option behind the lock: nothing a panic could leave half-updated.
        let mut slot = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return false;
        }
        tracing::warn!(error = %crate::report(&error), "{what} failed");
        *slot = Some(Arc::new(error));
        self.raised.store(true, Ordering::Release);
        true
    }

    /// The error, if one was recorded.
    pub(crate) fn get(&self) -> Option<Arc<E>> {
        if !self.is_set() {
            return None;
        }
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether an error was recorded (cheap: one atomic load).
    pub(crate) fn is_set(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// The flag raised with the error, for code that only needs to know.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.raised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_error_is_kept() {
        let first = FirstError::<std::io::Error>::default();
        assert!(!first.is_set() && first.get().is_none());
        let flag = first.flag();
        assert!(first.set(std::io::Error::other("link down"), "test"));
        assert!(!first.set(std::io::Error::other("consequence"), "test"));
        assert!(flag.load(Ordering::Acquire));
        assert_eq!(first.get().unwrap().to_string(), "link down");
    }
}
