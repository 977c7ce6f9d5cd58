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
use apiary_proto::codec;
use apiary_proto::message::{
    AgentStatus, AgentStatusRequest, Dispatch, Heartbeat, HeartbeatReply, NodeInfo, NodeMetrics,
    NodeState, Outcome, RegisterReply, RegisterRequest, Reply, TaskError, TaskErrorKind,
    TaskResult,
};
use apiary_proto::rpc::{self, RequestError};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, now_ms, stored, topology};
use async_nats::jetstream::{self, AckKind};
use async_nats::service::ServiceExt as _;
use futures::{FutureExt as _, StreamExt as _};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

pub use config::{AgentConfig, NodeLimits};

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

        let agent = Arc::new(Agent {
            node_id: node_id.clone(),
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
            incarnation: agent.incarnation.clone(),
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
        incarnation: agent.incarnation.clone(),
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

/// Pulls the node's dispatched tasks and starts each (at most `slots` run at once: the
/// consumer hands out no more) until `stop`. Returns the tasks still running.
async fn work_loop(
    agent: Arc<Agent>,
    stop: &CancellationToken,
) -> (anyhow::Result<()>, JoinSet<()>) {
    let mut running = JoinSet::new();
    let Some(mut messages) = dispatched_tasks(&agent, stop).await else {
        return (Ok(()), running);
    };
    let outcome = loop {
        // Reap finished tasks so the set does not grow with every task ever run.
        while running.try_join_next().is_some() {}
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
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
                None => {
                    // The consumer was deleted: a scheduler took this node's registration for
                    // a new process and handed out again what the consumer held (or an
                    // operator removed it). Pull from a new one; whatever this process still
                    // runs finishes, and its result is stored once per attempt.
                    tracing::warn!("this node's dispatch consumer went away; opening it again");
                    match dispatched_tasks(&agent, stop).await {
                        Some(reopened) => messages = reopened,
                        None => break Ok(()),
                    }
                }
            },
        }
    };
    // Tasks already delivered to this client but not started go back at once, instead of
    // waiting out their ack wait and costing an attempt when they are moved.
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        message.ack_with(AckKind::Nak(None)).await.ok();
    }
    (outcome, running)
}

