//! Small ELF kernels made from assembled code: a multiboot v1 probe (32-bit) and a 64-bit
//! probe. They check what the boot loader handed them and print it on the serial port, which
//! is how the runtime's ELF/multiboot boot path is tested, and they boot unchanged in QEMU
//! (`-kernel probe.elf -initrd module`), which is how Ferry and QEMU are compared on the
//! same guest.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};
use object::elf;
use object::write::elf::{FileHeader, ProgramHeader, Writer};

use crate::layout::{SERIAL_PORT, TEST_PORT_EXIT, TEST_PORT_PROGRESS};

/// Multiboot v1 header magic.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value in EAX when a multiboot loader enters the kernel.
pub const MULTIBOOT_BOOT_MAGIC: u32 = 0x2BAD_B002;
/// Where the probe kernels load (1 MiB, as multiboot kernels usually do).
pub const PROBE_LOAD_ADDR: u64 = 0x10_0000;

/// Exit status of a probe kernel entered without the multiboot magic in EAX.
pub const PROBE_EXIT_BAD_MAGIC: u32 = 1;
/// Exit status of a probe kernel that found no module.
pub const PROBE_EXIT_NO_MODULE: u32 = 2;

/// Wraps `image` (loaded at `addr`, entered at `entry`) in a minimal ELF executable with
/// one loadable segment; `is_64` picks ELFCLASS64/x86-64 over ELFCLASS32/i386.
pub fn executable(is_64: bool, addr: u64, image: &[u8], entry: u64) -> Vec<u8> {
    const SEGMENT_OFFSET: usize = 0x1000;
    let mut out = Vec::new();
    let mut writer = Writer::new(object::Endianness::Little, is_64, &mut out);
    writer.reserve_file_header();
    writer.reserve_program_headers(1);
    writer.reserve_until(SEGMENT_OFFSET);
    let offset = writer.reserve(image.len(), 16);
    // Writing into a Vec cannot fail; the only error is an unsupported header combination.
    let header = FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type: elf::ET_EXEC,
        e_machine: if is_64 { elf::EM_X86_64 } else { elf::EM_386 },
        e_entry: entry,
        e_flags: 0,
    };
    if writer.write_file_header(&header).is_err() {
        return Vec::new();
    }
    writer.write_align_program_headers();
    writer.write_program_header(&ProgramHeader {
        p_type: elf::PT_LOAD,
        p_flags: elf::PF_R | elf::PF_W | elf::PF_X,
        p_offset: offset as u64,
        p_vaddr: addr,
        p_paddr: addr,
        p_filesz: image.len() as u64,
        p_memsz: image.len() as u64,
        p_align: 0x1000,
    });
    writer.pad_until(offset);
    writer.write(image);
    out
}

