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

pub mod config;
pub mod hardware;
pub mod modules;
pub mod sandbox;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::codec::{self, Encoding};
use apiary_proto::message::{
    AgentStatus, AgentStatusRequest, Dispatch, Heartbeat, HeartbeatReply, NodeInfo, NodeMetrics,
    NodeState, Outcome, RegisterReply, RegisterRequest, Reply, TaskError, TaskErrorKind,
    TaskResult,
};
use apiary_proto::rpc::{self, RequestError};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, headers, now_ms, topology};
use async_nats::jetstream::{self, AckKind};
use async_nats::service::ServiceExt as _;
use futures::StreamExt as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

pub use config::AgentConfig;

use crate::hardware::MetricsSampler;
use crate::modules::ModuleCache;
use crate::sandbox::Sandbox;

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

        let Some(registration) =
            register_until_accepted(&client, &info, &config, &shutdown).await?
        else {
            return Ok(());
        };
        let heartbeat_interval = Duration::from_millis(registration.heartbeat_interval_ms.max(1));
        tracing::info!(
            slots,
            heartbeat_interval_ms = registration.heartbeat_interval_ms,
            "registered"
        );

        let agent = Arc::new(Agent {
            node_id: node_id.clone(),
            slots,
            js: js.clone(),
            modules,
            sandbox,
            running: AtomicU32::new(0),
            completed: AtomicU64::new(0),
            sampler: std::sync::Mutex::new(MetricsSampler::new()),
        });

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
                    heartbeat_interval_ms: registration.heartbeat_interval_ms,
                });
                std::future::ready(reply)
            })
            .in_current_span(),
        ));

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

        let work = work_loop(agent.clone(), &shutdown, config.shutdown_grace).await;

        stop_heartbeats.cancel();
        let sequence = heartbeats.await.unwrap_or(0);
        status.abort();
        service.stop().await.ok();
        send_leaving(&client, &agent, sequence + 1, config.request_timeout).await;
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
    slots: u32,
    js: jetstream::Context,
    modules: Arc<ModuleCache>,
    sandbox: Arc<Sandbox>,
    running: AtomicU32,
    completed: AtomicU64,
    /// Shared by heartbeats and status requests; CPU use is measured between samples.
    sampler: std::sync::Mutex<MetricsSampler>,
}

/// Registers, retrying with backoff while no scheduler answers. Returns `None` if shutdown
/// came first, and an error if the cluster refused the node (a bad token, say), which no
/// amount of retrying fixes.
async fn register_until_accepted(
    client: &async_nats::Client,
    info: &NodeInfo,
    config: &AgentConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<RegisterReply>> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match register(client, info, config).await {
            Ok(reply) => return Ok(Some(reply)),
            Err(RequestError::Refused(refusal)) => {
                return Err(anyhow::anyhow!("the cluster refused this node: {refusal}"));
            }
            // No scheduler yet is normal while a cluster starts up.
            Err(err @ RequestError::NoResponders { .. }) => {
                tracing::info!(error = %err, retry_in = ?backoff, "waiting for a scheduler");
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "registration failed; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_register_backoff);
    }
}

async fn register(
    client: &async_nats::Client,
    info: &NodeInfo,
    config: &AgentConfig,
) -> Result<RegisterReply, RequestError> {
    rpc::request(
        client,
        subject::node(&info.node_id, NodeVerb::Register),
        &RegisterRequest {
            node: info.clone(),
            token: config.token.clone(),
        },
        config.request_timeout,
    )
    .await
}

/// Heartbeats every `interval` until `stop`; returns the last sequence number sent.
async fn heartbeat_loop(
    client: async_nats::Client,
    agent: Arc<Agent>,
    info: NodeInfo,
    config: AgentConfig,
    interval: Duration,
    stop: CancellationToken,
) -> u64 {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return sequence,
            _ = ticker.tick() => {}
        }
        sequence += 1;
        let heartbeat = Heartbeat {
            node_id: agent.node_id.clone(),
            seq: sequence,
            state: NodeState::Active,
            metrics: agent.metrics(),
        };
        match send_heartbeat(&client, &heartbeat, config.request_timeout).await {
            Ok(HeartbeatReply { registered: true }) => {}
            Ok(HeartbeatReply { registered: false }) => {
                tracing::warn!("the cluster has no record of this node; registering again");
                if let Err(err) = register(&client, &info, &config).await {
                    tracing::warn!(error = %err, "re-registration failed");
                }
            }
            Err(err) => tracing::warn!(error = %err, seq = sequence, "heartbeat failed"),
        }
    }
}

async fn send_heartbeat(
    client: &async_nats::Client,
    heartbeat: &Heartbeat,
    timeout: Duration,
) -> Result<HeartbeatReply, RequestError> {
    rpc::request(
        client,
        subject::node(&heartbeat.node_id, NodeVerb::Heartbeat),
        heartbeat,
        timeout,
    )
    .await
}

