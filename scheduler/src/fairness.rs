//! The fair share between the priority queues: which of `APIARY_TASKS`'s queues (high,
//! normal, low) a replica's next placements come from. Pure, tested with plain data.
//!
//! The share is a smooth weighted round-robin, the way nginx balances its upstreams: at each
//! turn, every queue taking part gains its weight in credit, and the one with the most credit
//! (the higher priority on a tie) has the turn and pays back the sum of the weights taking
//! part. The weights are [`HIGH_WEIGHT`], [`NORMAL_WEIGHT`] and [`LOW_WEIGHT`]: while all
//! three queues have work, every ten placements take six high, three normal and one low
//! task, spread evenly rather than in runs. A stream of high-priority tasks therefore
//! overtakes a backlog of low ones, and the low ones still move, at a tenth of the capacity
//! at worst: nothing starves.
//!
//! A queue takes part in a round until it is found empty ([`Queues::without`]); the turns it
//! would have had go to the others, so capacity is never idle while any queue has work (high
//! and low alone share 6 : 1, low alone has everything). Credit stays within a few turns'
//! worth: a queue pays for a turn it turned out not to need, and gains nothing while it sits
//! out, so a queue that was empty for a while gets its share when work comes, not a burst.
//!
//! Why not strict priority: a steady stream of high-priority tasks would keep the low ones
//! waiting forever. Why not ageing (raising a task's priority as it waits): it needs each
//! waiting task's age, which only reading the queue would tell, where a share needs nothing
//! but counts. Every placement costs the same here (one of a node's places), so a plain
//! round-robin is enough; deficit round-robin would weigh costs that do not differ.

use apiary_proto::message::Priority;

/// The weight of the high-priority queue: six in every ten placements while all three
/// queues have work.
pub const HIGH_WEIGHT: u32 = 6;
/// The weight of the normal queue: three in every ten.
pub const NORMAL_WEIGHT: u32 = 3;
/// The weight of the low-priority queue: one in every ten, so it never starves.
pub const LOW_WEIGHT: u32 = 1;

/// The weight of the queue of `priority`.
pub fn weight(priority: Priority) -> u32 {
    match priority {
        Priority::High => HIGH_WEIGHT,
        Priority::Normal => NORMAL_WEIGHT,
        Priority::Low => LOW_WEIGHT,
    }
}

/// The position of a queue in [`Priority::ALL`] (highest first), which is also the order in
/// which ties are broken.
fn index(priority: Priority) -> usize {
    match priority {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

/// A set of queues: those taking part in a share, or those a submission was published to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queues(u8);

impl Queues {
    pub const NONE: Queues = Queues(0);
    pub const ALL: Queues = Queues(0b111);

    fn bit(priority: Priority) -> u8 {
        1 << index(priority)
    }

    pub fn with(self, priority: Priority) -> Queues {
        Queues(self.0 | Self::bit(priority))
    }

    pub fn without(self, priority: Priority) -> Queues {
        Queues(self.0 & !Self::bit(priority))
    }

    pub fn contains(self, priority: Priority) -> bool {
        self.0 & Self::bit(priority) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 & Self::ALL.0 == 0
    }

    /// The highest priority in the set.
    pub fn highest(self) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|priority| self.contains(*priority))
    }

    /// The set as bits, for keeping it in an atomic.
    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn from_bits(bits: u8) -> Queues {
        Queues(bits & Self::ALL.0)
    }
}

/// Which queues a round asks at all. A queue found with less than it was asked for is taken
/// to be empty, and left alone until a submission is published to it or `recheck_ms` has
/// passed (a message handed back with a delay comes back without a publish). Without it,
/// every round would also ask the queues that have nothing: a pull request, its "no
/// messages" answer and a short-lived subscription each, per round, at thousands of rounds a
/// second, all for nothing while one queue has all the work.
#[derive(Clone, Debug)]
pub struct EmptyQueues {
    /// When each queue was last found empty (ms), if it is taken to be empty now.
    found_empty_at: [Option<u64>; 3],
    recheck_ms: u64,
}

impl EmptyQueues {
    pub fn new(recheck_ms: u64) -> Self {
        Self {
            found_empty_at: [None; 3],
            recheck_ms,
        }
    }

