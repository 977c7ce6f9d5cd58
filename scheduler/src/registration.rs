//! Agents joining and staying: `register` and `heartbeat`.
//!
//! Both bodies are signed with the node's key ([`apiary_proto::identity`]); a message that
//! does not verify is dropped unanswered and counted, before anything else about it is
//! looked at. A node id is bound to the key it first registered with ([`crate::binding`]):
//! the first registration needs a join token, later ones (a restart, a re-registration after
//! the node bucket was lost) are admitted by the key alone, so a node keeps working after its
//! token expires. Another key for a bound id is refused (`forbidden`) until an operator
//! removes the node. A heartbeat that repeats an earlier one of the same process (a replay)
//! is dropped and counted.

use std::sync::Arc;

use apiary_proto::message::{
    ErrorBody, ErrorCode, Heartbeat, HeartbeatReply, NodeLiveness, NodeMetrics, NodeRecord,
    NodeState, RegisterReply, RegisterRequest, Reply,
};
use apiary_proto::rpc::{self, Inbound};
use apiary_proto::{CodecError, NodeId, codec, identity, now_ms, topology};
use async_nats::jetstream::kv;
use tracing::Instrument as _;

use crate::nodes::{decode_value, put_record};
use crate::service::check_subject;
use crate::view::NodeChange;
use crate::{Counters, SYNC_WAIT, Shared, admin, binding, recovery};

/// How often storing a registration retries when another write to the key came first.
const STORE_ATTEMPTS: usize = 8;

/// The sender's verified key, or `None` (counted) when the message does not verify.
fn verified_signer(shared: &Shared, inbound: &Inbound) -> Option<String> {
    match identity::verify(inbound.headers.as_ref(), &inbound.payload) {
        Ok(signer) => Some(signer),
        Err(err) => {
            refuse_unverified(shared, inbound, &err.to_string());
            None
        }
    }
}

/// Counts and logs a message dropped because it does not verify.
fn refuse_unverified(shared: &Shared, inbound: &Inbound, reason: &str) {
    Counters::count(&shared.counters.signatures_invalid);
    tracing::debug!(subject = %inbound.subject, reason, "dropped a message that does not verify");
}

/// Whether `record` binds its node to another key than `signer`. A record from an agent
/// that predates node keys binds nothing, so the first signed registration binds the id.
fn bound_elsewhere(record: &NodeRecord, signer: &str) -> bool {
    !record.info.public_key.is_empty() && record.info.public_key != signer
}

/// Whether a registration comes from another process than the one registered before. An
/// agent that predates incarnations sends none, and then nothing can be told.
fn is_new_incarnation(previous: &NodeRecord, incoming: &str) -> bool {
    !incoming.is_empty() && previous.info.incarnation != incoming
}

/// The registration record the bucket holds for `node`, read from the server rather than
/// the view, which may lag a registration another replica just stored. Returns it with its
/// revision.
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

/// Stores `record` as its node's registration with compare-and-set on the key's revision.
/// Returns the registration it replaced, when this replica's write was the one that replaced
/// it: of two replicas handling the same registration at once (an agent that retried after a
/// slow reply), only one sees the previous process, so only one reclaims its work and none
/// deletes the new process's consumer under it. Also returns the stored record's revision.
async fn store_registration(
    shared: &Shared,
    record: &NodeRecord,
) -> Result<(Option<NodeRecord>, u64), ErrorBody> {
    let node = &record.info.node_id;
    let key = topology::node_info_key(node);
    let internal = |what: &str, err: &dyn std::fmt::Display| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("failed to {what} the node record: {err}"),
        )
    };
    let value = codec::encode(record).map_err(|err| internal("encode", &err))?;
    for _ in 0..STORE_ATTEMPTS {
        let written = match stored_registration(shared, node).await? {
            Some((current, revision)) => {
                match shared.nodes.update(&key, value.clone(), revision).await {
                    Ok(revision) => return Ok((Some(current), revision)),
                    Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
                    Err(err) => Err(internal("store", &err)),
                }
            }
            None => match shared.nodes.create(&key, value.clone()).await {
                Ok(revision) => return Ok((None, revision)),
                Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                Err(err) => Err(internal("store", &err)),
            },
        };
        written?;
        crate::contention_pause().await;
    }
    Err(internal("store", &"the record kept changing"))
}

