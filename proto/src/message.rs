//! Every message that crosses the bus.
//!
//! Structs are encoded as maps with field names (see [`crate::codec`]); optional and
//! defaulted fields let a newer peer add fields that an older one ignores. Enums are
//! externally tagged (`{"completed": {…}}`), which reads the same in MessagePack and JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{Namespace, NodeId, TaskId};
use crate::inventory::{GpuMetrics, Inventory};
use crate::payload::Payload;

// ---------------------------------------------------------------------------------------------
// Request/reply envelope
// ---------------------------------------------------------------------------------------------

/// The reply to every request subject: `{"ok": …}` or `{"error": {"code": …, "message": …}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(ErrorBody),
}

impl<T> From<Result<T, ErrorBody>> for Reply<T> {
    fn from(outcome: Result<T, ErrorBody>) -> Self {
        match outcome {
            Ok(value) => Reply::Ok(value),
            Err(error) => Reply::Error(error),
        }
    }
}

impl<T> Reply<T> {
    pub fn into_result(self) -> Result<T, ErrorBody> {
        match self {
            Reply::Ok(value) => Ok(value),
            Reply::Error(error) => Err(error),
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The precise reason, where a caller acts on it (an agent whose join token was refused
    /// stops instead of retrying).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Refusal>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// A refusal with its precise reason; the code follows from the reason.
    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Self {
            code: reason.code(),
            message: message.into(),
            reason: Some(reason),
        }
    }
}

/// Why the cluster refuses a node, precisely. None of these goes away by retrying: an
/// operator has to act (issue a token, remove the node), so an agent that gets one stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// A node id registered for the first time without a join token.
    TokenMissing,
    /// The token is malformed, or no such token exists, or its secret is wrong.
    TokenUnknown,
    TokenExpired,
    TokenRevoked,
    /// The token's uses are all spent.
    TokenUsedUp,
    /// The node id is bound to another node key.
    KeyMismatch,
    /// An operator removed the node. The agent records it and refuses to start again until
    /// the record is deleted.
    Removed,
}

impl Refusal {
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::KeyMismatch | Refusal::Removed => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthorized,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::TokenMissing => "no join token",
            Refusal::TokenUnknown => "unknown join token",
            Refusal::TokenExpired => "join token expired",
            Refusal::TokenRevoked => "join token revoked",
            Refusal::TokenUsedUp => "join token used up",
            Refusal::KeyMismatch => "node id bound to another key",
            Refusal::Removed => "removed by an operator",
        })
    }
}

/// The kinds of refusal, matchable by callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be decoded or is invalid.
    BadRequest,
    /// A join token is missing or not valid (see [`Refusal`]).
    Unauthorized,
    /// The subject and the body disagree, or the sender's key is not the one bound to the
    /// node.
    Forbidden,
    /// The thing asked about does not exist.
    NotFound,
    /// The responder failed on its side.
    Internal,
    /// The reply would be larger than the server carries (`max_payload`): ask for less (a
    /// smaller page).
    TooLarge,
}

impl ErrorCode {
    /// The HTTP-like status that the NATS micro protocol puts in `Nats-Service-Error-Code`.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Internal => 500,
            ErrorCode::TooLarge => 413,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not found",
            ErrorCode::Internal => "internal error",
            ErrorCode::TooLarge => "reply too large",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// What an agent reports about its host when it registers. Static for the life of the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub hostname: String,
    /// The CPU architecture, as Rust names it (`x86_64`, `aarch64`, …).
    pub arch: String,
    pub os: String,
    pub cpu_cores: u32,
    #[serde(default)]
    pub cpu_model: String,
    pub memory_bytes: u64,
    /// How many tasks the agent runs at once.
    pub slots: u32,
    pub agent_version: String,
    /// Free-form labels set by the operator (`zone=attic`, …).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A fresh id for each start of the agent process. A registration with a new incarnation
    /// tells the cluster that the previous process is gone, so whatever it held is handed
    /// out again at once instead of after the ack wait. Empty from agents that predate it.
    #[serde(default)]
    pub incarnation: String,
    /// The node's public key (an nkey, `N…`). Registrations and heartbeats are signed with
    /// its private half, which never leaves the node; the node id is bound to this key at
    /// first registration. Empty from agents that predate node keys.
    #[serde(default)]
    pub public_key: String,
    /// The host's hardware, services and runtime, in full. The flat fields above repeat the
    /// parts that placement and the node table have always read, so older readers keep
    /// working. Empty from agents that predate it.
    #[serde(default)]
    pub inventory: Inventory,
    /// The roles this node performs (`dns`, `gpu-host`, …), set by the operator; tasks can
    /// require them.
    #[serde(default)]
    pub roles: BTreeSet<String>,
}

