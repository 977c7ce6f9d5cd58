//! `apiary bench kv` and `apiary bench pubsub`: the app store and app messaging, next to raw
//! async-nats KV and core publish/subscribe on the same server in the same run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use apiary_sdk::Client;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt as _;

use crate::bench::{BenchOptions, Figure, latency, throughput};

/// The value size of every KV and messaging figure.
const VALUE: &[u8] = &[b'v'; 128];
/// The prefix of the raw KV baseline's bucket and of the namespaces the apiary figures use:
/// each run makes its own (with a fresh suffix) and removes them after it, so that a run
/// against a real cluster never touches anyone's data.
const RUN_PREFIX: &str = "apiary-bench-";
/// How many subscribers the fan-out figures feed.
const FAN_OUT: usize = 4;

/// Put and get latency and throughput, raw KV beside the app store.
pub async fn kv(url: &str, options: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let client = Client::connect(url).await.context("failed to connect")?;
    let js = jetstream::new(client.nats().clone());
    let run = format!("{RUN_PREFIX}{}", apiary_sdk::TaskId::generate());
    let namespace: apiary_proto::Namespace = run.parse().context("a run's namespace")?;
    let raw_bucket = format!("{run}-raw");
    let measured = measure_kv(&client, &js, &raw_bucket, &namespace, options).await;
    // Removed however the run went.
    let _ = js.delete_key_value(&raw_bucket).await;
    let _ = js
        .delete_key_value(apiary_proto::topology::app_bucket_name(&namespace))
        .await;
    measured
}

async fn measure_kv(
    client: &Client,
    js: &jetstream::Context,
    raw_bucket: &str,
    namespace: &apiary_proto::Namespace,
    options: &BenchOptions,
) -> anyhow::Result<Vec<Figure>> {
    let raw = js
        .create_key_value(kv::Config {
            bucket: raw_bucket.into(),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("failed to make the raw bucket")?;
    let store = client.kv(namespace.as_str()).await?;
    let samples = options.latency_samples;
    let value = Bytes::from_static(VALUE);

    let key = |n: usize| format!("k{}", n % 64);
    let mut figures = vec![
        timed("raw KV put", samples, |n| raw.put(key(n), value.clone())).await?,
        timed("apiary KV put", samples, |n| {
            let store = store.clone();
            let value = value.clone();
            async move { store.put(&key(n), value).await }
        })
        .await?,
        timed("raw KV get", samples, |n| raw.get(key(n))).await?,
        timed("apiary KV get", samples, |n| {
            let store = store.clone();
            async move { store.get(&key(n)).await }
        })
        .await?,
    ];

    let count = options.throughput_count;
    let in_flight = options.in_flight.max(1);
    let key = |n: usize| format!("k{}", n % 1024);
    figures.push(
        rate(
            &format!("raw KV puts, {in_flight} in flight"),
            count,
            in_flight,
            |n| raw.put(key(n), value.clone()),
        )
        .await?,
    );
    figures.push(
        rate(
            &format!("apiary KV puts, {in_flight} in flight"),
            count,
            in_flight,
            |n| {
                let store = store.clone();
                let value = value.clone();
                async move { store.put(&key(n), value).await }
            },
        )
        .await?,
    );
    figures.push(
        rate(
            &format!("raw KV gets, {in_flight} in flight"),
            count,
            in_flight,
            |n| raw.get(key(n)),
        )
        .await?,
    );
    figures.push(
        rate(
            &format!("apiary KV gets, {in_flight} in flight"),
            count,
            in_flight,
            |n| {
                let store = store.clone();
                async move { store.get(&key(n)).await }
            },
        )
        .await?,
    );

    Ok(figures)
}

/// Publish-to-receive latency and fan-out to four subscribers, raw core NATS beside app
/// messaging.
pub async fn pubsub(url: &str, options: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let client = Client::connect(url).await.context("failed to connect")?;
    let nats = client.nats().clone();
    let topics = client.pubsub(&format!("{RUN_PREFIX}{}", apiary_sdk::TaskId::generate()))?;
    let samples = options.latency_samples;
    let value = Bytes::from_static(VALUE);
    let mut figures = Vec::new();

    let mut raw_sub = nats.subscribe("bench.raw.latency").await?;
    nats.flush().await?;
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        nats.publish("bench.raw.latency", value.clone()).await?;
        raw_sub.next().await.context("the raw subscription ended")?;
        timings.push(started.elapsed());
    }
    figures.push(latency("raw publish → receive", timings));
    drop(raw_sub);

    let mut app_sub = topics.subscribe("latency").await?;
    nats.flush().await?;
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        topics.publish("latency", value.clone()).await?;
        app_sub.next().await.context("the subscription ended")?;
        timings.push(started.elapsed());
    }
    figures.push(latency("apiary publish → receive", timings));
    drop(app_sub);

    let count = options.throughput_count;
    let raw_subs =
        futures::future::try_join_all((0..FAN_OUT).map(|_| nats.subscribe("bench.raw.fanout")))
            .await?;
    nats.flush().await?;
    let started = Instant::now();
    let receiving = receive_all(raw_subs, count);
    for _ in 0..count {
        nats.publish("bench.raw.fanout", value.clone()).await?;
    }
    nats.flush().await?;
    receiving.await??;
    figures.push(throughput(
        &format!("raw fan-out to {FAN_OUT} (deliveries)"),
        count * FAN_OUT,
        started.elapsed(),
    ));

    let mut app_subs = Vec::new();
    for _ in 0..FAN_OUT {
        app_subs.push(topics.subscribe("fanout").await?);
    }
    nats.flush().await?;
    let started = Instant::now();
    let receiving = receive_all(app_subs, count);
    for _ in 0..count {
        topics.publish("fanout", value.clone()).await?;
    }
    nats.flush().await?;
    receiving.await??;
    figures.push(throughput(
        &format!("apiary fan-out to {FAN_OUT} (deliveries)"),
        count * FAN_OUT,
        started.elapsed(),
    ));
    Ok(figures)
}

/// The latency figure `name`: `operation(0..samples)`, one after another.
async fn timed<F, Fut, T, E>(name: &str, samples: usize, operation: F) -> anyhow::Result<Figure>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut timings = Vec::with_capacity(samples);
    for n in 0..samples {
        let started = Instant::now();
        operation(n).await?;
        timings.push(started.elapsed());
    }
    Ok(latency(name, timings))
}

/// The throughput figure `name`: `operation(0..count)` with at most `in_flight` at once.
async fn rate<F, Fut, T, E>(
    name: &str,
    count: usize,
    in_flight: usize,
    operation: F,
) -> anyhow::Result<Figure>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let mut running = futures::stream::iter(0..count)
        .map(operation)
        .buffer_unordered(in_flight);
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(throughput(name, count, started.elapsed()))
}

/// Reads `count` messages from each subscription, in the background; fails after a minute
/// (the server dropped messages for a slow consumer).
fn receive_all<S>(
    subscriptions: Vec<S>,
    count: usize,
) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    S: futures::Stream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let all = subscriptions
            .into_iter()
            .map(|mut subscription| async move {
                for _ in 0..count {
                    if subscription.next().await.is_none() {
                        return;
                    }
                }
            });
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(all))
            .await
            .map(drop)
            .context("the subscribers did not get every message within a minute")
    })
}
