//! One task: decode the dispatch, run the module in the sandbox with progress acks keeping
//! the message, fit the result to what the server carries, store it, then acknowledge. A
//! result the server does not take goes to the outbox, which stores it and acknowledges the
//! dispatch once the server is back; a dispatch whose result is already there is not run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apiary_proto::codec;
use apiary_proto::message::{
    AttemptStarted, Dispatch, Grants, ModuleRef, Outcome, ResultObject, RunUsage, TaskError,
    TaskErrorKind, TaskResult, stdout_object_name,
};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{now_ms, stored, topology};
use async_nats::connection::State;
use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use crate::Agent;
use crate::cancel::Finished;
use crate::sandbox::Run;
use crate::work::is_draining;

impl Agent {
    /// Runs one dispatched task and publishes its result. Never panics on bad input: a
    /// message that cannot be decoded is terminated (it can never succeed), and every other
    /// failure becomes a typed result.
    pub(crate) async fn handle(
        self: Arc<Self>,
        message: jetstream::Message,
        stop: &CancellationToken,
    ) {
        let received = std::time::Instant::now();
        let Some(dispatch) =
            apiary_proto::inbound::decode_or_terminate::<Dispatch>(&message, "dispatch").await
        else {
            return;
        };
        let span = tracing::info_span!(
            "task",
            task_id = %dispatch.task.id,
            attempt = dispatch.attempt,
        );
        // A dispatch that comes back while its result waits in the outbox (or after a
        // restart, was stored from it) has run: the outbox stores the result if need be and
        // acks it.
        let Some(message) = self.outbox.adopt(&dispatch.msg_id(), message) else {
            span.in_scope(|| {
                tracing::info!("this attempt's result is in the outbox; not running it again");
            });
            return;
        };
        if self.skip_cancelled(&message, &dispatch, &span).await {
            return;
        }
        let Some(slot) = self
            .wait_for_slot(&message, stop)
            .instrument(span.clone())
            .await
        else {
            return;
        };
        // A cancel notice may have come while the dispatch waited for its slot.
        if self.skip_cancelled(&message, &dispatch, &span).await {
            return;
        }
        self.run_task(message, dispatch, slot, received)
            .instrument(span)
            .await;
    }

    /// Terminates the dispatch of an attempt cancelled before it ran; true if it was.
    async fn skip_cancelled(
        &self,
        message: &jetstream::Message,
        dispatch: &Dispatch,
        span: &tracing::Span,
    ) -> bool {
        if !self.cancels.is_cancelled(&dispatch.msg_id()) {
            return false;
        }
        span.in_scope(|| tracing::info!("the task was cancelled; not running it"));
        message.ack_with(AckKind::Term).await.ok();
        true
    }

    /// A run slot for this dispatch: at once when one is free. Otherwise the dispatch waits
    /// here for one, kept ours with progress acks; it goes back to the queue at once
    /// (`None`) if the agent stops or the node starts draining meanwhile, as a dispatch that
    /// was delivered but not started does.
    async fn wait_for_slot(
        &self,
        message: &jetstream::Message,
        stop: &CancellationToken,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if let Ok(slot) = self.run_slots.try_acquire() {
            return Some(slot);
        }
        // The run's own progress acks begin one period after it starts, so the ack wait sees
        // at most two periods without one, well within it.
        let keep_alive = AbortOnDropHandle::new(tokio::spawn(progress_acks(message.clone())));
        let mut schedule = self.schedule.subscribe();
        let slot = tokio::select! {
            slot = self.run_slots.acquire() => slot.ok(),
            _ = stop.cancelled() => None,
            _ = schedule.wait_for(|schedule| is_draining(*schedule)) => None,
        };
        drop(keep_alive);
        if slot.is_none() {
            message.ack_with(AckKind::Nak(None)).await.ok();
        }
        slot
    }

