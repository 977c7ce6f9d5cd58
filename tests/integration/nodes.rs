//! Registration, heartbeats and the node table.

use std::collections::BTreeMap;
use std::time::Duration;

use apiary_agent::config::AgentConfig;
use apiary_harness::{HandNode, PATIENCE, Stack, eventually, wasm, within};
use apiary_proto::admin::Schedule;
use apiary_proto::message::{Dispatch, NodeStatus, NodesListReply, NodesListRequest};
use apiary_proto::subject::NodeVerb;
use apiary_proto::{codec, rpc, subject, topology};
use apiary_scheduler::config::SchedulerConfig;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};

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

#[tokio::test]
async fn a_node_gone_longer_than_the_forget_period_is_forgotten_and_comes_back_by_its_key() {
    let stack = Stack::start().await;
    let replica = stack
        .spawn_scheduler_with(SchedulerConfig {
            forget_offline_after: Duration::from_secs(2),
            ..stack.scheduler_config()
        })
        .await;
    let gone = stack.spawn_agent_online("node-a").await;
    let _staying = stack.spawn_agent_online("node-b").await;
    let client = stack.client().await;
    let node_a = apiary_proto::NodeId::new("node-a").expect("id");
    client.cordon(&node_a).await.expect("cordon node-a");
    let js = async_nats::jetstream::new(stack.nats().await);
    let dispatch = js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .expect("the dispatch stream");
    let consumer = topology::node_dispatch_consumer_name(&node_a);
    dispatch
        .consumer_info(&consumer)
        .await
        .expect("node-a pulls through its own consumer");

    gone.crash().await;
    let left = eventually(PATIENCE, "node-a to be forgotten", || async {
        let nodes = client.nodes().await.ok()?;
        (!nodes.iter().any(|node| node.info.node_id == node_a)).then_some(nodes)
    })
    .await;
    // Only the node that was gone: the one still heartbeating stays, online.
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].info.node_id.as_str(), "node-b");
    assert_eq!(left[0].status, NodeStatus::Online);
    let err = dispatch
        .consumer_info(&consumer)
        .await
        .expect_err("the forgotten node's consumer is deleted");
    assert_eq!(
        err.kind(),
        async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
    );
    assert_eq!(
        stack
            .scheduler_counters(&replica)
            .await
            .get("nodes_forgotten"),
        1
    );

    // Its key is still bound to its id, so it comes back without a token; and the cordon
    // its operator set is still there.
    let back = stack
        .spawn_agent_online_with(AgentConfig {
            token: None,
            ..stack.agent_config("node-a")
        })
        .await;
    let summary = client.node(&node_a).await.expect("node-a is listed again");
    assert_eq!(summary.status, NodeStatus::Online);
    assert_eq!(summary.admin.schedule, Schedule::Cordoned);
    drop(back);
}

/// Sends `body` as JSON to `subject`, as a client in another language would, and returns
/// the `ok` part of the reply, failing the test on an error reply.
async fn json_request(nats: &async_nats::Client, subject: String, body: Value) -> Value {
    let what = format!("a reply on {subject}");
    let reply = within(
        PATIENCE,
        &what,
        nats.request(subject.clone(), Bytes::from(body.to_string())),
    )
    .await
    .unwrap_or_else(|err| panic!("request on {subject} failed: {err}"));
    let value: Value = serde_json::from_slice(&reply.payload).unwrap_or_else(|err| {
        panic!(
            "the reply on {subject} is not JSON ({err}): {:?}",
            String::from_utf8_lossy(&reply.payload)
        )
    });
    match value.get("ok") {
        Some(ok) => ok.clone(),
        None => panic!("an error reply on {subject}: {value}"),
    }
}

/// Registers `node` by hand with one slot, as a client in another language would: a JSON
/// body on `apiary.v1.node.<id>.register`, signed with the node's key, with a join token.
async fn register_by_hand(nats: &async_nats::Client, node: &HandNode, token: &str) {
    let (_, reply) = node
        .request(nats, NodeVerb::Register, &node.registration(1, Some(token)))
        .await;
    assert_eq!(reply["ok"]["node_id"], node.id.as_str(), "{reply}");
}

