//! The `apiary` command line's task and node commands, run against a real cluster through
//! the same functions the binary calls.

use std::time::Duration;

use apiary_cli::commands::{self, Output, SubmitOptions, TASK_FAILED_EXIT};
use apiary_cli::tasks;
use apiary_harness::{PATIENCE, Stack, wasm, within};

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
    tasks::logs(&client, &id, false, &mut logs)
        .await
        .expect("logs");
    assert!(logs.is_empty(), "uppercase writes nothing to stderr");
    let mut logs = Vec::new();
    tasks::logs(&client, &id, true, &mut logs)
        .await
        .expect("logs");
    let logs: serde_json::Value = serde_json::from_slice(&logs).expect("JSON logs");
    assert_eq!(
        (logs["task_id"].as_str(), logs["stderr"].as_str()),
        (Some(id.as_str()), Some("")),
        "{logs}"
    );

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

/// Runs `apiary kv …` as the binary does, with `stdin` as its standard input; returns what
/// it printed, or its error.
async fn kv_command(stack: &Stack, args: &[&str], stdin: &[u8]) -> anyhow::Result<String> {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Kv {
        #[command(subcommand)]
        command: apiary_cli::app::KvCommand,
    }
    let command = Kv::try_parse_from(std::iter::once("kv").chain(args.iter().copied()))
        .expect("the arguments parse")
        .command;
    let client = commands::connect(stack.url()).await.expect("connect");
    let mut out = Vec::new();
    apiary_cli::app::kv(
        &client,
        command,
        &mut &stdin[..],
        &mut out,
        &mut std::io::sink(),
    )
    .await?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

fn kv_error_kind(err: &anyhow::Error) -> apiary_sdk::KvErrorKind {
    err.downcast_ref::<apiary_sdk::KvError>()
        .unwrap_or_else(|| panic!("not an app-store error: {err:#}"))
        .kind()
}

#[tokio::test]
async fn kv_commands_put_get_list_page_swap_and_delete() {
    let stack = Stack::start().await;
    let run = |args: &'static [&'static str]| kv_command(&stack, args, b"");

    let revision: u64 = run(&["put", "shop", "cart.alice", "1 apple"])
        .await
        .expect("put")
        .trim()
        .parse()
        .expect("put prints the revision");
    kv_command(&stack, &["put", "shop", "cart.bob"], b"from stdin")
        .await
        .expect("put from stdin");
    assert_eq!(
        run(&["get", "shop", "cart.alice"]).await.expect("get"),
        "1 apple"
    );
    assert_eq!(
        run(&["get", "shop", "cart.bob"]).await.expect("get"),
        "from stdin"
    );

    let entry: serde_json::Value = serde_json::from_str(
        &run(&["get", "shop", "cart.alice", "--json"])
            .await
            .expect("get"),
    )
    .expect("JSON");
    assert_eq!(entry["value"], "1 apple");
    assert_eq!(entry["revision"], revision);
    assert_eq!(entry["operation"], "PUT");

    let err = run(&["create", "shop", "cart.alice", "2 apples"])
        .await
        .expect_err("the key exists");
    assert_eq!(kv_error_kind(&err), apiary_sdk::KvErrorKind::AlreadyExists);
    let stale = revision.to_string();
    let err = kv_command(
        &stack,
        &["update", "shop", "cart.bob", "x", "--revision", &stale],
        b"",
    )
    .await
    .expect_err("cart.bob is past that revision");
    assert_eq!(kv_error_kind(&err), apiary_sdk::KvErrorKind::Conflict);
    kv_command(
        &stack,
        &[
            "update",
            "shop",
            "cart.alice",
            "3 apples",
            "--revision",
            &stale,
        ],
        b"",
    )
    .await
    .expect("update at the latest revision");

    run(&["put", "shop", "stock.pears", "12"])
        .await
        .expect("put");
    assert_eq!(
        run(&["ls", "shop"]).await.expect("ls"),
        "cart.alice\ncart.bob\nstock.pears\n"
    );
    let keys: Vec<String> =
        serde_json::from_str(&run(&["ls", "shop", "cart.", "--json"]).await.expect("ls"))
            .expect("JSON");
    assert_eq!(keys, ["cart.alice", "cart.bob"]);
    let page: serde_json::Value = serde_json::from_str(
        &run(&["ls", "shop", "--limit", "2", "--json"])
            .await
            .expect("ls"),
    )
    .expect("JSON");
    assert_eq!(page["entries"].as_array().expect("entries").len(), 2);
    assert_eq!(page["next"], "cart.bob");
    let rest: serde_json::Value = serde_json::from_str(
        &run(&[
            "ls", "shop", "--limit", "2", "--after", "cart.bob", "--json",
        ])
        .await
        .expect("ls"),
    )
    .expect("JSON");
    assert_eq!(rest["entries"][0]["key"], "stock.pears");
    assert_eq!(rest["next"], serde_json::Value::Null);

    let history: serde_json::Value = serde_json::from_str(
        &run(&["history", "shop", "cart.alice", "--json"])
            .await
            .expect("history"),
    )
    .expect("JSON");
    assert_eq!(
        history[0]["value"], "3 apples",
        "the namespace keeps one value"
    );

    run(&["del", "shop", "cart.alice"]).await.expect("del");
    let err = run(&["get", "shop", "cart.alice"])
        .await
        .expect_err("deleted");
    assert_eq!(kv_error_kind(&err), apiary_sdk::KvErrorKind::NotFound);
    let err = run(&["get", "shop", "a..b"])
        .await
        .expect_err("an invalid key");
    assert_eq!(kv_error_kind(&err), apiary_sdk::KvErrorKind::InvalidKey);
    // Reading a namespace that does not exist is an error, and does not create it.
    for _ in 0..2 {
        let err = run(&["ls", "shpo"])
            .await
            .expect_err("a misspelt namespace");
        assert_eq!(kv_error_kind(&err), apiary_sdk::KvErrorKind::NotFound);
    }
}

