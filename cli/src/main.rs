//! `apiary`: the command line for an apiary cluster.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use apiary_bin_support::LogFormat;
use apiary_cli::app::{self, KvCommand};
use apiary_cli::commands::{self, Output, SubmitOptions};
use apiary_cli::modules::{self, ModuleCommand};
use apiary_cli::tasks;
use apiary_proto::admin::Approval;
use apiary_proto::lifecycle::{RetryOn, RetryPolicy, TaskState};
use apiary_proto::message::NodeStatus;
use apiary_proto::message::{Grants, Priority, TaskListRequest};
use apiary_proto::{NodeId, TaskId};
use apiary_sdk::{DlqListRequest, NewToken};
use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "apiary",
    version,
    about = "Distributed WebAssembly compute over NATS"
)]
struct Cli {
    /// The NATS server(s) of the cluster, comma-separated (default: the context's, else
    /// nats://127.0.0.1:4222).
    #[arg(long, global = true, env = "APIARY_NATS_URL")]
    server: Option<String>,
    /// A `.creds` file to authenticate with (default: the context's).
    #[arg(long, global = true, env = "APIARY_CREDS")]
    creds: Option<PathBuf>,
    /// The context to use from ~/.config/apiary/context.toml (default: its `current`).
    #[arg(long, global = true, env = "APIARY_CONTEXT")]
    context: Option<String>,
    /// How log lines are written; APIARY_LOG filters them (RUST_LOG syntax).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Say more: debug logs, and an error with each cause on its own line and, with
    /// RUST_BACKTRACE=1, where it happened.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local stack (nats-server, a scheduler and an agent) until Ctrl-C.
    Dev {
        /// The port nats-server listens on; 0 picks a free one.
        #[arg(long, default_value_t = 4222)]
        port: u16,
    },
    /// Submit and inspect tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Tasks whose every allowed attempt failed.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect and manage the cluster's nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Manage join tokens, which admit new nodes.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Read or change the cluster's settings.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The app store: a namespace's keys and values.
    #[command(subcommand)]
    Kv(KvCommand),
    /// The cluster's module store.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Publish a message on a topic of a namespace.
    Pub {
        namespace: String,
        topic: String,
        /// The message; without it, stdin is read.
        message: Option<String>,
    },
    /// Print the messages published on topics of a namespace (`*` and a last `>` match
    /// tokens).
    Sub {
        namespace: String,
        topic: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// One JSON object per message, with its topic.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `apiary completions bash > /etc/bash_completion.d/apiary`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Measure the task path (or the app store, or messaging) next to raw NATS on the same
    /// server, in the same run.
    Bench {
        /// What to measure: `tasks`, `kv` (the app store beside raw KV) or `pubsub`
        /// (messaging beside core NATS).
        #[arg(value_enum, default_value = "tasks")]
        what: BenchTarget,
        /// Start a private local stack (nats-server, scheduler, agent) and measure that,
        /// instead of the cluster at --server.
        #[arg(long)]
        local: bool,
        /// Sequential round trips per latency figure.
        #[arg(long, default_value_t = 500)]
        samples: usize,
        /// Messages or tasks per throughput figure.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Messages or tasks in flight at once for throughput.
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        /// The module tasks run; a tiny built-in echo module by default.
        #[arg(long)]
        module: Option<PathBuf>,
        /// With --local: stacks of this many agents, one after another (comma-separated).
        /// The first gets every figure; each other adds its task throughput as a row.
        #[arg(long, value_delimiter = ',', default_value = "1", requires = "local")]
        agents: Vec<usize>,
        /// With --local: also measure on a server that syncs every JetStream write to disk
        /// before acknowledging it (`sync_interval: always`), rows marked `[sync always]`.
        #[arg(long, requires = "local")]
        durability: bool,
        /// Append a dated entry (machine, server version, this command, the report) to this
        /// file, such as docs/BENCHMARKS.md.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `apiary bench` measures.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BenchTarget {
    Tasks,
    Kv,
    Pubsub,
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Run a WASI module on the cluster and print what it writes to stdout. The command exits
    /// with the module's exit code.
    Submit {
        /// The WebAssembly module (a WASI preview 1 command).
        module: PathBuf,
        /// A file given to the module on stdin; `-` reads this command's stdin.
        #[arg(long)]
        input: Option<PathBuf>,
        /// The longest the module may run.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// How long to wait for the result, placement included.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// Print the whole result as JSON instead of the module's output.
        #[arg(long)]
        json: bool,
        /// Print the task id and return at once instead of waiting for the result.
        #[arg(long)]
        detach: bool,
        /// The task's own id (an idempotency key): submitting it again returns the existing
        /// task instead of running it again.
        #[arg(long)]
        id: Option<TaskId>,
        /// `high`, `normal` or `low`.
        #[arg(long, default_value = "normal", value_parser = parse_priority)]
        priority: Priority,
        /// Attempts in all that may fail before the task is dead (system failures are
        /// retried without asking).
        #[arg(long)]
        attempts: Option<u32>,
        /// Guest failures to retry: trap, timeout, fuel_exhausted, memory_limit,
        /// output_limit, non_zero_exit (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = parse_retry_on)]
        retry_on: Vec<RetryOn>,
        /// The wait before the first retry; it doubles with each further one.
        #[arg(long, value_parser = humantime::parse_duration)]
        backoff: Option<Duration>,
        /// How long the task may wait to be placed before it times out.
        #[arg(long, value_parser = humantime::parse_duration)]
        queue_timeout: Option<Duration>,
        /// Grant the module an argument after its name (repeat for more, in order).
        #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// Grant the module an environment variable, NAME=VALUE (repeat for more).
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var)]
        env: Vec<(String, String)>,
        /// Grant the module the host's clocks (without it they stand at the Unix epoch).
        #[arg(long)]
        clock: bool,
        /// Grant the module a private scratch directory at /scratch of at most this size
        /// (bytes, or with a unit: 64KiB, 1MiB), deleted after the run.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        scratch: Option<u64>,
        /// The app-store namespace the --kv and --publish grants act in.
        #[arg(long, value_name = "NAMESPACE")]
        namespace: Option<apiary_proto::Namespace>,
        /// Grant the module the app store of --namespace (apiary.kv_* host calls).
        #[arg(long, requires = "namespace")]
        kv: bool,
        /// Grant the module publishing to the topics of --namespace (apiary.publish).
        #[arg(long, requires = "namespace")]
        publish: bool,
    },
    /// Run a module once per line of input (a file, or `-` for stdin), with at most
    /// --in-flight tasks at once, and print the outputs in input order. Exits 1 if any
    /// task failed.
    Map {
        module: PathBuf,
        /// The inputs, one per line.
        #[arg(long, default_value = "-")]
        lines: PathBuf,
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// The longest each task may run.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// One JSON object per task as it ends (index, task id, stdout or error).
        #[arg(long)]
        json: bool,
    },
    /// Show a task's record: state, attempt, node, reason, history.
    Status {
        id: TaskId,
        #[arg(long)]
        json: bool,
    },
    /// Print a task's output as `submit` does (waiting for it to end unless --no-wait), and
    /// exit with its exit code.
    Result {
        id: TaskId,
        /// Answer at once; a task that has not ended is an error.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the task to end.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        wait: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Print what a task wrote to stderr.
    Logs {
        id: TaskId,
        /// `{"task_id": …, "stderr": …}`, stderr as a string when it is UTF-8.
        #[arg(long)]
        json: bool,
    },
    /// List tasks: live ones, then those that ended lately.
    Ls {
        /// Only tasks in this state.
        #[arg(long, value_parser = parse_task_state)]
        state: Option<TaskState>,
        /// Only tasks whose latest attempt is on this node.
        #[arg(long)]
        node: Option<NodeId>,
        /// Only tasks submitted within this long.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        age: Duration,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Where the previous page stopped.
        #[arg(long)]
        cursor: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Follow a task's transitions until it ends, or every task's until interrupted.
    Watch {
        id: Option<TaskId>,
        /// A JSON record per line.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task: a pending one never runs, a running one is stopped.
    Cancel { id: TaskId },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead tasks, oldest first.
    Ls {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        cursor: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Show a dead task's record.
    Show {
        id: TaskId,
        #[arg(long)]
        json: bool,
    },
    /// Put a dead task back in the queue with its failures forgotten.
    Requeue { id: TaskId },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List nodes with their status and load.
    Ls {
        /// Only nodes in this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<NodeStatus>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one node in full: inventory, live metrics, what the operator set.
    Show {
        node: NodeId,
        #[arg(long)]
        json: bool,
    },
    /// Place no new tasks on the node; what it holds stays.
    Cordon { node: NodeId },
    /// Let the node take new tasks again.
    Uncordon { node: NodeId },
    /// Place no new tasks on the node, move its queued tasks elsewhere, and give running
    /// tasks until the deadline to finish (then they are handed back).
    Drain {
        node: NodeId,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        deadline: Duration,
    },
    /// Set labels (`key=value`) or remove them (`key-`); the operator's win over the agent's.
    Label {
        node: NodeId,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Replace the node's roles (the agent's own no longer count); `--none` clears them.
    Role {
        node: NodeId,
        #[arg(required_unless_present = "none")]
        roles: Vec<String>,
        /// Clear the node's roles.
        #[arg(long, conflicts_with = "roles")]
        none: bool,
    },
    /// Let a node that waits for approval take tasks.
    Approve { node: NodeId },
    /// Forget the node and its key binding; a running agent is told to leave.
    Rm { node: NodeId },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create a join token; it is printed once, as the last word of the output.
    Create {
        /// How long it admits new nodes (e.g. 24h); forever when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// How many new nodes it admits; unlimited when absent.
        #[arg(long)]
        uses: Option<u32>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
    },
    /// List join tokens (never their secrets).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it admits no new node; nodes it admitted keep working.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Show the settings, or change them.
    Settings {
        /// `manual`: new nodes wait for `apiary nodes approve`; `auto`: they take tasks at once.
        #[arg(long, value_parser = parse_approval)]
        approval: Option<Approval>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_approval(text: &str) -> Result<Approval, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?} is not one of auto, manual"))
}

/// Splits `key=value` (set) and `key-` (remove) label arguments.
fn parse_label_changes(
    changes: &[String],
) -> anyhow::Result<(std::collections::BTreeMap<String, String>, Vec<String>)> {
    let mut set = std::collections::BTreeMap::new();
    let mut remove = Vec::new();
    for change in changes {
        if let Some((key, value)) = change.split_once('=') {
            set.insert(key.to_owned(), value.to_owned());
        } else if let Some(key) = change.strip_suffix('-') {
            remove.push(key.to_owned());
        } else {
            anyhow::bail!("{change:?} is neither key=value nor key-");
        }
    }
    Ok((set, remove))
}

fn parse_priority(text: &str) -> Result<Priority, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?} is not one of high, normal, low"))
}

/// A size in bytes: a number, optionally with a unit (`64KiB`, `1MiB`, `1MB`).
fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|err| format!("expected a size such as 1048576 or 64MiB: {err}"))
}

fn parse_env_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

fn parse_retry_on(text: &str) -> Result<RetryOn, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
        format!(
            "{text:?} is not one of trap, timeout, fuel_exhausted, memory_limit, output_limit, non_zero_exit"
        )
    })
}

