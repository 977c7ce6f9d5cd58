//! The SDK's errors: one enum to match on, with the task's own failure as a variant.

use std::time::Duration;

use apiary_proto::message::TaskError;
use apiary_proto::rpc::RequestError;
use apiary_proto::topology::TopologyError;
use apiary_proto::{CodecError, NodeId, TaskId};
use bytes::Bytes;

/// Everything that can go wrong between the SDK and the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster's streams and buckets could not be reached or set up.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The module could not be put in the module store.
    #[error("failed to upload the module: {0}")]
    ModuleUpload(String),
    /// The submission was not stored.
    #[error("failed to submit the task: {0}")]
    Publish(String),
    /// The connection failed an operation.
    #[error("NATS error: {0}")]
    Transport(String),
    /// A request to the scheduler failed or was refused.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The task ran (or tried to) and failed; see [`TaskFailure::error`]'s `kind`.
    #[error(transparent)]
    TaskFailed(Box<TaskFailure>),
    /// No result came within the time the caller gave.
    #[error("no result for task {task_id} within {limit:?}")]
    TimedOut {
        /// The task.
        task_id: TaskId,
        /// How long the caller waited.
        limit: Duration,
    },
    /// The client's connection machinery stopped before the result came.
    #[error("the client stopped before the result arrived")]
    Disconnected,
}

impl Error {
    /// The task failure's kind, if this is a task failure.
    pub fn task_error_kind(&self) -> Option<apiary_proto::message::TaskErrorKind> {
        match self {
            Error::TaskFailed(failure) => Some(failure.error.kind),
            _ => None,
        }
    }
}

/// A task that could not run to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {task_id} failed on node {node_id}: {error}")]
pub struct TaskFailure {
    /// The task.
    pub task_id: TaskId,
    /// The node of the attempt that failed last.
    pub node_id: NodeId,
    /// Which attempt that was.
    pub attempt: u32,
    /// What went wrong, with its typed kind.
    pub error: TaskError,
    /// What the module wrote to stderr before it failed.
    pub stderr: Bytes,
}

/// An error of one family of operations (the app store's, messaging's), shaped like
/// async-nats's errors: a kind to match on, a message, and the original cause as
/// [`std::error::Error::source`].
pub struct OpError<K> {
    kind: K,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl<K: Copy> OpError<K> {
    pub(crate) fn new(kind: K, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(
        kind: K,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// What went wrong, to match on.
    pub fn kind(&self) -> K {
        self.kind
    }
}

impl<K: std::fmt::Debug> std::fmt::Debug for OpError<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

/// The message only: the cause is [`std::error::Error::source`], which reports that walk
/// the chain (`anyhow`'s `{:#}`) print after it, so printing it here too would say it twice.
impl<K> std::fmt::Display for OpError<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl<K: std::fmt::Debug> std::error::Error for OpError<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}
