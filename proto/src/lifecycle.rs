//! A task's life: its states, its record, and every transition, as pure functions of data.
//!
//! ```text
//! pending ──placed──► scheduled{node, attempt} ──started──► running
//!    ▲                      │                                  │
//!    └──── retry / moved ───┴──────────── finished ────────────┤
//!                                                              ▼
//!                     succeeded | failed | cancelled | timed_out | dead
//! ```
//!
//! The record ([`TaskRecord`]) is the one authority on a task's fate. Schedulers change it
//! only with compare-and-set, and only through the functions here, so two replicas that race
//! (a result and a cancel, a late result and its retry) cannot both win: whichever writes
//! first moves the record, and the other finds a record its event no longer applies to.
//!
//! An attempt is owned by the node it was placed on: a result counts only when it names the
//! node and attempt the record holds, and only while the record is scheduled or running.
//! Anything else is a late result of a superseded attempt, or a repeat of one already
//! applied, and changes nothing.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, TaskId};
use crate::message::{Outcome, TaskError, TaskErrorKind, TaskResult, TaskSubmission};

/// Where a task is in its life. Serialized in `snake_case`: `pending`, `scheduled`,
/// `running`, `succeeded`, `failed`, `cancelled`, `timed_out`, `dead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting to be placed: just submitted, waiting for a node that can run it, or waiting
    /// out a retry's backoff.
    Pending,
    /// Placed on a node (`node_id`, `attempt`), not started yet.
    Scheduled,
    /// Its node has started it.
    Running,
    /// The module ran to its end and exited with 0.
    Succeeded,
    /// The module failed (a trap, a limit, a non-zero exit, a bad module) and the task asked
    /// for no further attempt of that kind.
    Failed,
    /// Cancelled by a user; never retried.
    Cancelled,
    /// Not placed within its queue timeout, or its run took longer than its timeout.
    TimedOut,
    /// Every attempt it was allowed failed; it is in the dead-letter stream.
    Dead,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        TaskState::Pending,
        TaskState::Scheduled,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::TimedOut,
        TaskState::Dead,
    ];

    /// Whether the task's life is over: no transition leaves this state.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            TaskState::Pending | TaskState::Scheduled | TaskState::Running
        )
    }

    /// The name on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Scheduled => "scheduled",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
            TaskState::Dead => "dead",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == value)
            .ok_or_else(|| {
                let names: Vec<_> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown task state {value:?}; one of {}", names.join(", "))
            })
    }
}

/// A guest failure a task may ask to be retried on. System failures (a lost node, an
/// internal error on the node) are retried without asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    Trap,
    Timeout,
    FuelExhausted,
    MemoryLimit,
    OutputLimit,
    DiskLimit,
    /// The module exited with a non-zero code.
    NonZeroExit,
}

/// How a task wants failed attempts retried (`TaskSubmission::retry`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, that may fail before the task is dead. Also caps
    /// the retries of system failures, which otherwise get the scheduler's default.
    pub max_attempts: u32,
    /// The wait before the first retry; it doubles with each further one, with jitter.
    pub backoff_ms: u64,
    /// The longest wait between attempts.
    pub max_backoff_ms: u64,
    /// The guest failures to retry. Empty: only system failures are retried.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub on: BTreeSet<RetryOn>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            on: BTreeSet::new(),
        }
    }
}

impl RetryPolicy {
    /// The wait before retrying after the `failures`-th failed attempt: `backoff_ms` doubled
    /// for each earlier failure, capped at `max_backoff_ms`, then "equal jitter": half of it
    /// fixed and half scaled by `jitter` (0.0–1.0), so that tasks that failed together do not
    /// come back together.
    pub fn backoff(&self, failures: u32, jitter: f64) -> u64 {
        let doublings = failures.saturating_sub(1).min(32);
        let full = self
            .backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms.max(self.backoff_ms));
        let half = full / 2;
        half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
    }
}

/// One step of a task's history, kept in its record (the last [`HISTORY_LIMIT`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: TaskState,
    pub at_ms: u64,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
}

/// The message ids (`Nats-Msg-Id`) of what the lifecycle stores, so that doing a step again
/// after a crash stores it once.
pub mod msg_id {
    use super::TaskRecord;
    use crate::id::TaskId;

    /// The submission that puts a task back in the queue after `attempt` (a retry, a move).
    pub fn requeue(task: &TaskId, attempt: u32) -> String {
        format!("{task}.after.{attempt}")
    }

