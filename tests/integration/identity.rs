//! Who may join: join tokens, node keys and the binding of a node id to its key, signatures
//! on every register and heartbeat, and approval mode.

use std::time::Duration;

use apiary_agent::{EXIT_REFUSED, Refused};
use apiary_harness::{HandNode, PATIENCE, QUIET, Stack, eventually, mint_token, wasm, within};
use apiary_proto::admin::Approval;
use apiary_proto::message::{Dispatch, Refusal};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{codec, headers, identity};
use apiary_sdk::Scheduling;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::json;

/// Runs an agent for `node` with `token` until it exits by itself, and returns the reason the
/// cluster gave for refusing it. Fails the test if the agent keeps running (retrying) or
/// exits for another reason.
async fn refused_agent(stack: &Stack, node: &str, token: Option<String>) -> Refusal {
    let config = apiary_agent::AgentConfig {
        token: token.map(Into::into),
        ..stack.agent_config(node)
    };
    let error = stack
        .spawn_agent_with(config)
        .exited()
        .await
        .expect_err("a refused agent exits with an error");
    assert_eq!(apiary_agent::exit_status(&error), EXIT_REFUSED, "{error:#}");
    let refused = error
        .downcast_ref::<Refused>()
        .unwrap_or_else(|| panic!("not a refusal: {error:#}"));
    refused.0.reason.expect("a refusal names its reason")
}

#[tokio::test]
async fn each_bad_token_is_refused_with_its_reason_and_the_agent_exits() {
    let stack = Stack::start().await;
    let scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;

    assert_eq!(
        refused_agent(&stack, "no-token", None).await,
        Refusal::TokenMissing
    );

    // Well formed, never issued.
    let made_up = format!("{}.{}", "a".repeat(12), "b".repeat(64));
    assert_eq!(
        refused_agent(&stack, "made-up", Some(made_up)).await,
        Refusal::TokenUnknown
    );
    // A real token's id with a wrong secret.
    let real = mint_token(stack.url(), "real", None, None).await;
    let (id, _) = real.split_once('.').expect("id.secret");
    let wrong_secret = format!("{id}.{}", "c".repeat(64));
    assert_eq!(
        refused_agent(&stack, "wrong-secret", Some(wrong_secret)).await,
        Refusal::TokenUnknown
    );

    let expired = mint_token(stack.url(), "expired", Some(1), None).await;
    // One millisecond to live: expired once the clock has moved past it.
    let minted = apiary_proto::now_ms();
    eventually(PATIENCE, "the token to expire", || async {
        (apiary_proto::now_ms() > minted + 1).then_some(())
    })
    .await;
    assert_eq!(
        refused_agent(&stack, "late", Some(expired)).await,
        Refusal::TokenExpired
    );

    let revoked = mint_token(stack.url(), "revoked", None, None).await;
    let (revoked_id, _) = revoked.split_once('.').expect("id.secret");
    client.revoke_token(revoked_id).await.expect("revoke");
    assert_eq!(
        refused_agent(&stack, "unwelcome", Some(revoked)).await,
        Refusal::TokenRevoked
    );

    // One use: the first node joins, the second is refused.
    let once = mint_token(stack.url(), "once", None, Some(1)).await;
    let first = stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            token: Some(once.clone().into()),
            ..stack.agent_config("first")
        })
        .await;
    assert_eq!(
        refused_agent(&stack, "second", Some(once)).await,
        Refusal::TokenUsedUp
    );

    let counters = stack.scheduler_counters(&scheduler).await;
    assert_eq!(counters.get("tokens_refused"), 6, "{:?}", counters.0);
    // The tokens list tells what happened to each, never a secret.
    let tokens = client.tokens().await.expect("list tokens");
    let used_once = tokens
        .iter()
        .find(|token| token.description == "once")
        .expect("the one-use token is listed");
    assert_eq!((used_once.uses, used_once.uses_left), (1, Some(0)));
    assert!(
        tokens
            .iter()
            .any(|token| token.description == "revoked" && token.revoked_ms.is_some())
    );
    let listed = serde_json::to_string(&tokens).expect("json");
    assert!(!listed.contains(&"b".repeat(64)) && !listed.contains("secret"));
    drop(first);
}

