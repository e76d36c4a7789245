//! Istio's request metrics — `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes` with Istio's standard labels — for the
//! requests this agent serves: routed in the source pod's agent (`reporter="source"`) and
//! judged in the destination pod's (`reporter="destination"`).
//!
//! Recording a request takes no lock shared by all connections: each connection tallies
//! its own requests (under a lock only a scrape shares), keyed by the labels it computed
//! once; a connection's tally joins the node's totals when it closes. Series of workloads
//! that have left the mesh expire after a configurable time, so cardinality stays bounded
//! as pods churn.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, MetricType},
};

use crate::{
    model::{
        metric_rules::{MetricRules, StandardMetric},
        telemetry::canonical_names,
        MeshState, Workload,
    },
    telemetry::request::ResponseFlags,
};

/// Istio's buckets for `istio_request_duration_milliseconds` (Envoy's defaults).
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Buckets for the request and response sizes: powers of ten up to 100 MB.
pub const BYTE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// Istio's label for a workload or value nobody knows.
const UNKNOWN: &str = "unknown";

/// Who reports: the agent of the pod that sent the request, or of the pod that served it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// One side of a request, as Istio labels it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SideLabels {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
    cluster: String,
}

impl SideLabels {
    /// `principal` is the identity the request was authenticated with, when that is
    /// known independently of the workload (the peer certificate at the destination).
    fn of(
        workload: Option<&Workload>,
        principal: Option<&str>,
        trust_domain: &str,
        cluster: &str,
    ) -> SideLabels {
        let principal = match (principal, workload) {
            (Some(principal), _) => format!("spiffe://{principal}"),
            (None, Some(w)) => format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                w.namespace, w.service_account
            ),
            (None, None) => UNKNOWN.into(),
        };
        let Some(w) = workload else {
            return SideLabels {
                workload: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
                principal,
                app: UNKNOWN.into(),
                version: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
                cluster: UNKNOWN.into(),
            };
        };
        let (canonical_service, canonical_revision) = canonical_names(w);
        SideLabels {
            workload: w.workload.clone(),
            namespace: w.namespace.clone(),
            principal,
            app: w.app.clone().unwrap_or_else(|| UNKNOWN.into()),
            version: w
                .labels
                .get("version")
                .cloned()
                .unwrap_or_else(|| UNKNOWN.into()),
            canonical_service,
            canonical_revision,
            cluster: cluster.to_owned(),
        }
    }
}

/// What a request's labels say about who talked to whom: everything but its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerLabels {
    reporter: Reporter,
    source: SideLabels,
    destination: SideLabels,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    mutual_tls: bool,
    /// The reporting workload's Telemetry rules; `None`: every metric, standard labels.
    rules: Option<Arc<MetricRules>>,
}

/// Who took part in a request, for [`PeerLabels::new`].
pub struct Peers<'a> {
    pub reporter: Reporter,
    pub source: Option<&'a Workload>,
    /// The client's authenticated identity (`trust-domain/ns/…/sa/…`), when known.
    pub source_principal: Option<&'a str>,
    pub destination: Option<&'a Workload>,
    /// The Service host the client addressed (`destination_service`).
    pub service: Option<&'a str>,
    pub mutual_tls: bool,
    /// What the reporting workload's Telemetry says of its request metrics.
    pub rules: Option<&'a Arc<MetricRules>>,
}

impl PeerLabels {
    /// The reporting workload's Telemetry rules, if they change anything.
    pub fn rules(&self) -> Option<&Arc<MetricRules>> {
        self.rules.as_ref()
    }

    /// Whether either side is a workload that has left the mesh.
    pub fn names_departed(&self, departed: &Departed<'_>) -> bool {
        let gone = |side: &SideLabels| departed.contains(&side.namespace, &side.workload);
        gone(&self.source) || gone(&self.destination)
    }

    /// The standard labels of a TCP series, in Istio's order: those of a request
    /// without `response_code` and `grpc_response_status`, `request_protocol="tcp"`.
    pub fn tcp_label_pairs(&self) -> Vec<(&'static str, &str)> {
        label_pairs(self, "tcp", "", "", "-")
            .into_iter()
            .filter(|(name, _)| !matches!(*name, "response_code" | "grpc_response_status"))
            .collect()
    }

