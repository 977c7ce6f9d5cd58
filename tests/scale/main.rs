//! `apiary-scale`: one scheduler against a large simulated fleet (`scripts/scale`, issue 10).
//!
//! For each fleet size it starts a fresh nats-server and one `apiary-scheduler` process,
//! mints a join token, and starts a few worker processes of itself (`apiary-scale fleet`),
//! each simulating a share of the nodes ([`fleet`]). It measures the registration rate, the
//! heartbeat round trip under the steady load, the scheduler's and the server's memory
//! (sampled every second from `/proc`), nodes shown offline that are not, and how long
//! `nodes ls` takes (every page, through the SDK). It prints one table; the figures belong in
//! docs/BENCHMARKS.md. Nothing is asserted: this is a measurement, not a test.

mod fleet;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use apiary_proto::message::{NodeStatus, Percentiles};
use apiary_proto::topology;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

use crate::fleet::{FleetPlan, FleetReport};

#[derive(Debug, Parser)]
#[command(name = "apiary-scale")]
struct Args {
    #[command(subcommand)]
    command: Option<Mode>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// One worker: simulates nodes `scale-<first>` … and prints its report as JSON.
    #[command(hide = true)]
    Fleet(FleetArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Fleet sizes to measure, each on a fresh server and scheduler.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,20000")]
    nodes: Vec<usize>,
    /// Worker processes the fleet is spread over.
    #[arg(long, default_value_t = 4)]
    processes: usize,
    /// NATS connections per worker process.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Registrations in flight, over all workers.
    #[arg(long, default_value_t = 200)]
    in_flight: usize,
    /// The heartbeat interval the scheduler tells its nodes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    interval: Duration,
    /// How long the whole fleet heartbeats once it has registered.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    steady: Duration,
    /// Where apiary-scheduler is; default: this binary's directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct FleetArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    token: String,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    in_flight: usize,
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Duration,
    #[arg(long, value_parser = humantime::parse_duration)]
    steady: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Mode::Fleet(fleet)) => {
            let report = fleet::run(FleetPlan {
                url: fleet.url,
                token: fleet.token,
                first: fleet.first,
                count: fleet.count,
                connections: fleet.connections,
                in_flight: fleet.in_flight,
                interval: fleet.interval,
                steady: fleet.steady,
            })
            .await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        None => run(args.run).await,
    }
}

/// One fleet size's figures.
struct Row {
    nodes: usize,
    registrations_per_s: f64,
    registration_retries: u64,
    register: Option<Percentiles>,
    heartbeat: Option<Percentiles>,
    heartbeats: u64,
    heartbeats_failed: u64,
    reregistrations: u64,
    scheduler_rss_end: u64,
    scheduler_rss_peak: u64,
    server_rss_end: u64,
    false_offline: usize,
    list_ms: Vec<u64>,
    listed: usize,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("failed to find this binary's directory")?
            .to_path_buf(),
    };
    let mut rows = Vec::new();
    for &nodes in &args.nodes {
        eprintln!("apiary-scale: {nodes} nodes");
        rows.push(measure(&args, &bin_dir, nodes).await?);
    }
    print_table(&args, &rows);
    Ok(())
}

