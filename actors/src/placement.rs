//! Placement for an evacuation: which host each VM of a host going into maintenance moves
//! to, and whether its disks move with it. A pure function of what the hosts reported, so
//! that every rule is unit-tested; the destination's own verify stage still decides when
//! the migration starts (facts may have changed in between).
//!
//! Rules, per VM, in the order given (the evacuation orders largest first):
//! - a candidate is not the source, not in maintenance, offers every CPU feature the VM's
//!   CPUID has, has every network the VM uses and has the VM's memory free;
//! - disks: if the candidate shares every disk's datastore (same name, same identity), the VM
//!   moves compute only; otherwise, if the operator named a datastore and the candidate has
//!   it with room for what the images hold, the VM moves with storage; otherwise the
//!   candidate is out;
//! - among candidates, compute-only beats a storage move (less to copy, nothing to delete),
//!   then the most free memory left wins (spreads the load), then the name (deterministic);
//! - the chosen host's free memory (and datastore space) is reduced before the next VM.

use ferry_runtime::cpu::{CpuFeatures, check_compatible};
use serde::{Deserialize, Serialize};

/// Room kept free on a datastore beyond what moving images hold (as the destination's
/// verify stage keeps).
pub const STORAGE_MARGIN: u64 = 64 << 20;

/// A datastore as a host reports it for placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreFacts {
    /// Name.
    pub name: String,
    /// Identity (UUID in its root).
    pub identity: String,
    /// Free bytes.
    pub free_bytes: u64,
}

/// What a host reports about itself for placement (over the control channel: `Describe`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Name.
    pub name: String,
    /// VM memory free, bytes.
    pub memory_free: u64,
    /// CPU features offered to VMs.
    pub cpu: CpuFeatures,
    /// Networks.
    pub networks: Vec<String>,
    /// Networks with a bridge here: the ones a VM with a NIC can arrive on.
    pub bridged: Vec<String>,
    /// Datastores.
    pub datastores: Vec<DatastoreFacts>,
    /// In maintenance: takes no VMs.
    pub maintenance: bool,
    /// Migrations it runs at once (in and out), at most.
    pub max_concurrent: usize,
    /// Migrations it runs now.
    pub active_migrations: usize,
}

/// A disk of a VM to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskNeeds {
    /// Datastore name.
    pub datastore: String,
    /// Identity of that datastore on the source.
    pub identity: String,
    /// Bytes the image holds.
    pub allocated: u64,
}

/// What a VM needs of a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNeeds {
    /// Name.
    pub name: String,
    /// Memory, bytes.
    pub memory: u64,
    /// CPU features of its CPUID.
    pub cpu: CpuFeatures,
    /// Networks it is attached to.
    pub networks: Vec<String>,
    /// The network of each of its NICs (each needs a bridge on the host).
    pub nics: Vec<String>,
    /// Disks.
    pub disks: Vec<DiskNeeds>,
}

/// How a placed VM moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Move {
    /// Compute only: its disks (if any) stay on datastores both hosts share.
    ComputeOnly,
    /// Compute + storage: its disks move to this datastore of the destination.
    WithStorage {
        /// Destination datastore.
        datastore: String,
    },
}

/// Where a VM goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// Destination host.
    pub to: String,
    /// How.
    pub how: Move,
}

/// The decision for one VM: a destination, or why there is none (every host's reason).
pub type Decision = Result<Placed, String>;

/// Places `vms` (in this order) on `hosts`, leaving `source` out; `datastore` is where disks
/// that cannot stay go. One decision per VM, in the same order.
pub fn place(
    vms: &[VmNeeds],
    hosts: &[HostFacts],
    source: &str,
    datastore: Option<&str>,
) -> Vec<(String, Decision)> {
    let mut hosts: Vec<HostFacts> = hosts.iter().filter(|h| h.name != source).cloned().collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    vms.iter()
        .map(|vm| {
            let decision = place_one(vm, &mut hosts, datastore);
            (vm.name.clone(), decision)
        })
        .collect()
}

