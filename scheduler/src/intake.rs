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

/// Places one submitted task: chooses a node for it, dispatches it there, then acknowledges
/// the submission; or hands it back to the queue when no node can take it now.
async fn place_submission(shared: &Shared, message: jetstream::Message, mut claim: Claim) {
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
        let placed = choose_node(shared, &message, &submission).await;
        // Decided: the room the claim stood for is now reserved in the view, or free again.
        claim.release(placed.is_some());
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

/// How long a task that no online node can run waits in the queue before it is looked at
/// again, so such tasks cannot crowd out tasks that can run.
const NO_MATCH_RETRY: Duration = Duration::from_secs(2);

/// How long a task whose matching nodes are all full waits in the queue before it is looked
/// at again. It waits there, not in this replica: held here, tasks for a few busy nodes (a
/// label only they have) would fill this replica's window while other nodes sat idle.
const FULL_RETRY: Duration = Duration::from_millis(500);

/// Chooses a node for the task now and reserves room there, or hands the message back to
/// the shared queue (`None`): at once while no node is online (this replica pulls again only
/// once a node has room), after [`FULL_RETRY`] while every node that meets its requirements
/// is full, after [`NO_MATCH_RETRY`] while none does.
async fn choose_node(
    shared: &Shared,
    message: &jetstream::Message,
    submission: &TaskSubmission,
) -> Option<NodeId> {
    let placement = shared.place(
        &submission.requirements,
        attempt_msg_id(&submission.id, 1),
        submission.limits.timeout_ms,
    );
    let retry = match placement {
        Placement::Node(node) => return Some(node),
        Placement::NoLiveNode => {
            tracing::debug!("no node is online; the task goes back to the queue");
            None
        }
        Placement::NodesFull => {
            tracing::debug!("every node that can run the task is full; it goes back to the queue");
            Some(FULL_RETRY)
        }
        Placement::NoMatchingNode => {
            let first = message.info().map_or(true, |info| info.delivered <= 1);
            if first {
                tracing::info!(
                    "no online node meets the task's requirements; it waits in the queue"
                );
            }
            Some(NO_MATCH_RETRY)
        }
    };
    message.ack_with(AckKind::Nak(retry)).await.ok();
    None
}
