//! Saving a running VM to a file and restoring it in another process.
//!
//! Saving works like a live migration into a file: dirty tracking starts, all memory is
//! written while the guest runs, then the pages dirtied meanwhile are rewritten in rounds;
//! only the last round, the state capture and the fsync happen with the guest paused.
//!
//! File layout (sparse: pages that are zero at save time are holes):
//!
//! ```text
//! 0       header (one page): magic, version, offsets, memory hash, crc32 of the header
//! 4096    state blob (state::blob format), padded to a page
//! M       RAM image, regions back to back in address order
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::dirty::{DirtySet, PageRange};
use crate::dirty_log::DirtyLogMode;
use crate::layout::PAGE_SIZE;
use crate::memory::{GuestRam, is_zero};
use crate::state::VmState;
use crate::state::blob::{self, BlobError};
use crate::vm::{RunState, Vm, VmError};

/// First bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FERRYSNP";
/// Snapshot file format version.
pub const SNAPSHOT_VERSION: u32 = 1;
const HEADER_LEN: u64 = PAGE_SIZE;
const HEADER_FIELDS: usize = 60;
const COPY_CHUNK: usize = 1 << 20;

/// Errors from saving or restoring.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File I/O.
    #[error("{operation} {path} failed")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a usable snapshot.
    #[error("{path} is not a usable Ferry snapshot: {reason}")]
    BadFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The state blob inside is damaged.
    #[error("the VM state in {path} is unreadable")]
    State {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: BlobError,
    },
    /// Memory read back does not hash to what was saved.
    #[error(
        "guest memory restored from {path} does not match what was saved (hash {restored:032x}, saved {saved:032x})"
    )]
    MemoryMismatch {
        /// The file.
        path: String,
        /// Hash recorded at save.
        saved: u128,
        /// Hash after restore.
        restored: u128,
    },
    /// The VM refused an operation.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// How to save.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Most pre-copy rounds before pausing regardless of what is still dirty.
    pub max_rounds: u32,
    /// Pause once a round leaves at most this many dirty pages.
    pub final_round_pages: u64,
    /// Resume the VM after saving (a checkpoint) instead of stopping it (a move).
    pub keep_running: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            max_rounds: 8,
            final_round_pages: 1024,
            keep_running: false,
        }
    }
}

/// One pass over memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundReport {
    /// Pages written.
    pub pages: u64,
    /// Time taken.
    pub millis: f64,
}

/// What a save did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SaveReport {
    /// The file.
    pub path: PathBuf,
    /// Pre-copy rounds, the first being all of memory.
    pub rounds: Vec<RoundReport>,
    /// Pages written with the guest paused.
    pub final_pages: u64,
    /// Time the guest was paused (pause to resume, or to stop).
    pub downtime_ms: f64,
    /// Time for the whole save.
    pub total_ms: f64,
    /// Memory bytes written to the file (zero pages are skipped).
    pub bytes_written: u64,
    /// xxh3-128 of guest memory at the moment of the pause.
    pub memory_hash: String,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Time to rebuild the VM, load memory and state.
    pub total_ms: f64,
    /// Memory bytes read from the file.
    pub bytes_read: u64,
    /// Hash of the restored memory (equal to the saved one, or restore fails).
    pub memory_hash: String,
}

#[derive(Debug)]
struct Header {
    state_offset: u64,
    state_len: u64,
    memory_offset: u64,
    memory_len: u64,
    memory_hash: u128,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN as usize);
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        for field in [
            self.state_offset,
            self.state_len,
            self.memory_offset,
            self.memory_len,
        ] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&self.memory_hash.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_FIELDS + 4);
        out.resize(HEADER_LEN as usize, 0);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Header, String> {
        if bytes.len() < HEADER_FIELDS + 4 {
            return Err(format!("file is only {} bytes long", bytes.len()));
        }
        if bytes[..8] != SNAPSHOT_MAGIC {
            return Err("wrong magic (not a snapshot file)".into());
        }
        let u32_at =
            |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u64_at =
            |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version != SNAPSHOT_VERSION {
            return Err(format!(
                "format version {version}, this build reads version {SNAPSHOT_VERSION}"
            ));
        }
        let crc = u32_at(HEADER_FIELDS);
        if crc != crc32fast::hash(&bytes[..HEADER_FIELDS]) {
            return Err("header checksum mismatch (file corrupted)".into());
        }
        Ok(Header {
            state_offset: u64_at(12),
            state_len: u64_at(20),
            memory_offset: u64_at(28),
            memory_len: u64_at(36),
            memory_hash: u128::from_le_bytes(bytes[44..60].try_into().unwrap_or_default()),
        })
    }
}

