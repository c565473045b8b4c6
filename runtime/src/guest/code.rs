//! Machine code of the built-in guests, assembled at run time with iced-x86's `code_asm`.
//!
//! The workloads run at CPL 3 in 64-bit mode, where this machine's paravirtual KVM executes
//! natively (CPL-0 code is emulated, ~500x slower). They are entered directly by the VMM with
//! `RDI` = vCPU index, `RSI` = address of the [`GuestParams`](super::GuestParams) block,
//! `RSP` = the vCPU's stack, and IOPL 3 so `in`/`out` reach the serial port and test device.
//! The only CPL-0 code is the exception stubs, which report the vector and stop.

use std::sync::OnceLock;

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};

use super::params::offsets;
use crate::layout::{
    self, SERIAL_PORT, TEST_PORT_EXIT, TEST_PORT_FAIL, TEST_PORT_PROGRESS, TEST_PORT_SLEEP,
};

/// Exit status a guest reports when it took CPU exception `vector` (`0xE000_0000 | vector`).
pub const EXCEPTION_EXIT_BASE: u32 = 0xE000_0000;
/// Value the `verify` guest reports when the sum of its generation table is wrong, which
/// means a whole page of the table itself was lost or stale.
pub const VERIFY_TABLE_MISMATCH: u32 = u32::MAX;

/// Multipliers of the `verify` page pattern; the host-side checker uses the same values.
pub const VERIFY_MIX: u64 = 0x9E37_79B9_7F4A_7C15;
/// Difference between consecutive words of a `verify` page.
pub const VERIFY_STEP: u64 = 0x0000_0100_0000_01B3;
const LCG_MUL: u64 = 6364136223846793005;
const LCG_ADD: u64 = 1442695040888963407;

/// Assembled code and its entry points.
#[derive(Debug)]
pub struct GuestCode {
    /// Bytes to place at [`layout::CODE`].
    pub bytes: Vec<u8>,
    /// `counter` entry.
    pub counter: u64,
    /// `dirty` entry.
    pub dirty: u64,
    /// `verify` entry.
    pub verify: u64,
    /// `disk` entry.
    pub disk: u64,
    /// `net` entry.
    pub net: u64,
    /// Idle loop for vCPUs a guest does not use.
    pub spin: u64,
    /// Prints the NUL-terminated string at RCX on the serial port; clobbers RAX, RCX, RDX.
    /// Works at any CPL (the multiboot workload kernel prints its banner with it at CPL 0).
    pub print_str: u64,
    /// Prints RAX in decimal on the serial port; clobbers RAX, RCX, RDX; needs 64 bytes of
    /// stack.
    pub print_dec: u64,
    /// CPL-0 exception stubs, one per vector 0..32.
    pub exception_stubs: [u64; 32],
}

/// The code, assembled once per process.
pub fn guest_code() -> &'static GuestCode {
    static CODE: OnceLock<GuestCode> = OnceLock::new();
    CODE.get_or_init(|| {
        // The input is fixed, so failure is a bug in this file; a unit test assembles it.
        assemble().expect("built-in guest code must assemble")
    })
}

/// 64-bit TSC into RAX (clobbers RDX).
pub(super) fn read_tsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// A wait at least this many TSC cycles long parks the vCPU (about 1 ms at 2 GHz); a shorter
/// one spins with `pause`, where parking would cost more than it saves.
const SLEEP_MIN: i32 = 1 << 21;
/// The part of a parked wait left to spin, so that a deadline is still met to the cycle
/// even when the host wakes the vCPU a little late.
const SLEEP_MARGIN: i32 = 1 << 19;

/// Waits part of the RAX (> 0) TSC cycles left until a deadline, then falls through (the
/// caller reads the TSC again): far from the deadline, it parks the vCPU through the test
/// device's sleep port for all but the last `SLEEP_MARGIN` cycles, so an idle guest does not
/// burn a host core; near it, one `pause`. Clobbers RAX, RDX.
pub(super) fn idle(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut near = a.create_label();
    let mut done = a.create_label();
    a.cmp(rax, SLEEP_MIN)?;
    a.jb(near)?;
    a.sub(rax, SLEEP_MARGIN)?;
    a.mov(edx, u32::MAX)?;
    a.cmp(rax, rdx)?;
    a.cmova(rax, rdx)?;
    a.mov(dx, TEST_PORT_SLEEP as u32)?;
    a.out(dx, eax)?;
    a.jmp(done)?;
    a.set_label(&mut near)?;
    a.pause()?;
    // The caller's next instruction carries the label.
    a.set_label(&mut done)
}

