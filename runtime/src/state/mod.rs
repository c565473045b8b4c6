//! Complete VM state outside guest memory: every vCPU, the in-kernel interrupt controllers,
//! PIT and clock, the devices, and the VM's identity and shape.

pub mod blob;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::devices::DevicesState;

/// MSR that arms the LAPIC timer in TSC-deadline mode; must be written after the LAPIC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// A model-specific register and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Everything KVM holds for one vCPU. XSAVE covers the legacy FPU/SSE state too.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX, ...: the 4 KiB XSAVE area as 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Every MSR the host lets KVM save.
    pub msrs: Vec<MsrValue>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, waiting for SIPI, ...).
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
}

/// The in-kernel irqchip, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Who the VM is; unchanged by save/restore and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// Name, unique in a cluster.
    pub name: String,
    /// UUID.
    pub uuid: Uuid,
    /// MAC address of the VM's NIC.
    pub mac: [u8; 6],
}

impl VmIdentity {
    /// An identity with a fresh UUID and a locally administered MAC derived from it.
    pub fn new(name: &str) -> Self {
        let uuid = Uuid::new_v4();
        let b = uuid.as_bytes();
        VmIdentity {
            name: name.to_string(),
            uuid,
            mac: [0x52, 0x54, 0x00, b[0], b[1], b[2]],
        }
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// What a VM looks like to its guest: vCPUs, memory and the CPUID it was given.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmShape {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM in bytes.
    pub memory: u64,
    /// CPUID table given to vCPU 0 (others differ only in APIC IDs).
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// A VM's complete state apart from guest memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Identity.
    pub identity: VmIdentity,
    /// Shape.
    pub shape: VmShape,
    /// What the VM booted (for display).
    pub boot: String,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub platform: PlatformState,
    /// Devices.
    pub devices: DevicesState,
}

/// A KVM state ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed for {target}")]
pub struct StateIoctlError {
    /// Which ioctl.
    pub operation: &'static str,
    /// Which vCPU or "VM".
    pub target: String,
    /// Cause.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn vcpu_err(id: u32, operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateIoctlError {
    move |source| StateIoctlError {
        operation,
        target: format!("vCPU {id}"),
        source,
    }
}

fn vm_err(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateIoctlError {
    move |source| StateIoctlError {
        operation,
        target: "VM".into(),
        source,
    }
}

/// Reads the subset of `candidates` that this vCPU can actually read; some MSRs KVM lists
/// are unreadable depending on CPU features, and `KVM_GET_MSRS` stops at the first one.
pub fn readable_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let mut readable = Vec::with_capacity(candidates.len());
    let mut rest: &[u32] = candidates;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let read = fd.get_msrs(&mut msrs).unwrap_or(0);
        readable.extend_from_slice(&rest[..read]);
        // Skip the MSR that stopped the batch.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    readable
}

/// Reads a vCPU's complete state. The vCPU must not be running.
pub fn capture_vcpu(
    fd: &VcpuFd,
    id: u32,
    msr_indices: &[u32],
) -> Result<VcpuState, StateIoctlError> {
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateIoctlError {
        operation: "KVM_GET_MSRS (too many MSRs)",
        target: format!("vCPU {id}"),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let read = fd
        .get_msrs(&mut msrs)
        .map_err(vcpu_err(id, "KVM_GET_MSRS"))?;
    if read != entries.len() {
        return Err(StateIoctlError {
            operation: "KVM_GET_MSRS (an MSR became unreadable)",
            target: format!("vCPU {id}, MSR {:#x}", msr_indices[read]),
            source: kvm_ioctls::Error::new(libc::EIO),
        });
    }
    Ok(VcpuState {
        id,
        regs: fd.get_regs().map_err(vcpu_err(id, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?,
        xsave: fd
            .get_xsave()
            .map_err(vcpu_err(id, "KVM_GET_XSAVE"))?
            .region
            .to_vec(),
        xcrs: fd.get_xcrs().map_err(vcpu_err(id, "KVM_GET_XCRS"))?,
        msrs: msrs
            .as_slice()
            .iter()
            .map(|e| MsrValue {
                index: e.index,
                data: e.data,
            })
            .collect(),
        lapic: fd.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?,
        events: fd
            .get_vcpu_events()
            .map_err(vcpu_err(id, "KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd
            .get_mp_state()
            .map_err(vcpu_err(id, "KVM_GET_MP_STATE"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(vcpu_err(id, "KVM_GET_DEBUGREGS"))?,
    })
}

fn set_msrs(fd: &VcpuFd, id: u32, values: &[MsrValue]) -> Result<(), StateIoctlError> {
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| StateIoctlError {
        operation: "KVM_SET_MSRS (too many MSRs)",
        target: format!("vCPU {id}"),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = fd.set_msrs(&msrs).map_err(vcpu_err(id, "KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(StateIoctlError {
            operation: "KVM_SET_MSRS (the host refused an MSR value)",
            target: format!("vCPU {id}, MSR {:#x}", values[written].index),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}

/// Writes a vCPU's complete state, in the order KVM's dependencies need (as QEMU does):
/// registers and XSAVE, then control registers, then MSRs, then MP state and LAPIC, then the
/// TSC deadline (meaningful only once the LAPIC is in deadline mode), events and debug
/// registers.
pub fn apply_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateIoctlError> {
    let id = state.id;
    fd.set_regs(&state.regs)
        .map_err(vcpu_err(id, "KVM_SET_REGS"))?;
    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(StateIoctlError {
            operation: "KVM_SET_XSAVE (XSAVE area has the wrong size)",
            target: format!("vCPU {id}"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: `xsave` is a complete legacy 4 KiB kvm_xsave (no trailing dynamic area is
    // needed: this format holds every component the host supports without AMX).
    unsafe { fd.set_xsave(&xsave) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(vcpu_err(id, "KVM_SET_XCRS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(vcpu_err(id, "KVM_SET_SREGS"))?;
    let (deadline, others): (Vec<MsrValue>, Vec<MsrValue>) = state
        .msrs
        .iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    set_msrs(fd, id, &others)?;
    fd.set_mp_state(state.mp_state)
        .map_err(vcpu_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_lapic(&state.lapic)
        .map_err(vcpu_err(id, "KVM_SET_LAPIC"))?;
    set_msrs(fd, id, &deadline)?;
    fd.set_vcpu_events(&state.events)
        .map_err(vcpu_err(id, "KVM_SET_VCPU_EVENTS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(vcpu_err(id, "KVM_SET_DEBUGREGS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateIoctlError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the in-kernel irqchip, PIT and clock.
pub fn capture_platform(vm: &VmFd) -> Result<PlatformState, StateIoctlError> {
    Ok(PlatformState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

/// Writes the in-kernel irqchip, PIT and clock.
pub fn apply_platform(vm: &VmFd, state: &PlatformState) -> Result<(), StateIoctlError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    // Only the clock value moves; host-specific flags (e.g. TSC-stable) are the host's.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

/// Made-up but complete states, for tests and for the decoders' fuzz targets.
#[doc(hidden)]
pub mod samples {
    use super::*;
    use crate::devices::{SerialSnapshot, TestDeviceState};

    fn filled<T: Default + Copy>(byte: u8) -> T {
        let mut value = T::default();
        // SAFETY: T is one of the plain-old-data kvm-bindings structs used below, for which
        // every byte pattern is a valid value; we overwrite exactly size_of::<T>() bytes.
        unsafe {
            std::ptr::write_bytes(
                &mut value as *mut T as *mut u8,
                byte,
                std::mem::size_of::<T>(),
            );
        }
        value
    }

    /// A vCPU state with every field set.
    pub fn sample_vcpu(id: u32) -> VcpuState {
        VcpuState {
            id,
            regs: filled(1),
            sregs: filled(2),
            xsave: (0..1024).collect(),
            xcrs: filled(4),
            msrs: vec![
                MsrValue {
                    index: 0x10,
                    data: 123,
                },
                MsrValue {
                    index: MSR_IA32_TSC_DEADLINE,
                    data: 9,
                },
            ],
            lapic: filled(5),
            events: filled(6),
            mp_state: filled(7),
            debug_regs: filled(8),
        }
    }

    /// A platform state with every field set.
    pub fn sample_platform() -> PlatformState {
        PlatformState {
            pic_master: filled(9),
            pic_slave: filled(10),
            ioapic: filled(11),
            pit: filled(12),
            clock: filled(13),
        }
    }

    /// A state with every field set (no VM behind it): seeds for fuzzing, and tests.
    pub fn sample_vm() -> VmState {
        VmState {
            identity: VmIdentity::new("vm1"),
            shape: VmShape {
                vcpus: 2,
                memory: 64 << 20,
                cpuid: vec![filled(14), filled(15)],
            },
            boot: "counter".into(),
            vcpus: vec![sample_vcpu(0), sample_vcpu(1)],
            platform: sample_platform(),
            devices: DevicesState {
                serial: SerialSnapshot {
                    scratch: 3,
                    in_buffer: b"abc".to_vec(),
                    ..Default::default()
                },
                test: TestDeviceState {
                    progress: 5,
                    ..Default::default()
                },
                disks: vec![crate::devices::DiskState::default()],
                nics: vec![crate::devices::NicState {
                    pending: Some(vec![7; 60]),
                    ..Default::default()
                }],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::samples::{sample_platform, sample_vcpu, sample_vm};
    use super::*;

    /// Encode, decode, encode again: identical bytes means nothing was lost.
    fn assert_round_trip<T: Serialize + serde::de::DeserializeOwned>(value: &T) {
        let first = blob::encode(value).unwrap();
        let back: T = blob::decode(&first).unwrap();
        assert_eq!(blob::encode(&back).unwrap(), first);
    }

    #[test]
    fn every_component_round_trips() {
        let vcpu = sample_vcpu(3);
        assert_round_trip(&vcpu.regs);
        assert_round_trip(&vcpu.sregs);
        assert_round_trip(&vcpu.xcrs);
        assert_round_trip(&vcpu.msrs);
        assert_round_trip(&vcpu.lapic);
        assert_round_trip(&vcpu.events);
        assert_round_trip(&vcpu.mp_state);
        assert_round_trip(&vcpu.debug_regs);
        assert_round_trip(&vcpu);
        assert_round_trip(&sample_platform());
        let vm = sample_vm();
        assert_round_trip(&vm.identity);
        assert_round_trip(&vm.shape);
        assert_round_trip(&vm.devices);
        assert_round_trip(&vm);
        let back: VmState = blob::decode(&blob::encode(&vm).unwrap()).unwrap();
        assert_eq!(back.identity, vm.identity);
        assert_eq!(back.devices, vm.devices);
        assert_eq!(back.vcpus[1].regs.rip, vm.vcpus[1].regs.rip);
        assert_eq!(back.vcpus[1].xsave, vm.vcpus[1].xsave);
    }

    #[test]
    fn identity_mac_is_locally_administered() {
        let id = VmIdentity::new("x");
        assert_eq!(id.mac[0] & 0x02, 0x02);
        assert_eq!(id.mac_string().len(), 17);
    }
}
