//! Data streams under mutual TLS: pages arrive intact, nothing of them crosses the wire in
//! the clear, a damaged record fails the transfer, and only the expected host gets in.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Content, Fault, Proxy, content, quick_timeouts, within};
use ferry_transport::data::{
    CompressionPolicy, DataListener, DataReceiver, DataSender, ReceiverConfig, SenderConfig,
    SessionId,
};
use ferry_transport::memory::{PAGE_SIZE, PageRange, VecMemory};
use ferry_transport::tls::HostTls;
use ferry_transport::tls::certs::{ClusterCa, LAB_VALIDITY_DAYS};
use ferry_transport::workers::WorkerPlacement;

fn identity(ca: &ClusterCa, name: &str) -> HostTls {
    let hosts = ["alpha", "beta", "gamma"].map(String::from);
    ca.host_identity(name, name, LAB_VALIDITY_DAYS, &hosts)
        .unwrap()
}

/// Sends `data` to beta, which expects alpha, through a recording proxy; returns the sink,
/// the sender's result, the bytes captured and the receiver's error.
fn send_through_proxy(
    data: &[u8],
    (sender_tls, receiver_tls): (Option<HostTls>, Option<HostTls>),
    fault: Fault,
    streams: usize,
) -> (Arc<VecMemory>, Result<(), String>, Vec<u8>, Option<String>) {
    let pages = (data.len() / PAGE_SIZE) as u64;
    let source = Arc::new(VecMemory::from_bytes(0, data).unwrap());
    let sink = Arc::new(VecMemory::new(0, pages));
    let session = SessionId::random();
    let listener = DataListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let proxy = Proxy::start(listener.local_addr(), fault);
    let mut receiving = ReceiverConfig::new(session, WorkerPlacement::unpinned(streams));
    let mut sending = SenderConfig::new(session, WorkerPlacement::unpinned(streams));
    receiving.timeouts = quick_timeouts();
    sending.timeouts = quick_timeouts();
    // Raw pages, so the check below cannot pass thanks to compression.
    sending.compression = CompressionPolicy::None;
    receiving.tls = receiver_tls.map(|tls| (tls, "alpha".to_string()));
    sending.tls = sender_tls.map(|tls| (tls, "beta".to_string()));
    let receiver = DataReceiver::start(listener, Arc::clone(&sink), receiving).unwrap();
    let result = (|| {
        let mut sender = DataSender::connect(&[proxy.addr], source, sending)
            .map_err(|e| ferry_transport::report(&e))?;
        sender
            .send(&[PageRange::new(0, pages)])
            .map_err(|e| ferry_transport::report(&e))?;
        sender.flush().map_err(|e| ferry_transport::report(&e))?;
        sender.finish().map_err(|e| ferry_transport::report(&e))?;
        Ok(())
    })();
    let received = receiver.wait();
    if result.is_ok() {
        received.as_ref().unwrap();
    }
    let captured = proxy.capture.lock().unwrap().clone();
    let receiver_error = received.err().map(|e| ferry_transport::report(&e));
    (sink, result, captured, receiver_error)
}

fn both(ca: &ClusterCa, sender: &str) -> (Option<HostTls>, Option<HostTls>) {
    (Some(identity(ca, sender)), Some(identity(ca, "beta")))
}

/// Whether any 32-byte window at a 512-byte step of any page of `data` occurs in `wire`.
fn any_page_in_clear(data: &[u8], wire: &[u8]) -> bool {
    use std::collections::HashSet;
    let windows: HashSet<&[u8]> = data
        .chunks_exact(512)
        .map(|chunk| &chunk[..32])
        .filter(|w| w.iter().any(|&b| b != 0))
        .collect();
    wire.windows(32).any(|w| windows.contains(w))
}

#[test]
fn encrypted_pages_arrive_intact_and_never_cross_the_wire_in_the_clear() {
    within(Duration::from_secs(60), "encrypted transfer", || {
        let ca = ClusterCa::generate("test").unwrap();
        let data = content(512, Content::Mixed, 7);
        let (sink, result, wire, _) = send_through_proxy(&data, both(&ca, "alpha"), Fault::None, 2);
        result.unwrap();
        assert!(sink.to_vec() == data, "pages arrived damaged");
        assert!(
            wire.len() as u64 > 512 * PAGE_SIZE as u64 / 2,
            "captured too little"
        );
        assert!(
            !any_page_in_clear(&data, &wire),
            "guest content crossed the wire in the clear"
        );
        // The same check on a plain transfer finds the content: it can fail.
        let (_, result, wire, _) = send_through_proxy(&data, (None, None), Fault::None, 2);
        result.unwrap();
        assert!(any_page_in_clear(&data, &wire));
    });
}

#[test]
fn a_damaged_record_fails_the_transfer_instead_of_landing() {
    within(Duration::from_secs(60), "damaged record", || {
        let ca = ClusterCa::generate("test").unwrap();
        let data = content(256, Content::Random, 3);
        // Past the handshake, in the middle of the page records.
        let (sink, result, _, received) =
            send_through_proxy(&data, both(&ca, "alpha"), Fault::CorruptAt(200_000), 1);
        // The sender fails too, with the alert or with the reset that follows it.
        assert!(
            result.is_err(),
            "the transfer completed over a damaged record"
        );
        let received = received.expect("the receiver failed");
        assert!(received.contains("integrity check"), "{received}");
        // Nothing damaged landed: every page is as sent, or not there at all.
        let landed = sink.to_vec();
        for (i, (got, sent)) in landed
            .chunks_exact(PAGE_SIZE)
            .zip(data.chunks_exact(PAGE_SIZE))
            .enumerate()
        {
            assert!(
                got == sent || got.iter().all(|&b| b == 0),
                "page {i} arrived damaged"
            );
        }
    });
}

#[test]
fn only_the_source_host_may_open_data_streams() {
    within(Duration::from_secs(60), "wrong host", || {
        let ca = ClusterCa::generate("test").unwrap();
        let data = content(16, Content::Random, 5);
        // gamma is a host of the cluster, but this transfer comes from alpha.
        let (_, result, _, _) = send_through_proxy(&data, both(&ca, "gamma"), Fault::None, 1);
        let error = result.unwrap_err();
        assert!(
            error.contains("takes data streams from alpha only"),
            "{error}"
        );
        // A host of another cluster.
        let other = ClusterCa::generate("other").unwrap();
        let tls = (Some(identity(&other, "alpha")), Some(identity(&ca, "beta")));
        let (_, result, _, _) = send_through_proxy(&data, tls, Fault::None, 1);
        let error = result.unwrap_err();
        assert!(error.contains("not signed by this cluster's CA"), "{error}");
        // A plaintext sender on an encrypted transfer.
        let tls = (None, Some(identity(&ca, "beta")));
        let (sink, result, _, _) = send_through_proxy(&data, tls, Fault::None, 1);
        assert!(result.is_err());
        assert!(
            sink.to_vec().iter().all(|&b| b == 0),
            "a plaintext stream landed pages"
        );
    });
}
