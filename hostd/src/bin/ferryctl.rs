//! `ferryctl`: drive a Ferry cluster through the hostd APIs named in its configuration.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use ferry_actors::vm_actor::VmInfo;
use ferry_runtime::GuestOptions;
use ferry_runtime::units::format_bytes;
use hostd::api_types::{CreateVmRequest, MaintenanceRequest, MigrateRequest};
use hostd::client::Client;
use hostd::config::Cluster;
use hostd::evacuation_view::{self, EvacuationView};
use hostd::progress::{ProgressView, describe, report_json};
use hostd::table::{self, Align};

#[derive(Parser, Debug)]
#[command(
    name = "ferryctl",
    version,
    about = "Drive a Ferry cluster: VMs and live migrations"
)]
struct Cli {
    /// Cluster configuration file (TOML); also read from FERRY_CONFIG.
    #[arg(long, env = "FERRY_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a VM to another host.
    Migrate(MigrateArgs),
    /// Cancel a VM's migration (possible until switch-over).
    MigrateCancel {
        /// VM name.
        name: String,
    },
    /// Hosts.
    #[command(subcommand)]
    Host(HostCommand),
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Create (and start) a VM on a host.
    Create(Box<CreateArgs>),
    /// List the VMs of every host.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM (JSON).
    Show {
        /// VM name.
        name: String,
    },
    /// Pause a VM.
    Pause {
        /// VM name.
        name: String,
    },
    /// Resume a VM.
    Resume {
        /// VM name.
        name: String,
    },
    /// Stop a VM for good.
    Stop {
        /// VM name.
        name: String,
    },
    /// Run the stale copy a lost switch-over left paused on its source host. Its guest goes
    /// back in time to the moment of the switch-over: whatever it did on the destination
    /// afterwards is gone.
    Recover {
        /// VM name.
        name: String,
        /// Required: confirms that running the stale copy is intended.
        #[arg(long)]
        from_stale_copy: bool,
    },
    /// Show the VM's serial console, following new output.
    Console {
        /// VM name.
        name: String,
        /// Print what there is and exit.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// VM name.
    name: String,
    /// Host to create it on.
    #[arg(long)]
    host: String,
    /// counter, dirty, verify, disk, net, or the path (on the host) of an ELF kernel.
    #[arg(long)]
    guest: String,
    /// Memory, e.g. 256M or 1G.
    #[arg(long)]
    memory: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Preload FILE (path on the host) at ADDRESS, as FILE@ADDRESS; repeatable.
    #[arg(long = "preload")]
    preloads: Vec<String>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Multiboot module PATH or PATH=CMDLINE; repeatable.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Network to attach to (a network with a bridge on the host gives the VM a virtio-net
    /// NIC on it).
    #[arg(long)]
    network: Option<String>,
    /// The VM's IPv4 address (announced by gratuitous ARP after migration).
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// counter: ticks per second.
    #[arg(long)]
    ticks_per_sec: Option<u32>,
    /// dirty: working set, e.g. 64M.
    #[arg(long)]
    working_set: Option<String>,
    /// dirty: pages per second (default unlimited); net: numbered frames per second
    /// (default 100).
    #[arg(long)]
    rate: Option<u64>,
    /// dirty: passes before the guest exits (default forever).
    #[arg(long)]
    passes: Option<u64>,
    /// verify, disk: pattern seed.
    #[arg(long)]
    seed: Option<u64>,
    /// A disk, DATASTORE:FILE[,size=SIZE][,ro]; the image is created sparse if missing
    /// (then a size is needed). Repeatable.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// disk guest: block writes per second (0: as fast as the disk goes; default 200).
    #[arg(long)]
    disk_rate: Option<u64>,
    /// Withhold a CPU feature from this VM (e.g. avx2), beyond the host's baseline, so it
    /// can move to hosts without it. Repeatable.
    #[arg(long = "hide-cpu-feature")]
    hide_cpu_features: Vec<String>,
    /// Create without starting.
    #[arg(long)]
    no_start: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// VM name.
    name: String,
    /// Destination host.
    #[arg(long)]
    to: String,
    /// Downtime target in milliseconds (default from the configuration, 300).
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Data streams.
    #[arg(long)]
    streams: Option<u16>,
    /// Compare a hash of guest memory on both sides before switching over.
    #[arg(long)]
    verify: bool,
    /// Pre-copy round limit.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Never throttle the guest.
    #[arg(long)]
    no_auto_converge: bool,
    /// Bandwidth cap on the memory copy over all streams, e.g. 200M (= 200 MB/s), 1.5G,
    /// 64MiB/s, or `none` (default from the configuration: uncapped).
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Compute + storage: move every disk to this datastore of the destination while the VM
    /// runs (no shared storage needed). Without it, the disks must be on a datastore both
    /// hosts share.
    #[arg(long)]
    datastore: Option<String>,
    /// Compute + storage, one disk: FILE=DS moves the disk named FILE (or DATASTORE:FILE) to
    /// datastore DS of the destination. Repeat it per disk; disks not named go to
    /// --datastore. A storage migration moves every disk.
    #[arg(long, value_name = "FILE=DS", value_parser = parse_disk_target)]
    disk_target: Vec<(String, String)>,
    /// After a storage migration, keep the source images instead of deleting them.
    #[arg(long)]
    keep_source_disks: bool,
    /// Encryption of the memory and disk copy: required (fail at verify if either host
    /// cannot), opportunistic (encrypt when both can) or disabled. Default: the cluster's,
    /// which is required when hosts have certificates.
    #[arg(long, value_parser = ["required", "opportunistic", "disabled"])]
    encryption: Option<String>,
    /// Data path: auto (RDMA when both hosts have a usable device, else lz4-compressed TCP),
    /// tcp, or rdma (fail at verify if RDMA cannot be used).
    #[arg(long, value_parser = ["auto", "tcp", "rdma"])]
    transport: Option<String>,
    /// Print one JSON object when done instead of progress and a report.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum HostCommand {
    /// Resources, VMs and migrations of a host (JSON).
    Show {
        /// Host name.
        name: String,
    },
    /// The hosts of the cluster and whether they answer.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Maintenance mode: a host that takes no new VMs and no incoming migrations.
    #[command(subcommand)]
    Maintenance(MaintenanceCommand),
}

#[derive(Subcommand, Debug)]
enum MaintenanceCommand {
    /// Put a host in maintenance and migrate every VM off it, each to a host that can take
    /// it (exit status 1 if any VM stayed).
    Enter(Box<EnterArgs>),
    /// End maintenance mode (an evacuation in progress starts no more migrations).
    Exit {
        /// Host name.
        host: String,
    },
}

#[derive(Args, Debug)]
struct EnterArgs {
    /// Host name.
    host: String,
    /// Only set the mode; leave the VMs where they are.
    #[arg(long)]
    no_evacuate: bool,
    /// Move the disks of VMs that no other host shares to this datastore of their
    /// destination (compute + storage). Without it such VMs stay.
    #[arg(long)]
    datastore: Option<String>,
    /// Downtime target of each migration, ms.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Data streams per migration.
    #[arg(long)]
    streams: Option<u16>,
    /// Compare memory hashes before each switch-over.
    #[arg(long)]
    verify: bool,
    /// Bandwidth cap per migration, e.g. 200M, or `none`.
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Bandwidth cap on all of the evacuation's migrations together, e.g. 1G: concurrent
    /// migrations share it, and one that ends leaves its share to the others.
    #[arg(long)]
    total_bandwidth: Option<String>,
    /// Encryption: required, opportunistic or disabled.
    #[arg(long, value_parser = ["required", "opportunistic", "disabled"])]
    encryption: Option<String>,
    /// Data path: auto, tcp or rdma.
    #[arg(long, value_parser = ["auto", "tcp", "rdma"])]
    transport: Option<String>,
    /// Print one JSON object when done instead of progress and a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = Cluster::load(&cli.config)
        .map_err(anyhow::Error::from)
        .and_then(|cluster| run(Client::new(cluster), cli.command));
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("ferryctl: error: {error:#}");
            std::process::exit(2);
        }
    }
}

