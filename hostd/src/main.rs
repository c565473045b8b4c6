//! `hostd`: the Ferry host daemon. `hostd --config FILE --host NAME` runs one host of a
//! cluster; `hostd demo` runs the live demo on an embedded two-host configuration.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hostd",
    version,
    about = "Ferry host daemon: runs VMs and migrates them between hosts"
)]
struct Cli {
    /// Cluster configuration file (TOML).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Which host of the cluster this daemon is.
    #[arg(long)]
    host: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Live demo: two hostd on loopback, a VM migrated there and back while it runs.
    Demo {
        /// Memory of the demo VM.
        #[arg(long, default_value = "1G")]
        memory: String,
        /// Realistic content preloaded into the VM.
        #[arg(long, default_value = "384M")]
        content: String,
        /// Keep the demo's temporary directory (configuration, logs).
        #[arg(long)]
        keep: bool,
    },
    /// Certificates for a lab cluster.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run one VM's VMM process. hostd starts these itself, one per VM, in a process group of
    /// their own so that they outlive it; there is no need to run this by hand.
    Vmm {
        /// The unix socket to serve the VM on.
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Write a CA and a key and certificate for every host of the --config cluster into
    /// DIR, and print the configuration keys that use them.
    Init {
        /// Directory for the PEM files (keys are written mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
}

fn certs_init(config: Option<PathBuf>, out: &std::path::Path) -> anyhow::Result<()> {
    let config = config.ok_or_else(|| {
        anyhow::anyhow!("give --config FILE: the cluster whose hosts get certificates")
    })?;
    let cluster = hostd::config::Cluster::load(&config)?;
    let written = hostd::certs::init(&cluster, out)?;
    println!(
        "wrote a CA and certificates for {} host(s) into {}; add to {}:\n",
        written.hosts.len(),
        out.display(),
        config.display()
    );
    print!("{}", written.config_snippet());
    Ok(())
}

fn main() {
    // hostd starts each VM's VMM process as `hostd vmm --socket PATH`.
    ferry_vmm::run_if_vmm();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Demo {
            memory,
            content,
            keep,
        }) => {
            hostd::init_logging("warn");
            hostd::demo::run(&memory, &content, keep)
        }
        Some(Command::Vmm { socket }) => ferry_vmm::run(&socket),
        Some(Command::Certs {
            command: CertsCommand::Init { out },
        }) => certs_init(cli.config, &out),
        None => {
            hostd::init_logging("info");
            match (cli.config, cli.host) {
                (Some(config), Some(host)) => hostd::daemon::run(&config, &host),
                _ => Err(anyhow::anyhow!(
                    "give --config FILE --host NAME to run a host, or `hostd demo` for the demo"
                )),
            }
        }
    };
    if let Err(error) = result {
        eprintln!("hostd: error: {error:#}");
        std::process::exit(2);
    }
}
