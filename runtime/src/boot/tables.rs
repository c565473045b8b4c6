//! x86 system tables the VMM builds in guest memory (GDT, TSS, IDT, identity page tables)
//! and the register states for the three ways Ferry enters a guest: 64-bit CPL 3 (built-in
//! guests), 64-bit CPL 0 (64-bit ELF kernels) and 32-bit protected mode (multiboot).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::layout::{self, selector};
use crate::memory::{GuestRam, MemoryError};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;
/// Accessed and dirty are preset so the CPU never writes the tables: a guest that touches
/// only its working set dirties only its working set.
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
const LEAF_FLAGS: u64 = TABLE_FLAGS | PTE_DIRTY | PTE_HUGE;

/// Ports below this are open to CPL 3 through the TSS I/O bitmap.
const TSS_IO_PORTS: u64 = 0x600;
/// TSS limit: the 0x68-byte TSS, the bitmap, and the terminating all-ones byte.
const TSS_LIMIT: u64 = 0x68 + TSS_IO_PORTS / 8;

const _: () = assert!(layout::TSS + TSS_LIMIT < layout::IDT);

/// CR0 in long mode as the VMM enters the built-in guests and 64-bit kernels. Kernels that
/// switch to long mode themselves write it in two steps: without [`CR0_WRITE_PROTECT`]
/// while they still patch read-only pages, then with it.
pub const LONG_MODE_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
/// The write-protect bit of CR0: CPL-0 writes honour read-only page mappings.
pub const CR0_WRITE_PROTECT: u64 = CR0_WP;
/// CR4 in long mode: PAE paging, SSE enabled.
pub const LONG_MODE_CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
/// EFER.LME: what software sets to enter long mode (the CPU then sets LMA itself).
pub const EFER_LONG_MODE_ENABLE: u64 = EFER_LME;
/// RFLAGS of a built-in guest at entry: interrupts off, IOPL 3.
pub const USER_RFLAGS: u64 = RFLAGS_RESERVED | RFLAGS_IOPL3;
/// GDTR limit of the GDT [`system_table_images`] builds.
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;
/// IDTR limit of the IDT [`system_table_images`] builds (32 exception gates).
pub const IDT_LIMIT: u16 = 32 * 16 - 1;
const GDT_ENTRIES: usize = 9;

/// How the first instruction runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Long mode, CPL 3, IOPL 3 (built-in guests).
    User64,
    /// Long mode, CPL 0 (64-bit ELF kernels).
    Kernel64,
    /// 32-bit protected mode, paging off, CPL 0 (multiboot v1).
    Protected32,
}

/// A GDT descriptor from its parts (base, limit, access byte, flags nibble).
const fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags as u64) & 0xf) << 52)
        | (((base as u64 >> 24) & 0xff) << 56)
}

/// The GDT, indexed by selector / 8.
fn gdt() -> [u64; GDT_ENTRIES] {
    let tss_limit = TSS_LIMIT as u32;
    let tss_base = layout::TSS;
    let tss_low = descriptor(tss_base as u32, tss_limit, 0x89, 0);
    let tss_high = tss_base >> 32;
    [
        0,
        descriptor(0, 0xfffff, 0x9b, 0xa), // 0x08 kernel code 64
        descriptor(0, 0xfffff, 0x93, 0xc), // 0x10 kernel data
        descriptor(0, 0xfffff, 0xfb, 0xc), // 0x18 user code 32 (unused, keeps SYSRET layout)
        descriptor(0, 0xfffff, 0xf3, 0xc), // 0x20 user data
        descriptor(0, 0xfffff, 0xfb, 0xa), // 0x28 user code 64
        tss_low,                           // 0x30 TSS (two slots)
        tss_high,
        descriptor(0, 0xfffff, 0x9b, 0xc), // 0x40 kernel code 32
    ]
}

/// Writes the GDT, TSS, IDT (gates to `exception_stubs`) and identity page tables covering
/// all of the VM's RAM. With `protect_low`, the first MiB (the VMM's tables, parameters and
/// guest code) is mapped read-only.
///
/// Why read-only matters: under dirty logging, KVM's shadow MMU maps a page the guest merely
/// reads as writable when the guest's PTE is writable and already dirty, and marks it dirty
/// at that moment. Read-only mappings keep the dirty log exactly what the guest wrote.
pub fn write_system_tables(
    ram: &GuestRam,
    exception_stubs: &[u64; 32],
    protect_low: bool,
) -> Result<(), MemoryError> {
    for piece in system_table_images(&ram.layout(), exception_stubs, protect_low) {
        ram.write(piece.gpa, &piece.bytes)?;
    }
    Ok(())
}

