//! The async control channel over loopback.

use std::time::Duration;

use ferry_transport::control::{ControlChannel, ControlConfig, ControlError};
use ferry_transport::negotiate::{self, Capabilities};
use ferry_transport::report;
use ferry_transport::wire::{self, ChannelKind, Hello, MessageType};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Stage {
    Negotiate(Box<Capabilities>),
    Prepare { memory_bytes: u64, vcpus: u8 },
    DeviceState(Vec<u8>),
    Commit,
}

fn quick() -> ControlConfig {
    ControlConfig {
        handshake_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_millis(50),
        idle_timeout: Duration::from_millis(400),
        send_timeout: Duration::from_millis(400),
        ..ControlConfig::default()
    }
}

async fn pair(config: ControlConfig) -> (ControlChannel, ControlChannel) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (server, client) = tokio::join!(
        ControlChannel::accept(&listener, config),
        ControlChannel::connect(addr, config)
    );
    (server.unwrap(), client.unwrap())
}

/// Fails the test instead of hanging it.
async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), future)
        .await
        .expect("control test hung")
}

#[tokio::test]
async fn messages_round_trip_in_both_directions() {
    bounded(async {
        let (mut server, mut client) = pair(quick()).await;
        assert_eq!(server.version(), 1);
        assert_eq!(client.version(), 1);
        let caps = Capabilities::without_rdma(vec!["127.0.0.1:4000".parse().unwrap()], 4);
        let messages = vec![
            Stage::Negotiate(Box::new(caps.clone())),
            Stage::Prepare {
                memory_bytes: 1 << 30,
                vcpus: 2,
            },
            // Large and compressible: travels lz4-compressed.
            Stage::DeviceState(vec![0xAB; 2 << 20]),
            // Large and incompressible: travels raw.
            Stage::DeviceState(
                (0..300_000u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            ),
            Stage::Commit,
        ];
        for message in &messages {
            client.send(message).await.unwrap();
            let got: Stage = server.recv().await.unwrap();
            assert_eq!(&got, message);
            server.send(&got).await.unwrap();
            assert_eq!(&client.recv::<Stage>().await.unwrap(), message);
        }
        // Both sides compute the same plan from exchanged capabilities.
        let plan = negotiate::choose(&caps, &caps).unwrap();
        client.send(&plan).await.unwrap();
        assert_eq!(server.recv::<negotiate::Plan>().await.unwrap(), plan);
    })
    .await;
}

#[tokio::test]
async fn keepalives_hold_an_idle_channel_open_and_split_halves_work() {
    bounded(async {
        let (server, mut client) = pair(quick()).await;
        let (sender, mut receiver, _keepalive) = server.into_split();
        // Idle for three idle timeouts: keepalives must keep both sides from giving up.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let receive = tokio::spawn(async move { receiver.recv::<String>().await });
        client.send("still there?").await.unwrap();
        assert_eq!(receive.await.unwrap().unwrap(), "still there?");
        sender.send(&7u64).await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(client.recv::<u64>().await.unwrap(), 7);
    })
    .await;
}

#[tokio::test]
async fn silent_peer_times_out() {
    bounded(async {
        // A peer that greets, then goes silent without closing (no keepalives).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut header = [0u8; wire::HEADER_LEN];
            socket.read_exact(&mut header).await.unwrap();
            let header = wire::Header::decode(&header, wire::MAX_PAYLOAD_LEN).unwrap();
            let mut payload = vec![0; header.payload_len as usize];
            socket.read_exact(&mut payload).await.unwrap();
            let mut welcome = Vec::new();
            wire::encode_frame(
                &mut welcome,
                1,
                MessageType::Welcome,
                0,
                &wire::encode_welcome(wire::Welcome { version: 1 }),
            )
            .unwrap();
            socket.write_all(&welcome).await.unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(socket);
        });
        let mut channel = ControlChannel::connect(addr, quick()).await.unwrap();
        let err = channel.recv::<u32>().await.unwrap_err();
        assert!(matches!(err, ControlError::Idle { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("nothing received on the control channel for 400ms")
        );
        peer.abort();
    })
    .await;
}

#[tokio::test]
async fn abandon_carries_the_reason_and_close_is_reported() {
    bounded(async {
        let (mut server, client) = pair(quick()).await;
        client.abandon("destination out of memory").await.unwrap();
        let err = server.recv::<u32>().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the peer abandoned the control channel: destination out of memory"
        );

        let (mut server, client) = pair(quick()).await;
        drop(client);
        let err = server.recv::<u32>().await.unwrap_err();
        assert!(matches!(err, ControlError::PeerClosed), "{err}");
    })
    .await;
}

#[tokio::test]
async fn wrong_message_type_is_a_decode_error() {
    bounded(async {
        let (mut server, client) = pair(quick()).await;
        client.send("not a number at all").await.unwrap();
        let err = server.recv::<Stage>().await.unwrap_err();
        assert!(
            report(&err).starts_with("cannot decode a control message as control::Stage"),
            "{}",
            report(&err)
        );
    })
    .await;
}

