//! The scheduler's view of the cluster and its placement decisions: pure data, no I/O.
//!
//! The view is rebuilt from the `APIARY_NODES` KV bucket (a replica that starts fresh replays
//! the bucket), so it is a cache of NATS state, never a source of truth. The only thing it
//! adds is a count of tasks this replica placed on each node since that node's last
//! heartbeat, so that a burst of tasks spreads out before the next heartbeat reports the load.

use std::collections::BTreeMap;

use apiary_proto::NodeId;
use apiary_proto::liveness;
use apiary_proto::message::{NodeLiveness, NodeRecord, NodeStatus, NodeSummary, Requirements};

#[derive(Clone, Debug, Default)]
struct NodeEntry {
    record: Option<NodeRecord>,
    live: Option<NodeLiveness>,
    /// Tasks this replica placed on the node since its last heartbeat.
    placed_since_heartbeat: u32,
}

/// A change to one key of the node bucket.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeChange {
    Registered(NodeRecord),
    Forgotten(NodeId),
    Heartbeat(NodeId, NodeLiveness),
    LivenessCleared(NodeId),
}

/// Where a task should go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Node(NodeId),
    /// No node is online at all.
    NoLiveNode,
    /// Nodes are online, but none meets the task's requirements.
    NoMatchingNode,
}

#[derive(Clone, Debug, Default)]
pub struct NodeView {
    nodes: BTreeMap<NodeId, NodeEntry>,
}

impl NodeView {
    pub fn apply(&mut self, change: NodeChange) {
        match change {
            NodeChange::Registered(record) => {
                let node = record.info.node_id.clone();
                self.nodes.entry(node).or_default().record = Some(record);
            }
            NodeChange::Forgotten(node) => {
                if let Some(entry) = self.nodes.get_mut(&node) {
                    entry.record = None;
                }
                self.drop_if_empty(&node);
            }
            NodeChange::Heartbeat(node, live) => {
                let entry = self.nodes.entry(node).or_default();
                entry.live = Some(live);
                entry.placed_since_heartbeat = 0;
            }
            NodeChange::LivenessCleared(node) => {
                if let Some(entry) = self.nodes.get_mut(&node) {
                    entry.live = None;
                }
                self.drop_if_empty(&node);
            }
        }
    }

    fn drop_if_empty(&mut self, node: &NodeId) {
        if self
            .nodes
            .get(node)
            .is_some_and(|entry| entry.record.is_none() && entry.live.is_none())
        {
            self.nodes.remove(node);
        }
    }

