//! Completions: every replica sees each result as it is stored (a plain subscription on the
//! result subjects, beside the stream), so the node that ran one of this replica's tasks has
//! room again at once rather than at its next heartbeat.
//!
//! Only the headers are read: `Nats-Msg-Id` is the attempt id (`<task>.<attempt>`) the
//! replica reserved room under. A result the replica misses (it was cut off from the server)
//! costs nothing lasting: recovery's tidy-up forgets such entries (see
//! [`crate::recovery`]).

use std::sync::Arc;

use anyhow::Context as _;
use apiary_proto::headers;
use apiary_proto::subject::{self, NodeVerb};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub(crate) async fn watch_completions(
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut results = shared
        .client
        .subscribe(subject::all_nodes(NodeVerb::Result).to_string())
        .await
        .context("failed to subscribe to task results")?;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = results.next() => message,
        };
        let Some(message) = message else {
            anyhow::bail!("the result subscription ended");
        };
        let Some(attempt_id) = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(headers::MSG_ID))
        else {
            continue;
        };
        let attempt_id = attempt_id.as_str();
        let finished = shared.view().finished(attempt_id, apiary_proto::now_ms());
        if finished {
            shared.wake();
        }
    }
}
