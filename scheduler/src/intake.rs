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
use apiary_proto::message::{Dispatch, TaskSubmission, attempt_msg_id};
use apiary_proto::subject;
use apiary_proto::{NodeId, inbound, now_ms, stored, topology};
use async_nats::jetstream::{self, AckKind};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::pull::{PULL_BATCH, PULL_RETRY, Pulled, next_batch, next_pulled, open_consumer};
use crate::view::Placement;
use crate::{Counters, SYNC_WAIT, Shared};

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
        let Some(room) = wait_for_room(&shared, &deciding, &stop).await else {
            break;
        };
        // Pull only as many messages as there are free permits. A message this replica has
        // taken is then always being worked on (and kept alive with progress acks), never
        // waiting unattended in a client-side buffer while its ack wait runs out, which would
        // hand it to another replica and, minutes later, let it be dispatched twice.
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.context("the permit pool closed")?,
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
            let shared = shared.clone();
            let stop = stop.clone();
            let claim = Claim::new(deciding.clone());
            in_flight.spawn(async move {
                place_submission(&shared, message, claim, &stop).await;
                drop(permit);
            });
        }
    }
    // Tasks still waiting for a node hand their messages back (they watch `stop`), so another
    // replica takes them at once; give them a moment to do so.
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
/// decided (placed, or handed back): intake does not pull more than the room it leaves.
struct Claim {
    deciding: Option<Arc<AtomicU32>>,
}

impl Claim {
    fn new(deciding: Arc<AtomicU32>) -> Self {
        deciding.fetch_add(1, Ordering::AcqRel);
        Self {
            deciding: Some(deciding),
        }
    }

    fn release(&mut self) {
        if let Some(deciding) = self.deciding.take() {
            deciding.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.release();
    }
}

/// Places one submitted task: waits, as long as it takes, for a live node that meets its
/// requirements, dispatches it there, then acknowledges the submission.
async fn place_submission(
    shared: &Shared,
    message: jetstream::Message,
    mut claim: Claim,
    stop: &CancellationToken,
) {
    let Some(submission) =
        inbound::decode_or_terminate::<TaskSubmission>(&message, SUBMISSION).await
    else {
        return;
    };
    if let Some(reply_to) = &submission.reply_to
        && !subject::is_allowed_reply_subject(reply_to, &shared.config.reply_subject_prefixes)
    {
        let reason = format!("reply subject {reply_to:?} is not allowed");
        inbound::terminate(&message, SUBMISSION, &reason).await;
        return;
    }
    let span = tracing::info_span!("task", task_id = %submission.id);
    async move {
        let placed = wait_for_node(shared, &message, &submission, stop).await;
        // Decided: placed (and counted in the view) or handed back.
        claim.release();
        shared.wake();
        let Some(node) = placed else {
            return;
        };
        let dispatch = Dispatch {
            task: submission,
            attempt: 1,
            dispatched_at_ms: now_ms(),
        };
        match stored::dispatch(&shared.js, &node, &dispatch).await {
            Ok(stored) => {
                // A duplicate is this task placed before (a redelivered submission): the
                // stored dispatch stands either way, wherever it went, and this placement
                // takes no room.
                if stored.duplicate {
                    shared.unreserve(&dispatch.msg_id());
                } else {
                    Counters::count(&shared.counters.tasks_placed);
                }
                tracing::debug!(node_id = %node, duplicate = stored.duplicate, "task dispatched");
                if let Err(err) = message.ack().await {
                    // The dispatch is stored; a redelivered submission is dispatched again
                    // under the same message id and dropped as a duplicate.
                    tracing::warn!(error = %err, "failed to acknowledge a placed task");
                }
            }
            Err(err) => {
                shared.unreserve(&dispatch.msg_id());
                tracing::warn!(node_id = %node, error = %format!("{err:#}"), "dispatch failed; retrying");
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

/// What a submission is called in the log when it is terminated.
const SUBMISSION: &str = "task submission";

/// How long a task that no online node can run waits before it is looked at again. It goes
/// back to the queue meanwhile, so it holds no place in this replica's in-flight window.
const NO_MATCH_RETRY: Duration = Duration::from_secs(2);

/// Waits until the view offers a node for the task and reserves room there. While the nodes
/// that meet the task's requirements are all full, the task waits here for the view to change
/// (keeping its message with progress acks). While no node is online, or nodes are online but
/// none meets the task's requirements, the message goes back to the queue (for
/// [`NO_MATCH_RETRY`] in the second case, so such tasks cannot crowd out tasks that can run).
/// `None` if the message was handed back.
async fn wait_for_node(
    shared: &Shared,
    message: &jetstream::Message,
    submission: &TaskSubmission,
    stop: &CancellationToken,
) -> Option<NodeId> {
    let attempt_id = attempt_msg_id(&submission.id, 1);
    let mut changed = shared.changed.subscribe();
    let mut announced = false;
    // The first tick one period from now: an interval's immediate first tick still waits for
    // the timer wheel (about a millisecond), which would sit on every task's path.
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + topology::SCHEDULER_PROGRESS_INTERVAL,
        topology::SCHEDULER_PROGRESS_INTERVAL,
    );
    loop {
        let placement = shared.place(
            &submission.requirements,
            attempt_id.clone(),
            submission.limits.timeout_ms,
        );
        match placement {
            Placement::Node(node) => return Some(node),
            Placement::NoMatchingNode => {
                let first = message.info().map_or(true, |info| info.delivered <= 1);
                if first {
                    tracing::info!(
                        "no online node meets the task's requirements; it waits in the queue"
                    );
                }
                message
                    .ack_with(AckKind::Nak(Some(NO_MATCH_RETRY)))
                    .await
                    .ok();
                return None;
            }
            Placement::NoLiveNode => {
                // The nodes went away after the pull: back to the shared queue, which this
                // replica pulls from again once a node has room.
                tracing::debug!("no node is online; the task goes back to the queue");
                message.ack_with(AckKind::Nak(None)).await.ok();
                return None;
            }
            Placement::NodesFull if !announced => {
                tracing::debug!("every node that can run the task is full; it waits for room");
                announced = true;
            }
            Placement::NodesFull => {}
        }
        tokio::select! {
            _ = stop.cancelled() => {
                message.ack_with(AckKind::Nak(None)).await.ok();
                return None;
            }
            _ = changed.changed() => {}
            _ = progress.tick() => {
                message.ack_with(AckKind::Progress).await.ok();
            }
        }
    }
}
