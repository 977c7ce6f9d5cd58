//! The integration-test harness: a real `nats-server` per test, and schedulers and agents
//! started in-process through the same `run(config, shutdown)` their binaries call.
//!
//! Nothing here mocks the bus. Waiting is done on events (KV watches, subscriptions, task
//! results) with timeouts; where the only signal is a state that must be read (a node going
//! offline is the absence of heartbeats), [`eventually`] re-reads it until a deadline.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiary_agent::AgentConfig;
use apiary_cli::broker::{BrokerOptions, DEV_CONFIG, NatsServer};
use apiary_proto::message::{NodeLiveness, NodeState};
use apiary_proto::{Encoding, NodeId, topology};
use apiary_scheduler::SchedulerConfig;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous bound for anything that should happen "soon": slow CI machines must not fail
/// tests, and a hang still ends.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The heartbeat interval tests run with unless they choose another.
pub const FAST_HEARTBEAT: Duration = Duration::from_millis(200);

/// Whether the slow suites run: `APIARY_SLOW_TESTS=1`. They wait out real JetStream timers
/// (the 30 s ack wait) and are skipped, with a message, otherwise.
pub fn slow_tests_enabled() -> bool {
    std::env::var("APIARY_SLOW_TESTS").is_ok_and(|value| value == "1")
}

/// Installs a log subscriber once per test binary; `APIARY_LOG=debug` shows what happened.
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("APIARY_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A test's private cluster backbone: one real `nats-server`, killed and cleaned on drop.
#[derive(Debug)]
pub struct Stack {
    pub server: NatsServer,
    pub heartbeat_interval: Duration,
    /// Scheduler replicas started so far, for the readiness check of the next one.
    schedulers: AtomicUsize,
}

impl Stack {
    /// Starts a server with the fast heartbeat interval.
    pub async fn start() -> Self {
        Self::with_heartbeat(FAST_HEARTBEAT).await
    }

    pub async fn with_heartbeat(heartbeat_interval: Duration) -> Self {
        init_logging();
        let server = NatsServer::start(BrokerOptions {
            port: 0,
            config: Some(DEV_CONFIG.to_owned()),
        })
        .await
        .unwrap_or_else(|err| panic!("failed to start nats-server: {err}"));
        Self {
            server,
            heartbeat_interval,
            schedulers: AtomicUsize::new(0),
        }
    }

    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// The common case: a stack with one scheduler and one online agent, `node-a`. The two
    /// components run until the returned handles are dropped.
    pub async fn with_one_node() -> (Self, [Component; 2]) {
        let stack = Self::start().await;
        let scheduler = stack.spawn_scheduler().await;
        let agent = stack.spawn_agent_online("node-a").await;
        (stack, [scheduler, agent])
    }

    /// Submits `task` with a fresh SDK client and waits (up to [`PATIENCE`]) for its outcome.
    pub async fn run(
        &self,
        task: apiary_sdk::Task,
    ) -> Result<apiary_sdk::TaskOutput, apiary_sdk::Error> {
        self.client()
            .await
            .submit(task)
            .await?
            .result_within(PATIENCE)
            .await
    }

    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            nats_url: self.url().to_owned(),
            heartbeat_interval: self.heartbeat_interval,
            ..SchedulerConfig::default()
        }
    }

    pub fn agent_config(&self, node: &str) -> AgentConfig {
        AgentConfig {
            nats_url: self.url().to_owned(),
            node_id: Some(node.to_owned()),
            slots: Some(2),
            request_timeout: Duration::from_secs(2),
            max_register_backoff: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
            ..AgentConfig::default()
        }
    }

    /// Runs `task` and asserts that it fails with `kind`; returns the failure.
    pub async fn run_expecting_failure(
        &self,
        task: apiary_sdk::Task,
        kind: apiary_sdk::TaskErrorKind,
    ) -> apiary_sdk::TaskFailure {
        match self.run(task).await {
            Err(apiary_sdk::Error::TaskFailed(failure)) => {
                assert_eq!(failure.error.kind, kind, "{failure}");
                *failure
            }
            other => panic!("expected a {kind} failure, got {other:?}"),
        }
    }

    /// Starts a scheduler replica with the stack's settings; see
    /// [`Stack::spawn_scheduler_with`].
    pub async fn spawn_scheduler(&self) -> Component {
        self.spawn_scheduler_with(self.scheduler_config()).await
    }

    /// Starts a scheduler replica and returns once it answers on its request subjects: once
    /// as many replicas as this stack has started list all their endpoints in reply to the
    /// NATS micro protocol's INFO. (A replica answers pings before its endpoints exist, and
    /// with several replicas any one of them may answer, so a single ping proves nothing.)
    pub async fn spawn_scheduler_with(&self, config: SchedulerConfig) -> Component {
        let expected = self.schedulers.fetch_add(1, Ordering::SeqCst) + 1;
        let scheduler =
            Component::spawn("scheduler", move |stop| apiary_scheduler::run(config, stop));
        let nats = self.nats().await;
        let info = format!("$SRV.INFO.{}", apiary_scheduler::SERVICE_NAME);
        eventually(PATIENCE, "every scheduler replica to serve", || async {
            let inbox = nats.new_inbox();
            let mut replies = nats.subscribe(inbox.clone()).await.ok()?;
            nats.publish_with_reply(info.clone(), inbox, Bytes::new())
                .await
                .ok()?;
            let mut ready = std::collections::HashSet::new();
            // Replies arrive within milliseconds; a late one is caught by the next round.
            let window = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(window);
            loop {
                tokio::select! {
                    _ = &mut window => break,
                    reply = replies.next() => {
                        let reply = reply?;
                        let value: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                        let endpoints = value["endpoints"].as_array().map_or(0, Vec::len);
                        if endpoints >= 3 {
                            ready.insert(value["id"].as_str()?.to_owned());
                        }
                    }
                }
            }
            (ready.len() >= expected).then_some(())
        })
        .await;
        scheduler
    }

    pub fn spawn_agent(&self, node: &str) -> Component {
        self.spawn_agent_with(self.agent_config(node))
    }

    pub fn spawn_agent_with(&self, config: AgentConfig) -> Component {
        Component::spawn("agent", move |stop| apiary_agent::run(config, stop))
    }

    /// A plain NATS client, for speaking the protocol by hand as an operator would.
    pub async fn nats(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to nats-server")
    }

    pub async fn client(&self) -> apiary_sdk::Client {
        apiary_sdk::Client::connect(self.url())
            .await
            .expect("SDK client connects")
    }

    /// Starts an agent and returns once its node has registered (its first liveness record
    /// is in the node bucket). Needs a scheduler.
    pub async fn spawn_agent_online(&self, node: &str) -> Component {
        let mut watch = self.watch_liveness(node).await;
        let agent = self.spawn_agent(node);
        within(PATIENCE, &format!("node {node} to register"), async {
            while let Some(live) = watch.next().await {
                if live.state == NodeState::Active {
                    return;
                }
            }
        })
        .await;
        agent
    }

    /// A stream of the liveness records the cluster stores for `node`, starting with the
    /// current one if any.
    pub async fn watch_liveness(
        &self,
        node: &str,
    ) -> std::pin::Pin<Box<dyn futures::Stream<Item = NodeLiveness> + Send>> {
        let node = NodeId::new(node).expect("valid node id");
        let js = async_nats::jetstream::new(self.nats().await);
        let bucket = topology::ensure(&js).await.expect("topology").nodes;
        let watch = bucket
            .watch_with_history(topology::node_live_key(&node))
            .await
            .expect("watch the node bucket");
        Box::pin(watch.filter_map(|entry| async move {
            let entry = entry.ok()?;
            Encoding::detect(None, &entry.value)
                .decode::<NodeLiveness>(&entry.value)
                .ok()
        }))
    }
}