/// Sends `node`'s heartbeat number `seq` in `state` (`active` or `leaving`) and returns
/// once the scheduler has answered that it holds the node's registration.
async fn heartbeat_by_hand(nats: &async_nats::Client, node: &HandNode, seq: u64, state: &str) {
    let heartbeat = json!({
        "node_id": node.id.as_str(),
        "seq": seq,
        "state": state,
        "metrics": {
            "cpu_percent": 1.0,
            "memory_used_bytes": 1_000_000,
            "memory_total_bytes": 1_073_741_824u64,
            "running_tasks": 0,
            "slots": 1
        }
    });
    let (_, reply) = node.request(nats, NodeVerb::Heartbeat, &heartbeat).await;
    assert_eq!(
        reply["ok"]["registered"], true,
        "{}'s {state} heartbeat: {reply}",
        node.id
    );
}

/// The node table as `nats req apiary.v1.nodes.list '{}'` shows it: status by node id.
async fn statuses_by_hand(nats: &async_nats::Client) -> BTreeMap<String, String> {
    let reply = json_request(nats, subject::nodes_list().to_string(), json!({})).await;
    reply["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no node array in {reply}"))
        .iter()
        .map(|node| {
            let id = node["info"]["node_id"].as_str().expect("a node id");
            let status = node["status"].as_str().expect("a status");
            (id.to_owned(), status.to_owned())
        })
        .collect()
}

/// How many entries [`hold_up_the_bucket_watch`] puts ahead of a record.
const WATCH_BACKLOG: usize = 5000;

/// Holds up the scheduler's bucket watch, as a busy replica's watch can lag: puts
/// [`WATCH_BACKLOG`] empty entries into the node bucket under keys that name no node (the
/// replica's watch reads every key and skips them; `batch` keeps each call's keys apart). A
/// record the replica stores right after them reaches its view through the watch only once
/// the watch has read through them all. They are sent without waiting for them to be
/// stored, since the watch keeps pace with a writer that waits.
///
/// This is the one thing these tests do that a client of the protocol would not. Without it
/// the watch delivers a record on a quiet machine before the request that stored it is even
/// answered, and a replica that waits for its watch cannot be told from one that does not.
/// With it, such a replica gives itself away in most rounds (about two in three here). (The
/// subject is the bucket's own, as the KV client builds it for a put.)
async fn hold_up_the_bucket_watch(nats: &async_nats::Client, bucket: &kv::Store, batch: &str) {
    for n in 0..WATCH_BACKLOG {
        let subject = format!("{}backlog.{batch}-{n}", bucket.prefix);
        nats.publish(subject, Bytes::new())
            .await
            .expect("publish to the node bucket");
    }
}

#[tokio::test]
async fn the_node_list_shows_a_node_left_as_soon_as_its_leaving_heartbeat_is_answered() {
    // A long interval: the hand-made nodes send one heartbeat each, and must not go offline
    // in the meantime, so that `online` below can only mean "not yet seen leaving".
    let stack = Stack::with_heartbeat(Duration::from_secs(60)).await;
    let _scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let ids: Vec<String> = (0..21).map(|n| format!("hand-{n:02}")).collect();
    let hands: BTreeMap<&str, HandNode> = ids
        .iter()
        .map(|id| (id.as_str(), HandNode::new(id)))
        .collect();
    for hand in hands.values() {
        register_by_hand(&nats, hand, &stack.token).await;
        heartbeat_by_hand(&nats, hand, 1, "active").await;
    }
    let statuses = statuses_by_hand(&nats).await;
    assert_eq!(statuses.len(), ids.len(), "{statuses:?}");
    assert!(
        statuses.values().all(|status| status == "online"),
        "{statuses:?}"
    );

    // Each list is asked for only after the leaving heartbeat is answered, and must already
    // show it. A replica that only stored the heartbeat and let its own view catch up
    // through the bucket watch answered `online` here until the watch delivered the record
    // (up to about 2 s), and would go on placing tasks on the node meanwhile. Its watch is
    // held up before each goodbye, so that such a replica is caught within a few nodes.
    let bucket = stack.nodes_bucket().await;
    for (gone, id) in ids.iter().enumerate() {
        hold_up_the_bucket_watch(&nats, &bucket, id).await;
        heartbeat_by_hand(&nats, &hands[id.as_str()], 2, "leaving").await;
        let statuses = statuses_by_hand(&nats).await;
        assert_eq!(
            statuses.get(id).map(String::as_str),
            Some("left"),
            "{id} in the first list after its leaving heartbeat was answered: {statuses:?}"
        );
        // The others are untouched: those that left before stay left, the rest online.
        for (n, other) in ids.iter().enumerate() {
            let expected = if n <= gone { "left" } else { "online" };
            assert_eq!(
                statuses.get(other).map(String::as_str),
                Some(expected),
                "{other} after {id} left: {statuses:?}"
            );
        }
    }
}

