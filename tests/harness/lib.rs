//! The integration-test harness: a real `nats-server` per test, and schedulers and agents
//! started in-process through the same `run(config, shutdown)` their binaries call.
//!
//! Nothing here mocks the bus. Waiting is done on events (KV watches, subscriptions, task
//! results) with timeouts; where the only signal is a state that must be read (a node going
//! offline is the absence of heartbeats), [`eventually`] re-reads it until a deadline.
//!
//! Each component connects through its own [`relay::Relay`], so that [`Component::crash`]
//! drops its connection the way the death of a process would. The server itself can be
//! stopped and started again ([`Stack::stop_server`], [`Stack::restart_server`]) on the same
//! port and store, and the components reconnect through their relays.

pub mod relay;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use apiary_agent::AgentConfig;
use apiary_broker::NatsServer;
use apiary_devstack::{Backbone, watch_node};
use apiary_proto::message::{NodeLiveness, NodeRecord, TaskResult};
use apiary_proto::{Encoding, NodeId, topology};
use apiary_scheduler::SchedulerConfig;
use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::relay::Relay;

/// Creates a join token as `apiary tokens create` would, straight in the bucket (no scheduler
/// needed), and returns it.
pub async fn mint_token(
    url: &str,
    description: &str,
    ttl_ms: Option<u64>,
    uses: Option<u32>,
) -> String {
    let client = async_nats::connect(url)
        .await
        .expect("connect to nats-server");
    let topology = topology::ensure(&async_nats::jetstream::new(client))
        .await
        .expect("topology");
    let request = apiary_proto::admin::TokenCreateRequest {
        description: description.to_owned(),
        ttl_ms,
        max_uses: uses,
    };
    apiary_scheduler::tokens::create(&topology.cluster, &request, apiary_proto::now_ms())
        .await
        .expect("create a join token")
        .token
}

/// A node spoken for by hand, as a client in another language would: its own node key, and
/// JSON bodies signed with it.
pub struct HandNode {
    pub id: NodeId,
    pub key: apiary_proto::identity::KeyPair,
}

impl std::fmt::Debug for HandNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandNode").field("id", &self.id).finish()
    }
}

impl HandNode {
    pub fn new(id: &str) -> Self {
        Self {
            id: NodeId::new(id).expect("valid node id"),
            key: apiary_proto::identity::generate(),
        }
    }

    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// Sends `body` as signed JSON on the node's `verb` subject and returns the reply's
    /// headers and JSON (`{"ok": …}` or `{"error": …}`).
    pub async fn request(
        &self,
        nats: &async_nats::Client,
        verb: apiary_proto::subject::NodeVerb,
        body: &serde_json::Value,
    ) -> (async_nats::HeaderMap, serde_json::Value) {
        let payload = Bytes::from(body.to_string());
        let headers = apiary_proto::identity::sign(&self.key, &payload).expect("sign");
        self.request_raw(nats, verb, payload, headers).await
    }

    /// Sends `payload` with `headers` as they are (a forged or broken signature, say).
    pub async fn request_raw(
        &self,
        nats: &async_nats::Client,
        verb: apiary_proto::subject::NodeVerb,
        payload: Bytes,
        headers: async_nats::HeaderMap,
    ) -> (async_nats::HeaderMap, serde_json::Value) {
        let subject = apiary_proto::subject::node(&self.id, verb).to_string();
        let reply = within(
            PATIENCE,
            &format!("a reply on {subject}"),
            nats.request_with_headers(subject.clone(), headers, payload),
        )
        .await
        .unwrap_or_else(|err| panic!("request on {subject} failed: {err}"));
        let value = serde_json::from_slice(&reply.payload).unwrap_or_else(|err| {
            panic!(
                "the reply on {subject} is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&reply.payload)
            )
        });
        (reply.headers.unwrap_or_default(), value)
    }

    /// A registration body for this node with `slots` slots and `token`.
    pub fn registration(&self, slots: u32, token: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "node": {
                "node_id": self.id.as_str(),
                "hostname": "by-hand",
                "arch": std::env::consts::ARCH,
                "os": "linux",
                "cpu_cores": 1,
                "memory_bytes": 1_073_741_824u64,
                "slots": slots,
                "agent_version": "by hand",
                "public_key": self.public_key(),
            },
            "token": token,
        })
    }
}

