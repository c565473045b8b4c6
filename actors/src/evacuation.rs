//! Evacuation: the actor that moves every VM off a host entering maintenance.
//!
//! It asks every other host what it can take (`Describe` over the control channel), places
//! the VMs with [`placement::place`], and starts their migrations through the host actor
//! (so every check of an ordinary migration applies), largest first, keeping at most the
//! source's `max_concurrent` in flight and at most each destination's. It watches them
//! through the host actor's migration reports and publishes one [`EvacuationReport`] for
//! the whole evacuation after every change. A VM that cannot be placed, or whose migration
//! does not complete, stays where it is, with its reason; the others carry on. With a
//! `total_bandwidth`, every migration it starts shares one cap (a [`SharedCap`] in its
//! options): together they never put more than that on the wire, and when one ends the
//! others take its share at once.
//!
//! [`SharedCap`]: ferry_transport::data::SharedCap

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use ferry_transport::control::{ClientTls, ControlChannel};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::control_server::control_config;
use crate::host_actor::{ErrorKind, EvacuationUpdate, GetMigration, HostActor, StartMigration};
use crate::migration::protocol::{ToDestination, ToSource};
use crate::migration::{MigrationOptions, MigrationReport, Stage};
use crate::placement::{self, HostFacts, Move, Placed, VmNeeds};
use crate::settings::HostSettings;

/// How often in-flight migrations are looked at.
const POLL: Duration = Duration::from_millis(200);
/// Times a VM's migration is tried when it is refused before anything moved (a host's
/// limit reached a moment early, facts changed since placement), and the pause before
/// the next try (times the try's number).
const ATTEMPTS: u32 = 4;
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where one VM of an evacuation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmOutcome {
    /// Placed; waiting for a free slot.
    Queued,
    /// Its migration runs.
    Migrating,
    /// It runs on its destination.
    Moved,
    /// It is still on this host (see the reason).
    Stayed,
}

/// One VM of an evacuation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvacuatedVm {
    /// Name.
    pub name: String,
    /// Memory, bytes.
    pub memory: u64,
    /// Destination, once placed.
    pub to: Option<String>,
    /// How it moves, once placed.
    pub how: Option<Move>,
    /// Where it is.
    pub outcome: VmOutcome,
    /// Why it stayed.
    pub reason: Option<String>,
    /// Its migration's latest report.
    pub migration: Option<MigrationReport>,
}

/// The whole evacuation, as the operator follows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvacuationReport {
    /// The host being evacuated.
    pub host: String,
    /// `placing`, `running` or `finished`.
    pub state: String,
    /// VMs to move.
    pub total: usize,
    /// VMs moved.
    pub moved: usize,
    /// VMs that stayed.
    pub stayed: usize,
    /// Guest bytes sent by the evacuation's migrations so far.
    pub bytes_sent: u64,
    /// Guest memory of the VMs placed (what at least has to cross), bytes.
    pub bytes_planned: u64,
    /// Bytes per second since the start.
    pub rate_bytes_per_s: f64,
    /// Time left at that rate.
    pub eta_ms: Option<f64>,
    /// The cap all of its migrations share, bytes per second (`None`: none).
    #[serde(default)]
    pub total_bandwidth: Option<u64>,
    /// Since the start.
    pub elapsed_ms: f64,
    /// Hosts that could not be asked, with why.
    pub unreachable: Vec<String>,
    /// The VMs, in the order they start.
    pub vms: Vec<EvacuatedVm>,
}

impl EvacuationReport {
    /// Whether every VM has moved or stayed.
    pub fn is_finished(&self) -> bool {
        self.state == "finished"
    }
}

/// A VM to evacuate: what placement needs, or why it cannot move at all.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Needs (name and memory are used even when it is not movable).
    pub needs: VmNeeds,
    /// Why it cannot move (crashed, already migrating, ...).
    pub obstacle: Option<String>,
}

/// Tells the evacuation to start nothing more (maintenance ended): queued VMs stay.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopEvacuation;

/// Tells the evacuation that one of this host's outgoing migrations ended: it looks at its
/// migrations at once (instead of at its next poll) and fills the freed slot.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct MigrationEnded;

