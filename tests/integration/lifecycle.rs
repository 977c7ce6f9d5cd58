//! Node lifecycle from the operator's side: cordon, drain (with its deadline), labels and
//! roles that change placement, and removal.

use std::collections::BTreeSet;
use std::time::Duration;

use apiary_harness::{
    Answer, PATIENCE, QUIET, Stack, eventually, sleeping_guest, sleeping_module, wasm, within,
};
use apiary_proto::NodeId;
use apiary_proto::message::{Dispatch, Requirements};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{codec, topology};
use apiary_sdk::{Scheduling, Task};
use futures::StreamExt as _;

fn id(name: &str) -> NodeId {
    NodeId::new(name).expect("valid node id")
}

/// An agent with one slot, so that a second task waits in its queue behind the first.
async fn one_slot_agent(stack: &Stack, node: &str) -> apiary_harness::Component {
    stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            slots: Some(1),
            ..stack.agent_config(node)
        })
        .await
}

/// Waits until the node reports `running` tasks in its heartbeats.
async fn wait_running(client: &apiary_sdk::Client, node: &NodeId, running: u32) {
    eventually(
        PATIENCE,
        &format!("{node} to run {running} tasks"),
        || async {
            let summary = client.node(node).await.ok()?;
            (summary.metrics?.running_tasks == running).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_node_takes_its_next_dispatch_while_its_slot_runs_but_runs_no_more_than_its_slots() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = one_slot_agent(&stack, "node-a").await;
    let client = stack.client().await;
    let consumer = stack
        .consumer(
            topology::DISPATCH_STREAM,
            &topology::node_dispatch_consumer_name(&id("node-a")),
        )
        .await;

    let mut handles = Vec::new();
    for n in 0..3 {
        let task = Task::new(sleeping_module(Duration::from_millis(400)))
            .input(format!("task {n}"))
            .timeout(Duration::from_secs(60));
        handles.push(client.submit(task).await.expect("submit"));
    }
    // The node takes a second dispatch while its one slot runs the first: the next task is
    // at hand the moment the first ends, instead of a result's store and a delivery later.
    eventually(PATIENCE, "node-a to hold two dispatches", || async {
        let info = consumer.get_info().await.ok()?;
        (info.num_ack_pending == 2).then_some(())
    })
    .await;

    let mut runs = Vec::new();
    for handle in handles {
        let output = within(PATIENCE, "a result", handle.result())
            .await
            .expect("the task runs");
        assert_eq!(output.node_id.as_str(), "node-a");
        runs.push((output.started_at_ms, output.finished_at_ms));
    }
    // One slot: the runs never overlap.
    runs.sort();
    for pair in runs.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two runs overlapped on a one-slot node: {runs:?}"
        );
    }
}

#[tokio::test]
async fn a_cordoned_node_gets_no_new_tasks_until_uncordoned() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = stack.spawn_agent_online("node-a").await;
    let _b = stack.spawn_agent_online("node-b").await;
    let client = stack.client().await;
    let cordoned = client.cordon(&id("node-a")).await.expect("cordon");
    assert_eq!(cordoned.scheduling, Scheduling::Cordoned);

    let mut handles = Vec::new();
    for n in 0..8 {
        let task = Task::new(wasm("uppercase")).input(format!("task {n}"));
        handles.push(client.submit(task).await.expect("submit"));
    }
    for handle in handles {
        let output = within(PATIENCE, "a result", handle.result())
            .await
            .expect("the task runs");
        assert_eq!(
            output.node_id.as_str(),
            "node-b",
            "a task ran on the cordoned node"
        );
    }

    client.uncordon(&id("node-a")).await.expect("uncordon");
    // Equal nodes take turns, so node-a gets one of the next few tasks.
    eventually(PATIENCE, "node-a to run tasks again", || async {
        let task = Task::new(wasm("uppercase")).input("again");
        let output = client.submit(task).await.ok()?.result().await.ok()?;
        (output.node_id.as_str() == "node-a").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_drain_lets_the_running_task_finish_and_moves_the_queued_one() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = one_slot_agent(&stack, "node-a").await;
    let client = stack.client().await;
    let nats = stack.nats().await;
    let mut dispatches = nats
        .subscribe(subject::node(&id("node-a"), NodeVerb::Dispatch).to_string())
        .await
        .expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");

    let running = client
        .submit(
            Task::new(sleeping_module(Duration::from_secs(3)))
                .input("running")
                .timeout(Duration::from_secs(60)),
        )
        .await
        .expect("submit");
    wait_running(&client, &id("node-a"), 1).await;
    let queued = client
        .submit(Task::new(wasm("uppercase")).input("queued"))
        .await
        .expect("submit");
    // The second task is placed on node-a too, behind the first (one slot, one of backlog).
    within(PATIENCE, "the queued task's dispatch to node-a", async {
        loop {
            let message = dispatches.next().await.expect("subscription open");
            let (dispatch, _) =
                codec::decode_message::<Dispatch>(message.headers.as_ref(), &message.payload)
                    .expect("a dispatch");
            if &dispatch.task.id == queued.id() {
                return;
            }
        }
    })
    .await;

    let _b = stack.spawn_agent_online("node-b").await;
    let draining = client
        .drain(&id("node-a"), Some(Duration::from_secs(600)))
        .await
        .expect("drain");
    assert_eq!(draining.scheduling, Scheduling::Draining);

    let first = within(PATIENCE, "the running task", running.result())
        .await
        .expect("the running task finishes");
    assert_eq!((first.node_id.as_str(), first.attempt), ("node-a", 1));
    let second = within(PATIENCE, "the queued task", queued.result())
        .await
        .expect("the queued task runs elsewhere");
    assert_eq!(second.node_id.as_str(), "node-b");
    assert_eq!(&second.stdout[..], b"QUEUED");
    eventually(PATIENCE, "node-a to show drained", || async {
        let summary = client.node(&id("node-a")).await.ok()?;
        (summary.scheduling == Scheduling::Drained).then_some(())
    })
    .await;
    // And it stays out of placement.
    let later = stack
        .run(Task::new(wasm("uppercase")).input("later"))
        .await
        .expect("runs");
    assert_eq!(later.node_id.as_str(), "node-b");
}

#[tokio::test]
async fn a_task_still_running_at_the_drain_deadline_is_handed_back_and_runs_elsewhere() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = one_slot_agent(&stack, "node-a").await;
    let client = stack.client().await;
    let slow = client
        .submit(
            Task::new(sleeping_guest(Duration::from_secs(4), Answer::Uppercase).expect("wat"))
                .input("slow")
                .timeout(Duration::from_secs(60)),
        )
        .await
        .expect("submit");
    wait_running(&client, &id("node-a"), 1).await;
    let _b = stack.spawn_agent_online("node-b").await;
    client
        .drain(&id("node-a"), Some(Duration::from_millis(200)))
        .await
        .expect("drain");
    let output = within(PATIENCE, "the handed-back task", slow.result())
        .await
        .expect("the task completes elsewhere");
    assert_eq!(output.node_id.as_str(), "node-b");
    assert_eq!(output.attempt, 2, "the move is a new attempt");
    assert_eq!(&output.stdout[..], b"SLOW");
}

