//! Latency histograms with logarithmic buckets.
//!
//! A bucket covers latencies within 10% of each other, which keeps a percentile's
//! error under 10% while a whole day of one tenant's latencies fits in a few dozen
//! numbers. Histograms add up, so proxies can each report theirs and the store can
//! sum them per tenant and hour; percentiles are read from the sum.

use std::collections::BTreeMap;

/// Each bucket's upper bound is this factor above its lower bound.
const GROWTH: f64 = 1.1;
/// The last bucket; it holds everything from about 3 minutes up.
pub const MAX_BUCKET: u16 = 200;

/// The bucket a latency in microseconds falls into.
pub fn bucket_of(micros: u64) -> u16 {
    if micros <= 1 {
        return 0;
    }
    let b = ((micros as f64).ln() / GROWTH.ln()).floor();
    (b as u64).min(u64::from(MAX_BUCKET)) as u16
}

/// The upper bound of a bucket in microseconds: a percentile read from the
/// histogram is never lower than the true one.
pub fn upper_micros(bucket: u16) -> u64 {
    GROWTH.powi(i32::from(bucket) + 1).ceil() as u64
}

/// Counts of latencies per bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: BTreeMap<u16, u64>,
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        self.add(bucket_of(micros), 1);
    }

    /// Adds `count` latencies to a bucket; buckets past the last are clamped.
    pub fn add(&mut self, bucket: u16, count: u64) {
        if count > 0 {
            *self.counts.entry(bucket.min(MAX_BUCKET)).or_default() += count;
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (&b, &n) in &other.counts {
            self.add(b, n);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Non-empty buckets, lowest first.
    pub fn buckets(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.counts.iter().map(|(&b, &n)| (b, n))
    }

    /// The latency at quantile `q` (0.5 for p50, 0.99 for p99) in microseconds,
    /// as its bucket's upper bound; `None` for an empty histogram.
    pub fn quantile_micros(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        // The rank of the sample at the quantile, counted from 1.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (&b, &n) in &self.counts {
            seen += n;
            if seen >= rank {
                return Some(upper_micros(b));
            }
        }
        self.counts.keys().next_back().map(|&b| upper_micros(b))
    }
}

/// Formats microseconds for people: `850 µs`, `12.3 ms`, `1.20 s`.
pub fn format_micros(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.1} ms", micros as f64 / 1_000.0)
    } else {
        format!("{:.2} s", micros as f64 / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_latencies_within_ten_percent() {
        for micros in [2, 10, 999, 1_000, 12_345, 250_000, 5_000_000] {
            let b = bucket_of(micros);
            let upper = upper_micros(b);
            assert!(
                upper >= micros,
                "{micros} µs above its bucket's bound {upper}"
            );
            assert!(
                upper as f64 <= micros as f64 * 1.1 + 1.0,
                "{micros} µs: bound {upper} is more than 10% away"
            );
        }
        assert_eq!(bucket_of(u64::MAX), MAX_BUCKET);
    }

    #[test]
    fn quantiles_of_a_merged_histogram() {
        let mut fast = Histogram::default();
        for _ in 0..99 {
            fast.record(1_000);
        }
        let mut slow = Histogram::default();
        slow.record(100_000);
        fast.merge(&slow);
        assert_eq!(fast.total(), 100);
        let p50 = fast.quantile_micros(0.5).unwrap();
        assert!((1_000..=1_100).contains(&p50), "p50 {p50}");
        let p99 = fast.quantile_micros(0.99).unwrap();
        assert!((1_000..=1_100).contains(&p99), "p99 {p99}");
        let max = fast.quantile_micros(1.0).unwrap();
        assert!((100_000..=110_000).contains(&max), "max {max}");
        assert_eq!(Histogram::default().quantile_micros(0.5), None);
    }
}
