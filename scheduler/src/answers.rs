//! Answers to submitters that are not a run of their task: a refused submission, and an id
//! that was submitted before.

use anyhow::Context as _;
use apiary_proto::codec::{self, Encoding};
use apiary_proto::lifecycle::{NO_NODE, TaskRecord, TaskState};
use apiary_proto::message::{Outcome, TaskError, TaskErrorKind};
use apiary_proto::{headers, now_ms, subject};
use async_nats::jetstream;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::settle::Delivery;

/// The parts of a submission that can be read even when the whole cannot: enough to answer.
#[derive(Deserialize)]
struct Loose {
    #[serde(default)]
    id: Lenient,
    #[serde(default)]
    reply_to: Lenient,
}

/// A field that is read as a string when it is one, and ignored otherwise.
#[derive(Default, Deserialize)]
#[serde(untagged)]
enum Lenient {
    Text(String),
    #[default]
    #[serde(skip)]
    Absent,
    Other(serde::de::IgnoredAny),
}

impl Lenient {
    fn text(self) -> Option<String> {
        match self {
            Lenient::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// The refusal a submitter gets, shaped as a `TaskResult` (the same field names), so that a
/// client reading results reads it too, whatever the task id was.
#[derive(Serialize)]
struct Refused {
    task_id: String,
    node_id: &'static str,
    attempt: u32,
    outcome: Outcome,
    started_at_ms: u64,
    finished_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<String>,
}

/// Answers a submission that cannot be taken (it does not decode, or its id is invalid)
/// with a typed `invalid_task` result, in the submission's encoding, where its `reply_to` can
/// be read and may be published to. Without one, the log is the only trace.
pub(crate) async fn refuse_submission(shared: &Shared, message: &jetstream::Message, reason: &str) {
    let encoding = Encoding::detect(message.headers.as_ref(), &message.payload);
    let Ok(loose) = encoding.decode::<Loose>(&message.payload) else {
        return;
    };
    let Some(reply_to) = loose.reply_to.text() else {
        return;
    };
    if !subject::is_allowed_reply_subject(&reply_to, &shared.config.reply_subject_prefixes) {
        return;
    }
    let now = now_ms();
    let task_id = loose.id.text().unwrap_or_default();
    let refused = Refused {
        task_id: task_id.clone(),
        node_id: NO_NODE,
        attempt: 0,
        outcome: Outcome::Failed {
            error: TaskError::new(
                TaskErrorKind::InvalidTask,
                format!("the submission was refused: {reason}"),
            ),
            stderr: Default::default(),
        },
        started_at_ms: now,
        finished_at_ms: now,
        reply_to: Some(reply_to.clone()),
    };
    let Ok(payload) = encoding.encode(&refused) else {
        return;
    };
    let mut headers = encoding.headers();
    headers.insert(headers::TASK_ID, task_id.as_str());
    if let Err(err) = shared
        .client
        .publish_with_headers(reply_to, headers, payload)
        .await
    {
        tracing::warn!(error = %err, "failed to answer a refused submission");
    }
}

/// Answers a submission of an id whose task has ended with that task's outcome: the stored
/// result when it is still there, or the record's own account of how it ended, in the
/// asking submission's `encoding`.
pub(crate) async fn answer_existing(
    shared: &Shared,
    record: &TaskRecord,
    reply_to: Option<&str>,
    encoding: Encoding,
) -> anyhow::Result<()> {
    tracing::info!(state = %record.state, "the id was submitted before; answering with that task");
    let Some(reply_to) = reply_to else {
        return Ok(());
    };
    let delivery = match shared.records.result_of(record).await? {
        Some(result) => {
            let mut headers = Encoding::MsgPack.headers();
            headers.insert(headers::TASK_ID, record.id.as_str());
            Delivery {
                headers,
                payload: codec::encode(&result).context("failed to encode a result")?,
            }
        }
        None if record.state == TaskState::Succeeded => {
            tracing::info!("the earlier task's result has aged out; nothing to answer with");
            return Ok(());
        }
        None => Delivery::synthesized(record)?,
    }
    .in_encoding(encoding)?;
    shared
        .client
        .publish_with_headers(reply_to.to_owned(), delivery.headers, delivery.payload)
        .await
        .context("failed to answer with an earlier task")?;
    Ok(())
}