#[tokio::test]
async fn label_and_role_changes_change_placement() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = stack.spawn_agent_online("node-a").await;
    let _b = stack.spawn_agent_online("node-b").await;
    let client = stack.client().await;

    // No node has the label yet: the task waits for one.
    let wants_gpu = client
        .submit(
            Task::new(wasm("uppercase"))
                .input("gpu")
                .requirements(Requirements {
                    labels: [("accelerator".to_owned(), "coral".to_owned())].into(),
                    ..Requirements::default()
                }),
        )
        .await
        .expect("submit");
    let labelled = client
        .label(
            &id("node-b"),
            [("accelerator".to_owned(), "coral".to_owned())].into(),
            Vec::new(),
        )
        .await
        .expect("label");
    assert_eq!(
        labelled.admin.labels.get("accelerator").map(String::as_str),
        Some("coral")
    );
    let output = within(PATIENCE, "the labelled task", wants_gpu.result())
        .await
        .expect("runs once a node has the label");
    assert_eq!(output.node_id.as_str(), "node-b");

    let wants_dns = Requirements {
        roles: BTreeSet::from(["dns".to_owned()]),
        ..Requirements::default()
    };
    client
        .set_roles(&id("node-a"), BTreeSet::from(["dns".to_owned()]))
        .await
        .expect("role");
    for n in 0..4 {
        let output = stack
            .run(
                Task::new(wasm("uppercase"))
                    .input(format!("dns {n}"))
                    .requirements(wants_dns.clone()),
            )
            .await
            .expect("runs");
        assert_eq!(output.node_id.as_str(), "node-a");
    }
    // Taking the label away again: the next such task is placed nowhere.
    client
        .label(
            &id("node-b"),
            Default::default(),
            vec!["accelerator".to_owned()],
        )
        .await
        .expect("unlabel");
    let show = client.node(&id("node-b")).await.expect("show");
    assert!(show.admin.removed_labels.contains("accelerator"));
    let mut dispatches = stack.dispatch_wire().await;
    let wants_it_again = Task::new(wasm("uppercase"))
        .input("gpu again")
        .requirements(Requirements {
            labels: [("accelerator".to_owned(), "coral".to_owned())].into(),
            ..Requirements::default()
        });
    client.submit(wants_it_again).await.expect("submit");
    if let Ok(Some(message)) = tokio::time::timeout(QUIET, dispatches.next()).await {
        panic!(
            "a task needing a removed label was placed on {}",
            message.subject
        );
    }
}

