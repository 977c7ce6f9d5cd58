//! Intake: pulls submitted tasks from the shared queues while nodes have room for them,
//! places each on a node, dispatches it there, then acknowledges the submission.
//!
//! A replica pulls only as many submissions as its nodes have room for (their slots plus a
//! backlog that follows each node's pace, counting this replica's unfinished dispatches; see [`crate::view`]). Work
//! that has nowhere to go stays in `APIARY_TASKS`, shared by every replica, so it goes to
//! whichever node has room first, including nodes that register a moment later, instead of
//! piling onto the first node that appears.
//!
//! `APIARY_TASKS` holds one queue per priority, each with its own consumer. A round of pulls
//! asks the queues for the room there is, shared between them by [`crate::fairness`] (six
//! high, three normal, one low in every ten while all three have work); a queue found empty
//! gives its share to the others, so room is never left unused while any queue has work.
//! These pulls take what the queue has now and end at once ([`fetch_now`]): no request stays
//! open on one queue, taking its messages, while the replica serves another. When every
//! queue is empty, intake waits for a submission to be published (a plain subscription on
//! the three subjects, beside the stream, like [`crate::completions`]), or [`IDLE_TICK`] at
//! most: a submission handed back with a delay (a task waiting for a node, a retry waiting
//! out its backoff) or by a stopping replica comes back without a publish. The subscription
//! costs each replica a second copy of every submission, as completions do of every result;
//! only its subject is read. It buys what a waiting pull on each queue could not give: a
//! waiting pull takes whatever arrives, and three of them would take up to three times the
//! room, or leave messages in requests nobody reads any more.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::codec::Encoding;
use apiary_proto::lifecycle::{TaskRecord, TaskState, msg_id};
use apiary_proto::message::{Dispatch, Priority, TaskSubmission, attempt_msg_id};
use apiary_proto::subject;
use apiary_proto::{codec, inbound, now_ms, stored, topology};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::delivery::CAS_TRIES;
use crate::fairness::{EmptyQueues, FairShare, Queues};
use crate::pull::{
    PULL_BATCH, PULL_RETRY, Pull, Pulled, fetch_now, next_batch_within, next_pulled, open_consumer,
};
use crate::records::WriteError;
use crate::settle::{self, Delivery};
use crate::view::Placement;
use crate::{Counters, SYNC_WAIT, Shared, answers};

/// The longest an idle intake waits before it looks at the queues again without a publish to
/// wake it: how late, at most, it sees a submission handed back to a queue (after a delay, or
/// by a stopping replica).
const IDLE_TICK: Duration = Duration::from_millis(250);

/// How long intake waits on a queue a submission was just published to, when its pull did
/// not find it: the plain subscription can hear of a submission a moment before the stream
/// has stored it.
const STORE_GRACE: Duration = Duration::from_millis(100);

/// Pulls submitted tasks and places each on a node, up to `max_in_flight` at once and never
/// more than the nodes have room for, taking from the priority queues by their fair share.
pub(crate) async fn intake(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let queues = TaskQueues::open(&shared.js).await?;
    let published = Arc::new(Published::default());
    let mut listening = listen_for_submissions(&shared, published.clone()).await?;
    shared.wait_synced(SYNC_WAIT).await;

    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let mut intake = Intake {
        shared: shared.clone(),
        queues,
        // Pulled submissions whose placement is not decided yet: they will take room that
        // the view does not show as taken.
        deciding: Arc::new(AtomicU32::new(0)),
        in_flight: JoinSet::new(),
        stop: stop.clone(),
    };
    let mut fair = FairShare::default();
    let mut empty = EmptyQueues::new(IDLE_TICK.as_millis() as u64);
    // The clock `empty` is read on: monotonic, so that a wall clock stepped back cannot
    // keep a queue taken for empty past its recheck.
    let started = tokio::time::Instant::now();
    let elapsed_ms = move || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut outcome = Ok(());
    loop {
        while intake.in_flight.try_join_next().is_some() {}
        // Pull only as many messages as there are free permits. A message this replica has
        // taken is then always being worked on, never waiting unattended in a client-side
        // buffer while its ack wait runs out, which would hand it to another replica.
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.context("the permit pool closed")?,
        };
        let Some(room) = wait_for_room(&shared, &intake.deciding, &stop).await else {
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
        // Taken before the round looks, so that a submission published while it looks
        // wakes the next one.
        let woken = published.take();
        let asking = empty.worth_asking(woken, elapsed_ms());
        let Some(round) = intake
            .fair_round(&mut fair, &mut empty, asking, &mut held, elapsed_ms)
            .await
        else {
            break;
        };
        if round.took > 0 {
            // More may be waiting: the next round takes the free permits and room again.
            continue;
        }
        if let Some(err) = round.failed {
            tracing::warn!(error = %err, "failed to pull submitted tasks; retrying");
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(PULL_RETRY) => continue,
            }
        }
        if let Some(priority) = woken.highest() {
            // A submission was published to this queue, and the round did not find it:
            // another replica took it, or the stream has not stored it yet. A short wait on
            // the queue takes it the moment it is stored.
            match next_batch_within(intake.queues.get(priority), 1, STORE_GRACE).await {
                Ok(pull) => {
                    if intake.take(pull, &mut held).await.is_none() {
                        break;
                    }
                }
                Err(err) => tracing::debug!(error = %err, "failed to wait on a task queue"),
            }
            continue;
        }
        // Every queue is empty: the permits go back while intake waits for work.
        drop(held);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = published.notify.notified() => {}
            _ = tokio::time::sleep(IDLE_TICK) => {}
            _ = &mut listening => {
                outcome = Err(anyhow::anyhow!("the submission subscriptions ended"));
                break;
            }
        }
    }
    listening.abort();
    // Placements under way finish (each takes a dispatch's store and an ack); give them a
    // moment, so that none leaves its submission to wait out the ack wait.
    let mut in_flight = intake.in_flight;
    let handed_back = tokio::time::timeout(Duration::from_secs(2), async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if handed_back.is_err() {
        in_flight.abort_all();
    }
    outcome
}

