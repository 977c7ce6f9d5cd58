//! What `apiary task status|result|logs|ls|watch|cancel` and `apiary dlq ls|show|requeue`
//! do, writing to the writers they are given, so that the integration tests run the very
//! same code against a real cluster.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::TaskId;
use apiary_proto::lifecycle::{TaskRecord, TaskState};
use apiary_proto::message::{Outcome, TaskListRequest, TaskResult};
use apiary_sdk::{Client, DlqListRequest};
use futures::StreamExt as _;

use crate::commands::{Output, TASK_FAILED_EXIT};

/// `apiary task status`: the task's record, as a detail view or JSON (with `state` named as
/// in the protocol: `pending`, `scheduled`, `running`, `succeeded`, `failed`, `cancelled`,
/// `timed_out`, `dead`).
pub async fn status<W: Write>(
    client: &Client,
    id: &TaskId,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let record = client
        .task_status(id)
        .await
        .with_context(|| format!("failed to read task {id}"))?;
    print_record(&record, json, out)
}

fn print_record<W: Write>(record: &TaskRecord, json: bool, out: &mut W) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(record)?)?;
    } else {
        writeln!(
            out,
            "{}",
            crate::output::task_detail(record, apiary_proto::now_ms())
        )?;
    }
    Ok(())
}

/// How `apiary task result` waits.
#[derive(Clone, Copy, Debug)]
pub enum Wait {
    /// Answer at once; a task that has not ended is an error.
    No,
    /// Wait up to this long for the task to end.
    Up(Duration),
}

/// `apiary task result`: the task's stdout and stderr, as `submit` prints them, and the
/// exit code `submit` would exit with; or the whole result as JSON.
pub async fn result<O: Write, E: Write>(
    client: &Client,
    id: &TaskId,
    wait: Wait,
    json: bool,
    out: &mut Output<O, E>,
) -> anyhow::Result<u8> {
    let report = match wait {
        Wait::Up(limit) => tokio::time::timeout(limit, client.task(id.clone()).report())
            .await
            .map_err(|_| anyhow::anyhow!("task {id} did not end within {limit:?}"))?
            .with_context(|| format!("failed to read task {id}'s result"))?,
        Wait::No => {
            let reply = client
                .task_result(id)
                .await
                .with_context(|| format!("failed to read task {id}'s result"))?;
            if !reply.record.state.is_terminal() {
                anyhow::bail!("task {id} is {} and has no result yet", reply.record.state);
            }
            reply
                .result
                .unwrap_or_else(|| reply.record.ended_without_result())
        }
    };
    if json {
        writeln!(out.stdout, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(0);
    }
    print_result(client, &report, out).await
}

/// Writes a result as `apiary task submit` does and returns its exit code: the module's own
/// (codes outside 0–255 become 1), or [`TASK_FAILED_EXIT`] with the typed error on stderr.
pub async fn print_result<O: Write, E: Write>(
    client: &Client,
    report: &TaskResult,
    out: &mut Output<O, E>,
) -> anyhow::Result<u8> {
    match &report.outcome {
        Outcome::Completed {
            exit_code,
            stdout,
            stderr,
        } => {
            let stdout = client
                .result_stdout(report, stdout.as_bytes())
                .await
                .context("failed to fetch the task's output")?;
            out.stdout.write_all(&stdout)?;
            out.stderr.write_all(stderr.as_bytes())?;
            Ok(u8::try_from(*exit_code).unwrap_or(1))
        }
        Outcome::Failed { error, stderr } => {
            out.stderr.write_all(stderr.as_bytes())?;
            writeln!(
                out.stderr,
                "error: task {} failed on node {}: {error}",
                report.task_id, report.node_id
            )?;
            Ok(TASK_FAILED_EXIT)
        }
    }
}

/// `apiary task logs`: what the task wrote to stderr, once it has ended.
pub async fn logs<W: Write>(
    client: &Client,
    id: &TaskId,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let reply = client
        .task_result(id)
        .await
        .with_context(|| format!("failed to read task {id}'s result"))?;
    match reply.result.map(|result| result.outcome) {
        Some(Outcome::Completed { stderr, .. } | Outcome::Failed { stderr, .. }) if json => {
            let line = serde_json::json!({"task_id": id, "stderr": stderr});
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
            Ok(())
        }
        Some(Outcome::Completed { stderr, .. } | Outcome::Failed { stderr, .. }) => {
            out.write_all(stderr.as_bytes())?;
            Ok(())
        }
        None if reply.record.state.is_terminal() => {
            anyhow::bail!("task {id} is {} and left no output", reply.record.state)
        }
        None => anyhow::bail!(
            "task {id} is {}; its logs come with its result",
            reply.record.state
        ),
    }
}

/// `apiary task ls`: one page of task records.
pub async fn ls<W: Write>(
    client: &Client,
    filter: &TaskListRequest,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let page = client
        .list_tasks(filter)
        .await
        .context("failed to list tasks")?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}",
        crate::output::task_table(&page.tasks, apiary_proto::now_ms())
    )?;
    if let Some(next) = page.next {
        writeln!(out, "more: --cursor {next}")?;
    }
    Ok(())
}

