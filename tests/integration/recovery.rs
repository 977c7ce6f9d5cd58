//! Work lost with a node: moved to another node, or, after too many losses, failed with a
//! typed `node_lost` error. Nothing is dropped.

use std::time::Duration;

use apiary_harness::{
    PATIENCE, QUIET, Stack, eventually, results_until_quiet, sleeping_module, wasm, within,
};
use apiary_proto::lifecycle::{TaskRecord, TaskState};
use apiary_proto::message::{
    Dispatch, ModuleRef, Outcome, TaskErrorKind, TaskResult, TaskSubmission,
};
use apiary_proto::{NodeId, TaskId, now_ms, stored, topology};
use apiary_sdk::Task;
use futures::StreamExt as _;

/// A dispatch of `module` as the scheduler would have placed it, results to `reply_to`.
fn dispatch(module: ModuleRef, reply_to: String, attempt: u32) -> Dispatch {
    Dispatch {
        task: TaskSubmission {
            id: TaskId::generate(),
            module,
            input: "moved".into(),
            limits: Default::default(),
            requirements: Default::default(),
            priority: Default::default(),
            reply_to: Some(reply_to),
            submitted_at_ms: now_ms(),
            retry: None,
            queue_timeout_ms: None,
            fresh_id: true,
            grants: Default::default(),
        },
        attempt,
        dispatched_at_ms: now_ms(),
    }
}

/// Crashes `node`'s agent and places a task on it, as if the scheduler had done so just
/// before the crash was noticed: the task's record says it is scheduled there as `attempt`
/// (every earlier attempt lost with its node), and the dispatch waits in the node's queue.
/// Returns the subscription its result will arrive on.
async fn strand_on_crashed_node(stack: &Stack, node: &str, attempt: u32) -> async_nats::Subscriber {
    let agent = stack.spawn_agent_online(node).await;
    agent.crash().await;
    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let results = nats.subscribe(inbox.clone()).await.expect("subscribe");
    let client = stack.client().await;
    let module = client
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");
    let js = async_nats::jetstream::new(nats);
    let node = NodeId::new(node).expect("id");
    let dispatch = dispatch(module, inbox, attempt);
    let mut record = TaskRecord::new(dispatch.task.clone(), 0, now_ms());
    record.attempt = attempt - 1;
    record.failures = attempt - 1;
    let record = record.placed(&node, 0, now_ms()).expect("placed");
    js.get_key_value(topology::TASK_RECORDS_BUCKET)
        .await
        .expect("record bucket")
        .create(
            topology::task_record_key(&record.id),
            apiary_proto::codec::encode(&record).expect("encode"),
        )
        .await
        .expect("record stored");
    stored::dispatch(&js, &node, &dispatch)
        .await
        .expect("stored");
    results
}

/// Waits until `scheduler` has discarded exactly one late result.
async fn one_late_result_discarded(stack: &Stack, scheduler: &apiary_harness::Component) {
    eventually(PATIENCE, "the late result to be discarded", || async {
        (stack
            .scheduler_counters(scheduler)
            .await
            .get("results_superseded")
            == 1)
            .then_some(())
    })
    .await;
}

async fn next_result(results: &mut async_nats::Subscriber) -> TaskResult {
    let message = within(PATIENCE, "a result", results.next())
        .await
        .expect("a message");
    apiary_proto::codec::decode_message::<TaskResult>(message.headers.as_ref(), &message.payload)
        .expect("a task result")
        .0
}

#[tokio::test]
async fn work_queued_for_a_dead_node_moves_to_a_live_one() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let mut results = strand_on_crashed_node(&stack, "node-a", 1).await;
    let _b = stack.spawn_agent_online("node-b").await;

    let result = next_result(&mut results).await;
    assert_eq!(result.node_id.as_str(), "node-b");
    assert_eq!(result.attempt, 2, "the move counts as a new attempt");
    match result.outcome {
        Outcome::Completed { stdout, .. } => assert_eq!(stdout.as_bytes(), b"MOVED"),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::test]
