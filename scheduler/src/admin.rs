//! What operators do to nodes (`apiary.v1.nodes.<command>`) and to the cluster's settings
//! (`apiary.v1.cluster.settings`).
//!
//! The state lives in KV: each node's [`NodeAdmin`] under `admin.<node>` in `APIARY_NODES`,
//! changed with compare-and-set so that two operators (or two replicas) never lose each
//! other's change, and the settings in `APIARY_CLUSTER`. The replica that answers applies the
//! change to its own view before it replies, so a cordon or a drain stops placements there at
//! once; every other replica learns it from the bucket watch.

use std::sync::Arc;

use apiary_proto::admin::{
    Approval, ClusterSettings, DEFAULT_DRAIN_DEADLINE_MS, DrainRequest, LabelRequest, NodeAdmin,
    NodeRef, Removed, RoleRequest, Schedule, SettingsRequest,
};
use apiary_proto::message::{ErrorBody, ErrorCode, NodeSummary, Reply};
use apiary_proto::{NodeId, codec, now_ms, topology};
use async_nats::jetstream::kv;

use crate::nodes::{decode_value, put_record};
use crate::view::NodeChange;
use crate::{SYNC_WAIT, Shared, binding};

/// How often a change retries when another write to the node's record came first.
const UPDATE_ATTEMPTS: usize = 16;

fn internal(what: &str, err: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("failed to {what}: {err}"))
}

fn not_found(node: &NodeId) -> ErrorBody {
    ErrorBody::new(ErrorCode::NotFound, format!("no node {node}"))
}

/// `show`: the node's full record, inventory, live metrics and what the operator set.
pub(crate) async fn show(shared: Arc<Shared>, request: NodeRef) -> Reply<NodeSummary> {
    shared.wait_synced(SYNC_WAIT).await;
    match shared.view().summary(&request.node_id, now_ms()) {
        Some(summary) => Reply::Ok(summary),
        None => Reply::Error(not_found(&request.node_id)),
    }
}

pub(crate) async fn cordon(shared: Arc<Shared>, request: NodeRef) -> Reply<NodeSummary> {
    change(&shared, &request.node_id, |admin| {
        admin.schedule = Schedule::Cordoned;
    })
    .await
    .into()
}

pub(crate) async fn uncordon(shared: Arc<Shared>, request: NodeRef) -> Reply<NodeSummary> {
    change(&shared, &request.node_id, |admin| {
        admin.schedule = Schedule::Open;
    })
    .await
    .into()
}

pub(crate) async fn drain(shared: Arc<Shared>, request: DrainRequest) -> Reply<NodeSummary> {
    let deadline_ms =
        now_ms().saturating_add(request.within_ms.unwrap_or(DEFAULT_DRAIN_DEADLINE_MS));
    change(&shared, &request.node_id, |admin| {
        // Draining again keeps the earlier deadline if it comes first: a second command
        // never gives running tasks more time than the operator first allowed by accident.
        let deadline_ms = match admin.schedule {
            Schedule::Draining {
                deadline_ms: earlier,
            } => earlier.min(deadline_ms),
            _ => deadline_ms,
        };
        admin.schedule = Schedule::Draining { deadline_ms };
    })
    .await
    .into()
}

pub(crate) async fn label(shared: Arc<Shared>, request: LabelRequest) -> Reply<NodeSummary> {
    if let Err(err) = check_labels(&request) {
        return Reply::Error(err);
    }
    change(&shared, &request.node_id, |admin| {
        admin.change_labels(&request.set, &request.remove);
    })
    .await
    .into()
}

fn check_labels(request: &LabelRequest) -> Result<(), ErrorBody> {
    let bad = request
        .set
        .keys()
        .chain(&request.remove)
        .find(|key| key.is_empty() || key.contains(char::is_whitespace));
    match bad {
        Some(key) => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("invalid label name {key:?}"),
        )),
        None => Ok(()),
    }
}

pub(crate) async fn role(shared: Arc<Shared>, request: RoleRequest) -> Reply<NodeSummary> {
    if let Some(bad) = request
        .roles
        .iter()
        .find(|role| role.is_empty() || role.contains(char::is_whitespace))
    {
        return Reply::Error(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("invalid role {bad:?}"),
        ));
    }
    change(&shared, &request.node_id, |admin| {
        admin.roles = Some(request.roles.clone());
    })
    .await
    .into()
}

