//! `apiary bench`: how fast the task path is, next to raw NATS measured in the same run on the
//! same server.
//!
//! Raw baselines: a core request/reply round trip, a JetStream publish acknowledged by a file
//! stream (sequential, for latency; pipelined, for throughput). apiary: a task's round trip
//! from `submit` to result (sequential), and task throughput with many tasks in flight. A task
//! crosses the bus several times (submit, dispatch, result, delivery), so its round trip is a
//! multiple of the raw figures; the ratio is what to watch. `apiary bench kv` and `apiary
//! bench pubsub` ([`crate::bench_app`]) put the app store and messaging beside raw KV and
//! core NATS the same way.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use apiary_sdk::{Client, Task};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Sequential round trips for each latency figure.
    pub latency_samples: usize,
    /// Messages or tasks for each throughput figure.
    pub throughput_count: usize,
    /// Tasks (or raw publishes) in flight at once for throughput.
    pub in_flight: usize,
    /// The guest module every task runs.
    pub module: Bytes,
}

/// A WASI command that copies up to 1 KiB of stdin to stdout: the cheapest real task, so the
/// figures measure the path and not the work.
pub const ECHO_MODULE_WAT: &str = r#"
    (module
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const 1024))
        (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (i32.store (i32.const 4) (i32.load (i32.const 8)))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

/// One line of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    pub name: String,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub per_second: Option<f64>,
}

use apiary_proto::subject;
use apiary_proto::topology::BENCH_STREAM as RAW_STREAM;
/// The message size of the raw baselines, the size the project's reference figures use.
const RAW_MESSAGE: &[u8] = &[b'x'; 128];

/// Runs every benchmark against the server at `url`, which must have an apiary scheduler and
/// at least one agent. Returns the figures in the order they were taken.
pub async fn run(url: &str, options: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let nats = connect(url).await?;
    let mut figures = vec![
        raw_request_reply(&nats, options.latency_samples).await?,
        raw_publish_latency(&nats, options.latency_samples).await?,
        raw_publish_throughput(&nats, options.throughput_count, options.in_flight).await?,
    ];
    let (client, module) = warmed_client(url, options).await?;
    figures.push(task_latency(&client, &module, options.latency_samples).await?);
    figures.extend(agent_overhead(&client).await?);
    figures.extend(crate::bench_hops::hops(url, &client, &module, options.latency_samples).await?);
    figures.push(cold_task_latency(&client, &options.module).await?);
    figures.push(status_latency(&client, &module, options.latency_samples).await?);
    figures.push(status_throughput(&client, &module, options).await?);
    let most = tasks_in_flight(&client, &module, options).await?;
    let half = most.per_second.unwrap_or(0.0) / 2.0;
    figures.push(most);
    if half >= 1.0 {
        figures.push(task_latency_at_rate(&client, &module, half, options.latency_samples).await?);
    }
    figures.push(map_throughput(&client, &module, options).await?);
    figures.extend(
        crate::bench_module::module_figures(options.module.clone(), options.latency_samples)
            .await?,
    );
    figures.extend(crate::bench_placement::placement_figures(
        options.latency_samples,
    )?);
    Ok(figures)
}

/// An SDK client, with the benchmark's module uploaded and run a few times, so that every
/// agent's compiled-module cache is warm and the figures are of the task path and not of the
/// first compilation.
async fn warmed_client(
    url: &str,
    options: &BenchOptions,
) -> anyhow::Result<(Client, apiary_proto::message::ModuleRef)> {
    let client = Client::connect(url).await?;
    let module = client.upload_module(&options.module).await?;
    let warm_ups = (0..16).map(|_| Task::stored(module.clone()).input("warm up"));
    let mut warming = client.submit_batch(warm_ups, 16);
    while let Some(item) = warming.next().await {
        item.outcome?;
    }
    drop(warming);
    Ok((client, module))
}

/// Task throughput on a stack with `agents` agents: the row `apiary bench --local --agents`
/// prints for each size after the first.
pub async fn agents_throughput(
    url: &str,
    options: &BenchOptions,
    agents: usize,
) -> anyhow::Result<Figure> {
    let (client, module) = warmed_client(url, options).await?;
    let mut figure = tasks_in_flight(&client, &module, options).await?;
    figure.name = format!("{}, {agents} agents", figure.name);
    Ok(figure)
}

/// The figures that depend on the server's disk writes, on a server that syncs every
/// JetStream write to disk before acknowledging it (`sync_interval: always`): what
/// durability against power loss costs (Jepsen's 2025 analysis lost acknowledged writes
/// under the default, which syncs every two minutes).
pub async fn durability(url: &str, options: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let nats = connect(url).await?;
    let mut figures = vec![
        raw_publish_latency(&nats, options.latency_samples).await?,
        raw_publish_throughput(&nats, options.throughput_count, options.in_flight).await?,
    ];
    let (client, module) = warmed_client(url, options).await?;
    figures.push(task_latency(&client, &module, options.latency_samples).await?);
    figures.push(tasks_in_flight(&client, &module, options).await?);
    for figure in &mut figures {
        figure.name = format!("{} [sync always]", figure.name);
    }
    Ok(figures)
}

