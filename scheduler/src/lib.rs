//! The apiary scheduler: registers nodes, tracks their heartbeats, places submitted tasks on
//! live nodes and delivers results.
//!
//! It is stateless. Everything it knows is in NATS: nodes in the `APIARY_NODES` bucket, tasks
//! waiting for placement in `APIARY_TASKS`, placed tasks in `APIARY_DISPATCH`, outcomes in
//! `APIARY_RESULTS`. Replicas share the durable consumers and the service queue group, so any
//! number can run side by side and killing one loses nothing: what it held unacknowledged is
//! redelivered to another after the ack wait.
//!
//! [`run`] is the whole scheduler; `main` only loads the configuration and calls it. `run`
//! keeps the start and shutdown order; each job has its own module:
//!
//! - [`nodes`](crate::nodes): mirrors the node bucket into the view.
//! - [`service`](crate::service): the micro service endpoints, wired to their handlers.
//! - [`registration`](crate::registration): agents joining (signed, bound to their key,
//!   admitted by a join token) and heartbeating.
//! - [`admin`](crate::admin): operators' node commands (cordon, drain, label, rm, …) and the
//!   cluster settings.
//! - [`binding`](crate::binding): which key a node id belongs to, bound with a join token.
//! - [`tokens`](crate::tokens): join tokens, stored as hashes.
//! - [`intake`](crate::intake): pulls submitted tasks while nodes have room, places and
//!   dispatches them.
//! - [`fairness`](crate::fairness): how intake shares its pulls between the priority queues
//!   (6 : 3 : 1, smooth weighted round-robin).
//! - [`completions`](crate::completions): sees results as they are stored, so the nodes that
//!   ran them have room again.
//! - [`recovery`](crate::recovery): moves work off lost nodes, hands a restarted node's held
//!   work back at once, and keeps the room accounting honest.
//! - [`delivery`](crate::delivery): settles stored results against their tasks' records.
//! - [`settle`](crate::settle): what follows a transition: a retry, or the end (dead
//!   letter, archive, delivery to submitters).
//! - [`records`](crate::records): task records, live (KV) and archived (sharded stream).
//! - [`started`](crate::started): agents' started signals, which mark records running.
//! - [`tasks`](crate::tasks): status, result, listing and cancel by id; the dead-letter
//!   stream's listing and requeue.
//! - [`pull`](crate::pull): what the pulling jobs share.

mod admin;
mod answers;
mod binding;
mod completions;
pub mod config;
mod delivery;
mod dlq;
pub mod fairness;
mod forget;
mod intake;
mod nodes;
mod pull;
mod records;
mod recovery;
mod registration;
mod service;
mod settle;
mod started;
mod tasks;
pub mod tokens;
pub mod view;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::message::Requirements;
use apiary_proto::{now_ms, topology};
use async_nats::jetstream::{self, kv};
use async_nats::service::ServiceExt as _;
use serde::Serialize;
use tokio::sync::watch;
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
pub(crate) const SYNC_WAIT: Duration = Duration::from_secs(2);

