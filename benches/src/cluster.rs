//! Two hostd (`alpha`, `beta`) on loopback in threads of the benchmark's own process, driven
//! through their API (the unix socket in each state directory) like `ferryctl`. Both have
//! certificates from a lab CA; migrations are plain unless a request asks for encryption,
//! so that the figures compare with QEMU's plain migrations.

use std::error::Error;
use std::path::Path;
use std::time::Duration;

use ferry_actors::migration::MigrationReport;
use hostd::api_types::MigrateRequest;
use hostd::client::Client;
use hostd::config::Cluster;

fn free_port() -> Result<u16, std::io::Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the two hosts with state under `dir`; with `local_datastores`, each has a
/// datastore `HOST-local` at `dir/HOST/disks`. Returns an API client once both answer.
pub fn start(dir: &Path, name: &str, local_datastores: bool) -> Result<Client, Box<dyn Error>> {
    start_sized(dir, name, local_datastores, "4G")
}

/// [`start`], each host offering `memory` to its VMs (e.g. `"12G"`).
pub fn start_sized(
    dir: &Path,
    name: &str,
    local_datastores: bool,
    memory: &str,
) -> Result<Client, Box<dyn Error>> {
    let mut text = format!(
        "[cluster]\nname = \"{name}\"\n[migration]\nencryption = \"disabled\"\n[tls]\nca = \"certs/ca.pem\"\n[[networks]]\nname = \"vmnet\"\n"
    );
    for host in ["alpha", "beta"] {
        if local_datastores {
            text.push_str(&format!("[[datastores]]\nname = \"{host}-local\"\n"));
        }
    }
    for host in ["alpha", "beta"] {
        let datastores = if local_datastores {
            format!(
                "datastores = [{{ name = \"{host}-local\", path = \"{}/{host}/disks\" }}]\n",
                dir.display()
            )
        } else {
            String::new()
        };
        text.push_str(&format!(
            "[[hosts]]\nname = \"{host}\"\ncontrol = \"127.0.0.1:{}\"\ndata = [\"127.0.0.1:0\"]\nmemory = \"{memory}\"\nnetworks = [{{ name = \"vmnet\" }}]\ntls_cert = \"certs/{host}.pem\"\ntls_key = \"certs/{host}.key\"\n{datastores}state_dir = \"{}/{host}\"\n",
            free_port()?,
            dir.display()
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text)?;
    let cluster = Cluster::load(&path)?;
    hostd::certs::init(&cluster, &dir.join("certs"))?;
    for host in ["alpha", "beta"] {
        let path = path.clone();
        std::thread::spawn(move || {
            if let Err(e) = hostd::daemon::run(&path, host) {
                eprintln!("bench: hostd {host}: {e:#}");
            }
        });
    }
    let client = Client::new(cluster);
    for host in ["alpha", "beta"] {
        let mut tries = 0;
        while client.host_info(host).is_err() {
            tries += 1;
            if tries > 400 {
                return Err(format!("hostd {host} did not start").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(client)
}

/// Migrates `vm` `runs` times, alpha → beta first and back again, each with the request
/// `request(to)` makes; every migration must complete. `label` starts the progress lines.
pub fn migrate_back_and_forth(
    client: &Client,
    vm: &str,
    runs: u64,
    label: &str,
    request: impl Fn(&str) -> MigrateRequest,
) -> Result<Vec<MigrationReport>, Box<dyn Error>> {
    let mut reports = Vec::new();
    for run in 0..runs {
        let to = if run % 2 == 0 { "beta" } else { "alpha" };
        eprintln!("{label}, run {}/{runs}", run + 1);
        let (source, started) = client.migrate(vm, &request(to))?;
        let report = client.wait_migration(&source, &started.id, |_| {})?;
        if report.status != "completed" {
            return Err(format!(
                "Ferry migration ended {}: {:?}",
                report.status, report.error
            )
            .into());
        }
        reports.push(report);
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(reports)
}