#[tokio::test]
async fn module_push_ls_and_rm() {
    use apiary_cli::modules::{ModuleCommand, module};

    let stack = Stack::start().await;
    let client = commands::connect(stack.url()).await.expect("connect");
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("uppercase.wasm");
    std::fs::write(&path, wasm("uppercase")).expect("write the module");

    let mut out = Vec::new();
    module(&client, ModuleCommand::Push { path }, &mut out)
        .await
        .expect("push");
    let digest = String::from_utf8(out).expect("utf-8").trim().to_owned();
    assert_eq!(digest.len(), 64, "{digest}");

    let mut out = Vec::new();
    module(&client, ModuleCommand::Ls { json: true }, &mut out)
        .await
        .expect("ls");
    let listed: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(listed[0]["sha256"], digest.as_str());

    let mut out = Vec::new();
    module(
        &client,
        ModuleCommand::Rm {
            sha256: digest.clone(),
        },
        &mut out,
    )
    .await
    .expect("rm");
    let err = module(
        &client,
        ModuleCommand::Rm { sha256: digest },
        &mut Vec::new(),
    )
    .await
    .expect_err("already removed");
    assert_eq!(
        err.downcast_ref::<apiary_sdk::ModuleError>()
            .expect("a module error")
            .kind(),
        apiary_sdk::ModuleErrorKind::NotFound
    );
}

#[tokio::test]
async fn bench_kv_and_pubsub_print_each_apiary_row_beside_its_raw_one() {
    let stack = Stack::start().await;
    let options = apiary_cli::bench::BenchOptions {
        latency_samples: 5,
        throughput_count: 50,
        in_flight: 8,
        module: Default::default(),
    };
    for figures in [
        apiary_cli::bench_app::kv(stack.url(), &options)
            .await
            .expect("bench kv"),
        apiary_cli::bench_app::pubsub(stack.url(), &options)
            .await
            .expect("bench pubsub"),
    ] {
        let apiary_rows: Vec<_> = figures
            .iter()
            .filter_map(|figure| figure.name.strip_prefix("apiary "))
            .collect();
        assert!(!apiary_rows.is_empty());
        for what in apiary_rows {
            assert!(
                figures
                    .iter()
                    .any(|figure| figure.name == format!("raw {what}")),
                "no raw row beside apiary {what}"
            );
        }
        for figure in &figures {
            let measured = figure.p50_us.or(figure.per_second).unwrap_or(0.0);
            assert!(measured > 0.0, "{figure:?}");
        }
        let report = apiary_cli::bench::report(&figures);
        assert!(report.contains("× raw"), "{report}");
    }
}

#[tokio::test]
async fn task_map_prints_every_output_in_input_order() {
    use apiary_cli::map::{MapOptions, map};

    let (stack, _running) = Stack::with_one_node().await;
    let client = commands::connect(stack.url()).await.expect("connect");
    let inputs: Vec<Vec<u8>> = (0..25).map(|n| format!("line {n}").into_bytes()).collect();
    let options = MapOptions {
        module: wasm("uppercase").to_vec(),
        inputs: inputs.clone(),
        in_flight: 4,
        timeout: Duration::from_secs(10),
        json: false,
        progress: false,
    };
    let mut out = Vec::new();
    let failed = within(PATIENCE, "the map", map(&client, options.clone(), &mut out))
        .await
        .expect("map");
    assert_eq!(failed, 0);
    let expected: String = (0..25).map(|n| format!("LINE {n}\n")).collect();
    assert_eq!(String::from_utf8(out).expect("utf-8"), expected);

    let mut out = Vec::new();
    let json = MapOptions {
        json: true,
        ..options
    };
    within(PATIENCE, "the map", map(&client, json, &mut out))
        .await
        .expect("map");
    let mut indexes: Vec<u64> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let index = value["index"].as_u64().expect("an index");
            assert_eq!(value["stdout"], format!("LINE {index}"));
            index
        })
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (0..25).collect::<Vec<_>>());
}
