//! A task's whole life through its record: states by id from any client and replica,
//! cancel, retries and dead letters, queue timeouts, resubmitted ids, and many replicas
//! sharing the work with each task completed once.

use std::time::{Duration, Instant};

use apiary_harness::{
    PATIENCE, QUIET, Stack, eventually, results_until_quiet, sleeping_module, wasm, within,
};
use apiary_proto::lifecycle::{RetryOn, RetryPolicy, TaskState};
use apiary_proto::message::{Dispatch, Requirements};
use apiary_proto::subject::{self};
use apiary_proto::{TaskId, codec};
use apiary_sdk::{ErrorCode, RequestErrorKind, Task, TaskErrorKind};
use futures::StreamExt as _;

/// A guest that spins until it is stopped: only an interruption from outside ends it early.
const SPIN_FOREVER: &str = r#"(module (memory (export "memory") 1)
    (func (export "_start") (loop (br 0))))"#;

/// A guest that traps at once.
const TRAP: &str = r#"(module (memory (export "memory") 1)
    (func (export "_start") unreachable))"#;

fn module(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).expect("valid WAT")
}

/// Reads dispatches until none has come for `quiet`, and counts those of task `id`.
async fn dispatches_until_quiet(
    dispatches: &mut async_nats::Subscriber,
    id: &TaskId,
    quiet: Duration,
) -> usize {
    let mut seen = 0;
    while let Ok(Some(message)) = tokio::time::timeout(quiet, dispatches.next()).await {
        let (dispatch, _) =
            codec::decode_message::<Dispatch>(message.headers.as_ref(), &message.payload)
                .expect("a dispatch");
        if &dispatch.task.id == id {
            seen += 1;
        }
    }
    seen
}

/// The last write of task `id`'s record in the live bucket, headers and all.
async fn last_record_write(
    stack: &Stack,
    id: &TaskId,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    async_nats::jetstream::new(stack.nats().await)
        .get_stream(apiary_proto::topology::TASK_RECORDS_STREAM)
        .await
        .expect("the record bucket's stream")
        .get_last_raw_message_by_subject(&apiary_proto::topology::task_record_subject(id))
        .await
        .ok()
}

/// Whether the server expires messages by a per-message TTL (nats-server 2.11 and later).
/// Before it, an ended task's record is purged from the live bucket instead.
async fn server_has_message_ttl(stack: &Stack) -> bool {
    let version = stack.nats().await.server_info().version;
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 11)
}

/// Waits until task `id`'s record has left the live bucket as the server allows: a final
/// write in `state` carrying the linger TTL (2.11+), or a purge (2.10).
async fn assert_ended_record_leaves(stack: &Stack, id: &TaskId, state: TaskState) {
    if server_has_message_ttl(stack).await {
        let last = eventually(PATIENCE, "the final record to be written", || async {
            let message = last_record_write(stack, id).await?;
            let (record, _) =
                codec::decode_message::<apiary_sdk::TaskRecord>(None, &message.payload).ok()?;
            (record.state == state).then_some(message)
        })
        .await;
        let ttl = last
            .headers
            .get(async_nats::header::NATS_MESSAGE_TTL)
            .map(|value| value.as_str().to_owned());
        assert_eq!(
            ttl.as_deref(),
            Some(
                apiary_proto::topology::TASK_RECORD_LINGER
                    .as_secs()
                    .to_string()
                    .as_str()
            ),
            "the final record expires after the linger"
        );
    } else {
        // Purged: no message left under the key, or only a purge marker.
        eventually(PATIENCE, "the ended record to be purged", || async {
            let Some(message) = last_record_write(stack, id).await else {
                return Some(());
            };
            let operation = message.headers.get(apiary_proto::headers::KV_OPERATION)?;
            (operation.as_str() == apiary_proto::headers::KV_OPERATION_PURGE).then_some(())
        })
        .await;
    }
}

/// Waits until task `id`'s record is in `state`, and returns it.
async fn until_state(
    client: &apiary_sdk::Client,
    id: &TaskId,
    state: TaskState,
) -> apiary_sdk::TaskRecord {
    eventually(PATIENCE, &format!("task {id} to be {state}"), || async {
        client
            .task_status(id)
            .await
            .ok()
            .filter(|record| record.state == state)
    })
    .await
}

