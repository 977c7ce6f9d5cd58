//! `apiary-chaos`: the chaos suite's driver (`scripts/chaos`, GitHub issue 5).
//!
//! For each scenario it starts a fresh cluster of separate processes (nats-server with a
//! file store, scheduler replicas, agents), submits tasks at a steady rate through the SDK
//! while it kills and restarts processes, then drains with no chaos and checks the ledger:
//! every acknowledged task must come back exactly once, with the right output. Speed
//! (latency p50/p99/max) is measured and printed, never asserted.

mod chaos;
mod cluster;
mod ledger;
mod load;
mod module;
mod report;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use apiary_proto::topology;
use async_nats::jetstream;
use clap::Parser;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chaos::{Chaos, Plan, Scenario};
use crate::cluster::{Cluster, ClusterConfig};
use crate::ledger::{Ledger, Stored};
use crate::load::Load;
use crate::report::{Pending, ScenarioReport};

/// The inbox prefix of the load generator's SDK client. The scheduler publishes results to
/// the submitter's inbox under it, where a second connection counts every delivery.
const INBOX_PREFIX: &str = "_INBOX.chaos";

/// How often the drain looks at the streams to see whether any work is still outstanding.
const QUIET_POLL: Duration = Duration::from_millis(250);

/// Kills and restarts apiary's processes under load and counts what becomes of every task.
#[derive(Debug, Parser)]
// A later flag overrides an earlier one, so `scripts/chaos --short --duration 40s` works.
#[command(name = "apiary-chaos", args_override_self = true)]
struct Args {
    /// Scenarios to run, each on a fresh cluster: agents, schedulers, server, all; or every
    /// (all four in turn). Repeat the flag or separate with commas.
    #[arg(long, value_delimiter = ',', default_value = "every")]
    scenario: Vec<ScenarioArg>,
    /// How long the chaos (and the load) lasts in each scenario.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// The longest wait, with no chaos, for every task's result and for the cluster to have
    /// no work outstanding; ends early when both are true.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    drain: Duration,
    /// Tasks submitted per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Scheduler replicas.
    #[arg(long, default_value_t = 3)]
    schedulers: usize,
    /// Agents (node ids chaos-0, chaos-1, …).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Task slots per agent.
    #[arg(long, default_value_t = 2)]
    slots: u32,
    /// The heartbeat interval the schedulers run with (agents learn it when they register).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    heartbeat: Duration,
    /// Where apiary-agent and apiary-scheduler are; default: this binary's directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// How long each task holds its slot: the uppercase answer after a wait on the monotonic
    /// clock, so that killed agents hold work in flight. 0 runs uppercase.wasm as it is.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    task_time: Duration,
    /// Where uppercase.wasm is, for --task-time 0 (scripts/lib.sh's build_wasm_tasks exports
    /// it).
    #[arg(long, env = "APIARY_WASM_DIR")]
    wasm_dir: Option<PathBuf>,
    /// The components' log filter (APIARY_LOG, RUST_LOG syntax), e.g.
    /// `info,apiary_scheduler=debug` to follow each task through the replicas.
    #[arg(long, default_value = "info")]
    log: String,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the run directory (logs, event logs, JetStream stores). It is also kept when a
    /// scenario fails.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ScenarioArg {
    Agents,
    Schedulers,
    Server,
    All,
    Soak,
    Every,
}

