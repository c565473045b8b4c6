//! Who may migrate into a host, what protects a migration on the wire, and who may use a
//! host's API: real hostd processes with real certificates. Needs /dev/kvm and root.

use std::path::Path;
use std::time::Duration;

use ferry_tests::{Capture, Certificate, HostSpec, TestCluster};

const HOSTD: &str = env!("CARGO_BIN_EXE_hostd");
const FERRYCTL: &str = env!("CARGO_BIN_EXE_ferryctl");

fn create(cluster: &TestCluster, config: &Path, vm: &str, host: &str, extra: &[&str]) {
    let mut args = vec!["vm", "create", vm, "--host", host, "--guest", "counter"];
    if !extra.contains(&"--memory") {
        args.extend(["--memory", "64M"]);
    }
    args.extend_from_slice(extra);
    let result = cluster.ferryctl_with(config, &args);
    assert_eq!(result.code, Some(0), "creating {vm}: {result:?}");
}

/// Migrates and returns the report, whatever the outcome.
fn migrate(
    cluster: &TestCluster,
    config: &Path,
    vm: &str,
    to: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut args = vec!["migrate", vm, "--to", to, "--json"];
    args.extend_from_slice(extra);
    cluster.ferryctl_with(config, &args).json()
}

/// A migration that must not have happened: refused with `reason` in the source's report,
/// the destination's log naming `logged`, and the VM still running where it was.
fn assert_refused(
    cluster: &TestCluster,
    (source, vm): (&str, &str),
    report: &serde_json::Value,
    (reason, logged): (&str, &str),
) {
    assert!(
        ["refused", "rolled_back"].contains(&report["status"].as_str().unwrap_or("")),
        "{report:#}"
    );
    let error = report["error"].as_str().unwrap_or("");
    assert!(
        error.contains(reason),
        "source's report lacks '{reason}': {report:#}"
    );
    cluster.wait_for("the reason in beta's log", Duration::from_secs(10), |c| {
        c.log("beta").contains(logged)
    });
    assert!(
        cluster.vms_on("beta").is_empty(),
        "beta took a VM: {:?}",
        cluster.vms_on("beta")
    );
    let (status, info) = cluster.api_get(source, &format!("/v1/vms/{vm}"));
    assert_eq!(status, 200);
    assert_eq!(info["state"], "running", "{info:#}");
}

#[test]
fn hosts_that_cannot_prove_who_they_are_are_refused_with_the_reason_on_both_sides() {
    let cluster = TestCluster::loopback(
        Path::new(HOSTD),
        Path::new(FERRYCTL),
        vec![
            HostSpec::new("alpha"),
            HostSpec::new("beta"),
            // A cluster CA certificate, but beta's configuration does not list it.
            HostSpec::new("mallory").unlisted(),
            HostSpec::new("other").certificate(Certificate::OtherCa),
            HostSpec::new("stale").certificate(Certificate::Expired),
            // A certificate of the cluster for alpha, used by a host that says it is "thief".
            HostSpec::new("thief").certificate(Certificate::For("alpha".into())),
            HostSpec::new("plain").certificate(Certificate::None),
        ],
    );
    let cases: [(&str, (&str, &str)); 5] = [
        (
            "mallory",
            (
                "names no host in the peer's cluster configuration",
                "names no host in this host's cluster configuration",
            ),
        ),
        (
            "other",
            ("does not trust the CA", "not signed by this cluster's CA"),
        ),
        (
            "stale",
            (
                "finds this host's certificate expired",
                "certificate has expired",
            ),
        ),
        (
            "thief",
            (
                "claims to be 'thief', but its certificate is not for 'thief'",
                "claims to be 'thief', but its certificate is not for 'thief'",
            ),
        ),
        ("plain", ("requires mutual TLS", "requires mutual TLS")),
    ];
    for (host, reasons) in cases {
        let config = cluster.config_of(host).to_path_buf();
        let vm = format!("{host}-vm");
        create(&cluster, &config, &vm, host, &[]);
        let report = migrate(&cluster, &config, &vm, "beta", &[]);
        assert_refused(&cluster, (host, &vm), &report, reasons);
    }
    // The hosts of the cluster still migrate to each other.
    let config = cluster.config().to_path_buf();
    create(&cluster, &config, "ok", "alpha", &[]);
    let report = migrate(&cluster, &config, "ok", "beta", &[]);
    assert_eq!(report["status"], "completed", "{report:#}");
}

