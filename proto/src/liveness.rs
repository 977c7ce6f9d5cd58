//! Whether a node is alive: one pure function that every reader (scheduler, SDK, CLI) uses,
//! so they all agree.

use crate::admin::{NodeAdmin, Scheduling};
use crate::message::{NodeLiveness, NodeRecord, NodeState, NodeStatus, NodeSummary};

/// How long after its last heartbeat a node counts as offline: two and a half intervals. One
/// late heartbeat is tolerated, and a node that stops is shown offline before three intervals
/// have passed since the last heartbeat it sent.
pub fn offline_after_ms(heartbeat_interval_ms: u64) -> u64 {
    heartbeat_interval_ms.saturating_mul(5) / 2
}

/// The heartbeat interval schedulers give agents unless configured otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 5_000;

/// The status of a node at `now_ms`, from its latest liveness record. A node that registered
/// but has no liveness record yet (the registration stores the node's record, then its
/// liveness, and a reader can look in between) is judged from its registration time, as if
/// it had heartbeated then at the default interval: online at once, offline if nothing
/// follows.
pub fn node_status(record: &NodeRecord, live: Option<&NodeLiveness>, now_ms: u64) -> NodeStatus {
    let Some(live) = live else {
        let since = now_ms.saturating_sub(record.registered_at_ms);
        return if since > offline_after_ms(DEFAULT_HEARTBEAT_INTERVAL_MS) {
            NodeStatus::Offline
        } else {
            NodeStatus::Online
        };
    };
    if live.state == NodeState::Leaving {
        return NodeStatus::Left;
    }
    let last_seen = live.last_seen_ms.max(record.registered_at_ms);
    if now_ms.saturating_sub(last_seen) > offline_after_ms(live.heartbeat_interval_ms) {
        NodeStatus::Offline
    } else {
        NodeStatus::Online
    }
}

/// One row of the node table, as of `now_ms`.
pub fn summarize(
    record: &NodeRecord,
    live: Option<&NodeLiveness>,
    admin: Option<&NodeAdmin>,
    now_ms: u64,
) -> NodeSummary {
    let admin = admin.cloned().unwrap_or_default();
    NodeSummary {
        info: record.info.clone(),
        status: node_status(record, live, now_ms),
        registered_at_ms: record.registered_at_ms,
        last_seen_ms: live.map(|l| l.last_seen_ms),
        metrics: live.map(|l| l.metrics.clone()),
        scheduling: Scheduling::of(&admin, live.map(|l| &l.metrics)),
        admin,
        token_id: record.token_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;
    use crate::message::{NodeInfo, NodeMetrics};

    fn record() -> NodeRecord {
        NodeRecord {
            info: NodeInfo {
                node_id: NodeId::new("n").unwrap(),
                hostname: "h".into(),
                arch: "x86_64".into(),
                os: "linux".into(),
                cpu_cores: 2,
                cpu_model: String::new(),
                memory_bytes: 1,
                slots: 2,
                agent_version: "0".into(),
                labels: Default::default(),
                incarnation: String::new(),
                public_key: String::new(),
                inventory: Default::default(),
                roles: Default::default(),
            },
            registered_at_ms: 1_000,
            token_id: None,
        }
    }

    fn live(last_seen_ms: u64, state: NodeState) -> NodeLiveness {
        NodeLiveness {
            last_seen_ms,
            heartbeat_interval_ms: 1_000,
            seq: 1,
            state,
            metrics: NodeMetrics::default(),
            incarnation: String::new(),
        }
    }

    #[test]
    fn a_fresh_heartbeat_is_online() {
        let live = live(10_000, NodeState::Active);
        assert_eq!(
            node_status(&record(), Some(&live), 10_000),
            NodeStatus::Online
        );
        assert_eq!(
            node_status(&record(), Some(&live), 12_500),
            NodeStatus::Online
        );
    }

    #[test]
    fn a_silent_node_is_offline_within_three_intervals() {
        let live = live(10_000, NodeState::Active);
        assert_eq!(
            node_status(&record(), Some(&live), 12_501),
            NodeStatus::Offline
        );
        assert_eq!(
            node_status(&record(), Some(&live), 13_000),
            NodeStatus::Offline
        );
    }

    #[test]
    fn a_leaving_node_is_gone_at_once() {
        let live = live(10_000, NodeState::Leaving);
        assert_eq!(
            node_status(&record(), Some(&live), 10_000),
            NodeStatus::Left
        );
    }

    #[test]
    fn a_node_is_online_the_moment_it_registers_and_offline_if_no_heartbeat_follows() {
        assert_eq!(node_status(&record(), None, 1_000), NodeStatus::Online);
        let due = 1_000 + offline_after_ms(DEFAULT_HEARTBEAT_INTERVAL_MS);
        assert_eq!(node_status(&record(), None, due), NodeStatus::Online);
        assert_eq!(node_status(&record(), None, due + 1), NodeStatus::Offline);
    }

    #[test]
    fn clock_skew_backwards_does_not_panic() {
        let live = live(10_000, NodeState::Active);
        assert_eq!(node_status(&record(), Some(&live), 5), NodeStatus::Online);
    }
}