#[tokio::test]
async fn a_task_is_seen_in_every_state_by_id_from_another_client_and_another_replica() {
    let stack = Stack::start().await;
    let first_replica = stack.spawn_scheduler().await;
    let submitter = stack.client().await;
    let observer = stack.client().await;
    // No node yet: the task waits, and says why.
    let handle = submitter
        .submit(Task::new(sleeping_module(Duration::from_millis(500))).input("seen"))
        .await
        .expect("submit");
    let id = handle.id().clone();
    let pending = until_state(&observer, &id, TaskState::Pending).await;
    assert!(
        pending
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("queue")),
        "{pending:?}"
    );

    let mut watch = std::pin::pin!(observer.watch_task(id.clone()));
    let first = within(PATIENCE, "the watch's first record", watch.next())
        .await
        .expect("a record")
        .expect("a record");
    let mut seen = vec![first.state];
    let _agent = stack.spawn_agent_online("node-a").await;
    within(PATIENCE, "the task to end", async {
        while let Some(record) = watch.next().await {
            let record = record.expect("a record");
            seen.push(record.state);
            if record.state.is_terminal() {
                break;
            }
        }
    })
    .await;
    assert_eq!(
        seen,
        [
            TaskState::Pending,
            TaskState::Scheduled,
            TaskState::Running,
            TaskState::Succeeded
        ],
        "the states the watch saw"
    );
    let output = handle.result_within(PATIENCE).await.expect("the result");
    assert_eq!(output.stdout.as_ref(), b"seen");

    // Another replica, started after the first is gone, reads the ended task by id.
    first_replica.stop().await.expect("the first replica stops");
    let _second_replica = stack.spawn_scheduler().await;
    let record = observer.task_status(&id).await.expect("status");
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!((record.attempt, record.failures), (1, 0));
    let states: Vec<_> = record.history.iter().map(|step| step.state).collect();
    assert_eq!(states, seen, "the record's history");
    let reply = observer.task_result(&id).await.expect("result by id");
    let result = reply.result.expect("the stored result");
    assert_eq!(result.node_id.as_str(), "node-a");
    // And a handle on it from the other client resolves with the same output.
    let again = observer
        .task(id.clone())
        .result_within(PATIENCE)
        .await
        .expect("a reattached handle resolves");
    assert_eq!(again.stdout.as_ref(), b"seen");
}

#[tokio::test]
async fn cancelling_a_pending_task_means_it_never_runs() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _plain = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;
    let wanted = Requirements {
        labels: [("zone".to_owned(), "attic".to_owned())].into(),
        ..Requirements::default()
    };
    let handle = client
        .submit(Task::new(wasm("uppercase")).requirements(wanted))
        .await
        .expect("submit");
    let id = handle.id().clone();
    eventually(PATIENCE, "the task to wait as unschedulable", || async {
        let record = client.task_status(&id).await.ok()?;
        (record.state == TaskState::Pending
            && record
                .reason
                .as_deref()
                .is_some_and(|reason| reason.contains("unschedulable")))
        .then_some(())
    })
    .await;

    let cancelled = handle.cancel().await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    let err = handle
        .result_within(PATIENCE)
        .await
        .expect_err("a cancelled task has no output");
    assert_eq!(
        err.task_error_kind(),
        Some(TaskErrorKind::Cancelled),
        "{err}"
    );

    // A node that could run it arrives: the task is not dispatched to it.
    let mut dispatches = stack.dispatch_wire().await;
    let mut config = stack.agent_config("node-attic");
    config.labels = [("zone".to_owned(), "attic".to_owned())].into();
    let _attic = stack.spawn_agent_online_with(config).await;
    assert_eq!(
        dispatches_until_quiet(&mut dispatches, &id, QUIET * 2).await,
        0,
        "a cancelled task was dispatched"
    );
    assert_eq!(
        client.task_status(&id).await.expect("status").state,
        TaskState::Cancelled
    );
}

#[tokio::test]
async fn cancelling_a_running_task_stops_it_on_its_node_and_it_is_not_retried() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let mut dispatches = stack.dispatch_wire().await;
    let handle = client
        .submit(Task::new(module(SPIN_FOREVER)).timeout(Duration::from_secs(600)))
        .await
        .expect("submit");
    let id = handle.id().clone();
    until_state(&client, &id, TaskState::Running).await;
    assert_eq!(stack.agent_status("node-a").await.metrics.running_tasks, 1);

    let asked = Instant::now();
    let cancelled = client.cancel_task(&id).await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    eventually(PATIENCE, "the node to stop the spinning module", || async {
        (stack.agent_status("node-a").await.metrics.running_tasks == 0).then_some(())
    })
    .await;
    // Measured, not asserted: wall-clock bounds make flaky tests. The epoch callback looks
    // at the stop flag every 10 ms.
    eprintln!(
        "the running task stopped {:?} after the cancel",
        asked.elapsed()
    );
    let err = handle
        .result_within(PATIENCE)
        .await
        .expect_err("a cancelled task has no output");
    assert_eq!(
        err.task_error_kind(),
        Some(TaskErrorKind::Cancelled),
        "{err}"
    );

    // Nothing is retried: the one dispatch there was is the only one.
    assert_eq!(
        dispatches_until_quiet(&mut dispatches, &id, QUIET).await,
        1,
        "dispatches of the cancelled task"
    );
    let record = client.task_status(&id).await.expect("status");
    assert_eq!((record.state, record.attempt), (TaskState::Cancelled, 1));
}