#[test]
fn each_encryption_mode_does_what_it_says_and_the_report_says_what_was_used() {
    let cluster = TestCluster::loopback(
        Path::new(HOSTD),
        Path::new(FERRYCTL),
        vec![
            HostSpec::new("alpha"),
            HostSpec::new("beta"),
            HostSpec::new("gamma").certificate(Certificate::None),
        ],
    );
    let config = cluster.config().to_path_buf();
    let (_, alpha) = cluster.api_get("alpha", "/v1/host");
    assert_eq!(
        (&alpha["tls"], &alpha["default_encryption"]),
        (&true.into(), &"required".into())
    );
    let (_, gamma) = cluster.api_get("gamma", "/v1/host");
    assert_eq!(
        (&gamma["tls"], &gamma["default_encryption"]),
        (&false.into(), &"disabled".into())
    );
    create(&cluster, &config, "m1", "alpha", &[]);
    // The default with certificates: required, and used.
    let report = migrate(&cluster, &config, "m1", "beta", &[]);
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_eq!(report["encryption"], "tls1.3 aes-256-gcm", "{report:#}");
    assert_eq!(report["control_channel"], "mutual TLS (tls1.3 aes-256-gcm)");
    // The destination says the same of its side.
    let (status, incoming) = cluster.api_get(
        "beta",
        &format!("/v1/migrations/{}", report["id"].as_str().unwrap()),
    );
    assert_eq!(status, 200, "{incoming}");
    assert_eq!(incoming["encryption"], "tls1.3 aes-256-gcm", "{incoming:#}");
    assert_eq!(
        incoming["control_channel"],
        "mutual TLS (tls1.3 aes-256-gcm)"
    );
    // Disabled: the memory goes in the clear, the hosts still authenticate each other.
    let report = migrate(
        &cluster,
        &config,
        "m1",
        "alpha",
        &["--encryption", "disabled"],
    );
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_eq!(report["encryption"], "none (disabled by the operator)");
    assert_eq!(report["control_channel"], "mutual TLS (tls1.3 aes-256-gcm)");
    // Required, to a host without a certificate: refused at verify, nothing moved.
    let report = migrate(
        &cluster,
        &config,
        "m1",
        "gamma",
        &["--encryption", "required"],
    );
    assert_eq!(report["status"], "refused", "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("encryption is required, and gamma has no TLS certificate configured"),
        "{report:#}"
    );
    assert!(cluster.vms_on("gamma").is_empty());
    // Opportunistic: falls back, and says so.
    let report = migrate(
        &cluster,
        &config,
        "m1",
        "gamma",
        &["--encryption", "opportunistic"],
    );
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_eq!(
        report["encryption"],
        "none (opportunistic: gamma has no certificate)"
    );
    assert!(
        report["control_channel"]
            .as_str()
            .unwrap_or("")
            .starts_with("plain TCP"),
        "{report:#}"
    );
    // From the host without a certificate back: alpha takes no unauthenticated peer.
    let report = migrate(&cluster, &config, "m1", "alpha", &[]);
    assert_eq!(report["status"], "refused", "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("requires mutual TLS"),
        "{report:#}"
    );
    assert_eq!(cluster.vms_on("gamma"), vec!["m1".to_string()]);
}

/// Whether any 32-byte window at a 512-byte step of `content` is in any captured frame.
fn content_on_the_wire(content: &[u8], frames: &[Vec<u8>]) -> usize {
    let windows: std::collections::HashSet<&[u8]> =
        content.chunks_exact(512).map(|c| &c[..32]).collect();
    frames
        .iter()
        .map(|frame| frame.windows(32).filter(|w| windows.contains(w)).count())
        .sum()
}