    pub fn new(state: &MeshState, peers: &Peers<'_>, settings: &LabelSettings) -> PeerLabels {
        let (name, namespace) = match peers.service.and_then(|h| state.service_by_host(h)) {
            Some(service) => (service.name.clone(), service.namespace.clone()),
            None => (UNKNOWN.into(), UNKNOWN.into()),
        };
        let side = |workload, principal| {
            SideLabels::of(
                workload,
                principal,
                &settings.trust_domain,
                &settings.cluster,
            )
        };
        PeerLabels {
            reporter: peers.reporter,
            source: side(peers.source, peers.source_principal),
            destination: side(peers.destination, None),
            destination_service: peers.service.unwrap_or(UNKNOWN).to_owned(),
            destination_service_name: name,
            destination_service_namespace: namespace,
            mutual_tls: peers.mutual_tls,
            rules: peers.rules.cloned(),
        }
    }
}

/// What the agent puts in every series beyond the peers.
#[derive(Debug, Clone)]
pub struct LabelSettings {
    pub trust_domain: String,
    /// Istio's `source_cluster` / `destination_cluster`: the cluster's ID.
    pub cluster: String,
}

/// How a request ended, as its labels say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestEnd {
    pub grpc: bool,
    /// The response code; 0 when no response was sent.
    pub response_code: u16,
    pub grpc_status: Option<u32>,
    pub flags: ResponseFlags,
}

/// The measures of one request.
#[derive(Debug, Clone, Copy)]
pub struct Measures {
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages in the request's and the response's stream.
    pub request_messages: u64,
    pub response_messages: u64,
}

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, then the count above the last bound.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        let index = self.bounds.partition_point(|bound| *bound < value);
        self.counts[index] += 1;
        self.sum += value;
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum += other.sum;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// The figures of one series.
#[derive(Debug, Clone)]
struct Series {
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    request_messages: u64,
    response_messages: u64,
    updated: Instant,
}

impl Series {
    fn new() -> Series {
        Series {
            duration: Histogram::new(&DURATION_BUCKETS_MS),
            request_bytes: Histogram::new(&BYTE_BUCKETS),
            response_bytes: Histogram::new(&BYTE_BUCKETS),
            request_messages: 0,
            response_messages: 0,
            updated: Instant::now(),
        }
    }