async fn measure(args: &RunArgs, bin_dir: &Path, nodes: usize) -> anyhow::Result<Row> {
    let server = apiary_broker::NatsServer::start(apiary_broker::BrokerOptions::default())
        .await
        .context("failed to start nats-server")?;
    let url = server.url().to_owned();
    let logs = tempfile::Builder::new().prefix("apiary-scale-").tempdir()?;
    let scheduler_log = std::fs::File::create(logs.path().join("scheduler.log"))?;
    let mut scheduler = Command::new(bin_dir.join("apiary-scheduler"))
        .env("APIARY_NATS_URL", &url)
        .env(
            "APIARY_HEARTBEAT_INTERVAL",
            humantime::format_duration(args.interval).to_string(),
        )
        .env("APIARY_LOG", "warn")
        .stdout(Stdio::from(scheduler_log.try_clone()?))
        .stderr(Stdio::from(scheduler_log))
        .kill_on_drop(true)
        .spawn()
        .context("failed to start apiary-scheduler")?;
    let scheduler_pid = scheduler.id().context("the scheduler exited at once")?;
    let client = apiary_sdk::Client::connect(&url)
        .await
        .context("failed to connect the SDK client")?;
    wait_for_scheduler(&client).await?;
    let token = mint_token(&url).await?;

    let sampling = Arc::new(AtomicBool::new(true));
    let scheduler_peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let sampling = sampling.clone();
        let peak = scheduler_peak.clone();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(scheduler_pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let processes = args.processes.max(1);
    let mut workers = Vec::new();
    for worker in 0..processes {
        let first = nodes * worker / processes;
        let count = nodes * (worker + 1) / processes - first;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("fleet")
            .args(["--url", &url, "--token", &token])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--connections", &args.connections.to_string()])
            .args([
                "--in-flight",
                &(args.in_flight / processes).max(1).to_string(),
            ])
            .args([
                "--interval",
                &humantime::format_duration(args.interval).to_string(),
            ])
            .args([
                "--steady",
                &humantime::format_duration(args.steady).to_string(),
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start a fleet worker")?;
        let stdout = BufReader::new(child.stdout.take().context("a worker's stdout")?);
        workers.push((child, stdout.lines()));
    }
    // Every worker says `registered` once its nodes are in; then comes its report.
    for (_, lines) in &mut workers {
        let line = lines.next_line().await?.context("a worker ended early")?;
        if line != "registered" {
            bail!("a worker said {line:?} instead of `registered`");
        }
    }
    eprintln!(
        "apiary-scale: {nodes} nodes registered; heartbeating for {:?}",
        args.steady
    );

    // Through the steady period, the node list every few intervals: how long all its pages
    // take, and how many of the fleet (all heartbeating) it shows as anything but online.
    let steady_until = Instant::now() + args.steady;
    let mut false_offline = 0;
    let mut list_ms = Vec::new();
    let mut listed = 0;
    let mut next_look = Instant::now() + args.interval * 2;
    while next_look + args.interval < steady_until {
        tokio::time::sleep_until(next_look).await;
        next_look += args.interval * 2;
        let started = Instant::now();
        let table = client.nodes().await.context("failed to list the nodes")?;
        list_ms.push(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        listed = table.len();
        let not_online = table
            .iter()
            .filter(|node| node.status != NodeStatus::Online)
            .count()
            + nodes.saturating_sub(table.len());
        false_offline = false_offline.max(not_online);
    }
    let scheduler_rss_end = rss_bytes(scheduler_pid);
    let server_rss_end = rss_bytes(server.pid());

    let mut reports = Vec::new();
    for (mut child, mut lines) in workers {
        let line = lines
            .next_line()
            .await?
            .context("a worker ended without its report")?;
        reports.push(serde_json::from_str::<FleetReport>(&line)?);
        child.wait().await?;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    scheduler.kill().await.ok();

    let from = reports
        .iter()
        .map(|r| r.registering_from_ms)
        .min()
        .unwrap_or(0);
    let until = reports
        .iter()
        .map(|r| r.registering_until_ms)
        .max()
        .unwrap_or(0);
    let seconds = (until.saturating_sub(from) as f64 / 1000.0).max(0.001);
    let sum = |field: fn(&FleetReport) -> u64| reports.iter().map(field).sum::<u64>();
    Ok(Row {
        nodes,
        registrations_per_s: nodes as f64 / seconds,
        registration_retries: sum(|r| r.registration_retries),
        register: Percentiles::of(reports.iter().flat_map(|r| r.register_us.iter().copied())),
        heartbeat: Percentiles::of(reports.iter().flat_map(|r| r.heartbeat_us.iter().copied())),
        heartbeats: sum(|r| r.heartbeats),
        heartbeats_failed: sum(|r| r.heartbeats_failed),
        reregistrations: sum(|r| r.reregistrations),
        scheduler_rss_end,
        scheduler_rss_peak: scheduler_peak.load(Ordering::Relaxed),
        server_rss_end,
        false_offline,
        list_ms,
        listed,
    })
}

/// Waits until the scheduler answers the NATS micro protocol's PING.
async fn wait_for_scheduler(client: &apiary_sdk::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let subject = format!("$SRV.PING.{}", apiary_scheduler::SERVICE_NAME);
    while Instant::now() < deadline {
        let asked = tokio::time::timeout(
            Duration::from_secs(1),
            client.nats().request(subject.clone(), Default::default()),
        )
        .await;
        if matches!(asked, Ok(Ok(_))) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the scheduler did not answer within 30 s")
}

/// A join token with unlimited uses, made as `apiary tokens create` makes one.
async fn mint_token(url: &str) -> anyhow::Result<String> {
    let client = async_nats::connect(url).await?;
    let topology = topology::ensure(&async_nats::jetstream::new(client)).await?;
    let request = apiary_proto::admin::TokenCreateRequest {
        description: "apiary-scale".to_owned(),
        ttl_ms: None,
        max_uses: None,
    };
    let created =
        apiary_scheduler::tokens::create(&topology.cluster, &request, apiary_proto::now_ms())
            .await
            .map_err(|err| anyhow::anyhow!("failed to create a join token: {err}"))?;
    Ok(created.token)
}

/// The resident set of process `pid`, from `/proc/<pid>/status`; 0 if it cannot be read.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn print_table(args: &RunArgs, rows: &[Row]) {
    println!(
        "one scheduler, nats-server, {} worker processes × {} connections, heartbeat every {:?}, {:?} steady",
        args.processes, args.connections, args.interval, args.steady
    );
    println!(
        "| nodes | registrations/s ({} in flight) | register p50 / p99 | heartbeat p50 / p99 / max | heartbeats (failed, re-registered) | scheduler RSS end (peak) | nats-server RSS | false offline | nodes ls (listed) |",
        args.in_flight
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let ms = |p: &Option<Percentiles>, f: fn(&Percentiles) -> u64| {
        p.as_ref()
            .map_or("–".to_owned(), |p| format!("{:.1}", f(p) as f64 / 1000.0))
    };
    for row in rows {
        let lists = row
            .list_ms
            .iter()
            .map(|ms| format!("{ms}"))
            .collect::<Vec<_>>()
            .join("/");
        println!(
            "| {} | {:.0} ({} retried) | {} / {} ms | {} / {} / {} ms | {} ({}, {}) | {:.1} MiB ({:.1}) | {:.1} MiB | {} | {lists} ms ({}) |",
            row.nodes,
            row.registrations_per_s,
            row.registration_retries,
            ms(&row.register, |p| p.p50_us),
            ms(&row.register, |p| p.p99_us),
            ms(&row.heartbeat, |p| p.p50_us),
            ms(&row.heartbeat, |p| p.p99_us),
            ms(&row.heartbeat, |p| p.max_us),
            row.heartbeats,
            row.heartbeats_failed,
            row.reregistrations,
            mib(row.scheduler_rss_end),
            mib(row.scheduler_rss_peak),
            mib(row.server_rss_end),
            row.false_offline,
            row.listed,
        );
    }
}
