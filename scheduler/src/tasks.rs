//! Questions and commands about tasks by id: status, result, listing and cancel
//! (`apiary.v1.tasks.<command>`), answered from the task's record.

use std::sync::Arc;

use anyhow::Context as _;
use apiary_proto::lifecycle::{Refused, TaskRecord, TaskState};
use apiary_proto::message::{
    CancelAttempt, ErrorBody, ErrorCode, Reply, TaskListReply, TaskListRequest, TaskRef,
    TaskResultReply, TaskResultRequest,
};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, TaskId, codec, now_ms, topology};

use crate::config::SchedulerConfig;
use crate::delivery::CAS_TRIES;
use crate::records::{Found, WriteError, names_in, walk_queue};
use crate::settle::{self, Delivery};
use crate::{Counters, Shared, contention_pause};

/// `apiary.v1.tasks.status`: the task's record.
pub(crate) async fn status(shared: Arc<Shared>, request: TaskRef) -> Reply<TaskRecord> {
    find(&shared, &request.id)
        .await
        .map(Found::into_record)
        .into()
}

/// `apiary.v1.tasks.result`: the task's record and, once it has ended, its result.
pub(crate) async fn result(
    shared: Arc<Shared>,
    request: TaskResultRequest,
) -> Reply<TaskResultReply> {
    let answer = async {
        let record = find(&shared, &request.id).await?.into_record();
        let result = if record.state.is_terminal() {
            shared.records.result_of(&record).await.map_err(internal)?
        } else {
            None
        };
        Ok(TaskResultReply { record, result })
    };
    answer.await.into()
}

/// `apiary.v1.tasks.ls`: task records, filtered and paginated.
pub(crate) async fn list(shared: Arc<Shared>, request: TaskListRequest) -> Reply<TaskListReply> {
    shared
        .records
        .list(&request, now_ms())
        .await
        .map(|(tasks, next)| TaskListReply { tasks, next })
        .map_err(internal)
        .into()
}

/// `apiary.v1.tasks.cancel`: ends a live task as `cancelled` at once. A task still in the
/// queue never runs; a placed one is taken out of its node's queue, and a running one is
/// stopped on its node. Whatever the node still reports is a late result. Cancelling a task
/// that has ended changes nothing and answers with its record.
pub(crate) async fn cancel(shared: Arc<Shared>, request: TaskRef) -> Reply<TaskRecord> {
    cancel_task(&shared, &request.id).await.into()
}

async fn cancel_task(shared: &Shared, task: &TaskId) -> Result<TaskRecord, ErrorBody> {
    for _ in 0..CAS_TRIES {
        let live = match find(shared, task).await? {
            Found::Live(live) => live,
            Found::Archived(record) => return Ok(record),
            Found::Queued(record) => {
                // Never looked at: its record is written now, as cancelled, and it leaves
                // the queue.
                let cancelled = record
                    .cancelled(now_ms())
                    .map_err(|err| internal(err.into()))?;
                match shared.records.write(&cancelled, None).await {
                    Ok(_) => {}
                    Err(WriteError::Conflict) => continue,
                    Err(WriteError::Failed(err)) => return Err(internal(err)),
                }
                return end_cancelled(shared, task, &record, cancelled).await;
            }
        };
        let cancelled = match live.record.cancelled(now_ms()) {
            Ok(cancelled) => cancelled,
            Err(Refused::Ended(_)) => return Ok(live.record),
            Err(other) => return Err(internal(anyhow::anyhow!(other))),
        };
        match shared.records.write(&cancelled, Some(live.revision)).await {
            Ok(_) => {}
            Err(WriteError::Conflict) => {
                contention_pause().await;
                continue;
            }
            Err(WriteError::Failed(err)) => return Err(internal(err)),
        }
        return end_cancelled(shared, task, &live.record, cancelled).await;
    }
    Err(ErrorBody::new(
        ErrorCode::Internal,
        "the task's record kept changing; try again",
    ))
}

