//! `hostd certs init`: a CA and a key and certificate for every host of a cluster, for a
//! lab, with rcgen. Production brings its own PEM files and names them in the same keys.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ferry_transport::tls::certs::{ClusterCa, LAB_VALIDITY_DAYS};

use crate::config::Cluster;

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The CA certificate.
    pub ca: PathBuf,
    /// Per host: (name, certificate, key).
    pub hosts: Vec<(String, PathBuf, PathBuf)>,
}

impl Written {
    /// The configuration keys that use these files, to paste into the cluster file.
    pub fn config_snippet(&self) -> String {
        let mut text = format!("[tls]\nca = \"{}\"\n", self.ca.display());
        for (name, cert, key) in &self.hosts {
            text.push_str(&format!(
                "\n# under the [[hosts]] entry of {name}:\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                cert.display(),
                key.display()
            ));
        }
        text
    }
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "writing {} (an existing file is never overwritten; remove it or choose another --out)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Writes `ca.pem`, `ca.key` and `HOST.pem`, `HOST.key` for every host of `cluster` into
/// `out` (keys mode 0600). Refuses to overwrite anything.
pub fn init(cluster: &Cluster, out: &Path) -> Result<Written> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ca_path = out.join("ca.pem");
    if ca_path.exists() {
        bail!(
            "{} already exists: certificates were made here before (remove the directory's files to start over)",
            ca_path.display()
        );
    }
    let ca = ClusterCa::generate(&cluster.name).context("generating the cluster CA")?;
    write_new(&ca_path, ca.cert_pem(), 0o644)?;
    write_new(&out.join("ca.key"), &ca.key_pem(), 0o600)?;
    let mut hosts = Vec::new();
    for host in &cluster.hosts {
        let issued = ca
            .issue(&host.name, LAB_VALIDITY_DAYS)
            .with_context(|| format!("issuing the certificate of {}", host.name))?;
        let cert = out.join(format!("{}.pem", host.name));
        let key = out.join(format!("{}.key", host.name));
        write_new(&cert, &issued.cert_pem, 0o644)?;
        write_new(&key, &issued.key_pem, 0o600)?;
        hosts.push((host.name.clone(), cert, key));
    }
    Ok(Written { ca: ca_path, hosts })
}