#[tokio::test]
async fn guest_failures_are_retried_only_when_the_task_asks() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;

    let once = client
        .submit(Task::new(module(TRAP)))
        .await
        .expect("submit");
    let once_id = once.id().clone();
    let err = once.result_within(PATIENCE).await.expect_err("it traps");
    assert_eq!(err.task_error_kind(), Some(TaskErrorKind::Trap));
    let record = client.task_status(&once_id).await.expect("status");
    assert_eq!(
        (record.state, record.attempt, record.failures),
        (TaskState::Failed, 1, 1)
    );

    let retried = client
        .submit(Task::new(module(TRAP)).retry(RetryPolicy {
            max_attempts: 3,
            backoff_ms: 50,
            max_backoff_ms: 200,
            on: [RetryOn::Trap].into(),
        }))
        .await
        .expect("submit");
    let retried_id = retried.id().clone();
    let err = retried
        .result_within(PATIENCE)
        .await
        .expect_err("it traps every time");
    assert_eq!(err.task_error_kind(), Some(TaskErrorKind::Trap));
    let record = client.task_status(&retried_id).await.expect("status");
    assert_eq!(
        (record.state, record.attempt, record.failures),
        (TaskState::Dead, 3, 3)
    );
    let dead = client
        .dead_letter(&retried_id)
        .await
        .expect("in the dead-letter stream");
    assert_eq!(dead.record.state, TaskState::Dead);
    let listed = client
        .dead_letters(&Default::default())
        .await
        .expect("dlq ls");
    let ids: Vec<_> = listed
        .entries
        .iter()
        .map(|entry| &entry.record.id)
        .collect();
    assert_eq!(
        ids,
        [&retried_id],
        "only the task that asked for retries is dead"
    );
}

#[tokio::test]
async fn a_queue_timeout_ends_a_task_no_node_can_run_with_its_reason() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let impossible = Requirements {
        min_cores: Some(4096),
        ..Requirements::default()
    };
    let handle = client
        .submit(
            Task::new(wasm("uppercase"))
                .requirements(impossible)
                .queue_timeout(Duration::from_secs(1)),
        )
        .await
        .expect("submit");
    let id = handle.id().clone();
    let err = handle
        .result_within(PATIENCE)
        .await
        .expect_err("it is never placed");
    assert_eq!(
        err.task_error_kind(),
        Some(TaskErrorKind::QueueTimeout),
        "{err}"
    );
    let record = client.task_status(&id).await.expect("status");
    assert_eq!((record.state, record.attempt), (TaskState::TimedOut, 0));
    assert!(
        record
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("unschedulable")),
        "{record:?}"
    );
}

#[tokio::test]
async fn resubmitting_an_id_returns_the_existing_task() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let id = TaskId::new("order-42").expect("a valid id");
    let first = client
        .submit(Task::new(wasm("uppercase")).input("once").id(id.clone()))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the first run");
    assert_eq!(first.stdout.as_ref(), b"ONCE");

    // Inside JetStream's duplicate window, from another client, with other input.
    let other = stack.client().await;
    let again = other
        .submit(Task::new(wasm("uppercase")).input("twice").id(id.clone()))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the existing task's result");
    assert_eq!(again.stdout.as_ref(), b"ONCE");

    // Past the window: a submission JetStream does not de-duplicate (no message id, as
    // `nats pub` sends it), by hand, in JSON. The scheduler finds the task by id.
    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await.expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    let module = apiary_proto::message::ModuleRef::for_bytes(&wasm("uppercase"));
    let submission = serde_json::json!({
        "id": "order-42",
        "module": {"sha256": module.sha256},
        "input": "thrice",
        "reply_to": inbox,
    });
    async_nats::jetstream::new(nats.clone())
        .publish(
            subject::task_submit(),
            serde_json::to_vec(&submission).expect("json").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let answer = within(PATIENCE, "the answer", answers.next())
        .await
        .expect("a message");
    let (result, _) = codec::decode_message::<apiary_proto::message::TaskResult>(
        answer.headers.as_ref(),
        &answer.payload,
    )
    .expect("a result");
    assert_eq!((result.task_id.as_str(), result.attempt), ("order-42", 1));
    match result.outcome {
        apiary_proto::message::Outcome::Completed { stdout, .. } => {
            assert_eq!(stdout.as_bytes(), b"ONCE")
        }
        other => panic!("unexpected outcome {other:?}"),
    }
    assert_eq!(
        stack.agent_status("node-a").await.metrics.tasks_completed,
        1,
        "the task ran once"
    );
}

