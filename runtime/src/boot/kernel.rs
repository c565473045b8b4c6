//! Loading ELF kernels: 32-bit multiboot v1 kernels with modules, entered the way QEMU's
//! `-kernel`/`-initrd` enters them, and 64-bit ELF kernels entered in long mode.
//!
//! ELF parsing uses the `object` crate rather than linux-loader because linux-loader's ELF
//! loader accepts only ELF64, and multiboot kernels are ELF32.

use object::Endianness;
use object::read::elf::{FileHeader, ProgramHeader};

use super::tables::EntryMode;
use crate::layout::{self, PAGE_SIZE};
use crate::memory::{GuestRam, MemoryError};

const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
const MULTIBOOT_BOOT_MAGIC: u32 = 0x2BAD_B002;
const MULTIBOOT_SEARCH: usize = 8192;
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
const KERNEL_MIN_ADDR: u64 = 0x10_0000;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

// Placement inside the multiboot information area.
const INFO_MMAP_OFFSET: u64 = 0x100;
const INFO_MODS_OFFSET: u64 = 0x400;
const INFO_STRINGS_OFFSET: u64 = 0x1000;

/// A module handed to a multiboot kernel (its bytes and its string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootModule {
    /// Module contents.
    pub data: Vec<u8>,
    /// The module's command line / name.
    pub cmdline: String,
}

/// Where a loaded kernel starts and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Entry point (guest-physical; kernels run identity-mapped or unpaged at entry).
    pub entry: u64,
    /// CPU mode at entry.
    pub mode: EntryMode,
    /// Value for EAX (the multiboot boot magic).
    pub magic: u64,
    /// Address of the multiboot information structure (EBX).
    pub info: u64,
    /// First free page after the kernel and its modules.
    pub end: u64,
}

/// Errors from loading a kernel image.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is not an ELF file this loader understands.
    #[error("kernel image is not a loadable x86 ELF file: {0}")]
    NotElf(String),
    /// A 32-bit kernel without a multiboot header has no defined entry state.
    #[error(
        "32-bit ELF kernel has no multiboot v1 header in its first 8 KiB; only multiboot kernels can boot in 32-bit mode"
    )]
    NoMultibootHeader,
    /// The multiboot header's checksum is wrong.
    #[error("multiboot header at offset {offset:#x} has a bad checksum")]
    BadMultibootChecksum {
        /// File offset of the header.
        offset: usize,
    },
    /// A segment or module would land outside RAM or on memory the VMM uses.
    #[error("{what} at {gpa:#x}+{len:#x} does not fit: {reason}")]
    Placement {
        /// Which piece.
        what: String,
        /// Its address.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Why.
        reason: &'static str,
    },
    /// Command line and module strings exceed the information area.
    #[error("multiboot command line and module strings are too long ({len} bytes, limit {limit})")]
    InfoTooLarge {
        /// Bytes needed.
        len: u64,
        /// Bytes available.
        limit: u64,
    },
    /// Writing guest memory failed.
    #[error("writing the kernel into guest memory failed")]
    Memory(#[from] MemoryError),
}

struct Segment<'a> {
    paddr: u64,
    file: &'a [u8],
    mem_size: u64,
}

/// Loads `image` (with `cmdline` and `modules`) into `ram` and returns how to enter it.
pub fn load_kernel(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    modules: &[BootModule],
) -> Result<LoadedKernel, BootError> {
    let multiboot = find_multiboot_header(image)?;
    let class = image.get(4).copied();
    let (segments, elf_entry) = match class {
        Some(object::elf::ELFCLASS32) => {
            elf_segments::<object::elf::FileHeader32<Endianness>>(image)?
        }
        Some(object::elf::ELFCLASS64) => {
            elf_segments::<object::elf::FileHeader64<Endianness>>(image)?
        }
        _ => return Err(BootError::NotElf("unknown ELF class".into())),
    };
    let (mode, segments, entry) = match (class, multiboot) {
        (Some(object::elf::ELFCLASS64), _) => (EntryMode::Kernel64, segments, elf_entry),
        (_, Some(header)) if header.flags & MULTIBOOT_AOUT_KLUDGE != 0 => {
            let (segment, entry) = aout_kludge_segment(image, &header)?;
            (EntryMode::Protected32, vec![segment], entry)
        }
        (_, Some(_)) => (EntryMode::Protected32, segments, elf_entry),
        (_, None) => return Err(BootError::NoMultibootHeader),
    };

    let mut end = 0u64;
    for segment in &segments {
        place_check(ram, "kernel segment", segment.paddr, segment.mem_size)?;
        ram.write(segment.paddr, segment.file)?;
        // Fresh RAM is zero, so the BSS tail needs no writes; record it anyway.
        ram.mark_written(segment.paddr, segment.mem_size);
        end = end.max(segment.paddr + segment.mem_size);
    }

    let mut next = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut placed = Vec::with_capacity(modules.len());
    for (index, module) in modules.iter().enumerate() {
        let len = module.data.len() as u64;
        place_check(ram, &format!("module {index}"), next, len.max(1))?;
        ram.write(next, &module.data)?;
        placed.push((next, next + len));
        next = (next + len).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        if len == 0 {
            next += PAGE_SIZE;
        }
    }

    write_multiboot_info(ram, cmdline, modules, &placed)?;
    Ok(LoadedKernel {
        entry,
        mode,
        magic: u64::from(MULTIBOOT_BOOT_MAGIC),
        info: layout::MULTIBOOT_INFO,
        end: next,
    })
}

