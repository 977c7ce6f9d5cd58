//! Agents joining and staying: `register` and `heartbeat`.
//!
//! Both bodies are signed with the node's key ([`apiary_proto::identity`]); a message that
//! does not verify is dropped unanswered and counted. A node id is bound to the key it first
//! registered with: the first registration needs a join token, later ones (a restart, a
//! re-registration after the bucket was lost) are admitted by the key alone, so a node keeps
//! working after its token expires. Another key for a bound id is refused (`forbidden`) until
//! an operator removes the node.

use std::sync::Arc;

use apiary_proto::admin::{Approval, NodeAdmin};
use apiary_proto::message::{
    ErrorBody, ErrorCode, Heartbeat, HeartbeatReply, NodeLiveness, NodeMetrics, NodeRecord,
    NodeState, Refusal, RegisterReply, RegisterRequest, Reply,
};
use apiary_proto::rpc::Inbound;
use apiary_proto::{NodeId, codec, identity, now_ms, topology};
use async_nats::jetstream::kv;
use tracing::Instrument as _;

use crate::nodes::{decode_value, put_record};
use crate::service::check_subject;
use crate::view::NodeChange;
use crate::{Counters, SYNC_WAIT, Shared, admin, recovery, tokens};

/// How often storing a registration retries when another write to the key came first.
const STORE_ATTEMPTS: usize = 8;

/// The sender's verified key, or `None` (counted) when the message does not verify or the
/// body claims another key than the one that signed it.
fn verified_signer(shared: &Shared, inbound: &Inbound, claimed: Option<&str>) -> Option<String> {
    let signer = identity::verify(inbound.headers.as_ref(), &inbound.payload);
    let refused = match signer {
        Ok(signer) if claimed.is_none_or(|claimed| claimed == signer) => return Some(signer),
        Ok(_) => "the body names another key than the one that signed it".to_owned(),
        Err(err) => err.to_string(),
    };
    Counters::count(&shared.counters.signatures_invalid);
    tracing::debug!(node_id = ?inbound.node, reason = %refused, "dropped a message that does not verify");
    None
}

fn key_mismatch(shared: &Shared, node: &NodeId) -> ErrorBody {
    Counters::count(&shared.counters.identity_refused);
    tracing::warn!(node_id = %node, "refused a node key other than the one bound to this node id");
    ErrorBody::refused(
        Refusal::KeyMismatch,
        format!(
            "node id {node} is bound to another key; an operator can remove the node (apiary nodes rm {node}) to free the id"
        ),
    )
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

/// What storing a registration found.
struct Stored {
    /// The registration it replaced, when this replica's write was the one that replaced
    /// it: of two replicas handling the same registration at once (an agent that retried
    /// after a slow reply), only one sees the previous process, so only one reclaims its work
    /// and none deletes the new process's consumer under it.
    replaced: Option<NodeRecord>,
    /// The stored record's revision.
    revision: u64,
    /// No registration was stored before: the node id is new and its join token was spent.
    joined: bool,
}

/// Stores `record` as its node's registration with compare-and-set on the key's revision,
/// checking the key binding against what is stored at each try, and redeeming `token` when
/// the id has no registration yet.
async fn store_registration(
    shared: &Shared,
    record: &NodeRecord,
    token: Option<&str>,
) -> Result<Stored, ErrorBody> {
    let node = &record.info.node_id;
    let key = topology::node_info_key(node);
    let internal = |what: &str, err: &dyn std::fmt::Display| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("failed to {what} the node record: {err}"),
        )
    };
    let value = codec::encode(record).map_err(|err| internal("encode", &err))?;
    let mut redeemed = false;
    for _ in 0..STORE_ATTEMPTS {
        match stored_registration(shared, node).await? {
            Some((current, revision)) => {
                if bound_elsewhere(&current, &record.info.public_key) {
                    return Err(key_mismatch(shared, node));
                }
                match shared.nodes.update(&key, value.clone(), revision).await {
                    Ok(revision) => {
                        return Ok(Stored {
                            replaced: Some(current),
                            revision,
                            joined: redeemed,
                        });
                    }
                    Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(err) => return Err(internal("store", &err)),
                }
            }
            None => {
                if !redeemed {
                    let admitted = tokens::redeem(&shared.cluster, token, now_ms()).await;
                    if let Err(refusal) = admitted {
                        // The same node's retried registration, handled by another replica
                        // at the same moment, may have spent the token's last use and stored
                        // the record: then this one is a re-registration, not a refusal.
                        let registered_meanwhile = stored_registration(shared, node)
                            .await?
                            .is_some_and(|(current, _)| {
                                current.info.public_key == record.info.public_key
                            });
                        if registered_meanwhile {
                            continue;
                        }
                        if refusal.reason.is_some() {
                            Counters::count(&shared.counters.tokens_refused);
                        }
                        return Err(refusal);
                    }
                    redeemed = true;
                }
                match shared.nodes.create(&key, value.clone()).await {
                    Ok(revision) => {
                        return Ok(Stored {
                            replaced: None,
                            revision,
                            joined: true,
                        });
                    }
                    // Someone registered the id meanwhile: look again at whose it is.
                    Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(err) => return Err(internal("store", &err)),
                }
            }
        }
    }
    Err(internal("store", &"the record kept changing"))
}

