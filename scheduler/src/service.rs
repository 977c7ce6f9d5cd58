//! The replica's micro service endpoints: `register` and `heartbeat` for agents, `nodes-list`
//! for everyone. Requests decode from either encoding and are answered in kind
//! ([`rpc::serve`]).

use std::future::Future;
use std::sync::Arc;

use apiary_proto::message::{
    ErrorBody, ErrorCode, Heartbeat, HeartbeatReply, NodeLiveness, NodeMetrics, NodeRecord,
    NodeState, NodesListReply, NodesListRequest, RegisterReply, RegisterRequest, Reply,
};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, codec, now_ms, rpc, topology};
use async_nats::jetstream::kv;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::nodes::{decode_value, put_record};
use crate::view::NodeChange;
use crate::{Counters, SYNC_WAIT, Shared, recovery};

/// Adds the endpoints to `service` and answers them on `tasks` until `stop`.
pub(crate) async fn start(
    service: &async_nats::service::Service,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let endpoint = |name: &'static str, subject: String| async move {
        service
            .endpoint_builder()
            .name(name)
            .add(subject)
            .await
            .map_err(|err| anyhow::anyhow!("failed to add the {name} endpoint: {err}"))
    };
    let register_endpoint =
        endpoint("register", subject::all_nodes(NodeVerb::Register).into()).await?;
    let heartbeat_endpoint =
        endpoint("heartbeat", subject::all_nodes(NodeVerb::Heartbeat).into()).await?;
    let list_endpoint = endpoint("nodes-list", subject::nodes_list().into()).await?;

    let on_register = shared.clone();
    tasks.spawn(
        serve(register_endpoint, stop.clone(), move |node, request| {
            register(on_register.clone(), node, request)
        })
        .in_current_span(),
    );
    let on_heartbeat = shared.clone();
    tasks.spawn(
        serve(heartbeat_endpoint, stop.clone(), move |node, request| {
            heartbeat(on_heartbeat.clone(), node, request)
        })
        .in_current_span(),
    );
    let on_list = shared.clone();
    tasks.spawn(
        serve(list_endpoint, stop.clone(), move |_, request| {
            list_nodes(on_list.clone(), request)
        })
        .in_current_span(),
    );
    Ok(())
}

/// Answers an endpoint's requests with `handler` until `stop` (see [`rpc::serve`]).
async fn serve<Req, Resp, H, Fut>(
    endpoint: async_nats::service::endpoint::Endpoint,
    stop: CancellationToken,
    handler: H,
) -> anyhow::Result<()>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Option<NodeId>, Req) -> Fut,
    Fut: Future<Output = Reply<Resp>>,
{
    tokio::select! {
        _ = stop.cancelled() => Ok(()),
        _ = rpc::serve(endpoint, handler) => anyhow::bail!("a service endpoint closed"),
    }
}

/// The node named in the subject must be the node the body speaks for: server permissions
/// fence nodes by subject, so the subject is the identity that counts.
fn check_subject(subject_node: Option<NodeId>, body_node: &NodeId) -> Result<(), ErrorBody> {
    match subject_node {
        Some(node) if &node == body_node => Ok(()),
        Some(node) => Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("the body speaks for node {body_node} but was sent on node {node}'s subject"),
        )),
        None => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "the subject names no node",
        )),
    }
}

/// The registration record the bucket holds for `node`, read from the server rather than
/// the view, which may lag a registration another replica just stored.
/// Returns it with its revision.
async fn stored_registration(
    shared: &Shared,
    node: &NodeId,
) -> Result<Option<(NodeRecord, u64)>, ErrorBody> {
    let key = topology::node_info_key(node);
    match shared.nodes.entry(&key).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            Ok(decode_value(&key, &entry.value).map(|record| (record, entry.revision)))
        }
        Ok(_) => Ok(None),
        Err(err) => Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("failed to read the node record: {err}"),
        )),
    }
}

/// Stores `record` as its node's registration, replacing the stored one only if nothing else
/// replaced it meanwhile (compare-and-set on the key's revision). Returns the registration it
/// replaced, when this replica's write was the one that replaced it: of two replicas handling
/// the same registration at once (an agent that retried after a slow reply), only one sees
/// the previous process, so only one reclaims its work and none deletes the new process's
/// consumer under it. Also returns the stored record's revision.
async fn store_registration(
    shared: &Shared,
    record: &NodeRecord,
) -> Result<(Option<NodeRecord>, u64), ErrorBody> {
    let key = topology::node_info_key(&record.info.node_id);
    let internal = |what: &str, err: &dyn std::fmt::Display| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("failed to {what} the node record: {err}"),
        )
    };
    let value = codec::encode(record).map_err(|err| internal("encode", &err))?;
    let current = shared
        .nodes
        .entry(&key)
        .await
        .map_err(|err| internal("read", &err))?
        .filter(|entry| entry.operation == kv::Operation::Put);
    let Some(current) = current else {
        return match shared.nodes.create(&key, value.clone()).await {
            Ok(revision) => Ok((None, revision)),
            // Someone registered it meanwhile: theirs is the previous record no more.
            Err(_) => put_record(shared, key, record)
                .await
                .map(|revision| (None, revision)),
        };
    };
    match shared.nodes.update(&key, value, current.revision).await {
        Ok(revision) => Ok((decode_value(&key, &current.value), revision)),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            put_record(shared, key, record)
                .await
                .map(|revision| (None, revision))
        }
        Err(err) => Err(internal("store", &err)),
    }
}

/// Whether a registration comes from another process than the one registered before. An
/// agent that predates incarnations sends none, and then nothing can be told.
fn is_new_incarnation(previous: &NodeRecord, incoming: &str) -> bool {
    !incoming.is_empty() && previous.info.incarnation != incoming
}

