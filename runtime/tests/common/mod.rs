//! What the runtime's integration tests share.

use ferry_runtime::GuestRam;

/// Copies all of `from`'s memory into `to` (a migration's memory copy, done by hand).
pub fn copy_memory(from: &GuestRam, to: &GuestRam) {
    let mut buf = vec![0u8; 4 << 20];
    for (gpa, len) in from.layout() {
        let mut at = gpa;
        while at < gpa + len {
            let n = (gpa + len - at).min(buf.len() as u64) as usize;
            from.read(at, &mut buf[..n]).expect("reading guest memory");
            to.write(at, &buf[..n]).expect("writing guest memory");
            at += n as u64;
        }
    }
}