    fn observe(&mut self, measures: &Measures) {
        self.duration
            .observe(measures.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(measures.request_bytes as f64);
        self.response_bytes.observe(measures.response_bytes as f64);
        self.request_messages += measures.request_messages;
        self.response_messages += measures.response_messages;
        self.updated = Instant::now();
    }

    fn merge(&mut self, other: &Series) {
        self.duration.merge(&other.duration);
        self.request_bytes.merge(&other.request_bytes);
        self.response_bytes.merge(&other.response_bytes);
        self.request_messages += other.request_messages;
        self.response_messages += other.response_messages;
        self.updated = self.updated.max(other.updated);
    }
}

/// A connection's peers, compared by identity: the connection computed them once.
#[derive(Clone)]
struct SamePeers(Arc<PeerLabels>);

impl PartialEq for SamePeers {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for SamePeers {}
impl Hash for SamePeers {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

/// A request's values of its Telemetry's label expressions (`tagOverrides`), in the
/// order of [`MetricRules::values`]; empty without any.
pub type TagValues = Box<[String]>;

type SeriesKey = (PeerLabels, RequestEnd, TagValues);
type TallyKey = (SamePeers, RequestEnd, TagValues);

#[derive(Default)]
struct Tally {
    series: Mutex<HashMap<TallyKey, Series>>,
}

impl Tally {
    fn lock(&self) -> MutexGuard<'_, HashMap<TallyKey, Series>> {
        self.series.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Totals {
    /// Tallies of open connections, by connection.
    open: HashMap<u64, Arc<Tally>>,
    /// What closed connections recorded.
    closed: HashMap<SeriesKey, Series>,
}

/// The node's request metrics: a Prometheus collector and the source of each
/// connection's [`ConnectionTally`].
#[derive(Clone)]
pub struct RequestMetrics {
    totals: Arc<Mutex<Totals>>,
    next_connection: Arc<AtomicU64>,
    pub settings: Arc<LabelSettings>,
    /// How long a series of a workload that left the mesh is still reported.
    expiry: Duration,
}

impl fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

impl RequestMetrics {
    pub fn new(settings: LabelSettings, expiry: Duration) -> RequestMetrics {
        RequestMetrics {
            totals: Arc::default(),
            next_connection: Arc::default(),
            settings: Arc::new(settings),
            expiry,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tally of a connection that serves requests; its figures join the totals when
    /// it is dropped.
    pub fn connection(&self) -> ConnectionTally {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let tally = Arc::new(Tally::default());
        self.lock().open.insert(id, tally.clone());
        ConnectionTally {
            id,
            tally,
            metrics: self.clone(),
        }
    }

    /// Every series: closed connections' and open ones'.
    fn snapshot(&self) -> HashMap<SeriesKey, Series> {
        let totals = self.lock();
        let mut all = totals.closed.clone();
        for tally in totals.open.values() {
            for ((peers, outcome, tags), series) in tally.lock().iter() {
                let key = (peers.0.as_ref().clone(), *outcome, tags.clone());
                merge_into(&mut all, key, series);
            }
        }
        all
    }

    /// Forgets the series of workloads `state` no longer has, once they have been idle
    /// for the expiry time. Series of open connections stay until those close.
    pub fn expire(&self, state: &MeshState, now: Instant) {
        let departed = Departed::of(state);
        self.lock().closed.retain(|(peers, _, _), series| {
            let idle = now.saturating_duration_since(series.updated) >= self.expiry;
            !(idle && peers.names_departed(&departed))
        });
    }

    /// How long a series of a workload that left is still reported.
    pub fn expiry(&self) -> Duration {
        self.expiry
    }
}

/// Which workloads a series may name that the mesh no longer has.
pub struct Departed<'a> {
    present: HashSet<(&'a str, &'a str)>,
}

impl<'a> Departed<'a> {
    pub fn of(state: &'a MeshState) -> Departed<'a> {
        Departed {
            present: state
                .workloads
                .values()
                .map(|w| (w.namespace.as_str(), w.workload.as_str()))
                .collect(),
        }
    }

    /// Whether the workload `namespace/workload` has left (an unknown one never has).
    pub fn contains(&self, namespace: &str, workload: &str) -> bool {
        workload != UNKNOWN && !self.present.contains(&(namespace, workload))
    }
}

fn merge_into(all: &mut HashMap<SeriesKey, Series>, key: SeriesKey, series: &Series) {
    match all.get_mut(&key) {
        Some(existing) => existing.merge(series),
        None => {
            all.insert(key, series.clone());
        }
    }
}

/// One connection's requests.
pub struct ConnectionTally {
    id: u64,
    tally: Arc<Tally>,
    metrics: RequestMetrics,
}

impl ConnectionTally {
    /// Counts a request; `tags` are its values of the label expressions of `peers`'
    /// rules.
    pub fn record(
        &self,
        peers: &Arc<PeerLabels>,
        outcome: RequestEnd,
        tags: TagValues,
        measures: &Measures,
    ) {
        self.tally
            .lock()
            .entry((SamePeers(peers.clone()), outcome, tags))
            .or_insert_with(Series::new)
            .observe(measures);
    }

