//! JetStream topology: every stream, consumer, KV bucket and object store apiary uses, with
//! its configuration, and [`ensure`] to create whichever are missing.
//!
//! | name              | kind         | subjects                        | retention                 |
//! |-------------------|--------------|---------------------------------|---------------------------|
//! | `APIARY_TASKS`    | stream       | `apiary.v1.tasks.submit`, `….submit.high`, `….submit.low` | work queue |
//! | `APIARY_DISPATCH` | stream       | `apiary.v1.node.*.dispatch`     | work queue                |
//! | `APIARY_RESULTS`  | stream       | `apiary.v1.node.*.result`       | limits (age, bytes)       |
//! | `APIARY_NODES`    | KV bucket    | `info.<node>`, `live.<node>`, `admin.<node>` | latest value per key |
//! | `APIARY_CLUSTER`  | KV bucket    | `tokens.<id>`, `nodes.<node>`, `settings` | latest value per key |
//! | `APIARY_MODULES`  | object store | one object per module digest    | until deleted             |
//! | `APIARY_TASK_RECORDS` | KV bucket | `<task>` while the task lives  | latest value per key      |
//! | `APIARY_TASK_ARCHIVE` | stream   | `apiary.v1.tasks.archive.<shard>` | limits (retention, bytes) |
//! | `APIARY_DLQ`      | stream       | `apiary.v1.tasks.dead`          | limits (7 days, bytes)    |
//! | `APIARY_RESULT_OBJECTS` | object store | outputs too large for a message | 24 h              |
//!
//! Every component calls [`ensure`] at start, so whichever starts first creates the topology
//! and the order in which an operator starts things does not matter. A stream made by an
//! earlier version gets the subjects added since (the priority queues of `APIARY_TASKS`).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};

use crate::app::{MAX_HISTORY, StoreSettings};
use crate::id::{Namespace, NodeId};
use crate::message::Priority;
use crate::subject::{self, NodeVerb};

pub const TASKS_STREAM: &str = "APIARY_TASKS";
pub const DISPATCH_STREAM: &str = "APIARY_DISPATCH";
pub const RESULTS_STREAM: &str = "APIARY_RESULTS";
pub const NODES_BUCKET: &str = "APIARY_NODES";
pub const MODULES_BUCKET: &str = "APIARY_MODULES";
/// Modules precompiled for a platform, for runtime-only agents ([`artifact_name`]). Agents
/// load what they find here as machine code, so only operators may write it (see
/// broker-config/production.conf.example).
pub const ARTIFACTS_BUCKET: &str = "APIARY_ARTIFACTS";
pub const CLUSTER_BUCKET: &str = "APIARY_CLUSTER";
pub const TASK_RECORDS_BUCKET: &str = "APIARY_TASK_RECORDS";
pub const TASK_ARCHIVE_STREAM: &str = "APIARY_TASK_ARCHIVE";
pub const DLQ_STREAM: &str = "APIARY_DLQ";
pub const RESULT_OBJECTS_BUCKET: &str = "APIARY_RESULT_OBJECTS";
/// The throw-away stream of `apiary bench`'s raw JetStream baseline, created and deleted by
/// each run.
pub const BENCH_STREAM: &str = "APIARY_BENCH_RAW";

/// The durable consumer on `APIARY_TASKS` that every scheduler replica pulls normal-priority
/// tasks from (it was the only one before priorities, and kept its name). Replicas share it,
/// which is how JetStream spreads the queue across them.
pub const SCHEDULER_TASKS_CONSUMER: &str = "scheduler";
/// The consumer of the high-priority queue, shared by the replicas like the normal one.
pub const SCHEDULER_TASKS_HIGH_CONSUMER: &str = "scheduler-high";
/// The consumer of the low-priority queue, shared by the replicas like the normal one.
pub const SCHEDULER_TASKS_LOW_CONSUMER: &str = "scheduler-low";
/// The durable consumer on `APIARY_RESULTS` that every scheduler replica pulls from.
pub const SCHEDULER_RESULTS_CONSUMER: &str = "scheduler-results";