pub(crate) async fn register(
    shared: Arc<Shared>,
    inbound: Inbound,
    request: Result<RegisterRequest, CodecError>,
) -> Option<Reply<RegisterReply>> {
    // The signature first: whatever else is wrong with a message that does not verify is
    // nobody's business but its sender's.
    let signer = verified_signer(&shared, &inbound)?;
    let request = match request {
        Ok(request) => request,
        Err(err) => return Some(rpc::malformed(&inbound, &err)),
    };
    let node = request.node.node_id.clone();
    let span = tracing::info_span!("register", node_id = %node);
    async move {
        if let Err(err) = check_subject(inbound.node.clone(), &node) {
            return Some(Reply::Error(err));
        }
        if request.node.public_key != signer {
            refuse_unverified(&shared, &inbound, "the body names another key than the one that signed it");
            return None;
        }
        Some(match admit(&shared, request).await {
            Ok(reply) => Reply::Ok(reply),
            Err(err) => {
                tracing::info!(code = %err.code, reason = ?err.reason, error = %err.message, "registration refused");
                Reply::Error(err)
            }
        })
    }
    .instrument(span)
    .await
}

async fn admit(shared: &Arc<Shared>, request: RegisterRequest) -> Result<RegisterReply, ErrorBody> {
    let node = request.node.node_id.clone();
    let admission = binding::admit(
        shared,
        &node,
        &request.node.public_key,
        request.token.as_ref(),
    )
    .await?;
    let now = now_ms();
    let record = NodeRecord {
        info: request.node,
        registered_at_ms: now,
        token_id: admission.token_id,
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
        incarnation: record.info.incarnation.clone(),
    };
    let (replaced, info_revision) = store_registration(shared, &record).await?;
    if let Some(previous) = replaced
        && is_new_incarnation(&previous, &record.info.incarnation)
    {
        // The process that registered before is gone: it had this node's key, so it was
        // this node. What it held is handed out again now, to the new process, before it is
        // told to start pulling.
        Counters::count(&shared.counters.node_restarts);
        tracing::info!(
            previous = %previous.info.incarnation,
            incarnation = %record.info.incarnation,
            "node restarted; reclaiming the work its previous process held"
        );
        if let Err(err) = recovery::reclaim_deliveries(shared, &node).await {
            tracing::warn!(error = %format!("{err:#}"), "failed to reclaim a restarted node's work; it returns after the ack wait");
        }
    }
    let live_revision = put_record(shared, topology::node_live_key(&node), &live).await?;
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
        public_key = %record.info.public_key,
        joined = admission.joined,
        "node registered"
    );
    Ok(RegisterReply {
        node_id: node,
        heartbeat_interval_ms: shared.heartbeat_interval_ms(),
    })
}

/// Who sent a heartbeat, as far as this replica can place work.
enum Sender {
    /// The registered process of the node, with the key it is bound to.
    Registered,
    /// No registration of the sender's incarnation: it must register again.
    Unknown,
    /// An operator removed the node: it must leave.
    Removed,
}

