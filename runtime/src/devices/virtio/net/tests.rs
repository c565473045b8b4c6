//! The device against `virtio-queue`'s mock driver and an in-memory wire.

use std::collections::VecDeque;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::memory::GuestRam;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const BUF: u64 = 0x10_0000;
const BUF2: u64 = 0x11_0000;

/// Frames waiting to be received, and frames sent.
#[derive(Debug, Default)]
struct Wire {
    incoming: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

impl FrameIo for Wire {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.incoming.pop_front().map(|frame| {
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            frame.len()
        }))
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f
}

fn device() -> Net<Wire> {
    let mut net = Net::new(MAC, Wire::default());
    net.activate(net.features());
    net
}

fn used(ram: &GuestRam, queue: &MockSplitQueue<'_, GuestMemory>, slot: u64) -> (u32, u32) {
    let at = queue.used_addr().unchecked_add(4 + 8 * slot);
    let memory = ram.memory();
    (
        memory.read_obj::<u32>(at).unwrap(),
        memory.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
    )
}

fn used_idx(ram: &GuestRam, queue: &MockSplitQueue<'_, GuestMemory>) -> u16 {
    ram.memory()
        .read_obj::<u16>(queue.used_addr().unchecked_add(2))
        .unwrap()
}

/// Puts a header and `frame` at `BUF` and offers it on a fresh transmit queue as `chain`.
fn transmit(net: &mut Net<Wire>, ram: &GuestRam, payload: &[u8], chain: &[RawDescriptor]) -> u16 {
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes.extend_from_slice(payload);
    ram.memory().write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let mq = MockSplitQueue::new(ram.memory(), QUEUE_SIZE);
    let mut queue: Queue = mq.create_queue().unwrap();
    mq.add_desc_chains(chain, 0).unwrap();
    let result = net.process(TX_QUEUE, &mut queue, ram.memory());
    assert!(result.is_ok(), "{result:?}");
    used_idx(ram, &mq)
}

#[test]
fn a_frame_in_one_buffer_or_split_after_its_header_is_sent() {
    let ram = GuestRam::new(32 << 20).unwrap();
    let mut net = device();
    let f = frame(60, 1);
    transmit(&mut net, &ram, &f, &[desc(BUF, 72, 0, 0)]);
    transmit(
        &mut net,
        &ram,
        &f,
        &[
            desc(BUF, NET_HDR_LEN as u32, VRING_DESC_F_NEXT, 1),
            desc(BUF + NET_HDR_LEN as u64, 60, 0, 0),
        ],
    );
    let big = frame(MAX_FRAME, 2);
    transmit(
        &mut net,
        &ram,
        &big,
        &[desc(BUF, (NET_HDR_LEN + MAX_FRAME) as u32, 0, 0)],
    );
    assert_eq!(net.backend().sent, vec![f.clone(), f, big]);
    let c = net.counters();
    assert_eq!(
        (c.tx_frames, c.tx_bytes, c.malformed),
        (3, 60 + 60 + MAX_FRAME as u64, 0)
    );
}

