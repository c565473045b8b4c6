//! The control channel's upgrade to mutual TLS, and every way it refuses a peer.

use std::time::Duration;

use ferry_transport::control::{ClientTls, ControlChannel, ControlConfig, ControlError};
use ferry_transport::report;
use ferry_transport::tls::HostTls;
use ferry_transport::tls::certs::{ClusterCa, LAB_VALIDITY_DAYS};
use tokio::net::TcpListener;

fn quick() -> ControlConfig {
    ControlConfig {
        handshake_timeout: Duration::from_secs(5),
        ..ControlConfig::default()
    }
}

fn identity(ca: &ClusterCa, name: &str, days: std::ops::Range<i64>) -> HostTls {
    let hosts = ["alpha", "beta"].map(String::from);
    ca.host_identity(name, name, days, &hosts).unwrap()
}

/// Connects `client` (dialling beta) to a server with `server`, sends one message and reads
/// it on the server; returns both sides' outcomes as the identity each proved, or the error.
async fn exchange(
    client: ClientTls,
    server: Option<HostTls>,
) -> (
    Result<Option<String>, String>,
    Result<Option<String>, String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut channel = ControlChannel::server_secure(stream, quick(), server.as_ref())
            .await
            .map_err(|e| report(&e))?;
        let who = channel.peer_identity().map(|p| {
            assert!(p.is("alpha") || !p.is("beta"));
            p.cipher.clone()
        });
        let _: String = channel.recv().await.map_err(|e| report(&e))?;
        channel
            .send(&"ok".to_string())
            .await
            .map_err(|e| report(&e))?;
        Ok::<_, String>(who)
    });
    let client = async {
        let mut channel = ControlChannel::connect_secure(addr, quick(), &client)
            .await
            .map_err(|e| report(&e))?;
        let who = channel.peer_identity().map(|p| {
            assert!(p.is("beta"));
            p.cipher.clone()
        });
        channel
            .send(&"hello".to_string())
            .await
            .map_err(|e| report(&e))?;
        let _: String = channel.recv().await.map_err(|e: ControlError| report(&e))?;
        Ok::<_, String>(who)
    }
    .await;
    (client, serving.await.unwrap())
}

fn tls(identity: Option<HostTls>, required: bool) -> ClientTls {
    ClientTls {
        identity,
        peer: "beta".into(),
        required,
    }
}

#[tokio::test]
async fn both_with_certificates_upgrade_and_know_each_other() {
    let ca = ClusterCa::generate("test").unwrap();
    let (client, server) = exchange(
        tls(Some(identity(&ca, "alpha", LAB_VALIDITY_DAYS)), true),
        Some(identity(&ca, "beta", LAB_VALIDITY_DAYS)),
    )
    .await;
    assert_eq!(client.unwrap().as_deref(), Some("tls1.3 aes-256-gcm"));
    assert_eq!(server.unwrap().as_deref(), Some("tls1.3 aes-256-gcm"));
}

#[tokio::test]
async fn a_plaintext_client_on_a_tls_control_port_is_refused_with_the_reason() {
    let ca = ClusterCa::generate("test").unwrap();
    let (client, server) = exchange(
        tls(None, false),
        Some(identity(&ca, "beta", LAB_VALIDITY_DAYS)),
    )
    .await;
    let (client, server) = (client.unwrap_err(), server.unwrap_err());
    assert!(client.contains("requires mutual TLS"), "{client}");
    assert!(server.contains("requires mutual TLS"), "{server}");
}

#[tokio::test]
async fn a_peer_without_a_certificate_fails_a_required_channel_and_passes_an_optional_one() {
    let ca = ClusterCa::generate("test").unwrap();
    let alpha = || Some(identity(&ca, "alpha", LAB_VALIDITY_DAYS));
    let (client, server) = exchange(tls(alpha(), true), None).await;
    let (client, server) = (client.unwrap_err(), server.unwrap_err());
    assert!(
        client.contains("beta has no TLS certificate configured"),
        "{client}"
    );
    assert!(
        server.contains("beta has no TLS certificate configured"),
        "{server}"
    );
    // Not required: in the clear, and neither side claims to know the other.
    let (client, server) = exchange(tls(alpha(), false), None).await;
    assert_eq!(client.unwrap(), None);
    assert_eq!(server.unwrap(), None);
    // A host without a certificate cannot require encryption at all.
    let addr = "127.0.0.1:9".parse().unwrap();
    let error = ControlChannel::connect_secure(addr, quick(), &tls(None, true))
        .await
        .unwrap_err();
    assert!(report(&error).contains("this host has no TLS certificate"));
}

#[tokio::test]
async fn refused_certificates_are_named_on_both_sides() {
    let ca = ClusterCa::generate("test").unwrap();
    let other = ClusterCa::generate("other").unwrap();
    let beta = || Some(identity(&ca, "beta", LAB_VALIDITY_DAYS));
    let cases = [
        (
            identity(&ca, "mallory", LAB_VALIDITY_DAYS),
            "names no host in the peer's cluster",
            "names no host in this host's cluster",
        ),
        (
            identity(&ca, "alpha", -30..-1),
            "finds this host's certificate expired",
            "certificate has expired",
        ),
        (
            identity(&other, "alpha", LAB_VALIDITY_DAYS),
            "not signed by this cluster's CA",
            "does not trust the CA",
        ),
    ];
    for (client_identity, on_client, on_server) in cases {
        let (client, server) = exchange(tls(Some(client_identity), true), beta()).await;
        let (client, server) = (client.unwrap_err(), server.unwrap_err());
        assert!(client.contains(on_client), "{client}");
        assert!(server.contains(on_server), "{server}");
    }
}

#[tokio::test]
async fn a_tls_peer_that_vanishes_reads_as_closed() {
    let ca = ClusterCa::generate("test").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = identity(&ca, "beta", LAB_VALIDITY_DAYS);
    let serving = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let channel = ControlChannel::server_secure(stream, quick(), Some(&server))
            .await
            .unwrap();
        // Dropped without close_notify, as a killed or faulty host does.
        drop(channel);
    });
    let mut channel = ControlChannel::connect_secure(
        addr,
        quick(),
        &tls(Some(identity(&ca, "alpha", LAB_VALIDITY_DAYS)), true),
    )
    .await
    .unwrap();
    serving.await.unwrap();
    let error = channel.recv::<String>().await.unwrap_err();
    assert!(
        matches!(error, ControlError::PeerClosed),
        "{}",
        report(&error)
    );
}
