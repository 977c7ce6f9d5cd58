//! The placement rows of `apiary bench`: a scheduler replica choosing the node for one task,
//! with its own view of a fleet of 10 and of 20,000 nodes in memory, no server. Each sample is
//! a placement and its reservation, as intake makes them; tasks end as new ones are placed,
//! so that about one task per node is outstanding, as in a busy cluster.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use apiary_proto::id::NodeId;
use apiary_proto::message::{
    NodeInfo, NodeLiveness, NodeMetrics, NodeRecord, NodeState, Requirements,
};
use apiary_proto::now_ms;
use apiary_scheduler::view::{NodeChange, NodeView, Placement};

use crate::bench::{Figure, latency};

/// The fleets measured: a small cluster, and the largest one scale targets.
const FLEETS: [usize; 2] = [10, 20_000];

/// The placement rows, `samples` placements in each fleet.
pub fn placement_figures(samples: usize) -> anyhow::Result<Vec<Figure>> {
    FLEETS
        .iter()
        .map(|&nodes| {
            let timings = measure(nodes, samples)?;
            Ok(latency(
                &format!("scheduler: place a task among {nodes} nodes"),
                timings,
            ))
        })
        .collect()
}

fn measure(nodes: usize, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let now = now_ms();
    let mut view = fleet(nodes, now)?;
    let requirements = Requirements::default();
    let mut outstanding = VecDeque::with_capacity(nodes + 1);
    let mut timings = Vec::with_capacity(samples);
    for sample in 0..samples {
        let attempt = format!("bench-{sample}.1");
        let started = Instant::now();
        let Placement::Node(node) = view.place(&requirements, now) else {
            anyhow::bail!("the benchmark's fleet of {nodes} nodes took no more tasks");
        };
        view.reserve(&node, attempt.clone(), now + 60_000);
        timings.push(started.elapsed());
        outstanding.push_back(attempt);
        if outstanding.len() > nodes
            && let Some(ended) = outstanding.pop_front()
        {
            view.finished(&ended, now);
        }
    }
    Ok(timings)
}

/// `nodes` registered nodes of 2 slots, each with a heartbeat at `now_ms`.
fn fleet(nodes: usize, now_ms: u64) -> anyhow::Result<NodeView> {
    let mut view = NodeView::new(None);
    for index in 0..nodes {
        let node = NodeId::new(format!("bench-node-{index:05}"))?;
        view.apply(NodeChange::Registered(NodeRecord {
            info: NodeInfo {
                node_id: node.clone(),
                hostname: node.to_string(),
                arch: std::env::consts::ARCH.into(),
                os: std::env::consts::OS.into(),
                cpu_cores: 2,
                cpu_model: String::new(),
                memory_bytes: 1 << 30,
                slots: 2,
                agent_version: String::new(),
                labels: Default::default(),
                incarnation: String::new(),
                public_key: String::new(),
                inventory: Default::default(),
                roles: Default::default(),
            },
            registered_at_ms: now_ms,
            token_id: None,
        }));
        view.apply(NodeChange::Heartbeat(
            node,
            NodeLiveness {
                last_seen_ms: now_ms,
                heartbeat_interval_ms: 5_000,
                seq: 1,
                state: NodeState::Active,
                metrics: NodeMetrics::default(),
                incarnation: String::new(),
            },
        ));
    }
    Ok(view)
}