/// Tells the cluster that this node is leaving, so it is shown gone at once. Best effort: a
/// node that cannot say goodbye is found offline by its missed heartbeats instead.
async fn send_leaving(client: &async_nats::Client, agent: &Agent, seq: u64, timeout: Duration) {
    let heartbeat = Heartbeat {
        node_id: agent.node_id.clone(),
        seq,
        state: NodeState::Leaving,
        metrics: agent.metrics(),
    };
    if let Err(err) = send_heartbeat(client, &heartbeat, timeout).await {
        tracing::warn!(error = %err, "could not announce leaving");
    }
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

/// Pulls the node's dispatched tasks and runs up to `slots` at once until `shutdown`, then
/// waits up to `grace` for running tasks.
async fn work_loop(
    agent: Arc<Agent>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let stream = agent
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(topology::node_dispatch_consumer(
            &agent.node_id,
            agent.slots,
        ))
        .await
        .context("failed to create this node's dispatch consumer")?;
    let mut messages = consumer
        .messages()
        .await
        .context("failed to start pulling dispatched tasks")?;

    let mut running = JoinSet::new();
    let outcome = loop {
        // Reap finished tasks so the set does not grow with every task ever run.
        while running.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = messages.next() => match next {
                Some(Ok(message)) => {
                    let agent = agent.clone();
                    running.spawn(async move { agent.handle(message).await });
                }
                Some(Err(err)) => {
                    // Pull errors are transient (a server restart, a missed heartbeat of the
                    // pull request); the stream keeps going.
                    tracing::warn!(error = %err, "error while pulling dispatched tasks");
                }
                None => break Err(anyhow::anyhow!("the dispatch consumer closed")),
            },
        }
    };
    drop(messages);

    if !running.is_empty() {
        tracing::info!(
            running = running.len(),
            "waiting for running tasks to finish"
        );
        let drained = tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = running.len(),
                "tasks still running after the grace period; they will be redelivered"
            );
        }
    }
    outcome
}

impl Agent {
    /// Runs one dispatched task and publishes its result. Never panics on bad input: a
    /// message that cannot be decoded is terminated (it can never succeed), and every other
    /// failure becomes a typed result.
    async fn handle(self: Arc<Self>, message: jetstream::Message) {
        let dispatch = match codec::decode_message::<Dispatch>(
            message.headers.as_ref(),
            &message.payload,
        ) {
            Ok((dispatch, _)) => dispatch,
            Err(err) => {
                let sequence = message.info().map(|info| info.stream_sequence).ok();
                tracing::error!(error = %err, ?sequence, "dropping a malformed dispatch message");
                if let Err(err) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %err, "failed to terminate a malformed message");
                }
                return;
            }
        };
        let span = tracing::info_span!(
            "task",
            task_id = %dispatch.task.id,
            attempt = dispatch.attempt,
        );
        self.run_task(message, dispatch).instrument(span).await;
    }

    async fn run_task(&self, message: jetstream::Message, dispatch: Dispatch) {
        self.running.fetch_add(1, Ordering::Relaxed);
        let started_at_ms = now_ms();

        // Keep the message ours while the task runs: without progress acks JetStream would
        // hand it to someone else after the ack wait.
        let keep_alive = CancellationToken::new();
        let progress = AbortOnDropHandle::new(tokio::spawn(send_progress(
            message.clone(),
            keep_alive.clone(),
        )));
        let outcome = self.execute(&dispatch).await;
        keep_alive.cancel();
        progress.await.ok();

        let result = TaskResult {
            task_id: dispatch.task.id.clone(),
            node_id: self.node_id.clone(),
            attempt: dispatch.attempt,
            outcome,
            started_at_ms,
            finished_at_ms: now_ms(),
            reply_to: dispatch.task.reply_to.clone(),
        };
        match &result.outcome {
            Outcome::Completed { exit_code, .. } => {
                tracing::info!(
                    exit_code,
                    elapsed_ms = result.finished_at_ms - started_at_ms,
                    "task completed"
                );
            }
            Outcome::Failed { error, .. } => {
                tracing::info!(kind = %error.kind, error = %error.message, "task failed");
            }
        }

        match self.publish_result(&result).await {
            Ok(()) => {
                if let Err(err) = message.double_ack().await {
                    // The result is stored; a redelivery would run the task again and the
                    // duplicate result would be dropped by its message id.
                    tracing::warn!(error = %err, "failed to acknowledge a finished task");
                }
            }
            Err(err) => {
                // Leave the message unacknowledged: it comes back after the ack wait and the
                // task runs again, rather than its result being lost.
                tracing::error!(error = %err, "failed to publish a task result");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
                    .ok();
            }
        }
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    async fn execute(&self, dispatch: &Dispatch) -> Outcome {
        let module = match self.modules.get(&dispatch.task.module).await {
            Ok(module) => module,
            Err(error) => {
                return Outcome::Failed {
                    error,
                    stderr: Default::default(),
                };
            }
        };
        let sandbox = self.sandbox.clone();
        let input = dispatch.task.input.0.clone();
        let limits = dispatch.task.limits.clone();
        tokio::task::spawn_blocking(move || sandbox.run(&module, input, &limits))
            .await
            .unwrap_or_else(|err| Outcome::Failed {
                error: TaskError::new(
                    TaskErrorKind::Internal,
                    format!("the task's thread failed: {err}"),
                ),
                stderr: Default::default(),
            })
    }

    async fn publish_result(&self, result: &TaskResult) -> anyhow::Result<()> {
        let payload = codec::encode(result)?;
        let mut headers = Encoding::MsgPack.headers();
        headers.insert(headers::MSG_ID, result.msg_id().as_str());
        headers.insert(headers::TASK_ID, result.task_id.as_str());
        self.js
            .publish_with_headers(
                subject::node(&self.node_id, NodeVerb::Result),
                headers,
                payload,
            )
            .await
            .context("failed to publish the result")?
            .await
            .context("JetStream did not store the result")?;
        Ok(())
    }
}

/// Sends a progress ack every third of the ack wait until `done`.
async fn send_progress(message: jetstream::Message, done: CancellationToken) {
    let mut ticker = tokio::time::interval(topology::ACK_WAIT / 3);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = ticker.tick() => {
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %err, "failed to extend a running task's ack wait");
                }
            }
        }
    }
}
