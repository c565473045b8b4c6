//! The migration control listener: every connection from another host starts with either a
//! `Hello` (a VM arriving: a destination migration actor takes over the channel) or a `Query`
//! (a source asking how a switch-over ended).

use std::sync::Arc;

use actix::prelude::*;
use ferry_transport::control::{ControlChannel, ControlConfig};
use tokio::net::TcpListener;

use crate::host_actor::{DescribeHost, HostActor, QueryOutcome};
use crate::journal::Journal;
use crate::migration::destination::DestinationMigration;
use crate::migration::protocol::{ToDestination, ToSource};
use crate::settings::{Fault, HostSettings};

/// Control channel settings for this host.
pub fn control_config(settings: &HostSettings) -> ControlConfig {
    let limits = &settings.migration;
    ControlConfig {
        handshake_timeout: limits.connect_timeout,
        idle_timeout: limits.io_timeout,
        send_timeout: limits.io_timeout,
        keepalive_interval: (limits.io_timeout / 5).max(std::time::Duration::from_millis(100)),
        versions: settings.protocol_versions,
        ..ControlConfig::default()
    }
}

/// Why a peer claiming to be `claimed` may not migrate in, if it may not: a host this host
/// does not list, or — under TLS — a certificate for another host than the one claimed.
fn impostor(channel: &ControlChannel, claimed: &str, settings: &HostSettings) -> Option<String> {
    if !settings.peers.contains_key(claimed) {
        return Some(format!(
            "'{claimed}' is not a host of this cluster's configuration on {}",
            settings.name
        ));
    }
    match channel.peer_identity() {
        Some(identity) if !identity.is(claimed) => Some(format!(
            "the connecting host claims to be '{claimed}', but its certificate is not for '{claimed}'"
        )),
        _ => None,
    }
}

/// Why a peer asking for this host's facts is not one of the cluster's hosts, if it is
/// not: under TLS its certificate must be for a host this host lists (without TLS nothing
/// proves who asks, as for `Query`).
fn impostor_of_cluster(channel: &ControlChannel, settings: &HostSettings) -> Option<String> {
    let identity = channel.peer_identity()?;
    if settings.peers.keys().any(|peer| identity.is(peer)) {
        None
    } else {
        Some("the asking host's certificate is for no host of this cluster".into())
    }
}

/// Accepts control connections until the listener fails.
pub async fn serve(
    listener: TcpListener,
    (host, journal): (Addr<HostActor>, Arc<Journal>),
    settings: Arc<HostSettings>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::error!(%error, "control listener failed");
                return;
            }
        };
        let host = host.clone();
        let journal = Arc::clone(&journal);
        let settings = Arc::clone(&settings);
        actix_rt::spawn(async move {
            if let Err(error) = handle(stream, (host, journal), settings).await {
                tracing::warn!(%peer, %error, "control connection ended with an error");
            }
        });
    }
}

async fn handle(
    stream: tokio::net::TcpStream,
    (host, journal): (Addr<HostActor>, Arc<Journal>),
    settings: Arc<HostSettings>,
) -> Result<(), String> {
    let config = control_config(&settings);
    let mut channel = ControlChannel::server_secure(stream, config, settings.tls.as_ref())
        .await
        .map_err(|e| ferry_transport::report(&e))?;
    let first: ToDestination = channel
        .recv()
        .await
        .map_err(|e| ferry_transport::report(&e))?;
    match first {
        ToDestination::Hello(hello) => {
            if let Some(reason) = impostor(&channel, &hello.source_host, &settings) {
                let _ = channel
                    .send(&ToSource::Refused {
                        reason: reason.clone(),
                    })
                    .await;
                return Err(reason);
            }
            let cipher = channel.peer_identity().map(|p| p.cipher.clone());
            DestinationMigration::new(
                hello,
                settings,
                (host, journal),
                channel.into_split(),
                cipher,
            )
            .start();
            Ok(())
        }
        ToDestination::Query { id } => {
            if settings.fault.is_some_and(Fault::blocks_queries) {
                tracing::warn!(migration = %id, "fault injection: leaving a query unanswered");
                return Ok(());
            }
            let answer = host
                .send(QueryOutcome(id))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(migration = %id, outcome = ?answer.outcome, "answered an in-doubt query");
            channel
                .send(&ToSource::Outcome {
                    outcome: answer.outcome,
                    journal: answer.journal,
                    resumed_after_commit_ms: answer.resumed_after_commit_ms,
                })
                .await
                .map_err(|e| ferry_transport::report(&e))?;
            let _ = channel.close().await;
            Ok(())
        }
        ToDestination::Describe => {
            if impostor_of_cluster(&channel, &settings).is_some() {
                return Err("an unauthenticated peer asked for this host's facts".into());
            }
            let facts = host.send(DescribeHost).await.map_err(|e| e.to_string())?;
            channel
                .send(&ToSource::Description(Box::new(facts)))
                .await
                .map_err(|e| ferry_transport::report(&e))?;
            let _ = channel.close().await;
            Ok(())
        }
        other => {
            let reason = format!(
                "a control connection must start with Hello, Query or Describe, not {other:?}"
            );
            let _ = channel
                .send(&ToSource::Failed {
                    reason: reason.clone(),
                })
                .await;
            Err(reason)
        }
    }
}
