//! The apiary agent: joins a cluster, heartbeats, and runs the tasks placed on its node as
//! sandboxed WebAssembly.
//!
//! [`run`] is the whole agent; `main` only loads the configuration and calls it, and the
//! integration tests call it in-process. Everything the agent sends or receives is under its
//! node's subjects (`apiary.v1.node.<node>.…`):
//!
//! 1. `register` (request): join, and learn the heartbeat interval.
//! 2. `heartbeat` (request, every interval): live metrics; re-register if the cluster forgot us.
//! 3. `dispatch` (JetStream, the node's own durable consumer): tasks to run. A message stays
//!    unacknowledged while its task runs, with progress acks, so a task on a node that dies
//!    is still in the stream for someone to pick up.
//! 4. `result` (JetStream): the outcome of each attempt, de-duplicated by `<task>.<attempt>`.
//!    A result the server does not take waits in the outbox on disk until it does.
//! 5. `status` (request, micro service `apiary-agent`): the agent's own account of itself.
//!
//! `run` keeps the start and shutdown order; each job has its own module: `bus` (connecting
//! until the server answers), `membership` (register, heartbeat, leave), `work` (pulling,
//! handing back, draining), `task` (one run, its result and its acks) and `outbox` (results
//! kept while the server is away, replayed when it is back).

pub mod alloc;
mod app_host;
pub mod artifacts;
mod backoff;
mod bus;
mod cancel;
pub mod config;
pub mod identity;
pub mod inventory;
mod membership;
pub mod modules;
pub mod outbox;
pub mod sandbox;
pub mod state;
mod systemd;
mod task;
mod timings;
mod work;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::admin::Schedule;
use apiary_proto::identity::KeyPair;
use apiary_proto::message::{AgentStatus, AgentStatusRequest, ErrorBody, NodeMetrics, Reply};
use apiary_proto::rpc;
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, now_ms, topology};
use async_nats::jetstream;
use async_nats::service::ServiceExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

pub use config::{AgentConfig, AgentFlags, NodeLimits};

use crate::artifacts::ArtifactCache;
use crate::inventory::{Gpus, MetricsSampler};
use crate::membership::{heartbeat_loop, register_until_accepted, send_leaving};
use crate::modules::ModuleCache;
use crate::outbox::Outbox;
use crate::sandbox::Sandbox;
use crate::state::StateDir;
use crate::work::{drain, stop_runs_at_drain_deadlines, work_loop};

/// The NATS micro service name every agent registers under (`nats micro ls` lists them all).
pub const SERVICE_NAME: &str = "apiary-agent";

/// Runs the agent until `shutdown` is cancelled, then finishes running tasks (up to the
/// configured grace period), tells the cluster it is leaving, and returns.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_reporting_outbox(config, shutdown, tokio::sync::watch::channel(0).0).await
}