async fn a_task_whose_nodes_keep_dying_is_dead_and_succeeds_once_requeued() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let max_attempts = stack.scheduler_config().max_attempts;
    let mut results = strand_on_crashed_node(&stack, "node-a", max_attempts).await;
    let _b = stack.spawn_agent_online("node-b").await;

    let result = next_result(&mut results).await;
    assert_eq!(result.attempt, max_attempts);
    match result.outcome {
        Outcome::Failed { error, .. } => assert_eq!(error.kind, TaskErrorKind::NodeLost),
        other => panic!("unexpected outcome {other:?}"),
    }
    let client = stack.client().await;
    let record = client.task_status(&result.task_id).await.expect("status");
    assert_eq!(record.state, TaskState::Dead);
    let dead = client
        .dead_letter(&result.task_id)
        .await
        .expect("in the dead-letter stream");
    assert_eq!(
        dead.record.task.input.as_bytes(),
        b"moved",
        "kept whole, input and all"
    );

    // Requeued, it runs on the live node, under the next attempt, and its submitter hears.
    let requeued = client.requeue_dead(&result.task_id).await.expect("requeue");
    assert_eq!(requeued.state, TaskState::Pending);
    let result = next_result(&mut results).await;
    assert_eq!(result.node_id.as_str(), "node-b");
    assert_eq!(result.attempt, max_attempts + 1);
    match result.outcome {
        Outcome::Completed { stdout, .. } => assert_eq!(stdout.as_bytes(), b"MOVED"),
        other => panic!("unexpected outcome {other:?}"),
    }
    let record = client.task_status(&result.task_id).await.expect("status");
    assert_eq!(record.state, TaskState::Succeeded);
    let left = client
        .dead_letters(&Default::default())
        .await
        .expect("dlq ls");
    assert!(left.entries.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_late_result_of_a_superseded_attempt_is_discarded_and_counted() {
    let stack = Stack::start().await;
    let scheduler = stack.spawn_scheduler().await;
    let mut results = strand_on_crashed_node(&stack, "node-a", 1).await;
    let _b = stack.spawn_agent_online("node-b").await;
    let moved = next_result(&mut results).await;
    assert_eq!((moved.node_id.as_str(), moved.attempt), ("node-b", 2));

    // Node-a was only cut off: it comes back and reports its attempt after all.
    let late = TaskResult {
        node_id: NodeId::new("node-a").expect("id"),
        attempt: 1,
        outcome: Outcome::Completed {
            exit_code: 0,
            stdout: "LATE".into(),
            stderr: Default::default(),
        },
        ..moved.clone()
    };
    let js = async_nats::jetstream::new(stack.nats().await);
    stored::result(&js, &late).await.expect("stored");
    one_late_result_discarded(&stack, &scheduler).await;
    // Read until the wire is quiet: the submitter heard one completion.
    let mut extra = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(QUIET, results.next()).await {
        extra.push(message);
    }
    assert!(
        extra.is_empty(),
        "more results reached the submitter: {extra:?}"
    );
    let record = stack
        .client()
        .await
        .task_status(&moved.task_id)
        .await
        .expect("status");
    assert_eq!(
        (
            record.state,
            record.attempt,
            record.node_id.as_ref().map(NodeId::as_str)
        ),
        (TaskState::Succeeded, 2, Some("node-b"))
    );
}

/// A node that dies in the middle of a task: the task's message stays unacknowledged, comes
/// back once the ack wait (30 s) runs out, and is moved.
#[tokio::test]
#[ignore = "slow: waits out the 30 s ack wait; run with --include-ignored"]
async fn a_task_running_on_a_node_that_dies_completes_elsewhere() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let a = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;
    // Long enough that node-a is still running it when it dies, however loaded the machine.
    let handle = client
        .submit(
            Task::new(sleeping_module(Duration::from_secs(5)))
                .input("slow")
                .timeout(Duration::from_secs(120)),
        )
        .await
        .expect("submit");

    // Wait until node-a holds the task, then kill it mid-run.
    let consumer = stack
        .consumer(
            topology::DISPATCH_STREAM,
            &topology::node_dispatch_consumer_name(&NodeId::new("node-a").expect("id")),
        )
        .await;
    eventually(PATIENCE, "node-a to start the task", || async {
        (consumer.get_info().await.ok()?.num_ack_pending == 1).then_some(())
    })
    .await;
    a.crash().await;
    let _b = stack.spawn_agent_online("node-b").await;

    let output = handle
        .result_within(topology::ACK_WAIT + PATIENCE)
        .await
        .expect("completes on the other node");
    assert_eq!(output.node_id.as_str(), "node-b");
    assert!(output.attempt >= 2);
    assert_eq!(output.stdout.as_ref(), b"slow");
}

/// A node cut off in the middle of a task finishes it anyway and keeps the result in its
/// outbox; the cluster moves the task to another node, where it completes. When the first
/// node comes back, its result for the superseded attempt is stored, then discarded and
/// counted: the submitter hears one completion, read until the wire is quiet.
#[tokio::test]
#[ignore = "slow: waits out the 30 s ack wait; run with --include-ignored"]
async fn a_node_cut_off_mid_task_comes_back_and_its_late_result_is_discarded() {
    let stack = Stack::start().await;
    let scheduler = stack.spawn_scheduler().await;
    let a = stack.spawn_agent_online("node-a").await;
    let (client, mut wire) = stack.client_with_inbox("_INBOX.cutoff").await;
    let handle = client
        .submit(
            Task::new(sleeping_module(Duration::from_secs(2)))
                .input("once")
                .timeout(Duration::from_secs(120)),
        )
        .await
        .expect("submit");
    let id = handle.id().clone();
    eventually(PATIENCE, "node-a to run the task", || async {
        let record = client.task_status(&id).await.ok()?;
        (record.state == TaskState::Running).then_some(())
    })
    .await;

    a.cut_connection();
    let _b = stack.spawn_agent_online("node-b").await;
    // Node-a finishes meanwhile, with nobody to tell: the result waits in its outbox.
    let mut waiting = a.outbox_waiting();
    within(
        PATIENCE,
        "node-a to keep its result",
        waiting.wait_for(|n| *n == 1),
    )
    .await
    .expect("the agent runs");

    let output = handle
        .result_within(topology::ACK_WAIT + PATIENCE)
        .await
        .expect("completes on the other node");
    assert_eq!((output.node_id.as_str(), output.attempt), ("node-b", 2));

    a.release_connection();
    within(
        PATIENCE,
        "node-a to store its kept result",
        waiting.wait_for(|n| *n == 0),
    )
    .await
    .expect("the agent runs");
    one_late_result_discarded(&stack, &scheduler).await;
    let deliveries = results_until_quiet(&mut wire, 1, PATIENCE).await;
    deliveries.assert_each_exactly_once(1);
    let record = client.task_status(&id).await.expect("status");
    assert_eq!(
        (
            record.state,
            record.attempt,
            record.node_id.as_ref().map(NodeId::as_str)
        ),
        (TaskState::Succeeded, 2, Some("node-b"))
    );
}