    pub fn settings(&self) -> &LabelSettings {
        &self.metrics.settings
    }
}

impl Drop for ConnectionTally {
    fn drop(&mut self) {
        let mut totals = self.metrics.lock();
        totals.open.remove(&self.id);
        for ((peers, outcome, tags), series) in self.tally.lock().drain() {
            merge_into(
                &mut totals.closed,
                (peers.0.as_ref().clone(), outcome, tags),
                &series,
            );
        }
    }
}

/// The labels of one series, in Istio's order.
fn label_pairs<'a>(
    peers: &'a PeerLabels,
    protocol: &'a str,
    code: &'a str,
    grpc: &'a str,
    flags: &'a str,
) -> [(&'static str, &'a str); 25] {
    let (s, d) = (&peers.source, &peers.destination);
    [
        ("reporter", peers.reporter.label()),
        ("source_workload", &s.workload),
        ("source_canonical_service", &s.canonical_service),
        ("source_canonical_revision", &s.canonical_revision),
        ("source_workload_namespace", &s.namespace),
        ("source_principal", &s.principal),
        ("source_app", &s.app),
        ("source_version", &s.version),
        ("source_cluster", &s.cluster),
        ("destination_workload", &d.workload),
        ("destination_workload_namespace", &d.namespace),
        ("destination_principal", &d.principal),
        ("destination_app", &d.app),
        ("destination_version", &d.version),
        ("destination_service", &peers.destination_service),
        ("destination_canonical_service", &d.canonical_service),
        ("destination_canonical_revision", &d.canonical_revision),
        ("destination_service_name", &peers.destination_service_name),
        (
            "destination_service_namespace",
            &peers.destination_service_namespace,
        ),
        ("destination_cluster", &d.cluster),
        ("request_protocol", protocol),
        ("response_code", code),
        ("grpc_response_status", grpc),
        ("response_flags", flags),
        (
            "connection_security_policy",
            if peers.mutual_tls {
                "mutual_tls"
            } else {
                "none"
            },
        ),
    ]
}

/// A histogram family: the metric, its name, its help and where a series keeps it.
type HistogramFamily = (
    StandardMetric,
    &'static str,
    &'static str,
    fn(&Series) -> &Histogram,
);

/// A counter family of gRPC streams: the metric, its name, its help and its count.
type MessageFamily = (
    StandardMetric,
    &'static str,
    &'static str,
    fn(&Series) -> u64,
);

impl Collector for RequestMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let series: Vec<(SeriesKey, Series)> = self.snapshot().into_iter().collect();
        let texts: Vec<(String, String, String)> = series
            .iter()
            .map(|((_, outcome, _), _)| {
                (
                    outcome.response_code.to_string(),
                    outcome
                        .grpc_status
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    outcome.flags.to_string(),
                )
            })
            .collect();
        let standard: Vec<[(&'static str, &str); 25]> = series
            .iter()
            .zip(&texts)
            .map(|(((peers, outcome, _), _), (code, grpc, flags))| {
                let protocol = if outcome.grpc { "grpc" } else { "http" };
                label_pairs(peers, protocol, code, grpc, flags)
            })
            .collect();
        // The series of one metric by their labels, as Telemetry rules change them: a
        // metric they turn off has none, and series told apart only by a label removed
        // from this metric (or by a value only another metric carries) add up.
        let family = |metric: StandardMetric| -> Vec<(Vec<(&str, &str)>, Series)> {
            let mut merged: HashMap<Vec<(&str, &str)>, Series> = HashMap::new();
            for (i, ((peers, outcome, tags), figures)) in series.iter().enumerate() {
                let grpc_only = matches!(
                    metric,
                    StandardMetric::GrpcRequestMessages | StandardMetric::GrpcResponseMessages
                );
                if grpc_only && !outcome.grpc {
                    continue;
                }
                let labels = match &peers.rules {
                    None => Some(standard[i].to_vec()),
                    Some(rules) => rules.labels(metric, &standard[i], tags),
                };
                if let Some(labels) = labels {
                    match merged.get_mut(&labels) {
                        Some(existing) => existing.merge(figures),
                        None => {
                            merged.insert(labels, figures.clone());
                        }
                    }
                }
            }
            merged.into_iter().collect()
        };

        let mut requests = encoder.encode_descriptor(
            "istio_requests",
            "Requests served, by Istio's standard labels",
            None,
            MetricType::Counter,
        )?;
        for (labels, figures) in family(StandardMetric::RequestCount) {
            ConstCounter::new(figures.duration.count()).encode(requests.encode_family(&labels)?)?;
        }
        let histograms: [HistogramFamily; 3] = [
            (
                StandardMetric::RequestDuration,
                "istio_request_duration_milliseconds",
                "Time from the request's first byte to the response's last, in milliseconds",
                |s| &s.duration,
            ),
            (
                StandardMetric::RequestSize,
                "istio_request_bytes",
                "Request sizes (head and body), in bytes",
                |s| &s.request_bytes,
            ),
            (
                StandardMetric::ResponseSize,
                "istio_response_bytes",
                "Response sizes (head and body), in bytes",
                |s| &s.response_bytes,
            ),
        ];
        for (metric, name, help, histogram_of) in histograms {
            let mut encoded = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, figures) in family(metric) {
                let histogram = histogram_of(&figures);
                encoded
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        histogram.sum,
                        histogram.count(),
                        &histogram.buckets(),
                        None,
                    )?;
            }
        }
        let messages: [MessageFamily; 2] = [
            (
                StandardMetric::GrpcRequestMessages,
                "istio_request_messages",
                "gRPC messages the clients sent, by Istio's standard labels",
                |s| s.request_messages,
            ),
            (
                StandardMetric::GrpcResponseMessages,
                "istio_response_messages",
                "gRPC messages the servers sent, by Istio's standard labels",
                |s| s.response_messages,
            ),
        ];
        for (metric, name, help, count_of) in messages {
            let mut encoded = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, figures) in family(metric) {
                ConstCounter::new(count_of(&figures)).encode(encoded.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-abc, namespace: shop, labels: {app: reviews, version: v2, service.istio.io/canonical-name: reviews-svc}}
spec: {nodeName: node-1, serviceAccountName: reviews}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.10}
";

