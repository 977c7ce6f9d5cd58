//! The protocol as an operator with the `nats` CLI sees it: JSON in, JSON out, micro service
//! discovery, and what happens to malformed messages.

use std::time::Duration;

use apiary_harness::{HandNode, PATIENCE, QUIET, Stack, eventually, sleeping_module, wasm, within};
use apiary_proto::message::ModuleRef;
use apiary_proto::{headers, subject, topology};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};

async fn json_request(
    nats: &async_nats::Client,
    subject: String,
    body: Value,
) -> (HeaderMap, Value) {
    let reply = within(
        PATIENCE,
        "a reply",
        nats.request(subject, Bytes::from(body.to_string())),
    )
    .await
    .expect("request answered");
    let value = json_body(&reply);
    (reply.headers.unwrap_or_default(), value)
}

/// A message's JSON body, which its `Content-Type` must say is JSON.
fn json_body(message: &async_nats::Message) -> Value {
    let content_type = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(headers::CONTENT_TYPE))
        .map(|value| value.as_str().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"));
    serde_json::from_slice(&message.payload).unwrap_or_else(|err| {
        panic!(
            "the body is not JSON ({err}): {:?}",
            String::from_utf8_lossy(&message.payload)
        )
    })
}

/// Publishes `submission` to the task queue as `nats pub` would (JSON, no message id) and
/// waits until JetStream has stored it.
async fn submit_json(nats: &async_nats::Client, submission: &Value) {
    async_nats::jetstream::new(nats.clone())
        .publish(subject::task_submit(), Bytes::from(submission.to_string()))
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn json_requests_get_json_replies() {
    // A long interval: the hand-registered node never heartbeats, and must still be online
    // when it is listed.
    let stack = Stack::with_heartbeat(Duration::from_secs(60)).await;
    let _scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;

    // Register a node by hand, as a client in another language would: a JSON body signed
    // with the node's own key, with a join token.
    let hand = HandNode::new("hand-made");
    let mut registration = hand.registration(1, Some(&stack.token));
    registration["node"]["arch"] = json!("riscv64");
    registration["node"]["cpu_cores"] = json!(4);
    let (_, reply) = hand
        .request(&nats, subject::NodeVerb::Register, &registration)
        .await;
    assert_eq!(reply["ok"]["node_id"], "hand-made");
    assert_eq!(reply["ok"]["heartbeat_interval_ms"], 60_000);

    let (_, reply) = json_request(&nats, subject::nodes_list().to_string(), json!({})).await;
    let nodes = reply["ok"]["nodes"].as_array().expect("a node array");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["info"]["arch"], "riscv64");
    assert_eq!(nodes[0]["status"], "online");
}

#[tokio::test]
async fn an_empty_request_body_counts_as_json() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let reply = within(
        PATIENCE,
        "a reply",
        nats.request(subject::nodes_list().to_string(), Bytes::new()),
    )
    .await
    .expect("answered");
    let value: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert!(value["ok"]["nodes"].is_array(), "{value}");
}

#[tokio::test]
async fn malformed_and_forged_requests_get_typed_errors() {
    let stack = Stack::start().await;
    let scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let node = HandNode::new("n1");
    let signed = |body: &[u8]| {
        let body = Bytes::copy_from_slice(body);
        let headers = apiary_proto::identity::sign(&node.key, &body).expect("sign");
        (body, headers)
    };

    // Unsigned, whatever it holds: dropped without a word, and counted.
    let unsigned = async_nats::Request::new()
        .payload(Bytes::from_static(b"{oops"))
        .timeout(Some(QUIET));
    let answer = nats
        .send_request(
            subject::node(&node.id, subject::NodeVerb::Register).to_string(),
            unsigned,
        )
        .await;
    assert!(answer.is_err(), "an unsigned registration was answered");
    assert_eq!(
        stack
            .scheduler_counters(&scheduler)
            .await
            .get("signatures_invalid"),
        1
    );

    // Signed, but not even JSON.
    let (body, headers) = signed(b"{oops");
    let (headers, value) = node
        .request_raw(&nats, subject::NodeVerb::Register, body, headers)
        .await;
    assert_eq!(value["error"]["code"], "bad_request", "{value}");
    assert_eq!(
        headers.get(headers::SERVICE_ERROR_CODE).map(|v| v.as_str()),
        Some("400")
    );

    // Valid JSON, wrong shape.
    let (_, value) = node
        .request(&nats, subject::NodeVerb::Register, &json!({"node": 5}))
        .await;
    assert_eq!(value["error"]["code"], "bad_request", "{value}");

    // A node speaking for another node.
    let mut forged = node.registration(1, Some(&stack.token));
    forged["node"]["node_id"] = json!("someone-else");
    let (headers, value) = node
        .request(&nats, subject::NodeVerb::Register, &forged)
        .await;
    assert_eq!(value["error"]["code"], "forbidden", "{value}");
    assert_eq!(
        headers.get(headers::SERVICE_ERROR_CODE).map(|v| v.as_str()),
        Some("403")
    );

    // The scheduler survived all of it.
    let (_, value) = json_request(&nats, subject::nodes_list().to_string(), json!({})).await;
    assert!(value["ok"]["nodes"].as_array().expect("nodes").is_empty());
}