pub(crate) async fn approve(shared: Arc<Shared>, request: NodeRef) -> Reply<NodeSummary> {
    change(&shared, &request.node_id, |admin| {
        admin.pending = false;
    })
    .await
    .into()
}

/// `rm`: forgets the node and its key binding. A marker takes the place of its records, so
/// that its agent, should it still run, is told to leave at its next heartbeat (and cannot
/// register again by its key), and so that recovery moves whatever was still queued for it.
/// The marker is written first and the records go after it, so a removal cut short (its
/// replica killed) is finished by running `rm` again.
pub(crate) async fn remove(shared: Arc<Shared>, request: NodeRef) -> Reply<Removed> {
    let node = request.node_id;
    let outcome = async {
        shared.wait_synced(SYNC_WAIT).await;
        let registered = is_registered(&shared, &node).await?;
        let marked = read_admin(&shared, &node)
            .await?
            .is_some_and(|admin| admin.removed_ms.is_some());
        if !registered && !marked {
            return Err(not_found(&node));
        }
        if !marked {
            let marker = NodeAdmin::removed(now_ms());
            let revision = put_record(&shared, topology::node_admin_key(&node), &marker).await?;
            shared.apply_written(revision, NodeChange::Admin(node.clone(), marker));
        }
        // Liveness before the registration: a registration without liveness is offline, a
        // liveness without a registration would be an orphan.
        for (key, change) in [
            (
                topology::node_live_key(&node),
                NodeChange::LivenessCleared(node.clone()),
            ),
            (
                topology::node_info_key(&node),
                NodeChange::Forgotten(node.clone()),
            ),
        ] {
            shared
                .nodes
                .delete(&key)
                .await
                .map_err(|err| internal("delete the node record", err))?;
            // The delete's revision is not returned; the view forgets the record now, and
            // the watch delivers the same deletion in its turn.
            shared.update(|view| view.apply(change));
        }
        binding::forget(&shared, &node).await?;
        tracing::info!(node_id = %node, "node removed");
        Ok(Removed {
            node_id: node.clone(),
        })
    }
    .await;
    outcome.into()
}

/// Whether the node has a registration: in this replica's view, or, should the view lag a
/// registration another replica just stored, in the bucket (and then the view learns it, so
/// that the answer can show the node).
async fn is_registered(shared: &Shared, node: &NodeId) -> Result<bool, ErrorBody> {
    if shared.view().registration(node).is_some() {
        return Ok(true);
    }
    let key = topology::node_info_key(node);
    let entry = shared
        .nodes
        .entry(&key)
        .await
        .map_err(|err| internal("read the node record", err))?
        .filter(|entry| entry.operation == kv::Operation::Put);
    let Some(entry) = entry else {
        return Ok(false);
    };
    let Some(record) = decode_value(&key, &entry.value) else {
        return Ok(false);
    };
    shared.apply_written(entry.revision, NodeChange::Registered(record));
    Ok(true)
}

/// Applies `edit` to the node's operator record, and answers with the node's row as this
/// replica now sees it. A node that is not registered, or is being removed, is `not_found`.
async fn change(
    shared: &Shared,
    node: &NodeId,
    edit: impl Fn(&mut NodeAdmin),
) -> Result<NodeSummary, ErrorBody> {
    shared.wait_synced(SYNC_WAIT).await;
    let registered = is_registered(shared, node).await?;
    let stored = rewrite_admin(shared, node, |current| {
        let mut admin = current.unwrap_or_default();
        if admin.removed_ms.is_some() || !registered {
            return Err(not_found(node));
        }
        edit(&mut admin);
        Ok(Some(admin))
    })
    .await?;
    tracing::info!(node_id = %node, admin = ?stored, "node changed by an operator");
    shared
        .view()
        .summary(node, now_ms())
        .ok_or_else(|| not_found(node))
}

/// Gives a node that joins (its id newly bound to a key) a fresh operator record: pending in
/// approval mode, and without the marker of an earlier removal of the same id. A record that
/// is neither removed nor missing stays as it is: the id was never removed (its binding was
/// lost, or it predates bindings), and what the operator set on it still holds.
pub(crate) async fn start_afresh(shared: &Shared, node: &NodeId) -> Result<(), ErrorBody> {
    let settings = settings(shared).await?;
    let fresh = NodeAdmin {
        pending: settings.approval == Approval::Manual,
        ..NodeAdmin::default()
    };
    rewrite_admin(shared, node, |current| {
        Ok(match current {
            Some(admin) if admin.removed_ms.is_none() => None,
            _ => Some(fresh.clone()),
        })
    })
    .await
    .map(drop)
}

