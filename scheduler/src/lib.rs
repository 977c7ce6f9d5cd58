//! The apiary scheduler: registers nodes, tracks their heartbeats, places submitted tasks on
//! live nodes and delivers results.
//!
//! It is stateless. Everything it knows is in NATS: nodes in the `APIARY_NODES` bucket, tasks
//! waiting for placement in `APIARY_TASKS`, placed tasks in `APIARY_DISPATCH`, outcomes in
//! `APIARY_RESULTS`. Replicas share the durable consumers and the service queue group, so any
//! number can run side by side and killing one loses nothing: what it held unacknowledged is
//! redelivered to another after the ack wait.
//!
//! [`run`] is the whole scheduler; `main` only loads the configuration and calls it.

pub mod config;
pub mod view;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::codec::{self, Encoding};
use apiary_proto::message::{
    Dispatch, ErrorBody, ErrorCode, Heartbeat, HeartbeatReply, NodeLiveness, NodeMetrics,
    NodeRecord, NodeState, NodesListReply, NodesListRequest, Outcome, RegisterReply,
    RegisterRequest, Reply, Requirements, TaskError, TaskErrorKind, TaskResult, TaskSubmission,
};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::topology::{self, NodeKey};
use apiary_proto::{NodeId, now_ms, rpc, stored};
use async_nats::jetstream::{self, AckKind, kv};
use async_nats::service::ServiceExt as _;
use futures::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use config::SchedulerConfig;

use crate::view::{NodeChange, NodeView, Placement};

/// The NATS micro service name every replica registers under (`nats micro info
/// apiary-scheduler`).
pub const SERVICE_NAME: &str = "apiary-scheduler";

/// How long a request for the node table waits for a freshly started replica to finish
/// reading the node bucket.
const SYNC_WAIT: Duration = Duration::from_secs(2);

/// Runs a scheduler replica until `shutdown` is cancelled.
pub async fn run(config: SchedulerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let instance = nuid::next().to_string();
    let span = tracing::info_span!("scheduler", instance = %instance);
    async move {
        let topology::Connection {
            client,
            js,
            topology,
        } = topology::join(&config.nats_url, format!("apiary-scheduler {instance}"))
            .await
            .context("failed to join the bus")?;

        let (changed, _) = watch::channel(0u64);
        let (synced, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config: config.clone(),
            client: client.clone(),
            js,
            nodes: topology.nodes,
            view: Mutex::new(NodeView::default()),
            changed,
            synced,
        });

        let service = client
            .service_builder()
            .description("apiary scheduler: node registration, heartbeats and the node table")
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|err| anyhow::anyhow!("failed to start the micro service: {err}"))?;

        let stop = shutdown.child_token();
        let mut tasks = JoinSet::new();
        tasks.spawn(watch_nodes(shared.clone(), stop.clone()).in_current_span());
        for (name, verb) in [
            ("register", NodeVerb::Register),
            ("heartbeat", NodeVerb::Heartbeat),
        ] {
            let endpoint = service
                .endpoint_builder()
                .name(name)
                .add(subject::all_nodes(verb).to_string())
                .await
                .map_err(|err| anyhow::anyhow!("failed to add the {name} endpoint: {err}"))?;
            let shared = shared.clone();
            let stop = stop.clone();
            tasks.spawn(
                async move {
                    match verb {
                        NodeVerb::Register => {
                            serve(endpoint, stop, move |node, request| {
                                register(shared.clone(), node, request)
                            })
                            .await
                        }
                        _ => {
                            serve(endpoint, stop, move |node, request| {
                                heartbeat(shared.clone(), node, request)
                            })
                            .await
                        }
                    }
                }
                .in_current_span(),
            );
        }
        let list = service
            .endpoint_builder()
            .name("nodes-list")
            .add(subject::nodes_list().to_string())
            .await
            .map_err(|err| anyhow::anyhow!("failed to add the nodes-list endpoint: {err}"))?;
        {
            let shared = shared.clone();
            tasks.spawn(
                serve(list, stop.clone(), move |_, request| {
                    list_nodes(shared.clone(), request)
                })
                .in_current_span(),
            );
        }
        tasks.spawn(intake(shared.clone(), stop.clone()).in_current_span());
        tasks.spawn(deliver_results(shared.clone(), stop.clone()).in_current_span());
        tasks.spawn(recover_lost_work(shared.clone(), stop.clone()).in_current_span());
        tracing::info!("scheduler started");

        // Every loop runs until `stop`; one that ends early has failed, and takes the replica
        // down with it rather than leaving it half-working.
        let mut outcome = Ok(());
        while let Some(joined) = tasks.join_next().await {
            let result =
                joined.unwrap_or_else(|err| Err(anyhow::anyhow!("a task panicked: {err}")));
            if let Err(err) = result
                && outcome.is_ok()
            {
                tracing::error!(error = %format!("{err:#}"), "scheduler loop failed");
                outcome = Err(err);
            }
            stop.cancel();
        }
        service.stop().await.ok();
        client.flush().await.ok();
        tracing::info!("scheduler stopped");
        outcome
    }
    .instrument(span)
    .await
}

