//! Submitting tasks and getting their results.

use std::collections::BTreeMap;
use std::time::Duration;

use apiary_harness::{PATIENCE, Stack, eventually, results_until_quiet, sleeping_module, wasm};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::topology;
use apiary_sdk::{ResultErrorKind, Task, TaskErrorKind};
use futures::{FutureExt as _, StreamExt as _};

#[tokio::test]
async fn a_submitted_task_returns_its_output() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;

    let output = client
        .submit(Task::new(wasm("wordcount")).input("the quick brown fox\njumps\n"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the task completes");
    assert_eq!(output.stdout.as_ref(), b"2 5 26\n");
    assert_eq!(output.exit_code, 0);
    assert!(output.stderr.is_empty());
    assert_eq!(output.node_id.as_str(), "node-a");
    assert_eq!(output.attempt, 1);
}

#[tokio::test]
async fn fifty_tasks_on_two_agents_each_come_back_exactly_once() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _a = stack.spawn_agent_online("node-a").await;
    let _b = stack.spawn_agent_online("node-b").await;
    // The SDK hides repeated results, so the test reads the client's inbox as well.
    let (client, mut delivered) = stack.client_with_inbox("_INBOX.fifty").await;

    // Every result the agents publish, as an operator's `nats sub` would see them.
    let nats = stack.nats().await;
    let mut published = nats
        .subscribe(subject::all_nodes(NodeVerb::Result).to_string())
        .await
        .expect("subscribe to results");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");

    let module = wasm("uppercase");
    let mut handles = Vec::new();
    for i in 0..50 {
        let task = Task::new(module.clone()).input(format!("task number {i}"));
        handles.push((i, client.submit(task).await.expect("submit")));
    }
    let mut per_node = BTreeMap::new();
    for (i, handle) in handles {
        let output = handle
            .result_within(PATIENCE)
            .await
            .expect("task completes");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("TASK NUMBER {i}")
        );
        *per_node.entry(output.node_id.to_string()).or_insert(0) += 1;
    }
    assert_eq!(per_node.values().sum::<i32>(), 50);
    assert_eq!(per_node.len(), 2, "both agents ran tasks: {per_node:?}");

    // Exactly once: one result published per task, one delivered per task (both read until
    // the wire has gone quiet, so a late repeat is seen), and fifty stored.
    results_until_quiet(&mut published, 50, PATIENCE)
        .await
        .assert_each_exactly_once(50);
    results_until_quiet(&mut delivered, 50, PATIENCE)
        .await
        .assert_each_exactly_once(50);
    assert_eq!(client.duplicate_results(), 0);
    let js = async_nats::jetstream::new(nats);
    let mut results = js
        .get_stream(topology::RESULTS_STREAM)
        .await
        .expect("results stream");
    assert_eq!(
        results.info().await.expect("stream info").state.messages,
        50
    );
}

