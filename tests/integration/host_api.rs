//! The host APIs and the scratch grant on a real agent and server, with the example guests
//! built on `apiary-guest`: a counter kept in the app store by concurrent tasks, a guest's
//! publish reaching an SDK subscriber, namespaces that guests cannot cross, and scratch
//! directories that are capped and gone after the run.

use apiary_harness::{PATIENCE, Stack, wasm, within};
use apiary_proto::message::{GrantKind, Limits};
use apiary_sdk::{KvErrorKind, Namespace, Task, TaskErrorKind, TaskOutput};
use futures::StreamExt as _;
use std::collections::BTreeSet;

fn namespace(name: &str) -> Namespace {
    Namespace::new(name).expect("namespace")
}

async fn output(stack: &Stack, task: Task) -> TaskOutput {
    stack
        .run(task)
        .await
        .expect("the task ends with an exit code")
}

fn stdout(output: &TaskOutput) -> String {
    String::from_utf8(output.stdout.to_vec()).expect("text")
}

#[tokio::test]
async fn a_guest_counter_in_kv_counts_every_one_of_many_concurrent_tasks() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    // Two nodes of four slots: the increments really race, on different agents.
    let _a = stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            slots: Some(4),
            ..stack.agent_config("node-a")
        })
        .await;
    let _b = stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            slots: Some(4),
            ..stack.agent_config("node-b")
        })
        .await;
    let client = stack.client().await;

    const TASKS: u64 = 24;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let task = Task::new(wasm("kv-counter"))
            .kv(namespace("counters"))
            .input("visits");
        handles.push(client.submit(task).await.expect("submit"));
    }
    let mut counts = BTreeSet::new();
    for handle in handles {
        let output = handle.result_within(PATIENCE).await.expect("an increment");
        let count: u64 = stdout(&output).trim().parse().expect("a count");
        assert!(counts.insert(count), "two tasks both counted to {count}");
    }
    // Each task saw a count of its own: 1 to TASKS, none lost to a race.
    assert_eq!(counts, (1..=TASKS).collect::<BTreeSet<_>>());
    let kv = client.kv("counters").await.expect("namespace");
    assert_eq!(
        kv.get("visits").await.expect("the counter"),
        TASKS.to_string()
    );
}

#[tokio::test]
async fn a_guest_publish_reaches_an_sdk_subscriber_and_its_log_line_reaches_the_logs() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let pubsub = client.pubsub("alerts").expect("namespace");
    let mut messages = pubsub.subscribe("disk.>").await.expect("subscribe");
    apiary_sdk::round_trip(client.nats())
        .await
        .expect("the server has the subscription");

    let task = Task::new(wasm("publish"))
        .publish(namespace("alerts"))
        .arg("disk.sda")
        .input("91% full");
    let output = output(&stack, task).await;
    assert_eq!(stdout(&output), "published 8 bytes on disk.sda\n");

    let message = within(PATIENCE, "the guest's message", messages.next())
        .await
        .expect("a message");
    assert_eq!(message.topic, "disk.sda");
    assert_eq!(message.payload.as_ref(), b"91% full");

    // The guest's log line is a JSON object on its own line of stderr.
    let line: serde_json::Value = serde_json::from_slice(output.stderr.trim_ascii_end())
        .unwrap_or_else(|err| panic!("not one JSON line ({err}): {:?}", output.stderr));
    assert_eq!(line["log"], "info");
    assert_eq!(line["msg"], "published 8 bytes on disk.sda");
}

#[tokio::test]
async fn a_guest_reaches_only_the_namespace_of_its_submission() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let pubsub_b = client.pubsub("b").expect("namespace");
    let mut b_messages = pubsub_b.subscribe(">").await.expect("subscribe");
    apiary_sdk::round_trip(client.nats())
        .await
        .expect("the server has the subscription");

    let in_a = |input: &'static str| {
        Task::new(wasm("kv-counter"))
            .kv(namespace("a"))
            .input(input)
    };
    assert_eq!(stdout(&output(&stack, in_a("shared")).await), "1\n");
    assert_eq!(stdout(&output(&stack, in_a("shared")).await), "2\n");
    let in_b = Task::new(wasm("kv-counter"))
        .kv(namespace("b"))
        .input("shared");
    assert_eq!(
        stdout(&output(&stack, in_b).await),
        "1\n",
        "namespace b's counter started from a's"
    );
    assert_eq!(
        client
            .kv("a")
            .await
            .expect("a")
            .get("shared")
            .await
            .expect("a's count"),
        "2"
    );

    // A guest granted `a` publishes into `a` only, whatever topic it names.
    let publish_a = Task::new(wasm("publish"))
        .publish(namespace("a"))
        .arg("b.anything");
    output(&stack, publish_a).await;
    let publish_b = Task::new(wasm("publish"))
        .publish(namespace("b"))
        .arg("marker")
        .input("from b");
    output(&stack, publish_b).await;
    let first = within(PATIENCE, "b's own message", b_messages.next())
        .await
        .expect("a message");
    assert_eq!(
        (first.topic.as_str(), first.payload.as_ref()),
        ("marker", &b"from b"[..]),
        "a message from namespace a reached b's subscriber"
    );
}

