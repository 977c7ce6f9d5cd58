//! Telling systemd how the agent is doing (the `sd_notify` protocol), for the unit's
//! `Type=notify` and `WatchdogSec=`:
//!
//! - [`status`] while the agent is still joining, so `systemctl status` says what it waits for;
//! - [`ready`] once the cluster has registered the node: only then is the unit `active`;
//! - [`stopping`] when shutdown begins, so systemd shows `deactivating` during the drain;
//! - [`Watchdog`], fed from the heartbeat loop while that loop is alive.
//!
//! Everything is a no-op when the agent does not run under systemd (`NOTIFY_SOCKET` unset):
//! in tests, under `apiary dev`, from a shell. Nothing here is an error for the agent: a
//! notification that cannot be sent is logged, and the agent carries on.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states` to systemd if it is listening. A failure is logged, not returned: the
/// agent's work never depends on systemd hearing about it.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "could not notify systemd (NOTIFY_SOCKET)");
    }
}

/// Shows `text` as the unit's status line in `systemctl status`.
pub(crate) fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// Tells systemd that start-up is complete (`READY=1`): the node is registered. For a
/// `Type=notify` unit this ends the start job, and only from here on does systemd enforce
/// `WatchdogSec=`.
pub(crate) fn ready(text: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// Tells systemd that the agent is shutting down (`STOPPING=1`). Also sent when the agent
/// stops on its own rather than on `systemctl stop`, so that the drain (up to the shutdown
/// grace) shows as `deactivating` and is timed by `TimeoutStopSec=`, not by the watchdog.
pub(crate) fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// How often to feed a watchdog that fires after `timeout` without a feed: half of it, as
/// `sd_watchdog_enabled(3)` advises, which leaves the other half for a loop iteration that
/// is busy when a feed falls due (a heartbeat, or a heartbeat and a re-registration, each
/// bounded by the request timeout). `None` when there is no watchdog; a zero timeout (never
/// set by systemd, but possible by hand) counts as none rather than feeding in a busy loop.
pub(crate) fn feed_period(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|timeout| !timeout.is_zero()).map(|timeout| {
        // Half of at least 2 µs is never zero, which tokio's interval would refuse.
        timeout.max(Duration::from_micros(2)) / 2
    })
}

/// systemd's service watchdog (`WatchdogSec=`, `WATCHDOG=1`), fed on its own schedule.
///
/// The heartbeat loop polls [`Watchdog::feed_when_due`] beside its heartbeat ticker, so the
/// watchdog is fed every half watchdog period for as long as that loop keeps coming back to
/// wait, however long the scheduler's heartbeat interval is. It is fed whether or not the
/// heartbeats are answered: an agent whose NATS server or scheduler is away keeps working
/// (and keeps its results), which is no reason for systemd to kill it. What stops the feeding
/// is the loop itself stalling (a wedged runtime, a deadlock), which is what the watchdog
/// is for.
#[derive(Debug)]
pub(crate) struct Watchdog {
    ticker: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// The watchdog systemd configured for this process (`WATCHDOG_USEC`, and `WATCHDOG_PID`
    /// when set naming this process), or one that is never fed when there is none.
    pub(crate) fn from_env() -> Self {
        Self::new(sd_notify::watchdog_enabled())
    }

    /// A watchdog that fires after `timeout` without a feed; `None` for no watchdog.
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        let ticker = feed_period(timeout).map(|period| {
            let mut ticker = tokio::time::interval(period);
            // After a long iteration, feed once at once and then keep the period from there,
            // rather than feeding several times in a row to catch up.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        Self { ticker }
    }

    /// Waits until a feed is due and sends it (`WATCHDOG=1`); the first is due at once. With
    /// no watchdog it never completes, so it can stand in a `select!` unconditionally.
    pub(crate) async fn feed_when_due(&mut self) {
        match &mut self.ticker {
            Some(ticker) => {
                ticker.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_fed_at_half_its_timeout() {
        assert_eq!(
            feed_period(Some(Duration::from_secs(30))),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            feed_period(Some(Duration::from_micros(1_500_001))),
            Some(Duration::from_nanos(750_000_500))
        );
    }

    #[test]
    fn no_or_zero_timeout_means_no_feeding() {
        assert_eq!(feed_period(None), None);
        assert_eq!(feed_period(Some(Duration::ZERO)), None);
    }

    #[test]
    fn a_tiny_timeout_still_gives_a_usable_period() {
        let period = feed_period(Some(Duration::from_nanos(1))).unwrap();
        assert!(!period.is_zero());
    }

    // The tests below run on the real clock (tokio's paused clock needs its `test-util`
    // feature, which would rebuild tokio for every test build), with short periods and
    // bounds loose enough for a busy machine.

    #[tokio::test]
    async fn feeds_come_every_half_timeout_and_the_first_at_once() {
        let mut watchdog = Watchdog::new(Some(Duration::from_millis(200)));
        let start = tokio::time::Instant::now();
        watchdog.feed_when_due().await;
        assert!(start.elapsed() < Duration::from_millis(100));
        watchdog.feed_when_due().await;
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn without_a_watchdog_no_feed_is_ever_due() {
        let mut watchdog = Watchdog::new(None);
        let due = tokio::time::timeout(Duration::from_millis(200), watchdog.feed_when_due());
        assert!(due.await.is_err());
    }

    #[tokio::test]
    async fn a_long_heartbeat_interval_does_not_starve_the_watchdog() {
        // The scheduler may ask for heartbeats less often than half the watchdog timeout;
        // the loop's select sees the watchdog's own tick in between. Here heartbeats every
        // 10 s against a 200 ms watchdog, fed every 100 ms.
        let mut heartbeats = tokio::time::interval(Duration::from_secs(10));
        let mut watchdog = Watchdog::new(Some(Duration::from_millis(200)));
        let start = tokio::time::Instant::now();
        let (mut beats, mut feeds) = (0, 0);
        while start.elapsed() < Duration::from_millis(600) {
            tokio::select! {
                () = watchdog.feed_when_due() => feeds += 1,
                _ = heartbeats.tick() => beats += 1,
            }
        }
        assert_eq!(beats, 1, "only the first heartbeat is due");
        assert!(feeds >= 4, "{feeds} feeds in 600 ms");
    }
}
