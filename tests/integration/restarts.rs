//! Restarts and churn: schedulers and agents that die and come back, and nodes that arrive
//! while work waits. The cluster must carry on from what NATS holds, promptly, and hand
//! every submitter each result once.

use std::collections::BTreeMap;
use std::time::Duration;

use apiary_harness::{Deliveries, PATIENCE, Stack, eventually, sleeping_module, wasm, within};
use apiary_proto::message::{NodeStatus, NodesListReply, NodesListRequest, TaskResult};
use apiary_proto::{NodeId, now_ms, rpc, subject, topology};
use apiary_sdk::Task;
use futures::StreamExt as _;

#[tokio::test]
async fn a_replica_started_after_the_nodes_registered_places_on_them() {
    // A one-second interval: the new replica gets one interval to know the node, which must
    // be room enough for a request on a loaded machine, and the node stays online (2.5
    // intervals) across the moment no replica answers its heartbeats.
    let interval = Duration::from_secs(1);
    let stack = Stack::with_heartbeat(interval).await;
    let first = stack.spawn_scheduler().await;
    let _agent = stack.spawn_agent_online("node-a").await;
    let before = stack
        .run(Task::new(wasm("uppercase")).input("before"))
        .await
        .expect("the first replica places the task");
    assert_eq!(before.node_id.as_str(), "node-a");
    let registration = stack
        .node_record("node-a")
        .await
        .expect("node-a registered");

    first.crash().await;
    let second = stack.spawn_scheduler().await;
    let ready_ms = now_ms();

    // The new replica knows the node from the node bucket: it lists it online within one
    // heartbeat interval of being ready, from the records already there.
    let nats = stack.nats().await;
    let nodes = eventually(
        interval,
        "the new replica to list node-a online",
        || async {
            let reply: NodesListReply = rpc::request(
                &nats,
                subject::nodes_list(),
                &NodesListRequest::default(),
                interval,
            )
            .await
            .ok()?;
            let listed = reply.nodes.iter().any(|node| {
                node.info.node_id.as_str() == "node-a" && node.status == NodeStatus::Online
            });
            listed.then_some(reply.nodes)
        },
    )
    .await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");

    // The node's heartbeats reach the new replica and are accepted as they are: the node is
    // not asked to register again, so its registration record is the one it made with the
    // first replica.
    let mut liveness = stack.watch_liveness("node-a").await;
    within(
        PATIENCE,
        "a heartbeat stored by the new replica",
        liveness
            .by_ref()
            .filter(|live| std::future::ready(live.last_seen_ms >= ready_ms))
            .next(),
    )
    .await
    .expect("the liveness watch is open");
    assert_eq!(
        stack.node_record("node-a").await,
        Some(registration),
        "node-a registered again"
    );
    let counters = stack.scheduler_counters(&second).await;
    assert_eq!(counters.get("heartbeats_refused"), 0, "{counters:?}");
    assert_eq!(counters.get("nodes_registered"), 0, "{counters:?}");

    // And it places work on the node.
    let after = stack
        .run(Task::new(wasm("uppercase")).input("after"))
        .await
        .expect("the new replica places the task");
    assert_eq!(after.stdout.as_ref(), b"AFTER");
    assert_eq!(after.node_id.as_str(), "node-a");
    assert_eq!(
        stack.scheduler_counters(&second).await.get("tasks_placed"),
        1
    );
}

