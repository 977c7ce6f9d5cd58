//! The SDK's errors, one type per family of operations, shaped like async-nats's: a kind to
//! match on, a message, and the original cause as [`std::error::Error::source`]. Connecting
//! ([`ConnectError`](crate::ConnectError)), submitting ([`SubmitError`]), awaiting a result
//! ([`ResultError`]), asking the schedulers ([`RequestError`]: nodes, tokens, settings, tasks
//! by id, dead letters), the app store ([`KvError`](crate::KvError)), messaging
//! ([`PubSubError`](crate::PubSubError)) and the module store
//! ([`ModuleError`](crate::ModuleError)).

use apiary_proto::message::{ErrorCode, TaskError, TaskErrorKind};
use apiary_proto::rpc;
use apiary_proto::{NodeId, TaskId};
use bytes::Bytes;

/// Submitting a task ([`Client::submit`](crate::Client::submit),
/// [`Client::upload_module`](crate::Client::upload_module)).
pub type SubmitError = OpError<SubmitErrorKind>;

/// What went wrong submitting a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubmitErrorKind {
    /// The cluster's streams and buckets could not be reached or set up.
    Setup,
    /// The module could not be put in the module store (the source is the
    /// [`ModuleError`](crate::ModuleError)).
    Module,
    /// JetStream did not store the submission (it is larger than the server takes, the
    /// stream is full, the connection failed): the task will not run.
    NotStored,
}

/// Asking a scheduler replica (nodes, tokens, cluster settings, tasks by id, dead letters),
/// or watching task records.
pub type RequestError = OpError<RequestErrorKind>;

/// What went wrong asking a scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestErrorKind {
    /// No scheduler replica listens: is `apiary-scheduler` running?
    NoResponders,
    /// No answer came in time.
    TimedOut,
    /// The scheduler answered with a refusal, and this is its code: `NotFound` for a task or
    /// node it does not know, `BadRequest` for a request it cannot take, and so on. The
    /// error's message is the scheduler's.
    Refused(ErrorCode),
    /// The answer, or a watched record, could not be read.
    InvalidReply,
    /// The connection failed the request, or the client that made the handle is gone.
    Transport,
}

impl From<rpc::RequestError> for RequestError {
    fn from(err: rpc::RequestError) -> Self {
        let message = err.to_string();
        match err {
            rpc::RequestError::NoResponders { .. } => {
                OpError::new(RequestErrorKind::NoResponders, message)
            }
            rpc::RequestError::TimedOut { .. } => OpError::new(RequestErrorKind::TimedOut, message),
            rpc::RequestError::Refused(body) => {
                OpError::new(RequestErrorKind::Refused(body.code), body.message.clone())
            }
            rpc::RequestError::Codec(codec) => OpError::with_source(
                RequestErrorKind::InvalidReply,
                "failed to read the scheduler's answer",
                codec,
            ),
            rpc::RequestError::Transport { .. } | rpc::RequestError::Signing { .. } => {
                OpError::new(RequestErrorKind::Transport, message)
            }
        }
    }
}

/// Awaiting a task's result ([`TaskHandle::result`](crate::TaskHandle::result) and its
/// siblings, [`Client::result_stdout`](crate::Client::result_stdout), a batch's outcomes).
/// A task that could not run carries its [`TaskFailure`].
#[derive(Debug)]
pub struct ResultError {
    error: OpError<ResultErrorKind>,
    failure: Option<Box<TaskFailure>>,
}

/// What went wrong awaiting a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResultErrorKind {
    /// The task ran (or tried to) and failed: see [`ResultError::task_failure`].
    TaskFailed,
    /// No result came within the time the caller gave. The task itself goes on.
    TimedOut,
    /// The client stopped (it was dropped, its connection machinery ended) before the result
    /// came.
    Disconnected,
    /// Asking the schedulers about the task failed (the source is the [`RequestError`]).
    Lookup,
    /// The task's output, too large for a message, could not be fetched from the result
    /// object store, or did not match its digest.
    Output,
    /// The task was never submitted (in a batch, or a submit chained with `?`; the source
    /// is the [`SubmitError`]).
    NotSubmitted,
}

