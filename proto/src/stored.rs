//! Publishing the task path's JetStream messages, one way for every component.
//!
//! Each task message (submission, dispatch, result) is MessagePack, names its task in the
//! `Apiary-Task-Id` header and carries a `Nats-Msg-Id`, so that JetStream stores a re-sent
//! copy once. [`publish`] returns only when JetStream has stored it.

use async_nats::jetstream;
use serde::Serialize;

use crate::codec::{self, CodecError, Encoding};
use crate::headers;
use crate::id::{NodeId, TaskId};
use crate::message::{Dispatch, TaskResult, TaskSubmission};
use crate::subject::{self, NodeVerb, Subject};

/// A task message JetStream did not store. The connection's own error is the
/// [`source`](std::error::Error::source); it is in the message too, because most callers log
/// the message alone.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The message did not reach the server (too large, no connection).
    #[error("failed to publish to {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    /// The server did not acknowledge it as stored.
    #[error("JetStream did not store the message on {subject}: {source}")]
    NotStored {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    /// A result's large output could not be put in the result object store.
    #[error("failed to keep {name} in the object store: {source}")]
    Object {
        name: String,
        #[source]
        source: jetstream::object_store::PutError,
    },
}

/// What JetStream said about a stored message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    /// True when a message with the same `Nats-Msg-Id` was already stored, inside the
    /// stream's duplicate window: this copy was dropped.
    pub duplicate: bool,
}

/// Publishes `value` on `subject` with the task headers and waits until it is stored.
pub async fn publish<T: Serialize>(
    js: &jetstream::Context,
    subject: Subject,
    task: &TaskId,
    msg_id: &str,
    value: &T,
) -> Result<Stored, PublishError> {
    send(js, subject, task, msg_id, value).await?.stored().await
}

/// A task message handed to the connection, whose ack from JetStream is still to come.
#[derive(Debug)]
#[must_use = "a sent message is not stored until its ack says so"]
pub struct Sent {
    subject: String,
    ack: jetstream::context::PublishAckFuture,
}

impl Sent {
    /// Waits until JetStream has stored the message.
    pub async fn stored(self) -> Result<Stored, PublishError> {
        let ack = self.ack.await.map_err(|source| PublishError::NotStored {
            subject: self.subject,
            source,
        })?;
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

/// Publishes `value` on `subject` with the task headers, without waiting for it to be
/// stored: [`Sent::stored`] does.
pub async fn send<T: Serialize>(
    js: &jetstream::Context,
    subject: Subject,
    task: &TaskId,
    msg_id: &str,
    value: &T,
) -> Result<Sent, PublishError> {
    let payload = codec::encode(value)?;
    let mut headers = Encoding::MsgPack.headers();
    headers.insert(headers::MSG_ID, msg_id);
    headers.insert(headers::TASK_ID, task.as_str());
    let name = subject.as_str().to_owned();
    let ack = js
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(|source| PublishError::Publish {
            subject: name.clone(),
            source,
        })?;
    Ok(Sent { subject: name, ack })
}

/// Submits a task to `APIARY_TASKS`, to the queue of its priority, de-duplicated by its id.
pub async fn submission(
    js: &jetstream::Context,
    task: &TaskSubmission,
) -> Result<Stored, PublishError> {
    publish(
        js,
        subject::task_submit_for(task.priority),
        &task.id,
        task.id.as_str(),
        task,
    )
    .await
}

/// Places a task on `node` (`APIARY_DISPATCH`), de-duplicated by task and attempt.
pub async fn dispatch(
    js: &jetstream::Context,
    node: &NodeId,
    dispatch: &Dispatch,
) -> Result<Stored, PublishError> {
    publish(
        js,
        subject::node(node, NodeVerb::Dispatch),
        &dispatch.task.id,
        &dispatch.msg_id(),
        dispatch,
    )
    .await
}

/// Stores the outcome of an attempt on its node's result subject (`APIARY_RESULTS`),
/// de-duplicated by task and attempt.
pub async fn result(js: &jetstream::Context, result: &TaskResult) -> Result<Stored, PublishError> {
    send_result(js, result).await?.stored().await
}

/// [`result`], without waiting for it to be stored.
pub async fn send_result(
    js: &jetstream::Context,
    result: &TaskResult,
) -> Result<Sent, PublishError> {
    send(
        js,
        subject::node(&result.node_id, NodeVerb::Result),
        &result.task_id,
        &result.msg_id(),
        result,
    )
    .await
}