#[tokio::test]
async fn restarting_the_only_replica_under_load_loses_nothing() {
    const TASKS: usize = 200;
    let stack = Stack::start().await;
    let first = stack.spawn_scheduler().await;
    let _agent = stack.spawn_agent_online("node-a").await;
    let (client, mut wire) = stack.client_with_inbox("_INBOX.restart").await;
    let module = client
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");

    let submissions = (0..TASKS).map(|i| {
        let client = client.clone();
        let module = module.clone();
        async move {
            let input = format!("task {i} of the load");
            let handle = client
                .submit(Task::stored(module).input(input.clone()))
                .await
                .expect("submit");
            (input, handle)
        }
    });
    let handles = futures::future::join_all(submissions).await;

    // Midway: some results are back, others are waiting, placed, running or on their way.
    let mut deliveries = Deliveries::default();
    deliveries.read(&mut wire, TASKS / 4, PATIENCE).await;
    first.crash().await;
    let _second = stack.spawn_scheduler().await;

    // Every task comes back with its own output. What the crashed replica had pulled and
    // not acknowledged returns to the queues once the scheduler consumers' ack wait runs
    // out.
    let limit = topology::SCHEDULER_ACK_WAIT + PATIENCE;
    let outputs =
        futures::future::join_all(handles.into_iter().map(|(input, handle)| async move {
            let output = handle
                .result_within(limit)
                .await
                .expect("the task completes");
            (input, output)
        }))
        .await;
    for (input, output) in outputs {
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            input.to_uppercase()
        );
    }
    // On the wire, each task's result arrived, and any repeat is the stored result published
    // again: a replica that dies between publishing a result and acknowledging it leaves
    // the result to be published once more (delivery is at least once, see ARCHITECTURE),
    // but no node was lost, so there is no second attempt. The client hands each handle one
    // result and counts the repeats it drops.
    deliveries.read_until_quiet(&mut wire, TASKS, limit).await;
    deliveries.assert_repeats_are_copies(TASKS);
    assert_eq!(
        client.duplicate_results(),
        u64::try_from(deliveries.repeats()).expect("a count"),
        "repeats on the wire and repeats the client dropped"
    );
}

#[tokio::test]
async fn a_restarted_agent_gets_its_held_work_back_without_waiting_out_the_ack_wait() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;

    // Two tasks that fill both of node-a's slots and are still running when it dies.
    let long = sleeping_module(Duration::from_secs(3));
    let mut handles = Vec::new();
    for input in ["first", "second"] {
        let task = Task::new(long.clone())
            .input(input)
            .timeout(Duration::from_secs(60));
        handles.push((input, client.submit(task).await.expect("submit")));
    }
    let node = NodeId::new("node-a").expect("id");
    let consumer = stack
        .consumer(
            topology::DISPATCH_STREAM,
            &topology::node_dispatch_consumer_name(&node),
        )
        .await;
    eventually(PATIENCE, "node-a to hold both tasks", || async {
        (consumer.get_info().await.ok()?.num_ack_pending == 2).then_some(())
    })
    .await;
    let before = stack.node_record("node-a").await.expect("registered");

    agent.crash().await;
    let restarted = tokio::time::Instant::now();
    let _agent = stack.spawn_agent_online("node-a").await;
    let after = stack.node_record("node-a").await.expect("registered");
    assert_ne!(
        after.info.incarnation, before.info.incarnation,
        "the restarted agent is a new incarnation"
    );
    // New work is taken too, not only the old.
    handles.push((
        "fresh",
        client
            .submit(Task::new(wasm("uppercase")).input("fresh"))
            .await
            .expect("submit"),
    ));

    // Everything completes on the restarted node well before the ack wait would have handed
    // the held tasks out again: the ack wait is no part of the recovery.
    let limit = topology::ACK_WAIT / 2;
    for (input, handle) in handles {
        let left = limit.saturating_sub(restarted.elapsed());
        let output = handle
            .result_within(left)
            .await
            .unwrap_or_else(|err| panic!("task {input} within {limit:?} of the restart: {err}"));
        assert_eq!(output.node_id.as_str(), "node-a");
        let expected = if input == "fresh" { "FRESH" } else { input };
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    }
}

