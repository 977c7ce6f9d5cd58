//! The task archive (`APIARY_TASK_ARCHIVE`): final records of ended tasks on one subject per
//! id shard, written once per task's end, read by scanning a shard (a lookup by id) or the
//! whole archive from a time or cursor (a listing); and results by their sequence.

use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::lifecycle::{TaskRecord, msg_id};
use apiary_proto::message::{TaskListRequest, TaskResult};
use apiary_proto::{TaskId, codec, stored, subject, topology};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use futures::StreamExt as _;

use super::{Records, names};

/// The most archived records one listing reads before it answers with a cursor.
const LIST_SCAN_LIMIT: usize = 100_000;
/// How long a scan waits for the next message before it takes the stream as read.
const SCAN_QUIET: Duration = Duration::from_secs(2);

impl Records {
    /// Keeps the final record in the archive. De-duplicated, so doing it again after a
    /// crash stores it once.
    pub async fn archive(&self, record: &TaskRecord) -> anyhow::Result<()> {
        let msg_id = msg_id::archived(record);
        stored::publish(
            &self.js,
            subject::task_archive(&record.id),
            &record.id,
            &msg_id,
            record,
        )
        .await
        .context("failed to archive a task record")?;
        Ok(())
    }

    /// The task's final record in the archive: the last one in its shard that names it.
    pub async fn archived(&self, task: &TaskId) -> anyhow::Result<Option<TaskRecord>> {
        let mut found = None;
        scan(
            &self.js,
            topology::TASK_ARCHIVE_STREAM,
            subject::task_archive(task).to_string(),
            DeliverPolicy::All,
            usize::MAX,
            |message| {
                if names(message, task) {
                    found = Some(message.payload.clone());
                }
                true
            },
        )
        .await?;
        found
            .map(|payload| {
                codec::decode_message::<TaskRecord>(None, &payload)
                    .map(|(record, _)| record)
                    .context("failed to decode an archived task record")
            })
            .transpose()
    }

    /// The result that ended the task, from `APIARY_RESULTS`.
    pub async fn result_of(&self, record: &TaskRecord) -> anyhow::Result<Option<TaskResult>> {
        let Some(sequence) = record.result_seq else {
            return Ok(None);
        };
        let stream = self
            .js
            .get_stream(topology::RESULTS_STREAM)
            .await
            .context("failed to open the results stream")?;
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            // Aged out of the stream (or the stream was purged).
            Err(_) => return Ok(None),
        };
        let result = codec::decode_message::<TaskResult>(Some(&message.headers), &message.payload)
            .map(|(result, _)| result)
            .context("failed to decode a stored result")?;
        Ok((result.task_id == record.id).then_some(result))
    }

    /// Task records that match `request`: the live ones first (on the first page), then the
    /// archived ones, oldest first, from the cursor or from `max_age_ms` ago.
    pub async fn list(
        &self,
        request: &TaskListRequest,
        now_ms: u64,
    ) -> anyhow::Result<(Vec<TaskRecord>, Option<u64>)> {
        let limit = request.limit.unwrap_or(100).clamp(1, 1000) as usize;
        let max_age_ms = request.max_age_ms.unwrap_or(60 * 60 * 1000);
        let since_ms = now_ms.saturating_sub(max_age_ms);
        let matches = |record: &TaskRecord| {
            request.state.is_none_or(|state| record.state == state)
                && request
                    .node_id
                    .as_ref()
                    .is_none_or(|node| record.node_id.as_ref() == Some(node))
                && record.submitted_at_ms >= since_ms
        };
        let mut tasks = Vec::new();
        if request.cursor.is_none() && request.state.is_none_or(|state| !state.is_terminal()) {
            let mut keys = self
                .live
                .keys()
                .await
                .context("failed to list live task records")?;
            while let Some(key) = keys.next().await {
                let Ok(key) = key else { continue };
                let Ok(task) = TaskId::new(key) else { continue };
                if let Some(live) = self.live(&task).await?
                    && !live.record.state.is_terminal()
                    && matches(&live.record)
                {
                    tasks.push(live.record);
                    if tasks.len() >= limit {
                        return Ok((tasks, None));
                    }
                }
            }
        }
        if request.state.is_some_and(|state| !state.is_terminal()) {
            return Ok((tasks, None));
        }
        let deliver = match request.cursor {
            Some(sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: sequence,
            },
            None => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(since_ms) * 1_000_000,
                )
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        };
        let mut next = None;
        let mut last_seen = None;
        let mut undecodable = 0u64;
        let seen = scan(
            &self.js,
            topology::TASK_ARCHIVE_STREAM,
            subject::task_archive_all().to_string(),
            deliver,
            LIST_SCAN_LIMIT,
            |message| {
                let sequence = message.info().ok().map(|info| info.stream_sequence);
                if tasks.len() >= limit {
                    // The page is full: the next one starts here.
                    next = sequence;
                    return false;
                }
                last_seen = sequence;
                match codec::decode_message::<TaskRecord>(None, &message.payload) {
                    Ok((record, _)) if matches(&record) => tasks.push(record),
                    Ok(_) => {}
                    Err(_) => undecodable += 1,
                }
                true
            },
        )
        .await?;
        if next.is_none() && seen >= LIST_SCAN_LIMIT {
            // Stopped by the scan limit with the page not full: go on after the last read.
            next = last_seen.map(|sequence| sequence + 1);
        }
        if undecodable > 0 {
            tracing::warn!(
                undecodable,
                "skipped archived task records that do not decode"
            );
        }
        Ok((tasks, next))
    }
}

/// Reads the messages of `stream` on `filter` that are there when the scan starts, from
/// `deliver`, up to `limit`, handing each to `visit` until it returns false. Returns how many
/// were read. An ordered consumer: nothing to clean up, and nothing left on the server if
/// the scan is cut short.
pub(crate) async fn scan(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
    deliver: DeliverPolicy,
    limit: usize,
    mut visit: impl FnMut(&jetstream::Message) -> bool,
) -> anyhow::Result<usize> {
    let stream: stream::Stream = js
        .get_stream(stream)
        .await
        .with_context(|| format!("failed to open stream {stream}"))?;
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .context("failed to start reading a stream")?;
    let pending = consumer
        .info()
        .await
        .context("failed to read a stream reader's position")?
        .num_pending;
    let wanted = usize::try_from(pending).unwrap_or(usize::MAX).min(limit);
    if wanted == 0 {
        return Ok(0);
    }
    let mut messages = consumer
        .messages()
        .await
        .context("failed to read a stream")?;
    let mut seen = 0;
    while seen < wanted {
        let next = tokio::time::timeout(SCAN_QUIET, messages.next()).await;
        let Ok(Some(message)) = next else {
            break;
        };
        let message = message.context("failed to read a stream message")?;
        seen += 1;
        if !visit(&message) {
            break;
        }
    }
    Ok(seen)
}
