//! The offline outbox: a task that finishes while the server is away keeps its result on the
//! node's disk, and the result reaches its submitter once, when the server is back, also
//! when the agent restarts in between.

use std::time::Duration;

use apiary_harness::{
    Answer, Component, PATIENCE, ResultWire, Stack, eventually, results_until_quiet,
    sleeping_guest, within,
};
use apiary_proto::message::{Outcome, TaskResult};
use apiary_proto::{NodeId, topology};
use apiary_sdk::Task;

/// How long the task runs: long enough that the server is surely stopped before it ends.
const RUN: Duration = Duration::from_secs(3);

/// Starts a task on node-a that will finish while the server is away, and returns once the
/// node runs it. The module is run once before, so that node-a has it compiled and the
/// task needs nothing from the server until its result.
async fn start_task_to_finish_offline(stack: &Stack, client: &apiary_sdk::Client) {
    let module = client
        .upload_module(&sleeping_guest(RUN, Answer::Uppercase).expect("the guest's WAT"))
        .await
        .expect("upload");
    let warm = stack
        .run(Task::stored(module.clone()).input("warm"))
        .await
        .expect("the warm-up task completes");
    assert_eq!(warm.stdout.as_ref(), b"WARM");
    // The warm-up's result can reach the client before its dispatch is acked; only once it
    // is does an unacknowledged dispatch at node-a mean the kept task.
    every_dispatch_is_acknowledged(stack, "the warm-up's dispatch to be acknowledged").await;

    client
        .submit(
            Task::stored(module)
                .input("kept")
                .timeout(Duration::from_secs(60)),
        )
        .await
        .expect("submit");
    let consumer = stack
        .consumer(
            topology::DISPATCH_STREAM,
            &topology::node_dispatch_consumer_name(&node_a()),
        )
        .await;
    eventually(PATIENCE, "node-a to start the task", || async {
        (consumer.get_info().await.ok()?.num_ack_pending == 1).then_some(())
    })
    .await;
}

fn node_a() -> NodeId {
    NodeId::new("node-a").expect("id")
}

/// A one-node stack with a task that finished while the server was down: returns once the
/// agent's outbox holds its result, with the server still stopped. The scheduler stays away
/// after the restart until the test's own connection is back (see
/// [`the_result_arrives_exactly_once`]): core NATS keeps nothing for a reader that is still
/// reconnecting.
async fn keep_a_result_offline() -> (Stack, Component, Component, ResultWire) {
    let (mut stack, [scheduler, agent]) = Stack::with_one_node().await;
    let (client, wire) = stack.client_with_inbox("_INBOX.outbox").await;
    start_task_to_finish_offline(&stack, &client).await;
    scheduler.hold_connection();
    stack.stop_server().await;
    outbox_holds(
        &agent,
        1,
        "the finished task's result to be kept in the outbox",
    )
    .await;
    (stack, scheduler, agent, wire)
}

/// Waits until `agent`'s outbox holds `count` results.
async fn outbox_holds(agent: &Component, count: usize, what: &str) {
    let mut waiting = agent.outbox_waiting();
    within(
        PATIENCE,
        what,
        waiting.wait_for(|waiting| *waiting == count),
    )
    .await
    .expect("the agent is running");
}

