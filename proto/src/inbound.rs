//! Reading the task path's JetStream messages, one way for every component: a message that
//! cannot be decoded can never succeed, so it is terminated (never redelivered) and logged
//! with its stream sequence, for an operator to find with `nats stream get`.

use std::time::Duration;

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

/// How long a message whose handling failed waits before it is read again.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// Acknowledges `message` once what it led to is done (`Ok`), or hands it back to be read
/// again after [`RETRY_AFTER_FAILURE`] (`Err`, logged). `what` names the message in the log
/// ("a submission", "a result"). A lost acknowledgement is logged only: the message comes
/// back, and whoever reads it finds its consequence already stored.
pub async fn ack_or_retry(
    message: &jetstream::Message,
    handled: Result<(), impl std::fmt::Display>,
    what: &str,
) {
    match handled {
        Ok(()) => {
            if let Err(err) = message.ack().await {
                tracing::warn!(error = %err, "failed to acknowledge {what}");
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "failed to handle {what}; retrying");
            message
                .ack_with(AckKind::Nak(Some(RETRY_AFTER_FAILURE)))
                .await
                .ok();
        }
    }
}
