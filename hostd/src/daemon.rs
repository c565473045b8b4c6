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
use crate::config::Cluster;

/// Test-only fault injection variable (see `ferry_actors::settings::Fault`).
pub const FAULT_ENV: &str = "FERRY_FAULT";
/// Test-only: the protocol versions this hostd claims to speak (comma-separated), to stand
/// in for another Ferry version in a mixed cluster.
pub const PROTOCOL_VERSIONS_ENV: &str = "FERRY_TEST_PROTOCOL_VERSIONS";

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
    let fault = match std::env::var(FAULT_ENV) {
        Ok(value) => Some(Fault::parse(&value).map_err(anyhow::Error::msg)?),
        Err(_) => None,
    };
    let mut settings = cluster.host_settings(name, fault)?;
    if let Some(versions) = protocol_versions_override()? {
        tracing::warn!(?versions, "test override: speaking these protocol versions");
        settings.protocol_versions = versions;
    }
    let api_addr = cluster.host(name)?.api;
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
    let api = std::net::TcpListener::bind(api_addr)
        .with_context(|| format!("binding the API address {api_addr}"))?;
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
        let api_settings = Arc::clone(&settings);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(Data::new(host.clone()))
                .app_data(Data::new(Arc::clone(&api_settings)))
                .configure(api::configure)
        })
        .workers(2)
        .shutdown_timeout(2)
        .listen(api)
        .with_context(|| format!("serving the API on {api_addr}"))?
        .run();
        tracing::info!(
            host = %settings.name,
            api = %api_addr,
            control = %settings.control_addr,
            "hostd ready"
        );
        server.await.context("API server")?;
        tracing::info!(host = %settings.name, "hostd stopped");
        Ok(())
    })
}