/// One scheduler replica whose every placement the test sees on the wire, for the tests that
/// check that a node stops getting tasks the moment a request about it is answered.
struct PlacementWatch {
    stack: Stack,
    _scheduler: apiary_harness::Component,
    nats: async_nats::Client,
    client: apiary_sdk::Client,
    module: Bytes,
    dispatches: async_nats::Subscriber,
    bucket: kv::Store,
}

impl PlacementWatch {
    async fn start() -> Self {
        // A long interval, so that a node that stays is online throughout without
        // heartbeats.
        let stack = Stack::with_heartbeat(Duration::from_secs(60)).await;
        let _scheduler = stack.spawn_scheduler().await;
        let nats = stack.nats().await;
        let client = stack.client().await;
        let module = wasm("uppercase");
        // Uploaded once up front, so each round's submit is only the publish, and the task
        // reaches the scheduler as soon after the request as it can.
        client.upload_module(&module).await.expect("upload");
        let dispatches = stack.dispatch_wire().await;
        let bucket = stack.nodes_bucket().await;
        Self {
            stack,
            _scheduler,
            nats,
            client,
            module,
            dispatches,
            bucket,
        }
    }

    /// Two fresh hand-made nodes, equal in every way, registered and heartbeating, and the
    /// replica's bucket watch held up behind them. The first sorts first, so a replica that
    /// still took it for a candidate would choose it: among equally loaded nodes the next
    /// one in id order after the last one chosen goes first, and both come after every
    /// earlier round's nodes. With the watch held up, only what the replica learns from the
    /// requests it answers itself keeps a task off the first.
    async fn fresh_pair(&self, round: usize) -> (HandNode, HandNode) {
        let going = HandNode::new(&format!("round-{round:02}-goes"));
        let staying = HandNode::new(&format!("round-{round:02}-stays"));
        for hand in [&going, &staying] {
            register_by_hand(&self.nats, hand, &self.stack.token).await;
            heartbeat_by_hand(&self.nats, hand, 1, "active").await;
        }
        hold_up_the_bucket_watch(&self.nats, &self.bucket, going.id.as_str()).await;
        (going, staying)
    }

    /// Places one task (the nodes never pull, so it never runs: where it goes is the point)
    /// and checks that it went to `staying`; then `staying` leaves too, so that the next
    /// round's pair is alone with the nodes that left.
    async fn expect_placed_on(&mut self, staying: &HandNode, when: &str) {
        let node = place_one(&self.client, &self.module, &mut self.dispatches).await;
        assert_eq!(node, staying.id, "{when}, the task went to {node}");
        heartbeat_by_hand(&self.nats, staying, 2, "leaving").await;
    }
}

/// Submits one task (the nodes never pull it, so it never runs) and returns where it was
/// placed.
async fn place_one(
    client: &apiary_sdk::Client,
    module: &Bytes,
    dispatches: &mut async_nats::Subscriber,
) -> apiary_proto::NodeId {
    let task = client
        .submit(apiary_sdk::Task::new(module.clone()).input("where to?"))
        .await
        .expect("submit");
    first_placement(dispatches, task.id()).await
}