/// A plain connection to the server at `url`.
pub(crate) async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::connect(url)
        .await
        .with_context(|| format!("failed to connect to {url}"))
}

/// Task throughput with the options' count and tasks in flight.
async fn tasks_in_flight(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    options: &BenchOptions,
) -> anyhow::Result<Figure> {
    task_throughput(client, module, options.throughput_count, options.in_flight).await
}

async fn raw_request_reply(nats: &async_nats::Client, samples: usize) -> anyhow::Result<Figure> {
    let mut echo = nats.subscribe(subject::bench_echo()).await?;
    let responder_client = nats.clone();
    let responder = tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder_client.publish(reply, message.payload).await;
            }
        }
    });
    nats.flush().await?;
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        nats.request(subject::bench_echo(), Bytes::from_static(RAW_MESSAGE))
            .await
            .context("raw request failed")?;
        timings.push(started.elapsed());
    }
    responder.abort();
    Ok(latency("raw NATS request/reply", timings))
}

async fn raw_stream(nats: &async_nats::Client) -> anyhow::Result<jetstream::Context> {
    let js = jetstream::new(nats.clone());
    let _ = js.delete_stream(RAW_STREAM).await;
    js.create_stream(jetstream::stream::Config {
        name: RAW_STREAM.into(),
        subjects: vec![subject::bench_raw().into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("failed to create the raw benchmark stream")?;
    Ok(js)
}

async fn raw_publish_latency(nats: &async_nats::Client, samples: usize) -> anyhow::Result<Figure> {
    let js = raw_stream(nats).await?;
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        js.publish(subject::bench_raw(), Bytes::from_static(RAW_MESSAGE))
            .await?
            .await?;
        timings.push(started.elapsed());
    }
    js.delete_stream(RAW_STREAM).await.ok();
    Ok(latency("raw JetStream publish + ack", timings))
}

async fn raw_publish_throughput(
    nats: &async_nats::Client,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<Figure> {
    let js = raw_stream(nats).await?;
    let started = Instant::now();
    let mut acks = futures::stream::iter(0..count)
        .map(|_| {
            let js = js.clone();
            async move {
                js.publish(subject::bench_raw(), Bytes::from_static(RAW_MESSAGE))
                    .await?
                    .await
            }
        })
        .buffer_unordered(in_flight.max(1));
    while let Some(ack) = acks.next().await {
        ack?;
    }
    let elapsed = started.elapsed();
    js.delete_stream(RAW_STREAM).await.ok();
    Ok(throughput(
        &format!("raw JetStream publish, {in_flight} in flight"),
        count,
        elapsed,
    ))
}

async fn task_latency(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    samples: usize,
) -> anyhow::Result<Figure> {
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        client
            .submit(Task::stored(module.clone()).input("bench"))
            .await?
            .result_within(Duration::from_secs(60))
            .await?;
        timings.push(started.elapsed());
    }
    Ok(latency("apiary task: submit → result", timings))
}

/// New modules measured for the cold row: each is fetched and compiled once.
const COLD_SAMPLES: usize = 20;

/// The first run of a module no node has seen: its fetch from the module store and its
/// compile on the node, then the run. Each sample is the benchmark module made new by a
/// custom section holding a counter (stored beforehand, as a client that uploads once
/// does), so its digest is one no agent has cached.
async fn cold_task_latency(client: &Client, module: &[u8]) -> anyhow::Result<Figure> {
    let nonce = apiary_proto::now_ms();
    let mut timings = Vec::with_capacity(COLD_SAMPLES);
    for sample in 0..COLD_SAMPLES {
        let fresh = with_custom_section(module, format!("{nonce}-{sample}").as_bytes());
        let stored = client.upload_module(&fresh).await?;
        let started = Instant::now();
        client
            .submit(Task::stored(stored).input("bench"))
            .await?
            .result_within(Duration::from_secs(60))
            .await?;
        timings.push(started.elapsed());
    }
    Ok(latency(
        "apiary task: first run of a new module (fetch + compile)",
        timings,
    ))
}

/// `module` with a custom section `apiary-bench` holding `payload` appended: the same code
/// under another digest.
fn with_custom_section(module: &[u8], payload: &[u8]) -> Vec<u8> {
    const NAME: &[u8] = b"apiary-bench";
    let mut content = leb128(NAME.len());
    content.extend_from_slice(NAME);
    content.extend_from_slice(payload);
    let mut out = module.to_vec();
    out.push(0); // the custom section's id
    out.extend(leb128(content.len()));
    out.extend(content);
    out
}

fn leb128(mut value: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(byte);
            return bytes;
        }
        bytes.push(byte | 0x80);
    }
}

