//! A real VMM process on /dev/kvm, driven over its socket as hostd drives it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_runtime::vm::RunState;
use ferry_runtime::{Boot, DirtyLogMode, TestGuest, VmIdentity};
use ferry_vmm::protocol::VmmErrorKind;
use ferry_vmm::{CreateSpec, EmptySpec, IncomingState, VmmClient, VmmClientError, VmmProgram};

const MIB: u64 = 1 << 20;

/// A VMM process that is killed when the test lets go of it, however the test ends.
#[derive(Debug)]
struct Reaped(std::process::Child);

impl Reaped {
    fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(socket: &Path, log: &Path) -> Result<(Reaped, VmmClient), ferry_vmm::spawn::SpawnError> {
    ferry_vmm::spawn(&program(), socket, log).map(|(child, client)| (Reaped(child), client))
}

fn program() -> VmmProgram {
    VmmProgram {
        program: PathBuf::from(env!("CARGO_BIN_EXE_ferry-vmm")),
        args: vec!["vmm".into()],
    }
}

fn counter_spec(name: &str, console: &Path) -> CreateSpec {
    CreateSpec {
        identity: VmIdentity::new(name),
        vcpus: 1,
        memory: 32 * MIB,
        boot: Boot::Guest(TestGuest::Counter { ticks_per_sec: 100 }),
        preloads: vec![],
        dirty_log: DirtyLogMode::Bitmap,
        console_log: Some(console.to_path_buf()),
        hidden_cpu_features: vec![],
        disks: vec![],
        nics: vec![],
        start: true,
    }
}

fn ticks(bytes: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(bytes);
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The VM lives in its own process: built, run, watched, paused, frozen and stopped over
/// the socket; its memory seen from here through the shared memfd; and it keeps running
/// when the process that started it lets go of it, answering a new connection.
#[test]
fn a_vm_in_its_own_process_is_driven_over_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("c1.sock");
    let console = dir.path().join("c1.console.log");
    let (mut child, mut client) = spawn(&socket, &dir.path().join("c1.log")).unwrap();
    assert_eq!(client.process().pid, child.0.id());
    assert!(!client.process().has_vm);
    let info = client.create(counter_spec("c1", &console)).unwrap();
    assert_eq!(info.identity.name, "c1");
    assert_eq!(info.run_state, RunState::Running);

    // A second Create is refused with a reason, and the VM carries on.
    let again = client.create(counter_spec("c1", &console)).unwrap_err();
    assert!(
        matches!(&again, VmmClientError::Refused(e) if e.kind == VmmErrorKind::InvalidState),
        "{again}"
    );

    let (start, history, feed) = VmmClient::follow_console(&socket, 0).unwrap();
    assert_eq!(start, 0);
    let mut seen = history;
    wait_until("ten ticks on the feed", || {
        while let Ok(chunk) = feed.try_recv() {
            seen.extend(chunk);
        }
        ticks(&seen).len() >= 10
    });

    // The guest's memory, mapped here, shows the counter it keeps.
    let ram = client.memory().unwrap();
    client.begin_tracking().unwrap();
    client.pause().unwrap();
    let mut n = [0u8; 8];
    ram.read(ferry_runtime::layout::GUEST_STATE, &mut n)
        .unwrap();
    let in_memory = u64::from_le_bytes(n);
    assert!(in_memory >= 10, "counter in guest memory: {in_memory}");
    let frozen = client.freeze(true, false).unwrap();
    assert!(!frozen.blob.is_empty());
    assert_eq!(
        frozen.memory_hash,
        Some(ram.hash().to_le_bytes()),
        "the VMM's hash and ours agree"
    );
    assert_eq!(client.info().unwrap().run_state, RunState::Paused);
    client.resume().unwrap();

    // Let go of the child and the connection: the VMM runs on; a new client finds it.
    let pid = child.0.id();
    drop(client);
    let count = ticks(&std::fs::read(&console).unwrap()).len();
    wait_until("ticks with nobody connected", || {
        ticks(&std::fs::read(&console).unwrap()).len() >= count + 20
    });
    let mut client = VmmClient::connect(&socket).unwrap();
    assert_eq!(client.process().pid, pid);
    assert!(client.process().has_vm);
    assert_eq!(client.info().unwrap().run_state, RunState::Running);

    client.shutdown().unwrap();
    let status = child.wait();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket goes with the process");
    assert!(VmmClient::connect(&socket).is_err());
    // The console feed ended with the VM.
    wait_until("the feed to end", || {
        matches!(
            feed.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Disconnected)
        )
    });
    let all = ticks(&std::fs::read(&console).unwrap());
    assert_eq!(all[0], 1);
    for pair in all.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or repeat");
    }
}

