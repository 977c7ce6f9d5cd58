//! Submit WebAssembly tasks to an apiary cluster and await their results.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = apiary_sdk::Client::connect("nats://127.0.0.1:4222").await?;
//! let module = std::fs::read("wordcount.wasm").expect("module");
//! let handle = client
//!     .submit(apiary_sdk::Task::new(module).input("the quick brown fox"))
//!     .await?;
//! let output = handle.result().await?;
//! println!("{}", String::from_utf8_lossy(&output.stdout));
//! # Ok(())
//! # }
//! ```
//!
//! A submitted task is stored in JetStream before [`Client::submit`] returns, so it survives
//! the client, the scheduler and any node. Modules are uploaded once to the cluster's module
//! store, named by their SHA-256, and later submits of the same module send only the name.

#![warn(missing_docs)]

mod admin;
mod batch;
mod catch_up;
mod connect;
mod error;
mod kv;
mod modules;
mod pubsub;
mod tasks;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiary_proto::codec;
use apiary_proto::message::TaskSubmission;
use apiary_proto::topology::{self, Topology, TopologyError};
use apiary_proto::{now_ms, stored};
use apiary_proto::{rpc, subject};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::{OnceCell, oneshot};
use tracing::Instrument as _;

pub use admin::NewToken;
pub use apiary_proto::admin::{
    Approval, ClusterSettings, NodeAdmin, Schedule, Scheduling, TokenCreated, TokenInfo,
};
pub use apiary_proto::inventory::Inventory;
pub use apiary_proto::lifecycle::{RetryOn, RetryPolicy, TaskRecord, TaskState, Transition};
pub use apiary_proto::message::ErrorCode;
pub use apiary_proto::message::{
    DeadLetter, DlqListReply, DlqListRequest, GrantKind, Grants, Limits, ModuleRef, NodeInfo,
    NodeMetrics, NodeStatus, NodeSummary, NodesListReply, NodesListRequest, Outcome, Priority,
    Requirements, ResultObject, RunUsage, TaskError, TaskErrorKind, TaskListReply, TaskListRequest,
    TaskResult, TaskResultReply,
};
pub use apiary_proto::{IdError, Namespace, NodeId, Payload, TaskId};
pub use batch::BatchItem;
pub use connect::{ConnectError, ConnectErrorKind, ConnectOptions};
pub use error::{
    OpError, RequestError, RequestErrorKind, ResultError, ResultErrorKind, SubmitError,
    SubmitErrorKind, TaskFailure,
};
pub use kv::{Kv, KvEntry, KvError, KvErrorKind, KvOperation, KvPage, StoreSettings};
pub use modules::{ModuleError, ModuleErrorKind, ModuleInfo, Modules, module_ref};
pub use pubsub::{
    DurableMessage, DurableSubscription, PubSub, PubSubError, PubSubErrorKind, TopicMessage,
    round_trip,
};

/// How many recently resolved task ids a client remembers, to tell a repeated result from a
/// result for a handle that was dropped.
const RESOLVED_MEMORY: usize = 16_384;

type Routes = Arc<Mutex<Routing>>;

/// Where results go: the handles waiting for them. Shared by the inbox router and the
/// catch-up after a reconnect, so a result reaches its handle once whichever path brings it.
#[derive(Debug, Default)]
struct Routing {
    waiters: HashMap<TaskId, Waiter>,
    resolved: Resolved,
    duplicates: u64,
}

#[derive(Debug)]
struct Waiter {
    sender: oneshot::Sender<TaskResult>,
    submitted_at_ms: u64,
}

impl Routing {
    /// Hands `result` to the handle waiting for it. A result nobody waits for (a duplicate,
    /// or a handle that was dropped) is discarded, and a duplicate is counted. True if a
    /// handle took it.
    fn deliver(&mut self, result: TaskResult) -> bool {
        match self.waiters.remove(&result.task_id) {
            Some(waiter) => {
                self.resolved.insert(result.task_id.clone());
                let _ = waiter.sender.send(result);
                true
            }
            None if self.resolved.ids.contains(&result.task_id) => {
                self.duplicates += 1;
                tracing::debug!(task_id = %result.task_id, attempt = result.attempt, "dropping a repeated result");
                false
            }
            None => {
                tracing::debug!(task_id = %result.task_id, "result with no waiter");
                false
            }
        }
    }

    fn is_waiting_for(&self, task: &TaskId) -> bool {
        self.waiters.contains_key(task)
    }