#[tokio::test]
async fn an_invalid_module_is_a_typed_error_and_the_agent_keeps_working() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = client
        .submit(Task::new(garbage))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect_err("random bytes cannot run");
    match err.task_failure() {
        Some(failure) => {
            assert_eq!(err.kind(), ResultErrorKind::TaskFailed);
            assert_eq!(failure.error.kind, TaskErrorKind::InvalidModule, "{err}");
            assert_eq!(failure.node_id.as_str(), "node-a");
        }
        None => panic!("expected a task failure, got {err:?}"),
    }

    let output = client
        .submit(Task::new(wasm("uppercase")).input("still here"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the agent still runs tasks");
    assert_eq!(output.stdout.as_ref(), b"STILL HERE");
    assert!(!agent.is_finished());
}

#[tokio::test]
async fn a_task_submitted_while_no_agent_is_up_runs_once_one_starts() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = stack.client().await;
    let handle = client
        .submit(Task::new(wasm("uppercase")).input("patience"))
        .await
        .expect("submit");

    // With no node to place it on, the task stays in the queue, where any replica (and any
    // node that appears) can have it: the scheduler does not pull it and sit on it.
    let consumer = stack
        .consumer(topology::TASKS_STREAM, topology::SCHEDULER_TASKS_CONSUMER)
        .await;
    eventually(PATIENCE, "the task to wait in the queue", || async {
        let info = consumer.get_info().await.ok()?;
        (info.num_pending == 1 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    let js = async_nats::jetstream::new(stack.nats().await);
    let mut dispatch = js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .expect("dispatch stream");
    assert_eq!(dispatch.info().await.expect("info").state.messages, 0);

    let _agent = stack.spawn_agent("node-a");
    let output = handle
        .result_within(PATIENCE)
        .await
        .expect("runs once a node is up");
    assert_eq!(output.stdout.as_ref(), b"PATIENCE");
}

#[tokio::test]
async fn a_task_submitted_while_no_scheduler_is_up_runs_once_one_starts() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    let handle = client
        .submit(Task::new(wasm("wordcount")).input("one two three"))
        .await
        .expect("submit is stored without any scheduler");
    let _scheduler = stack.spawn_scheduler().await;
    let _agent = stack.spawn_agent("node-a");
    let output = handle.result_within(PATIENCE).await.expect("completes");
    assert_eq!(output.stdout.as_ref(), b"0 3 13\n");
}

#[tokio::test]
async fn a_non_zero_exit_code_is_an_answer_not_a_failure() {
    let (stack, _running) = Stack::with_one_node().await;
    let module = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") (call $exit (i32.const 7))))"#,
    )
    .expect("wat");
    let output = stack.run(Task::new(module)).await.expect("completes");
    assert_eq!(output.exit_code, 7);
}

#[tokio::test]
async fn a_module_missing_from_the_store_is_a_typed_error() {
    let (stack, _running) = Stack::with_one_node().await;
    let missing = apiary_proto::message::ModuleRef::for_bytes(b"never uploaded");
    stack
        .run_expecting_failure(Task::stored(missing), TaskErrorKind::ModuleNotFound)
        .await;
}

#[tokio::test]
async fn scheduler_replicas_share_the_work_and_either_can_carry_on_alone() {
    let stack = Stack::start().await;
    let first = stack.spawn_scheduler().await;
    let second = stack.spawn_scheduler().await;
    let _agent = stack.spawn_agent_online("node-a").await;
    let module = stack
        .client()
        .await
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");

    // The SDK drops duplicates, so count deliveries on a raw inbox instead.
    let nats = stack.nats().await;
    let inbox = nats.new_inbox();
    let mut delivered = nats.subscribe(inbox.clone()).await.expect("subscribe");
    apiary_sdk::round_trip(&nats)
        .await
        .expect("the server has the subscription");
    let js = async_nats::jetstream::new(nats.clone());

    submit_by_hand(&js, &module, &inbox, 0..20).await;
    results_until_quiet(&mut delivered, 20, PATIENCE)
        .await
        .assert_each_exactly_once(20);
    // Each replica placed some of the tasks, and together they placed each exactly once.
    // (Read before the first replica stops: a stopped replica no longer answers.)
    let placed_by_first = stack.scheduler_counters(&first).await.get("tasks_placed");
    let placed_by_second = stack.scheduler_counters(&second).await.get("tasks_placed");
    assert!(
        placed_by_first > 0 && placed_by_second > 0,
        "the replicas placed {placed_by_first} and {placed_by_second} tasks"
    );
    assert_eq!(placed_by_first + placed_by_second, 20);

    // One replica goes away; the other carries on with the same durable consumers.
    first.stop().await.expect("the first replica stops cleanly");
    submit_by_hand(&js, &module, &inbox, 20..40).await;
    // Within the scheduler consumers' ack wait of the submissions: a stopped replica must
    // leave no task parked in a pull request nobody reads, which would hold it until the
    // ack wait ran out, so a parked task would come back only later than this.
    results_until_quiet(&mut delivered, 20, topology::SCHEDULER_ACK_WAIT)
        .await
        .assert_each_exactly_once(20);
    assert_eq!(
        stack.scheduler_counters(&second).await.get("tasks_placed"),
        placed_by_second + 20,
        "the remaining replica placed the rest"
    );

    // Nothing was redelivered, and nothing is left unacknowledged.
    let consumer = stack
        .consumer(topology::TASKS_STREAM, topology::SCHEDULER_TASKS_CONSUMER)
        .await;
    let info = eventually(PATIENCE, "every submission acknowledged", || async {
        let info = consumer.get_info().await.ok()?;
        (info.num_ack_pending == 0).then_some(info)
    })
    .await;
    assert_eq!(info.num_redelivered, 0);
}

/// Publishes JSON submissions as an operator would, results to `inbox`.
async fn submit_by_hand(
    js: &async_nats::jetstream::Context,
    module: &apiary_proto::message::ModuleRef,
    inbox: &str,
    ids: std::ops::Range<u32>,
) {
    for i in ids {
        let submission = serde_json::json!({
            "id": format!("by-hand-{i}"),
            "module": {"sha256": module.sha256},
            "input": format!("r{i}"),
            "reply_to": inbox,
        });
        js.publish(subject::task_submit(), submission.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
}

/// A module that writes 16 × 64 KiB = 1 MiB to file descriptor `fd`: within the default
/// output limit, but a result that size cannot cross a server with the default 1 MB
/// `max_payload`.
fn writes_a_mebibyte_to(fd: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 2)
             (func (export "_start") (local $i i32)
               (i32.store (i32.const 0) (i32.const 1024))
               (i32.store (i32.const 4) (i32.const 65536))
               (loop $again
                 (drop (call $write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if $again (i32.lt_u (local.get $i) (i32.const 16))))))"#
    ))
    .expect("wat")
}