/// The consumers of the three task queues.
struct TaskQueues {
    high: PullConsumer,
    normal: PullConsumer,
    low: PullConsumer,
}

impl TaskQueues {
    async fn open(js: &jetstream::Context) -> anyhow::Result<Self> {
        let open = |priority| {
            open_consumer(
                js,
                topology::TASKS_STREAM,
                topology::scheduler_tasks_consumer(priority),
            )
        };
        // The normal queue's first: an earlier version made it without a filter, and until
        // it takes its filter the stream refuses the others as overlapping it.
        let normal = open(Priority::Normal).await?;
        let high = open(Priority::High).await?;
        let low = open(Priority::Low).await?;
        Ok(Self { high, normal, low })
    }

    fn get(&self, priority: Priority) -> &PullConsumer {
        match priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
            Priority::Low => &self.low,
        }
    }
}

/// The queues submissions were published to since intake last looked, and a wake-up for an
/// idle intake. Only the subject of a published submission is read: the message itself is
/// pulled from the stream.
#[derive(Default)]
struct Published {
    queues: AtomicU8,
    notify: Notify,
}

impl Published {
    fn note(&self, priority: Priority) {
        self.queues
            .fetch_or(Queues::NONE.with(priority).bits(), Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// The queues published to since the last call. The wake-up those publishes left is
    /// used up too: the round about to look will see what they published.
    fn take(&self) -> Queues {
        let _ = self.notify.notified().now_or_never();
        Queues::from_bits(self.queues.swap(0, Ordering::AcqRel))
    }
}

/// Subscribes to the three submission subjects and notes each publish in `published`, until
/// the connection closes for good. Read continuously, so that a busy intake does not leave
/// submissions piling up in the subscription.
async fn listen_for_submissions(
    shared: &Shared,
    published: Arc<Published>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut subscriptions = Vec::with_capacity(Priority::ALL.len());
    for priority in Priority::ALL {
        subscriptions.push(
            shared
                .client
                .subscribe(subject::task_submit_for(priority))
                .await
                .context("failed to subscribe to the submission subjects")?,
        );
    }
    let mut submissions = futures::stream::select_all(subscriptions);
    Ok(tokio::spawn(
        async move {
            while let Some(message) = submissions.next().await {
                if let Some(priority) = subject::parse_task_submit(message.subject.as_str()) {
                    published.note(priority);
                }
            }
        }
        .in_current_span(),
    ))
}

/// What the pulling loop keeps from one round to the next.
struct Intake {
    shared: Arc<Shared>,
    queues: TaskQueues,
    deciding: Arc<AtomicU32>,
    in_flight: JoinSet<()>,
    stop: CancellationToken,
}

/// What one round of pulls gave.
#[derive(Default)]
struct Round {
    took: usize,
    /// Why a pull failed, if one did.
    failed: Option<String>,
}

impl Intake {
    /// One round: as many submissions as `held` has permits, asked of the queues
    /// `taking_part` (those not found empty lately, see [`EmptyQueues`]) by their fair
    /// share. A queue that has fewer than its share sits out the rest of the round, and
    /// the others are asked for what it did not have, until the permits are used or every
    /// queue has sat out. `None` when the replica is stopping.
    async fn fair_round(
        &mut self,
        fair: &mut FairShare,
        empty: &mut EmptyQueues,
        mut taking_part: Queues,
        held: &mut Vec<OwnedSemaphorePermit>,
        elapsed_ms: impl Fn() -> u64,
    ) -> Option<Round> {
        let mut round = Round::default();
        while !held.is_empty() && !taking_part.is_empty() {
            let share = fair.share(held.len(), taking_part);
            for priority in Priority::ALL {
                let asked = share.of(priority);
                if asked == 0 {
                    continue;
                }
                let took = match fetch_now(self.queues.get(priority), asked).await {
                    Ok(pull) => self.take(pull, held).await?,
                    Err(err) => {
                        round.failed = Some(err.to_string());
                        0
                    }
                };
                round.took += took;
                if took < asked {
                    taking_part = taking_part.without(priority);
                    empty.found_empty(priority, elapsed_ms());
                }
            }
        }
        Some(round)
    }

    /// Reads `pull` to its end, placing each message it brings with one of the `held`
    /// permits. Returns how many it brought, or `None` when the replica is stopping (the
    /// pull has then been handed back).
    async fn take(
        &mut self,
        mut pull: Pull,
        held: &mut Vec<OwnedSemaphorePermit>,
    ) -> Option<usize> {
        let mut took = 0;
        loop {
            let message = match next_pulled(&mut pull, &self.stop, "submitted tasks").await {
                Pulled::Message(message) => message,
                Pulled::BatchDone => return Some(took),
                Pulled::Stopped => return None,
            };
            took += 1;
            let Some(permit) = held.pop() else {
                // No pull asks for more messages than there are permits; one that comes
                // anyway goes back at once rather than wait out its ack wait here.
                message.ack_with(AckKind::Nak(None)).await.ok();
                continue;
            };
            let claim = Claim::new(self.deciding.clone(), self.shared.clone());
            let shared = self.shared.clone();
            self.in_flight.spawn(async move {
                place_submission(&shared, message, claim).await;
                drop(permit);
            });
        }
    }
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
        let deciding = deciding.load(Ordering::Acquire);
        let wanted = deciding.saturating_add(u32::try_from(PULL_BATCH).unwrap_or(u32::MAX));
        let room = shared
            .view()
            .room_up_to(now_ms(), wanted)
            .saturating_sub(deciding);
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
    let (mut submission, encoding) =
        match codec::decode_message::<TaskSubmission>(message.headers.as_ref(), &message.payload) {
            Ok(decoded) => decoded,
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
        // The queue a submission was published to is its priority, with one exception: the
        // normal queue is also where clients that predate the priority queues, and people
        // writing submissions by hand, publish every task, so one there that asks for
        // another priority is moved to that priority's queue.
        match subject::parse_task_submit(message.subject.as_str()) {
            Some(Priority::Normal) if submission.priority != Priority::Normal => {
                reroute(shared, &message, &submission, sequence).await;
                return;
            }
            Some(queue) => submission.priority = queue,
            None => {}
        }
        let next = admit(
            shared,
            &message,
            &submission,
            encoding,
            sequence,
            &mut claim,
        )
        .await;
        // Decided: the room the claim stood for is reserved in the view, or free again.
        claim.release(false);
        // A submission read again after a lost acknowledgement finds its consequence in the
        // record and is dispatched again under the same message id, which JetStream drops.
        match next {
            Ok(Next::Later(delay)) => {
                message.ack_with(AckKind::Nak(delay)).await.ok();
            }
            Ok(Next::Ack) => {
                inbound::ack_or_retry(&message, Ok::<(), String>(()), SUBMISSION).await
            }
            Err(err) => inbound::ack_or_retry(&message, Err(format!("{err:#}")), SUBMISSION).await,
        }
    }
    .instrument(span)
    .await
}

/// Moves a submission from the normal queue to the queue of the priority its body asks for,
/// and acknowledges the original once the copy is stored. The copy's message id names the
/// original (`<task>.priority.<sequence>`): a redelivered original is copied under the same
/// id, which JetStream drops, while a second submission of the task is still moved.
async fn reroute(
    shared: &Shared,
    message: &jetstream::Message,
    submission: &TaskSubmission,
    sequence: u64,
) {
    let msg_id = msg_id::rerouted(&submission.id, sequence);
    let queue = subject::task_submit_for(submission.priority);
    match stored::publish(&shared.js, queue, &submission.id, &msg_id, submission).await {
        Ok(_) => {
            tracing::debug!(priority = ?submission.priority, "submission moved to the queue of its priority");
            if let Err(err) = message.ack().await {
                tracing::warn!(error = %err, "failed to acknowledge a moved submission");
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "failed to move a submission to the queue of its priority; retrying");
            message
                .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                .await
                .ok();
        }
    }
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
    encoding: Encoding,
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
                        answers::answer_existing(
                            shared,
                            &ended,
                            submission.reply_to.as_deref(),
                            encoding,
                        )
                        .await?;
                    }
                    return Ok(Next::Ack);
                }
                let mut record = TaskRecord::new(submission.clone(), sequence, now);
                record.json_replies = encoding == Encoding::Json;
                (record, None)
            }
        };
        match record.state {
            TaskState::Pending => {}
            state if state.is_terminal() => {
                answers::answer_existing(shared, &record, submission.reply_to.as_deref(), encoding)
                    .await?;
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
                let Some(watched) = record.with_watcher(reply_to, encoding == Encoding::Json)
                else {
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
