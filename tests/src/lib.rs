//! Harness for Ferry's multi-process tests: a cluster of real `hostd` processes, on loopback
//! or each in its own network namespace joined by a veth pair, driven through the real
//! `ferryctl`.
//!
//! The tests themselves live in `hostd/tests/`: Cargo only guarantees a package's binaries
//! (`hostd`, `ferryctl`) to that package's own integration tests, so that is where a test
//! can find them; everything the tests share is here.
//!
//! These tests need /dev/kvm and root (namespaces, raw sockets), as CI has.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One host to start.
#[derive(Clone, Debug)]
pub struct HostSpec {
    /// Host name.
    pub name: String,
    /// VM memory of the host.
    pub memory: String,
    /// CPU features to hide.
    pub hide_cpu_features: Vec<String>,
    /// `FERRY_FAULT` for this hostd.
    pub fault: Option<String>,
    /// `FERRY_TEST_PROTOCOL_VERSIONS` for this hostd: stands in for another Ferry version.
    pub protocol_versions: Option<String>,
    /// An RDMA device the host claims to have (test override; this machine has none).
    pub claimed_rdma: Option<String>,
    /// Run hostd with this RLIMIT_MEMLOCK (soft and hard) and without CAP_IPC_LOCK, as an
    /// unprivileged daemon would.
    pub memlock_limit: Option<u64>,
    /// The host's own `max_concurrent` (migrations in and out at once).
    pub max_concurrent: Option<usize>,
    /// Directory (under the cluster's) this host's datastore `shared` is at; `shared` by
    /// default, the same for every host, as real shared storage would be.
    pub shared_dir: String,
    /// The certificate this host presents.
    pub certificate: Certificate,
    /// Left out of the cluster's configuration file: the host runs from a file of its own
    /// that lists the cluster and itself, so the others do not know it.
    pub unlisted: bool,
    /// On the VM network ([`VmNetwork`]) but without a bridge in its configuration: VMs
    /// there get no NIC, and a VM with one cannot arrive.
    pub no_bridge: bool,
}

/// What certificate a test host has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Certificate {
    /// One from the cluster CA for its name (the default).
    Cluster,
    /// None at all: the host speaks plain TCP.
    None,
    /// One for its name, from a CA other than the cluster's.
    OtherCa,
    /// One from the cluster CA for its name, expired yesterday.
    Expired,
    /// One from the cluster CA for another host name.
    For(String),
}

impl HostSpec {
    /// A host with 4 GiB for VMs and nothing special.
    pub fn new(name: &str) -> Self {
        HostSpec {
            name: name.into(),
            memory: "4G".into(),
            hide_cpu_features: Vec::new(),
            fault: None,
            protocol_versions: None,
            claimed_rdma: None,
            memlock_limit: None,
            max_concurrent: None,
            shared_dir: "shared".into(),
            certificate: Certificate::Cluster,
            unlisted: false,
            no_bridge: false,
        }
    }

    /// Without a bridge for the VM network (see [`HostSpec::no_bridge`]).
    pub fn no_bridge(mut self) -> Self {
        self.no_bridge = true;
        self
    }

    /// Presenting this certificate.
    pub fn certificate(mut self, certificate: Certificate) -> Self {
        self.certificate = certificate;
        self
    }

    /// Not in the cluster's configuration (see [`HostSpec::unlisted`]).
    pub fn unlisted(mut self) -> Self {
        self.unlisted = true;
        self
    }

    /// With its `shared` datastore at another directory: a host that claims to share the
    /// datastore but does not.
    pub fn shared_dir(mut self, dir: &str) -> Self {
        self.shared_dir = dir.into();
        self
    }

    /// With this much VM memory.
    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.into();
        self
    }

    /// Hiding these CPU features.
    pub fn hide(mut self, features: &[&str]) -> Self {
        self.hide_cpu_features = features.iter().map(|s| s.to_string()).collect();
        self
    }

    /// With fault injection.
    pub fn fault(mut self, fault: &str) -> Self {
        self.fault = Some(fault.into());
        self
    }

    /// Claiming an RDMA device of this name with an active port, which this machine does
    /// not have: negotiation plans RDMA and its setup fails for real.
    pub fn claim_rdma(mut self, device: &str) -> Self {
        self.claimed_rdma = Some(device.into());
        self
    }

    /// Running at most `n` migrations at once.
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = Some(n);
        self
    }

    /// With this locked-memory limit and no CAP_IPC_LOCK (see [`HostSpec::memlock_limit`]).
    pub fn memlock_limit(mut self, bytes: u64) -> Self {
        self.memlock_limit = Some(bytes);
        self
    }

    /// Speaking these protocol versions (comma-separated) instead of this build's.
    pub fn protocol_versions(mut self, versions: &str) -> Self {
        self.protocol_versions = Some(versions.into());
        self
    }
}

