//! Work: pulling this node's dispatched tasks from its own consumer, starting each, handing
//! back what was received but not started when the agent stops, and waiting for what runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::admin::Schedule;
use apiary_proto::{now_ms, topology};
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Agent;

/// Pulls the node's dispatched tasks and starts each (at most `slots` run at once: the
/// consumer hands out no more) until `stop`. Returns the tasks still running.
///
/// While an operator drains the node, it pulls nothing: what was delivered but not started
/// goes back at once, and schedulers move what is still queued for the node elsewhere. It
/// pulls again if the node is opened again (`apiary nodes uncordon`).
pub(crate) async fn work_loop(
    agent: Arc<Agent>,
    stop: &CancellationToken,
) -> (anyhow::Result<()>, JoinSet<()>) {
    let mut running = JoinSet::new();
    let mut schedule = agent.schedule.subscribe();
    'pulling: loop {
        wait_while_draining(&mut schedule, stop).await;
        let Some(mut messages) = dispatched_tasks(&agent, stop).await else {
            return (Ok(()), running);
        };
        let stopped = loop {
            // Reap finished tasks so the set does not grow with every task ever run.
            while running.try_join_next().is_some() {}
            tokio::select! {
                _ = stop.cancelled() => break true,
                _ = schedule.changed() => {
                    if is_draining(*schedule.borrow_and_update()) {
                        tracing::info!("draining: this node takes no new tasks");
                        break false;
                    }
                }
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        let agent = agent.clone();
                        let stop = stop.clone();
                        running.spawn(async move { agent.handle(message, &stop).await });
                    }
                    Some(Err(err)) => {
                        // Pull errors are transient (a server restart, a missed heartbeat of
                        // the pull request); the stream keeps going.
                        tracing::warn!(error = %err, "error while pulling dispatched tasks");
                    }
                    None => {
                        // The consumer was deleted: a scheduler took this node's registration
                        // for a new process and handed out again what the consumer held (or
                        // an operator removed it). Pull from a new one; whatever this process
                        // still runs finishes, and its result is stored once per attempt.
                        tracing::warn!("this node's dispatch consumer went away; opening it again");
                        continue 'pulling;
                    }
                },
            }
        };
        hand_back(&mut messages).await;
        if stopped {
            return (Ok(()), running);
        }
    }
}

pub(crate) fn is_draining(schedule: Schedule) -> bool {
    matches!(schedule, Schedule::Draining { .. })
}

/// Returns once the node is not draining (at once if it is not), or on `stop`.
async fn wait_while_draining(schedule: &mut watch::Receiver<Schedule>, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = schedule.wait_for(|schedule| !is_draining(*schedule)) => {}
    }
}

/// Tasks already delivered to this client but not started go back at once, instead of
/// waiting out their ack wait and costing an attempt when they are moved.
async fn hand_back(messages: &mut jetstream::consumer::pull::Stream) {
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        message.ack_with(AckKind::Nak(None)).await.ok();
    }
}

/// Stops every run when the node is draining and its drain deadline passes, and what starts
/// while it stays so; lifts that when the node's schedule changes (opened again, or a new
/// deadline). One watcher for the node rather than one per run: a run only registers its
/// stop flag (`Cancels::starting`), which a trivial task's time on its node can afford.
pub(crate) async fn stop_runs_at_drain_deadlines(agent: Arc<Agent>) {
    let mut schedule = agent.schedule.subscribe();
    loop {
        drain_deadline(&mut schedule).await;
        agent.cancels.drain_deadline_passed();
        tracing::warn!("the node's drain deadline passed: stopping its runs");
        if schedule.changed().await.is_err() {
            return;
        }
        agent.cancels.drain_deadline_lifted();
    }
}

/// Resolves when the node is draining and its drain deadline has passed; never otherwise.
async fn drain_deadline(schedule: &mut watch::Receiver<Schedule>) {
    loop {
        let current = *schedule.borrow_and_update();
        match current {
            Schedule::Draining { deadline_ms } => {
                let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
                tokio::select! {
                    _ = tokio::time::sleep(left) => return,
                    changed = schedule.changed() => if changed.is_err() {
                        std::future::pending::<()>().await;
                    },
                }
            }
            _ => {
                if schedule.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Opens this node's dispatch consumer and starts pulling, retrying until it works or
/// `stop` (then `None`). Creating the consumer can fail for a moment while a scheduler
/// deletes it to hand out a previous process's work, or while the server restarts; neither
/// is a reason for the agent to exit.
async fn dispatched_tasks(
    agent: &Agent,
    stop: &CancellationToken,
) -> Option<jetstream::consumer::pull::Stream> {
    let mut backoff = Duration::from_millis(50);
    let mut warned = false;
    loop {
        // Stop cuts an attempt short: with the server away, it waits out JetStream's
        // request timeout.
        let opened = tokio::select! {
            _ = stop.cancelled() => return None,
            opened = open_dispatched_tasks(agent) => opened,
        };
        match opened {
            Ok(messages) => return Some(messages),
            Err(err) if !warned => {
                tracing::warn!(error = %format!("{err:#}"), "cannot pull dispatched tasks yet; retrying");
                warned = true;
            }
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "still cannot pull dispatched tasks")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn open_dispatched_tasks(agent: &Agent) -> anyhow::Result<jetstream::consumer::pull::Stream> {
    let consumer: jetstream::consumer::PullConsumer = agent
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?
        .create_consumer(topology::node_dispatch_consumer(
            &agent.node_id,
            agent.slots,
        ))
        .await
        .context("failed to create this node's dispatch consumer")?;
    consumer
        .messages()
        .await
        .context("failed to start pulling dispatched tasks")
}

/// Waits up to `grace` for running tasks. Tasks still running after it are abandoned with
/// their messages unacknowledged, so JetStream hands them out again.
pub(crate) async fn drain(mut running: JoinSet<()>, grace: Duration) {
    if running.is_empty() {
        return;
    }
    tracing::info!(
        running = running.len(),
        "waiting for running tasks to finish"
    );
    let drained = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = running.len(),
            "tasks still running after the grace period; they will be redelivered"
        );
    }
}