/// Generous bound for anything that should happen "soon": slow CI machines must not fail
/// tests, and a hang still ends.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The heartbeat interval tests run with unless they choose another.
pub const FAST_HEARTBEAT: Duration = Duration::from_millis(200);

/// How long an inbox must stay silent before a reader concludes that nothing more is coming.
/// A repeat of a result follows the original within milliseconds when it comes from a
/// redelivery already under way, so a second and a half of silence is ample; a repeat that
/// waits out the ack wait is the business of the tests that wait for it.
pub const QUIET: Duration = Duration::from_millis(1500);

/// Installs a log subscriber once per test binary; `APIARY_LOG=debug` shows what happened.
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let filter = apiary_bin_support::log_filter(
            std::env::var(apiary_bin_support::LOG_ENV).ok().as_deref(),
            "warn",
        );
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .with(filter)
            .try_init();
    });
}

/// A test's private cluster backbone: one real `nats-server`, killed and cleaned on drop.
#[derive(Debug)]
pub struct Stack {
    pub server: NatsServer,
    pub heartbeat_interval: Duration,
    /// Each agent's state directory (node key, outbox) is `<state_root>/<node>`, so an agent
    /// restarted under the same node id finds its key again, as on a real host.
    pub state_root: tempfile::TempDir,
    /// A join token with unlimited uses, given to every agent the harness starts.
    pub token: String,
    /// The micro service ids of the scheduler replicas started so far: a replica is ready
    /// when an id not among these lists all its endpoints.
    schedulers: Mutex<HashSet<String>>,
}

impl Stack {
    /// Starts a server with the fast heartbeat interval.
    pub async fn start() -> Self {
        Self::with_heartbeat(FAST_HEARTBEAT).await
    }

    pub async fn with_heartbeat(heartbeat_interval: Duration) -> Self {
        init_logging();
        let Backbone { server, token } = Backbone::start(0, "test stack")
            .await
            .unwrap_or_else(|err| panic!("failed to start the stack: {err:#}"));
        Self {
            server,
            token,
            heartbeat_interval,
            state_root: tempfile::tempdir().expect("a temporary state directory"),
            schedulers: Mutex::default(),
        }
    }

    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// Stops the server as an operator would (SIGTERM), closing every connection; the
    /// components keep trying to reconnect.
    pub async fn stop_server(&mut self) {
        self.server
            .stop()
            .await
            .unwrap_or_else(|err| panic!("failed to stop nats-server: {err}"));
    }