/// Maps guest-physical addresses to offsets in the RAM image.
fn image_offset(layout: &[(u64, u64)], gpa: u64) -> Option<u64> {
    let mut offset = 0;
    for &(start, len) in layout {
        if gpa >= start && gpa < start + len {
            return Some(offset + gpa - start);
        }
        offset += len;
    }
    None
}

/// Writes the pages of `ranges` from RAM into `file`; with `skip_zero`, all-zero pages are
/// left as holes (only valid when the file range is known to be zero).
fn write_ranges(
    ram: &GuestRam,
    file: &File,
    memory_offset: u64,
    ranges: impl Iterator<Item = PageRange>,
    skip_zero: bool,
) -> std::io::Result<u64> {
    let layout = ram.layout();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut written = 0;
    for range in ranges {
        let mut gpa = range.gpa;
        while gpa < range.end() {
            let len = (range.end() - gpa).min(COPY_CHUNK as u64) as usize;
            ram.read(gpa, &mut buf[..len])
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let base = memory_offset
                + image_offset(&layout, gpa)
                    .ok_or_else(|| std::io::Error::other("dirty page outside RAM"))?;
            let mut page = 0;
            while page < len {
                // Write maximal runs of pages, skipping zero pages when allowed.
                let is_zero = |p: usize| is_zero(&buf[p..p + PAGE_SIZE as usize]);
                if skip_zero && is_zero(page) {
                    page += PAGE_SIZE as usize;
                    continue;
                }
                let start = page;
                page += PAGE_SIZE as usize;
                while page < len && !(skip_zero && is_zero(page)) {
                    page += PAGE_SIZE as usize;
                }
                file.write_all_at(&buf[start..page], base + start as u64)?;
                written += (page - start) as u64;
            }
            gpa += len as u64;
        }
    }
    Ok(written)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Maps an I/O error on `path` during `operation` to a snapshot error.
fn io_error(path: &Path, operation: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io {
        operation,
        path,
        source,
    }
}

/// Saves `vm` (running or paused) to `path`, pausing it only for the final round.
pub fn save(vm: &mut Vm, path: &Path, options: &SaveOptions) -> Result<SaveReport, SnapshotError> {
    let started = Instant::now();
    let io_err = |operation| io_error(path, operation);
    let memory_len = vm.ram().size();
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("creating"))?;
    let was_running = vm.run_state() == RunState::Running;

    let first_round = vm.begin_tracking()?;
    let result = save_with_tracking(
        vm,
        &file,
        path,
        (memory_len, first_round),
        options,
        was_running,
        started,
    );
    if vm.run_state() != RunState::Stopped {
        let _ = vm.stop_dirty_log();
    }
    if result.is_err() && was_running && vm.run_state() == RunState::Paused {
        // Leave the VM as we found it.
        vm.resume()?;
    }
    result
}

