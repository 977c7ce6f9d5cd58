//! What operators set: join tokens, cluster settings, and each node's approval, schedule,
//! labels and roles. Requests go to the scheduler's endpoints (`apiary.v1.tokens.…`,
//! `apiary.v1.nodes.<command>`, `apiary.v1.cluster.settings`); the state lives in KV
//! (`APIARY_CLUSTER` for tokens and settings, `admin.<node>` in `APIARY_NODES`), so every
//! replica agrees.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::id::NodeId;
use crate::message::NodeMetrics;

// ---------------------------------------------------------------------------------------------
// Node administration
// ---------------------------------------------------------------------------------------------

/// Whether a node takes new work, as the operator set it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Takes new work.
    #[default]
    Open,
    /// Takes no new work; what is queued or running there stays.
    Cordoned,
    /// Takes no new work; running tasks may finish until `deadline_ms` (epoch ms), the rest
    /// is handed back and placed elsewhere.
    Draining { deadline_ms: u64 },
}

/// The operator's record of a node (KV `APIARY_NODES`, key `admin.<node>`). A node without
/// one is approved, open, and has only the labels and roles its agent reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeAdmin {
    /// Waiting for `apiary nodes approve` (the cluster is in approval mode).
    pub pending: bool,
    pub schedule: Schedule,
    /// Labels set by the operator; they win over the agent's labels of the same name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Agent labels the operator removed.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub removed_labels: BTreeSet<String>,
    /// Roles set by the operator; they replace the agent's when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<BTreeSet<String>>,
    /// When an operator removed the node (epoch ms). The record outlives the node's others
    /// so that its agent, should it still run, is told to leave instead of joining again,
    /// and so that its queued work is moved; a new registration of the id clears it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_ms: Option<u64>,
}

impl NodeAdmin {
    /// Whether placement may put new work on the node.
    pub fn takes_work(&self) -> bool {
        !self.pending && self.schedule == Schedule::Open && self.removed_ms.is_none()
    }

    /// The record that marks a node removed at `now_ms`.
    pub fn removed(now_ms: u64) -> Self {
        Self {
            removed_ms: Some(now_ms),
            ..Self::default()
        }
    }

    /// The node's labels as placement sees them: the agent's, less those the operator
    /// removed, with the operator's on top.
    pub fn effective_labels(&self, agent: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = agent
            .iter()
            .filter(|(key, _)| !self.removed_labels.contains(*key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        labels.extend(self.labels.clone());
        labels
    }

    /// The node's roles as placement sees them.
    pub fn effective_roles(&self, agent: &BTreeSet<String>) -> BTreeSet<String> {
        self.roles.clone().unwrap_or_else(|| agent.clone())
    }

    /// Applies a label change: `set` wins, `remove` takes away both the operator's and the
    /// agent's label of that name.
    pub fn change_labels(&mut self, set: &BTreeMap<String, String>, remove: &[String]) {
        for key in remove {
            self.labels.remove(key);
            self.removed_labels.insert(key.clone());
        }
        for (key, value) in set {
            self.removed_labels.remove(key);
            self.labels.insert(key.clone(), value.clone());
        }
    }
}

/// Which key a node id is bound to (KV `APIARY_CLUSTER`, key `nodes.<node>`), from its first
/// registration until an operator removes the node. Kept apart from the node bucket so that
/// losing `APIARY_NODES` loses no binding: the nodes register again under their keys without
/// a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBinding {
    pub public_key: String,
    /// The join token that admitted the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    pub bound_ms: u64,
}

/// A join token as a configuration value: serialized as the plain string, but never shown by
/// a debug print, so it stays out of logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretToken(pub String);

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(…)")
    }
}

impl SecretToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretToken {
    type Err = std::convert::Infallible;

    fn from_str(token: &str) -> Result<Self, Self::Err> {
        Ok(Self(token.to_owned()))
    }
}

impl From<String> for SecretToken {
    fn from(token: String) -> Self {
        Self(token)
    }
}

/// Whether a node takes new work now, as shown in `apiary nodes ls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduling {
    /// Takes new work.
    #[default]
    Open,
    /// Waits for approval.
    Pending,
    Cordoned,
    /// Draining, with tasks still running.
    Draining,
    /// Draining, and nothing runs there any more.
    Drained,
    /// An operator removed it; shown only while its removal is under way.
    Removed,
}

impl Scheduling {
    /// Judged from the operator's record and the node's latest metrics.
    pub fn of(admin: &NodeAdmin, metrics: Option<&NodeMetrics>) -> Self {
        if admin.removed_ms.is_some() {
            return Scheduling::Removed;
        }
        if admin.pending {
            return Scheduling::Pending;
        }
        match admin.schedule {
            Schedule::Open => Scheduling::Open,
            Schedule::Cordoned => Scheduling::Cordoned,
            Schedule::Draining { .. } => {
                if metrics.is_some_and(|metrics| metrics.running_tasks > 0) {
                    Scheduling::Draining
                } else {
                    Scheduling::Drained
                }
            }
        }
    }
}