fn place_one(vm: &VmNeeds, hosts: &mut [HostFacts], datastore: Option<&str>) -> Decision {
    if hosts.is_empty() {
        return Err("no other host in the cluster".into());
    }
    let mut reasons = Vec::new();
    let mut best: Option<(usize, Move)> = None;
    for (index, host) in hosts.iter().enumerate() {
        match fits(vm, host, datastore) {
            Err(why) => reasons.push(format!("{}: {why}", host.name)),
            Ok(how) => {
                let better = match &best {
                    None => true,
                    Some((at, best_how)) => {
                        let key = |h: &HostFacts, m: &Move| {
                            (matches!(m, Move::ComputeOnly), h.memory_free - vm.memory)
                        };
                        // Hosts are in name order: on a tie the earlier one stays.
                        key(host, &how) > key(&hosts[*at], best_how)
                    }
                };
                if better {
                    best = Some((index, how));
                }
            }
        }
    }
    let Some((index, how)) = best else {
        return Err(format!("no host can take it ({})", reasons.join("; ")));
    };
    let host = &mut hosts[index];
    host.memory_free -= vm.memory;
    if let Move::WithStorage { datastore } = &how
        && let Some(store) = host.datastores.iter_mut().find(|d| &d.name == datastore)
    {
        store.free_bytes = store.free_bytes.saturating_sub(allocated(vm));
    }
    Ok(Placed {
        to: host.name.clone(),
        how,
    })
}

fn allocated(vm: &VmNeeds) -> u64 {
    vm.disks.iter().map(|d| d.allocated).sum()
}

/// Whether `host` can take `vm`, and how; or why not.
fn fits(vm: &VmNeeds, host: &HostFacts, datastore: Option<&str>) -> Result<Move, String> {
    if host.maintenance {
        return Err("in maintenance".into());
    }
    check_compatible(&vm.cpu, &host.cpu).map_err(|e| e.to_string())?;
    if let Some(network) = vm.networks.iter().find(|n| !host.networks.contains(n)) {
        return Err(format!("no network '{network}'"));
    }
    if let Some(network) = vm.nics.iter().find(|n| !host.bridged.contains(n)) {
        return Err(format!("no bridge on network '{network}' for the VM's NIC"));
    }
    if host.memory_free < vm.memory {
        return Err(format!(
            "{} MiB of VM memory free, the VM needs {} MiB",
            host.memory_free >> 20,
            vm.memory >> 20
        ));
    }
    let shared = |disk: &DiskNeeds| {
        host.datastores
            .iter()
            .any(|d| d.name == disk.datastore && d.identity == disk.identity)
    };
    let Some(unshared) = vm.disks.iter().find(|d| !shared(d)) else {
        return Ok(Move::ComputeOnly);
    };
    let Some(target) = datastore else {
        return Err(format!(
            "does not share datastore '{}' and no datastore to move disks to was named",
            unshared.datastore
        ));
    };
    let Some(store) = host.datastores.iter().find(|d| d.name == target) else {
        return Err(format!("no datastore '{target}' to move the disks to"));
    };
    let needed = allocated(vm) + STORAGE_MARGIN;
    if store.free_bytes < needed {
        return Err(format!(
            "datastore '{target}' has {} MiB free, the disks need {} MiB",
            store.free_bytes >> 20,
            needed >> 20
        ));
    }
    Ok(Move::WithStorage {
        datastore: target.into(),
    })
}