    /// Whether the node has a registration record.
    pub fn is_registered(&self, node: &NodeId) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|entry| entry.record.is_some())
    }

    /// The node table at `now_ms`, sorted by node id.
    pub fn summaries(&self, now_ms: u64) -> Vec<NodeSummary> {
        self.nodes
            .values()
            .filter_map(|entry| {
                let record = entry.record.as_ref()?;
                Some(liveness::summarize(record, entry.live.as_ref(), now_ms))
            })
            .collect()
    }

    /// Picks the online node that meets `requirements` and is least loaded, counting the
    /// tasks this replica placed since the node last reported. Ties go to the node with more
    /// free slots, then to the lowest node id, so the choice is deterministic.
    pub fn place(&self, requirements: &Requirements, now_ms: u64) -> Placement {
        let mut any_online = false;
        let mut best: Option<(&NodeId, Load)> = None;
        for (node, entry) in &self.nodes {
            let Some(record) = &entry.record else {
                continue;
            };
            if liveness::node_status(record, entry.live.as_ref(), now_ms) != NodeStatus::Online {
                continue;
            }
            any_online = true;
            if !meets(record, requirements) {
                continue;
            }
            let running = entry
                .live
                .as_ref()
                .map_or(0, |live| live.metrics.running_tasks);
            let load = Load {
                busy: running.saturating_add(entry.placed_since_heartbeat),
                slots: record.info.slots.max(1),
            };
            if best
                .as_ref()
                .is_none_or(|(_, best_load)| load.less_than(best_load))
            {
                best = Some((node, load));
            }
        }
        match best {
            Some((node, _)) => Placement::Node(node.clone()),
            None if any_online => Placement::NoMatchingNode,
            None => Placement::NoLiveNode,
        }
    }

    /// Whether `node` is registered and online at `now_ms`.
    pub fn is_online(&self, node: &NodeId, now_ms: u64) -> bool {
        self.nodes.get(node).is_some_and(|entry| {
            entry.record.as_ref().is_some_and(|record| {
                liveness::node_status(record, entry.live.as_ref(), now_ms) == NodeStatus::Online
            })
        })
    }

    /// Registered nodes that are offline or have left: whatever is still queued for them
    /// must go elsewhere.
    pub fn lost_nodes(&self, now_ms: u64) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, entry)| {
                entry.record.as_ref().is_some_and(|record| {
                    liveness::node_status(record, entry.live.as_ref(), now_ms) != NodeStatus::Online
                })
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Records that this replica placed a task on `node`.
    pub fn note_placed(&mut self, node: &NodeId) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.placed_since_heartbeat = entry.placed_since_heartbeat.saturating_add(1);
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Load {
    busy: u32,
    slots: u32,
}

impl Load {
    /// Compares `busy / slots` without floating point: a/b < c/d ⇔ a·d < c·b.
    fn less_than(&self, other: &Load) -> bool {
        let mine = u64::from(self.busy) * u64::from(other.slots);
        let theirs = u64::from(other.busy) * u64::from(self.slots);
        mine < theirs || (mine == theirs && self.free() > other.free())
    }

    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.busy)
    }
}