    /// The submission that puts a dead task back in the queue from the dead-letter entry at
    /// `dlq_sequence`.
    pub fn requeue_dead(task: &TaskId, dlq_sequence: u64) -> String {
        format!("{task}.requeue.{dlq_sequence}")
    }

    /// A submission moved from the normal queue to the queue of the priority its body asks
    /// for; `sequence` is the original's, so a redelivered original is moved once.
    pub fn rerouted(task: &TaskId, sequence: u64) -> String {
        format!("{task}.priority.{sequence}")
    }

    /// A dead task's dead-letter entry.
    pub fn dead_letter(record: &TaskRecord) -> String {
        format!("{}.{}.dead", record.id, record.attempt)
    }

    /// A task's final record in the archive.
    pub fn archived(record: &TaskRecord) -> String {
        format!("{}.{}.{}", record.id, record.attempt, record.state)
    }
}

/// The node named in the result of a task that ended before any node held it.
pub const NO_NODE: &str = "none";

/// How many transitions a record keeps.
pub const HISTORY_LIMIT: usize = 32;

/// What the cluster knows about one task: readable by id from any replica and any client
/// (`apiary.v1.tasks.status`), while the task lives and for the retention period after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub state: TaskState,
    /// The latest attempt: the one placed (scheduled, running) or the last that ended. 0
    /// while the task was never placed.
    pub attempt: u32,
    /// The node that holds (or held) `attempt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// Attempts that failed and count against the retry cap. Moves an operator caused
    /// (drains) do not count.
    #[serde(default)]
    pub failures: u32,
    /// Why the task is where it is, in words: why it waits (no node meets its
    /// requirements), why it was retried, timed out or died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The failure of the last attempt that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// The exit code of the run that ended the task, when it ran to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// A retry is not placed before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// Where the result that ended the task is stored: its sequence in `APIARY_RESULTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_seq: Option<u64>,
    /// The `APIARY_RESULTS` sequence of the last result applied to this record, so that the
    /// same stored result read again (a replica died before acknowledging it) is recognised
    /// as applied, not as a late one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_result_seq: Option<u64>,
    /// The `APIARY_TASKS` sequence of the submission message last placed, so that the same
    /// message read again is told apart from a resubmission of the id.
    #[serde(default)]
    pub submission_seq: u64,
    /// Whether the submission came as JSON: its outcome is then delivered as JSON too,
    /// though results are stored in MessagePack.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json_replies: bool,
    /// More reply subjects to deliver the outcome to: submitters who resubmitted the id while
    /// the task ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watchers: Vec<String>,
    /// Those of `watchers` whose resubmission came as JSON, and who get the outcome as JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json_watchers: Vec<String>,
    /// The submission. Its input is dropped when the task ends; the dead-letter entry keeps
    /// the whole submission.
    pub task: TaskSubmission,
    #[serde(default)]
    pub history: Vec<Transition>,
}

/// The most extra reply subjects a record keeps.
pub const WATCHERS_LIMIT: usize = 16;

/// Why an event does not apply to a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The task's life is over; nothing changes it any more.
    #[error("the task is already {0}")]
    Ended(TaskState),
    /// The event is about an attempt the record no longer holds (a late result, a started
    /// signal from a node the task was moved off).
    #[error("attempt {attempt} on {node} is not the task's current attempt")]
    Superseded { node: NodeId, attempt: u32 },
    /// The record is not in a state the event starts from.
    #[error("the task is {0}")]
    NotApplicable(TaskState),
}

/// What a stored result does to a task.
#[derive(Clone, Debug, PartialEq)]
pub enum Settlement {
    /// The result ends the task (or schedules its retry): write `record`, then carry out
    /// `effect`.
    Apply {
        record: Box<TaskRecord>,
        effect: Effect,
    },
    /// This very result was applied before (the record names its sequence): carry out
    /// `effect` again, since whoever applied it may have died before finishing.
    Repeat { effect: Effect },
    /// A result for an attempt the record no longer holds: discard it and count it.
    Superseded,
}

/// What follows a settled result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Deliver the outcome to the submitter and keep the final record.
    Finish,
    /// Also put the task in the dead-letter stream.
    Bury,
    /// Put the task back in the queue for its next attempt, not before `not_before_ms`.
    Retry { not_before_ms: u64 },
}