async fn register(
    shared: Arc<Shared>,
    subject_node: Option<NodeId>,
    request: RegisterRequest,
) -> Reply<RegisterReply> {
    let node = request.node.node_id.clone();
    let span = tracing::info_span!("register", node_id = %node);
    async move {
        if let Err(err) = check_subject(subject_node, &node) {
            return Reply::Error(err);
        }
        let now = now_ms();
        let record = NodeRecord {
            info: request.node,
            registered_at_ms: now,
        };
        let live = NodeLiveness {
            last_seen_ms: now,
            heartbeat_interval_ms: shared.heartbeat_interval_ms(),
            seq: 0,
            state: NodeState::Active,
            metrics: NodeMetrics {
                slots: record.info.slots,
                ..NodeMetrics::default()
            },
        };
        let (replaced, info_revision) = match store_registration(&shared, &record).await {
            Ok(stored) => stored,
            Err(err) => return Reply::Error(err),
        };
        if let Some(previous) = replaced
            && is_new_incarnation(&previous, &record.info.incarnation)
        {
            // The process that registered before is gone (or a second process claims the
            // same node id, which the warning in the log makes loud). What it held is handed
            // out again now, to the new process, before it is told to start pulling.
            Counters::count(&shared.counters.node_restarts);
            tracing::info!(
                previous = %previous.info.incarnation,
                incarnation = %record.info.incarnation,
                "node restarted; reclaiming the work its previous process held"
            );
            if let Err(err) = recovery::reclaim_deliveries(&shared, &node).await {
                tracing::warn!(error = %format!("{err:#}"), "failed to reclaim a restarted node's work; it returns after the ack wait");
            }
        }
        let live_revision =
            match put_record(&shared, topology::node_live_key(&node), &live).await {
                Ok(revision) => revision,
                Err(err) => return Reply::Error(err),
            };
        // Known to this replica at once; the bucket watch brings the same records back.
        shared.apply_written(info_revision, NodeChange::Registered(record.clone()));
        shared.apply_written(live_revision, NodeChange::Heartbeat(node.clone(), live));
        Counters::count(&shared.counters.nodes_registered);
        tracing::info!(
            hostname = %record.info.hostname,
            arch = %record.info.arch,
            cores = record.info.cpu_cores,
            slots = record.info.slots,
            incarnation = %record.info.incarnation,
            "node registered"
        );
        Reply::Ok(RegisterReply {
            node_id: node,
            heartbeat_interval_ms: shared.heartbeat_interval_ms(),
        })
    }
    .instrument(span)
    .await
}

/// Whether this replica can place work on the heartbeat's sender: the view holds a
/// registration of the sender's incarnation. A view that lacks it, or holds another
/// incarnation's, is checked against the bucket first and brought up to date, so the answer
/// and the view always agree.
async fn knows_sender(shared: &Shared, heartbeat: &Heartbeat) -> Result<bool, ErrorBody> {
    let node = &heartbeat.node_id;
    let matches = |record: &NodeRecord| {
        heartbeat.incarnation.is_empty() || !is_new_incarnation(record, &heartbeat.incarnation)
    };
    if shared.view().registration(node).is_some_and(matches) {
        return Ok(true);
    }
    // A replica that is still reading the bucket answers from the bucket.
    shared.wait_synced(SYNC_WAIT).await;
    let Some((record, revision)) = stored_registration(shared, node).await? else {
        return Ok(false);
    };
    let known = matches(&record);
    if !known {
        tracing::warn!(
            node_id = %node,
            registered = %record.info.incarnation,
            heartbeat = %heartbeat.incarnation,
            "a heartbeat from another process than the registered one; is the node id used twice?"
        );
    }
    shared.apply_written(revision, NodeChange::Registered(record));
    Ok(known)
}

async fn heartbeat(
    shared: Arc<Shared>,
    subject_node: Option<NodeId>,
    heartbeat: Heartbeat,
) -> Reply<HeartbeatReply> {
    let node = heartbeat.node_id.clone();
    if let Err(err) = check_subject(subject_node, &node) {
        return Reply::Error(err);
    }
    match knows_sender(&shared, &heartbeat).await {
        Ok(true) => {}
        Ok(false) => {
            Counters::count(&shared.counters.heartbeats_refused);
            tracing::debug!(node_id = %node, "heartbeat from an unregistered node");
            return Reply::Ok(HeartbeatReply { registered: false });
        }
        Err(err) => return Reply::Error(err),
    }
    let live = NodeLiveness {
        last_seen_ms: now_ms(),
        heartbeat_interval_ms: shared.heartbeat_interval_ms(),
        seq: heartbeat.seq,
        state: heartbeat.state,
        metrics: heartbeat.metrics,
    };
    if heartbeat.state == NodeState::Leaving {
        tracing::info!(node_id = %node, "node leaving");
    }
    let revision = match put_record(&shared, topology::node_live_key(&node), &live).await {
        Ok(revision) => revision,
        Err(err) => return Reply::Error(err),
    };
    // This replica's view has it before the agent hears back: a `leaving` heartbeat stops
    // placements here at once, not when the bucket watch catches up.
    shared.apply_written(revision, NodeChange::Heartbeat(node, live));
    Reply::Ok(HeartbeatReply { registered: true })
}

async fn list_nodes(shared: Arc<Shared>, request: NodesListRequest) -> Reply<NodesListReply> {
    shared.wait_synced(SYNC_WAIT).await;
    let mut nodes = shared.view().summaries(now_ms());
    if let Some(status) = request.status {
        nodes.retain(|node| node.status == status);
    }
    Reply::Ok(NodesListReply { nodes })
}
