//! The built-in workloads as a multiboot v1 kernel, so another VMM (QEMU's `-kernel`/`-initrd`)
//! or Ferry's own multiboot loader runs exactly the guest Ferry's VMM runs directly.
//!
//! The Ferry VMM enters a built-in guest at CPL 3 with system tables it wrote itself. A
//! multiboot loader enters a 32-bit kernel at CPL 0 with paging off, so this kernel does that
//! set-up itself, then drops to CPL 3 into the unchanged workload code. CPL-0 code is emulated
//! on this machine's KVM (~2 M instructions/s), so everything that can be computed on the host
//! is: the GDT, TSS (with its I/O bitmap), IDT, identity page tables (first MiB read-only,
//! 4 KiB pages below 2 MiB), the workload code and the parameter block are built by the same
//! functions the VMM uses ([`system_table_images`], [`guest_code`], [`guest_params`]) and
//! carried in the ELF as pre-initialised data. At boot the kernel copies them to the
//! addresses the VMM would have written them to (three `rep movsd`), patches the few values
//! only known at boot, and switches to long mode: a few hundred emulated instructions
//! plus ~8k copied dwords for a 1 GiB VM.
//!
//! Guest-physical layout (below 2 MiB it is [`crate::layout`], as for the built-in guests):
//!
//! | range | contents |
//! |---|---|
//! | `0x1000..0x4000` | parameter block, GDT + TSS, IDT (copied from the image) |
//! | `0x7000..0xA000 + 4 KiB per GiB` | low 4 KiB page table, PML4, PDPT, page directories |
//! | `0x80000..` | workload code and exception stubs |
//! | `0x100000..0x1C0000` | CPL-3 stack (vCPU 0) and the CPL-0 exception stack |
//! | `0x1C0000` | workload state (the counter's N), zeroed at boot |
//! | [`KERNEL_LOAD_ADDR`] (2 MiB) `..` | this kernel's image; then the loader's multiboot data and modules |
//! | first 2 MiB boundary after the image and every module `..` | the `dirty` working set |
//!
//! The working set never overlaps a module: its start is the later of the requested start
//! and the first 2 MiB boundary after the kernel image and every module the multiboot
//! information lists. If it then runs past the end of RAM (the loader's memory information,
//! or the memory size the kernel was built for if that is smaller: the page tables map no
//! further) the kernel prints why on the serial port and exits with [`EXIT_NO_ROOM`] through
//! the test device.
//!
//! **TSC frequency.** The pacing of `counter` ticks and `dirty` page writes is counted in
//! TSC cycles. The frequency is baked in at build time (the `default_tsc_khz` argument of
//! [`build`]) and can be overridden at boot with `tsc_khz=N` (decimal kHz) anywhere on the
//! kernel command line, e.g. `-append tsc_khz=2445434` in QEMU. The kernel then recomputes
//! the TSC-derived parameters with the same formulas as [`guest_params`]. On this host the
//! guest TSC runs at the host's rate in QEMU and in Ferry (there is no TSC scaling), so the
//! `KVM_GET_TSC_KHZ` of any Ferry VM ([`crate::Vm::tsc_khz`]) is the right value.
//!
//! When the kernel drops to CPL 3 it prints one line (see [`parse_banner`]):
//! `ferry multiboot workload: guest=dirty ws_start=N ws_pages=N tsc_khz=N`.
//!
//! Only vCPU 0 runs the workload: a multiboot loader starts only the boot processor, and
//! waking the others needs an APIC this kernel does not drive. `verify` is not offered: its
//! layout fills all of memory, which a module would have to share.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};

use super::elf_image::{self, MULTIBOOT_BOOT_MAGIC, MULTIBOOT_HEADER_MAGIC};
use super::params::offsets;
use super::{GuestCode, GuestError, GuestParams, TestGuest, guest_code, guest_params};
use crate::boot::tables::{
    self, CR0_WRITE_PROTECT, EFER_LONG_MODE_ENABLE, GDT_LIMIT, IDT_LIMIT, LONG_MODE_CR0,
    LONG_MODE_CR4, TableImage, USER_RFLAGS,
};
use crate::layout::{self, PAGE_SIZE, TEST_PORT_EXIT, selector};

