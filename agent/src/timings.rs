//! Recent durations of one kind, kept for the agent's status: a ring of the last
//! [`KEPT`] samples, summarised on request.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use apiary_proto::message::Percentiles;

/// Samples kept: enough for a steady p99, little enough to sort on each status request.
pub const KEPT: usize = 1024;

/// The last [`KEPT`] durations recorded, in microseconds.
#[derive(Debug, Default)]
pub(crate) struct RecentDurations {
    samples: Mutex<VecDeque<u64>>,
}

impl RecentDurations {
    pub(crate) fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let mut samples = self.lock();
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(micros);
    }

    pub(crate) fn summary(&self) -> Option<Percentiles> {
        Percentiles::of(self.lock().iter().copied())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        // Each critical section is one push or one copy, which cannot panic halfway.
        self.samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_samples_are_kept() {
        let recent = RecentDurations::default();
        assert_eq!(recent.summary(), None);
        for micros in 0..(KEPT as u64 + 10) {
            recent.record(Duration::from_micros(micros));
        }
        let summary = recent.summary().expect("samples");
        assert_eq!(summary.samples, KEPT as u64);
        assert_eq!(summary.max_us, KEPT as u64 + 9);
        assert_eq!(Percentiles::of(10..(KEPT as u64 + 10)), Some(summary));
    }
}