    /// When the oldest task still waiting for its result was submitted.
    fn oldest_waiting_ms(&self) -> Option<u64> {
        self.waiters
            .values()
            .map(|waiter| waiter.submitted_at_ms)
            .min()
    }
}

/// The ids of the last [`RESOLVED_MEMORY`] tasks whose handles received their result.
#[derive(Debug, Default)]
struct Resolved {
    order: VecDeque<TaskId>,
    ids: HashSet<TaskId>,
}

impl Resolved {
    fn insert(&mut self, id: TaskId) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > RESOLVED_MEMORY {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

/// A connection to an apiary cluster. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("inbox", &self.inner.inbox)
            .finish_non_exhaustive()
    }
}

struct Inner {
    nats: async_nats::Client,
    js: jetstream::Context,
    topology: OnceCell<Topology>,
    /// Where the scheduler delivers this client's results.
    inbox: String,
    routes: Routes,
    /// Module digests known to be in the module store, so each is checked once.
    /// Module digests found in the module store lately, and when: a submit within
    /// [`modules::UPLOAD_MEMORY`] of that does not ask the store again.
    uploaded: Mutex<HashMap<String, std::time::Instant>>,
    router: tokio::task::JoinHandle<()>,
    catch_up: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.router.abort();
        self.catch_up.abort();
        // Handles may outlive the client: dropping their senders wakes them with
        // `ResultErrorKind::Disconnected` instead of leaving them pending forever.
        lock(&self.routes).waiters.clear();
    }
}