/// How long ago `unix_ms` was, e.g. `42s`, `7m`, `3h`, `2d`.
fn age(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(unix_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn print_vms(vms: &[VmInfo]) {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                vm.host.clone(),
                vm.state.to_string(),
                vm.vcpus.to_string(),
                format_bytes(vm.memory),
                vm.guest.clone(),
                vm.mac.clone(),
                vm.vmm_pid
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
                vm.vmm_started_unix_ms
                    .filter(|_| vm.vmm_pid.is_some())
                    .map_or_else(|| "-".to_string(), age),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                ("NAME", Align::Left),
                ("HOST", Align::Left),
                ("STATE", Align::Left),
                ("VCPUS", Align::Right),
                ("MEMORY", Align::Right),
                ("GUEST", Align::Left),
                ("MAC", Align::Left),
                ("VMM PID", Align::Right),
                ("UP", Align::Right),
            ],
            &rows
        )
    );
}

/// One host as `host list` shows it.
#[derive(serde::Serialize)]
struct HostLine {
    name: String,
    api: Option<String>,
    up: bool,
    vms: Option<usize>,
    memory_used: Option<u64>,
    memory_total: Option<u64>,
    maintenance: Option<bool>,
    error: Option<String>,
}

fn list_hosts(client: &Client, json: bool) -> Result<i32> {
    let hosts: Vec<HostLine> = client
        .cluster()
        .hosts
        .iter()
        .map(|host| {
            let api = host.api.map(|a| a.to_string());
            match client.host_info(&host.name) {
                Ok(info) => HostLine {
                    name: host.name.clone(),
                    api,
                    up: true,
                    vms: Some(info.vms.len()),
                    memory_used: Some(info.memory_used),
                    memory_total: Some(info.memory_total),
                    maintenance: Some(info.maintenance.is_some()),
                    error: None,
                },
                Err(e) => HostLine {
                    name: host.name.clone(),
                    api,
                    up: false,
                    vms: None,
                    memory_used: None,
                    memory_total: None,
                    maintenance: None,
                    error: Some(e.to_string()),
                },
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(0);
    }
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.api.clone().unwrap_or_else(|| "(socket only)".into()),
                if h.up { "up" } else { "down" }.to_string(),
                h.vms.map_or_else(dash, |n| n.to_string()),
                h.memory_used.map_or_else(dash, format_bytes),
                h.memory_total.map_or_else(dash, format_bytes),
                match (h.maintenance, &h.error) {
                    (Some(true), _) => "in maintenance".to_string(),
                    (_, Some(error)) => error.clone(),
                    _ => String::new(),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                ("NAME", Align::Left),
                ("API", Align::Left),
                ("STATUS", Align::Left),
                ("VMS", Align::Right),
                ("MEMORY USED", Align::Right),
                ("MEMORY", Align::Right),
                ("NOTE", Align::Left),
            ],
            &rows
        )
    );
    Ok(0)
}