/// Where the kernel image is loaded: the start of workload memory, so everything below it is
/// laid out exactly as for the built-in guests.
pub const KERNEL_LOAD_ADDR: u64 = layout::DATA_START;
/// Command-line argument that overrides the baked-in TSC frequency (decimal kHz follows).
pub const TSC_KHZ_ARG: &str = "tsc_khz=";
/// Start of the line the kernel prints when the workload starts.
pub const BANNER_PREFIX: &str = "ferry multiboot workload:";
/// Exit status (test device) when the kernel was not entered by a multiboot loader.
pub const EXIT_BAD_MAGIC: u32 = elf_image::PROBE_EXIT_BAD_MAGIC;
/// Exit status (test device) when the working set does not fit after the modules.
pub const EXIT_NO_ROOM: u32 = 3;

/// The working set starts on this boundary, so it never shares a 2 MiB page with a module.
const WORKING_SET_ALIGN: u64 = 2 << 20;
const EFER_MSR: u32 = 0xC000_0080;

// Multiboot information flags and field offsets (multiboot specification 0.6.96, §3.3).
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MEM_UPPER: i32 = 8;
const INFO_CMDLINE_ADDR: i32 = 16;
const INFO_MODS_COUNT: i32 = 20;
const INFO_MODS_ADDR: i32 = 24;
const MODULE_ENTRY_SIZE: i32 = 16;
const MODULE_END: i32 = 4;
/// Header flags: page-align modules, provide memory information.
const HEADER_FLAGS: u32 = 0b11;

// The image: one page of 32-bit code (starting with the multiboot header), one page of
// 64-bit code and strings, one page of variables, then the pre-built low-memory pages.
const CODE64_OFFSET: u64 = 0x1000;
const VARS_OFFSET: u64 = 0x2000;
const COPIES_OFFSET: u64 = 0x3000;
const VARS: u64 = KERNEL_LOAD_ADDR + VARS_OFFSET;
// Variables the 32-bit code fills from the multiboot information for the 64-bit code.
const VAR_TSC_KHZ: u64 = VARS;
const VAR_MODULES_END: u64 = VARS + 0x08;
/// End of low RAM according to the loader; all ones when it gave no memory information.
const VAR_LOADER_RAM_END: u64 = VARS + 0x10;
/// End of low RAM the kernel was built for: its page tables map no further.
const VAR_BUILT_RAM_END: u64 = VARS + 0x18;
// Descriptor-table registers (limit, then a 64-bit base: 32-bit `lgdt` reads the first six
// bytes, 64-bit `lgdt` all ten).
const VAR_GDTR: u64 = VARS + 0x20;
const VAR_IDTR: u64 = VARS + 0x30;

const _: () = assert!(
    TSC_KHZ_ARG.len() == 8,
    "the kernel compares it as two dwords"
);

/// A built multiboot workload kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadKernel {
    /// The ELF32 file to hand to a multiboot loader.
    pub elf: Vec<u8>,
    /// First byte after the kernel image in guest memory.
    pub image_end: u64,
    /// Where the `dirty` working set starts when no module is in the way (0 for `counter`).
    pub working_set_start: u64,
    /// The TSC frequency baked into the parameter block.
    pub default_tsc_khz: u64,
}

