//! Intake: pulls submitted tasks from the shared queue while nodes have room for them, places
//! each on a node, dispatches it there, then acknowledges the submission.
//!
//! A replica pulls only as many submissions as its nodes have room for (their slots plus a
//! small backlog, counting this replica's unfinished dispatches; see [`crate::view`]). Work
//! that has nowhere to go stays in `APIARY_TASKS`, shared by every replica, so it goes to
//! whichever node has room first, including nodes that register a moment later, instead of
//! piling onto the first node that appears.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::lifecycle::{TaskRecord, TaskState};
use apiary_proto::message::{Dispatch, TaskSubmission, attempt_msg_id};
use apiary_proto::subject;
use apiary_proto::{codec, inbound, now_ms, stored, topology};
use async_nats::jetstream::{self, AckKind};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::delivery::CAS_TRIES;
use crate::pull::{PULL_BATCH, PULL_RETRY, Pulled, next_batch, next_pulled, open_consumer};
use crate::records::WriteError;
use crate::settle::{self, Delivery};
use crate::view::Placement;
use crate::{Counters, SYNC_WAIT, Shared, answers};

/// Pulls submitted tasks and places each on a node, up to `max_in_flight` at once and never
/// more than the nodes have room for.
pub(crate) async fn intake(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let consumer = open_consumer(
        &shared.js,
        topology::TASKS_STREAM,
        topology::scheduler_tasks_consumer(),
    )
    .await?;
    shared.wait_synced(SYNC_WAIT).await;

    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    // Pulled submissions whose placement is not decided yet: they will take room that the
    // view does not show as taken.
    let deciding = Arc::new(AtomicU32::new(0));
    let mut in_flight = JoinSet::new();
    'pulling: loop {
        while in_flight.try_join_next().is_some() {}
        // Pull only as many messages as there are free permits. A message this replica has
        // taken is then always being worked on, never waiting unattended in a client-side
        // buffer while its ack wait runs out, which would hand it to another replica.
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.context("the permit pool closed")?,
        };
        let Some(room) = wait_for_room(&shared, &deciding, &stop).await else {
            break;
        };
        let wanted = usize::try_from(room).unwrap_or(usize::MAX).min(PULL_BATCH);
        let mut held = vec![first];
        while held.len() < wanted {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => held.push(permit),
                Err(_) => break,
            }
        }
        let mut batch = match next_batch(&consumer, held.len()).await {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "failed to pull submitted tasks; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(PULL_RETRY) => continue,
                }
            }
        };
        loop {
            let message = match next_pulled(&mut batch, &stop, "submitted tasks").await {
                Pulled::Message(message) => message,
                // The next batch takes the free permits again.
                Pulled::BatchDone => break,
                Pulled::Stopped => break 'pulling,
            };
            let Some(permit) = held.pop() else { break };
            let claim = Claim::new(deciding.clone(), shared.clone());
            let shared = shared.clone();
            in_flight.spawn(async move {
                place_submission(&shared, message, claim).await;
                drop(permit);
            });
        }
    }
    // Placements under way finish (each takes a dispatch's store and an ack); give them a
    // moment, so that none leaves its submission to wait out the ack wait.
    let handed_back = tokio::time::timeout(Duration::from_secs(2), async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if handed_back.is_err() {
        in_flight.abort_all();
    }
    Ok(())
}

/// Waits until the nodes have room for more of this replica's work than the submissions it
/// is still deciding about will take; returns that room, or `None` when `stop` comes first.
async fn wait_for_room(
    shared: &Shared,
    deciding: &AtomicU32,
    stop: &CancellationToken,
) -> Option<u32> {
    let mut changed = shared.changed.subscribe();
    loop {
        let room = shared
            .view()
            .room(now_ms())
            .saturating_sub(deciding.load(Ordering::Acquire));
        if room > 0 {
            return Some(room);
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = changed.changed() => {}
            // Nothing is missed without it (every change wakes this), but a bounded wait
            // costs nothing and keeps a lost wake-up from stalling intake.
            _ = tokio::time::sleep(shared.config.heartbeat_interval) => {}
        }
    }
}

/// A pulled submission's claim on the nodes' room, from the pull until its placement is
/// decided: intake does not pull more than the room the claims leave.
struct Claim {
    deciding: Option<Arc<AtomicU32>>,
    shared: Arc<Shared>,
}

impl Claim {
    fn new(deciding: Arc<AtomicU32>, shared: Arc<Shared>) -> Self {
        deciding.fetch_add(1, Ordering::AcqRel);
        Self {
            deciding: Some(deciding),
            shared,
        }
    }

