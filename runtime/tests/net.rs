//! The `net` guest on a real virtio-net device, on a TAP on a Linux bridge, in a network
//! namespace of its own: it talks to a peer on the same bridge with nothing lost or reordered,
//! and its NIC's state moves to a new VM (a new TAP) at a moment the guest is busy talking,
//! with the conversation going on and the MAC announced through the new TAP.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_runtime::devices::NicSpec;
use ferry_runtime::guest::net::NetGuestView;
use ferry_runtime::guest::net_peer::{Peer, PeerStats, in_netns};
use ferry_runtime::{Boot, TestGuest, Vm, VmConfig};

const MIB: u64 = 1 << 20;

/// A namespace with bridge `br0` and a veth pair: `vb` on the bridge, `vp` for the peer.
struct Segment {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Segment {
    fn new(tag: &str) -> Segment {
        let name = format!("fyrt-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let n = name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n", n, "link", "add", "vb", "type", "veth", "peer", "name", "vp",
        ]);
        ip(&["-n", n, "link", "set", "vb", "master", "br0"]);
        for link in ["br0", "vb", "vp"] {
            ip(&["-n", n, "link", "set", link, "up"]);
        }
        Segment { name }
    }

    /// The bridge's forwarding entry for `mac`: the port it was learned on.
    fn port_of(&self, mac: [u8; 6]) -> Option<String> {
        let mac = format_mac(mac);
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "bridge", "fdb", "show", "br", "br0",
            ])
            .output()
            .expect("running bridge");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&mac))
            .and_then(|l| {
                let mut words = l.split_whitespace();
                words.find(|&w| w == "dev")?;
                words.next().map(str::to_string)
            })
    }

    fn links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show"])
            .output()
            .expect("running ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn nic(mac: [u8; 6], attach: bool) -> NicSpec {
    NicSpec {
        network: "vmnet".into(),
        bridge: "br0".into(),
        mac,
        ip: None,
        attach,
    }
}

/// Builds and starts the `net` guest's VM inside the segment's namespace.
fn start_vm(segment: &Segment, frames_per_sec: u64) -> Vm {
    let mut config = VmConfig::new("talker", 1, 16 * MIB);
    let mac = config.identity.mac;
    config.nics.push(nic(mac, true));
    in_netns(Some(&segment.name), move || {
        let boot = Boot::Guest(TestGuest::Net { frames_per_sec });
        let mut vm = Vm::create(&config, &boot, &[]).map_err(std::io::Error::other)?;
        vm.resume().map_err(std::io::Error::other)?;
        Ok(vm)
    })
    .expect("creating the VM in the namespace")
}

fn wait_for(peer: &Peer, what: &str, done: impl Fn(&PeerStats) -> bool) -> PeerStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = peer.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_in_order(stats: &PeerStats) {
    assert_eq!(
        stats.data_reorders, 0,
        "DATA frames out of order: {stats:?}"
    );
    assert_eq!(stats.reply_reorders, 0, "replies out of order: {stats:?}");
}

#[test]
fn the_net_guest_talks_to_a_peer_on_its_bridge_in_order_and_answers_every_request() {
    let segment = Segment::new("talk");
    let vm = start_vm(&segment, 200);
    let mac = vm.identity().mac;
    let peer = Peer::start(Some(&segment.name), "vp", mac, 100).unwrap();
    let stats = wait_for(&peer, "100 DATA frames and 50 replies", |s| {
        s.data >= 100 && s.replies >= 50
    });
    assert_in_order(&stats);
    let stats = peer.stop();
    assert_in_order(&stats);
    // Nothing is lost on one bridge: the gaps are only requests still in flight at the stop.
    assert_eq!(stats.data_missing, 0, "{stats:?}");
    assert_eq!(stats.replies_missing, 0, "{stats:?}");
    let view = NetGuestView::read(vm.ram()).unwrap();
    assert_eq!(
        view.mac, mac,
        "the guest reads the VM's MAC from its device"
    );
    assert!(view.sent > stats.last_data.unwrap(), "{view:?} {stats:?}");
    assert!(view.answered >= stats.replies, "{view:?} {stats:?}");
    let info = &vm.nics()[0];
    assert!(info.attached && info.tap.starts_with("fytap"), "{info:?}");
    assert_eq!(info.counters.malformed, 0, "{info:?}");
    assert!(info.counters.tx_frames >= view.sent, "{info:?} {view:?}");
    assert_eq!(
        segment.port_of(mac).as_deref(),
        Some(info.tap.as_str()),
        "the bridge learned the MAC on the VM's TAP"
    );
    let state = vm.test_device().state();
    assert_eq!(state.failure_count, 0, "{:?}", state.failures);
    assert!(
        state.exits.is_empty(),
        "the guest stopped: {:?}",
        state.exits
    );
}

