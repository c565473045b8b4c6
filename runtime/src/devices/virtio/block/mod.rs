//! virtio-blk (virtio 1.x, 5.2) on a raw image: one request queue, FLUSH as `fdatasync`,
//! read-only images, a 20-byte device ID.
//!
//! Requests are served synchronously, in whatever thread calls
//! [`VirtioDevice::process`] (the VMM's I/O thread, never a vCPU): when the VM pauses, that
//! thread has no request half done, so the transport's state is all there is to save —
//! nothing is in flight to lose or to complete twice.

pub mod dirty_blocks;
pub mod image;
pub mod request;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};

pub use dirty_blocks::{DirtyBlocks, Extent};
pub use image::{DiskImage, ImageError, SECTOR_SIZE};
use request::{MAX_REQUEST_BYTES, Served};

use super::{DeviceError, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestMemory;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// What the device has done, for the operator and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCounters {
    /// Read requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Requests answered with an error status.
    pub failed: u64,
    /// Chains returned untouched because they were malformed.
    pub malformed: u64,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    image: DiskImage,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    features: u64,
    acked: u64,
    counters: BlockCounters,
    dirty: Option<DirtyBlocks>,
}

impl Block {
    /// A device on `image`, identifying itself as `id` (cut to 20 bytes).
    pub fn new(image: DiskImage, id: &str) -> Self {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (dst, src) in serial.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX;
        if image.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        Block {
            image,
            serial,
            features,
            acked: 0,
            counters: BlockCounters::default(),
            dirty: None,
        }
    }

    /// The image.
    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    /// The image, mutably (its lock changes hands during a migration).
    pub fn image_mut(&mut self) -> &mut DiskImage {
        &mut self.image
    }

    /// What the device has done.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Starts recording which chunks the guest writes (a storage migration's rounds).
    pub fn start_dirty_tracking(&mut self, chunk: u64) {
        self.dirty = Some(DirtyBlocks::new(self.image.size(), chunk));
    }

    /// What was written since tracking started or since the last call; `None` if off.
    pub fn take_dirty(&mut self) -> Option<Vec<Extent>> {
        self.dirty.as_mut().map(DirtyBlocks::take)
    }

