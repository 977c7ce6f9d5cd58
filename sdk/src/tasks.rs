//! Tasks by id: status, watching, cancel, results of tasks submitted elsewhere, listing, and
//! the dead-letter stream. Every question goes to a scheduler replica
//! (`apiary.v1.tasks.<command>`, `apiary.v1.dlq.<command>`), which answers from the task's
//! record; watching reads the record bucket directly.

use std::time::Duration;

use apiary_proto::lifecycle::{TaskRecord, TaskState};
use apiary_proto::message::{
    DeadLetter, DlqListReply, DlqListRequest, TaskListReply, TaskListRequest, TaskRef, TaskResult,
    TaskResultReply, TaskResultRequest,
};
use apiary_proto::subject::{self, DlqCommand, TasksCommand};
use apiary_proto::{TaskId, codec, topology};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::{Stream, StreamExt as _};

use crate::{Client, RequestError, RequestErrorKind, ResultError, ResultErrorKind, TaskHandle};

/// How often a watch looks at the record by request too, in case a transition happened
/// between two reads of the bucket (a task that ends is taken out of it).
const WATCH_POLL: Duration = Duration::from_secs(2);

impl Client {
    /// A handle on a task submitted elsewhere (another client, the CLI, an earlier run of
    /// this program), to await its result, watch or cancel it.
    pub fn task(&self, id: TaskId) -> TaskHandle {
        TaskHandle::reattached(id, self.clone())
    }

    /// The record of task `id`: its state, attempt, node, reason and history.
    pub async fn task_status(&self, id: &TaskId) -> Result<TaskRecord, RequestError> {
        self.ask(
            subject::tasks_command(TasksCommand::Status),
            &TaskRef { id: id.clone() },
        )
        .await
    }

    /// Cancels task `id`: a pending task never runs, a running one is stopped on its node,
    /// and a task that has ended is left as it is. Returns the record after the cancel.
    pub async fn cancel_task(&self, id: &TaskId) -> Result<TaskRecord, RequestError> {
        self.ask(
            subject::tasks_command(TasksCommand::Cancel),
            &TaskRef { id: id.clone() },
        )
        .await
    }

    /// The record of task `id` and, once it has ended, the result that ended it.
    pub async fn task_result(&self, id: &TaskId) -> Result<TaskResultReply, RequestError> {
        self.ask(
            subject::tasks_command(TasksCommand::Result),
            &TaskResultRequest { id: id.clone() },
        )
        .await
    }

    /// Task records matching `filter`, a page at a time (`TaskListReply::next`).
    pub async fn list_tasks(
        &self,
        filter: &TaskListRequest,
    ) -> Result<TaskListReply, RequestError> {
        self.ask(subject::tasks_command(TasksCommand::List), filter)
            .await
    }

    /// Dead tasks, oldest first, a page at a time.
    pub async fn dead_letters(&self, page: &DlqListRequest) -> Result<DlqListReply, RequestError> {
        self.ask(subject::dlq_command(DlqCommand::List), page).await
    }

    /// One dead task's entry.
    pub async fn dead_letter(&self, id: &TaskId) -> Result<DeadLetter, RequestError> {
        self.ask(
            subject::dlq_command(DlqCommand::Show),
            &TaskRef { id: id.clone() },
        )
        .await
    }

    /// Puts a dead task back in the queue, under its id, with its failures forgotten.
    pub async fn requeue_dead(&self, id: &TaskId) -> Result<TaskRecord, RequestError> {
        self.ask(
            subject::dlq_command(DlqCommand::Requeue),
            &TaskRef { id: id.clone() },
        )
        .await
    }

    /// Every change of task `id`'s record, from its state now until it ends.
    pub fn watch_task(
        &self,
        id: TaskId,
    ) -> impl Stream<Item = Result<TaskRecord, RequestError>> + Send + use<> {
        let client = self.clone();
        async_stream::try_stream! {
            // The bucket is watched before the record is read, so no change between the two
            // is missed; what the watch repeats is skipped.
            let records = &client.topology().await.map_err(|err| watch_failed(&id, err))?.records;
            let mut changes = records
                .watch_with_history(topology::task_record_key(&id))
                .await
                .map_err(|err| watch_failed(&id, err))?;
            let first = client.task_status(&id).await?;
            let ended = first.state.is_terminal();
            let mut last = Some(progress(&first));
            yield first;
            if !ended {
                loop {
                    let next = tokio::time::timeout(WATCH_POLL, changes.next()).await;
                    let record = match next {
                        Ok(Some(Ok(entry))) if entry.operation == kv::Operation::Put => {
                            decode_record(&entry.value)?
                        }
                        Ok(Some(Ok(_))) => continue,
                        Ok(Some(Err(err))) => Err(watch_failed(&id, err))?,
                        // The watch ended, or nothing changed for a while: ask.
                        Ok(None) | Err(_) => client.task_status(&id).await?,
                    };
                    let step = progress(&record);
                    // The same record again, or one older than what was shown (the watch's
                    // first entry can predate the status read).
                    if last.is_some_and(|last| step == last || step.0 < last.0) {
                        continue;
                    }
                    last = Some(step);
                    let ended = record.state.is_terminal();
                    yield record;
                    if ended {
                        break;
                    }
                }
            }
        }
    }