/// The scheduler's settings that the transitions read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Attempts a task gets for system failures unless its retry policy says otherwise.
    pub max_attempts: u32,
}

/// How a finished attempt counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Succeeded,
    /// The guest's failure; retried only when the task asks for this kind.
    Guest(RetryOn),
    /// Not the guest's fault; retried by default.
    System,
    /// No attempt could do better (a bad module, an invalid task) or none may be made (it
    /// was cancelled).
    Final,
}

fn verdict(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Completed { exit_code: 0, .. } => Verdict::Succeeded,
        Outcome::Completed { .. } => Verdict::Guest(RetryOn::NonZeroExit),
        Outcome::Failed { error, .. } => match error.kind {
            TaskErrorKind::Trap => Verdict::Guest(RetryOn::Trap),
            TaskErrorKind::Timeout => Verdict::Guest(RetryOn::Timeout),
            TaskErrorKind::FuelExhausted => Verdict::Guest(RetryOn::FuelExhausted),
            TaskErrorKind::MemoryLimit => Verdict::Guest(RetryOn::MemoryLimit),
            TaskErrorKind::OutputLimit => Verdict::Guest(RetryOn::OutputLimit),
            TaskErrorKind::DiskLimit => Verdict::Guest(RetryOn::DiskLimit),
            TaskErrorKind::NodeLost | TaskErrorKind::Internal => Verdict::System,
            TaskErrorKind::InvalidModule
            | TaskErrorKind::ModuleNotFound
            | TaskErrorKind::ModuleDigestMismatch
            | TaskErrorKind::InvalidTask
            | TaskErrorKind::QueueTimeout
            | TaskErrorKind::Cancelled => Verdict::Final,
        },
    }
}

impl TaskRecord {
    /// The record of a task just taken from the queue, not placed yet.
    pub fn new(task: TaskSubmission, submission_seq: u64, now_ms: u64) -> Self {
        let mut record = Self {
            id: task.id.clone(),
            state: TaskState::Pending,
            attempt: 0,
            node_id: None,
            failures: 0,
            reason: None,
            error: None,
            exit_code: None,
            submitted_at_ms: if task.submitted_at_ms > 0 {
                task.submitted_at_ms
            } else {
                now_ms
            },
            updated_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
            not_before_ms: None,
            result_seq: None,
            applied_result_seq: None,
            submission_seq,
            json_replies: false,
            watchers: Vec::new(),
            json_watchers: Vec::new(),
            task,
            history: Vec::new(),
        };
        record.push_history(now_ms);
        record
    }

    /// The reply subjects the outcome goes to: the submitter's, then any resubmitter's.
    pub fn reply_subjects(&self) -> impl Iterator<Item = &str> {
        self.task
            .reply_to
            .as_deref()
            .into_iter()
            .chain(self.watchers.iter().map(String::as_str))
    }

    /// When a task that is still pending stops waiting and times out, if it has a queue
    /// timeout.
    pub fn queue_deadline_ms(&self) -> Option<u64> {
        self.task
            .queue_timeout_ms
            .map(|timeout| self.submitted_at_ms.saturating_add(timeout))
    }

    fn push_history(&mut self, now_ms: u64) {
        self.updated_at_ms = now_ms;
        self.history.push(Transition {
            state: self.state,
            at_ms: now_ms,
            attempt: self.attempt,
            node_id: self.node_id.clone(),
        });
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }

    fn ensure_live(&self) -> Result<(), Refused> {
        if self.state.is_terminal() {
            Err(Refused::Ended(self.state))
        } else {
            Ok(())
        }
    }

    /// Whether `node`'s `attempt` is the one this record holds, and is placed or running.
    pub fn holds(&self, node: &NodeId, attempt: u32) -> bool {
        matches!(self.state, TaskState::Scheduled | TaskState::Running)
            && self.attempt == attempt
            && self.node_id.as_ref() == Some(node)
    }

    /// Pending → scheduled: the next attempt goes to `node`, from the submission message at
    /// `submission_seq`.
    pub fn placed(
        &self,
        node: &NodeId,
        submission_seq: u64,
        now_ms: u64,
    ) -> Result<TaskRecord, Refused> {
        self.ensure_live()?;
        if self.state != TaskState::Pending {
            return Err(Refused::NotApplicable(self.state));
        }
        let mut next = self.clone();
        next.state = TaskState::Scheduled;
        next.attempt = self.attempt + 1;
        next.node_id = Some(node.clone());
        next.reason = None;
        next.not_before_ms = None;
        next.submission_seq = submission_seq;
        next.started_at_ms = None;
        next.push_history(now_ms);
        Ok(next)
    }