/// Errors from building the multiboot workload kernel.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadKernelError {
    /// The guest cannot run from a multiboot kernel.
    #[error(
        "the multiboot workload kernel runs the `counter` and `dirty` guests, not `{0}` (its memory layout covers all of RAM)"
    )]
    UnsupportedGuest(&'static str),
    /// The guest's parameters are invalid for this VM.
    #[error("invalid workload for the multiboot kernel")]
    Guest(#[from] GuestError),
    /// The kernel's code did not assemble (a bug in this file).
    #[error("assembling the multiboot workload kernel failed")]
    Assemble(#[source] IcedError),
    /// A piece of the kernel outgrew the room the image layout gives it.
    #[error("the kernel's {what} is {len} bytes, more than the {limit} bytes it has")]
    TooLarge {
        /// Which piece.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The room it has.
        limit: u64,
    },
}

impl From<IcedError> for WorkloadKernelError {
    fn from(error: IcedError) -> Self {
        WorkloadKernelError::Assemble(error)
    }
}

/// A parameter that is a TSC-cycle count: `tsc_hz * mul / div`, at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TscScaled {
    offset: i32,
    mul: u64,
    div: u64,
}

/// The parameters [`guest_params`] derives from the TSC frequency, so the kernel can
/// recompute them when the command line gives another frequency.
fn tsc_scaled_fields(guest: &TestGuest, vcpus: u32) -> Vec<TscScaled> {
    match *guest {
        TestGuest::Counter { ticks_per_sec } => vec![TscScaled {
            offset: offsets::TICK_PERIOD,
            mul: 1,
            div: u64::from(ticks_per_sec.max(1)),
        }],
        TestGuest::Dirty {
            pages_per_sec: Some(rate),
            ..
        } => vec![TscScaled {
            offset: offsets::TSC_PER_PAGE,
            mul: u64::from(vcpus),
            div: rate.max(1),
        }],
        TestGuest::Dirty { .. }
        | TestGuest::Verify { .. }
        | TestGuest::Disk { .. }
        | TestGuest::Net { .. } => Vec::new(),
    }
}

/// Builds the kernel for `guest` on a VM with `memory` bytes of RAM, pacing with
/// `default_tsc_khz` unless the command line says `tsc_khz=N`.
///
/// For `dirty`, a `start` of `None`, or one below the end of the kernel image, means the
/// first 2 MiB boundary after the image; at boot the kernel moves the working set further up,
/// past every module, if a module is in the way.
pub fn build(
    guest: &TestGuest,
    memory: u64,
    default_tsc_khz: u64,
) -> Result<WorkloadKernel, WorkloadKernelError> {
    if matches!(
        guest,
        TestGuest::Verify { .. } | TestGuest::Disk { .. } | TestGuest::Net { .. }
    ) {
        return Err(WorkloadKernelError::UnsupportedGuest(guest.name()));
    }
    let default_tsc_khz = default_tsc_khz.max(1);
    let code = guest_code();
    let tables =
        tables::system_table_images(&layout::ram_ranges(memory), &code.exception_stubs, true);
    let pieces = |params: &GuestParams| {
        let mut pieces = tables.clone();
        pieces.push(TableImage {
            gpa: layout::CODE,
            bytes: code.bytes.clone(),
        });
        pieces.push(TableImage {
            gpa: layout::PARAMS,
            bytes: params.to_bytes(),
        });
        pieces
    };
    // The copies' sizes do not depend on the parameters' values, so a placeholder block
    // tells where the image ends and hence where the working set can start.
    let copies_len: u64 = page_runs(&pieces(&GuestParams::default()))
        .iter()
        .map(|run| run.bytes.len() as u64)
        .sum();
    let image_end = KERNEL_LOAD_ADDR + COPIES_OFFSET + copies_len;
    let first_free = image_end.next_multiple_of(WORKING_SET_ALIGN);

    let placed_guest = match *guest {
        TestGuest::Dirty {
            start,
            working_set,
            pages_per_sec,
            passes,
        } => TestGuest::Dirty {
            start: Some(start.unwrap_or(first_free).max(first_free)),
            working_set,
            pages_per_sec,
            passes,
        },
        ref other => other.clone(),
    };
    let params = guest_params(&placed_guest, 1, memory, default_tsc_khz, None, None)?;
    let runs = page_runs(&pieces(&params));

    let mut copies = Vec::with_capacity(runs.len());
    let mut image = vec![0u8; COPIES_OFFSET as usize];
    for run in &runs {
        copies.push(BootCopy {
            to: run.gpa,
            from: KERNEL_LOAD_ADDR + image.len() as u64,
            dwords: run.bytes.len() as u64 / 4,
        });
        image.extend_from_slice(&run.bytes);
    }

    let entry64 = KERNEL_LOAD_ADDR + CODE64_OFFSET;
    let (code32, entry32) = assemble_entry32(&copies, entry64)?;
    let code64 = assemble_entry64(guest, &params, &tsc_scaled_fields(guest, 1), code)?;
    place(&mut image, 0, &code32, "32-bit entry code")?;
    place(&mut image, CODE64_OFFSET, &code64, "64-bit entry code")?;
    let mut vars = Vec::new();
    vars.extend_from_slice(&default_tsc_khz.to_le_bytes());
    vars.extend_from_slice(&image_end.to_le_bytes());
    vars.extend_from_slice(&u64::MAX.to_le_bytes());
    vars.extend_from_slice(&memory.min(layout::LOW_MEMORY_END).to_le_bytes());
    vars.resize((VAR_GDTR - VARS) as usize, 0);
    vars.extend_from_slice(&GDT_LIMIT.to_le_bytes());
    vars.extend_from_slice(&layout::GDT.to_le_bytes());
    vars.resize((VAR_IDTR - VARS) as usize, 0);
    vars.extend_from_slice(&IDT_LIMIT.to_le_bytes());
    vars.extend_from_slice(&layout::IDT.to_le_bytes());
    place(&mut image, VARS_OFFSET, &vars, "variables")?;

    Ok(WorkloadKernel {
        elf: elf_image::executable(false, KERNEL_LOAD_ADDR, &image, entry32),
        image_end,
        working_set_start: params.ws_start,
        default_tsc_khz,
    })
}

/// Copies `bytes` into the image page that starts at `offset`.
fn place(
    image: &mut [u8],
    offset: u64,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), WorkloadKernelError> {
    let limit = PAGE_SIZE;
    let start = offset as usize;
    match image.get_mut(start..start + bytes.len()) {
        Some(slot) if bytes.len() as u64 <= limit => {
            slot.copy_from_slice(bytes);
            Ok(())
        }
        _ => Err(WorkloadKernelError::TooLarge {
            what,
            len: bytes.len() as u64,
            limit,
        }),
    }
}

/// One `rep movsd` the kernel does at boot.
#[derive(Clone, Copy, Debug)]
struct BootCopy {
    to: u64,
    from: u64,
    dwords: u64,
}

/// Merges `pieces` into page-aligned runs of guest memory (touching pages join one run),
/// each holding the pieces that fall in it overlaid in order, the rest zero.
fn page_runs(pieces: &[TableImage]) -> Vec<TableImage> {
    let mut spans: Vec<(u64, u64)> = pieces
        .iter()
        .filter(|piece| !piece.bytes.is_empty())
        .map(|piece| {
            let start = piece.gpa / PAGE_SIZE * PAGE_SIZE;
            let end = (piece.gpa + piece.bytes.len() as u64).next_multiple_of(PAGE_SIZE);
            (start, end)
        })
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut runs: Vec<TableImage> = merged
        .into_iter()
        .map(|(start, end)| TableImage {
            gpa: start,
            bytes: vec![0; (end - start) as usize],
        })
        .collect();
    for piece in pieces {
        let end = piece.gpa + piece.bytes.len() as u64;
        if let Some(run) = runs
            .iter_mut()
            .find(|run| piece.gpa >= run.gpa && end <= run.gpa + run.bytes.len() as u64)
        {
            let at = (piece.gpa - run.gpa) as usize;
            run.bytes[at..at + piece.bytes.len()].copy_from_slice(&piece.bytes);
        }
    }
    runs
}

/// The multiboot entry: 32-bit protected mode, CPL 0, paging off, EAX = boot magic, EBX =
/// multiboot information. Reads what it needs from the information (it lives in memory the
/// copies overwrite under QEMU), copies the pre-built pages into place and enters long mode.
fn assemble_entry32(copies: &[BootCopy], entry64: u64) -> Result<(Vec<u8>, u64), IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut entry = a.create_label();
    let mut bad_magic = a.create_label();
    let mut no_memory_info = a.create_label();
    let mut no_modules = a.create_label();
    let mut modules_loop = a.create_label();
    let mut modules_next = a.create_label();
    let mut modules_done = a.create_label();
    let mut no_cmdline = a.create_label();
    let mut scan = a.create_label();
    let mut scan_next = a.create_label();
    let mut digit = a.create_label();
    let mut digits_done = a.create_label();

    a.dd(&[
        MULTIBOOT_HEADER_MAGIC,
        HEADER_FLAGS,
        0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(HEADER_FLAGS)),
    ])?;
    a.set_label(&mut entry)?;
    a.cli()?;
    a.cmp(eax, MULTIBOOT_BOOT_MAGIC)?;
    a.jne(bad_magic)?;
    a.mov(ebp, dword_ptr(ebx))?;

    // End of low RAM = (mem_upper + 1 MiB) in bytes, as a 64-bit value.
    a.test(ebp, INFO_MEMORY)?;
    a.jz(no_memory_info)?;
    a.mov(eax, dword_ptr(ebx + INFO_MEM_UPPER))?;
    a.add(eax, 1024)?;
    a.mov(edx, eax)?;
    a.shl(eax, 10)?;
    a.shr(edx, 22)?;
    a.mov(dword_ptr(VAR_LOADER_RAM_END), eax)?;
    a.mov(dword_ptr(VAR_LOADER_RAM_END + 4), edx)?;
    a.set_label(&mut no_memory_info)?;

    // Highest module end (the variable starts at the image end).
    a.test(ebp, INFO_MODS)?;
    a.jz(no_modules)?;
    a.mov(ecx, dword_ptr(ebx + INFO_MODS_COUNT))?;
    a.mov(edx, dword_ptr(ebx + INFO_MODS_ADDR))?;
    a.mov(eax, dword_ptr(VAR_MODULES_END))?;
    a.set_label(&mut modules_loop)?;
    a.test(ecx, ecx)?;
    a.jz(modules_done)?;
    a.cmp(eax, dword_ptr(edx + MODULE_END))?;
    a.jae(modules_next)?;
    a.mov(eax, dword_ptr(edx + MODULE_END))?;
    a.set_label(&mut modules_next)?;
    a.add(edx, MODULE_ENTRY_SIZE)?;
    a.dec(ecx)?;
    a.jmp(modules_loop)?;
    a.set_label(&mut modules_done)?;
    a.mov(dword_ptr(VAR_MODULES_END), eax)?;
    a.set_label(&mut no_modules)?;

    // `tsc_khz=N` anywhere on the command line (QEMU puts the kernel's file name first).
    let arg = TSC_KHZ_ARG.as_bytes();
    let arg_low = u32::from_le_bytes([arg[0], arg[1], arg[2], arg[3]]);
    let arg_high = u32::from_le_bytes([arg[4], arg[5], arg[6], arg[7]]);
    a.test(ebp, INFO_CMDLINE)?;
    a.jz(no_cmdline)?;
    a.mov(esi, dword_ptr(ebx + INFO_CMDLINE_ADDR))?;
    a.set_label(&mut scan)?;
    a.mov(eax, dword_ptr(esi))?;
    a.test(al, al)?;
    a.jz(no_cmdline)?;
    a.cmp(eax, arg_low)?;
    a.jne(scan_next)?;
    a.cmp(dword_ptr(esi + 4), arg_high)?;
    a.jne(scan_next)?;
    a.add(esi, 8)?;
    a.xor(eax, eax)?;
    a.set_label(&mut digit)?;
    a.movzx(ecx, byte_ptr(esi))?;
    a.sub(ecx, u32::from(b'0'))?;
    a.cmp(ecx, 9)?;
    a.ja(digits_done)?;
    a.imul_3(eax, eax, 10)?;
    a.add(eax, ecx)?;
    a.inc(esi)?;
    a.jmp(digit)?;
    a.set_label(&mut digits_done)?;
    // No digits (or 0) keeps the baked-in frequency.
    a.test(eax, eax)?;
    a.jz(no_cmdline)?;
    a.mov(dword_ptr(VAR_TSC_KHZ), eax)?;
    a.mov(dword_ptr(VAR_TSC_KHZ + 4), 0)?;
    a.jmp(no_cmdline)?;
    a.set_label(&mut scan_next)?;
    a.inc(esi)?;
    a.jmp(scan)?;
    a.set_label(&mut no_cmdline)?;

    a.cld()?;
    for copy in copies {
        a.mov(esi, copy.from as u32)?;
        a.mov(edi, copy.to as u32)?;
        a.mov(ecx, copy.dwords as u32)?;
        a.rep().movsd()?;
    }
    // A firmware may have left anything there; the counter guest continues from it.
    a.xor(eax, eax)?;
    a.mov(dword_ptr(layout::GUEST_STATE), eax)?;
    a.mov(dword_ptr(layout::GUEST_STATE + 4), eax)?;

    a.lgdt(ptr(VAR_GDTR))?;
    a.mov(eax, LONG_MODE_CR4 as u32)?;
    a.mov(cr4, eax)?;
    a.mov(eax, layout::PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, EFER_MSR)?;
    a.rdmsr()?;
    a.or(eax, EFER_LONG_MODE_ENABLE as u32)?;
    a.wrmsr()?;
    // Write protection comes on only after the 64-bit code has patched the (read-only)
    // parameter page.
    a.mov(eax, (LONG_MODE_CR0 & !CR0_WRITE_PROTECT) as u32)?;
    a.mov(cr0, eax)?;
    a.jmp_far(selector::KERNEL_CODE64, entry64 as u32)?;

    a.set_label(&mut bad_magic)?;
    a.mov(eax, EXIT_BAD_MAGIC)?;
    halt_with_status(&mut a)?;

    let result = a.assemble_options(
        KERNEL_LOAD_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let entry = result.label_ip(&entry)?;
    Ok((result.inner.code_buffer, entry))
}

