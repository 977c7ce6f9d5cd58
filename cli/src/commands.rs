//! What `apiary task submit` and `apiary nodes ls` do, with their output written to the
//! writers they are given, so that the integration tests run the very same code against a
//! real cluster.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::message::NodeStatus;
use apiary_sdk::{Client, Error, Task};

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
}

/// Connects to the cluster at `server`, with a message that says how to point elsewhere.
pub async fn connect(server: &str) -> anyhow::Result<Client> {
    Client::connect(server).await.with_context(|| {
        format!("cannot reach the cluster at {server} (set --server or APIARY_NATS_URL)")
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
    let handle = client
        .submit(
            Task::new(options.module)
                .input(options.input)
                .timeout(options.timeout),
        )
        .await
        .context("failed to submit the task")?;
    let task_id = handle.id().clone();
    let wait = options.wait;
    if options.json {
        let report = tokio::time::timeout(wait, handle.report())
            .await
            .map_err(|_| anyhow::anyhow!("no result for task {task_id} within {wait:?}"))??;
        writeln!(out.stdout, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(0);
    }
    match handle.result_within(wait).await {
        Ok(output) => {
            out.stdout.write_all(&output.stdout)?;
            out.stderr.write_all(&output.stderr)?;
            Ok(u8::try_from(output.exit_code).unwrap_or(1))
        }
        Err(Error::TaskFailed(failure)) => {
            out.stderr.write_all(&failure.stderr)?;
            writeln!(
                out.stderr,
                "error: task {} failed on node {}: {}",
                failure.task_id, failure.node_id, failure.error
            )?;
            Ok(TASK_FAILED_EXIT)
        }
        Err(err) => Err(err.into()),
    }
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