/// How long a stopping replica waits for the server to take its last messages.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

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
        tasks::apply_retention(&js, &config)
            .await
            .context("failed to set the task archive's retention")?;
        let record_ttl = topology::enable_record_ttl(&client, &js)
            .await
            .context("failed to let task records expire")?;
        let shared = Arc::new(Shared {
            config: config.clone(),
            client: client.clone(),
            js: js.clone(),
            nodes: topology.nodes,
            cluster: topology.cluster,
            records: records::Records::new(js.clone(), topology.records, record_ttl),
            view: Mutex::new(NodeView::new(config.node_backlog)),
            changed,
            synced,
            counters: Arc::default(),
            redeemer: tokens::Redeemer::default(),
        });

        let counters = shared.counters.clone();
        let service = client
            .service_builder()
            .description("apiary scheduler: node registration, heartbeats and the node table")
            // Every endpoint's stats carry the replica's own counters, so `nats micro stats
            // apiary-scheduler` shows what each replica did.
            .stats_handler(move |_endpoint, _stats| counters.snapshot())
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|err| anyhow::anyhow!("failed to start the micro service: {err}"))?;

        let stop = shutdown.child_token();
        let mut tasks = JoinSet::new();
        // The view first: the endpoints and intake wait for it to be read once.
        tasks.spawn(nodes::watch_nodes(shared.clone(), stop.clone()).in_current_span());
        tasks.spawn(completions::watch_completions(shared.clone(), stop.clone()).in_current_span());
        tasks.spawn(started::watch_started(shared.clone(), stop.clone()).in_current_span());
        service::start(&service, &shared, &stop, &mut tasks).await?;
        tasks.spawn(intake::intake(shared.clone(), stop.clone()).in_current_span());
        tasks.spawn(delivery::deliver_results(shared.clone(), stop.clone()).in_current_span());
        tasks.spawn(recovery::recover_lost_work(shared.clone(), stop.clone()).in_current_span());
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
        // Bounded: with the server away, a flush waits for a reconnection that may never
        // come, and a stopping replica must still stop.
        let farewell = async {
            service.stop().await.ok();
            client.flush().await.ok();
        };
        if tokio::time::timeout(FAREWELL_TIMEOUT, farewell)
            .await
            .is_err()
        {
            tracing::debug!("the server did not confirm the last messages; stopping anyway");
        }
        tracing::info!("scheduler stopped");
        outcome
    }
    .instrument(span)
    .await
}

/// What the scheduler's loops share. The view is a cache of the node bucket plus this
/// replica's own unfinished dispatches.
struct Shared {
    config: SchedulerConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    nodes: kv::Store,
    /// `APIARY_CLUSTER`: join tokens and settings.
    cluster: kv::Store,
    /// Task records, live and archived.
    records: records::Records,
    view: Mutex<NodeView>,
    /// Bumped on every change to the view (a node came, went, reported, or finished one of
    /// our tasks), so that whoever waits for room looks again.
    changed: watch::Sender<u64>,
    /// True once the replica has read the whole node bucket.
    synced: watch::Sender<bool>,
    counters: Arc<Counters>,
    /// Join tokens' redemptions, written in batches.
    redeemer: tokens::Redeemer,
}