impl Client {
    /// Connects to the NATS server(s) at `url` (comma-separated for several), without
    /// credentials; [`ConnectOptions`] sets credentials, TLS and timeouts.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        ConnectOptions::new(url).connect().await
    }

    /// Uses an existing NATS connection (with the application's own credentials and options).
    pub async fn from_nats(nats: async_nats::Client) -> Result<Self, ConnectError> {
        let inbox = nats.new_inbox();
        let subscription = nats.subscribe(inbox.clone()).await.map_err(|err| {
            ConnectError::with_source(
                ConnectErrorKind::Setup,
                format!("failed to subscribe to the result inbox {inbox}"),
                err,
            )
        })?;
        let routes: Routes = Arc::default();
        let js = jetstream::new(nats.clone());
        let router = tokio::spawn(route_results(subscription, routes.clone()));
        let catch_up = tokio::spawn(catch_up::after_reconnects(
            nats.clone(),
            js.clone(),
            routes.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                nats,
                topology: OnceCell::new(),
                inbox,
                routes,
                uploaded: Mutex::default(),
                router,
                catch_up,
            }),
        })
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// How many results arrived for a task whose handle already had its result, and were
    /// dropped. The cluster executes a task at least once and may deliver a result more than
    /// once (after a redelivery, or a server restart); a handle still resolves exactly once,
    /// with the first result to arrive. Counted over the last 16,384 tasks resolved.
    pub fn duplicate_results(&self) -> u64 {
        lock(&self.inner.routes).duplicates
    }

    pub(crate) async fn topology(&self) -> Result<&Topology, TopologyError> {
        self.inner
            .topology
            .get_or_try_init(|| topology::ensure(&self.inner.js))
            .await
    }

    /// Puts a module in the cluster's module store (once; later calls with the same bytes only
    /// compute the digest) and returns its reference. The same as `modules().put(module)`.
    pub async fn upload_module(&self, module: &[u8]) -> Result<ModuleRef, SubmitError> {
        self.modules().put(module).await.map_err(|err| {
            SubmitError::with_source(SubmitErrorKind::Module, "failed to upload the module", err)
        })
    }

    /// Submits a task to the queue of its priority. When this returns, the task is stored in
    /// JetStream and will run once a node for it is available; the handle awaits its result.
    ///
    /// A task given its own id ([`Task::id`]) that was submitted before is not run again:
    /// the handle follows the existing task and resolves with its outcome.
    pub async fn submit(&self, task: Task) -> Result<TaskHandle, SubmitError> {
        let (id, fresh_id) = match task.id {
            Some(id) => (id, false),
            None => (TaskId::generate(), true),
        };
        let module = match task.module {
            ModuleSource::Bytes(bytes) => self.upload_module(&bytes).await?,
            ModuleSource::Stored(reference) => reference,
        };
        self.topology().await.map_err(|err| {
            SubmitError::with_source(
                SubmitErrorKind::Setup,
                "failed to set up the cluster's streams and buckets",
                err,
            )
        })?;
        let submission = TaskSubmission {
            id,
            module,
            input: task.input.into(),
            limits: task.limits,
            requirements: task.requirements,
            priority: task.priority,
            reply_to: Some(self.inner.inbox.clone()),
            submitted_at_ms: now_ms(),
            retry: task.retry,
            queue_timeout_ms: task.queue_timeout_ms,
            fresh_id,
            grants: task.grants,
        };
        let id = submission.id.clone();
        let span =
            tracing::debug_span!("submit", task_id = %id, module = %submission.module.sha256);
        // Listen before publishing: the result can arrive before `publish` returns.
        let (sender, receiver) = oneshot::channel();
        let waiter = Waiter {
            sender,
            submitted_at_ms: submission.submitted_at_ms,
        };
        lock(&self.inner.routes).waiters.insert(id.clone(), waiter);
        let handle = TaskHandle {
            id,
            receiver: Some(receiver),
            client: Arc::downgrade(&self.inner),
        };
        async {
            let stored = stored::submission(&self.inner.js, &submission)
                .await
                .map_err(|err| {
                    SubmitError::with_source(
                        SubmitErrorKind::NotStored,
                        "failed to submit the task",
                        err,
                    )
                })?;
            if stored.duplicate {
                // Submitted before, inside JetStream's duplicate window: this submission was
                // dropped, and its reply subject will hear nothing. Follow the existing task.
                tracing::debug!("the task id was submitted before; following that task");
                return Ok(TaskHandle::reattached(handle.id.clone(), self.clone()));
            }
            tracing::debug!("task submitted");
            Ok(handle)
        }
        .instrument(span)
        .await
    }

    /// The node table, as any scheduler replica answers `apiary.v1.nodes.list`: liveness is
    /// judged there, by the one rule and clock every reader shares, never by this client's
    /// clock.
    pub async fn nodes(&self) -> Result<Vec<NodeSummary>, RequestError> {
        let mut nodes = Vec::new();
        let mut request = NodesListRequest::default();
        loop {
            let page = self.nodes_page(&request).await?;
            nodes.extend(page.nodes);
            match page.next {
                Some(next) => request.after = Some(next),
                None => return Ok(nodes),
            }
        }
    }

    /// One page of the node list: `request.limit` nodes (500 when absent) after
    /// `request.after`, in node-id order, with where the next page starts. [`Client::nodes`]
    /// reads them all.
    pub async fn nodes_page(
        &self,
        request: &NodesListRequest,
    ) -> Result<NodesListReply, RequestError> {
        Ok(rpc::request(self.nats(), subject::nodes_list(), request, REQUEST_TIMEOUT).await?)
    }

    /// What the agent of `node` says about itself (`apiary.v1.node.<node>.status`): its
    /// inventory and metrics, where its modules came from, and how long it takes over a task.
    /// Answered by the agent itself, not a scheduler.
    pub async fn agent_status(
        &self,
        node: &NodeId,
    ) -> Result<apiary_proto::message::AgentStatus, RequestError> {
        Ok(rpc::request(
            self.nats(),
            subject::node(node, subject::NodeVerb::Status),
            &apiary_proto::message::AgentStatusRequest {},
            REQUEST_TIMEOUT,
        )
        .await?)
    }
}

/// How long a request to the scheduler waits for its answer.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation, so a poisoned lock still guards
    // consistent data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hands each result that arrives on the client's inbox to the handle waiting for it.
async fn route_results(mut subscription: async_nats::Subscriber, routes: Routes) {
    while let Some(message) = subscription.next().await {
        match codec::decode_message::<TaskResult>(message.headers.as_ref(), &message.payload) {
            Ok((result, _)) => {
                lock(&routes).deliver(result);
            }
            Err(err) => {
                tracing::warn!(error = %err, "ignoring a malformed message on the result inbox");
            }
        }
    }
    // The subscription ended (the connection closed for good): no result can arrive now.
    lock(&routes).waiters.clear();
}

/// Where a task's module comes from.
#[derive(Clone, Debug)]
enum ModuleSource {
    Bytes(Bytes),
    Stored(ModuleRef),
}

/// A task to submit: a module, its input, and what it may use.
#[derive(Clone, Debug)]
pub struct Task {
    module: ModuleSource,
    input: Bytes,
    limits: Limits,
    requirements: Requirements,
    priority: Priority,
    id: Option<TaskId>,
    retry: Option<RetryPolicy>,
    queue_timeout_ms: Option<u64>,
    grants: Grants,
}