    /// Bytes written since the last [`Block::take_dirty`] (0 if tracking is off).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.as_ref().map_or(0, DirtyBlocks::dirty_bytes)
    }

    /// Stops recording.
    pub fn stop_dirty_tracking(&mut self) {
        self.dirty = None;
    }

    /// Carries counters over from the device this one replaces (a migration's source).
    pub fn set_counters(&mut self, counters: BlockCounters) {
        self.counters = counters;
    }

    /// The configuration space (virtio 1.x, 5.2.4): capacity in sectors, largest segment,
    /// most segments per request, geometry (unused), block size.
    fn config_space(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&(self.image.size() / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&(MAX_REQUEST_BYTES as u32).to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, features: u64) {
        self.acked = features;
    }

    fn reset(&mut self) {
        self.acked = 0;
    }

    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let used = match request::serve(chain, memory, &self.image, &self.serial) {
                Ok((served, used)) => {
                    let c = &mut self.counters;
                    match served {
                        Served::Read(n) => {
                            c.reads += 1;
                            c.read_bytes += n as u64;
                        }
                        Served::Written { offset, len } => {
                            c.writes += 1;
                            c.written_bytes += len as u64;
                            if let Some(dirty) = &mut self.dirty {
                                dirty.mark(offset, len as u64);
                            }
                        }
                        Served::Flushed => c.flushes += 1,
                        Served::Identified => {}
                        Served::Failed(_) => c.failed += 1,
                    }
                    used
                }
                Err(error) => {
                    self.counters.malformed += 1;
                    tracing::warn!(image = %self.image.path().display(), %error, "virtio-blk request returned unserved");
                    0
                }
            };
            queue
                .add_used(memory, head, used)
                .map_err(DeviceError::Queue)?;
            used_any = true;
        }
        if !used_any {
            return Ok(false);
        }
        queue.needs_notification(memory).map_err(DeviceError::Queue)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::memory::GuestRam;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;

    fn image(dir: &Path, read_only: bool) -> DiskImage {
        let path = dir.join("disk.raw");
        DiskImage::create_sparse(&path, 1 << 20).unwrap();
        DiskImage::open(&path, read_only).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// The usual three-descriptor request: header, data, status.
    fn request(
        ram: &GuestRam,
        queue: &MockSplitQueue<'_, GuestMemory>,
        kind: u32,
        sector: u64,
        data_len: u32,
    ) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.memory()
            .write_slice(&header, GuestAddress(HEADER))
            .unwrap();
        ram.memory()
            .write_obj(0xffu8, GuestAddress(STATUS))
            .unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID {
            VRING_DESC_F_WRITE
        } else {
            0
        };
        queue
            .add_desc_chains(
                &[
                    desc(HEADER, 16, VRING_DESC_F_NEXT, 1),
                    desc(DATA, data_len, data_flags | VRING_DESC_F_NEXT, 2),
                    desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                ],
                0,
            )
            .unwrap();
    }

    fn status(ram: &GuestRam) -> u32 {
        u32::from(ram.memory().read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn used_len(ram: &GuestRam, queue: &MockSplitQueue<'_, GuestMemory>, slot: u64) -> u32 {
        // Used ring: flags u16, idx u16, then (id u32, len u32) elements.
        ram.memory()
            .read_obj::<u32>(queue.used_addr().unchecked_add(4 + 8 * slot + 4))
            .unwrap()
    }

    #[test]
    fn writes_and_reads_reach_the_image_and_flush_and_id_answer() {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::new(32 << 20).unwrap();
        let mq = MockSplitQueue::new(ram.memory(), 16);
        let mut queue: Queue = mq.create_queue().unwrap();
        let mut block = Block::new(image(dir.path(), false), "ferry-disk-0");
        block.activate(block.features());

        // Write 2 sectors of a pattern at sector 8.
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        ram.memory()
            .write_slice(&pattern, GuestAddress(DATA))
            .unwrap();
        request(&ram, &mq, VIRTIO_BLK_T_OUT, 8, 1024);
        assert!(block.process(0, &mut queue, ram.memory()).unwrap());
        assert_eq!(status(&ram), VIRTIO_BLK_S_OK);
        assert_eq!(
            used_len(&ram, &mq, 0),
            1,
            "a write returns only its status byte"
        );
        let mut on_disk = vec![0u8; 1024];
        block.image().read_at(&mut on_disk, 8 * 512).unwrap();
        assert_eq!(on_disk, pattern);

        // Read them back into zeroed guest memory.
        ram.memory()
            .write_slice(&[0u8; 1024], GuestAddress(DATA))
            .unwrap();
        request(&ram, &mq, VIRTIO_BLK_T_IN, 8, 1024);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_OK);
        assert_eq!(used_len(&ram, &mq, 1), 1025);
        let mut back = vec![0u8; 1024];
        ram.memory()
            .read_slice(&mut back, GuestAddress(DATA))
            .unwrap();
        assert_eq!(back, pattern);

        request(&ram, &mq, VIRTIO_BLK_T_FLUSH, 0, 0);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_OK);

        request(&ram, &mq, VIRTIO_BLK_T_GET_ID, 0, 20);
        block.process(0, &mut queue, ram.memory()).unwrap();
        let mut id = [0u8; 12];
        ram.memory()
            .read_slice(&mut id, GuestAddress(DATA))
            .unwrap();
        assert_eq!(&id, b"ferry-disk-0");

        request(&ram, &mq, 77, 0, 512);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_UNSUPP);

        let c = block.counters();
        assert_eq!((c.reads, c.writes, c.flushes, c.failed), (1, 1, 1, 1));
        assert_eq!((c.read_bytes, c.written_bytes), (1024, 1024));
        assert_eq!(block.take_dirty(), None, "no tracking unless asked");
        block.start_dirty_tracking(4096);
        request(&ram, &mq, VIRTIO_BLK_T_OUT, 9, 512);
        block.process(0, &mut queue, ram.memory()).unwrap();
        request(&ram, &mq, VIRTIO_BLK_T_IN, 40, 512);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(block.dirty_bytes(), 4096);
        assert_eq!(
            block.take_dirty(),
            Some(vec![(4096, 4096)]),
            "sector 9 is in the second 4 KiB chunk; the read marks nothing"
        );
        assert_eq!(block.take_dirty(), Some(vec![]));
        // The read landed in guest memory as a VMM write: dirty tracking sees it.
        let writes = ram.take_vmm_writes();
        assert_ne!(writes[0][(DATA / 4096 / 64) as usize], 0);
    }

    #[test]
    fn requests_it_cannot_carry_out_get_an_error_status() {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::new(32 << 20).unwrap();
        let mq = MockSplitQueue::new(ram.memory(), 16);
        let mut queue: Queue = mq.create_queue().unwrap();
        let mut block = Block::new(image(dir.path(), false), "d");
        // Past the end (1 MiB = 2048 sectors), and a partial sector.
        request(&ram, &mq, VIRTIO_BLK_T_IN, 2047, 1024);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_IOERR);
        request(&ram, &mq, VIRTIO_BLK_T_OUT, 0, 100);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_IOERR);
        request(&ram, &mq, VIRTIO_BLK_T_IN, u64::MAX / 256, 512);
        block.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_IOERR, "an overflowing sector");

        let dir = tempfile::tempdir().unwrap();
        let mut read_only = Block::new(image(dir.path(), true), "ro");
        assert_ne!(read_only.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mq = MockSplitQueue::new(ram.memory(), 16);
        let mut queue: Queue = mq.create_queue().unwrap();
        request(&ram, &mq, VIRTIO_BLK_T_OUT, 0, 512);
        read_only.process(0, &mut queue, ram.memory()).unwrap();
        assert_eq!(status(&ram), VIRTIO_BLK_S_IOERR);
        assert_eq!(read_only.counters().failed, 1);
    }

    /// Malformed chains: each is returned with nothing written and counted, and the device
    /// goes on serving the next request.
    #[test]
    fn malformed_chains_are_returned_unserved_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut block = Block::new(image(dir.path(), false), "d");
        let outside = 1u64 << 40;
        let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
            (
                "header outside guest memory",
                vec![
                    desc(outside, 16, VRING_DESC_F_NEXT, 1),
                    desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                ],
            ),
            (
                "data outside guest memory",
                vec![
                    desc(HEADER, 16, VRING_DESC_F_NEXT, 1),
                    desc(outside, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                    desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                ],
            ),
            ("no status byte", vec![desc(HEADER, 16, 0, 0)]),
            (
                "a short header",
                vec![
                    desc(HEADER, 8, VRING_DESC_F_NEXT, 1),
                    desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                ],
            ),
            (
                "a chain that loops",
                vec![
                    desc(HEADER, 16, VRING_DESC_F_NEXT, 1),
                    desc(DATA, 512, VRING_DESC_F_NEXT, 0),
                ],
            ),
            (
                "lengths that overflow",
                vec![
                    desc(HEADER, 16, VRING_DESC_F_NEXT, 1),
                    desc(DATA, u32::MAX, VRING_DESC_F_NEXT, 2),
                    desc(DATA, u32::MAX, VRING_DESC_F_NEXT, 3),
                    desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                ],
            ),
            (
                "a next index past the table",
                vec![desc(HEADER, 16, VRING_DESC_F_NEXT, 999)],
            ),
        ];
        let mut malformed = 0;
        for (what, chain) in cases {
            let mq = MockSplitQueue::new(ram.memory(), 16);
            let mut queue: Queue = mq.create_queue().unwrap();
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            ram.memory()
                .write_slice(&header, GuestAddress(HEADER))
                .unwrap();
            mq.add_desc_chains(&chain, 0).unwrap();
            let result = block.process(0, &mut queue, ram.memory());
            assert!(result.is_ok(), "{what}: {result:?}");
            if block.counters().malformed > malformed {
                malformed = block.counters().malformed;
                assert_eq!(used_len(&ram, &mq, 0), 0, "{what}: nothing written");
            } else {
                // Some shapes are served as an error instead (the data part is short or
                // out of range); they must not have been written to the image.
                assert_eq!(block.counters().writes, 0, "{what}");
            }
            // And the device still serves a good request after it.
            let pattern = vec![0x5au8; 512];
            ram.memory()
                .write_slice(&pattern, GuestAddress(DATA))
                .unwrap();
            let mq = MockSplitQueue::new(ram.memory(), 16);
            let mut queue: Queue = mq.create_queue().unwrap();
            request(&ram, &mq, VIRTIO_BLK_T_IN, 0, 512);
            block.process(0, &mut queue, ram.memory()).unwrap();
            assert_eq!(status(&ram), VIRTIO_BLK_S_OK, "after {what}");
        }
        assert!(malformed >= 4, "malformed chains counted: {malformed}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever a driver writes into the descriptor table and header, the device answers
        /// every chain it takes, never panics, and never writes past the image.
        #[test]
        fn random_descriptor_tables_never_break_the_device(
            descriptors in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::prelude::Just(HEADER),
                        proptest::prelude::Just(DATA),
                        proptest::prelude::Just(STATUS),
                        0u64..(1 << 26),
                        proptest::prelude::any::<u64>(),
                    ],
                    proptest::prop_oneof![0u32..=1024, proptest::prelude::any::<u32>()],
                    0u16..8,
                    0u16..20,
                ),
                1..8,
            ),
            kind in proptest::prop_oneof![0u32..10, proptest::prelude::any::<u32>()],
            sector in proptest::prop_oneof![0u64..4096, proptest::prelude::any::<u64>()],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let ram = GuestRam::new(32 << 20).unwrap();
            let mut block = Block::new(image(dir.path(), false), "fuzz");
            let mq = MockSplitQueue::new(ram.memory(), 16);
            let mut queue: Queue = mq.create_queue().unwrap();
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            ram.memory().write_slice(&header, GuestAddress(HEADER)).unwrap();
            let raw: Vec<RawDescriptor> = descriptors
                .iter()
                .map(|&(addr, len, flags, next)| desc(addr, len, u32::from(flags), next))
                .collect();
            mq.add_desc_chains(&raw, 0).unwrap();
            let result = block.process(0, &mut queue, ram.memory());
            proptest::prop_assert!(result.is_ok(), "{:?}", result);
            proptest::prop_assert_eq!(block.image().size(), 1 << 20);
            proptest::prop_assert_eq!(
                std::fs::metadata(block.image().path()).unwrap().len(),
                1 << 20
            );
        }
    }

    #[test]
    fn config_space_and_features() {
        let dir = tempfile::tempdir().unwrap();
        let block = Block::new(image(dir.path(), false), "d");
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2048);
        let mut blk_size = [0u8; 4];
        block.read_config(20, &mut blk_size);
        assert_eq!(u32::from_le_bytes(blk_size), 512);
        let mut beyond = [0xffu8; 4];
        block.read_config(100, &mut beyond);
        assert_eq!(beyond, [0; 4]);
        assert_eq!(block.device_type(), 2);
        assert_ne!(block.features() & VIRTIO_F_VERSION_1, 0);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