    /// Whether the outcome goes to `reply_to` as JSON: the submission, or the resubmission,
    /// that named it came as JSON.
    pub fn replies_in_json(&self, reply_to: &str) -> bool {
        if self.task.reply_to.as_deref() == Some(reply_to) {
            self.json_replies
        } else {
            self.json_watchers.iter().any(|watcher| watcher == reply_to)
        }
    }

    /// Adds a reply subject that also gets the outcome (a submitter resubmitted the id while
    /// the task lives), as JSON when `json`; `None` when it is already there or the list is
    /// full.
    pub fn with_watcher(&self, reply_to: &str, json: bool) -> Option<TaskRecord> {
        if self.state.is_terminal()
            || self.reply_subjects().any(|known| known == reply_to)
            || self.watchers.len() >= WATCHERS_LIMIT
        {
            return None;
        }
        let mut next = self.clone();
        next.watchers.push(reply_to.to_owned());
        if json {
            next.json_watchers.push(reply_to.to_owned());
        }
        Some(next)
    }

    /// Scheduled → running, when the node holding the attempt says it started it.
    pub fn started(
        &self,
        node: &NodeId,
        attempt: u32,
        started_at_ms: u64,
        now_ms: u64,
    ) -> Result<TaskRecord, Refused> {
        self.ensure_live()?;
        if !self.holds(node, attempt) {
            return Err(Refused::Superseded {
                node: node.clone(),
                attempt,
            });
        }
        if self.state == TaskState::Running {
            return Err(Refused::NotApplicable(self.state));
        }
        let mut next = self.clone();
        next.state = TaskState::Running;
        next.started_at_ms = Some(started_at_ms);
        next.push_history(now_ms);
        Ok(next)
    }

    /// Pending stays pending with a new reason (no node can run it now, say); `None` when
    /// the reason is already recorded, so that a task waiting for a node is not rewritten on
    /// every look.
    pub fn waiting(&self, reason: &str, now_ms: u64) -> Option<TaskRecord> {
        if self.state != TaskState::Pending || self.reason.as_deref() == Some(reason) {
            return None;
        }
        let mut next = self.clone();
        next.reason = Some(reason.to_owned());
        next.updated_at_ms = now_ms;
        Some(next)
    }

    /// Pending → timed out, once the queue timeout has passed.
    pub fn queue_timed_out(&self, now_ms: u64) -> Option<TaskRecord> {
        let deadline = self.queue_deadline_ms()?;
        if self.state != TaskState::Pending || now_ms < deadline {
            return None;
        }
        let waited = now_ms.saturating_sub(self.submitted_at_ms);
        let why = match &self.reason {
            Some(reason) => format!("not placed within its queue timeout ({waited} ms): {reason}"),
            None => format!("not placed within its queue timeout ({waited} ms)"),
        };
        let mut next = self.clone();
        next.state = TaskState::TimedOut;
        next.error = Some(TaskError::new(TaskErrorKind::QueueTimeout, why.clone()));
        next.reason = Some(why);
        next.finished_at_ms = Some(now_ms);
        next.end(now_ms);
        Some(next)
    }

    /// Any live state → cancelled. A cancelled task is never retried; whatever its node
    /// still reports is a late result.
    pub fn cancelled(&self, now_ms: u64) -> Result<TaskRecord, Refused> {
        self.ensure_live()?;
        let mut next = self.clone();
        next.state = TaskState::Cancelled;
        next.reason = Some("cancelled".into());
        next.error = Some(TaskError::new(
            TaskErrorKind::Cancelled,
            "the task was cancelled",
        ));
        next.finished_at_ms = Some(now_ms);
        next.end(now_ms);
        Ok(next)
    }

    /// Scheduled or running → pending, when an operator moves the attempt off its node (a
    /// drain): the next placement is a new attempt, and no failure is counted.
    pub fn moved(&self, node: &NodeId, attempt: u32, now_ms: u64) -> Result<TaskRecord, Refused> {
        self.ensure_live()?;
        if !self.holds(node, attempt) {
            return Err(Refused::Superseded {
                node: node.clone(),
                attempt,
            });
        }
        let mut next = self.clone();
        next.state = TaskState::Pending;
        next.reason = Some(format!("moved off {node}, which an operator is draining"));
        next.push_history(now_ms);
        Ok(next)
    }