pub(super) fn out32(a: &mut CodeAssembler, port: u16) -> Result<(), IcedError> {
    a.mov(dx, port as u32)?;
    a.out(dx, eax)
}

fn assemble() -> Result<GuestCode, IcedError> {
    let mut a = CodeAssembler::new(64)?;

    let mut spin = a.create_label();
    let mut print_str = a.create_label();
    let mut print_dec = a.create_label();
    let mut counter = a.create_label();
    let mut dirty = a.create_label();
    let mut verify = a.create_label();
    let mut verify_fill = a.create_label();
    let mut verify_check = a.create_label();
    let mut verify_sum = a.create_label();
    let mut msg_counter = a.create_label();
    let mut msg_tick = a.create_label();
    let mut msg_verify = a.create_label();
    let mut msg_verify_ready = a.create_label();
    let mut disk = a.create_label();
    let mut disk_submit = a.create_label();
    let mut disk_fill = a.create_label();
    let mut disk_check = a.create_label();
    let mut msg_disk = a.create_label();
    let mut msg_disk_ready = a.create_label();
    let mut net = a.create_label();
    let mut msg_net = a.create_label();
    let mut msg_net_ready = a.create_label();
    let mut stubs: Vec<CodeLabel> = (0..32).map(|_| a.create_label()).collect();
    let mut exception_common = a.create_label();

    // Idle loop: parked as long as the VMM allows, again and again.
    a.set_label(&mut spin)?;
    a.mov(eax, u32::MAX)?;
    a.mov(dx, TEST_PORT_SLEEP as u32)?;
    a.out(dx, eax)?;
    a.jmp(spin)?;

    // print_str: RCX = NUL-terminated string. Clobbers RAX, RCX, RDX.
    {
        a.set_label(&mut print_str)?;
        let mut done = a.create_label();
        a.mov(al, byte_ptr(rcx))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.mov(dx, SERIAL_PORT as u32)?;
        a.out(dx, al)?;
        a.inc(rcx)?;
        a.jmp(print_str)?;
        a.set_label(&mut done)?;
        a.ret()?;
    }

    // print_dec: RAX = unsigned value. Clobbers RAX, RCX, RDX.
    {
        a.set_label(&mut print_dec)?;
        let mut digit = a.create_label();
        a.push(rbx)?;
        a.push(rbp)?;
        a.mov(rbp, rsp)?;
        a.sub(rsp, 32)?;
        a.lea(rcx, ptr(rbp - 1))?;
        a.mov(byte_ptr(rcx), 0)?;
        a.mov(ebx, 10)?;
        a.set_label(&mut digit)?;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.add(dl, b'0' as u32)?;
        a.dec(rcx)?;
        a.mov(byte_ptr(rcx), dl)?;
        a.test(rax, rax)?;
        a.jnz(digit)?;
        a.call(print_str)?;
        a.mov(rsp, rbp)?;
        a.pop(rbp)?;
        a.pop(rbx)?;
        a.ret()?;
    }

    // counter: vCPU 0 prints "tick N" every tick_period_tsc cycles; N lives in memory.
    {
        a.set_label(&mut counter)?;
        let mut wait = a.create_label();
        let mut on_time = a.create_label();
        a.test(edi, edi)?;
        a.jnz(spin)?;
        a.mov(rbx, qword_ptr(rsi + offsets::STATE_ADDR))?;
        a.mov(r12, qword_ptr(rsi + offsets::TICK_PERIOD))?;
        a.lea(rcx, ptr(msg_counter))?;
        a.call(print_str)?;
        read_tsc(&mut a)?;
        a.mov(r13, rax)?;
        let mut ready = a.create_label();
        a.set_label(&mut wait)?;
        read_tsc(&mut a)?;
        a.cmp(rax, r13)?;
        a.jae(ready)?;
        a.sub(rax, r13)?;
        a.neg(rax)?;
        idle(&mut a)?;
        a.jmp(wait)?;
        a.set_label(&mut ready)?;
        // After a long stall (host paused us), restart the schedule instead of bursting.
        a.mov(rcx, rax)?;
        a.sub(rcx, r13)?;
        a.cmp(rcx, r12)?;
        a.jbe(on_time)?;
        a.mov(r13, rax)?;
        a.set_label(&mut on_time)?;
        a.add(r13, r12)?;
        a.inc(qword_ptr(rbx))?;
        a.lea(rcx, ptr(msg_tick))?;
        a.call(print_str)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.call(print_dec)?;
        a.mov(al, b'\n' as u32)?;
        a.mov(dx, SERIAL_PORT as u32)?;
        a.out(dx, al)?;
        a.jmp(wait)?;
    }

    // dirty: each vCPU writes one word (the pass number) into every vcpus-th page of the
    // working set, paced to tsc_per_page_per_vcpu cycles per page. Uses no stack, so the
    // only guest writes are the working set itself.
    {
        a.set_label(&mut dirty)?;
        let mut pass = a.create_label();
        let mut page = a.create_label();
        let mut pass_done = a.create_label();
        let mut no_report = a.create_label();
        a.mov(r8, qword_ptr(rsi + offsets::WS_START))?;
        a.mov(r9, qword_ptr(rsi + offsets::WS_PAGES))?;
        a.mov(r10, qword_ptr(rsi + offsets::TSC_PER_PAGE))?;
        a.mov(r11, qword_ptr(rsi + offsets::PASSES))?;
        a.mov(r14d, dword_ptr(rsi + offsets::VCPUS))?;
        a.mov(r15, r10)?;
        a.shl(r15, 6)?;
        a.xor(ebx, ebx)?;
        read_tsc(&mut a)?;
        a.mov(r13, rax)?;
        a.set_label(&mut pass)?;
        a.inc(rbx)?;
        a.mov(rcx, rdi)?;
        a.set_label(&mut page)?;
        a.cmp(rcx, r9)?;
        a.jae(pass_done)?;
        a.mov(rax, rcx)?;
        a.shl(rax, 12)?;
        a.mov(qword_ptr(r8 + rax), rbx)?;
        a.add(rcx, r14)?;
        a.test(r10, r10)?;
        a.jz(page)?;
        a.add(r13, r10)?;
        // More than 64 pages behind (we were paused): resynchronise rather than burst.
        wait_until(&mut a, r13, r15, page)?;
        a.set_label(&mut pass_done)?;
        a.test(edi, edi)?;
        a.jnz(no_report)?;
        a.mov(eax, ebx)?;
        out32(&mut a, TEST_PORT_PROGRESS)?;
        a.set_label(&mut no_report)?;
        a.test(r11, r11)?;
        a.jz(pass)?;
        a.cmp(rbx, r11)?;
        a.jb(pass)?;
        a.xor(eax, eax)?;
        out32(&mut a, TEST_PORT_EXIT)?;
        a.jmp(spin)?;
    }

    // verify: see `super::verify` for the scheme. Registers: R8 first page, R9 page count,
    // R10 generation table, R11 seed, R12 LCG state, R13 check cursor, R14 passes,
    // R15 sum of all generations (held in a register so a stale table page is caught too).
    {
        a.set_label(&mut verify)?;
        let mut init = a.create_label();
        let mut init_done = a.create_label();
        let mut round = a.create_label();
        let mut update = a.create_label();
        let mut checks = a.create_label();
        let mut check = a.create_label();
        let mut next = a.create_label();
        a.test(edi, edi)?;
        a.jnz(spin)?;
        a.mov(r8, qword_ptr(rsi + offsets::VERIFY_START))?;
        a.mov(r9, qword_ptr(rsi + offsets::VERIFY_PAGES))?;
        a.mov(r10, qword_ptr(rsi + offsets::GEN_TABLE))?;
        a.mov(r11, qword_ptr(rsi + offsets::SEED))?;
        a.lea(rcx, ptr(msg_verify))?;
        a.call(print_str)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut init)?;
        a.cmp(rbx, r9)?;
        a.jae(init_done)?;
        a.mov(qword_ptr(r10 + rbx * 8), 0)?;
        a.call(verify_fill)?;
        a.inc(rbx)?;
        a.jmp(init)?;
        a.set_label(&mut init_done)?;
        a.xor(r15d, r15d)?;
        a.xor(r13d, r13d)?;
        a.xor(r14d, r14d)?;
        a.mov(r12, r11)?;
        a.lea(rcx, ptr(msg_verify_ready))?;
        a.call(print_str)?;
        a.set_label(&mut round)?;
        a.mov(rbp, qword_ptr(rsi + offsets::UPDATES))?;
        a.set_label(&mut update)?;
        a.test(rbp, rbp)?;
        a.jz(checks)?;
        a.mov(rax, LCG_MUL)?;
        a.imul_2(r12, rax)?;
        a.mov(rax, LCG_ADD)?;
        a.add(r12, rax)?;
        a.mov(rax, r12)?;
        a.shr(rax, 33)?;
        a.xor(edx, edx)?;
        a.div(r9)?;
        a.mov(rbx, rdx)?;
        a.inc(qword_ptr(r10 + rbx * 8))?;
        a.inc(r15)?;
        a.call(verify_fill)?;
        a.dec(rbp)?;
        a.jmp(update)?;
        a.set_label(&mut checks)?;
        a.mov(rbp, qword_ptr(rsi + offsets::CHECKS))?;
        a.set_label(&mut check)?;
        a.test(rbp, rbp)?;
        a.jz(round)?;
        a.mov(rbx, r13)?;
        a.call(verify_check)?;
        a.inc(r13)?;
        a.cmp(r13, r9)?;
        a.jb(next)?;
        a.xor(r13d, r13d)?;
        a.call(verify_sum)?;
        a.inc(r14)?;
        a.mov(eax, r14d)?;
        out32(&mut a, TEST_PORT_PROGRESS)?;
        a.set_label(&mut next)?;
        a.dec(rbp)?;
        a.jmp(check)?;
    }

    // Page pattern base for page RBX: ((p << 32) ^ gen) * MIX ^ seed into RAX; page address
    // into RDI; ECX = 512 words; RDX = step. Shared by fill and check.
    let pattern_setup = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rdx, qword_ptr(r10 + rbx * 8))?;
        a.mov(rax, rbx)?;
        a.shl(rax, 32)?;
        a.xor(rax, rdx)?;
        a.mov(rcx, VERIFY_MIX)?;
        a.imul_2(rax, rcx)?;
        a.xor(rax, r11)?;
        a.mov(rdi, rbx)?;
        a.shl(rdi, 12)?;
        a.add(rdi, r8)?;
        a.mov(ecx, 512)?;
        a.mov(rdx, VERIFY_STEP)
    };

    // verify_fill: writes page RBX for its current generation. Clobbers RAX, RCX, RDX, RDI.
    {
        a.set_label(&mut verify_fill)?;
        let mut word = a.create_label();
        pattern_setup(&mut a)?;
        a.set_label(&mut word)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rax, rdx)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(word)?;
        a.ret()?;
    }

    // verify_check: checks page RBX; reports its index on the first wrong word.
    {
        a.set_label(&mut verify_check)?;
        let mut word = a.create_label();
        let mut bad = a.create_label();
        pattern_setup(&mut a)?;
        a.set_label(&mut word)?;
        a.cmp(qword_ptr(rdi), rax)?;
        a.jne(bad)?;
        a.add(rax, rdx)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(word)?;
        a.ret()?;
        a.set_label(&mut bad)?;
        a.mov(eax, ebx)?;
        out32(&mut a, TEST_PORT_FAIL)?;
        a.ret()?;
    }

    // verify_sum: the generation table must sum to R15.
    {
        a.set_label(&mut verify_sum)?;
        let mut add = a.create_label();
        let mut compare = a.create_label();
        let mut ok = a.create_label();
        a.xor(eax, eax)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut add)?;
        a.cmp(rcx, r9)?;
        a.jae(compare)?;
        a.add(rax, qword_ptr(r10 + rcx * 8))?;
        a.inc(rcx)?;
        a.jmp(add)?;
        a.set_label(&mut compare)?;
        a.cmp(rax, r15)?;
        a.je(ok)?;
        a.mov(eax, VERIFY_TABLE_MISMATCH)?;
        out32(&mut a, TEST_PORT_FAIL)?;
        a.set_label(&mut ok)?;
        a.ret()?;
    }

    disk_guest(
        &mut a,
        DiskLabels {
            entry: &mut disk,
            submit: &mut disk_submit,
            fill: &mut disk_fill,
            check: &mut disk_check,
            spin,
            print_str,
            msg: msg_disk,
            msg_ready: msg_disk_ready,
        },
    )?;

    super::net_code::net_guest(
        &mut a,
        super::net_code::NetLabels {
            entry: &mut net,
            spin,
            print_str,
            msg: msg_net,
            msg_ready: msg_net_ready,
        },
    )?;

    // CPL-0 exception stubs: report 0xE000_0000 | vector as the exit status, then halt.
    for (vector, stub) in stubs.iter_mut().enumerate() {
        a.set_label(stub)?;
        a.push(vector as i32)?;
        a.jmp(exception_common)?;
    }
    {
        a.set_label(&mut exception_common)?;
        let mut halt = a.create_label();
        a.pop(rax)?;
        a.or(eax, EXCEPTION_EXIT_BASE as i32)?;
        out32(&mut a, TEST_PORT_EXIT)?;
        a.set_label(&mut halt)?;
        a.hlt()?;
        a.jmp(halt)?;
    }

    a.set_label(&mut msg_counter)?;
    a.db(b"ferry counter guest\n\0")?;
    a.set_label(&mut msg_tick)?;
    a.db(b"tick \0")?;
    a.set_label(&mut msg_verify)?;
    a.db(b"ferry verify guest: filling memory\n\0")?;
    a.set_label(&mut msg_verify_ready)?;
    a.db(b"verify: ready, checking\n\0")?;
    a.set_label(&mut msg_disk)?;
    a.db(b"ferry disk guest: setting up virtio-blk\n\0")?;
    a.set_label(&mut msg_disk_ready)?;
    a.db(b"disk: ready, writing\n\0")?;
    a.set_label(&mut msg_net)?;
    a.db(b"ferry net guest: setting up virtio-net\n\0")?;
    a.set_label(&mut msg_net_ready)?;
    a.db(b"net: ready, talking\n\0")?;

    let result = a.assemble_options(
        layout::CODE,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let address = |label: &CodeLabel| result.label_ip(label);
    let mut exception_stubs = [0u64; 32];
    for (slot, stub) in exception_stubs.iter_mut().zip(&stubs) {
        *slot = address(stub)?;
    }
    Ok(GuestCode {
        counter: address(&counter)?,
        dirty: address(&dirty)?,
        verify: address(&verify)?,
        disk: address(&disk)?,
        net: address(&net)?,
        spin: address(&spin)?,
        print_str: address(&print_str)?,
        print_dec: address(&print_dec)?,
        exception_stubs,
        bytes: result.inner.code_buffer,
    })
}