/// What the scheduler's loops share. The view is a cache of the node bucket.
struct Shared {
    config: SchedulerConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    nodes: kv::Store,
    view: Mutex<NodeView>,
    /// Bumped on every change to the view, so that tasks waiting for a node look again.
    changed: watch::Sender<u64>,
    /// True once the replica has read the whole node bucket.
    synced: watch::Sender<bool>,
}

impl Shared {
    fn view(&self) -> std::sync::MutexGuard<'_, NodeView> {
        // Every view operation is a single, panic-free call, so a poisoned lock still guards
        // a consistent view.
        self.view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(&self, change: NodeChange) {
        self.view().apply(change);
        self.changed
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    /// Chooses a node for a task now, and counts the placement against that node's load.
    fn place(&self, requirements: &Requirements) -> Placement {
        let mut view = self.view();
        let placement = view.place(requirements, now_ms());
        if let Placement::Node(node) = &placement {
            view.note_placed(node);
        }
        placement
    }

    async fn wait_synced(&self, limit: Duration) {
        let mut synced = self.synced.subscribe();
        let _ = tokio::time::timeout(limit, synced.wait_for(|synced| *synced)).await;
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        u64::try_from(self.config.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

// -------------------------------------------------------------------------------------------
// The node bucket
// -------------------------------------------------------------------------------------------

/// Mirrors the node bucket into the view: first every current entry, then each change.
async fn watch_nodes(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let empty = shared
        .nodes
        .status()
        .await
        .map(|status| status.values() == 0)
        .unwrap_or(false);
    let mut watch = shared
        .nodes
        .watch_all()
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
            shared.apply(change);
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
        (NodeKey::Info(_), false) => NodeChange::Registered(decode_entry(entry)?),
        (NodeKey::Live(node), false) => NodeChange::Heartbeat(node, decode_entry(entry)?),
    };
    Some(change)
}

fn decode_entry<T: DeserializeOwned>(entry: &kv::Entry) -> Option<T> {
    match Encoding::detect(None, &entry.value).decode(&entry.value) {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(key = %entry.key, error = %err, "skipping a malformed node record");
            None
        }
    }
}

async fn put_record<T: Serialize>(
    shared: &Shared,
    key: String,
    value: &T,
) -> Result<(), ErrorBody> {
    let bytes =
        codec::encode(value).map_err(|err| ErrorBody::new(ErrorCode::Internal, err.to_string()))?;
    shared.nodes.put(key, bytes).await.map(drop).map_err(|err| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("failed to store the node record: {err}"),
        )
    })
}