/// `apiary.v1.node.<node>.register`: an agent asks to join.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub node: NodeInfo,
    /// The join token (`apiary tokens create`). Needed the first time a node id registers;
    /// a node already bound to its key registers again without one, and agents send it only
    /// until they have joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<crate::admin::SecretToken>,
}

/// The scheduler's answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    pub node_id: NodeId,
    /// How often the agent must heartbeat. The cluster, not the agent, decides, so that every
    /// reader judges liveness by the same interval.
    pub heartbeat_interval_ms: u64,
}

/// Whether a node takes new work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Running and taking work.
    #[default]
    Active,
    /// Shutting down on purpose: it takes no new work and is shown as gone at once, without
    /// waiting for missed heartbeats.
    Leaving,
}

/// Live metrics carried by every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeMetrics {
    /// Whole-host CPU use, 0–100.
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub running_tasks: u32,
    pub slots: u32,
    /// Tasks this agent has finished since it started.
    #[serde(default)]
    pub tasks_completed: u64,
    /// Each GPU of the inventory, by its index; empty on a node without GPUs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuMetrics>,
    /// Bytes free on the filesystem that holds the agent's state directory, where the node
    /// keeps its files; what `Requirements::min_free_disk_bytes` is checked against. Absent
    /// when the agent cannot tell (and from agents that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
}

/// `apiary.v1.node.<node>.heartbeat`: the agent is alive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: NodeId,
    /// Counts up from 1 for each agent process, so a reader can tell a restart.
    pub seq: u64,
    #[serde(default)]
    pub state: NodeState,
    pub metrics: NodeMetrics,
    /// The incarnation the agent registered with ([`NodeInfo::incarnation`]). A heartbeat
    /// from another incarnation than the registered one is answered `registered: false`.
    #[serde(default)]
    pub incarnation: String,
}

/// The scheduler's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// False when the replica that answered cannot place work on this agent: it has no
    /// record of the node (it was removed, or the bucket was lost) or the record is another
    /// incarnation's. The agent must register again.
    pub registered: bool,
    /// Whether the node takes new work, as the operator set it: a draining node stops
    /// pulling, finishes what runs until the deadline and hands back the rest.
    #[serde(default)]
    pub schedule: crate::admin::Schedule,
    /// An operator removed the node: the agent must leave and exit, not register again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leave: bool,
    /// The answering scheduler's clock: a drain deadline is `deadline_ms - now_ms` from when
    /// the reply arrived, whatever the node's own clock says (a Pi without a real-time
    /// clock may be hours off). 0 from schedulers that predate it.
    #[serde(default)]
    pub now_ms: u64,
    /// The bucket revision of the operator's record `schedule` comes from. A replica whose
    /// view lags answers with an older one, which the agent ignores, so a drain does not
    /// flap open and shut between replicas.
    #[serde(default)]
    pub schedule_revision: u64,
}

impl HeartbeatReply {
    /// The answer to a heartbeat from a node this replica cannot place work on.
    pub fn unknown() -> Self {
        Self {
            registered: false,
            schedule: crate::admin::Schedule::Open,
            leave: false,
            now_ms: crate::now_ms(),
            schedule_revision: 0,
        }
    }
}

/// What the cluster stores about a registered node (KV `APIARY_NODES`, key `info.<node>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub info: NodeInfo,
    pub registered_at_ms: u64,
    /// The join token that admitted the node id, so that the nodes a leaked token let in
    /// can be found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