/// [`run`], telling `outbox` how many results wait in the outbox for the server each time
/// that changes: for an embedder that must know when a result has been kept (the integration
/// tests stop the server and wait for it).
pub async fn run_reporting_outbox(
    config: AgentConfig,
    shutdown: CancellationToken,
    outbox: tokio::sync::watch::Sender<usize>,
) -> anyhow::Result<()> {
    let gpus = Gpus::probe(config.nvml_library.as_deref());
    let inventory = inventory::gather(&config, gpus.as_ref());
    let node_id = match &config.node_id {
        Some(id) => NodeId::new(id.as_str()).context("invalid node id in configuration")?,
        None => NodeId::from_hostname(&inventory.host.hostname)
            .context("failed to derive a node id from the host name; set APIARY_NODE_ID")?,
    };
    let slots = inventory.runtime.slots;
    let state = StateDir::open(config.state_dir.as_deref())
        .context("failed to open the state directory")?;
    membership::refuse_if_removed(&state)?;
    let key = identity::load_or_create(&state).context("failed to load the node key")?;
    let sampler = MetricsSampler::new(gpus, Some(state.path()));
    let info = inventory::node_info(node_id.clone(), key.public_key(), inventory, &config);

    let span = tracing::info_span!("agent", node_id = %node_id);
    // Before anything touches the network: a second agent on this state directory stops
    // here, and results kept by the last process are back in hand.
    let outbox = span
        .in_scope(|| Outbox::open(&state.join(outbox::DIR_NAME), outbox))
        .context("failed to open the outbox")?;
    async move {
        let Some(topology::Connection {
            client,
            js,
            topology,
        }) = bus::join(
            &config.nats_url,
            format!("apiary-agent {node_id}"),
            &shutdown,
        )
        .await
        .context("failed to join the bus")?
        else {
            return Ok(());
        };
        // Runs take their instance and memory from a pool sized for the slots (twice over,
        // for runs given up on whose threads have not come back yet): 6 µs a warm run
        // instead of 15 µs with a mapping per run (docs/BENCHMARKS.md).
        let pool_size = slots.saturating_mul(2).saturating_add(2);
        let mut sandbox = Sandbox::pooled(pool_size, config.max_task_memory)?
            .with_scratch_root(state.join(sandbox::SCRATCH_DIR_NAME))
            .context("failed to prepare the scratch directories")?;
        if config.precompiled_only {
            sandbox = sandbox.precompiled_only();
        }
        if !sandbox.compiles() {
            tracing::info!(
                platform = %topology::host_platform(),
                "runtime-only: running modules precompiled for this platform"
            );
        }
        let sandbox = Arc::new(sandbox);
        let artifacts = match ArtifactCache::open(
            &state.join(artifacts::DIR_NAME),
            sandbox.engine(),
            config.artifact_cache_bytes,
        ) {
            Ok(artifacts) => Some(artifacts),
            Err(err) => {
                // Only a cost: every module is compiled once per process.
                tracing::warn!(error = %err, "cannot keep compiled modules on disk");
                None
            }
        };
        let modules = Arc::new(ModuleCache::new(
            topology.modules.clone(),
            topology.artifacts.clone(),
            sandbox.clone(),
            NonZeroUsize::new(config.module_cache_entries).unwrap_or(NonZeroUsize::MIN),
            artifacts,
        ));

        let agent = Arc::new(Agent {
            node_id: node_id.clone(),
            state,
            key,
            schedule: watch::Sender::new(Schedule::Open),
            leave: CancellationToken::new(),
            refusal: std::sync::Mutex::new(None),
            outbox,
            incarnation: info.incarnation.clone(),
            slots,
            client: client.clone(),
            js: js.clone(),
            result_objects: topology.result_objects.clone(),
            limits: NodeLimits::from(&config),
            modules,
            sandbox,
            app_store: app_host::AppStore::new(client.clone()),
            run_slots: tokio::sync::Semaphore::new(slots as usize),
            running: AtomicU32::new(0),
            cancels: cancel::Cancels::default(),
            completed: AtomicU64::new(0),
            sampler: std::sync::Mutex::new(sampler),
            heartbeat_interval_ms: AtomicU64::new(0),
            dispatch_to_result: timings::RecentDurations::default(),
        });

        // Results kept while the server was away are stored as soon as it is back, whether
        // or not a scheduler answers the registration yet.
        let stop_replay = CancellationToken::new();
        let replay = AbortOnDropHandle::new(tokio::spawn(
            outbox::replay(agent.clone(), stop_replay.clone()).in_current_span(),
        ));

        // The status endpoint answers before registration, so a node that cannot join can
        // still be asked what it is.
        let service = client
            .service_builder()
            .description("apiary agent: the node's own status")
            .metadata([("node_id".to_owned(), node_id.to_string())].into())
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|err| anyhow::anyhow!("failed to start the micro service: {err}"))?;
        let status_endpoint = service
            .endpoint_builder()
            .name("status")
            .add(subject::node(&node_id, NodeVerb::Status).to_string())
            .await
            .map_err(|err| anyhow::anyhow!("failed to add the status endpoint: {err}"))?;
        let started_at_ms = now_ms();
        let status_agent = agent.clone();
        let status_info = info.clone();
        let status = AbortOnDropHandle::new(tokio::spawn(
            rpc::serve(
                agent.client.clone(),
                status_endpoint,
                move |_, _: AgentStatusRequest| {
                    let reply = Reply::Ok(AgentStatus {
                        info: status_info.clone(),
                        metrics: status_agent.metrics(),
                        started_at_ms,
                        heartbeat_interval_ms: status_agent
                            .heartbeat_interval_ms
                            .load(Ordering::Relaxed),
                        modules: status_agent.modules.stats(),
                        dispatch_to_result: status_agent.dispatch_to_result.summary(),
                    });
                    std::future::ready(reply)
                },
            )
            .in_current_span(),
        ));

        // Cancel notices are heard from the start: a dispatch pulled after its task was
        // cancelled is then skipped.
        let stop_cancels = CancellationToken::new();
        let _cancels = AbortOnDropHandle::new(tokio::spawn(
            cancel::listen(agent.clone(), stop_cancels.clone()).in_current_span(),
        ));
        let _drain_deadlines = AbortOnDropHandle::new(tokio::spawn(
            stop_runs_at_drain_deadlines(agent.clone()).in_current_span(),
        ));

        systemd::status("registering with the cluster");
        let registration =
            match register_until_accepted(&client, &agent, &info, &config, &shutdown).await {
                Ok(Some(registration)) => registration,
                // Refused, or told to stop first: the service goes with the agent, so nothing
                // keeps answering for a node that is not there.
                outcome => {
                    status.abort();
                    service.stop().await.ok();
                    return outcome.map(drop);
                }
            };
        agent
            .heartbeat_interval_ms
            .store(registration.heartbeat_interval_ms, Ordering::Relaxed);
        let heartbeat_interval = Duration::from_millis(registration.heartbeat_interval_ms.max(1));
        tracing::info!(
            slots,
            heartbeat_interval_ms = registration.heartbeat_interval_ms,
            "registered"
        );
        systemd::ready(&format!("registered as {node_id}, {slots} slots"));

        let stop_heartbeats = CancellationToken::new();
        // Owned, not detached: if this future is dropped (the process is dying, or a test
        // simulates a crash) the heartbeats stop with it.
        let heartbeats = AbortOnDropHandle::new(tokio::spawn(
            heartbeat_loop(
                client.clone(),
                agent.clone(),
                info.clone(),
                config.clone(),
                heartbeat_interval,
                stop_heartbeats.clone(),
            )
            .in_current_span(),
        ));

        let stop_pulling = CancellationToken::new();
        let mut work = std::pin::pin!(work_loop(agent.clone(), &stop_pulling));
        let ended_early = tokio::select! {
            ended = &mut work => Some(ended),
            _ = shutdown.cancelled() => None,
            // Told by the cluster: removed by an operator, or the node id is now bound to
            // another key.
            _ = agent.leave.cancelled() => None,
        };

        // Say goodbye while still pulling, so that schedulers stop placing work here before
        // this node stops taking it; then stop pulling and let the running tasks finish.
        // systemd hears first: the watchdog, fed by the heartbeats, is off from here on.
        systemd::stopping();
        stop_heartbeats.cancel();
        let sequence = heartbeats.await.unwrap_or(0);
        send_leaving(&client, &agent, sequence + 1, config.request_timeout).await;
        let (work, running) = match ended_early {
            Some(ended) => ended,
            None => {
                stop_pulling.cancel();
                work.await
            }
        };
        drain(running, config.shutdown_grace).await;
        // What still runs is abandoned: its guest is stopped at its next epoch tick, so that
        // no run (on a worker thread or a pool thread) holds the process's exit.
        agent.cancels.stop_all();
        // The replay runs until the tasks are drained, so that results kept during the drain
        // can still go out; what waits after that stays on disk for the next start.
        stop_replay.cancel();
        replay.await.ok();
        let waiting = agent.outbox.waiting();
        if waiting > 0 {
            tracing::warn!(
                waiting,
                "results still wait in the outbox; the next start of this agent stores them"
            );
        }
        status.abort();
        // Bounded: with the server away, a flush waits for a reconnection that may never
        // come, and a stopping agent must still stop.
        let farewell = async {
            service.stop().await.ok();
            client.flush().await.ok();
        };
        if tokio::time::timeout(config.request_timeout, farewell)
            .await
            .is_err()
        {
            tracing::debug!("the server did not confirm the last messages; stopping anyway");
        }
        tracing::info!("agent stopped");
        if let Some(refusal) = agent.take_refusal() {
            return Err(Refused(refusal).into());
        }
        work
    }
    .instrument(span)
    .await
}