struct DiskLabels<'a> {
    entry: &'a mut CodeLabel,
    submit: &'a mut CodeLabel,
    fill: &'a mut CodeLabel,
    check: &'a mut CodeLabel,
    spin: CodeLabel,
    print_str: CodeLabel,
    msg: CodeLabel,
    msg_ready: CodeLabel,
}

/// Waits (see [`idle`]) until the TSC reaches `deadline`, then jumps to `next`. Further behind than `slack`
/// cycles (the guest was paused), it moves the deadline to now instead of bursting to catch
/// up. Clobbers RAX, RDX.
fn wait_until(
    a: &mut CodeAssembler,
    deadline: AsmRegister64,
    slack: AsmRegister64,
    next: CodeLabel,
) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    let mut early = a.create_label();
    a.set_label(&mut wait)?;
    read_tsc(a)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, deadline)?;
    a.js(early)?;
    a.cmp(rdx, slack)?;
    a.jbe(next)?;
    a.mov(deadline, rax)?;
    a.jmp(next)?;
    a.set_label(&mut early)?;
    a.mov(rax, rdx)?;
    a.neg(rax)?;
    idle(a)?;
    a.jmp(wait)
}

/// Linear congruential step of R12, then RBX = (R12 >> 33) mod R9. Clobbers RAX, RDX.
fn next_block(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, LCG_MUL)?;
    a.imul_2(r12, rax)?;
    a.mov(rax, LCG_ADD)?;
    a.add(r12, rax)?;
    a.mov(rax, r12)?;
    a.shr(rax, 33)?;
    a.xor(edx, edx)?;
    a.div(r9)?;
    a.mov(rbx, rdx)
}