/// The latest sign of life of a node (KV `APIARY_NODES`, key `live.<node>`). `last_seen_ms`
/// is stamped by the scheduler that received the heartbeat, so liveness never depends on the
/// node's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeLiveness {
    pub last_seen_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub seq: u64,
    #[serde(default)]
    pub state: NodeState,
    pub metrics: NodeMetrics,
    /// The agent process the heartbeat came from: a heartbeat of the same incarnation with a
    /// `seq` no higher than this one's is a replay, and is dropped.
    #[serde(default)]
    pub incarnation: String,
}

/// A node as shown to people: online, offline or gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Online,
    /// Heartbeats stopped arriving (see [`crate::liveness`]).
    Offline,
    /// The agent said it was leaving.
    Left,
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeStatus::Online => "online",
            NodeStatus::Offline => "offline",
            NodeStatus::Left => "left",
        })
    }
}

/// One row of the node table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub info: NodeInfo,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<NodeMetrics>,
    /// What the operator set: approval, cordon or drain, labels, roles.
    #[serde(default)]
    pub admin: crate::admin::NodeAdmin,
    /// Whether the node takes new work now, from `admin` and its running tasks.
    #[serde(default)]
    pub scheduling: crate::admin::Scheduling,
    /// The join token that admitted the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

/// `apiary.v1.nodes.list`: ask for the node table. An empty body is a valid request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesListRequest {
    /// Only nodes in this status; all nodes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    /// The page after this node id (the previous reply's `next`); from the first node when
    /// absent. Nodes come in node-id order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<NodeId>,
    /// The most nodes in the reply: [`NODES_PAGE_DEFAULT`] when absent, at most
    /// [`NODES_PAGE_MAX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The nodes in a `nodes.list` reply when the request names no limit: a page that fits the
/// default 1 MiB `max_payload` in JSON with room to spare (a node's summary is 300 to 500
/// bytes, more with many GPUs, services or labels).
pub const NODES_PAGE_DEFAULT: u32 = 500;
/// The most nodes a `nodes.list` reply holds, whatever the request asks.
pub const NODES_PAGE_MAX: u32 = 2_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodesListReply {
    pub nodes: Vec<NodeSummary>,
    /// Where the next page starts (`after` for the next request); absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<NodeId>,
}

/// `apiary.v1.node.<node>.status`: ask an agent directly. An empty body is a valid request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatusRequest {}

/// An agent's own account of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub info: NodeInfo,
    pub metrics: NodeMetrics,
    pub started_at_ms: u64,
    /// The interval the cluster gave the agent at registration.
    pub heartbeat_interval_ms: u64,
    /// Where the modules this process ran came from. Absent from older agents.
    #[serde(default)]
    pub modules: ModuleCacheStats,
    /// How long the node took over its last tasks (up to 1,024), from a dispatch's arrival
    /// to its result being ready to store: decode, a slot, the module, the run, the result.
    /// Absent until a task has run, and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_to_result: Option<Percentiles>,
}

/// A summary of recent durations, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    /// The summary of `samples` (any order); `None` for none.
    pub fn of(samples: impl IntoIterator<Item = u64>) -> Option<Self> {
        let mut sorted: Vec<u64> = samples.into_iter().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_unstable();
        let at = |quantile: f64| {
            let index = ((sorted.len() as f64 * quantile).ceil() as usize).saturating_sub(1);
            sorted[index.min(sorted.len() - 1)]
        };
        Some(Self {
            samples: sorted.len() as u64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: sorted[sorted.len() - 1],
        })
    }
}

/// Counts of where an agent's modules came from since it started: its memory, its disk
/// cache of compiled artifacts, or a fetch and a compile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleCacheStats {
    /// Runs whose compiled module was in memory.
    pub memory_hits: u64,
    /// Modules loaded from the disk cache (no compile).
    pub disk_loads: u64,
    /// Modules fetched from the module store and compiled.
    pub compiled: u64,
    /// What the disk cache holds now, in bytes.
    pub disk_bytes: u64,
    /// Modules fetched precompiled from `APIARY_ARTIFACTS` (runtime-only agents).
    #[serde(default)]
    pub precompiled: u64,
    /// Whether this agent compiles modules itself; a runtime-only one runs only precompiled
    /// modules.
    #[serde(default)]
    pub compiles: bool,
}