/// Whether an operator removed the node, as the bucket says.
pub(crate) async fn is_removed(shared: &Shared, node: &NodeId) -> Result<bool, ErrorBody> {
    Ok(read_admin(shared, node)
        .await?
        .is_some_and(|admin| admin.removed_ms.is_some()))
}

/// The node's operator record as stored. One that cannot be decoded is an error, never taken
/// for the default: that would approve and open a node the operator had held back.
async fn read_admin(shared: &Shared, node: &NodeId) -> Result<Option<NodeAdmin>, ErrorBody> {
    Ok(read_admin_entry(shared, node)
        .await?
        .map(|(admin, _)| admin))
}

async fn read_admin_entry(
    shared: &Shared,
    node: &NodeId,
) -> Result<Option<(NodeAdmin, u64)>, ErrorBody> {
    let key = topology::node_admin_key(node);
    let entry = shared
        .nodes
        .entry(&key)
        .await
        .map_err(|err| internal("read the node's operator record", err))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    let admin = decode_value::<NodeAdmin>(&key, &entry.value)
        .ok_or_else(|| internal("read the node's operator record", "it is malformed"))?;
    Ok(Some((admin, entry.revision)))
}

/// Reads the node's operator record, lets `decide` say what to store in its place (`None`:
/// leave it), and stores that with compare-and-set, looking again when another write came
/// first. Returns what was stored.
async fn rewrite_admin(
    shared: &Shared,
    node: &NodeId,
    mut decide: impl FnMut(Option<NodeAdmin>) -> Result<Option<NodeAdmin>, ErrorBody>,
) -> Result<Option<NodeAdmin>, ErrorBody> {
    let key = topology::node_admin_key(node);
    for _ in 0..UPDATE_ATTEMPTS {
        let (current, revision) = match read_admin_entry(shared, node).await? {
            Some((admin, revision)) => (Some(admin), Some(revision)),
            None => (None, None),
        };
        let Some(next) = decide(current)? else {
            return Ok(None);
        };
        let value =
            codec::encode(&next).map_err(|err| internal("encode the operator record", err))?;
        let written = match revision {
            Some(revision) => shared
                .nodes
                .update(&key, value, revision)
                .await
                .map_err(|err| {
                    (
                        err.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        err.to_string(),
                    )
                }),
            None => shared.nodes.create(&key, value).await.map_err(|err| {
                (
                    err.kind() == kv::CreateErrorKind::AlreadyExists,
                    err.to_string(),
                )
            }),
        };
        match written {
            Ok(revision) => {
                shared.apply_written(revision, NodeChange::Admin(node.clone(), next.clone()));
                return Ok(Some(next));
            }
            Err((true, _)) => crate::contention_pause().await,
            Err((false, err)) => return Err(internal("store the node's operator record", err)),
        }
    }
    Err(internal("change the node", "its record kept changing"))
}

/// The cluster's settings as stored; the defaults when none are.
pub(crate) async fn settings(shared: &Shared) -> Result<ClusterSettings, ErrorBody> {
    let entry = shared
        .cluster
        .entry(topology::SETTINGS_KEY)
        .await
        .map_err(|err| internal("read the cluster settings", err))?;
    Ok(entry
        .filter(|entry| entry.operation == kv::Operation::Put)
        .and_then(|entry| decode_value(topology::SETTINGS_KEY, &entry.value))
        .unwrap_or_default())
}

/// `cluster.settings`: reads, or changes and then reads, the settings.
pub(crate) async fn cluster_settings(
    shared: Arc<Shared>,
    request: SettingsRequest,
) -> Reply<ClusterSettings> {
    let outcome = async {
        let mut current = settings(&shared).await?;
        if let Some(approval) = request.approval {
            current.approval = approval;
            let value =
                codec::encode(&current).map_err(|err| internal("encode the settings", err))?;
            shared
                .cluster
                .put(topology::SETTINGS_KEY, value)
                .await
                .map_err(|err| internal("store the settings", err))?;
            tracing::info!(settings = ?current, "cluster settings changed");
        }
        Ok(current)
    }
    .await;
    outcome.into()
}