// -------------------------------------------------------------------------------------------
// Request subjects
// -------------------------------------------------------------------------------------------

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
        if let Err(err) = put_record(&shared, topology::node_info_key(&node), &record).await {
            return Reply::Error(err);
        }
        if let Err(err) = put_record(&shared, topology::node_live_key(&node), &live).await {
            return Reply::Error(err);
        }
        // Known to this replica at once; the bucket watch brings the same records back.
        shared.apply(NodeChange::Registered(record.clone()));
        shared.apply(NodeChange::Heartbeat(node.clone(), live));
        tracing::info!(
            hostname = %record.info.hostname,
            arch = %record.info.arch,
            cores = record.info.cpu_cores,
            slots = record.info.slots,
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

async fn heartbeat(
    shared: Arc<Shared>,
    subject_node: Option<NodeId>,
    heartbeat: Heartbeat,
) -> Reply<HeartbeatReply> {
    let node = heartbeat.node_id.clone();
    if let Err(err) = check_subject(subject_node, &node) {
        return Reply::Error(err);
    }
    let registered = shared.view().is_registered(&node)
        || matches!(
            shared.nodes.get(topology::node_info_key(&node)).await,
            Ok(Some(_))
        );
    if !registered {
        tracing::debug!(node_id = %node, "heartbeat from an unregistered node");
        return Reply::Ok(HeartbeatReply { registered: false });
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
    match put_record(&shared, topology::node_live_key(&node), &live).await {
        Ok(()) => Reply::Ok(HeartbeatReply { registered: true }),
        Err(err) => Reply::Error(err),
    }
}

async fn list_nodes(shared: Arc<Shared>, request: NodesListRequest) -> Reply<NodesListReply> {
    shared.wait_synced(SYNC_WAIT).await;
    let mut nodes = shared.view().summaries(now_ms());
    if let Some(status) = request.status {
        nodes.retain(|node| node.status == status);
    }
    Reply::Ok(NodesListReply { nodes })
}

// -------------------------------------------------------------------------------------------
// Placement and dispatch
// -------------------------------------------------------------------------------------------

/// Most submitted tasks one pull asks for; smaller when fewer permits are free.
const PULL_BATCH: usize = 64;
/// How long one pull request waits for messages before the next is sent; also how long a
/// stopping replica keeps reading its last one.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// The pause after a failed pull (the server is restarting, say).
const PULL_RETRY: Duration = Duration::from_millis(500);

/// Opens a durable pull consumer on `stream`, creating it or bringing its configuration up
/// to date: the consumers are apiary's own, and every replica declares the same one.
async fn open_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: jetstream::consumer::pull::Config,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let name = config.durable_name.clone().unwrap_or_default();
    js.get_stream(stream)
        .await
        .with_context(|| format!("failed to open stream {stream}"))?
        .create_consumer(config)
        .await
        .with_context(|| format!("failed to open consumer {name} on {stream}"))
}

/// Asks for up to `size` messages. The server holds the request until it is full or expires
/// ([`PULL_EXPIRES`]); the batch yields messages as they arrive.
async fn next_batch(
    consumer: &jetstream::consumer::PullConsumer,
    size: usize,
) -> Result<jetstream::consumer::pull::Batch, async_nats::Error> {
    Ok(consumer
        .batch()
        .max_messages(size)
        .expires(PULL_EXPIRES)
        .messages()
        .await?)
}

/// Reads a batch to its end when the replica stops, handing back whatever still arrives.
/// The server holds a pull request until it expires; without this, a message it sends to a
/// replica that has stopped listening would sit out the whole ack wait before anyone else
/// could take it.
async fn hand_back(batch: &mut jetstream::consumer::pull::Batch) {
    let drained = tokio::time::timeout(PULL_EXPIRES + Duration::from_secs(1), async {
        while let Some(Ok(message)) = batch.next().await {
            message.ack_with(AckKind::Nak(None)).await.ok();
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!("a pull request outlived its expiry while stopping");
    }
}

/// What reading the next message of a batch gave.
// Only ever a return value, moved once; boxing the message would cost an allocation per task.
#[allow(clippy::large_enum_variant)]
enum Pulled {
    Message(jetstream::Message),
    /// The batch is full, expired or failed; ask for the next one.
    BatchDone,
    /// The replica is stopping; the batch has been handed back.
    Stopped,
}

/// The next message of `batch`, unless the batch ends or `stop` comes first (then the batch
/// is handed back before returning).
async fn next_pulled(
    batch: &mut jetstream::consumer::pull::Batch,
    stop: &CancellationToken,
    what: &str,
) -> Pulled {
    let message = tokio::select! {
        _ = stop.cancelled() => {
            hand_back(batch).await;
            return Pulled::Stopped;
        }
        message = batch.next() => message,
    };
    match message {
        Some(Ok(message)) => Pulled::Message(message),
        Some(Err(err)) => {
            tracing::warn!(error = %err, "error while pulling {what}");
            Pulled::BatchDone
        }
        None => Pulled::BatchDone,
    }
}

/// Pulls submitted tasks and places each on a node, up to `max_in_flight` at once.
async fn intake(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let consumer = open_consumer(
        &shared.js,
        topology::TASKS_STREAM,
        topology::scheduler_tasks_consumer(),
    )
    .await?;
    shared.wait_synced(SYNC_WAIT).await;

    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let mut in_flight = JoinSet::new();
    'pulling: loop {
        while in_flight.try_join_next().is_some() {}
        // Pull only as many messages as there are free permits. A message this replica has
        // taken is then always being worked on (and kept alive with progress acks), never
        // waiting unattended in a client-side buffer while its ack wait runs out, which would
        // hand it to another replica and, minutes later, let it be dispatched twice.
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.context("the permit pool closed")?,
        };
        let mut held = vec![first];
        while held.len() < PULL_BATCH {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => held.push(permit),
                Err(_) => break,
            }
        }
        let mut batch = match next_batch(&consumer, held.len()).await {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "failed to pull submitted tasks; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(PULL_RETRY) => continue,
                }
            }
        };
        loop {
            let message = match next_pulled(&mut batch, &stop, "submitted tasks").await {
                Pulled::Message(message) => message,
                // The next batch takes the free permits again.
                Pulled::BatchDone => break,
                Pulled::Stopped => break 'pulling,
            };
            let Some(permit) = held.pop() else { break };
            let shared = shared.clone();
            let stop = stop.clone();
            in_flight.spawn(async move {
                place_submission(&shared, message, &stop).await;
                drop(permit);
            });
        }
    }
    // Tasks still waiting for a node hand their messages back (they watch `stop`), so another
    // replica takes them at once; give them a moment to do so.
    let handed_back = tokio::time::timeout(Duration::from_secs(2), async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if handed_back.is_err() {
        in_flight.abort_all();
    }
    Ok(())
}