/// An arriving VM: empty, its memory written from here through the memfd, its state loaded
/// after the hash check; a wrong hash or a state for another VM is refused with the reason.
#[test]
fn an_empty_vm_takes_memory_and_state_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let (mut source_child, mut source) =
        spawn(&dir.path().join("s.sock"), &dir.path().join("s.log")).unwrap();
    let info = source
        .create(counter_spec("m1", &dir.path().join("s.console.log")))
        .unwrap();
    wait_until("ticks", || source.info().unwrap().console_bytes > 100);
    let source_ram = source.memory().unwrap();
    source.begin_tracking().unwrap();
    let frozen = source.freeze(true, false).unwrap();

    let (mut target_child, mut target) =
        spawn(&dir.path().join("t.sock"), &dir.path().join("t.log")).unwrap();
    target
        .create_empty(EmptySpec {
            identity: info.identity.clone(),
            shape: info.shape.clone(),
            boot: info.boot.clone(),
            dirty_log: DirtyLogMode::Bitmap,
            console_log: Some(dir.path().join("t.console.log")),
            disks: vec![],
            nics: vec![],
        })
        .unwrap();
    let target_ram = target.memory().unwrap();
    let state = |hash| IncomingState {
        blob: frozen.blob.clone(),
        console: frozen.console.clone(),
        console_total: frozen.console_total,
        memory_hash: hash,
    };
    // Nothing copied yet: the hashes differ, and the VMM says so.
    let refused = target.load_state(state(frozen.memory_hash)).unwrap_err();
    assert!(
        refused.to_string().contains("memory hash mismatch"),
        "{refused}"
    );
    let mut buf = vec![0u8; 32 * MIB as usize];
    source_ram.read(0, &mut buf).unwrap();
    target_ram.write(0, &buf).unwrap();
    assert_eq!(
        target.load_state(state(frozen.memory_hash)).unwrap(),
        Some(true)
    );
    source.shutdown().unwrap();
    assert!(source_child.wait().success());
    target.resume().unwrap();
    let before = ticks(&frozen.console).len();
    wait_until("the moved VM to tick", || {
        let console = std::fs::read(dir.path().join("t.console.log")).unwrap();
        ticks(&console).len() > before + 10
    });
    target.shutdown().unwrap();
    assert!(target_child.wait().success());
}

/// A second VMM on a socket a live one serves is refused (by hostd's spawn after waiting for
/// the first to let go, and by the VMM itself); a dead one's socket is reused.
#[test]
fn a_socket_belongs_to_one_live_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("one.sock");
    let (mut first, client) = spawn(&socket, &dir.path().join("a.log")).unwrap();
    let refused = ferry_vmm::spawn::spawn_waiting(
        &program(),
        &socket,
        &dir.path().join("b.log"),
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(refused.to_string().contains("still serves"), "{refused}");
    let direct = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-vmm"))
        .args(["vmm", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!direct.status.success());
    let said = String::from_utf8_lossy(&direct.stderr);
    assert!(said.contains("already serves"), "{said}");
    assert!(
        client.process().pid == first.0.id(),
        "the first VMM still serves"
    );
    first.0.kill().unwrap();
    first.wait();
    drop(client);
    assert!(socket.exists(), "a killed VMM leaves its socket file");
    let (mut second, client) = spawn(&socket, &dir.path().join("c.log")).unwrap();
    client.shutdown().unwrap();
    assert!(second.wait().success());
}