/// Whether this replica can place work on the heartbeat's sender: the view holds a
/// registration of the sender's incarnation and key. A view that lacks it, or holds another
/// incarnation's, is checked against the bucket first and brought up to date, so the answer
/// and the view always agree. A removal is looked for first, in the view and then in the
/// bucket, so that a replica still catching up never invites a removed node back.
async fn sender(shared: &Shared, heartbeat: &Heartbeat, signer: &str) -> Result<Sender, ErrorBody> {
    let node = &heartbeat.node_id;
    let matches = |record: &NodeRecord| {
        heartbeat.incarnation.is_empty() || !is_new_incarnation(record, &heartbeat.incarnation)
    };
    let (removed, held) = {
        let view = shared.view();
        let removed = view
            .admin(node)
            .is_some_and(|admin| admin.removed_ms.is_some());
        (removed, view.registration(node).cloned())
    };
    if removed {
        return Ok(Sender::Removed);
    }
    if let Some(record) = held.filter(matches) {
        if bound_elsewhere(&record, signer) {
            return Err(binding::key_mismatch(shared, node));
        }
        return Ok(Sender::Registered);
    }
    // A replica that is still reading the bucket answers from the bucket.
    shared.wait_synced(SYNC_WAIT).await;
    let Some((record, revision)) = stored_registration(shared, node).await? else {
        return Ok(if admin::is_removed(shared, node).await? {
            Sender::Removed
        } else {
            Sender::Unknown
        });
    };
    if bound_elsewhere(&record, signer) {
        return Err(binding::key_mismatch(shared, node));
    }
    let known = matches(&record);
    if !known {
        tracing::warn!(
            node_id = %node,
            registered = %record.info.incarnation,
            heartbeat = %heartbeat.incarnation,
            "a heartbeat from another process than the registered one"
        );
    }
    shared.apply_written(revision, NodeChange::Registered(record));
    Ok(if known {
        Sender::Registered
    } else {
        Sender::Unknown
    })
}

/// Whether the heartbeat repeats one this replica has seen from the same process: its `seq`
/// is no higher than the latest stored. A replayed heartbeat would keep a dead node online,
/// or, replayed `leaving`, take a live one out.
fn is_replay(shared: &Shared, heartbeat: &Heartbeat) -> bool {
    if heartbeat.incarnation.is_empty() {
        return false;
    }
    shared
        .view()
        .liveness(&heartbeat.node_id)
        .is_some_and(|live| live.incarnation == heartbeat.incarnation && heartbeat.seq <= live.seq)
}

pub(crate) async fn heartbeat(
    shared: Arc<Shared>,
    inbound: Inbound,
    heartbeat: Result<Heartbeat, CodecError>,
) -> Option<Reply<HeartbeatReply>> {
    let signer = verified_signer(&shared, &inbound)?;
    let heartbeat = match heartbeat {
        Ok(heartbeat) => heartbeat,
        Err(err) => return Some(rpc::malformed(&inbound, &err)),
    };
    let node = heartbeat.node_id.clone();
    if let Err(err) = check_subject(inbound.node.clone(), &node) {
        return Some(Reply::Error(err));
    }
    match sender(&shared, &heartbeat, &signer).await {
        Ok(Sender::Registered) => {}
        Ok(Sender::Unknown) => {
            Counters::count(&shared.counters.heartbeats_refused);
            tracing::debug!(node_id = %node, "heartbeat from an unregistered node");
            return Some(Reply::Ok(HeartbeatReply::unknown()));
        }
        Ok(Sender::Removed) => {
            tracing::info!(node_id = %node, "heartbeat from a removed node; telling it to leave");
            return Some(Reply::Ok(HeartbeatReply {
                leave: true,
                ..HeartbeatReply::unknown()
            }));
        }
        Err(err) => return Some(Reply::Error(err)),
    }
    if is_replay(&shared, &heartbeat) {
        Counters::count(&shared.counters.heartbeats_replayed);
        tracing::debug!(node_id = %node, seq = heartbeat.seq, "dropped a replayed heartbeat");
        return None;
    }
    let live = NodeLiveness {
        last_seen_ms: now_ms(),
        heartbeat_interval_ms: shared.heartbeat_interval_ms(),
        seq: heartbeat.seq,
        state: heartbeat.state,
        metrics: heartbeat.metrics,
        incarnation: heartbeat.incarnation,
    };
    if live.state == NodeState::Leaving {
        tracing::info!(node_id = %node, "node leaving");
    }
    let revision = match put_record(&shared, topology::node_live_key(&node), &live).await {
        Ok(revision) => revision,
        Err(err) => return Some(Reply::Error(err)),
    };
    // This replica's view has it before the agent hears back: a `leaving` heartbeat stops
    // placements here at once, not when the bucket watch catches up.
    shared.apply_written(revision, NodeChange::Heartbeat(node.clone(), live));
    let (schedule, schedule_revision) = shared.view().schedule(&node);
    Some(Reply::Ok(HeartbeatReply {
        registered: true,
        schedule,
        leave: false,
        now_ms: now_ms(),
        schedule_revision,
    }))
}
