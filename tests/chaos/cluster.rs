//! The cluster under test: one `nats-server`, scheduler replicas and agents, each a separate
//! OS process that the driver can kill with SIGKILL and start again exactly as it was (same
//! node id, same store directory, same port).
//!
//! Every process writes its output to its own log file, appended across incarnations with a
//! marker line per start, so that a failure can be traced to one incarnation. Children are
//! started with `kill_on_drop`, so a driver that returns, fails or is interrupted leaves no
//! process behind.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use apiary_proto::message::NodeStatus;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::process::{Child, Command};

/// How long a starting cluster may take to be ready, at each step.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a killed process may take to be reaped. SIGKILL cannot be ignored, so this only
/// bounds a kernel that is very busy.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a process's log a failed start prints.
const START_LOG_TAIL_LINES: usize = 40;

/// What the cluster is made of and where its binaries are.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub nats_server: PathBuf,
    pub bin_dir: PathBuf,
    pub schedulers: usize,
    pub agents: usize,
    pub slots: u32,
    pub heartbeat: Duration,
    /// The components' `APIARY_LOG` filter.
    pub log: String,
    /// This cluster's own directory: the JetStream store, the logs and the event log.
    pub dir: PathBuf,
}

/// One process of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Server,
    Scheduler(usize),
    Agent(usize),
}

