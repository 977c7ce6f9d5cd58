//! Task priorities: one queue per priority, served by their fair share.

use std::collections::BTreeMap;
use std::time::Duration;

use apiary_harness::{PATIENCE, Stack, sleeping_module, wasm, within};
use apiary_proto::message::{ModuleRef, Outcome, Priority, TaskResult};
use apiary_proto::{codec, subject, topology};
use apiary_sdk::{RetryOn, RetryPolicy, Task, TaskErrorKind, TaskHandle};
use async_nats::jetstream::{consumer, stream};
use futures::StreamExt as _;

/// An agent with one slot: it runs its tasks one after the other, in the order they were
/// placed, so their start times tell that order.
async fn one_slot_agent(stack: &Stack, node: &str) -> apiary_harness::Component {
    stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            slots: Some(1),
            ..stack.agent_config(node)
        })
        .await
}

/// How many messages the consumer of the queue of `priority` has handed out so far.
async fn delivered_from(stack: &Stack, priority: Priority) -> u64 {
    let name = topology::scheduler_tasks_consumer_name(priority);
    let mut consumer = stack.consumer(topology::TASKS_STREAM, name).await;
    consumer
        .info()
        .await
        .expect("consumer info")
        .delivered
        .consumer_sequence
}

#[tokio::test]
async fn high_priority_tasks_overtake_a_low_backlog_and_low_ones_still_run() {
    const LOW: usize = 30;
    const HIGH: usize = 12;
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _agent = one_slot_agent(&stack, "node-a").await;
    let client = stack.client().await;
    let module = client
        .upload_module(&sleeping_module(Duration::from_millis(100)))
        .await
        .expect("upload");

    // The backlog first, then the urgent ones, while the node works through the backlog.
    let mut handles: Vec<(Priority, TaskHandle)> = Vec::new();
    for (priority, count) in [(Priority::Low, LOW), (Priority::High, HIGH)] {
        for i in 0..count {
            let task = Task::stored(module.clone())
                .input(format!("{priority:?} {i}"))
                .priority(priority);
            handles.push((priority, client.submit(task).await.expect("submit")));
        }
    }
    // The node runs one task at a time, so the order they started in is the order they were
    // placed in.
    let mut started = BTreeMap::new();
    for (priority, handle) in handles {
        let output = handle
            .result_within(PATIENCE)
            .await
            .expect("every task completes");
        started.insert((output.started_at_ms, output.finished_at_ms), priority);
    }
    assert_eq!(started.len(), LOW + HIGH);
    let order: Vec<Priority> = started.into_values().collect();
    let positions = |wanted: Priority| -> Vec<usize> {
        (0..order.len()).filter(|i| order[*i] == wanted).collect()
    };
    let highs = positions(Priority::High);
    let shown = order
        .iter()
        .map(|priority| match priority {
            Priority::High => 'H',
            Priority::Normal => 'N',
            Priority::Low => 'L',
        })
        .collect::<String>();

    // First come, first served would run every high task after the 30 low ones. By their
    // share (six high to one low while both wait) they all run within the first 24, with
    // only the low tasks the node held already and a few more ahead of them.
    assert!(
        highs.iter().all(|position| *position < 24),
        "the high-priority tasks waited behind the backlog: {shown}"
    );
    // And the low ones are not starved meanwhile: at least one runs between the first and
    // the last high-priority task, which strict priority would never allow.
    let (first_high, last_high) = (highs[0], highs[HIGH - 1]);
    let lows_among_highs = positions(Priority::Low)
        .into_iter()
        .filter(|position| (first_high..last_high).contains(position))
        .count();
    assert!(
        lows_among_highs >= 1,
        "no low-priority task ran while high-priority ones waited: {shown}"
    );
}