/// The node `task`'s first attempt was placed on, read from every node's dispatch subject.
/// Anything else on the wire (an earlier task moved off a node that left) is skipped.
async fn first_placement(
    dispatches: &mut async_nats::Subscriber,
    task: &apiary_proto::TaskId,
) -> apiary_proto::NodeId {
    within(PATIENCE, "the task's dispatch", async {
        loop {
            let message = dispatches.next().await.expect("the subscription is open");
            let (dispatch, _) =
                codec::decode_message::<Dispatch>(message.headers.as_ref(), &message.payload)
                    .unwrap_or_else(|err| panic!("not a dispatch on {}: {err}", message.subject));
            if &dispatch.task.id == task && dispatch.attempt == 1 {
                let (node, _) = subject::parse_node_subject(&message.subject)
                    .unwrap_or_else(|| panic!("not a node subject: {}", message.subject));
                return node;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_task_submitted_after_a_leaving_heartbeat_is_answered_goes_to_a_node_that_stays() {
    let mut watch = PlacementWatch::start().await;
    for round in 0..10 {
        let (going, staying) = watch.fresh_pair(round).await;
        heartbeat_by_hand(&watch.nats, &going, 2, "leaving").await;
        // A replica that learned of the goodbye only through its bucket watch still took
        // `goes` for online when the task arrived, and placed it there (in most rounds: ten
        // rounds catch it all but certainly).
        watch
            .expect_placed_on(
                &staying,
                &format!("round {round}: after {} said it was leaving", going.id),
            )
            .await;
    }
}

#[tokio::test]
async fn a_node_registers_its_inventory_and_roles_and_heartbeats_its_free_disk() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let mut config = stack.agent_config("node-a");
    config.roles = ["dns".to_owned(), "host".to_owned()].into();
    // Whatever this machine has, the agent finds no NVIDIA driver.
    config.nvml_library = Some("/nonexistent/apiary-test/libnvidia-ml.so.1".into());
    let mut liveness = stack.watch_liveness("node-a").await;
    let _agent = stack.spawn_agent_online_with(config).await;

    let record = stack.node_record("node-a").await.expect("a registration");
    let info = &record.info;
    assert_eq!(info.roles, ["dns".to_owned(), "host".to_owned()].into());
    let inventory = &info.inventory;
    assert_eq!(inventory.cpu.arch, std::env::consts::ARCH);
    assert_eq!(inventory.cpu.available_cores, info.cpu_cores);
    assert_eq!(inventory.memory.total_bytes, info.memory_bytes);
    assert_eq!(inventory.host.hostname, info.hostname);
    assert_eq!(inventory.runtime.slots, 2);
    assert_eq!(inventory.runtime.wasi, "preview1");
    assert!(inventory.gpus.is_empty());

    // Registration stores sequence 0 with no figures; heartbeats count up from 1.
    let heartbeat = within(
        PATIENCE,
        "a heartbeat",
        liveness
            .by_ref()
            .filter(|live| std::future::ready(live.seq > 0))
            .next(),
    )
    .await
    .expect("the liveness watch goes on");
    assert!(
        heartbeat
            .metrics
            .disk_free_bytes
            .is_some_and(|free| free > 0),
        "{heartbeat:?}"
    );
    assert!(heartbeat.metrics.gpus.is_empty());
}

#[tokio::test]
async fn a_task_submitted_after_a_cordon_drain_or_rm_is_answered_goes_to_another_node() {
    // As for a leaving heartbeat: the replica that answers an operator's command stops
    // placing on the node at once, not when its bucket watch catches up.
    let mut watch = PlacementWatch::start().await;
    for round in 0..9 {
        let command = ["cordon", "drain", "rm"][round % 3];
        let (going, staying) = watch.fresh_pair(round).await;
        let client = &watch.client;
        match command {
            "cordon" => drop(client.cordon(&going.id).await.expect("cordon")),
            "drain" => drop(client.drain(&going.id, None).await.expect("drain")),
            _ => drop(client.remove_node(&going.id).await.expect("rm")),
        }
        watch
            .expect_placed_on(
                &staying,
                &format!("round {round}: right after `{command}` was answered"),
            )
            .await;
    }
}

/// The node list comes in pages (a list of a large fleet once outgrew the server's
/// `max_payload` and went unanswered): a JSON client pages through with `limit` and
/// `after`, sees every node once in node-id order, and the SDK reads them all.
#[tokio::test]
async fn the_node_list_comes_in_pages_that_together_hold_every_node_once() {
    let stack = Stack::with_heartbeat(Duration::from_secs(60)).await;
    let _scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let ids: Vec<String> = (0..23).map(|n| format!("paged-{n:02}")).collect();
    for id in &ids {
        register_by_hand(&nats, &HandNode::new(id), &stack.token).await;
    }

    let mut seen = Vec::new();
    let mut request = json!({"limit": 5});
    let mut pages = 0;
    loop {
        let reply = json_request(&nats, subject::nodes_list().to_string(), request.clone()).await;
        let nodes = reply["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("{reply}"));
        assert!(nodes.len() <= 5, "a page larger than its limit: {reply}");
        seen.extend(
            nodes
                .iter()
                .map(|node| node["info"]["node_id"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        match reply.get("next").and_then(Value::as_str) {
            Some(next) => request = json!({"limit": 5, "after": next}),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every node once, in order");
    assert_eq!(pages, 5);

    let client = stack.client().await;
    let all = client.nodes().await.expect("nodes");
    assert_eq!(all.len(), ids.len());
    let refused = client
        .nodes_page(&NodesListRequest {
            limit: Some(0),
            ..NodesListRequest::default()
        })
        .await
        .expect_err("a page of nothing");
    assert!(refused.to_string().contains("limit"), "{refused}");
}
