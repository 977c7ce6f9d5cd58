//! The offline outbox: task results the server did not take, kept on disk until it does.
//!
//! A task that finishes while NATS is unreachable (the server restarts, the node's network is
//! down) still has a result worth keeping: running it again costs the task's time, and for a
//! module with side effects it is a second run. Its result goes to a sled database in the
//! state directory (`<state>/outbox`), flushed to disk before the agent moves on, and the
//! [`replay`] job publishes it when the connection is back, with the same `Nats-Msg-Id`
//! (`<task>.<attempt>`), so that JetStream stores a result once even if an earlier publish
//! did reach it.
//!
//! - **Order.** Keys are big-endian sequence numbers, so sled iterates oldest first, and the
//!   numbering goes on from the last key after a restart. A replay stops at the first result
//!   the server does not take, and a task that finishes while older results wait joins the
//!   queue behind them: results reach the server in the order their tasks finished.
//! - **Acks.** The dispatch of a task whose result waits here stays unacknowledged until the
//!   result is stored (a message is acked only after its consequence is stored). The task
//!   itself is over: it no longer counts as running, and shutdown does not wait for it. Its
//!   dispatch still counts against the node's consumer (`max_ack_pending`, four per slot), which is
//!   right: the cluster hands the node more work only once it has the results of what the
//!   node held, and that happens as soon as the server is reachable, which is also the only
//!   time new work can arrive.
//! - **Restarts.** The outbox survives the process. A restarted agent replays it at start,
//!   and when JetStream hands it the dispatch of an attempt whose result is here (the
//!   dispatch of a process that died unacknowledged comes back at the new registration), it
//!   does not run the task again: it publishes the kept result, if not yet stored, and acks.
//!   For that, a result stored by the replay of an earlier process's entry leaves a small
//!   marker until its dispatch comes back and is acked, or for a day (the life of a result
//!   in `APIARY_RESULTS`): a dispatch that never comes back was moved to another node.
//! - **One process.** sled locks its files; a second agent on the same state directory is
//!   refused at start with [`OutboxError::InUse`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiary_proto::message::TaskResult;
use apiary_proto::{CodecError, Encoding, codec, now_ms, stored, topology};
use async_nats::connection::State;
use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::Agent;
use crate::backoff::Backoff;

/// The outbox's directory inside the agent's state directory.
pub const DIR_NAME: &str = "outbox";

/// How long a marker of a stored result waits for its dispatch to come back to be acked.
const MARKER_LIFETIME: Duration = topology::RESULTS_MAX_AGE;

/// How often the replay job looks at the client's connection state while the server is
/// away. It reads a local value, so looking often costs nothing and no traffic, and a
/// result waits at most this long once the client is connected again.
const CONNECTION_CHECK: Duration = Duration::from_millis(100);

/// Why the outbox could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the outbox {path} is in use by another apiary-agent process; each agent needs a state directory of its own (APIARY_STATE_DIR)"
    )]
    InUse { path: PathBuf },
    #[error("failed to open the outbox {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("failed to write to the outbox: {0}")]
    Write(#[source] sled::Error),
    #[error("failed to encode an outbox entry: {0}")]
    Encode(#[source] CodecError),
}

/// One entry, keyed by its sequence number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Entry {
    /// A result the server has not stored yet. Boxed: it is far larger than the other
    /// variant (serde stores a box as what it holds, so the entries on disk are the same).
    Waiting {
        result: Box<TaskResult>,
        kept_at_ms: u64,
    },
    /// A result stored by a replay whose dispatch this process did not hold (it was an
    /// earlier process's), kept until that dispatch comes back and is acked.
    Stored {
        attempt_id: String,
        stored_at_ms: u64,
    },
}

impl Entry {
    fn attempt_id(&self) -> String {
        match self {
            Entry::Waiting { result, .. } => result.msg_id(),
            Entry::Stored { attempt_id, .. } => attempt_id.clone(),
        }
    }
}

/// The agent's outbox. Cheap to clone; every clone is the same outbox.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    next_key: AtomicU64,
    index: Mutex<Index>,
    /// How many results wait for the server, for whoever watches (tests, an embedder).
    waiting: watch::Sender<usize>,
    /// Wakes the replay job: a result was kept, or a dispatch adopted.
    wake: Notify,
}