/// How long a pulled message may stay unacknowledged before JetStream hands it to someone
/// else. Long-running work keeps its message by sending progress acks.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// How often whoever holds a message for long (a running task, a task waiting for a node)
/// sends a progress ack, so the ack wait never runs out under it.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// The ack wait of the scheduler replicas' shared consumers (submissions, results). A replica
/// places or delivers a message within milliseconds and never holds one for long (a task
/// that cannot be placed now goes back to the queue), so a short wait costs nothing, and what
/// a replica held when it was killed goes to another replica within seconds rather than
/// after [`ACK_WAIT`].
pub const SCHEDULER_ACK_WAIT: Duration = Duration::from_secs(5);

/// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long results are kept for late readers.
pub const RESULTS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// The most disk the results stream may use before the oldest results are dropped; small
/// enough for a Raspberry Pi's SD card.
pub const RESULTS_MAX_BYTES: i64 = 256 * 1024 * 1024;

/// A part of the topology that could not be created or opened.
#[derive(Debug, thiserror::Error)]
#[error("failed to ensure {kind} {name}: {source}")]
pub struct TopologyError {
    pub kind: &'static str,
    pub name: &'static str,
    #[source]
    pub source: async_nats::Error,
}

impl TopologyError {
    fn new(kind: &'static str, name: &'static str, source: impl Into<async_nats::Error>) -> Self {
        Self {
            kind,
            name,
            source: source.into(),
        }
    }
}

