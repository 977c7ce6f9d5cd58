//! What `apiary task submit`, `apiary nodes …` and `apiary tokens …` do, with their output written to the
//! writers they are given, so that the integration tests run the very same code against a
//! real cluster.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::lifecycle::RetryPolicy;
use apiary_proto::message::{Grants, NodeStatus, NodeSummary, Priority};
use apiary_proto::{NodeId, TaskId};
use apiary_sdk::{Client, NewToken, Task};

/// The exit code of `apiary task submit` when the task could not run (invalid module, trap,
/// limit, lost nodes): distinct from any code a module is likely to choose itself.
pub const TASK_FAILED_EXIT: u8 = 125;

/// Where a command writes: the process's stdout and stderr, or buffers in tests.
#[derive(Debug)]
pub struct Output<O, E> {
    pub stdout: O,
    pub stderr: E,
}

/// A task to run from the command line.
#[derive(Clone, Debug)]
pub struct SubmitOptions {
    pub module: Vec<u8>,
    pub input: Vec<u8>,
    pub timeout: Duration,
    pub wait: Duration,
    pub json: bool,
    /// Print the task id and return without waiting.
    pub detach: bool,
    pub id: Option<TaskId>,
    pub priority: Priority,
    pub retry: Option<RetryPolicy>,
    pub queue_timeout: Option<Duration>,
    /// What the module may see beyond stdin and stdout.
    pub grants: Grants,
}

impl SubmitOptions {
    /// A task of `module` with `input` and the defaults of `apiary task submit`.
    pub fn new(module: Vec<u8>, input: Vec<u8>) -> Self {
        Self {
            module,
            input,
            timeout: Duration::from_secs(30),
            wait: Duration::from_secs(300),
            json: false,
            detach: false,
            id: None,
            priority: Priority::Normal,
            retry: None,
            queue_timeout: None,
            grants: Grants::default(),
        }
    }
}

/// Connects to the cluster at `server`, with a message that says how to point elsewhere.
pub async fn connect(server: &str) -> anyhow::Result<Client> {
    connect_with(apiary_sdk::ConnectOptions::new(server), server).await
}

/// Connects with `options`, naming `server` and what to change in the message if it fails.
pub async fn connect_with(
    options: apiary_sdk::ConnectOptions,
    server: &str,
) -> anyhow::Result<Client> {
    options.connect().await.with_context(|| {
        format!(
            "cannot reach the cluster at {server} (set --server, APIARY_NATS_URL or a context in ~/.config/apiary/context.toml)"
        )
    })
}

/// `apiary task submit`: runs the task and writes its stdout and stderr. Returns the exit
/// code for the process: the module's own (codes outside 0–255 become 1), or
/// [`TASK_FAILED_EXIT`] with the typed error on stderr.
pub async fn task_submit<O: Write, E: Write>(
    client: &Client,
    options: SubmitOptions,
    out: &mut Output<O, E>,
) -> anyhow::Result<u8> {
    let mut task = Task::new(options.module)
        .input(options.input)
        .timeout(options.timeout)
        .priority(options.priority);
    if let Some(id) = options.id {
        task = task.id(id);
    }
    if let Some(retry) = options.retry {
        task = task.retry(retry);
    }
    if let Some(queue_timeout) = options.queue_timeout {
        task = task.queue_timeout(queue_timeout);
    }
    task = task.grants(options.grants);
    let handle = client
        .submit(task)
        .await
        .context("failed to submit the task")?;
    let task_id = handle.id().clone();
    if options.detach {
        writeln!(out.stdout, "{task_id}")?;
        return Ok(0);
    }
    let wait = options.wait;
    let report = tokio::time::timeout(wait, handle.report())
        .await
        .map_err(|_| anyhow::anyhow!("no result for task {task_id} within {wait:?}"))??;
    if options.json {
        writeln!(out.stdout, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(0);
    }
    crate::tasks::print_result(client, &report, out).await
}

/// `apiary nodes ls`: the node table, or JSON.
pub async fn nodes_ls<W: Write>(
    client: &Client,
    status: Option<NodeStatus>,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut nodes = client.nodes().await.context("failed to list nodes")?;
    if let Some(status) = status {
        nodes.retain(|node| node.status == status);
    }
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&nodes)?)?;
    } else {
        writeln!(
            out,
            "{}",
            crate::output::node_table(&nodes, apiary_proto::now_ms())
        )?;
    }
    Ok(())
}

/// `apiary nodes show`: one node in full, or JSON.
pub async fn nodes_show<W: Write>(
    client: &Client,
    node: &NodeId,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let summary = client
        .node(node)
        .await
        .with_context(|| format!("failed to show node {node}"))?;
    print_node(&summary, json, out)
}

/// A node command's answer: the node as it is now.
pub fn print_node<W: Write>(node: &NodeSummary, json: bool, out: &mut W) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(node)?)?;
    } else {
        writeln!(
            out,
            "{}",
            crate::output::node_detail(node, apiary_proto::now_ms())
        )?;
    }
    Ok(())
}

/// `apiary tokens create`: the token is the last word of the output, so that scripts can
/// take it with `| tail -n1 | awk '{print $NF}'` or `$(apiary tokens create | tail -c 110)`.
pub async fn tokens_create<W: Write>(
    client: &Client,
    token: NewToken,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let created = client
        .create_token(token)
        .await
        .context("failed to create a join token")?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&created)?)?;
        return Ok(());
    }
    let info = &created.info;
    let expires = info.expires_ms.map_or_else(
        || "never expires".to_owned(),
        |at| {
            let left = Duration::from_millis(at.saturating_sub(info.created_ms));
            format!("expires in {}", humantime::format_duration(left))
        },
    );
    let uses = info
        .uses_left
        .map_or_else(|| "unlimited uses".to_owned(), |n| format!("{n} uses"));
    writeln!(
        out,
        "created join token {} ({expires}, {uses}); it is shown only now:",
        info.id
    )?;
    writeln!(out, "{}", created.token)?;
    Ok(())
}

/// `apiary tokens ls`.
pub async fn tokens_ls<W: Write>(client: &Client, json: bool, out: &mut W) -> anyhow::Result<()> {
    let tokens = client
        .tokens()
        .await
        .context("failed to list join tokens")?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&tokens)?)?;
    } else {
        writeln!(
            out,
            "{}",
            crate::output::token_table(&tokens, apiary_proto::now_ms())
        )?;
    }
    Ok(())
}