    /// Ends the claim. Unless its room was reserved in the view (`placed`), the room is free
    /// again, and intake is woken to pull for it.
    fn release(&mut self, placed: bool) {
        if let Some(deciding) = self.deciding.take() {
            deciding.fetch_sub(1, Ordering::AcqRel);
            if !placed {
                self.shared.wake();
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.release(false);
    }
}

/// Takes one submitted task: reads its record, then places it (a dispatch to the chosen
/// node, its record moved to scheduled), leaves it waiting in the queue with its reason, or
/// answers with the existing task (an id submitted before). The submission is acknowledged
/// once that is stored.
async fn place_submission(shared: &Shared, message: jetstream::Message, mut claim: Claim) {
    let submission =
        match codec::decode_message::<TaskSubmission>(message.headers.as_ref(), &message.payload) {
            Ok((submission, _)) => submission,
            Err(err) => {
                answers::refuse_submission(shared, &message, &err.to_string()).await;
                inbound::terminate(&message, SUBMISSION, &err.to_string()).await;
                return;
            }
        };
    if let Some(reply_to) = &submission.reply_to
        && !subject::is_allowed_reply_subject(reply_to, &shared.config.reply_subject_prefixes)
    {
        let reason = format!("reply subject {reply_to:?} is not allowed");
        inbound::terminate(&message, SUBMISSION, &reason).await;
        return;
    }
    let sequence = message.info().map_or(0, |info| info.stream_sequence);
    let span = tracing::info_span!("task", task_id = %submission.id);
    async move {
        let next = admit(shared, &message, &submission, sequence, &mut claim).await;
        // Decided: the room the claim stood for is reserved in the view, or free again.
        claim.release(false);
        match next {
            Ok(Next::Ack) => {
                if let Err(err) = message.ack().await {
                    // What the submission led to is stored; a redelivered submission finds
                    // it in the record and is dispatched again under the same message id,
                    // which JetStream drops as a duplicate.
                    tracing::warn!(error = %err, "failed to acknowledge a submission");
                }
            }
            Ok(Next::Later(delay)) => {
                message.ack_with(AckKind::Nak(delay)).await.ok();
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "failed to take a submission; retrying");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await
                    .ok();
            }
        }
    }
    .instrument(span)
    .await
}

/// What becomes of a submission message.
enum Next {
    Ack,
    /// Back to the queue, to be looked at again after the delay (at once if none).
    Later(Option<Duration>),
}

async fn admit(
    shared: &Shared,
    message: &jetstream::Message,
    submission: &TaskSubmission,
    sequence: u64,
    claim: &mut Claim,
) -> anyhow::Result<Next> {
    // An id the SDK generated, read for the first time, has no record anywhere: the first
    // look at the bucket is skipped, and creating the record (which fails if it exists
    // after all) is the check.
    let first_read = message.info().is_ok_and(|info| info.delivered <= 1);
    let mut known_new = submission.fresh_id && first_read;
    for _ in 0..CAS_TRIES {
        let now = now_ms();
        let live = if std::mem::take(&mut known_new) {
            None
        } else {
            shared.records.live(&submission.id).await?
        };
        let (record, revision) = match live {
            Some(live) => (live.record, Some(live.revision)),
            None => {
                // An id submitted before whose task has ended: answer with that task. An id
                // the SDK generated is new by construction the first time its message is
                // read; read again (an acknowledgement was lost, a cancel left it behind),
                // its task may have ended since.
                if !(submission.fresh_id && first_read)
                    && let Some(ended) = shared.records.archived(&submission.id).await?
                {
                    // The same message again was answered when its task ended.
                    if ended.submission_seq != sequence {
                        answers::answer_existing(shared, &ended, submission.reply_to.as_deref())
                            .await?;
                    }
                    return Ok(Next::Ack);
                }
                (TaskRecord::new(submission.clone(), sequence, now), None)
            }
        };
        match record.state {
            TaskState::Pending => {}
            state if state.is_terminal() => {
                answers::answer_existing(shared, &record, submission.reply_to.as_deref()).await?;
                return Ok(Next::Ack);
            }
            _ if record.submission_seq == sequence => {
                // The message that placed the task, read again: its placer died before the
                // acknowledgement. The dispatch goes out again under the same message id.
                redispatch(shared, &record).await?;
                return Ok(Next::Ack);
            }
            _ => {
                // The id again, in another message, while the task lives: its submitter gets
                // the outcome too.
                let Some(reply_to) = &submission.reply_to else {
                    return Ok(Next::Ack);
                };
                let Some(watched) = record.with_watcher(reply_to) else {
                    return Ok(Next::Ack);
                };
                match shared.records.write(&watched, revision).await {
                    Ok(_) => return Ok(Next::Ack),
                    Err(WriteError::Conflict) => continue,
                    Err(WriteError::Failed(err)) => return Err(err),
                }
            }
        }

        if let Some(timed_out) = record.queue_timed_out(now) {
            match shared.records.write(&timed_out, revision).await {
                Ok(_) => {}
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Failed(err)) => return Err(err),
            }
            Counters::count(&shared.counters.tasks_timed_out);
            tracing::info!("task timed out in the queue");
            settle::finish(shared, &timed_out, Delivery::synthesized(&timed_out)?).await?;
            return Ok(Next::Ack);
        }
        if let Some(not_before) = record.not_before_ms
            && not_before > now
        {
            return Ok(Next::Later(Some(Duration::from_millis(not_before - now))));
        }

        let next_attempt = record.attempt + 1;
        let attempt_id = attempt_msg_id(&record.id, next_attempt);
        let placement = shared.place(
            &record.task.requirements,
            attempt_id.clone(),
            record.task.limits.timeout_ms,
        );
        let node = match placement {
            Placement::Node(node) => node,
            waiting => {
                let (reason, delay) = waiting_reason(message, &waiting);
                if let Some(waiting) = record.waiting(reason, now) {
                    match shared.records.write(&waiting, revision).await {
                        Ok(_) | Err(WriteError::Conflict) => {}
                        Err(WriteError::Failed(err)) => return Err(err),
                    }
                }
                return Ok(Next::Later(delay));
            }
        };
        claim.release(true);
        let placed = record
            .placed(&node, sequence, now)
            .context("a pending record refused its placement")?;
        match shared.records.write(&placed, revision).await {
            Ok(_) => {}
            Err(WriteError::Conflict) => {
                shared.unreserve(&attempt_id);
                continue;
            }
            Err(WriteError::Failed(err)) => {
                shared.unreserve(&attempt_id);
                return Err(err);
            }
        }
        let dispatch = Dispatch {
            task: placed.task.clone(),
            attempt: placed.attempt,
            dispatched_at_ms: now_ms(),
        };
        match stored::dispatch(&shared.js, &node, &dispatch).await {
            Ok(stored) => {
                if stored.duplicate {
                    shared.unreserve(&attempt_id);
                } else {
                    Counters::count(&shared.counters.tasks_placed);
                }
                tracing::debug!(node_id = %node, attempt = placed.attempt, "task dispatched");
                return Ok(Next::Ack);
            }
            Err(err) => {
                // The record says scheduled; the submission comes back (same sequence) and
                // is dispatched again.
                shared.unreserve(&attempt_id);
                return Err(anyhow::Error::new(err).context("failed to dispatch a task"));
            }
        }
    }
    Ok(Next::Later(Some(FULL_RETRY)))
}

