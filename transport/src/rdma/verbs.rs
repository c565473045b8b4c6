//! Owned wrappers around the librdmacm and libibverbs objects the data path uses, each
//! released exactly once on drop, and the one blocking primitive both sides need: wait for
//! completions on a queue pair's completion queue with a deadline.
//!
//! Drop order matters to verbs (a queue pair before its completion queue, a memory region
//! before its protection domain, every id before its event channel); the owners in
//! `sender.rs` and `receiver.rs` declare their fields in that order.

use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_access_flags, ibv_ack_cq_events, ibv_alloc_pd, ibv_comp_channel, ibv_cq,
    ibv_create_comp_channel, ibv_create_cq, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_comp_channel,
    ibv_destroy_cq, ibv_get_cq_event, ibv_get_device_name, ibv_gid, ibv_mr, ibv_pd, ibv_poll_cq,
    ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_type, ibv_query_gid, ibv_query_qp,
    ibv_reg_mr, ibv_req_notify_cq, ibv_wc, ibv_wc_status, ibv_wc_status_str, rdma_ack_cm_event,
    rdma_cm_event, rdma_cm_event_type, rdma_cm_id, rdma_create_event_channel, rdma_create_id,
    rdma_create_qp, rdma_destroy_event_channel, rdma_destroy_id, rdma_destroy_qp,
    rdma_event_channel, rdma_event_str, rdma_get_cm_event, rdma_port_space,
};

use super::RdmaError;

/// Turns a verbs-style return code (0, or -1 with errno, or a positive errno) into a result.
pub(crate) fn check(rc: libc::c_int, what: &'static str) -> Result<(), RdmaError> {
    match rc {
        0 => Ok(()),
        -1 => Err(RdmaError::Verbs {
            call: what,
            source: io::Error::last_os_error(),
        }),
        errno => Err(RdmaError::Verbs {
            call: what,
            source: io::Error::from_raw_os_error(errno.abs()),
        }),
    }
}

fn null_error(what: &'static str) -> RdmaError {
    RdmaError::Verbs {
        call: what,
        source: io::Error::last_os_error(),
    }
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
pub(crate) fn wait_readable(fd: libc::c_int, timeout: Duration) -> Result<bool, RdmaError> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().clamp(0, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid, exclusively borrowed pollfd.
    let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(RdmaError::Verbs {
            call: "poll",
            source: err,
        });
    }
    Ok(rc > 0)
}

fn set_nonblocking(fd: libc::c_int, what: &'static str) -> Result<(), RdmaError> {
    // SAFETY: F_GETFL on a descriptor this module owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(null_error(what));
    }
    // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    check(rc, what)
}

/// A socket address in the C layout librdmacm takes.
pub(crate) fn sockaddr_of(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write(ptr::from_mut(&mut storage).cast(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { ptr::write(ptr::from_mut(&mut storage).cast(), sin6) };
        }
    }
    storage
}

/// An rdma_cm event channel: connection events of every id created on it.
#[derive(Debug)]
pub(crate) struct EventChannel(*mut rdma_event_channel);

