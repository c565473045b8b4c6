use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use super::HostTls;
use super::certs::{ClusterCa, LAB_VALIDITY_DAYS};
use super::socket::DataSocket;

fn hosts() -> Vec<String> {
    vec!["alpha".into(), "beta".into()]
}

fn identity(ca: &ClusterCa, name: &str, cert_for: &str, days: std::ops::Range<i64>) -> HostTls {
    ca.host_identity(name, cert_for, days, &hosts()).unwrap()
}

/// Runs a handshake between `client` dialling "beta" and `server`; returns both outcomes.
fn handshake(
    client: HostTls,
    server: HostTls,
) -> (Result<DataSocket, String>, Result<DataSocket, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        DataSocket::accept_tls(tcp, &server, Duration::from_secs(5)).map(|(s, _)| s)
    });
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let client =
        DataSocket::connect_tls(tcp, &client, "beta", Duration::from_secs(5)).map(|(s, _)| s);
    (client, accepting.join().unwrap())
}

#[test]
fn a_listed_host_with_a_cluster_certificate_gets_through_and_data_round_trips() {
    let ca = ClusterCa::generate("test").unwrap();
    let (client, server) = handshake(
        identity(&ca, "alpha", "alpha", LAB_VALIDITY_DAYS),
        identity(&ca, "beta", "beta", LAB_VALIDITY_DAYS),
    );
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    assert!(client.is_tls() && server.is_tls());
    // 8 MiB one way while the other way answers: one thread writes, another reads, on
    // clones of the same TLS socket.
    let payload: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    let expected = payload.clone();
    let mut client_reader = client.try_clone().unwrap();
    let writer = thread::spawn(move || {
        client.write_all(&payload).unwrap();
        client
    });
    let echo = thread::spawn(move || {
        let mut got = vec![0u8; expected.len()];
        let mut at = 0;
        while at < got.len() {
            match server.read(&mut got[at..]) {
                Ok(0) => panic!("closed early"),
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(got == expected, "the data arrived damaged");
        server.write_all(b"done").unwrap();
        server
    });
    let _client = writer.join().unwrap();
    let _server = echo.join().unwrap();
    let mut answer = [0u8; 4];
    let mut at = 0;
    while at < 4 {
        match client_reader.read(&mut answer[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&answer, b"done");
}

/// The error a client that finished its handshake meets on its first read.
fn after_handshake(client: Result<DataSocket, String>) -> String {
    let mut socket = match client {
        Err(error) => return error,
        Ok(socket) => socket,
    };
    let mut byte = [0u8; 1];
    loop {
        match socket.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return e.to_string(),
            Ok(n) => return format!("read {n} bytes instead of an error"),
        }
    }
}

#[test]
fn refusals_name_the_reason_on_both_sides() {
    let ca = ClusterCa::generate("test").unwrap();
    let other_ca = ClusterCa::generate("other").unwrap();
    let beta = || identity(&ca, "beta", "beta", LAB_VALIDITY_DAYS);

    // A host the server's cluster does not list, with a certificate of the right CA.
    let (client, server) = handshake(
        identity(&ca, "mallory", "mallory", LAB_VALIDITY_DAYS),
        beta(),
    );
    let server = server.unwrap_err();
    assert!(
        server.contains("names no host in this host's cluster"),
        "{server}"
    );
    // In TLS 1.3 the client's handshake ends before the server judges its certificate:
    // the refusal arrives as the first thing read.
    let client = after_handshake(client);
    assert!(
        client.contains("names no host in the peer's cluster"),
        "{client}"
    );

    // A certificate from another CA.
    let (client, server) = handshake(
        identity(&other_ca, "alpha", "alpha", LAB_VALIDITY_DAYS),
        beta(),
    );
    // The dialling host checks the server first, so it is the one to refuse.
    let client = client.err().unwrap();
    assert!(
        client.contains("not signed by this cluster's CA"),
        "{client}"
    );
    let server = server.unwrap_err();
    assert!(server.contains("does not trust the CA"), "{server}");

    // An expired certificate.
    let (client, server) = handshake(identity(&ca, "alpha", "alpha", -30..-1), beta());
    let server = server.unwrap_err();
    assert!(server.contains("certificate has expired"), "{server}");
    let client = after_handshake(client);
    assert!(
        client.contains("finds this host's certificate expired"),
        "{client}"
    );

    // The server's certificate is not for the host dialled.
    let (client, server) = handshake(
        identity(&ca, "alpha", "alpha", LAB_VALIDITY_DAYS),
        identity(&ca, "beta", "alpha", LAB_VALIDITY_DAYS),
    );
    let client = client.err().unwrap();
    assert!(
        client.contains("not for the host it was dialled as"),
        "{client}"
    );
    let server = server.err().unwrap();
    assert!(server.contains("refused this host"), "{server}");
}

#[test]
fn a_plaintext_client_is_refused() {
    let ca = ClusterCa::generate("test").unwrap();
    let server = identity(&ca, "beta", "beta", LAB_VALIDITY_DAYS);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        DataSocket::accept_tls(tcp, &server, Duration::from_secs(5)).map(|_| ())
    });
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.write_all(b"FERRY hello in the clear, not a TLS record\r\n")
        .unwrap();
    let error = accepting.join().unwrap().unwrap_err();
    assert!(error.contains("does not speak TLS"), "{error}");
}

#[test]
fn the_peer_identity_is_the_certificate_name() {
    let ca = ClusterCa::generate("test").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = identity(&ca, "beta", "beta", LAB_VALIDITY_DAYS);
    let accepting = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        DataSocket::accept_tls(tcp, &server, Duration::from_secs(5)).map(|(_, peer)| peer)
    });
    let client = identity(&ca, "alpha", "alpha", LAB_VALIDITY_DAYS);
    let tcp = TcpStream::connect(addr).unwrap();
    let (_socket, server_identity) =
        DataSocket::connect_tls(tcp, &client, "beta", Duration::from_secs(5)).unwrap();
    let client_identity = accepting.join().unwrap().unwrap();
    assert!(client_identity.is("alpha") && !client_identity.is("beta"));
    assert!(server_identity.is("beta") && !server_identity.is("alpha"));
    assert_eq!(client_identity.cipher, "tls1.3 aes-256-gcm");
}