/// How to start one process, again and again.
#[derive(Debug)]
struct Spec {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

/// A process slot: its spec, and the running child if there is one.
#[derive(Debug)]
struct Proc {
    spec: Spec,
    child: Option<Child>,
    incarnation: u32,
}

/// The running cluster.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    url: String,
    server: Proc,
    schedulers: Vec<Proc>,
    agents: Vec<Proc>,
    events: File,
    started: Instant,
    /// How many times each kind of process was killed on purpose.
    pub kills: Kills,
    /// Processes that exited without being killed (a component giving up while the server
    /// was away, or a crash); the driver starts them again, as systemd would.
    pub unexpected_exits: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Kills {
    pub agents: u32,
    pub schedulers: u32,
    pub server: u32,
}

/// The node id of agent `index`.
pub fn node_id(index: usize) -> String {
    format!("chaos-{index}")
}

impl Cluster {
    /// Starts the whole cluster and returns once the server serves JetStream, every
    /// scheduler replica serves its endpoints and every agent is online in the node table.
    pub async fn start(config: ClusterConfig) -> anyhow::Result<Self> {
        let logs = config.dir.join("logs");
        let store = config.dir.join("store");
        std::fs::create_dir_all(&logs).context("failed to create the log directory")?;
        std::fs::create_dir_all(&store).context("failed to create the store directory")?;
        let port = free_port()?;
        let url = format!("nats://127.0.0.1:{port}");
        let server = Proc::new(Spec {
            name: "nats-server".to_owned(),
            program: config.nats_server.clone(),
            args: vec![
                "-js".into(),
                "-sd".into(),
                store.into_os_string(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string().into(),
            ],
            env: Vec::new(),
            log: logs.join("nats-server.log"),
        });
        let heartbeat = humantime::format_duration(config.heartbeat).to_string();
        let schedulers = (0..config.schedulers)
            .map(|index| {
                Proc::new(Spec {
                    name: format!("scheduler-{index}"),
                    program: config.bin_dir.join("apiary-scheduler"),
                    args: Vec::new(),
                    env: vec![
                        ("APIARY_NATS_URL".to_owned(), url.clone()),
                        ("APIARY_HEARTBEAT_INTERVAL".to_owned(), heartbeat.clone()),
                        ("APIARY_LOG".to_owned(), config.log.clone()),
                    ],
                    log: logs.join(format!("scheduler-{index}.log")),
                })
            })
            .collect();
        let agents = (0..config.agents)
            .map(|index| {
                Proc::new(Spec {
                    name: format!("agent {}", node_id(index)),
                    program: config.bin_dir.join("apiary-agent"),
                    args: Vec::new(),
                    env: vec![
                        ("APIARY_NATS_URL".to_owned(), url.clone()),
                        ("APIARY_NODE_ID".to_owned(), node_id(index)),
                        (
                            "APIARY_STATE_DIR".to_owned(),
                            config
                                .dir
                                .join("state")
                                .join(node_id(index))
                                .to_string_lossy()
                                .into_owned(),
                        ),
                        ("APIARY_SLOTS".to_owned(), config.slots.to_string()),
                        ("APIARY_LOG".to_owned(), config.log.clone()),
                    ],
                    log: logs.join(format!("agent-{}.log", node_id(index))),
                })
            })
            .collect();
        let events = File::create(config.dir.join("events.log"))
            .context("failed to create the event log")?;
        let mut cluster = Self {
            config,
            url,
            server,
            schedulers,
            agents,
            events,
            started: Instant::now(),
            kills: Kills::default(),
            unexpected_exits: Vec::new(),
        };

        cluster.spawn(Role::Server)?;
        cluster.wait_for_server().await?;
        for index in 0..cluster.schedulers.len() {
            cluster.spawn(Role::Scheduler(index))?;
        }
        cluster.wait_for_schedulers().await?;
        // Agents join with a token, as on a real fleet; one for all of them, with unlimited
        // uses, since restarts under the same key need none and every agent is new once.
        let token = apiary_harness::mint_token(&cluster.url, "chaos agents", None, None).await;
        for agent in &mut cluster.agents {
            agent
                .spec
                .env
                .push(("APIARY_TOKEN".to_owned(), token.clone()));
        }
        for index in 0..cluster.agents.len() {
            cluster.spawn(Role::Agent(index))?;
        }
        cluster.wait_for_agents().await?;
        cluster.event("cluster ready");
        Ok(cluster)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn proc(&mut self, role: Role) -> &mut Proc {
        match role {
            Role::Server => &mut self.server,
            Role::Scheduler(index) => &mut self.schedulers[index],
            Role::Agent(index) => &mut self.agents[index],
        }
    }

    /// Every process slot, running or not.
    pub fn roles(&self) -> Vec<Role> {
        std::iter::once(Role::Server)
            .chain((0..self.schedulers.len()).map(Role::Scheduler))
            .chain((0..self.agents.len()).map(Role::Agent))
            .collect()
    }

    /// The name and process id of every scheduler and agent running now.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.schedulers
            .iter()
            .chain(&self.agents)
            .filter_map(|proc| Some((proc.spec.name.clone(), proc.child.as_ref()?.id()?)))
            .collect()
    }

    pub fn is_running(&mut self, role: Role) -> bool {
        self.proc(role).child.is_some()
    }

    /// Appends a line to the event log, stamped with the time since the cluster started.
    pub fn event(&mut self, what: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        // The event log is a diagnostic aid: failing to write it must not stop the run.
        let _ = writeln!(self.events, "+{elapsed:9.3}s {what}");
    }

    /// Starts the process in `role` (again).
    pub fn spawn(&mut self, role: Role) -> anyhow::Result<()> {
        let proc = self.proc(role);
        if proc.child.is_some() {
            return Ok(());
        }
        proc.incarnation += 1;
        let incarnation = proc.incarnation;
        let child = proc.spec.spawn(incarnation)?;
        let pid = child.id().unwrap_or_default();
        proc.child = Some(child);
        let name = proc.spec.name.clone();
        self.event(&format!(
            "start {name} (incarnation {incarnation}, pid {pid})"
        ));
        Ok(())
    }

    /// Kills the process in `role` with SIGKILL and reaps it.
    pub async fn kill(&mut self, role: Role) -> anyhow::Result<()> {
        let proc = self.proc(role);
        let Some(mut child) = proc.child.take() else {
            return Ok(());
        };
        let name = proc.spec.name.clone();
        let pid = child.id().unwrap_or_default();
        // `kill` sends SIGKILL on Unix and waits for the process to be reaped.
        tokio::time::timeout(REAP_TIMEOUT, child.kill())
            .await
            .with_context(|| format!("timed out reaping {name}"))?
            .with_context(|| format!("failed to kill {name}"))?;
        match role {
            Role::Server => self.kills.server += 1,
            Role::Scheduler(_) => self.kills.schedulers += 1,
            Role::Agent(_) => self.kills.agents += 1,
        }
        self.event(&format!("SIGKILL {name} (pid {pid})"));
        Ok(())
    }

    /// The processes that exited on their own since the last call; their slots are now
    /// empty, for the caller to start them again.
    pub fn reap_exited(&mut self) -> Vec<Role> {
        let mut exited = Vec::new();
        for role in self.roles() {
            let proc = self.proc(role);
            let status = match proc.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => status,
                _ => continue,
            };
            proc.child = None;
            let name = proc.spec.name.clone();
            let incarnation = proc.incarnation;
            self.unexpected_exits.push(format!(
                "{name} (incarnation {incarnation}) {}",
                describe(status)
            ));
            self.event(&format!("{name} exited on its own: {}", describe(status)));
            exited.push(role);
        }
        exited
    }