/// A 32-bit multiboot v1 kernel that prints `multiboot cmdline=<cmdline>` and then the
/// contents of its first module, reports the module count on the progress port, and exits
/// with status 0 (or [`PROBE_EXIT_BAD_MAGIC`] / [`PROBE_EXIT_NO_MODULE`]).
pub fn multiboot_probe() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut header = a.create_label();
    let mut entry = a.create_label();
    let mut bad_magic = a.create_label();
    let mut no_module = a.create_label();
    let mut exit = a.create_label();

    a.set_label(&mut header)?;
    let flags: u32 = 0b11; // page-align modules, provide memory information
    a.dd(&[
        MULTIBOOT_HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags)),
    ])?;
    // 32-bit code has no RIP-relative addressing: keep the banner at a fixed address.
    let banner_text = b"multiboot cmdline=\0";
    let banner_addr = PROBE_LOAD_ADDR as u32 + 12;
    a.db(banner_text)?;

    a.set_label(&mut entry)?;
    a.cmp(eax, MULTIBOOT_BOOT_MAGIC)?;
    a.jne(bad_magic)?;
    a.mov(esi, ebx)?;
    a.mov(dx, SERIAL_PORT as u32)?;
    a.mov(ecx, banner_addr)?;
    print_cstr_32(&mut a)?;
    a.mov(ecx, dword_ptr(esi + 16))?;
    print_cstr_32(&mut a)?;
    a.mov(al, b'\n' as u32)?;
    a.out(dx, al)?;
    a.mov(eax, dword_ptr(esi + 20))?;
    a.mov(dx, TEST_PORT_PROGRESS as u32)?;
    a.out(dx, eax)?;
    a.mov(dx, SERIAL_PORT as u32)?;
    a.test(eax, eax)?;
    a.jz(no_module)?;
    a.mov(edi, dword_ptr(esi + 24))?;
    a.mov(ecx, dword_ptr(edi))?;
    a.mov(ebx, dword_ptr(edi + 4))?;
    {
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.cmp(ecx, ebx)?;
        a.jae(done)?;
        a.mov(al, byte_ptr(ecx))?;
        a.out(dx, al)?;
        a.inc(ecx)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
    }
    a.xor(eax, eax)?;
    a.jmp(exit)?;
    a.set_label(&mut bad_magic)?;
    a.mov(eax, PROBE_EXIT_BAD_MAGIC)?;
    a.jmp(exit)?;
    a.set_label(&mut no_module)?;
    a.mov(eax, PROBE_EXIT_NO_MODULE)?;
    a.set_label(&mut exit)?;
    a.mov(dx, TEST_PORT_EXIT as u32)?;
    a.out(dx, eax)?;
    {
        let mut halt = a.create_label();
        a.set_label(&mut halt)?;
        a.hlt()?;
        a.jmp(halt)?;
    }

    let result = a.assemble_options(
        PROBE_LOAD_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let entry = result.label_ip(&entry)?;
    Ok(executable(
        false,
        PROBE_LOAD_ADDR,
        &result.inner.code_buffer,
        entry,
    ))
}

/// A 64-bit ELF kernel that prints `elf64 cmdline=<cmdline>` (from the multiboot-style
/// information block in RBX) and exits with status 0.
pub fn elf64_probe() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut entry = a.create_label();
    let mut banner = a.create_label();
    let mut bad_magic = a.create_label();
    a.set_label(&mut entry)?;
    a.cmp(eax, MULTIBOOT_BOOT_MAGIC)?;
    a.jne(bad_magic)?;
    a.mov(dx, SERIAL_PORT as u32)?;
    a.lea(rcx, ptr(banner))?;
    print_cstr_64(&mut a)?;
    a.mov(ecx, dword_ptr(rbx + 16))?;
    print_cstr_64(&mut a)?;
    a.mov(al, b'\n' as u32)?;
    a.out(dx, al)?;
    a.xor(eax, eax)?;
    a.mov(dx, TEST_PORT_EXIT as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut bad_magic)?;
    a.mov(eax, PROBE_EXIT_BAD_MAGIC)?;
    a.mov(dx, TEST_PORT_EXIT as u32)?;
    a.out(dx, eax)?;
    a.hlt()?;
    a.set_label(&mut banner)?;
    a.db(b"elf64 cmdline=\0")?;
    let result = a.assemble_options(
        PROBE_LOAD_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let entry = result.label_ip(&entry)?;
    Ok(executable(
        true,
        PROBE_LOAD_ADDR,
        &result.inner.code_buffer,
        entry,
    ))
}

/// Prints the NUL-terminated string at ECX to the port in DX (clobbers AL, ECX).
fn print_cstr_32(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(ecx))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(ecx)?;
    a.jmp(next)?;
    a.set_label(&mut done)
}

/// Prints the NUL-terminated string at RCX to the port in DX (clobbers AL, RCX).
fn print_cstr_64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(rcx))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(rcx)?;
    a.jmp(next)?;
    a.set_label(&mut done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_elf_with_multiboot_header_in_first_8k() {
        let mb = multiboot_probe().unwrap();
        assert_eq!(&mb[..4], b"\x7fELF");
        assert_eq!(mb[4], 1, "ELFCLASS32");
        let magic = MULTIBOOT_HEADER_MAGIC.to_le_bytes();
        let at = mb.windows(4).position(|w| w == magic).unwrap();
        assert!(at < 8192 && at % 4 == 0);
        let e64 = elf64_probe().unwrap();
        assert_eq!(e64[4], 2, "ELFCLASS64");
    }
}