// SAFETY: librdmacm's event channel is a file descriptor plus kernel state; rdma_get_cm_event
// may be called from any thread, and this crate calls it from one thread at a time.
unsafe impl Send for EventChannel {}
// SAFETY: as for Send: only the fd is read concurrently (by poll), which is thread-safe.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub(crate) fn new() -> Result<Self, RdmaError> {
        // SAFETY: no preconditions; NULL on failure.
        let raw = unsafe { rdma_create_event_channel() };
        if raw.is_null() {
            return Err(null_error("rdma_create_event_channel"));
        }
        let channel = Self(raw);
        set_nonblocking(channel.fd(), "fcntl(event channel)")?;
        Ok(channel)
    }

    pub(crate) fn raw(&self) -> *mut rdma_event_channel {
        self.0
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: the channel is live for as long as self.
        unsafe { (*self.0).fd }
    }

    /// The next connection event, or `None` if none arrives within `timeout`.
    pub(crate) fn next(&self, timeout: Duration) -> Result<Option<CmEvent>, RdmaError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut event: *mut rdma_cm_event = ptr::null_mut();
            // SAFETY: the channel is live; `event` is a valid out pointer. The fd is
            // non-blocking, so this returns EAGAIN when no event is queued.
            let rc = unsafe { rdma_get_cm_event(self.0, &mut event) };
            if rc == 0 {
                return Ok(Some(CmEvent(event)));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(RdmaError::Verbs {
                    call: "rdma_get_cm_event",
                    source: err,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(self.fd(), left)? {
                return Ok(None);
            }
        }
    }

    /// Waits for an event on `id` of kind `wanted`; any other outcome of that id is an error
    /// naming what happened instead.
    pub(crate) fn expect(
        &self,
        id: *mut rdma_cm_id,
        wanted: rdma_cm_event_type::Type,
        timeout: Duration,
        peer: SocketAddr,
    ) -> Result<CmEvent, RdmaError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(event) = self.next(left)? else {
                return Err(RdmaError::Timeout {
                    waiting_for: event_name(wanted),
                    peer,
                    after: timeout,
                });
            };
            if event.id() != id {
                // An event of another id on the same channel (a late disconnect of a
                // previous attempt, say): not ours to act on.
                continue;
            }
            if event.kind() == wanted {
                return Ok(event);
            }
            let said = event.private_data();
            let said = String::from_utf8_lossy(&said);
            let said = said.trim_end_matches('\0').trim();
            let mut detail = connection_detail(event.kind(), event.status());
            if !said.is_empty() && said.chars().all(|c| !c.is_control()) {
                detail = format!("{detail}: {said}");
            }
            return Err(RdmaError::Connection {
                peer,
                event: event_name(event.kind()),
                detail,
            });
        }
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_event_channel, destroyed once, after every id on it
        // (the owners drop their ids first).
        unsafe { rdma_destroy_event_channel(self.0) };
    }
}

/// What a connection failure event means, in words.
fn connection_detail(kind: rdma_cm_event_type::Type, status: i32) -> String {
    match kind {
        // IB CM reject reasons: 8 is "invalid service id" (no listener on that port), 28
        // "consumer defined" (the peer's application rejected).
        rdma_cm_event_type::RDMA_CM_EVENT_REJECTED if status == 8 || status == 111 => {
            "connection refused (nothing listens for RDMA there)".into()
        }
        rdma_cm_event_type::RDMA_CM_EVENT_REJECTED if status == 28 => {
            "connection rejected by the peer".into()
        }
        rdma_cm_event_type::RDMA_CM_EVENT_REJECTED => {
            format!("connection rejected by the peer (status {status})")
        }
        rdma_cm_event_type::RDMA_CM_EVENT_UNREACHABLE => "peer unreachable".into(),
        rdma_cm_event_type::RDMA_CM_EVENT_ADDR_ERROR => {
            "address resolution failed: no RDMA device serves a route to that address".into()
        }
        rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_ERROR => "route resolution failed".into(),
        _ if status != 0 => format!(
            "status {status} ({})",
            io::Error::from_raw_os_error(status.abs())
        ),
        _ => "unexpected event".into(),
    }
}

