//! What a run prints: a summary per scenario as it ends, one table for the whole run, and
//! the same figures as JSON.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::Kills;
use crate::ledger::Figures;

/// Under agent churn the p99 should stay within a few heartbeat intervals: a lost node is
/// judged offline 2.5 intervals after its last heartbeat, and its work should move then.
const P99_TARGET_HEARTBEATS: u32 = 4;

/// Work the cluster still held when the drain ended (or when it was last looked at).
#[derive(Clone, Debug, Default)]
pub struct Pending {
    pub submissions: u64,
    pub dispatches: u64,
    pub results: u64,
    pub error: Option<String>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.submissions == 0 && self.dispatches == 0 && self.results == 0 && self.error.is_none()
    }
}

/// Everything one scenario produced.
#[derive(Debug)]
pub struct ScenarioReport {
    pub scenario: &'static str,
    pub figures: Figures,
    pub kills: Kills,
    pub unexpected_exits: Vec<String>,
    pub drained_in: Duration,
    /// Whether every acknowledged task's handle had ended when the drain ended.
    pub settled: bool,
    pub pending: Pending,
    /// The scenario's directory: logs/, events.log, store/.
    pub dir: PathBuf,
}

impl ScenarioReport {
    /// Whether the p99 met its target, for the scenario that has one: agent churn alone.
    pub fn p99_target(&self, heartbeat: Duration) -> Option<bool> {
        (self.scenario == "agents")
            .then(|| self.figures.latency.p99 <= heartbeat * P99_TARGET_HEARTBEATS)
    }

    /// A few lines for the console as the scenario ends.
    pub fn summary(&self) -> String {
        let f = &self.figures;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "apiary-chaos: [{}] {} submitted, {} acknowledged, {} results; lost {}, stored but \
             not delivered {}, wrong output {}, duplicates on the wire {}, through the SDK {}; \
             p50 {} ms, p99 {} ms, max {} ms; drain {:.1} s{}",
            self.scenario,
            f.submitted,
            f.acked,
            f.results,
            f.lost,
            f.stored_not_delivered,
            f.wrong_output,
            f.wire_duplicates,
            sdk_duplicates(f),
            ms(f.latency.p50),
            ms(f.latency.p99),
            ms(f.latency.max),
            self.drained_in.as_secs_f64(),
            if self.pending.is_empty() && self.settled {
                " (quiet)"
            } else {
                " (ran out)"
            },
        );
        let _ = writeln!(out, "  outcomes: {}", join_counts(&f.outcomes));
        let _ = writeln!(out, "  results by node: {}", join_counts(&f.by_node));
        if !f.slowest.is_empty() {
            let _ = writeln!(out, "  slowest: {}", f.slowest.join(", "));
        }
        let _ = writeln!(
            out,
            "  chaos: {} agent kills, {} replica kills, {} server kills; {} unexpected exits{}",
            self.kills.agents,
            self.kills.schedulers,
            self.kills.server,
            self.unexpected_exits.len(),
            if self.unexpected_exits.is_empty() {
                String::new()
            } else {
                format!(": {}", self.unexpected_exits.join("; "))
            }
        );
        if f.submit_failed > 0 || f.wire_unacked > 0 {
            let _ = writeln!(
                out,
                "  submits that failed: {} ({} of them ran anyway: their results reached the inbox)",
                f.submit_failed, f.wire_unacked
            );
        }
        if f.completed_twice_stored > 0 {
            let _ = writeln!(
                out,
                "  tasks with more than one completed attempt stored: {}",
                f.completed_twice_stored
            );
        }
        if !f.lost_examples.is_empty() {
            let _ = writeln!(
                out,
                "  tasks without a result (first {}): {}",
                f.lost_examples.len(),
                f.lost_examples.join(", ")
            );
        }
        if !self.pending.is_empty() {
            let _ = writeln!(
                out,
                "  still outstanding when the drain ended: {} submissions, {} dispatches, {} \
                 results{}",
                self.pending.submissions,
                self.pending.dispatches,
                self.pending.results,
                self.pending
                    .error
                    .as_deref()
                    .map(|err| format!(" (last look failed: {err})"))
                    .unwrap_or_default()
            );
        }
        let _ = write!(
            out,
            "  verdict: {}; logs in {}",
            verdict(f),
            self.dir.join("logs").display()
        );
        out
    }
}