#[tokio::test]
async fn the_scheduler_answers_the_micro_protocol() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    let mut replies = nats.subscribe("ping.replies").await.expect("subscribe");
    // `nats micro ls` publishes to $SRV.PING and collects every reply.
    nats.publish_with_reply("$SRV.PING.apiary-scheduler", "ping.replies", Bytes::new())
        .await
        .expect("publish");
    let reply = within(PATIENCE, "a ping reply", replies.next())
        .await
        .expect("reply");
    let value: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(value["name"], "apiary-scheduler");
    assert_eq!(value["type"], "io.nats.micro.v1.ping_response");

    let info = within(
        PATIENCE,
        "info",
        nats.request("$SRV.INFO.apiary-scheduler", Bytes::new()),
    )
    .await
    .expect("info");
    let value: Value = serde_json::from_slice(&info.payload).expect("JSON");
    let subjects: Vec<&str> = value["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    let register = subject::all_nodes(subject::NodeVerb::Register);
    assert!(subjects.contains(&register.as_str()), "{subjects:?}");
    let list = subject::nodes_list();
    assert!(subjects.contains(&list.as_str()), "{subjects:?}");
}

#[tokio::test]
async fn refusals_are_counted_in_the_micro_stats_and_still_carry_their_body() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let nats = stack.nats().await;
    // A body that is JSON but not an object: refused as JSON, with its body.
    let reply = within(
        PATIENCE,
        "a refusal",
        nats.request(
            subject::nodes_list().to_string(),
            Bytes::from_static(b"null"),
        ),
    )
    .await
    .expect("answered");
    let value: Value = serde_json::from_slice(&reply.payload).expect("a JSON body");
    assert_eq!(value["error"]["code"], "bad_request", "{value}");
    let message = value["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("JSON"), "{message}");

    let stats = within(
        PATIENCE,
        "stats",
        nats.request("$SRV.STATS.apiary-scheduler", Bytes::new()),
    )
    .await
    .expect("stats");
    let stats: Value = serde_json::from_slice(&stats.payload).expect("JSON");
    let list = stats["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|endpoint| endpoint["subject"] == subject::nodes_list().as_str())
        .expect("the nodes-list endpoint")
        .clone();
    assert_eq!(list["num_requests"], 1, "{list}");
    assert_eq!(list["num_errors"], 1, "{list}");
    assert!(
        list["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("400")),
        "{list}"
    );
}

#[tokio::test]
async fn a_hand_written_json_submission_runs_and_answers_in_json() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    // `nats obj put APIARY_MODULES --name <sha256> uppercase.wasm`
    let module: ModuleRef = client
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");

    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let mut results = nats.subscribe(inbox.clone()).await.expect("subscribe");
    let submission = json!({
        "id": "by-hand-1",
        "module": {"sha256": module.sha256},
        "input": "shout this",
        "reply_to": inbox,
    });
    submit_json(&nats, &submission).await;

    let message = within(PATIENCE, "the result", results.next())
        .await
        .expect("result");
    // Results are stored in MessagePack, and answer a JSON submission in JSON, as
    // `nats sub` shows it.
    let result = json_body(&message);
    assert_eq!(result["task_id"], "by-hand-1");
    assert_eq!(
        result["outcome"]["completed"]["stdout"], "SHOUT THIS",
        "{result}"
    );

    // The same id again, after the task ended: answered with that task, in JSON too.
    submit_json(&nats, &submission).await;
    let again = within(PATIENCE, "the earlier task's result", results.next())
        .await
        .expect("result");
    let again: Value = serde_json::from_slice(&again.payload).expect("a JSON result");
    assert_eq!(
        again["outcome"]["completed"]["stdout"], "SHOUT THIS",
        "{again}"
    );
}

#[tokio::test]
async fn each_submitter_of_a_live_task_gets_its_outcome_in_its_own_encoding() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    // The SDK submits in MessagePack, under an id of its own choosing, a task that takes a
    // moment.
    let handle = client
        .submit(
            apiary_sdk::Task::new(sleeping_module(Duration::from_millis(500)))
                .id(apiary_sdk::TaskId::new("shared-1").expect("an id"))
                .input("both of us"),
        )
        .await
        .expect("submit");
    let mut transitions = std::pin::pin!(handle.watch());
    within(PATIENCE, "the task to be placed", async {
        while let Some(record) = transitions.next().await {
            if record.expect("a record").state != apiary_sdk::TaskState::Pending {
                return;
            }
        }
        panic!("the watch ended before the task was placed");
    })
    .await;

    // While it runs, someone with the `nats` CLI submits the same id in JSON.
    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let mut results = nats.subscribe(inbox.clone()).await.expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    let module = ModuleRef::for_bytes(&sleeping_module(Duration::from_millis(500)));
    let resubmission = json!({
        "id": "shared-1",
        "module": {"sha256": module.sha256},
        "input": "both of us",
        "reply_to": inbox,
    });
    submit_json(&nats, &resubmission).await;

    let message = within(PATIENCE, "the JSON submitter's result", results.next())
        .await
        .expect("a result");
    let result = json_body(&message);
    assert_eq!(result["task_id"], "shared-1", "{result}");
    assert_eq!(
        result["outcome"]["completed"]["stdout"], "both of us",
        "{result}"
    );
    // The SDK, which wrote MessagePack, reads its own as before.
    let output = handle
        .result_within(PATIENCE)
        .await
        .expect("the SDK's result");
    assert_eq!(output.stdout.as_ref(), b"both of us");
}

