//! `apiary dev`: a whole local stack in one process, for trying things and for the demo.
//!
//! A private `nats-server` (configured by `broker-config/dev.conf`), one scheduler and one
//! agent, the last two running in-process through their crates' `run` functions, exactly as
//! their binaries do.

use std::time::Duration;

use anyhow::Context as _;
use apiary_agent::AgentConfig;
use apiary_devstack::{Backbone, watch_node};
use apiary_scheduler::SchedulerConfig;
use tokio_util::sync::CancellationToken;

/// How long the stack may take to have a node online.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running local stack.
#[derive(Debug)]
pub struct DevStack {
    backbone: Backbone,
    /// The agent's node key and outbox, which live as long as the stack's server.
    _agent_state: tempfile::TempDir,
    stop_scheduler: CancellationToken,
    stop_agent: CancellationToken,
    scheduler: tokio::task::JoinHandle<anyhow::Result<()>>,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl DevStack {
    /// Starts the server, a scheduler and an agent, and returns once the agent's node is
    /// registered and online.
    pub async fn start(port: u16) -> anyhow::Result<Self> {
        // The local agent joins like any other: with a token.
        let backbone = Backbone::start(port, "apiary dev: the local agent").await?;
        let url = backbone.url().to_owned();
        let online = watch_node(&url, None).await?;

        let stop_scheduler = CancellationToken::new();
        let stop_agent = CancellationToken::new();
        let scheduler = tokio::spawn(apiary_scheduler::run(
            SchedulerConfig {
                nats_url: url.clone(),
                ..SchedulerConfig::default()
            },
            stop_scheduler.clone(),
        ));
        let agent_state =
            tempfile::tempdir().context("failed to create the agent's state directory")?;
        let agent = tokio::spawn(apiary_agent::run(
            AgentConfig {
                nats_url: url.clone(),
                state_dir: Some(agent_state.path().to_owned()),
                token: Some(backbone.token.clone().into()),
                ..AgentConfig::default()
            },
            stop_agent.clone(),
        ));
        let stack = Self {
            backbone,
            _agent_state: agent_state,
            stop_scheduler,
            stop_agent,
            scheduler,
            agent,
        };

        match tokio::time::timeout(READY_TIMEOUT, online).await {
            Ok(Ok(_)) => Ok(stack),
            outcome => {
                let log = stack.backbone.server.log();
                stack.stop().await.ok();
                let why = match outcome {
                    Ok(Err(err)) => format!("{err:#}"),
                    _ => format!("no node came online within {READY_TIMEOUT:?}"),
                };
                anyhow::bail!("{why}\n{log}")
            }
        }
    }

    pub fn url(&self) -> &str {
        self.backbone.url()
    }

    /// Stops the agent (letting running tasks finish and saying goodbye to the scheduler),
    /// then the scheduler, then the server.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop_agent.cancel();
        let agent = self.agent.await.context("the agent panicked")?;
        self.stop_scheduler.cancel();
        let scheduler = self.scheduler.await.context("the scheduler panicked")?;
        drop(self.backbone);
        agent.context("the agent failed")?;
        scheduler.context("the scheduler failed")
    }
}

/// Runs `apiary dev` until `shutdown`: prints the URL once the stack is ready.
pub async fn run(port: u16, shutdown: CancellationToken) -> anyhow::Result<()> {
    let stack = DevStack::start(port).await?;
    // The demo script waits for exactly this line.
    println!("apiary dev: serving {}", stack.url());
    eprintln!(
        "Try: APIARY_NATS_URL={} apiary nodes ls    (Ctrl-C stops the stack)",
        stack.url()
    );
    shutdown.cancelled().await;
    stack.stop().await
}
