//! ferry-vmm: one VM per process.
//!
//! A VMM process owns a VM's KVM file descriptors, vCPU threads, devices, console and guest
//! memory, and serves them on a unix socket in the host's state directory. hostd starts it
//! in a process group of its own so that it survives hostd (a crash, an upgrade, a restart), and
//! talks to it with the typed messages of [`protocol`] in Ferry's wire frames. KVM answers a
//! VM's ioctls only from the process that created it, so pause, dirty logging and state
//! capture happen here; guest memory is shared with hostd by passing its memfd, and hostd's
//! copy workers read and write it directly.
//!
//! - [`protocol`]: the request and response enums, and the frozen opening exchange.
//! - [`frames`]: those messages in wire frames over a socket, and descriptor passing.
//! - [`server`]: the VMM process's loop.
//! - [`client`]: hostd's side.
//! - [`spawn`]: starting a VMM that outlives its parent.

pub mod client;
pub mod frames;
pub mod protocol;
pub mod server;
pub mod spawn;

use std::path::PathBuf;

pub use client::{VmmClient, VmmClientError};
pub use protocol::{CreateSpec, EmptySpec, FrozenState, IncomingState, VmmInfo};
pub use spawn::{VmmProgram, spawn};

/// Runs a VMM if this process was started as one (`PROGRAM vmm --socket PATH`), and never
/// returns then; otherwise returns at once. Every Ferry binary that starts VMs calls this
/// first, so it can start itself as their VMM.
pub fn run_if_vmm() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new("vmm")) {
        return;
    }
    let rest: Vec<_> = args.collect();
    let socket = match rest.as_slice() {
        [flag, path] if flag == "--socket" => PathBuf::from(path),
        _ => {
            eprintln!("usage: vmm --socket PATH (started by hostd: one VM per process)");
            std::process::exit(2);
        }
    };
    run(&socket)
}

/// Serves one VM on `socket` until it is shut down, then ends the process.
pub fn run(socket: &std::path::Path) -> ! {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match server::serve(socket) {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("vmm: error: {}", ferry_transport::report(&error));
            std::process::exit(2);
        }
    }
}
