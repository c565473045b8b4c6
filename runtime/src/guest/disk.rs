//! The `disk` guest's memory layout, its block pattern, and the host-side check of an image
//! against what the guest says it wrote.
//!
//! The guest drives the VM's first virtio-blk device with a polling driver of its own (one
//! request at a time on a 16-entry split queue). It writes random 4 KiB blocks, each filled
//! with a pattern derived from the block's index and its generation (a per-block counter
//! kept in a table in guest memory), reads random blocks back and checks every word against
//! the generation the table holds for them, flushes every 64 writes, and reports a wrong
//! block through the test device, like `verify` does for memory. A block whose generation is
//! 0 has never been written by this guest; its content is not checked.
//!
//! The guest bumps a block's generation in the table only once the write has completed, and
//! while the write is in flight it keeps `(block + 1, new generation)` in its state page: a
//! host check of a paused guest accepts either generation for that one block.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{GuestError, GuestParams, verify_word};
use crate::layout::{self, DATA_START, GUEST_STATE};
use crate::memory::GuestRam;

/// Bytes per block the guest writes.
pub const DISK_BLOCK: u64 = 4096;
/// Mixed into the seed so a disk block never looks like a `verify` page.
pub const DISK_SALT: u64 = 0xD15C_0B10_C4ED_5A17;
/// Failure value: no usable virtio-blk device at the expected address.
pub const DISK_NO_DEVICE: u32 = 0xFFFF_FFFD;
/// Failure value: the device answered a request with an error status.
pub const DISK_IO_ERROR: u32 = 0xFFFF_FFFE;

/// Offsets inside the driver's area.
pub mod area {
    /// Descriptor table (16 entries).
    pub const DESC: u64 = 0x0;
    /// Available ring.
    pub const AVAIL: u64 = 0x100;
    /// Used ring.
    pub const USED: u64 = 0x1000;
    /// Request header.
    pub const HEADER: u64 = 0x2000;
    /// Status byte.
    pub const STATUS: u64 = 0x2010;
    /// Block being written.
    pub const WRITE_BUF: u64 = 0x3000;
    /// Block being read back.
    pub const READ_BUF: u64 = 0x4000;
    /// Size of the area; the generation table follows it.
    pub const SIZE: u64 = 0x5000;
}

/// Queue size the guest's driver uses.
pub const DISK_QUEUE_SIZE: u32 = 16;

/// Fills the disk fields of `params` for a first disk of `disk_size` bytes.
pub fn disk_params(
    params: &mut GuestParams,
    memory: u64,
    seed: u64,
    blocks: Option<u64>,
    writes_per_sec: Option<u64>,
    tsc_hz: u64,
    disk_size: Option<u64>,
) -> Result<(), GuestError> {
    let invalid = |problem: String| GuestError::InvalidParameter {
        guest: "disk",
        problem,
    };
    let disk_size = disk_size.ok_or_else(|| {
        invalid("the disk guest needs a disk (give the VM one with --disk)".into())
    })?;
    let low_end = memory.min(layout::LOW_MEMORY_END);
    let table = DATA_START + area::SIZE;
    let room = low_end.saturating_sub(table) / 8;
    let on_disk = disk_size / DISK_BLOCK;
    let blocks = blocks.unwrap_or(on_disk.min(room));
    if blocks == 0 || blocks > on_disk || blocks > room || blocks >= u64::from(DISK_NO_DEVICE) {
        return Err(invalid(format!(
            "{blocks} blocks requested; the disk has {on_disk} and memory has room for a table of {room}"
        )));
    }
    params.virtio_base = layout::virtio_mmio_base(0);
    params.disk_area = DATA_START;
    params.gen_table = table;
    params.disk_blocks = blocks;
    params.seed = seed ^ DISK_SALT;
    params.tsc_per_write = match writes_per_sec {
        None => 0,
        Some(0) => return Err(invalid("a write rate of 0 never writes".into())),
        Some(rate) => (tsc_hz / rate).max(1),
    };
    Ok(())
}

/// Block `block` at generation `generation`, as the guest writes it (`salted_seed` is the
/// parameter block's seed).
pub fn disk_block(salted_seed: u64, block: u64, generation: u64) -> Vec<u8> {
    (0..DISK_BLOCK / 8)
        .flat_map(|word| verify_word(salted_seed, block, generation, word).to_le_bytes())
        .collect()
}

/// What a paused `disk` guest says it has written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskGuestView {
    /// The parameter block's (salted) seed.
    pub seed: u64,
    /// Generation of every block (0: never written).
    pub generations: Vec<u64>,
    /// The write in flight: block and the generation it writes.
    pub pending: Option<(u64, u64)>,
}

impl DiskGuestView {
    /// Reads the view out of guest memory.
    pub fn read(ram: &GuestRam) -> Result<DiskGuestView, crate::memory::MemoryError> {
        let mut raw = vec![0u8; std::mem::size_of::<GuestParams>()];
        ram.read(layout::PARAMS, &mut raw)?;
        let word = |offset: i32| {
            let o = offset as usize;
            u64::from_le_bytes(raw[o..o + 8].try_into().unwrap_or([0; 8]))
        };
        use super::params::offsets;
        let blocks = word(offsets::DISK_BLOCKS);
        let table = word(offsets::GEN_TABLE);
        let mut bytes = vec![0u8; (blocks * 8) as usize];
        ram.read(table, &mut bytes)?;
        let generations = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut state = [0u8; 16];
        ram.read(GUEST_STATE, &mut state)?;
        let pending_block = u64::from_le_bytes(state[0..8].try_into().unwrap_or([0; 8]));
        let pending_gen = u64::from_le_bytes(state[8..16].try_into().unwrap_or([0; 8]));
        Ok(DiskGuestView {
            seed: word(offsets::SEED),
            generations,
            pending: (pending_block != 0).then(|| (pending_block - 1, pending_gen)),
        })
    }

    /// Blocks written so far.
    pub fn written(&self) -> usize {
        self.generations.iter().filter(|&&g| g != 0).count()
    }

    /// Blocks of `image` whose content is not what the guest wrote last (reading errors
    /// count as wrong).
    pub fn wrong_blocks(&self, image: &File) -> Vec<u64> {
        let mut wrong = Vec::new();
        let mut buf = vec![0u8; DISK_BLOCK as usize];
        for (block, &generation) in self.generations.iter().enumerate() {
            let block = block as u64;
            if generation == 0 {
                continue;
            }
            if image.read_exact_at(&mut buf, block * DISK_BLOCK).is_err() {
                wrong.push(block);
                continue;
            }
            let matches = |g: u64| buf == disk_block(self.seed, block, g);
            let ok =
                matches(generation) || self.pending.is_some_and(|(b, g)| b == block && matches(g));
            if !ok {
                wrong.push(block);
            }
        }
        wrong
    }
}