impl fmt::Display for Scheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduling::Open => "open",
            Scheduling::Pending => "pending",
            Scheduling::Cordoned => "cordoned",
            Scheduling::Draining => "draining",
            Scheduling::Drained => "drained",
            Scheduling::Removed => "removed",
        })
    }
}

/// `apiary.v1.nodes.{show,cordon,uncordon,approve,rm}`: the node a command is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    pub node_id: NodeId,
}

/// `apiary.v1.nodes.drain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    pub node_id: NodeId,
    /// How long from now running tasks may take to finish; [`DEFAULT_DRAIN_DEADLINE_MS`]
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_ms: Option<u64>,
}

/// The drain deadline when none is given: ten minutes.
pub const DEFAULT_DRAIN_DEADLINE_MS: u64 = 10 * 60 * 1000;

/// `apiary.v1.nodes.label`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelRequest {
    pub node_id: NodeId,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `apiary.v1.nodes.role`: replaces the node's roles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRequest {
    pub node_id: NodeId,
    pub roles: BTreeSet<String>,
}

/// The answer to `apiary.v1.nodes.rm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub node_id: NodeId,
}

// ---------------------------------------------------------------------------------------------
// Cluster settings
// ---------------------------------------------------------------------------------------------

/// Whether new nodes may take work as soon as they join.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// A node with a valid token takes work at once.
    #[default]
    Auto,
    /// A new node is `pending` until `apiary nodes approve`.
    Manual,
}

/// The cluster's settings (KV `APIARY_CLUSTER`, key `settings`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSettings {
    pub approval: Approval,
}

/// `apiary.v1.cluster.settings`: an empty body reads the settings; a field changes it.
/// Answered with the settings in force afterwards.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SettingsRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

// ---------------------------------------------------------------------------------------------
// Join tokens
// ---------------------------------------------------------------------------------------------

/// A join token as given to an operator: `<id>.<secret>`. The cluster keeps only the id and
/// the secret's SHA-256; the secret is 256 random bits, so a plain hash is as strong as a
/// slow one and costs nothing per registration.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

/// Why a string is not a join token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a join token: expected <id>.<secret>")]
pub struct MalformedToken;

/// Why a token could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no randomness for a join token: {0}")]
pub struct TokenEntropyError(String);

impl JoinToken {
    const ID_BYTES: usize = 6;
    const SECRET_BYTES: usize = 32;

    /// A fresh token from the operating system's random source.
    pub fn generate() -> Result<Self, TokenEntropyError> {
        let mut id = [0u8; Self::ID_BYTES];
        let mut secret = [0u8; Self::SECRET_BYTES];
        getrandom::fill(&mut id).map_err(|err| TokenEntropyError(err.to_string()))?;
        getrandom::fill(&mut secret).map_err(|err| TokenEntropyError(err.to_string()))?;
        Ok(Self {
            id: hex::encode(id),
            secret: hex::encode(secret),
        })
    }

    /// Whether `id` has the shape of a token id (what `tokens revoke` takes).
    pub fn is_id(id: &str) -> bool {
        is_lower_hex(id, Self::ID_BYTES)
    }

    /// Reads `<id>.<secret>`, both lowercase hex of the right length.
    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        let (id, secret) = text.trim().split_once('.').ok_or(MalformedToken)?;
        let is_hex = |part: &str, bytes: usize| {
            part.len() == bytes * 2
                && part
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, Self::ID_BYTES) || !is_hex(secret, Self::SECRET_BYTES) {
            return Err(MalformedToken);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lowercase hex SHA-256 of the secret: what the cluster stores.
    pub fn secret_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether `record` is this token's (same id and secret hash).
    pub fn matches(&self, record: &TokenRecord) -> bool {
        record.info.id == self.id && record.secret_sha256 == self.secret_sha256()
    }

    /// The token as the operator copies it. Keep it out of logs.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

fn is_lower_hex(part: &str, bytes: usize) -> bool {
    part.len() == bytes * 2
        && part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret never reaches a log through a debug print.
        write!(f, "JoinToken({}.…)", self.id)
    }
}

/// What anyone may see of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    #[serde(default)]
    pub description: String,
    pub created_ms: u64,
    /// After this (epoch ms) the token admits no new node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// New nodes it may still admit; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// Nodes it admitted.
    #[serde(default)]
    pub uses: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// A token as stored (KV `APIARY_CLUSTER`, key `tokens.<id>`): its public part and the hash
/// of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub info: TokenInfo,
    pub secret_sha256: String,
    /// The node keys a token with limited uses admitted. A key it admitted before costs no
    /// second use: a registration retried after a lost reply, or redone after its replica
    /// died half-way, must not use up a one-use token and lock its own node out. (Tokens
    /// with unlimited uses keep no list; only their count matters.)
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub redeemed_by: BTreeSet<String>,
}

/// Why a presented token admits no node, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    Revoked,
    Expired,
    UsedUp,
}