#[test]
fn an_encrypted_migration_puts_no_guest_page_on_the_wire_in_the_clear() {
    let cluster = TestCluster::in_namespaces(
        Path::new(HOSTD),
        Path::new(FERRYCTL),
        [HostSpec::new("east"), HostSpec::new("west")],
    );
    // 4 MiB of random bytes in guest memory: incompressible, so a plain copy carries them
    // as they are.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let content: Vec<u8> = (0..4 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let file = cluster.dir().join("secret.bin");
    std::fs::write(&file, &content).unwrap();
    let preload = format!("{}@0x4000000", file.display());
    let config = cluster.config().to_path_buf();
    create(
        &cluster,
        &config,
        "s1",
        "east",
        &["--memory", "128M", "--preload", &preload],
    );
    let pair = cluster.netns().expect("namespaces");
    let encrypted = {
        let capture = Capture::start(&pair.names[0], &pair.interfaces[0]);
        let report = migrate(&cluster, &config, "s1", "west", &[]);
        assert_eq!(report["status"], "completed", "{report:#}");
        assert_eq!(report["encryption"], "tls1.3 aes-256-gcm");
        let frames = capture.frames_when(Duration::from_secs(2), |_| false);
        let bytes: usize = frames.iter().map(Vec::len).sum();
        // Most of the copy, at least (a loaded machine may drop some frames from the capture).
        assert!(bytes > 1 << 20, "captured only {bytes} bytes");
        content_on_the_wire(&content, &frames)
    };
    assert_eq!(encrypted, 0, "guest content crossed the wire in the clear");
    // The same capture of a plain migration finds it: the check can fail.
    let capture = Capture::start(&pair.names[0], &pair.interfaces[0]);
    let report = migrate(
        &cluster,
        &config,
        "s1",
        "east",
        &["--encryption", "disabled"],
    );
    assert_eq!(report["status"], "completed", "{report:#}");
    let frames = capture.frames_when(Duration::from_secs(2), |_| false);
    assert!(content_on_the_wire(&content, &frames) > 0);
}

#[test]
fn the_api_takes_only_its_socket_owner_or_the_token() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let cluster = TestCluster::loopback(
        Path::new(HOSTD),
        Path::new(FERRYCTL),
        vec![HostSpec::new("alpha"), HostSpec::new("beta")],
    );
    let socket = cluster.state_dir("alpha").join("api.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let config = cluster.config().to_path_buf();
    create(&cluster, &config, "v1", "alpha", &[]);
    let create_body = r#"{"name": "intruder", "guest": "counter", "memory": "64M"}"#;
    let requests = [
        ("GET", "/v1/vms", ""),
        ("POST", "/v1/vms", create_body),
        ("POST", "/v1/vms/v1/stop", "{}"),
        ("POST", "/v1/vms/v1/migrate", r#"{"to": "beta"}"#),
    ];
    for token in [None, Some("not-the-token-of-this-host")] {
        for (method, path, body) in requests {
            let (status, answer) = cluster.api_as("alpha", (method, path), token, body);
            assert_eq!(status, 401, "{method} {path} with {token:?}: {answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("bearer token"),
                "{answer}"
            );
        }
    }
    // Nothing happened.
    let (_, vms) = cluster.api_get("alpha", "/v1/vms");
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, vec!["v1"]);
    let (_, info) = cluster.api_get("alpha", "/v1/vms/v1");
    assert_eq!(info["state"], "running");
    assert!(cluster.vms_on("beta").is_empty());
}

#[test]
fn certs_init_makes_a_working_set_once_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        "[cluster]\nname = \"lab\"\n\n[[hosts]]\nname = \"alpha\"\ncontrol = \"127.0.0.1:17811\"\nmemory = \"1G\"\n\n[[hosts]]\nname = \"beta\"\ncontrol = \"127.0.0.1:17812\"\nmemory = \"1G\"\n",
    )
    .unwrap();
    let out = dir.path().join("certs");
    let init = || {
        std::process::Command::new(HOSTD)
            .arg("--config")
            .arg(&config)
            .args(["certs", "init", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = init();
    assert!(first.status.success(), "{first:?}");
    let printed = String::from_utf8_lossy(&first.stdout);
    assert!(
        printed.contains("[tls]") && printed.contains("tls_cert"),
        "{printed}"
    );
    for name in ["ca.pem", "alpha.pem", "beta.pem"] {
        assert!(out.join(name).is_file(), "{name}");
    }
    for key in ["ca.key", "alpha.key", "beta.key"] {
        let mode = std::fs::metadata(out.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // The files work: a config naming them loads every host's identity.
    let with_tls = std::fs::read_to_string(&config).unwrap().replace(
        "memory = \"1G\"\n",
        "memory = \"1G\"\ntls_cert = \"certs/HOST.pem\"\ntls_key = \"certs/HOST.key\"\n",
    );
    let with_tls = with_tls
        .replacen("HOST", "alpha", 2)
        .replacen("HOST", "beta", 2)
        + "\n[tls]\nca = \"certs/ca.pem\"\n";
    std::fs::write(&config, with_tls).unwrap();
    let cluster = hostd::config::Cluster::load(&config).unwrap();
    for host in ["alpha", "beta"] {
        let settings = cluster.host_settings(host, None).unwrap();
        assert_eq!(settings.tls.as_ref().map(|t| t.name()), Some(host));
    }
    // A second run refuses rather than replace the CA.
    let second = init();
    assert_eq!(second.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already exists"),
        "{second:?}"
    );
}
