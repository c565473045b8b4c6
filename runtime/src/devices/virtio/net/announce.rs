//! Announcing a migrated VM's MAC address on the destination's network, so switches learn its
//! new port at once: a RARP frame (what QEMU and vMotion send, needs no IP) and, when the VM's
//! IPv4 address is known, a gratuitous ARP. A VM with a NIC sends them through its own TAP
//! ([`super::Net::announce`]), so its bridge learns the MAC on the TAP's port; a VM without one
//! has them sent on the host's interface for its network through an `AF_PACKET` socket
//! ([`send`]).

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
/// The Ethernet broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Errors from sending announcements.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The interface does not exist.
    #[error("network interface '{0}' does not exist on this host")]
    NoInterface(String),
    /// Socket creation or send failed.
    #[error("sending the announcement on '{interface}' failed")]
    Send {
        /// Interface.
        interface: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn arp_body(
    op: u16,
    mac: [u8; 6],
    sender_ip: [u8; 4],
    target_mac: [u8; 6],
    target_ip: [u8; 4],
) -> Vec<u8> {
    let mut body = Vec::with_capacity(28);
    body.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    body.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    body.push(6);
    body.push(4);
    body.extend_from_slice(&op.to_be_bytes());
    body.extend_from_slice(&mac);
    body.extend_from_slice(&sender_ip);
    body.extend_from_slice(&target_mac);
    body.extend_from_slice(&target_ip);
    body
}

fn ethernet(ethertype: u16, mac: [u8; 6], body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&BROADCAST);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(body);
    // Pad to the 60-byte Ethernet minimum (without FCS).
    frame.resize(frame.len().max(60), 0);
    frame
}

/// A RARP "request reverse" frame for `mac`, as QEMU's self-announce sends.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    ethernet(ETH_P_RARP, mac, &arp_body(3, mac, [0; 4], mac, [0; 4]))
}

/// A gratuitous ARP request: `ip` is at `mac`.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let ip = ip.octets();
    ethernet(ETH_P_ARP, mac, &arp_body(1, mac, ip, [0; 6], ip))
}

/// The frames to announce a VM.
pub fn frames(mac: [u8; 6], ip: Option<Ipv4Addr>) -> Vec<Vec<u8>> {
    let mut frames = vec![rarp_frame(mac)];
    if let Some(ip) = ip {
        frames.push(garp_frame(mac, ip));
    }
    frames
}

/// Sends `frames` out of `interface`.
pub fn send(interface: &str, frames: &[Vec<u8>]) -> Result<(), AnnounceError> {
    let name = CString::new(interface).map_err(|_| AnnounceError::NoInterface(interface.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(AnnounceError::NoInterface(interface.into()));
    }
    let err = |source| AnnounceError::Send {
        interface: interface.into(),
        source,
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    for frame in frames {
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&BROADCAST);
        // SAFETY: the buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_frame_layout() {
        let frame = rarp_frame(MAC);
        assert_eq!(frame.len(), 60);
        assert_eq!(&frame[..6], &BROADCAST);
        assert_eq!(&frame[6..12], &MAC);
        assert_eq!(&frame[12..14], &[0x80, 0x35]);
        assert_eq!(&frame[20..22], &[0, 3], "reverse request");
        assert_eq!(&frame[22..28], &MAC, "sender hardware address");
        assert_eq!(&frame[32..38], &MAC, "target hardware address");
    }

    #[test]
    fn garp_frame_layout() {
        let frame = garp_frame(MAC, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[20..22], &[0, 1]);
        assert_eq!(&frame[28..32], &[10, 0, 0, 7], "sender IP");
        assert_eq!(&frame[38..42], &[10, 0, 0, 7], "target IP = sender IP");
        assert_eq!(frames(MAC, None).len(), 1);
        assert_eq!(frames(MAC, Some(Ipv4Addr::LOCALHOST)).len(), 2);
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let err = send("no-such-if0", &frames(MAC, None)).unwrap_err();
        assert!(err.to_string().contains("no-such-if0"));
    }
}
