//! What every virtio device of a VM shares, whatever it is: its virtio-mmio window in slot
//! `i`, the ioeventfd KVM signals when the driver writes the queue-notify register (the vCPU
//! does not even leave the kernel), the irqfd that raises the slot's IOAPIC pin, and the I/O
//! thread that serves the device off the vCPU threads.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::virtio::mmio::{MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use crate::layout;

/// The eventfds that drive one slot's I/O thread, registered with KVM.
#[derive(Debug)]
pub struct SlotFds {
    /// Guest-physical base of the register window.
    base: u64,
    /// Signalled by KVM on a queue notification.
    notify: Arc<EventFd>,
    /// Wakes the I/O thread (to stop, or to look at its state again).
    wake: Arc<EventFd>,
}

impl SlotFds {
    /// Creates the eventfds of slot `slot` and registers them with `vm_fd`; also the eventfd
    /// that raises the slot's interrupt line, for the device to keep. On error: what was
    /// attempted, and why it failed.
    pub fn register(
        vm_fd: &VmFd,
        slot: usize,
    ) -> Result<(SlotFds, EventFd), (&'static str, std::io::Error)> {
        let eventfd = |operation| EventFd::new(EFD_NONBLOCK).map_err(|e| (operation, e));
        let kvm = |operation| {
            move |e: kvm_ioctls::Error| (operation, std::io::Error::from_raw_os_error(e.errno()))
        };
        let base = layout::virtio_mmio_base(slot);
        let notify = eventfd("creating the notify eventfd")?;
        let irq = eventfd("creating the irq eventfd")?;
        let wake = eventfd("creating the wake eventfd")?;
        vm_fd
            .register_ioevent(
                &notify,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                NoDatamatch,
            )
            .map_err(kvm("KVM_IOEVENTFD"))?;
        vm_fd
            .register_irqfd(&irq, layout::VIRTIO_IRQ_BASE + slot as u32)
            .map_err(kvm("KVM_IRQFD"))?;
        let fds = SlotFds {
            base,
            notify: Arc::new(notify),
            wake: Arc::new(wake),
        };
        Ok((fds, irq))
    }

    /// Starts the slot's I/O thread `name`: it waits as `step` last asked, then calls it with
    /// whether the driver notified a queue meanwhile, until `step` or the drop says stop.
    pub fn start(
        self,
        name: String,
        step: impl FnMut(bool) -> Next + Send + 'static,
    ) -> std::io::Result<SlotThread> {
        let SlotFds { base, notify, wake } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (notify, wake, stop, name) = (
                Arc::clone(&notify),
                Arc::clone(&wake),
                Arc::clone(&stop),
                name.clone(),
            );
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || io_loop(&name, &notify, &wake, &stop, step))?
        };
        Ok(SlotThread {
            base,
            notify,
            wake,
            stop,
            thread: Some(thread),
            name,
        })
    }
}

/// What an I/O thread waits for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A notification, a wake-up, `fd` readable (if any), or `timeout` passing (if any).
    Wait {
        /// A backend descriptor to wait on for input.
        fd: Option<RawFd>,
        /// At most this long.
        timeout: Option<Duration>,
    },
    /// The device is going away.
    Stop,
}

impl Next {
    /// Wait for a notification or a wake-up only.
    pub const IDLE: Next = Next::Wait {
        fd: None,
        timeout: None,
    };
}

/// A slot's I/O thread and the eventfds that drive it; the thread is stopped and joined
/// when this is dropped.
#[derive(Debug)]
pub struct SlotThread {
    base: u64,
    notify: Arc<EventFd>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    name: String,
}

impl SlotThread {
    /// Whether `gpa` is in the slot's register window.
    pub fn claims(&self, gpa: u64) -> bool {
        (self.base..self.base + MMIO_WINDOW).contains(&gpa)
    }

    /// `gpa`'s offset in the window.
    pub fn offset(&self, gpa: u64) -> u64 {
        gpa - self.base
    }

    /// Hands the thread a queue notification (one the ioeventfd did not catch).
    pub fn notify(&self) {
        let _ = self.notify.write(1);
    }

    /// Makes the thread look at the device again.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for SlotThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(device = %self.name, "device I/O thread panicked");
        }
    }
}

fn io_loop(
    name: &str,
    notify: &EventFd,
    wake: &EventFd,
    stop: &AtomicBool,
    mut step: impl FnMut(bool) -> Next,
) {
    let mut next = Next::IDLE;
    loop {
        let Next::Wait { fd, timeout } = next else {
            return;
        };
        let mut fds =
            [notify.as_raw_fd(), wake.as_raw_fd(), fd.unwrap_or(-1)].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        let count = if fd.is_some() { 3 } else { 2 };
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `count` valid pollfds for descriptors the thread's owner keeps open until it
        // has joined the thread.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), count as libc::nfds_t, timeout_ms) };
        if ret < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(device = name, %error, "device I/O thread cannot wait; it stops");
            return;
        }
        let _ = wake.read();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let notified = notify.read().is_ok();
        next = step(notified);
    }
}