#[tokio::test]
async fn a_joined_node_registers_again_without_its_token_after_a_restart_or_a_lost_node_bucket() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;
    let token = mint_token(stack.url(), "one use", None, Some(1)).await;
    let config = apiary_agent::AgentConfig {
        token: Some(token.clone().into()),
        ..stack.agent_config("node-a")
    };
    let agent = stack.spawn_agent_online_with(config.clone()).await;
    let (id, _) = token.split_once('.').expect("id.secret");
    // Spent, then revoked: it admits nobody now.
    client.revoke_token(id).await.expect("revoke");

    // A restart registers again under the same key.
    agent.crash().await;
    let _agent = stack.spawn_agent_online_with(config).await;
    // The node bucket loses the node's records (as when the bucket is lost): the agent is
    // told to register again, and its key, still bound, admits it.
    let bucket = stack.nodes_bucket().await;
    let node = apiary_proto::NodeId::new("node-a").expect("id");
    for key in [
        apiary_proto::topology::node_info_key(&node),
        apiary_proto::topology::node_live_key(&node),
    ] {
        bucket.purge(key).await.expect("forget the node");
    }
    eventually(PATIENCE, "node-a to register again", || async {
        let nodes = client.nodes().await.ok()?;
        (nodes.first()?.status == apiary_proto::message::NodeStatus::Online).then_some(())
    })
    .await;

    let output = stack
        .run(apiary_sdk::Task::new(wasm("uppercase")).input("still here"))
        .await
        .expect("the node runs tasks");
    assert_eq!(output.node_id.as_str(), "node-a");
    let tokens = client.tokens().await.expect("tokens");
    let spent = tokens.iter().find(|t| t.id == id).expect("listed");
    assert_eq!(spent.uses, 1, "re-registrations spent no use");
    let shown = client.node(&node).await.expect("show");
    assert_eq!(
        shown.token_id.as_deref(),
        Some(id),
        "the node names its token"
    );
}

#[tokio::test]
async fn messages_that_do_not_verify_are_dropped_and_other_keys_are_refused() {
    let stack = Stack::with_heartbeat(Duration::from_secs(60)).await;
    let scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let node = HandNode::new("signed");
    let (_, reply) = node
        .request(
            &nats,
            NodeVerb::Register,
            &node.registration(1, Some(&stack.token)),
        )
        .await;
    assert_eq!(reply["ok"]["node_id"], "signed", "{reply}");

    let heartbeat = json!({
        "node_id": "signed",
        "seq": 1,
        "metrics": {"cpu_percent": 0.0, "memory_used_bytes": 0, "memory_total_bytes": 0,
                    "running_tasks": 0, "slots": 1}
    });
    let body = Bytes::from(heartbeat.to_string());
    let unanswered = |headers: async_nats::HeaderMap, payload: Bytes| {
        let nats = nats.clone();
        let subject = subject::node(&node.id, NodeVerb::Heartbeat).to_string();
        async move {
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(payload)
                .timeout(Some(QUIET));
            let answer = nats.send_request(subject, request).await;
            assert!(
                answer.is_err(),
                "a message that does not verify was answered"
            );
        }
    };
    // Unsigned, as a `nats req` by hand would be.
    unanswered(async_nats::HeaderMap::new(), body.clone()).await;
    // Signed by another key, under this node's key.
    let forged = identity::sign(&identity::generate(), &body).expect("sign");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(headers::NODE_KEY, node.public_key().as_str());
    headers.insert(
        headers::SIGNATURE,
        forged.get(headers::SIGNATURE).expect("signature").as_str(),
    );
    unanswered(headers, body.clone()).await;
    // Signed correctly, over other bytes than those sent.
    let signed = identity::sign(&node.key, &body).expect("sign");
    unanswered(
        signed,
        Bytes::from(
            json!({"node_id": "signed", "seq": 99, "metrics": heartbeat["metrics"]}).to_string(),
        ),
    )
    .await;
    eventually(PATIENCE, "three dropped messages counted", || async {
        (stack
            .scheduler_counters(&scheduler)
            .await
            .get("signatures_invalid")
            == 3)
            .then_some(())
    })
    .await;

    // Validly signed by another node's key: the id is bound to the first key.
    let impostor = HandNode {
        id: node.id.clone(),
        key: identity::generate(),
    };
    let (headers, reply) = impostor
        .request(&nats, NodeVerb::Heartbeat, &heartbeat)
        .await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    assert_eq!(reply["error"]["reason"], "key_mismatch", "{reply}");
    assert_eq!(
        headers.get(headers::SERVICE_ERROR_CODE).map(|v| v.as_str()),
        Some("403")
    );
    let (_, reply) = impostor
        .request(
            &nats,
            NodeVerb::Register,
            &impostor.registration(1, Some(&stack.token)),
        )
        .await;
    assert_eq!(reply["error"]["reason"], "key_mismatch", "{reply}");
    assert_eq!(
        stack
            .scheduler_counters(&scheduler)
            .await
            .get("identity_refused"),
        2
    );
    // The real node is untouched.
    let (_, reply) = node.request(&nats, NodeVerb::Heartbeat, &heartbeat).await;
    assert_eq!(reply["ok"]["registered"], true, "{reply}");
}

