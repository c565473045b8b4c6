//! hostd: Ferry's host daemon and its CLI. Thin by design: configuration ([`config`]), the
//! HTTP API ([`api`]), process wiring ([`daemon`]), an API client ([`client`]) with progress
//! display ([`progress`]), and the live demo ([`demo`]). Everything else is in
//! ferry-actors, ferry-transport and ferry-runtime.

pub mod api;
pub mod api_types;
pub mod auth;
pub mod certs;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod demo_net;
pub mod evacuation_view;
pub mod progress;
pub mod table;

/// Sets up logging to stderr (`RUST_LOG` overrides `default`).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
