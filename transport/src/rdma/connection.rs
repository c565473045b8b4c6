//! One connected queue pair with its completion queue and message buffers: posting writes
//! with bounded work in flight and one signalled completion per batch, sending and receiving
//! the small [`Message`]s, and turning every completion error into an [`RdmaError`].

use std::collections::VecDeque;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_access_flags, ibv_post_recv, ibv_post_send, ibv_recv_wr, ibv_send_flags, ibv_send_wr,
    ibv_sge, ibv_wc_status, ibv_wr_opcode, rdma_conn_param,
};

use super::RdmaError;
use super::message::{Message, SLOT};
use super::verbs::{
    CmId, Completion, CompletionQueue, MemoryRegion, ProtectionDomain, check, status_text,
};

/// Message slots per connection: one to send round markers, one for acks and abandons, one
/// for keepalives, the rest posted as receives. Keepalives have their own slot because one
/// may be posted behind writes and not yet sent when the next marker is written: sharing
/// the buffer would let the NIC read a half-written mix of the two. (Two keepalives may
/// share theirs: their bytes are identical.)
const SLOTS: usize = 16;
const SEND_MARKER: usize = 0;
const SEND_OTHER: usize = 1;
const SEND_KEEPALIVE: usize = 2;
const RECV_FIRST: usize = 3;
/// Receive work requests carry this bit in their id, sends do not.
const RECV_TAG: u64 = 1 << 63;

/// How a connection posts writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Depth {
    /// Most write work requests in flight.
    pub outstanding: u32,
    /// One signalled completion per this many writes.
    pub signal_every: u32,
}

impl Depth {
    fn send_queue(&self) -> u32 {
        // The writes, plus a marker and an abandon or ack that may be posted behind them.
        self.outstanding + 4
    }
}

/// Connection parameters both sides use: no RDMA READ or atomics, retries as deep as the
/// hardware allows (7 RNR retries means "retry forever", and receives are always posted).
pub(crate) fn conn_param(private: &[u8]) -> rdma_conn_param {
    rdma_conn_param {
        private_data: if private.is_empty() {
            ptr::null()
        } else {
            private.as_ptr().cast()
        },
        private_data_len: private.len().min(u8::MAX as usize) as u8,
        responder_resources: 1,
        initiator_depth: 1,
        flow_control: 1,
        retry_count: 7,
        rnr_retry_count: 7,
        srq: 0,
        qp_num: 0,
    }
}

#[derive(Debug)]
pub(crate) struct Connection {
    pub stream: usize,
    // Drop order: the queue pair (with its id) first, then the completion queue, then the
    // registration of the message buffers, then the buffers.
    id: CmId,
    cq: CompletionQueue,
    msgs_mr: MemoryRegion,
    msgs: Box<[u8]>,
    depth: Depth,
    in_flight: u32,
    unsignalled: u32,
    /// Signalled send work requests not yet completed: (id, how many requests it retires).
    batches: VecDeque<(u64, u32)>,
    next_wr: u64,
    inbox: VecDeque<Message>,
    completions: Vec<Completion>,
    /// When the peer was last heard from (any message).
    pub last_heard: Instant,
    /// Set by the owner when the transfer failed elsewhere: waits give up at once.
    cancel: Arc<AtomicBool>,
}