/// The evacuation of one host.
pub struct Evacuation {
    host: Addr<HostActor>,
    settings: Arc<HostSettings>,
    candidates: Vec<Candidate>,
    datastore: Option<String>,
    options: MigrationOptions,
    report: EvacuationReport,
    queue: VecDeque<usize>,
    in_flight: BTreeMap<usize, String>,
    limits: BTreeMap<String, usize>,
    attempts: BTreeMap<usize, u32>,
    starting: bool,
    began: Instant,
}

impl std::fmt::Debug for Evacuation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evacuation")
            .field("host", &self.report.host)
            .field("state", &self.report.state)
            .finish_non_exhaustive()
    }
}

impl Evacuation {
    /// An evacuation of the host of `settings`; `options` apply to every migration.
    pub fn new(
        host: Addr<HostActor>,
        settings: Arc<HostSettings>,
        mut candidates: Vec<Candidate>,
        (datastore, options): (Option<String>, MigrationOptions),
    ) -> Self {
        candidates.sort_by(|a, b| {
            b.needs
                .memory
                .cmp(&a.needs.memory)
                .then_with(|| a.needs.name.cmp(&b.needs.name))
        });
        let report = EvacuationReport {
            host: settings.name.clone(),
            state: "placing".into(),
            total: candidates.len(),
            moved: 0,
            stayed: 0,
            bytes_sent: 0,
            bytes_planned: 0,
            rate_bytes_per_s: 0.0,
            eta_ms: None,
            total_bandwidth: options.shared_cap.as_ref().map(|cap| cap.rate()),
            elapsed_ms: 0.0,
            unreachable: Vec::new(),
            vms: candidates
                .iter()
                .map(|c| EvacuatedVm {
                    name: c.needs.name.clone(),
                    memory: c.needs.memory,
                    to: None,
                    how: None,
                    outcome: VmOutcome::Queued,
                    reason: None,
                    migration: None,
                })
                .collect(),
        };
        Evacuation {
            host,
            settings,
            candidates,
            datastore,
            options,
            report,
            queue: VecDeque::new(),
            in_flight: BTreeMap::new(),
            limits: BTreeMap::new(),
            attempts: BTreeMap::new(),
            starting: false,
            began: Instant::now(),
        }
    }

    /// The report as it starts.
    pub fn report(&self) -> &EvacuationReport {
        &self.report
    }

    fn publish(&mut self) {
        let r = &mut self.report;
        r.elapsed_ms = self.began.elapsed().as_secs_f64() * 1e3;
        r.moved = count(r, VmOutcome::Moved);
        r.stayed = count(r, VmOutcome::Stayed);
        r.bytes_sent = r
            .vms
            .iter()
            .filter_map(|v| v.migration.as_ref())
            .map(|m| m.guest_bytes)
            .sum();
        let seconds = r.elapsed_ms / 1e3;
        r.rate_bytes_per_s = if seconds > 0.0 {
            r.bytes_sent as f64 / seconds
        } else {
            0.0
        };
        let open = r
            .vms
            .iter()
            .any(|v| matches!(v.outcome, VmOutcome::Queued | VmOutcome::Migrating));
        r.eta_ms = (open && r.rate_bytes_per_s > 0.0).then(|| {
            r.bytes_planned.saturating_sub(r.bytes_sent) as f64 / r.rate_bytes_per_s * 1e3
        });
        if !open && r.state == "running" {
            r.state = "finished".into();
        }
        self.host.do_send(EvacuationUpdate(self.report.clone()));
    }

    fn stay(&mut self, index: usize, reason: String) {
        let vm = &mut self.report.vms[index];
        tracing::warn!(vm = %vm.name, %reason, "evacuation: VM stays on this host");
        vm.outcome = VmOutcome::Stayed;
        vm.reason = Some(reason);
    }

    /// A try of `index` was refused before anything moved: tries again after a pause,
    /// unless it had all its tries; then it stays with `reason`.
    fn refused(&mut self, index: usize, reason: String, ctx: &mut Context<Self>) {
        let tries = self.attempts.entry(index).or_insert(0);
        *tries += 1;
        if *tries >= ATTEMPTS {
            return self.stay(index, reason);
        }
        let pause = RETRY_PAUSE * *tries;
        tracing::info!(vm = %self.report.vms[index].name, %reason, ?pause, "evacuation: migration refused; trying again");
        self.report.vms[index].outcome = VmOutcome::Queued;
        ctx.run_later(pause, move |act, ctx| {
            if act.report.vms[index].outcome == VmOutcome::Queued {
                act.queue.push_front(index);
                act.schedule(ctx);
            }
        });
    }