/// Sends the dispatch of a scheduled task's current attempt again, to the node the record
/// names. JetStream drops it if the first one was stored.
async fn redispatch(shared: &Shared, record: &TaskRecord) -> anyhow::Result<()> {
    let Some(node) = &record.node_id else {
        return Ok(());
    };
    let dispatch = Dispatch {
        task: record.task.clone(),
        attempt: record.attempt,
        dispatched_at_ms: now_ms(),
    };
    stored::dispatch(&shared.js, node, &dispatch)
        .await
        .context("failed to dispatch a task again")?;
    Ok(())
}

/// What a submission is called in the log when it is terminated.
const SUBMISSION: &str = "task submission";

/// How long a task that no online node can run waits in the queue before it is looked at
/// again, so such tasks cannot crowd out tasks that can run.
const NO_MATCH_RETRY: Duration = Duration::from_secs(2);

/// How long a task whose matching nodes are all full waits in the queue before it is looked
/// at again. It waits there, not in this replica: held here, tasks for a few busy nodes (a
/// label only they have) would fill this replica's window while other nodes sat idle.
const FULL_RETRY: Duration = Duration::from_millis(500);

/// Why a task that could not be placed waits, in words for its record, and how long it
/// stays in the queue before it is looked at again: at once while no node is online (this
/// replica pulls again only once a node has room), [`FULL_RETRY`] while every node that
/// meets its requirements is full, [`NO_MATCH_RETRY`] while none does.
fn waiting_reason(
    message: &jetstream::Message,
    placement: &Placement,
) -> (&'static str, Option<Duration>) {
    match placement {
        Placement::NoLiveNode => {
            tracing::debug!("no node is online; the task goes back to the queue");
            ("no node is online", None)
        }
        Placement::NodesFull => {
            tracing::debug!("every node that can run the task is full; it goes back to the queue");
            (
                "every node that meets its requirements is busy",
                Some(FULL_RETRY),
            )
        }
        Placement::NoMatchingNode | Placement::Node(_) => {
            let first = message.info().map_or(true, |info| info.delivered <= 1);
            if first {
                tracing::info!(
                    "no online node meets the task's requirements; it waits in the queue"
                );
            }
            (
                "unschedulable: no online node meets its requirements",
                Some(NO_MATCH_RETRY),
            )
        }
    }
}
