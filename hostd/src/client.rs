//! A blocking client of the hostd API over a whole cluster (used by `ferryctl` and the demo):
//! it knows every host from the configuration and finds VMs wherever they are.

use std::io::Write;
use std::time::Duration;

use ferry_actors::evacuation::EvacuationReport;
use ferry_actors::host_actor::{HostInfo, MaintenanceStatus};
use ferry_actors::lifecycle::Lifecycle;
use ferry_actors::migration::MigrationReport;
use ferry_actors::vm_actor::VmInfo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api_types::{CreateVmRequest, ErrorBody, MigrateRequest};
use crate::config::{Cluster, HostConfig};

/// How often migration progress is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The host could not be reached.
    #[error("host '{host}' is not reachable at {addr} (is its hostd running?)")]
    Unreachable {
        /// Host.
        host: String,
        /// API address.
        addr: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error.
    #[error("{host}: {message}")]
    Api {
        /// Host.
        host: String,
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
    /// The answer did not parse.
    #[error("host '{host}' sent an unreadable answer: {message}")]
    Decode {
        /// Host.
        host: String,
        /// Details.
        message: String,
    },
    /// Something not found anywhere in the cluster.
    #[error("{0}")]
    NotFound(String),
}

impl ClientError {
    /// Whether the error is a 404 or a not-found search.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ClientError::Api { status: 404, .. } | ClientError::NotFound(_)
        )
    }
}

fn unreachable(host: &HostConfig, source: reqwest::Error) -> ClientError {
    ClientError::Unreachable {
        host: host.name.clone(),
        addr: endpoint_label(host),
        source,
    }
}

/// How a host's API is reached from here: its unix socket when this is the host's machine
/// (the socket is in its state directory), otherwise its TCP API with its bearer token.
#[derive(Debug, Clone)]
struct Endpoint {
    socket: std::path::PathBuf,
    /// Clients over the socket: (requests, streams).
    local: (reqwest::blocking::Client, reqwest::blocking::Client),
    /// Over TCP: base URL, clients, and the token (or why there is none).
    tcp: Option<(String, reqwest::blocking::Client, reqwest::blocking::Client)>,
    token: Result<Option<String>, String>,
}

fn pick<'a>(
    streaming: bool,
    requests: &'a reqwest::blocking::Client,
    streams: &'a reqwest::blocking::Client,
) -> &'a reqwest::blocking::Client {
    if streaming { streams } else { requests }
}

fn endpoint_label(host: &HostConfig) -> String {
    let socket = crate::daemon::api_socket(&host.state_dir);
    match host.api {
        Some(addr) => format!("{addr} or {}", socket.display()),
        None => socket.display().to_string(),
    }
}

fn endpoint(host: &HostConfig) -> Endpoint {
    let socket = crate::daemon::api_socket(&host.state_dir);
    let build = |timeout: Option<Duration>, unix: bool| {
        let builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout);
        let builder = if unix {
            builder.unix_socket(socket.clone())
        } else {
            builder
        };
        builder
            .build()
            .unwrap_or_else(|_| reqwest::blocking::Client::new())
    };
    let requests = Some(Duration::from_secs(120));
    let token = match &host.api_token_file {
        Some(file) if host.api.is_some() => crate::auth::ApiToken::load(file)
            .map(|t| Some(t.text()))
            .map_err(|e| format!("{e:#}")),
        _ => Ok(None),
    };
    Endpoint {
        local: (build(requests, true), build(None, true)),
        tcp: host.api.map(|addr| {
            (
                format!("http://{addr}"),
                build(requests, false),
                build(None, false),
            )
        }),
        socket,
        token,
    }
}

/// How authoritative a copy of a VM in this state is.
fn rank(state: Lifecycle) -> u8 {
    match state {
        Lifecycle::Running | Lifecycle::Paused | Lifecycle::MigratingOut | Lifecycle::Created => 2,
        Lifecycle::MigratingIn | Lifecycle::Stale | Lifecycle::Crashed => 1,
        Lifecycle::Stopped => 0,
    }
}

/// Client of every host of a cluster.
#[derive(Debug, Clone)]
pub struct Client {
    cluster: Cluster,
    endpoints: std::collections::BTreeMap<String, Endpoint>,
}