impl TokenRecord {
    /// Whether the token may admit one more node at `now_ms`.
    pub fn admits(&self, now_ms: u64) -> Result<(), TokenRefusal> {
        if self.info.revoked_ms.is_some() {
            return Err(TokenRefusal::Revoked);
        }
        if self
            .info
            .expires_ms
            .is_some_and(|expires| now_ms >= expires)
        {
            return Err(TokenRefusal::Expired);
        }
        if self.info.uses_left == Some(0) {
            return Err(TokenRefusal::UsedUp);
        }
        Ok(())
    }

    /// Admits the node with `public_key` at `now_ms`: `Ok(None)` if this token already
    /// admitted that key (nothing to store), `Ok(Some(record))` with the use counted, or why
    /// not.
    pub fn redeem(&self, public_key: &str, now_ms: u64) -> Result<Option<Self>, TokenRefusal> {
        if self.redeemed_by.contains(public_key) {
            return Ok(None);
        }
        self.admits(now_ms)?;
        let mut next = self.clone();
        next.info.uses = next.info.uses.saturating_add(1);
        if let Some(left) = &mut next.info.uses_left {
            *left = left.saturating_sub(1);
            next.redeemed_by.insert(public_key.to_owned());
        }
        Ok(Some(next))
    }
}

/// `apiary.v1.tokens.create`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenCreateRequest {
    pub description: String,
    /// How long the token admits new nodes; forever when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// How many new nodes it admits; unlimited when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
}

/// The answer to `apiary.v1.tokens.create`: the only time the secret is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub info: TokenInfo,
}

/// `apiary.v1.tokens.list`: an empty body is a valid request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenListRequest {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// `apiary.v1.tokens.revoke`: answered with the token's record after revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevokeRequest {
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(token: &JoinToken) -> TokenRecord {
        TokenRecord {
            info: TokenInfo {
                id: token.id().to_owned(),
                description: String::new(),
                created_ms: 0,
                expires_ms: Some(1_000),
                uses_left: Some(1),
                uses: 0,
                revoked_ms: None,
            },
            secret_sha256: token.secret_sha256(),
            redeemed_by: BTreeSet::new(),
        }
    }

    #[test]
    fn a_token_round_trips_and_matches_only_its_record() {
        let token = JoinToken::generate().unwrap();
        let parsed = JoinToken::parse(&token.expose()).unwrap();
        assert_eq!(parsed, token);
        assert!(token.matches(&record(&token)));
        let other = JoinToken::generate().unwrap();
        assert!(!other.matches(&record(&token)));
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for text in ["", "abc", "abc.def", "ABCDEF012345.00", "zzzzzzzzzzzz.zz"] {
            assert_eq!(JoinToken::parse(text), Err(MalformedToken), "{text}");
        }
    }

    #[test]
    fn a_token_admits_until_revoked_expired_or_used_up() {
        let token = JoinToken::generate().unwrap();
        let fresh = record(&token);
        assert_eq!(fresh.admits(999), Ok(()));
        assert_eq!(fresh.admits(1_000), Err(TokenRefusal::Expired));
        let used = fresh.redeem("NKEY1", 0).unwrap().expect("a use to store");
        assert_eq!((used.info.uses, used.info.uses_left), (1, Some(0)));
        assert_eq!(used.admits(0), Err(TokenRefusal::UsedUp));
        // The same key again costs nothing and is admitted; another key is not.
        assert_eq!(used.redeem("NKEY1", 0), Ok(None));
        assert_eq!(used.redeem("NKEY2", 0), Err(TokenRefusal::UsedUp));
        let mut revoked = fresh.clone();
        revoked.info.revoked_ms = Some(5);
        assert_eq!(revoked.admits(0), Err(TokenRefusal::Revoked));
    }

    #[test]
    fn operator_labels_win_and_removals_hide_agent_labels() {
        let agent: BTreeMap<String, String> = [
            ("zone".to_owned(), "attic".to_owned()),
            ("disk".to_owned(), "ssd".to_owned()),
        ]
        .into();
        let mut admin = NodeAdmin::default();
        admin.change_labels(
            &[("zone".to_owned(), "cellar".to_owned())].into(),
            &["disk".to_owned()],
        );
        let labels = admin.effective_labels(&agent);
        assert_eq!(labels, [("zone".to_owned(), "cellar".to_owned())].into());
        admin.change_labels(&[("disk".to_owned(), "nvme".to_owned())].into(), &[]);
        assert_eq!(
            admin
                .effective_labels(&agent)
                .get("disk")
                .map(String::as_str),
            Some("nvme")
        );
    }

    #[test]
    fn a_draining_node_is_drained_once_nothing_runs() {
        let admin = NodeAdmin {
            schedule: Schedule::Draining { deadline_ms: 1 },
            ..NodeAdmin::default()
        };
        let busy = NodeMetrics {
            running_tasks: 1,
            ..NodeMetrics::default()
        };
        assert_eq!(Scheduling::of(&admin, Some(&busy)), Scheduling::Draining);
        assert_eq!(
            Scheduling::of(&admin, Some(&NodeMetrics::default())),
            Scheduling::Drained
        );
        let pending = NodeAdmin {
            pending: true,
            ..NodeAdmin::default()
        };
        assert!(!pending.takes_work());
        assert_eq!(Scheduling::of(&pending, None), Scheduling::Pending);
    }
}