// ---------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------

/// A WebAssembly module in the module object store, named by the SHA-256 of its bytes. The
/// agent checks the digest of what it fetches, so a module cannot be swapped under a task.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModuleRef {
    /// Lowercase hex SHA-256 of the module bytes; also the object's name.
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
}

impl ModuleRef {
    /// The reference for these module bytes.
    pub fn for_bytes(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self {
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }

    /// The digest the JetStream object store records for these bytes
    /// (`SHA-256=<url-safe base64>`), or `None` if `sha256` is not valid hex.
    pub fn object_store_digest(&self) -> Option<String> {
        use base64::Engine as _;
        let raw = hex::decode(&self.sha256).ok()?;
        Some(format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(raw)
        ))
    }

    /// Whether `bytes` are the module this reference names.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(bytes)) == self.sha256
    }
}

/// The resources a task may use on its node. Enforced by the agent's sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Wall-clock time for one run.
    pub timeout_ms: u64,
    /// Linear memory the module may grow to.
    pub max_memory_bytes: u64,
    /// Bytes of stdout and of stderr, each.
    pub max_output_bytes: u64,
    /// Deterministic CPU budget in wasmtime fuel units; unlimited when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 30_000,
            max_memory_bytes: 64 * 1024 * 1024,
            max_output_bytes: 1024 * 1024,
            fuel: None,
        }
    }
}

/// What a node must have to run a task. Every field is optional; an empty set matches any
/// live node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Requirements {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cores: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Labels the node must carry with these exact values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How many GPUs the node must have. With `gpu_model` or `min_gpu_memory_bytes`, only
    /// GPUs that meet those count; either of them alone asks for one such GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_gpus: Option<u32>,
    /// A part of the GPU's name, matched without regard to case: `"4090"` and `"rtx 4090"`
    /// both match `NVIDIA GeForce RTX 4090`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// The memory each counted GPU must have in total (not free at the moment), in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_gpu_memory_bytes: Option<u64>,
    /// Roles the node must perform, every one of them.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub roles: BTreeSet<String>,
    /// Bytes the node must have free on the filesystem of its state directory, as its latest
    /// heartbeat reports (`NodeMetrics::disk_free_bytes`); a node that reports none does not
    /// match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_disk_bytes: Option<u64>,
}

/// How urgent a task is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// Every priority, the highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];
}

/// `apiary.v1.tasks.submit[.high|.low]` (stream `APIARY_TASKS`): a task as submitted, on the
/// subject of its priority ([`crate::subject::task_submit_for`]). Published with
/// `Nats-Msg-Id` set to the task id, so a retried submit is stored once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSubmission {
    /// Required, also in hand-written JSON: every de-duplication downstream (dispatch and
    /// result message ids) hangs on it, so it must be the same each time the message is read.
    pub id: TaskId,
    pub module: ModuleRef,
    /// Given to the module on stdin.
    #[serde(default)]
    pub input: Payload,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default)]
    pub priority: Priority,
    /// A core NATS subject where the outcome is delivered (the SDK's inbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub submitted_at_ms: u64,
    /// How failed attempts are retried. Absent: system failures (a lost node, an internal
    /// error) are retried up to the scheduler's default, guest failures are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::lifecycle::RetryPolicy>,
    /// How long the task may wait to be placed before it times out (`timed_out`); it waits
    /// as long as it takes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u64>,
    /// The submitter generated this id for this very submission (the SDK does), so no
    /// earlier task can have it: the scheduler does not look for one in the task archive.
    /// Hand-written submissions leave it out and get that look, which is what makes a
    /// resubmitted id return the existing task after JetStream's duplicate window.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh_id: bool,
    /// What the module may see beyond stdin, stdout and stderr; nothing when absent.
    #[serde(default, skip_serializing_if = "Grants::is_empty")]
    pub grants: Grants,
}

