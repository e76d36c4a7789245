//! The agent's own cost per request, for `meshctl impact`: how long a request spends
//! inside the agent, and how long its AuthorizationPolicy decision takes.
//!
//! The time inside the agent is Envoy's "proxy overhead": from the request head's arrival
//! to its response head being ready to go back, minus the time spent waiting for the
//! upstream's response head (every try, and the backoff between tries) — what Envoy users
//! get as the request's time to response headers less `x-envoy-upstream-service-time`.
//! Bodies stream through afterwards; what copying them costs shows in the agent's CPU
//! seconds (`process_cpu_seconds_total`), not here.
//!
//! Recording takes no lock: each histogram is an array of atomic counters, so every
//! connection adds to it without waiting for another (prometheus-client's `Histogram`
//! takes a write lock per observation, which all connections would share).

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

/// Buckets of `mesh_request_agent_seconds`: 10 µs to 1 s.
pub const AGENT_BUCKETS: [f64; 16] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];
/// Buckets of `mesh_policy_evaluation_seconds`: 1 µs to 10 ms.
pub const POLICY_BUCKETS: [f64; 12] = [
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.0025, 0.01,
];

/// A histogram of durations in seconds, updated with atomic additions only.
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// Per bucket, then the count above the last bound.
    counts: Vec<AtomicU64>,
    /// The sum of the observations, in nanoseconds (exact, and atomic).
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let index = self.bounds.partition_point(|bound| *bound < seconds);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The sum in seconds, the count and the per-bucket counts (the encoder accumulates
    /// them), read without stopping writers: a scrape may see an observation's bucket
    /// before its sum, which the next scrape settles.
    fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, counts.iter().sum(), buckets)
    }
}

/// Where a request's time inside the agent is counted: the source pod's agent (it routed
/// the request) or the destination pod's (it judged it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// The agent's timing histograms, a Prometheus collector.
#[derive(Clone)]
pub struct Timing {
    inner: Arc<Histograms>,
}

struct Histograms {
    source: AtomicHistogram,
    destination: AtomicHistogram,
    policy: AtomicHistogram,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            inner: Arc::new(Histograms {
                source: AtomicHistogram::new(&AGENT_BUCKETS),
                destination: AtomicHistogram::new(&AGENT_BUCKETS),
                policy: AtomicHistogram::new(&POLICY_BUCKETS),
            }),
        }
    }
}

impl fmt::Debug for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timing").finish_non_exhaustive()
    }
}

impl Timing {
    /// Counts a request's time inside the agent.
    pub fn agent_time(&self, side: Side, took: Duration) {
        match side {
            Side::Source => self.inner.source.observe(took),
            Side::Destination => self.inner.destination.observe(took),
        }
    }

    /// Counts one request's AuthorizationPolicy evaluation.
    pub fn policy_evaluation(&self, took: Duration) {
        self.inner.policy.observe(took);
    }
}

impl Collector for Timing {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut agent = encoder.encode_descriptor(
            "mesh_request_agent_seconds",
            "Time a request spends inside this agent (request head in to response head out, less the wait for the upstream's response head), by reporter",
            None,
            MetricType::Histogram,
        )?;
        for (reporter, histogram) in [
            ("source", &self.inner.source),
            ("destination", &self.inner.destination),
        ] {
            let (sum, count, buckets) = histogram.read();
            agent
                .encode_family(&[("reporter", reporter)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let mut policy = encoder.encode_descriptor(
            "mesh_policy_evaluation_seconds",
            "Time to judge one request against its destination's AuthorizationPolicies and RequestAuthentications",
            None,
            MetricType::Histogram,
        )?;
        let (sum, count, buckets) = self.inner.policy.read();
        policy.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = AtomicHistogram::new(&[0.001, 0.01]);
        histogram.observe(Duration::from_micros(1000));
        histogram.observe(Duration::from_micros(1001));
        histogram.observe(Duration::from_secs(2));
        let (sum, count, buckets) = histogram.read();
        assert_eq!(count, 3);
        assert_eq!(buckets, vec![(0.001, 1), (0.01, 1), (f64::MAX, 1)]);
        assert!((sum - 2.002001).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn the_exposition_has_both_reporters_and_the_policy_histogram() {
        let timing = Timing::default();
        timing.agent_time(Side::Source, Duration::from_micros(30));
        timing.agent_time(Side::Destination, Duration::from_micros(300));
        timing.agent_time(Side::Destination, Duration::from_micros(300));
        timing.policy_evaluation(Duration::from_micros(3));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(timing));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "mesh_request_agent_seconds_bucket{le=\"0.00005\",reporter=\"source\"} 1",
            "mesh_request_agent_seconds_count{reporter=\"source\"} 1",
            "mesh_request_agent_seconds_bucket{le=\"0.00025\",reporter=\"destination\"} 0",
            "mesh_request_agent_seconds_bucket{le=\"0.0005\",reporter=\"destination\"} 2",
            "mesh_request_agent_seconds_sum{reporter=\"destination\"} 0.0006",
            "mesh_policy_evaluation_seconds_bucket{le=\"0.000005\"} 1",
            "mesh_policy_evaluation_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
