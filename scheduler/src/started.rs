//! Started signals: an agent says when it starts an attempt (core NATS, one replica of the
//! queue group takes each), and the task's record moves from scheduled to running. A signal
//! that is lost or comes late changes nothing else: the result settles the task either way.

use std::sync::Arc;

use anyhow::Context as _;
use apiary_proto::message::AttemptStarted;
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{codec, now_ms};
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::records::WriteError;
use crate::{SERVICE_NAME, Shared, contention_pause};

/// How many started signals a replica applies at once.
const CONCURRENCY: usize = 64;
/// How often a write that collides is tried again: a result racing the signal wins anyway.
const TRIES: usize = 3;

pub(crate) async fn watch_started(
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut signals = shared
        .client
        .queue_subscribe(
            subject::all_nodes(NodeVerb::Started).to_string(),
            SERVICE_NAME.to_owned(),
        )
        .await
        .context("failed to subscribe to started signals")?;
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = signals.next() => message,
        };
        let Some(message) = message else {
            anyhow::bail!("the started subscription ended");
        };
        let Some((node, NodeVerb::Started)) = subject::parse_node_subject(&message.subject) else {
            continue;
        };
        let Ok((started, _)) =
            codec::decode_message::<AttemptStarted>(message.headers.as_ref(), &message.payload)
        else {
            tracing::debug!(node_id = %node, "ignoring a malformed started signal");
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Ok(());
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            mark_running(&shared, &node, &started).await;
            drop(permit);
        });
    }
}

async fn mark_running(shared: &Shared, node: &apiary_proto::NodeId, started: &AttemptStarted) {
    for _ in 0..TRIES {
        let live = match shared.records.live(&started.task_id).await {
            Ok(Some(live)) => live,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "failed to read a record for a started signal");
                return;
            }
        };
        let Ok(record) =
            live.record
                .started(node, started.attempt, started.started_at_ms, now_ms())
        else {
            return;
        };
        match shared.records.write(&record, Some(live.revision)).await {
            Ok(_) => return,
            Err(WriteError::Conflict) => contention_pause().await,
            Err(WriteError::Failed(err)) => {
                tracing::debug!(error = %format!("{err:#}"), "failed to mark a task running");
                return;
            }
        }
    }
}
