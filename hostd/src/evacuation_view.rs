//! An evacuation on a terminal: one bar for the whole evacuation (VMs done out of total,
//! bytes, rate, ETA) and a line per VM in flight; without a terminal, a line per change.
//! Then the final table, or one JSON object.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use ferry_actors::evacuation::{EvacuatedVm, EvacuationReport, VmOutcome};
use ferry_actors::placement::Move;
use ferry_runtime::units::format_bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::progress::progress_line;

/// The headline: VMs done of total, bytes, rate and ETA.
pub fn summary_line(report: &EvacuationReport) -> String {
    let mut line = format!(
        "{}/{} VMs done ({} moved, {} stayed) | sent {} of ~{} | {}/s",
        report.moved + report.stayed,
        report.total,
        report.moved,
        report.stayed,
        format_bytes(report.bytes_sent),
        format_bytes(report.bytes_planned),
        format_bytes(report.rate_bytes_per_s as u64),
    );
    if let Some(cap) = report.total_bandwidth {
        line.push_str(&format!(" (cap {}/s shared)", format_bytes(cap)));
    }
    if let Some(eta) = report.eta_ms {
        line.push_str(&format!(" | ETA {:.1} s", eta / 1e3));
    }
    line
}

fn how(vm: &EvacuatedVm) -> &str {
    match &vm.how {
        Some(Move::ComputeOnly) => "compute",
        Some(Move::WithStorage { .. }) => "compute+storage",
        None => "-",
    }
}

/// Follows an evacuation's reports.
#[derive(Debug)]
pub struct EvacuationView {
    bars: Option<(MultiProgress, ProgressBar, BTreeMap<String, ProgressBar>)>,
    last: std::cell::RefCell<String>,
}

impl EvacuationView {
    /// A view of `host`'s evacuation.
    pub fn new(host: &str) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let head = multi.add(ProgressBar::new(1));
            head.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            head.set_prefix(format!("evacuating {host}:"));
            head.enable_steady_tick(Duration::from_millis(200));
            (multi, head, BTreeMap::new())
        });
        EvacuationView {
            bars,
            last: std::cell::RefCell::new(String::new()),
        }
    }

    /// Shows `report`.
    pub fn update(&mut self, report: &EvacuationReport) {
        let Some((multi, head, lines)) = &mut self.bars else {
            let now = summary_line_without_rate(report);
            if *self.last.borrow() != now {
                eprintln!("  {now}");
                *self.last.borrow_mut() = now;
            }
            return;
        };
        head.set_length(report.total.max(1) as u64);
        head.set_position((report.moved + report.stayed) as u64);
        head.set_message(summary_line(report));
        let flying: BTreeMap<&str, &EvacuatedVm> = report
            .vms
            .iter()
            .filter(|v| v.outcome == VmOutcome::Migrating)
            .map(|v| (v.name.as_str(), v))
            .collect();
        lines.retain(|name, bar| {
            let keep = flying.contains_key(name.as_str());
            if !keep {
                bar.finish_and_clear();
                multi.remove(bar);
            }
            keep
        });
        for (name, vm) in flying {
            let bar = lines.entry(name.to_string()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {prefix} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(format!("{name} → {}:", vm.to.as_deref().unwrap_or("?")));
                bar.enable_steady_tick(Duration::from_millis(100));
                bar
            });
            if let Some(migration) = &vm.migration {
                bar.set_message(progress_line(migration));
            }
        }
    }

    /// Removes the lines.
    pub fn finish(&mut self) {
        if let Some((_, head, lines)) = &self.bars {
            for bar in lines.values() {
                bar.finish_and_clear();
            }
            head.finish_and_clear();
        }
    }
}

/// Without a terminal a line per change of the counts (rates change every poll).
fn summary_line_without_rate(report: &EvacuationReport) -> String {
    let flying: Vec<String> = report
        .vms
        .iter()
        .filter(|v| v.outcome == VmOutcome::Migrating)
        .map(|v| format!("{} → {}", v.name, v.to.as_deref().unwrap_or("?")))
        .collect();
    format!(
        "{}/{} VMs done ({} moved, {} stayed); migrating: {}",
        report.moved + report.stayed,
        report.total,
        report.moved,
        report.stayed,
        if flying.is_empty() {
            "-".into()
        } else {
            flying.join(", ")
        }
    )
}

/// The final report in words: a table of every VM.
pub fn describe(report: &EvacuationReport) -> String {
    let mut out = format!(
        "evacuation of {}: {} of {} VMs moved, {} stayed, in {:.1} s ({} sent)\n",
        report.host,
        report.moved,
        report.total,
        report.stayed,
        report.elapsed_ms / 1e3,
        format_bytes(report.bytes_sent)
    );
    out.push_str(&format!(
        "{:<20} {:<8} {:<10} {:<16} {:>10} {:>9} {:>10}  {}\n",
        "VM", "OUTCOME", "TO", "MOVE", "MEMORY", "TOTAL", "DOWNTIME", "REASON"
    ));
    for vm in &report.vms {
        let outcome = match vm.outcome {
            VmOutcome::Moved => "moved",
            VmOutcome::Stayed => "stayed",
            VmOutcome::Migrating => "moving",
            VmOutcome::Queued => "queued",
        };
        let total = vm
            .migration
            .as_ref()
            .filter(|_| vm.outcome == VmOutcome::Moved)
            .map_or("-".into(), |m| format!("{:.0} ms", m.total_ms));
        let downtime = vm
            .migration
            .as_ref()
            .and_then(|m| m.downtime_ms)
            .filter(|_| vm.outcome == VmOutcome::Moved)
            .map_or("-".into(), |d| format!("{d:.1} ms"));
        out.push_str(&format!(
            "{:<20} {:<8} {:<10} {:<16} {:>10} {:>9} {:>10}  {}\n",
            vm.name,
            outcome,
            vm.to.as_deref().unwrap_or("-"),
            how(vm),
            format_bytes(vm.memory),
            total,
            downtime,
            vm.reason.as_deref().unwrap_or("")
        ));
    }
    for host in &report.unreachable {
        out.push_str(&format!("unreachable: {host}\n"));
    }
    out
}

/// The final report as JSON: each VM with its destination, outcome and figures.
pub fn report_json(report: &EvacuationReport) -> serde_json::Value {
    let vms: Vec<serde_json::Value> = report
        .vms
        .iter()
        .map(|vm| {
            let m = vm.migration.as_ref();
            serde_json::json!({
                "name": vm.name,
                "memory": vm.memory,
                "outcome": vm.outcome,
                "to": vm.to,
                "move": vm.how,
                "reason": vm.reason,
                "migration": m.map(|m| m.id.clone()),
                "total_ms": m.map(|m| m.total_ms),
                "downtime_ms": m.and_then(|m| m.downtime_ms),
                "guest_bytes": m.map(|m| m.guest_bytes),
                "wire_bytes": m.map(|m| m.wire_bytes),
                "rounds": m.map(|m| m.rounds.len()),
            })
        })
        .collect();
    serde_json::json!({
        "host": report.host,
        "total": report.total,
        "moved": report.moved,
        "stayed": report.stayed,
        "elapsed_ms": report.elapsed_ms,
        "bytes_sent": report.bytes_sent,
        "total_bandwidth": report.total_bandwidth,
        "unreachable": report.unreachable,
        "vms": vms,
    })
}
