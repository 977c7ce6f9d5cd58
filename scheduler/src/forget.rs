//! Forgetting nodes that have been gone for long: offline (or left) for longer than
//! `forget_offline_after` and holding no work. Each such node costs the server a durable
//! consumer, every replica a place in its view, and every node list a row; a fleet that
//! churns through hosts would otherwise carry them all forever.
//!
//! What is forgotten: the node's dispatch consumer, and its registration and liveness
//! records. What stays: the binding of its id to its key (`APIARY_CLUSTER`) and what the
//! operator set on it (labels, cordon), so a node that comes back registers again by its key
//! alone, without a token, and finds its settings as they were.

use anyhow::Context as _;
use apiary_proto::{NodeId, topology};
use async_nats::jetstream;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::kv::UpdateErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;

use crate::view::{Forgettable, NodeChange};
use crate::{Counters, Shared};

/// Forgets every node the view says may go ([`crate::view::NodeView::forgettable`]).
pub(crate) async fn forget_gone_nodes(shared: &Shared, stream: &jetstream::stream::Stream) {
    let after = shared.config.forget_offline_after;
    if after.is_zero() {
        return;
    }
    let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    let gone = shared.view().forgettable(apiary_proto::now_ms(), after_ms);
    for node in gone {
        match forget(shared, stream, &node).await {
            Ok(true) => {
                Counters::count(&shared.counters.nodes_forgotten);
                tracing::info!(node_id = %node.node, offline_longer_than = ?after, "forgot a node gone for long");
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(node_id = %node.node, error = %format!("{err:#}"), "failed to forget a node");
            }
        }
    }
}

/// Forgets one node. False when it turned out not to be forgettable after all: it came back,
/// work reached it, or another replica forgot it first.
async fn forget(
    shared: &Shared,
    stream: &jetstream::stream::Stream,
    node: &Forgettable,
) -> anyhow::Result<bool> {
    if !delete_idle_consumer(stream, &node.node).await? {
        return Ok(false);
    }
    // Liveness first, as an operator's removal does: a registration without liveness is
    // offline, which this node is. Each delete holds only if the record is still the one
    // the view judged; a node that came back meanwhile wrote a newer one, and stays.
    if let Some(revision) = node.live_revision
        && !purge_if_unchanged(shared, &topology::node_live_key(&node.node), revision).await?
    {
        return Ok(false);
    }
    if !purge_if_unchanged(
        shared,
        &topology::node_info_key(&node.node),
        node.record_revision,
    )
    .await?
    {
        return Ok(false);
    }
    shared.update(|view| {
        view.apply(NodeChange::LivenessCleared(node.node.clone()));
        view.apply(NodeChange::Forgotten(node.node.clone()));
    });
    Ok(true)
}

/// Deletes the node's dispatch consumer if nothing is queued on it or held by it. False when
/// something is: recovery moves it first.
async fn delete_idle_consumer(
    stream: &jetstream::stream::Stream,
    node: &NodeId,
) -> anyhow::Result<bool> {
    let name = topology::node_dispatch_consumer_name(node);
    let info = match stream.consumer_info(&name).await {
        Ok(info) => info,
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => return Ok(true),
        Err(err) => return Err(err).context("failed to read the node's dispatch consumer"),
    };
    if info.num_pending > 0 || info.num_ack_pending > 0 {
        return Ok(false);
    }
    match stream.delete_consumer(&name).await {
        Ok(_) => Ok(true),
        // Another replica deleted it first.
        Err(err)
            if matches!(
                err.kind(),
                ConsumerErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) =>
        {
            Ok(true)
        }
        Err(err) => Err(err).context("failed to delete the node's dispatch consumer"),
    }
}

/// Purges `key` if its latest revision is still `revision`; false if it has changed.
async fn purge_if_unchanged(shared: &Shared, key: &str, revision: u64) -> anyhow::Result<bool> {
    match shared
        .nodes
        .purge_expect_revision(key, Some(revision))
        .await
    {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(err) => Err(err).with_context(|| format!("failed to purge {key}")),
    }
}
