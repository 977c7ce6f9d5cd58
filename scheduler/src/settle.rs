//! What follows a task's transition, carried out the same way whoever made it (a result, a
//! cancel, a queue timeout, a lost node): retry it, or end it (dead letter, archive, deliver,
//! purge).
//!
//! Every step is idempotent (stored with a message id, or a purge), so a replica that dies
//! half-way leaves the message that caused it unacknowledged, and whoever reads it again
//! finds the record already moved ([`Settlement::Repeat`](apiary_proto::lifecycle::Settlement))
//! and carries out the same steps again.

use anyhow::Context as _;
use apiary_proto::codec::Encoding;
use apiary_proto::lifecycle::{Effect, TaskRecord, msg_id};
use apiary_proto::message::TaskResult;
use apiary_proto::{codec, headers, stored, subject};
use async_nats::HeaderMap;
use bytes::Bytes;

use tracing::Instrument as _;

use crate::{Counters, Shared};

/// The result that submitters receive, as it travels.
#[derive(Clone)]
pub(crate) struct Delivery {
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Delivery {
    /// The stored result message, passed on unchanged.
    pub fn stored(headers: Option<&HeaderMap>, payload: Bytes) -> Self {
        Self {
            headers: headers
                .cloned()
                .unwrap_or_else(|| Encoding::MsgPack.headers()),
            payload,
        }
    }

    /// This delivery in `encoding`. Results are stored in MessagePack; a submitter that wrote
    /// JSON (an operator with the `nats` CLI, a program in another language) reads JSON.
    pub fn in_encoding(self, encoding: Encoding) -> anyhow::Result<Self> {
        let stored = Encoding::detect(Some(&self.headers), &self.payload);
        if stored == encoding {
            return Ok(self);
        }
        let result: TaskResult = stored
            .decode(&self.payload)
            .context("failed to read a result to deliver")?;
        let mut headers = self.headers;
        headers.insert(headers::CONTENT_TYPE, encoding.content_type());
        Ok(Self {
            headers,
            payload: encoding
                .encode(&result)
                .context("failed to encode a result to deliver")?,
        })
    }

    /// The encoding in which `reply_to` gets the record's outcome: the one its submission
    /// (or resubmission) was written in.
    pub fn encoding_for(record: &TaskRecord, reply_to: &str) -> Encoding {
        if record.replies_in_json(reply_to) {
            Encoding::Json
        } else {
            Encoding::MsgPack
        }
    }

    /// The result of a task that ended without one of its own (cancelled, timed out in the
    /// queue).
    pub fn synthesized(record: &TaskRecord) -> anyhow::Result<Self> {
        let result = record.ended_without_result();
        let mut headers = Encoding::MsgPack.headers();
        headers.insert(headers::TASK_ID, record.id.as_str());
        Ok(Self {
            headers,
            payload: codec::encode(&result).context("failed to encode a result")?,
        })
    }
}

/// Carries out `effect` for `record`, as written.
pub(crate) async fn carry_out(
    shared: &Shared,
    record: &TaskRecord,
    effect: &Effect,
    delivery: Delivery,
) -> anyhow::Result<()> {
    match effect {
        Effect::Retry { .. } => requeue(shared, record).await,
        Effect::Finish => finish(shared, record, delivery).await,
        Effect::Bury => {
            bury(shared, record).await?;
            finish(shared, record, delivery).await
        }
    }
}

/// Puts a pending task back in the shared queue of its priority for its next attempt. Intake
/// keeps it there until its `not_before_ms`, so the wait holds no node's slot.
pub(crate) async fn requeue(shared: &Shared, record: &TaskRecord) -> anyhow::Result<()> {
    queue_again(shared, record, &msg_id::requeue(&record.id, record.attempt)).await
}

/// Publishes a pending task's submission to the queue of its priority again, under
/// `msg_id` (so that doing it twice stores it once), and counts it.
pub(crate) async fn queue_again(
    shared: &Shared,
    record: &TaskRecord,
    msg_id: &str,
) -> anyhow::Result<()> {
    stored::publish(
        &shared.js,
        subject::task_submit_for(record.task.priority),
        &record.id,
        msg_id,
        &record.task,
    )
    .await
    .context("failed to queue a task again")?;
    Counters::count(&shared.counters.tasks_retried);
    Ok(())
}

/// Ends a task: its result to its submitters, its final record to the archive, its key out
/// of the live bucket.
pub(crate) async fn finish(
    shared: &Shared,
    record: &TaskRecord,
    delivery: Delivery,
) -> anyhow::Result<()> {
    // Delivered before it is archived: the final state is already in the bucket, so a
    // replica that dies between the two leaves the cause unacknowledged, and whoever reads
    // it again finds the record ended and archives it then (delivering once more).
    deliver(shared, record, delivery).await;
    shared.records.archive(record).await?;
    // On servers with message TTLs the ended record expires by itself (after
    // `TASK_RECORD_LINGER`). Otherwise it is purged, off the path of the acknowledgement:
    // the final state is in the bucket and the archive already, and a lookup finds either.
    if shared.records.expire_by_themselves() {
        return Ok(());
    }
    let records = shared.records.clone();
    let task = record.id.clone();
    tokio::spawn(
        async move {
            if let Err(err) = records.purge(&task).await {
                // The ended record stays in the live bucket: found first by lookups, which
                // is right, and costing one key until an operator purges it.
                tracing::warn!(error = %format!("{err:#}"), "failed to purge an ended task's live record");
            }
        }
        .in_current_span(),
    );
    Ok(())
}

/// Puts a dead task in the dead-letter stream, with its whole submission.
async fn bury(shared: &Shared, record: &TaskRecord) -> anyhow::Result<()> {
    let msg_id = msg_id::dead_letter(record);
    stored::publish(
        &shared.js,
        subject::task_dead(),
        &record.id,
        &msg_id,
        record,
    )
    .await
    .context("failed to put a dead task in the dead-letter stream")?;
    Counters::count(&shared.counters.tasks_dead);
    tracing::warn!(
        reason = record.reason.as_deref().unwrap_or(""),
        "task is dead; kept in the dead-letter stream"
    );
    Ok(())
}

/// Publishes the result to every reply subject of the task that the scheduler may publish
/// to. Core NATS: a submitter that is away misses it, and finds it later by id.
async fn deliver(shared: &Shared, record: &TaskRecord, delivery: Delivery) {
    // Most tasks have one submitter, who reads the encoding the result is stored in. The
    // other encoding is made once, for the first reply subject that wants it.
    let stored = Encoding::detect(Some(&delivery.headers), &delivery.payload);
    let mut transcoded: Option<Delivery> = None;
    for reply_to in record.reply_subjects() {
        if !subject::is_allowed_reply_subject(reply_to, &shared.config.reply_subject_prefixes) {
            tracing::warn!(reply_to, "not delivering a result to a forbidden subject");
            continue;
        }
        let encoding = Delivery::encoding_for(record, reply_to);
        let delivery = if encoding == stored {
            &delivery
        } else {
            if transcoded.is_none() {
                match delivery.clone().in_encoding(encoding) {
                    Ok(made) => transcoded = Some(made),
                    Err(err) => {
                        tracing::warn!(error = %format!("{err:#}"), "failed to deliver a result");
                        continue;
                    }
                }
            }
            transcoded.as_ref().unwrap_or(&delivery)
        };
        match shared
            .client
            .publish_with_headers(
                reply_to.to_owned(),
                delivery.headers.clone(),
                delivery.payload.clone(),
            )
            .await
        {
            Ok(()) => Counters::count(&shared.counters.results_delivered),
            Err(err) => tracing::warn!(reply_to, error = %err, "failed to deliver a result"),
        }
    }
}
