//! Emulated devices and the port-I/O bus that routes guest `in`/`out` to them.

pub mod console;
pub mod disk;
pub mod nic;
pub mod serial;
pub mod slot;
pub mod test_device;
pub mod virtio;

use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::layout::{SERIAL_PORT, SERIAL_PORT_COUNT};
pub use console::Console;
pub use disk::{Disk, DiskError, DiskInfo, DiskSpec, DiskState};
pub use nic::{Nic, NicError, NicInfo, NicSpec, NicState};
pub use serial::{SerialDevice, SerialError, SerialSnapshot};
pub use test_device::{PortEffect, TestDevice, TestDeviceState};

/// State of every device, as saved in a snapshot or sent during migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialSnapshot,
    /// Test device.
    pub test: TestDeviceState,
    /// virtio-blk disks, in slot order.
    pub disks: Vec<DiskState>,
    /// virtio-net NICs, in slot order (after the disks).
    pub nics: Vec<NicState>,
}

/// Restoring device state failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The serial port.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A NIC.
    #[error(transparent)]
    Nic(#[from] NicError),
}

/// The VM's devices.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<SerialDevice>,
    test: TestDevice,
    console: Console,
    disks: Vec<Disk>,
    nics: Vec<Nic>,
}

impl Devices {
    /// Devices in reset state, with serial output going to `console`.
    pub fn new(console: Console) -> Result<Self, SerialError> {
        Self::with_virtio(console, Vec::new(), Vec::new())
    }

    /// Devices with `disks` in virtio slots 0, 1, ... and `nics` in the slots after them.
    pub fn with_virtio(
        console: Console,
        disks: Vec<Disk>,
        nics: Vec<Nic>,
    ) -> Result<Self, SerialError> {
        Ok(Devices {
            serial: Mutex::new(SerialDevice::new(console.clone())?),
            test: TestDevice::default(),
            console,
            disks,
            nics,
        })
    }

    /// The disks.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The NICs.
    pub fn nics(&self) -> &[Nic] {
        &self.nics
    }

    /// Guest read of device memory at `gpa`; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        if let Some(disk) = self.disks.iter().find(|d| d.claims(gpa)) {
            disk.mmio_read(gpa, data);
        } else if let Some(nic) = self.nics.iter().find(|n| n.claims(gpa)) {
            nic.mmio_read(gpa, data);
        } else {
            data.fill(0xff);
        }
    }

    /// Guest write of device memory at `gpa`; unclaimed addresses ignore it.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) {
        if let Some(disk) = self.disks.iter().find(|d| d.claims(gpa)) {
            disk.mmio_write(gpa, data);
        } else if let Some(nic) = self.nics.iter().find(|n| n.claims(gpa)) {
            nic.mmio_write(gpa, data);
        }
    }

    /// Stops every device that works off the vCPU threads; when this returns, none has a
    /// request half done.
    pub fn quiesce(&self) {
        for disk in &self.disks {
            disk.quiesce();
        }
        for nic in &self.nics {
            nic.quiesce();
        }
    }

    /// Lets them work again.
    pub fn resume(&self) {
        for disk in &self.disks {
            disk.resume();
        }
        for nic in &self.nics {
            nic.resume();
        }
    }

    /// The serial port's device model.
    pub fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The test device.
    pub fn test(&self) -> &TestDevice {
        &self.test
    }

    /// The console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Guest `out` to `port` by `vcpu`.
    pub fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) -> PortEffect {
        if let Some(offset) = serial_offset(port) {
            if let Some(&byte) = data.first() {
                self.serial().write(offset, byte);
            }
            PortEffect::Continue
        } else if TestDevice::handles(port) {
            self.test.write(vcpu, port, data)
        } else {
            PortEffect::Continue
        }
    }

    /// Guest `in` from `port`; unclaimed ports read as all ones, as on a PC bus.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if let Some(offset) = serial_offset(port) {
            let value = self.serial().read(offset);
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = value;
            }
        } else {
            data.fill(0xff);
        }
    }

    /// State of all devices.
    pub fn snapshot(&self) -> DevicesState {
        DevicesState {
            serial: self.serial().snapshot(),
            test: self.test.state(),
            disks: self.disks.iter().map(Disk::state).collect(),
            nics: self.nics.iter().map(Nic::state).collect(),
        }
    }

    /// Restores all devices.
    pub fn restore(&self, state: &DevicesState) -> Result<(), DeviceStateError> {
        if state.disks.len() != self.disks.len() {
            return Err(DiskError::Count {
                saved: state.disks.len(),
                present: self.disks.len(),
            }
            .into());
        }
        if state.nics.len() != self.nics.len() {
            return Err(NicError::Count {
                saved: state.nics.len(),
                present: self.nics.len(),
            }
            .into());
        }
        for (disk, saved) in self.disks.iter().zip(&state.disks) {
            disk.restore(saved)?;
        }
        for (nic, saved) in self.nics.iter().zip(&state.nics) {
            nic.restore(saved)?;
        }
        self.serial().restore(&state.serial)?;
        self.test.restore(&state.test);
        Ok(())
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    (SERIAL_PORT..SERIAL_PORT + SERIAL_PORT_COUNT)
        .contains(&port)
        .then(|| (port - SERIAL_PORT) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::TEST_PORT_EXIT;

    #[test]
    fn bus_routes_ports() {
        let devices = Devices::new(Console::new()).unwrap();
        assert_eq!(devices.io_out(0, SERIAL_PORT, b"A"), PortEffect::Continue);
        assert_eq!(devices.console().history(), b"A");
        assert_eq!(
            devices.io_out(2, TEST_PORT_EXIT, &[9, 0, 0, 0]),
            PortEffect::Exit(9)
        );
        let mut data = [0u8; 2];
        devices.io_in(0x60, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        devices.io_in(SERIAL_PORT + 5, &mut data[..1]);
        assert_ne!(data[0] & 0x20, 0, "THR empty bit set in line status");
        let snap = devices.snapshot();
        let other = Devices::new(Console::new()).unwrap();
        other.restore(&snap).unwrap();
        assert_eq!(other.snapshot(), snap);
    }
}
