//! Which key a node id belongs to (KV `APIARY_CLUSTER`, key `nodes.<node>`): bound at the
//! id's first registration, which spends a join token, and forgotten when an operator removes
//! the node. The binding lives apart from the node bucket, so a lost `APIARY_NODES` loses no
//! binding and costs no token: the nodes register again under their keys.

use apiary_proto::admin::{NodeBinding, SecretToken};
use apiary_proto::message::{ErrorBody, ErrorCode, Refusal};
use apiary_proto::{NodeId, codec, now_ms, topology};
use async_nats::jetstream::kv;

use crate::nodes::decode_value;
use crate::{Counters, Shared, admin};

/// How often an admission looks again when another registration of the same id came first.
const ADMIT_ATTEMPTS: usize = 8;

fn internal(what: &str, err: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("failed to {what}: {err}"))
}

/// How a registration's key was admitted.
#[derive(Debug)]
pub(crate) struct Admission {
    /// The id was not bound before: a token was spent and the node is new to the cluster.
    pub joined: bool,
    /// The token that admitted the id.
    pub token_id: Option<String>,
}

/// The refusal for a key other than the bound one, counted.
pub(crate) fn key_mismatch(shared: &Shared, node: &NodeId) -> ErrorBody {
    Counters::count(&shared.counters.identity_refused);
    tracing::warn!(node_id = %node, "refused a node key other than the one bound to this node id");
    ErrorBody::refused(
        Refusal::KeyMismatch,
        format!(
            "node id {node} is bound to another key; an operator can remove the node \
             (apiary nodes rm {node}) to free the id"
        ),
    )
}

/// Admits `public_key` for `node`: the key the id is bound to is admitted as it is; an
/// unbound id is bound to it if `token` admits a new node. In that order: the token is
/// redeemed (once per key, so a retry costs nothing), the node's operator record is started
/// afresh (pending in approval mode), and only then is the binding stored, so that a replica
/// killed half-way leaves nothing that admits the key without a token, and no node that
/// skipped approval.
pub(crate) async fn admit(
    shared: &Shared,
    node: &NodeId,
    public_key: &str,
    token: Option<&SecretToken>,
) -> Result<Admission, ErrorBody> {
    let key = topology::node_binding_key(node);
    for _ in 0..ADMIT_ATTEMPTS {
        if let Some(binding) = read(shared, &key).await? {
            if binding.public_key != public_key {
                return Err(key_mismatch(shared, node));
            }
            return Ok(Admission {
                joined: false,
                token_id: binding.token_id,
            });
        }
        let redeemed = shared
            .redeemer
            .redeem(&shared.cluster, token, public_key, now_ms())
            .await;
        let token_id = match redeemed {
            Ok(token_id) => token_id,
            Err(refusal) => {
                if refusal.reason.is_some() {
                    Counters::count(&shared.counters.tokens_refused);
                }
                return Err(refusal);
            }
        };
        admin::start_afresh(shared, node).await?;
        let binding = NodeBinding {
            public_key: public_key.to_owned(),
            token_id: Some(token_id.clone()),
            bound_ms: now_ms(),
        };
        let value = codec::encode(&binding).map_err(|err| internal("encode the binding", err))?;
        match shared.cluster.create(&key, value).await {
            Ok(_) => {
                return Ok(Admission {
                    joined: true,
                    token_id: Some(token_id),
                });
            }
            // Another registration of the id came first: whose key is it?
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                crate::contention_pause().await;
            }
            Err(err) => return Err(internal("store the node's key binding", err)),
        }
    }
    Err(internal("bind the node's key", "the binding kept changing"))
}

/// Forgets the node's binding, so that the id may join again with another key.
pub(crate) async fn forget(shared: &Shared, node: &NodeId) -> Result<(), ErrorBody> {
    shared
        .cluster
        .delete(topology::node_binding_key(node))
        .await
        .map_err(|err| internal("delete the node's key binding", err))
}

async fn read(shared: &Shared, key: &str) -> Result<Option<NodeBinding>, ErrorBody> {
    let entry = shared
        .cluster
        .entry(key)
        .await
        .map_err(|err| internal("read the node's key binding", err))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    // A binding that cannot be read must not be taken for none: that would let any key
    // with a token take the id.
    decode_value(key, &entry.value)
        .map(Some)
        .ok_or_else(|| internal("read the node's key binding", "it is malformed"))
}