/// What a task may see of its host beyond stdin, stdout and stderr. Nothing unless granted:
/// without grants a module sees one argument (its name, `task`), no environment, no files,
/// and clocks stopped at the Unix epoch. A node's operator may forbid any grant
/// (`APIARY_FORBID_GRANTS`); a task asking for one its node forbids fails with
/// `invalid_task`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Grants {
    /// Arguments after the module's name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The host's wall clock and monotonic clock, as they are.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub clock: bool,
    /// A private directory, preopened as `/scratch`, empty at the start, deleted after the
    /// run, that may hold at most this many bytes (the sizes of its files together). A run
    /// that passes the cap fails with `disk_limit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_bytes: Option<u64>,
    /// The app-store namespace the host APIs act in (`kv`, `publish`). It comes from the
    /// submission, never from the guest, so a guest reaches no other namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Namespace>,
    /// The host API `apiary.kv_*`: get, put, create, update (compare-and-swap), delete and
    /// list the keys of `namespace`'s app store.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kv: bool,
    /// The host API `apiary.publish`: publish to the topics of `namespace`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub publish: bool,
}

/// One kind of grant, as an operator names it to forbid it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    Args,
    Env,
    Clock,
    Scratch,
    Kv,
    Publish,
}

impl Grants {
    pub fn is_empty(&self) -> bool {
        self.kinds().is_empty()
    }

    /// The kinds of grant asked for.
    pub fn kinds(&self) -> BTreeSet<GrantKind> {
        let mut kinds = BTreeSet::new();
        if !self.args.is_empty() {
            kinds.insert(GrantKind::Args);
        }
        if !self.env.is_empty() {
            kinds.insert(GrantKind::Env);
        }
        if self.clock {
            kinds.insert(GrantKind::Clock);
        }
        if self.scratch_bytes.is_some() {
            kinds.insert(GrantKind::Scratch);
        }
        if self.kv {
            kinds.insert(GrantKind::Kv);
        }
        if self.publish {
            kinds.insert(GrantKind::Publish);
        }
        kinds
    }

    /// Why these grants cannot be given whatever the node: a host API granted without the
    /// namespace it would act in.
    pub fn check(&self) -> Result<(), String> {
        if (self.kv || self.publish) && self.namespace.is_none() {
            return Err("the kv and publish grants need a namespace to act in".into());
        }
        Ok(())
    }
}

impl std::fmt::Display for GrantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GrantKind::Args => "args",
            GrantKind::Env => "env",
            GrantKind::Clock => "clock",
            GrantKind::Scratch => "scratch",
            GrantKind::Kv => "kv",
            GrantKind::Publish => "publish",
        })
    }
}

/// `apiary.v1.node.<node>.dispatch` (stream `APIARY_DISPATCH`): a task placed on a node.
/// Carries the whole submission, so the node needs nothing else and a task lost with its node
/// is placed again from this message alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    pub task: TaskSubmission,
    /// 1 for the first placement; counts up each time the task is placed again because its
    /// node was lost.
    pub attempt: u32,
    pub dispatched_at_ms: u64,
}

/// Why a task produced no output. Matchable by SDK users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskErrorKind {
    /// The bytes are not a valid WebAssembly module, or it imports what the sandbox does not
    /// provide.
    InvalidModule,
    /// The module is not in the module store.
    ModuleNotFound,
    /// The module store returned bytes whose digest is not the one asked for.
    ModuleDigestMismatch,
    /// The module trapped (unreachable, out-of-bounds access, stack overflow, …).
    Trap,
    /// The run took longer than `limits.timeout_ms`.
    Timeout,
    /// The module tried to grow its memory past `limits.max_memory_bytes`.
    MemoryLimit,
    /// The module wrote more than `limits.max_output_bytes` to stdout or stderr.
    OutputLimit,
    /// The module used up `limits.fuel`.
    FuelExhausted,
    /// The module wrote more to its scratch directory than its grant allows.
    DiskLimit,
    /// The task message itself was invalid.
    InvalidTask,
    /// The nodes the task was placed on kept being lost (crashing or leaving) before it
    /// finished, as many times as the scheduler allows attempts.
    NodeLost,
    /// Something failed on the node's side; not the module's fault.
    Internal,
    /// The task was cancelled before it finished.
    Cancelled,
    /// No node took the task within its queue timeout.
    QueueTimeout,
}