#[tokio::test]
async fn commands_about_unknown_nodes_are_not_found() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;
    let ghost = id("ghost");
    for outcome in [
        client.cordon(&ghost).await.map(drop),
        client.drain(&ghost, None).await.map(drop),
        client.approve(&ghost).await.map(drop),
        client.node(&ghost).await.map(drop),
        client.remove_node(&ghost).await.map(drop),
    ] {
        match outcome {
            Err(err) => {
                assert_eq!(
                    err.kind(),
                    apiary_sdk::RequestErrorKind::Refused(apiary_sdk::ErrorCode::NotFound),
                    "{err}"
                );
            }
            other => panic!("expected not_found, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_cordon_outlives_the_replica_that_recorded_it() {
    let stack = Stack::start().await;
    let first = stack.spawn_scheduler().await;
    let _a = stack.spawn_agent_online("node-a").await;
    let _b = stack.spawn_agent_online("node-b").await;
    let client = stack.client().await;
    client.cordon(&id("node-a")).await.expect("cordon");
    // The replica that answered dies; a new one reads the operator's record from the bucket.
    first.crash().await;
    let _second = stack.spawn_scheduler().await;
    for n in 0..6 {
        let output = stack
            .run(Task::new(wasm("uppercase")).input(format!("after {n}")))
            .await
            .expect("runs");
        assert_eq!(
            output.node_id.as_str(),
            "node-b",
            "task {n} ran on the cordoned node"
        );
    }
    let shown = client.node(&id("node-a")).await.expect("show");
    assert_eq!(shown.scheduling, Scheduling::Cordoned);
}

/// On a multi-thread runtime (as the agent's binary has) a run starts on the worker thread
/// itself, and a spinning one goes on on a blocking-pool thread after its first
/// millisecond of compute, out of reach of anything but its stop flag: a cancel and the
/// drain deadline must still reach it. The spinning module would otherwise run to its 60 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_the_worker_thread_still_stop_at_a_cancel_and_at_the_drain_deadline() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = one_slot_agent(&stack, "node-a").await;
    let client = stack.client().await;
    let output = stack
        .run(Task::new(wasm("uppercase")).input("fast"))
        .await
        .expect("runs");
    assert_eq!(&output.stdout[..], b"FAST");

    let spin = || {
        Task::new(apiary_harness::hostile("spin"))
            .timeout(Duration::from_secs(60))
            .retry(apiary_sdk::RetryPolicy {
                max_attempts: 1,
                ..apiary_sdk::RetryPolicy::default()
            })
    };
    let cancelled = client.submit(spin()).await.expect("submit");
    wait_running(&client, &id("node-a"), 1).await;
    cancelled.cancel().await.expect("cancel");
    let err = within(PATIENCE, "the cancelled spin", cancelled.result())
        .await
        .expect_err("cancelled");
    assert_eq!(
        err.task_failure().map(|failure| failure.error.kind),
        Some(apiary_sdk::TaskErrorKind::Cancelled),
        "{err}"
    );

    let drained = client.submit(spin()).await.expect("submit");
    wait_running(&client, &id("node-a"), 1).await;
    let _b = one_slot_agent(&stack, "node-b").await;
    client
        .drain(&id("node-a"), Some(Duration::from_millis(200)))
        .await
        .expect("drain");
    // Handed back at the deadline and placed on node-b, where it spins again.
    wait_running(&client, &id("node-b"), 1).await;
    let record = client.task_status(drained.id()).await.expect("status");
    assert_eq!(record.attempt, 2, "the move is a new attempt");
    // Stopped before the test ends: a run on a worker thread holds the runtime's shutdown.
    drained.cancel().await.expect("cancel");
    within(PATIENCE, "the moved spin's cancel", drained.result())
        .await
        .expect_err("cancelled");
    // The record says cancelled whatever the node does; the run itself must have stopped.
    wait_running(&client, &id("node-b"), 0).await;
}

/// A guest that computes past its first millisecond (so its run goes on on a thread of its
/// own), then sleeps far past its timeout in `poll_oneoff`, which the epoch deadline cannot
/// interrupt.
const SPIN_THEN_SLEEP_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32)
    (local.set $i (i32.const 20000000))
    (loop $spin
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br_if $spin (local.get $i)))
    ;; One relative clock subscription of 600 s on the monotonic clock.
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 600000000000))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96)))))"#;

/// A run given up on inside a host call is dropped a grace later, wherever it runs, and its
/// pooled instance goes back: a one-slot node, whose pool holds four instances, still runs
/// a task after six runs it gave up on. Were the given-up runs left sleeping, the fifth
/// would find no instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_given_up_inside_a_host_call_give_their_instances_back() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = one_slot_agent(&stack, "node-a").await;
    let stuck = bytes::Bytes::from(wat::parse_str(SPIN_THEN_SLEEP_WAT).expect("valid wat"));
    for _ in 0..6 {
        let failure = stack
            .run_expecting_failure(
                Task::new(stuck.clone()).timeout(Duration::from_millis(500)),
                apiary_sdk::TaskErrorKind::Timeout,
            )
            .await;
        assert!(
            failure.error.message.contains("blocked outside the module"),
            "{}",
            failure.error
        );
    }
    let output = stack
        .run(Task::new(wasm("uppercase")).input("still here"))
        .await
        .expect("a task after the given-up runs");
    assert_eq!(&output.stdout[..], b"STILL HERE");
}