    /// Runs the task holding `slot`, which it gives back as soon as the run is over: storing
    /// the result is network time, which the next dispatch's run need not wait for.
    async fn run_task(
        &self,
        message: jetstream::Message,
        dispatch: Dispatch,
        slot: tokio::sync::SemaphorePermit<'_>,
        received: std::time::Instant,
    ) {
        self.running.fetch_add(1, Ordering::Relaxed);
        let started_at_ms = now_ms();
        let attempt_id = dispatch.msg_id();
        let stop = self.cancels.starting(&attempt_id);

        // Keep the message ours while the task runs: without progress acks JetStream would
        // hand it to someone else after the ack wait.
        let keep_alive = CancellationToken::new();
        let announcement = Arc::new(Announcement::default());
        let started = self.start_signal(&dispatch, started_at_ms);
        let progress = AbortOnDropHandle::new(tokio::spawn(send_progress(
            message.clone(),
            started,
            announcement.clone(),
            keep_alive.clone(),
        )));
        let run = self.execute(&dispatch, &stop).await;
        // The node's drain deadline stops runs (`work::stop_runs_at_drain_deadlines`).
        if self.cancels.finished(&attempt_id) == Finished::Drained {
            // The task goes back to be placed elsewhere under a new attempt; what this run
            // did is not its result.
            stop_progress(progress, &announcement, &keep_alive).await;
            tracing::warn!("handing the task back: the node's drain deadline passed");
            message.ack_with(AckKind::Nak(None)).await.ok();
            self.running.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let finished_at_ms = now_ms();
        let run_over = RunOver {
            _slot: slot,
            _instance: run.spent,
        };
        stop_progress(progress, &announcement, &keep_alive).await;

        let usage = RunUsage {
            module_sha256: dispatch.task.module.sha256.clone(),
            ..run.usage
        };
        let result = TaskResult {
            task_id: dispatch.task.id.clone(),
            node_id: self.node_id.clone(),
            attempt: dispatch.attempt,
            outcome: run.outcome,
            started_at_ms,
            finished_at_ms,
            reply_to: dispatch.task.reply_to.clone(),
            stdout_object: None,
            usage: Some(usage),
        };
        self.dispatch_to_result.record(received.elapsed());
        match &result.outcome {
            Outcome::Completed { exit_code, .. } => {
                tracing::info!(
                    exit_code,
                    elapsed_ms = result.finished_at_ms.saturating_sub(started_at_ms),
                    "task completed"
                );
            }
            Outcome::Failed { error, .. } => {
                tracing::info!(kind = %error.kind, error = %error.message, "task failed");
            }
        }

        match self.publish_result(&result, run_over).await {
            Ok(()) => {
                self.completed.fetch_add(1, Ordering::Relaxed);
                // An ack the server confirms. A plain one would do for correctness (the
                // result is stored; a lost ack costs a redelivery whose result its message
                // id drops) and was measured to gain no throughput, and on nats-server 2.10
                // it left dispatches undelivered under load: 16 of 500 never reached the
                // agents in the three-replica test.
                if let Err(err) = message.double_ack().await {
                    tracing::warn!(error = %format!("{err:#}"), "failed to acknowledge a finished task");
                }
            }
            Err(unpublished) => match self.outbox.keep(&result).await {
                // The dispatch stays unacknowledged until the result is stored, but the task
                // is over: it leaves the running count, and the outbox acks the dispatch
                // once the server has the result.
                Ok(()) => {
                    self.completed.fetch_add(1, Ordering::Relaxed);
                    let waiting = self.outbox.waiting();
                    if let Unpublished::Failed(_) = unpublished {
                        tracing::warn!(reason = %unpublished, waiting, "the server did not take the result; kept in the outbox until it does");
                    } else {
                        tracing::info!(reason = %unpublished, waiting, "result kept in the outbox until the server takes it");
                    }
                    // The entry is there (just written, or already), so the outbox takes the
                    // dispatch. Were it refused, the dispatch would come back after its ack
                    // wait and find the entry then.
                    let _ = self.outbox.adopt(&result.msg_id(), message);
                }
                Err(err) => {
                    // Neither the server nor the disk took the result. Leave the message
                    // unacknowledged: it comes back and the task runs again, rather than its
                    // result being lost.
                    tracing::error!(
                        error = %err,
                        reason = %unpublished,
                        "failed to publish a task result or keep it in the outbox"
                    );
                    message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await
                        .ok();
                }
            },
        }
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// The largest encoded result the server accepts, less room for headers; 0 while the
    /// client has never been connected.
    pub(crate) fn max_result_bytes(&self) -> usize {
        const HEADER_ROOM: usize = 1024;
        self.client
            .server_info()
            .max_payload
            .saturating_sub(HEADER_ROOM)
    }

    /// The signal that tells the cluster an attempt started (core NATS: a lost one only
    /// leaves the task's record `scheduled` until its result), for [`send_progress`] to send.
    fn start_signal(&self, dispatch: &Dispatch, started_at_ms: u64) -> StartSignal {
        let started = AttemptStarted {
            task_id: dispatch.task.id.clone(),
            attempt: dispatch.attempt,
            started_at_ms,
        };
        StartSignal {
            client: self.client.clone(),
            subject: subject::node(&self.node_id, NodeVerb::Started),
            body: codec::encode(&started).ok(),
        }
    }

    async fn execute(&self, dispatch: &Dispatch, stop: &Arc<AtomicBool>) -> Run {
        if let Err(error) = self
            .limits
            .admit(&dispatch.task.limits, &dispatch.task.grants)
        {
            return not_run(error);
        }
        let module = match self.modules.get(&dispatch.task.module).await {
            Ok(module) => module,
            Err(error) => return not_run(error),
        };
        let timeout_ms = dispatch.task.limits.timeout_ms;
        let host = self.app_host(&dispatch.task.grants, timeout_ms);
        let run = {
            let (sandbox, stop) = (self.sandbox.clone(), stop.clone());
            let (input, limits, grants) = (
                dispatch.task.input.0.clone(),
                dispatch.task.limits.clone(),
                dispatch.task.grants.clone(),
            );
            Box::pin(async move {
                sandbox
                    .run_prepared(&module, input, &limits, &grants, &stop, host)
                    .await
            })
        };
        // The epoch deadline stops guest code; a guest waiting in a host call (a long WASI
        // sleep) is past its reach until the call returns, so the run is also raced against
        // its deadline and against a stop (a cancel, the drain deadline, the agent's stop),
        // each with a grace.
        let backstop = Duration::from_millis(timeout_ms).saturating_add(RUN_BACKSTOP);
        tokio::select! {
            // The run first: one that ends on its first poll (most do) never starts a timer.
            biased;
            run = run_here_then_aside(run, stop) => run,
            () = tokio::time::sleep(backstop) => {
                // A run moved to a thread of its own is dropped there a grace after its stop
                // flag, wherever it is.
                stop.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "the run outlived its timeout inside a host call; reported as timed out"
                );
                not_run(TaskError::new(
                    TaskErrorKind::Timeout,
                    format!(
                        "the task ran longer than its {timeout_ms} ms limit (blocked outside the module)"
                    ),
                ))
            }
            () = stopped_then(stop, RUN_BACKSTOP) => {
                tracing::warn!("the run did not stop inside a host call; given up on");
                not_run(TaskError::new(
                    TaskErrorKind::Cancelled,
                    "the run was stopped while blocked outside the module",
                ))
            }
        }
    }

    /// What serves the run's host APIs: the submission's namespace, when the task was
    /// granted an API that acts in one.
    fn app_host(
        &self,
        grants: &Grants,
        timeout_ms: u64,
    ) -> Option<Box<dyn crate::sandbox::AppHost>> {
        if !(grants.kv || grants.publish) {
            return None;
        }
        let now = std::time::Instant::now();
        let deadline = now
            .checked_add(Duration::from_millis(timeout_ms))
            .unwrap_or(now + Duration::from_secs(24 * 60 * 60));
        let namespace = grants.namespace.clone()?;
        Some(self.app_store.for_run(namespace, deadline))
    }

    /// Stores `result` in `APIARY_RESULTS`, unless it belongs in the outbox: while the
    /// server is away (a publish would only wait out its timeout) or older results wait
    /// there (a result must not overtake them). `run_over` is let go as soon as the result
    /// is on its way (or will not be sent), before the wait for the server's ack.
    async fn publish_result(
        &self,
        result: &TaskResult,
        run_over: RunOver<'_>,
    ) -> Result<(), Unpublished> {
        if self.client.connection_state() != State::Connected {
            return Err(Unpublished::ServerAway);
        }
        if self.outbox.waiting() > 0 {
            return Err(Unpublished::OlderResultsWait);
        }
        let mut run_over = Some(run_over);
        let max = self.max_result_bytes();
        let result = if fits(result, max) {
            result.clone()
        } else {
            // Moving output to the object store is network time the slot need not wait for.
            run_over = None;
            self.fit_for_server(result.clone()).await?
        };
        let sent = stored::send_result(&self.js, &result).await?;
        drop(run_over);
        sent.stored().await?;
        Ok(())
    }

    /// A result the server can carry: as it is when it fits the server's `max_payload`;
    /// otherwise with stdout moved to the result object store (`stdout_object`, fetched by
    /// the SDK), and only if it still does not fit (a huge stderr), cut down by
    /// [`fit_within`]. The limit is unknown (0) until the server's INFO arrives; the result
    /// goes as it is then.
    pub(crate) async fn fit_for_server(
        &self,
        mut result: TaskResult,
    ) -> Result<TaskResult, stored::PublishError> {
        let max = self.max_result_bytes();
        if fits(&result, max) {
            return Ok(result);
        }
        let name = stdout_object_name(&result.task_id, result.attempt);
        if let Outcome::Completed { stdout, .. } = &mut result.outcome
            && !stdout.is_empty()
            && result.stdout_object.is_none()
        {
            let bytes = std::mem::take(stdout).0;
            let object = ResultObject {
                sha256: ModuleRef::for_bytes(&bytes).sha256,
                size: bytes.len() as u64,
                name,
            };
            let mut reader = bytes.as_ref();
            self.result_objects
                .put(object.name.as_str(), &mut reader)
                .await
                .map_err(|source| stored::PublishError::Object {
                    name: object.name.clone(),
                    source,
                })?;
            tracing::info!(
                bytes = object.size,
                "output too large for a message; kept in the result object store"
            );
            result.stdout_object = Some(object);
        }
        Ok(fit_within(result, max))
    }
}

/// Whether `result` goes as it is to a server that carries at most `max` bytes (0: not
/// known yet).
fn fits(result: &TaskResult, max: usize) -> bool {
    max == 0 || encoded_len(result) <= max
}

fn encoded_len(result: &TaskResult) -> usize {
    codec::encode(result).map_or(usize::MAX, |bytes| bytes.len())
}

/// What a run holds until its result is on its way: its slot, and its instance, whose
/// return to the pool (a memory reset) would otherwise sit between the run and its result.
struct RunOver<'a> {
    _slot: tokio::sync::SemaphorePermit<'a>,
    _instance: crate::sandbox::Spent,
}