/// Opens this node's dispatch consumer and starts pulling, retrying until it works or
/// `stop` (then `None`). Creating the consumer can fail for a moment while a scheduler
/// deletes it to hand out a previous process's work, or while the server restarts; neither
/// is a reason for the agent to exit.
async fn dispatched_tasks(
    agent: &Agent,
    stop: &CancellationToken,
) -> Option<jetstream::consumer::pull::Stream> {
    let mut backoff = Duration::from_millis(50);
    let mut warned = false;
    loop {
        match open_dispatched_tasks(agent).await {
            Ok(messages) => return Some(messages),
            Err(err) if !warned => {
                tracing::warn!(error = %format!("{err:#}"), "cannot pull dispatched tasks yet; retrying");
                warned = true;
            }
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "still cannot pull dispatched tasks")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn open_dispatched_tasks(agent: &Agent) -> anyhow::Result<jetstream::consumer::pull::Stream> {
    let consumer: jetstream::consumer::PullConsumer = agent
        .js
        .get_stream(topology::DISPATCH_STREAM)
        .await
        .context("failed to open the dispatch stream")?
        .create_consumer(topology::node_dispatch_consumer(
            &agent.node_id,
            agent.slots,
        ))
        .await
        .context("failed to create this node's dispatch consumer")?;
    consumer
        .messages()
        .await
        .context("failed to start pulling dispatched tasks")
}

/// Waits up to `grace` for running tasks. Tasks still running after it are abandoned with
/// their messages unacknowledged, so JetStream hands them out again.
async fn drain(mut running: JoinSet<()>, grace: Duration) {
    if running.is_empty() {
        return;
    }
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

impl Agent {
    /// Runs one dispatched task and publishes its result. Never panics on bad input: a
    /// message that cannot be decoded is terminated (it can never succeed), and every other
    /// failure becomes a typed result.
    async fn handle(self: Arc<Self>, message: jetstream::Message) {
        let Some(dispatch) =
            apiary_proto::inbound::decode_or_terminate::<Dispatch>(&message, "dispatch").await
        else {
            return;
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
        let result = fit_within(result, self.max_result_bytes());
        match &result.outcome {
            Outcome::Completed { exit_code, .. } => {
                tracing::info!(
                    exit_code,
                    elapsed_ms = result.finished_at_ms.saturating_sub(started_at_ms),
                    "task completed"
                );
            }
            Outcome::Failed { error, .. } => {
                tracing::info!(kind = %error.kind, error = %error.message, "task failed");
            }
        }

        match self.publish_result(&result).await {
            Ok(()) => {
                self.completed.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = message.double_ack().await {
                    // The result is stored; a redelivery would run the task again and the
                    // duplicate result would be dropped by its message id.
                    tracing::warn!(error = %format!("{err:#}"), "failed to acknowledge a finished task");
                }
            }
            Err(err) => {
                // Leave the message unacknowledged: it comes back and the task runs again,
                // rather than its result being lost. (A result too large for the server was
                // already turned into an output-limit failure, so this is a transient error.)
                tracing::error!(error = %format!("{err:#}"), "failed to publish a task result");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
                    .ok();
            }
        }
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// The largest encoded result the server accepts, less room for headers.
    fn max_result_bytes(&self) -> usize {
        const HEADER_ROOM: usize = 1024;
        self.client
            .server_info()
            .max_payload
            .saturating_sub(HEADER_ROOM)
    }

    async fn execute(&self, dispatch: &Dispatch) -> Outcome {
        if let Err(error) = self.limits.admit(&dispatch.task.limits) {
            return Outcome::Failed {
                error,
                stderr: Default::default(),
            };
        }
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
        stored::result(&self.js, result).await?;
        Ok(())
    }
}

/// A result the server can carry. A task may stay within its own output limit and still
/// produce a result larger than the server's `max_payload` (stdout and stderr are limited
/// separately); publishing that would fail on every retry, so it becomes an output-limit
/// failure instead, keeping as much of stderr as fits.
fn fit_within(mut result: TaskResult, max_bytes: usize) -> TaskResult {
    let size = codec::encode(&result).map_or(usize::MAX, |bytes| bytes.len());
    if size <= max_bytes {
        return result;
    }
    let stderr = match &result.outcome {
        Outcome::Completed { stderr, .. } | Outcome::Failed { stderr, .. } => stderr.0.clone(),
    };
    let kept = stderr.slice(..stderr.len().min(max_bytes / 2));
    result.outcome = Outcome::Failed {
        error: TaskError::new(
            TaskErrorKind::OutputLimit,
            format!(
                "the task's output makes a {size} byte result; the server carries at most {max_bytes}"
            ),
        ),
        stderr: kept.into(),
    };
    result
}

/// Sends a progress ack every [`topology::PROGRESS_INTERVAL`] until `done`.
async fn send_progress(message: jetstream::Message, done: CancellationToken) {
    // The first tick one period from now: an interval's immediate first tick still waits for
    // the timer wheel (about a millisecond), which would sit on every task's path.
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + topology::PROGRESS_INTERVAL,
        topology::PROGRESS_INTERVAL,
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_proto::{Payload, TaskId};

    fn result_with_output(stdout: usize, stderr: usize) -> TaskResult {
        TaskResult {
            task_id: TaskId::new("t").unwrap(),
            node_id: NodeId::new("n").unwrap(),
            attempt: 1,
            outcome: Outcome::Completed {
                exit_code: 0,
                stdout: Payload::from(vec![b'o'; stdout]),
                stderr: Payload::from(vec![b'e'; stderr]),
            },
            started_at_ms: 0,
            finished_at_ms: 0,
            reply_to: None,
        }
    }

    #[test]
    fn results_that_fit_are_left_alone() {
        let result = result_with_output(100, 10);
        assert_eq!(fit_within(result.clone(), 10_000), result);
    }

    #[test]
    fn results_too_large_for_the_server_become_output_limit_failures() {
        let fitted = fit_within(result_with_output(5_000, 3_000), 4_000);
        match &fitted.outcome {
            Outcome::Failed { error, stderr } => {
                assert_eq!(error.kind, TaskErrorKind::OutputLimit);
                assert_eq!(stderr.len(), 2_000);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(codec::encode(&fitted).unwrap().len() <= 4_000);
    }
}