impl fmt::Display for TaskErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskErrorKind::InvalidModule => "invalid module",
            TaskErrorKind::ModuleNotFound => "module not found",
            TaskErrorKind::ModuleDigestMismatch => "module digest mismatch",
            TaskErrorKind::Trap => "trap",
            TaskErrorKind::Timeout => "timeout",
            TaskErrorKind::MemoryLimit => "memory limit exceeded",
            TaskErrorKind::OutputLimit => "output limit exceeded",
            TaskErrorKind::FuelExhausted => "fuel exhausted",
            TaskErrorKind::DiskLimit => "scratch disk limit exceeded",
            TaskErrorKind::InvalidTask => "invalid task",
            TaskErrorKind::NodeLost => "node lost",
            TaskErrorKind::Internal => "internal error",
            TaskErrorKind::Cancelled => "cancelled",
            TaskErrorKind::QueueTimeout => "queue timeout",
        })
    }
}

/// A task failure with its kind and a human-readable explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct TaskError {
    pub kind: TaskErrorKind,
    pub message: String,
}

impl TaskError {
    pub fn new(kind: TaskErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The module ran to its end. A non-zero exit code is the program's answer, not an apiary
    /// failure.
    Completed {
        exit_code: i32,
        stdout: Payload,
        stderr: Payload,
    },
    /// The module could not run to its end. Whatever it wrote to stderr before is kept.
    Failed {
        error: TaskError,
        #[serde(default)]
        stderr: Payload,
    },
}

/// `apiary.v1.node.<node>.result` (stream `APIARY_RESULTS`): the outcome of one attempt.
/// Published with `Nats-Msg-Id` `<task>.<attempt>`, so a re-sent result is stored once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: TaskId,
    pub node_id: NodeId,
    pub attempt: u32,
    pub outcome: Outcome,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// Copied from the submission, so the scheduler can deliver the result without keeping
    /// any task state of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Where stdout is when it was too large to travel in the result (more than the server's
    /// `max_payload` allows): an object in `APIARY_RESULT_OBJECTS`. `stdout` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_object: Option<ResultObject>,
    /// What the run used, as the node measured it. Absent in results no node ran (a lost
    /// node's, one the scheduler made up for a task that ended without a run) and in
    /// results from agents older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RunUsage>,
}

/// What one run of a module used, measured by the node that ran it. The figures are exact
/// counts, not estimates, so that a ledger of what each node did can be summed from them.
/// A run that never started (the module could not be fetched, or asked for more than the
/// node allows) reports zeros beside the module's digest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunUsage {
    /// The module's SHA-256, lowercase hex.
    pub module_sha256: String,
    /// Fuel the run consumed: wasmtime's count of the WebAssembly operations executed
    /// (metering is always on, with or without a fuel limit).
    pub fuel_consumed: u64,
    /// From the module's instantiation to the end of its run, in microseconds.
    pub wall_time_us: u64,
    /// The largest the module's linear memory was during the run, in bytes.
    pub peak_memory_bytes: u64,
    /// Bytes the module wrote to stdout, counted up to the output limit.
    pub stdout_bytes: u64,
    /// Whether stdout was cut: the module wrote past its output limit.
    pub stdout_cut: bool,
    /// Bytes the module wrote to stderr, counted up to the output limit.
    pub stderr_bytes: u64,
    /// Whether stderr was cut: the module wrote past its output limit, or the result was too
    /// large for the server and stderr was shortened to fit.
    pub stderr_cut: bool,
    /// What the scratch directory held at the end of the run, in bytes (0 without one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scratch_bytes: u64,
    /// Calls the module made to the host APIs (`apiary.*` imports).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub host_calls: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// The name of an attempt's stdout in `APIARY_RESULT_OBJECTS`: `<task>.<attempt>.stdout`.
pub fn stdout_object_name(task: &TaskId, attempt: u32) -> String {
    format!("{}.stdout", attempt_msg_id(task, attempt))
}

/// A task's output kept in the result object store because it was too large for a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultObject {
    /// The object's name in `APIARY_RESULT_OBJECTS`: `<task>.<attempt>.stdout`.
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// The de-duplication id (`Nats-Msg-Id`) of one attempt of a task, in `APIARY_DISPATCH` and
/// `APIARY_RESULTS`: a re-sent dispatch or result of the same attempt is stored once.
pub fn attempt_msg_id(task: &TaskId, attempt: u32) -> String {
    format!("{task}.{attempt}")
}

