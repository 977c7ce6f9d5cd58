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
//! 5. `status` (request, micro service `apiary-agent`): the agent's own account of itself.
//!
//! `run` keeps the start and shutdown order; each job has its own module: `membership`
//! (register, heartbeat, leave), `work` (pulling, handing back, draining) and `task` (one run,
//! its result and its acks).

pub mod config;
pub mod hardware;
mod membership;
pub mod modules;
pub mod sandbox;
pub mod state;
mod systemd;
mod task;
mod work;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::message::{AgentStatus, AgentStatusRequest, NodeMetrics, Reply};
use apiary_proto::rpc;
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, now_ms, topology};
use async_nats::jetstream;
use async_nats::service::ServiceExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

pub use config::{AgentConfig, NodeLimits};

use crate::hardware::MetricsSampler;
use crate::membership::{heartbeat_loop, register_until_accepted, send_leaving};
use crate::modules::ModuleCache;
use crate::sandbox::Sandbox;
use crate::state::StateDir;
use crate::work::{drain, work_loop};

/// The NATS micro service name every agent registers under (`nats micro ls` lists them all).
pub const SERVICE_NAME: &str = "apiary-agent";

/// Runs the agent until `shutdown` is cancelled, then finishes running tasks (up to the
/// configured grace period), tells the cluster it is leaving, and returns.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let facts = hardware::host_facts();
    let node_id = match &config.node_id {
        Some(id) => NodeId::new(id.as_str()).context("invalid node id in configuration")?,
        None => NodeId::from_hostname(&facts.hostname)
            .context("failed to derive a node id from the host name; set APIARY_NODE_ID")?,
    };
    let slots = config.slots.unwrap_or(facts.cpu_cores).max(1);
    let state = StateDir::open(config.state_dir.as_deref())
        .context("failed to open the state directory")?;
    let info = hardware::node_info(node_id.clone(), &facts, slots, config.labels.clone());

    let span = tracing::info_span!("agent", node_id = %node_id);
    async move {
        let topology::Connection {
            client,
            js,
            topology,
        } = topology::join(&config.nats_url, format!("apiary-agent {node_id}"))
            .await
            .context("failed to join the bus")?;
        let sandbox = Arc::new(Sandbox::new()?);
        let modules = Arc::new(ModuleCache::new(
            topology.modules.clone(),
            sandbox.clone(),
            NonZeroUsize::new(config.module_cache_entries).unwrap_or(NonZeroUsize::MIN),
        ));

        let agent = Arc::new(Agent {
            node_id: node_id.clone(),
            state,
            incarnation: info.incarnation.clone(),
            slots,
            client: client.clone(),
            js: js.clone(),
            limits: NodeLimits::from(&config),
            modules,
            sandbox,
            running: AtomicU32::new(0),
            completed: AtomicU64::new(0),
            sampler: std::sync::Mutex::new(MetricsSampler::new()),
            heartbeat_interval_ms: AtomicU64::new(0),
        });

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
            rpc::serve(status_endpoint, move |_, _: AgentStatusRequest| {
                let reply = Reply::Ok(AgentStatus {
                    info: status_info.clone(),
                    metrics: status_agent.metrics(),
                    started_at_ms,
                    heartbeat_interval_ms: status_agent
                        .heartbeat_interval_ms
                        .load(Ordering::Relaxed),
                });
                std::future::ready(reply)
            })
            .in_current_span(),
        ));

        systemd::status("registering with the cluster");
        let registration = match register_until_accepted(&client, &info, &config, &shutdown).await {
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
        status.abort();
        service.stop().await.ok();
        client.flush().await.ok();
        tracing::info!("agent stopped");
        work
    }
    .instrument(span)
    .await
}

/// What the task-running side of the agent shares.
struct Agent {
    node_id: NodeId,
    /// The node key and the offline outbox live here.
    #[allow(dead_code)]
    state: StateDir,
    /// This process's incarnation, sent with every heartbeat.
    incarnation: String,
    slots: u32,
    client: async_nats::Client,
    js: jetstream::Context,
    limits: NodeLimits,
    modules: Arc<ModuleCache>,
    sandbox: Arc<Sandbox>,
    running: AtomicU32,
    completed: AtomicU64,
    /// Shared by heartbeats and status requests; CPU use is measured between samples.
    sampler: std::sync::Mutex<MetricsSampler>,
    /// Set by registration; 0 until then.
    heartbeat_interval_ms: AtomicU64,
}

impl Agent {
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
