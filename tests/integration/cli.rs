//! The `apiary` command line's task and node commands, run against a real cluster through
//! the same functions the binary calls.

use std::time::Duration;

use apiary_cli::commands::{self, Output, SubmitOptions, TASK_FAILED_EXIT};
use apiary_cli::tasks;
use apiary_harness::{PATIENCE, Stack, wasm};

fn options(module: Vec<u8>, input: &str) -> SubmitOptions {
    SubmitOptions {
        wait: Duration::from_secs(30),
        ..SubmitOptions::new(module, input.as_bytes().to_vec())
    }
}

async fn submit(stack: &Stack, options: SubmitOptions) -> (u8, String, String) {
    let client = commands::connect(stack.url()).await.expect("connect");
    let mut out = Output {
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let code = commands::task_submit(&client, options, &mut out)
        .await
        .expect("the command runs");
    (
        code,
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
    )
}

#[tokio::test]
async fn task_submit_prints_the_output_and_exits_with_the_module_code() {
    let (stack, _running) = Stack::with_one_node().await;
    let (code, stdout, stderr) = submit(&stack, options(wasm("wordcount").to_vec(), "a b\n")).await;
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "1 2 4\n", ""));

    let exit_3 = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") (call $exit (i32.const 3))))"#,
    )
    .expect("wat");
    let (code, _, _) = submit(&stack, options(exit_3, "")).await;
    assert_eq!(code, 3);
}

#[tokio::test]
async fn task_submit_reports_a_failed_task_with_its_kind() {
    let (stack, _running) = Stack::with_one_node().await;
    let (code, stdout, stderr) = submit(&stack, options(b"not wasm at all".to_vec(), "")).await;
    assert_eq!(code, TASK_FAILED_EXIT);
    assert!(stdout.is_empty());
    assert!(stderr.contains("invalid module"), "{stderr}");
}

#[tokio::test]
async fn task_submit_json_prints_the_whole_result() {
    let (stack, _running) = Stack::with_one_node().await;
    let mut submission = options(wasm("uppercase").to_vec(), "quiet");
    submission.json = true;
    let (code, stdout, _) = submit(&stack, submission).await;
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["outcome"]["completed"]["stdout"], "QUIET");
    assert_eq!(report["node_id"], "node-a");
}

#[tokio::test]
async fn a_detached_task_is_followed_by_id_with_status_result_logs_and_ls() {
    let (stack, _running) = Stack::with_one_node().await;
    let mut detached = options(wasm("uppercase").to_vec(), "by id");
    detached.detach = true;
    let (code, stdout, _) = submit(&stack, detached).await;
    assert_eq!(code, 0);
    let id = apiary_proto::TaskId::new(stdout.trim()).expect("the task id, alone");

    let client = commands::connect(stack.url()).await.expect("connect");
    let mut out = Output {
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let code = tasks::result(&client, &id, tasks::Wait::Up(PATIENCE), false, &mut out)
        .await
        .expect("result");
    assert_eq!(
        (code, String::from_utf8(out.stdout).expect("utf-8")),
        (0, "BY ID".to_owned()),
        "printed as submit prints it"
    );

    let mut json = Vec::new();
    tasks::status(&client, &id, true, &mut json)
        .await
        .expect("status");
    let record: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["id"], id.as_str());

    let mut logs = Vec::new();
    tasks::logs(&client, &id, &mut logs).await.expect("logs");
    assert!(logs.is_empty(), "uppercase writes nothing to stderr");

    let mut table = Vec::new();
    let filter = apiary_proto::message::TaskListRequest {
        state: Some(apiary_proto::lifecycle::TaskState::Succeeded),
        ..Default::default()
    };
    tasks::ls(&client, &filter, false, &mut table)
        .await
        .expect("ls");
    let table = String::from_utf8(table).expect("utf-8");
    let row = table
        .lines()
        .find(|line| line.contains(id.as_str()))
        .unwrap_or_else(|| panic!("{id} missing from\n{table}"));
    assert!(row.contains("succeeded") && row.contains("node-a"), "{row}");

    // An unknown id is a clear error, not a hang.
    let unknown = apiary_proto::TaskId::new("no-such-task").expect("id");
    let err = tasks::status(&client, &unknown, false, &mut Vec::new())
        .await
        .expect_err("unknown");
    assert!(
        format!("{err:#}").contains("no task no-such-task"),
        "{err:#}"
    );
}

#[tokio::test]
async fn nodes_ls_shows_the_table() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = commands::connect(stack.url()).await.expect("connect");
    let mut table = Vec::new();
    commands::nodes_ls(&client, None, false, &mut table)
        .await
        .expect("list");
    let table = String::from_utf8(table).expect("utf-8");
    let row = table.lines().nth(1).expect("a row under the header");
    assert!(row.contains("node-a") && row.contains("online"), "{table}");

    let mut offline = Vec::new();
    commands::nodes_ls(
        &client,
        Some(apiary_proto::message::NodeStatus::Offline),
        true,
        &mut offline,
    )
    .await
    .expect("list");
    let offline: serde_json::Value = serde_json::from_slice(&offline).expect("JSON");
    assert_eq!(offline, serde_json::json!([]));
}

#[tokio::test]
async fn tokens_create_prints_the_token_last_and_an_agent_joins_with_it() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let client = commands::connect(stack.url()).await.expect("connect");
    let mut out = Vec::new();
    let token = apiary_sdk::NewToken {
        description: "pi fleet".into(),
        ttl: Some(Duration::from_secs(24 * 60 * 60)),
        uses: Some(3),
    };
    commands::tokens_create(&client, token, false, &mut out)
        .await
        .expect("create");
    let printed = String::from_utf8(out).expect("utf-8");
    // What a script does: take the last word.
    let token = printed
        .split_whitespace()
        .last()
        .expect("a last word")
        .to_owned();
    let config = apiary_agent::AgentConfig {
        token: Some(token.clone().into()),
        ..stack.agent_config("pi-7")
    };
    let _agent = stack.spawn_agent_online_with(config).await;

    let mut out = Vec::new();
    commands::tokens_ls(&client, false, &mut out)
        .await
        .expect("ls");
    let table = String::from_utf8(out).expect("utf-8");
    let (id, secret) = token.split_once('.').expect("id.secret");
    let row = table
        .lines()
        .find(|line| line.contains(id))
        .unwrap_or_else(|| panic!("{id} missing from\n{table}"));
    // Two of three uses left after pi-7 joined, one used; never the secret.
    for expected in ["pi fleet", " 2 ", " 1 ", "no"] {
        assert!(row.contains(expected), "{expected:?} missing from {row:?}");
    }
    // A day less however long the test took so far, rounded to the second.
    assert!(
        row.contains("in 1day") || row.contains("in 23h"),
        "no expiry a day ahead in {row:?}"
    );
    assert!(!table.contains(secret));

    let mut out = Vec::new();
    let node = apiary_proto::NodeId::new("pi-7").expect("id");
    commands::nodes_show(&client, &node, false, &mut out)
        .await
        .expect("show");
    let shown = String::from_utf8(out).expect("utf-8");
    let summary = client.node(&node).await.expect("show");
    assert!(summary.info.public_key.starts_with('N'));
    assert!(
        shown.contains(&summary.info.public_key),
        "the key is shown whole:\n{shown}"
    );
}