impl Task {
    /// A task running these module bytes (uploaded on submit if the cluster lacks them).
    pub fn new(module: impl Into<Bytes>) -> Self {
        Self::with_source(ModuleSource::Bytes(module.into()))
    }

    /// A task running a module already in the cluster's module store.
    pub fn stored(module: ModuleRef) -> Self {
        Self::with_source(ModuleSource::Stored(module))
    }

    fn with_source(module: ModuleSource) -> Self {
        Self {
            module,
            input: Bytes::new(),
            limits: Limits::default(),
            requirements: Requirements::default(),
            priority: Priority::default(),
            id: None,
            retry: None,
            grants: Grants::default(),
            queue_timeout_ms: None,
        }
    }

    /// The task's own id, instead of a generated one: an idempotency key. Submitting an id
    /// that was submitted before returns the existing task rather than running it again.
    /// Ids are 1 to 64 of `A-Z a-z 0-9 - _`; see [`TaskId::new`].
    pub fn id(mut self, id: TaskId) -> Self {
        self.id = Some(id);
        self
    }

    /// How failed attempts are retried. Without one, only system failures (a lost node, an
    /// internal error on the node) are retried, up to the scheduler's default.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }

    /// How long the task may wait to be placed before it ends `timed_out`; as long as it
    /// takes when unset.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Replaces everything granted so far with `grants`.
    pub fn grants(mut self, grants: Grants) -> Self {
        self.grants = grants;
        self
    }

    /// Grants the module an argument after its name (`argv[1]` onwards, in order).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.grants.args.push(arg.into());
        self
    }

    /// Grants the module an environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.grants.env.insert(name.into(), value.into());
        self
    }

    /// Grants the module the host's clocks; without this they stand at the Unix epoch.
    pub fn clock(mut self) -> Self {
        self.grants.clock = true;
        self
    }

    /// Grants the module a private scratch directory, `/scratch`, that may hold at most
    /// `max_bytes`; it is deleted after the run.
    pub fn scratch(mut self, max_bytes: u64) -> Self {
        self.grants.scratch_bytes = Some(max_bytes);
        self
    }

    /// Grants the module the app store of `namespace` (the `apiary.kv_*` host calls). A task
    /// acts in one namespace: the last one given to [`Task::kv`] or [`Task::publish`].
    pub fn kv(mut self, namespace: Namespace) -> Self {
        self.grants.kv = true;
        self.grants.namespace = Some(namespace);
        self
    }

    /// Grants the module publishing to the topics of `namespace` (`apiary.publish`).
    pub fn publish(mut self, namespace: Namespace) -> Self {
        self.grants.publish = true;
        self.grants.namespace = Some(namespace);
        self
    }

    /// The bytes given to the module on stdin.
    pub fn input(mut self, input: impl Into<Bytes>) -> Self {
        self.input = input.into();
        self
    }

    /// What the task may use: time, memory, output, fuel.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The wall-clock limit of one run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// What a node must have to run the task: cores, memory, GPUs, labels, architecture.
    pub fn requirements(mut self, requirements: Requirements) -> Self {
        self.requirements = requirements;
        self
    }

    /// How urgent the task is (normal unless set). Each priority is its own queue: while
    /// every queue has work, the scheduler places high, normal and low tasks about 6 : 3 : 1,
    /// so high ones overtake a backlog of low ones and low ones still make progress.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
}

/// A submitted task. Await its result with [`TaskHandle::result`], follow it with
/// [`TaskHandle::watch`], or [`TaskHandle::cancel`] it.
#[derive(Debug)]
pub struct TaskHandle {
    id: TaskId,
    /// Where the result arrives for a task this client submitted; `None` for a task followed
    /// through its record ([`Client::task`], a resubmitted id).
    receiver: Option<oneshot::Receiver<TaskResult>>,
    /// The client, not kept alive by its handles: a handle that outlives its client reports
    /// [`ResultErrorKind::Disconnected`].
    client: std::sync::Weak<Inner>,
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        if self.receiver.is_some()
            && let Some(inner) = self.client.upgrade()
        {
            lock(&inner.routes).waiters.remove(&self.id);
        }
    }
}

