//! A TAP device as a [`FrameIo`] backend, and its place on a Linux bridge.
//!
//! The TAP is created by the process that runs the VM (its VMM), in that process's network
//! namespace, with a kernel-chosen name `fytapN`. It is not persistent: when the VMM closes it
//! (the VM stops, migrates away, or its VMM dies) the kernel removes the interface and the
//! bridge forgets its port. Plain ioctls on `/dev/net/tun` and an `AF_INET` socket, as
//! `ip tuntap` and `brctl` do: TAP crates (`tun`, `tun-tap`) create the device but do not
//! join a bridge, which needs its own ioctl anyway, and the whole is a few calls.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{FrameIo, MTU};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// The name the kernel numbers (`fytap0`, `fytap1`, ...).
pub const TAP_NAME_PATTERN: &str = "fytap%d";
/// What every TAP Ferry makes is called, before its number.
pub const TAP_PREFIX: &str = "fytap";

/// Creating or attaching a TAP failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The bridge the VM's network names does not exist in this host's namespace.
    #[error("bridge '{0}' does not exist on this host")]
    NoBridge(String),
    /// An interface name that cannot be one.
    #[error("'{0}' is not a valid interface name (1 to 15 bytes, no NUL)")]
    BadName(String),
    /// A system call failed.
    #[error("{operation} failed: {source}")]
    Sys {
        /// What was attempted.
        operation: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn sys(operation: impl Into<String>) -> impl FnOnce(std::io::Error) -> TapError {
    let operation = operation.into();
    move |source| TapError::Sys { operation, source }
}

/// An `ifreq` with `name` in it.
fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.into()));
    }
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// The index of interface `name`, if it exists here.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Whether `name` is a bridge in this thread's network namespace: its driver, as ethtool
/// reports it, is `bridge`. (Not `/sys/class/net`: sysfs shows the namespace it was mounted
/// in, not the caller's.)
pub fn bridge_exists(name: &str) -> bool {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo`: the command, then the driver's name; the rest is room.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 192],
    }
    let Ok(mut req) = ifreq(name) else {
        return false;
    };
    let Ok(socket) = control_socket() else {
        return false;
    };
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 192],
    };
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    if ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req).is_err() {
        return false;
    }
    info.driver.split(|&b| b == 0).next() == Some(b"bridge".as_slice())
}

fn control_socket() -> Result<OwnedFd, TapError> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("opening a socket for interface ioctls")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: RawFd, request: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: `req` is a valid ifreq for the request's duration; every request used here takes
    // an ifreq.
    let ret = unsafe { libc::ioctl(fd, request as _, req as *mut libc::ifreq) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A TAP device this process created.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    bridge: Option<String>,
}

impl Tap {
    /// Creates a TAP, down and on no bridge, with the device's MTU and no IPv6 of the host's
    /// own on it (the host stack would otherwise talk to the guest through it).
    pub fn create() -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(sys("opening /dev/net/tun"))?;
        let mut req = ifreq(TAP_NAME_PATTERN)?;
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        ioctl(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(sys("creating a TAP (TUNSETIFF)"))?;
        // SAFETY: the kernel wrote a NUL-terminated name into the array.
        let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let tap = Tap {
            file,
            name,
            bridge: None,
        };
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
            "1",
        );
        let socket = control_socket()?;
        let mut req = ifreq(&tap.name)?;
        req.ifr_ifru.ifru_mtu = i32::from(MTU);
        ioctl(socket.as_raw_fd(), libc::SIOCSIFMTU, &mut req)
            .map_err(sys(format!("setting the MTU of {}", tap.name)))?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bridge it is a port of, if any.
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_deref()
    }

    /// Makes it a port of `bridge` and brings it up.
    pub fn attach(&mut self, bridge: &str) -> Result<(), TapError> {
        if self.bridge.as_deref() == Some(bridge) {
            return Ok(());
        }
        if !bridge_exists(bridge) {
            return Err(TapError::NoBridge(bridge.into()));
        }
        let index = interface_index(&self.name).ok_or_else(|| TapError::Sys {
            operation: format!("finding {}", self.name),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })?;
        let socket = control_socket()?;
        let mut req = ifreq(bridge)?;
        req.ifr_ifru.ifru_ifindex = index as i32;
        ioctl(socket.as_raw_fd(), SIOCBRADDIF, &mut req)
            .map_err(sys(format!("adding {} to bridge {bridge}", self.name)))?;
        let mut req = ifreq(&self.name)?;
        ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)
            .map_err(sys(format!("reading the flags of {}", self.name)))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
            .map_err(sys(format!("bringing {} up", self.name)))?;
        self.bridge = Some(bridge.into());
        Ok(())
    }

    /// The descriptor to poll for frames.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameIo for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let sent = self.file.write(frame)?;
        if sent != frame.len() {
            return Err(std::io::Error::other(format!(
                "the TAP took {sent} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }
}