    /// A record being put back in the queue from the dead-letter stream: pending again,
    /// with its failures forgotten, under the submission it was created from.
    pub fn requeued(&self, task: TaskSubmission, now_ms: u64) -> TaskRecord {
        let mut next = self.clone();
        next.task = task;
        next.state = TaskState::Pending;
        next.failures = 0;
        next.reason = Some("requeued from the dead-letter stream".into());
        next.error = None;
        next.exit_code = None;
        next.finished_at_ms = None;
        next.not_before_ms = None;
        next.result_seq = None;
        next.node_id = None;
        next.push_history(now_ms);
        next
    }

    /// The result its submitters get for a task that ended without one of its own (it was
    /// cancelled, or timed out in the queue): the record's error, from node
    /// [`NO_NODE`] when no node held it.
    pub fn ended_without_result(&self) -> TaskResult {
        let finished_at_ms = self.finished_at_ms.unwrap_or(self.updated_at_ms);
        TaskResult {
            task_id: self.id.clone(),
            node_id: self
                .node_id
                .clone()
                .unwrap_or_else(|| NodeId::new(NO_NODE).expect("a valid node id")),
            attempt: self.attempt,
            outcome: Outcome::Failed {
                error: self.error.clone().unwrap_or_else(|| {
                    TaskError::new(
                        TaskErrorKind::Internal,
                        format!("the task is {}", self.state),
                    )
                }),
                stderr: Default::default(),
            },
            started_at_ms: self.started_at_ms.unwrap_or(finished_at_ms),
            finished_at_ms,
            reply_to: self.task.reply_to.clone(),
            stdout_object: None,
            usage: None,
        }
    }

    /// What the result stored at `result_seq` does to the task. `jitter` (0.0–1.0) spreads
    /// retry backoffs.
    pub fn settle(
        &self,
        result: &TaskResult,
        result_seq: u64,
        policy: &Policy,
        jitter: f64,
        now_ms: u64,
    ) -> Settlement {
        if self.applied_result_seq == Some(result_seq) {
            return Settlement::Repeat {
                effect: self.effect_of_applied(),
            };
        }
        if !self.holds(&result.node_id, result.attempt) {
            return Settlement::Superseded;
        }
        let retry = self.task.retry.clone().unwrap_or(RetryPolicy {
            max_attempts: policy.max_attempts,
            ..RetryPolicy::default()
        });
        let mut next = self.clone();
        next.applied_result_seq = Some(result_seq);
        next.finished_at_ms = Some(result.finished_at_ms);
        next.started_at_ms = Some(result.started_at_ms);
        let error = match &result.outcome {
            // A non-zero exit is the program's answer, told by `exit_code`; no error.
            Outcome::Completed { exit_code, .. } => {
                next.exit_code = Some(*exit_code);
                None
            }
            Outcome::Failed { error, .. } => Some(error.clone()),
        };
        let (state, effect) = match verdict(&result.outcome) {
            Verdict::Succeeded => (TaskState::Succeeded, Effect::Finish),
            verdict => {
                next.failures = self.failures + 1;
                let retryable = match verdict {
                    Verdict::Guest(kind) => retry.on.contains(&kind),
                    Verdict::System => true,
                    Verdict::Succeeded | Verdict::Final => false,
                };
                let described = describe(&result.outcome);
                if retryable && next.failures < retry.max_attempts.max(1) {
                    let wait = retry.backoff(next.failures, jitter);
                    let not_before_ms = now_ms.saturating_add(wait);
                    next.not_before_ms = Some(not_before_ms);
                    next.reason = Some(format!(
                        "attempt {} failed ({described}); retrying in {wait} ms",
                        result.attempt
                    ));
                    next.error = error;
                    next.state = TaskState::Pending;
                    next.push_history(now_ms);
                    return Settlement::Apply {
                        record: Box::new(next),
                        effect: Effect::Retry { not_before_ms },
                    };
                }
                if retryable {
                    next.reason = Some(format!(
                        "{} failed attempts, the last: {described}",
                        next.failures
                    ));
                    (TaskState::Dead, Effect::Bury)
                } else {
                    next.reason = Some(described);
                    let timed_out = matches!(
                        &result.outcome,
                        Outcome::Failed { error, .. } if error.kind == TaskErrorKind::Timeout
                    );
                    let state = if timed_out {
                        TaskState::TimedOut
                    } else {
                        TaskState::Failed
                    };
                    (state, Effect::Finish)
                }
            }
        };
        next.error = error;
        next.state = state;
        next.result_seq = Some(result_seq);
        next.end(now_ms);
        Settlement::Apply {
            record: Box::new(next),
            effect,
        }
    }