/// A copy of `source` (paused) in a new VM whose NIC is a new TAP, attached to the bridge
/// only once the state is in, as a migration's destination does.
fn move_vm(segment: &Segment, source: &mut Vm) -> Vm {
    source.pause().unwrap();
    let state = source.capture_state().unwrap();
    let identity = source.identity().clone();
    let shape = source.shape().clone();
    let boot = source.boot_description().to_string();
    let spec = nic(identity.mac, false);
    let target = in_netns(Some(&segment.name), move || {
        Vm::create_empty(
            &identity,
            &shape,
            &boot,
            ferry_runtime::DirtyLogMode::Bitmap,
            None,
            &[],
            &[spec],
        )
        .map_err(std::io::Error::other)
    })
    .expect("creating the target VM");
    assert!(
        !target.nics()[0].attached,
        "the target's TAP waits for the state"
    );
    common::copy_memory(source.ram(), target.ram());
    // The bridge is in the namespace: so is the socket the attaching ioctl goes through.
    in_netns(Some(&segment.name), move || {
        let mut target = target;
        target
            .restore_state(&state)
            .map_err(std::io::Error::other)?;
        target.attach_nics().map_err(std::io::Error::other)?;
        Ok(target)
    })
    .expect("restoring the target")
}

#[test]
fn the_nic_moves_to_a_new_tap_mid_conversation_and_the_talk_goes_on_in_order() {
    let segment = Segment::new("move");
    let mut vm = start_vm(&segment, 500);
    let mac = vm.identity().mac;
    let peer = Arc::new(Peer::start(Some(&segment.name), "vp", mac, 500).unwrap());
    let mut total_lost = 0;
    for round in 0..3 {
        let before = wait_for(&peer, "traffic before the move", |s| {
            s.data >= 50 * (round + 1) && s.replies >= 50 * (round + 1)
        });
        let old_tap = vm.nics()[0].tap.clone();
        let mut target = move_vm(&segment, &mut vm);
        drop(std::mem::replace(&mut vm, {
            target.resume().unwrap();
            target
        }));
        let new_tap = vm.nics()[0].tap.clone();
        assert_ne!(old_tap, new_tap);
        let after = wait_for(&peer, "traffic after the move", |s| {
            s.data >= before.data + 50 && s.replies >= before.replies + 50
        });
        assert_in_order(&after);
        assert!(
            after.announces > before.announces,
            "the moved NIC announced its MAC: {after:?}"
        );
        assert!(
            !segment.links().contains(&format!("{old_tap}:")),
            "the old TAP went with its VM"
        );
        assert_eq!(
            segment.port_of(mac).as_deref(),
            Some(new_tap.as_str()),
            "the bridge has the MAC on the new TAP"
        );
        // The guest never stops sending; the only DATA frames that can be lost are none (the
        // device sends synchronously), and requests lost are those the old TAP held.
        assert_eq!(after.data_missing, 0, "{after:?}");
        total_lost = after.replies_missing;
        assert_eq!(vm.nics()[0].counters.malformed, 0);
    }
    let view = NetGuestView::read(vm.ram()).unwrap();
    assert_eq!(view.mac, mac);
    let state = vm.test_device().state();
    assert_eq!(state.failure_count, 0, "{:?}", state.failures);
    eprintln!("requests lost over three moves: {total_lost}");
}

/// The worst moment for a NIC: the guest has posted a frame the device has not sent yet when
/// it is paused. The frame is in the ring the state carries, so the new NIC sends it, once:
/// the peer sees every numbered frame, none twice, none out of order.
#[test]
fn a_frame_posted_but_not_sent_at_the_pause_is_sent_once_by_the_new_nic() {
    use ferry_runtime::guest::net::area;
    use ferry_runtime::layout::DATA_START;
    let segment = Segment::new("held");
    let mut vm = start_vm(&segment, 500);
    let mac = vm.identity().mac;
    let peer = Peer::start(Some(&segment.name), "vp", mac, 200).unwrap();
    let before = wait_for(&peer, "traffic", |s| s.data >= 50 && s.replies >= 20);
    // The NIC stops moving frames while the vCPU runs on: the guest's next frame waits in
    // its transmit ring, the guest spinning until it is used.
    vm.hold_device_io();
    let ring_index = |vm: &Vm, at: u64| {
        let mut idx = [0u8; 2];
        vm.ram().read(DATA_START + at + 2, &mut idx).unwrap();
        u16::from_le_bytes(idx)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ring_index(&vm, area::TX_AVAIL) == ring_index(&vm, area::TX_USED) {
        assert!(Instant::now() < deadline, "the guest posted no frame");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let held = peer.stats();
    let sent_before = NetGuestView::read(vm.ram()).unwrap().sent;
    let mut target = move_vm(&segment, &mut vm);
    assert_ne!(
        ring_index(&target, area::TX_AVAIL),
        ring_index(&target, area::TX_USED),
        "the frame was still unsent at the pause"
    );
    drop(std::mem::replace(&mut vm, {
        target.resume().unwrap();
        target
    }));
    let after = wait_for(&peer, "traffic after the move", |s| {
        s.data >= held.data + 50 && s.replies >= held.replies + 20
    });
    assert_in_order(&after);
    assert_eq!(
        after.data_missing, 0,
        "every numbered frame arrived: {after:?}"
    );
    assert!(
        held.last_data < Some(sent_before),
        "the held frame was not out before the move"
    );
    assert!(after.data > before.data);
    let state = vm.test_device().state();
    assert_eq!(state.failure_count, 0, "{:?}", state.failures);
}