#[tokio::test]
async fn waiting_work_spreads_over_nodes_that_arrive_one_after_another() {
    const TASKS: u64 = 40;
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;
    // A second each: long enough that no task finishes while node-a's share is sampled
    // below, so the counts read there are not blurred by work moving on.
    let module = client
        .upload_module(&sleeping_module(Duration::from_secs(1)))
        .await
        .expect("upload");
    let mut handles = Vec::new();
    for i in 0..TASKS {
        let input = format!("task {i}");
        let task = Task::stored(module.clone()).input(input.clone());
        handles.push((input, client.submit(task).await.expect("submit")));
    }
    let queue = stack
        .consumer(topology::TASKS_STREAM, topology::SCHEDULER_TASKS_CONSUMER)
        .await;
    eventually(PATIENCE, "every task to wait in the queue", || async {
        let info = queue.get_info().await.ok()?;
        (info.num_pending == TASKS && info.num_ack_pending == 0).then_some(())
    })
    .await;

    // The first node gets no more than its slots and a backlog as deep (2 + 2); the rest
    // stays in the shared queue for the nodes still to come.
    let _a = stack.spawn_agent_online("node-a").await;
    let bound = 2 + 2;
    let node_a = stack
        .consumer(
            topology::DISPATCH_STREAM,
            &topology::node_dispatch_consumer_name(&NodeId::new("node-a").expect("id")),
        )
        .await;
    let held = |info: &async_nats::jetstream::consumer::Info| {
        info.num_pending + info.num_ack_pending as u64
    };
    eventually(
        PATIENCE,
        "node-a to be given its slots' worth and a backlog",
        || async { (held(&node_a.get_info().await.ok()?) == bound).then_some(()) },
    )
    .await;
    let js = async_nats::jetstream::new(stack.nats().await);
    let results = js
        .get_stream(topology::RESULTS_STREAM)
        .await
        .expect("results stream");
    // Several reads over a quarter of a second, while node-a's first tasks run: the bound
    // must hold throughout, not only at one instant, and every task that is neither at
    // node-a nor done must still be waiting in the queue, not pulled and held by the
    // scheduler. The pause paces the samples; nothing waits on it.
    for _ in 0..5 {
        let at_node = held(&node_a.get_info().await.expect("node-a's consumer"));
        assert!(at_node <= bound, "node-a holds {at_node} tasks");
        let queued = queue.get_info().await.expect("the scheduler's consumer");
        let done = results.get_info().await.expect("results").state.messages;
        assert!(
            queued.num_pending + at_node + done >= TASKS,
            "{} tasks waiting in the queue, {} pulled by the scheduler, {at_node} at node-a, \
             {done} done",
            queued.num_pending,
            queued.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _b = stack.spawn_agent_online("node-b").await;
    let _c = stack.spawn_agent_online("node-c").await;
    let _d = stack.spawn_agent_online("node-d").await;
    let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
    for (input, handle) in handles {
        let output = handle.result_within(PATIENCE).await.expect("completes");
        assert_eq!(String::from_utf8_lossy(&output.stdout), input);
        *per_node.entry(output.node_id.to_string()).or_default() += 1;
    }
    assert_eq!(
        per_node.keys().map(String::as_str).collect::<Vec<_>>(),
        ["node-a", "node-b", "node-c", "node-d"],
        "every node ran some of the waiting work: {per_node:?}"
    );
}

#[tokio::test]
async fn the_sdk_hands_each_task_one_result_even_when_the_wire_repeats_it() {
    let (stack, _running) = Stack::with_one_node().await;
    let (client, mut wire) = stack.client_with_inbox("_INBOX.test").await;
    let handle = client
        .submit(Task::new(wasm("uppercase")).input("once"))
        .await
        .expect("submit");

    // The result as the scheduler sent it, and two repeats: the very same message, as a
    // redelivery would send it again, and a later attempt's result for the same task.
    let original = within(PATIENCE, "the result on the wire", wire.next())
        .await
        .expect("subscription open");
    let headers = original.headers.clone().unwrap_or_default();
    let nats = stack.nats().await;
    nats.publish_with_headers(
        original.subject.clone(),
        headers.clone(),
        original.payload.clone(),
    )
    .await
    .expect("publish the repeat");
    let (mut second_attempt, _) = apiary_proto::codec::decode_message::<TaskResult>(
        original.headers.as_ref(),
        &original.payload,
    )
    .expect("a task result");
    assert_eq!(second_attempt.attempt, 1);
    second_attempt.attempt = 2;
    nats.publish_with_headers(
        original.subject.clone(),
        headers,
        apiary_proto::codec::encode(&second_attempt).expect("encode"),
    )
    .await
    .expect("publish the second attempt");
    nats.flush().await.expect("flush");

    let output = handle
        .result_within(PATIENCE)
        .await
        .expect("the task completes");
    assert_eq!(output.stdout.as_ref(), b"ONCE");
    assert_eq!(output.attempt, 1, "the first result to arrive is the one");
    eventually(PATIENCE, "both repeats to be counted", || async {
        (client.duplicate_results() == 2).then_some(())
    })
    .await;

    // The client goes on as before.
    let next = client
        .submit(Task::new(wasm("uppercase")).input("next"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the next task completes");
    assert_eq!(next.stdout.as_ref(), b"NEXT");
    assert_eq!(client.duplicate_results(), 2);
}
