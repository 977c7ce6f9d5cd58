//! How the CLI shows things to people.

use std::time::Duration;

use apiary_proto::message::NodeSummary;
use comfy_table::presets::NOTHING;
use comfy_table::{Cell, CellAlignment, Table};

/// The node table of `apiary nodes ls`, as of `now_ms`.
pub fn node_table(nodes: &[NodeSummary], now_ms: u64) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(vec![
        "NODE",
        "STATUS",
        "HOST",
        "ARCH",
        "CORES",
        "MEMORY",
        "GPUS",
        "SLOTS",
        "RUNNING",
        "CPU",
        "LAST SEEN",
    ]);
    for node in nodes {
        let info = &node.info;
        let metrics = node.metrics.as_ref();
        table.add_row(vec![
            Cell::new(&info.node_id),
            Cell::new(node.status),
            Cell::new(&info.hostname),
            Cell::new(&info.arch),
            Cell::new(info.cpu_cores).set_alignment(CellAlignment::Right),
            Cell::new(
                bytesize::ByteSize::b(info.memory_bytes)
                    .display()
                    .iec()
                    .to_string(),
            )
            .set_alignment(CellAlignment::Right),
            Cell::new(info.inventory.gpus.len()).set_alignment(CellAlignment::Right),
            Cell::new(info.slots).set_alignment(CellAlignment::Right),
            Cell::new(metrics.map_or(0, |m| m.running_tasks)).set_alignment(CellAlignment::Right),
            Cell::new(metrics.map_or_else(|| "-".into(), |m| format!("{:.0}%", m.cpu_percent)))
                .set_alignment(CellAlignment::Right),
            Cell::new(
                node.last_seen_ms
                    .map_or_else(|| "never".into(), |seen| ago(seen, now_ms)),
            ),
        ]);
    }
    table.to_string()
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
        };
        let table = node_table(&[node], 13_500);
        let mut lines = table.lines();
        let header = lines.next().unwrap();
        assert!(
            header.contains("NODE") && header.contains("GPUS") && header.contains("LAST SEEN"),
            "{table}"
        );
        let row = lines.next().unwrap();
        for expected in ["pi-1", "offline", "aarch64", "4.0 GiB", "12%", "12s ago"] {
            assert!(row.contains(expected), "{expected:?} missing from {row:?}");
        }
    }
}