/// Places one submitted task: waits, as long as it takes, for a live node that meets its
/// requirements, dispatches it there, then acknowledges the submission.
async fn place_submission(shared: &Shared, message: jetstream::Message, stop: &CancellationToken) {
    let submission =
        match codec::decode_message::<TaskSubmission>(message.headers.as_ref(), &message.payload) {
            Ok((submission, _)) => submission,
            Err(err) => {
                reject(&message, &err.to_string()).await;
                return;
            }
        };
    if let Some(reply_to) = &submission.reply_to
        && !subject::is_allowed_reply_subject(reply_to, &shared.config.reply_subject_prefixes)
    {
        reject(
            &message,
            &format!("reply subject {reply_to:?} is not allowed"),
        )
        .await;
        return;
    }
    let span = tracing::info_span!("task", task_id = %submission.id);
    async move {
        let Some(node) = wait_for_node(shared, &message, &submission, stop).await else {
            return;
        };
        let dispatch = Dispatch {
            task: submission,
            attempt: 1,
            dispatched_at_ms: now_ms(),
        };
        match stored::dispatch(&shared.js, &node, &dispatch).await {
            Ok(stored) => {
                // A duplicate is this task placed before (a redelivered submission): the
                // stored dispatch stands either way.
                tracing::debug!(node_id = %node, duplicate = stored.duplicate, "task dispatched");
                if let Err(err) = message.ack().await {
                    // The dispatch is stored; a redelivered submission is dispatched again
                    // under the same message id and dropped as a duplicate.
                    tracing::warn!(error = %err, "failed to acknowledge a placed task");
                }
            }
            Err(err) => {
                tracing::warn!(node_id = %node, error = %format!("{err:#}"), "dispatch failed; retrying");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await
                    .ok();
            }
        }
    }
    .instrument(span)
    .await
}

/// Terminates a submission that can never be placed, with the reason in the log.
async fn reject(message: &jetstream::Message, reason: &str) {
    let sequence = message.info().map(|info| info.stream_sequence).ok();
    tracing::error!(?sequence, reason, "rejecting an invalid task submission");
    if let Err(err) = message.ack_with(AckKind::Term).await {
        tracing::warn!(error = %err, "failed to terminate an invalid submission");
    }
}

/// How long a task that no online node can run waits before it is looked at again. It goes
/// back to the queue meanwhile, so it holds no place in this replica's in-flight window.
const NO_MATCH_RETRY: Duration = Duration::from_secs(2);