/// What follows a cancel that was written: the task's attempt stopped where it runs, its
/// submissions out of the queue, its end carried out.
async fn end_cancelled(
    shared: &Shared,
    task: &TaskId,
    was: &TaskRecord,
    cancelled: TaskRecord,
) -> Result<TaskRecord, ErrorBody> {
    Counters::count(&shared.counters.tasks_cancelled);
    tracing::info!(task_id = %task, was = %was.state, "task cancelled");
    if let (TaskState::Scheduled | TaskState::Running, Some(node)) = (was.state, &was.node_id) {
        stop_on_node(shared, node, was).await;
    }
    if let Err(err) = shared.records.unqueue(task).await {
        // Should one come back, intake finds the task ended and does not run it.
        tracing::warn!(error = %format!("{err:#}"), "failed to take a cancelled task's submissions out of the queue");
    }
    let delivery = Delivery::synthesized(&cancelled).map_err(internal)?;
    settle::finish(shared, &cancelled, delivery)
        .await
        .map_err(internal)?;
    Ok(cancelled)
}

/// Stops a cancelled task's attempt on its node: tells the agent (which interrupts a
/// running module), and deletes the dispatch from the node's queue, so a node that has not
/// pulled it yet (or is away) never runs it.
async fn stop_on_node(shared: &Shared, node: &NodeId, record: &TaskRecord) {
    let notice = CancelAttempt {
        task_id: record.id.clone(),
        attempt: record.attempt,
    };
    match codec::encode(&notice) {
        Ok(body) => {
            if let Err(err) = shared
                .client
                .publish(subject::node(node, NodeVerb::Cancel), body)
                .await
            {
                tracing::warn!(node_id = %node, error = %err, "failed to tell a node to stop a cancelled task");
            }
        }
        Err(err) => tracing::error!(error = %err, "failed to encode a cancel notice"),
    }
    if let Err(err) = delete_dispatches(shared, node, &record.id).await {
        tracing::warn!(node_id = %node, error = %format!("{err:#}"), "failed to take a cancelled task out of its node's queue");
    }
}

/// Deletes every dispatch of `task` still in `node`'s queue. A node's queue holds at most
/// its slots and a backlog, so the scan is short.
async fn delete_dispatches(shared: &Shared, node: &NodeId, task: &TaskId) -> anyhow::Result<()> {
    let mut sequences = Vec::new();
    let queue = subject::node(node, NodeVerb::Dispatch).to_string();
    walk_queue(&shared.js, topology::DISPATCH_STREAM, &queue, |message| {
        if names_in(Some(&message.headers), task) {
            sequences.push(message.sequence);
        }
    })
    .await?;
    let stream = shared
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?;
    for sequence in sequences {
        // Already gone (acknowledged meanwhile) is fine.
        stream.delete_message(sequence).await.ok();
    }
    Ok(())
}

/// The task's record, or `not_found`.
pub(crate) async fn find(shared: &Shared, task: &TaskId) -> Result<Found, ErrorBody> {
    shared
        .records
        .find(task)
        .await
        .map_err(internal)?
        .ok_or_else(|| ErrorBody::new(ErrorCode::NotFound, format!("no task {task}")))
}

pub(crate) fn internal(err: anyhow::Error) -> ErrorBody {
    tracing::warn!(error = %format!("{err:#}"), "failed to answer a task request");
    ErrorBody::new(ErrorCode::Internal, format!("{err:#}"))
}

/// Brings the task archive's limits to this replica's configuration. The scheduler owns
/// them: other components create the archive with the defaults and never change it.
pub(crate) async fn apply_retention(
    js: &async_nats::jetstream::Context,
    config: &SchedulerConfig,
) -> anyhow::Result<()> {
    let mut stream = js
        .get_stream(topology::TASK_ARCHIVE_STREAM)
        .await
        .context("failed to open the task archive")?;
    let current = &stream
        .info()
        .await
        .context("failed to read the task archive")?
        .config;
    if current.max_age == config.task_retention
        && current.max_bytes == config.task_archive_max_bytes
    {
        return Ok(());
    }
    let mut wanted = current.clone();
    wanted.max_age = config.task_retention;
    wanted.max_bytes = config.task_archive_max_bytes;
    js.update_stream(wanted)
        .await
        .context("failed to update the task archive's limits")?;
    tracing::info!(
        retention = ?config.task_retention,
        max_bytes = config.task_archive_max_bytes,
        "task archive limits set"
    );
    Ok(())
}
