//! Work lost with a node: moved to live nodes as new attempts, or reclaimed at once from a
//! node's previous process when it restarts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::message::{Dispatch, Outcome, TaskError, TaskErrorKind, TaskResult};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, inbound, now_ms, stored, topology};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::delivery::CAS_TRIES;
use crate::records::WriteError;
use crate::settle;
use crate::view::Handover;
use crate::{Counters, Shared, contention_pause, forget};

/// Hands out again, at once, every task a node's previous process held: the node's consumer
/// is deleted, and the agent's next pull creates it anew, which delivers everything still in
/// the node's queue (a work-queue stream keeps only unfinished work) without waiting for the
/// old deliveries' ack wait. The new process runs them under the same attempt numbers, so
/// nothing is spent on a restart the cluster has seen.
pub(crate) async fn reclaim_deliveries(shared: &Shared, node: &NodeId) -> anyhow::Result<()> {
    let stream = shared
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?;
    let name = topology::node_dispatch_consumer_name(node);
    let info = match stream.consumer_info(&name).await {
        Ok(info) => info,
        // No consumer: the previous process never pulled, so it held nothing.
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).context("failed to read the node's dispatch consumer"),
    };
    // Deliveries the old process holds, and pull requests it left open: a process that lost
    // power can leave its connection, and so its request, on the server for minutes, and
    // every dispatch sent to it would sit out the ack wait. The new process has not pulled
    // yet (it pulls once its registration is answered), so both are the old process's.
    let held = info.num_ack_pending;
    if held == 0 && info.num_waiting == 0 {
        return Ok(());
    }
    stream
        .delete_consumer(&name)
        .await
        .context("failed to delete the node's dispatch consumer")?;
    tracing::info!(node_id = %node, held, "handed out again the tasks a node's previous process held");
    Ok(())
}

/// Moves work off nodes that are offline or have left, once every heartbeat interval.
///
/// A lost node's work sits in its own consumer on `APIARY_DISPATCH`: tasks it never received,
/// and tasks it received but never finished, which JetStream hands out again once their ack
/// wait runs out (no more progress acks come from a dead agent). Every replica pulls from that
/// consumer as the agent would, and places what it gets on another node with the next
/// attempt number. Replicas share the consumer, so each task moves once. A node that comes
/// back is simply online again and keeps whatever is still queued for it.
pub(crate) async fn recover_lost_work(
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let stream = shared
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?;
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connects = shared.client.statistics().connects.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        tidy_outstanding(&shared, &mut connects);
        let lost = shared.view().nodes_to_recover(now_ms());
        // A few nodes at a time: after a rack loses power, hundreds of nodes are lost at
        // once, and looking at them one after another would take many rounds.
        let round = futures::stream::iter(lost).for_each_concurrent(RECOVERY_CONCURRENCY, |node| {
            let shared = &shared;
            let stream = &stream;
            async move {
                // Bounded, so that one lost reply (a server restart mid-fetch) cannot
                // stall recovery for every other node.
                let recovered =
                    tokio::time::timeout(RECOVERY_TIMEOUT, recover_node(shared, stream, &node))
                        .await;
                let error = match recovered {
                    Ok(Ok(Drained::Yes)) => {
                        shared.update(|view| view.mark_drained(&node, now_ms()));
                        return;
                    }
                    Ok(Ok(Drained::No)) => return,
                    Ok(Err(err)) => format!("{err:#}"),
                    Err(_) => format!("no answer within {RECOVERY_TIMEOUT:?}"),
                };
                tracing::warn!(node_id = %node, error, "failed to recover work from a lost node");
            }
        });
        // Forgetting comes after the round, which marks the nodes it found drained. A
        // stopping replica leaves a round half done: what it fetched and did not move goes
        // back to the node's consumer after the ack wait, and another replica moves it.
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            () = async {
                round.await;
                forget::forget_gone_nodes(&shared, &stream).await;
            } => {}
        }
    }
}

/// Whether a recovery round found the node's queue empty, nothing queued and nothing held.
enum Drained {
    Yes,
    No,
}

/// Keeps the view's count of this replica's unfinished dispatches honest, once a tick: work
/// on lost nodes is recovery's now; entries past their expiry go; and after a reconnect,
/// when results may have been stored while this replica could not see them, every entry
/// goes. Forgetting too much lets a node be given a little more than its backlog for a
/// moment; remembering too much would keep it idle.
fn tidy_outstanding(shared: &Shared, connects: &mut u64) {
    let now = now_ms();
    let reconnected = {
        let current = shared.client.statistics().connects.load(Ordering::Relaxed);
        std::mem::replace(connects, current) != current
    };
    let forgotten = shared.update(|view| {
        let mut forgotten = view.expire(now);
        if reconnected {
            forgotten += view.forget_outstanding(None);
        }
        for node in view.lost_nodes(now) {
            forgotten += view.forget_outstanding(Some(&node));
        }
        forgotten
    });
    if forgotten > 0 {
        tracing::debug!(forgotten, reconnected, "forgot unfinished dispatches");
    }
}

/// How many lost nodes one replica looks at at once.
const RECOVERY_CONCURRENCY: usize = 16;
/// How many of a lost node's tasks one replica moves per round.
const RECOVERY_BATCH: usize = 64;
/// The longest one node's recovery round may take.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);