impl Dispatch {
    pub fn msg_id(&self) -> String {
        attempt_msg_id(&self.task.id, self.attempt)
    }
}

impl TaskResult {
    pub fn msg_id(&self) -> String {
        attempt_msg_id(&self.task_id, self.attempt)
    }

    /// The de-duplication id of a scheduler's `node_lost` result for this attempt: its own,
    /// so that the lost node's real result for the attempt, should it still come (the node was
    /// only cut off), is stored and delivered too.
    pub fn node_lost_msg_id(&self) -> String {
        format!("{}.lost", self.msg_id())
    }
}

// ---------------------------------------------------------------------------------------------
// Task records: status, results, listing, cancel, dead letters
// ---------------------------------------------------------------------------------------------

/// `apiary.v1.tasks.status` and `.cancel`: the task asked about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    pub id: TaskId,
}

/// `apiary.v1.tasks.result`: a task's result, once it has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResultRequest {
    pub id: TaskId,
}

/// The answer to `apiary.v1.tasks.result`: the record, and the result that ended the task
/// (absent while it lives, for a task that ended without one, or once the result has aged
/// out of `APIARY_RESULTS`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResultReply {
    pub record: crate::lifecycle::TaskRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
}

/// `apiary.v1.tasks.ls`: task records, filtered. An empty body lists the live tasks and those
/// that ended in the last hour, up to 100.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskListRequest {
    /// Only tasks in this state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::lifecycle::TaskState>,
    /// Only tasks whose latest attempt is (or was) on this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// Only tasks submitted within this many milliseconds; one hour when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// The most records in one page; 100 when absent, at most 1,000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where the previous page stopped (`TaskListReply::next`). Live tasks are on the first
    /// page only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskListReply {
    pub tasks: Vec<crate::lifecycle::TaskRecord>,
    /// The cursor of the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// `apiary.v1.node.<node>.started` (core NATS): the agent started an attempt. Lossy on
/// purpose: a lost one leaves the record `scheduled` until the result, nothing worse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptStarted {
    pub task_id: TaskId,
    pub attempt: u32,
    pub started_at_ms: u64,
}

/// `apiary.v1.node.<node>.cancel` (core NATS): stop this attempt if it runs here. The task's
/// record is already `cancelled`; whatever the run still reports is discarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelAttempt {
    pub task_id: TaskId,
    pub attempt: u32,
}

/// One entry of the dead-letter stream: the final record, with the whole submission (its
/// input included), so it can be requeued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub record: crate::lifecycle::TaskRecord,
    /// The entry's sequence in `APIARY_DLQ`; set by readers, not stored.
    #[serde(default)]
    pub sequence: u64,
}