fn parse_task_state(text: &str) -> Result<TaskState, String> {
    text.parse()
}

fn parse_status(text: &str) -> Result<NodeStatus, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?} is not one of online, offline, left"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The local stack is a server of sorts and logs what it does; other commands only warn.
    let default_filter = match cli.command {
        _ if cli.verbose => "debug",
        Command::Dev { .. } => "info",
        _ => "warn",
    };
    apiary_bin_support::init_tracing(cli.log_format, default_filter);
    let verbose = cli.verbose;
    match run(cli).await {
        Ok(code) => code,
        Err(err) if verbose => {
            eprintln!("error: {err:?}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {}", apiary_cli::output::error_line(&err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let connection = Connection {
        server: cli.server.clone(),
        creds: cli.creds.clone(),
        context: cli.context.clone(),
    };
    match cli.command {
        Command::Dev { port } => {
            let shutdown = apiary_bin_support::shutdown_on_signal();
            apiary_cli::dev::run(port, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Task(command) => task(connect(&connection).await?, command).await,
        Command::Dlq(command) => {
            let client = connect(&connection).await?;
            let out = &mut std::io::stdout();
            match command {
                DlqCommand::Ls {
                    limit,
                    cursor,
                    json,
                } => {
                    let page = DlqListRequest {
                        limit: Some(limit),
                        cursor,
                    };
                    tasks::dlq_ls(&client, &page, json, out).await?;
                }
                DlqCommand::Show { id, json } => tasks::dlq_show(&client, &id, json, out).await?,
                DlqCommand::Requeue { id } => tasks::dlq_requeue(&client, &id, out).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what,
            local,
            samples,
            count,
            in_flight,
            module,
            agents,
            durability,
            record,
            json,
        } => {
            let module = match module {
                Some(path) => std::fs::read(&path)
                    .with_context(|| format!("failed to read module {}", path.display()))?,
                None => wat::parse_str(apiary_cli::bench::ECHO_MODULE_WAT)?,
            };
            let options = apiary_cli::bench::BenchOptions {
                latency_samples: samples,
                throughput_count: count,
                in_flight,
                module: module.into(),
            };
            // The server's version is read while the server runs, for `--record`.
            let server_version = std::sync::Mutex::new(None::<String>);
            let measure = |url: String| {
                let options = options.clone();
                let server_version = &server_version;
                async move {
                    if let Ok(version) = apiary_cli::bench_record::server_version(&url).await {
                        server_version
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get_or_insert(version);
                    }
                    match what {
                        BenchTarget::Tasks => apiary_cli::bench::run(&url, &options).await,
                        BenchTarget::Kv => apiary_cli::bench_app::kv(&url, &options).await,
                        BenchTarget::Pubsub => apiary_cli::bench_app::pubsub(&url, &options).await,
                    }
                }
            };
            let figures = if local {
                let mut figures = Vec::new();
                for (index, &count) in agents.iter().enumerate() {
                    let stack =
                        apiary_cli::dev::DevStack::start_with(apiary_cli::dev::DevOptions {
                            agents: count,
                            ..apiary_cli::dev::DevOptions::default()
                        })
                        .await?;
                    let measured = if index == 0 {
                        measure(stack.url().to_owned()).await
                    } else {
                        apiary_cli::bench::agents_throughput(stack.url(), &options, count)
                            .await
                            .map(|figure| vec![figure])
                    };
                    stack.stop().await?;
                    figures.extend(measured?);
                }
                if durability {
                    let stack =
                        apiary_cli::dev::DevStack::start_with(apiary_cli::dev::DevOptions {
                            agents: agents.first().copied().unwrap_or(1),
                            sync_always: true,
                            ..apiary_cli::dev::DevOptions::default()
                        })
                        .await?;
                    let measured = apiary_cli::bench::durability(stack.url(), &options).await;
                    stack.stop().await?;
                    figures.extend(measured?);
                }
                figures
            } else {
                measure(
                    selected_context(&connection)?
                        .server_for_messages(connection.server.as_deref()),
                )
                .await?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                println!("{}", apiary_cli::bench::report(&figures));
            }
            if let Some(file) = record {
                let version = server_version
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .unwrap_or_else(|| "unknown".to_owned());
                let run = apiary_cli::bench_record::RunContext::here(version);
                apiary_cli::bench_record::append(&file, &figures, &run)?;
                eprintln!("apiary bench: entry appended to {}", file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes(command) => {
            let client = connect(&connection).await?;
            nodes(&client, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokens(command) => {
            let client = connect(&connection).await?;
            let out = &mut std::io::stdout();
            match command {
                TokensCommand::Create {
                    ttl,
                    uses,
                    description,
                    json,
                } => {
                    let token = NewToken {
                        description,
                        ttl,
                        uses,
                    };
                    commands::tokens_create(&client, token, json, out).await?;
                }
                TokensCommand::Ls { json } => commands::tokens_ls(&client, json, out).await?,
                TokensCommand::Revoke { id } => {
                    let info = client
                        .revoke_token(&id)
                        .await
                        .with_context(|| format!("failed to revoke join token {id}"))?;
                    println!("revoked join token {}", info.id);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            // Generated into memory: the generator panics on a failed write, and a closed
            // pipe (`| head`) is an ordinary error here.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "apiary", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .context("failed to write the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Module(command) => {
            let client = connect(&connection).await?;
            modules::module(&client, command, &mut std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Kv(command) => {
            let client = connect(&connection).await?;
            let out = &mut std::io::stdout();
            app::kv(
                &client,
                command,
                &mut std::io::stdin(),
                out,
                &mut std::io::stderr(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pub {
            namespace,
            topic,
            message,
        } => {
            let client = connect(&connection).await?;
            let message = match message {
                Some(message) => message.into_bytes(),
                None => read_input(Some(std::path::Path::new("-")))?,
            };
            app::publish(&client, &namespace, &topic, message.into()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sub {
            namespace,
            topic,
            count,
            json,
        } => {
            let client = connect(&connection).await?;
            let out = &mut std::io::stdout();
            let notice = &mut std::io::stderr();
            app::subscribe(&client, &namespace, &topic, count, json, out, notice).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCommand::Settings { approval, json }) => {
            let client = connect(&connection).await?;
            let settings = match approval {
                Some(approval) => client.set_approval(approval).await,
                None => client.cluster_settings().await,
            }
            .context("failed to reach the cluster settings")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                let approval = serde_json::to_value(settings.approval)?;
                println!("approval  {}", approval.as_str().unwrap_or("?"));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What the command line says about where to connect.
struct Connection {
    server: Option<String>,
    creds: Option<PathBuf>,
    context: Option<String>,
}

/// The context the command line selects (`--context`, else the file's current one).
fn selected_context(cli: &Connection) -> anyhow::Result<apiary_cli::context::Context> {
    match apiary_cli::context::default_path() {
        Some(path) => apiary_cli::context::load(&path, cli.context.as_deref()),
        None if cli.context.is_some() => {
            anyhow::bail!("no context file: neither XDG_CONFIG_HOME nor HOME is set")
        }
        None => Ok(apiary_cli::context::Context::default()),
    }
}

/// Connects as the command line says: flags over the environment over the context.
async fn connect(cli: &Connection) -> anyhow::Result<apiary_sdk::Client> {
    let context = selected_context(cli)?;
    let options = context.options(cli.server.as_deref(), cli.creds.as_deref());
    commands::connect_with(options, &context.server_for_messages(cli.server.as_deref())).await
}

async fn task(client: apiary_sdk::Client, command: TaskCommand) -> anyhow::Result<ExitCode> {
    // Unlocked handles: log lines from other threads go to stderr meanwhile.
    let mut out = Output {
        stdout: std::io::stdout(),
        stderr: std::io::stderr(),
    };
    match command {
        TaskCommand::Submit {
            module,
            input,
            timeout,
            wait,
            json,
            detach,
            id,
            priority,
            attempts,
            retry_on,
            backoff,
            queue_timeout,
            args,
            env,
            clock,
            scratch,
            namespace,
            kv,
            publish,
        } => {
            let retry =
                (attempts.is_some() || !retry_on.is_empty() || backoff.is_some()).then(|| {
                    let defaults = RetryPolicy::default();
                    RetryPolicy {
                        max_attempts: attempts.unwrap_or(defaults.max_attempts),
                        backoff_ms: backoff.map_or(defaults.backoff_ms, |backoff| {
                            u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX)
                        }),
                        on: retry_on.into_iter().collect(),
                        ..defaults
                    }
                });
            let options = SubmitOptions {
                module: std::fs::read(&module)
                    .with_context(|| format!("failed to read module {}", module.display()))?,
                input: read_input(input.as_deref())?,
                timeout,
                wait,
                json,
                detach,
                id,
                priority,
                retry,
                queue_timeout,
                grants: Grants {
                    args,
                    env: env.into_iter().collect(),
                    clock,
                    scratch_bytes: scratch,
                    namespace,
                    kv,
                    publish,
                },
            };
            let code = commands::task_submit(&client, options, &mut out).await?;
            Ok(ExitCode::from(code))
        }
        TaskCommand::Map {
            module,
            lines,
            in_flight,
            timeout,
            json,
        } => {
            let text = read_input(Some(&lines))?;
            let inputs = text
                .split(|byte| *byte == b'\n')
                .filter(|line| !line.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            let options = apiary_cli::map::MapOptions {
                module: std::fs::read(&module)
                    .with_context(|| format!("failed to read module {}", module.display()))?,
                inputs,
                in_flight,
                timeout,
                json,
                progress: true,
            };
            let failed = apiary_cli::map::map(&client, options, &mut out.stdout).await?;
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        TaskCommand::Status { id, json } => {
            tasks::status(&client, &id, json, &mut out.stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Result {
            id,
            no_wait,
            wait,
            json,
        } => {
            let wait = if no_wait {
                tasks::Wait::No
            } else {
                tasks::Wait::Up(wait)
            };
            let code = tasks::result(&client, &id, wait, json, &mut out).await?;
            Ok(ExitCode::from(code))
        }
        TaskCommand::Logs { id, json } => {
            tasks::logs(&client, &id, json, &mut out.stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Ls {
            state,
            node,
            age,
            limit,
            cursor,
            json,
        } => {
            let filter = TaskListRequest {
                state,
                node_id: node,
                max_age_ms: Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                limit: Some(limit),
                cursor,
            };
            tasks::ls(&client, &filter, json, &mut out.stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Watch { id, json } => {
            match id {
                Some(id) => tasks::watch(&client, &id, json, &mut out.stdout).await?,
                None => tasks::watch_all(&client, json, &mut out.stdout).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id } => {
            tasks::cancel(&client, &id, &mut out.stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn nodes(client: &apiary_sdk::Client, command: NodesCommand) -> anyhow::Result<()> {
    let out = &mut std::io::stdout();
    let (node, changed) = match command {
        NodesCommand::Ls { status, json } => {
            return commands::nodes_ls(client, status, json, out).await;
        }
        NodesCommand::Show { node, json } => {
            return commands::nodes_show(client, &node, json, out).await;
        }
        NodesCommand::Rm { node } => {
            client
                .remove_node(&node)
                .await
                .with_context(|| format!("failed to remove node {node}"))?;
            println!("removed node {node}");
            return Ok(());
        }
        NodesCommand::Cordon { node } => (node.clone(), client.cordon(&node).await),
        NodesCommand::Uncordon { node } => (node.clone(), client.uncordon(&node).await),
        NodesCommand::Drain { node, deadline } => {
            (node.clone(), client.drain(&node, Some(deadline)).await)
        }
        NodesCommand::Label { node, changes } => {
            let (set, remove) = parse_label_changes(&changes)?;
            (node.clone(), client.label(&node, set, remove).await)
        }
        NodesCommand::Role { node, roles, .. } => (
            node.clone(),
            client.set_roles(&node, roles.into_iter().collect()).await,
        ),
        NodesCommand::Approve { node } => (node.clone(), client.approve(&node).await),
    };
    let summary = changed.with_context(|| format!("failed to change node {node}"))?;
    commands::print_node(&summary, false, out)
}

fn read_input(input: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    match input {
        None => Ok(Vec::new()),
        Some(path) if path.as_os_str() == "-" => {
            let mut buffer = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buffer)
                .context("failed to read stdin")?;
            Ok(buffer)
        }
        Some(path) => {
            std::fs::read(path).with_context(|| format!("failed to read input {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_read_as_bytes_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1024 * 1024));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn completions_cover_every_shell_and_the_new_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "apiary", &mut script);
            let script = String::from_utf8(script).expect("utf-8");
            let words: std::collections::HashSet<&str> = script
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .collect();
            for word in [
                "kv",
                "history",
                "pub",
                "sub",
                "map",
                "module",
                "completions",
            ] {
                assert!(words.contains(word), "{shell:?} lacks the word {word}");
            }
        }
    }

    #[test]
    fn a_usage_error_exits_with_status_2() {
        for args in [
            &["apiary", "kv", "nonsense"][..],
            &["apiary", "kv", "update", "ns", "key", "value"],
            &["apiary", "completions", "tcsh"],
        ] {
            let err = Cli::try_parse_from(args).expect_err("a usage error");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
