//! Live migration progress on a terminal, and the final report in words.

use std::io::IsTerminal;
use std::time::Duration;

use ferry_actors::migration::{MigrationReport, Stage};
use ferry_runtime::units::{format_bytes, format_rate};
use indicatif::{ProgressBar, ProgressStyle};

fn stage_name(stage: Option<Stage>) -> &'static str {
    match stage {
        Some(Stage::Verify) => "verify",
        Some(Stage::Prepare) => "prepare",
        Some(Stage::PreCopy) => "pre-copy",
        Some(Stage::StopAndCopy) => "stop-and-copy",
        Some(Stage::SwitchOver) => "switch-over",
        Some(Stage::Completed) => "completed",
        Some(Stage::RolledBack) => "rolled back",
        Some(Stage::Cancelled) => "cancelled",
        Some(Stage::Refused) => "refused",
        Some(Stage::Failed) => "failed",
        Some(Stage::InDoubt) => "in doubt",
        Some(Stage::LostAfterSwitchOver) => "lost after switch-over",
        None => "starting",
    }
}

/// A bar of `width` cells, `done` of `total` filled.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// One line describing where a migration is: in a pre-copy round, a bar of the round with
/// its percent, bytes, rate and ETA.
pub fn progress_line(report: &MigrationReport) -> String {
    let mut line = format!("{:<13}", stage_name(report.stage));
    if report.round > 0 {
        line.push_str(&format!(" round {:>2}", report.round));
    }
    if report.stage == Some(Stage::PreCopy) && report.round_bytes > 0 {
        let percent = report.round_sent_bytes.min(report.round_bytes) as f64 * 100.0
            / report.round_bytes as f64;
        line.push_str(&format!(
            " {} {percent:>3.0}% {:>10} of {:>10}",
            bar(report.round_sent_bytes, report.round_bytes, 20),
            format_bytes(report.round_sent_bytes),
            format_bytes(report.round_bytes),
        ));
    }
    line.push_str(&format!(
        " | sent {:>10} | remaining {:>10} | {:>9}/s",
        format_bytes(report.guest_bytes),
        format_bytes(report.remaining_bytes),
        format_bytes(report.rate_bytes_per_s as u64)
    ));
    if let Some(eta) = report
        .eta_ms
        .filter(|_| report.stage == Some(Stage::PreCopy))
    {
        line.push_str(&format!(" | ETA {eta:>6.0} ms"));
    }
    if report.throttle_pct > 0 {
        line.push_str(&format!(" | throttle {}%", report.throttle_pct));
    }
    line
}

/// Shows progress while a migration runs: a live spinner line on a terminal; otherwise one
/// line per stage or round, so logs show the progression too.
#[derive(Debug)]
pub struct ProgressView {
    bar: Option<ProgressBar>,
    last: std::cell::Cell<(Option<Stage>, u32)>,
}

impl ProgressView {
    /// A view for the migration of `vm` to `to`.
    pub fn new(vm: &str, from: &str, to: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(format!("{vm} {from} → {to}:"));
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        ProgressView {
            bar,
            last: std::cell::Cell::new((None, 0)),
        }
    }

    /// Shows `report`.
    pub fn update(&self, report: &MigrationReport) {
        match &self.bar {
            Some(bar) => bar.set_message(progress_line(report)),
            None => {
                let now = (report.stage, report.round);
                if now != self.last.get() && !report.is_final() {
                    self.last.set(now);
                    eprintln!("  {}", progress_line(report));
                }
            }
        }
    }

