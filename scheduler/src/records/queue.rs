//! Work queues read without a consumer: the task queue (a task no replica has looked at
//! yet, or a cancelled task's submissions) and a node's dispatch queue.

use anyhow::Context as _;
use apiary_proto::message::TaskSubmission;
use apiary_proto::{TaskId, codec, headers, topology};
use async_nats::jetstream::{self, stream};

use super::Records;

impl Records {
    /// The submissions of `task` waiting in `APIARY_TASKS`, with their sequences, oldest
    /// first. The queue holds only what no replica has placed yet, so the scan is as long as
    /// the backlog.
    pub async fn queued(&self, task: &TaskId) -> anyhow::Result<Vec<(u64, TaskSubmission)>> {
        let mut found = Vec::new();
        walk_queue(&self.js, topology::TASKS_STREAM, ">", |message| {
            if names_in(Some(&message.headers), task)
                && let Ok((submission, _)) = codec::decode_message::<TaskSubmission>(
                    Some(&message.headers),
                    &message.payload,
                )
            {
                found.push((message.sequence, submission));
            }
        })
        .await?;
        Ok(found)
    }

    /// Deletes every submission of `task` waiting in the queue (a cancelled task must not be
    /// taken from it again). One a replica holds at the moment is gone for its ack, which
    /// is fine.
    pub async fn unqueue(&self, task: &TaskId) -> anyhow::Result<()> {
        let queued = self.queued(task).await?;
        if queued.is_empty() {
            return Ok(());
        }
        let stream = self
            .js
            .get_stream(topology::TASKS_STREAM)
            .await
            .context("failed to open the task stream")?;
        for (sequence, _) in queued {
            stream.delete_message(sequence).await.ok();
        }
        Ok(())
    }
}

/// Whether a stream message names `task` in its `Apiary-Task-Id` header.
pub(crate) fn names(message: &jetstream::Message, task: &TaskId) -> bool {
    names_in(message.headers.as_ref(), task)
}

pub(crate) fn names_in(headers: Option<&async_nats::HeaderMap>, task: &TaskId) -> bool {
    headers
        .and_then(|headers| headers.get(headers::TASK_ID))
        .is_some_and(|value| value.as_str() == task.as_str())
}

/// The most messages one walk of a work queue reads: a longer backlog is not searched past
/// this many.
const WALK_LIMIT: usize = 10_000;

/// Reads the messages of a work-queue stream on `filter`, oldest first, up to
/// [`WALK_LIMIT`], without a consumer: work-queue streams refuse a second consumer on the
/// subjects a durable one already serves, so this asks for each next message by sequence
/// (`STREAM.MSG.GET` with `next_by_subj`). Meant for short queues: a node's, or the backlog
/// a cancel searches.
pub(crate) async fn walk_queue(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    mut visit: impl FnMut(&async_nats::jetstream::message::StreamMessage),
) -> anyhow::Result<()> {
    let stream: stream::Stream = js
        .get_stream(stream)
        .await
        .with_context(|| format!("failed to open stream {stream}"))?;
    let mut sequence = 1;
    for _ in 0..WALK_LIMIT {
        let message = stream
            .raw_message_builder()
            .sequence(sequence)
            .next_by_subject(filter)
            .send()
            .await;
        match message {
            Ok(message) => {
                sequence = message.sequence + 1;
                visit(&message);
            }
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
            Err(err) => return Err(err).context("failed to read a queued message"),
        }
    }
    Ok(())
}