/// How long past its timeout a run blocked in a host call is reported as timed out.
const RUN_BACKSTOP: Duration = Duration::from_secs(1);

/// Why a result went to the outbox instead of the server.
#[derive(Debug, thiserror::Error)]
enum Unpublished {
    #[error("the server is away")]
    ServerAway,
    #[error("older results wait in the outbox")]
    OlderResultsWait,
    #[error(transparent)]
    Failed(#[from] stored::PublishError),
}

/// The run of a task that failed before its module ran, or whose figures never came back:
/// nothing to account but the failure.
fn not_run(error: TaskError) -> Run {
    Run::not_started(Outcome::Failed {
        error,
        stderr: Default::default(),
    })
}

/// A result the server can carry. A task may stay within its own output limit and still
/// produce a result larger than the server's `max_payload` (stdout and stderr are limited
/// separately); publishing that would fail on every retry, so it becomes an output-limit
/// failure instead, keeping as much of stderr as fits.
pub(crate) fn fit_within(mut result: TaskResult, max_bytes: usize) -> TaskResult {
    let size = encoded_len(&result);
    if size <= max_bytes {
        return result;
    }
    let stderr = match &result.outcome {
        Outcome::Completed { stderr, .. } | Outcome::Failed { stderr, .. } => stderr.0.clone(),
    };
    let kept = stderr.slice(..stderr.len().min(max_bytes / 2));
    if let Some(usage) = &mut result.usage
        && kept.len() < stderr.len()
    {
        usage.stderr_cut = true;
    }
    result.outcome = Outcome::Failed {
        error: TaskError::new(
            TaskErrorKind::OutputLimit,
            format!(
                "the task's output makes a {size} byte result; the server carries at most {max_bytes}"
            ),
        ),
        stderr: kept.into(),
    };
    result
}

/// How long a run goes before its start is announced. A task that ends sooner goes from
/// `scheduled` straight to its end: announcing it would cost the cluster a record write per
/// task for a state nobody could have seen.
const ANNOUNCE_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// An attempt's started signal, ready to publish.
struct StartSignal {
    client: async_nats::Client,
    subject: subject::Subject,
    body: Option<bytes::Bytes>,
}

impl StartSignal {
    async fn send(self) {
        let Some(body) = self.body else { return };
        if let Err(err) = self.client.publish(self.subject, body).await {
            tracing::debug!(error = %err, "failed to announce a task's start");
        }
    }
}

/// Whether a run's start is announced, decided once by whichever comes first: the
/// announcement, [`ANNOUNCE_AFTER`] into the run, or the run's end. A run that ended first
/// needs no wait for its progress task, which has sent nothing and never will; one that was
/// announced waits, so that the started signal always goes out before the result.
#[derive(Debug, Default)]
struct Announcement(std::sync::atomic::AtomicU8);

impl Announcement {
    const OPEN: u8 = 0;
    const ANNOUNCED: u8 = 1;
    const CLOSED: u8 = 2;