async fn recover_node(
    shared: &Shared,
    stream: &jetstream::stream::Stream,
    node: &NodeId,
) -> anyhow::Result<Drained> {
    // Created if missing: a node that registered but died before making its consumer may
    // still have had work placed on it.
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &topology::node_dispatch_consumer_name(node),
            topology::node_dispatch_consumer(node, 1),
        )
        .await
        .context("failed to open the node's dispatch consumer")?;
    let info = consumer
        .info()
        .await
        .context("failed to read the node's consumer")?;
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        return Ok(Drained::Yes);
    }
    let mut batch = consumer
        .fetch()
        .max_messages(RECOVERY_BATCH)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .context("failed to fetch the node's queued work")?;
    // Past this, what the fetch still brings goes straight back, so that the round ends
    // within its bound without leaving fetched messages to wait out the ack wait.
    let hand_back_after = tokio::time::Instant::now() + RECOVERY_TIMEOUT / 2;
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) if tokio::time::Instant::now() > hand_back_after => {
                message.ack_with(AckKind::Nak(None)).await.ok();
            }
            Ok(message) => move_dispatch(shared, node, message).await,
            Err(err) => {
                tracing::warn!(error = %err, "error while fetching a lost node's work");
                break;
            }
        }
    }
    Ok(Drained::No)
}

/// Moves one task off a lost or drained node, if the dispatch is still the task's current
/// attempt (a stale one, of a task that has ended or moved on, is dropped):
///
/// - from a lost node, the attempt has failed: a `node_lost` result is stored for it and
///   settled like any result, so the task is retried (a system failure) or, after its last
///   attempt, dead;
/// - from a node an operator drains or removed, the task goes back to the queue for a new
///   attempt that costs it nothing.
async fn move_dispatch(shared: &Shared, lost: &NodeId, message: jetstream::Message) {
    let Some(dispatch) = inbound::decode_or_terminate::<Dispatch>(&message, "dispatch").await
    else {
        return;
    };
    let span = tracing::info_span!(
        "task",
        task_id = %dispatch.task.id,
        attempt = dispatch.attempt,
        lost_node = %lost,
    );
    async {
        // The node may have come back between the look at the view and now (one late
        // heartbeat, an uncordon after a drain): then its work stays with it.
        let Some(handover) = shared.view().handover(lost, now_ms()) else {
            message.ack_with(AckKind::Nak(None)).await.ok();
            return;
        };
        match move_attempt(shared, lost, &dispatch, handover).await {
            Ok(()) => {
                if let Err(err) = message.double_ack().await {
                    tracing::warn!(error = %err, "failed to acknowledge a moved task");
                }
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "failed to move a task; retrying");
                message
                    .ack_with(AckKind::Nak(Some(shared.config.heartbeat_interval)))
                    .await
                    .ok();
            }
        }
    }
    .instrument(span)
    .await
}

async fn move_attempt(
    shared: &Shared,
    lost: &NodeId,
    dispatch: &Dispatch,
    handover: Handover,
) -> anyhow::Result<()> {
    for _ in 0..CAS_TRIES {
        let Some(live) = shared.records.live(&dispatch.task.id).await? else {
            tracing::debug!("dropping the dispatch of a task that has ended");
            return Ok(());
        };
        if !live.record.holds(lost, dispatch.attempt) {
            tracing::debug!("dropping a dispatch of an attempt the task no longer holds");
            return Ok(());
        }
        match handover {
            Handover::Lost => {
                let result = node_lost_result(dispatch, lost);
                tracing::info!("the task's node was lost; its attempt failed");
                Counters::count(&shared.counters.tasks_lost);
                // Its own message id: should the lost node finish after all (it was only
                // cut off), its real result for this attempt is stored too, and settled as
                // a late result of an attempt the task no longer holds.
                let msg_id = result.node_lost_msg_id();
                let subject = subject::node(lost, NodeVerb::Result);
                stored::publish(&shared.js, subject, &result.task_id, &msg_id, &result).await?;
                return Ok(());
            }
            Handover::Operator => {
                let moved = live.record.moved(lost, dispatch.attempt, now_ms())?;
                match shared.records.write(&moved, Some(live.revision)).await {
                    Ok(_) => {}
                    Err(WriteError::Conflict) => {
                        contention_pause().await;
                        continue;
                    }
                    Err(WriteError::Failed(err)) => return Err(err),
                }
                tracing::info!("moving a task off a node an operator drains");
                settle::requeue(shared, &moved).await?;
                Counters::count(&shared.counters.tasks_moved);
                return Ok(());
            }
        }
    }
    anyhow::bail!("the task's record kept changing")
}

/// The result of an attempt whose node was lost before it finished. Stored on the lost
/// node's result subject and settled like any other result.
fn node_lost_result(dispatch: &Dispatch, lost: &NodeId) -> TaskResult {
    let now = now_ms();
    TaskResult {
        task_id: dispatch.task.id.clone(),
        node_id: lost.clone(),
        attempt: dispatch.attempt,
        outcome: Outcome::Failed {
            error: TaskError::new(
                TaskErrorKind::NodeLost,
                format!(
                    "node {lost} was lost while it held attempt {} of the task",
                    dispatch.attempt
                ),
            ),
            stderr: Default::default(),
        },
        started_at_ms: now,
        finished_at_ms: now,
        reply_to: dispatch.task.reply_to.clone(),
        stdout_object: None,
        usage: None,
    }
}
