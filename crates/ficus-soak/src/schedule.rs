//! The fault schedule, drawn from the seed and nothing else: which faults, in
//! which order, at which offset into the fault window, and at which backfill
//! batch `ficus db apply` is killed. Two runs with one seed inject the same
//! faults at the same points of the migration, whatever the machine's speed.

use std::fmt;

/// A small deterministic generator (SplitMix64): the schedule must not depend
/// on a library's choice of algorithm, which may change between versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A fraction in `[0, 1)`.
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A fault injected during the fault window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// `kill -9` of one proxy replica, restarted a few seconds later.
    KillReplica,
    /// `SIGTERM` of the other replica: it must drain; restarted afterwards.
    TermReplica,
    /// `pg_ctl stop -m fast` and start of the control store's PostgreSQL while
    /// stage changes are being made.
    RestartStore,
    /// The new backend answers 500s, then hangs, for one migrated tenant: the
    /// guard must roll that tenant alone back.
    BreakNewForTenant,
    /// A tenant's stage flips while 1,000 of its requests are in flight.
    FlipUnderLoad,
    /// Billing events delivered twice each, shuffled, to both replicas at once.
    DuplicateEvents,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillReplica,
        Fault::TermReplica,
        Fault::RestartStore,
        Fault::BreakNewForTenant,
        Fault::FlipUnderLoad,
        Fault::DuplicateEvents,
    ];
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillReplica => "kill -9 of a proxy replica",
            Fault::TermReplica => "SIGTERM of a proxy replica (drain)",
            Fault::RestartStore => "restart of the control store's PostgreSQL",
            Fault::BreakNewForTenant => "new backend 500s then hangs for one tenant",
            Fault::FlipUnderLoad => "stage flip under 1,000 in-flight requests",
            Fault::DuplicateEvents => "billing events twice and out of order",
        })
    }
}

/// What the seed decided.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Schedule {
    pub seed: u64,
    /// `ficus db apply` is killed once this many backfill batches are reported.
    pub kill_backfill_after_batch: u64,
    /// Faults with their start, as a fraction of the fault window: one slot of
    /// the window per fault, in a shuffled order, at a random point of the
    /// slot's first half (a fault and its recovery must fit in its slot).
    pub faults: Vec<(f64, Fault)>,
    /// Which replica (0 or 1) is killed; the other one is drained.
    pub killed_replica: usize,
    /// The tenants the billing burst creates.
    pub new_tenants: usize,
}

impl Schedule {
    pub fn draw(seed: u64) -> Schedule {
        let mut rng = Rng::new(seed);
        let kill_backfill_after_batch = 1 + rng.below(3);
        let mut order = Fault::ALL.to_vec();
        rng.shuffle(&mut order);
        let slot = 1.0 / order.len() as f64;
        let faults = order
            .into_iter()
            .enumerate()
            .map(|(i, f)| (slot * (i as f64 + rng.fraction() * 0.5), f))
            .collect();
        Schedule {
            seed,
            kill_backfill_after_batch,
            faults,
            killed_replica: rng.below(2) as usize,
            new_tenants: 3 + rng.below(3) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_draws_one_schedule_and_every_fault_once_in_its_own_slot() {
        for seed in [0, 1, 7, 42, u64::MAX] {
            let a = Schedule::draw(seed);
            assert_eq!(a, Schedule::draw(seed));
            let mut seen: Vec<Fault> = a.faults.iter().map(|(_, f)| *f).collect();
            seen.sort_by_key(|f| Fault::ALL.iter().position(|g| g == f));
            assert_eq!(seen, Fault::ALL.to_vec());
            let slot = 1.0 / Fault::ALL.len() as f64;
            for (i, (at, _)) in a.faults.iter().enumerate() {
                assert!(*at >= slot * i as f64 && *at < slot * (i as f64 + 0.5));
            }
            assert!((1..=3).contains(&a.kill_backfill_after_batch));
        }
        assert_ne!(Schedule::draw(1).faults, Schedule::draw(2).faults);
    }

    #[test]
    fn the_generator_is_splitmix64() {
        // The reference values of SplitMix64 seeded with 0, so that a seed
        // written in BENCHMARKS.md replays the same schedule forever.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }
}