/// Waits until the view offers a node for the task. While no node at all is online, the task
/// waits here for the view to change (keeping its message with progress acks): nothing else
/// could be placed either. While nodes are online but none meets the task's requirements, the
/// message goes back to the queue for [`NO_MATCH_RETRY`], so such tasks cannot crowd out
/// tasks that can run. `None` if the message was handed back.
async fn wait_for_node(
    shared: &Shared,
    message: &jetstream::Message,
    submission: &TaskSubmission,
    stop: &CancellationToken,
) -> Option<NodeId> {
    let mut changed = shared.changed.subscribe();
    let mut announced = false;
    // The first tick one period from now: an interval's immediate first tick still waits for
    // the timer wheel (about a millisecond), which would sit on every task's path.
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + topology::PROGRESS_INTERVAL,
        topology::PROGRESS_INTERVAL,
    );
    loop {
        let placement = shared.place(&submission.requirements);
        match placement {
            Placement::Node(node) => return Some(node),
            Placement::NoMatchingNode => {
                let first = message.info().map_or(true, |info| info.delivered <= 1);
                if first {
                    tracing::info!(
                        "no online node meets the task's requirements; it waits in the queue"
                    );
                }
                message
                    .ack_with(AckKind::Nak(Some(NO_MATCH_RETRY)))
                    .await
                    .ok();
                return None;
            }
            Placement::NoLiveNode if !announced => {
                tracing::info!("no node is online; the task waits for one");
                announced = true;
            }
            Placement::NoLiveNode => {}
        }
        tokio::select! {
            _ = stop.cancelled() => {
                message.ack_with(AckKind::Nak(None)).await.ok();
                return None;
            }
            _ = changed.changed() => {}
            _ = progress.tick() => {
                message.ack_with(AckKind::Progress).await.ok();
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// Work lost with a node
// -------------------------------------------------------------------------------------------

/// Moves work off nodes that are offline or have left, once every heartbeat interval.
///
/// A lost node's work sits in its own consumer on `APIARY_DISPATCH`: tasks it never received,
/// and tasks it received but never finished, which JetStream hands out again once their ack
/// wait runs out (no more progress acks come from a dead agent). Every replica pulls from that
/// consumer as the agent would, and places what it gets on another node with the next
/// attempt number. Replicas share the consumer, so each task moves once. A node that comes
/// back is simply online again and keeps whatever is still queued for it.
async fn recover_lost_work(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let stream = shared
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?;
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let lost = shared.view().lost_nodes(now_ms());
        for node in lost {
            // Bounded, so that one lost reply (a server restart mid-fetch) cannot stall
            // recovery for every other node.
            let recovered =
                tokio::time::timeout(RECOVERY_TIMEOUT, recover_node(&shared, &stream, &node)).await;
            let error = match recovered {
                Ok(Ok(())) => continue,
                Ok(Err(err)) => format!("{err:#}"),
                Err(_) => format!("no answer within {RECOVERY_TIMEOUT:?}"),
            };
            tracing::warn!(node_id = %node, error, "failed to recover work from a lost node");
        }
    }
}

/// How many of a lost node's tasks one replica moves per round.
const RECOVERY_BATCH: usize = 64;
/// The longest one node's recovery round may take.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);

async fn recover_node(
    shared: &Shared,
    stream: &jetstream::stream::Stream,
    node: &NodeId,
) -> anyhow::Result<()> {
    // Created if missing: a node that registered but died before making its consumer may
    // still have had work placed on it.
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &topology::node_dispatch_consumer_name(node),
            topology::node_dispatch_consumer(node, 1),
        )
        .await
        .context("failed to open the node's dispatch consumer")?;
    let info = consumer
        .info()
        .await
        .context("failed to read the node's consumer")?;
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        return Ok(());
    }
    let mut batch = consumer
        .fetch()
        .max_messages(RECOVERY_BATCH)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .context("failed to fetch the node's queued work")?;
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => move_dispatch(shared, node, message).await,
            Err(err) => {
                tracing::warn!(error = %err, "error while fetching a lost node's work");
                break;
            }
        }
    }
    Ok(())
}

/// Places one task of a lost node elsewhere, or, once it has used up its attempts, stores a
/// `node_lost` failure as its result. While no other node can take it, it stays where it
/// is and is looked at again next round.
async fn move_dispatch(shared: &Shared, lost: &NodeId, message: jetstream::Message) {
    let dispatch =
        match codec::decode_message::<Dispatch>(message.headers.as_ref(), &message.payload) {
            Ok((dispatch, _)) => dispatch,
            Err(err) => {
                reject(&message, &err.to_string()).await;
                return;
            }
        };
    let span = tracing::info_span!(
        "task",
        task_id = %dispatch.task.id,
        attempt = dispatch.attempt,
        lost_node = %lost,
    );
    async {
        // The node may have come back between the look at the view and now (one late
        // heartbeat): then its work stays with it, and no attempt is spent.
        if shared.view().is_online(lost, now_ms()) {
            message.ack_with(AckKind::Nak(None)).await.ok();
            return;
        }
        let moved = if dispatch.attempt >= shared.config.max_attempts {
            let result = node_lost_result(&dispatch, lost);
            tracing::warn!("task failed: its nodes were lost on every attempt");
            // Its own message id: should the lost node finish after all (it was only cut
            // off), its real result for this attempt is still stored and delivered too.
            let msg_id = format!("{}.lost", result.msg_id());
            let subject = subject::node(lost, NodeVerb::Result);
            stored::publish(&shared.js, subject, &result.task_id, &msg_id, &result)
                .await
                .map(drop)
        } else {
            let placement = shared.place(&dispatch.task.requirements);
            let Placement::Node(target) = placement else {
                message
                    .ack_with(AckKind::Nak(Some(shared.config.heartbeat_interval)))
                    .await
                    .ok();
                return;
            };
            let next = Dispatch {
                task: dispatch.task.clone(),
                attempt: dispatch.attempt + 1,
                dispatched_at_ms: now_ms(),
            };
            tracing::info!(node_id = %target, "moving a task off a lost node");
            stored::dispatch(&shared.js, &target, &next).await.map(drop)
        };
        match moved {
            Ok(()) => {
                if let Err(err) = message.double_ack().await {
                    tracing::warn!(error = %err, "failed to acknowledge a moved task");
                }
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "failed to move a task; retrying");
                message
                    .ack_with(AckKind::Nak(Some(shared.config.heartbeat_interval)))
                    .await
                    .ok();
            }
        }
    }
    .instrument(span)
    .await
}