fn run(client: Client, command: Command) -> Result<i32> {
    match command {
        Command::Vm(VmCommand::Create(args)) => {
            let request = CreateVmRequest {
                name: args.name.clone(),
                guest: args.guest.clone(),
                vcpus: args.vcpus,
                memory: args.memory.clone(),
                options: GuestOptions {
                    ticks_per_sec: args.ticks_per_sec,
                    working_set: None,
                    working_set_start: None,
                    rate: args.rate,
                    passes: args.passes,
                    seed: args.seed,
                    disk_rate: args.disk_rate,
                    cmdline: args.cmdline.clone(),
                    modules: args.modules.clone(),
                },
                working_set: args.working_set.clone(),
                preloads: args.preloads.clone(),
                network: args.network.clone(),
                ip: args.ip,
                start: !args.no_start,
                disks: args.disks.clone(),
                hide_cpu_features: args.hide_cpu_features.clone(),
            };
            let info = client.create_vm(&args.host, &request)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "created VM {} on {} ({}, {} vCPU, {}, MAC {})",
                    info.name,
                    info.host,
                    info.state,
                    info.vcpus,
                    format_bytes(info.memory),
                    info.mac
                );
            }
            Ok(0)
        }
        Command::Vm(VmCommand::List { json }) => {
            let (vms, errors) = client.list_vms();
            for error in &errors {
                eprintln!("ferryctl: warning: {error}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                print_vms(&vms);
            }
            Ok(0)
        }
        Command::Vm(VmCommand::Show { name }) => {
            let (_, info) = client.find_vm(&name)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(0)
        }
        Command::Vm(VmCommand::Pause { name }) => operate(&client, &name, "pause"),
        Command::Vm(VmCommand::Resume { name }) => operate(&client, &name, "resume"),
        Command::Vm(VmCommand::Stop { name }) => operate(&client, &name, "stop"),
        Command::Vm(VmCommand::Recover {
            name,
            from_stale_copy,
        }) => {
            if !from_stale_copy {
                bail!(
                    "`vm recover` runs the stale copy a lost switch-over left paused, and its guest goes back to the moment of that switch-over; add --from-stale-copy to do it"
                );
            }
            let info = client.recover_from_stale_copy(&name)?;
            eprintln!(
                "ferryctl: warning: {name} runs from its stale copy: its guest went back to the moment of the lost switch-over, and whatever it did on the destination since is gone"
            );
            println!("{} on {}: {}", info.name, info.host, info.state);
            Ok(0)
        }
        Command::Vm(VmCommand::Console { name, no_follow }) => {
            if no_follow {
                let history = client.console_history(&name)?;
                std::io::Write::write_all(&mut std::io::stdout(), &history)?;
            } else {
                client.follow_console(&name, &mut std::io::stdout())?;
                eprintln!(
                    "ferryctl: console of {name} ended (VM stopped or migrated; run again to follow it)"
                );
            }
            Ok(0)
        }
        Command::Migrate(args) => migrate(&client, &args),
        Command::MigrateCancel { name } => {
            let report = client.cancel(&name)?;
            println!(
                "cancelling migration {} of {} to {}",
                report.id, report.vm, report.destination
            );
            Ok(0)
        }
        Command::Host(HostCommand::Show { name }) => {
            let info = client.host_info(&name)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(0)
        }
        Command::Host(HostCommand::List { json }) => list_hosts(&client, json),
        Command::Host(HostCommand::Maintenance(MaintenanceCommand::Enter(args))) => {
            enter_maintenance(&client, &args)
        }
        Command::Host(HostCommand::Maintenance(MaintenanceCommand::Exit { host })) => {
            let status = client.exit_maintenance(&host)?;
            let stopped = status.evacuation.as_ref().is_some_and(|e| !e.is_finished());
            println!(
                "{host}: maintenance mode ended{}",
                if stopped {
                    "; the evacuation starts no more migrations"
                } else {
                    ""
                }
            );
            Ok(0)
        }
    }
}