/// Network namespaces for test hosts, removed on drop: two joined by a veth pair
/// ([`Netns::create`]), two on different subnets routed through a third
/// ([`Netns::routed`]), or any number on one switch ([`Netns::switched`]).
#[derive(Debug)]
pub struct Netns {
    /// Namespace names, one per host.
    pub names: Vec<String>,
    /// Interface in each namespace.
    pub interfaces: Vec<String>,
    /// Address of each host.
    pub addrs: Vec<Ipv4Addr>,
    /// The namespace routing between the two, when they are in different subnets.
    pub router: Option<String>,
    /// The namespace holding the bridge every host's link is a port of, when there is one.
    pub switch: Option<String>,
    /// The network the VMs are on, when there is one ([`Netns::with_vm_network`]).
    pub vm_network: Option<VmNetwork>,
}

/// The segment test VMs talk on, apart from the hosts' own link: a bridge [`VM_BRIDGE`] in
/// each host's namespace, the bridges joined by a veth link as two top-of-rack ports would
/// be, and a peer namespace on the first host's bridge.
#[derive(Clone, Debug)]
pub struct VmNetwork {
    /// Each host's namespace.
    pub hosts: Vec<String>,
    /// Each host's bridge port toward the other host.
    pub uplinks: Vec<String>,
    /// The peer's namespace.
    pub peer_ns: String,
    /// The peer's interface in it.
    pub peer_interface: String,
}

/// The bridge of the VM network in every host's namespace.
pub const VM_BRIDGE: &str = "br-vmnet";

