//! Results the client missed while it was cut off from the server.
//!
//! The scheduler publishes each result to the submitter's inbox with a plain publish, and core
//! NATS keeps nothing for a client that is reconnecting: a result published in that moment
//! never reaches the inbox. Every result is stored in `APIARY_RESULTS` before it is published,
//! though. So after each reconnect the client reads the stream's headers from the submission
//! time of its oldest waiting task on, and fetches the results its handles still wait for.
//! A result that then also arrives on the inbox is a duplicate, dropped like any other.

use std::sync::atomic::Ordering;
use std::time::Duration;

use apiary_proto::codec;
use apiary_proto::message::TaskResult;
use apiary_proto::{TaskId, headers, topology};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;

use crate::{Routes, lock};

/// How often the client looks for a reconnect. Only a counter is read.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How far before the oldest waiting task's submission the read starts: the submitter's and
/// the server's clocks may differ a little.
const CLOCK_SLACK_MS: u64 = 5_000;
/// The longest one catch-up may take; the next reconnect tries again.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// How long the read waits for the next stored header before it takes the stream as read.
const QUIET: Duration = Duration::from_secs(1);

/// Runs a catch-up after every reconnect, for the life of the client.
pub(crate) async fn after_reconnects(
    nats: async_nats::Client,
    js: jetstream::Context,
    routes: Routes,
) {
    let statistics = nats.statistics();
    let mut seen = statistics.connects.load(Ordering::Relaxed);
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let connects = statistics.connects.load(Ordering::Relaxed);
        if connects == seen {
            continue;
        }
        seen = connects;
        match tokio::time::timeout(CATCH_UP_LIMIT, catch_up(&js, &routes)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(found)) => {
                tracing::info!(
                    found,
                    "found results published while the client was cut off"
                );
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "failed to catch up on missed results"),
            Err(_) => tracing::warn!("catching up on missed results took too long"),
        }
    }
}

/// Reads the headers stored in `APIARY_RESULTS` since the oldest waiting task was submitted
/// and hands every result a handle waits for to it. Returns how many it handed.
async fn catch_up(js: &jetstream::Context, routes: &Routes) -> Result<usize, async_nats::Error> {
    let Some(oldest_ms) = lock(routes).oldest_waiting_ms() else {
        return Ok(0);
    };
    let start_ms = oldest_ms.saturating_sub(CLOCK_SLACK_MS);
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