pub fn tasks_stream() -> stream::Config {
    stream::Config {
        name: TASKS_STREAM.into(),
        description: Some("apiary: submitted tasks waiting for placement".into()),
        // One queue per priority, each a fixed subject: a submission to any other subject
        // is refused by the server rather than stored where no consumer reads it.
        subjects: [Priority::Normal, Priority::High, Priority::Low]
            .map(|priority| subject::task_submit_for(priority).into())
            .to_vec(),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

pub fn dispatch_stream() -> stream::Config {
    stream::Config {
        name: DISPATCH_STREAM.into(),
        description: Some("apiary: tasks placed on a node, until the node finishes them".into()),
        subjects: vec![subject::all_nodes(NodeVerb::Dispatch).into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

pub fn results_stream() -> stream::Config {
    stream::Config {
        name: RESULTS_STREAM.into(),
        description: Some("apiary: outcomes of task attempts".into()),
        subjects: vec![subject::all_nodes(NodeVerb::Result).into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: RESULTS_MAX_AGE,
        max_bytes: RESULTS_MAX_BYTES,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// How long a finished task's record is kept by default (`APIARY_TASK_RETENTION`).
pub const TASK_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// The most disk the task archive may use by default before its oldest records go.
pub const TASK_ARCHIVE_MAX_BYTES: i64 = 1024 * 1024 * 1024;
/// How long dead tasks wait in the dead-letter stream for an operator.
pub const DLQ_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
pub const DLQ_MAX_BYTES: i64 = 256 * 1024 * 1024;

/// The records of live tasks, one key per task (the task id), written with compare-and-set
/// at each transition and purged once the task has ended and its final record is archived.
/// Its subjects therefore number the tasks alive, not every task ever run.
pub fn task_records_bucket() -> kv::Config {
    kv::Config {
        bucket: TASK_RECORDS_BUCKET.into(),
        description: "apiary: records of tasks that have not ended".into(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The prefix of every app-store bucket; the namespace follows it.
pub const APP_BUCKET_PREFIX: &str = "APIARY_KV_";

/// The bucket of a namespace's app store. One bucket per namespace, so that a namespace's
/// settings are its bucket's, and server permissions can fence a tenant to its own bucket's
/// subjects (`$KV.APIARY_KV_<namespace>.>`) and stream (`KV_APIARY_KV_<namespace>`).
pub fn app_bucket_name(namespace: &Namespace) -> String {
    format!("{APP_BUCKET_PREFIX}{namespace}")
}

/// The subject of a key (or, with wildcards, a key filter) in a namespace's bucket:
/// `$KV.APIARY_KV_<namespace>.<key>`. The key must have passed [`crate::app::check_key`]
/// (a filter, [`crate::app::KeyPrefix::parse`]).
pub fn app_key_subject(namespace: &Namespace, key: &str) -> String {
    format!("$KV.{}.{key}", app_bucket_name(namespace))
}

/// The key of a subject of a namespace's bucket: the inverse of [`app_key_subject`].
pub fn parse_app_key_subject<'a>(namespace: &Namespace, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix("$KV.")?
        .strip_prefix(APP_BUCKET_PREFIX)?
        .strip_prefix(namespace.as_str())?
        .strip_prefix('.')
}

/// The prefix of every app-messaging stream; the namespace follows it.
pub const APP_TOPICS_STREAM_PREFIX: &str = "APIARY_TOPICS_";

/// How long a durable topic's messages wait for their subscribers at most.
pub const APP_TOPICS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// The most a namespace's durable topics keep, oldest dropped first: bounded, so that a
/// runaway publisher cannot fill the store the task streams share. The server reserves it.
pub const APP_TOPICS_MAX_BYTES: i64 = 128 << 20;

/// The stream behind a namespace's durable subscribers: every topic of the namespace, kept
/// for [`APP_TOPICS_MAX_AGE`] (or [`APP_TOPICS_MAX_BYTES`]), so that a durable subscriber
/// that was away finds what was published meanwhile.
pub fn app_topics_stream(namespace: &Namespace) -> stream::Config {
    stream::Config {
        name: format!("{APP_TOPICS_STREAM_PREFIX}{namespace}"),
        description: Some(format!("apiary: durable topics of namespace {namespace}")),
        subjects: vec![subject::app_topic(namespace, ">")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: APP_TOPICS_MAX_AGE,
        max_bytes: APP_TOPICS_MAX_BYTES,
        // Without it JetStream would answer every captured message that has a reply
        // subject with its publish ack, and a request on a topic would get that ack
        // instead of the responder's answer.
        no_ack: true,
        ..Default::default()
    }
}

/// A durable subscriber `name` of a namespace's topics matching `filter_subject`: acked one
/// by one, redelivered after 30 s unacknowledged, from the messages published after it was
/// first made.
pub fn app_durable_consumer(name: &str, filter_subject: String) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject,
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    }
}

/// The configuration of a namespace's app-store bucket.
pub fn app_bucket(namespace: &Namespace, settings: &StoreSettings) -> kv::Config {
    kv::Config {
        bucket: app_bucket_name(namespace),
        description: format!("apiary: app store of namespace {namespace}"),
        history: i64::from(settings.history.clamp(1, MAX_HISTORY)),
        max_age: settings
            .ttl_ms
            .map(Duration::from_millis)
            .unwrap_or_default(),
        max_value_size: settings
            .max_value_size
            .map_or(-1, |size| i32::try_from(size).unwrap_or(i32::MAX)),
        max_bytes: settings
            .max_bytes
            .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Final records of ended tasks, on one subject per archive shard
/// ([`crate::subject::archive_shard`]), kept for the retention period or until the byte
/// limit, oldest first.
pub fn task_archive_stream(retention: Duration, max_bytes: i64) -> stream::Config {
    stream::Config {
        name: TASK_ARCHIVE_STREAM.into(),
        description: Some("apiary: final records of ended tasks, by id shard".into()),
        subjects: vec![subject::task_archive_all().into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: retention,
        max_bytes,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        ..Default::default()
    }
}

pub fn dlq_stream() -> stream::Config {
    stream::Config {
        name: DLQ_STREAM.into(),
        description: Some("apiary: tasks whose every allowed attempt failed".into()),
        subjects: vec![subject::task_dead().into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: DLQ_MAX_AGE,
        max_bytes: DLQ_MAX_BYTES,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

pub fn result_objects_bucket() -> object_store::Config {
    object_store::Config {
        bucket: RESULT_OBJECTS_BUCKET.into(),
        description: Some("apiary: task outputs too large for a message".into()),
        storage: stream::StorageType::File,
        max_age: RESULTS_MAX_AGE,
        ..Default::default()
    }
}

/// The key of a live task's record in `APIARY_TASK_RECORDS`: the task id itself (task ids
/// are valid KV keys).
pub fn task_record_key(task: &crate::id::TaskId) -> &str {
    task.as_str()
}

/// How long an ended task's record stays in the live bucket before the server removes it
/// (a per-message TTL, on nats-server 2.11 and later): lookups of tasks that ended this
/// recently are answered from the bucket, and the bucket's subjects stay the live tasks plus
/// this long of ended ones.
pub const TASK_RECORD_LINGER: Duration = Duration::from_secs(60);

/// Lets the record bucket's messages carry their own TTL (`allow_msg_ttl`), where the
/// server can (2.11 and later): an ended task's record then expires by itself, with no
/// purge request per task. Returns whether TTLs are on; on older servers records are purged
/// one by one. Done with the JetStream API's JSON directly, so that the client library needs
/// no 2.11 feature.
pub async fn enable_record_ttl(
    client: &async_nats::Client,
    js: &jetstream::Context,
) -> Result<bool, TopologyError> {
    if !client.is_server_compatible(2, 11, 0) {
        return Ok(false);
    }
    let failed = |err: String| TopologyError::new("KV bucket", TASK_RECORDS_BUCKET, err);
    let info: serde_json::Value = js
        .request(
            format!("STREAM.INFO.{TASK_RECORDS_STREAM}"),
            &serde_json::json!({}),
        )
        .await
        .map_err(|err| failed(err.to_string()))?;
    let mut config = info
        .get("config")
        .cloned()
        .ok_or_else(|| failed(format!("no stream configuration in {info}")))?;
    if config.get("allow_msg_ttl") == Some(&serde_json::Value::Bool(true)) {
        return Ok(true);
    }
    config["allow_msg_ttl"] = serde_json::Value::Bool(true);
    let updated: serde_json::Value = js
        .request(format!("STREAM.UPDATE.{TASK_RECORDS_STREAM}"), &config)
        .await
        .map_err(|err| failed(err.to_string()))?;
    if let Some(error) = updated.get("error") {
        return Err(failed(format!("the server refused message TTLs: {error}")));
    }
    Ok(true)
}

/// The stream under the record bucket, for purging an ended task's key with its subject.
pub const TASK_RECORDS_STREAM: &str = "KV_APIARY_TASK_RECORDS";

/// The subject a live task's record is stored on (`$KV.APIARY_TASK_RECORDS.<task>`).
pub fn task_record_subject(task: &crate::id::TaskId) -> String {
    format!("$KV.{TASK_RECORDS_BUCKET}.{}", task_record_key(task))
}

pub fn nodes_bucket() -> kv::Config {
    kv::Config {
        bucket: NODES_BUCKET.into(),
        description: "apiary: registered nodes and their latest heartbeat".into(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

pub fn cluster_bucket() -> kv::Config {
    kv::Config {
        bucket: CLUSTER_BUCKET.into(),
        description: "apiary: join tokens (hashes only), node key bindings and cluster settings"
            .into(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The key of a join token's record in `APIARY_CLUSTER`. Token ids are lowercase hex, so
/// they are always valid key tokens.
pub fn token_key(id: &str) -> String {
    format!("tokens.{id}")
}

/// The key of a node id's key binding in `APIARY_CLUSTER` ([`crate::admin::NodeBinding`]).
pub fn node_binding_key(node: &NodeId) -> String {
    format!("nodes.{node}")
}

/// The token id of a key of `APIARY_CLUSTER`, if the key is a token's.
pub fn parse_token_key(key: &str) -> Option<&str> {
    key.strip_prefix("tokens.")
}

/// The key of the cluster settings in `APIARY_CLUSTER`.
pub const SETTINGS_KEY: &str = "settings";

pub fn modules_bucket() -> object_store::Config {
    object_store::Config {
        bucket: MODULES_BUCKET.into(),
        description: Some("apiary: WebAssembly modules, named by SHA-256".into()),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

pub fn artifacts_bucket() -> object_store::Config {
    object_store::Config {
        bucket: ARTIFACTS_BUCKET.into(),
        description: Some(
            "apiary: modules precompiled for runtime-only agents, by digest and platform".into(),
        ),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The name in `APIARY_ARTIFACTS` of module `sha256` precompiled for `platform`
/// (`<architecture>-<operating system>`, as [`host_platform`] names it): `<sha256>.<platform>`.
pub fn artifact_name(sha256: &str, platform: &str) -> String {
    format!("{sha256}.{platform}")
}

/// This host's platform as artifacts name it, e.g. `x86_64-linux` or `aarch64-linux`: what
/// a precompiled module must have been compiled for to run here.
pub fn host_platform() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// The name of the consumer of the queue of `priority` on `APIARY_TASKS`.
pub fn scheduler_tasks_consumer_name(priority: Priority) -> &'static str {
    match priority {
        Priority::High => SCHEDULER_TASKS_HIGH_CONSUMER,
        Priority::Normal => SCHEDULER_TASKS_CONSUMER,
        Priority::Low => SCHEDULER_TASKS_LOW_CONSUMER,
    }
}

/// The consumer every scheduler replica pulls submitted tasks of `priority` from, filtered to
/// that priority's subject: a work-queue stream refuses consumers whose filters overlap, so
/// each queue has exactly one. It never gives up on a task (`max_deliver` unlimited): a task
/// that cannot be placed yet waits in the queue.
///
/// Tasks that no online node can run wait as pending messages of this consumer (handed back
/// with a delay), so its pending window is wide: with a narrow one, enough of them would
/// stop the consumer from delivering tasks that can run. Each replica's own `max_in_flight`
/// bounds what it actually works on.
pub fn scheduler_tasks_consumer(priority: Priority) -> consumer::pull::Config {
    let class = match priority {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    };
    consumer::pull::Config {
        durable_name: Some(scheduler_tasks_consumer_name(priority).into()),
        description: Some(format!(
            "apiary schedulers: place submitted tasks of {class} priority"
        )),
        filter_subject: subject::task_submit_for(priority).into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: SCHEDULER_ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: SCHEDULER_MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// How many submitted tasks may wait unplaceable (or be in flight across all replicas) before
/// the task consumer stops delivering.
pub const SCHEDULER_MAX_ACK_PENDING: i64 = 100_000;

/// The consumer every scheduler replica pulls task results from.
pub fn scheduler_results_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(SCHEDULER_RESULTS_CONSUMER.into()),
        description: Some("apiary schedulers: deliver task results".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: SCHEDULER_ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: 1024,
        ..Default::default()
    }
}

/// The name of a node's consumer on `APIARY_DISPATCH`. Node ids are valid consumer names.
pub fn node_dispatch_consumer_name(node: &NodeId) -> String {
    format!("node-{node}")
}

/// The most dispatches a node holds per slot: the one running, and others whose runs have
/// finished while their results are being stored, or that wait for the slot.
///
/// A dispatch is acknowledged only once its result is stored, so a node that held only as
/// many dispatches as it has slots would leave each slot idle, on every task, for a result's
/// store and the delivery of the next dispatch: measured on the 2-core development machine,
/// that wait, not the run, bounded a node's trivial tasks. The agent still runs at most
/// `slots` at once (see the agent's `task` module), and how much is queued at a node at all
/// is the schedulers' choice (the scheduler's `view`, which follows the node's pace).
pub const DISPATCHES_PER_SLOT: u32 = 4;

/// A node's consumer on `APIARY_DISPATCH`: only its own subject, at most
/// [`DISPATCHES_PER_SLOT`] tasks per slot unacknowledged at once, so JetStream itself never
/// hands a node more than it can run and finish.
pub fn node_dispatch_consumer(node: &NodeId, slots: u32) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(node_dispatch_consumer_name(node)),
        description: Some(format!("apiary agent {node}: placed tasks")),
        filter_subject: subject::node(node, NodeVerb::Dispatch).into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: i64::from(slots.max(1).saturating_mul(DISPATCHES_PER_SLOT)),
        ..Default::default()
    }
}

/// The key filter that matches every key of `APIARY_NODES`, for watching them all.
pub const NODES_ALL_KEYS: &str = ">";

/// The KV key of a node's registration record.
pub fn node_info_key(node: &NodeId) -> String {
    format!("info.{node}")
}

/// The key filter of every node's liveness record in `APIARY_NODES`.
pub const NODE_LIVE_KEYS: &str = "live.*";

/// The KV key of a node's latest liveness record.
pub fn node_live_key(node: &NodeId) -> String {
    format!("live.{node}")
}

/// The KV key of what the operator set on a node ([`crate::admin::NodeAdmin`]).
pub fn node_admin_key(node: &NodeId) -> String {
    format!("admin.{node}")
}

/// Which record a key of `APIARY_NODES` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKey {
    Info(NodeId),
    Live(NodeId),
    Admin(NodeId),
}

/// Parses a key of `APIARY_NODES`; keys apiary did not write are `None`.
pub fn parse_node_key(key: &str) -> Option<NodeKey> {
    let (kind, node) = key.split_once('.')?;
    let node = NodeId::new(node).ok()?;
    match kind {
        "info" => Some(NodeKey::Info(node)),
        "live" => Some(NodeKey::Live(node)),
        "admin" => Some(NodeKey::Admin(node)),
        _ => None,
    }
}

/// A long-running component's connection: the client, its JetStream context and the
/// topology, ensured.
#[derive(Debug, Clone)]
pub struct Connection {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub topology: Topology,
}

/// Why a component could not join the bus.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("failed to connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// Connects a long-running component (agent, scheduler) to the NATS server(s) at `url` and
/// ensures the topology. The client connects in the background and keeps reconnecting for
/// the life of the process; `ensure` then waits for JetStream within the client's request
/// timeout. If the server is still away after that the component exits with the error, and
/// its supervisor (the systemd units restart on failure) starts it again. (The agent does
/// not exit: it has finished work to keep, so it connects with [`connect`] and ensures the
/// topology until the server answers.)
pub async fn join(url: &str, client_name: String) -> Result<Connection, JoinError> {
    let client = connect(url, client_name).await?;
    let js = jetstream::new(client.clone());
    let topology = ensure(&js).await?;
    Ok(Connection {
        client,
        js,
        topology,
    })
}

/// A long-running component's client for the NATS server(s) at `url`. It returns at once,
/// connects in the background if the server is not there yet, and never gives up: after a
/// lost connection it reconnects with async-nats's capped backoff (up to 4 s between tries)
/// for as long as the process lives. Only a malformed `url` is an error.
pub async fn connect(url: &str, client_name: String) -> Result<async_nats::Client, JoinError> {
    async_nats::ConnectOptions::new()
        .name(client_name)
        .retry_on_initial_connect()
        // The default already, said explicitly: a component outlives any outage of the
        // server, and a client that stopped reconnecting would leave it alive but deaf.
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(|err| JoinError::Connect {
            url: url.to_owned(),
            reason: err.to_string(),
        })
}

/// Handles to the parts of the topology that components use directly.
#[derive(Clone)]
pub struct Topology {
    pub nodes: kv::Store,
    pub cluster: kv::Store,
    /// `APIARY_TASK_RECORDS`: live tasks' records.
    pub records: kv::Store,
    pub modules: object_store::ObjectStore,
    /// `APIARY_ARTIFACTS`: modules precompiled for runtime-only agents.
    pub artifacts: object_store::ObjectStore,
    /// `APIARY_RESULT_OBJECTS`: outputs too large for a result message.
    pub result_objects: object_store::ObjectStore,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("nodes", &NODES_BUCKET)
            .field("cluster", &CLUSTER_BUCKET)
            .field("records", &TASK_RECORDS_BUCKET)
            .field("modules", &MODULES_BUCKET)
            .field("artifacts", &ARTIFACTS_BUCKET)
            .field("result_objects", &RESULT_OBJECTS_BUCKET)
            .finish()
    }
}

/// Creates every stream and bucket that does not exist yet and opens the KV bucket and object
/// store. Existing ones are left as they are, so an operator's tuning (replicas, limits)
/// survives restarts; only subjects missing from an existing stream (added by a later
/// version, such as the priority queues of `APIARY_TASKS`) are added to it.
pub async fn ensure(js: &jetstream::Context) -> Result<Topology, TopologyError> {
    for (name, config) in [
        (TASKS_STREAM, tasks_stream()),
        (DISPATCH_STREAM, dispatch_stream()),
        (RESULTS_STREAM, results_stream()),
        (
            TASK_ARCHIVE_STREAM,
            task_archive_stream(TASK_RETENTION, TASK_ARCHIVE_MAX_BYTES),
        ),
        (DLQ_STREAM, dlq_stream()),
    ] {
        let wanted = config.subjects.clone();
        let stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|err| TopologyError::new("stream", name, err))?;
        add_missing_subjects(js, &stream, &wanted)
            .await
            .map_err(|err| TopologyError::new("stream", name, err))?;
    }
    let nodes = ensure_bucket(js, NODES_BUCKET, nodes_bucket()).await?;
    let cluster = ensure_bucket(js, CLUSTER_BUCKET, cluster_bucket()).await?;
    let records = ensure_bucket(js, TASK_RECORDS_BUCKET, task_records_bucket()).await?;
    let modules = ensure_object_store(js, MODULES_BUCKET, modules_bucket()).await?;
    let artifacts = ensure_object_store(js, ARTIFACTS_BUCKET, artifacts_bucket()).await?;
    let result_objects =
        ensure_object_store(js, RESULT_OBJECTS_BUCKET, result_objects_bucket()).await?;
    Ok(Topology {
        nodes,
        cluster,
        records,
        modules,
        artifacts,
        result_objects,
    })
}

/// Adds to an existing stream those of `wanted` subjects that it lacks, leaving the rest of
/// its configuration as it is. Every component that starts after an upgrade tries this, and
/// the first to do it wins; the others find nothing missing.
async fn add_missing_subjects(
    js: &jetstream::Context,
    stream: &stream::Stream,
    wanted: &[String],
) -> Result<(), jetstream::context::UpdateStreamError> {
    let current = &stream.cached_info().config;
    let missing: Vec<String> = wanted
        .iter()
        .filter(|subject| !current.subjects.contains(subject))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut updated = current.clone();
    updated.subjects.extend(missing);
    js.update_stream(updated).await?;
    Ok(())
}

async fn ensure_object_store(
    js: &jetstream::Context,
    name: &'static str,
    config: object_store::Config,
) -> Result<object_store::ObjectStore, TopologyError> {
    match js.get_object_store(name).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_object_store(config)
            .await
            .map_err(|err| TopologyError::new("object store", name, err)),
    }
}

async fn ensure_bucket(
    js: &jetstream::Context,
    name: &'static str,
    config: kv::Config,
) -> Result<kv::Store, TopologyError> {
    match js.get_key_value(name).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(config)
            .await
            .map_err(|err| TopologyError::new("KV bucket", name, err)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn app_keys_are_subjects_of_their_namespaces_bucket_only() {
        let shop = Namespace::new("shop").unwrap();
        let subject = app_key_subject(&shop, "cart.alice");
        assert_eq!(subject, "$KV.APIARY_KV_shop.cart.alice");
        assert_eq!(parse_app_key_subject(&shop, &subject), Some("cart.alice"));
        let shops = Namespace::new("shops").unwrap();
        assert_eq!(
            parse_app_key_subject(&shop, &app_key_subject(&shops, "x")),
            None
        );
    }

    use super::*;

    #[test]
    fn node_keys_round_trip() {
        let node = NodeId::new("pi-3").unwrap();
        assert_eq!(
            parse_node_key(&node_info_key(&node)),
            Some(NodeKey::Info(node.clone()))
        );
        assert_eq!(
            parse_node_key(&node_live_key(&node)),
            Some(NodeKey::Live(node.clone()))
        );
        assert_eq!(
            parse_node_key(&node_admin_key(&node)),
            Some(NodeKey::Admin(node))
        );
        assert_eq!(parse_node_key("other.pi-3"), None);
        assert_eq!(
            parse_token_key(&token_key("0a1b2c3d4e5f")),
            Some("0a1b2c3d4e5f")
        );
        assert_eq!(parse_token_key("settings"), None);
        assert_eq!(parse_node_key("info"), None);
    }

    #[test]
    fn stream_subjects_carry_no_task_ids() {
        // Stream subjects are fixed (the task queues: one per priority, a fixed token) or
        // have exactly one wildcard, the node token.
        for config in [
            tasks_stream(),
            dispatch_stream(),
            results_stream(),
            dlq_stream(),
        ] {
            for subject in &config.subjects {
                assert!(subject.matches('*').count() <= 1, "{subject}");
                assert!(!subject.contains('>'), "{subject}");
                if subject.contains('*') {
                    assert!(subject.starts_with("apiary.v1.node.*."), "{subject}");
                }
            }
        }
    }

    #[test]
    fn record_subjects_are_the_buckets_own() {
        let task = crate::id::TaskId::new("t-1").unwrap();
        assert_eq!(task_record_subject(&task), "$KV.APIARY_TASK_RECORDS.t-1");
        assert_eq!(TASK_RECORDS_STREAM, format!("KV_{TASK_RECORDS_BUCKET}"));
    }

    #[test]
    fn the_archive_has_one_subject_per_shard() {
        let config = task_archive_stream(TASK_RETENTION, TASK_ARCHIVE_MAX_BYTES);
        assert_eq!(config.subjects, ["apiary.v1.tasks.archive.*"]);
        assert_eq!(config.max_age, TASK_RETENTION);
    }

    #[test]
    fn progress_acks_come_well_within_the_ack_wait() {
        assert!(PROGRESS_INTERVAL * 2 < ACK_WAIT);
    }

    #[test]
    fn each_priority_queue_has_one_consumer() {
        let stream = tasks_stream();
        let mut names = std::collections::BTreeSet::new();
        for priority in Priority::ALL {
            let consumer = scheduler_tasks_consumer(priority);
            // Exactly one of the stream's subjects, and no wildcard: the filters cannot
            // overlap, which a work-queue stream requires.
            assert!(
                stream.subjects.contains(&consumer.filter_subject),
                "{}",
                consumer.filter_subject
            );
            assert!(!consumer.filter_subject.contains(['*', '>']));
            assert_eq!(consumer.ack_wait, SCHEDULER_ACK_WAIT);
            names.insert(consumer.durable_name.unwrap());
        }
        assert_eq!(names.len(), 3);
        assert_eq!(stream.subjects.len(), 3);
        assert_eq!(
            scheduler_tasks_consumer(Priority::Normal)
                .durable_name
                .as_deref(),
            Some(SCHEDULER_TASKS_CONSUMER)
        );
    }

    #[test]
    fn work_queue_filters_do_not_overlap() {
        let a = node_dispatch_consumer(&NodeId::new("a").unwrap(), 2);
        let b = node_dispatch_consumer(&NodeId::new("b").unwrap(), 2);
        assert_ne!(a.filter_subject, b.filter_subject);
        assert_eq!(a.max_ack_pending, 2 * i64::from(DISPATCHES_PER_SLOT));
    }
}