#[tokio::test]
async fn a_replayed_heartbeat_is_dropped_and_counted() {
    let stack = Stack::with_heartbeat(Duration::from_secs(60)).await;
    let scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let node = HandNode::new("replayed");
    let mut registration = node.registration(1, Some(&stack.token));
    registration["node"]["incarnation"] = json!("first");
    let (_, reply) = node.request(&nats, NodeVerb::Register, &registration).await;
    assert_eq!(reply["ok"]["node_id"], "replayed", "{reply}");
    let heartbeat = |seq: u64, state: &str| {
        json!({"node_id": "replayed", "seq": seq, "state": state, "incarnation": "first",
               "metrics": {"cpu_percent": 0.0, "memory_used_bytes": 0, "memory_total_bytes": 0,
                           "running_tasks": 0, "slots": 1}})
    };
    let (_, reply) = node
        .request(&nats, NodeVerb::Heartbeat, &heartbeat(2, "active"))
        .await;
    assert_eq!(reply["ok"]["registered"], true, "{reply}");
    // Someone who captured an earlier `leaving` heartbeat, or this one, sends it again.
    for replay in [heartbeat(2, "active"), heartbeat(1, "leaving")] {
        let body = Bytes::from(replay.to_string());
        let headers = identity::sign(&node.key, &body).expect("sign");
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body)
            .timeout(Some(QUIET));
        let answer = nats
            .send_request(
                subject::node(&node.id, NodeVerb::Heartbeat).to_string(),
                request,
            )
            .await;
        assert!(answer.is_err(), "a replayed heartbeat was answered");
    }
    assert_eq!(
        stack
            .scheduler_counters(&scheduler)
            .await
            .get("heartbeats_replayed"),
        2
    );
    // The node is still online: the replayed goodbye changed nothing.
    let nodes = stack.client().await.nodes().await.expect("nodes");
    assert_eq!(nodes[0].status, apiary_proto::message::NodeStatus::Online);
    // The next real heartbeat is taken.
    let (_, reply) = node
        .request(&nats, NodeVerb::Heartbeat, &heartbeat(3, "active"))
        .await;
    assert_eq!(reply["ok"]["registered"], true, "{reply}");
}