    /// True if the start may be announced (the run has not ended).
    fn announce(&self) -> bool {
        self.decide(Self::ANNOUNCED)
    }

    /// True if the start was not announced, and now never will be.
    fn close(&self) -> bool {
        self.decide(Self::CLOSED)
    }

    fn decide(&self, to: u8) -> bool {
        self.0
            .compare_exchange(Self::OPEN, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Ends a run's progress task: at once (dropped, so aborted) when it never announced the
/// start, else once it has finished sending.
async fn stop_progress(
    progress: AbortOnDropHandle<()>,
    announcement: &Announcement,
    keep_alive: &CancellationToken,
) {
    keep_alive.cancel();
    if announcement.close() {
        return;
    }
    progress.await.ok();
}

/// Announces the run's start once it has gone [`ANNOUNCE_AFTER`] (unless it ended first),
/// then sends a progress ack every [`topology::PROGRESS_INTERVAL`], until `done`.
async fn send_progress(
    message: jetstream::Message,
    started: StartSignal,
    announcement: Arc<Announcement>,
    done: CancellationToken,
) {
    tokio::select! {
        _ = done.cancelled() => return,
        _ = tokio::time::sleep(ANNOUNCE_AFTER) => {
            if !announcement.announce() {
                return;
            }
            started.send().await;
        }
    }
    tokio::select! {
        _ = done.cancelled() => {}
        _ = progress_acks(message) => {}
    }
}

/// Sends a progress ack for `message` every [`topology::PROGRESS_INTERVAL`], the first one
/// period from now, for as long as it is polled.
async fn progress_acks(message: jetstream::Message) {
    // The first tick one period from now: an interval's immediate first tick still waits for
    // the timer wheel (about a millisecond), which would sit on every task's path.
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + topology::PROGRESS_INTERVAL,
        topology::PROGRESS_INTERVAL,
    );
    loop {
        ticker.tick().await;
        if let Err(err) = message.ack_with(AckKind::Progress).await {
            tracing::warn!(error = %err, "failed to extend a held task's ack wait");
        }
    }
}

/// How long a run's guest may compute, in all, on the agent's worker thread before the run
/// moves to a thread of its own.
const RUN_HERE_FOR: Duration = Duration::from_millis(1);

/// Polls a run right here, on the worker thread: its guest runs on a fiber of its own, so a
/// trivial task's run needs no other thread at all (handing each run to another thread and
/// back cost most of a trivial task's time on its node, docs/BENCHMARKS.md), and a guest
/// waiting in a host call (an app-store call, a WASI sleep) suspends without holding the
/// thread. Once the guest has computed for [`RUN_HERE_FOR`] in all, the run goes on, from
/// its next yield (every [`YIELD_EVERY_FUEL`](crate::sandbox::YIELD_EVERY_FUEL) of fuel,
/// about a millisecond, or at an epoch tick), on a blocking-pool thread driven with the
/// runtime's handle: a worker thread that guests keep busy looks at the network only every
/// few dozen polls, and the agent's heartbeats and acks would wait. There it is dropped,
/// and its instance goes back to the pool, a grace after its stop flag is set, even inside
/// a host call that does not return.
async fn run_here_then_aside(
    mut run: std::pin::Pin<Box<dyn Future<Output = Run> + Send>>,
    stop: &Arc<AtomicBool>,
) -> Run {
    let mut computed = Duration::ZERO;
    let here = std::future::poll_fn(|cx| {
        let polled_at = std::time::Instant::now();
        let polled = run.as_mut().poll(cx);
        computed += polled_at.elapsed();
        match polled {
            std::task::Poll::Ready(run) => std::task::Poll::Ready(Some(run)),
            std::task::Poll::Pending if computed >= RUN_HERE_FOR => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await;
    if let Some(run) = here {
        return run;
    }
    let runtime = tokio::runtime::Handle::current();
    let stop = stop.clone();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async {
            tokio::select! {
                biased;
                run = run => run,
                () = stopped_then(&stop, RUN_BACKSTOP) => not_run(TaskError::new(
                    TaskErrorKind::Cancelled,
                    "the run was stopped while blocked outside the module",
                )),
            }
        })
    })
    .await
    .unwrap_or_else(|err| {
        not_run(TaskError::new(
            TaskErrorKind::Internal,
            format!("the task's thread failed: {err}"),
        ))
    })
}

/// Returns `grace` after `stop` is set (looked at every epoch tick).
async fn stopped_then(stop: &AtomicBool, grace: Duration) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(crate::sandbox::EPOCH_TICK).await;
    }
    tokio::time::sleep(grace).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_proto::{NodeId, Payload, TaskId};

