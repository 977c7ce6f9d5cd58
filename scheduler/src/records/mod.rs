//! Task records: reading and writing them, with compare-and-set, in the live bucket
//! (`APIARY_TASK_RECORDS`, one key per live task) and the archive (`APIARY_TASK_ARCHIVE`, one
//! subject per id shard, final records only).
//!
//! A task's record lives in the bucket from its first placement (or its first look, if it
//! must wait) until it ends. Its final record then goes to the archive, and its key leaves the
//! bucket (by a TTL, or a purge on servers without them), so the bucket's subjects count the
//! tasks alive and the archive's are bounded by the shard count (see ARCHITECTURE.md for the
//! memory this saves). A lookup by id reads the bucket, then scans the task's archive shard
//! ([`archive`]), then walks the queue ([`queue`]).

mod archive;
mod queue;

pub(crate) use archive::scan;
pub(crate) use queue::{names, names_in, walk_queue};

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use apiary_proto::lifecycle::TaskRecord;
use apiary_proto::{TaskId, codec, topology};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};

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

/// How many records a replica remembers as it last wrote them.
const REMEMBERED: usize = 16_384;

/// How long a replica remembers a record it wrote. The hint serves the settle of a result
/// that comes soon after the placement; a record that another replica ended is never looked
/// up here again, and without an age limit the cache would fill with those up to
/// [`REMEMBERED`] (a soak at 50 tasks/s grew each of three replicas by 1.5 MiB a minute).
/// A task that runs longer costs its settle one read.
const REMEMBER_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// A record as this replica wrote it, and when.
struct Remembered {
    live: Live,
    written_at: std::time::Instant,
}

#[derive(Clone)]
pub(crate) struct Records {
    js: jetstream::Context,
    live: kv::Store,
    /// The records this replica wrote last, with their revisions: most results are settled
    /// by the replica that placed their task, which can then write at once instead of
    /// reading the record first. Only a hint: a write from it fails if the record changed
    /// since, and any other decision made from it is made again from the bucket.
    written: Arc<Mutex<lru::LruCache<TaskId, Remembered>>>,
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

    fn remembered(&self) -> std::sync::MutexGuard<'_, lru::LruCache<TaskId, Remembered>> {
        // Each critical section is one cache operation, or a write and the trimming of
        // the writes past their age.
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The record as this replica last wrote it, if it remembers it; else as the bucket has
    /// it. See [`Records::written`] for why it may be stale, and what makes that safe.
    pub async fn live_or_remembered(&self, task: &TaskId) -> anyhow::Result<Option<Live>> {
        let remembered = self
            .remembered()
            .get(task)
            .filter(|remembered| remembered.written_at.elapsed() < REMEMBER_FOR)
            .map(|remembered| remembered.live.clone());
        if let Some(live) = remembered {
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
                let now = std::time::Instant::now();
                let remembered = Remembered {
                    live: Live {
                        record: record.clone(),
                        revision: *revision,
                    },
                    written_at: now,
                };
                let mut cache = self.remembered();
                cache.put(record.id.clone(), remembered);
                // The least recently used end holds the oldest writes: those past the age
                // limit go, a few at a time as new ones come.
                while cache.peek_lru().is_some_and(|(_, oldest)| {
                    now.duration_since(oldest.written_at) >= REMEMBER_FOR
                }) {
                    cache.pop_lru();
                }
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
        if self.ttl && record.state.is_terminal() {
            // A record that ends as it is created (a task cancelled or timed out before any
            // replica wrote it) expires too: revision 0 asks that the key has none yet.
            return self
                .write_expiring(record, revision.unwrap_or(0), value)
                .await;
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

    /// Writes an ended record over `revision` (compare-and-set, as a KV update does; 0 for a
    /// key that has no value yet, as a KV create does) with a TTL, so that the server removes
    /// it, subject and all, after the linger.
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
}
