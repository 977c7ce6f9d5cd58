//! The node view's upkeep: the node bucket, mirrored into the view.

use std::sync::Arc;

use anyhow::Context as _;
use apiary_proto::codec::{self, Encoding};
use apiary_proto::message::{ErrorBody, ErrorCode};
use apiary_proto::topology::{self, NodeKey};
use async_nats::jetstream::kv;
use futures::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::view::NodeChange;

/// Mirrors the node bucket into the view: first every current entry, then each change.
///
/// The watch replays the latest value of every key before it follows changes: a replica
/// that starts after the nodes registered must know them at once, or it would answer their
/// heartbeats while having nowhere to place work.
pub(crate) async fn watch_nodes(
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let empty = shared
        .nodes
        .status()
        .await
        .map(|status| status.values() == 0)
        .unwrap_or(false);
    let mut watch = shared
        .nodes
        .watch_with_history(topology::NODES_ALL_KEYS)
        .await
        .context("failed to watch the node bucket")?;
    if empty {
        shared.synced.send_replace(true);
    }
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            entry = watch.next() => entry,
        };
        let entry = match entry {
            Some(Ok(entry)) => entry,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "error while watching the node bucket");
                continue;
            }
            None => anyhow::bail!("the node bucket watch ended"),
        };
        if let Some(change) = node_change(&entry) {
            // A bucket made anew starts its revisions again; the replica stops (its
            // supervisor starts it again) rather than keep a view it can no longer trust.
            shared
                .update(|view| view.apply_watched(entry.revision, change))
                .context("the node view cannot follow the bucket")?;
        }
        if entry.seen_current || entry.delta == 0 {
            shared.synced.send_replace(true);
        }
    }
}

/// Turns a bucket entry into a view change; entries apiary did not write are skipped.
fn node_change(entry: &kv::Entry) -> Option<NodeChange> {
    let key = topology::parse_node_key(&entry.key)?;
    let removed = matches!(
        entry.operation,
        kv::Operation::Delete | kv::Operation::Purge
    );
    let change = match (key, removed) {
        (NodeKey::Info(node), true) => NodeChange::Forgotten(node),
        (NodeKey::Live(node), true) => NodeChange::LivenessCleared(node),
        (NodeKey::Admin(node), true) => NodeChange::AdminCleared(node),
        (NodeKey::Admin(node), false) => NodeChange::Admin(node, decode_entry(entry)?),
        (NodeKey::Info(_), false) => NodeChange::Registered(decode_entry(entry)?),
        (NodeKey::Live(node), false) => NodeChange::Heartbeat(node, decode_entry(entry)?),
    };
    Some(change)
}

fn decode_entry<T: DeserializeOwned>(entry: &kv::Entry) -> Option<T> {
    decode_value(&entry.key, &entry.value)
}

/// Decodes the value of a node bucket key; a malformed one is logged and skipped.
pub(crate) fn decode_value<T: DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match Encoding::detect(None, value).decode(value) {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(key, error = %err, "skipping a malformed node record");
            None
        }
    }
}

/// Stores a node record; returns its revision.
pub(crate) async fn put_record<T: Serialize>(
    shared: &Shared,
    key: String,
    value: &T,
) -> Result<u64, ErrorBody> {
    let bytes =
        codec::encode(value).map_err(|err| ErrorBody::new(ErrorCode::Internal, err.to_string()))?;
    shared.nodes.put(key, bytes).await.map_err(|err| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("failed to store the node record: {err}"),
        )
    })
}