    fn result_with_output(stdout: usize, stderr: usize) -> TaskResult {
        TaskResult {
            task_id: TaskId::new("t").unwrap(),
            node_id: NodeId::new("n").unwrap(),
            attempt: 1,
            outcome: Outcome::Completed {
                exit_code: 0,
                stdout: Payload::from(vec![b'o'; stdout]),
                stderr: Payload::from(vec![b'e'; stderr]),
            },
            started_at_ms: 0,
            finished_at_ms: 0,
            reply_to: None,
            stdout_object: None,
            usage: Some(RunUsage::default()),
        }
    }

    #[test]
    fn a_start_is_announced_or_closed_once_and_never_both() {
        let ended_first = Announcement::default();
        assert!(ended_first.close());
        assert!(!ended_first.announce(), "announced after the run ended");
        let announced_first = Announcement::default();
        assert!(announced_first.announce());
        assert!(
            !announced_first.close(),
            "the end must wait for the announcement"
        );
    }

    #[test]
    fn results_that_fit_are_left_alone() {
        let result = result_with_output(100, 10);
        assert_eq!(fit_within(result.clone(), 10_000), result);
    }

    #[test]
    fn results_too_large_for_the_server_become_output_limit_failures() {
        let fitted = fit_within(result_with_output(5_000, 3_000), 4_000);
        match &fitted.outcome {
            Outcome::Failed { error, stderr } => {
                assert_eq!(error.kind, TaskErrorKind::OutputLimit);
                assert_eq!(stderr.len(), 2_000);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(codec::encode(&fitted).unwrap().len() <= 4_000);
    }
}