#[tokio::test]
async fn three_replicas_share_the_work_and_one_stopping_loses_nothing() {
    let stack = Stack::start().await;
    let replicas = [
        stack.spawn_scheduler().await,
        stack.spawn_scheduler().await,
        stack.spawn_scheduler().await,
    ];
    let _a = stack.spawn_agent_online("node-a").await;
    let _b = stack.spawn_agent_online("node-b").await;
    let (client, mut wire) = stack.client_with_inbox("_INBOX.replicas").await;
    const TASKS: usize = 500;
    let mut handles = Vec::with_capacity(TASKS);
    for n in 0..TASKS {
        handles.push(
            client
                .submit(Task::new(wasm("uppercase")).input(format!("task {n}")))
                .await
                .expect("submit"),
        );
    }
    let [first, second, third] = replicas;
    // Stop one replica once it has done some of the work, while the rest is under way.
    eventually(PATIENCE, "the second replica to place tasks", || async {
        (stack.scheduler_counters(&second).await.get("tasks_placed") > 0).then_some(())
    })
    .await;
    let placed_by_second = stack.scheduler_counters(&second).await.get("tasks_placed");
    second.stop().await.expect("the replica stops");

    let deliveries = results_until_quiet(&mut wire, TASKS, PATIENCE * 4).await;
    deliveries.assert_each_exactly_once(TASKS);
    for handle in handles {
        handle
            .result_within(PATIENCE)
            .await
            .expect("each task succeeds");
    }
    let placed_after = [
        stack.scheduler_counters(&first).await.get("tasks_placed"),
        placed_by_second,
        stack.scheduler_counters(&third).await.get("tasks_placed"),
    ];
    for (replica, placed) in placed_after.iter().enumerate() {
        assert!(
            *placed > 0,
            "replica {replica} placed no task: {placed_after:?}"
        );
    }
    assert!(
        placed_after.iter().sum::<u64>() >= TASKS as u64,
        "placements {placed_after:?}"
    );
    let unknown = client
        .task_status(&TaskId::new("no-such-task").expect("id"))
        .await
        .expect_err("an unknown task");
    assert_eq!(
        unknown.kind(),
        RequestErrorKind::Refused(ErrorCode::NotFound),
        "{unknown}"
    );
}

#[tokio::test]
async fn an_ended_tasks_record_leaves_the_live_bucket_by_itself() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let handle = client
        .submit(Task::new(wasm("uppercase")).input("short"))
        .await
        .expect("submit");
    let id = handle.id().clone();
    handle.result_within(PATIENCE).await.expect("the result");

    // On 2.11+ the final write carries a per-message TTL, so the key leaves the bucket,
    // subject and all, without a purge; on 2.10 it is purged. The archive keeps the record.
    let js = async_nats::jetstream::new(stack.nats().await);
    assert_ended_record_leaves(&stack, &id, TaskState::Succeeded).await;
    // Found by id (in the bucket while it lingers, in the archive for good).
    assert_eq!(
        client.task_status(&id).await.expect("status").state,
        TaskState::Succeeded
    );
    let archive = js
        .get_stream(apiary_proto::topology::TASK_ARCHIVE_STREAM)
        .await
        .expect("the archive");
    let archived = archive
        .get_last_raw_message_by_subject(subject::task_archive(&id).as_str())
        .await
        .expect("archived");
    let (record, _) =
        codec::decode_message::<apiary_sdk::TaskRecord>(None, &archived.payload).expect("a record");
    assert_eq!((record.id, record.state), (id, TaskState::Succeeded));
}

#[tokio::test]
async fn cancelling_a_task_no_replica_has_looked_at_ends_it_and_its_record() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;
    // No node: intake leaves the submission in the queue, unread.
    let handle = client
        .submit(Task::new(wasm("uppercase")).input("never"))
        .await
        .expect("submit");
    let id = handle.id().clone();
    let cancelled = client.cancel_task(&id).await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    let err = handle
        .result_within(PATIENCE)
        .await
        .expect_err("a cancelled task has no output");
    assert_eq!(
        err.task_error_kind(),
        Some(TaskErrorKind::Cancelled),
        "{err}"
    );

    // Its record, written as it ended, leaves the bucket like any ended one.
    assert_ended_record_leaves(&stack, &id, TaskState::Cancelled).await;

    // A node arrives: the task is not dispatched to it.
    let mut dispatches = stack.dispatch_wire().await;
    let _agent = stack.spawn_agent_online("node-a").await;
    assert_eq!(
        dispatches_until_quiet(&mut dispatches, &id, QUIET * 2).await,
        0,
        "a cancelled task was dispatched"
    );
}
