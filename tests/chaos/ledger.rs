//! The ledger: one entry per task the load generator submits, what the SDK handed back for
//! it, what crossed the wire to the client's inbox, and what the cluster stored. The figures
//! of a run are computed from it alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use apiary_proto::message::{Outcome, TaskResult};
use apiary_proto::{TaskId, codec, topology};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt as _;

/// What happened to one submitted task.
#[derive(Debug)]
struct Entry {
    submitted_at: Instant,
    /// The task id, once `submit` returned Ok (JetStream acknowledged the submission).
    task_id: Option<TaskId>,
    submit_failed: bool,
    result: Option<Seen>,
    /// The SDK handle ended without a result (the client's connection closed for good).
    sdk_error: bool,
    /// The handle was resolved a second time: impossible through the SDK's API, and checked
    /// all the same, since it is the promise the ledger exists to hold.
    resolved_again: bool,
}

/// A result the SDK handed to the task's handle.
#[derive(Debug)]
struct Seen {
    latency: Duration,
    attempt: u32,
    node: String,
    kind: String,
    wrong_output: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    by_task: HashMap<TaskId, usize>,
    /// Submits that have not returned yet.
    submitting: usize,
    acked: usize,
    /// Acknowledged tasks whose handle has ended, with a result or an error.
    settled: usize,
    /// Every delivery of a result seen on the client's inbox, by task: its attempt.
    wire: HashMap<TaskId, Vec<u32>>,
    /// Results seen on the wire for tasks whose submit failed (the publish was stored but its
    /// acknowledgement was lost), found by their output.
    wire_unacked: HashSet<usize>,
}

/// The shared ledger of one scenario run.
#[derive(Debug, Default)]
pub struct Ledger {
    state: Mutex<State>,
}

impl Ledger {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section is a few map operations, so a poisoned lock still guards
        // consistent data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens an entry for a task about to be submitted; returns its number.
    pub fn submitting(&self) -> usize {
        let mut state = self.state();
        state.submitting += 1;
        state.entries.push(Entry {
            submitted_at: Instant::now(),
            task_id: None,
            submit_failed: false,
            result: None,
            sdk_error: false,
            resolved_again: false,
        });
        state.entries.len() - 1
    }

    pub fn acknowledged(&self, n: usize, task: TaskId) {
        let mut state = self.state();
        state.submitting -= 1;
        state.acked += 1;
        state.by_task.insert(task.clone(), n);
        state.entries[n].task_id = Some(task);
    }

    pub fn submit_failed(&self, n: usize) {
        let mut state = self.state();
        state.submitting -= 1;
        state.entries[n].submit_failed = true;
    }

    /// Records the result the SDK handed to entry `n`'s handle.
    pub fn resolved(&self, n: usize, result: Result<TaskResult, apiary_sdk::ResultError>) {
        let mut state = self.state();
        state.settled += 1;
        let entry = &mut state.entries[n];
        if entry.result.is_some() || entry.sdk_error {
            // What an SDK user would see as one task completing twice.
            entry.resolved_again = true;
        }
        match result {
            Ok(result) => {
                let (kind, wrong_output) = judge(n, &result);
                entry.result = Some(Seen {
                    latency: entry.submitted_at.elapsed(),
                    attempt: result.attempt,
                    node: result.node_id.to_string(),
                    kind,
                    wrong_output,
                });
            }
            Err(_) => entry.sdk_error = true,
        }
    }

    /// Records one result delivery seen on the client's inbox.
    pub fn on_wire(&self, result: &TaskResult) {
        let mut state = self.state();
        if !state.by_task.contains_key(&result.task_id)
            && let Some(n) = entry_of_output(&result.outcome)
            && state
                .entries
                .get(n)
                .is_some_and(|entry| entry.submit_failed)
        {
            state.wire_unacked.insert(n);
        }
        state
            .wire
            .entry(result.task_id.clone())
            .or_default()
            .push(result.attempt);
    }

    /// Whether no submit is under way and every acknowledged task's handle has ended.
    pub fn is_settled(&self) -> bool {
        let state = self.state();
        state.submitting == 0 && state.settled == state.acked
    }