/// `apiary.v1.dlq.ls`: dead letters, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DlqListRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DlqListReply {
    pub entries: Vec<DeadLetter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_taken_from_the_sorted_samples() {
        let summary = Percentiles::of((1..=100).rev()).expect("samples");
        assert_eq!(
            (
                summary.samples,
                summary.p50_us,
                summary.p99_us,
                summary.max_us
            ),
            (100, 50, 99, 100)
        );
        assert_eq!(Percentiles::of([7]).map(|p| p.p99_us), Some(7));
        assert_eq!(Percentiles::of(std::iter::empty()), None);
    }
    use crate::codec::Encoding;

    fn sample_result() -> TaskResult {
        TaskResult {
            task_id: TaskId::new("t1").unwrap(),
            node_id: NodeId::new("n1").unwrap(),
            attempt: 1,
            outcome: Outcome::Completed {
                exit_code: 0,
                stdout: Payload::from("3 words\n"),
                stderr: Payload::default(),
            },
            started_at_ms: 1,
            finished_at_ms: 2,
            reply_to: Some("_INBOX.x".into()),
            stdout_object: None,
            usage: None,
        }
    }

    #[test]
    fn results_round_trip_in_both_encodings() {
        let result = sample_result();
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encoding.encode(&result).unwrap();
            assert_eq!(encoding.decode::<TaskResult>(&bytes).unwrap(), result);
        }
    }

    #[test]
    fn json_results_read_naturally() {
        let json: serde_json::Value =
            serde_json::from_slice(&Encoding::Json.encode(&sample_result()).unwrap()).unwrap();
        assert_eq!(json["outcome"]["completed"]["stdout"], "3 words\n");
        assert_eq!(json["outcome"]["completed"]["exit_code"], 0);
    }

    #[test]
    fn a_minimal_json_submission_gets_defaults() {
        let submission: TaskSubmission =
            serde_json::from_str(r#"{"id": "t-1", "module": {"sha256": "ab"}, "input": "hello"}"#)
                .unwrap();
        assert_eq!(submission.input.as_bytes(), b"hello");
        assert_eq!(submission.limits, Limits::default());
        assert_eq!(submission.priority, Priority::Normal);
        assert_eq!(submission.id.as_str(), "t-1");
    }

    #[test]
    fn a_submission_without_an_id_is_refused() {
        let err =
            serde_json::from_str::<TaskSubmission>(r#"{"module": {"sha256": "ab"}}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `id`"), "{err}");
    }

    #[test]
    fn error_replies_are_tagged() {
        let reply: Reply<RegisterReply> =
            Reply::Error(ErrorBody::new(ErrorCode::Forbidden, "bad token"));
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"forbidden","message":"bad token"}}"#
        );
    }

    #[test]
    fn node_records_from_older_agents_still_read() {
        let info: NodeInfo = serde_json::from_str(
            r#"{"node_id": "n", "hostname": "h", "arch": "x86_64", "os": "linux",
                "cpu_cores": 2, "memory_bytes": 1, "slots": 2, "agent_version": "0"}"#,
        )
        .unwrap();
        assert_eq!(info.inventory, Inventory::default());
        assert!(info.roles.is_empty());
        let metrics: NodeMetrics = serde_json::from_str(
            r#"{"cpu_percent": 1.5, "memory_used_bytes": 1, "memory_total_bytes": 2,
                "running_tasks": 0, "slots": 2}"#,
        )
        .unwrap();
        assert!(metrics.gpus.is_empty());
        assert_eq!(metrics.disk_free_bytes, None);
    }

    #[test]
    fn node_info_with_inventory_and_roles_round_trips() {
        let mut info: NodeInfo = serde_json::from_str(
            r#"{"node_id": "n", "hostname": "h", "arch": "x86_64", "os": "linux",
                "cpu_cores": 2, "memory_bytes": 1, "slots": 2, "agent_version": "0",
                "roles": ["dns", "host"],
                "inventory": {"gpus": [{"index": 0, "name": "Tesla T4"}]}}"#,
        )
        .unwrap();
        assert_eq!(info.inventory.gpus[0].name, "Tesla T4");
        assert!(info.roles.contains("dns"));
        info.inventory.runtime.slots = 2;
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encoding.encode(&info).unwrap();
            assert_eq!(encoding.decode::<NodeInfo>(&bytes).unwrap(), info);
        }
    }

    #[test]
    fn unset_requirements_stay_off_the_wire_and_set_ones_round_trip() {
        assert_eq!(
            serde_json::to_string(&Requirements::default()).unwrap(),
            "{}"
        );
        let requirements = Requirements {
            min_gpus: Some(2),
            gpu_model: Some("a100".into()),
            min_gpu_memory_bytes: Some(40 << 30),
            roles: ["dns".to_owned()].into(),
            min_free_disk_bytes: Some(1 << 30),
            ..Requirements::default()
        };
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encoding.encode(&requirements).unwrap();
            assert_eq!(
                encoding.decode::<Requirements>(&bytes).unwrap(),
                requirements
            );
        }
    }

    #[test]
    fn module_refs_check_their_bytes() {
        let module = ModuleRef::for_bytes(b"\0asm");
        assert_eq!(module.size, 4);
        assert!(module.matches(b"\0asm"));
        assert!(
            module
                .object_store_digest()
                .unwrap()
                .starts_with("SHA-256=")
        );
        assert!(!module.matches(b"\0asn"));
    }
}