fn enter_maintenance(client: &Client, args: &EnterArgs) -> Result<i32> {
    if args.streams == Some(0) {
        bail!("--streams must be at least 1");
    }
    if args.downtime_ms == Some(0) {
        bail!("--downtime-ms must be at least 1");
    }
    let request = MaintenanceRequest {
        evacuate: !args.no_evacuate,
        options: MigrateRequest {
            downtime_ms: args.downtime_ms,
            streams: args.streams,
            verify: args.verify,
            max_bandwidth: args.max_bandwidth.clone(),
            datastore: args.datastore.clone(),
            encryption: args.encryption.clone(),
            transport: args.transport.clone(),
            ..MigrateRequest::default()
        },
        total_bandwidth: args.total_bandwidth.clone(),
    };
    client.enter_maintenance(&args.host, &request)?;
    if args.no_evacuate {
        println!(
            "{}: in maintenance mode (no new VMs, no incoming migrations); its VMs stay",
            args.host
        );
        return Ok(0);
    }
    let mut view = (!args.json).then(|| EvacuationView::new(&args.host));
    let report = client.wait_evacuation(&args.host, |report| {
        if let Some(view) = &mut view {
            view.update(report);
        }
    })?;
    if let Some(view) = &mut view {
        view.finish();
    }
    if args.json {
        println!("{}", evacuation_view::report_json(&report));
    } else {
        print!("{}", evacuation_view::describe(&report));
    }
    Ok(if report.stayed > 0 { 1 } else { 0 })
}

fn operate(client: &Client, name: &str, op: &str) -> Result<i32> {
    let info = client.operate(name, op)?;
    println!("{} on {}: {}", info.name, info.host, info.state);
    Ok(0)
}

/// `FILE=DS` of `--disk-target`.
fn parse_disk_target(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((file, ds)) if !file.is_empty() && !ds.is_empty() => {
            Ok((file.to_string(), ds.to_string()))
        }
        _ => Err(format!(
            "'{text}' is not FILE=DATASTORE (e.g. web.raw=beta-local)"
        )),
    }
}

fn migrate(client: &Client, args: &MigrateArgs) -> Result<i32> {
    for (i, (file, _)) in args.disk_target.iter().enumerate() {
        if args.disk_target[..i].iter().any(|(f, _)| f == file) {
            bail!("--disk-target names disk '{file}' twice");
        }
    }
    if args.streams == Some(0) {
        bail!("--streams must be at least 1");
    }
    if args.downtime_ms == Some(0) {
        bail!("--downtime-ms must be at least 1");
    }
    let request = MigrateRequest {
        to: args.to.clone(),
        downtime_ms: args.downtime_ms,
        streams: args.streams,
        verify: args.verify,
        max_rounds: args.max_rounds,
        auto_converge: args.no_auto_converge.then_some(false),
        max_bandwidth: args.max_bandwidth.clone(),
        datastore: args.datastore.clone(),
        disk_targets: args.disk_target.iter().cloned().collect(),
        keep_source_disks: args.keep_source_disks,
        encryption: args.encryption.clone(),
        transport: args.transport.clone(),
    };
    let (source, started) = client.migrate(&args.name, &request)?;
    let view = (!args.json).then(|| ProgressView::new(&args.name, &source.name, &args.to));
    let report = client.wait_migration(&source, &started.id, |report| {
        if let Some(view) = &view {
            view.update(report);
        }
    })?;
    if let Some(view) = &view {
        view.finish();
    }
    if args.json {
        println!("{}", report_json(&report));
    } else {
        print!("{}", describe(&report));
    }
    Ok(if report.status == "completed" { 0 } else { 1 })
}