    /// The queues worth asking at `now_ms` (a monotonic clock), given those `published` to
    /// since the last look.
    pub fn worth_asking(&mut self, published: Queues, now_ms: u64) -> Queues {
        let mut queues = Queues::NONE;
        for priority in Priority::ALL {
            let found_empty_at = &mut self.found_empty_at[index(priority)];
            if published.contains(priority)
                || found_empty_at.is_some_and(|at| now_ms.saturating_sub(at) >= self.recheck_ms)
            {
                *found_empty_at = None;
            }
            if found_empty_at.is_none() {
                queues = queues.with(priority);
            }
        }
        queues
    }

    /// The queue of `priority` had less than it was asked for at `now_ms`.
    pub fn found_empty(&mut self, priority: Priority, now_ms: u64) {
        self.found_empty_at[index(priority)].get_or_insert(now_ms);
    }
}

/// How many of the next placements each queue is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Share([usize; 3]);

impl Share {
    pub fn of(&self, priority: Priority) -> usize {
        self.0[index(priority)]
    }

    pub fn total(&self) -> usize {
        self.0.iter().sum()
    }
}

/// One replica's round-robin between the queues: the credit each has, carried from one
/// pull to the next.
#[derive(Clone, Debug, Default)]
pub struct FairShare {
    credit: [i64; 3],
}

impl FairShare {
    /// One turn among the queues `taking_part`: whose it is, or `None` when none takes part.
    pub fn turn(&mut self, taking_part: Queues) -> Option<Priority> {
        let mut total = 0;
        let mut best: Option<Priority> = None;
        for priority in Priority::ALL {
            if !taking_part.contains(priority) {
                continue;
            }
            let weight = i64::from(weight(priority));
            total += weight;
            self.credit[index(priority)] += weight;
            // Strictly more: on a tie the earlier, higher priority keeps the turn.
            if best.is_none_or(|best| self.credit[index(priority)] > self.credit[index(best)]) {
                best = Some(priority);
            }
        }
        let best = best?;
        self.credit[index(best)] -= total;
        Some(best)
    }

    /// The next `wanted` turns among the queues `taking_part`, counted per queue: how many
    /// messages to ask each queue for.
    pub fn share(&mut self, wanted: usize, taking_part: Queues) -> Share {
        let mut share = Share::default();
        for _ in 0..wanted {
            match self.turn(taking_part) {
                Some(priority) => share.0[index(priority)] += 1,
                None => break,
            }
        }
        share
    }

