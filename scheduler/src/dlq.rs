//! The dead-letter stream (`APIARY_DLQ`): listing, showing and requeueing dead tasks
//! (`apiary.v1.dlq.<command>`).

use std::sync::Arc;

use anyhow::Context as _;
use apiary_proto::lifecycle::{TaskRecord, msg_id};
use apiary_proto::message::{
    DeadLetter, DlqListReply, DlqListRequest, ErrorBody, ErrorCode, Reply, TaskRef,
};
use apiary_proto::{TaskId, codec, now_ms, subject, topology};
use async_nats::jetstream::consumer::DeliverPolicy;

use crate::records::{WriteError, names, scan};
use crate::tasks::internal;
use crate::{Shared, settle};

/// `apiary.v1.dlq.ls`: dead tasks, oldest first, a page at a time.
pub(crate) async fn list(shared: Arc<Shared>, request: DlqListRequest) -> Reply<DlqListReply> {
    let limit = request.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let deliver = match request.cursor {
        Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        None => DeliverPolicy::All,
    };
    let mut entries = Vec::new();
    let mut next = None;
    let scanned = scan(
        &shared.js,
        topology::DLQ_STREAM,
        subject::task_dead().to_string(),
        deliver,
        usize::MAX,
        |message| {
            let sequence = message.info().map_or(0, |info| info.stream_sequence);
            if entries.len() >= limit {
                next = Some(sequence);
                return false;
            }
            if let Some(entry) = decode(&message.payload, sequence) {
                entries.push(entry);
            }
            true
        },
    )
    .await;
    scanned
        .map(|_| DlqListReply { entries, next })
        .map_err(internal)
        .into()
}

/// `apiary.v1.dlq.show`: a dead task's entry, by task id.
pub(crate) async fn show(shared: Arc<Shared>, request: TaskRef) -> Reply<DeadLetter> {
    entry(&shared, &request.id).await.into()
}

/// `apiary.v1.dlq.requeue`: puts a dead task back in the queue of its priority with its
/// failures forgotten, under the same id, and takes it out of the dead-letter stream.
pub(crate) async fn requeue(shared: Arc<Shared>, request: TaskRef) -> Reply<TaskRecord> {
    let requeued = async {
        let entry = entry(&shared, &request.id).await?;
        let record = entry.record.requeued(entry.record.task.clone(), now_ms());
        // The ended record may still linger in the live bucket: written over, unless the
        // task lives again.
        let lingering = match shared.records.live(&request.id).await.map_err(internal)? {
            Some(live) if !live.record.state.is_terminal() => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!("task {} is live again already", request.id),
                ));
            }
            Some(live) => Some(live.revision),
            None => None,
        };
        match shared.records.write(&record, lingering).await {
            Ok(_) => {}
            Err(WriteError::Conflict) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!("task {} is live again already", request.id),
                ));
            }
            Err(WriteError::Failed(err)) => return Err(internal(err)),
        }
        let msg_id = msg_id::requeue_dead(&record.id, entry.sequence);
        settle::queue_again(&shared, &record, &msg_id)
            .await
            .map_err(internal)?;
        let stream = shared
            .js
            .get_stream(topology::DLQ_STREAM)
            .await
            .context("failed to open the dead-letter stream")
            .map_err(internal)?;
        if let Err(err) = stream.delete_message(entry.sequence).await {
            tracing::warn!(error = %err, "failed to take a requeued task out of the dead-letter stream");
        }
        tracing::info!(task_id = %record.id, "dead task requeued");
        Ok(record)
    };
    requeued.await.into()
}

/// The latest dead-letter entry of `task`.
async fn entry(shared: &Shared, task: &TaskId) -> Result<DeadLetter, ErrorBody> {
    let mut found = None;
    scan(
        &shared.js,
        topology::DLQ_STREAM,
        subject::task_dead().to_string(),
        DeliverPolicy::All,
        usize::MAX,
        |message| {
            if names(message, task) {
                let sequence = message.info().map_or(0, |info| info.stream_sequence);
                found = decode(&message.payload, sequence);
            }
            true
        },
    )
    .await
    .map_err(internal)?;
    found.ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::NotFound,
            format!("task {task} is not in the dead-letter stream"),
        )
    })
}

fn decode(payload: &[u8], sequence: u64) -> Option<DeadLetter> {
    let (record, _) = codec::decode_message::<TaskRecord>(None, payload).ok()?;
    Some(DeadLetter { record, sequence })
}
