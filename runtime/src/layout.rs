//! Guest-physical memory layout shared by the VMM's boot code and the built-in guests.
//!
//! Everything the VMM places in the guest lives in the first 2 MiB; workloads use memory from
//! [`DATA_START`] up. RAM above 3 GiB is moved to 4 GiB and up so the LAPIC/IOAPIC MMIO
//! windows below 4 GiB stay free, as on a PC.

/// Guest page size. Dirty tracking and every page transfer work at this granularity.
pub const PAGE_SIZE: u64 = 4096;

/// The parameter block the VMM writes for the built-in guests ([`crate::guest::GuestParams`]).
pub const PARAMS: u64 = 0x1000;
/// Global descriptor table; the 64-bit TSS sits in the same page at [`TSS`].
pub const GDT: u64 = 0x2000;
/// Task state segment (64-bit); gives the CPL-0 stack used when a guest takes an exception.
pub const TSS: u64 = 0x2800;
/// Interrupt descriptor table: 32 exception gates pointing at report-and-stop stubs.
pub const IDT: u64 = 0x3000;
/// Multiboot information structure, memory map, command line and module list (3 pages).
pub const MULTIBOOT_INFO: u64 = 0x4000;
/// End of the multiboot information area.
pub const MULTIBOOT_INFO_END: u64 = 0x7000;
/// Page table splitting the first 2 MiB into 4 KiB pages, so the VMM's area below 1 MiB can
/// be mapped read-only for the built-in guests (see [`crate::boot::tables`]).
pub const PAGE_TABLE_LOW: u64 = 0x7000;
/// Identity-mapping page tables: PML4, then one PDPT, then page directories.
pub const PML4: u64 = 0x8000;
/// Page-directory-pointer table (covers 512 GiB).
pub const PDPT: u64 = 0x9000;
/// First page directory; one 4 KiB directory maps 1 GiB with 2 MiB pages.
pub const PAGE_DIRS: u64 = 0xA000;
/// End of the page-directory area: enough directories for [`MAX_IDENTITY_MAP`].
pub const PAGE_DIRS_END: u64 = 0x70000;
/// Top of the stack a kernel is entered with (64 KiB below the code area).
pub const KERNEL_STACK_TOP: u64 = 0x80000;
/// Highest guest-physical address the boot page tables map.
pub const MAX_IDENTITY_MAP: u64 = ((PAGE_DIRS_END - PAGE_DIRS) / PAGE_SIZE) << 30;
/// Built-in guest code (assembled by [`crate::guest`]).
pub const CODE: u64 = 0x80000;
/// End of the code area.
pub const CODE_END: u64 = 0x90000;
/// Per-vCPU CPL-3 stacks for the built-in guests, [`STACK_SIZE`] each.
pub const STACKS: u64 = 0x100000;
/// Size of one vCPU stack.
pub const STACK_SIZE: u64 = 0x2000;
/// Top of the CPL-0 stack the built-in guests' exception stubs run on (one page, shared:
/// an exception is fatal to the guest anyway).
pub const EXCEPTION_STACK_TOP: u64 = GUEST_STATE;
/// Maximum number of vCPUs the built-in guest layout has stacks for.
pub const MAX_VCPUS: u32 = ((EXCEPTION_STACK_TOP - PAGE_SIZE - STACKS) / STACK_SIZE) as u32;
/// Page where built-in guests keep their own state (the `counter` guest's N).
pub const GUEST_STATE: u64 = 0x1C0000;
/// First byte of workload memory.
pub const DATA_START: u64 = 0x200000;

/// Smallest VM the runtime builds: the fixed area plus some workload memory.
pub const MIN_MEMORY: u64 = 4 << 20;
/// RAM below 4 GiB ends here; the rest is placed at [`HIGH_MEMORY_START`].
pub const LOW_MEMORY_END: u64 = 3 << 30;
/// Where RAM above [`LOW_MEMORY_END`] continues.
pub const HIGH_MEMORY_START: u64 = 4 << 30;

/// I/O port of the 16550 serial console (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of I/O ports the serial device decodes.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// Interrupt line of the serial console.
pub const SERIAL_IRQ: u32 = 4;
/// Test device: a 32-bit write ends the writing vCPU's workload with that exit status.
pub const TEST_PORT_EXIT: u16 = 0x500;
/// Test device: a 32-bit write reports a failed check (the value, e.g. a page number).
pub const TEST_PORT_FAIL: u16 = 0x504;
/// Test device: a 32-bit write reports progress (e.g. completed verification passes).
pub const TEST_PORT_PROGRESS: u16 = 0x508;
/// Test device: a 32-bit write of N parks the writing vCPU for about N TSC cycles, or until
/// the VM is paused, whichever comes first (the guest then reads the TSC again): how the
/// built-in guests wait without burning a host core, where CPL 3 has no `hlt`.
pub const TEST_PORT_SLEEP: u16 = 0x50c;

/// Base of the first virtio-mmio device window, in the hole below 4 GiB (where Firecracker
/// puts its devices too); device `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_WINDOW`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// Interrupt line (IOAPIC pin) of virtio device `i` is `VIRTIO_IRQ_BASE + i`: pins 16..24,
/// which no legacy device uses.
pub const VIRTIO_IRQ_BASE: u32 = 16;
/// Most virtio devices a VM has (IOAPIC pins 16..24).
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// GDT selectors.
pub mod selector {
    /// 64-bit CPL-0 code.
    pub const KERNEL_CODE64: u16 = 0x08;
    /// CPL-0 data.
    pub const KERNEL_DATA: u16 = 0x10;
    /// CPL-3 data (RPL 3).
    pub const USER_DATA: u16 = 0x20 | 3;
    /// 64-bit CPL-3 code (RPL 3).
    pub const USER_CODE64: u16 = 0x28 | 3;
    /// 64-bit TSS (two GDT slots).
    pub const TSS: u16 = 0x30;
    /// 32-bit flat CPL-0 code, for multiboot entry.
    pub const KERNEL_CODE32: u16 = 0x40;
}

const _: () = assert!(TSS > GDT && TSS + 0x68 <= IDT);
const _: () = assert!(MAX_VCPUS >= 32);
const _: () = assert!(MAX_IDENTITY_MAP >= 64 << 30);
const _: () = assert!(
    VIRTIO_MMIO_BASE >= LOW_MEMORY_END
        && VIRTIO_MMIO_BASE + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_WINDOW <= 0xfec0_0000
);

/// Guest-physical address of virtio device `index`'s registers.
pub fn virtio_mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_WINDOW
}

/// The guest-physical RAM ranges `(start, length)` of a VM with `memory` bytes.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    if memory <= LOW_MEMORY_END {
        vec![(0, memory)]
    } else {
        vec![
            (0, LOW_MEMORY_END),
            (HIGH_MEMORY_START, memory - LOW_MEMORY_END),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_areas_do_not_overlap_and_fit_below_data() {
        let areas = [
            (PARAMS, GDT),
            (GDT, IDT),
            (IDT, MULTIBOOT_INFO),
            (MULTIBOOT_INFO, MULTIBOOT_INFO_END),
            (PAGE_TABLE_LOW, PML4),
            (PML4, PDPT),
            (PDPT, PAGE_DIRS),
            (PAGE_DIRS, PAGE_DIRS_END),
            (PAGE_DIRS_END, KERNEL_STACK_TOP),
            (CODE, CODE_END),
            (STACKS, GUEST_STATE),
            (GUEST_STATE, DATA_START),
        ];
        for pair in areas.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?}");
        }
    }

    #[test]
    fn ram_above_three_gib_moves_above_the_mmio_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
    }
}