/// Runs one task to its end and returns its id, for the status figures.
async fn ended_task(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
) -> anyhow::Result<apiary_sdk::TaskId> {
    let handle = client
        .submit(Task::stored(module.clone()).input("bench"))
        .await?;
    let id = handle.id().clone();
    handle.result_within(Duration::from_secs(60)).await?;
    Ok(id)
}

/// A task's record by id once it has ended: the lookup reads the live bucket, misses, and
/// scans the task's archive shard.
async fn status_latency(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    samples: usize,
) -> anyhow::Result<Figure> {
    let id = ended_task(client, module).await?;
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        client.task_status(&id).await?;
        timings.push(started.elapsed());
    }
    Ok(latency("apiary task status by id (ended)", timings))
}

/// Status queries by id of an ended task, `in_flight` at once: the rate one replica answers
/// them at, and each one's round trip under that load.
async fn status_throughput(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    options: &BenchOptions,
) -> anyhow::Result<Figure> {
    let id = ended_task(client, module).await?;
    let started = Instant::now();
    let mut asked = futures::stream::iter(0..options.throughput_count)
        .map(|_| async {
            let sent = Instant::now();
            client.task_status(&id).await.map(|_| sent.elapsed())
        })
        .buffer_unordered(options.in_flight.max(1));
    let mut timings = Vec::with_capacity(options.throughput_count);
    while let Some(took) = asked.next().await {
        timings.push(took?);
    }
    let elapsed = started.elapsed();
    let name = format!("apiary task status by id, {} in flight", options.in_flight);
    let rate = throughput(&name, timings.len(), elapsed);
    Ok(Figure {
        per_second: rate.per_second,
        ..latency(&name, timings)
    })
}

/// Round trips of tasks submitted at a steady `rate` (open loop: each is submitted on time,
/// whether or not the earlier ones have ended), half of the most the cluster did.
async fn task_latency_at_rate(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    rate: f64,
    samples: usize,
) -> anyhow::Result<Figure> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..samples {
        ticker.tick().await;
        let client = client.clone();
        let task = Task::stored(module.clone()).input("bench");
        running.spawn(async move {
            let started = Instant::now();
            client
                .submit(task)
                .await?
                .result_within(Duration::from_secs(120))
                .await?;
            anyhow::Ok(started.elapsed())
        });
    }
    let mut timings = Vec::with_capacity(samples);
    while let Some(took) = running.join_next().await {
        timings.push(took??);
    }
    Ok(latency(
        &format!("apiary task: submit → result at {rate:.0}/s (half the most)"),
        timings,
    ))
}

/// One module over many inputs, submitted together through the SDK's batch API
/// (`Client::submit_batch`), as `apiary map` does: items per second.
async fn map_throughput(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    options: &BenchOptions,
) -> anyhow::Result<Figure> {
    let count = options.throughput_count;
    let tasks = (0..count).map(|item| Task::stored(module.clone()).input(item.to_string()));
    let started = Instant::now();
    let mut items = client.submit_batch(tasks, options.in_flight.max(1));
    let mut done = 0;
    while let Some(item) = items.next().await {
        item.outcome?;
        done += 1;
    }
    Ok(throughput(
        &format!("apiary map: {count} items through submit_batch, items/s"),
        done,
        started.elapsed(),
    ))
}

async fn task_throughput(
    client: &Client,
    module: &apiary_proto::message::ModuleRef,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<Figure> {
    let started = Instant::now();
    let mut results = futures::stream::iter(0..count)
        .map(|_| async {
            client
                .submit(Task::stored(module.clone()).input("bench"))
                .await?
                .result_within(Duration::from_secs(120))
                .await
        })
        .buffer_unordered(in_flight.max(1));
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(throughput(
        &format!("apiary tasks, {in_flight} in flight"),
        count,
        started.elapsed(),
    ))
}

/// The node's own part of the round trips just measured, as its agent reports it: from a
/// dispatch's arrival to its result being ready (`AgentStatus::dispatch_to_result`), from
/// the agent that ran the most of them.
async fn agent_overhead(client: &Client) -> anyhow::Result<Option<Figure>> {
    let mut busiest: Option<apiary_proto::message::Percentiles> = None;
    for node in client.nodes().await.context("failed to list the nodes")? {
        let Ok(status) = client.agent_status(&node.info.node_id).await else {
            continue;
        };
        if let Some(timings) = status.dispatch_to_result
            && busiest
                .as_ref()
                .is_none_or(|busiest| timings.samples > busiest.samples)
        {
            busiest = Some(timings);
        }
    }
    Ok(busiest.map(|timings| Figure {
        name: "agent: dispatch received → result ready".into(),
        p50_us: Some(timings.p50_us as f64),
        p99_us: Some(timings.p99_us as f64),
        per_second: None,
    }))
}

pub(crate) fn latency(name: &str, mut timings: Vec<Duration>) -> Figure {
    timings.sort_unstable();
    let percentile = |p: f64| -> Option<f64> {
        let last = timings.len().checked_sub(1)?;
        let index = ((last as f64) * p).round() as usize;
        Some(timings[index.min(last)].as_secs_f64() * 1e6)
    };
    Figure {
        name: name.to_owned(),
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
        per_second: None,
    }
}

pub(crate) fn throughput(name: &str, count: usize, elapsed: Duration) -> Figure {
    Figure {
        name: name.to_owned(),
        p50_us: None,
        p99_us: None,
        per_second: Some(count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)),
    }
}