    /// Starts the stopped server again on the same port and store, and returns once
    /// JetStream answers. Components reconnect by themselves, each when its client next
    /// tries (async-nats waits up to 4 s between tries).
    pub async fn restart_server(&mut self) {
        self.server.start_again().await.unwrap_or_else(|err| {
            panic!(
                "failed to start nats-server again: {err}\n--- server log ---\n{}",
                self.server.log()
            )
        });
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
    ) -> Result<apiary_sdk::TaskOutput, apiary_sdk::ResultError> {
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
            state_dir: Some(self.state_root.path().join(node)),
            token: Some(self.token.clone().into()),
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
            Err(err) if err.kind() == apiary_sdk::ResultErrorKind::TaskFailed => {
                let failure = err.task_failure().expect("a failed task's failure").clone();
                assert_eq!(failure.error.kind, kind, "{failure}");
                failure
            }
            other => panic!("expected a {kind} failure, got {other:?}"),
        }
    }

    /// Starts a scheduler replica with the stack's settings; see
    /// [`Stack::spawn_scheduler_with`].
    pub async fn spawn_scheduler(&self) -> Component {
        self.spawn_scheduler_with(self.scheduler_config()).await
    }

    /// Starts a scheduler replica and returns once it answers on its request subjects: once a
    /// replica this stack has not seen before lists all its endpoints in reply to the NATS
    /// micro protocol's INFO. (A replica answers pings before its endpoints exist, and with
    /// several replicas any one of them may answer, so a single ping proves nothing.)
    pub async fn spawn_scheduler_with(&self, mut config: SchedulerConfig) -> Component {
        let relay = Relay::start(&config.nats_url);
        config.nats_url = relay.url().to_owned();
        let mut scheduler =
            Component::spawn("scheduler", move |stop| apiary_scheduler::run(config, stop));
        scheduler.relay = Some(relay);
        let known = lock(&self.schedulers).clone();
        let nats = self.nats().await;
        let info = format!("$SRV.INFO.{}", apiary_scheduler::SERVICE_NAME);
        let id = eventually(PATIENCE, "the new scheduler replica to serve", || async {
            let inbox = nats.new_inbox();
            let mut replies = nats.subscribe(inbox.clone()).await.ok()?;
            nats.publish_with_reply(info.clone(), inbox, Bytes::new())
                .await
                .ok()?;
            // Replies arrive within milliseconds; one that misses this round is asked for
            // again in the next.
            let round = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(round);
            loop {
                tokio::select! {
                    _ = &mut round => return None,
                    reply = replies.next() => {
                        let reply = reply?;
                        let value: serde_json::Value =
                            serde_json::from_slice(&reply.payload).ok()?;
                        let id = value["id"].as_str()?;
                        let endpoints = value["endpoints"].as_array().map_or(0, Vec::len);
                        if endpoints >= 3 && !known.contains(id) {
                            return Some(id.to_owned());
                        }
                    }
                }
            }
        })
        .await;
        lock(&self.schedulers).insert(id.clone());
        scheduler.service_id = Some(id);
        scheduler
    }

    /// The counters a scheduler replica reports in every endpoint's `data` in reply to the
    /// NATS micro protocol's STATS (`nats micro stats apiary-scheduler`), asked of that
    /// replica alone. A replica that has stopped no longer answers: read them before.
    pub async fn scheduler_counters(&self, replica: &Component) -> SchedulerCounters {
        let id = replica
            .service_id
            .as_deref()
            .expect("a scheduler replica started by the stack");
        let subject = format!("$SRV.STATS.{}.{id}", apiary_scheduler::SERVICE_NAME);
        let reply = within(
            PATIENCE,
            "the replica's stats",
            self.nats().await.request(subject, Bytes::new()),
        )
        .await
        .expect("the replica answers STATS");
        let stats: serde_json::Value =
            serde_json::from_slice(&reply.payload).expect("STATS replies are JSON");
        let data = stats["endpoints"]
            .as_array()
            .and_then(|endpoints| endpoints.first())
            .map(|endpoint| endpoint["data"].clone())
            .unwrap_or_else(|| panic!("no endpoint data in {stats}"));
        SchedulerCounters(data)
    }

    pub fn spawn_agent(&self, node: &str) -> Component {
        self.spawn_agent_with(self.agent_config(node))
    }

    pub fn spawn_agent_with(&self, mut config: AgentConfig) -> Component {
        let relay = Relay::start(&config.nats_url);
        config.nats_url = relay.url().to_owned();
        let (outbox, waiting) = watch::channel(0);
        let mut agent = Component::spawn("agent", move |stop| {
            apiary_agent::run_reporting_outbox(config, stop, outbox)
        });
        agent.relay = Some(relay);
        agent.outbox = Some(waiting);
        agent
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

    /// An SDK client on a slow link: what it sends reaches the server `delay` late. The
    /// relay it connects through lives as long as the returned value.
    pub async fn client_over_slow_link(&self, delay: Duration) -> (apiary_sdk::Client, Relay) {
        let relay = Relay::start(self.url());
        relay.delay_uplink(delay);
        let client = apiary_sdk::Client::connect(relay.url())
            .await
            .expect("SDK client connects over the slow link");
        (client, relay)
    }

    /// An SDK client whose inbox the test reads too: the client's inboxes start with
    /// `prefix` (which must start with `_INBOX.`, where the scheduler delivers by default),
    /// and the returned stream, read on a separate connection, has every task result the
    /// cluster sends the client, repeats included, which the client itself hides.
    pub async fn client_with_inbox(&self, prefix: &str) -> (apiary_sdk::Client, ResultWire) {
        let watcher = self.nats().await;
        let wire = watcher
            .subscribe(format!("{prefix}.>"))
            .await
            .expect("subscribe to the client's inbox");
        // The server has the subscription once the round trip is done, so it sees even the
        // first result.
        apiary_sdk::round_trip(&watcher)
            .await
            .expect("the server has the subscription");
        let nats = async_nats::ConnectOptions::new()
            .custom_inbox_prefix(prefix)
            .connect(self.url())
            .await
            .expect("connect to nats-server");
        let client = apiary_sdk::Client::from_nats(nats)
            .await
            .expect("SDK client");
        // The client's own JetStream requests get their replies under the same prefix; task
        // results are the messages that name their task.
        let results = wire.filter(|message| {
            let is_result = message
                .headers
                .as_ref()
                .is_some_and(|headers| headers.get(apiary_proto::headers::TASK_ID).is_some());
            std::future::ready(is_result)
        });
        (
            client,
            ResultWire {
                results: Box::pin(results),
                watcher,
            },
        )
    }

    /// Starts an agent and returns once its node has registered: the scheduler stored a
    /// new registration record for it, and then its liveness. Records already in the
    /// bucket (a node id used before in the test) do not count. Needs a scheduler.
    pub async fn spawn_agent_online(&self, node: &str) -> Component {
        self.spawn_agent_online_with(self.agent_config(node)).await
    }

    /// [`Stack::spawn_agent_online`] with a configuration of the test's own.
    pub async fn spawn_agent_online_with(&self, config: AgentConfig) -> Component {
        let node = config.node_id.clone().expect("a configured node id");
        let id = NodeId::new(&node).expect("valid node id");
        let online = watch_node(self.url(), Some(&id))
            .await
            .expect("watch the node bucket");
        let agent = self.spawn_agent_with(config);
        within(PATIENCE, &format!("node {node} to register"), online)
            .await
            .expect("the node bucket's watch");
        agent
    }

    /// Every placement as it happens, as `nats sub 'apiary.v1.node.*.dispatch'` shows it. The
    /// server has the subscription once the round trip is done, so it sees even the first
    /// placement after this returns.
    pub async fn dispatch_wire(&self) -> async_nats::Subscriber {
        let nats = self.nats().await;
        let dispatches = nats
            .subscribe(
                apiary_proto::subject::all_nodes(apiary_proto::subject::NodeVerb::Dispatch)
                    .to_string(),
            )
            .await
            .expect("subscribe to the dispatch subjects");
        apiary_sdk::round_trip(&nats)
            .await
            .expect("the server has the subscription");
        dispatches
    }

    /// Stores `bytes` in the module store under `name` as they are, with no digest check: what
    /// a botched hand upload or a tampered store leaves there.
    pub async fn put_module_object(&self, name: &str, bytes: &[u8]) {
        async_nats::jetstream::new(self.nats().await)
            .get_object_store(apiary_proto::topology::MODULES_BUCKET)
            .await
            .expect("the module store")
            .put(name, &mut &bytes[..])
            .await
            .expect("put the object");
    }

    /// The cluster's node bucket, `APIARY_NODES`.
    pub async fn nodes_bucket(&self) -> async_nats::jetstream::kv::Store {
        let js = async_nats::jetstream::new(self.nats().await);
        topology::ensure(&js).await.expect("topology").nodes
    }

    /// The registration record the cluster stores for `node`, if any.
    pub async fn node_record(&self, node: &str) -> Option<NodeRecord> {
        let node = NodeId::new(node).expect("valid node id");
        let value = self
            .nodes_bucket()
            .await
            .get(topology::node_info_key(&node))
            .await
            .expect("read the node bucket")?;
        Some(
            Encoding::detect(None, &value)
                .decode(&value)
                .expect("a registration record"),
        )
    }

    /// A stream of the liveness records the cluster stores for `node`, starting with the
    /// current one if any.
    pub async fn watch_liveness(
        &self,
        node: &str,
    ) -> std::pin::Pin<Box<dyn futures::Stream<Item = NodeLiveness> + Send>> {
        let node = NodeId::new(node).expect("valid node id");
        let watch = self
            .nodes_bucket()
            .await
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

    /// A durable consumer of one of the cluster's streams, to read its state from. Waits for
    /// it to exist: components create their consumers a moment after they report ready.
    /// What the agent of `node` says about itself (`apiary.v1.node.<node>.status`).
    pub async fn agent_status(&self, node: &str) -> apiary_proto::message::AgentStatus {
        self.client()
            .await
            .agent_status(&NodeId::new(node).expect("node id"))
            .await
            .expect("the agent answers its status request")
    }

    pub async fn consumer(&self, stream: &str, consumer: &str) -> PullConsumer {
        let js = async_nats::jetstream::new(self.nats().await);
        eventually(
            PATIENCE,
            &format!("consumer {consumer} of {stream}"),
            || async {
                js.get_stream(stream)
                    .await
                    .ok()?
                    .get_consumer(consumer)
                    .await
                    .ok()
            },
        )
        .await
    }
}

/// The task results sent to a client's inbox, as the wire carries them; see
/// [`Stack::client_with_inbox`].
pub struct ResultWire {
    results: std::pin::Pin<Box<dyn futures::Stream<Item = async_nats::Message> + Send>>,
    /// The connection the results are read on.
    watcher: async_nats::Client,
}

impl ResultWire {
    /// Returns once the connection the wire is read on is back after a server restart, with
    /// its subscription: core NATS does not keep messages for a disconnected subscriber, so
    /// a test must not let results flow before this.
    pub async fn wait_until_connected(&self) {
        // A request nobody serves is answered "no responders" only by a server that has
        // read everything the client sent before it, the renewed subscription included; a
        // request sent while the client is still reconnecting waits in its buffer until
        // then, or times out and is asked again.
        let subject = self.watcher.new_inbox();
        eventually(PATIENCE, "the result wire to reconnect", || async {
            let request = async_nats::Request::new().timeout(Some(Duration::from_secs(1)));
            match self.watcher.send_request(subject.clone(), request).await {
                Err(err) if err.kind() == async_nats::RequestErrorKind::NoResponders => Some(()),
                _ => None,
            }
        })
        .await;
    }
}

impl std::fmt::Debug for ResultWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultWire").finish_non_exhaustive()
    }
}