impl ResultError {
    pub(crate) fn new(kind: ResultErrorKind, message: impl Into<String>) -> Self {
        Self {
            error: OpError::new(kind, message),
            failure: None,
        }
    }

    pub(crate) fn with_source(
        kind: ResultErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            error: OpError::with_source(kind, message, source),
            failure: None,
        }
    }

    pub(crate) fn failed(failure: TaskFailure) -> Self {
        Self {
            error: OpError::new(ResultErrorKind::TaskFailed, failure.to_string()),
            failure: Some(Box::new(failure)),
        }
    }

    pub(crate) fn disconnected() -> Self {
        Self::new(
            ResultErrorKind::Disconnected,
            "the client stopped before the result arrived",
        )
    }

    /// What went wrong, to match on.
    pub fn kind(&self) -> ResultErrorKind {
        self.error.kind()
    }

    /// The task's failure, when the task ran (or tried to) and failed.
    pub fn task_failure(&self) -> Option<&TaskFailure> {
        self.failure.as_deref()
    }

    /// The task failure's kind (`trap`, `timeout`, `cancelled`, …), when the task failed.
    pub fn task_error_kind(&self) -> Option<TaskErrorKind> {
        self.failure.as_ref().map(|failure| failure.error.kind)
    }
}

impl std::fmt::Display for ResultError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ResultError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<RequestError> for ResultError {
    fn from(err: RequestError) -> Self {
        Self::with_source(
            ResultErrorKind::Lookup,
            "failed to ask the schedulers about the task",
            err,
        )
    }
}

/// So that submitting and awaiting chain with `?`: the task was never submitted.
impl From<SubmitError> for ResultError {
    fn from(err: SubmitError) -> Self {
        Self::with_source(
            ResultErrorKind::NotSubmitted,
            "failed to submit the task",
            err,
        )
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
    /// What the run used, as its node measured it; absent when no node ran it (a lost
    /// node's result) or from agents older than the figures.
    pub usage: Option<apiary_proto::message::RunUsage>,
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use apiary_proto::message::ErrorBody;

    use super::*;

    #[test]
    fn a_refusal_keeps_the_schedulers_code_and_message() {
        let err = RequestError::from(rpc::RequestError::Refused(ErrorBody::new(
            ErrorCode::NotFound,
            "no task order-42",
        )));
        assert_eq!(err.kind(), RequestErrorKind::Refused(ErrorCode::NotFound));
        assert_eq!(err.to_string(), "no task order-42");
    }

    #[test]
    fn nobody_answering_names_the_missing_service() {
        let err = RequestError::from(rpc::RequestError::NoResponders {
            subject: apiary_proto::subject::nodes_list().to_string(),
        });
        assert_eq!(err.kind(), RequestErrorKind::NoResponders);
        assert!(err.to_string().contains("apiary-scheduler"), "{err}");
    }

    #[test]
    fn a_failed_task_is_matchable_by_its_kind_and_carries_its_failure() {
        let failure = TaskFailure {
            task_id: TaskId::new("t-1").expect("id"),
            node_id: NodeId::new("node-a").expect("id"),
            attempt: 2,
            error: TaskError::new(TaskErrorKind::Trap, "unreachable"),
            stderr: Bytes::from_static(b"boom"),
            usage: None,
        };
        let err = ResultError::failed(failure.clone());
        assert_eq!(err.kind(), ResultErrorKind::TaskFailed);
        assert_eq!(err.task_error_kind(), Some(TaskErrorKind::Trap));
        assert_eq!(err.task_failure(), Some(&failure));
        assert!(err.source().is_none());
    }

    #[test]
    fn a_submit_that_failed_is_the_source_of_the_result_error() {
        let submit = SubmitError::new(SubmitErrorKind::NotStored, "failed to submit the task");
        let err = ResultError::from(submit);
        assert_eq!(err.kind(), ResultErrorKind::NotSubmitted);
        assert!(err.task_failure().is_none());
        let source = err
            .source()
            .and_then(|source| source.downcast_ref::<SubmitError>())
            .expect("the submit error as the source");
        assert_eq!(source.kind(), SubmitErrorKind::NotStored);
    }
}