    /// The credit each queue holds now, highest priority first.
    #[cfg(test)]
    fn credit(&self) -> [i64; 3] {
        self.credit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIGH: Priority = Priority::High;
    const NORMAL: Priority = Priority::Normal;
    const LOW: Priority = Priority::Low;

    fn turns(fair: &mut FairShare, count: usize, taking_part: Queues) -> Vec<Priority> {
        (0..count)
            .map(|_| fair.turn(taking_part).expect("a queue takes part"))
            .collect()
    }

    fn count(turns: &[Priority], priority: Priority) -> usize {
        turns.iter().filter(|turn| **turn == priority).count()
    }

    #[test]
    fn three_backlogged_queues_share_six_three_one_in_every_ten_turns() {
        let mut fair = FairShare::default();
        let all = turns(&mut fair, 1000, Queues::ALL);
        assert_eq!(
            [count(&all, HIGH), count(&all, NORMAL), count(&all, LOW)],
            [600, 300, 100]
        );
        // Smooth: every run of ten turns has the same mix, not six high ones in a row and
        // then the rest.
        for ten in all.chunks(10) {
            assert_eq!(
                [count(ten, HIGH), count(ten, NORMAL), count(ten, LOW)],
                [6, 3, 1],
                "{ten:?}"
            );
        }
        assert_eq!(
            &all[..10],
            [
                HIGH, NORMAL, HIGH, HIGH, NORMAL, HIGH, LOW, HIGH, NORMAL, HIGH
            ]
        );
    }

    #[test]
    fn low_priority_work_never_waits_more_than_ten_turns() {
        let mut fair = FairShare::default();
        let all = turns(&mut fair, 1000, Queues::ALL);
        let lows: Vec<usize> = (0..all.len()).filter(|i| all[*i] == LOW).collect();
        assert!(lows[0] < 10);
        assert!(lows.windows(2).all(|pair| pair[1] - pair[0] <= 10));
    }

    #[test]
    fn a_share_counts_the_turns_per_queue() {
        let mut fair = FairShare::default();
        let share = fair.share(10, Queues::ALL);
        assert_eq!([share.of(HIGH), share.of(NORMAL), share.of(LOW)], [6, 3, 1]);
        assert_eq!(share.total(), 10);
        // The credit is back where it started after a whole cycle.
        assert_eq!(fair.credit(), [0, 0, 0]);
        let share = fair.share(20, Queues::ALL);
        assert_eq!(
            [share.of(HIGH), share.of(NORMAL), share.of(LOW)],
            [12, 6, 2]
        );
    }

    #[test]
    fn empty_queues_give_their_turns_to_the_others() {
        let mut fair = FairShare::default();
        let high_and_low = Queues::ALL.without(NORMAL);
        let some = turns(&mut fair, 70, high_and_low);
        assert_eq!([count(&some, HIGH), count(&some, LOW)], [60, 10]);
        let only_low = Queues::NONE.with(LOW);
        assert_eq!(turns(&mut fair, 5, only_low), [LOW; 5]);
        assert_eq!(fair.turn(Queues::NONE), None);
        assert_eq!(fair.share(3, Queues::NONE).total(), 0);
    }

    #[test]
    fn a_queue_that_was_empty_gets_its_share_back_but_no_burst() {
        let mut fair = FairShare::default();
        turns(&mut fair, 500, Queues::ALL.without(LOW));
        let after = turns(&mut fair, 20, Queues::ALL);
        assert!((1..=3).contains(&count(&after, LOW)), "{after:?}");
        assert!(count(&after, HIGH) >= 11, "{after:?}");
    }

    #[test]
    fn credit_stays_bounded_whatever_the_queues_do() {
        // Which queues take part changes at random (a fixed sequence, for repeatability):
        // the credit never drifts, so no queue can build up a debt or a hoard.
        let mut fair = FairShare::default();
        let mut seed: u32 = 0x2545_f491;
        let mut served = [0usize; 3];
        for _ in 0..100_000 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let taking_part = Queues::from_bits((seed >> 24) as u8);
            if let Some(priority) = fair.turn(taking_part) {
                assert!(taking_part.contains(priority));
                served[index(priority)] += 1;
            }
            let total = i64::from(HIGH_WEIGHT + NORMAL_WEIGHT + LOW_WEIGHT);
            assert!(
                fair.credit().iter().all(|credit| credit.abs() <= 2 * total),
                "{:?}",
                fair.credit()
            );
        }
        assert!(served.iter().all(|served| *served > 0), "{served:?}");
    }

    #[test]
    fn a_queue_found_empty_is_asked_again_after_a_publish_or_the_recheck() {
        let mut empty = EmptyQueues::new(250);
        assert_eq!(empty.worth_asking(Queues::NONE, 0), Queues::ALL);
        empty.found_empty(HIGH, 10);
        empty.found_empty(LOW, 10);
        let normal_only = Queues::NONE.with(NORMAL);
        assert_eq!(empty.worth_asking(Queues::NONE, 20), normal_only);
        // Found empty again later: the first time counts, so the recheck still comes.
        empty.found_empty(HIGH, 200);
        // A publish to the low queue brings it back at once.
        assert_eq!(
            empty.worth_asking(Queues::NONE.with(LOW), 30),
            normal_only.with(LOW)
        );
        // The high queue is asked again once the recheck is due, publish or not.
        assert_eq!(empty.worth_asking(Queues::NONE, 259), normal_only.with(LOW));
        assert_eq!(empty.worth_asking(Queues::NONE, 260), Queues::ALL);
        for priority in Priority::ALL {
            empty.found_empty(priority, 300);
        }
        assert_eq!(empty.worth_asking(Queues::NONE, 301), Queues::NONE);
    }

    #[test]
    fn queue_sets() {
        let set = Queues::NONE.with(LOW).with(NORMAL);
        assert!(set.contains(LOW) && set.contains(NORMAL) && !set.contains(HIGH));
        assert_eq!(set.highest(), Some(NORMAL));
        assert_eq!(Queues::from_bits(set.bits()), set);
        assert!(set.without(LOW).without(NORMAL).is_empty());
        assert_eq!(Queues::NONE.highest(), None);
        assert_eq!(Queues::ALL.highest(), Some(HIGH));
    }
}