#[tokio::test]
async fn a_hand_written_submission_on_the_plain_subject_goes_to_the_queue_of_its_priority() {
    let (stack, _running) = Stack::with_one_node().await;
    let module = stack
        .client()
        .await
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");
    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let mut delivered = nats.subscribe(inbox.clone()).await.expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    let js = async_nats::jetstream::new(nats.clone());

    let submission = serde_json::json!({
        "id": "urgent-by-hand",
        "module": {"sha256": module.sha256},
        "input": "urgent",
        "priority": "high",
        "reply_to": inbox,
    });
    js.publish(subject::task_submit(), submission.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let result = within(PATIENCE, "the task's result", delivered.next())
        .await
        .expect("a result");
    let (result, _) = codec::decode_message::<TaskResult>(result.headers.as_ref(), &result.payload)
        .expect("a result message");
    assert_eq!(result.task_id.as_str(), "urgent-by-hand");

    // It was read once from the plain subject, moved, and placed from the high queue.
    assert_eq!(delivered_from(&stack, Priority::Normal).await, 1);
    assert_eq!(delivered_from(&stack, Priority::High).await, 1);
    assert_eq!(delivered_from(&stack, Priority::Low).await, 0);
    let record = stack
        .client()
        .await
        .task_status(&apiary_proto::TaskId::new("urgent-by-hand").expect("id"))
        .await
        .expect("the task's record");
    assert_eq!(record.task.priority, Priority::High);
}

#[tokio::test]
async fn a_retried_task_goes_back_to_the_queue_of_its_priority() {
    let (stack, _running) = Stack::with_one_node().await;
    let trap = wat::parse_str(r#"(module (func (export "_start") unreachable))"#).expect("wat");
    let task = Task::new(trap).priority(Priority::Low).retry(RetryPolicy {
        max_attempts: 2,
        backoff_ms: 10,
        max_backoff_ms: 10,
        on: [RetryOn::Trap].into(),
    });
    match stack.run(task).await {
        Err(ref err) if let Some(failure) = err.task_failure() => {
            assert_eq!(failure.error.kind, TaskErrorKind::Trap, "{failure}");
            assert_eq!(failure.attempt, 2);
        }
        other => panic!("expected the task to fail twice, got {other:?}"),
    }
    // The retry waits out its backoff in the queue, so it may be read more than once.
    assert!(delivered_from(&stack, Priority::Low).await >= 2);
    assert_eq!(delivered_from(&stack, Priority::Normal).await, 0);
    assert_eq!(delivered_from(&stack, Priority::High).await, 0);
}

#[tokio::test]
async fn a_task_stream_and_consumer_from_before_priorities_are_brought_up_to_date() {
    let stack = Stack::start().await;
    // What an earlier version made: the stream with the plain subject only, and one
    // consumer for all of it, with a task waiting.
    let nats = stack.nats().await;
    let js = async_nats::jetstream::new(nats.clone());
    js.update_stream(stream::Config {
        subjects: vec![subject::task_submit().into()],
        ..topology::tasks_stream()
    })
    .await
    .expect("the stream as it was");
    js.get_stream(topology::TASKS_STREAM)
        .await
        .expect("stream")
        .create_consumer(consumer::pull::Config {
            filter_subject: String::new(),
            ..topology::scheduler_tasks_consumer(Priority::Normal)
        })
        .await
        .expect("the consumer as it was");
    // The module goes in by hand too: an SDK client would bring the stream up to date
    // itself, and this is about the scheduler doing it.
    let uppercase = wasm("uppercase");
    let module = ModuleRef::for_bytes(&uppercase);
    stack.put_module_object(&module.sha256, &uppercase).await;
    let inbox = nats.new_inbox();
    let mut delivered = nats.subscribe(inbox.clone()).await.expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    let submission = serde_json::json!({
        "id": "from-before",
        "module": {"sha256": module.sha256},
        "input": "from before",
        "reply_to": inbox,
    });
    js.publish(subject::task_submit(), submission.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let _scheduler = stack.spawn_scheduler().await;
    let _agent = stack.spawn_agent_online("node-a").await;
    let result = within(PATIENCE, "the waiting task's result", delivered.next())
        .await
        .expect("a result");
    let (result, _) = codec::decode_message::<TaskResult>(result.headers.as_ref(), &result.payload)
        .expect("a result message");
    assert_eq!(result.task_id.as_str(), "from-before");
    match &result.outcome {
        Outcome::Completed { stdout, .. } => assert_eq!(stdout.as_bytes(), b"FROM BEFORE"),
        failed => panic!("the waiting task failed: {failed:?}"),
    }

    let mut stream = js.get_stream(topology::TASKS_STREAM).await.expect("stream");
    let subjects = stream
        .info()
        .await
        .expect("stream info")
        .config
        .subjects
        .clone();
    for priority in Priority::ALL {
        assert!(
            subjects.contains(&subject::task_submit_for(priority).to_string()),
            "{subjects:?}"
        );
    }
    let normal = stream
        .consumer_info(topology::SCHEDULER_TASKS_CONSUMER)
        .await
        .expect("the normal queue's consumer");
    assert_eq!(
        normal.config.filter_subject,
        subject::task_submit().as_str()
    );
    let output = stack
        .client()
        .await
        .submit(
            Task::new(wasm("uppercase"))
                .input("urgent")
                .priority(Priority::High),
        )
        .await
        .expect("submit to the high queue")
        .result_within(PATIENCE)
        .await
        .expect("the high-priority task runs");
    assert_eq!(output.stdout.as_ref(), b"URGENT");
}
