//! Reading the task path's JetStream messages, one way for every component: a message that
//! cannot be decoded can never succeed, so it is terminated (never redelivered) and logged
//! with its stream sequence, for an operator to find with `nats stream get`.

use async_nats::jetstream::{self, AckKind};
use serde::de::DeserializeOwned;

use crate::codec;

/// Decodes `message` as a `T` (MessagePack or JSON), or terminates it with the reason in the
/// log and returns `None`. `what` names the message in the log ("task submission", …).
pub async fn decode_or_terminate<T: DeserializeOwned>(
    message: &jetstream::Message,
    what: &str,
) -> Option<T> {
    match codec::decode_message::<T>(message.headers.as_ref(), &message.payload) {
        Ok((value, _)) => Some(value),
        Err(err) => {
            terminate(message, what, &err.to_string()).await;
            None
        }
    }
}

/// Terminates a message that can never be handled, with the reason in the log.
pub async fn terminate(message: &jetstream::Message, what: &str, reason: &str) {
    let sequence = message.info().map(|info| info.stream_sequence).ok();
    tracing::error!(?sequence, reason, "dropping an invalid {what}");
    if let Err(err) = message.ack_with(AckKind::Term).await {
        tracing::warn!(?sequence, error = %err, "failed to terminate an invalid {what}");
    }
}
