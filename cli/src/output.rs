//! How the CLI shows things to people.

use std::time::Duration;

use apiary_proto::admin::TokenInfo;
use apiary_proto::lifecycle::TaskRecord;
use apiary_proto::lifecycle::TaskState;
use apiary_proto::message::NodeStatus;
use apiary_proto::message::NodeSummary;
use comfy_table::presets::NOTHING;
use comfy_table::{Cell, CellAlignment, Color, Table};

/// A table that styles its cells only for a person: comfy-table colours only when stdout is
/// a terminal, and here not even then if `NO_COLOR` is set (no-color.org).
fn new_table() -> Table {
    let mut table = Table::new();
    if std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty()) {
        table.force_no_tty();
    }
    table
}

/// The colour of a node's status: green online, red offline, grey once it has left.
fn status_color(status: NodeStatus) -> Color {
    match status {
        NodeStatus::Online => Color::Green,
        NodeStatus::Offline => Color::Red,
        NodeStatus::Left => Color::DarkGrey,
    }
}

/// The colour of a task's state: green succeeded, red for every failure, yellow cancelled,
/// cyan while it is placed or running, plain while it waits.
fn state_color(state: TaskState) -> Color {
    match state {
        TaskState::Succeeded => Color::Green,
        TaskState::Failed | TaskState::TimedOut | TaskState::Dead => Color::Red,
        TaskState::Cancelled => Color::Yellow,
        TaskState::Scheduled | TaskState::Running => Color::Cyan,
        TaskState::Pending => Color::Reset,
    }
}

/// The node table of `apiary nodes ls`, as of `now_ms`.
/// An error as the one line the CLI prints: each cause after the one before, joined by
/// `: `, leaving out a cause whose words the line already ends with (async-nats's errors
/// repeat their source in their own message, which `{:#}` would print twice).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if line.ends_with(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

pub fn node_table(nodes: &[NodeSummary], now_ms: u64) -> String {
    let mut table = new_table();
    table.load_preset(NOTHING).set_header(vec![
        "NODE",
        "STATUS",
        "SCHEDULING",
        "HOST",
        "ARCH",
        "CORES",
        "MEMORY",
        "GPUS",
        "SLOTS",
        "RUNNING",
        "CPU",
        "LAST SEEN",
        "KEY",
    ]);
    for node in nodes {
        let info = &node.info;
        let metrics = node.metrics.as_ref();
        table.add_row(vec![
            Cell::new(&info.node_id),
            Cell::new(node.status).fg(status_color(node.status)),
            Cell::new(node.scheduling),
            Cell::new(&info.hostname),
            Cell::new(&info.arch),
            Cell::new(info.cpu_cores).set_alignment(CellAlignment::Right),
            Cell::new(iec(info.memory_bytes)).set_alignment(CellAlignment::Right),
            Cell::new(info.inventory.gpus.len()).set_alignment(CellAlignment::Right),
            Cell::new(info.slots).set_alignment(CellAlignment::Right),
            Cell::new(metrics.map_or(0, |m| m.running_tasks)).set_alignment(CellAlignment::Right),
            Cell::new(metrics.map_or_else(|| "-".into(), |m| format!("{:.0}%", m.cpu_percent)))
                .set_alignment(CellAlignment::Right),
            Cell::new(
                node.last_seen_ms
                    .map_or_else(|| "never".into(), |seen| ago(seen, now_ms)),
            ),
            Cell::new(short_key(&info.public_key)),
        ]);
    }
    table.to_string()
}

/// A node key shortened for a table, like a short commit hash: enough to tell nodes apart
/// at a glance; `nodes show` and `--json` give it whole.
fn short_key(key: &str) -> String {
    match key.get(..12) {
        Some(start) if key.len() > 12 => format!("{start}…"),
        _ if key.is_empty() => "-".into(),
        _ => key.to_owned(),
    }
}