/// Bytes destined for one guest-physical address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableImage {
    /// Where the bytes go.
    pub gpa: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// What [`write_system_tables`] writes for a VM whose RAM is `ram_ranges` (`(start, length)`
/// pairs), as byte images in write order: a later image may overwrite part of an earlier
/// one. A multiboot kernel carries these images and copies them into place itself, so a
/// guest booted by any loader gets exactly the tables the VMM gives the built-in guests.
pub fn system_table_images(
    ram_ranges: &[(u64, u64)],
    exception_stubs: &[u64; 32],
    protect_low: bool,
) -> Vec<TableImage> {
    let mut images = Vec::new();
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    images.push(TableImage {
        gpa: layout::GDT,
        bytes: gdt_bytes,
    });

    // 64-bit TSS: RSP0 at offset 4, then an I/O permission bitmap allowing every port up
    // to TSS_IO_PORTS (a clear bit allows the port at CPL 3).
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[4..12].copy_from_slice(&layout::EXCEPTION_STACK_TOP.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    *tss.last_mut().unwrap_or(&mut 0) = 0xff;
    images.push(TableImage {
        gpa: layout::TSS,
        bytes: tss,
    });

    let mut idt = Vec::with_capacity(32 * 16);
    for &handler in exception_stubs {
        let low = (handler & 0xffff)
            | (u64::from(selector::KERNEL_CODE64) << 16)
            | (0x8eu64 << 40) // present, DPL 0, 64-bit interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&low.to_le_bytes());
        idt.extend_from_slice(&(handler >> 32).to_le_bytes());
    }
    images.push(TableImage {
        gpa: layout::IDT,
        bytes: idt,
    });

    identity_map_images(ram_ranges, protect_low, &mut images);
    images
}

/// PML4 → one PDPT → 2 MiB pages, identity-mapping every GiB that holds RAM or device
/// registers; with
/// `protect_low`, the first 2 MiB use 4 KiB pages and the first MiB is read-only.
fn identity_map_images(ram_ranges: &[(u64, u64)], protect_low: bool, out: &mut Vec<TableImage>) {
    out.push(TableImage {
        gpa: layout::PML4,
        bytes: (layout::PDPT | TABLE_FLAGS).to_le_bytes().to_vec(),
    });
    let top = ram_ranges
        .iter()
        .map(|&(gpa, len)| gpa + len)
        .max()
        .unwrap_or(0);
    // The GiB of the virtio-mmio windows too, so CPL-3 guests can reach device registers.
    let top = top.max(layout::VIRTIO_MMIO_BASE + layout::VIRTIO_MMIO_WINDOW);
    let gibs = top.div_ceil(1 << 30);
    let mut pdpt = Vec::with_capacity(gibs as usize * 8);
    for gib in 0..gibs {
        let dir = layout::PAGE_DIRS + gib * layout::PAGE_SIZE;
        pdpt.extend_from_slice(&(dir | TABLE_FLAGS).to_le_bytes());
        let dir_bytes: Vec<u8> = (0..512u64)
            .flat_map(|i| (((gib << 30) + (i << 21)) | LEAF_FLAGS).to_le_bytes())
            .collect();
        out.push(TableImage {
            gpa: dir,
            bytes: dir_bytes,
        });
    }
    out.push(TableImage {
        gpa: layout::PDPT,
        bytes: pdpt,
    });
    if protect_low {
        let table: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                let addr = i * layout::PAGE_SIZE;
                let flags = if addr < 0x10_0000 {
                    PTE_PRESENT | PTE_USER | PTE_ACCESSED
                } else {
                    TABLE_FLAGS | PTE_DIRTY
                };
                (addr | flags).to_le_bytes()
            })
            .collect();
        out.push(TableImage {
            gpa: layout::PAGE_TABLE_LOW,
            bytes: table,
        });
        out.push(TableImage {
            gpa: layout::PAGE_DIRS,
            bytes: (layout::PAGE_TABLE_LOW | TABLE_FLAGS)
                .to_le_bytes()
                .to_vec(),
        });
    }
}