#[tokio::test]
async fn output_too_large_for_a_message_travels_through_the_object_store() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let handle = client
        .submit(Task::new(writes_a_mebibyte_to(1)))
        .await
        .expect("submit");
    let id = handle.id().clone();
    let output = handle
        .result_within(PATIENCE)
        .await
        .expect("the whole output");
    assert_eq!(output.stdout.len(), 1 << 20);
    // The result itself names the object; `task result` by id finds it too.
    let reply = client.task_result(&id).await.expect("result by id");
    let result = reply.result.expect("the stored result");
    let object = result.stdout_object.clone().expect("an output object");
    assert_eq!(object.size, 1 << 20);
    let stdout = client.result_stdout(&result, &[]).await.expect("fetched");
    assert_eq!(stdout, output.stdout);
}

#[tokio::test]
async fn stderr_too_large_for_the_server_is_a_typed_error_not_a_retry_loop() {
    let (stack, _running) = Stack::with_one_node().await;
    stack
        .run_expecting_failure(
            Task::new(writes_a_mebibyte_to(2)),
            TaskErrorKind::OutputLimit,
        )
        .await;
}

#[tokio::test]
async fn modules_are_uploaded_once_and_bad_copies_are_replaced() {
    let (stack, _running) = Stack::with_one_node().await;
    let module = wasm("uppercase");
    let client = stack.client().await;
    let reference = client.upload_module(&module).await.expect("upload");
    let js = async_nats::jetstream::new(stack.nats().await);
    let store = js
        .get_object_store(topology::MODULES_BUCKET)
        .await
        .expect("module store");
    let first = store.info(&reference.sha256).await.expect("stored");

    // Another client uploading the same bytes finds them and writes nothing.
    let again = stack
        .client()
        .await
        .upload_module(&module)
        .await
        .expect("upload");
    assert_eq!(again, reference);
    assert_eq!(
        store.info(&reference.sha256).await.expect("info").nuid,
        first.nuid
    );

    // Other bytes under the module's name (a botched hand upload) are replaced.
    let mut wrong: &[u8] = b"not the module";
    store
        .put(reference.sha256.as_str(), &mut wrong)
        .await
        .expect("overwrite");
    let output = stack
        .run(Task::new(module).input("fixed"))
        .await
        .expect("runs with the real bytes");
    assert_eq!(output.stdout.as_ref(), b"FIXED");
}

#[tokio::test]
async fn a_handle_outliving_its_client_reports_disconnected() {
    let stack = Stack::start().await;
    let client = stack.client().await;
    // No scheduler: the task waits in the queue, so the handle would wait forever.
    let handle = client
        .submit(Task::new(wasm("uppercase")))
        .await
        .expect("submit");
    drop(client);
    let err = handle
        .result_within(PATIENCE)
        .await
        .expect_err("no result can come");
    assert_eq!(err.kind(), ResultErrorKind::Disconnected, "{err:?}");
}

#[tokio::test]
async fn tasks_asking_for_more_than_the_node_allows_are_refused() {
    let (stack, _running) = Stack::with_one_node().await;
    let greedy = apiary_proto::message::Limits {
        timeout_ms: u64::MAX,
        ..Default::default()
    };
    stack
        .run_expecting_failure(
            Task::new(wasm("uppercase")).limits(greedy),
            TaskErrorKind::InvalidTask,
        )
        .await;
}

#[tokio::test]
async fn tasks_no_node_can_run_do_not_hold_up_the_queue() {
    let stack = Stack::start().await;
    let _scheduler = stack
        .spawn_scheduler_with(apiary_scheduler::SchedulerConfig {
            max_in_flight: 2,
            ..stack.scheduler_config()
        })
        .await;
    let _agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;
    let impossible = apiary_proto::message::Requirements {
        arch: Some("no-such-arch".into()),
        ..Default::default()
    };
    let mut stuck = Vec::new();
    for _ in 0..4 {
        stuck.push(
            client
                .submit(Task::new(wasm("uppercase")).requirements(impossible.clone()))
                .await
                .expect("submit"),
        );
    }
    let output = client
        .submit(Task::new(wasm("uppercase")).input("through"))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("a runnable task gets through");
    assert_eq!(output.stdout.as_ref(), b"THROUGH");
}