/// The report: one row per figure, and the task figures as multiples of the raw ones.
pub fn report(figures: &[Figure]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(vec!["BENCHMARK", "P50", "P99", "RATE"]);
    for figure in figures {
        table.add_row(vec![
            figure.name.clone(),
            figure.p50_us.map_or_else(|| "-".into(), format_us),
            figure.p99_us.map_or_else(|| "-".into(), format_us),
            figure
                .per_second
                .map_or_else(|| "-".into(), |rate| format!("{rate:.0}/s")),
        ]);
    }
    let mut out = table.to_string();
    let find = |prefix: &str| figures.iter().find(|f| f.name.starts_with(prefix));
    let task_p50 = find("apiary task:").and_then(|f| f.p50_us);
    let raw_p50 = find("raw JetStream publish +").and_then(|f| f.p50_us);
    if let (Some(task), Some(raw)) = (task_p50, raw_p50) {
        out += &format!(
            "\n\ntask round trip p50 = {:.1} × a raw JetStream publish-ack",
            task / raw
        );
    }
    let task_rate = find("apiary tasks,").and_then(|f| f.per_second);
    let raw_rate = find("raw JetStream publish,").and_then(|f| f.per_second);
    if let (Some(task), Some(raw)) = (task_rate, raw_rate) {
        out += &format!(
            "\ntask throughput = {:.1}% of raw JetStream publish throughput",
            100.0 * task / raw
        );
    }
    // The app store and messaging rows come in pairs, `raw X` beside `apiary X`.
    for figure in figures {
        let Some(what) = figure.name.strip_prefix("apiary ") else {
            continue;
        };
        let Some(raw) = figures.iter().find(|f| f.name == format!("raw {what}")) else {
            continue;
        };
        if let (Some(apiary), Some(raw)) = (figure.p50_us, raw.p50_us) {
            out += &format!("\n{what}: p50 = {:.2} × raw", apiary / raw);
        }
        if let (Some(apiary), Some(raw)) = (figure.per_second, raw.per_second) {
            out += &format!("\n{what}: rate = {:.2} × raw", apiary / raw);
        }
    }
    out
}

fn format_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us < 10.0 {
        // Sandbox and placement rows take a few microseconds or less.
        format!("{us:.1} µs")
    } else {
        format!("{us:.0} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_section_makes_a_new_digest_of_the_same_valid_module() {
        let module = wat::parse_str(ECHO_MODULE_WAT).expect("the bench module");
        let fresh = with_custom_section(&module, &[7u8; 200]);
        assert_ne!(
            apiary_proto::message::ModuleRef::for_bytes(&module).sha256,
            apiary_proto::message::ModuleRef::for_bytes(&fresh).sha256
        );
        let sandbox = apiary_agent::sandbox::Sandbox::new().expect("sandbox");
        sandbox.compile(&fresh).expect("still a valid module");
        assert_eq!(leb128(300), [0xac, 0x02]);
    }

    #[test]
    fn percentiles_come_from_sorted_samples() {
        let figure = latency("x", (1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(figure.p50_us, Some(51.0));
        assert_eq!(figure.p99_us, Some(99.0));
        assert_eq!(latency("empty", Vec::new()).p50_us, None);
    }

    #[test]
    fn the_report_relates_tasks_to_raw_figures() {
        let figures = vec![
            Figure {
                name: "raw JetStream publish + ack".into(),
                p50_us: Some(100.0),
                p99_us: Some(200.0),
                per_second: None,
            },
            Figure {
                name: "apiary task: submit → result".into(),
                p50_us: Some(1000.0),
                p99_us: Some(3000.0),
                per_second: None,
            },
        ];
        let report = report(&figures);
        assert!(
            report.contains("10.0 × a raw JetStream publish-ack"),
            "{report}"
        );
        assert!(report.contains("1.00 ms"), "{report}");
    }
}