impl Client {
    /// A client for `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        let endpoints = cluster
            .hosts
            .iter()
            .map(|host| (host.name.clone(), endpoint(host)))
            .collect();
        Client { cluster, endpoints }
    }

    /// A request to `path` on `host`: over its unix socket if this machine has it, else
    /// over TCP with the host's token.
    fn request(
        &self,
        host: &HostConfig,
        method: reqwest::Method,
        path: &str,
        streaming: bool,
    ) -> Result<reqwest::blocking::RequestBuilder, ClientError> {
        let endpoint = self
            .endpoints
            .get(&host.name)
            .ok_or_else(|| ClientError::NotFound(format!("no host named '{}'", host.name)))?;
        if endpoint.socket.exists() {
            let client = pick(streaming, &endpoint.local.0, &endpoint.local.1);
            return Ok(client.request(method, format!("http://localhost{path}")));
        }
        let problem = |message: String| ClientError::Api {
            host: host.name.clone(),
            status: 0,
            message,
        };
        let Some((base, requests, streams)) = &endpoint.tcp else {
            return Err(problem(format!(
                "host '{}' has no TCP API, and its API socket {} is not on this machine (run ferryctl on that host, or give it an api address and api_token_file)",
                host.name,
                endpoint.socket.display()
            )));
        };
        let request = pick(streaming, requests, streams).request(method, format!("{base}{path}"));
        match &endpoint.token {
            Ok(Some(token)) => Ok(request.bearer_auth(token)),
            Ok(None) => Ok(request),
            Err(e) => Err(problem(e.clone())),
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A host by name, as a client error.
    pub fn host(&self, name: &str) -> Result<&HostConfig, ClientError> {
        self.cluster
            .host(name)
            .map_err(|e| ClientError::NotFound(e.to_string()))
    }

    fn answer<T: DeserializeOwned>(
        host: &HostConfig,
        response: reqwest::Result<reqwest::blocking::Response>,
    ) -> Result<T, ClientError> {
        let response = response.map_err(|source| unreachable(host, source))?;
        let status = response.status();
        let body = response.bytes().map_err(|e| ClientError::Decode {
            host: host.name.clone(),
            message: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api {
                host: host.name.clone(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            host: host.name.clone(),
            message: e.to_string(),
        })
    }

    /// `GET` on a host.
    pub fn get<T: DeserializeOwned>(
        &self,
        host: &HostConfig,
        path: &str,
    ) -> Result<T, ClientError> {
        Self::answer(
            host,
            self.request(host, reqwest::Method::GET, path, false)?
                .send(),
        )
    }

    /// `POST` with a JSON body on a host.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        host: &HostConfig,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        Self::answer(
            host,
            self.request(host, reqwest::Method::POST, path, false)?
                .json(body)
                .send(),
        )
    }

    /// Host summary.
    pub fn host_info(&self, host: &str) -> Result<HostInfo, ClientError> {
        self.get(self.host(host)?, "/v1/host")
    }

    /// Puts `host` in maintenance mode, evacuating it unless `request.evacuate` is false.
    pub fn enter_maintenance(
        &self,
        host: &str,
        request: &crate::api_types::MaintenanceRequest,
    ) -> Result<MaintenanceStatus, ClientError> {
        self.post(self.host(host)?, "/v1/host/maintenance/enter", request)
    }

    /// Ends maintenance mode on `host`.
    pub fn exit_maintenance(&self, host: &str) -> Result<MaintenanceStatus, ClientError> {
        self.post(
            self.host(host)?,
            "/v1/host/maintenance/exit",
            &serde_json::json!({}),
        )
    }

    /// Polls `host`'s evacuation until it is finished, calling `progress` with every report.
    pub fn wait_evacuation(
        &self,
        host: &str,
        mut progress: impl FnMut(&EvacuationReport),
    ) -> Result<EvacuationReport, ClientError> {
        let config = self.host(host)?;
        loop {
            let status: MaintenanceStatus = self.get(config, "/v1/host/maintenance")?;
            let Some(report) = status.evacuation else {
                return Err(ClientError::NotFound(format!(
                    "host '{host}' has no evacuation"
                )));
            };
            progress(&report);
            if report.is_finished() {
                return Ok(report);
            }
            std::thread::sleep(POLL_INTERVAL * 2);
        }
    }

    /// Creates a VM on `host`.
    pub fn create_vm(&self, host: &str, request: &CreateVmRequest) -> Result<VmInfo, ClientError> {
        self.post(self.host(host)?, "/v1/vms", request)
    }

    /// VMs on every reachable host, and the errors of unreachable ones.
    pub fn list_vms(&self) -> (Vec<VmInfo>, Vec<ClientError>) {
        let mut vms = Vec::new();
        let mut errors = Vec::new();
        for host in &self.cluster.hosts {
            match self.get::<Vec<VmInfo>>(host, "/v1/vms") {
                Ok(found) => vms.extend(found),
                Err(e) => errors.push(e),
            }
        }
        (vms, errors)
    }

    /// Finds the host that has VM `name` (skipping hosts that don't answer).
    pub fn find_vm(&self, name: &str) -> Result<(HostConfig, VmInfo), ClientError> {
        let mut unreachable = Vec::new();
        let mut found: Option<(HostConfig, VmInfo)> = None;
        for host in &self.cluster.hosts {
            match self.get::<VmInfo>(host, &format!("/v1/vms/{name}")) {
                Ok(info) => {
                    // While a VM migrates, the destination holds an arriving copy; the VM is
                    // where it runs (or last ran), so rank copies by state.
                    if found
                        .as_ref()
                        .is_none_or(|(_, best)| rank(info.state) > rank(best.state))
                    {
                        found = Some((host.clone(), info));
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        found.ok_or_else(|| {
            let mut message = format!("no VM named '{name}' in cluster '{}'", self.cluster.name);
            if !unreachable.is_empty() {
                message.push_str(&format!(" (not asked: {})", unreachable.join("; ")));
            }
            ClientError::NotFound(message)
        })
    }

    /// `pause`, `resume` or `stop`.
    pub fn operate(&self, name: &str, op: &str) -> Result<VmInfo, ClientError> {
        let (host, _) = self.find_vm(name)?;
        self.post(
            &host,
            &format!("/v1/vms/{name}/{op}"),
            &serde_json::json!({}),
        )
    }

    /// Runs the stale copy of `name` a lost switch-over left paused (its guest goes back to
    /// the moment of that switch-over).
    pub fn recover_from_stale_copy(&self, name: &str) -> Result<VmInfo, ClientError> {
        let (host, _) = self.find_vm(name)?;
        self.post(
            &host,
            &format!("/v1/vms/{name}/recover"),
            &crate::api_types::RecoverRequest {
                from_stale_copy: true,
            },
        )
    }

    /// Starts a migration; returns the source host and the initial report.
    pub fn migrate(
        &self,
        name: &str,
        request: &MigrateRequest,
    ) -> Result<(HostConfig, MigrationReport), ClientError> {
        self.host(&request.to)?;
        let (host, _) = self.find_vm(name)?;
        let report = self.post(&host, &format!("/v1/vms/{name}/migrate"), request)?;
        Ok((host, report))
    }

    /// Polls a migration until it is final, calling `progress` with every report.
    pub fn wait_migration(
        &self,
        host: &HostConfig,
        id: &str,
        mut progress: impl FnMut(&MigrationReport),
    ) -> Result<MigrationReport, ClientError> {
        loop {
            let report: MigrationReport = self.get(host, &format!("/v1/migrations/{id}"))?;
            progress(&report);
            if report.is_final() {
                return Ok(report);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Cancels the migration of `name`, wherever it runs from.
    pub fn cancel(&self, name: &str) -> Result<MigrationReport, ClientError> {
        let (host, _) = self.find_vm(name)?;
        self.post(
            &host,
            &format!("/v1/vms/{name}/migrate/cancel"),
            &serde_json::json!({}),
        )
    }

    /// The console history of `name`.
    pub fn console_history(&self, name: &str) -> Result<Vec<u8>, ClientError> {
        let (host, _) = self.find_vm(name)?;
        let path = format!("/v1/vms/{name}/console");
        let response = self
            .request(&host, reqwest::Method::GET, &path, false)?
            .send()
            .map_err(|source| unreachable(&host, source))?;
        if !response.status().is_success() {
            return Self::answer(&host, Ok(response));
        }
        response
            .bytes()
            .map(|b| b.to_vec())
            .map_err(|e| ClientError::Decode {
                host: host.name.clone(),
                message: e.to_string(),
            })
    }

    /// Copies the console of `name` to `out` as it is written, following the VM when it
    /// migrates, until it stops or disappears.
    pub fn follow_console(&self, name: &str, out: &mut dyn Write) -> Result<(), ClientError> {
        let mut offset = 0u64;
        let mut first = true;
        loop {
            let (host, info) = match self.find_vm(name) {
                Ok(found) => found,
                Err(e) if !first && e.is_not_found() => return Ok(()),
                Err(e) => return Err(e),
            };
            if info.state == Lifecycle::Stopped {
                return Ok(());
            }
            first = false;
            let path = format!("/v1/vms/{name}/console?follow=true&offset={offset}");
            let mut response = self
                .request(&host, reqwest::Method::GET, &path, true)?
                .send()
                .map_err(|source| unreachable(&host, source))?;
            if !response.status().is_success() {
                return Self::answer(&host, Ok(response));
            }
            offset = response
                .headers()
                .get(crate::api::CONSOLE_OFFSET_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(offset);
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut response, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = out.write_all(&buf[..n]);
                        let _ = out.flush();
                        offset += n as u64;
                    }
                }
            }
            // The stream ends when the VM leaves that host: look for it again (it may have
            // migrated) after the switch-over has had time to finish.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