impl VmNetwork {
    fn in_host(&self, host: usize, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[host]]).args(args);
        String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned()
    }

    /// The port host `host`'s bridge has learned `mac` on (`aa:bb:..`, lower case), if any.
    pub fn port_of(&self, host: usize, mac: &str) -> Option<String> {
        let mac = mac.to_ascii_lowercase();
        self.in_host(host, &["bridge", "fdb", "show", "br", VM_BRIDGE])
            .lines()
            .find(|l| l.starts_with(&mac) && !l.contains("permanent"))
            .and_then(|l| {
                let mut words = l.split_whitespace();
                words.find(|&w| w == "dev")?;
                words.next().map(str::to_string)
            })
    }

    /// The TAPs Ferry made in host `host`'s namespace, with the bridge each is a port of.
    pub fn taps(&self, host: usize) -> Vec<(String, Option<String>)> {
        self.in_host(host, &["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| {
                let name = l.split(':').nth(1)?.trim().split('@').next()?.to_string();
                if !name.starts_with("fytap") {
                    return None;
                }
                let master = l
                    .split_whitespace()
                    .skip_while(|&w| w != "master")
                    .nth(1)
                    .map(str::to_string);
                Some((name, master))
            })
            .collect()
    }
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A veth pair: interface `a.0` in namespace `a.1`, its peer `b.0` in `b.1`.
fn veth(a: (&str, &str), b: (&str, &str)) {
    ip(&[
        "link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1,
    ]);
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

fn unique() -> u32 {
    std::process::id() % 10_000 * 100 + UNIQUE.fetch_add(1, Ordering::SeqCst)
}

/// In namespace `ns`: `addr/24` on `interface`, which is brought up, and `lo` up.
fn configure_host_end(ns: &str, interface: &str, addr: Ipv4Addr) {
    let exec = |args: &[&str]| {
        let mut full = vec!["netns", "exec", ns, "ip"];
        full.extend_from_slice(args);
        ip(&full);
    };
    exec(&["addr", "add", &format!("{addr}/24"), "dev", interface]);
    exec(&["link", "set", interface, "up"]);
    exec(&["link", "set", "lo", "up"]);
}

impl Netns {
    /// Creates `ferryN-a`/`ferryN-b` with 10.77.X.1/.2 on a veth pair.
    pub fn create() -> Netns {
        let id = unique();
        let names = vec![format!("ferry{id}a"), format!("ferry{id}b")];
        let interfaces = vec![format!("fv{id}a"), format!("fv{id}b")];
        let subnet = (id % 250) as u8;
        let addrs = vec![
            Ipv4Addr::new(10, 77, subnet, 1),
            Ipv4Addr::new(10, 77, subnet, 2),
        ];
        for ns in &names {
            ip(&["netns", "add", ns]);
        }
        veth((&interfaces[0], &names[0]), (&interfaces[1], &names[1]));
        for i in 0..2 {
            configure_host_end(&names[i], &interfaces[i], addrs[i]);
        }
        Netns {
            names,
            interfaces,
            addrs,
            router: None,
            switch: None,
            vm_network: None,
        }
    }

    /// `hosts` namespaces on one switch: each has a veth link (10.78.X.N/24) whose other
    /// end is a port of a bridge in a namespace of its own, as hosts on one top-of-rack
    /// switch would be.
    pub fn switched(hosts: usize) -> Netns {
        assert!((1..=26).contains(&hosts), "1 to 26 hosts on a switch");
        let id = unique();
        let letter = |i: usize| char::from(b'a' + i as u8);
        let names: Vec<String> = (0..hosts)
            .map(|i| format!("ferry{id}{}", letter(i)))
            .collect();
        let interfaces: Vec<String> = (0..hosts).map(|i| format!("fv{id}{}", letter(i))).collect();
        let subnet = (id % 250) as u8;
        let addrs: Vec<Ipv4Addr> = (0..hosts)
            .map(|i| Ipv4Addr::new(10, 78, subnet, i as u8 + 1))
            .collect();
        let switch = format!("ferry{id}s");
        for ns in names.iter().chain([&switch]) {
            ip(&["netns", "add", ns]);
        }
        let exec = |ns: &str, args: &[&str]| {
            let mut full = vec!["netns", "exec", ns, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        exec(&switch, &["link", "add", "br0", "type", "bridge"]);
        exec(&switch, &["link", "set", "br0", "up"]);
        for i in 0..hosts {
            let port = format!("fs{id}{}", letter(i));
            ip(&[
                "link",
                "add",
                &interfaces[i],
                "netns",
                &names[i],
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &switch,
            ]);
            exec(&switch, &["link", "set", &port, "master", "br0"]);
            exec(&switch, &["link", "set", &port, "up"]);
            configure_host_end(&names[i], &interfaces[i], addrs[i]);
        }
        Netns {
            names,
            interfaces,
            addrs,
            router: None,
            switch: Some(switch),
            vm_network: None,
        }
    }

    /// Two datacenters: each host namespace on a subnet of its own (10.81.X.0/24 and
    /// 10.82.X.0/24), joined through a third namespace that routes between them, with every
    /// link out of the router limited by `tc tbf` to `rate` (e.g. `100mbit`).
    pub fn routed(rate: &str) -> Netns {
        let id = unique();
        let names = vec![format!("ferry{id}a"), format!("ferry{id}b")];
        let router = format!("ferry{id}r");
        let interfaces = vec![format!("fv{id}a"), format!("fv{id}b")];
        let router_ends = [format!("fr{id}a"), format!("fr{id}b")];
        let subnet = (id % 250) as u8;
        let addrs = vec![
            Ipv4Addr::new(10, 81, subnet, 2),
            Ipv4Addr::new(10, 82, subnet, 2),
        ];
        let gateways = [
            Ipv4Addr::new(10, 81, subnet, 1),
            Ipv4Addr::new(10, 82, subnet, 1),
        ];
        for ns in names.iter().chain([&router]) {
            ip(&["netns", "add", ns]);
        }
        let exec = |ns: &str, args: &[&str]| {
            let mut full = vec!["netns", "exec", ns, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        exec(&router, &["link", "set", "lo", "up"]);
        run(Command::new("ip").args([
            "netns",
            "exec",
            &router,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]));
        for i in 0..2 {
            ip(&[
                "link",
                "add",
                &interfaces[i],
                "netns",
                &names[i],
                "type",
                "veth",
                "peer",
                "name",
                &router_ends[i],
                "netns",
                &router,
            ]);
            configure_host_end(&names[i], &interfaces[i], addrs[i]);
            exec(
                &names[i],
                &["route", "add", "default", "via", &gateways[i].to_string()],
            );
            exec(
                &router,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", gateways[i]),
                    "dev",
                    &router_ends[i],
                ],
            );
            exec(&router, &["link", "set", &router_ends[i], "up"]);
            run(Command::new("ip").args([
                "netns",
                "exec",
                &router,
                "tc",
                "qdisc",
                "add",
                "dev",
                &router_ends[i],
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "100ms",
            ]));
        }
        Netns {
            names,
            interfaces,
            addrs,
            router: Some(router),
            switch: None,
            vm_network: None,
        }
    }

    /// Adds the VM network ([`VmNetwork`]) to two hosts' namespaces.
    pub fn with_vm_network(mut self) -> Netns {
        assert_eq!(self.names.len(), 2, "the VM network joins two hosts");
        let id = unique();
        let uplinks = vec![format!("fu{id}a"), format!("fu{id}b")];
        let peer_ns = format!("ferry{id}p");
        let (peer_host_end, peer_interface) = (format!("fp{id}h"), format!("fp{id}p"));
        ip(&["netns", "add", &peer_ns]);
        for ns in &self.names {
            ip(&["-n", ns, "link", "add", VM_BRIDGE, "type", "bridge"]);
            ip(&["-n", ns, "link", "set", VM_BRIDGE, "up"]);
        }
        veth((&uplinks[0], &self.names[0]), (&uplinks[1], &self.names[1]));
        veth(
            (&peer_host_end, &self.names[0]),
            (&peer_interface, &peer_ns),
        );
        let ports: Vec<(&String, &String)> = self
            .names
            .iter()
            .zip(&uplinks)
            .chain([(&self.names[0], &peer_host_end)])
            .collect();
        for &(ns, port) in &ports {
            ip(&["-n", ns, "link", "set", port, "master", VM_BRIDGE]);
            ip(&["-n", ns, "link", "set", port, "up"]);
        }
        ip(&["-n", &peer_ns, "link", "set", &peer_interface, "up"]);
        ip(&["-n", &peer_ns, "link", "set", "lo", "up"]);
        // A new port forwards only once the kernel has applied its carrier, which it does for
        // such links in a batch at most once a second: wait for that, as a real fabric is
        // settled before any VM moves.
        let deadline = Instant::now() + Duration::from_secs(20);
        for &(ns, port) in &ports {
            loop {
                let out = run(Command::new("bridge").args(["-n", ns, "link", "show", "dev", port]));
                if String::from_utf8_lossy(&out.stdout).contains("state forwarding") {
                    break;
                }
                assert!(Instant::now() < deadline, "{port} in {ns} never forwarded");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.vm_network = Some(VmNetwork {
            hosts: self.names.clone(),
            uplinks,
            peer_ns,
            peer_interface,
        });
        self
    }

    /// Cuts (or restores) the link.
    pub fn set_link(&self, up: bool) {
        ip(&[
            "netns",
            "exec",
            &self.names[0],
            "ip",
            "link",
            "set",
            &self.interfaces[0],
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self
            .names
            .iter()
            .chain(self.router.as_ref())
            .chain(self.switch.as_ref())
            .chain(self.vm_network.as_ref().map(|n| &n.peer_ns))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Frames seen on an interface inside a namespace, captured by a thread that joined it.
#[derive(Debug)]
pub struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing every frame on `interface` in namespace `ns`, until dropped.
    pub fn start(ns: &str, interface: &str) -> Capture {
        let ns_path = PathBuf::from("/var/run/netns").join(ns);
        let interface = interface.to_string();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = {
            let frames = Arc::clone(&frames);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let ns_file = File::open(&ns_path).expect("namespace file");
                // SAFETY: setns on this thread only, with a valid namespace fd.
                let joined = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
                let (socket, _, _) = ferry_runtime::guest::net_peer::packet_socket(&interface)
                    .unwrap_or_else(|e| panic!("packet socket on {interface}: {e}"));
                let _ = ready_tx.send(());
                // Whole frames, as large as segmentation offload makes them on a veth.
                let mut buf = vec![0u8; 65536 + 256];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: buf is valid for its length.
                    let n = unsafe {
                        libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n > 0 {
                        frames
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(buf[..n as usize].to_vec());
                    }
                }
            })
        };
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        Capture {
            frames,
            stop,
            handle: Some(handle),
        }
    }

    /// Waits until the frames captured so far satisfy `done`, or `timeout` passes; returns
    /// them either way.
    pub fn frames_when(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let frames = self
                .frames
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if done(&frames) || Instant::now() >= deadline {
                return frames;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

struct HostProcess {
    spec: HostSpec,
    config: PathBuf,
    token: String,
    api: SocketAddr,
    control: SocketAddr,
    netns: Option<String>,
    child: Option<Child>,
    log: PathBuf,
}

/// A running cluster of hostd processes; stopped (and their logs printed on failure) on drop.
pub struct TestCluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    hostd: PathBuf,
    ferryctl: PathBuf,
    hosts: Vec<HostProcess>,
    netns: Option<Netns>,
    http: reqwest::blocking::Client,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Issues each host's certificate as its spec says, into `dir`: (certificate, key) files.
fn issue_certificates(dir: &Path, specs: &[HostSpec]) -> Vec<Option<(PathBuf, PathBuf)>> {
    use ferry_transport::tls::certs::{ClusterCa, LAB_VALIDITY_DAYS};
    std::fs::create_dir_all(dir).expect("certs dir");
    let ca = ClusterCa::generate("test").expect("cluster CA");
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write CA");
    let other = ClusterCa::generate("another cluster").expect("other CA");
    specs
        .iter()
        .map(|spec| {
            let issued = match &spec.certificate {
                Certificate::None => return None,
                Certificate::Cluster => ca.issue(&spec.name, LAB_VALIDITY_DAYS),
                Certificate::OtherCa => other.issue(&spec.name, LAB_VALIDITY_DAYS),
                Certificate::Expired => ca.issue(&spec.name, -30..-1),
                Certificate::For(name) => ca.issue(name, LAB_VALIDITY_DAYS),
            }
            .expect("issue certificate");
            let cert = dir.join(format!("{}.pem", spec.name));
            let key = dir.join(format!("{}.key", spec.name));
            std::fs::write(&cert, issued.cert_pem).expect("write certificate");
            std::fs::write(&key, issued.key_pem).expect("write key");
            Some((cert, key))
        })
        .collect()
}

/// A port for a test hostd to listen on, from below the kernel's ephemeral range
/// (32768 and up): an ephemeral port handed out here could be taken by any outgoing
/// connection of the test run before hostd binds it; ports down here never are.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = 20_000 + (std::process::id() * 131) % 12_000;
    for _ in 0..12_000 {
        let port = 20_000 + (start - 20_000 + NEXT.fetch_add(1, Ordering::SeqCst)) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port between 20000 and 32000")
}

/// Result of a CLI run.
#[derive(Debug)]
pub struct CliResult {
    /// Exit code.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliResult {
    /// Standard output as JSON (panics with the whole output if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): stdout={} stderr={}",
                self.stdout, self.stderr
            )
        })
    }
}

impl TestCluster {
    /// Starts `hosts` on loopback.
    pub fn loopback(hostd: &Path, ferryctl: &Path, hosts: Vec<HostSpec>) -> TestCluster {
        Self::start(hostd, ferryctl, hosts, None)
    }

    /// Starts `hosts`, each in its own network namespace: two joined by a veth pair, more
    /// on one switch (a bridge in a namespace of its own).
    pub fn in_namespaces(
        hostd: &Path,
        ferryctl: &Path,
        hosts: impl Into<Vec<HostSpec>>,
    ) -> TestCluster {
        let hosts = hosts.into();
        let netns = match hosts.len() {
            2 => Netns::create(),
            n => Netns::switched(n),
        };
        Self::start(hostd, ferryctl, hosts, Some(netns))
    }

    /// Starts two hosts in namespaces joined by a veth pair, with the VM network
    /// ([`VmNetwork`]): network `vmnet` has bridge [`VM_BRIDGE`] on both, so VMs get a NIC.
    pub fn with_vm_network(hostd: &Path, ferryctl: &Path, hosts: [HostSpec; 2]) -> TestCluster {
        let netns = Netns::create().with_vm_network();
        Self::start(hostd, ferryctl, hosts.to_vec(), Some(netns))
    }

    /// Starts two hosts in two datacenters: namespaces on different subnets, routed through
    /// a third, every routed link limited to `rate`.
    pub fn across_datacenters(
        hostd: &Path,
        ferryctl: &Path,
        hosts: [HostSpec; 2],
        rate: &str,
    ) -> TestCluster {
        let pair = Netns::routed(rate);
        Self::start(hostd, ferryctl, hosts.to_vec(), Some(pair))
    }

    fn start(
        hostd: &Path,
        ferryctl: &Path,
        specs: Vec<HostSpec>,
        netns: Option<Netns>,
    ) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-")
            .tempdir()
            .expect("temp dir");
        let mut toml = String::from(
            "[cluster]\nname = \"test\"\n\n[migration]\nio_timeout_ms = 5000\nconnect_timeout_ms = 3000\nin_doubt_timeout_ms = 10000\n\n[[datacenters]]\nname = \"dc1\"\n\n[[datacenters]]\nname = \"dc2\"\n\n[[networks]]\nname = \"vmnet\"\n\n[[datastores]]\nname = \"shared\"\n\n[tls]\nca = \"certs/ca.pem\"\n",
        );
        let certs = dir.path().join("certs");
        let issued = issue_certificates(&certs, &specs);
        let mut unlisted = Vec::new();
        let mut hosts = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let (addr, api_port, control_port, interface, ns) = match &netns {
                Some(pair) => (
                    IpAddr::V4(pair.addrs[i]),
                    7701,
                    7711,
                    pair.interfaces[i].clone(),
                    Some(pair.names[i].clone()),
                ),
                None => (
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    free_port(),
                    free_port(),
                    "lo".to_string(),
                    None,
                ),
            };
            let hide = spec
                .hide_cpu_features
                .iter()
                .map(|f| format!("\"{f}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let tls = match &issued[i] {
                Some((cert, key)) => format!(
                    "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
                None => String::new(),
            };
            let token = format!("test-token-{}-{:08x}", spec.name, unique());
            let token_file = dir.path().join(format!("{}.token", spec.name));
            std::fs::write(&token_file, &token).expect("write token");
            let entry = format!(
                "\n[[hosts]]\nname = \"{name}\"\ndatacenter = \"dc{dc}\"\napi = \"{addr}:{api_port}\"\napi_token_file = \"{token_file}\"\n{tls}\ncontrol = \"{addr}:{control_port}\"\ndata = [\"{addr}:0\"]\nmemory = \"{memory}\"\nnetworks = [{{ name = \"vmnet\", interface = \"{interface}\"{bridge} }}]\nhide_cpu_features = [{hide}]\n{limit}datastores = [{{ name = \"shared\", path = \"{dir}/{shared}\" }}, {{ name = \"{name}-local\", path = \"{dir}/{name}/disks\" }}]\nstate_dir = \"{dir}/{name}\"\n\n[[datastores]]\nname = \"{name}-local\"\n",
                name = spec.name,
                // Hosts on one switch share a datacenter; a pair or a routed pair has one each.
                dc = match &netns {
                    Some(n) if n.switch.is_none() => i + 1,
                    _ => 1,
                },
                memory = spec.memory,
                bridge = match netns.as_ref().and_then(|n| n.vm_network.as_ref()) {
                    Some(_) if !spec.no_bridge => format!(", bridge = \"{VM_BRIDGE}\""),
                    _ => String::new(),
                },
                shared = spec.shared_dir,
                dir = dir.path().display(),
                token_file = token_file.display(),
                limit = spec
                    .max_concurrent
                    .map_or(String::new(), |n| format!("max_concurrent = {n}\n")),
            );
            let host_config = if spec.unlisted {
                let file = dir.path().join(format!("{}.toml", spec.name));
                unlisted.push((file.clone(), entry));
                file
            } else {
                toml.push_str(&entry);
                dir.path().join("cluster.toml")
            };
            hosts.push(HostProcess {
                config: host_config,
                token,
                api: SocketAddr::new(addr, api_port),
                control: SocketAddr::new(addr, control_port),
                log: dir.path().join(format!("{}.log", spec.name)),
                spec,
                netns: ns,
                child: None,
            });
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, &toml).expect("write config");
        for (file, entry) in unlisted {
            std::fs::write(file, format!("{toml}{entry}")).expect("write config");
        }
        let mut cluster = TestCluster {
            dir,
            config,
            hostd: hostd.to_path_buf(),
            ferryctl: ferryctl.to_path_buf(),
            hosts,
            netns,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        };
        for i in 0..cluster.hosts.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.hosts.len() {
            cluster.wait_up(i);
        }
        cluster
    }

    fn command_in(&self, netns: Option<&str>, program: &Path) -> Command {
        match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self, i: usize) {
        let host = &self.hosts[i];
        // Appending: a restarted hostd's lines follow its first life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)
            .expect("log file");
        let mut cmd = self.command_in(host.netns.as_deref(), &self.hostd);
        cmd.arg("--config")
            .arg(&host.config)
            .arg("--host")
            .arg(&host.spec.name)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(fault) = &host.spec.fault {
            cmd.env("FERRY_FAULT", fault);
        }
        if let Some(versions) = &host.spec.protocol_versions {
            cmd.env("FERRY_TEST_PROTOCOL_VERSIONS", versions);
        }
        if let Some(device) = &host.spec.claimed_rdma {
            cmd.env("FERRY_TEST_CLAIM_RDMA", device);
        }
        if let Some(bytes) = host.spec.memlock_limit {
            limit_locked_memory(&mut cmd, bytes);
        }
        let child = cmd.spawn().expect("spawn hostd");
        self.hosts[i].child = Some(child);
    }

    fn wait_up(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let host = &self.hosts[i];
            let up = match &self.netns {
                // In a namespace the API is not reachable from here; ask through ferryctl.
                Some(_) => self.ferryctl(&["host", "show", &host.spec.name]).code == Some(0),
                None => self
                    .http
                    .get(format!("http://{}/v1/host", host.api))
                    .bearer_auth(&host.token)
                    .send()
                    .is_ok_and(|r| r.status().is_success()),
            };
            if up {
                return;
            }
            if let Some(child) = self.hosts[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "hostd {} exited ({status}):\n{}",
                    self.hosts[i].spec.name,
                    self.log(&self.hosts[i].spec.name.clone())
                );
            }
            assert!(
                Instant::now() < deadline,
                "hostd {} did not come up",
                self.hosts[i].spec.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The configuration file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The temporary directory of the cluster (for content files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespaces, if any.
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    /// Runs `ferryctl --config CONFIG ARGS` (inside the first host's namespace, if any).
    pub fn ferryctl(&self, args: &[&str]) -> CliResult {
        self.ferryctl_with(&self.config, args)
    }

    /// Runs `ferryctl --config CONFIG ARGS` with another configuration file (an unlisted
    /// host's, say).
    pub fn ferryctl_with(&self, config: &Path, args: &[&str]) -> CliResult {
        let ns = self.hosts.first().and_then(|h| h.netns.clone());
        let output = self
            .command_in(ns.as_deref(), &self.ferryctl)
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferryctl");
        CliResult {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts `ferryctl --config CONFIG ARGS` in the background with its output piped.
    pub fn ferryctl_spawn(&self, args: &[&str]) -> Child {
        let ns = self.hosts.first().and_then(|h| h.netns.clone());
        self.command_in(ns.as_deref(), &self.ferryctl)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferryctl")
    }

    /// Runs ferryctl and requires success.
    pub fn ferryctl_ok(&self, args: &[&str]) -> CliResult {
        let result = self.ferryctl(args);
        assert_eq!(result.code, Some(0), "ferryctl {args:?} failed: {result:?}");
        result
    }

    fn get(&self, host: &str, path: &str) -> reqwest::blocking::Response {
        let host = self.host(host);
        self.http
            .get(format!("http://{}{path}", host.api))
            .bearer_auth(&host.token)
            .send()
            .expect("API request")
    }

    /// `GET` on a host's API (loopback clusters only): status and JSON body.
    pub fn api_get(&self, host: &str, path: &str) -> (u16, Value) {
        let response = self.get(host, path);
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// `GET` on a host's API (loopback clusters only): status and body text.
    pub fn api_text(&self, host: &str, path: &str) -> (u16, String) {
        let response = self.get(host, path);
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    }

    /// `POST` with a raw body on a host's API: status and JSON body.
    pub fn api_post(&self, host: &str, path: &str, body: &str) -> (u16, Value) {
        let host = self.host(host);
        let response = self
            .http
            .post(format!("http://{}{path}", host.api))
            .bearer_auth(&host.token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("API request");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// A request to a host's TCP API with `token` (or none), bypassing the cluster's own:
    /// status and JSON body.
    pub fn api_as(
        &self,
        host: &str,
        (method, path): (&str, &str),
        token: Option<&str>,
        body: &str,
    ) -> (u16, Value) {
        let host = self.host(host);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", host.api))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().expect("API request");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// The configuration file host `name` runs from.
    pub fn config_of(&self, name: &str) -> &Path {
        &self.host(name).config
    }

    fn host(&self, name: &str) -> &HostProcess {
        self.hosts
            .iter()
            .find(|h| h.spec.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Cuts the data streams of the migrations arriving at host `name`, as a broken link
    /// would, and leaves its control connections alone: every established TCP connection of
    /// its hostd on a local port other than its API and control ports (the data streams it
    /// accepted; their listener is closed by then) is destroyed (`ss -K`). Returns how many
    /// were.
    pub fn cut_data_streams(&self, name: &str) -> usize {
        let host = self.host(name);
        let pid = host.child.as_ref().expect("host running").id();
        let ss = |args: &[&str]| {
            let mut command = match &host.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "ss"]);
                    c
                }
                None => Command::new("ss"),
            };
            let out = command.args(args).output().expect("running ss");
            assert!(out.status.success(), "ss {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let owner = format!("pid={pid},");
        let mut ports: Vec<u16> = ss(&["-tnpH", "state", "established"])
            .lines()
            .filter(|line| line.contains(&owner))
            .filter_map(|line| {
                line.split_whitespace()
                    .nth(2)?
                    .rsplit_once(':')?
                    .1
                    .parse()
                    .ok()
            })
            .filter(|port| ![host.api.port(), host.control.port()].contains(port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
            .iter()
            .map(|port| {
                ss(&[
                    "-tnKH",
                    "state",
                    "established",
                    &format!("( sport = :{port} )"),
                ])
                .lines()
                .count()
            })
            .sum()
    }

    /// SIGKILLs a host's hostd.
    pub fn kill(&mut self, name: &str) {
        let host = self
            .hosts
            .iter_mut()
            .find(|h| h.spec.name == name)
            .expect("host");
        if let Some(mut child) = host.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a host's hostd again (after [`TestCluster::kill`]), without fault injection,
    /// appending to its log, and waits until it answers.
    pub fn restart(&mut self, name: &str) {
        let index = self
            .hosts
            .iter()
            .position(|h| h.spec.name == name)
            .expect("host");
        assert!(
            self.hosts[index].child.is_none(),
            "restart {name}: kill it first"
        );
        self.hosts[index].spec.fault = None;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.hosts[index].log)
            .expect("log file");
        std::io::Write::write_all(
            &mut log,
            format!("===== hostd {name} restarted =====\n").as_bytes(),
        )
        .expect("log");
        self.spawn(index);
        self.wait_up(index);
    }

    /// A host's state directory (journal, console logs).
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops a host's hostd the graceful way (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self, name: &str) {
        let host = self
            .hosts
            .iter_mut()
            .find(|h| h.spec.name == name)
            .expect("host");
        if let Some(mut child) = host.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) {
                assert!(Instant::now() < deadline, "hostd {name} ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Whether a host's hostd process is alive.
    pub fn is_running(&mut self, name: &str) -> bool {
        let host = self
            .hosts
            .iter_mut()
            .find(|h| h.spec.name == name)
            .expect("host");
        host.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A host's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.host(name).log).unwrap_or_default()
    }

    /// `vm show NAME` as JSON, or None if no host has it.
    pub fn vm(&self, name: &str) -> Option<Value> {
        let result = self.ferryctl(&["vm", "show", name]);
        (result.code == Some(0)).then(|| result.json())
    }

    /// The VM names on a host.
    pub fn vms_on(&self, host: &str) -> Vec<String> {
        let info = self.ferryctl_ok(&["host", "show", host]).json();
        info["vms"]
            .as_array()
            .map(|vms| {
                vms.iter()
                    .filter_map(|v| v["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Memory used by VMs on a host.
    pub fn memory_used(&self, host: &str) -> u64 {
        self.ferryctl_ok(&["host", "show", host]).json()["memory_used"]
            .as_u64()
            .unwrap_or(u64::MAX)
    }

    /// The `tick N` numbers in a VM's console (its whole history follows it across hosts).
    pub fn ticks(&self, vm: &str) -> Vec<u64> {
        let console = self
            .ferryctl_ok(&["vm", "console", vm, "--no-follow"])
            .stdout;
        // Only complete lines: the guest may be in the middle of printing one.
        ticks_in(&console)
    }

    /// The `tick N` numbers in a VM's console log file on a host (readable while that host's
    /// hostd is down).
    pub fn logged_ticks(&self, host: &str, vm: &str) -> Vec<u64> {
        let path = self.state_dir(host).join(format!("{vm}.console.log"));
        ticks_in(&std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Waits until `done` holds (polling), or panics with `what`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether process `pid` is still alive: any of its threads is not yet a zombie. (A killed
/// multi-threaded process shows its main thread as a zombie while the others are still
/// exiting, holding its files — a VMM's socket among them.)
pub fn process_alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .map(|stat| {
                // The state follows the parenthesised command name.
                stat.rsplit_once(')').is_some_and(|(_, rest)| {
                    let state = rest.trim_start();
                    !(state.starts_with('Z') || state.starts_with('X'))
                })
            })
            .unwrap_or(false)
    })
}

/// SIGKILLs process `pid`.
pub fn kill_process(pid: u32) {
    // SAFETY: kill(2) with a valid signal; the test owns the processes it names.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// The `tick N` numbers in console output, complete lines only.
pub fn ticks_in(console: &str) -> Vec<u64> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// Asserts `ticks` are 1, 2, 3, ... with no gap or repeat.
pub fn assert_consecutive_from_one(ticks: &[u64]) {
    assert_eq!(ticks.first(), Some(&1), "ticks start at 1: {ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or repeat in ticks: {ticks:?}");
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            if let Some(child) = host.child.as_ref() {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        for host in &mut self.hosts {
            if let Some(mut child) = host.child.take() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // VMM processes outlive hostd on purpose; a finished test takes them down.
        ferry_vmm::spawn::kill_vmms_under(self.dir.path());
        if std::thread::panicking() {
            for host in &self.hosts {
                eprintln!(
                    "===== hostd {} log =====\n{}",
                    host.spec.name,
                    std::fs::read_to_string(&host.log).unwrap_or_default()
                );
            }
        }
    }
}

/// Makes `cmd` start with RLIMIT_MEMLOCK at `bytes` (soft and hard) and CAP_IPC_LOCK out of
/// its capability bounding set, so that even as root it cannot lock more.
fn limit_locked_memory(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    /// CAP_IPC_LOCK (linux/capability.h).
    const CAP_IPC_LOCK: libc::c_ulong = 14;
    let drop_limits = move || {
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit reads one valid rlimit.
        let limited = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } == 0;
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        let dropped = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) } == 0;
        if limited && dropped {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (setrlimit, prctl), touching no shared state.
    unsafe { cmd.pre_exec(drop_limits) };
}