    /// Waits until a client can connect and JetStream answers an account info request.
    async fn wait_for_server(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            self.fail_if_exited(Role::Server)?;
            let connect = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(1))
                .connect(self.url.as_str());
            match connect.await {
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => return Ok(()),
                    Err(err) => last_error = err.to_string(),
                },
                Err(err) => last_error = err.to_string(),
            }
            // The server gives no signal of its own when it is ready; ask again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "nats-server did not serve JetStream within {START_TIMEOUT:?}: {last_error}; see {}",
            self.server.spec.log.display()
        )
    }

    /// Waits until every replica lists all its endpoints in reply to the NATS micro
    /// protocol's INFO. A replica answers PING before its endpoints exist, so a PING alone
    /// would not prove that it serves registrations.
    async fn wait_for_schedulers(&mut self) -> anyhow::Result<()> {
        let expected = self.schedulers.len();
        let nats = async_nats::connect(self.url.as_str())
            .await
            .context("failed to connect to nats-server")?;
        let subject = format!("$SRV.INFO.{}", apiary_scheduler::SERVICE_NAME);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ready = 0;
        while Instant::now() < deadline {
            for index in 0..expected {
                self.fail_if_exited(Role::Scheduler(index))?;
            }
            ready = serving_replicas(&nats, &subject).await?;
            if ready >= expected {
                return Ok(());
            }
        }
        bail!(
            "only {ready} of {expected} scheduler replicas served within {START_TIMEOUT:?}; see {}",
            self.config.dir.join("logs").display()
        )
    }

    /// Waits until every agent is online in the node table, as an SDK user would see it.
    async fn wait_for_agents(&mut self) -> anyhow::Result<()> {
        let client = apiary_sdk::Client::connect(&self.url)
            .await
            .context("failed to connect the SDK client")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let wanted: Vec<String> = (0..self.agents.len()).map(node_id).collect();
        let mut online = Vec::new();
        while Instant::now() < deadline {
            for index in 0..self.agents.len() {
                self.fail_if_exited(Role::Agent(index))?;
            }
            online = client
                .nodes()
                .await
                .context("failed to read the node table")?
                .into_iter()
                .filter(|node| node.status == NodeStatus::Online)
                .map(|node| node.info.node_id.to_string())
                .filter(|node| wanted.contains(node))
                .collect();
            if online.len() == wanted.len() {
                return Ok(());
            }
            // Registration is a state in a KV bucket; read it again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "only {online:?} of {wanted:?} came online within {START_TIMEOUT:?}; see {}",
            self.config.dir.join("logs").display()
        )
    }

    fn fail_if_exited(&mut self, role: Role) -> anyhow::Result<()> {
        let proc = self.proc(role);
        if let Some(child) = proc.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            // CI keeps only what is printed, not the run directory: the log's last lines
            // go into the error, so a failed start can be understood from CI's output.
            bail!(
                "{} {} while starting; the end of {}:\n{}",
                proc.spec.name,
                describe(status),
                proc.spec.log.display(),
                log_tail(&proc.spec.log, START_LOG_TAIL_LINES)
            );
        }
        Ok(())
    }
}

impl Proc {
    fn new(spec: Spec) -> Self {
        Self {
            spec,
            child: None,
            incarnation: 0,
        }
    }
}

impl Spec {
    fn spawn(&self, incarnation: u32) -> anyhow::Result<Child> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("failed to open {}", self.log.display()))?;
        writeln!(
            log,
            "===== apiary-chaos: {} incarnation {incarnation} =====",
            self.name
        )
        .with_context(|| format!("failed to write {}", self.log.display()))?;
        let stdout = log
            .try_clone()
            .with_context(|| format!("failed to open {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        // The driver's own APIARY_* settings (a config file, a log filter) must not leak into
        // the components: each is configured by exactly the variables below.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("APIARY_") {
                command.env_remove(name);
            }
        }
        command
            // Plain log lines: they are read in files and grepped, not on a terminal.
            .env("NO_COLOR", "1")
            .args(&self.args)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .kill_on_drop(true);
        command
            .spawn()
            .with_context(|| format!("failed to start {} ({})", self.name, self.program.display()))
    }
}

/// Counts the scheduler replicas that list all their endpoints, from the replies to one INFO
/// request collected for a short window.
async fn serving_replicas(nats: &async_nats::Client, subject: &str) -> anyhow::Result<usize> {
    let inbox = nats.new_inbox();
    let mut replies = nats
        .subscribe(inbox.clone())
        .await
        .context("failed to subscribe to an inbox")?;
    nats.publish_with_reply(subject.to_owned(), inbox, Bytes::new())
        .await
        .context("failed to send the INFO request")?;
    let mut ready = std::collections::HashSet::new();
    // Replies come within milliseconds of each other; the window only has to outlast them.
    let window = tokio::time::sleep(Duration::from_millis(200));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            reply = replies.next() => {
                let Some(reply) = reply else { break };
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&reply.payload) else {
                    continue;
                };
                let endpoints = value["endpoints"].as_array().map_or(0, Vec::len);
                if let (true, Some(id)) = (endpoints >= 3, value["id"].as_str()) {
                    ready.insert(id.to_owned());
                }
            }
        }
    }
    Ok(ready.len())
}

/// A port that is free now, for a server that must come back on the same one after a
/// restart. (Another process could take it in between; on a test machine that is rare, and
/// the server's start then fails with a clear log.)
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("failed to find a free port")?;
    Ok(listener
        .local_addr()
        .context("failed to read the free port")?
        .port())
}

/// The last `lines` lines of a process's log, or why they could not be read.
fn log_tail(log: &Path, lines: usize) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(could not read it: {err})"),
    }
}

fn describe(status: ExitStatus) -> String {
    status.to_string()
}

/// The binary of `nats-server`: `NATS_SERVER_BIN`, else the one on `PATH`.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    apiary_broker::NatsServer::binary().map_err(anyhow::Error::from)
}

/// The directory the driver's own binary lives in (`target/<profile>`), where cargo also put
/// `apiary-agent` and `apiary-scheduler`.
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to find the driver's own binary")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("failed to find the driver's directory")
}