    /// The figures of the run; `stored` is what `APIARY_RESULTS` held at the end.
    pub fn figures(&self, stored: &Stored) -> Figures {
        let state = self.state();
        let mut figures = Figures {
            submitted: state.entries.len(),
            acked: state.acked,
            submit_failed: state.entries.iter().filter(|e| e.submit_failed).count(),
            resolved_twice: state.entries.iter().filter(|e| e.resolved_again).count(),
            stored_in_stream: stored.attempts.len(),
            wire_unacked: state.wire_unacked.len(),
            ..Figures::default()
        };
        let mut latencies = Vec::new();
        let mut slowest = Vec::new();
        let start = state.entries.first().map(|entry| entry.submitted_at);
        let mut seconds: BTreeMap<u64, (Second, Vec<Duration>)> = BTreeMap::new();
        for entry in &state.entries {
            let second = start.map_or(0, |start| {
                entry
                    .submitted_at
                    .saturating_duration_since(start)
                    .as_secs()
            });
            let (slot, slot_latencies) = seconds.entry(second).or_default();
            slot.submitted += 1;
            if entry.submit_failed {
                slot.submit_failed += 1;
            }
            match &entry.result {
                Some(seen) => slot_latencies.push(seen.latency),
                None if entry.task_id.is_some() => slot.without_result += 1,
                None => {}
            }
            let Some(task) = &entry.task_id else { continue };
            let stored_attempts = stored.by_task.get(task).map_or(0, Vec::len);
            figures.stored_results += stored_attempts;
            if stored_attempts > 0 {
                figures.stored_tasks += 1;
            }
            if stored.by_task.get(task).is_some_and(|kinds| {
                kinds
                    .iter()
                    .filter(|kind| kind.as_str() == "completed")
                    .count()
                    > 1
            }) {
                figures.completed_twice_stored += 1;
            }
            match &entry.result {
                Some(seen) => {
                    figures.results += 1;
                    latencies.push(seen.latency);
                    slowest.push((seen.latency, task, seen));
                    *figures.outcomes.entry(seen.kind.clone()).or_default() += 1;
                    *figures.by_node.entry(seen.node.clone()).or_default() += 1;
                    if seen.wrong_output {
                        figures.wrong_output += 1;
                    }
                }
                None => {
                    if entry.sdk_error {
                        figures.sdk_errors += 1;
                    }
                    let stored = stored_attempts > 0;
                    if stored {
                        figures.stored_not_delivered += 1;
                    } else {
                        figures.lost += 1;
                    }
                    if figures.lost_examples.len() < 10 {
                        let how = if stored { "stored" } else { "not stored" };
                        figures.lost_examples.push(format!("{task} ({how})"));
                    }
                }
            }
            if let Some(deliveries) = state.wire.get(task) {
                figures.wire_tasks += 1;
                let distinct: HashSet<u32> = deliveries.iter().copied().collect();
                let extra = deliveries.len() - 1;
                figures.wire_duplicates += extra;
                // Repeats of an attempt already delivered, as opposed to a later attempt's
                // result arriving after an earlier one.
                figures.wire_duplicates_same_attempt += deliveries.len() - distinct.len();
            }
        }
        latencies.sort_unstable();
        figures.latency = Latency::of(&latencies);
        slowest.sort_by_key(|(latency, _, _)| std::cmp::Reverse(*latency));
        figures.slowest = slowest
            .into_iter()
            .take(SLOWEST)
            .map(|(latency, task, seen)| {
                format!(
                    "{task} {} ms (attempt {} on {})",
                    latency.as_millis(),
                    seen.attempt,
                    seen.node
                )
            })
            .collect();
        figures.timeline = seconds
            .into_iter()
            .map(|(second, (mut slot, mut slot_latencies))| {
                slot_latencies.sort_unstable();
                slot.second = second;
                slot.results = slot_latencies.len();
                slot.latency = Latency::of(&slot_latencies);
                slot
            })
            .collect();
        figures
    }
}

/// How many of the slowest tasks a run names.
const SLOWEST: usize = 3;

/// The outcome kind of a result and whether its output is wrong: the uppercase module must
/// answer `task <n>` with `TASK <n>` and exit 0.
fn judge(n: usize, result: &TaskResult) -> (String, bool) {
    match &result.outcome {
        Outcome::Completed {
            exit_code, stdout, ..
        } => {
            let expected = expected_output(n);
            let wrong = *exit_code != 0 || stdout.as_bytes() != expected.as_bytes();
            ("completed".to_owned(), wrong)
        }
        Outcome::Failed { error, .. } => (failure_kind(error), false),
    }
}

fn failure_kind(error: &apiary_proto::message::TaskError) -> String {
    // The wire name (`node_lost`), which is what users match on in JSON.
    match serde_json::to_value(error.kind) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{:?}", error.kind),
    }
}

/// The input of task `n`.
pub fn input(n: usize) -> String {
    format!("task {n}")
}

fn expected_output(n: usize) -> String {
    input(n).to_ascii_uppercase()
}

/// The ledger entry a completed result belongs to, read back from its output.
fn entry_of_output(outcome: &Outcome) -> Option<usize> {
    let Outcome::Completed { stdout, .. } = outcome else {
        return None;
    };
    std::str::from_utf8(stdout.as_bytes())
        .ok()?
        .strip_prefix("TASK ")?
        .parse()
        .ok()
}

/// Counts every result delivered to the client's inbox prefix, decoded as the SDK would.
/// Other messages there (the SDK connection's own request replies) do not decode as a
/// result and are skipped.
pub async fn watch_wire(mut subscription: async_nats::Subscriber, ledger: Arc<Ledger>) {
    while let Some(message) = subscription.next().await {
        if let Ok((result, _)) =
            codec::decode_message::<TaskResult>(message.headers.as_ref(), &message.payload)
        {
            ledger.on_wire(&result);
        }
    }
}

