//! What the pulling jobs (intake, delivery) share: durable consumers, batches, and handing a
//! batch back when the replica stops.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// Most submitted tasks one round of pulls asks for; smaller when fewer permits are free.
pub(crate) const PULL_BATCH: usize = 64;
/// How long one pull request waits for messages before the next is sent; also how long a
/// stopping replica keeps reading its last one.
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long past its expiry a pull request is still read. A request dies with the server
/// that held it (a restart), and nothing then ends it; the client library would give up
/// only five seconds after its expiry, stalling the replica that long after every restart.
const PULL_GRACE: Duration = Duration::from_millis(500);
/// The pause after a failed pull (the server is restarting, say).
pub(crate) const PULL_RETRY: Duration = Duration::from_millis(500);

/// Opens a durable pull consumer on `stream`, creating it or bringing its configuration up
/// to date: the consumers are apiary's own, and every replica declares the same one.
pub(crate) async fn open_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: jetstream::consumer::pull::Config,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let name = config.durable_name.clone().unwrap_or_default();
    js.get_stream(stream)
        .await
        .with_context(|| format!("failed to open stream {stream}"))?
        .create_consumer(config)
        .await
        .with_context(|| format!("failed to open consumer {name} on {stream}"))
}

/// One pull request: the messages it brings, and when it is given up on.
pub(crate) struct Pull {
    batch: jetstream::consumer::pull::Batch,
    give_up_at: tokio::time::Instant,
}

/// Asks for up to `size` messages. The server holds the request until it is full or expires
/// ([`PULL_EXPIRES`]); the batch yields messages as they arrive.
pub(crate) async fn next_batch(
    consumer: &jetstream::consumer::PullConsumer,
    size: usize,
) -> Result<Pull, async_nats::Error> {
    next_batch_within(consumer, size, PULL_EXPIRES).await
}

/// [`next_batch`] with a request that expires after `expires`.
pub(crate) async fn next_batch_within(
    consumer: &jetstream::consumer::PullConsumer,
    size: usize,
    expires: Duration,
) -> Result<Pull, async_nats::Error> {
    let give_up_at = tokio::time::Instant::now() + expires + PULL_GRACE;
    let batch = consumer
        .batch()
        .max_messages(size)
        .expires(expires)
        .messages()
        .await?;
    Ok(Pull { batch, give_up_at })
}

/// Asks for up to `size` messages that the consumer has now. The server answers at once,
/// with what it has (perhaps nothing), and ends the request, so no request stays open to
/// take messages for a replica that has moved on to another queue.
pub(crate) async fn fetch_now(
    consumer: &jetstream::consumer::PullConsumer,
    size: usize,
) -> Result<Pull, async_nats::Error> {
    // The answer takes a round trip; a request that has none by the time a waiting one
    // would have expired died with its server.
    let give_up_at = tokio::time::Instant::now() + PULL_EXPIRES;
    let batch = consumer.fetch().max_messages(size).messages().await?;
    Ok(Pull { batch, give_up_at })
}

/// Reads a batch to its end when the replica stops, handing back whatever still arrives.
/// The server holds a pull request until it expires; without this, a message it sends to a
/// replica that has stopped listening would sit out the whole ack wait before anyone else
/// could take it.
async fn hand_back(pull: &mut Pull) {
    let drained = tokio::time::timeout_at(pull.give_up_at, async {
        while let Some(Ok(message)) = pull.batch.next().await {
            message.ack_with(AckKind::Nak(None)).await.ok();
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!("a pull request outlived its expiry while stopping");
    }
}

/// What reading the next message of a batch gave.
// Only ever a return value, moved once; boxing the message would cost an allocation per task.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pulled {
    Message(jetstream::Message),
    /// The batch is full, expired or failed; ask for the next one.
    BatchDone,
    /// The replica is stopping; the batch has been handed back.
    Stopped,
}

/// The next message of `pull`, unless the batch ends, outlives its expiry, or `stop` comes
/// first (then the batch is handed back before returning).
pub(crate) async fn next_pulled(pull: &mut Pull, stop: &CancellationToken, what: &str) -> Pulled {
    let message = tokio::select! {
        _ = stop.cancelled() => {
            hand_back(pull).await;
            return Pulled::Stopped;
        }
        message = tokio::time::timeout_at(pull.give_up_at, pull.batch.next()) => message,
    };
    let Ok(message) = message else {
        tracing::debug!(
            "a pull request for {what} outlived its expiry; the server may have restarted"
        );
        return Pulled::BatchDone;
    };
    match message {
        Some(Ok(message)) => Pulled::Message(message),
        Some(Err(err)) => {
            tracing::warn!(error = %err, "error while pulling {what}");
            Pulled::BatchDone
        }
        None => Pulled::BatchDone,
    }
}
