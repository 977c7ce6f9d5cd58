//! `apiary dev`: a whole local stack in one process, for trying things and for the demo.
//!
//! A private `nats-server` (configured by `broker-config/dev.conf`), one scheduler and one
//! agent, the last two running in-process through their crates' `run` functions, exactly as
//! their binaries do.

use std::time::Duration;

use anyhow::Context as _;
use apiary_agent::AgentConfig;
use apiary_proto::admin::TokenCreateRequest;
use apiary_proto::message::{NodeLiveness, NodeState};
use apiary_proto::topology;
use apiary_scheduler::SchedulerConfig;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use apiary_broker::{BrokerOptions, DEV_CONFIG, NatsServer};

/// How long the stack may take to have a node online.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running local stack.
#[derive(Debug)]
pub struct DevStack {
    server: NatsServer,
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
        let server = NatsServer::start(BrokerOptions {
            port,
            config: Some(DEV_CONFIG.to_owned()),
        })
        .await
        .context("failed to start nats-server")?;
        let url = server.url().to_owned();

        // Watch for the first live node before starting the agent, so its registration
        // cannot slip past us.
        let client = async_nats::connect(url.as_str())
            .await
            .context("failed to connect to the local server")?;
        let topology = topology::ensure(&async_nats::jetstream::new(client))
            .await
            .context("failed to set up JetStream")?;
        let nodes = topology.nodes;
        // The local agent joins like any other: with a token, made here for it alone.
        let token = apiary_scheduler::tokens::create(
            &topology.cluster,
            &TokenCreateRequest {
                description: "apiary dev: the local agent".into(),
                ttl_ms: None,
                max_uses: Some(1),
            },
            apiary_proto::now_ms(),
        )
        .await
        .map_err(|err| anyhow::anyhow!("failed to create a join token for the local agent: {err}"))?
        .token;
        let mut live = nodes
            .watch(topology::NODE_LIVE_KEYS)
            .await
            .context("failed to watch the node bucket")?;

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
                token: Some(token.into()),
                ..AgentConfig::default()
            },
            stop_agent.clone(),
        ));
        let stack = Self {
            server,
            _agent_state: agent_state,
            stop_scheduler,
            stop_agent,
            scheduler,
            agent,
        };

        let online = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(entry) = live.next().await {
                let Ok(entry) = entry else { continue };
                let encoding = apiary_proto::Encoding::detect(None, &entry.value);
                if let Ok(liveness) = encoding.decode::<NodeLiveness>(&entry.value)
                    && liveness.state == NodeState::Active
                {
                    return true;
                }
            }
            false
        })
        .await;
        if !matches!(online, Ok(true)) {
            let log = stack.server.log();
            stack.stop().await.ok();
            anyhow::bail!("no node came online within {READY_TIMEOUT:?}\n{log}");
        }
        Ok(stack)
    }

    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// Stops the agent (letting running tasks finish and saying goodbye to the scheduler),
    /// then the scheduler, then the server.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop_agent.cancel();
        let agent = self.agent.await.context("the agent panicked")?;
        self.stop_scheduler.cancel();
        let scheduler = self.scheduler.await.context("the scheduler panicked")?;
        drop(self.server);
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
