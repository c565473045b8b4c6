//! RDMA device discovery through libibverbs (rdma-sys): negotiation needs to know whether
//! both hosts have a usable RDMA port.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;

use rdma_sys::{
    ___ibv_query_port, ibv_close_device, ibv_device_attr, ibv_free_device_list,
    ibv_get_device_guid, ibv_get_device_list, ibv_get_device_name, ibv_open_device, ibv_port_attr,
    ibv_port_state, ibv_query_device,
};
use serde::{Deserialize, Serialize};

use super::RdmaError;

/// State of an RDMA port, as libibverbs reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PortState {
    /// No link.
    Down,
    /// Link up, not yet configured by the subnet manager.
    Init,
    /// Configured, not yet active.
    Armed,
    /// Ready to carry traffic.
    Active,
    /// Active, but deferring traffic.
    ActiveDefer,
    /// A value this build does not know.
    Other(u32),
}

impl PortState {
    fn from_verbs(state: ibv_port_state::Type) -> Self {
        match state {
            ibv_port_state::IBV_PORT_DOWN => PortState::Down,
            ibv_port_state::IBV_PORT_INIT => PortState::Init,
            ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
            ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
            ibv_port_state::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Other(other),
        }
    }
}

/// Link layer of a port: native InfiniBand, or RoCE over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinkLayer {
    /// InfiniBand.
    InfiniBand,
    /// Ethernet (RoCE, including soft-RoCE rdma_rxe).
    Ethernet,
    /// Not reported.
    Unspecified,
}

impl LinkLayer {
    fn from_verbs(value: u8) -> Self {
        // Values of IBV_LINK_LAYER_* in <infiniband/verbs.h>, which bindgen does not export.
        match value {
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            _ => LinkLayer::Unspecified,
        }
    }
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaPort {
    /// Port number (ports are numbered from 1).
    pub number: u8,
    /// Its state.
    pub state: PortState,
    /// Its link layer.
    pub link_layer: LinkLayer,
    /// Active MTU in bytes.
    pub active_mtu: u32,
}

impl RdmaPort {
    /// A port can carry migration traffic only when active.
    pub fn is_usable(&self) -> bool {
        self.state == PortState::Active
    }
}

/// An RDMA device found on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaDevice {
    /// Device name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// Node GUID, in the byte order libibverbs returns it.
    pub node_guid: u64,
    /// Its ports.
    pub ports: Vec<RdmaPort>,
    /// Why the device could not be queried, if it could not; such a device is unusable.
    pub problem: Option<String>,
}

impl RdmaDevice {
    /// Ports that can carry traffic now.
    pub fn usable_ports(&self) -> impl Iterator<Item = &RdmaPort> {
        self.ports.iter().filter(|port| port.is_usable())
    }
}

/// Lists the RDMA devices of this host with their ports. A host without RDMA support in the
/// kernel has no devices; that is not an error. A device that cannot be opened or queried is
/// listed with its `problem` set.
pub fn discover() -> Result<Vec<RdmaDevice>, RdmaError> {
    let mut count: libc::c_int = 0;
    // SAFETY: ibv_get_device_list writes the device count into `count`, a valid local, and
    // returns either NULL or an array we free below with ibv_free_device_list.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        let err = io::Error::last_os_error();
        // libibverbs reports a kernel without the RDMA subsystem as ENOSYS (and a missing
        // sysfs class directory as ENOENT): that is "no devices", the normal case here.
        return match err.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::ENOENT) | Some(0) | None => Ok(Vec::new()),
            _ => Err(RdmaError::ListDevices { source: err }),
        };
    }
    let mut devices = Vec::with_capacity(count.max(0) as usize);
    for index in 0..count.max(0) as usize {
        // SAFETY: the list holds `count` valid device pointers (NULL-terminated after them).
        let device = unsafe { *list.wrapping_add(index) };
        if device.is_null() {
            break;
        }
        devices.push(describe(device));
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once; the device
    // pointers taken from it are not used after this.
    unsafe { ibv_free_device_list(list) };
    Ok(devices)
}