#[tokio::test]
async fn a_submission_with_an_invalid_id_is_answered_with_invalid_task() {
    let (stack, _running) = Stack::with_one_node().await;
    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await.expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    let submission = json!({
        "id": "has.a.dot",
        "module": {"sha256": "00"},
        "reply_to": inbox,
    });
    submit_json(&nats, &submission).await;
    let answer = within(PATIENCE, "the refusal", answers.next())
        .await
        .expect("an answer");
    // Answered in kind: a JSON submission gets JSON, shaped as a task result.
    let refusal = json_body(&answer);
    assert_eq!(refusal["task_id"], "has.a.dot");
    assert_eq!(
        refusal["outcome"]["failed"]["error"]["kind"],
        "invalid_task"
    );
    let message = refusal["outcome"]["failed"]["error"]["message"]
        .as_str()
        .expect("a message");
    assert!(message.contains("'.'"), "{message}");
}

#[tokio::test]
async fn malformed_submissions_are_dropped_without_blocking_the_queue() {
    let (stack, _running) = Stack::with_one_node().await;
    let js = async_nats::jetstream::new(stack.nats().await);
    let client = stack.client().await;
    for garbage in [&b"\xc1\xc1\xc1"[..], b"{\"module\": 12}", b"{}"] {
        js.publish(subject::task_submit(), Bytes::copy_from_slice(garbage))
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    // A task whose reply subject points into the JetStream API is refused, not delivered.
    let module = client
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");
    let hostile = json!({
        "id": "hostile-1",
        "module": {"sha256": module.sha256},
        "reply_to": "$JS.API.STREAM.DELETE.APIARY_TASKS",
    });
    js.publish(subject::task_submit(), Bytes::from(hostile.to_string()))
        .await
        .expect("publish")
        .await
        .expect("stored");

    let output = client
        .submit(apiary_sdk::Task::new(wasm("uppercase")).input("after the garbage"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("a good task still runs");
    assert_eq!(output.stdout.as_ref(), b"AFTER THE GARBAGE");

    // Every bad submission was terminated, which removes it from the work queue, and the
    // task stream survived the hostile reply subject.
    let tasks = js
        .get_stream(topology::TASKS_STREAM)
        .await
        .expect("task stream");
    eventually(
        PATIENCE,
        "every submission to leave the task stream",
        || async { (tasks.get_info().await.ok()?.state.messages == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn agents_answer_the_micro_protocol_and_report_their_status() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = stack.spawn_agent_online("node-a").await;
    let _b = stack.spawn_agent_online("node-b").await;
    let nats = stack.nats().await;

    // `nats micro ls` sees every agent, each with its node id in the metadata.
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.expect("subscribe");
    nats.publish_with_reply("$SRV.INFO.apiary-agent", inbox, Bytes::new())
        .await
        .expect("publish");
    let mut nodes: Vec<String> = within(PATIENCE, "two agents' info", async {
        let mut nodes = Vec::new();
        while nodes.len() < 2 {
            let reply = replies.next().await.expect("reply");
            let value: Value = serde_json::from_slice(&reply.payload).expect("JSON");
            assert_eq!(value["name"], "apiary-agent");
            nodes.push(
                value["metadata"]["node_id"]
                    .as_str()
                    .expect("node id")
                    .to_owned(),
            );
        }
        nodes
    })
    .await;
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);

    // And each answers for itself, in JSON when asked in JSON. The node is online once the
    // scheduler has stored its registration; the agent learns the heartbeat interval from
    // the reply a moment later, and reports 0 until then.
    let node = apiary_proto::NodeId::new("node-b").expect("id");
    let status = eventually(PATIENCE, "node-b to report its registration", || async {
        let (_, status) = json_request(
            &nats,
            subject::node(&node, subject::NodeVerb::Status).to_string(),
            json!({}),
        )
        .await;
        (status["ok"]["heartbeat_interval_ms"] != 0).then_some(status)
    })
    .await;
    assert_eq!(status["ok"]["info"]["node_id"], "node-b", "{status}");
    assert_eq!(status["ok"]["metrics"]["slots"], 2);
    assert_eq!(status["ok"]["heartbeat_interval_ms"], 200);
}

/// A program in another language uses the app store and messaging with a plain NATS client
/// and JSON, and meets the SDK's view of the same namespace.
#[tokio::test]
async fn a_plain_client_uses_the_app_store_and_topics_without_the_sdk() {
    let stack = Stack::start().await;
    let nats = stack.nats().await;
    let sdk = stack.client().await;

    // The bucket, made through the JetStream API as `nats kv add APIARY_KV_plain` does (the
    // SDK makes the same on first use).
    let config = json!({
        "name": "KV_APIARY_KV_plain",
        "subjects": ["$KV.APIARY_KV_plain.>"],
        "max_msgs_per_subject": 1,
        "discard": "new",
        "allow_direct": true,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "storage": "file",
        "num_replicas": 1,
    });
    let created = within(
        PATIENCE,
        "the bucket",
        nats.request(
            "$JS.API.STREAM.CREATE.KV_APIARY_KV_plain",
            Bytes::from(config.to_string()),
        ),
    )
    .await
    .expect("answered");
    let created: Value = serde_json::from_slice(&created.payload).expect("JSON");
    assert!(created.get("error").is_none(), "{created}");

    // A put is a publish on the key's subject, acknowledged by JetStream.
    let put = within(
        PATIENCE,
        "the put's ack",
        nats.request(
            "$KV.APIARY_KV_plain.greeting.en",
            Bytes::from_static(b"{\"text\":\"hello\"}"),
        ),
    )
    .await
    .expect("acked");
    let put: Value = serde_json::from_slice(&put.payload).expect("JSON ack");
    assert_eq!(put["stream"], "KV_APIARY_KV_plain", "{put}");

    // The SDK reads it, and writes one the plain client reads with a direct get.
    let kv = sdk.kv("plain").await.expect("the namespace");
    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Greeting {
        text: String,
    }
    assert_eq!(
        kv.get_json::<Greeting>("greeting.en").await.expect("get"),
        Greeting {
            text: "hello".into()
        }
    );
    kv.put("greeting.fr", "bonjour").await.expect("put");
    let got = within(
        PATIENCE,
        "a direct get",
        nats.request(
            "$JS.API.DIRECT.GET.KV_APIARY_KV_plain",
            Bytes::from(json!({"last_by_subj": "$KV.APIARY_KV_plain.greeting.fr"}).to_string()),
        ),
    )
    .await
    .expect("answered");
    assert_eq!(got.payload, "bonjour");

    // Topics are plain subjects: the SDK hears the plain client, and the other way round.
    let pubsub = sdk.pubsub("plain").expect("the namespace");
    let mut sdk_hears = pubsub.subscribe("news.*").await.expect("subscribe");
    let mut plain_hears = nats
        .subscribe(subject::app_topic(
            &"plain".parse().expect("a namespace"),
            "replies",
        ))
        .await
        .expect("subscribe");
    // The SDK's subscribe returns once the server has its subscription; the plain client
    // makes sure of its own with a round trip (a flush only empties its socket buffer).
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    nats.publish(
        "apiary.v1.app.plain.news.today",
        Bytes::from_static(b"{\"n\":1}"),
    )
    .await
    .expect("publish");
    let heard = within(PATIENCE, "the SDK to hear it", sdk_hears.next())
        .await
        .expect("a message");
    assert_eq!(
        (heard.topic.as_str(), heard.payload.as_ref()),
        ("news.today", &b"{\"n\":1}"[..])
    );
    pubsub.publish("replies", "ok").await.expect("publish");
    let heard = within(PATIENCE, "the plain client to hear it", plain_hears.next())
        .await
        .expect("a message");
    assert_eq!(heard.subject.as_str(), "apiary.v1.app.plain.replies");
    assert_eq!(heard.payload, "ok");
}
