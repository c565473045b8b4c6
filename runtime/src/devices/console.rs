//! The VM's console: everything the guest writes to its serial port, kept in a bounded
//! history, appended to a log file, and streamed to followers.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of recent output kept in memory for late followers.
pub const HISTORY_BYTES: usize = 256 * 1024;
/// Output is delivered to followers at each newline or when this much is pending.
const FOLLOW_CHUNK: usize = 4096;

#[derive(Debug, Default)]
struct Inner {
    history: VecDeque<u8>,
    total: u64,
    pending: Vec<u8>,
    log: Option<File>,
    followers: Vec<Sender<Vec<u8>>>,
}

/// Shared console output of one VM.
#[derive(Debug, Clone, Default)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
}

impl Console {
    /// A console with no log file.
    pub fn new() -> Self {
        Self::default()
    }

    /// A console that also appends to `path` (created if missing).
    pub fn with_log(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let console = Self::new();
        console.lock().log = Some(file);
        Ok(console)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the byte buffers inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends guest output.
    pub fn write_bytes(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        inner.total += bytes.len() as u64;
        inner.history.extend(bytes);
        let excess = inner.history.len().saturating_sub(HISTORY_BYTES);
        inner.history.drain(..excess);
        inner.pending.extend_from_slice(bytes);
        if bytes.contains(&b'\n') || inner.pending.len() >= FOLLOW_CHUNK {
            Self::deliver(&mut inner);
        }
    }

    /// Delivers output not yet sent to the log file and followers (done at every newline
    /// and whenever the VM pauses).
    pub fn flush(&self) {
        Self::deliver(&mut self.lock());
    }

    fn deliver(inner: &mut Inner) {
        if inner.pending.is_empty() {
            return;
        }
        let chunk = std::mem::take(&mut inner.pending);
        if let Some(log) = inner.log.as_mut()
            && let Err(error) = log.write_all(&chunk)
        {
            tracing::warn!(%error, "console log write failed; further output stays in memory only");
            inner.log = None;
        }
        inner
            .followers
            .retain(|follower| follower.send(chunk.clone()).is_ok());
    }

    /// The retained recent output and a receiver for everything after it.
    pub fn follow(&self) -> (Vec<u8>, Receiver<Vec<u8>>) {
        let (_, history, rx) = self.follow_from(0);
        (history, rx)
    }

    /// Output from absolute byte `offset` on (as far as it is retained) and a receiver for
    /// everything after it; also returns the offset the returned bytes start at. A follower
    /// that reconnects (e.g. after the VM moved to another host) passes how far it got.
    pub fn follow_from(&self, offset: u64) -> (u64, Vec<u8>, Receiver<Vec<u8>>) {
        let mut inner = self.lock();
        let (tx, rx) = channel();
        inner.followers.push(tx);
        // Output still pending will arrive through the channel; don't show it twice.
        let delivered = inner.history.len() - inner.pending.len().min(inner.history.len());
        let end = inner.total - inner.pending.len() as u64;
        let retained_from = end - delivered as u64;
        let start = offset.clamp(retained_from, end);
        let skip = (start - retained_from) as usize;
        let history = inner
            .history
            .iter()
            .skip(skip)
            .take(delivered - skip)
            .copied()
            .collect();
        (start, history, rx)
    }

    /// Replaces the retained history with `bytes`, the last output of a VM that ran on
    /// another host and had written `total` bytes there, so `history`, offsets and late
    /// followers continue the same story.
    pub fn seed_history(&self, bytes: &[u8], total: u64) {
        let mut inner = self.lock();
        let keep = bytes.len().min(HISTORY_BYTES);
        inner.history = bytes[bytes.len() - keep..].iter().copied().collect();
        inner.total = total.max(keep as u64);
    }

    /// The retained recent output.
    pub fn history(&self) -> Vec<u8> {
        self.lock().history.iter().copied().collect()
    }

    /// Total bytes the guest has written.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }
}

/// `io::Write` adapter handed to the serial device model.
#[derive(Debug, Clone)]
pub struct ConsoleWriter(pub Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_get_lines_and_history_is_bounded() {
        let console = Console::new();
        console.write_bytes(b"early\n");
        let (history, rx) = console.follow();
        assert_eq!(history, b"early\n");
        console.write_bytes(b"par");
        assert!(
            rx.try_recv().is_err(),
            "partial line is held until newline or flush"
        );
        console.write_bytes(b"tial\n");
        assert_eq!(rx.try_recv().unwrap(), b"partial\n");
        console.write_bytes(b"x");
        console.flush();
        assert_eq!(rx.try_recv().unwrap(), b"x");
        console.write_bytes(&vec![b'a'; HISTORY_BYTES + 10]);
        assert_eq!(console.history().len(), HISTORY_BYTES);
        assert_eq!(console.total_bytes(), 6 + 8 + 1 + HISTORY_BYTES as u64 + 10);
    }

    #[test]
    fn followers_resume_from_an_offset_across_a_move() {
        let source = Console::new();
        source.write_bytes(b"one\ntwo\n");
        let (start, history, _rx) = source.follow_from(4);
        assert_eq!((start, history.as_slice()), (4, &b"two\n"[..]));
        // The VM moves: the destination's console continues the byte count.
        let destination = Console::new();
        destination.seed_history(&source.history(), source.total_bytes());
        destination.write_bytes(b"three\n");
        let (start, history, _rx) = destination.follow_from(8);
        assert_eq!((start, history.as_slice()), (8, &b"three\n"[..]));
        let (start, history, _rx) = destination.follow_from(0);
        assert_eq!((start, history.len()), (0, 14));
        let (start, history, _rx) = destination.follow_from(99);
        assert_eq!(
            (start, history.len()),
            (14, 0),
            "past the end: nothing, from the end"
        );
    }

    #[test]
    fn log_file_receives_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let console = Console::with_log(&path).unwrap();
        console.write_bytes(b"hello\nworld");
        console.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\nworld");
    }
}