impl futures::Stream for ResultWire {
    type Item = async_nats::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.results.as_mut().poll_next(cx)
    }
}

/// A scheduler replica's counters, from its micro service stats.
#[derive(Clone, Debug)]
pub struct SchedulerCounters(pub serde_json::Value);

impl SchedulerCounters {
    /// The counter `name` (`tasks_placed`, …); fails the test if the replica has none.
    pub fn get(&self, name: &str) -> u64 {
        self.0[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {}", self.0))
    }
}

/// A scheduler or agent running in this process.
#[derive(Debug)]
pub struct Component {
    name: &'static str,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// The component's way to the server, cut when it crashes.
    relay: Option<Relay>,
    /// A scheduler replica's micro service id, the address of its own STATS.
    service_id: Option<String>,
    /// An agent's count of results waiting in its outbox; closed once the agent has let
    /// go of its outbox (and so of its state directory).
    outbox: Option<watch::Receiver<usize>>,
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
            relay: None,
            service_id: None,
            outbox: None,
        }
    }

    /// Asks the component to shut down cleanly and waits for it; its result is returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let handle = self.handle.take().expect("component handle");
        let outcome = within(PATIENCE, &format!("{} to stop", self.name), handle)
            .await
            .expect("component task did not panic");
        self.outbox_released().await;
        outcome
    }

    /// Kills the component without letting it say goodbye, as a crash or power loss would:
    /// its connection drops, so nothing more it sends reaches the server, and its tasks are
    /// aborted. (A guest module already running on a blocking thread runs on to its end, as
    /// threads cannot be killed, but its result has nowhere to go.)
    pub async fn crash(mut self) {
        // The connection first: from this instant the component is gone for the cluster.
        if let Some(relay) = &self.relay {
            relay.cut();
        }
        let handle = self.handle.take().expect("component handle");
        handle.abort();
        let _ = handle.await;
        self.outbox_released().await;
    }

    /// Waits until an agent's tasks, which end a moment after the agent itself, have let go
    /// of its outbox, so that an agent started next on the same state directory is not
    /// refused, as it is not after a real process has exited.
    async fn outbox_released(&self) {
        if let Some(outbox) = &self.outbox {
            let mut outbox = outbox.clone();
            within(PATIENCE, "the agent to close its outbox", async {
                while outbox.changed().await.is_ok() {}
            })
            .await;
        }
    }

    /// An agent's count of the results waiting in its outbox for the server.
    pub fn outbox_waiting(&self) -> watch::Receiver<usize> {
        self.outbox.clone().expect("an agent started by the stack")
    }

    /// Refuses the component's reconnections (its relay accepts none) until
    /// [`Component::release_connection`]; a connection it has stays up. With the server
    /// stopped, the component then stays away after the server is back.
    pub fn hold_connection(&self) {
        self.relay.as_ref().expect("a relayed component").hold();
    }

    /// Cuts the component off the server while it goes on running: its connection is
    /// closed and its reconnections refused until [`Component::release_connection`], as a
    /// node behind a failed link is.
    pub fn cut_connection(&self) {
        let relay = self.relay.as_ref().expect("a relayed component");
        relay.hold();
        relay.sever();
    }

    /// Lets the component reconnect after [`Component::hold_connection`].
    pub fn release_connection(&self) {
        self.relay.as_ref().expect("a relayed component").release();
    }

    /// Waits (up to [`PATIENCE`]) for the component to end by itself, without asking it to,
    /// and returns its result.
    pub async fn exited(mut self) -> anyhow::Result<()> {
        let handle = self.handle.take().expect("component handle");
        within(
            PATIENCE,
            &format!("{} to exit by itself", self.name),
            handle,
        )
        .await
        .expect("component task did not panic")
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every task result that reached a subscription, by task id, in arrival order.
#[derive(Debug, Default)]
pub struct Deliveries(pub BTreeMap<String, Vec<TaskResult>>);

impl Deliveries {
    /// Reads task results from `subscription` until results for `tasks` distinct tasks
    /// (counting those already read) have arrived, failing the test if that takes longer
    /// than `limit`.
    pub async fn read(
        &mut self,
        subscription: &mut (impl futures::Stream<Item = async_nats::Message> + Unpin),
        tasks: usize,
        limit: Duration,
    ) {
        within(limit, &format!("results for {tasks} tasks"), async {
            while self.0.len() < tasks {
                self.record(subscription.next().await.expect("subscription open"));
            }
        })
        .await;
    }

    /// Like [`Deliveries::read`], and then reads on until the subscription has been
    /// [`QUIET`] for a while, so that a repeat that follows its original is counted too.
    pub async fn read_until_quiet(
        &mut self,
        subscription: &mut (impl futures::Stream<Item = async_nats::Message> + Unpin),
        tasks: usize,
        limit: Duration,
    ) {
        self.read(subscription, tasks, limit).await;
        // Results that keep coming without a pause are a failure of their own; PATIENCE
        // bounds the wait for the silence.
        within(PATIENCE, "the results to stop coming", async {
            while let Ok(message) = tokio::time::timeout(QUIET, subscription.next()).await {
                self.record(message.expect("subscription open"));
            }
        })
        .await;
    }

    fn record(&mut self, message: async_nats::Message) {
        let (result, _) = apiary_proto::codec::decode_message::<TaskResult>(
            message.headers.as_ref(),
            &message.payload,
        )
        .unwrap_or_else(|err| panic!("not a task result on {}: {err}", message.subject));
        self.0
            .entry(result.task_id.to_string())
            .or_default()
            .push(result);
    }

    /// How many results arrived after the first for their task.
    pub fn repeats(&self) -> usize {
        self.0.values().map(|results| results.len() - 1).sum()
    }

    /// Fails the test unless exactly `tasks` tasks had results, and every repeat of a result
    /// is the same result again (the same attempt, outcome and all), as a stored result
    /// published a second time is.
    pub fn assert_repeats_are_copies(&self, tasks: usize) {
        for (task, results) in &self.0 {
            assert!(
                results.iter().all(|result| result == &results[0]),
                "task {task} had different results: {results:?}"
            );
        }
        assert_eq!(self.0.len(), tasks, "tasks with a result");
    }

    /// Fails the test unless exactly `tasks` tasks had results, each exactly one.
    pub fn assert_each_exactly_once(&self, tasks: usize) {
        let repeated: BTreeMap<&String, usize> = self
            .0
            .iter()
            .filter(|(_, results)| results.len() != 1)
            .map(|(id, results)| (id, results.len()))
            .collect();
        assert!(
            repeated.is_empty(),
            "tasks with repeated results: {repeated:?}"
        );
        assert_eq!(self.0.len(), tasks, "tasks with a result");
    }
}

/// Reads task results from `subscription` until results for `tasks` distinct tasks have
/// arrived and the subscription has then been [`QUIET`]; see [`Deliveries::read_until_quiet`].
pub async fn results_until_quiet(
    subscription: &mut (impl futures::Stream<Item = async_nats::Message> + Unpin),
    tasks: usize,
    limit: Duration,
) -> Deliveries {
    let mut deliveries = Deliveries::default();
    deliveries
        .read_until_quiet(subscription, tasks, limit)
        .await;
    deliveries
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

/// A guest that waits `duration` on the monotonic clock and then copies its stdin to stdout.
/// It holds a slot for a known time without burning a core, which a machine with few cores
/// needs when several such tasks run at once; and a task killed with its node leaves no
/// thread spinning on. It traps if the clock cannot be waited on, so that a task which did
/// not wait never passes for one that did.
pub fn sleeping_module(duration: Duration) -> Vec<u8> {
    sleeping_guest(duration, Answer::Echo).expect("the sleeping module's WAT")
}

/// What a [`sleeping_guest`] writes after its wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Its stdin, unchanged.
    Echo,
    /// Its stdin with ASCII letters in upper case, as `uppercase.wasm` answers (inputs up to
    /// 4 KiB).
    Uppercase,
}

/// A guest that waits `duration` on the monotonic clock, then gives `answer`.
pub fn sleeping_guest(duration: Duration, answer: Answer) -> Result<Vec<u8>, wat::Error> {
    let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    let uppercase = match answer {
        Answer::Echo => "",
        Answer::Uppercase => {
            r#"(local.set $i (i32.const 0))
                   (block $upper_done
                     (loop $upper
                       (br_if $upper_done (i32.ge_u (local.get $i) (local.get $n)))
                       (local.set $c (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
                       (if (i32.and (i32.ge_u (local.get $c) (i32.const 97))
                                    (i32.le_u (local.get $c) (i32.const 122)))
                         (then (i32.store8 (i32.add (i32.const 1024) (local.get $i))
                                           (i32.sub (local.get $c) (i32.const 32)))))
                       (local.set $i (i32.add (local.get $i) (i32.const 1)))
                       (br $upper)))"#
        }
    };
    // One WASI `subscription` at offset 0 (a relative clock timeout on the monotonic clock,
    // id 1), its `event` at 64, the event count at 96; then an iovec at 128 for a 4 KiB
    // buffer at 1024, with the byte count at 136 and the written count at 140.
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "poll_oneoff"
               (func $poll (param i32 i32 i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "fd_read"
               (func $read (param i32 i32 i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "fd_write"
               (func $write (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_start") (local $n i32) (local $i i32) (local $c i32)
               (i32.store8 (i32.const 8) (i32.const 0))
               (i32.store (i32.const 16) (i32.const 1))
               (i64.store (i32.const 24) (i64.const {nanos}))
               (i64.store (i32.const 32) (i64.const 0))
               (i32.store16 (i32.const 40) (i32.const 0))
               (if (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96))
                 (then unreachable))
               (block $done
                 (loop $again
                   (i32.store (i32.const 128) (i32.const 1024))
                   (i32.store (i32.const 132) (i32.const 4096))
                   (br_if $done
                     (call $read (i32.const 0) (i32.const 128) (i32.const 1) (i32.const 136)))
                   (local.set $n (i32.load (i32.const 136)))
                   (br_if $done (i32.eqz (local.get $n)))
                   {uppercase}
                   (i32.store (i32.const 132) (local.get $n))
                   (drop (call $write (i32.const 1) (i32.const 128) (i32.const 1) (i32.const 140)))
                   (br $again)))))"#
    ))
}

/// The `apiary` command line, built from this checkout the first time a test asks for it
/// (cargo does nothing when it is up to date), into the target directory and profile of the
/// test binary itself; or `APIARY_CLI_BIN`, if set. Tests run it as a user would.
pub fn apiary_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(binary) = std::env::var_os("APIARY_CLI_BIN") {
            return PathBuf::from(binary);
        }
        // The test binary is `<target>/<profile>/deps/<name>-<hash>`.
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("<target>");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let mut build =
            std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        build
            .current_dir(workspace)
            .args([
                "build",
                "--quiet",
                "--package",
                "apiary-cli",
                "--bin",
                "apiary",
            ])
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo to build the apiary binary");
        assert!(status.success(), "failed to build the apiary binary");
        profile_dir.join(format!("apiary{}", std::env::consts::EXE_SUFFIX))
    })
}

/// A module of the hostile suite (`wasm-tasks/hostile/`): a `.wat` file compiled here, or
/// the raw bytes of a `.wasm` one (garbage, on purpose).
pub fn hostile(name: &str) -> Bytes {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("wasm-tasks")
        .join("hostile");
    let text = dir.join(format!("{name}.wat"));
    if text.exists() {
        let bytes = wat::parse_file(&text)
            .unwrap_or_else(|err| panic!("cannot compile {}: {err}", text.display()));
        return Bytes::from(bytes);
    }
    let binary = dir.join(format!("{name}.wasm"));
    let bytes = std::fs::read(&binary)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", binary.display()));
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