/// The result of a task whose every attempt was lost with its node. Stored on the lost node's
/// result subject, so it reaches the submitter like any other result.
fn node_lost_result(dispatch: &Dispatch, lost: &NodeId) -> TaskResult {
    let now = now_ms();
    TaskResult {
        task_id: dispatch.task.id.clone(),
        node_id: lost.clone(),
        attempt: dispatch.attempt,
        outcome: Outcome::Failed {
            error: TaskError::new(
                TaskErrorKind::NodeLost,
                format!(
                    "the task was placed {} times and each node was lost before it finished; \
                     the last was {lost}",
                    dispatch.attempt
                ),
            ),
            stderr: Default::default(),
        },
        started_at_ms: now,
        finished_at_ms: now,
        reply_to: dispatch.task.reply_to.clone(),
    }
}

// -------------------------------------------------------------------------------------------
// Results
// -------------------------------------------------------------------------------------------

/// Delivers each stored result to the submitter's reply subject, then acknowledges it. The
/// result stays in `APIARY_RESULTS` (by age and size limits) for readers that missed it.
async fn deliver_results(shared: Arc<Shared>, stop: CancellationToken) -> anyhow::Result<()> {
    let consumer = open_consumer(
        &shared.js,
        topology::RESULTS_STREAM,
        topology::scheduler_results_consumer(),
    )
    .await?;
    loop {
        let mut batch = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            batch = next_batch(&consumer, PULL_BATCH) => match batch {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::warn!(error = %err, "failed to pull results; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(PULL_RETRY) => continue,
                    }
                }
            },
        };
        loop {
            match next_pulled(&mut batch, &stop, "results").await {
                Pulled::Message(message) => deliver_result(&shared, message).await,
                Pulled::BatchDone => break,
                Pulled::Stopped => return Ok(()),
            }
        }
    }
}

async fn deliver_result(shared: &Shared, message: jetstream::Message) {
    let result =
        match codec::decode_message::<TaskResult>(message.headers.as_ref(), &message.payload) {
            Ok((result, _)) => result,
            Err(err) => {
                let sequence = message.info().map(|info| info.stream_sequence).ok();
                tracing::error!(?sequence, error = %err, "dropping a malformed result");
                message.ack_with(AckKind::Term).await.ok();
                return;
            }
        };
    let span = tracing::info_span!("task", task_id = %result.task_id, node_id = %result.node_id);
    async {
        match &result.reply_to {
            Some(reply_to)
                if subject::is_allowed_reply_subject(
                    reply_to,
                    &shared.config.reply_subject_prefixes,
                ) =>
            {
                let headers = message
                    .headers
                    .clone()
                    .unwrap_or_else(|| Encoding::MsgPack.headers());
                if let Err(err) = shared
                    .client
                    .publish_with_headers(reply_to.clone(), headers, message.payload.clone())
                    .await
                {
                    tracing::warn!(error = %err, "failed to deliver a result; retrying");
                    message
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await
                        .ok();
                    return;
                }
                tracing::debug!("result delivered");
            }
            Some(reply_to) => {
                tracing::warn!(reply_to, "not delivering a result to a forbidden subject");
            }
            None => tracing::debug!("result has no reply subject; kept in the stream only"),
        }
        if let Err(err) = message.ack().await {
            tracing::warn!(error = %err, "failed to acknowledge a delivered result");
        }
    }
    .instrument(span)
    .await
}