/// Lets the held-back scheduler deliver once the test reads the wire again, reads it until
/// quiet, and checks that the task's result came once, from node-a's first attempt.
async fn the_result_arrives_exactly_once(scheduler: &Component, wire: &mut ResultWire) {
    wire.wait_until_connected().await;
    scheduler.release_connection();
    let deliveries = results_until_quiet(wire, 1, PATIENCE).await;
    deliveries.assert_each_exactly_once(1);
    let result: &TaskResult = deliveries
        .0
        .values()
        .next()
        .and_then(|results| results.first())
        .expect("a result");
    assert_eq!(result.node_id, node_a());
    assert_eq!(result.attempt, 1, "no other attempt ran the task");
    match &result.outcome {
        Outcome::Completed { stdout, .. } => assert_eq!(stdout.as_bytes(), b"KEPT"),
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// Waits until `APIARY_DISPATCH` is empty: a work queue deletes a dispatch once acked.
async fn every_dispatch_is_acknowledged(stack: &Stack, what: &str) {
    let js = async_nats::jetstream::new(stack.nats().await);
    let dispatch = js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .expect("the dispatch stream");
    eventually(PATIENCE, what, || {
        let mut dispatch = dispatch.clone();
        async move { (dispatch.info().await.ok()?.state.messages == 0).then_some(()) }
    })
    .await;
}

/// Waits until node-a's dispatch of the kept task is acknowledged, and checks that
/// `APIARY_RESULTS` holds the warm-up's result and the kept one, each once.
async fn everything_is_settled(stack: &Stack) {
    every_dispatch_is_acknowledged(stack, "the kept task's dispatch to be acknowledged").await;
    let js = async_nats::jetstream::new(stack.nats().await);
    let mut results = js
        .get_stream(topology::RESULTS_STREAM)
        .await
        .expect("the results stream");
    let stored = results.info().await.expect("results").state.messages;
    assert_eq!(
        stored, 2,
        "the warm-up's result and the kept one, each stored once"
    );
}

#[tokio::test]
async fn a_result_finished_while_the_server_is_down_arrives_exactly_once_when_it_is_back() {
    let (mut stack, scheduler, agent, mut wire) = keep_a_result_offline().await;

    stack.restart_server().await;
    // The agent stores the result by itself, with no scheduler in reach.
    outbox_holds(&agent, 0, "the agent to store the kept result").await;
    the_result_arrives_exactly_once(&scheduler, &mut wire).await;
    everything_is_settled(&stack).await;
}

#[tokio::test]
async fn a_kept_result_survives_an_agent_restart_and_the_task_does_not_run_again() {
    let (mut stack, scheduler, agent, mut wire) = keep_a_result_offline().await;

    // The agent dies with the server still down, and comes back before it: it finds the
    // result on disk, and waits for the server instead of giving up on it.
    agent.crash().await;
    let restarted = stack.spawn_agent("node-a");
    outbox_holds(&restarted, 1, "the restarted agent to find the kept result").await;

    stack.restart_server().await;
    outbox_holds(
        &restarted,
        0,
        "the restarted agent to store the kept result",
    )
    .await;
    the_result_arrives_exactly_once(&scheduler, &mut wire).await;

    // The dispatch the dead process held comes back to the restarted agent when it
    // registers, and is acknowledged without running the task again: the new process has
    // finished no task of its own.
    everything_is_settled(&stack).await;
    let status = stack.agent_status(node_a().as_str()).await;
    assert_eq!(status.metrics.tasks_completed, 0, "the task ran again");
    assert_eq!(status.metrics.running_tasks, 0);
    assert!(!restarted.is_finished());
}

#[tokio::test]
async fn a_second_agent_on_the_same_state_directory_is_refused_at_start() {
    let (stack, _running) = Stack::with_one_node().await;
    // Another node id, the same directory: an operator's copy-paste.
    let config = apiary_agent::AgentConfig {
        node_id: Some("node-b".into()),
        ..stack.agent_config("node-a")
    };
    let err = stack
        .spawn_agent_with(config)
        .exited()
        .await
        .expect_err("the second agent refuses to run");
    let message = format!("{err:#}");
    assert!(
        message.contains("in use by another apiary-agent process"),
        "{message}"
    );

    // The first agent carries on.
    let output = stack
        .run(Task::new(apiary_harness::wasm("uppercase")).input("still here"))
        .await
        .expect("the first agent runs tasks");
    assert_eq!(output.stdout.as_ref(), b"STILL HERE");
}

#[tokio::test]
async fn an_agent_and_a_scheduler_asked_to_stop_while_the_server_is_away_stop() {
    let (mut stack, [scheduler, agent]) = Stack::with_one_node().await;
    stack.stop_server().await;
    // `stop` waits at most PATIENCE: a component that waits for the server to come back
    // before it stops fails the test.
    agent.stop().await.expect("the agent stops cleanly");
    scheduler.stop().await.expect("the scheduler stops cleanly");
}