    /// Waits until task `id` has ended, then returns its result: the stored one, or, for a
    /// task that ended without running to a result (cancelled, timed out in the queue), the
    /// record's account of it.
    pub(crate) async fn await_result(&self, id: &TaskId) -> Result<TaskResult, RequestError> {
        let mut changes = std::pin::pin!(self.watch_task(id.clone()));
        while let Some(record) = changes.next().await {
            if record?.state.is_terminal() {
                break;
            }
        }
        let reply = self.task_result(id).await?;
        Ok(reply
            .result
            .unwrap_or_else(|| reply.record.ended_without_result()))
    }
}

impl Client {
    /// Every transition of every live task from now on (the record bucket's changes), until
    /// the stream is dropped. Tasks leave the bucket when they end, after their final state
    /// has been seen here.
    pub async fn watch_tasks(
        &self,
    ) -> Result<impl Stream<Item = Result<TaskRecord, RequestError>> + Send + use<>, RequestError>
    {
        let records = &self.topology().await.map_err(watch_all_failed)?.records;
        let changes = records.watch_all().await.map_err(watch_all_failed)?;
        Ok(changes.filter_map(|entry| async move {
            match entry {
                Ok(entry) if entry.operation == kv::Operation::Put => {
                    Some(decode_record(&entry.value))
                }
                Ok(_) => None,
                Err(err) => Some(Err(watch_all_failed(err))),
            }
        }))
    }

    /// A result's stdout: the bytes it carries, or, for output too large for a message, the
    /// object it names in the result object store, checked against its digest.
    pub async fn result_stdout(
        &self,
        result: &TaskResult,
        inline: &[u8],
    ) -> Result<Bytes, ResultError> {
        let Some(object) = &result.stdout_object else {
            return Ok(Bytes::copy_from_slice(inline));
        };
        let name = &object.name;
        let topology = self
            .topology()
            .await
            .map_err(|err| output_failed(name, err))?;
        let mut reader = topology
            .result_objects
            .get(name)
            .await
            .map_err(|err| output_failed(name, err))?;
        let mut bytes = Vec::with_capacity(usize::try_from(object.size).unwrap_or(0));
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
            .await
            .map_err(|err| output_failed(name, err))?;
        let digest = apiary_proto::message::ModuleRef::for_bytes(&bytes).sha256;
        if digest != object.sha256 {
            return Err(ResultError::new(
                ResultErrorKind::Output,
                format!(
                    "the task's output {} does not match the digest in its result",
                    object.name
                ),
            ));
        }
        Ok(Bytes::from(bytes))
    }
}

/// What tells one record from the next in a watch: its history grows with every
/// transition (up to the record's limit), and its state and attempt change.
fn progress(record: &TaskRecord) -> (usize, u32, TaskState) {
    (record.history.len(), record.attempt, record.state)
}

/// A watch of task `id` that failed.
fn watch_failed(id: &TaskId, err: impl std::error::Error + Send + Sync + 'static) -> RequestError {
    RequestError::with_source(
        RequestErrorKind::Transport,
        format!("failed to watch task {id}"),
        err,
    )
}

/// A watch of every task that failed.
fn watch_all_failed(err: impl std::error::Error + Send + Sync + 'static) -> RequestError {
    RequestError::with_source(RequestErrorKind::Transport, "failed to watch tasks", err)
}

/// A large output, named `name` in the result object store, that could not be fetched.
fn output_failed(name: &str, err: impl std::error::Error + Send + Sync + 'static) -> ResultError {
    ResultError::with_source(
        ResultErrorKind::Output,
        format!("failed to fetch the task's output {name}"),
        err,
    )
}

/// A record read from the record bucket.
fn decode_record(value: &[u8]) -> Result<TaskRecord, RequestError> {
    codec::decode_message::<TaskRecord>(None, value)
        .map(|(record, _)| record)
        .map_err(|err| {
            RequestError::with_source(
                RequestErrorKind::InvalidReply,
                "failed to read a task record",
                err,
            )
        })
}