#[derive(Debug, Default)]
struct Index {
    /// Each entry's key by attempt id (`<task>.<attempt>`).
    keys: HashMap<String, u64>,
    /// How many entries are [`Entry::Waiting`].
    waiting: usize,
    /// Dispatch messages whose results are here, by attempt id, to be acked once stored.
    dispatches: HashMap<String, jetstream::Message>,
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, refusing one another process holds, and
    /// reports the number of waiting results to `waiting` from now on. Markers past their
    /// lifetime and entries that cannot be read are dropped.
    pub fn open(dir: &Path, waiting: watch::Sender<usize>) -> Result<Self, OutboxError> {
        let path = dir.to_owned();
        if in_use(&path) {
            return Err(OutboxError::InUse { path });
        }
        let db = sled::Config::new()
            .path(&path)
            // Small: the outbox holds a few results at a time, and a Raspberry Pi's memory
            // is better spent on tasks than on sled's page cache (1 GiB by default).
            .cache_capacity(4 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|source| match source {
                // Another process took the lock between the check above and the open.
                sled::Error::Io(ref err) if err.to_string().contains("could not acquire lock") => {
                    OutboxError::InUse { path: path.clone() }
                }
                source => OutboxError::Open {
                    path: path.clone(),
                    source,
                },
            })?;

        let mut index = Index::default();
        let mut last_key = None;
        let now = now_ms();
        for item in db.iter() {
            let (key, value) = item.map_err(|source| OutboxError::Open {
                path: path.clone(),
                source,
            })?;
            let Some(sequence) = decode_key(&key) else {
                tracing::error!(key = ?key, "dropping an outbox entry with a key this agent did not write");
                db.remove(&key).map_err(OutboxError::Write)?;
                continue;
            };
            last_key = Some(sequence);
            match Encoding::MsgPack.decode::<Entry>(&value) {
                Ok(Entry::Stored { stored_at_ms, .. }) if expired(stored_at_ms, now) => {
                    db.remove(&key).map_err(OutboxError::Write)?;
                }
                Ok(entry) => {
                    if matches!(entry, Entry::Waiting { .. }) {
                        index.waiting += 1;
                    }
                    index.keys.insert(entry.attempt_id(), sequence);
                }
                Err(err) => {
                    // Nothing can be done with it, and kept it would be reported at every
                    // start.
                    tracing::error!(key = sequence, error = %err, "dropping an outbox entry that cannot be read");
                    db.remove(&key).map_err(OutboxError::Write)?;
                }
            }
        }
        if index.waiting > 0 {
            tracing::info!(
                waiting = index.waiting,
                path = %path.display(),
                "results from before the restart wait in the outbox"
            );
        }
        waiting.send_replace(index.waiting);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                next_key: AtomicU64::new(last_key.map_or(0, |key| key + 1)),
                index: Mutex::new(index),
                waiting,
                wake: Notify::new(),
            }),
        })
    }

    /// Keeps `result` until the server stores it: written and flushed to disk before this
    /// returns. A result already here for the same attempt is kept once.
    pub(crate) async fn keep(&self, result: &TaskResult) -> Result<(), OutboxError> {
        let attempt_id = result.msg_id();
        if self.lock().keys.contains_key(&attempt_id) {
            return Ok(());
        }
        let entry = Entry::Waiting {
            result: Box::new(result.clone()),
            kept_at_ms: now_ms(),
        };
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        self.write(key, &entry)?;
        self.inner
            .db
            .flush_async()
            .await
            .map_err(OutboxError::Write)?;
        let waiting = {
            let mut index = self.lock();
            index.keys.insert(attempt_id, key);
            index.waiting += 1;
            index.waiting
        };
        self.inner.waiting.send_replace(waiting);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Takes the dispatch of an attempt whose result is here, to be acked once the result is
    /// stored. A dispatch of any other attempt is handed back: its task has to run. A second
    /// delivery of the same dispatch replaces the first.
    #[must_use = "a dispatch handed back has not been taken care of"]
    pub(crate) fn adopt(
        &self,
        attempt_id: &str,
        dispatch: jetstream::Message,
    ) -> Option<jetstream::Message> {
        {
            let mut index = self.lock();
            if !index.keys.contains_key(attempt_id) {
                return Some(dispatch);
            }
            index.dispatches.insert(attempt_id.to_owned(), dispatch);
        }
        self.inner.wake.notify_one();
        None
    }

    /// How many results wait for the server.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Whether an entry (waiting or stored) exists for the attempt.
    pub fn contains(&self, attempt_id: &str) -> bool {
        self.lock().keys.contains_key(attempt_id)
    }

    /// Every entry, oldest first.
    fn entries(&self) -> Vec<(u64, Result<Entry, CodecError>)> {
        self.inner
            .db
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, value)| {
                Some((decode_key(&key)?, Encoding::MsgPack.decode::<Entry>(&value)))
            })
            .collect()
    }

    /// Records that the result under `key` is stored, leaving a marker for its dispatch.
    fn mark_stored(&self, key: u64, attempt_id: &str) -> Result<(), OutboxError> {
        // Not flushed: should the marker be lost, the entry is replayed once more and
        // JetStream drops the copy by its message id.
        self.write(
            key,
            &Entry::Stored {
                attempt_id: attempt_id.to_owned(),
                stored_at_ms: now_ms(),
            },
        )?;
        let waiting = {
            let mut index = self.lock();
            index.waiting = index.waiting.saturating_sub(1);
            index.waiting
        };
        self.inner.waiting.send_replace(waiting);
        Ok(())
    }

    /// Takes the dispatch held for the attempt, if any.
    fn take_dispatch(&self, attempt_id: &str) -> Option<jetstream::Message> {
        self.lock().dispatches.remove(attempt_id)
    }

    /// Forgets the entry under `key`, whose result is stored. Returns a dispatch of the
    /// attempt adopted in the meantime, to be acked by the caller: with the entry gone,
    /// nothing else would.
    fn remove(
        &self,
        key: u64,
        attempt_id: &str,
    ) -> Result<Option<jetstream::Message>, OutboxError> {
        self.inner
            .db
            .remove(key.to_be_bytes())
            .map_err(OutboxError::Write)?;
        let mut index = self.lock();
        if index.keys.get(attempt_id) == Some(&key) {
            index.keys.remove(attempt_id);
        }
        Ok(index.dispatches.remove(attempt_id))
    }

    /// Whether the replay job has anything to do: results to store or dispatches to ack.
    fn has_work(&self) -> bool {
        let index = self.lock();
        index.waiting > 0 || !index.dispatches.is_empty()
    }

    fn write(&self, key: u64, entry: &Entry) -> Result<(), OutboxError> {
        let value = codec::encode(entry).map_err(OutboxError::Encode)?;
        self.inner
            .db
            .insert(key.to_be_bytes(), value.as_ref())
            .map_err(OutboxError::Write)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner
            .index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether another process (or another agent in this one) has the outbox in `dir` open.
fn in_use(dir: &Path) -> bool {
    // sled holds an exclusive lock on its `db` file while open (flock, like the standard
    // library's), so taking it for a moment tells whether anyone holds it now.
    match std::fs::File::open(dir.join("db")) {
        Ok(file) => matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

fn decode_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn expired(stored_at_ms: u64, now_ms: u64) -> bool {
    let lifetime = u64::try_from(MARKER_LIFETIME.as_millis()).unwrap_or(u64::MAX);
    now_ms.saturating_sub(stored_at_ms) > lifetime
}

/// Why a replay pass stopped.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Publish(#[from] stored::PublishError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// What the replay job last said, so that it speaks once per change and not at every try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Said {
    Nothing,
    ServerAway,
    Failing,
}

/// Publishes kept results, oldest first, whenever there are any and the client is connected,
/// and acks their dispatches, until `stop`. A pass the server refuses is tried again with
/// capped, jittered backoff.
pub(crate) async fn replay(agent: Arc<Agent>, stop: CancellationToken) {
    let outbox = &agent.outbox;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut said = Said::Nothing;
    loop {
        if !outbox.has_work() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = outbox.inner.wake.notified() => continue,
            }
        }
        if agent.client.connection_state() != State::Connected {
            if said != Said::ServerAway {
                tracing::info!(
                    waiting = outbox.waiting(),
                    "the server is away; results wait in the outbox until it is back"
                );
                said = Said::ServerAway;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CONNECTION_CHECK) => {}
            }
            continue;
        }
        let pass = tokio::select! {
            _ = stop.cancelled() => return,
            pass = replay_pass(&agent) => pass,
        };
        match pass {
            Ok(()) => {
                if said != Said::Nothing {
                    tracing::info!(
                        waiting = outbox.waiting(),
                        "the server takes the outbox's results again"
                    );
                    said = Said::Nothing;
                }
                backoff.reset();
            }
            Err(err) => {
                if said != Said::Failing {
                    tracing::warn!(error = %err, waiting = outbox.waiting(), "failed to replay the outbox; retrying");
                    said = Said::Failing;
                } else {
                    tracing::debug!(error = %err, "failed to replay the outbox again");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// One pass over the outbox, oldest first: stores each waiting result, stopping at the first
/// the server does not take, so that none overtakes an older one; acks the dispatches of
/// stored results; drops markers past their lifetime.
async fn replay_pass(agent: &Agent) -> Result<(), ReplayError> {
    let outbox = &agent.outbox;
    for (key, entry) in outbox.entries() {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                tracing::error!(key, error = %err, "dropping an outbox entry that cannot be read");
                outbox
                    .inner
                    .db
                    .remove(key.to_be_bytes())
                    .map_err(OutboxError::Write)?;
                continue;
            }
        };
        let attempt_id = entry.attempt_id();
        match entry {
            Entry::Waiting { result, kept_at_ms } => {
                // Fitted now, to the server that is back: a large output goes to the
                // result object store first.
                let result = agent.fit_for_server(*result).await?;
                let stored = stored::result(&agent.js, &result).await?;
                // A duplicate is stored all the same: an earlier publish of this result
                // reached the server, only its answer did not reach us.
                tracing::info!(
                    task_id = %result.task_id,
                    attempt = result.attempt,
                    waited_ms = now_ms().saturating_sub(kept_at_ms),
                    duplicate = stored.duplicate,
                    "a result kept in the outbox is stored"
                );
                outbox.mark_stored(key, &attempt_id)?;
                settle(outbox, key, &attempt_id, None).await?;
            }
            Entry::Stored { stored_at_ms, .. } => {
                settle(outbox, key, &attempt_id, Some(stored_at_ms)).await?;
            }
        }
    }
    Ok(())
}

/// Acks the held dispatch of a stored result and forgets the entry. Without a dispatch, the
/// marker stays for the dispatch to come back, until its lifetime is over.
async fn settle(
    outbox: &Outbox,
    key: u64,
    attempt_id: &str,
    stored_at_ms: Option<u64>,
) -> Result<(), OutboxError> {
    let mut dispatch = outbox.take_dispatch(attempt_id);
    if dispatch.is_none() {
        if !stored_at_ms.is_some_and(|stored| expired(stored, now_ms())) {
            return Ok(());
        }
        // A dispatch that arrives as the marker goes is acked all the same: its result has
        // been stored for a long time.
        dispatch = outbox.remove(key, attempt_id)?;
    }
    while let Some(held) = dispatch.take() {
        match held.double_ack().await {
            Ok(()) => dispatch = outbox.remove(key, attempt_id)?,
            Err(err) => {
                // The marker stays (unless it expired): the dispatch comes back after its ack
                // wait, and is then acked without running the task.
                tracing::warn!(error = %err, attempt_id, "failed to acknowledge the dispatch of a stored result");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_proto::message::Outcome;
    use apiary_proto::{NodeId, TaskId};

    fn result(task: &str, attempt: u32) -> TaskResult {
        TaskResult {
            task_id: TaskId::new(task).unwrap(),
            node_id: NodeId::new("n").unwrap(),
            attempt,
            outcome: Outcome::Completed {
                exit_code: 0,
                stdout: task.as_bytes().to_vec().into(),
                stderr: Default::default(),
            },
            started_at_ms: 1,
            finished_at_ms: 2,
            reply_to: Some("_INBOX.x".into()),
            stdout_object: None,
            usage: None,
        }
    }

    /// Opens the outbox in `dir`. A test that reopens it right after dropping it can find
    /// sled's background flusher of the dropped one still holding the directory's lock (it
    /// is detached and cannot be joined), so a refused lock is tried again, for a bounded
    /// time, until the flusher lets go.
    fn open(dir: &Path) -> (Outbox, watch::Receiver<usize>) {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (sender, receiver) = watch::channel(usize::MAX);
            match Outbox::open(dir, sender) {
                Ok(outbox) => return (outbox, receiver),
                Err(OutboxError::InUse { .. }) if std::time::Instant::now() < give_up => {
                    std::thread::yield_now();
                }
                Err(err) => panic!("failed to open the outbox: {err}"),
            }
        }
    }

    fn waiting_results(outbox: &Outbox) -> Vec<TaskResult> {
        outbox
            .entries()
            .into_iter()
            .filter_map(|(_, entry)| match entry.unwrap() {
                Entry::Waiting { result, .. } => Some(*result),
                Entry::Stored { .. } => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn results_come_back_oldest_first_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIR_NAME);
        // More than a byte's worth, so that an order by little-endian or text keys would
        // show.
        let tasks: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
        {
            let (outbox, waiting) = open(&path);
            assert_eq!(*waiting.borrow(), 0);
            for task in &tasks[..299] {
                outbox.keep(&result(task, 1)).await.unwrap();
            }
            assert_eq!(*waiting.borrow(), 299);
        }

        let (outbox, waiting) = open(&path);
        assert_eq!(
            *waiting.borrow(),
            299,
            "the reopened outbox reports what waits"
        );
        // Numbering goes on after the reopen: a result kept now comes after the older ones.
        outbox.keep(&result(&tasks[299], 1)).await.unwrap();
        let order: Vec<String> = waiting_results(&outbox)
            .iter()
            .map(|result| result.task_id.to_string())
            .collect();
        assert_eq!(order, tasks);
        assert_eq!(*waiting.borrow(), 300);
    }

    #[tokio::test]
    async fn an_attempt_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, waiting) = open(dir.path());
        outbox.keep(&result("t", 1)).await.unwrap();
        outbox.keep(&result("t", 1)).await.unwrap();
        outbox.keep(&result("t", 2)).await.unwrap();
        assert_eq!(*waiting.borrow(), 2);
        assert_eq!(waiting_results(&outbox).len(), 2);
        assert!(outbox.contains("t.1") && outbox.contains("t.2"));
        assert!(!outbox.contains("t.3"));
    }

    #[tokio::test]
    async fn a_stored_result_leaves_a_marker_until_it_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, waiting) = open(dir.path());
        outbox.keep(&result("old", 1)).await.unwrap();
        outbox.keep(&result("new", 1)).await.unwrap();
        let key = outbox.entries()[0].0;
        outbox.mark_stored(key, "old.1").unwrap();
        assert_eq!(*waiting.borrow(), 1);
        assert!(
            outbox.contains("old.1"),
            "the marker answers for the attempt"
        );
        assert_eq!(waiting_results(&outbox)[0].task_id.as_str(), "new");
        drop(outbox);

        // The marker survives a restart, so the dispatch that comes back to the new process
        // is recognised.
        let (outbox, waiting) = open(dir.path());
        assert_eq!(*waiting.borrow(), 1);
        assert!(outbox.contains("old.1"));
        // With no dispatch held and the marker young, settling leaves it.
        settle(&outbox, key, "old.1", Some(now_ms())).await.unwrap();
        assert!(outbox.contains("old.1"));
        assert!(outbox.remove(key, "old.1").unwrap().is_none());
        assert!(!outbox.contains("old.1"));
        drop(outbox);
        let (outbox, _) = open(dir.path());
        assert!(!outbox.contains("old.1"));
        assert!(outbox.contains("new.1"));
    }

    #[tokio::test]
    async fn markers_past_their_lifetime_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = open(dir.path());
        outbox.keep(&result("t", 1)).await.unwrap();
        let lifetime = u64::try_from(MARKER_LIFETIME.as_millis()).unwrap();
        let long_ago = now_ms() - lifetime - 1;
        outbox
            .write(
                0,
                &Entry::Stored {
                    attempt_id: "t.1".into(),
                    stored_at_ms: long_ago,
                },
            )
            .unwrap();
        // A pass drops it once nothing can come back for it any more...
        settle(&outbox, 0, "t.1", Some(long_ago)).await.unwrap();
        assert!(!outbox.contains("t.1"));
        assert!(outbox.entries().is_empty());

        // ...and so does the next start.
        outbox
            .write(
                1,
                &Entry::Stored {
                    attempt_id: "u.1".into(),
                    stored_at_ms: long_ago,
                },
            )
            .unwrap();
        outbox.inner.db.flush().unwrap();
        drop(outbox);
        let (outbox, _) = open(dir.path());
        assert!(!outbox.contains("u.1"));
        assert!(outbox.entries().is_empty());
    }

    #[test]
    fn a_second_agent_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = open(dir.path());
        assert!(in_use(dir.path()));
        let (sender, _) = watch::channel(0);
        let err = Outbox::open(dir.path(), sender).unwrap_err();
        assert!(matches!(err, OutboxError::InUse { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("in use by another apiary-agent process")
        );
        drop(first);
        assert!(!in_use(dir.path()));
        let (sender, _) = watch::channel(0);
        Outbox::open(dir.path(), sender).unwrap();
    }

    #[test]
    fn unreadable_entries_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(0u64.to_be_bytes(), b"not an entry".as_ref())
                .unwrap();
            db.insert(b"odd key".as_ref(), b"x".as_ref()).unwrap();
            db.flush().unwrap();
        }
        let (outbox, waiting) = open(dir.path());
        assert_eq!(*waiting.borrow(), 0);
        assert!(outbox.inner.db.is_empty());
    }
}
