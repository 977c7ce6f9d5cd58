//! Registration, heartbeats and the node table.

use std::time::Duration;

use apiary_harness::{PATIENCE, Stack, eventually, within};
use apiary_proto::message::{NodeStatus, NodesListReply, NodesListRequest};
use apiary_proto::{rpc, subject};
use futures::StreamExt as _;

#[tokio::test]
async fn a_registered_node_appears_in_the_node_list() {
    let (stack, _running) = Stack::with_one_node().await;

    let nodes = stack.client().await.nodes().await.expect("list nodes");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node = &nodes[0];
    assert_eq!(node.info.node_id.as_str(), "node-a");
    assert_eq!(node.status, NodeStatus::Online);
    assert_eq!(node.info.arch, std::env::consts::ARCH);
    assert!(!node.info.hostname.is_empty());
    assert!(node.info.cpu_cores >= 1);
    assert!(node.info.memory_bytes > 0);
    assert_eq!(node.info.slots, 2);

    // The scheduler's request subject tells the same story.
    let reply: NodesListReply = rpc::request(
        &stack.nats().await,
        subject::nodes_list(),
        &NodesListRequest::default(),
        Duration::from_secs(5),
    )
    .await
    .expect("nodes.list answers");
    assert_eq!(reply.nodes.len(), 1);
    assert_eq!(reply.nodes[0].info.node_id.as_str(), "node-a");
    assert_eq!(reply.nodes[0].status, NodeStatus::Online);
}

#[tokio::test]
async fn heartbeats_keep_arriving() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let mut liveness = stack.watch_liveness("node-a").await;
    let _agent = stack.spawn_agent("node-a");
    // Registration stores sequence 0; heartbeats count up from 1. The bucket keeps only the
    // latest record, so a watcher may skip one under load, but never sees one go backwards.
    let sequences: Vec<u64> = within(
        PATIENCE,
        "three heartbeats",
        liveness
            .by_ref()
            .map(|live| live.seq)
            .filter(|seq| std::future::ready(*seq > 0))
            .take(3)
            .collect(),
    )
    .await;
    assert!(
        sequences.windows(2).all(|pair| pair[0] < pair[1]),
        "{sequences:?}"
    );
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_is_offline_within_three_intervals() {
    // A longer interval than usual leaves room for a heartbeat already in flight when the
    // agent dies: it may still be stamped just after the crash.
    let interval = Duration::from_secs(1);
    let stack = Stack::with_heartbeat(interval).await;
    let _scheduler = stack.spawn_scheduler().await;
    let mut liveness = stack.watch_liveness("node-a").await;
    let agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;

    // The node was online to begin with, and heartbeating (registration stores sequence 0;
    // heartbeats count up from 1), so it is the silence that takes it offline.
    within(
        PATIENCE,
        "a heartbeat",
        liveness
            .by_ref()
            .filter(|live| std::future::ready(live.seq > 0))
            .next(),
    )
    .await
    .expect("the liveness watch is open");
    let nodes = client.nodes().await.expect("list nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status, NodeStatus::Online, "{nodes:?}");

    agent.crash().await;

    // Three intervals after the last heartbeat can have been sent, the node must be offline.
    let status = eventually(interval * 3, "node-a to be shown offline", || async {
        let nodes = client.nodes().await.ok()?;
        let status = nodes.first()?.status;
        (status != NodeStatus::Online).then_some(status)
    })
    .await;
    assert_eq!(status, NodeStatus::Offline);
}

#[tokio::test]
async fn a_node_that_stops_cleanly_is_shown_left() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online("node-a").await;
    agent.stop().await.expect("agent stops cleanly");
    let client = stack.client().await;
    // The goodbye is stored before the agent's run returns.
    let nodes = client.nodes().await.expect("list nodes");
    assert_eq!(nodes[0].status, NodeStatus::Left, "{nodes:?}");
}

#[tokio::test]
async fn an_agent_registers_once_a_scheduler_appears() {
    let stack = Stack::start().await;
    let mut liveness = stack.watch_liveness("node-a").await;
    let _agent = stack.spawn_agent("node-a");
    let _scheduler = stack.spawn_scheduler().await;
    within(PATIENCE, "registration", liveness.next()).await;
    let client = stack.client().await;
    eventually(PATIENCE, "node-a online", || async {
        let nodes = client.nodes().await.ok()?;
        (nodes.first()?.status == NodeStatus::Online).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_forgotten_node_registers_again() {
    let (stack, _running) = Stack::with_one_node().await;
    let js = async_nats::jetstream::new(stack.nats().await);
    let bucket = apiary_proto::topology::ensure(&js)
        .await
        .expect("topology")
        .nodes;
    let node = apiary_proto::NodeId::new("node-a").expect("id");
    bucket
        .purge(apiary_proto::topology::node_info_key(&node))
        .await
        .expect("forget the node");
    let client = stack.client().await;
    eventually(PATIENCE, "node-a to register again", || async {
        let nodes = client.nodes().await.ok()?;
        (nodes.first()?.status == NodeStatus::Online).then_some(())
    })
    .await;
}