    fn state(yaml: &str) -> MeshState {
        MeshState::build(
            "node-1",
            &crate::config::load_str(std::path::Path::new("c.yaml"), yaml),
        )
    }

    fn metrics(expiry: Duration) -> RequestMetrics {
        let settings = LabelSettings {
            trust_domain: "cluster.local".into(),
            cluster: "east".into(),
        };
        RequestMetrics::new(settings, expiry)
    }

    fn peers(state: &MeshState, metrics: &RequestMetrics) -> Arc<PeerLabels> {
        let pod = |ip: &str| state.workloads.get(&ip.parse().expect("ip")).cloned();
        let client = pod("10.244.1.10").expect("client");
        let rules = state
            .security_of(client.ip)
            .telemetry
            .client_metrics
            .clone();
        let (client, reviews) = (pod("10.244.1.10"), pod("10.244.1.20"));
        Arc::new(PeerLabels::new(
            state,
            &Peers {
                reporter: Reporter::Source,
                source: client.as_deref(),
                source_principal: None,
                destination: reviews.as_deref(),
                service: Some("reviews.shop.svc.cluster.local"),
                mutual_tls: true,
                rules: rules.as_ref(),
            },
            &metrics.settings,
        ))
    }

    fn ok() -> RequestEnd {
        RequestEnd {
            grpc: false,
            response_code: 200,
            grpc_status: None,
            flags: ResponseFlags::default(),
        }
    }

    const MEASURES: Measures = Measures {
        duration: Duration::from_millis(7),
        request_bytes: 100,
        response_bytes: 5000,
        request_messages: 2,
        response_messages: 3,
    };

    fn encode(metrics: &RequestMetrics) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(metrics.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    }

    #[test]
    fn canonical_labels_follow_istios_precedence() {
        let state = state(CLUSTER);
        let metrics = metrics(Duration::from_secs(60));
        let peers = peers(&state, &metrics);
        let (source, destination) = (&peers.source, &peers.destination);
        assert_eq!(destination.canonical_service, "reviews-svc");
        assert_eq!(destination.canonical_revision, "v2");
        assert_eq!(destination.version, "v2");
        assert_eq!(destination.cluster, "east");
        assert_eq!(source.canonical_service, source.workload);
        assert_eq!(source.canonical_revision, "latest");
        assert_eq!(source.principal, "spiffe://cluster.local/ns/shop/sa/client");
    }

    #[test]
    fn open_and_closed_connections_add_up_in_one_series() {
        let state = state(CLUSTER);
        let metrics = metrics(Duration::from_secs(60));
        let first = metrics.connection();
        let peers_first = peers(&state, &metrics);
        first.record(&peers_first, ok(), TagValues::default(), &MEASURES);
        first.record(&peers_first, ok(), TagValues::default(), &MEASURES);
        drop(first);
        let second = metrics.connection();
        second.record(
            &peers(&state, &metrics),
            ok(),
            TagValues::default(),
            &MEASURES,
        );
        let text = encode(&metrics);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ',']))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        assert!(line("istio_requests_total").ends_with(" 3"), "{text}");
        assert!(line("istio_request_duration_milliseconds_sum").ends_with(" 21.0"));
        assert!(line("istio_response_bytes_sum").ends_with(" 15000.0"));
        // 7 ms: above the 5 ms bucket, in the 10 ms one.
        assert!(line("istio_request_duration_milliseconds_bucket{le=\"5.0\"").ends_with(" 0"));
        assert!(line("istio_request_duration_milliseconds_bucket{le=\"10.0\"").ends_with(" 3"));
        assert_eq!(text.matches("istio_requests_total{").count(), 1);
    }

