//! Many tasks at once ([`Client::submit_batch`]).

use futures::{Stream, StreamExt as _};

use crate::{Client, ResultError, Task, TaskId, TaskOutput};

/// One task of a batch, once it has ended (or could not be submitted).
#[derive(Debug)]
pub struct BatchItem {
    /// The task's position in the batch, from 0.
    pub index: usize,
    /// The task's id, once it was submitted.
    pub id: Option<TaskId>,
    /// Its output, or why it has none.
    pub outcome: Result<TaskOutput, ResultError>,
}

impl Client {
    /// Submits `tasks`, keeping at most `in_flight` of them submitted and not yet ended,
    /// and yields each one's outcome as it ends (in the order they end, with its index).
    /// The next task is submitted only when one ends, so a long batch never floods the
    /// queue, and dropping the stream stops submitting (tasks already submitted run on).
    pub fn submit_batch<I>(
        &self,
        tasks: I,
        in_flight: usize,
    ) -> impl Stream<Item = BatchItem> + Send + use<I>
    where
        I: IntoIterator<Item = Task>,
        I::IntoIter: Send,
    {
        let client = self.clone();
        futures::stream::iter(tasks.into_iter().enumerate())
            .map(move |(index, task)| {
                let client = client.clone();
                async move {
                    let handle = match client.submit(task).await {
                        Ok(handle) => handle,
                        Err(err) => {
                            return BatchItem {
                                index,
                                id: None,
                                outcome: Err(ResultError::from(err)),
                            };
                        }
                    };
                    let id = handle.id().clone();
                    BatchItem {
                        index,
                        id: Some(id),
                        outcome: handle.result().await,
                    }
                }
            })
            .buffer_unordered(in_flight.max(1))
    }
}
