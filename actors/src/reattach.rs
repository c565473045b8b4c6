//! What a starting hostd finds: the VMM processes still serving sockets in its state
//! directory, reconciled with what its journal recorded.
//!
//! - A live VMM whose VM is in the inventory: reattached, as it is (running, paused, stale).
//! - A live VMM with no record: reattached all the same (a VM is never killed for want of
//!   paperwork), and recorded.
//! - A record whose VMM is gone: the VM crashed while hostd was down; it is shown as
//!   `crashed`, never silently forgotten.
//! - A socket nothing answers on: a VMM that died; the file is removed.
//! - A VMM that holds no VM (hostd died while starting it): ended.
//! - An arriving VM whose migration never committed here: discarded (its VMM stopped, its
//!   memory freed). One whose commit is on record: kept, and resumed if it was running.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferry_vmm::{VmmClient, VmmClientError, VmmInfo};

use crate::journal::{Journal, MigrationRecord, Phase, Role, VmRecord, settle};
use crate::settings::HostSettings;

/// A VMM found serving its VM.
#[derive(Debug)]
pub struct LiveVmm {
    /// The connection.
    pub client: VmmClient,
    /// What it reports.
    pub info: VmmInfo,
    /// What the inventory says, if it knows the VM.
    pub record: Option<VmRecord>,
}

/// Everything a starting hostd must act on.
#[derive(Debug, Default)]
pub struct Found {
    /// VMs to reattach.
    pub live: Vec<LiveVmm>,
    /// VMs whose VMM is gone.
    pub crashed: Vec<VmRecord>,
    /// Migration records settled, with what they became.
    pub settled: Vec<MigrationRecord>,
    /// Source-side migrations whose commit went out: the destination must be asked.
    pub in_doubt: Vec<MigrationRecord>,
    /// Arrived VMs whose commit is on record but which were not running yet: resume them.
    pub resume: Vec<String>,
    /// What was cleaned up, in words, for the log.
    pub notes: Vec<String>,
}

fn sockets(settings: &HostSettings) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(settings.vmm_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    found.sort();
    found
}

/// Looks at the state directory and the journal; changes only what must change (stale
/// sockets, empty VMMs, discarded arrivals, settled records).
pub fn discover(settings: &HostSettings, journal: &Journal) -> Result<Found, String> {
    let report = |e: crate::journal::JournalError| ferry_transport::report(&e);
    let mut found = Found::default();
    let mut records: BTreeMap<String, VmRecord> = journal
        .vms()
        .map_err(report)?
        .into_iter()
        .map(|r| (r.info.name.clone(), r))
        .collect();
    // The latest migration of each VM: open ones must be settled, and an arrival that ran
    // here is lost if its VM is still expected here but its VMM is gone.
    let mut open: BTreeMap<String, MigrationRecord> = BTreeMap::new();
    let mut latest = journal.migrations().map_err(report)?;
    latest.sort_by_key(|r| r.updated_unix_ms);
    for record in latest {
        let arrived_here = record.role == Role::Destination && record.phase == Phase::Resumed;
        if record.phase.is_open() || (arrived_here && records.contains_key(&record.vm)) {
            open.insert(record.vm.clone(), record);
        } else {
            open.remove(&record.vm);
        }
    }
    let mut alive: BTreeMap<String, LiveVmm> = BTreeMap::new();
    // All sockets at once: a VMM answers when its thread gets a CPU, which among many busy
    // guests takes a while; asked one after another, twenty of them took half a second.
    let sockets = sockets(settings);
    let answers: Vec<_> = std::thread::scope(|scope| {
        let asking: Vec<_> = sockets
            .iter()
            .map(|socket| {
                scope.spawn(move || {
                    let ask = || {
                        VmmClient::connect(socket).and_then(|mut client| {
                            let info =
                                client.process().has_vm.then(|| client.info()).transpose()?;
                            Ok((client, info))
                        })
                    };
                    // A VMM that is still dying can accept a connection and then reset it:
                    // ask again until the answer is a clear yes or no.
                    let mut answer = ask();
                    for _ in 0..5 {
                        match &answer {
                            Err(VmmClientError::Io { .. }) => {
                                std::thread::sleep(std::time::Duration::from_millis(50));
                                answer = ask();
                            }
                            _ => break,
                        }
                    }
                    answer
                })
            })
            .collect();
        asking
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(VmmClientError::Refused(ferry_vmm::protocol::VmmError::new(
                        ferry_vmm::protocol::VmmErrorKind::InvalidState,
                        "asking the VMM panicked",
                    )))
                })
            })
            .collect()
    });
    for (socket, answer) in sockets.into_iter().zip(answers) {
        match answer {
            Ok((client, None)) => {
                found.notes.push(format!(
                    "ended VMM process {} at {}: it never got a VM",
                    client.process().pid,
                    socket.display()
                ));
                let _ = client.shutdown();
            }
            Ok((client, Some(info))) => {
                let name = info.identity.name.clone();
                let record = records
                    .remove(&name)
                    .filter(|r| r.info.uuid == info.identity.uuid.to_string());
                alive.insert(
                    name,
                    LiveVmm {
                        client,
                        info,
                        record,
                    },
                );
            }
            Err(VmmClientError::Connect { .. }) => {
                found.notes.push(format!(
                    "removed {}: no VMM process serves it any more",
                    socket.display()
                ));
                let _ = std::fs::remove_file(&socket);
            }
            Err(e) => found.notes.push(format!(
                "VMM at {} cannot be reattached: {}",
                socket.display(),
                ferry_transport::report(&e)
            )),
        }
    }
    // Migrations left open: settle them by whether their VM's VMM is still here.
    for (name, record) in open {
        let live = alive.contains_key(&name);
        if record.phase == Phase::Resumed && live {
            continue;
        }
        match (record.role, settle(&record, live)) {
            (Role::Destination, Some(Phase::Discarded)) => {
                if let Some(vmm) = alive.remove(&name) {
                    found.notes.push(format!(
                        "discarded the arriving VM '{name}' of migration {}: it was never committed here",
                        record.id
                    ));
                    let _ = vmm.client.shutdown();
                }
                // A storage migration's partial images go with the arrival.
                for image in &record.created_images {
                    match std::fs::remove_file(image) {
                        Ok(()) => found.notes.push(format!(
                            "removed {} of discarded migration {}",
                            image.display(),
                            record.id
                        )),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => found.notes.push(format!(
                            "cannot remove {} of discarded migration {}: {e}",
                            image.display(),
                            record.id
                        )),
                    }
                }
                found.settled.push(record.with_phase(Phase::Discarded));
            }
            (_, Some(phase)) => {
                if record.role == Role::Destination
                    && record.phase == Phase::Committed
                    && phase == Phase::Resumed
                    && record.was_running
                {
                    found.resume.push(name.clone());
                }
                found.settled.push(record.with_phase(phase));
            }
            (Role::Source, None) => found.in_doubt.push(record),
            (Role::Destination, None) => {}
        }
    }
    for record in &found.settled {
        journal.record(record).map_err(report)?;
    }
    found.live = alive.into_values().collect();
    found.crashed = records.into_values().collect();
    Ok(found)
}