/// The register offsets of virtio-mmio (version 2) a driver uses.
pub(super) mod mmio {
    pub const DEVICE_FEATURES: i32 = 0x010;
    pub const DEVICE_FEATURES_SEL: i32 = 0x014;
    pub const DRIVER_FEATURES: i32 = 0x020;
    pub const DRIVER_FEATURES_SEL: i32 = 0x024;
    pub const QUEUE_SEL: i32 = 0x030;
    pub const QUEUE_NUM_MAX: i32 = 0x034;
    pub const QUEUE_NUM: i32 = 0x038;
    pub const QUEUE_READY: i32 = 0x044;
    pub const QUEUE_NOTIFY: i32 = 0x050;
    pub const STATUS: i32 = 0x070;
    pub const QUEUE_DESC: i32 = 0x080;
    pub const QUEUE_DRIVER: i32 = 0x090;
    pub const QUEUE_DEVICE: i32 = 0x0a0;
    pub const CONFIG: i32 = 0x100;
}

/// The first steps of a virtio 1.x driver (virtio 1.x, 3.1.1) on the virtio-mmio registers
/// at R8: a version-2 device of type `device_id`, reset, ACKNOWLEDGE and DRIVER, then
/// VERSION_1 and `features_low` (bits 0..32) accepted and FEATURES_OK read back; anything else
/// jumps to `no_device`. Clobbers RAX.
pub(super) fn virtio_negotiate(
    a: &mut CodeAssembler,
    device_id: u32,
    features_low: u32,
    no_device: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(r8))?;
    a.cmp(eax, 0x7472_6976)?;
    a.jne(no_device)?;
    a.mov(eax, dword_ptr(r8 + 0x004))?;
    a.cmp(eax, 2)?;
    a.jne(no_device)?;
    a.mov(eax, dword_ptr(r8 + 0x008))?;
    a.cmp(eax, device_id)?;
    a.jne(no_device)?;
    a.mov(dword_ptr(r8 + mmio::STATUS), 0)?;
    a.mov(dword_ptr(r8 + mmio::STATUS), 1)?;
    a.mov(dword_ptr(r8 + mmio::STATUS), 3)?;
    a.mov(dword_ptr(r8 + mmio::DEVICE_FEATURES_SEL), 1)?;
    a.mov(eax, dword_ptr(r8 + mmio::DEVICE_FEATURES))?;
    a.test(eax, 1)?;
    a.jz(no_device)?;
    a.mov(dword_ptr(r8 + mmio::DRIVER_FEATURES_SEL), 0)?;
    a.mov(dword_ptr(r8 + mmio::DRIVER_FEATURES), features_low)?;
    a.mov(dword_ptr(r8 + mmio::DRIVER_FEATURES_SEL), 1)?;
    a.mov(dword_ptr(r8 + mmio::DRIVER_FEATURES), 1)?;
    a.mov(dword_ptr(r8 + mmio::STATUS), 0xb)?;
    a.mov(eax, dword_ptr(r8 + mmio::STATUS))?;
    a.test(eax, 8)?;
    a.jz(no_device)
}