#[tokio::test]
async fn tasks_waiting_for_a_busy_node_do_not_hold_up_tasks_other_nodes_can_run() {
    // One node has a label that twenty tasks need and runs one at a time; another node runs
    // anything. The labelled tasks wait for their node in the queue, not in the scheduler,
    // so the scheduler keeps pulling and the plain tasks run on the other node meanwhile.
    let stack = Stack::start().await;
    let _scheduler = stack
        .spawn_scheduler_with(apiary_scheduler::SchedulerConfig {
            max_in_flight: 8,
            ..stack.scheduler_config()
        })
        .await;
    let mut attic = stack.agent_config("attic");
    attic.slots = Some(1);
    attic.labels.insert("zone".into(), "attic".into());
    let _attic = stack.spawn_agent_online_with(attic).await;
    let _plain = stack.spawn_agent_online("plain").await;

    // Every result the attic stores, seen as it is published.
    let attic_id = apiary_proto::NodeId::new("attic").expect("a node id");
    let mut attic_results = stack
        .nats()
        .await
        .subscribe(subject::node(&attic_id, NodeVerb::Result))
        .await
        .expect("subscribe to the attic's results");

    let client = stack.client().await;
    let mut wants_attic = apiary_proto::message::Requirements::default();
    wants_attic.labels.insert("zone".into(), "attic".into());
    let slow = bytes::Bytes::from(sleeping_module(Duration::from_secs(1)));
    let mut labelled = Vec::new();
    for n in 0..20 {
        let task = Task::new(slow.clone())
            .input(format!("attic {n}"))
            .requirements(wants_attic.clone());
        labelled.push(client.submit(task).await.expect("submit"));
    }
    let mut plain = Vec::new();
    for n in 0..10 {
        let task = Task::new(wasm("uppercase")).input(format!("plain {n}"));
        plain.push(client.submit(task).await.expect("submit"));
    }
    for handle in plain {
        let output = handle
            .result_within(PATIENCE)
            .await
            .expect("a plain task runs on the plain node");
        assert_eq!(output.node_id.as_str(), "plain");
    }
    // The attic runs one labelled task a second: had the plain tasks waited behind the
    // labelled ones, most of those would be done by now.
    let mut attic_done = 0;
    while let Some(Some(_)) = attic_results.next().now_or_never() {
        attic_done += 1;
    }
    assert!(
        attic_done < 10,
        "the plain tasks waited for {attic_done} labelled ones"
    );
    for handle in labelled {
        let output = handle
            .result_within(PATIENCE)
            .await
            .expect("every labelled task runs in the end");
        assert_eq!(output.node_id.as_str(), "attic");
    }
}

#[tokio::test]
async fn tasks_go_only_to_nodes_with_the_roles_and_free_disk_they_require() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let mut dns = stack.agent_config("dns");
    dns.roles = ["dns".to_owned()].into();
    let _dns = stack.spawn_agent_online_with(dns).await;
    let _plain = stack.spawn_agent_online("plain").await;
    let client = stack.client().await;

    // Equal nodes take turns, so without the requirement half of these would run on "plain".
    let wants_dns = apiary_proto::message::Requirements {
        roles: ["dns".to_owned()].into(),
        min_free_disk_bytes: Some(1),
        ..Default::default()
    };
    let mut handles = Vec::new();
    for n in 0..6 {
        let task = Task::new(wasm("uppercase"))
            .input(format!("dns {n}"))
            .requirements(wants_dns.clone());
        handles.push(client.submit(task).await.expect("submit"));
    }
    for handle in handles {
        let output = handle.result_within(PATIENCE).await.expect("a result");
        assert_eq!(output.node_id.as_str(), "dns");
    }

    // A role no node performs yet: the task waits in the queue for a node that does.
    let wants_nginx = apiary_proto::message::Requirements {
        roles: ["nginx".to_owned()].into(),
        ..Default::default()
    };
    let waiting = client
        .submit(
            Task::new(wasm("uppercase"))
                .input("proxy")
                .requirements(wants_nginx),
        )
        .await
        .expect("submit");
    let mut nginx = stack.agent_config("nginx");
    nginx.roles = ["nginx".to_owned()].into();
    let _nginx = stack.spawn_agent_online_with(nginx).await;
    let output = waiting
        .result_within(PATIENCE)
        .await
        .expect("the task runs once a node performs its role");
    assert_eq!(output.node_id.as_str(), "nginx");
    assert_eq!(output.stdout.as_ref(), b"PROXY");
}

#[tokio::test]
async fn the_example_guests_compute_what_they_say() {
    let (stack, _running) = Stack::with_one_node().await;
    let run = |module: &str, input: &'static str| stack.run(Task::new(wasm(module)).input(input));
    // The digest `sha256sum` gives for "abc".
    let digest = run("sha256", "abc").await.expect("sha256 runs");
    assert_eq!(
        digest.stdout.as_ref(),
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
    let fib = run("fib", "20\n").await.expect("fib runs");
    assert_eq!(fib.stdout.as_ref(), b"6765\n");
    let refused = run("fib", "not a number").await.expect("fib answers");
    assert_eq!(refused.exit_code, 1);
    assert!(!refused.stderr.is_empty());
}