/// The name librdmacm gives an event kind.
pub(crate) fn event_name(kind: rdma_cm_event_type::Type) -> String {
    // SAFETY: rdma_event_str returns a static string for any value.
    let raw = unsafe { rdma_event_str(kind) };
    if raw.is_null() {
        return format!("event {kind}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned()
}

/// A received connection event; acknowledged on drop.
#[derive(Debug)]
pub(crate) struct CmEvent(*mut rdma_cm_event);

impl CmEvent {
    pub(crate) fn kind(&self) -> rdma_cm_event_type::Type {
        // SAFETY: the event is live until acknowledged in drop.
        unsafe { (*self.0).event }
    }

    pub(crate) fn status(&self) -> i32 {
        // SAFETY: as in kind.
        unsafe { (*self.0).status }
    }

    pub(crate) fn id(&self) -> *mut rdma_cm_id {
        // SAFETY: as in kind.
        unsafe { (*self.0).id }
    }

    /// The private data of a connect request or accept, copied out.
    pub(crate) fn private_data(&self) -> Vec<u8> {
        // SAFETY: the event is live until acknowledged in drop.
        let event = unsafe { &*self.0 };
        // SAFETY: for connection events the `conn` member of the union is the active one;
        // the pointer and length come from librdmacm and stay valid until the ack.
        let conn = unsafe { &event.param.conn };
        let (data, len) = (conn.private_data, conn.private_data_len);
        if data.is_null() {
            return Vec::new();
        }
        // SAFETY: librdmacm guarantees `len` readable bytes at `data` until the ack.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), usize::from(len)) }.to_vec()
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: acknowledged exactly once.
        unsafe { rdma_ack_cm_event(self.0) };
    }
}

/// An rdma_cm id, with the queue pair created on it if any.
#[derive(Debug)]
pub(crate) struct CmId(*mut rdma_cm_id);

// SAFETY: an id is used by one thread at a time (its owner); librdmacm does not tie ids to
// threads.
unsafe impl Send for CmId {}
// SAFETY: shared access only reads fields set at connection time (verbs, qp, port).
unsafe impl Sync for CmId {}

impl CmId {
    pub(crate) fn new(channel: &EventChannel) -> Result<Self, RdmaError> {
        let mut id: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live; `id` is a valid out pointer.
        let rc = unsafe {
            rdma_create_id(
                channel.raw(),
                &mut id,
                ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        };
        check(rc, "rdma_create_id")?;
        Ok(Self(id))
    }

    /// Takes ownership of an id librdmacm created (that of a connect request).
    pub(crate) fn adopt(id: *mut rdma_cm_id) -> Self {
        Self(id)
    }

    pub(crate) fn raw(&self) -> *mut rdma_cm_id {
        self.0
    }

    /// The device context the id is bound to, once its address is resolved or bound.
    pub(crate) fn context(&self) -> *mut rdma_sys::ibv_context {
        // SAFETY: the id is live.
        unsafe { (*self.0).verbs }
    }

    pub(crate) fn port(&self) -> u8 {
        // SAFETY: the id is live.
        unsafe { (*self.0).port_num }
    }

    pub(crate) fn qp(&self) -> *mut rdma_sys::ibv_qp {
        // SAFETY: the id is live.
        unsafe { (*self.0).qp }
    }

    /// Creates the id's reliable-connected queue pair, both queues on `cq`.
    pub(crate) fn create_qp(
        &self,
        pd: &ProtectionDomain,
        cq: &CompletionQueue,
        send_depth: u32,
        recv_depth: u32,
    ) -> Result<(), RdmaError> {
        // SAFETY: all-zero is a valid ibv_qp_init_attr (null pointers, zero counts).
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.raw();
        attr.recv_cq = cq.raw();
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.cap.max_send_wr = send_depth;
        attr.cap.max_recv_wr = recv_depth;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        // SAFETY: the id, pd and cq are live and of the same device context.
        let rc = unsafe { rdma_create_qp(self.0, pd.raw(), &mut attr) };
        check(rc, "rdma_create_qp")
    }

    /// Device name, port, source GID and path MTU of the connected queue pair.
    pub(crate) fn describe(&self) -> super::LinkInfo {
        let context = self.context();
        let device = if context.is_null() {
            String::from("?")
        } else {
            // SAFETY: a bound id's context is live while the id is.
            let device = unsafe { (*context).device };
            // SAFETY: and so is its device.
            let name = unsafe { ibv_get_device_name(device) };
            if name.is_null() {
                String::from("?")
            } else {
                // SAFETY: non-null, NUL-terminated, owned by the device.
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            }
        };
        let mut gid = ibv_gid { raw: [0; 16] };
        let mut mtu = 0;
        let qp = self.qp();
        if !qp.is_null() {
            // SAFETY: all-zero is valid for both attribute structs.
            let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            let mask = (ibv_qp_attr_mask::IBV_QP_PATH_MTU | ibv_qp_attr_mask::IBV_QP_AV).0;
            // SAFETY: the qp is live; both out structs are valid.
            let rc = unsafe { ibv_query_qp(qp, &mut attr, mask as i32, &mut init) };
            if rc == 0 {
                mtu = 128u32 << attr.path_mtu.clamp(1, 5);
                let index = attr.ah_attr.grh.sgid_index;
                // SAFETY: the context is live; `gid` is a valid out value.
                let _ = unsafe { ibv_query_gid(context, self.port(), i32::from(index), &mut gid) };
            }
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        let raw = unsafe { gid.raw };
        super::LinkInfo {
            device,
            port: self.port(),
            gid: format_gid(&raw),
            mtu,
        }
    }
}

/// A GID in the colon-separated form of `ibv_devinfo -v`, or the IPv4 address of a RoCEv2
/// IPv4-mapped GID.
pub(crate) fn format_gid(raw: &[u8; 16]) -> String {
    let v6 = std::net::Ipv6Addr::from(*raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("::ffff:{v4}"),
        None => v6.to_string(),
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        if !self.qp().is_null() {
            // SAFETY: the qp was created by rdma_create_qp on this id and is destroyed once.
            unsafe { rdma_destroy_qp(self.0) };
        }
        // SAFETY: the id is destroyed once; its events have all been acknowledged (CmEvent
        // acknowledges on drop and never outlives the owner's setup code).
        unsafe { rdma_destroy_id(self.0) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub(crate) struct ProtectionDomain(*mut ibv_pd);

// SAFETY: verbs objects are thread-safe; the pointer is only passed to verbs calls.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as for Send.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub(crate) fn new(context: *mut rdma_sys::ibv_context) -> Result<Self, RdmaError> {
        // SAFETY: `context` is a live device context (that of a bound id).
        let pd = unsafe { ibv_alloc_pd(context) };
        if pd.is_null() {
            return Err(null_error("ibv_alloc_pd"));
        }
        Ok(Self(pd))
    }

    pub(crate) fn raw(&self) -> *mut ibv_pd {
        self.0
    }

    pub(crate) fn context(&self) -> *mut rdma_sys::ibv_context {
        // SAFETY: the pd is live.
        unsafe { (*self.0).context }
    }

    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    ///
    /// The memory must stay mapped for as long as the region lives, and remote access may
    /// only be granted to memory no Rust reference points into while the peer can write it.
    pub(crate) unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: ibv_access_flags,
    ) -> Result<MemoryRegion, RdmaError> {
        // SAFETY: the caller guarantees the mapping; the pd is live.
        let mr = unsafe { ibv_reg_mr(self.0, addr.cast(), len, access.0 as i32) };
        if mr.is_null() {
            return Err(RdmaError::Register {
                bytes: len as u64,
                source: io::Error::last_os_error(),
            });
        }
        Ok(MemoryRegion(mr))
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: deallocated once, after every region and queue pair of it.
        unsafe { ibv_dealloc_pd(self.0) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub(crate) struct MemoryRegion(*mut ibv_mr);

// SAFETY: a registration is a kernel object; its keys are plain integers.
unsafe impl Send for MemoryRegion {}
// SAFETY: as for Send.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: the region is live.
        unsafe { (*self.0).lkey }
    }

    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: the region is live.
        unsafe { (*self.0).rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: deregistered once, after the queue pairs that used it are gone.
        unsafe { ibv_dereg_mr(self.0) };
    }
}

/// A completion queue with its own completion channel, so a waiting thread sleeps in
/// `poll(2)` instead of spinning.
#[derive(Debug)]
pub(crate) struct CompletionQueue {
    cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    /// Completion events taken but not yet acknowledged (acknowledged in batches and on drop).
    unacked: u32,
}

// SAFETY: owned and used by one thread at a time.
unsafe impl Send for CompletionQueue {}

/// One work completion, as far as this crate reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    pub wr_id: u64,
    pub status: ibv_wc_status::Type,
    pub opcode: rdma_sys::ibv_wc_opcode::Type,
    pub byte_len: u32,
}

impl Completion {
    pub(crate) fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }
}

/// The words libibverbs has for a completion status.
pub(crate) fn status_text(status: ibv_wc_status::Type) -> String {
    // SAFETY: returns a static string for any value.
    let raw = unsafe { ibv_wc_status_str(status) };
    if raw.is_null() {
        return format!("status {status}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned()
}

impl CompletionQueue {
    pub(crate) fn new(
        context: *mut rdma_sys::ibv_context,
        entries: i32,
    ) -> Result<Self, RdmaError> {
        // SAFETY: `context` is a live device context.
        let channel = unsafe { ibv_create_comp_channel(context) };
        if channel.is_null() {
            return Err(null_error("ibv_create_comp_channel"));
        }
        // SAFETY: the channel is live and belongs to `context`.
        let cq = unsafe { ibv_create_cq(context, entries, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let err = null_error("ibv_create_cq");
            // SAFETY: created above, not used by anything yet.
            unsafe { ibv_destroy_comp_channel(channel) };
            return Err(err);
        }
        let queue = Self {
            cq,
            channel,
            unacked: 0,
        };
        // SAFETY: the channel is live.
        let fd = unsafe { (*channel).fd };
        set_nonblocking(fd, "fcntl(completion channel)")?;
        Ok(queue)
    }

    pub(crate) fn raw(&self) -> *mut ibv_cq {
        self.cq
    }

    /// Takes up to `out.len()` completions without waiting.
    fn poll_now(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError> {
        // SAFETY: all-zero is a valid ibv_wc.
        let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        let want = max.min(wcs.len()) as i32;
        // SAFETY: the cq is live; `wcs` has room for `want` entries.
        let n = unsafe { ibv_poll_cq(self.cq, want, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(RdmaError::Verbs {
                call: "ibv_poll_cq",
                source: io::Error::from_raw_os_error(-n),
            });
        }
        for wc in &wcs[..n as usize] {
            out.push(Completion {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
            });
        }
        Ok(n as usize)
    }

    /// Appends available completions to `out`, sleeping up to `timeout` for the first one.
    /// Returns how many arrived (0 on timeout).
    pub(crate) fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, RdmaError> {
        let n = self.poll_now(out, 16)?;
        if n > 0 {
            return Ok(n);
        }
        // Arm the notification, then poll again: a completion that arrived between the first
        // poll and arming raises no event, but the second poll sees it.
        // SAFETY: the cq is live.
        let rc = unsafe { ibv_req_notify_cq(self.cq, 0) };
        check(rc, "ibv_req_notify_cq")?;
        let n = self.poll_now(out, 16)?;
        if n > 0 {
            return Ok(n);
        }
        // SAFETY: the channel is live.
        let fd = unsafe { (*self.channel).fd };
        if !wait_readable(fd, timeout)? {
            return Ok(0);
        }
        let mut cq: *mut ibv_cq = ptr::null_mut();
        let mut context: *mut libc::c_void = ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; out pointers are valid.
        let rc = unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut context) };
        if rc == 0 {
            self.unacked += 1;
            if self.unacked >= 64 {
                // SAFETY: acknowledges events taken from this cq.
                unsafe { ibv_ack_cq_events(self.cq, self.unacked) };
                self.unacked = 0;
            }
        }
        self.poll_now(out, 16)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        if self.unacked > 0 {
            // SAFETY: acknowledges the events taken from this cq, before destroying it.
            unsafe { ibv_ack_cq_events(self.cq, self.unacked) };
        }
        // SAFETY: destroyed once, after the queue pairs using it (their ids drop first).
        unsafe { ibv_destroy_cq(self.cq) };
        // SAFETY: destroyed once, after its only cq.
        unsafe { ibv_destroy_comp_channel(self.channel) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_read_as_addresses() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 99, 0, 1]);
        assert_eq!(format_gid(&raw), "::ffff:10.99.0.1");
        let mut link_local = [0u8; 16];
        link_local[0] = 0xfe;
        link_local[1] = 0x80;
        link_local[15] = 1;
        assert_eq!(format_gid(&link_local), "fe80::1");
    }

    #[test]
    fn socket_addresses_convert_to_the_c_layout() {
        let storage = sockaddr_of("10.0.0.2:7471".parse().unwrap());
        // SAFETY: sockaddr_of wrote a sockaddr_in for an IPv4 address.
        let sin: libc::sockaddr_in = unsafe { ptr::read(ptr::from_ref(&storage).cast()) };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u16::from_be(sin.sin_port), 7471);
        assert_eq!(u32::from_be(sin.sin_addr.s_addr), 0x0a00_0002);
    }

    #[test]
    fn return_codes_become_errors() {
        assert!(check(0, "x").is_ok());
        let err = check(libc::ENOMEM, "ibv_x").unwrap_err();
        assert!(err.to_string().contains("ibv_x"), "{err}");
    }
}