#[tokio::test]
async fn oversized_messages_are_refused_on_both_ends() {
    bounded(async {
        let config = ControlConfig {
            max_message_len: 1000,
            ..quick()
        };
        let (_server, client) = pair(config).await;
        let err = client.send(&vec![1u8; 5000]).await.unwrap_err();
        assert!(
            matches!(err, ControlError::MessageTooLarge { max: 1000, .. }),
            "{err}"
        );
        // A peer with a larger limit sends a frame this side refuses before buffering it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (strict, loose) = tokio::join!(
            ControlChannel::accept(&listener, config),
            ControlChannel::connect(addr, quick())
        );
        let (mut strict, loose) = (strict.unwrap(), loose.unwrap());
        let incompressible: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        loose.send(&incompressible).await.unwrap();
        let err = strict.recv::<Vec<u8>>().await.unwrap_err();
        assert!(
            report(&err).contains("exceeds the limit of 1000 bytes"),
            "{}",
            report(&err)
        );
    })
    .await;
}

async fn raw_greeting(addr: std::net::SocketAddr, hello: Hello) -> (Vec<u8>, TcpStream) {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let mut frame = Vec::new();
    wire::encode_frame(
        &mut frame,
        wire::HANDSHAKE_VERSION,
        MessageType::Hello,
        0,
        &wire::encode_hello(&hello).unwrap(),
    )
    .unwrap();
    socket.write_all(&frame).await.unwrap();
    let mut answer = Vec::new();
    let _ = timeout(Duration::from_secs(2), socket.read_to_end(&mut answer)).await;
    (answer, socket)
}

#[tokio::test]
async fn version_mismatch_fails_clearly_on_both_sides() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { ControlChannel::accept(&listener, quick()).await });
        // A hypothetical future peer that speaks only versions 2 and 3.
        let (answer, _socket) = raw_greeting(
            addr,
            Hello {
                versions: vec![2, 3],
                channel: ChannelKind::Control,
            },
        )
        .await;
        let (frame, _) =
            wire::decode_frame(&answer, wire::MAX_PAYLOAD_LEN).expect("an Abandon frame");
        assert_eq!(frame.header.kind, MessageType::Abandon);
        let reason = wire::decode_reason(frame.payload);
        assert!(
            reason.contains("the accepting host speaks [1], the connecting host speaks [2, 3]"),
            "{reason}"
        );
        let err = server.await.unwrap().unwrap_err();
        assert!(matches!(err, ControlError::Version(_)), "{err}");
        assert!(
            report(&err).contains("no common protocol version"),
            "{}",
            report(&err)
        );
    })
    .await;
}

/// Hosts of different versions: a newer one that still speaks the older version agrees on
/// it; one that shares none refuses, and the connecting side hears both version lists.
#[tokio::test]
async fn mixed_versions_agree_on_the_highest_common_or_refuse_naming_both() {
    bounded(async {
        let newer = ControlConfig {
            versions: &[1, 2],
            ..quick()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) = tokio::join!(
            ControlChannel::accept(&listener, newer),
            ControlChannel::connect(addr, quick())
        );
        assert_eq!(server.unwrap().version(), 1);
        assert_eq!(client.unwrap().version(), 1);

        let only_two = ControlConfig {
            versions: &[2],
            ..quick()
        };
        let (server, client) = tokio::join!(
            ControlChannel::accept(&listener, only_two),
            ControlChannel::connect(addr, quick())
        );
        assert!(matches!(server.unwrap_err(), ControlError::Version(_)));
        let error = client.unwrap_err();
        let text = report(&error);
        assert!(
            matches!(error, ControlError::PeerAbandoned { .. })
                && text.contains("the accepting host speaks [2], the connecting host speaks [1]"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn data_stream_greeting_on_the_control_port_is_refused() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { ControlChannel::accept(&listener, quick()).await });
        let hello = Hello {
            versions: vec![1],
            channel: ChannelKind::Data {
                session: 1,
                stream: 0,
                streams: 1,
            },
        };
        let (answer, _socket) = raw_greeting(addr, hello).await;
        let (frame, _) = wire::decode_frame(&answer, wire::MAX_PAYLOAD_LEN).unwrap();
        assert_eq!(frame.header.kind, MessageType::Abandon);
        let err = server.await.unwrap().unwrap_err();
        assert!(
            err.to_string()
                .contains("takes a control channel, not a data stream"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn corrupted_frame_is_rejected() {
    bounded(async {
        // A peer that greets properly, then sends a control frame with a flipped payload bit.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            tokio::spawn(async move { ControlChannel::accept(&listener, quick()).await.unwrap() });
        let hello = Hello {
            versions: vec![1],
            channel: ChannelKind::Control,
        };
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let mut frame = Vec::new();
        wire::encode_frame(
            &mut frame,
            1,
            MessageType::Hello,
            0,
            &wire::encode_hello(&hello).unwrap(),
        )
        .unwrap();
        socket.write_all(&frame).await.unwrap();
        let mut server = server.await.unwrap();
        let mut bad = Vec::new();
        wire::encode_frame(
            &mut bad,
            1,
            MessageType::Control,
            0,
            &postcard::to_stdvec(&42u32).unwrap(),
        )
        .unwrap();
        *bad.last_mut().unwrap() ^= 1;
        socket.write_all(&bad).await.unwrap();
        let err = server.recv::<u32>().await.unwrap_err();
        assert!(
            report(&err).contains("checksum mismatch"),
            "{}",
            report(&err)
        );
    })
    .await;
}

#[tokio::test]
async fn connecting_to_nothing_fails_clearly() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = ControlChannel::connect(addr, quick()).await.unwrap_err();
    assert!(
        report(&err).starts_with(&format!("cannot connect the control channel to {addr}")),
        "{}",
        report(&err)
    );
}