    /// The effect of the result this record last applied, for carrying it out again.
    fn effect_of_applied(&self) -> Effect {
        match self.state {
            TaskState::Dead => Effect::Bury,
            TaskState::Pending => Effect::Retry {
                not_before_ms: self.not_before_ms.unwrap_or(0),
            },
            _ => Effect::Finish,
        }
    }

    /// The bookkeeping of every terminal transition: the input is not needed any more,
    /// except by a dead task, which may be requeued.
    fn end(&mut self, now_ms: u64) {
        if self.state != TaskState::Dead {
            self.task.input = Default::default();
        }
        self.not_before_ms = None;
        self.push_history(now_ms);
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Completed { exit_code, .. } => format!("exit code {exit_code}"),
        Outcome::Failed { error, .. } => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ModuleRef;
    use crate::payload::Payload;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn submission() -> TaskSubmission {
        TaskSubmission {
            id: TaskId::new("t1").unwrap(),
            module: ModuleRef {
                sha256: "ab".into(),
                size: 2,
            },
            input: Payload::from("input"),
            limits: Default::default(),
            requirements: Default::default(),
            priority: Default::default(),
            reply_to: Some("_INBOX.a".into()),
            submitted_at_ms: 10,
            retry: None,
            queue_timeout_ms: None,
            fresh_id: true,
            grants: Default::default(),
        }
    }

    #[test]
    fn each_reply_subject_gets_the_encoding_its_submission_was_written_in() {
        let record = TaskRecord::new(submission(), 1, 10);
        let record = record
            .with_watcher("_INBOX.json", true)
            .expect("a new watcher");
        let record = record
            .with_watcher("_INBOX.msgpack", false)
            .expect("a new watcher");
        assert!(!record.replies_in_json("_INBOX.a"));
        assert!(record.replies_in_json("_INBOX.json"));
        assert!(!record.replies_in_json("_INBOX.msgpack"));
        assert!(record.with_watcher("_INBOX.json", true).is_none());
        assert_eq!(
            record.reply_subjects().collect::<Vec<_>>(),
            ["_INBOX.a", "_INBOX.json", "_INBOX.msgpack"]
        );
    }

    fn result(node_name: &str, attempt: u32, outcome: Outcome) -> TaskResult {
        TaskResult {
            task_id: TaskId::new("t1").unwrap(),
            node_id: node(node_name),
            attempt,
            outcome,
            started_at_ms: 20,
            finished_at_ms: 30,
            reply_to: Some("_INBOX.a".into()),
            stdout_object: None,
            usage: None,
        }
    }

    fn completed(exit_code: i32) -> Outcome {
        Outcome::Completed {
            exit_code,
            stdout: Payload::from("out"),
            stderr: Payload::default(),
        }
    }

    fn failed(kind: TaskErrorKind) -> Outcome {
        Outcome::Failed {
            error: TaskError::new(kind, "boom"),
            stderr: Payload::default(),
        }
    }

    const POLICY: Policy = Policy { max_attempts: 3 };

    fn scheduled_on(name: &str) -> TaskRecord {
        TaskRecord::new(submission(), 1, 10)
            .placed(&node(name), 1, 11)
            .unwrap()
    }

    fn applied(settlement: Settlement) -> (TaskRecord, Effect) {
        match settlement {
            Settlement::Apply { record, effect } => (*record, effect),
            other => panic!("expected the result to apply, got {other:?}"),
        }
    }

    #[test]
    fn a_task_goes_through_every_live_state_to_success() {
        let pending = TaskRecord::new(submission(), 1, 10);
        assert_eq!(pending.state, TaskState::Pending);
        let scheduled = pending.placed(&node("a"), 1, 11).unwrap();
        assert_eq!(
            (scheduled.state, scheduled.attempt),
            (TaskState::Scheduled, 1)
        );
        let running = scheduled.started(&node("a"), 1, 12, 12).unwrap();
        assert_eq!(running.state, TaskState::Running);
        let (done, effect) =
            applied(running.settle(&result("a", 1, completed(0)), 7, &POLICY, 0.5, 13));
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(effect, Effect::Finish);
        assert_eq!(done.result_seq, Some(7));
        assert!(
            done.task.input.is_empty(),
            "the input goes when the task ends"
        );
        let states: Vec<_> = done.history.iter().map(|step| step.state).collect();
        assert_eq!(
            states,
            [
                TaskState::Pending,
                TaskState::Scheduled,
                TaskState::Running,
                TaskState::Succeeded
            ]
        );
    }

    #[test]
    fn a_result_counts_even_when_the_started_signal_was_lost() {
        let (done, _) =
            applied(scheduled_on("a").settle(&result("a", 1, completed(0)), 7, &POLICY, 0.5, 13));
        assert_eq!(done.state, TaskState::Succeeded);
    }

    #[test]
    fn a_late_result_of_a_superseded_attempt_loses() {
        // Attempt 1 on `a` was lost; the task was retried on `b` as attempt 2.
        let first = scheduled_on("a");
        let (pending, _) = applied(first.settle(
            &result("a", 1, failed(TaskErrorKind::NodeLost)),
            5,
            &POLICY,
            0.0,
            12,
        ));
        let second = pending.placed(&node("b"), 2, 13).unwrap();
        // Node `a` comes back and reports attempt 1 after all: it changes nothing, whatever
        // order the two results arrive in.
        assert_eq!(
            second.settle(&result("a", 1, completed(0)), 8, &POLICY, 0.0, 14),
            Settlement::Superseded
        );
        let (done, _) = applied(second.settle(&result("b", 2, completed(0)), 9, &POLICY, 0.0, 15));
        assert_eq!(
            done.settle(&result("a", 1, completed(0)), 8, &POLICY, 0.0, 16),
            Settlement::Superseded
        );
        // The same attempt number from another node is not the owner's either.
        assert_eq!(
            second.settle(&result("c", 2, completed(0)), 10, &POLICY, 0.0, 16),
            Settlement::Superseded
        );
    }

    #[test]
    fn the_same_stored_result_read_again_repeats_its_effect() {
        let (done, _) =
            applied(scheduled_on("a").settle(&result("a", 1, completed(0)), 7, &POLICY, 0.5, 13));
        assert_eq!(
            done.settle(&result("a", 1, completed(0)), 7, &POLICY, 0.5, 14),
            Settlement::Repeat {
                effect: Effect::Finish
            }
        );
    }

    #[test]
    fn system_failures_are_retried_by_default_and_guest_failures_only_when_asked() {
        let (record, effect) = applied(scheduled_on("a").settle(
            &result("a", 1, failed(TaskErrorKind::Internal)),
            7,
            &POLICY,
            0.0,
            100,
        ));
        assert_eq!(record.state, TaskState::Pending);
        assert!(matches!(effect, Effect::Retry { not_before_ms } if not_before_ms >= 100));

        let (record, effect) = applied(scheduled_on("a").settle(
            &result("a", 1, failed(TaskErrorKind::Trap)),
            7,
            &POLICY,
            0.0,
            100,
        ));
        assert_eq!((record.state, effect), (TaskState::Failed, Effect::Finish));

        let (record, _) = applied(scheduled_on("a").settle(
            &result("a", 1, failed(TaskErrorKind::Timeout)),
            7,
            &POLICY,
            0.0,
            100,
        ));
        assert_eq!(record.state, TaskState::TimedOut);

        let (record, _) =
            applied(scheduled_on("a").settle(&result("a", 1, completed(3)), 7, &POLICY, 0.0, 100));
        assert_eq!(
            (record.state, record.exit_code),
            (TaskState::Failed, Some(3))
        );

        let mut asking = submission();
        asking.retry = Some(RetryPolicy {
            on: [RetryOn::Trap, RetryOn::NonZeroExit].into(),
            ..RetryPolicy::default()
        });
        let record = TaskRecord::new(asking, 1, 10)
            .placed(&node("a"), 1, 11)
            .unwrap();
        for outcome in [failed(TaskErrorKind::Trap), completed(1)] {
            let (retried, _) =
                applied(record.settle(&result("a", 1, outcome), 7, &POLICY, 0.0, 100));
            assert_eq!(retried.state, TaskState::Pending);
        }
        // A failure no attempt can fix is final even when retries are asked for.
        let (record, _) = applied(record.settle(
            &result("a", 1, failed(TaskErrorKind::InvalidModule)),
            7,
            &POLICY,
            0.0,
            100,
        ));
        assert_eq!(record.state, TaskState::Failed);
    }

    #[test]
    fn the_last_allowed_attempt_buries_the_task() {
        let mut record = scheduled_on("a");
        for attempt in 1..=3 {
            let (next, effect) = applied(record.settle(
                &result("a", attempt, failed(TaskErrorKind::NodeLost)),
                u64::from(attempt),
                &POLICY,
                0.0,
                100,
            ));
            if attempt < 3 {
                assert!(matches!(effect, Effect::Retry { .. }), "attempt {attempt}");
                record = next
                    .placed(&node("a"), 10 + u64::from(attempt), 101)
                    .unwrap();
            } else {
                assert_eq!((next.state, effect), (TaskState::Dead, Effect::Bury));
                assert_eq!(next.failures, 3);
            }
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            backoff_ms: 1_000,
            max_backoff_ms: 5_000,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.backoff(1, 1.0), 1_000);
        assert_eq!(policy.backoff(1, 0.0), 500);
        assert_eq!(policy.backoff(2, 1.0), 2_000);
        assert_eq!(policy.backoff(3, 1.0), 4_000);
        assert_eq!(policy.backoff(4, 1.0), 5_000);
        assert_eq!(policy.backoff(40, 1.0), 5_000);
    }

    #[test]
    fn a_cancelled_task_takes_no_later_event() {
        let cancelled = scheduled_on("a").cancelled(20).unwrap();
        assert_eq!(cancelled.state, TaskState::Cancelled);
        assert_eq!(
            cancelled.started(&node("a"), 1, 21, 21),
            Err(Refused::Ended(TaskState::Cancelled))
        );
        assert_eq!(
            cancelled.settle(&result("a", 1, completed(0)), 7, &POLICY, 0.0, 22),
            Settlement::Superseded
        );
        assert_eq!(
            cancelled.cancelled(23),
            Err(Refused::Ended(TaskState::Cancelled))
        );
        assert!(cancelled.placed(&node("b"), 2, 24).is_err());
    }

    #[test]
    fn a_started_signal_after_the_result_changes_nothing() {
        let (done, _) =
            applied(scheduled_on("a").settle(&result("a", 1, completed(0)), 7, &POLICY, 0.0, 13));
        assert_eq!(
            done.started(&node("a"), 1, 12, 14),
            Err(Refused::Ended(TaskState::Succeeded))
        );
    }

    #[test]
    fn queue_timeouts_end_only_pending_tasks_past_their_deadline() {
        let mut task = submission();
        task.queue_timeout_ms = Some(100);
        let pending = TaskRecord::new(task, 1, 10)
            .waiting("no node meets the requirements", 20)
            .unwrap();
        assert_eq!(pending.queue_timed_out(50), None);
        let timed_out = pending.queue_timed_out(110).unwrap();
        assert_eq!(timed_out.state, TaskState::TimedOut);
        assert!(timed_out.reason.unwrap().contains("no node meets"));
        let placed = pending.placed(&node("a"), 1, 30).unwrap();
        assert_eq!(placed.queue_timed_out(200), None);
    }

    #[test]
    fn a_waiting_reason_is_written_once() {
        let pending = TaskRecord::new(submission(), 1, 10);
        let waiting = pending.waiting("no node", 11).unwrap();
        assert_eq!(waiting.waiting("no node", 12), None);
        assert!(waiting.waiting("all nodes full", 12).is_some());
    }

    #[test]
    fn an_operator_move_costs_no_attempt() {
        let moved = scheduled_on("a").moved(&node("a"), 1, 20).unwrap();
        assert_eq!((moved.state, moved.failures), (TaskState::Pending, 0));
        let again = moved.placed(&node("b"), 2, 21).unwrap();
        assert_eq!(again.attempt, 2);
        assert!(matches!(
            scheduled_on("a").moved(&node("b"), 1, 20),
            Err(Refused::Superseded { .. })
        ));
    }

    #[test]
    fn states_have_their_wire_names() {
        for state in TaskState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
            assert_eq!(state.as_str().parse::<TaskState>().unwrap(), state);
        }
        assert_eq!(TaskState::TimedOut.as_str(), "timed_out");
    }
}