/// The table of the whole run: one row per scenario.
pub fn table(reports: &[ScenarioReport], heartbeat: Duration) -> String {
    let header = [
        "scenario",
        "submitted",
        "acked",
        "results",
        "dup wire",
        "dup sdk",
        "stored",
        "stored !deliv",
        "lost",
        "wrong",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p99 target",
        "kills a/s/n",
        "exits",
        "outcomes",
        "verdict",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let f = &r.figures;
            vec![
                r.scenario.to_owned(),
                f.submitted.to_string(),
                f.acked.to_string(),
                f.results.to_string(),
                format!(
                    "{} ({} same)",
                    f.wire_duplicates, f.wire_duplicates_same_attempt
                ),
                sdk_duplicates(f),
                f.stored_results.to_string(),
                f.stored_not_delivered.to_string(),
                f.lost.to_string(),
                f.wrong_output.to_string(),
                ms(f.latency.p50).to_string(),
                ms(f.latency.p99).to_string(),
                ms(f.latency.max).to_string(),
                r.p99_target(heartbeat)
                    .map_or("-", |met| if met { "met" } else { "MISSED" })
                    .to_owned(),
                format!(
                    "{}/{}/{}",
                    r.kills.agents, r.kills.schedulers, r.kills.server
                ),
                r.unexpected_exits.len().to_string(),
                join_counts(&f.outcomes),
                verdict(f).to_owned(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, width))| {
                // Names and lists read left-aligned; numbers right-aligned.
                if i == 0 || i >= 16 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let _ = writeln!(out, "{}", line(&header));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    let target = heartbeat * P99_TARGET_HEARTBEATS;
    let _ = write!(
        out,
        "targets: 0 lost (lost + stored !deliv), 0 wrong, 0 tasks an SDK user sees complete \
         twice (repeats the SDK dropped are counted under dup sdk, not failed); p99 under agent churn within {P99_TARGET_HEARTBEATS} heartbeat \
         intervals = {} ms (printed, not enforced)",
        ms(target)
    );
    out
}

/// The same figures as the table, and a few more, as JSON.
pub fn json(
    reports: &[ScenarioReport],
    settings: &serde_json::Value,
    heartbeat: Duration,
) -> serde_json::Value {
    let scenarios: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let f = &r.figures;
            serde_json::json!({
                "scenario": r.scenario,
                "passed": f.passed(),
                "submitted": f.submitted,
                "acknowledged": f.acked,
                "submit_failed": f.submit_failed,
                "results_unique": f.results,
                "wire_tasks": f.wire_tasks,
                "duplicates_wire": f.wire_duplicates,
                "duplicates_wire_same_attempt": f.wire_duplicates_same_attempt,
                "duplicates_sdk": f.sdk_duplicates,
                "stored_results": f.stored_results,
                "stored_results_in_stream": f.stored_in_stream,
                "stored_tasks": f.stored_tasks,
                "completed_twice_stored": f.completed_twice_stored,
                "stored_not_delivered": f.stored_not_delivered,
                "lost": f.lost,
                "lost_to_sdk": f.lost_to_sdk(),
                "lost_examples": f.lost_examples,
                "slowest": f.slowest,
                "sdk_errors": f.sdk_errors,
                "wrong_output": f.wrong_output,
                "results_of_failed_submits": f.wire_unacked,
                "outcomes": f.outcomes,
                "results_by_node": f.by_node,
                "latency_ms": {
                    "p50": ms(f.latency.p50),
                    "p99": ms(f.latency.p99),
                    "max": ms(f.latency.max),
                },
                "p99_target_ms": r.p99_target(heartbeat).map(|_| ms(heartbeat * P99_TARGET_HEARTBEATS)),
                "p99_target_met": r.p99_target(heartbeat),
                "timeline": f.timeline.iter().map(|s| serde_json::json!({
                    "second": s.second,
                    "submitted": s.submitted,
                    "submit_failed": s.submit_failed,
                    "results": s.results,
                    "without_result": s.without_result,
                    "p50_ms": ms(s.latency.p50),
                    "p99_ms": ms(s.latency.p99),
                    "max_ms": ms(s.latency.max),
                })).collect::<Vec<_>>(),
                "kills": {
                    "agents": r.kills.agents,
                    "schedulers": r.kills.schedulers,
                    "server": r.kills.server,
                },
                "unexpected_exits": r.unexpected_exits,
                "drain_s": r.drained_in.as_secs_f64(),
                "settled": r.settled,
                "outstanding_at_end": {
                    "submissions": r.pending.submissions,
                    "dispatches": r.pending.dispatches,
                    "results": r.pending.results,
                    "error": r.pending.error,
                },
            })
        })
        .collect();
    serde_json::json!({ "settings": settings, "scenarios": scenarios })
}

fn verdict(figures: &Figures) -> &'static str {
    if figures.passed() { "ok" } else { "FAILED" }
}

fn sdk_duplicates(figures: &Figures) -> String {
    figures
        .sdk_duplicates
        .map_or_else(|| "n/a".to_owned(), |count| count.to_string())
}

fn ms(duration: Duration) -> u128 {
    duration.as_millis()
}

fn join_counts(counts: &std::collections::BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