impl Shared {
    fn view(&self) -> std::sync::MutexGuard<'_, NodeView> {
        // Every view operation is a single, panic-free call, so a poisoned lock still guards
        // a consistent view.
        self.view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` on the view and wakes everyone waiting for it to change.
    fn update<T>(&self, change: impl FnOnce(&mut NodeView) -> T) -> T {
        let outcome = change(&mut self.view());
        self.wake();
        outcome
    }

    /// Applies a change this replica wrote or read at `revision`, ahead of the bucket watch
    /// (see [`NodeView::apply_written`]).
    fn apply_written(&self, revision: u64, change: NodeChange) {
        self.update(|view| view.apply_written(revision, change));
    }

    /// Chooses a node for attempt `attempt_id` of a task now, and counts it against that
    /// node's room until its result is seen (or, should that signal be missed, until
    /// `timeout_ms` has passed three times over, plus a minute).
    fn place(&self, requirements: &Requirements, attempt_id: String, timeout_ms: u64) -> Placement {
        let mut view = self.view();
        let now = now_ms();
        let placement = view.place(requirements, now);
        if let Placement::Node(node) = &placement {
            let expires = now
                .saturating_add(timeout_ms.saturating_mul(3))
                .saturating_add(60_000);
            view.reserve(node, attempt_id, expires);
        }
        placement
    }

    /// Gives back the room reserved for an attempt that was not dispatched after all.
    fn unreserve(&self, attempt_id: &str) {
        self.update(|view| view.unreserve(attempt_id));
    }

    /// Wakes everyone waiting for the view to change.
    fn wake(&self) {
        self.changed
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    async fn wait_synced(&self, limit: Duration) {
        let mut synced = self.synced.subscribe();
        let _ = tokio::time::timeout(limit, synced.wait_for(|synced| *synced)).await;
    }

    /// The settings the task transitions read.
    fn policy(&self) -> apiary_proto::lifecycle::Policy {
        apiary_proto::lifecycle::Policy {
            max_attempts: self.config.max_attempts,
        }
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        u64::try_from(self.config.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// A pause of a few random milliseconds before a compare-and-set is tried again: replicas
/// (or registrations of a fleet booting together) that collided once then do not collide in
/// lockstep.
pub(crate) async fn contention_pause() {
    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=20))).await;
}

/// What a replica has done since it started, reported in `$SRV.STATS`.
#[derive(Debug, Default)]
struct Counters {
    tasks_placed: AtomicU64,
    tasks_moved: AtomicU64,
    tasks_lost: AtomicU64,
    results_delivered: AtomicU64,
    nodes_registered: AtomicU64,
    /// Registrations of a new incarnation of a known node: its previous process was gone.
    node_restarts: AtomicU64,
    /// Heartbeats answered `registered: false`.
    heartbeats_refused: AtomicU64,
    /// Register and heartbeat messages dropped because their signature did not verify.
    signatures_invalid: AtomicU64,
    /// Registrations and heartbeats refused because the node id is bound to another key.
    identity_refused: AtomicU64,
    /// Registrations refused for their join token.
    tokens_refused: AtomicU64,
    /// Heartbeats dropped as repeats of an earlier one of the same process.
    heartbeats_replayed: AtomicU64,
    /// Results discarded because they were not the task's current attempt's (a late result
    /// of a superseded attempt, or one for a task that had ended).
    results_superseded: AtomicU64,
    /// Tasks put back in the queue for another attempt (failures and operator moves).
    tasks_retried: AtomicU64,
    /// Tasks put in the dead-letter stream.
    tasks_dead: AtomicU64,
    tasks_cancelled: AtomicU64,
    /// Tasks that timed out in the queue.
    tasks_timed_out: AtomicU64,
    /// Nodes forgotten after being offline longer than `forget_offline_after`.
    nodes_forgotten: AtomicU64,
}

/// [`Counters`] as they appear in `$SRV.STATS`.
#[derive(Serialize)]
struct CountersSnapshot {
    tasks_placed: u64,
    tasks_moved: u64,
    tasks_lost: u64,
    results_delivered: u64,
    nodes_registered: u64,
    node_restarts: u64,
    heartbeats_refused: u64,
    signatures_invalid: u64,
    identity_refused: u64,
    tokens_refused: u64,
    heartbeats_replayed: u64,
    results_superseded: u64,
    tasks_retried: u64,
    tasks_dead: u64,
    tasks_cancelled: u64,
    tasks_timed_out: u64,
    nodes_forgotten: u64,
}

impl Counters {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> serde_json::Value {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::to_value(CountersSnapshot {
            tasks_placed: read(&self.tasks_placed),
            tasks_moved: read(&self.tasks_moved),
            tasks_lost: read(&self.tasks_lost),
            results_delivered: read(&self.results_delivered),
            nodes_registered: read(&self.nodes_registered),
            node_restarts: read(&self.node_restarts),
            heartbeats_refused: read(&self.heartbeats_refused),
            signatures_invalid: read(&self.signatures_invalid),
            identity_refused: read(&self.identity_refused),
            tokens_refused: read(&self.tokens_refused),
            heartbeats_replayed: read(&self.heartbeats_replayed),
            results_superseded: read(&self.results_superseded),
            tasks_retried: read(&self.tasks_retried),
            tasks_dead: read(&self.tasks_dead),
            tasks_cancelled: read(&self.tasks_cancelled),
            tasks_timed_out: read(&self.tasks_timed_out),
            nodes_forgotten: read(&self.nodes_forgotten),
        })
        .unwrap_or_default()
    }
}