/// `apiary nodes show`: one node, field by field.
pub fn node_detail(node: &NodeSummary, now_ms: u64) -> String {
    let info = &node.info;
    let admin = &node.admin;
    let mut lines = vec![
        ("node", info.node_id.to_string()),
        ("status", node.status.to_string()),
        ("scheduling", node.scheduling.to_string()),
        ("public key", or_dash(&info.public_key)),
        ("host", info.hostname.clone()),
        ("os", info.os.clone()),
        ("arch", info.arch.clone()),
        (
            "cpu",
            format!("{} cores, {}", info.cpu_cores, or_dash(&info.cpu_model)),
        ),
        ("memory", iec(info.memory_bytes)),
        ("slots", info.slots.to_string()),
        ("agent", info.agent_version.clone()),
        ("labels", pairs(&admin.effective_labels(&info.labels))),
        ("registered", ago(node.registered_at_ms, now_ms)),
        (
            "last seen",
            node.last_seen_ms
                .map_or_else(|| "never".into(), |seen| ago(seen, now_ms)),
        ),
    ];
    let roles = admin.effective_roles(&info.roles);
    let set_by = if admin.roles.is_some() {
        " (set by the operator)"
    } else {
        ""
    };
    lines.push((
        "roles",
        if roles.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{}{set_by}",
                roles.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        },
    ));
    if let Some(token_id) = &node.token_id {
        lines.push(("joined with", format!("token {token_id}")));
    }
    if let apiary_proto::admin::Schedule::Draining { deadline_ms } = admin.schedule {
        lines.push(("drain deadline", until(deadline_ms, now_ms)));
    }
    if let Some(metrics) = &node.metrics {
        lines.push((
            "load",
            format!(
                "{} of {} slots busy, {} tasks done, CPU {:.0}%, memory {} of {}",
                metrics.running_tasks,
                metrics.slots,
                metrics.tasks_completed,
                metrics.cpu_percent,
                iec(metrics.memory_used_bytes),
                iec(metrics.memory_total_bytes)
            ),
        ));
    }
    let width = lines.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    lines
        .iter()
        .map(|(name, value)| format!("{name:width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The token table of `apiary tokens ls`.
pub fn token_table(tokens: &[TokenInfo], now_ms: u64) -> String {
    let mut table = new_table();
    table.load_preset(NOTHING).set_header(vec![
        "ID",
        "DESCRIPTION",
        "CREATED",
        "EXPIRES",
        "USES LEFT",
        "USED",
        "REVOKED",
    ]);
    for token in tokens {
        table.add_row(vec![
            Cell::new(&token.id),
            Cell::new(or_dash(&token.description)),
            Cell::new(ago(token.created_ms, now_ms)),
            Cell::new(
                token
                    .expires_ms
                    .map_or_else(|| "never".into(), |at| until(at, now_ms)),
            ),
            Cell::new(
                token
                    .uses_left
                    .map_or_else(|| "unlimited".into(), |left| left.to_string()),
            )
            .set_alignment(CellAlignment::Right),
            Cell::new(token.uses).set_alignment(CellAlignment::Right),
            Cell::new(
                token
                    .revoked_ms
                    .map_or_else(|| "no".into(), |at| ago(at, now_ms)),
            ),
        ]);
    }
    table.to_string()
}

/// A plain table of text cells under `header`, for listings with no special columns.
pub fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut table = new_table();
    table.load_preset(NOTHING).set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table.to_string()
}

/// How long ago `then_ms` was, as of `now_ms`, in words (`3m ago`).
pub fn time_ago(then_ms: u64, now_ms: u64) -> String {
    ago(then_ms, now_ms)
}

/// The task table of `apiary task ls`.
pub fn task_table(tasks: &[TaskRecord], now_ms: u64) -> String {
    let mut table = new_table();
    table.load_preset(NOTHING).set_header(vec![
        "TASK",
        "STATE",
        "ATTEMPT",
        "NODE",
        "PRIORITY",
        "SUBMITTED",
        "UPDATED",
        "REASON",
    ]);
    for task in tasks {
        table.add_row(vec![
            Cell::new(&task.id),
            Cell::new(task.state).fg(state_color(task.state)),
            Cell::new(task.attempt).set_alignment(CellAlignment::Right),
            Cell::new(task.node_id.as_ref().map_or("-", |node| node.as_str())),
            Cell::new(format!("{:?}", task.task.priority).to_lowercase()),
            Cell::new(ago(task.submitted_at_ms, now_ms)),
            Cell::new(ago(task.updated_at_ms, now_ms)),
            Cell::new(task.reason.as_deref().unwrap_or("-")),
        ]);
    }
    table.to_string()
}

/// `apiary task status`: one task, field by field, with its history.
pub fn task_detail(task: &TaskRecord, now_ms: u64) -> String {
    let mut lines = vec![
        ("task", task.id.to_string()),
        ("state", task.state.to_string()),
        ("attempt", task.attempt.to_string()),
        (
            "node",
            task.node_id
                .as_ref()
                .map_or("-".into(), ToString::to_string),
        ),
        ("failures", task.failures.to_string()),
        ("module", task.task.module.sha256.clone()),
        (
            "priority",
            format!("{:?}", task.task.priority).to_lowercase(),
        ),
        ("submitted", ago(task.submitted_at_ms, now_ms)),
        ("updated", ago(task.updated_at_ms, now_ms)),
    ];
    if let Some(reason) = &task.reason {
        lines.push(("reason", reason.clone()));
    }
    if let Some(error) = &task.error {
        lines.push(("error", error.to_string()));
    }
    if let Some(code) = task.exit_code {
        lines.push(("exit code", code.to_string()));
    }
    if let Some(at) = task.not_before_ms {
        lines.push(("next attempt", until(at, now_ms)));
    }
    let history = task
        .history
        .iter()
        .map(|step| {
            let node = step
                .node_id
                .as_ref()
                .map_or(String::new(), |node| format!(" on {node}"));
            format!(
                "{} (attempt {}{node}, {})",
                step.state,
                step.attempt,
                ago(step.at_ms, now_ms)
            )
        })
        .collect::<Vec<_>>()
        .join("\n           ");
    lines.push(("history", history));
    lines
        .iter()
        .map(|(name, value)| format!("{name:10} {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

fn iec(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

fn pairs(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `in 5m` for a time ahead, `expired 3s ago` for one past.
fn until(at_ms: u64, now_ms: u64) -> String {
    if at_ms > now_ms {
        let seconds = (at_ms - now_ms).div_ceil(1000);
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(seconds))
        )
    } else {
        format!("passed {}", ago(at_ms, now_ms))
    }
}

/// `3s ago`, rounded to whole seconds.
fn ago(then_ms: u64, now_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(then_ms) / 1000;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(seconds))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        /// An error that, like async-nats's, repeats its source in its own message.
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl std::fmt::Display for Repeats {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "IO error: {}", self.0)
            }
        }
        impl std::error::Error for Repeats {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = anyhow::Error::new(Repeats(io))
            .context("failed to connect to NATS at nats://127.0.0.1:1")
            .context("cannot reach the cluster");
        assert_eq!(
            error_line(&err),
            "cannot reach the cluster: failed to connect to NATS at nats://127.0.0.1:1: \
             IO error: connection refused"
        );
    }
    use apiary_proto::NodeId;
    use apiary_proto::message::{NodeInfo, NodeMetrics, NodeStatus};

    #[test]
    fn the_table_shows_each_node_with_its_status() {
        let node = NodeSummary {
            info: NodeInfo {
                node_id: NodeId::new("pi-1").unwrap(),
                hostname: "pi-1.lan".into(),
                arch: "aarch64".into(),
                os: "linux".into(),
                cpu_cores: 4,
                cpu_model: String::new(),
                memory_bytes: 4 * 1024 * 1024 * 1024,
                slots: 4,
                agent_version: "0.1.0".into(),
                labels: Default::default(),
                incarnation: String::new(),
                public_key: "NABCDEFGHIJKLMNOPQRSTUVWXYZ".into(),
                inventory: Default::default(),
                roles: Default::default(),
            },
            status: NodeStatus::Offline,
            registered_at_ms: 0,
            last_seen_ms: Some(1_000),
            metrics: Some(NodeMetrics {
                running_tasks: 2,
                cpu_percent: 12.4,
                ..NodeMetrics::default()
            }),
            admin: Default::default(),
            scheduling: Default::default(),
            token_id: None,
        };
        let table = node_table(&[node], 13_500);
        let mut lines = table.lines();
        let header = lines.next().unwrap();
        assert!(
            header.contains("NODE") && header.contains("GPUS") && header.contains("LAST SEEN"),
            "{table}"
        );
        let row = lines.next().unwrap();
        for expected in [
            "pi-1",
            "offline",
            "open",
            "aarch64",
            "4.0 GiB",
            "12%",
            "12s ago",
            "NABCDEFGHIJK…",
        ] {
            assert!(row.contains(expected), "{expected:?} missing from {row:?}");
        }
    }
}