    /// Removes the line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The final report in words.
pub fn describe(report: &MigrationReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "migration of {} from {} to {}: {}\n",
        report.vm, report.source, report.destination, report.status
    ));
    if let Some(error) = &report.error {
        out.push_str(&format!("  error:       {error}\n"));
    }
    if let Some(transport) = &report.transport {
        out.push_str(&format!(
            "  transport:   {transport} ({})\n",
            report.transport_reason.as_deref().unwrap_or("")
        ));
    }
    if let Some(link) = &report.rdma_link {
        out.push_str(&format!("  rdma link:   {link}\n"));
    }
    if let Some(encryption) = &report.encryption {
        out.push_str(&format!("  encryption:  {encryption}\n"));
    }
    if let Some(control) = &report.control_channel {
        out.push_str(&format!("  control:     {control}\n"));
    }
    if let Some(storage) = &report.storage {
        let what = match storage.as_str() {
            "shared" => "shared (compute only: the disks stay on the shared datastore)",
            "none" => "none (the VM has no disks)",
            other => other,
        };
        out.push_str(&format!("  storage:     {what}\n"));
        if !report.disks.is_empty() {
            out.push_str(&format!("  disks:       {}\n", report.disks.join(", ")));
        }
        if report.disk_bytes > 0 {
            out.push_str(&format!(
                "  disk copy:   {} of blocks ({} of them with the guest paused)\n",
                format_bytes(report.disk_bytes),
                format_bytes(report.disk_final_bytes)
            ));
        }
        for copy in &report.disk_copies {
            out.push_str(&format!(
                "  disk {} → {}: {} of {} allocated, {} on the wire, {} zero blocks, {} round{}, {:.0} ms (workers {:.0} ms); {} with the guest paused\n",
                copy.disk,
                copy.target,
                format_bytes(copy.bytes),
                format_bytes(copy.allocated),
                format_bytes(copy.wire_bytes),
                copy.zero_blocks,
                copy.rounds,
                if copy.rounds == 1 { "" } else { "s" },
                copy.time_ms,
                copy.busy_ms,
                format_bytes(copy.final_bytes),
            ));
        }
    }
    if let Some(rate) = report.max_bandwidth {
        out.push_str(&format!("  bandwidth:   capped at {}\n", format_rate(rate)));
    }
    out.push_str(&format!("  total:       {:.0} ms\n", report.total_ms));
    if let Some(downtime) = report.downtime_ms {
        if report.status == "completed" {
            out.push_str(&format!(
                "  downtime:    {downtime:.1} ms (guest paused on the source until it runs on the destination"
            ));
            if let Some(source) = report.source_downtime_ms {
                out.push_str(&format!("; all data sent after {source:.1} ms"));
            }
            out.push_str(")\n");
        } else if downtime > 0.0 {
            out.push_str(&format!("  downtime:    {downtime:.1} ms (guest paused)\n"));
        } else {
            out.push_str("  downtime:    none (the guest kept running)\n");
        }
    }
    for (i, round) in report.rounds.iter().enumerate() {
        out.push_str(&format!(
            "  round {:>2}:    {:>8} pages  {:>10}  {:>8.1} ms\n",
            i + 1,
            round.pages,
            format_bytes(round.bytes),
            round.duration_ms
        ));
    }
    if report.final_pages > 0 || report.status == "completed" {
        out.push_str(&format!(
            "  final copy:  {:>8} pages (guest paused)\n",
            report.final_pages
        ));
    }
    out.push_str(&format!(
        "  moved:       {} of guest memory as {} on the wire ({} zero pages as markers)\n",
        format_bytes(report.guest_bytes),
        format_bytes(report.wire_bytes),
        report.zero_pages
    ));
    if report.throttle_pct > 0 {
        out.push_str(&format!("  throttle:    up to {}%\n", report.throttle_pct));
    }
    if let Some(verified) = report.memory_verified {
        out.push_str(&format!(
            "  verify:      memory hashes {}\n",
            if verified { "match" } else { "differ" }
        ));
    }
    out
}

/// The JSON object `ferryctl migrate --json` prints.
pub fn report_json(report: &MigrationReport) -> serde_json::Value {
    serde_json::json!({
        "id": report.id,
        "vm": report.vm,
        "status": report.status,
        "error": report.error,
        "source": report.source,
        "destination": report.destination,
        "transport": report.transport,
        "transport_reason": report.transport_reason,
        "encryption": report.encryption,
        "control_channel": report.control_channel,
        "streams": report.streams,
        "protocol_version": report.protocol_version,
        "control_rtt_ms": report.control_rtt_ms,
        "max_bandwidth": report.max_bandwidth,
        "total_ms": report.total_ms,
        "downtime_ms": report.downtime_ms,
        "source_downtime_ms": report.source_downtime_ms,
        "rounds": report.rounds,
        "final_pages": report.final_pages,
        "guest_bytes": report.guest_bytes,
        "wire_bytes": report.wire_bytes,
        "zero_pages": report.zero_pages,
        "throttle_pct": report.throttle_pct,
        "memory_verified": report.memory_verified,
        "state_bytes": report.state_bytes,
        "storage": report.storage,
        "disks": report.disks,
        "disk_bytes": report.disk_bytes,
        "disk_final_bytes": report.disk_final_bytes,
        "disk_copies": report.disk_copies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_in_progress_shows_a_bar_with_its_share() {
        let report = MigrationReport {
            stage: Some(Stage::PreCopy),
            round: 1,
            round_bytes: 400 << 20,
            round_sent_bytes: 100 << 20,
            remaining_bytes: 300 << 20,
            rate_bytes_per_s: 100.0 * 1048576.0,
            eta_ms: Some(3000.0),
            ..Default::default()
        };
        let line = progress_line(&report);
        assert!(
            line.contains("round  1 [#####---------------]  25%"),
            "{line}"
        );
        assert!(line.contains("remaining"), "{line}");
        assert!(line.contains("ETA   3000 ms"), "{line}");
        // No bar outside pre-copy.
        let line = progress_line(&MigrationReport {
            stage: Some(Stage::SwitchOver),
            ..report
        });
        assert!(!line.contains('['), "{line}");
    }

    #[test]
    fn the_words_name_the_rdma_link_when_there_is_one() {
        let mut report = MigrationReport {
            vm: "web".into(),
            source: "alpha".into(),
            destination: "beta".into(),
            status: "completed".into(),
            transport: Some("rdma".into()),
            transport_reason: Some("RDMA over 2 streams: rxe0 port 1 on source and rxe1 port 1 on destination are active (Ethernet)".into()),
            ..Default::default()
        };
        assert!(!describe(&report).contains("rdma link"));
        report.rdma_link = Some(ferry_transport::rdma::LinkInfo {
            device: "rxe0".into(),
            port: 1,
            gid: "::ffff:10.0.0.1".into(),
            mtu: 1024,
        });
        let words = describe(&report);
        assert!(
            words.contains("  transport:   rdma (RDMA over 2 streams"),
            "{words}"
        );
        assert!(
            words.contains("  rdma link:   rxe0 port 1 gid ::ffff:10.0.0.1 mtu 1024\n"),
            "{words}"
        );
    }
}