impl ScenarioArg {
    fn scenarios(self) -> Vec<Scenario> {
        match self {
            ScenarioArg::Agents => vec![Scenario::Agents],
            ScenarioArg::Schedulers => vec![Scenario::Schedulers],
            ScenarioArg::Server => vec![Scenario::Server],
            ScenarioArg::All => vec![Scenario::All],
            ScenarioArg::Soak => vec![Scenario::Soak],
            ScenarioArg::Every => Scenario::EVERY.to_vec(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Dropping `run` on a signal drops the cluster, whose children are killed on drop.
    let outcome = tokio::select! {
        outcome = run(args) => outcome,
        () = interrupted() => {
            eprintln!("apiary-chaos: interrupted; every process it started is being killed");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("apiary-chaos: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs every scenario asked for; returns whether all met their targets.
async fn run(args: Args) -> anyhow::Result<bool> {
    // Each scenario once, in the order asked for.
    let mut scenarios: Vec<Scenario> = Vec::new();
    for scenario in args.scenario.iter().flat_map(|s| s.scenarios()) {
        if !scenarios.contains(&scenario) {
            scenarios.push(scenario);
        }
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => cluster::default_bin_dir()?,
    };
    for binary in ["apiary-agent", "apiary-scheduler"] {
        anyhow::ensure!(
            bin_dir.join(binary).is_file(),
            "{binary} not found in {}; build it (scripts/chaos does) or pass --bin-dir",
            bin_dir.display()
        );
    }
    let module = module::load(args.task_time, args.wasm_dir.as_deref())?;
    let nats_server = cluster::nats_server_binary()?;
    let run_dir = tempfile::Builder::new()
        .prefix("apiary-chaos-")
        .tempdir()
        .context("failed to create the run directory")?;

    let mut reports = Vec::new();
    let mut errors = 0;
    for scenario in scenarios {
        let config = ClusterConfig {
            nats_server: nats_server.clone(),
            bin_dir: bin_dir.clone(),
            schedulers: args.schedulers,
            agents: args.agents,
            slots: args.slots,
            heartbeat: args.heartbeat,
            log: args.log.clone(),
            dir: run_dir.path().join(scenario.name()),
        };
        eprintln!(
            "apiary-chaos: [{}] {}s of chaos at {}/s, then up to {}s of drain",
            scenario.name(),
            args.duration.as_secs_f64(),
            args.rate,
            args.drain.as_secs_f64()
        );
        match run_scenario(scenario, config, &args, &module).await {
            Ok(report) => {
                eprintln!("{}", report.summary());
                reports.push(report);
            }
            Err(err) => {
                errors += 1;
                eprintln!("apiary-chaos: [{}] error: {err:#}", scenario.name());
            }
        }
    }

    println!("{}", report::table(&reports, args.heartbeat));
    if let Some(path) = &args.json {
        let json = report::json(&reports, &args_json(&args), args.heartbeat);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    let passed = errors == 0 && reports.iter().all(|r| r.figures.passed());
    if args.keep || !passed {
        let dir = run_dir.keep();
        eprintln!(
            "apiary-chaos: logs, event logs and stores kept in {}",
            dir.display()
        );
    } else {
        eprintln!(
            "apiary-chaos: run directory {} removed (--keep keeps it)",
            run_dir.path().display()
        );
    }
    Ok(passed)
}

fn args_json(args: &Args) -> serde_json::Value {
    serde_json::json!({
        "duration_s": args.duration.as_secs_f64(),
        "drain_s": args.drain.as_secs_f64(),
        "rate_per_s": args.rate,
        "schedulers": args.schedulers,
        "agents": args.agents,
        "slots": args.slots,
        "heartbeat_ms": args.heartbeat.as_millis(),
        "task_time_ms": args.task_time.as_millis(),
    })
}

/// One scenario on a fresh cluster: chaos under load, drain, then the ledger's figures.
async fn run_scenario(
    scenario: Scenario,
    config: ClusterConfig,
    args: &Args,
    module: &[u8],
) -> anyhow::Result<ScenarioReport> {
    let mut cluster = Cluster::start(config).await?;
    let url = cluster.url().to_owned();
    let ledger = Arc::new(Ledger::default());

    // The wire counter listens before the first submit, so it sees every delivery.
    let wire = async_nats::connect(url.as_str())
        .await
        .context("failed to connect the wire counter")?;
    let subscription = wire
        .subscribe(format!("{INBOX_PREFIX}.>"))
        .await
        .context("failed to subscribe to the client's inboxes")?;
    apiary_sdk::round_trip(&wire)
        .await
        .context("failed to make sure the server has the wire counter's subscription")?;
    let counter = tokio::spawn(ledger::watch_wire(subscription, ledger.clone()));

    let nats = async_nats::ConnectOptions::new()
        .name("apiary-chaos")
        .custom_inbox_prefix(INBOX_PREFIX)
        .connect(url.as_str())
        .await
        .context("failed to connect the load generator")?;
    // The drain's checks and the read of the results stream go through a connection of
    // their own: their replies must not land under the load generator's inbox prefix,
    // where the wire counter would take stored results for deliveries.
    let js = jetstream::new(
        async_nats::connect(url.as_str())
            .await
            .context("failed to connect the inspector")?,
    );
    let client = apiary_sdk::Client::from_nats(nats)
        .await
        .context("failed to create the SDK client")?;
    let module_ref = client
        .upload_module(module)
        .await
        .context("failed to upload the task module")?;
    // One task end to end before the clock starts: the path works and the agents have the
    // module, so the figures measure chaos, not a cold start.
    client
        .submit(apiary_sdk::Task::stored(module_ref.clone()).input("warm-up"))
        .await
        .context("failed to submit the warm-up task")?
        .result_within(Duration::from_secs(60))
        .await
        .context("the warm-up task failed")?;

    let load = Load {
        client: client.clone(),
        module: module_ref,
        ledger: ledger.clone(),
        give_up: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let mut chaos = Chaos::default();
    cluster.event(&format!("chaos begins: {}", scenario.name()));
    let until = Instant::now() + args.duration;
    let sampler = (scenario == Scenario::Soak).then(|| soak::sample(cluster.pids(), until));
    let (_, driven) = tokio::join!(
        load.run(args.rate, until),
        chaos.drive(&mut cluster, scenario.plan(), until, std::future::pending())
    );
    driven?;
    if let Some(sampler) = sampler {
        let samples = sampler.await.context("the memory sampler panicked")?;
        println!("{}", soak::report(&samples));
    }

    cluster.event("drain begins");
    let drain_started = Instant::now();
    let mut pending = Pending::default();
    // The drain ends early once every handle has ended and the streams hold no work; the
    // last look at the streams is kept, so a drain that runs out says what was left.
    let quiet = async {
        loop {
            match outstanding(&js).await {
                Ok(now) => {
                    let empty = now.is_empty();
                    pending = now;
                    if empty && ledger.is_settled() {
                        return;
                    }
                }
                Err(err) => pending.error = Some(format!("{err:#}")),
            }
            // Outstanding work is a state of the streams; look again shortly.
            tokio::time::sleep(QUIET_POLL).await;
        }
    };
    chaos
        .drive(
            &mut cluster,
            Plan::default(),
            drain_started + args.drain,
            quiet,
        )
        .await?;
    let drained_in = drain_started.elapsed();
    cluster.event("drain ends");

    load.give_up.cancel();
    load.tasks.close();
    load.tasks.wait().await;
    counter.abort();
    let stored = read_stored(&js).await?;
    let mut figures = ledger.figures(&stored);
    // `duplicate_results` arrived with GitHub issue 5; the figures keep an Option so that a
    // client without such a count can report "n/a" and fall back to the wire's count.
    figures.sdk_duplicates = Some(client.duplicate_results());
    Ok(ScenarioReport {
        scenario: scenario.name(),
        figures,
        kills: cluster.kills,
        unexpected_exits: cluster.unexpected_exits.clone(),
        drained_in,
        settled: ledger.is_settled(),
        pending,
        dir: cluster.config().dir.clone(),
    })
}

/// Work the cluster still holds: submissions not yet placed, dispatches not yet finished,
/// results not yet delivered. A task whose result already reached the SDK can still be run
/// again from here, so the drain waits for all of it.
async fn outstanding(js: &jetstream::Context) -> anyhow::Result<Pending> {
    let messages = |name: &'static str| async move {
        let mut stream = js
            .get_stream(name)
            .await
            .with_context(|| format!("failed to open {name}"))?;
        let info = stream
            .info()
            .await
            .with_context(|| format!("failed to read {name}'s info"))?;
        anyhow::Ok(info.state.messages)
    };
    let results = js
        .get_stream(topology::RESULTS_STREAM)
        .await
        .context("failed to open the results stream")?
        .consumer_info(topology::SCHEDULER_RESULTS_CONSUMER)
        .await
        .context("failed to read the result consumer's info")?;
    Ok(Pending {
        submissions: messages(topology::TASKS_STREAM).await?,
        dispatches: messages(topology::DISPATCH_STREAM).await?,
        results: results.num_pending + results.num_ack_pending as u64,
        error: None,
    })
}

/// Reads the results stream, waiting for the server first: the last scenario step may have
/// restarted it moments ago.
async fn read_stored(js: &jetstream::Context) -> anyhow::Result<Stored> {
    let mut last_error = None;
    for _ in 0..10 {
        match Stored::read(js).await {
            Ok(stored) => return Ok(stored),
            Err(err) => last_error = Some(err),
        }
        // JetStream recovers its streams after a restart; try again shortly.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("failed to read the results stream")))
}
