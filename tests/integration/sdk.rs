//! The SDK's own promises, held against a real server.

use apiary_harness::{PATIENCE, Stack, wasm, within};
use apiary_proto::message::{Outcome, TaskResult};
use apiary_proto::{NodeId, now_ms, stored};
use apiary_sdk::Task;

#[tokio::test]
async fn a_result_stored_while_the_client_was_cut_off_still_reaches_its_handle() {
    // No scheduler runs, so nothing ever publishes this result to the client's inbox: it
    // exists only in APIARY_RESULTS, as a result does when it was published while the client
    // was reconnecting. The reconnect must find it there.
    let stack = Stack::start().await;
    let client = stack.client().await;
    let handle = client
        .submit(Task::new(wasm("uppercase")).input("missed"))
        .await
        .expect("the task is stored");
    let result = TaskResult {
        task_id: handle.id().clone(),
        node_id: NodeId::new("node-a").expect("a valid node id"),
        attempt: 1,
        outcome: Outcome::Completed {
            exit_code: 0,
            stdout: "MISSED".into(),
            stderr: Default::default(),
        },
        started_at_ms: now_ms(),
        finished_at_ms: now_ms(),
        reply_to: None,
        stdout_object: None,
    };
    let js = async_nats::jetstream::new(stack.nats().await);
    stored::result(&js, &result)
        .await
        .expect("the result is stored");

    client
        .nats()
        .force_reconnect()
        .await
        .expect("the client reconnects");
    let output = within(
        PATIENCE,
        "the handle to resolve after the reconnect",
        handle.result(),
    )
    .await
    .expect("the stored result");
    assert_eq!(output.stdout, "MISSED");
    assert_eq!(client.duplicate_results(), 0);
}
