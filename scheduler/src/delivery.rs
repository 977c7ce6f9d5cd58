//! Results: each stored result is settled against its task's record (the attempt's owner
//! ends the task or has it retried; a late result of a superseded attempt is discarded and
//! counted), what follows is carried out ([`crate::settle`]), and only then is the result
//! acknowledged. Replicas share the consumer, so each result is settled by one of them, and
//! the record's compare-and-set decides should two race.

use std::sync::Arc;
use std::time::Duration;

use apiary_proto::lifecycle::Settlement;
use apiary_proto::message::TaskResult;
use apiary_proto::{inbound, now_ms, topology};
use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::pull::{PULL_BATCH, PULL_RETRY, Pulled, next_batch, next_pulled, open_consumer};
use crate::records::WriteError;
use crate::settle::{self, Delivery};
use crate::{Counters, Shared, contention_pause};
use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How many results one replica settles at once. Each takes a few round trips to the
/// server (the record's read and write, the archive); settled one after another they would
/// cap a replica at a few thousand results a second.
const SETTLING: usize = 128;

/// Settles each stored result, then acknowledges it. The result stays in `APIARY_RESULTS`
/// (by age and size limits) for readers that missed it, and the task's record points at it.
///
/// Results are pulled only as far as there are free places to settle them, so a result this
/// replica has taken is always being worked on, never waiting in a buffer while its ack wait
/// runs out.
pub(crate) async fn deliver_results(
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let consumer = open_consumer(
        &shared.js,
        topology::RESULTS_STREAM,
        topology::scheduler_results_consumer(),
    )
    .await?;
    let permits = Arc::new(Semaphore::new(SETTLING));
    let mut settling = JoinSet::new();
    'pulling: loop {
        while settling.try_join_next().is_some() {}
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.context("the permit pool closed")?,
        };
        let mut held = vec![first];
        while held.len() < PULL_BATCH {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => held.push(permit),
                Err(_) => break,
            }
        }
        let mut batch = tokio::select! {
            _ = stop.cancelled() => break,
            batch = next_batch(&consumer, held.len()) => match batch {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::warn!(error = %err, "failed to pull results; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(PULL_RETRY) => continue,
                    }
                }
            },
        };
        loop {
            let message = match next_pulled(&mut batch, &stop, "results").await {
                Pulled::Message(message) => message,
                Pulled::BatchDone => break,
                Pulled::Stopped => break 'pulling,
            };
            let Some(permit) = held.pop() else { break };
            let shared = shared.clone();
            settling.spawn(
                async move {
                    deliver_result(&shared, message).await;
                    drop(permit);
                }
                .in_current_span(),
            );
        }
    }
    // Settlements under way finish (each a few round trips); give them a moment, so that
    // none leaves its result to wait out the ack wait.
    let finished = tokio::time::timeout(Duration::from_secs(2), async {
        while settling.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        settling.abort_all();
    }
    Ok(())
}

/// How often a replica tries a record write that keeps colliding with others before it
/// leaves the message to come back.
pub(crate) const CAS_TRIES: usize = 5;

/// Settles one stored result against its task's record: the attempt's owner ends the task
/// (or has it retried); anything else is a late result of a superseded attempt, discarded
/// and counted. Acknowledged once what follows is done.
async fn deliver_result(shared: &Shared, message: jetstream::Message) {
    let Some(result) = inbound::decode_or_terminate::<TaskResult>(&message, "result").await else {
        return;
    };
    let Ok(info) = message.info() else {
        return;
    };
    let sequence = info.stream_sequence;
    let span = tracing::info_span!(
        "task",
        task_id = %result.task_id,
        attempt = result.attempt,
        node_id = %result.node_id,
    );
    async {
        let settled = settle_result(shared, &message, &result, sequence)
            .await
            .map_err(|err| format!("{err:#}"));
        inbound::ack_or_retry(&message, settled, "a result").await;
    }
    .instrument(span)
    .await
}

async fn settle_result(
    shared: &Shared,
    message: &jetstream::Message,
    result: &TaskResult,
    sequence: u64,
) -> anyhow::Result<()> {
    let delivery = || Delivery::stored(message.headers.as_ref(), message.payload.clone());
    // The first try may start from the record as this replica last wrote it (no read);
    // anything but a write that succeeds is decided again from the bucket.
    let mut remembered = true;
    for _ in 0..CAS_TRIES {
        let live = if std::mem::take(&mut remembered) {
            shared.records.live_or_remembered(&result.task_id).await?
        } else {
            shared.records.live(&result.task_id).await?
        };
        let Some(live) = live else {
            // The task has ended (or never had a record: a result published by hand).
            discard(shared, "the task has already ended");
            return Ok(());
        };
        let settlement = live.record.settle(
            result,
            sequence,
            &shared.policy(),
            fastrand::f64(),
            now_ms(),
        );
        match settlement {
            Settlement::Superseded | Settlement::Repeat { .. }
                if shared.records.forget_if_remembered(&result.task_id) =>
            {
                // Decided from memory, which may be stale: decide again from the bucket.
                continue;
            }
            Settlement::Superseded => {
                discard(shared, "the attempt is not the task's current one");
                return Ok(());
            }
            Settlement::Repeat { effect } => {
                return settle::carry_out(shared, &live.record, &effect, delivery()).await;
            }
            Settlement::Apply { record, effect } => {
                match shared.records.write(&record, Some(live.revision)).await {
                    Ok(_) => {
                        tracing::debug!(state = %record.state, "task settled");
                        return settle::carry_out(shared, &record, &effect, delivery()).await;
                    }
                    Err(WriteError::Conflict) => contention_pause().await,
                    Err(WriteError::Failed(err)) => return Err(err),
                }
            }
        }
    }
    anyhow::bail!("the task's record kept changing")
}

/// A result that changes nothing: counted, never delivered.
fn discard(shared: &Shared, why: &str) {
    Counters::count(&shared.counters.results_superseded);
    tracing::info!(why, "discarding a late result");
}