#[test]
fn frames_are_received_one_per_buffer_and_one_waits_for_a_buffer() {
    let ram = GuestRam::new(32 << 20).unwrap();
    let mut net = device();
    net.backend_mut()
        .incoming
        .extend([frame(60, 3), frame(1000, 4), frame(70, 5)]);
    let mq = MockSplitQueue::new(ram.memory(), QUEUE_SIZE);
    let mut queue: Queue = mq.create_queue().unwrap();
    mq.add_desc_chains(&[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    assert!(net.process(RX_QUEUE, &mut queue, ram.memory()).unwrap());
    assert_eq!(used(&ram, &mq, 0), (0, (NET_HDR_LEN + 60) as u32));
    let mut header = [0u8; NET_HDR_LEN];
    ram.memory()
        .read_slice(&mut header, GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        header,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "num_buffers = 1"
    );
    let mut got = vec![0u8; 60];
    ram.memory()
        .read_slice(&mut got, GuestAddress(BUF + NET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, frame(60, 3));
    // The second frame found no buffer: it waits in the device, the third in the backend.
    assert_eq!(net.pending(), Some(frame(1000, 4)));
    assert!(!net.wants_frames());
    assert_eq!(net.backend().incoming.len(), 1);
    // Its state moves to another device, which delivers it first.
    let mut other = device();
    other.set_pending(net.pending().as_deref()).unwrap();
    other.backend_mut().incoming.push_back(frame(70, 5));
    let mq = MockSplitQueue::new(ram.memory(), QUEUE_SIZE);
    let mut queue: Queue = mq.create_queue().unwrap();
    mq.add_desc_chains(
        &[
            desc(BUF, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(BUF + 512, 1536, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    other.process(RX_QUEUE, &mut queue, ram.memory()).unwrap();
    assert_eq!(used(&ram, &mq, 0).1, (NET_HDR_LEN + 1000) as u32);
    assert_eq!(other.pending(), Some(frame(70, 5)));
    assert!(other.set_pending(Some(&[0u8; 3])).is_err(), "not a frame");
    assert!(other.set_pending(Some(&vec![0u8; MAX_FRAME + 1])).is_err());
}

/// Every malformed transmit chain goes back to the driver unsent, is counted, and the device
/// sends the next good frame.
#[test]
fn malformed_transmit_chains_are_returned_unsent_never_a_panic() {
    let ram = GuestRam::new(32 << 20).unwrap();
    let mut net = device();
    let outside = 1u64 << 40;
    let long: Vec<RawDescriptor> = (0..=MAX_CHAIN as u16)
        .map(|i| desc(BUF + u64::from(i), 1, VRING_DESC_F_NEXT, i + 1))
        .chain([desc(BUF, 60, 0, 0)])
        .collect();
    let oversize = frame(MAX_FRAME + 1, 6);
    let cases: Vec<(&str, Vec<u8>, Vec<RawDescriptor>)> = vec![
        (
            "a buffer outside guest memory",
            frame(60, 1),
            vec![desc(outside, 72, 0, 0)],
        ),
        (
            "a frame part outside guest memory",
            frame(60, 1),
            vec![desc(BUF, 12, VRING_DESC_F_NEXT, 1), desc(outside, 60, 0, 0)],
        ),
        (
            "a chain that loops",
            frame(60, 1),
            vec![
                desc(BUF, 12, VRING_DESC_F_NEXT, 1),
                desc(BUF2, 60, VRING_DESC_F_NEXT, 0),
            ],
        ),
        ("a chain of more than 64 descriptors", frame(60, 1), long),
        (
            "a frame larger than the MTU allows",
            oversize.clone(),
            vec![desc(BUF, (NET_HDR_LEN + oversize.len()) as u32, 0, 0)],
        ),
        (
            "a header and no frame",
            Vec::new(),
            vec![desc(BUF, 12, 0, 0)],
        ),
        ("a header cut short", Vec::new(), vec![desc(BUF, 8, 0, 0)]),
        (
            "lengths that overflow",
            frame(60, 1),
            vec![
                desc(BUF, u32::MAX, VRING_DESC_F_NEXT, 1),
                desc(BUF, u32::MAX, 0, 0),
            ],
        ),
        (
            "a next index past the table",
            frame(60, 1),
            vec![desc(BUF, 12, VRING_DESC_F_NEXT, 999)],
        ),
    ];
    let mut malformed = 0;
    for (what, payload, chain) in cases {
        let used = transmit(&mut net, &ram, &payload, &chain);
        assert_eq!(used, 1, "{what}: the chain goes back to the driver");
        assert!(net.backend().sent.is_empty(), "{what}: nothing sent");
        assert_eq!(net.counters().malformed, malformed + 1, "{what}: counted");
        malformed += 1;
        let good = frame(60, 9);
        transmit(&mut net, &ram, &good, &[desc(BUF, 72, 0, 0)]);
        assert_eq!(net.backend_mut().sent.pop(), Some(good), "after {what}");
    }
    // A header asking for an offload that was never offered.
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    bytes.extend_from_slice(&frame(60, 1));
    ram.memory().write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let mq = MockSplitQueue::new(ram.memory(), QUEUE_SIZE);
    let mut queue: Queue = mq.create_queue().unwrap();
    mq.add_desc_chains(&[desc(BUF, 72, 0, 0)], 0).unwrap();
    net.process(TX_QUEUE, &mut queue, ram.memory()).unwrap();
    assert!(net.backend().sent.is_empty());
    assert_eq!(net.counters().malformed, malformed + 1);
}

/// Malformed receive buffers go back empty; the frame waits for a good buffer; a frame too big
/// for the VM's MTU is dropped and counted.
#[test]
fn malformed_receive_buffers_and_oversized_frames_never_break_the_device() {
    let ram = GuestRam::new(32 << 20).unwrap();
    let mut net = device();
    net.backend_mut()
        .incoming
        .extend([frame(MAX_FRAME + 100, 7), frame(1400, 8)]);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "a buffer too small",
            vec![desc(BUF, 100, VRING_DESC_F_WRITE, 0)],
        ),
        ("a read-only buffer", vec![desc(BUF, 2048, 0, 0)]),
        (
            "a buffer outside guest memory",
            vec![desc(1 << 40, 2048, VRING_DESC_F_WRITE, 0)],
        ),
        (
            "a chain that loops",
            vec![
                desc(BUF, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(BUF2, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
            ],
        ),
    ];
    for (index, (what, chain)) in cases.into_iter().enumerate() {
        let mq = MockSplitQueue::new(ram.memory(), QUEUE_SIZE);
        let mut queue: Queue = mq.create_queue().unwrap();
        mq.add_desc_chains(&chain, 0).unwrap();
        let result = net.process(RX_QUEUE, &mut queue, ram.memory());
        assert!(result.is_ok(), "{what}: {result:?}");
        assert_eq!(
            used(&ram, &mq, 0),
            (0, 0),
            "{what}: returned with nothing written"
        );
        assert_eq!(net.counters().malformed, index as u64 + 1, "{what}");
        assert_eq!(
            net.pending(),
            Some(frame(1400, 8)),
            "{what}: the frame waits"
        );
    }
    assert_eq!(net.counters().rx_dropped, 1, "the oversized frame");
    let mq = MockSplitQueue::new(ram.memory(), QUEUE_SIZE);
    let mut queue: Queue = mq.create_queue().unwrap();
    mq.add_desc_chains(&[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    net.process(RX_QUEUE, &mut queue, ram.memory()).unwrap();
    assert_eq!(used(&ram, &mq, 0), (0, (NET_HDR_LEN + 1400) as u32));
    assert_eq!(net.counters().rx_frames, 1);
}

#[test]
fn config_space_has_the_mac_link_up_and_the_mtu() {
    let net = device();
    let mut config = [0u8; 12];
    net.read_config(0, &mut config);
    assert_eq!(&config[0..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), MTU);
    let mut beyond = [0xffu8; 4];
    net.read_config(64, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Whatever a driver writes into the descriptor tables, the device answers every chain it
    /// takes, never panics, and never sends or delivers more than a frame the MTU allows.
    #[test]
    fn random_descriptor_tables_never_break_the_device(
        descriptors in proptest::collection::vec(
            (
                proptest::prop_oneof![
                    proptest::prelude::Just(BUF),
                    proptest::prelude::Just(BUF2),
                    0u64..(1 << 26),
                    proptest::prelude::any::<u64>(),
                ],
                proptest::prop_oneof![0u32..=2048, proptest::prelude::any::<u32>()],
                0u16..8,
                0u16..20,
            ),
            1..12,
        ),
        frame_len in 0usize..2000,
    ) {
        let ram = GuestRam::new(32 << 20).unwrap();
        let raw: Vec<RawDescriptor> = descriptors
            .iter()
            .map(|&(addr, len, flags, next)| desc(addr, len, u32::from(flags), next))
            .collect();
        for index in [RX_QUEUE, TX_QUEUE] {
            let mut net = device();
            net.backend_mut().incoming.push_back(vec![0x11; frame_len]);
            let mq = MockSplitQueue::new(ram.memory(), 16);
            let mut queue: Queue = mq.create_queue().unwrap();
            mq.add_desc_chains(&raw, 0).unwrap();
            let result = net.process(index, &mut queue, ram.memory());
            proptest::prop_assert!(result.is_ok(), "{:?}", result);
            for sent in &net.backend().sent {
                proptest::prop_assert!((MIN_FRAME..=MAX_FRAME).contains(&sent.len()));
            }
            let delivered = net.counters().rx_bytes;
            proptest::prop_assert!(delivered <= MAX_FRAME as u64);
        }
    }
}
