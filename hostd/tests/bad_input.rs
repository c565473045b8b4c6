//! Bad input gets a clear error, never a crash: configuration files, names that do not exist,
//! invalid sizes, malformed API requests. Real hostd processes; needs /dev/kvm.

use std::path::Path;
use std::process::Command;

use ferry_tests::{HostSpec, TestCluster};

const HOSTD: &str = env!("CARGO_BIN_EXE_hostd");
const FERRYCTL: &str = env!("CARGO_BIN_EXE_ferryctl");

const GOOD: &str = r#"
[cluster]
name = "bad-input"

[[hosts]]
name = "alpha"
control = "127.0.0.1:17711"
memory = "1G"

[[hosts]]
name = "beta"
control = "127.0.0.1:17712"
memory = "1G"
"#;

/// Runs hostd with `config` and returns (exit code, stderr); it must exit on its own.
fn hostd_with(config: &str, host: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(HOSTD)
        .arg("--config")
        .arg(&path)
        .args(["--host", host])
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn malformed_configs_are_refused_at_start_naming_file_key_and_problem() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown key",
            &GOOD.replace(
                "memory = \"1G\"\n\n[[hosts]]",
                "memory = \"1G\"\nmemroy = 1\n\n[[hosts]]",
            ),
            &["memroy"],
        ),
        (
            "duplicate host",
            &GOOD.replace("name = \"beta\"", "name = \"alpha\""),
            &["hosts[1].name", "duplicate host name 'alpha'"],
        ),
        (
            "bad address",
            &GOOD.replace("127.0.0.1:17712", "localhost:port"),
            &["hosts[1].control", "not an address"],
        ),
        (
            "bad size",
            &GOOD.replace(
                "memory = \"1G\"\n\n[[hosts]]",
                "memory = \"12Q\"\n\n[[hosts]]",
            ),
            &["hosts[0].memory", "unknown size unit"],
        ),
        (
            "missing CPU",
            &GOOD.replace(
                "memory = \"1G\"\n\n[[hosts]]",
                "memory = \"1G\"\ncpus = [0, 999]\n\n[[hosts]]",
            ),
            &["hosts[0].cpus", "CPU 999 does not exist"],
        ),
        ("not TOML", "[cluster\nname = ", &["cluster.toml"]),
        (
            "bad bandwidth",
            &format!("{GOOD}\n[migration]\nmax_bandwidth = \"fast\"\n"),
            &["migration.max_bandwidth", "not a rate"],
        ),
        (
            "a TCP API without authentication",
            &GOOD.replace(
                "name = \"alpha\"\n",
                "name = \"alpha\"\napi = \"127.0.0.1:17701\"\n",
            ),
            &[
                "hosts[0].api",
                "must authenticate its clients",
                "api_token_file",
            ],
        ),
        (
            "a TCP API whose token file is missing",
            &GOOD.replace(
                "name = \"alpha\"\n",
                "name = \"alpha\"\napi = \"127.0.0.1:17701\"\napi_token_file = \"nowhere.token\"\n",
            ),
            &["reading the API token file", "nowhere.token"],
        ),
        (
            "a certificate without its key",
            &GOOD.replace(
                "name = \"alpha\"\n",
                "name = \"alpha\"\ntls_cert = \"alpha.pem\"\n",
            ),
            &["hosts[0].tls_key", "tls_cert is set"],
        ),
        (
            "a certificate without a cluster CA",
            &GOOD.replace(
                "name = \"alpha\"\n",
                "name = \"alpha\"\ntls_cert = \"a.pem\"\ntls_key = \"a.key\"\n",
            ),
            &["tls.ca", "no cluster CA"],
        ),
        (
            "unreadable certificate files",
            &GOOD
                .replace(
                    "name = \"alpha\"\n",
                    "name = \"alpha\"\ntls_cert = \"a.pem\"\ntls_key = \"a.key\"\n",
                )
                .replacen("[[hosts]]", "[tls]\nca = \"ca.pem\"\n\n[[hosts]]", 1),
            &[
                "hosts[0].tls_cert",
                "cannot load the CA certificate",
                "ca.pem",
            ],
        ),
        (
            "unknown encryption mode",
            &format!("{GOOD}\n[migration]\nencryption = \"sometimes\"\n"),
            &["migration.encryption", "not an encryption mode"],
        ),
        (
            "bandwidth below the smallest cap",
            &format!("{GOOD}\n[migration]\nmax_bandwidth = \"10k\"\n"),
            &["migration.max_bandwidth", "below the smallest cap"],
        ),
    ];
    for (what, config, needles) in cases {
        let (code, stderr) = hostd_with(config, "alpha");
        assert_eq!(
            code,
            Some(2),
            "{what}: hostd must exit with an error, got {code:?}: {stderr}"
        );
        assert!(
            stderr.contains("cluster.toml"),
            "{what}: message names the file: {stderr}"
        );
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{what}: message lacks '{needle}': {stderr}"
            );
        }
    }
    let (code, stderr) = hostd_with(GOOD, "gamma");
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("no host named 'gamma'") && stderr.contains("alpha, beta"),
        "{stderr}"
    );
    let missing = Command::new(HOSTD)
        .args(["--config", "/nonexistent/cluster.toml", "--host", "a"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("/nonexistent/cluster.toml: no such file")
    );
}