/// Sets up queue `queue` of the device at R8 with `size` entries, its descriptor table,
/// available and used rings at `rings` offsets from `base`, both rings empty, and marks it
/// ready; a device offering fewer entries jumps to `no_device`. Clobbers RAX.
pub(super) fn virtio_queue(
    a: &mut CodeAssembler,
    queue: u32,
    size: u32,
    base: AsmRegister64,
    rings: [u64; 3],
    no_device: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(dword_ptr(r8 + mmio::QUEUE_SEL), queue)?;
    a.mov(eax, dword_ptr(r8 + mmio::QUEUE_NUM_MAX))?;
    a.cmp(eax, size)?;
    a.jb(no_device)?;
    a.mov(dword_ptr(r8 + mmio::QUEUE_NUM), size)?;
    for (register, offset) in [mmio::QUEUE_DESC, mmio::QUEUE_DRIVER, mmio::QUEUE_DEVICE]
        .into_iter()
        .zip(rings)
    {
        a.lea(rax, ptr(base + offset as i32))?;
        a.mov(dword_ptr(r8 + register), eax)?;
        a.shr(rax, 32)?;
        a.mov(dword_ptr(r8 + (register + 4)), eax)?;
    }
    a.mov(dword_ptr(base + rings[1] as i32), 0)?;
    a.mov(dword_ptr(base + rings[2] as i32), 0)?;
    a.mov(dword_ptr(r8 + mmio::QUEUE_READY), 1)
}