    fn placed(&mut self, facts: Vec<HostFacts>, unreachable: Vec<String>) {
        let movable: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].obstacle.is_none())
            .collect();
        for (index, candidate) in self.candidates.clone().into_iter().enumerate() {
            if let Some(obstacle) = candidate.obstacle {
                self.stay(index, obstacle);
            }
        }
        let needs: Vec<VmNeeds> = movable
            .iter()
            .map(|&i| self.candidates[i].needs.clone())
            .collect();
        for host in &facts {
            let free = host
                .max_concurrent
                .saturating_sub(host.active_migrations)
                .max(1);
            self.limits.insert(host.name.clone(), free);
        }
        let decisions = placement::place(
            &needs,
            &facts,
            &self.settings.name,
            self.datastore.as_deref(),
        );
        for (&index, (_, decision)) in movable.iter().zip(decisions) {
            match decision {
                Ok(Placed { to, how }) => {
                    let vm = &mut self.report.vms[index];
                    vm.to = Some(to);
                    vm.how = Some(how);
                    self.report.bytes_planned += vm.memory;
                    self.queue.push_back(index);
                }
                Err(reason) if unreachable.is_empty() => self.stay(index, reason),
                Err(reason) => {
                    let reason = format!("{reason}; unreachable: {}", unreachable.join("; "));
                    self.stay(index, reason);
                }
            }
        }
        self.report.unreachable = unreachable;
        self.report.state = "running".into();
        tracing::info!(
            host = %self.settings.name,
            queued = self.queue.len(),
            stayed = self.report.stayed,
            "evacuation placed its VMs"
        );
    }

    /// Starts the next migration that has a free slot on both ends, if any.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if self.starting || self.in_flight.len() >= self.settings.migration.max_concurrent.max(1) {
            return;
        }
        let busy = |to: &str, in_flight: &BTreeMap<usize, String>| {
            in_flight.values().filter(|d| d.as_str() == to).count()
        };
        let next = self.queue.iter().position(|&i| {
            let to = self.report.vms[i].to.as_deref().unwrap_or_default();
            busy(to, &self.in_flight) < self.limits.get(to).copied().unwrap_or(1)
        });
        let Some(position) = next else {
            return;
        };
        let Some(index) = self.queue.remove(position) else {
            return;
        };
        let vm = &self.report.vms[index];
        let to = vm.to.clone().unwrap_or_default();
        let mut options = self.options.clone();
        if let Some(Move::WithStorage { datastore }) = &vm.how {
            options.datastore = Some(datastore.clone());
        }
        let start = StartMigration {
            vm: vm.name.clone(),
            to: to.clone(),
            options,
        };
        self.starting = true;
        ctx.spawn(
            self.host
                .send(start)
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.starting = false;
                    match result {
                        Ok(Ok(report)) => {
                            let vm = &mut act.report.vms[index];
                            vm.outcome = VmOutcome::Migrating;
                            vm.migration = Some(report);
                            act.in_flight.insert(index, to);
                        }
                        Ok(Err(e)) if e.kind == ErrorKind::Conflict => {
                            act.refused(index, format!("migration to {to}: {e}"), ctx);
                        }
                        Ok(Err(e)) => act.stay(index, format!("migration to {to}: {e}")),
                        Err(e) => act.stay(index, format!("migration to {to}: {e}")),
                    }
                    act.publish();
                    act.schedule(ctx);
                }),
        );
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        let watched: Vec<(usize, String)> = self
            .in_flight
            .keys()
            .filter_map(|&i| {
                let id = self.report.vms[i].migration.as_ref()?.id.clone();
                Some((i, id))
            })
            .collect();
        if watched.is_empty() {
            self.publish();
            if self.report.is_finished() {
                ctx.stop();
            }
            return;
        }
        let host = self.host.clone();
        let asks = watched
            .into_iter()
            .map(move |(i, id)| {
                let host = host.clone();
                async move { (i, host.send(GetMigration(id)).await) }
            })
            .collect::<Vec<_>>();
        ctx.wait(join_all(asks).into_actor(self).map(|answers, act, ctx| {
            for (index, answer) in answers {
                let Ok(Ok(report)) = answer else { continue };
                let finished = report.is_final();
                let completed = report.stage == Some(Stage::Completed);
                let error = report.error.clone();
                let stage = report.stage;
                act.report.vms[index].migration = Some(report);
                if finished {
                    act.in_flight.remove(&index);
                    if completed {
                        act.report.vms[index].outcome = VmOutcome::Moved;
                    } else if stage == Some(Stage::Refused) {
                        // Nothing moved (a limit reached, or the destination still holding a
                        // copy an interrupted migration left): try again like a refused start.
                        let why = error.unwrap_or_else(|| "the destination refused".into());
                        act.refused(index, why, ctx);
                    } else {
                        let why = error.unwrap_or_else(|| {
                            format!("the migration ended {}", stage_name(stage))
                        });
                        act.stay(index, why);
                    }
                }
            }
            act.publish();
            act.schedule(ctx);
        }));
    }
}

