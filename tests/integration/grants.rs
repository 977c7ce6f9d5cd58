//! Grants on a real agent: a task sees arguments, environment and the host's clock only
//! when granted them, and a node refuses the grants its operator forbids.

use apiary_harness::{PATIENCE, Stack};
use apiary_proto::message::GrantKind;
use apiary_sdk::{Client, Task, TaskErrorKind};

/// `wasm-tasks/probes/grants.wat`: prints argc, the number of environment variables, and
/// whether the wall and monotonic clocks read anything but 0.
fn probe() -> Vec<u8> {
    wat::parse_str(include_str!("../../wasm-tasks/probes/grants.wat")).expect("the probe's WAT")
}

async fn seen(client: &Client, task: Task) -> String {
    let output = client
        .submit(task)
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the probe runs");
    String::from_utf8(output.stdout.to_vec()).expect("digits")
}

#[tokio::test]
async fn a_task_sees_only_what_it_is_granted() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;

    assert_eq!(seen(&client, Task::new(probe())).await, "1000");
    let granted = Task::new(probe())
        .arg("--fast")
        .arg("input.txt")
        .env("LANG", "C")
        .env("TZ", "UTC")
        .clock();
    let seen = seen(&client, granted).await;
    assert_eq!(&seen[..3], "321", "argc, environment, wall clock: {seen}");
}

#[tokio::test]
async fn a_node_refuses_a_grant_its_operator_forbids() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let _agent = stack
        .spawn_agent_online_with(apiary_agent::AgentConfig {
            forbid_grants: [GrantKind::Clock].into(),
            ..stack.agent_config("node-a")
        })
        .await;
    let client = stack.client().await;

    let err = client
        .submit(Task::new(probe()).clock())
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect_err("the node forbids the clock");
    let failure = err.task_failure().expect("a task failure");
    assert_eq!(failure.error.kind, TaskErrorKind::InvalidTask);
    assert!(failure.error.message.contains("clock"), "{err}");

    // What the node allows still runs there.
    assert_eq!(
        seen(&client, Task::new(probe()).env("A", "1")).await,
        "1100"
    );
}