fn segment(selector: u16, code: bool, long: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long && code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the segment, control and descriptor-table registers for `mode` on top of the
/// vCPU's reset state `sregs`.
pub fn entry_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let (code, data) = match mode {
        EntryMode::User64 => (
            segment(selector::USER_CODE64, true, true, 3),
            segment(selector::USER_DATA, false, true, 3),
        ),
        EntryMode::Kernel64 => (
            segment(selector::KERNEL_CODE64, true, true, 0),
            segment(selector::KERNEL_DATA, false, true, 0),
        ),
        EntryMode::Protected32 => (
            segment(selector::KERNEL_CODE32, true, false, 0),
            segment(selector::KERNEL_DATA, false, false, 0),
        ),
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: layout::TSS,
        limit: TSS_LIMIT as u32,
        selector: selector::TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = IDT_LIMIT;
    match mode {
        EntryMode::User64 | EntryMode::Kernel64 => {
            sregs.cr0 = LONG_MODE_CR0;
            sregs.cr3 = layout::PML4;
            sregs.cr4 = LONG_MODE_CR4;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Protected32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.idt.limit = 0;
        }
    }
    sregs
}

/// General registers at entry: instruction pointer, stack, flags and two argument registers
/// (RDI/RSI for built-in guests; EAX/EBX carry the multiboot magic and info for kernels).
pub fn entry_regs(mode: EntryMode, rip: u64, rsp: u64, arg0: u64, arg1: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rip,
        rsp,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match mode {
        EntryMode::User64 => {
            regs.rflags = USER_RFLAGS;
            regs.rdi = arg0;
            regs.rsi = arg1;
        }
        EntryMode::Kernel64 | EntryMode::Protected32 => {
            regs.rax = arg0;
            regs.rbx = arg1;
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_flat_segments() {
        assert_eq!(descriptor(0, 0xfffff, 0x9b, 0xa), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0, 0xfffff, 0xf3, 0xc), 0x00cf_f300_0000_ffff);
        let table = gdt();
        assert_eq!(
            table[usize::from(selector::KERNEL_CODE32 / 8)],
            0x00cf_9b00_0000_ffff
        );
        assert_eq!(table[usize::from(selector::USER_CODE64 / 8)] >> 45 & 3, 3);
    }

    #[test]
    fn page_tables_identity_map_all_ram_with_preset_accessed_dirty() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_system_tables(&ram, &[0x80000; 32], false).unwrap();
        let mut pml4 = [0u8; 8];
        ram.read(layout::PML4, &mut pml4).unwrap();
        assert_eq!(u64::from_le_bytes(pml4) & !0xfff, layout::PDPT);
        let mut pde = [0u8; 8];
        ram.read(layout::PAGE_DIRS + 31 * 8, &mut pde).unwrap();
        let pde = u64::from_le_bytes(pde);
        assert_eq!(pde & !0xfff, 31 << 21);
        assert_eq!(pde & LEAF_FLAGS, LEAF_FLAGS);

        write_system_tables(&ram, &[0x80000; 32], true).unwrap();
        let read = |gpa| {
            let mut b = [0u8; 8];
            ram.read(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(read(layout::PAGE_DIRS) & !0xfff, layout::PAGE_TABLE_LOW);
        let code_pte = read(layout::PAGE_TABLE_LOW + (layout::CODE >> 12) * 8);
        assert_eq!(code_pte & PTE_WRITABLE, 0, "code is read-only");
        let stack_pte = read(layout::PAGE_TABLE_LOW + (layout::STACKS >> 12) * 8);
        assert_ne!(stack_pte & PTE_WRITABLE, 0, "stacks are writable");
    }

    #[test]
    fn user_entry_runs_at_cpl3_with_iopl3() {
        let sregs = entry_sregs(kvm_sregs::default(), EntryMode::User64);
        assert_eq!(sregs.cs.dpl, 3);
        assert_eq!(sregs.cs.selector & 3, 3);
        assert_eq!(sregs.cs.l, 1);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let regs = entry_regs(EntryMode::User64, 1, 2, 3, 4);
        assert_eq!(regs.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!((regs.rdi, regs.rsi), (3, 4));
        let sregs32 = entry_sregs(kvm_sregs::default(), EntryMode::Protected32);
        assert_eq!(sregs32.cr0 & CR0_PG, 0);
        assert_eq!(sregs32.cs.db, 1);
    }
}
