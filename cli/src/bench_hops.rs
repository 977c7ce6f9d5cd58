//! Where a task's round trip goes, hop by hop: `apiary bench` runs tasks one at a time while a
//! second connection listens, as a plain core subscriber, on the subjects of the three stored
//! messages of a task (submission, dispatch, result). The server hands a published message to
//! core subscribers as it takes it in, so the moment each is seen marks the end of the hop
//! before it. Each message carries its task's id in `Apiary-Task-Id`.
//!
//! The hops: the client's submit until the server has the submission; the scheduler's intake
//! (pull, record, placement) until the dispatch is published; the node's pull, run and result
//! until the result is published; and the scheduler's settling of the result (record, archive)
//! until the client has it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use apiary_proto::headers;
use apiary_proto::message::ModuleRef;
use apiary_proto::subject::{self, NodeVerb};
use apiary_sdk::{Client, Task};
use futures::StreamExt as _;

use crate::bench::{Figure, latency};

/// The stored messages of a task, in the order they are published.
const SUBMISSION: usize = 0;
const DISPATCH: usize = 1;
const RESULT: usize = 2;

/// When each of a task's messages was seen, by task id.
type Seen = Arc<Mutex<HashMap<String, [Option<Instant>; 3]>>>;

/// Runs `samples` tasks one at a time and returns one latency figure per hop.
pub async fn hops(
    url: &str,
    client: &Client,
    module: &ModuleRef,
    samples: usize,
) -> anyhow::Result<Vec<Figure>> {
    let listener = async_nats::connect(url)
        .await
        .context("failed to connect the hop listener")?;
    let mut subscriptions = Vec::new();
    for (index, subject) in [
        (SUBMISSION, subject::task_submit()),
        (DISPATCH, subject::all_nodes(NodeVerb::Dispatch)),
        (RESULT, subject::all_nodes(NodeVerb::Result)),
    ] {
        let subscriber = listener
            .subscribe(String::from(subject))
            .await
            .context("failed to listen for a task's messages")?;
        subscriptions.push(subscriber.map(move |message| (index, message)));
    }
    // The server has the subscriptions once a round trip after them has come back.
    listener
        .flush()
        .await
        .context("failed to flush the hop listener")?;
    let seen: Seen = Arc::default();
    let listening = tokio::spawn({
        let seen = seen.clone();
        let mut messages = futures::stream::select_all(subscriptions);
        async move {
            while let Some((index, message)) = messages.next().await {
                let at = Instant::now();
                let Some(task) = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(headers::TASK_ID))
                else {
                    continue;
                };
                let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                let times = seen.entry(task.to_string()).or_default();
                times[index].get_or_insert(at);
            }
        }
    });

    let mut runs = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = Instant::now();
        let handle = client
            .submit(Task::stored(module.clone()).input("bench"))
            .await?;
        let id = handle.id().to_string();
        handle.result_within(Duration::from_secs(60)).await?;
        runs.push((id, sent, Instant::now()));
    }
    listening.abort();

    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    let mut hops: [Vec<Duration>; 4] = Default::default();
    for (id, sent, done) in &runs {
        let Some([Some(submitted), Some(dispatched), Some(resulted)]) = seen.get(id).copied()
        else {
            continue;
        };
        hops[0].push(submitted.saturating_duration_since(*sent));
        hops[1].push(dispatched.saturating_duration_since(submitted));
        hops[2].push(resulted.saturating_duration_since(dispatched));
        hops[3].push(done.saturating_duration_since(resulted));
    }
    let [submit, intake, node, delivery] = hops;
    Ok(vec![
        latency("hop: client submit → submission at the server", submit),
        latency(
            "hop: submission → dispatch (intake, record, placement)",
            intake,
        ),
        latency("hop: dispatch → result (node pull, run, result)", node),
        latency("hop: result → client (settle, record, delivery)", delivery),
    ])
}