    #[test]
    fn series_of_a_workload_that_left_expire_and_others_stay() {
        let before = state(CLUSTER);
        let metrics = metrics(Duration::from_secs(60));
        let tally = metrics.connection();
        tally.record(
            &peers(&before, &metrics),
            ok(),
            TagValues::default(),
            &MEASURES,
        );
        drop(tally);
        let later = Instant::now() + Duration::from_secs(61);

        metrics.expire(&before, later);
        assert!(
            encode(&metrics).contains("istio_requests_total{"),
            "both pods are there"
        );

        let without_reviews = state(
            &CLUSTER[..CLUSTER.find("---").expect("two pods")]
                .replace("reviews-v2-abc", "reviews-v3-def"),
        );
        metrics.expire(&without_reviews, Instant::now());
        assert!(
            encode(&metrics).contains("istio_requests_total{"),
            "not idle long enough"
        );
        metrics.expire(&without_reviews, later);
        assert!(!encode(&metrics).contains("istio_requests_total{"));
    }

    #[test]
    fn grpc_streams_count_their_messages_and_plain_http_has_none() {
        let state = state(CLUSTER);
        let metrics = metrics(Duration::from_secs(60));
        let tally = metrics.connection();
        let peers = peers(&state, &metrics);
        tally.record(&peers, ok(), TagValues::default(), &MEASURES);
        let grpc = RequestEnd {
            grpc: true,
            grpc_status: Some(0),
            ..ok()
        };
        tally.record(&peers, grpc, TagValues::default(), &MEASURES);
        tally.record(&peers, grpc, TagValues::default(), &MEASURES);
        let text = encode(&metrics);
        let values = |name: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect()
        };
        let sent = values("istio_request_messages_total");
        assert_eq!(sent.len(), 1, "{text}");
        assert!(sent[0].contains("request_protocol=\"grpc\"") && sent[0].ends_with(" 4"));
        let received = values("istio_response_messages_total");
        assert_eq!(received.len(), 1, "{text}");
        assert!(received[0].ends_with(" 6"), "{text}");
        assert_eq!(values("istio_requests_total").len(), 2);
    }

    #[test]
    fn tag_overrides_add_and_remove_labels_and_disabled_metrics_are_left_out() {
        let telemetry = format!(
            "{CLUSTER}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: labels, namespace: shop}}
spec:
  metrics:
  - overrides:
    - match: {{metric: REQUEST_COUNT, mode: CLIENT}}
      tagOverrides:
        request_host: {{value: request.host}}
        source_principal: {{operation: REMOVE}}
        response_code: {{value: \"'custom'\"}}
    - match: {{metric: REQUEST_DURATION}}
      disabled: true
"
        );
        let state = state(&telemetry);
        let metrics = metrics(Duration::from_secs(60));
        let tally = metrics.connection();
        let peers = peers(&state, &metrics);
        let rules = peers
            .rules()
            .expect("the Telemetry changes the client's metrics");
        assert_eq!(rules.values.len(), 2);
        for host in ["a.example", "b.example", "a.example"] {
            let values = rules
                .values
                .iter()
                .map(|v| {
                    if v.expression() == "request.host" {
                        host
                    } else {
                        "custom"
                    }
                })
                .map(str::to_owned)
                .collect::<Vec<_>>();
            tally.record(&peers, ok(), values.into(), &MEASURES);
        }
        let text = encode(&metrics);
        let requests: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(requests.len(), 2, "one series per host: {text}");
        let a = requests
            .iter()
            .find(|l| l.contains("request_host=\"a.example\""))
            .expect("a.example's series");
        assert!(a.ends_with(" 2"), "{a}");
        assert!(a.contains("response_code=\"custom\""), "{a}");
        assert!(!a.contains("source_principal="), "{a}");
        assert!(
            !text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        let sizes: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_request_bytes_count{"))
            .collect();
        assert_eq!(sizes.len(), 1, "the host is not a label of sizes: {text}");
        assert!(sizes[0].ends_with(" 3"), "{text}");
        assert!(
            sizes[0].contains("source_principal=\"spiffe://") && !sizes[0].contains("request_host")
        );
    }
}
