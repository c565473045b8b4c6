//! Running `hostd` for one host of the cluster: the host actor, the migration control
//! listener and the HTTP API, until SIGINT or SIGTERM.

use std::path::Path;
use std::sync::Arc;

use actix::Actor;
use actix_web::web::Data;
use actix_web::{App, HttpServer};
use anyhow::{Context, Result};
use ferry_actors::control_server;
use ferry_actors::host_actor::HostActor;
use ferry_actors::journal::Journal;
use ferry_actors::settings::Fault;

use crate::api;
use crate::auth::{self, ApiToken};
use crate::config::Cluster;

/// The API's unix socket in a state directory.
pub fn api_socket(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("api.sock")
}

/// Binds the API socket, readable and writable by its owner only (mode 0600): whoever can
/// open it may do anything the API can.
fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("removing the old API socket {}", path.display()));
        }
    }
    // Created with no permission for group and others, so there is no moment in which
    // another user could connect.
    // SAFETY: umask only changes this process's file-creation mask; it has no memory effects.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Test-only fault injection variable (see `ferry_actors::settings::Fault`).
pub const FAULT_ENV: &str = "FERRY_FAULT";
/// Test-only: the protocol versions this hostd claims to speak (comma-separated), to stand
/// in for another Ferry version in a mixed cluster.
pub const PROTOCOL_VERSIONS_ENV: &str = "FERRY_TEST_PROTOCOL_VERSIONS";

/// Test-only: claim an RDMA device of this name with one active RoCE port.
const CLAIM_RDMA_ENV: &str = "FERRY_TEST_CLAIM_RDMA";

fn claimed_device(name: &str) -> ferry_transport::rdma::RdmaDevice {
    use ferry_transport::rdma::{LinkLayer, PortState, RdmaDevice, RdmaPort};
    RdmaDevice {
        name: name.to_string(),
        node_guid: 0,
        ports: vec![RdmaPort {
            number: 1,
            state: PortState::Active,
            link_layer: LinkLayer::Ethernet,
            active_mtu: 1024,
        }],
        problem: None,
    }
}

fn protocol_versions_override() -> Result<Option<&'static [u16]>> {
    let Ok(text) = std::env::var(PROTOCOL_VERSIONS_ENV) else {
        return Ok(None);
    };
    let versions = text
        .split(',')
        .map(|v| v.trim().parse::<u16>())
        .collect::<Result<Vec<u16>, _>>()
        .with_context(|| format!("{PROTOCOL_VERSIONS_ENV}='{text}' is not a list of versions"))?;
    // Lives as long as the process, like the built-in list it replaces.
    Ok(Some(Vec::leak(versions)))
}

/// Runs host `name` of the cluster in `config` until a shutdown signal.
pub fn run(config: &Path, name: &str) -> Result<()> {
    let cluster = Cluster::load(config)?;
    // RDMA registration pins guest memory: take all the locked memory the hard limit allows.
    let memlock = ferry_transport::rdma::raise_memlock_limit();
    tracing::info!(soft = ?memlock.soft, privileged = memlock.privileged, "locked-memory limit for RDMA registration");
    let fault = match std::env::var(FAULT_ENV) {
        Ok(value) => Some(Fault::parse(&value).map_err(anyhow::Error::msg)?),
        Err(_) => None,
    };
    let mut settings = cluster.host_settings(name, fault)?;
    if let Ok(device) = std::env::var(CLAIM_RDMA_ENV) {
        tracing::warn!(%device, "test override: claiming an RDMA device this machine may not have");
        settings.claimed_rdma = Some(claimed_device(&device));
    }
    if let Some(versions) = protocol_versions_override()? {
        tracing::warn!(?versions, "test override: speaking these protocol versions");
        settings.protocol_versions = versions;
    }
    for (network, port) in &settings.networks {
        if let Some(bridge) = &port.bridge
            && !ferry_runtime::devices::virtio::net::tap::bridge_exists(bridge)
        {
            tracing::warn!(%network, %bridge, "the network's bridge does not exist on this host: VMs on it cannot start or arrive here until it does");
        }
    }
    let host_config = cluster.host(name)?.clone();
    let api_addr = host_config.api;
    // A TCP API refuses to start without its token: config validation demands the file,
    // and here it must hold a usable one.
    let token = match &host_config.api_token_file {
        Some(file) if api_addr.is_some() => Some(ApiToken::load(file).with_context(|| {
            format!(
                "{}: host '{name}': the TCP API cannot start without its token",
                config.display()
            )
        })?),
        _ => None,
    };
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("creating state directory {}", settings.state_dir.display()))?;
    let features = ferry_runtime::host_cpu_features(&settings.hidden_cpu_features)
        .context("reading this host's CPU features from KVM")?;
    // The VMs that outlived a previous hostd are found again by the host actor as it starts.
    let journal = Arc::new(Journal::open(&settings.state_dir)?);
    let datastores = ferry_actors::datastore::open_all(&settings.datastores)?;
    let settings = Arc::new(settings);
    // Both listening addresses first: a host that cannot listen says so before anything
    // has started.
    let control = std::net::TcpListener::bind(settings.control_addr).with_context(|| {
        format!(
            "binding the migration control address {}",
            settings.control_addr
        )
    })?;
    control
        .set_nonblocking(true)
        .context("configuring the control listener")?;
    let api = api_addr
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the API address {addr}"))
        })
        .transpose()?;
    let socket_path = api_socket(&settings.state_dir);
    let socket = bind_socket(&socket_path)?;
    actix::System::new().block_on(async move {
        let listener = tokio::net::TcpListener::from_std(control)
            .context("registering the control listener")?;
        let host = HostActor::new(
            (*settings).clone(),
            features,
            Arc::clone(&journal),
            datastores,
        )
        .start();
        actix_rt::spawn(control_server::serve(
            listener,
            (host.clone(), journal),
            Arc::clone(&settings),
        ));
        let (local_host, local_settings) = (host.clone(), Arc::clone(&settings));
        let local = HttpServer::new(move || {
            App::new()
                .app_data(Data::new(local_host.clone()))
                .app_data(Data::new(Arc::clone(&local_settings)))
                .configure(api::configure)
        })
        .workers(1)
        .shutdown_timeout(2)
        .listen_uds(socket)
        .with_context(|| format!("serving the API on {}", socket_path.display()))?
        .run();
        let remote = match (api, token) {
            (Some(api), Some(token)) => {
                let api_settings = Arc::clone(&settings);
                let token = Data::new(token);
                Some(
                    HttpServer::new(move || {
                        App::new()
                            .app_data(token.clone())
                            .app_data(Data::new(host.clone()))
                            .app_data(Data::new(Arc::clone(&api_settings)))
                            .wrap(actix_web::middleware::from_fn(auth::require_token))
                            .configure(api::configure)
                    })
                    .workers(2)
                    .shutdown_timeout(2)
                    .listen(api)
                    .context("serving the TCP API")?
                    .run(),
                )
            }
            _ => None,
        };
        tracing::info!(
            host = %settings.name,
            api = %api_addr.map_or("none".to_string(), |a| a.to_string()),
            socket = %socket_path.display(),
            control = %settings.control_addr,
            tls = settings.tls.is_some(),
            "hostd ready"
        );
        match remote {
            Some(remote) => {
                let (a, b) = futures_util::future::join(local, remote).await;
                a.and(b).context("API server")?;
            }
            None => local.await.context("API server")?,
        }
        tracing::info!(host = %settings.name, "hostd stopped");
        Ok(())
    })
}
