//! The 16550 UART at COM1 (vm-superio), wired to the console and to IRQ 4 through an irqfd.

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::{Console, ConsoleWriter};

/// Raises the serial interrupt by signalling the irqfd KVM routes to IRQ 4.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Serializable copy of the UART registers and receive FIFO (vm-superio's `SerialState`
/// has no serde support).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Errors from the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating the interrupt eventfd failed.
    #[error("creating the serial interrupt eventfd failed")]
    EventFd(#[source] std::io::Error),
    /// A snapshot could not be applied.
    #[error("restoring the serial device failed: {0}")]
    Restore(String),
}

/// COM1.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART in reset state writing to `console`.
    pub fn new(console: Console) -> Result<Self, SerialError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(SerialDevice {
            uart: Serial::new(IrqTrigger(irq), ConsoleWriter(console)),
        })
    }

    /// The eventfd to register as irqfd for the serial IRQ.
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Guest write to port offset `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(error) = self.uart.write(offset, value) {
            tracing::debug!(?error, "serial write");
        }
    }

    /// Guest read from port offset `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Queues input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Register and FIFO state.
    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Replaces the state with `snapshot`, keeping the interrupt line and console.
    pub fn restore(&mut self, snapshot: &SerialSnapshot) -> Result<(), SerialError> {
        let irq = self
            .irq_eventfd()
            .try_clone()
            .map_err(SerialError::EventFd)?;
        let console = self.uart.writer().clone();
        self.uart = Serial::from_state(&snapshot.into(), IrqTrigger(irq), NoEvents, console)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_console_and_state_round_trips() {
        let console = Console::new();
        let mut serial = SerialDevice::new(console.clone()).unwrap();
        for b in b"hi\n" {
            serial.write(0, *b);
        }
        assert_eq!(console.history(), b"hi\n");
        serial.write(7, 0x5a); // scratch register
        assert_eq!(serial.enqueue_input(b"in"), 2);
        let snap = serial.snapshot();
        assert_eq!(snap.scratch, 0x5a);
        assert_eq!(snap.in_buffer, b"in");

        let mut other = SerialDevice::new(Console::new()).unwrap();
        other.restore(&snap).unwrap();
        assert_eq!(other.snapshot(), snap);
        assert_eq!(other.read(0), b'i', "pending input survives restore");
        let too_big = SerialSnapshot {
            in_buffer: vec![0; 1 << 16],
            ..snap
        };
        assert!(other.restore(&too_big).is_err());
    }
}
