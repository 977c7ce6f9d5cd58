//! Task records: reading and writing them, with compare-and-set, in the live bucket
//! (`APIARY_TASK_RECORDS`, one key per live task) and the archive (`APIARY_TASK_ARCHIVE`, one
//! subject per id shard, final records only).
//!
//! A task's record lives in the bucket from its first placement (or its first look, if it
//! must wait) until it ends. Its final record then goes to the archive, and its key's subject
//! is purged from the bucket, so the bucket's subjects count the tasks alive and the
//! archive's are bounded by the shard count (see ARCHITECTURE.md for the memory this saves).
//! A lookup by id reads the bucket, then scans the task's archive shard.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::lifecycle::{TaskRecord, msg_id};
use apiary_proto::message::{TaskListRequest, TaskResult, TaskSubmission};
use apiary_proto::{TaskId, codec, headers, stored, subject, topology};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::{self, stream};
use futures::StreamExt as _;

/// A record read from the live bucket, with the revision a compare-and-set needs.
#[derive(Clone, Debug)]
pub(crate) struct Live {
    pub record: TaskRecord,
    pub revision: u64,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// Someone else changed the record first (or created it): read it again and decide anew.
    #[error("the record changed meanwhile")]
    Conflict,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Where a task's record was found.
#[derive(Clone, Debug)]
pub(crate) enum Found {
    Live(Live),
    Archived(TaskRecord),
    /// Still in the queue, never looked at: a record made from its submission, not stored.
    Queued(TaskRecord),
}

impl Found {
    pub fn into_record(self) -> TaskRecord {
        match self {
            Found::Live(live) => live.record,
            Found::Archived(record) | Found::Queued(record) => record,
        }
    }
}

/// The most archived records one listing reads before it answers with a cursor.
const LIST_SCAN_LIMIT: usize = 100_000;
/// How long a scan waits for the next message before it takes the stream as read.
const SCAN_QUIET: Duration = Duration::from_secs(2);

/// How many records a replica remembers as it last wrote them.
const REMEMBERED: usize = 16_384;

#[derive(Clone)]
pub(crate) struct Records {
    js: jetstream::Context,
    live: kv::Store,
    /// The records this replica wrote last, with their revisions: most results are settled
    /// by the replica that placed their task, which can then write at once instead of
    /// reading the record first. Only a hint: a write from it fails if the record changed
    /// since, and any other decision made from it is made again from the bucket.
    written: Arc<Mutex<lru::LruCache<TaskId, Live>>>,
    /// Whether an ended record is written with a TTL ([`topology::TASK_RECORD_LINGER`]) and
    /// expires by itself; otherwise it is purged.
    ttl: bool,
}

impl Records {
    pub fn new(js: jetstream::Context, live: kv::Store, ttl: bool) -> Self {
        Self {
            js,
            live,
            ttl,
            written: Arc::new(Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(REMEMBERED).unwrap_or(NonZeroUsize::MIN),
            ))),
        }
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, lru::LruCache<TaskId, Live>> {
        // Each critical section is one cache operation.
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The record as this replica last wrote it, if it remembers it; else as the bucket has
    /// it. See [`Records::written`] for why it may be stale, and what makes that safe.
    pub async fn live_or_remembered(&self, task: &TaskId) -> anyhow::Result<Option<Live>> {
        if let Some(live) = self.remembered().get(task).cloned() {
            return Ok(Some(live));
        }
        self.live(task).await
    }

    /// Forgets `task`'s record if this replica remembered it; true if it did.
    pub fn forget_if_remembered(&self, task: &TaskId) -> bool {
        self.remembered().pop(task).is_some()
    }

    /// The live record of `task`, if the task lives (or ended a moment ago and its key is
    /// not purged yet).
    pub async fn live(&self, task: &TaskId) -> anyhow::Result<Option<Live>> {
        let entry = self
            .live
            .entry(topology::task_record_key(task))
            .await
            .context("failed to read a task record")?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = codec::decode_message::<TaskRecord>(None, &entry.value)
            .map(|(record, _)| record)
            .context("failed to decode a task record")?;
        Ok(Some(Live {
            record,
            revision: entry.revision,
        }))
    }

    /// Writes `record` as new (`revision` `None`) or over the revision read.
    pub async fn write(
        &self,
        record: &TaskRecord,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let written = self.write_unremembered(record, revision).await;
        match &written {
            Ok(revision) if !record.state.is_terminal() => {
                let live = Live {
                    record: record.clone(),
                    revision: *revision,
                };
                self.remembered().put(record.id.clone(), live);
            }
            _ => {
                self.forget_if_remembered(&record.id);
            }
        }
        written
    }

    /// Whether ended records expire by themselves, so none needs a purge.
    pub fn expire_by_themselves(&self) -> bool {
        self.ttl
    }

    async fn write_unremembered(
        &self,
        record: &TaskRecord,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let value = codec::encode(record).context("failed to encode a task record")?;
        let key = topology::task_record_key(&record.id);
        if self.ttl
            && record.state.is_terminal()
            && let Some(revision) = revision
        {
            return self.write_expiring(record, revision, value).await;
        }
        match revision {
            None => match self.live.create(key, value).await {
                Ok(revision) => Ok(revision),
                Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {
                    Err(WriteError::Conflict)
                }
                Err(err) => Err(anyhow::Error::new(err)
                    .context("failed to create a task record")
                    .into()),
            },
            Some(revision) => match self.live.update(key, value, revision).await {
                Ok(revision) => Ok(revision),
                Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {
                    Err(WriteError::Conflict)
                }
                Err(err) => Err(anyhow::Error::new(err)
                    .context("failed to update a task record")
                    .into()),
            },
        }
    }

    /// Writes an ended record over `revision` (compare-and-set, as a KV update does) with a
    /// TTL, so that the server removes it, subject and all, after the linger.
    async fn write_expiring(
        &self,
        record: &TaskRecord,
        revision: u64,
        value: bytes::Bytes,
    ) -> Result<u64, WriteError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
        headers.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            topology::TASK_RECORD_LINGER.as_secs().to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(topology::task_record_subject(&record.id), headers, value)
            .await
            .context("failed to write an ended task's record")?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                Err(WriteError::Conflict)
            }
            Err(err) => Err(anyhow::Error::new(err)
                .context("failed to write an ended task's record")
                .into()),
        }
    }

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

    /// Removes an ended task's key from the live bucket, leaving no delete marker behind:
    /// the subject goes with it, and with it the server's per-subject state.
    pub async fn purge(&self, task: &TaskId) -> anyhow::Result<()> {
        let stream = self
            .js
            .get_stream(topology::TASK_RECORDS_STREAM)
            .await
            .context("failed to open the task record bucket's stream")?;
        stream
            .purge()
            .filter(topology::task_record_subject(task))
            .await
            .context("failed to purge an ended task's record")?;
        Ok(())
    }

    /// The task's record, live or archived; or, for a task still in the queue that no
    /// replica has looked at yet (no node has room), a pending record made from its
    /// submission.
    pub async fn find(&self, task: &TaskId) -> anyhow::Result<Option<Found>> {
        if let Some(live) = self.live(task).await? {
            return Ok(Some(Found::Live(live)));
        }
        if let Some(archived) = self.archived(task).await? {
            return Ok(Some(Found::Archived(archived)));
        }
        let Some((sequence, submission)) = self.queued(task).await?.pop() else {
            // Looked for in the order a task moves through them, it could have moved on
            // between two looks: its record is created before its submission leaves the
            // queue, and archived before it leaves the bucket. So once it is not in the
            // queue, the bucket or the archive has it.
            if let Some(live) = self.live(task).await? {
                return Ok(Some(Found::Live(live)));
            }
            return Ok(self.archived(task).await?.map(Found::Archived));
        };
        let now = apiary_proto::now_ms();
        let record = TaskRecord::new(submission, sequence, now)
            .waiting("in the queue: no node has had room for it yet", now)
            .context("a new record is pending")?;
        Ok(Some(Found::Queued(record)))
    }

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