/// A scheduler or agent running in this process.
#[derive(Debug)]
pub struct Component {
    name: &'static str,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Component {
    pub fn spawn<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run(stop.clone()));
        Self {
            name,
            stop,
            handle: Some(handle),
        }
    }

    /// Asks the component to shut down cleanly and waits for it; its result is returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let handle = self.handle.take().expect("component handle");
        within(PATIENCE, &format!("{} to stop", self.name), handle)
            .await
            .expect("component task did not panic")
    }

    /// Kills the component without letting it say goodbye, as a crash or power loss would:
    /// its tasks are aborted and its connection drops.
    pub async fn crash(mut self) {
        let handle = self.handle.take().expect("component handle");
        handle.abort();
        let _ = handle.await;
    }

    /// Whether the component has exited (by error or otherwise).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// Awaits `future`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Re-evaluates `check` until it returns `Some`, failing the test after `limit`. For states
/// that no event announces, such as a node whose heartbeats stopped.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(limit, what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

/// The compiled guest module `name` from `wasm-tasks/` (e.g. `"wordcount"`). Built on first
/// use if `scripts/test` has not built it already.
pub fn wasm(name: &str) -> Bytes {
    let dir = wasm_dir();
    let path = dir.join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|err| panic!("cannot read guest module {}: {err}", path.display()));
    Bytes::from(bytes)
}

fn wasm_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("APIARY_WASM_DIR") {
            return PathBuf::from(dir);
        }
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let manifest = workspace.join("wasm-tasks").join("Cargo.toml");
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("run cargo to build the guest modules");
        assert!(
            status.success(),
            "building wasm-tasks failed; is the wasm32-wasip1 target installed?"
        );
        workspace.join("wasm-tasks/target/wasm32-wasip1/release")
    })
    .clone()
}
