//! Cancel notices: a scheduler that cancels a placed task tells its node
//! (`apiary.v1.node.<node>.cancel`, core NATS), and the agent stops the attempt if it runs
//! here (the sandbox's epoch callback sees the stop within a tick), or skips it should its
//! dispatch arrive afterwards. The task's record is already `cancelled`, so whatever the run
//! still reports is a late result the scheduler discards.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use apiary_proto::codec;
use apiary_proto::message::{CancelAttempt, attempt_msg_id};
use apiary_proto::subject::{self, NodeVerb};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::Agent;

/// How many cancelled attempts an agent remembers, for dispatches that arrive after their
/// cancel notice.
const REMEMBERED: usize = 4096;

/// The stop flags of the attempts running here, and the attempts cancelled lately.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    running: HashMap<String, Running>,
    cancelled: HashSet<String>,
    order: VecDeque<String>,
    /// The node is draining and its drain deadline has passed: every run is stopped, and
    /// what it did is not its task's result.
    past_drain_deadline: bool,
}

#[derive(Debug)]
struct Running {
    stop: Arc<AtomicBool>,
    /// Stopped by the node's drain deadline.
    drained: bool,
}

/// How an attempt's run ended, as far as stopping it from outside goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// It ran its course, or was cancelled: its result stands.
    Ran,
    /// The node's drain deadline stopped it: the task goes back to be placed elsewhere.
    Drained,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section is a few map operations that cannot panic halfway.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The stop flag of an attempt starting now; already set if it was cancelled before, or
    /// if the node's drain deadline has passed.
    pub fn starting(&self, attempt_id: &str) -> Arc<AtomicBool> {
        let mut inner = self.lock();
        let drained = inner.past_drain_deadline;
        let stop = Arc::new(AtomicBool::new(
            drained || inner.cancelled.contains(attempt_id),
        ));
        let running = Running {
            stop: stop.clone(),
            drained,
        };
        inner.running.insert(attempt_id.to_owned(), running);
        stop
    }

    /// Stops every running attempt: the agent is going and will not wait for them. Their
    /// dispatches, never acknowledged, are delivered again.
    pub fn stop_all(&self) {
        for running in self.lock().running.values() {
            running.stop.store(true, Ordering::Relaxed);
        }
    }

    /// The node's drain deadline has passed: stops every run, now and until
    /// [`Cancels::drain_deadline_lifted`], as drained.
    pub fn drain_deadline_passed(&self) {
        let mut inner = self.lock();
        inner.past_drain_deadline = true;
        for running in inner.running.values_mut() {
            running.drained = true;
            running.stop.store(true, Ordering::Relaxed);
        }
    }

    /// The node's schedule changed after its drain deadline passed (opened again, or given
    /// a new deadline): runs that start from now on run.
    pub fn drain_deadline_lifted(&self) {
        self.lock().past_drain_deadline = false;
    }

    /// The attempt's run is over; says whether the drain deadline stopped it.
    pub fn finished(&self, attempt_id: &str) -> Finished {
        match self.lock().running.remove(attempt_id) {
            Some(Running { drained: true, .. }) => Finished::Drained,
            _ => Finished::Ran,
        }
    }

    pub fn is_cancelled(&self, attempt_id: &str) -> bool {
        self.lock().cancelled.contains(attempt_id)
    }

    /// Stops the attempt if it runs, and remembers it. True if it was running.
    pub fn cancel(&self, attempt_id: &str) -> bool {
        let mut inner = self.lock();
        if inner.cancelled.insert(attempt_id.to_owned()) {
            inner.order.push_back(attempt_id.to_owned());
            while inner.order.len() > REMEMBERED {
                if let Some(oldest) = inner.order.pop_front() {
                    inner.cancelled.remove(&oldest);
                }
            }
        }
        match inner.running.get(attempt_id) {
            Some(running) => {
                running.stop.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Listens for this node's cancel notices until `stop`.
pub(crate) async fn listen(agent: Arc<Agent>, stop: CancellationToken) {
    let subject = subject::node(&agent.node_id, NodeVerb::Cancel);
    let mut notices = match agent.client.subscribe(subject.to_string()).await {
        Ok(notices) => notices,
        Err(err) => {
            tracing::error!(error = %err, "failed to listen for cancel notices");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            message = notices.next() => message,
        };
        let Some(message) = message else { return };
        let Ok((notice, _)) =
            codec::decode_message::<CancelAttempt>(message.headers.as_ref(), &message.payload)
        else {
            tracing::debug!("ignoring a malformed cancel notice");
            continue;
        };
        let attempt_id = attempt_msg_id(&notice.task_id, notice.attempt);
        let running = agent.cancels.cancel(&attempt_id);
        tracing::info!(task_id = %notice.task_id, attempt = notice.attempt, running, "task cancelled");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_stops_a_running_attempt_and_one_that_starts_later() {
        let cancels = Cancels::default();
        let running = cancels.starting("t.1");
        assert!(!running.load(Ordering::Relaxed));
        assert!(cancels.cancel("t.1"));
        assert!(running.load(Ordering::Relaxed));
        cancels.finished("t.1");
        assert!(!cancels.cancel("t.2"));
        assert!(cancels.is_cancelled("t.2"));
        assert!(cancels.starting("t.2").load(Ordering::Relaxed));
        assert!(!cancels.is_cancelled("t.3"));
    }

    #[test]
    fn stopping_all_reaches_every_running_attempt_and_no_finished_one() {
        let cancels = Cancels::default();
        let (a, b) = (cancels.starting("a.1"), cancels.starting("b.1"));
        let done = cancels.starting("c.1");
        cancels.finished("c.1");
        cancels.stop_all();
        assert!(a.load(Ordering::Relaxed) && b.load(Ordering::Relaxed));
        assert!(!done.load(Ordering::Relaxed));
    }

    #[test]
    fn the_drain_deadline_stops_what_runs_and_starts_until_it_is_lifted() {
        let cancels = Cancels::default();
        let cancelled = cancels.starting("a.1");
        cancels.cancel("a.1");
        let running = cancels.starting("b.1");
        let done = cancels.starting("c.1");
        assert_eq!(cancels.finished("c.1"), Finished::Ran);

        cancels.drain_deadline_passed();
        assert!(running.load(Ordering::Relaxed));
        assert!(!done.load(Ordering::Relaxed));
        let late = cancels.starting("d.1");
        assert!(
            late.load(Ordering::Relaxed),
            "a run starting past the deadline is stopped"
        );
        assert!(cancelled.load(Ordering::Relaxed));
        for attempt in ["a.1", "b.1", "d.1"] {
            assert_eq!(cancels.finished(attempt), Finished::Drained, "{attempt}");
        }

        cancels.drain_deadline_lifted();
        let reopened = cancels.starting("e.1");
        assert!(!reopened.load(Ordering::Relaxed));
        assert_eq!(cancels.finished("e.1"), Finished::Ran);
    }
}