fn meets(record: &NodeRecord, requirements: &Requirements) -> bool {
    let info = &record.info;
    requirements
        .min_cores
        .is_none_or(|cores| info.cpu_cores >= cores)
        && requirements
            .min_memory_bytes
            .is_none_or(|bytes| info.memory_bytes >= bytes)
        && requirements
            .arch
            .as_ref()
            .is_none_or(|arch| &info.arch == arch)
        && requirements
            .labels
            .iter()
            .all(|(key, value)| info.labels.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_proto::message::{NodeInfo, NodeMetrics, NodeState};

    const NOW: u64 = 100_000;

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn record(name: &str, cores: u32, slots: u32) -> NodeRecord {
        NodeRecord {
            info: NodeInfo {
                node_id: id(name),
                hostname: name.into(),
                arch: "x86_64".into(),
                os: "linux".into(),
                cpu_cores: cores,
                cpu_model: String::new(),
                memory_bytes: 1 << 30,
                slots,
                agent_version: "0".into(),
                labels: Default::default(),
            },
            registered_at_ms: 0,
        }
    }

    fn live(running: u32, last_seen_ms: u64) -> NodeLiveness {
        NodeLiveness {
            last_seen_ms,
            heartbeat_interval_ms: 1_000,
            seq: 1,
            state: NodeState::Active,
            metrics: NodeMetrics {
                running_tasks: running,
                ..NodeMetrics::default()
            },
        }
    }

    fn view(nodes: &[(&str, u32, u32, u32)]) -> NodeView {
        let mut view = NodeView::default();
        for &(name, cores, slots, running) in nodes {
            view.apply(NodeChange::Registered(record(name, cores, slots)));
            view.apply(NodeChange::Heartbeat(id(name), live(running, NOW)));
        }
        view
    }

    #[test]
    fn an_empty_cluster_has_no_live_node() {
        assert_eq!(
            NodeView::default().place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }

    #[test]
    fn offline_nodes_are_not_candidates() {
        let mut view = view(&[("a", 2, 2, 0)]);
        view.apply(NodeChange::Heartbeat(id("a"), live(0, NOW - 10_000)));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }

    #[test]
    fn leaving_nodes_are_not_candidates() {
        let mut view = view(&[("a", 2, 2, 0)]);
        let mut leaving = live(0, NOW);
        leaving.state = NodeState::Leaving;
        view.apply(NodeChange::Heartbeat(id("a"), leaving));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }

    #[test]
    fn the_least_loaded_node_wins() {
        let view = view(&[("a", 4, 4, 3), ("b", 4, 4, 1)]);
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("b"))
        );
    }

    #[test]
    fn load_is_relative_to_slots() {
        // 2 of 8 busy beats 1 of 2 busy.
        let view = view(&[("small", 2, 2, 1), ("big", 8, 8, 2)]);
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("big"))
        );
    }

    #[test]
    fn placements_spread_before_the_next_heartbeat() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0)]);
        let mut counts = BTreeMap::new();
        for _ in 0..10 {
            let Placement::Node(node) = view.place(&Requirements::default(), NOW) else {
                panic!("no placement");
            };
            view.note_placed(&node);
            *counts.entry(node).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&id("a")), Some(&5));
        assert_eq!(counts.get(&id("b")), Some(&5));
    }

    #[test]
    fn a_heartbeat_resets_the_local_placement_count() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0)]);
        view.note_placed(&id("a"));
        view.note_placed(&id("a"));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("b"))
        );
        view.apply(NodeChange::Heartbeat(id("a"), live(0, NOW)));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("a"))
        );
    }

    #[test]
    fn requirements_filter_nodes() {
        let view = view(&[("small", 2, 2, 0), ("big", 16, 16, 10)]);
        let needs_cores = Requirements {
            min_cores: Some(8),
            ..Requirements::default()
        };
        assert_eq!(view.place(&needs_cores, NOW), Placement::Node(id("big")));
        let impossible = Requirements {
            arch: Some("riscv64".into()),
            ..Requirements::default()
        };
        assert_eq!(view.place(&impossible, NOW), Placement::NoMatchingNode);
    }

    #[test]
    fn labels_must_match_exactly() {
        let mut view = NodeView::default();
        let mut attic = record("attic", 2, 2);
        attic.info.labels.insert("zone".into(), "attic".into());
        view.apply(NodeChange::Registered(attic));
        view.apply(NodeChange::Heartbeat(id("attic"), live(0, NOW)));
        let mut wants = Requirements::default();
        wants.labels.insert("zone".into(), "attic".into());
        assert_eq!(view.place(&wants, NOW), Placement::Node(id("attic")));
        wants.labels.insert("zone".into(), "cellar".into());
        assert_eq!(view.place(&wants, NOW), Placement::NoMatchingNode);
    }

    #[test]
    fn offline_and_departed_nodes_are_lost() {
        let mut view = view(&[("alive", 2, 2, 0), ("dead", 2, 2, 0), ("gone", 2, 2, 0)]);
        view.apply(NodeChange::Heartbeat(id("dead"), live(0, NOW - 10_000)));
        let mut leaving = live(0, NOW);
        leaving.state = NodeState::Leaving;
        view.apply(NodeChange::Heartbeat(id("gone"), leaving));
        assert_eq!(view.lost_nodes(NOW), vec![id("dead"), id("gone")]);
        assert!(view.is_online(&id("alive"), NOW));
        assert!(!view.is_online(&id("dead"), NOW));
        assert!(!view.is_online(&id("unknown"), NOW));
    }

    #[test]
    fn forgotten_nodes_leave_the_table() {
        let mut view = view(&[("a", 2, 2, 0)]);
        assert_eq!(view.summaries(NOW).len(), 1);
        view.apply(NodeChange::Forgotten(id("a")));
        assert!(view.summaries(NOW).is_empty());
        assert!(!view.is_registered(&id("a")));
        view.apply(NodeChange::LivenessCleared(id("a")));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }
}
