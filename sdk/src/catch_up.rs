//! Results the client missed while it was cut off from the server.
//!
//! The scheduler publishes each result to the submitter's inbox with a plain publish, and core
//! NATS keeps nothing for a client that is reconnecting: a result published in that moment
//! never reaches the inbox. Every result is stored in `APIARY_RESULTS` before it is published,
//! though. So after each reconnect the client reads the stream's headers from shortly before
//! it was cut off (or from its oldest waiting task's submission, if later), and fetches the
//! results its handles still wait for.
//! A result that then also arrives on the inbox is a duplicate, dropped like any other.

use std::sync::atomic::Ordering;
use std::time::Duration;

use apiary_proto::codec;
use apiary_proto::message::TaskResult;
use apiary_proto::{TaskId, headers, now_ms, topology};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;

use crate::{Routes, lock};

/// How often the client looks for a reconnect. Only a counter and a state are read.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How far before the moment the client was last seen connected the read starts. It covers
/// the difference between the client's and the server's clocks, and a scheduler that was
/// behind with deliveries: the stream stamps a result when it is stored, and it may reach the
/// inbox (or not) some time later.
const SLACK_MS: u64 = 30_000;
/// The longest one catch-up may take before it is tried again.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// The longest pause between tries of a catch-up that keeps failing.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long the read waits for the next stored header before it takes the stream as read.
const QUIET: Duration = Duration::from_secs(1);

/// Runs a catch-up after every reconnect, for the life of the client, retrying one that
/// fails until it succeeds.
pub(crate) async fn after_reconnects(
    nats: async_nats::Client,
    js: jetstream::Context,
    routes: Routes,
) {
    let statistics = nats.statistics();
    let mut seen = statistics.connects.load(Ordering::Relaxed);
    // When the client was last seen connected before the outage: results stored after it may
    // have been published while it could not hear them.
    let mut connected_at_ms = now_ms();
    let mut missed_since_ms: Option<u64> = None;
    let mut retry = CHECK_EVERY;
    let mut next_try = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let connects = statistics.connects.load(Ordering::Relaxed);
        if connects != seen {
            seen = connects;
            missed_since_ms =
                Some(missed_since_ms.map_or(connected_at_ms, |since| since.min(connected_at_ms)));
        }
        if nats.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        connected_at_ms = now_ms();
        let Some(since_ms) = missed_since_ms else {
            continue;
        };
        if tokio::time::Instant::now() < next_try {
            continue;
        }
        let outcome = tokio::time::timeout(CATCH_UP_LIMIT, catch_up(&js, &routes, since_ms)).await;
        let error = match outcome {
            Ok(Ok(found)) => {
                if found > 0 {
                    tracing::info!(
                        found,
                        "found results published while the client was cut off"
                    );
                }
                missed_since_ms = None;
                retry = CHECK_EVERY;
                continue;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no end within {CATCH_UP_LIMIT:?}"),
        };
        tracing::warn!(error, retry_in = ?retry, "failed to catch up on missed results; retrying");
        next_try = tokio::time::Instant::now() + retry;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// Reads the headers stored in `APIARY_RESULTS` since the outage that began after
/// `since_ms` (or since the oldest waiting task was submitted, if later) and hands every
/// result a handle waits for to it. Returns how many it handed.
async fn catch_up(
    js: &jetstream::Context,
    routes: &Routes,
    since_ms: u64,
) -> Result<usize, async_nats::Error> {
    let Some(oldest_ms) = lock(routes).oldest_waiting_ms() else {
        return Ok(0);
    };
    // Nothing a waiting task produced is older than its submission, and nothing the client
    // missed is older than the outage.
    let start_ms = oldest_ms.max(since_ms).saturating_sub(SLACK_MS);
    let start_time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(start_ms) * 1_000_000)?;
    let stream = js.get_stream(topology::RESULTS_STREAM).await?;
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            // The task id is a header; bodies are fetched only for the results wanted.
            headers_only: true,
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await?;
    let mut stored = reader.messages().await?;
    let mut handed = 0;
    while let Ok(Some(message)) = tokio::time::timeout(QUIET, stored.next()).await {
        let message = message?;
        let info = message.info()?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let wanted = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(headers::TASK_ID))
            .and_then(|task| TaskId::new(task.as_str()).ok())
            .is_some_and(|task| lock(routes).is_waiting_for(&task));
        if wanted {
            let raw = stream.get_raw_message(sequence).await?;
            match codec::decode_message::<TaskResult>(Some(&raw.headers), &raw.payload) {
                Ok((result, _)) => {
                    if lock(routes).deliver(result) {
                        handed += 1;
                    }
                }
                Err(err) => {
                    tracing::warn!(sequence, error = %err, "skipping a malformed stored result");
                }
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(handed)
}
