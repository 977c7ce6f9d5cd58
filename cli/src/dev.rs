//! `apiary dev`: a whole local stack in one process, for trying things and for the demo.
//!
//! A private `nats-server` (configured by `broker-config/dev.conf`), one scheduler and one
//! agent, the last two running in-process through their crates' `run` functions, exactly as
//! their binaries do.

use std::time::Duration;

use anyhow::Context as _;
use apiary_agent::AgentConfig;
use apiary_devstack::{Backbone, watch_node};
use apiary_proto::NodeId;
use apiary_scheduler::SchedulerConfig;
use tokio_util::sync::CancellationToken;

/// How long the stack may take to have a node online.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running local stack.
#[derive(Debug)]
pub struct DevStack {
    backbone: Backbone,
    /// The agents' node keys and outboxes, which live as long as the stack's server.
    _agent_state: tempfile::TempDir,
    stop_scheduler: CancellationToken,
    stop_agents: CancellationToken,
    scheduler: tokio::task::JoinHandle<anyhow::Result<()>>,
    agents: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// What a local stack is made of, beyond the defaults of `apiary dev`.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// The server's port; 0 picks a free one.
    pub port: u16,
    /// How many agents (nodes `local-0`, `local-1`, …; a lone agent is named after the host).
    pub agents: usize,
    /// The server writes every JetStream message to disk before acknowledging it
    /// (`sync_interval: always`), rather than every two minutes.
    pub sync_always: bool,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            port: 0,
            agents: 1,
            sync_always: false,
        }
    }
}

impl DevStack {
    /// Starts the server, a scheduler and an agent, and returns once the agent's node is
    /// registered and online.
    pub async fn start(port: u16) -> anyhow::Result<Self> {
        Self::start_with(DevOptions {
            port,
            ..DevOptions::default()
        })
        .await
    }

    /// Starts a stack as `options` say, and returns once every agent's node is online.
    pub async fn start_with(options: DevOptions) -> anyhow::Result<Self> {
        let config = Backbone::server_config(options.sync_always);
        // The local agents join like any other: with a token.
        let backbone =
            Backbone::start_with(options.port, "apiary dev: the local agents", config).await?;
        let url = backbone.url().to_owned();
        let agents = options.agents.max(1);
        let names: Vec<Option<NodeId>> = if agents == 1 {
            vec![None]
        } else {
            (0..agents)
                .map(|index| NodeId::new(format!("local-{index}")).map(Some))
                .collect::<Result<_, _>>()
                .context("failed to name the local agents")?
        };
        let mut online = Vec::new();
        for name in &names {
            online.push(watch_node(&url, name.as_ref()).await?);
        }

        let stop_scheduler = CancellationToken::new();
        let stop_agents = CancellationToken::new();
        let scheduler = tokio::spawn(apiary_scheduler::run(
            SchedulerConfig {
                nats_url: url.clone(),
                ..SchedulerConfig::default()
            },
            stop_scheduler.clone(),
        ));
        let agent_state =
            tempfile::tempdir().context("failed to create the agents' state directory")?;
        let agents = names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                tokio::spawn(apiary_agent::run(
                    AgentConfig {
                        nats_url: url.clone(),
                        node_id: name.as_ref().map(ToString::to_string),
                        state_dir: Some(agent_state.path().join(index.to_string())),
                        token: Some(backbone.token.clone().into()),
                        ..AgentConfig::default()
                    },
                    stop_agents.clone(),
                ))
            })
            .collect();
        let stack = Self {
            backbone,
            _agent_state: agent_state,
            stop_scheduler,
            stop_agents,
            scheduler,
            agents,
        };

        let all_online = futures::future::try_join_all(online);
        match tokio::time::timeout(READY_TIMEOUT, all_online).await {
            Ok(Ok(_)) => Ok(stack),
            outcome => {
                let log = stack.backbone.server.log();
                stack.stop().await.ok();
                let why = match outcome {
                    Ok(Err(err)) => format!("{err:#}"),
                    _ => format!("not every node came online within {READY_TIMEOUT:?}"),
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
        self.stop_agents.cancel();
        let mut agents = Vec::new();
        for agent in self.agents {
            agents.push(agent.await.context("an agent panicked")?);
        }
        self.stop_scheduler.cancel();
        let scheduler = self.scheduler.await.context("the scheduler panicked")?;
        drop(self.backbone);
        for agent in agents {
            agent.context("an agent failed")?;
        }
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