/// The cluster refused this node: a bad, expired, revoked or used-up join token, or a node
/// id bound to another key. Retrying cannot help until an operator acts, so the agent exits
/// with [`EXIT_REFUSED`] and systemd does not restart it.
#[derive(Debug, thiserror::Error)]
#[error("the cluster refused this node: {0}")]
pub struct Refused(pub ErrorBody);

/// The exit status of an agent the cluster refused: `EX_CONFIG` from sysexits.h, named in
/// the unit's `RestartPreventExitStatus=`.
pub const EXIT_REFUSED: u8 = 78;

/// The exit status for the error `run` returned.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Refused>().is_some() {
        EXIT_REFUSED
    } else {
        1
    }
}

/// What the task-running side of the agent shares.
struct Agent {
    node_id: NodeId,
    /// The node key, the offline outbox and the joined and removed markers live here.
    state: StateDir,
    /// Signs every register and heartbeat body.
    key: KeyPair,
    /// Whether the operator lets this node take new work, from the latest heartbeat reply.
    schedule: watch::Sender<Schedule>,
    /// Cancelled when the cluster tells this node to go: an operator removed it, or its id
    /// is bound to another key.
    leave: CancellationToken,
    /// Why the cluster told the node to go, when that is an error.
    refusal: std::sync::Mutex<Option<ErrorBody>>,
    /// Results the server has not taken yet.
    outbox: Outbox,
    /// This process's incarnation, sent with every heartbeat.
    incarnation: String,
    slots: u32,
    client: async_nats::Client,
    js: jetstream::Context,
    /// `APIARY_RESULT_OBJECTS`: outputs too large for a result message.
    result_objects: async_nats::jetstream::object_store::ObjectStore,
    limits: NodeLimits,
    modules: Arc<ModuleCache>,
    sandbox: Arc<Sandbox>,
    /// Where granted guests' app-store and publish calls go.
    app_store: Arc<app_host::AppStore>,
    /// One permit per slot: a task runs only while it holds one. The node's consumer hands
    /// out more dispatches than there are slots (see `topology::DISPATCHES_PER_SLOT`), and
    /// those wait here for a permit.
    run_slots: tokio::sync::Semaphore,
    running: AtomicU32,
    /// Stop flags of running attempts, for cancel notices.
    cancels: cancel::Cancels,
    completed: AtomicU64,
    /// Shared by heartbeats and status requests; CPU use is measured between samples.
    sampler: std::sync::Mutex<MetricsSampler>,
    /// Set by registration; 0 until then.
    heartbeat_interval_ms: AtomicU64,
    /// From a dispatch's arrival to its result being ready, for the last tasks.
    dispatch_to_result: timings::RecentDurations,
}

impl Agent {
    /// Stops the agent because the cluster refused it.
    fn refused(&self, refusal: ErrorBody) {
        *self
            .refusal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(refusal);
        self.leave.cancel();
    }

    fn take_refusal(&self) -> Option<ErrorBody> {
        self.refusal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn metrics(&self) -> NodeMetrics {
        self.sampler
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .sample(
                self.running.load(Ordering::Relaxed),
                self.slots,
                self.completed.load(Ordering::Relaxed),
            )
    }
}