fn describe(device: *mut rdma_sys::ibv_device) -> RdmaDevice {
    // SAFETY: `device` is a valid entry of a live device list.
    let raw_name = unsafe { ibv_get_device_name(device) };
    let name = if raw_name.is_null() {
        String::from("(unnamed)")
    } else {
        // SAFETY: a non-null name points to a NUL-terminated string inside the device
        // structure, which lives as long as the list; it is copied out at once.
        unsafe { CStr::from_ptr(raw_name) }
            .to_string_lossy()
            .into_owned()
    };
    // SAFETY: `device` is a valid entry of a live device list.
    let node_guid = unsafe { ibv_get_device_guid(device) };
    let mut described = RdmaDevice {
        name,
        node_guid,
        ports: Vec::new(),
        problem: None,
    };
    // SAFETY: `device` is a valid entry of a live device list; the context is closed below.
    let context = unsafe { ibv_open_device(device) };
    if context.is_null() {
        described.problem = Some(format!(
            "cannot open device: {}",
            io::Error::last_os_error()
        ));
        return described;
    }
    let mut attr = MaybeUninit::<ibv_device_attr>::zeroed();
    // SAFETY: `context` is an open device context and `attr` points to writable storage of
    // the type ibv_query_device fills in.
    let rc = unsafe { ibv_query_device(context, attr.as_mut_ptr()) };
    if rc != 0 {
        described.problem = Some(format!(
            "cannot query device: {}",
            io::Error::from_raw_os_error(rc)
        ));
    } else {
        // SAFETY: ibv_query_device returned success, so it initialised `attr` (it was zeroed
        // before, so every field holds a valid integer either way).
        let ports = unsafe { attr.assume_init() }.phys_port_cnt;
        for number in 1..=ports {
            let mut port = MaybeUninit::<ibv_port_attr>::zeroed();
            // SAFETY: `context` is open, `number` is within the device's port count, and
            // `port` is writable storage of the type the call fills in.
            let rc = unsafe { ___ibv_query_port(context, number, port.as_mut_ptr()) };
            if rc != 0 {
                described.problem = Some(format!(
                    "cannot query port {number}: {}",
                    io::Error::from_raw_os_error(rc)
                ));
                continue;
            }
            // SAFETY: the query succeeded; the storage was zeroed beforehand, so all fields
            // are initialised integers regardless.
            let port = unsafe { port.assume_init() };
            described.ports.push(RdmaPort {
                number,
                state: PortState::from_verbs(port.state),
                link_layer: LinkLayer::from_verbs(port.link_layer),
                active_mtu: 128u32 << port.active_mtu.clamp(1, 5),
            });
        }
    }
    // SAFETY: `context` was opened above and is closed exactly once.
    unsafe { ibv_close_device(context) };
    described
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_never_fails_on_a_host_without_rdma() {
        // This machine's kernel has no RDMA subsystem: discovery must report no devices, not
        // an error. On a host with devices, every listed device must have a name.
        let devices = discover().expect("discovery succeeds");
        for device in &devices {
            assert!(!device.name.is_empty());
        }
    }

    #[test]
    fn only_active_ports_are_usable() {
        let port = |state| RdmaPort {
            number: 1,
            state,
            link_layer: LinkLayer::Ethernet,
            active_mtu: 1024,
        };
        assert!(port(PortState::Active).is_usable());
        for state in [
            PortState::Down,
            PortState::Init,
            PortState::Armed,
            PortState::ActiveDefer,
            PortState::Other(9),
        ] {
            assert!(!port(state).is_usable(), "{state:?}");
        }
        assert_eq!(
            PortState::from_verbs(ibv_port_state::IBV_PORT_ACTIVE),
            PortState::Active
        );
        assert_eq!(LinkLayer::from_verbs(2), LinkLayer::Ethernet);
    }
}
