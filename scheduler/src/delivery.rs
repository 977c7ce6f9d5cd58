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
use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::pull::{PULL_BATCH, PULL_RETRY, Pulled, next_batch, next_pulled, open_consumer};
use crate::records::WriteError;
use crate::settle::{self, Delivery};
use crate::{Counters, Shared, contention_pause};

/// Settles each stored result, then acknowledges it. The result stays in `APIARY_RESULTS`
/// (by age and size limits) for readers that missed it, and the task's record points at it.
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
    loop {
        let mut batch = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            batch = next_batch(&consumer, PULL_BATCH) => match batch {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::warn!(error = %err, "failed to pull results; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(PULL_RETRY) => continue,
                    }
                }
            },
        };
        loop {
            match next_pulled(&mut batch, &stop, "results").await {
                Pulled::Message(message) => deliver_result(&shared, message).await,
                Pulled::BatchDone => break,
                Pulled::Stopped => return Ok(()),
            }
        }
    }
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
        match settle_result(shared, &message, &result, sequence).await {
            Ok(()) => {
                if let Err(err) = message.ack().await {
                    tracing::warn!(error = %err, "failed to acknowledge a settled result");
                }
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "failed to settle a result; retrying");
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

async fn settle_result(
    shared: &Shared,
    message: &jetstream::Message,
    result: &TaskResult,
    sequence: u64,
) -> anyhow::Result<()> {
    let delivery = || Delivery::stored(message.headers.as_ref(), message.payload.clone());
    for _ in 0..CAS_TRIES {
        let Some(live) = shared.records.live(&result.task_id).await? else {
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