#[tokio::test]
async fn host_apis_without_their_grant_are_refused_to_the_guest() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;

    // The kv-counter with only the publish grant: its first call is refused, and it fails
    // with its own error, saying so.
    let task = Task::new(wasm("kv-counter"))
        .publish(namespace("quiet"))
        .input("hits");
    let refused = output(&stack, task).await;
    assert_eq!(refused.exit_code, 1, "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not granted"), "{stderr}");
    let missing = client
        .kv_existing("quiet")
        .await
        .map(drop)
        .expect_err("nothing may have made the namespace");
    assert_eq!(missing.kind(), KvErrorKind::NotFound);

    // A host API granted without a namespace to act in is an invalid task.
    let no_namespace = apiary_sdk::Grants {
        kv: true,
        ..apiary_sdk::Grants::default()
    };
    let failure = stack
        .run_expecting_failure(
            Task::new(wasm("kv-counter")).grants(no_namespace),
            TaskErrorKind::InvalidTask,
        )
        .await;
    assert!(
        failure.error.message.contains("namespace"),
        "{}",
        failure.error
    );
}

#[tokio::test]
async fn a_scratch_directory_works_is_capped_and_is_gone_after_the_run() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let config = apiary_agent::AgentConfig {
        max_scratch_bytes: 1024 * 1024,
        ..stack.agent_config("node-a")
    };
    let scratch_root = config
        .state_dir
        .clone()
        .expect("a state directory")
        .join(apiary_agent::sandbox::SCRATCH_DIR_NAME);
    let _agent = stack.spawn_agent_online_with(config).await;

    let sorted = output(
        &stack,
        Task::new(wasm("scratch"))
            .scratch(64 * 1024)
            .input("pear\napple\nfig\nkiwi\nbanana\n"),
    )
    .await;
    assert_eq!(stdout(&sorted), "apple\nbanana\nfig\nkiwi\npear\n");
    let usage = sorted.usage.expect("usage");
    assert!(usage.scratch_bytes > 0, "the run's files were counted");
    assert_eq!(
        std::fs::read_dir(&scratch_root)
            .expect("the scratch root")
            .count(),
        0,
        "the run's scratch directory is still there"
    );

    // Without the grant there is no directory; the guest says so.
    let refused = output(&stack, Task::new(wasm("scratch")).input("b\na\n")).await;
    assert_eq!(refused.exit_code, 1, "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no scratch directory"),
        "{refused:?}"
    );

    // Past its cap the run fails with `disk_limit`, and its files are gone all the same.
    let lines: String = (0..2_000).map(|n| format!("line {n:05}\n")).collect();
    let failure = stack
        .run_expecting_failure(
            Task::new(wasm("scratch")).scratch(4 * 1024).input(lines),
            TaskErrorKind::DiskLimit,
        )
        .await;
    assert!(failure.error.message.contains("4096"), "{}", failure.error);
    assert_eq!(std::fs::read_dir(&scratch_root).expect("root").count(), 0);

    // More than the node allows is an invalid task.
    let failure = stack
        .run_expecting_failure(
            Task::new(wasm("scratch"))
                .scratch(2 * 1024 * 1024)
                .input("a\n"),
            TaskErrorKind::InvalidTask,
        )
        .await;
    assert!(
        failure.error.message.contains("1048576"),
        "{}",
        failure.error
    );
}

#[tokio::test]
async fn a_node_that_forbids_scratch_and_host_apis_refuses_them() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _agent = stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            forbid_grants: [GrantKind::Scratch, GrantKind::Kv, GrantKind::Publish].into(),
            ..stack.agent_config("node-a")
        })
        .await;
    let short = Limits {
        timeout_ms: 5_000,
        ..Limits::default()
    };
    for (grant, task) in [
        ("scratch", Task::new(wasm("scratch")).scratch(1024)),
        ("kv", Task::new(wasm("kv-counter")).kv(namespace("n"))),
        (
            "publish",
            Task::new(wasm("publish")).publish(namespace("n")),
        ),
    ] {
        let failure = stack
            .run_expecting_failure(task.limits(short.clone()), TaskErrorKind::InvalidTask)
            .await;
        assert!(failure.error.message.contains(grant), "{}", failure.error);
    }
}

/// On a multi-thread runtime, as the agent's binary has, a run is polled on the worker
/// thread that took its dispatch, and its host calls suspend it there while the SDK's
/// answer comes. The other tests here run on a current-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_calls_work_from_a_run_on_the_worker_thread() {
    let (stack, _running) = Stack::with_one_node().await;
    let count = || {
        Task::new(wasm("kv-counter"))
            .kv(namespace("fast"))
            .input("n")
    };
    assert_eq!(stdout(&output(&stack, count()).await), "1\n");
    assert_eq!(stdout(&output(&stack, count()).await), "2\n");
    let published = Task::new(wasm("publish"))
        .publish(namespace("fast"))
        .input("x");
    assert!(stdout(&output(&stack, published).await).starts_with("published 1 bytes"));
}
