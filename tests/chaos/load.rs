//! The load generator: submits tasks through the SDK at a steady rate, each with its own
//! input, and follows every handle until it resolves or the run gives up on it.

use std::sync::Arc;
use std::time::Duration;

use apiary_proto::message::ModuleRef;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ledger::{self, Ledger};

/// Bounds one submit. The SDK's own JetStream acknowledgement wait is shorter; this only
/// guards against a submit that never returns.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Load {
    pub client: apiary_sdk::Client,
    pub module: ModuleRef,
    pub ledger: Arc<Ledger>,
    /// Cancelled when the drain period ends: handles still waiting then are the lost ones.
    pub give_up: CancellationToken,
    pub tasks: TaskTracker,
}

impl Load {
    /// Submits `rate` tasks per second until `until`. Each submit and the wait for its
    /// result run in their own task, so a slow submit (the server is away) never holds back
    /// the ones after it.
    pub async fn run(&self, rate: f64, until: Instant) {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
        // A driver that fell behind (a busy machine) resumes the steady rate rather than
        // bursting to catch up.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = ticks.tick() => self.submit_one(),
            }
        }
    }

    fn submit_one(&self) {
        let n = self.ledger.submitting();
        let task = apiary_sdk::Task::stored(self.module.clone()).input(ledger::input(n));
        let client = self.client.clone();
        let ledger = self.ledger.clone();
        let give_up = self.give_up.clone();
        self.tasks.spawn(async move {
            let handle = match tokio::time::timeout(SUBMIT_TIMEOUT, client.submit(task)).await {
                Ok(Ok(handle)) => handle,
                // The SDK made the task id inside `submit`, so a failed submit has nothing to
                // retry under the same id: it is counted, and the task is not expected back.
                Ok(Err(_)) | Err(_) => {
                    ledger.submit_failed(n);
                    return;
                }
            };
            ledger.acknowledged(n, handle.id().clone());
            tokio::select! {
                result = handle.report() => ledger.resolved(n, result),
                () = give_up.cancelled() => {}
            }
        });
    }
}