#[test]
fn unknown_names_and_invalid_values_get_clear_errors() {
    let cluster = TestCluster::loopback(
        Path::new(HOSTD),
        Path::new(FERRYCTL),
        vec![HostSpec::new("alpha"), HostSpec::new("beta")],
    );
    let expect_error = |args: &[&str], needle: &str| {
        let result = cluster.ferryctl(args);
        assert_eq!(result.code, Some(2), "{args:?} should fail: {result:?}");
        assert!(
            result.stderr.contains(needle),
            "{args:?}: stderr lacks '{needle}': {}",
            result.stderr
        );
    };
    expect_error(&["vm", "show", "ghost"], "no VM named 'ghost'");
    expect_error(&["vm", "pause", "ghost"], "no VM named 'ghost'");
    expect_error(&["migrate", "ghost", "--to", "beta"], "no VM named 'ghost'");
    expect_error(&["host", "show", "gamma"], "no host named 'gamma'");
    expect_error(
        &["vm", "create", "v", "--host", "gamma", "--guest", "counter"],
        "no host named 'gamma'",
    );
    expect_error(
        &[
            "vm", "create", "v", "--host", "alpha", "--guest", "counter", "--memory", "12Q",
        ],
        "unknown size unit",
    );
    expect_error(
        &[
            "vm", "create", "v", "--host", "alpha", "--guest", "counter", "--memory", "1M",
        ],
        "invalid",
    );
    expect_error(
        &[
            "vm", "create", "v", "--host", "alpha", "--guest", "counter", "--memory", "64G",
        ],
        "memory free",
    );
    expect_error(
        &[
            "vm",
            "create",
            "v",
            "--host",
            "alpha",
            "--guest",
            "nosuchguest",
        ],
        "neither a built-in guest",
    );
    expect_error(
        &[
            "vm",
            "create",
            "bad name!",
            "--host",
            "alpha",
            "--guest",
            "counter",
        ],
        "invalid VM name",
    );
    expect_error(
        &[
            "vm",
            "create",
            "v",
            "--host",
            "alpha",
            "--guest",
            "counter",
            "--preload",
            "nofile",
        ],
        "FILE@ADDRESS",
    );
    expect_error(
        &[
            "vm",
            "create",
            "v",
            "--host",
            "alpha",
            "--guest",
            "counter",
            "--preload",
            "/nonexistent@1M",
        ],
        "/nonexistent",
    );
    expect_error(
        &[
            "vm",
            "create",
            "v",
            "--host",
            "alpha",
            "--guest",
            "counter",
            "--network",
            "nonet",
        ],
        "network 'nonet'",
    );

    cluster.ferryctl_ok(&[
        "vm", "create", "v", "--host", "alpha", "--guest", "counter", "--memory", "64M",
    ]);
    expect_error(
        &[
            "vm", "create", "v", "--host", "alpha", "--guest", "counter", "--memory", "64M",
        ],
        "already exists",
    );
    expect_error(&["migrate", "v", "--to", "gamma"], "no host named 'gamma'");
    expect_error(
        &["migrate", "v", "--to", "alpha"],
        "already on host 'alpha'",
    );
    expect_error(
        &["migrate", "v", "--to", "beta", "--streams", "0"],
        "at least 1",
    );
    expect_error(&["migrate-cancel", "v"], "no migration");
    expect_error(
        &["migrate", "v", "--to", "beta", "--max-bandwidth", "fast"],
        "max_bandwidth: 'fast' is not a rate",
    );
    expect_error(
        &["migrate", "v", "--to", "beta", "--max-bandwidth", "100k"],
        "below the smallest cap",
    );
    // Recovery is only for a stale copy, and only when asked for explicitly.
    expect_error(&["vm", "recover", "v"], "--from-stale-copy");
    expect_error(
        &["vm", "recover", "v", "--from-stale-copy"],
        "cannot recover from a stale copy a VM that is running",
    );
    let (status, body) = cluster.api_post("alpha", "/v1/vms/v/recover", "{}");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("from_stale_copy"));

    // The API itself: JSON errors with the right status, never a crash.
    let (status, body) = cluster.api_get("alpha", "/v1/vms/ghost");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("ghost"), "{body}");
    let (status, body) = cluster.api_get("alpha", "/v1/nothing/here");
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, body) = cluster.api_get("alpha", "/v1/migrations/not-a-uuid");
    assert_eq!(status, 400, "{body}");
    let (status, body) = cluster.api_post("alpha", "/v1/vms", "{not json");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid request body"),
        "{body}"
    );
    let (status, body) = cluster.api_post(
        "alpha",
        "/v1/vms",
        r#"{"name":"x","guest":"counter","bogus":1}"#,
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = cluster.api_post("alpha", "/v1/vms/v/explode", "{}");
    assert_eq!(status, 404);
    // Still alive and well.
    assert_eq!(cluster.vms_on("alpha"), vec!["v".to_string()]);
}