/// What a task printed and how it exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskOutput {
    /// The task.
    pub task_id: TaskId,
    /// The node that ran the attempt that finished.
    pub node_id: NodeId,
    /// Which attempt that was (1 for the first).
    pub attempt: u32,
    /// The module's exit code (0 for a `_start` that returned).
    pub exit_code: i32,
    /// What the module wrote to stdout.
    pub stdout: Bytes,
    /// What the module wrote to stderr.
    pub stderr: Bytes,
    /// When the run started (the node's clock, ms since the Unix epoch).
    pub started_at_ms: u64,
    /// When the run finished (the node's clock).
    pub finished_at_ms: u64,
    /// What the run used, as its node measured it (fuel, wall time, peak memory, output);
    /// absent from agents older than the figures.
    pub usage: Option<RunUsage>,
}

impl TaskHandle {
    fn reattached(id: TaskId, client: Client) -> Self {
        Self {
            id,
            receiver: None,
            client: Arc::downgrade(&client.inner),
        }
    }

    fn client(&self) -> Option<Client> {
        self.client.upgrade().map(|inner| Client { inner })
    }

    fn client_for_request(&self) -> Result<Client, RequestError> {
        self.client().ok_or_else(|| {
            RequestError::new(
                RequestErrorKind::Transport,
                "the client that made this handle is gone",
            )
        })
    }

    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// The task's record now: state, attempt, node, reason, history.
    pub async fn status(&self) -> Result<TaskRecord, RequestError> {
        self.client_for_request()?.task_status(&self.id).await
    }

    /// Every change of the task's record from now until it ends.
    pub fn watch(
        &self,
    ) -> impl futures::Stream<Item = Result<TaskRecord, RequestError>> + Send + use<> {
        let client = self.client_for_request();
        let id = self.id.clone();
        async_stream::try_stream! {
            let client = client?;
            let mut changes = std::pin::pin!(client.watch_task(id));
            while let Some(record) = changes.next().await {
                yield record?;
            }
        }
    }

    /// Cancels the task; see [`Client::cancel_task`]. The handle then resolves with a
    /// `cancelled` failure.
    pub async fn cancel(&self) -> Result<TaskRecord, RequestError> {
        self.client_for_request()?.cancel_task(&self.id).await
    }

    /// The raw result of the task, whatever its outcome.
    pub async fn report(mut self) -> Result<TaskResult, ResultError> {
        match self.receiver.take() {
            Some(receiver) => receiver.await.map_err(|_| ResultError::disconnected()),
            None => {
                let client = self.client().ok_or_else(ResultError::disconnected)?;
                Ok(client.await_result(&self.id).await?)
            }
        }
    }

    /// The task's output once it has run; a task that could not run is
    /// [`ResultErrorKind::TaskFailed`], with the failure ([`ResultError::task_failure`]) to
    /// match on.
    pub async fn result(self) -> Result<TaskOutput, ResultError> {
        let client = self.client.clone();
        let report = self.report().await?;
        let large = report.stdout_object.is_some();
        let mut output = into_output(report.clone())?;
        if large {
            let client = client
                .upgrade()
                .map(|inner| Client { inner })
                .ok_or_else(ResultError::disconnected)?;
            output.stdout = client.result_stdout(&report, &output.stdout).await?;
        }
        Ok(output)
    }

    /// Like [`TaskHandle::result`], giving up after `limit`. The task itself goes on.
    pub async fn result_within(self, limit: Duration) -> Result<TaskOutput, ResultError> {
        let id = self.id.clone();
        tokio::time::timeout(limit, self.result())
            .await
            .map_err(|_| {
                ResultError::new(
                    ResultErrorKind::TimedOut,
                    format!("no result for task {id} within {limit:?}"),
                )
            })?
    }
}

fn into_output(result: TaskResult) -> Result<TaskOutput, ResultError> {
    match result.outcome {
        Outcome::Completed {
            exit_code,
            stdout,
            stderr,
        } => Ok(TaskOutput {
            task_id: result.task_id,
            node_id: result.node_id,
            attempt: result.attempt,
            exit_code,
            stdout: stdout.0,
            stderr: stderr.0,
            started_at_ms: result.started_at_ms,
            finished_at_ms: result.finished_at_ms,
            usage: result.usage,
        }),
        Outcome::Failed { error, stderr } => Err(ResultError::failed(TaskFailure {
            task_id: result.task_id,
            node_id: result.node_id,
            attempt: result.attempt,
            error,
            stderr: stderr.0,
            usage: result.usage,
        })),
    }
}
