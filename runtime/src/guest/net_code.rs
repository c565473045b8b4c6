//! Machine code of the `net` guest (see [`super::net`]): a polling virtio-mmio virtio-net
//! driver at CPL 3 that sends numbered frames and answers echo requests.

use iced_x86::IcedError;
use iced_x86::code_asm::*;

use super::code::{idle, mmio, out32, read_tsc, virtio_negotiate, virtio_queue};
use super::net::{
    ETHERTYPE, FRAME_LEN, KIND_DATA, KIND_ECHO_REPLY, KIND_ECHO_REQUEST, MAGIC, NET_NO_DEVICE,
    NET_QUEUE_SIZE, RX_BUFFER, area, state,
};
use super::params::offsets;
use crate::devices::virtio::net::NET_HDR_LEN;
use crate::layout::{self, TEST_PORT_EXIT, TEST_PORT_FAIL};

/// Labels the `net` guest shares with the rest of the code.
pub(super) struct NetLabels<'a> {
    pub entry: &'a mut CodeLabel,
    pub spin: CodeLabel,
    pub print_str: CodeLabel,
    pub msg: CodeLabel,
    pub msg_ready: CodeLabel,
}

/// Registers: R8 device registers, RBX driver's area, R12 receive entries consumed, R14 TSC
/// cycles per frame, R15 next frame's deadline, RBP slack before the deadline is moved to
/// now (a paused guest does not burst to catch up), RSI parameters.
pub(super) fn net_guest(a: &mut CodeAssembler, l: NetLabels<'_>) -> Result<(), IcedError> {
    const F_WRITE: u32 = 2;
    // VIRTIO_NET_F_MAC (5) and VIRTIO_NET_F_STATUS (16) in word 0; VERSION_1 in word 1.
    const FEATURES_LOW: u32 = (1 << 5) | (1 << 16);
    let st = |offset: u64| (layout::GUEST_STATE + offset) as i32;
    let frame = (area::TX_BUF + NET_HDR_LEN as u64) as i32;
    // Ethertype as a little-endian word load sees the big-endian bytes.
    let ethertype_word = u32::from(ETHERTYPE.swap_bytes());
    let magic = u32::from_le_bytes(MAGIC);

    let mut no_device = a.create_label();
    let mut main = a.create_label();
    let mut early = a.create_label();
    let mut on_time = a.create_label();
    let mut send = a.create_label();
    let mut rx_poll = a.create_label();

    a.set_label(l.entry)?;
    a.test(edi, edi)?;
    a.jnz(l.spin)?;
    a.mov(r8, qword_ptr(rsi + offsets::VIRTIO_BASE))?;
    a.mov(rbx, qword_ptr(rsi + offsets::NET_AREA))?;
    a.mov(r14, qword_ptr(rsi + offsets::TSC_PER_FRAME))?;
    a.mov(rbp, r14)?;
    a.shl(rbp, 4)?;
    a.lea(rcx, ptr(l.msg))?;
    a.call(l.print_str)?;
    virtio_negotiate(a, 1, FEATURES_LOW, no_device)?;
    virtio_queue(
        a,
        0,
        NET_QUEUE_SIZE,
        rbx,
        [area::RX_DESC, area::RX_AVAIL, area::RX_USED],
        no_device,
    )?;
    virtio_queue(
        a,
        1,
        NET_QUEUE_SIZE,
        rbx,
        [area::TX_DESC, area::TX_AVAIL, area::TX_USED],
        no_device,
    )?;
    // Receive descriptor i: buffer i, device-writable; all of them posted.
    {
        let mut fill = a.create_label();
        a.xor(ecx, ecx)?;
        a.set_label(&mut fill)?;
        a.mov(rax, rcx)?;
        a.shl(rax, RX_BUFFER.trailing_zeros())?;
        a.lea(rax, ptr(rbx + rax + area::RX_BUFS as i32))?;
        a.mov(rdx, rcx)?;
        a.shl(rdx, 4)?;
        a.mov(qword_ptr(rbx + rdx + area::RX_DESC as i32), rax)?;
        a.mov(
            dword_ptr(rbx + rdx + (area::RX_DESC + 8) as i32),
            RX_BUFFER as u32,
        )?;
        a.mov(word_ptr(rbx + rdx + (area::RX_DESC + 12) as i32), F_WRITE)?;
        a.mov(word_ptr(rbx + rdx + (area::RX_DESC + 14) as i32), 0)?;
        a.mov(word_ptr(rbx + rcx * 2 + (area::RX_AVAIL + 4) as i32), cx)?;
        a.inc(ecx)?;
        a.cmp(ecx, NET_QUEUE_SIZE)?;
        a.jb(fill)?;
        a.mov(word_ptr(rbx + (area::RX_AVAIL + 2) as i32), NET_QUEUE_SIZE)?;
    }
    // Transmit descriptor 0: the one frame buffer, header included.
    a.lea(rax, ptr(rbx + area::TX_BUF as i32))?;
    a.mov(qword_ptr(rbx + area::TX_DESC as i32), rax)?;
    a.mov(
        dword_ptr(rbx + (area::TX_DESC + 8) as i32),
        (NET_HDR_LEN + FRAME_LEN) as u32,
    )?;
    a.mov(dword_ptr(rbx + (area::TX_DESC + 12) as i32), 0)?;
    a.mov(dword_ptr(r8 + mmio::STATUS), 0xf)?;
    a.mov(dword_ptr(r8 + mmio::QUEUE_NOTIFY), 0)?;
    // Own MAC from the configuration space; the peer is broadcast until a request comes.
    a.mov(eax, dword_ptr(r8 + mmio::CONFIG))?;
    a.mov(dword_ptr(st(state::MAC)), eax)?;
    a.movzx(eax, word_ptr(r8 + (mmio::CONFIG + 4)))?;
    a.mov(word_ptr(st(state::MAC + 4)), ax)?;
    a.mov(dword_ptr(st(state::PEER)), u32::MAX)?;
    a.mov(word_ptr(st(state::PEER + 4)), 0xffff)?;
    a.lea(rcx, ptr(l.msg_ready))?;
    a.call(l.print_str)?;
    a.xor(r12d, r12d)?;
    read_tsc(a)?;
    a.mov(r15, rax)?;

    // The loop: answer what came in, then send the next numbered frame when it is due.
    a.set_label(&mut main)?;
    a.call(rx_poll)?;
    read_tsc(a)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, r15)?;
    a.js(early)?;
    a.cmp(rdx, rbp)?;
    a.jbe(on_time)?;
    a.mov(r15, rax)?;
    a.set_label(&mut on_time)?;
    a.add(r15, r14)?;
    a.mov(eax, u32::from(KIND_DATA))?;
    a.mov(rcx, qword_ptr(st(state::SENT)))?;
    a.mov(rdx, qword_ptr(st(state::ANSWERED)))?;
    a.mov(r9, layout::GUEST_STATE + state::PEER)?;
    a.call(send)?;
    a.inc(qword_ptr(st(state::SENT)))?;
    a.jmp(main)?;
    a.set_label(&mut early)?;
    a.mov(rax, rdx)?;
    a.neg(rax)?;
    idle(a)?;
    a.jmp(main)?;

    a.set_label(&mut no_device)?;
    a.mov(eax, NET_NO_DEVICE)?;
    out32(a, TEST_PORT_FAIL)?;
    a.mov(eax, 1)?;
    out32(a, TEST_PORT_EXIT)?;
    a.jmp(l.spin)?;

    // send: AL kind, RCX sequence, RDX extra, R9 destination MAC. Builds the frame, posts it,
    // rings the doorbell and polls until the device has used it. Clobbers RAX, RCX, RDX, RDI,
    // R10.
    {
        a.set_label(&mut send)?;
        let mut wait = a.create_label();
        a.lea(rdi, ptr(rbx + frame))?;
        a.mov(r10d, dword_ptr(r9))?;
        a.mov(dword_ptr(rdi), r10d)?;
        a.movzx(r10d, word_ptr(r9 + 4))?;
        a.mov(word_ptr(rdi + 4), r10w)?;
        a.mov(r10d, dword_ptr(st(state::MAC)))?;
        a.mov(dword_ptr(rdi + 6), r10d)?;
        a.movzx(r10d, word_ptr(st(state::MAC + 4)))?;
        a.mov(word_ptr(rdi + 10), r10w)?;
        a.mov(word_ptr(rdi + 12), ethertype_word)?;
        a.mov(dword_ptr(rdi + 14), magic)?;
        a.mov(byte_ptr(rdi + 18), al)?;
        a.mov(qword_ptr(rdi + 24), rcx)?;
        a.mov(qword_ptr(rdi + 32), rdx)?;
        a.movzx(edx, word_ptr(rbx + (area::TX_AVAIL + 2) as i32))?;
        a.mov(ecx, edx)?;
        a.and(ecx, (NET_QUEUE_SIZE - 1) as i32)?;
        a.mov(word_ptr(rbx + rcx * 2 + (area::TX_AVAIL + 4) as i32), 0)?;
        a.inc(edx)?;
        a.mov(word_ptr(rbx + (area::TX_AVAIL + 2) as i32), dx)?;
        a.mov(dword_ptr(r8 + mmio::QUEUE_NOTIFY), 1)?;
        a.set_label(&mut wait)?;
        a.pause()?;
        a.movzx(eax, word_ptr(rbx + (area::TX_USED + 2) as i32))?;
        a.cmp(ax, dx)?;
        a.jne(wait)?;
        a.ret()?;
    }

    // rx_poll: every used receive entry: count it, answer it if it is a request, post its
    // buffer again. Clobbers RAX, RCX, RDX, RDI, R9, R10, R11.
    {
        a.set_label(&mut rx_poll)?;
        let mut ignore = a.create_label();
        let mut repost = a.create_label();
        let mut done = a.create_label();
        a.movzx(eax, word_ptr(rbx + (area::RX_USED + 2) as i32))?;
        a.cmp(ax, r12w)?;
        a.je(done)?;
        a.mov(ecx, r12d)?;
        a.and(ecx, (NET_QUEUE_SIZE - 1) as i32)?;
        a.mov(r11d, dword_ptr(rbx + rcx * 8 + (area::RX_USED + 4) as i32))?;
        a.and(r11d, (NET_QUEUE_SIZE - 1) as i32)?;
        a.push(r11)?;
        a.shl(r11, RX_BUFFER.trailing_zeros())?;
        a.lea(
            r11,
            ptr(rbx + r11 + (area::RX_BUFS + NET_HDR_LEN as u64) as i32),
        )?;
        a.inc(qword_ptr(st(state::RECEIVED)))?;
        a.cmp(word_ptr(r11 + 12), ethertype_word)?;
        a.jne(ignore)?;
        a.cmp(dword_ptr(r11 + 14), magic)?;
        a.jne(ignore)?;
        a.cmp(byte_ptr(r11 + 18), u32::from(KIND_ECHO_REQUEST))?;
        a.jne(ignore)?;
        a.mov(eax, dword_ptr(r11 + 6))?;
        a.mov(dword_ptr(st(state::PEER)), eax)?;
        a.movzx(eax, word_ptr(r11 + 10))?;
        a.mov(word_ptr(st(state::PEER + 4)), ax)?;
        a.mov(rcx, qword_ptr(r11 + 24))?;
        a.mov(qword_ptr(st(state::LAST_ECHO)), rcx)?;
        a.inc(qword_ptr(st(state::ANSWERED)))?;
        a.mov(rdx, qword_ptr(st(state::ANSWERED)))?;
        a.mov(eax, u32::from(KIND_ECHO_REPLY))?;
        a.mov(r9, layout::GUEST_STATE + state::PEER)?;
        a.call(send)?;
        a.jmp(repost)?;
        a.set_label(&mut ignore)?;
        a.inc(qword_ptr(st(state::IGNORED)))?;
        a.set_label(&mut repost)?;
        a.pop(r11)?;
        a.movzx(edx, word_ptr(rbx + (area::RX_AVAIL + 2) as i32))?;
        a.mov(ecx, edx)?;
        a.and(ecx, (NET_QUEUE_SIZE - 1) as i32)?;
        a.mov(word_ptr(rbx + rcx * 2 + (area::RX_AVAIL + 4) as i32), r11w)?;
        a.inc(edx)?;
        a.mov(word_ptr(rbx + (area::RX_AVAIL + 2) as i32), dx)?;
        a.mov(dword_ptr(r8 + mmio::QUEUE_NOTIFY), 0)?;
        a.inc(r12d)?;
        a.jmp(rx_poll)?;
        a.set_label(&mut done)?;
        a.ret()?;
    }
    Ok(())
}