/// `apiary task watch <id>`: each change of one task's record until it ends, a line each
/// (or a JSON record per line).
pub async fn watch<W: Write>(
    client: &Client,
    id: &TaskId,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut changes = std::pin::pin!(client.watch_task(id.clone()));
    while let Some(record) = changes.next().await {
        let record = record.with_context(|| format!("failed to watch task {id}"))?;
        print_transition(&record, json, out)?;
    }
    Ok(())
}

/// `apiary task watch`: every transition of every live task, until interrupted.
pub async fn watch_all<W: Write>(client: &Client, json: bool, out: &mut W) -> anyhow::Result<()> {
    let mut changes = std::pin::pin!(
        client
            .watch_tasks()
            .await
            .context("failed to watch tasks")?
    );
    while let Some(record) = changes.next().await {
        let record = record.context("failed to watch tasks")?;
        print_transition(&record, json, out)?;
    }
    Ok(())
}

fn print_transition<W: Write>(record: &TaskRecord, json: bool, out: &mut W) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(record)?)?;
    } else {
        let node = record
            .node_id
            .as_ref()
            .map_or(String::new(), |node| format!(" on {node}"));
        let reason = record
            .reason
            .as_ref()
            .map_or(String::new(), |reason| format!(": {reason}"));
        writeln!(
            out,
            "{} {} (attempt {}{node}){reason}",
            record.id, record.state, record.attempt
        )?;
    }
    out.flush()?;
    Ok(())
}

/// `apiary task cancel`.
pub async fn cancel<W: Write>(client: &Client, id: &TaskId, out: &mut W) -> anyhow::Result<()> {
    let record = client
        .cancel_task(id)
        .await
        .with_context(|| format!("failed to cancel task {id}"))?;
    if record.state == TaskState::Cancelled {
        writeln!(out, "cancelled task {id}")?;
    } else {
        writeln!(out, "task {id} had already ended: {}", record.state)?;
    }
    Ok(())
}

/// `apiary dlq ls`.
pub async fn dlq_ls<W: Write>(
    client: &Client,
    page: &DlqListRequest,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let page = client
        .dead_letters(page)
        .await
        .context("failed to list the dead-letter stream")?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
        return Ok(());
    }
    let records: Vec<_> = page
        .entries
        .iter()
        .map(|entry| entry.record.clone())
        .collect();
    writeln!(
        out,
        "{}",
        crate::output::task_table(&records, apiary_proto::now_ms())
    )?;
    if let Some(next) = page.next {
        writeln!(out, "more: --cursor {next}")?;
    }
    Ok(())
}

/// `apiary dlq show`.
pub async fn dlq_show<W: Write>(
    client: &Client,
    id: &TaskId,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let entry = client
        .dead_letter(id)
        .await
        .with_context(|| format!("failed to find task {id} in the dead-letter stream"))?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&entry)?)?;
        return Ok(());
    }
    print_record(&entry.record, false, out)
}

/// `apiary dlq requeue`.
pub async fn dlq_requeue<W: Write>(
    client: &Client,
    id: &TaskId,
    out: &mut W,
) -> anyhow::Result<()> {
    client
        .requeue_dead(id)
        .await
        .with_context(|| format!("failed to requeue task {id}"))?;
    writeln!(out, "requeued task {id}")?;
    Ok(())
}
