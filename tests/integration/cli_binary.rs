//! The `apiary` binary itself, run as a user runs it against a real cluster: arguments,
//! exit codes, stdout and stderr, the context file and the environment. (`cli.rs` drives
//! the same commands through the library functions the binary calls, for what needs a look
//! inside.)

use std::path::Path;
use std::process::Stdio;

use apiary_harness::{PATIENCE, Stack, apiary_binary, wasm, within};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

/// What one run of the binary did.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The binary with the given arguments, cut off from the user's own settings: no context
/// file, no `APIARY_*` connection variables, no colour.
fn command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(apiary_binary());
    command
        .args(args)
        .env_remove("APIARY_NATS_URL")
        .env_remove("APIARY_CREDS")
        .env_remove("APIARY_CONTEXT")
        .env("APIARY_CONTEXT_FILE", "/nonexistent/apiary/context.toml")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run(mut command: tokio::process::Command) -> Ran {
    let output = within(PATIENCE, "the apiary command to end", command.output())
        .await
        .expect("run the apiary binary");
    Ran {
        code: output.status.code().expect("an exit code, not a signal"),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// Runs `apiary --server <stack> <args>` and expects it to succeed.
async fn ok(stack: &Stack, args: &[&str]) -> String {
    let ran = run(command(&[&["--server", stack.url()], args].concat())).await;
    assert_eq!(ran.code, 0, "apiary {args:?}: {ran:?}");
    ran.stdout
}

/// Runs `apiary --server <stack> <args>` and expects it to fail with exit status 1 and an
/// error on one line of stderr.
async fn fails(stack: &Stack, args: &[&str]) -> String {
    let ran = run(command(&[&["--server", stack.url()], args].concat())).await;
    assert_eq!(ran.code, 1, "apiary {args:?}: {ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    assert_eq!(ran.stderr.lines().count(), 1, "one line: {ran:?}");
    assert!(ran.stderr.starts_with("error: "), "{ran:?}");
    ran.stderr
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// A command that streams until it has printed enough (`sub`, `kv watch`), started with
/// `apiary --server <stack> <args>`. Returns once it has said on stderr that it is in place
/// (its first line, returned too), so that what happens from then on is what it prints.
async fn start_streaming(stack: &Stack, args: &[&str]) -> (tokio::process::Child, String) {
    let mut child = command(&[&["--server", stack.url()], args].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the apiary command");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut notices = tokio::io::BufReader::new(stderr).lines();
    let notice = within(
        PATIENCE,
        "the command to say it is in place",
        notices.next_line(),
    )
    .await
    .expect("read stderr")
    .expect("a notice before anything is printed");
    (child, notice)
}

/// Waits for a streaming command to exit, successfully, and returns its stdout's JSON lines.
async fn json_lines_of(child: tokio::process::Child) -> Vec<Value> {
    let output = within(PATIENCE, "the command to exit", child.wait_with_output())
        .await
        .expect("the apiary command");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(json)
        .collect()
}

#[tokio::test]
async fn kv_commands_store_read_list_and_refuse_through_the_binary() {
    let stack = Stack::start().await;
    ok(&stack, &["kv", "put", "shop", "greeting.en", "hello"]).await;
    assert_eq!(
        ok(&stack, &["kv", "get", "shop", "greeting.en"]).await,
        "hello"
    );
    ok(&stack, &["kv", "create", "shop", "greeting.fr", "bonjour"]).await;

    let listed = json(&ok(&stack, &["kv", "ls", "shop", "greeting.", "--json"]).await);
    let keys: Vec<&str> = listed
        .as_array()
        .unwrap_or_else(|| panic!("an array of keys: {listed}"))
        .iter()
        .map(|key| key.as_str().expect("a key"))
        .collect();
    assert_eq!(keys, ["greeting.en", "greeting.fr"], "{listed}");

    let missing = fails(&stack, &["kv", "get", "shop", "greeting.de"]).await;
    assert!(missing.contains("greeting.de"), "{missing}");
    let exists = fails(&stack, &["kv", "create", "shop", "greeting.en", "hi"]).await;
    assert!(exists.contains("greeting.en"), "{exists}");
    let hostile = fails(&stack, &["kv", "put", "shop", "a.>", "x"]).await;
    assert!(hostile.contains("a.>"), "{hostile}");
    // Nothing the refusals touched changed.
    assert_eq!(
        ok(&stack, &["kv", "get", "shop", "greeting.en"]).await,
        "hello"
    );

    // Compare-and-swap on the revision `get --json` shows; a stale revision is refused.
    let entry = json(&ok(&stack, &["kv", "get", "shop", "greeting.en", "--json"]).await);
    let revision = entry["revision"].as_u64().expect("a revision").to_string();
    ok(
        &stack,
        &[
            "kv",
            "update",
            "shop",
            "greeting.en",
            "hey",
            "--revision",
            &revision,
        ],
    )
    .await;
    fails(
        &stack,
        &[
            "kv",
            "update",
            "shop",
            "greeting.en",
            "late",
            "--revision",
            &revision,
        ],
    )
    .await;
    let history = ok(&stack, &["kv", "history", "shop", "greeting.en", "--json"]).await;
    let values: Vec<String> = json(&history)
        .as_array()
        .unwrap_or_else(|| panic!("an array of entries: {history}"))
        .iter()
        .map(|entry| entry["value"].as_str().expect("a value").to_owned())
        .collect();
    // A namespace made on first use keeps one value per key (its history setting).
    assert_eq!(values, ["hey"], "{history}");

    ok(&stack, &["kv", "del", "shop", "greeting.fr"]).await;
    fails(&stack, &["kv", "get", "shop", "greeting.fr"]).await;
}

#[tokio::test]
async fn kv_watch_prints_each_change_from_the_moment_it_says_it_watches() {
    let stack = Stack::start().await;
    ok(&stack, &["kv", "put", "shop", "stock.apples", "3"]).await;
    let (watcher, notice) = start_streaming(
        &stack,
        &["kv", "watch", "shop", "stock.", "--count", "2", "--json"],
    )
    .await;
    assert!(
        notice.starts_with("watching keys under \"stock.\""),
        "{notice}"
    );

    ok(&stack, &["kv", "put", "shop", "stock.pears", "5"]).await;
    ok(&stack, &["kv", "put", "shop", "orders.1", "not stock"]).await;
    ok(&stack, &["kv", "del", "shop", "stock.apples"]).await;
    let changes = json_lines_of(watcher).await;
    let keys: Vec<&str> = changes
        .iter()
        .map(|change| change["key"].as_str().expect("a key"))
        .collect();
    assert_eq!(keys, ["stock.pears", "stock.apples"], "{changes:?}");
}

#[tokio::test]
async fn sub_prints_what_pub_sends_from_the_moment_it_says_it_listens() {
    let stack = Stack::start().await;
    let (subscriber, notice) = start_streaming(
        &stack,
        &["sub", "chat", "rooms.*", "--count", "2", "--json"],
    )
    .await;
    assert!(notice.starts_with("listening on rooms.*"), "{notice}");

    // Published once each, from another process: what is published after the notice is
    // printed.
    ok(&stack, &["pub", "chat", "rooms.lobby", "hello"]).await;
    ok(&stack, &["pub", "chat", "news.today", "not a room"]).await;
    ok(&stack, &["pub", "chat", "rooms.kitchen", "{\"n\":1}"]).await;
    let lines = json_lines_of(subscriber).await;
    let topics: Vec<&str> = lines
        .iter()
        .map(|line| line["topic"].as_str().expect("a topic"))
        .collect();
    assert_eq!(topics, ["rooms.lobby", "rooms.kitchen"], "{lines:?}");
}

#[tokio::test]
async fn module_push_ls_and_rm_through_the_binary() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let module = dir.path().join("uppercase.wasm");
    std::fs::write(&module, wasm("uppercase")).expect("write the module");
    let module = module.to_str().expect("a utf-8 path");

    let digest = ok(&stack, &["module", "push", module]).await;
    let digest = digest.trim();
    assert_eq!(digest.len(), 64, "a SHA-256 digest: {digest:?}");
    let listed = json(&ok(&stack, &["module", "ls", "--json"]).await);
    assert!(listed.to_string().contains(digest), "{listed}");

    ok(&stack, &["module", "rm", digest]).await;
    let listed = json(&ok(&stack, &["module", "ls", "--json"]).await);
    assert!(!listed.to_string().contains(digest), "{listed}");
}

#[tokio::test]
async fn task_submit_exits_with_the_module_code_and_125_when_it_cannot_run() {
    let (stack, _running) = Stack::with_one_node().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "shout\n").expect("write the input");
    let uppercase = dir.path().join("uppercase.wasm");
    std::fs::write(&uppercase, wasm("uppercase")).expect("write the module");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm at all").expect("write the garbage");

    let stdout = ok(
        &stack,
        &["task", "submit", path(&uppercase), "--input", path(&input)],
    )
    .await;
    assert_eq!(stdout, "SHOUT\n");
    let ran = run(command(&[
        "--server",
        stack.url(),
        "task",
        "submit",
        path(&garbage),
    ]))
    .await;
    assert_eq!(ran.code, 125, "{ran:?}");
    assert!(ran.stderr.contains("invalid module"), "{ran:?}");
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a utf-8 path")
}

#[tokio::test]
async fn usage_errors_exit_2_and_an_unreachable_cluster_is_one_line_with_a_hint_or_more_with_v() {
    for args in [
        &["kv"][..],
        &["kv", "put", "only-a-namespace"],
        &["no-such-command"],
        &["sub", "chat", "rooms.*", "--count", "many"],
    ] {
        let ran = run(command(args)).await;
        assert_eq!(ran.code, 2, "apiary {args:?}: {ran:?}");
        assert!(ran.stdout.is_empty(), "{ran:?}");
    }

    // Nothing listens on port 1. Backtraces are asked for (as scripts/test does) and still
    // not printed: the user gets one line.
    let mut unreachable = command(&["--server", "nats://127.0.0.1:1", "nodes", "ls"]);
    unreachable.env("RUST_BACKTRACE", "1");
    let ran = run(unreachable).await;
    assert_eq!(ran.code, 1, "{ran:?}");
    assert_eq!(ran.stderr.lines().count(), 1, "{ran:?}");
    assert!(ran.stderr.contains("--server"), "a hint: {ran:?}");
    assert_eq!(
        ran.stderr.matches("Connection refused").count(),
        1,
        "each cause once: {ran:?}"
    );
    // With -v, each cause on its own line, and the backtrace that was asked for.
    let mut verbose = command(&["-v", "--server", "nats://127.0.0.1:1", "nodes", "ls"]);
    verbose.env("RUST_BACKTRACE", "1");
    let ran = run(verbose).await;
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(ran.stderr.contains("Caused by:"), "{ran:?}");
    assert!(ran.stderr.contains("Stack backtrace:"), "{ran:?}");
}

#[tokio::test]
async fn the_context_file_is_used_and_the_environment_and_flags_override_it() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("context.toml");
    std::fs::write(
        &file,
        format!(
            "current = \"here\"\n\n[here]\nserver = \"{}\"\n\n[nowhere]\nserver = \"nats://127.0.0.1:1\"\n",
            stack.url()
        ),
    )
    .expect("write the context file");
    let with_context = |args: &[&str]| {
        let mut command = command(args);
        command.env("APIARY_CONTEXT_FILE", &file);
        command
    };

    // The current context's server, with no flag or variable.
    let ran = run(with_context(&["kv", "put", "ctx", "k", "from-context"])).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    // Another context, by name.
    let ran = run(with_context(&[
        "--context",
        "nowhere",
        "kv",
        "get",
        "ctx",
        "k",
    ]))
    .await;
    assert_eq!(ran.code, 1, "{ran:?}");
    // The environment overrides the context.
    let mut from_env = with_context(&["kv", "get", "ctx", "k"]);
    from_env.env("APIARY_NATS_URL", "nats://127.0.0.1:1");
    let ran = run(from_env).await;
    assert_eq!(ran.code, 1, "{ran:?}");
    // The flag overrides both.
    let mut from_flag = with_context(&["--server", stack.url(), "kv", "get", "ctx", "k"]);
    from_flag.env("APIARY_NATS_URL", "nats://127.0.0.1:1");
    let ran = run(from_flag).await;
    assert_eq!(
        (ran.code, ran.stdout.as_str()),
        (0, "from-context"),
        "{ran:?}"
    );
}

#[tokio::test]
async fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef apiary"),
        ("fish", "complete -c apiary"),
    ] {
        let ran = run(command(&["completions", shell])).await;
        assert_eq!(ran.code, 0, "{shell}: {ran:?}");
        assert!(ran.stdout.contains(marker), "{shell}: {}", ran.stdout);
        assert!(ran.stdout.contains("kv"), "{shell} completes subcommands");
    }
}

#[tokio::test]
async fn task_submit_grants_arguments_environment_and_the_clock() {
    let (stack, _running) = Stack::with_one_node().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let probe = dir.path().join("grants.wasm");
    let wat = include_str!("../../wasm-tasks/probes/grants.wat");
    std::fs::write(&probe, wat::parse_str(wat).expect("the probe's WAT")).expect("write");

    let bare = ok(&stack, &["task", "submit", path(&probe)]).await;
    assert_eq!(bare, "1000");
    let granted = ok(
        &stack,
        &[
            "task",
            "submit",
            path(&probe),
            "--arg",
            "-v",
            "--arg",
            "x",
            "--env",
            "A=1",
            "--clock",
        ],
    )
    .await;
    assert!(
        granted.starts_with("311"),
        "argc, environment, wall clock: {granted}"
    );
    let ran = run(command(&[
        "--server",
        stack.url(),
        "task",
        "submit",
        path(&probe),
        "--env",
        "no-equals-sign",
    ]))
    .await;
    assert_eq!(ran.code, 2, "a malformed --env is a usage error: {ran:?}");
}