pub(crate) async fn register(
    shared: Arc<Shared>,
    inbound: Inbound,
    request: RegisterRequest,
) -> Option<Reply<RegisterReply>> {
    let node = request.node.node_id.clone();
    let span = tracing::info_span!("register", node_id = %node);
    async move {
        if let Err(err) = check_subject(inbound.node.clone(), &node) {
            return Some(Reply::Error(err));
        }
        verified_signer(&shared, &inbound, Some(&request.node.public_key))?;
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
    let stored = store_registration(shared, &record, request.token.as_deref()).await?;
    if stored.joined {
        // A new node starts with a fresh operator record: pending in approval mode, and
        // without the marker of an earlier removal of the same id.
        let settings = admin::settings(shared).await?;
        let fresh = NodeAdmin {
            pending: settings.approval == Approval::Manual,
            ..NodeAdmin::default()
        };
        let revision = put_record(shared, topology::node_admin_key(&node), &fresh).await?;
        shared.apply_written(revision, NodeChange::Admin(node.clone(), fresh));
    }
    if let Some(previous) = stored.replaced
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
    shared.apply_written(stored.revision, NodeChange::Registered(record.clone()));
    shared.apply_written(live_revision, NodeChange::Heartbeat(node.clone(), live));
    Counters::count(&shared.counters.nodes_registered);
    tracing::info!(
        hostname = %record.info.hostname,
        arch = %record.info.arch,
        cores = record.info.cpu_cores,
        slots = record.info.slots,
        incarnation = %record.info.incarnation,
        public_key = %record.info.public_key,
        joined = stored.joined,
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
/// and the view always agree.
async fn sender(shared: &Shared, heartbeat: &Heartbeat, signer: &str) -> Result<Sender, ErrorBody> {
    let node = &heartbeat.node_id;
    let matches = |record: &NodeRecord| {
        heartbeat.incarnation.is_empty() || !is_new_incarnation(record, &heartbeat.incarnation)
    };
    let held = shared.view().registration(node).cloned();
    if let Some(record) = held.filter(matches) {
        if bound_elsewhere(&record, signer) {
            return Err(key_mismatch(shared, node));
        }
        return Ok(Sender::Registered);
    }
    // A replica that is still reading the bucket answers from the bucket.
    shared.wait_synced(SYNC_WAIT).await;
    let Some((record, revision)) = stored_registration(shared, node).await? else {
        let removed = shared
            .view()
            .admin(node)
            .is_some_and(|admin| admin.removed_ms.is_some());
        return Ok(if removed {
            Sender::Removed
        } else {
            Sender::Unknown
        });
    };
    if bound_elsewhere(&record, signer) {
        return Err(key_mismatch(shared, node));
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

pub(crate) async fn heartbeat(
    shared: Arc<Shared>,
    inbound: Inbound,
    heartbeat: Heartbeat,
) -> Option<Reply<HeartbeatReply>> {
    let node = heartbeat.node_id.clone();
    if let Err(err) = check_subject(inbound.node.clone(), &node) {
        return Some(Reply::Error(err));
    }
    let signer = verified_signer(&shared, &inbound, None)?;
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
        Err(err) => return Some(Reply::Error(err)),
    };
    // This replica's view has it before the agent hears back: a `leaving` heartbeat stops
    // placements here at once, not when the bucket watch catches up.
    shared.apply_written(revision, NodeChange::Heartbeat(node.clone(), live));
    let schedule = shared
        .view()
        .admin(&node)
        .map(|admin| admin.schedule)
        .unwrap_or_default();
    Some(Reply::Ok(HeartbeatReply {
        registered: true,
        schedule,
        leave: false,
    }))
}