#[tokio::test]
async fn a_node_id_stays_bound_to_its_key_until_an_operator_removes_it() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let first = stack.spawn_agent_online("pi-1").await;

    // Another host (another state directory, so another key) claims the same id.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let impostor = apiary_agent::AgentConfig {
        state_dir: Some(elsewhere.path().to_owned()),
        ..stack.agent_config("pi-1")
    };
    let error = stack
        .spawn_agent_with(impostor.clone())
        .exited()
        .await
        .expect_err("refused");
    let refused = error.downcast_ref::<Refused>().expect("a refusal");
    assert_eq!(refused.0.reason, Some(Refusal::KeyMismatch));

    // The operator removes the node: its running agent is told to leave, and goes.
    let client = stack.client().await;
    client
        .remove_node(&apiary_proto::NodeId::new("pi-1").expect("id"))
        .await
        .expect("remove");
    first
        .exited()
        .await
        .expect("a removed agent leaves cleanly");
    assert!(client.nodes().await.expect("nodes").is_empty());

    // The id is free: the other host joins with its own key.
    let _second = stack.spawn_agent_online_with(impostor).await;
    let nodes = client.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    let key = std::fs::read_to_string(elsewhere.path().join(apiary_agent::identity::KEY_FILE))
        .expect("the second host's key");
    let pair = identity::from_seed(&key).expect("a node seed");
    assert_eq!(nodes[0].info.public_key, pair.public_key());
}

#[tokio::test]
async fn in_approval_mode_a_new_node_runs_nothing_until_approved() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;
    client
        .set_approval(Approval::Manual)
        .await
        .expect("approval mode");
    let _agent = stack.spawn_agent_online("newcomer").await;
    let node = apiary_proto::NodeId::new("newcomer").expect("id");
    assert_eq!(
        client.node(&node).await.expect("show").scheduling,
        Scheduling::Pending
    );

    let mut dispatches = stack.dispatch_wire().await;
    let handle = client
        .submit(apiary_sdk::Task::new(wasm("uppercase")).input("let me in"))
        .await
        .expect("submit");
    // Nothing is placed while the node waits: the wire stays quiet.
    let placed = tokio::time::timeout(QUIET, dispatches.next()).await;
    if let Ok(Some(message)) = placed {
        let (dispatch, _) =
            codec::decode_message::<Dispatch>(message.headers.as_ref(), &message.payload)
                .expect("a dispatch");
        panic!("a task was placed on a pending node: {dispatch:?}");
    }

    let approved = client.approve(&node).await.expect("approve");
    assert_eq!(approved.scheduling, Scheduling::Open);
    let output = within(PATIENCE, "the task after approval", handle.result())
        .await
        .expect("the task runs once the node is approved");
    assert_eq!(output.node_id, node);
    assert_eq!(&output.stdout[..], b"LET ME IN");
}

#[tokio::test]
async fn a_fleet_registering_at_once_with_one_token_spends_exactly_its_uses_across_replicas() {
    // Two replicas, so that batches written by one race the other's; 40 nodes at once for a
    // token of 30 uses: exactly 30 join, the rest are told it is used up, and the token
    // counts 30 uses with none left.
    let stack = Stack::start().await;
    let _replicas = [stack.spawn_scheduler().await, stack.spawn_scheduler().await];
    let client = stack.client().await;
    let token = mint_token(stack.url(), "fleet", None, Some(30)).await;
    let nats = stack.nats().await;
    let nodes: Vec<HandNode> = (0..40)
        .map(|i| HandNode::new(&format!("fleet-{i}")))
        .collect();
    let bodies: Vec<_> = nodes
        .iter()
        .map(|node| node.registration(1, Some(token.as_str())))
        .collect();
    let replies = futures::future::join_all(
        nodes
            .iter()
            .zip(&bodies)
            .map(|(node, body)| node.request(&nats, NodeVerb::Register, body)),
    )
    .await;
    let joined = replies
        .iter()
        .filter(|(_, reply)| reply.get("ok").is_some())
        .count();
    let used_up = replies
        .iter()
        .filter(|(_, reply)| reply["error"]["reason"] == "token_used_up")
        .count();
    assert_eq!((joined, used_up), (30, 10), "{replies:?}");
    let fleet = client
        .tokens()
        .await
        .expect("list tokens")
        .into_iter()
        .find(|token| token.description == "fleet")
        .expect("the fleet's token is listed");
    assert_eq!((fleet.uses, fleet.uses_left), (30, Some(0)));
}
