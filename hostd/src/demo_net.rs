//! The demo's VM network: a Linux bridge for each demo host, the two joined by a veth link
//! (as two top-of-rack ports would be), and a peer in a network namespace of its own on the
//! first bridge. Both demo hosts run on loopback in this machine's own namespace, so the
//! bridges are made there, with names of this process's ID, and removed when the demo ends.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What the demo made; removed on drop.
#[derive(Debug)]
pub struct DemoNet {
    /// alpha's and beta's bridges.
    pub bridges: [String; 2],
    /// The peer's namespace.
    pub peer_ns: String,
    /// The peer's interface in it.
    pub peer_interface: String,
    links: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl DemoNet {
    /// Makes the bridges, the link between them and the peer's namespace (needs root).
    pub fn create() -> Result<DemoNet> {
        let id = std::process::id();
        let mut net = DemoNet {
            bridges: [format!("fyd{id}a"), format!("fyd{id}b")],
            peer_ns: format!("ferry-demo-{id}"),
            peer_interface: "peer0".into(),
            links: Vec::new(),
        };
        net.build().context(
            "making the demo's VM network (bridges, a veth link, a namespace; this needs root)",
        )?;
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        let id = std::process::id();
        for bridge in &self.bridges {
            ip(&["link", "add", bridge, "type", "bridge"])?;
            self.links.push(bridge.clone());
            // The host's own IPv6 would talk to the guests through the bridge.
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"),
                "1",
            );
            ip(&["link", "set", bridge, "up"])?;
        }
        let (uplink_a, uplink_b) = (format!("fyd{id}u"), format!("fyd{id}v"));
        ip(&[
            "link", "add", &uplink_a, "type", "veth", "peer", "name", &uplink_b,
        ])?;
        self.links.push(uplink_a.clone());
        ip(&["netns", "add", &self.peer_ns])?;
        let peer_link = format!("fyd{id}p");
        ip(&[
            "link",
            "add",
            &peer_link,
            "type",
            "veth",
            "peer",
            "name",
            &self.peer_interface,
            "netns",
            &self.peer_ns,
        ])?;
        self.links.push(peer_link.clone());
        let ports = [
            (&uplink_a, &self.bridges[0]),
            (&uplink_b, &self.bridges[1]),
            (&peer_link, &self.bridges[0]),
        ];
        for (port, bridge) in ports {
            ip(&["link", "set", port, "master", bridge])?;
            ip(&["link", "set", port, "up"])?;
        }
        ip(&[
            "-n",
            &self.peer_ns,
            "link",
            "set",
            &self.peer_interface,
            "up",
        ])?;
        // A new port forwards once the kernel has applied its carrier (in a batch, at most
        // once a second).
        let deadline = Instant::now() + Duration::from_secs(10);
        for (port, _) in ports {
            loop {
                let out = Command::new("bridge")
                    .args(["link", "show", "dev", port])
                    .output()
                    .context("running bridge (iproute2)")?;
                if String::from_utf8_lossy(&out.stdout).contains("state forwarding") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("bridge port {port} did not start forwarding within 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for DemoNet {
    fn drop(&mut self) {
        for link in self.links.iter().rev() {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer_ns])
            .output();
    }
}