/// The order an evacuation starts migrations in: largest memory first, then by name.
///
/// Why largest first: the evacuation ends when its last migration ends, and with several
/// running at once the longest job started last is what stretches the end (longest
/// processing time first, the classic rule for finishing a set of jobs on parallel
/// machines soonest). A VM's time is about its memory over the link, so memory is the
/// estimate.
pub fn evacuation_order(vms: &mut [VmNeeds]) {
    vms.sort_by(|a, b| b.memory.cmp(&a.memory).then_with(|| a.name.cmp(&b.name)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn cpu_with_all() -> CpuFeatures {
        // Every feature bit set: a host that offers everything.
        let entries: Vec<_> = [1u32, 7, 0x8000_0001]
            .iter()
            .map(|&function| kvm_bindings::kvm_cpuid_entry2 {
                function,
                eax: u32::MAX,
                ebx: u32::MAX,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            })
            .collect();
        CpuFeatures::from_cpuid(&entries)
    }

    fn host(name: &str, free_mib: u64) -> HostFacts {
        HostFacts {
            name: name.into(),
            memory_free: free_mib * MIB,
            cpu: cpu_with_all(),
            networks: vec!["vmnet".into()],
            bridged: vec!["vmnet".into()],
            datastores: vec![DatastoreFacts {
                name: "shared".into(),
                identity: "id-shared".into(),
                free_bytes: 10 << 30,
            }],
            maintenance: false,
            max_concurrent: 2,
            active_migrations: 0,
        }
    }

    fn vm(name: &str, mib: u64) -> VmNeeds {
        VmNeeds {
            name: name.into(),
            memory: mib * MIB,
            cpu: CpuFeatures::default(),
            networks: vec!["vmnet".into()],
            nics: Vec::new(),
            disks: Vec::new(),
        }
    }

    fn to(decision: &Decision) -> &str {
        &decision.as_ref().expect("placed").to
    }

    #[test]
    fn load_spreads_by_free_memory() {
        let hosts = [host("alpha", 4096), host("beta", 1024), host("gamma", 1024)];
        let mut vms = vec![vm("a", 512), vm("b", 512), vm("c", 256), vm("d", 256)];
        evacuation_order(&mut vms);
        let placed = place(&vms, &hosts, "alpha", None);
        let names: Vec<_> = placed.iter().map(|(n, d)| (n.as_str(), to(d))).collect();
        // a (512) → beta (tie, name first), b → gamma (now most free), c → beta, d → gamma.
        assert_eq!(
            names,
            [("a", "beta"), ("b", "gamma"), ("c", "beta"), ("d", "gamma")]
        );
    }

    #[test]
    fn ties_go_to_the_first_name() {
        let hosts = [host("zeta", 1024), host("beta", 1024)];
        let placed = place(&[vm("a", 64)], &hosts, "alpha", None);
        assert_eq!(to(&placed[0].1), "beta");
    }

    #[test]
    fn an_incompatible_cpu_is_refused_with_the_missing_features() {
        let mut narrow = host("beta", 1024);
        narrow.cpu = narrow.cpu.clone().without("avx2").expect("known feature");
        let mut needs_avx2 = vm("a", 64);
        needs_avx2.cpu = cpu_with_all();
        let placed = place(
            &[needs_avx2.clone()],
            std::slice::from_ref(&narrow),
            "alpha",
            None,
        );
        let reason = placed[0].1.as_ref().expect_err("no host");
        assert!(
            reason.contains("beta") && reason.contains("avx2"),
            "{reason}"
        );
        // With another host that has it, that one is taken.
        let placed = place(&[needs_avx2], &[narrow, host("gamma", 64)], "alpha", None);
        assert_eq!(to(&placed[0].1), "gamma");
    }

    #[test]
    fn memory_runs_out_as_vms_are_placed() {
        let hosts = [host("beta", 768)];
        let placed = place(&[vm("a", 512), vm("b", 512)], &hosts, "alpha", None);
        assert_eq!(to(&placed[0].1), "beta");
        let reason = placed[1].1.as_ref().expect_err("no room left");
        assert!(reason.contains("256 MiB of VM memory free"), "{reason}");
    }

    #[test]
    fn a_missing_network_or_maintenance_rules_a_host_out() {
        let mut other_net = host("beta", 1024);
        other_net.networks = vec!["dmz".into()];
        let mut resting = host("gamma", 1024);
        resting.maintenance = true;
        let placed = place(&[vm("a", 64)], &[other_net, resting], "alpha", None);
        let reason = placed[0].1.as_ref().expect_err("no host");
        assert!(reason.contains("beta: no network 'vmnet'"), "{reason}");
        assert!(reason.contains("gamma: in maintenance"), "{reason}");
    }

    #[test]
    fn a_vm_with_a_nic_goes_only_where_its_network_has_a_bridge() {
        let mut unbridged = host("beta", 4096);
        unbridged.bridged.clear();
        let bridged = host("gamma", 1024);
        let mut with_nic = vm("a", 64);
        with_nic.nics = vec!["vmnet".into()];
        let placed = place(
            &[with_nic.clone(), vm("b", 64)],
            &[unbridged.clone(), bridged],
            "alpha",
            None,
        );
        assert_eq!(to(&placed[0].1), "gamma", "the NIC needs a bridge");
        assert_eq!(
            to(&placed[1].1),
            "beta",
            "no NIC: the most free memory wins"
        );
        let placed = place(&[with_nic], &[unbridged], "alpha", None);
        let reason = placed[0].1.as_ref().expect_err("no host");
        assert!(
            reason.contains("beta: no bridge on network 'vmnet'"),
            "{reason}"
        );
    }

    #[test]
    fn the_source_is_never_a_destination() {
        let placed = place(&[vm("a", 64)], &[host("alpha", 4096)], "alpha", None);
        assert_eq!(
            placed[0].1.as_ref().expect_err("alone"),
            "no other host in the cluster"
        );
    }

    #[test]
    fn shared_disks_move_compute_only_and_others_need_a_datastore() {
        let mut with_disk = vm("a", 64);
        with_disk.disks = vec![DiskNeeds {
            datastore: "shared".into(),
            identity: "id-shared".into(),
            allocated: 100 * MIB,
        }];
        let placed = place(&[with_disk.clone()], &[host("beta", 1024)], "alpha", None);
        assert_eq!(placed[0].1.as_ref().unwrap().how, Move::ComputeOnly);

        // Same name, other identity: not shared. Without --datastore, not movable.
        let mut lookalike = host("beta", 1024);
        lookalike.datastores[0].identity = "id-other".into();
        let placed = place(&[with_disk.clone()], &[lookalike.clone()], "alpha", None);
        let reason = placed[0].1.as_ref().expect_err("no datastore named");
        assert!(
            reason.contains("does not share datastore 'shared'"),
            "{reason}"
        );

        // Named and present: a storage move; named and absent: refused.
        let placed = place(
            &[with_disk.clone()],
            &[lookalike.clone()],
            "alpha",
            Some("shared"),
        );
        assert_eq!(
            placed[0].1.as_ref().unwrap().how,
            Move::WithStorage {
                datastore: "shared".into()
            }
        );
        let placed = place(
            &[with_disk.clone()],
            &[lookalike.clone()],
            "alpha",
            Some("fast"),
        );
        assert!(
            placed[0]
                .1
                .as_ref()
                .unwrap_err()
                .contains("no datastore 'fast'")
        );

        // Too little room for the images plus the margin.
        lookalike.datastores[0].free_bytes = 100 * MIB;
        let placed = place(&[with_disk], &[lookalike], "alpha", Some("shared"));
        assert!(placed[0].1.as_ref().unwrap_err().contains("100 MiB free"));
    }

    #[test]
    fn compute_only_beats_a_storage_move_with_more_memory() {
        let mut with_disk = vm("a", 64);
        with_disk.disks = vec![DiskNeeds {
            datastore: "shared".into(),
            identity: "id-shared".into(),
            allocated: MIB,
        }];
        let mut roomy = host("beta", 8192);
        roomy.datastores[0].identity = "id-other".into();
        let placed = place(
            &[with_disk],
            &[roomy, host("gamma", 128)],
            "alpha",
            Some("shared"),
        );
        assert_eq!(to(&placed[0].1), "gamma");
    }

    #[test]
    fn largest_first_then_by_name() {
        let mut vms = vec![vm("b", 256), vm("c", 1024), vm("a", 256)];
        evacuation_order(&mut vms);
        let names: Vec<_> = vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
    }
}
