//! Result delivery: each stored result goes to its submitter's reply subject, then is
//! acknowledged. Replicas share the consumer, so each result is delivered by one of them.

use std::sync::Arc;
use std::time::Duration;

use apiary_proto::codec::Encoding;
use apiary_proto::message::TaskResult;
use apiary_proto::{inbound, subject, topology};
use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::pull::{PULL_BATCH, PULL_RETRY, Pulled, next_batch, next_pulled, open_consumer};
use crate::{Counters, Shared};

/// Delivers each stored result to the submitter's reply subject, then acknowledges it. The
/// result stays in `APIARY_RESULTS` (by age and size limits) for readers that missed it.
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

async fn deliver_result(shared: &Shared, message: jetstream::Message) {
    let Some(result) = inbound::decode_or_terminate::<TaskResult>(&message, "result").await else {
        return;
    };
    let span = tracing::info_span!("task", task_id = %result.task_id, node_id = %result.node_id);
    async {
        match &result.reply_to {
            Some(reply_to)
                if subject::is_allowed_reply_subject(
                    reply_to,
                    &shared.config.reply_subject_prefixes,
                ) =>
            {
                let headers = message
                    .headers
                    .clone()
                    .unwrap_or_else(|| Encoding::MsgPack.headers());
                if let Err(err) = shared
                    .client
                    .publish_with_headers(reply_to.clone(), headers, message.payload.clone())
                    .await
                {
                    tracing::warn!(error = %err, "failed to deliver a result; retrying");
                    message
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await
                        .ok();
                    return;
                }
                Counters::count(&shared.counters.results_delivered);
                tracing::debug!("result delivered");
            }
            Some(reply_to) => {
                tracing::warn!(reply_to, "not delivering a result to a forbidden subject");
            }
            None => tracing::debug!("result has no reply subject; kept in the stream only"),
        }
        if let Err(err) = message.ack().await {
            tracing::warn!(error = %err, "failed to acknowledge a delivered result");
        }
    }
    .instrument(span)
    .await
}