/// The `disk` guest (see `super::disk`): a polling virtio-mmio virtio-blk driver at CPL 3.
/// Registers: R8 device registers, R9 blocks, R10 generation table, R11 salted seed, R12 LCG
/// state, R13 writes completed, R14 TSC cycles per write (0: unpaced), R15 next write's
/// deadline, RBP 64 writes' worth of cycles, RSI parameters, RBX the block at hand.
fn disk_guest(a: &mut CodeAssembler, l: DiskLabels<'_>) -> Result<(), IcedError> {
    use super::disk::{DISK_IO_ERROR, DISK_NO_DEVICE, DISK_QUEUE_SIZE, area};
    // virtio 1.x constants the driver needs (the device side has them from virtio-bindings).
    const T_IN: u32 = 0;
    const T_OUT: u32 = 1;
    const T_FLUSH: u32 = 4;
    const F_NEXT: u32 = 1;
    const F_WRITE: u32 = 2;
    const FLUSH_FEATURE: u32 = 1 << 9;
    let state = layout::GUEST_STATE as i32;
    let area_ptr = qword_ptr(rsi + offsets::DISK_AREA);

    let mut no_device = a.create_label();
    let mut write = a.create_label();
    let mut read_back = a.create_label();
    let mut pace = a.create_label();
    let mut io_error = a.create_label();

    a.set_label(l.entry)?;
    a.test(edi, edi)?;
    a.jnz(l.spin)?;
    a.mov(r8, qword_ptr(rsi + offsets::VIRTIO_BASE))?;
    a.mov(r9, qword_ptr(rsi + offsets::DISK_BLOCKS))?;
    a.mov(r10, qword_ptr(rsi + offsets::GEN_TABLE))?;
    a.mov(r11, qword_ptr(rsi + offsets::SEED))?;
    a.mov(r14, qword_ptr(rsi + offsets::TSC_PER_WRITE))?;
    a.mov(rbp, r14)?;
    a.shl(rbp, 6)?;
    a.lea(rcx, ptr(l.msg))?;
    a.call(l.print_str)?;
    virtio_negotiate(a, 2, FLUSH_FEATURE, no_device)?;
    a.mov(rdi, area_ptr)?;
    virtio_queue(
        a,
        0,
        DISK_QUEUE_SIZE,
        rdi,
        [area::DESC, area::AVAIL, area::USED],
        no_device,
    )?;
    // Descriptors: 0 header -> 1 data -> 2 status; 3 header -> 2 status (a flush).
    for (index, target, len, flags, next) in [
        (0, Some(area::HEADER), 16, F_NEXT, 1),
        (1, None, 4096, F_NEXT, 2),
        (2, Some(area::STATUS), 1, F_WRITE, 0),
        (3, Some(area::HEADER), 16, F_NEXT, 2),
    ] {
        let d = (area::DESC + 16 * index) as i32;
        if let Some(target) = target {
            a.lea(rax, ptr(rdi + target as i32))?;
            a.mov(qword_ptr(rdi + d), rax)?;
        }
        a.mov(dword_ptr(rdi + (d + 8)), len)?;
        a.mov(word_ptr(rdi + (d + 12)), flags)?;
        a.mov(word_ptr(rdi + (d + 14)), next)?;
    }
    a.mov(dword_ptr(r8 + mmio::STATUS), 0xf)?;
    a.lea(rcx, ptr(l.msg_ready))?;
    a.call(l.print_str)?;
    a.mov(r12, r11)?;
    a.xor(r13d, r13d)?;
    a.mov(qword_ptr(state), 0)?;
    read_tsc(a)?;
    a.mov(r15, rax)?;

    // One write: the block's next generation is in flight until the write completes.
    a.set_label(&mut write)?;
    next_block(a)?;
    a.mov(rax, qword_ptr(r10 + rbx * 8))?;
    a.inc(rax)?;
    a.mov(qword_ptr(state + 8), rax)?;
    a.lea(rcx, ptr(rbx + 1))?;
    a.mov(qword_ptr(state), rcx)?;
    a.mov(rdi, area_ptr)?;
    a.add(rdi, area::WRITE_BUF as i32)?;
    a.call(*l.fill)?;
    a.mov(eax, T_OUT)?;
    a.mov(rcx, area_ptr)?;
    a.add(rcx, area::WRITE_BUF as i32)?;
    a.mov(rdx, rbx)?;
    a.shl(rdx, 3)?;
    a.call(*l.submit)?;
    a.test(eax, eax)?;
    a.jnz(io_error)?;
    a.mov(rax, qword_ptr(state + 8))?;
    a.mov(qword_ptr(r10 + rbx * 8), rax)?;
    a.mov(qword_ptr(state), 0)?;
    a.inc(r13)?;
    // Every 64 writes: a flush and a progress report.
    a.test(r13d, 63)?;
    a.jnz(read_back)?;
    a.mov(eax, T_FLUSH)?;
    a.xor(ecx, ecx)?;
    a.xor(edx, edx)?;
    a.call(*l.submit)?;
    a.test(eax, eax)?;
    a.jnz(io_error)?;
    a.mov(eax, r13d)?;
    out32(a, TEST_PORT_PROGRESS)?;
    // Read a random written block back and check it.
    a.set_label(&mut read_back)?;
    next_block(a)?;
    a.cmp(qword_ptr(r10 + rbx * 8), 0)?;
    a.je(pace)?;
    a.mov(eax, T_IN)?;
    a.mov(rcx, area_ptr)?;
    a.add(rcx, area::READ_BUF as i32)?;
    a.mov(rdx, rbx)?;
    a.shl(rdx, 3)?;
    a.call(*l.submit)?;
    a.test(eax, eax)?;
    a.jnz(io_error)?;
    a.mov(rdi, area_ptr)?;
    a.add(rdi, area::READ_BUF as i32)?;
    a.mov(rax, qword_ptr(r10 + rbx * 8))?;
    a.call(*l.check)?;
    // Pacing, as `dirty` does it: resynchronise after a long stall rather than burst.
    a.set_label(&mut pace)?;
    a.test(r14, r14)?;
    a.jz(write)?;
    a.add(r15, r14)?;
    wait_until(a, r15, rbp, write)?;
    a.set_label(&mut io_error)?;
    a.mov(qword_ptr(state), 0)?;
    a.mov(eax, DISK_IO_ERROR)?;
    out32(a, TEST_PORT_FAIL)?;
    a.jmp(pace)?;
    a.set_label(&mut no_device)?;
    a.mov(eax, DISK_NO_DEVICE)?;
    out32(a, TEST_PORT_FAIL)?;
    a.mov(eax, 1)?;
    out32(a, TEST_PORT_EXIT)?;
    a.jmp(l.spin)?;

    // submit: EAX type, RCX data buffer (0: a flush), RDX sector. Posts the request, rings
    // the doorbell, polls the used ring and returns the status byte in EAX. Clobbers RCX,
    // RDX, RDI.
    {
        a.set_label(l.submit)?;
        let mut flush = a.create_label();
        let mut not_in = a.create_label();
        let mut post = a.create_label();
        let mut wait = a.create_label();
        a.mov(rdi, area_ptr)?;
        a.mov(dword_ptr(rdi + area::HEADER as i32), eax)?;
        a.mov(dword_ptr(rdi + (area::HEADER + 4) as i32), 0)?;
        a.mov(qword_ptr(rdi + (area::HEADER + 8) as i32), rdx)?;
        a.mov(byte_ptr(rdi + area::STATUS as i32), 0xff)?;
        a.test(rcx, rcx)?;
        a.jz(flush)?;
        a.mov(qword_ptr(rdi + (area::DESC + 16) as i32), rcx)?;
        a.mov(edx, F_NEXT)?;
        a.test(eax, eax)?;
        a.jnz(not_in)?;
        a.mov(edx, F_NEXT | F_WRITE)?;
        a.set_label(&mut not_in)?;
        a.mov(word_ptr(rdi + (area::DESC + 16 + 12) as i32), dx)?;
        a.xor(eax, eax)?;
        a.jmp(post)?;
        a.set_label(&mut flush)?;
        a.mov(eax, 3)?;
        a.set_label(&mut post)?;
        a.movzx(edx, word_ptr(rdi + (area::AVAIL + 2) as i32))?;
        a.mov(ecx, edx)?;
        a.and(ecx, (DISK_QUEUE_SIZE - 1) as i32)?;
        a.mov(word_ptr(rdi + rcx * 2 + (area::AVAIL + 4) as i32), ax)?;
        a.inc(edx)?;
        a.mov(word_ptr(rdi + (area::AVAIL + 2) as i32), dx)?;
        a.mov(dword_ptr(r8 + mmio::QUEUE_NOTIFY), 0)?;
        a.set_label(&mut wait)?;
        a.pause()?;
        a.movzx(eax, word_ptr(rdi + (area::USED + 2) as i32))?;
        a.cmp(ax, dx)?;
        a.jne(wait)?;
        a.movzx(eax, byte_ptr(rdi + area::STATUS as i32))?;
        a.ret()?;
    }

    // Pattern of block RBX at generation RAX into RAX (first word), RCX = 512, RDX = step.
    let pattern = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rdx, rax)?;
        a.mov(rax, rbx)?;
        a.shl(rax, 32)?;
        a.xor(rax, rdx)?;
        a.mov(rcx, VERIFY_MIX)?;
        a.imul_2(rax, rcx)?;
        a.xor(rax, r11)?;
        a.mov(ecx, 512)?;
        a.mov(rdx, VERIFY_STEP)
    };
    // fill: block RBX, generation RAX, into the buffer at RDI. Clobbers RAX, RCX, RDX, RDI.
    {
        a.set_label(l.fill)?;
        let mut word = a.create_label();
        pattern(a)?;
        a.set_label(&mut word)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rax, rdx)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(word)?;
        a.ret()?;
    }
    // check: the buffer at RDI must be block RBX at generation RAX; reports RBX if not.
    {
        a.set_label(l.check)?;
        let mut word = a.create_label();
        let mut bad = a.create_label();
        pattern(a)?;
        a.set_label(&mut word)?;
        a.cmp(qword_ptr(rdi), rax)?;
        a.jne(bad)?;
        a.add(rax, rdx)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(word)?;
        a.ret()?;
        a.set_label(&mut bad)?;
        a.mov(eax, ebx)?;
        out32(a, TEST_PORT_FAIL)?;
        a.ret()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_assembles_and_fits_its_area() {
        let code = assemble().unwrap();
        assert!(!code.bytes.is_empty());
        assert!((code.bytes.len() as u64) < layout::CODE_END - layout::CODE);
        let end = layout::CODE + code.bytes.len() as u64;
        for entry in [
            code.counter,
            code.dirty,
            code.verify,
            code.disk,
            code.net,
            code.spin,
            code.print_str,
            code.print_dec,
        ] {
            assert!((layout::CODE..end).contains(&entry));
        }
        let mut distinct = code.exception_stubs.to_vec();
        distinct.dedup();
        assert_eq!(distinct.len(), 32);
    }
}
