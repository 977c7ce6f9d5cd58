//! The hostile suite (`wasm-tasks/hostile/`) on a real agent: every module ends with its
//! typed outcome, the node keeps heartbeating while one spins, and a normal task runs on
//! the same node right after.

use std::time::Duration;

use apiary_harness::{PATIENCE, Stack, eventually, hostile, wasm};
use apiary_proto::lifecycle::TaskState;
use apiary_proto::message::Limits;
use apiary_proto::subject::{self, NodeVerb};
use apiary_sdk::{Client, Task, TaskErrorKind};
use futures::{FutureExt as _, StreamExt as _};

/// How a module of the suite must end.
#[derive(Debug)]
enum Expected {
    Failed(TaskErrorKind),
    Completed(&'static [u8]),
}

/// Runs `task` and checks that it ended as `expected`, on `node-a`.
async fn check(client: &Client, name: &str, task: Task, expected: Expected) {
    let result = client
        .submit(task)
        .await
        .unwrap_or_else(|err| panic!("{name}: submit failed: {err}"))
        .result_within(PATIENCE)
        .await;
    match (expected, result) {
        (Expected::Completed(stdout), Ok(output)) => {
            assert_eq!(output.stdout.as_ref(), stdout, "{name}: its stdout");
            assert_eq!(output.node_id.as_str(), "node-a", "{name}");
        }
        (Expected::Failed(kind), Err(err)) => {
            let failure = err
                .task_failure()
                .unwrap_or_else(|| panic!("{name}: expected a task failure, got {err:?}"));
            assert_eq!(failure.error.kind, kind, "{name}: {err}");
            assert_eq!(failure.node_id.as_str(), "node-a", "{name}");
        }
        (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
    }
}

#[tokio::test]
async fn every_hostile_module_gets_its_typed_outcome_and_the_node_keeps_working() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;

    let short = Limits {
        timeout_ms: 1_000,
        ..Limits::default()
    };
    // The flood's timeout is far past the test's patience, and its fuel lasts about a
    // million of its writes: stopped at its output limit (17 writes of 64 KiB) it ends as
    // `output_limit`; left to spin on failed writes, it would end as `fuel_exhausted`.
    let flood = Limits {
        timeout_ms: 600_000,
        fuel: Some(5_000_000),
        ..Limits::default()
    };
    let suite = [
        (
            "spin",
            short.clone(),
            Expected::Failed(TaskErrorKind::Timeout),
        ),
        (
            "memory-bomb",
            Limits::default(),
            Expected::Failed(TaskErrorKind::MemoryLimit),
        ),
        (
            "deep-recursion",
            Limits::default(),
            Expected::Failed(TaskErrorKind::Trap),
        ),
        (
            "read-passwd",
            Limits::default(),
            Expected::Completed(b"denied"),
        ),
        ("socket", Limits::default(), Expected::Completed(b"denied")),
        (
            "ungranted-host-call",
            Limits::default(),
            Expected::Completed(b"denied"),
        ),
        (
            "stdout-flood",
            flood,
            Expected::Failed(TaskErrorKind::OutputLimit),
        ),
        (
            "trap",
            Limits::default(),
            Expected::Failed(TaskErrorKind::Trap),
        ),
        (
            "missing-import",
            Limits::default(),
            Expected::Failed(TaskErrorKind::InvalidModule),
        ),
        (
            "garbage",
            Limits::default(),
            Expected::Failed(TaskErrorKind::InvalidModule),
        ),
    ];
    for (name, limits, expected) in suite {
        // Guest failures are not retried unless a task asks, so each runs once.
        let task = Task::new(hostile(name)).limits(limits);
        check(&client, name, task, expected).await;
    }

    check(
        &client,
        "uppercase after the suite",
        Task::new(wasm("uppercase")).input("still here"),
        Expected::Completed(b"STILL HERE"),
    )
    .await;
    assert!(!agent.is_finished(), "the agent stopped");
}

#[tokio::test]
async fn a_spinning_task_leaves_its_node_heartbeating() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;
    let nats = stack.nats().await;
    let node = apiary_proto::NodeId::new("node-a").expect("node id");
    let mut heartbeats = nats
        .subscribe(subject::node(&node, NodeVerb::Heartbeat).to_string())
        .await
        .expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");

    let spin = client
        .submit(Task::new(hostile("spin")).timeout(Duration::from_secs(20)))
        .await
        .expect("submit");
    eventually(PATIENCE, "the spinning task to run", || async {
        let record = spin.status().await.ok()?;
        (record.state == TaskState::Running).then_some(())
    })
    .await;
    // Heartbeats sent from here on were sent while the module spun.
    while heartbeats.next().now_or_never().flatten().is_some() {}
    for seen in 0..3 {
        tokio::time::timeout(PATIENCE, heartbeats.next())
            .await
            .unwrap_or_else(|_| panic!("no heartbeat after {seen} while the task spun"))
            .expect("subscription open");
    }
    let record = spin.status().await.expect("status");
    assert_eq!(
        record.state,
        TaskState::Running,
        "the task ended before the heartbeats were seen, so they prove nothing"
    );
    spin.cancel().await.expect("cancel");

    let output = client
        .submit(Task::new(wasm("uppercase")).input("next"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("a normal task runs after the spinning one");
    assert_eq!(output.node_id.as_str(), "node-a");
    assert_eq!(output.stdout.as_ref(), b"NEXT");
}