/// Reports EAX as the exit status on the test device and stops.
fn halt_with_status(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut halt = a.create_label();
    a.mov(dx, u32::from(TEST_PORT_EXIT))?;
    a.out(dx, eax)?;
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)
}

/// Long mode, still CPL 0 and without write protection: loads the task register and IDT,
/// patches the parameters only known at boot, prints the banner and drops to CPL 3 into the
/// workload with the registers the VMM gives a built-in guest (RDI = vCPU 0, RSI = params).
fn assemble_entry64(
    guest: &TestGuest,
    params: &GuestParams,
    scaled: &[TscScaled],
    code: &GuestCode,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut no_room = a.create_label();
    let mut msg_banner = a.create_label();
    let mut msg_ws_start = a.create_label();
    let mut msg_ws_pages = a.create_label();
    let mut msg_tsc = a.create_label();
    let mut msg_newline = a.create_label();
    let mut msg_no_room = a.create_label();
    let param = |offset: i32| qword_ptr(layout::PARAMS + offset as u64);

    a.mov(ax, u32::from(selector::KERNEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(rsp, layout::EXCEPTION_STACK_TOP)?;
    a.lgdt(ptr(VAR_GDTR))?;
    a.lidt(ptr(VAR_IDTR))?;
    a.mov(ax, u32::from(selector::TSS))?;
    a.ltr(ax)?;

    a.mov(rbx, qword_ptr(VAR_TSC_KHZ))?;
    a.imul_3(rbx, rbx, 1000)?;
    for field in scaled {
        let mut nonzero = a.create_label();
        a.mov(rax, rbx)?;
        a.mov(rcx, field.mul)?;
        a.mul(rcx)?;
        a.mov(rcx, field.div)?;
        a.div(rcx)?;
        a.test(rax, rax)?;
        a.jnz(nonzero)?;
        a.inc(eax)?;
        a.set_label(&mut nonzero)?;
        a.mov(param(field.offset), rax)?;
    }

    let is_dirty = params.ws_pages != 0;
    if is_dirty {
        let mut keep = a.create_label();
        a.mov(rax, qword_ptr(VAR_MODULES_END))?;
        a.add(rax, (WORKING_SET_ALIGN - 1) as i32)?;
        a.and(rax, -(WORKING_SET_ALIGN as i32))?;
        a.cmp(rax, param(offsets::WS_START))?;
        a.jbe(keep)?;
        a.mov(param(offsets::WS_START), rax)?;
        a.set_label(&mut keep)?;
        a.mov(rax, param(offsets::WS_PAGES))?;
        a.shl(rax, 12)?;
        a.add(rax, param(offsets::WS_START))?;
        // The smaller of the loader's RAM end and the one the page tables were built for.
        a.mov(rcx, qword_ptr(VAR_BUILT_RAM_END))?;
        a.mov(rdx, qword_ptr(VAR_LOADER_RAM_END))?;
        a.cmp(rdx, rcx)?;
        a.cmovb(rcx, rdx)?;
        a.cmp(rax, rcx)?;
        a.ja(no_room)?;
    }

    // print_str and print_dec keep R11, so it holds the call target.
    let print = |a: &mut CodeAssembler, message: CodeLabel| -> Result<(), IcedError> {
        a.lea(rcx, ptr(message))?;
        a.mov(r11, code.print_str)?;
        a.call(r11)
    };
    let print_value = |a: &mut CodeAssembler, value: AsmMemoryOperand| -> Result<(), IcedError> {
        a.mov(rax, value)?;
        a.mov(r11, code.print_dec)?;
        a.call(r11)
    };
    print(&mut a, msg_banner)?;
    if is_dirty {
        print(&mut a, msg_ws_start)?;
        print_value(&mut a, param(offsets::WS_START))?;
        print(&mut a, msg_ws_pages)?;
        print_value(&mut a, param(offsets::WS_PAGES))?;
    }
    print(&mut a, msg_tsc)?;
    print_value(&mut a, qword_ptr(VAR_TSC_KHZ))?;
    print(&mut a, msg_newline)?;

    let entry = match guest {
        TestGuest::Counter { .. } => code.counter,
        TestGuest::Dirty { .. } => code.dirty,
        TestGuest::Verify { .. } => code.verify,
        TestGuest::Disk { .. } => code.disk,
        TestGuest::Net { .. } => code.net,
    };
    a.mov(rax, LONG_MODE_CR0)?;
    a.mov(cr0, rax)?;
    a.mov(ax, u32::from(selector::USER_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.push(i32::from(selector::USER_DATA))?;
    a.push((layout::STACKS + layout::STACK_SIZE) as i32)?;
    a.push(USER_RFLAGS as i32)?;
    a.push(i32::from(selector::USER_CODE64))?;
    a.push(entry as i32)?;
    a.xor(edi, edi)?;
    a.mov(esi, layout::PARAMS as u32)?;
    a.iretq()?;

    a.set_label(&mut no_room)?;
    print(&mut a, msg_no_room)?;
    a.mov(eax, EXIT_NO_ROOM)?;
    halt_with_status(&mut a)?;

    a.set_label(&mut msg_banner)?;
    a.db(format!("{BANNER_PREFIX} guest={}\0", guest.name()).as_bytes())?;
    a.set_label(&mut msg_ws_start)?;
    a.db(b" ws_start=\0")?;
    a.set_label(&mut msg_ws_pages)?;
    a.db(b" ws_pages=\0")?;
    a.set_label(&mut msg_tsc)?;
    a.db(b" tsc_khz=\0")?;
    a.set_label(&mut msg_newline)?;
    a.db(b"\n\0")?;
    a.set_label(&mut msg_no_room)?;
    a.db(format!(
        "{BANNER_PREFIX} the working set does not fit between the modules and the end of RAM\n\0"
    )
    .as_bytes())?;

    let result = a.assemble_options(
        KERNEL_LOAD_ADDR + CODE64_OFFSET,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(result.inner.code_buffer)
}

/// What the kernel reported when it started the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Banner {
    /// `counter` or `dirty`.
    pub guest: String,
    /// First byte of the working set (`dirty`).
    pub ws_start: Option<u64>,
    /// Pages in the working set (`dirty`).
    pub ws_pages: Option<u64>,
    /// The TSC frequency the kernel paces with.
    pub tsc_khz: u64,
}

impl Banner {
    /// A guest-physical address whose u64 grows while the workload runs: the counter's N, or
    /// for `dirty` the first word of the working set (the current pass number).
    pub fn progress_address(&self) -> u64 {
        self.ws_start.unwrap_or(layout::GUEST_STATE)
    }
}

/// Finds the kernel's banner line in serial console output.
pub fn parse_banner(console: &str) -> Option<Banner> {
    // Firmware output may precede it on the same line (SeaBIOS ends with "Booting from
    // ROM.." and no newline).
    let line = console
        .lines()
        .find_map(|line| line.split_once(BANNER_PREFIX).map(|(_, rest)| rest))?;
    let mut banner = Banner {
        guest: String::new(),
        ws_start: None,
        ws_pages: None,
        tsc_khz: 0,
    };
    for field in line.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        match key {
            "guest" => banner.guest = value.to_string(),
            "ws_start" => banner.ws_start = Some(value.parse().ok()?),
            "ws_pages" => banner.ws_pages = Some(value.parse().ok()?),
            "tsc_khz" => banner.tsc_khz = value.parse().ok()?,
            _ => {}
        }
    }
    (!banner.guest.is_empty() && banner.tsc_khz != 0).then_some(banner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::kernel::{BootModule, load_kernel};
    use crate::memory::GuestRam;

    const MIB: u64 = 1 << 20;

    fn dirty(working_set: u64, pages_per_sec: Option<u64>) -> TestGuest {
        TestGuest::Dirty {
            start: None,
            working_set,
            pages_per_sec,
            passes: 0,
        }
    }

    #[test]
    fn tsc_scaled_fields_match_guest_params() {
        let guests = [
            TestGuest::Counter { ticks_per_sec: 10 },
            TestGuest::Counter { ticks_per_sec: 7 },
            dirty(4 * MIB, Some(20_000)),
            dirty(4 * MIB, Some(3)),
        ];
        for guest in &guests {
            for tsc_khz in [1_000_000u64, 2_445_434, 3_999_999] {
                let params = guest_params(guest, 1, 64 * MIB, tsc_khz, None, None).unwrap();
                let bytes = params.to_bytes();
                let fields = tsc_scaled_fields(guest, 1);
                assert_eq!(fields.len(), 1, "{guest:?}");
                for field in fields {
                    let at = field.offset as usize;
                    let expected = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
                    let computed = (tsc_khz * 1000 * field.mul / field.div).max(1);
                    assert_eq!(computed, expected, "{guest:?} at {tsc_khz} kHz");
                }
            }
        }
        assert!(tsc_scaled_fields(&dirty(4 * MIB, None), 1).is_empty());
    }

    #[test]
    fn page_runs_merge_touching_pages_and_overlay_in_order() {
        let pieces = [
            TableImage {
                gpa: 0x1000,
                bytes: vec![1; 8],
            },
            TableImage {
                gpa: 0x2800,
                bytes: vec![2; 0x900],
            },
            TableImage {
                gpa: 0x9000,
                bytes: vec![3; 16],
            },
            TableImage {
                gpa: 0x9008,
                bytes: vec![4; 4],
            },
        ];
        let runs = page_runs(&pieces);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].gpa, runs[0].bytes.len()), (0x1000, 0x3000));
        assert_eq!(&runs[0].bytes[..9], &[1, 1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(runs[0].bytes[0x1800], 2);
        assert_eq!(runs[0].bytes[0x20ff], 2);
        assert_eq!((runs[1].gpa, runs[1].bytes.len()), (0x9000, 0x1000));
        assert_eq!(
            &runs[1].bytes[..16],
            &[3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 3, 3, 3, 3]
        );
    }

    #[test]
    fn kernel_carries_the_vmm_tables_code_and_params() {
        let memory = 1 << 30;
        let kernel = build(&dirty(64 * MIB, Some(20_000)), memory, 2_000_000).unwrap();
        assert_eq!(kernel.working_set_start, 4 * MIB);
        assert!(kernel.image_end <= kernel.working_set_start);
        // Ferry's own multiboot loader accepts it and places a module after the image.
        let ram = GuestRam::new(64 * MIB).unwrap();
        let module = BootModule {
            data: vec![7; 3 * MIB as usize],
            cmdline: "content".into(),
        };
        let small = build(&dirty(4 * MIB, Some(20_000)), 64 * MIB, 2_000_000).unwrap();
        let loaded = load_kernel(&ram, &small.elf, "tsc_khz=1", &[module]).unwrap();
        assert_eq!(loaded.mode, tables::EntryMode::Protected32);
        assert!(loaded.entry >= KERNEL_LOAD_ADDR && loaded.entry < KERNEL_LOAD_ADDR + 0x1000);

        // Every table image the VMM would write is somewhere in the image, byte for byte.
        let code = guest_code();
        let image = &kernel.elf[0x1000..];
        let mut expected =
            tables::system_table_images(&layout::ram_ranges(memory), &code.exception_stubs, true);
        expected.push(TableImage {
            gpa: layout::CODE,
            bytes: code.bytes.clone(),
        });
        for piece in page_runs(&expected) {
            // The kernel's first run also holds the parameter block; the others must match.
            if piece.gpa == layout::PARAMS {
                continue;
            }
            assert!(
                image
                    .windows(piece.bytes.len())
                    .any(|window| window == piece.bytes.as_slice()),
                "run at {:#x} missing",
                piece.gpa
            );
        }
    }

    #[test]
    fn verify_and_oversized_working_sets_are_refused() {
        assert!(matches!(
            build(
                &TestGuest::Verify {
                    seed: 1,
                    pages: None
                },
                64 * MIB,
                1
            ),
            Err(WorkloadKernelError::UnsupportedGuest("verify"))
        ));
        assert!(matches!(
            build(&dirty(62 * MIB, None), 64 * MIB, 1),
            Err(WorkloadKernelError::Guest(_))
        ));
    }

    #[test]
    fn banner_round_trips() {
        let text = "noise\nferry multiboot workload: guest=dirty ws_start=541065216 ws_pages=16384 tsc_khz=2445434\ntick 1\n";
        let banner = parse_banner(text).unwrap();
        assert_eq!(banner.guest, "dirty");
        assert_eq!(banner.ws_start, Some(541_065_216));
        assert_eq!(banner.ws_pages, Some(16384));
        assert_eq!(banner.tsc_khz, 2_445_434);
        assert_eq!(banner.progress_address(), 541_065_216);
        let counter = parse_banner(
            "SeaBIOS\r\nBooting from ROM..ferry multiboot workload: guest=counter tsc_khz=5\n",
        )
        .unwrap();
        assert_eq!(counter.progress_address(), layout::GUEST_STATE);
        assert!(parse_banner("ferry multiboot workload: guest=dirty tsc_khz=x").is_none());
        assert!(parse_banner("nothing here").is_none());
    }
}
