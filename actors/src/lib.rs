//! ferry-actors: hosts, VMs and migrations as actix actors.
//!
//! - [`HostActor`](host_actor::HostActor): one per `hostd`; inventory, resources, admission,
//!   peers, and the migrations in flight.
//! - [`VmActor`](vm_actor::VmActor): one per VM, on its own thread; owns the runtime VM and its
//!   lifecycle ([`lifecycle`]).
//! - Migration actors, one on each host per migration ([`migration`]), driving the stages
//!   through messages over the control channel and the bulk copy over the data streams.

pub use ferry_runtime::devices::virtio::net::announce;
pub mod control_server;
pub mod datastore;
pub mod evacuation;
pub mod host_actor;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod migration;
pub mod placement;
pub mod reattach;
pub mod settings;
pub mod vm_actor;
