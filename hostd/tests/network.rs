//! A VM's NIC on real bridges, between real hostd processes: each host in a network namespace
//! of its own with a bridge, the two bridges joined by a veth link, and a peer in a third
//! namespace on that segment talking to the `net` guest while it migrates. Needs /dev/kvm and
//! root.

use std::path::Path;
use std::time::Duration;

use ferry_runtime::guest::net_peer::{Peer, PeerStats};
use ferry_tests::{HostSpec, TestCluster, VM_BRIDGE, VmNetwork};
use serde_json::Value;

/// Echo requests the peer sends a second.
const REQUESTS_PER_SEC: u64 = 200;

fn cluster(beta: HostSpec) -> (TestCluster, VmNetwork) {
    let cluster = TestCluster::with_vm_network(
        Path::new(env!("CARGO_BIN_EXE_hostd")),
        Path::new(env!("CARGO_BIN_EXE_ferryctl")),
        [HostSpec::new("alpha"), beta],
    );
    let net = cluster
        .netns()
        .and_then(|n| n.vm_network.clone())
        .expect("the VM network");
    (cluster, net)
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// Creates the `net` guest on alpha and starts the peer; returns the VM's MAC and the peer.
fn talker(cluster: &TestCluster, net: &VmNetwork) -> (String, Peer) {
    let created = cluster
        .ferryctl_ok(&[
            "vm", "create", "talker", "--host", "alpha", "--guest", "net", "--memory", "64M",
            "--rate", "100", "--json",
        ])
        .json();
    let mac = created["mac"].as_str().expect("mac").to_string();
    let peer = Peer::start(
        Some(&net.peer_ns),
        &net.peer_interface,
        mac_bytes(&mac),
        REQUESTS_PER_SEC,
    )
    .expect("starting the peer");
    (mac, peer)
}

fn nic(cluster: &TestCluster) -> Value {
    let vm = cluster.vm("talker").expect("the VM");
    vm["nics"][0].clone()
}

/// Waits until the conversation has moved on by `frames` both ways since `since`.
fn talk_on(cluster: &TestCluster, peer: &Peer, since: &PeerStats, frames: u64) -> PeerStats {
    cluster.wait_for("the conversation to go on", Duration::from_secs(60), |_| {
        let now = peer.stats();
        now.data >= since.data + frames && now.replies >= since.replies + frames
    });
    peer.stats()
}

fn assert_in_order(stats: &PeerStats) {
    assert_eq!(
        stats.data_reorders, 0,
        "numbered frames out of order: {stats:?}"
    );
    assert_eq!(stats.reply_reorders, 0, "replies out of order: {stats:?}");
}

/// Waits until host `host` has no TAP of Ferry's left but `keep`.
fn wait_for_taps(cluster: &TestCluster, net: &VmNetwork, host: usize, keep: Option<&str>) {
    cluster.wait_for("the TAPs to settle", Duration::from_secs(20), |_| {
        let taps = net.taps(host);
        match keep {
            None => taps.is_empty(),
            Some(tap) => taps == vec![(tap.to_string(), Some(VM_BRIDGE.to_string()))],
        }
    });
}

#[test]
fn the_net_guest_keeps_talking_across_two_moves_with_its_mac_on_each_new_port() {
    let (cluster, net) = cluster(HostSpec::new("beta"));
    let (mac, peer) = talker(&cluster, &net);
    let mut stats = talk_on(&cluster, &peer, &PeerStats::default(), 50);
    let first = nic(&cluster);
    assert_eq!(first["network"], "vmnet");
    assert_eq!(first["bridge"], VM_BRIDGE);
    assert_eq!(first["attached"], true);
    let tap = first["tap"].as_str().expect("tap").to_string();
    assert_eq!(net.port_of(0, &mac).as_deref(), Some(tap.as_str()));
    wait_for_taps(&cluster, &net, 0, Some(&tap));

    for (to, to_host, from_host) in [("beta", 1, 0), ("alpha", 0, 1)] {
        let before = stats.clone();
        let result = cluster.ferryctl(&["migrate", "talker", "--to", to, "--json"]);
        let report = result.json();
        assert_eq!(report["status"], "completed", "{report:#}");
        stats = talk_on(&cluster, &peer, &before, 50);
        assert_in_order(&stats);

        let vm = cluster.vm("talker").expect("the VM");
        assert_eq!(vm["host"], to);
        assert_eq!(vm["mac"], mac.as_str(), "the MAC moves unchanged");
        let arrived = &vm["nics"][0];
        let tap = arrived["tap"].as_str().expect("tap").to_string();
        assert_eq!(arrived["attached"], true, "{arrived:#}");
        assert_eq!(
            arrived["mac"],
            mac.as_str(),
            "the NIC's MAC moves unchanged"
        );
        assert!(
            arrived["counters"]["announced"].as_u64() >= Some(1),
            "{arrived:#}"
        );
        assert_eq!(arrived["counters"]["malformed"], 0, "{arrived:#}");

        // The announce went out through the VM's own TAP: the peer saw it, and the
        // bridges learned the MAC's new port.
        assert!(
            stats.announces > before.announces,
            "no RARP from the VM reached the peer: {stats:?}"
        );
        assert_eq!(
            net.port_of(to_host, &mac).as_deref(),
            Some(tap.as_str()),
            "{to}'s bridge has the MAC on the VM's TAP"
        );
        assert_eq!(
            net.port_of(from_host, &mac).as_deref(),
            Some(net.uplinks[from_host].as_str()),
            "the old host's bridge has the MAC on its link toward {to}"
        );
        wait_for_taps(&cluster, &net, from_host, None);
        wait_for_taps(&cluster, &net, to_host, Some(&tap));

        // The guest's numbered frames: none lost (the device sends synchronously and the
        // source's queue of them is empty at the pause). The peer's requests: only those
        // that reached the source's TAP while the guest was paused, bounded by the rate
        // over the downtime, with a margin for scheduling on a loaded machine.
        assert_eq!(stats.data_missing, before.data_missing, "{stats:?}");
        let lost = stats.replies_missing - before.replies_missing;
        let downtime_ms = report["downtime_ms"].as_f64().expect("downtime");
        let bound = (REQUESTS_PER_SEC as f64 * (downtime_ms + 500.0) / 1000.0).ceil() as u64 + 5;
        eprintln!(
            "move to {to}: downtime {downtime_ms:.1} ms, {lost} of the peer's requests lost (bound {bound}), announces seen {}",
            stats.announces - before.announces
        );
        assert!(
            lost <= bound,
            "{lost} requests lost over a {downtime_ms} ms downtime (bound {bound})"
        );
    }
    let stats = peer.stop();
    assert_in_order(&stats);
    let vm = cluster.vm("talker").expect("the VM");
    assert_eq!(vm["guest_failures"], 0, "{vm:#}");
}

#[test]
fn a_migration_that_fails_after_the_destination_joined_its_bridge_leaves_the_talk_on_the_source() {
    let (cluster, net) = cluster(HostSpec::new("beta").fault("fail-after-load"));
    let (mac, peer) = talker(&cluster, &net);
    let before = talk_on(&cluster, &peer, &PeerStats::default(), 50);
    let tap = nic(&cluster)["tap"].as_str().expect("tap").to_string();

    let result = cluster.ferryctl(&["migrate", "talker", "--to", "beta", "--json"]);
    assert_eq!(result.code, Some(1), "{result:?}");
    let report = result.json();
    assert_eq!(report["status"], "rolled_back", "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("after loading the state")),
        "{report:#}"
    );

    let stats = talk_on(&cluster, &peer, &before, 50);
    assert_in_order(&stats);
    let vm = cluster.vm("talker").expect("the VM");
    assert_eq!(vm["host"], "alpha");
    assert_eq!(vm["state"], "running");
    assert_eq!(
        vm["nics"][0]["tap"],
        tap.as_str(),
        "the source kept its TAP"
    );
    assert_eq!(vm["nics"][0]["attached"], true);
    assert_eq!(
        vm["nics"][0]["counters"]["announced"], 0,
        "nothing moved: nothing to announce"
    );
    wait_for_taps(&cluster, &net, 0, Some(&tap));
    wait_for_taps(&cluster, &net, 1, None);
    assert_eq!(net.port_of(0, &mac).as_deref(), Some(tap.as_str()));
    assert_eq!(stats.data_missing, 0, "{stats:?}");
}

#[test]
fn a_host_whose_network_has_no_bridge_is_refused_before_anything_moves() {
    let (cluster, net) = cluster(HostSpec::new("beta").no_bridge());
    let shown = |host: &str| cluster.ferryctl_ok(&["host", "show", host]).json()["bridges"].clone();
    assert_eq!(shown("alpha")["vmnet"], VM_BRIDGE);
    assert!(shown("beta")["vmnet"].is_null(), "{}", shown("beta"));
    let (_, peer) = talker(&cluster, &net);
    let before = talk_on(&cluster, &peer, &PeerStats::default(), 20);
    let result = cluster.ferryctl(&["migrate", "talker", "--to", "beta", "--json"]);
    assert_eq!(result.code, Some(1), "{result:?}");
    let report = result.json();
    assert_eq!(report["status"], "refused", "{report:#}");
    let error = report["error"].as_str().unwrap_or("");
    assert!(
        error.contains("no bridge") && error.contains("vmnet") && error.contains("beta"),
        "{error}"
    );
    assert_eq!(
        report["downtime_ms"], 0.0,
        "the guest never stopped: {report:#}"
    );
    let stats = talk_on(&cluster, &peer, &before, 20);
    assert_in_order(&stats);
    assert_eq!(stats.replies_missing, before.replies_missing, "{stats:?}");
    wait_for_taps(&cluster, &net, 1, None);
    assert_eq!(cluster.vm("talker").expect("the VM")["host"], "alpha");
}

/// hostd is not on the data path: killed while the guest talks, it takes nothing with it (the
/// VMM keeps its TAP on the bridge), and the restarted hostd finds the NIC and moves the VM.
#[test]
fn the_talk_survives_a_hostd_kill_and_the_restarted_hostd_moves_the_vm() {
    let (mut cluster, net) = cluster(HostSpec::new("beta"));
    let (mac, peer) = talker(&cluster, &net);
    let before = talk_on(&cluster, &peer, &PeerStats::default(), 20);
    let tap = nic(&cluster)["tap"].as_str().expect("tap").to_string();
    cluster.kill("alpha");
    // hostd is gone; the VM talks on through the same TAP.
    let during = talk_on(&cluster, &peer, &before, 50);
    assert_eq!(during.data_missing, 0, "{during:?}");
    assert_eq!(during.replies_missing, before.replies_missing, "{during:?}");
    wait_for_taps(&cluster, &net, 0, Some(&tap));
    cluster.restart("alpha");
    let found = nic(&cluster);
    assert_eq!(found["tap"], tap.as_str(), "{found:#}");
    assert_eq!(found["mac"], mac.as_str());
    let result = cluster.ferryctl(&["migrate", "talker", "--to", "beta", "--json"]);
    let report = result.json();
    assert_eq!(report["status"], "completed", "{report:#}");
    let after = talk_on(&cluster, &peer, &during, 50);
    assert_in_order(&after);
    assert_eq!(after.data_missing, 0, "{after:?}");
    assert!(after.announces > during.announces, "{after:?}");
    wait_for_taps(&cluster, &net, 0, None);
}

/// A NIC takes a virtio slot: eight disks and a NIC are one device too many, refused before
/// any image is made.
#[test]
fn a_vm_asking_for_more_virtio_devices_than_slots_is_refused_before_any_image_is_made() {
    let (cluster, _net) = cluster(HostSpec::new("beta"));
    let mut args: Vec<String> = [
        "vm", "create", "crowded", "--host", "alpha", "--guest", "counter",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..8 {
        args.push("--disk".into());
        args.push(format!("shared:crowded{i}.raw,size=1M"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = cluster.ferryctl(&args);
    assert_eq!(result.code, Some(2), "{result:?}");
    assert!(
        result.stderr.contains("at most 8 virtio devices")
            && result
                .stderr
                .contains("8 disks and a NIC on network 'vmnet'"),
        "{result:?}"
    );
    let made: Vec<_> = std::fs::read_dir(cluster.dir().join("shared"))
        .map(|dir| dir.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !made
            .iter()
            .any(|f| f.to_string_lossy().starts_with("crowded")),
        "{made:?}"
    );
    assert!(cluster.vm("crowded").is_none());
}
