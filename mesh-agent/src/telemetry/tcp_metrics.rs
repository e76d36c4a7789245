//! Istio's TCP metrics — `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total` and
//! `istio_tcp_received_bytes_total` — with the same standard labels as the request
//! metrics (canonical service and revision, version and cluster included, as Kiali's
//! queries need them), under the reporting workload's Telemetry rules: a metric turned
//! off has no series, and `tagOverrides` remove labels or set them from CEL over the
//! connection's attributes. The counts come from the kernel's flow events
//! (`telemetry::metrics`); this module keeps them by series and writes them at scrape.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};

use crate::{
    model::metric_rules::StandardMetric,
    telemetry::request_metrics::{Departed, PeerLabels, TagValues},
};

/// One TCP series before the Telemetry rules apply: who talked to whom, and the
/// connection's values of the rules' label expressions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpKey {
    pub peers: PeerLabels,
    pub tags: TagValues,
}

#[derive(Debug, Clone, Copy)]
struct TcpCounts {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
    /// When the series last moved, so that series of workloads that left expire.
    touched: Instant,
}

impl TcpCounts {
    fn new() -> TcpCounts {
        TcpCounts {
            opened: 0,
            closed: 0,
            sent: 0,
            received: 0,
            touched: Instant::now(),
        }
    }
}

/// The node's TCP series; a Prometheus collector.
#[derive(Clone, Default)]
pub struct TcpMetrics {
    series: Arc<Mutex<HashMap<Arc<TcpKey>, TcpCounts>>>,
}

impl fmt::Debug for TcpMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpMetrics").finish_non_exhaustive()
    }
}

impl TcpMetrics {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<TcpKey>, TcpCounts>> {
        self.series.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, key: &Arc<TcpKey>, change: impl FnOnce(&mut TcpCounts)) {
        let mut series = self.lock();
        let counts = series.entry(key.clone()).or_insert_with(TcpCounts::new);
        change(counts);
        counts.touched = Instant::now();
    }

    pub fn opened(&self, key: &Arc<TcpKey>) {
        self.update(key, |c| c.opened += 1);
    }

    pub fn closed(&self, key: &Arc<TcpKey>) {
        self.update(key, |c| c.closed += 1);
    }

    /// Bytes a connection sent and received since it was last seen.
    pub fn moved(&self, key: &Arc<TcpKey>, sent: u64, received: u64) {
        self.update(key, |c| {
            c.sent += sent;
            c.received += received;
        });
    }

    /// Forgets the series idle for `expiry` that name a workload that left, unless a
    /// connection is still open under them (`open`).
    pub fn expire(
        &self,
        open: &HashSet<&TcpKey>,
        departed: &Departed<'_>,
        expiry: Duration,
        now: Instant,
    ) {
        self.lock().retain(|key, counts| {
            let idle = now.saturating_duration_since(counts.touched) >= expiry;
            !(idle && !open.contains(key.as_ref()) && key.peers.names_departed(departed))
        });
    }
}

/// A TCP metric: which one, its name and its help, and its count in a series.
type TcpFamily = (
    StandardMetric,
    &'static str,
    &'static str,
    fn(&TcpCounts) -> u64,
);

const FAMILIES: [TcpFamily; 4] = [
    (
        StandardMetric::TcpOpenedConnections,
        "istio_tcp_connections_opened",
        "Total number of TCP connections opened",
        |c| c.opened,
    ),
    (
        StandardMetric::TcpClosedConnections,
        "istio_tcp_connections_closed",
        "Total number of TCP connections closed",
        |c| c.closed,
    ),
    (
        StandardMetric::TcpSentBytes,
        "istio_tcp_sent_bytes",
        "Bytes sent by the workload during TCP connections",
        |c| c.sent,
    ),
    (
        StandardMetric::TcpReceivedBytes,
        "istio_tcp_received_bytes",
        "Bytes received by the workload during TCP connections",
        |c| c.received,
    ),
];

impl Collector for TcpMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let series: Vec<(Arc<TcpKey>, TcpCounts)> = self
            .lock()
            .iter()
            .map(|(key, counts)| (key.clone(), *counts))
            .collect();
        let standard: Vec<Vec<(&'static str, &str)>> = series
            .iter()
            .map(|(key, _)| key.peers.tcp_label_pairs())
            .collect();
        for (metric, name, help, count_of) in FAMILIES {
            // Series told apart only by a label the rules remove from this metric add up.
            let mut merged: HashMap<Vec<(&str, &str)>, u64> = HashMap::new();
            for ((key, counts), standard) in series.iter().zip(&standard) {
                let labels = match key.peers.rules() {
                    None => Some(standard.clone()),
                    Some(rules) => rules.labels(metric, standard, &key.tags),
                };
                if let Some(labels) = labels {
                    *merged.entry(labels).or_default() += count_of(counts);
                }
            }
            let mut encoded = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, count) in merged {
                ConstCounter::new(count).encode(encoded.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
