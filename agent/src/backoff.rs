//! Capped exponential backoff with jitter, for the agent's loops that wait for the server
//! (joining the bus, registering, replaying the outbox).

use std::time::Duration;

/// The pause before each retry: doubling from `first` up to `cap`, each pause give or take a
/// fifth, so that a fleet that lost its server together (a power cut, a server restart)
/// does not come back in lockstep.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            next: first.min(cap),
            cap,
        }
    }

    /// The pause before the next retry; the one after it is twice as long, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(0.8 + 0.4 * fastrand::f64()).min(self.cap);
        self.next = (self.next * 2).min(self.cap);
        delay
    }

    /// Starts again from the first pause, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.first.min(self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(80) && delays[0] <= Duration::from_millis(120));
        assert!(delays[1] >= Duration::from_millis(160) && delays[1] <= Duration::from_millis(240));
        assert!(delays.iter().all(|delay| *delay <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(800));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let delays: Vec<Duration> = (0..100)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(5)).next_delay())
            .collect();
        assert!(delays.iter().any(|delay| *delay != delays[0]));
    }
}