impl Connection {
    /// Creates the queue pair on `id` (whose address and route are resolved, or which came
    /// from a connect request), registers the message buffers and posts the receives.
    pub(crate) fn new(
        stream: usize,
        id: CmId,
        pd: &ProtectionDomain,
        depth: Depth,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, RdmaError> {
        let recvs = (SLOTS - RECV_FIRST) as u32;
        let cq = CompletionQueue::new(pd.context(), (depth.send_queue() + recvs + 8) as i32)?;
        id.create_qp(pd, &cq, depth.send_queue(), recvs)?;
        let mut msgs = vec![0u8; SLOTS * SLOT].into_boxed_slice();
        // SAFETY: the buffer is heap memory owned by the connection, dropped after the
        // registration (field order); only the NIC and this code's raw-pointer copies touch
        // it while registered.
        let registered = unsafe {
            pd.register(
                msgs.as_mut_ptr(),
                msgs.len(),
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
            )
        };
        let msgs_mr = match registered {
            Ok(mr) => mr,
            Err(error) => {
                // The queue pair goes before its completion queue, as in drop.
                drop(id);
                return Err(error);
            }
        };
        let mut connection = Self {
            stream,
            id,
            cq,
            msgs_mr,
            msgs,
            depth,
            in_flight: 0,
            unsignalled: 0,
            batches: VecDeque::new(),
            next_wr: 1,
            inbox: VecDeque::new(),
            completions: Vec::with_capacity(32),
            last_heard: Instant::now(),
            cancel,
        };
        for slot in RECV_FIRST..SLOTS {
            connection.post_recv(slot)?;
        }
        Ok(connection)
    }

    pub(crate) fn id(&self) -> &CmId {
        &self.id
    }

    fn slot_addr(&self, slot: usize) -> u64 {
        self.msgs.as_ptr() as u64 + (slot * SLOT) as u64
    }

    fn post_recv(&mut self, slot: usize) -> Result<(), RdmaError> {
        let mut sge = ibv_sge {
            addr: self.slot_addr(slot),
            length: SLOT as u32,
            lkey: self.msgs_mr.lkey(),
        };
        let mut wr = ibv_recv_wr {
            wr_id: RECV_TAG | slot as u64,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the qp is live; `wr` and `sge` are valid for the call, and the buffer it
        // names is registered and outlives the queue pair.
        let rc = unsafe { ibv_post_recv(self.id.qp(), &mut wr, &mut bad) };
        check(rc, "ibv_post_recv")
    }

    fn post(
        &mut self,
        opcode: ibv_wr_opcode::Type,
        sge: ibv_sge,
        remote: Option<(u64, u32)>,
        force_signal: bool,
    ) -> Result<(), RdmaError> {
        let wr_id = self.next_wr;
        self.next_wr += 1;
        self.unsignalled += 1;
        let signalled = force_signal || self.unsignalled >= self.depth.signal_every;
        let mut sge = sge;
        // SAFETY: all-zero is a valid ibv_send_wr (null pointers, zero fields).
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = opcode;
        wr.send_flags = if signalled {
            ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        if let Some((remote_addr, rkey)) = remote {
            wr.wr.rdma = rdma_sys::rdma_t { remote_addr, rkey };
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the qp is live; `wr` and `sge` are valid for the call. The memory `sge`
        // names is registered (guest memory or the message buffers) and outlives the queue
        // pair; the remote range was checked against the destination's table.
        let rc = unsafe { ibv_post_send(self.id.qp(), &mut wr, &mut bad) };
        check(rc, "ibv_post_send")?;
        self.in_flight += 1;
        if signalled {
            self.batches.push_back((wr_id, self.unsignalled));
            self.unsignalled = 0;
        }
        Ok(())
    }

    /// Posts one RDMA WRITE of `len` bytes, first waiting (up to `stall`) while the queue is
    /// full.
    pub(crate) fn write(
        &mut self,
        local: (u64, u32),
        len: u32,
        remote: (u64, u32),
        stall: Duration,
    ) -> Result<(), RdmaError> {
        let deadline = Instant::now() + stall;
        while self.in_flight >= self.depth.outstanding {
            self.reap_until(deadline, "the NIC to complete writes", true)?;
        }
        let sge = ibv_sge {
            addr: local.0,
            length: len,
            lkey: local.1,
        };
        self.post(ibv_wr_opcode::IBV_WR_RDMA_WRITE, sge, Some(remote), false)
    }

    /// Sends `message` (signalled): behind every write posted before it.
    pub(crate) fn send(&mut self, message: &Message) -> Result<(), RdmaError> {
        let slot = match message {
            Message::Round { .. } | Message::Finish { .. } => SEND_MARKER,
            Message::Ack { .. } | Message::Abandon { .. } => SEND_OTHER,
            Message::Keepalive => SEND_KEEPALIVE,
        };
        // The slot is free: every marker, ack and abandon is drained (its completion waited
        // for) before the next of its slot is written.
        let start = slot * SLOT;
        let len = message.encode(&mut self.msgs[start..start + SLOT]);
        let sge = ibv_sge {
            addr: self.slot_addr(slot),
            length: len as u32,
            lkey: self.msgs_mr.lkey(),
        };
        self.post(ibv_wr_opcode::IBV_WR_SEND, sge, None, true)
    }

    /// Waits until every send posted so far has completed; gives up when the transfer is
    /// cancelled.
    pub(crate) fn drain(&mut self, timeout: Duration) -> Result<(), RdmaError> {
        self.drain_inner(timeout, true)
    }

    /// As [`Connection::drain`], even after cancellation: for the last words (an abandon).
    pub(crate) fn drain_final(&mut self, timeout: Duration) -> Result<(), RdmaError> {
        self.drain_inner(timeout, false)
    }

    fn drain_inner(&mut self, timeout: Duration, cancellable: bool) -> Result<(), RdmaError> {
        let deadline = Instant::now() + timeout;
        while self.in_flight > 0 {
            self.reap_until(deadline, "the NIC to complete sends", cancellable)?;
        }
        Ok(())
    }

    /// Takes the next message from the peer, waiting up to `timeout`; `None` on timeout.
    /// An `Abandon` is returned as the error it stands for.
    pub(crate) fn next_message(
        &mut self,
        timeout: Duration,
        peer: &'static str,
    ) -> Result<Option<Message>, RdmaError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.inbox.pop_front() {
                if let Message::Abandon { reason } = message {
                    return Err(RdmaError::Abandoned { side: peer, reason });
                }
                return Ok(Some(message));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reap(left)?;
        }
    }

    fn reap_until(
        &mut self,
        deadline: Instant,
        waiting_for: &'static str,
        cancellable: bool,
    ) -> Result<(), RdmaError> {
        if cancellable && self.cancel.load(Ordering::Acquire) {
            return Err(RdmaError::Aborted {
                reason: "the transfer failed elsewhere".into(),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RdmaError::Idle {
                stream: self.stream,
                waiting_for,
                after: Duration::ZERO.max(deadline.elapsed()),
            });
        }
        self.reap(left.min(Duration::from_millis(200)))
    }

    /// Handles the completions that arrive within `timeout`.
    fn reap(&mut self, timeout: Duration) -> Result<(), RdmaError> {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        let result = self
            .cq
            .wait(&mut completions, timeout)
            .and_then(|_| completions.iter().try_for_each(|c| self.complete(*c)));
        self.completions = completions;
        result
    }

    fn complete(&mut self, completion: Completion) -> Result<(), RdmaError> {
        let is_recv = completion.wr_id & RECV_TAG != 0;
        if !completion.ok() {
            let what = if completion.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                "the queue pair went to error state: a work request"
            } else if is_recv {
                "a receive"
            } else {
                "an RDMA WRITE or SEND"
            };
            return Err(RdmaError::Completion {
                stream: self.stream,
                what,
                status: status_text(completion.status),
            });
        }
        if is_recv {
            let slot = (completion.wr_id & !RECV_TAG) as usize;
            if !(RECV_FIRST..SLOTS).contains(&slot) {
                return Err(RdmaError::Protocol {
                    stream: self.stream,
                    reason: format!("completion for unknown receive slot {slot}"),
                });
            }
            let start = slot * SLOT;
            let len = (completion.byte_len as usize).min(SLOT);
            let message = Message::decode(&self.msgs[start..start + len]).map_err(|reason| {
                RdmaError::Protocol {
                    stream: self.stream,
                    reason,
                }
            })?;
            self.last_heard = Instant::now();
            self.inbox.push_back(message);
            return self.post_recv(slot);
        }
        while let Some(&(wr_id, count)) = self.batches.front() {
            if wr_id > completion.wr_id {
                break;
            }
            self.batches.pop_front();
            self.in_flight = self.in_flight.saturating_sub(count);
        }
        Ok(())
    }
}