fn save_with_tracking(
    vm: &mut Vm,
    file: &File,
    path: &Path,
    (memory_len, first_round): (u64, DirtySet),
    options: &SaveOptions,
    was_running: bool,
    started: Instant,
) -> Result<SaveReport, SnapshotError> {
    let io_err = |operation| io_error(path, operation);
    // The state blob goes between header and memory; reserve generously (vCPU state is
    // ~10 KiB each) and put memory at a 2 MiB boundary.
    let memory_offset = 2 << 20;
    file.set_len(memory_offset + memory_len)
        .map_err(io_err("sizing"))?;

    let mut rounds = Vec::new();
    let mut bytes_written = 0;
    // Round one: every page ever written (the rest is zero, and the file is sparse), with
    // zero pages skipped. Later rounds: exactly the pages dirtied meanwhile.
    let round_start = Instant::now();
    bytes_written += write_ranges(vm.ram(), file, memory_offset, first_round.ranges(), true)
        .map_err(io_err("writing memory to"))?;
    rounds.push(RoundReport {
        pages: first_round.count(),
        millis: ms(round_start.elapsed()),
    });
    let mut to_write = vm.fetch_dirty()?;
    loop {
        if to_write.count() <= options.final_round_pages
            || rounds.len() as u32 >= options.max_rounds
        {
            break;
        }
        let round_start = Instant::now();
        bytes_written += write_ranges(vm.ram(), file, memory_offset, to_write.ranges(), false)
            .map_err(io_err("writing memory to"))?;
        rounds.push(RoundReport {
            pages: to_write.count(),
            millis: ms(round_start.elapsed()),
        });
        to_write = vm.fetch_dirty()?;
        if to_write.count() <= options.final_round_pages
            || rounds.len() as u32 >= options.max_rounds
        {
            break;
        }
    }

    // Flush the bulk of the image while the guest still runs, so the final sync is small.
    file.sync_data().map_err(io_err("syncing"))?;

    let pause_start = Instant::now();
    vm.pause()?;
    let mut last = vm.fetch_dirty()?;
    last.union_with(&to_write)
        .map_err(|e| SnapshotError::BadFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    bytes_written += write_ranges(vm.ram(), file, memory_offset, last.ranges(), false)
        .map_err(io_err("writing memory to"))?;
    let state = vm.capture_state()?;
    vm.stop_dirty_log()?;
    // The hash must see exactly the saved memory: while paused for a checkpoint, or after the
    // VM has stopped for a move (then it is outside the downtime, which has ended).
    let (memory_hash, downtime) = if options.keep_running && was_running {
        let hash = vm.ram().hash();
        vm.resume()?;
        (hash, pause_start.elapsed())
    } else {
        if !options.keep_running {
            vm.stop();
        }
        let downtime = pause_start.elapsed();
        (vm.ram().hash(), downtime)
    };
    let state_blob = blob::encode(&state).map_err(|source| SnapshotError::State {
        path: path.display().to_string(),
        source,
    })?;
    if HEADER_LEN + state_blob.len() as u64 > memory_offset {
        return Err(SnapshotError::BadFile {
            path: path.display().to_string(),
            reason: format!("state blob of {} bytes does not fit", state_blob.len()),
        });
    }
    file.write_all_at(&state_blob, HEADER_LEN)
        .map_err(io_err("writing state to"))?;
    let header = Header {
        state_offset: HEADER_LEN,
        state_len: state_blob.len() as u64,
        memory_offset,
        memory_len,
        memory_hash,
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(io_err("writing header to"))?;
    file.sync_all().map_err(io_err("syncing"))?;
    Ok(SaveReport {
        path: path.to_path_buf(),
        rounds,
        final_pages: last.count(),
        downtime_ms: ms(downtime),
        total_ms: ms(started.elapsed()),
        bytes_written,
        memory_hash: format!("{memory_hash:032x}"),
    })
}

/// A snapshot file of `state` and `memory` (whose length must be the state's memory size),
/// made in memory: seeds for the decoders' fuzz target.
#[doc(hidden)]
pub fn sample_file(state: &VmState, memory: &[u8]) -> Vec<u8> {
    let blob = blob::encode(state).unwrap_or_default();
    let state_len = blob.len() as u64;
    let memory_offset = (HEADER_LEN + state_len).next_multiple_of(4096);
    let header = Header {
        state_offset: HEADER_LEN,
        state_len,
        memory_offset,
        memory_len: memory.len() as u64,
        memory_hash: 0,
    };
    let mut out = header.encode();
    out.extend_from_slice(&blob);
    out.resize(memory_offset as usize, 0);
    out.extend_from_slice(memory);
    out
}

/// Recomputes the header checksum of a snapshot file's bytes (for the fuzz target, which
/// mutates headers and wants some to get past the checksum).
#[doc(hidden)]
pub fn reseal_header(file: &mut [u8]) {
    if file.len() >= HEADER_FIELDS + 4 {
        let crc = crc32fast::hash(&file[..HEADER_FIELDS]);
        file[HEADER_FIELDS..HEADER_FIELDS + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Reads only the VM state of a snapshot (for inspection).
pub fn read_state(path: &Path) -> Result<VmState, SnapshotError> {
    let (_, state, _) = open(path)?;
    Ok(state)
}

fn open(path: &Path) -> Result<(File, VmState, Header), SnapshotError> {
    let display = path.display().to_string();
    let io_err = |operation| io_error(path, operation);
    let file = File::open(path).map_err(io_err("opening"))?;
    let file_len = file
        .metadata()
        .map_err(io_err("reading metadata of"))?
        .len();
    let mut head = vec![0u8; HEADER_LEN.min(file_len) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(io_err("reading"))?;
    let header = Header::decode(&head).map_err(|reason| SnapshotError::BadFile {
        path: display.clone(),
        reason,
    })?;
    let bad = |reason: String| SnapshotError::BadFile {
        path: display.clone(),
        reason,
    };
    if header.state_len > blob::MAX_BLOB_PAYLOAD + blob::BLOB_HEADER_LEN as u64
        || header.state_offset.saturating_add(header.state_len) > header.memory_offset
    {
        return Err(bad("state section out of bounds".into()));
    }
    if header.memory_offset.saturating_add(header.memory_len) > file_len {
        return Err(bad(format!(
            "file is truncated: {file_len} bytes, memory ends at {}",
            header.memory_offset + header.memory_len
        )));
    }
    let mut state_bytes = vec![0u8; header.state_len as usize];
    file.read_exact_at(&mut state_bytes, header.state_offset)
        .map_err(io_err("reading"))?;
    let state: VmState = blob::decode(&state_bytes).map_err(|source| SnapshotError::State {
        path: display.clone(),
        source,
    })?;
    if state.shape.memory != header.memory_len {
        return Err(bad("memory size in header and state disagree".into()));
    }
    Ok((file, state, header))
}

/// Next data/hole boundary at or after `offset` (`SEEK_DATA`/`SEEK_HOLE`).
fn seek_data(file: &File, offset: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a valid fd with a valid whence; it only moves the file offset.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    (ret >= 0).then_some(ret as u64)
}

/// Restores the VM saved in `path` into a new, paused VM in this process.
pub fn restore(
    path: &Path,
    dirty_log: DirtyLogMode,
    console_log: Option<PathBuf>,
) -> Result<(Vm, RestoreReport), SnapshotError> {
    let started = Instant::now();
    let (mut file, state, header) = open(path)?;
    let display = path.display().to_string();
    let mut vm = Vm::create_for_restore(&state, dirty_log, console_log)?;
    let mut bytes_read = 0u64;
    let mut image_offset = 0u64;
    for (gpa, len) in vm.ram().layout() {
        let region_start = header.memory_offset + image_offset;
        let region_end = region_start + len;
        let mut offset = region_start;
        // Copy only the data extents; holes are zero pages, and fresh RAM is already zero.
        while offset < region_end {
            let data = seek_data(&file, offset, libc::SEEK_DATA).unwrap_or(region_end);
            if data >= region_end {
                break;
            }
            let hole = seek_data(&file, data, libc::SEEK_HOLE)
                .unwrap_or(region_end)
                .min(region_end);
            file.seek(SeekFrom::Start(data))
                .map_err(|source| SnapshotError::Io {
                    operation: "seeking in",
                    path: display.clone(),
                    source,
                })?;
            let count = (hole - data) as usize;
            vm.ram()
                .memory()
                .read_exact_volatile_from(GuestAddress(gpa + data - region_start), &mut file, count)
                .map_err(|e| SnapshotError::Io {
                    operation: "reading memory from",
                    path: display.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            bytes_read += count as u64;
            offset = hole;
        }
        image_offset += len;
    }
    let restored = vm.ram().hash();
    if restored != header.memory_hash {
        return Err(SnapshotError::MemoryMismatch {
            path: display,
            saved: header.memory_hash,
            restored,
        });
    }
    vm.restore_state(&state)?;
    Ok((
        vm,
        RestoreReport {
            total_ms: ms(started.elapsed()),
            bytes_read,
            memory_hash: format!("{restored:032x}"),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let header = Header {
            state_offset: 4096,
            state_len: 1234,
            memory_offset: 2 << 20,
            memory_len: 64 << 20,
            memory_hash: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        };
        let bytes = header.encode();
        assert_eq!(bytes.len(), 4096);
        let back = Header::decode(&bytes).unwrap();
        assert_eq!(back.memory_hash, header.memory_hash);
        assert_eq!(back.memory_len, 64 << 20);
        let mut damaged = bytes.clone();
        damaged[20] ^= 1;
        assert!(Header::decode(&damaged).unwrap_err().contains("checksum"));
        assert!(Header::decode(&bytes[..10]).is_err());
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert!(Header::decode(&foreign).unwrap_err().contains("magic"));
    }

    #[test]
    fn image_offsets_follow_region_order() {
        let layout = [(0, 3 << 30), (4 << 30, 1 << 30)];
        assert_eq!(image_offset(&layout, 0x1000), Some(0x1000));
        assert_eq!(image_offset(&layout, 4 << 30), Some(3 << 30));
        assert_eq!(image_offset(&layout, 3 << 30), None);
    }
}