/// What `APIARY_RESULTS` holds: each stored (task, attempt) and, by task, the outcome
/// kinds of its stored attempts.
#[derive(Debug, Default)]
pub struct Stored {
    attempts: HashSet<(TaskId, u32)>,
    by_task: HashMap<TaskId, Vec<String>>,
}

impl Stored {
    /// Reads the whole results stream with an ordered consumer, up to the last message it
    /// held when the read began.
    pub async fn read(js: &jetstream::Context) -> anyhow::Result<Self> {
        let mut stream = js
            .get_stream(topology::RESULTS_STREAM)
            .await
            .context("failed to open the results stream")?;
        let last = stream
            .info()
            .await
            .context("failed to read the results stream's info")?
            .state
            .last_sequence;
        let mut stored = Self::default();
        if last == 0 {
            return Ok(stored);
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..pull::OrderedConfig::default()
            })
            .await
            .context("failed to create an ordered consumer on the results stream")?;
        let mut messages = consumer
            .messages()
            .await
            .context("failed to read the results stream")?;
        let read = async {
            while let Some(message) = messages.next().await {
                let message = message.context("failed to read the results stream")?;
                if let Ok((result, _)) =
                    codec::decode_message::<TaskResult>(message.headers.as_ref(), &message.payload)
                {
                    let kind = match &result.outcome {
                        Outcome::Completed { .. } => "completed".to_owned(),
                        Outcome::Failed { error, .. } => failure_kind(error),
                    };
                    if stored
                        .attempts
                        .insert((result.task_id.clone(), result.attempt))
                    {
                        stored.by_task.entry(result.task_id).or_default().push(kind);
                    }
                }
                let sequence = message
                    .info()
                    .map_err(|err| anyhow::anyhow!("failed to read a message's info: {err}"))?
                    .stream_sequence;
                if sequence >= last {
                    break;
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .context("timed out reading the results stream")??;
        Ok(stored)
    }
}

/// Submit-to-result latency at the SDK.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    fn of(sorted: &[Duration]) -> Self {
        let at = |q: f64| {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank: the smallest value with at least q of the samples at or below it.
            let rank = (q * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

/// The tasks submitted in one second of the run, and how they fared: where in the run
/// the slow or lost ones were submitted.
#[derive(Clone, Debug, Default)]
pub struct Second {
    /// Seconds since the first submit.
    pub second: u64,
    pub submitted: usize,
    pub submit_failed: usize,
    pub results: usize,
    /// Acknowledged, and no result reached the SDK.
    pub without_result: usize,
    pub latency: Latency,
}

/// The figures of one scenario run.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub submitted: usize,
    pub acked: usize,
    pub submit_failed: usize,
    /// Acknowledged tasks whose handle got a result.
    pub results: usize,
    /// Acknowledged tasks with at least one delivery on the wire.
    pub wire_tasks: usize,
    /// Deliveries on the wire beyond the first, per task, summed.
    pub wire_duplicates: usize,
    /// Of those, repeats of an attempt that was already delivered.
    pub wire_duplicates_same_attempt: usize,
    /// Results the SDK itself counted for handles already resolved, where it can tell.
    pub sdk_duplicates: Option<u64>,
    /// Handles that resolved more than once: an SDK user seeing a task complete twice.
    pub resolved_twice: usize,
    /// Distinct (task, attempt) in `APIARY_RESULTS` for acknowledged tasks.
    pub stored_results: usize,
    /// Distinct (task, attempt) in `APIARY_RESULTS`, the warm-up task and the results of
    /// failed submits included.
    pub stored_in_stream: usize,
    /// Acknowledged tasks with at least one stored result.
    pub stored_tasks: usize,
    /// Acknowledged tasks with more than one stored `completed` attempt: run to the end twice.
    pub completed_twice_stored: usize,
    /// Acknowledged, result stored, but none reached the SDK.
    pub stored_not_delivered: usize,
    /// Acknowledged, no result stored, none reached the SDK.
    pub lost: usize,
    pub lost_examples: Vec<String>,
    pub sdk_errors: usize,
    pub wrong_output: usize,
    /// Results on the wire for tasks whose submit was reported as failed.
    pub wire_unacked: usize,
    pub outcomes: BTreeMap<String, usize>,
    pub by_node: BTreeMap<String, usize>,
    pub latency: Latency,
    /// The slowest tasks, to look up in the logs.
    pub slowest: Vec<String>,
    pub timeline: Vec<Second>,
}

impl Figures {
    /// Acknowledged tasks the SDK user never got a result for.
    pub fn lost_to_sdk(&self) -> usize {
        self.stored_not_delivered + self.lost
    }

    /// The targets: nothing lost, no wrong output, nothing completed twice for an SDK user
    /// (a handle handed a second result). Duplicates the SDK dropped are reported, not
    /// failed: the cluster delivers at least once, and the SDK's promise is one result per
    /// handle (see ARCHITECTURE.md, "What is delivered how often").
    pub fn passed(&self) -> bool {
        self.lost_to_sdk() == 0 && self.wrong_output == 0 && self.resolved_twice == 0
    }
}