fn stage_name(stage: Option<Stage>) -> String {
    stage.map_or_else(
        || "without a stage".into(),
        |s| format!("{s:?}").to_lowercase(),
    )
}

fn count(report: &EvacuationReport, outcome: VmOutcome) -> usize {
    report.vms.iter().filter(|v| v.outcome == outcome).count()
}

/// Asks every peer of `settings` what it can take; the answers, and the peers that did not
/// answer, with why.
async fn describe_peers(settings: Arc<HostSettings>) -> (Vec<HostFacts>, Vec<String>) {
    let asks = settings.peers.values().map(|peer| {
        let config = control_config(&settings);
        let tls = ClientTls {
            identity: settings.tls.clone(),
            peer: peer.name.clone(),
            required: settings.tls.is_some(),
        };
        let (name, addr) = (peer.name.clone(), peer.control_addr);
        async move {
            let asked = async {
                let mut channel = ControlChannel::connect_secure(addr, config, &tls).await?;
                channel.send(&ToDestination::Describe).await?;
                channel.recv::<ToSource>().await
            }
            .await;
            match asked {
                Ok(ToSource::Description(facts)) if facts.name == name => Ok(*facts),
                Ok(ToSource::Description(facts)) => {
                    Err(format!("{name}: answered as '{}' from {addr}", facts.name))
                }
                Ok(other) => Err(format!("{name}: answered {other:?}")),
                Err(e) => Err(format!("{name}: {}", ferry_transport::report(&e))),
            }
        }
    });
    let mut facts = Vec::new();
    let mut unreachable = Vec::new();
    for answer in join_all(asks).await {
        match answer {
            Ok(f) => facts.push(f),
            Err(why) => unreachable.push(why),
        }
    }
    (facts, unreachable)
}

impl Actor for Evacuation {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(host = %self.settings.name, vms = self.candidates.len(), "evacuation started");
        self.publish();
        ctx.wait(
            describe_peers(Arc::clone(&self.settings))
                .into_actor(self)
                .map(|(facts, unreachable), act, ctx| {
                    act.placed(facts, unreachable);
                    act.publish();
                    act.schedule(ctx);
                    ctx.run_interval(POLL, |act, ctx| act.poll(ctx));
                }),
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(
            host = %self.settings.name,
            moved = self.report.moved,
            stayed = self.report.stayed,
            elapsed_ms = self.report.elapsed_ms,
            "evacuation finished"
        );
    }
}

impl Handler<StopEvacuation> for Evacuation {
    type Result = ();

    fn handle(&mut self, _: StopEvacuation, _: &mut Self::Context) {
        for index in std::mem::take(&mut self.queue) {
            self.stay(
                index,
                "maintenance mode ended before its migration started".into(),
            );
        }
        self.publish();
    }
}

impl Handler<MigrationEnded> for Evacuation {
    type Result = ();

    fn handle(&mut self, _: MigrationEnded, ctx: &mut Self::Context) {
        if !self.in_flight.is_empty() {
            self.poll(ctx);
        }
    }
}