fn place_check(ram: &GuestRam, what: &str, gpa: u64, len: u64) -> Result<(), BootError> {
    let fail = |reason| BootError::Placement {
        what: what.to_string(),
        gpa,
        len,
        reason,
    };
    if gpa < KERNEL_MIN_ADDR {
        return Err(fail("below 1 MiB, where the VMM keeps boot tables"));
    }
    ram.check_range(gpa, len)
        .map_err(|_| fail("not inside guest RAM (give the VM more memory)"))
}

#[derive(Clone, Copy, Debug)]
struct MultibootHeader {
    offset: usize,
    flags: u32,
}

fn read_u32(data: &[u8], offset: usize) -> Option<u32> {
    data.get(offset..offset + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn find_multiboot_header(image: &[u8]) -> Result<Option<MultibootHeader>, BootError> {
    let limit = image.len().min(MULTIBOOT_SEARCH);
    let mut offset = 0;
    while offset + 12 <= limit {
        if read_u32(image, offset) == Some(MULTIBOOT_HEADER_MAGIC) {
            let flags = read_u32(image, offset + 4).unwrap_or(0);
            let checksum = read_u32(image, offset + 8).unwrap_or(0);
            if MULTIBOOT_HEADER_MAGIC
                .wrapping_add(flags)
                .wrapping_add(checksum)
                != 0
            {
                return Err(BootError::BadMultibootChecksum { offset });
            }
            return Ok(Some(MultibootHeader { offset, flags }));
        }
        offset += 4;
    }
    Ok(None)
}

fn elf_segments<H: FileHeader<Endian = Endianness>>(
    image: &[u8],
) -> Result<(Vec<Segment<'_>>, u64), BootError> {
    let not_elf = |e: object::read::Error| BootError::NotElf(e.to_string());
    let header = H::parse(image).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    let machine = header.e_machine(endian);
    if machine != object::elf::EM_386 && machine != object::elf::EM_X86_64 {
        return Err(BootError::NotElf(format!(
            "machine type {machine} is not x86"
        )));
    }
    let mut segments = Vec::new();
    for ph in header.program_headers(endian, image).map_err(not_elf)? {
        if ph.p_type(endian) != object::elf::PT_LOAD {
            continue;
        }
        let file = ph
            .data(endian, image)
            .map_err(|()| BootError::NotElf("a program header points outside the file".into()))?;
        let mem_size: u64 = ph.p_memsz(endian).into();
        if (file.len() as u64) > mem_size {
            return Err(BootError::NotElf(
                "a segment's file size exceeds its memory size".into(),
            ));
        }
        segments.push(Segment {
            paddr: ph.p_paddr(endian).into(),
            file,
            mem_size,
        });
    }
    if segments.is_empty() {
        return Err(BootError::NotElf("no loadable segment".into()));
    }
    Ok((segments, header.e_entry(endian).into()))
}

/// The multiboot "a.out kludge": the header itself says what to load where.
fn aout_kludge_segment<'a>(
    image: &'a [u8],
    header: &MultibootHeader,
) -> Result<(Segment<'a>, u64), BootError> {
    let field = |index: usize| {
        read_u32(image, header.offset + 12 + index * 4)
            .map(u64::from)
            .ok_or_else(|| BootError::NotElf("truncated multiboot address fields".into()))
    };
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let bad = || BootError::NotElf("inconsistent multiboot address fields".into());
    let file_start = (header.offset as u64)
        .checked_sub(header_addr.checked_sub(load_addr).ok_or_else(bad)?)
        .ok_or_else(bad)? as usize;
    let load_len = if load_end == 0 {
        image.len() - file_start
    } else {
        load_end.checked_sub(load_addr).ok_or_else(bad)? as usize
    };
    let file = image
        .get(file_start..file_start + load_len)
        .ok_or_else(bad)?;
    let mem_size = if bss_end == 0 {
        load_len as u64
    } else {
        bss_end.checked_sub(load_addr).ok_or_else(bad)?
    };
    Ok((
        Segment {
            paddr: load_addr,
            file,
            mem_size: mem_size.max(load_len as u64),
        },
        entry,
    ))
}

fn write_multiboot_info(
    ram: &GuestRam,
    cmdline: &str,
    modules: &[BootModule],
    placed: &[(u64, u64)],
) -> Result<(), BootError> {
    let base = layout::MULTIBOOT_INFO;
    let strings_start = base + INFO_STRINGS_OFFSET;
    let strings_limit = layout::MULTIBOOT_INFO_END - strings_start;
    let max_modules = (INFO_STRINGS_OFFSET - INFO_MODS_OFFSET) / 16;
    if modules.len() as u64 > max_modules {
        return Err(BootError::InfoTooLarge {
            len: modules.len() as u64 * 16,
            limit: max_modules * 16,
        });
    }

    let mut strings = Vec::new();
    let mut add_string = |s: &str| {
        let at = strings_start + strings.len() as u64;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        at as u32
    };
    let cmdline_at = add_string(cmdline);
    let loader_at = add_string("ferry");
    let mut module_list = Vec::with_capacity(modules.len() * 16);
    for (module, &(start, end)) in modules.iter().zip(placed) {
        let name_at = add_string(&module.cmdline);
        for word in [start as u32, end as u32, name_at, 0] {
            module_list.extend_from_slice(&word.to_le_bytes());
        }
    }
    if strings.len() as u64 > strings_limit {
        return Err(BootError::InfoTooLarge {
            len: strings.len() as u64,
            limit: strings_limit,
        });
    }

    let mut mmap = Vec::new();
    for (gpa, len) in ram.layout() {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&gpa.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&1u32.to_le_bytes());
    }

    let low_end = ram.size().min(layout::LOW_MEMORY_END);
    let mut info = [0u32; 18];
    info[0] = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    info[1] = 640;
    info[2] = ((low_end - 0x10_0000) / 1024) as u32;
    info[4] = cmdline_at;
    info[5] = modules.len() as u32;
    info[6] = (base + INFO_MODS_OFFSET) as u32;
    info[11] = mmap.len() as u32;
    info[12] = (base + INFO_MMAP_OFFSET) as u32;
    info[16] = loader_at;
    let info_bytes: Vec<u8> = info.iter().flat_map(|w| w.to_le_bytes()).collect();
    ram.write(base, &info_bytes)?;
    ram.write(base + INFO_MMAP_OFFSET, &mmap)?;
    ram.write(base + INFO_MODS_OFFSET, &module_list)?;
    ram.write(strings_start, &strings)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::elf_image::{self, PROBE_LOAD_ADDR};

    fn read_u32_at(ram: &GuestRam, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        ram.read(gpa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn multiboot_probe_loads_with_info_and_module() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let image = elf_image::multiboot_probe().unwrap();
        let module = BootModule {
            data: b"module payload".to_vec(),
            cmdline: "mod0".into(),
        };
        let loaded = load_kernel(&ram, &image, "console=ttyS0", &[module]).unwrap();
        assert_eq!(loaded.mode, EntryMode::Protected32);
        assert!(loaded.entry > PROBE_LOAD_ADDR);
        let info = layout::MULTIBOOT_INFO;
        assert_eq!(read_u32_at(&ram, info + 20), 1, "mods_count");
        let mods = u64::from(read_u32_at(&ram, info + 24));
        let start = u64::from(read_u32_at(&ram, mods));
        assert_eq!(start % PAGE_SIZE, 0);
        let mut payload = [0u8; 14];
        ram.read(start, &mut payload).unwrap();
        assert_eq!(&payload, b"module payload");
        let cmdline = u64::from(read_u32_at(&ram, info + 16));
        let mut text = [0u8; 14];
        ram.read(cmdline, &mut text).unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
        assert_eq!(read_u32_at(&ram, info + 8), ((16 << 20) - 0x10_0000) / 1024);
    }

    #[test]
    fn elf64_enters_long_mode() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let image = elf_image::elf64_probe().unwrap();
        let loaded = load_kernel(&ram, &image, "", &[]).unwrap();
        assert_eq!(loaded.mode, EntryMode::Kernel64);
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(matches!(
            load_kernel(&ram, b"not an elf at all", "", &[]),
            Err(BootError::NotElf(_))
        ));
        // A 32-bit ELF without the multiboot header.
        let plain32 = elf_image::executable(false, PROBE_LOAD_ADDR, &[0xf4; 16], PROBE_LOAD_ADDR);
        assert!(matches!(
            load_kernel(&ram, &plain32, "", &[]),
            Err(BootError::NoMultibootHeader)
        ));
        // Broken checksum.
        let mut image = elf_image::multiboot_probe().unwrap();
        let magic = MULTIBOOT_HEADER_MAGIC.to_le_bytes();
        let at = image.windows(4).position(|w| w == magic).unwrap();
        image[at + 8] ^= 1;
        assert!(matches!(
            load_kernel(&ram, &image, "", &[]),
            Err(BootError::BadMultibootChecksum { .. })
        ));
        // Loaded below 1 MiB.
        let low = elf_image::executable(true, 0x8000, &[0xf4; 16], 0x8000);
        assert!(matches!(
            load_kernel(&ram, &low, "", &[]),
            Err(BootError::Placement { .. })
        ));
        // Module larger than RAM.
        let image = elf_image::multiboot_probe().unwrap();
        let huge = BootModule {
            data: vec![1; 17 << 20],
            cmdline: String::new(),
        };
        assert!(matches!(
            load_kernel(&ram, &image, "", &[huge]),
            Err(BootError::Placement { .. })
        ));
    }
}
