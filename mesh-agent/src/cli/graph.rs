//! The service graph `meshctl graph` and the dashboard draw, from what the agents'
//! Istio metrics gained over a window: nodes are workloads (`source_workload`,
//! `destination_workload` in their namespaces) and Services (`destination_service`);
//! edges carry requests per second, the share of 5xx answers, p50 and p99 latency (from
//! the duration histogram's bucket increases, as `histogram_quantile` computes them),
//! bytes per second of TCP traffic and whether the traffic was mutual TLS.
//!
//! Each request is reported twice, by the agent of the pod that sent it and by the agent
//! of the pod that served it. As Kiali does, an edge is drawn from the source reporter's
//! series when the source reports it at all, and from the destination reporter's
//! otherwise (a client outside the mesh, or a request the source agent carried as bytes).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::cli::scrape::{Sample, Window};

/// Istio's label value for what is not known.
const UNKNOWN: &str = "unknown";

/// What a node of the graph stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Workload,
    Service,
    /// A peer the agents could not name (outside the mesh).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// `namespace/workload`, the Service's host, or `unknown`.
    pub id: String,
    pub kind: NodeKind,
    pub namespace: String,
    pub name: String,
}

/// Histogram buckets: upper bound (`le`) → cumulative count, as the exposition has them.
pub type Buckets = BTreeMap<String, f64>;

/// Traffic from one node to another over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    /// `http` when requests were seen (HTTP, HTTP/2, gRPC), `tcp` for bytes only.
    pub protocol: &'static str,
    /// Whose series the figures come from: `source`, `destination` or both (some peers
    /// of the edge reported by one, some by the other).
    pub reporters: Vec<&'static str>,
    /// Requests in the window, and those answered 5xx.
    pub requests: f64,
    pub errors: f64,
    pub requests_per_second: f64,
    /// `errors / requests`; none without requests.
    pub error_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// TCP bytes both ways.
    pub bytes_per_second: f64,
    /// All of the edge's traffic in the window was mutual TLS.
    pub mutual_tls: bool,
    #[serde(skip)]
    pub buckets: Buckets,
}

/// A Service's golden signals: what all its clients sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Signals {
    pub service: String,
    pub requests_per_second: f64,
    pub error_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub bytes_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Graph {
    /// The longest of the agents' windows.
    pub window_seconds: f64,
    pub agents: Vec<String>,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub services: Vec<Signals>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn name(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Who talked to whom: one series of each reporter, less its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    source: (String, String),
    service: String,
    destination: (String, String),
}

impl Key {
    fn of(sample: &Sample) -> Key {
        let side = |workload: &str, namespace: &str| {
            let (w, n) = (sample.label(workload), sample.label(namespace));
            if w.is_empty() || w == UNKNOWN {
                (UNKNOWN.to_owned(), UNKNOWN.to_owned())
            } else {
                (n.to_owned(), w.to_owned())
            }
        };
        let service = sample.label("destination_service");
        Key {
            source: side("source_workload", "source_workload_namespace"),
            service: if service.is_empty() { UNKNOWN } else { service }.to_owned(),
            destination: side("destination_workload", "destination_workload_namespace"),
        }
    }
}

/// What one reporter's series of one [`Key`] gained.
#[derive(Debug, Clone, Default)]
struct Tally {
    requests: f64,
    errors: f64,
    mutual_tls_requests: f64,
    requests_per_second: f64,
    buckets: Buckets,
    bytes: f64,
    mutual_tls_bytes: f64,
    bytes_per_second: f64,
    reporters: BTreeSet<Reporter>,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.mutual_tls_requests += other.mutual_tls_requests;
        self.requests_per_second += other.requests_per_second;
        for (le, count) in &other.buckets {
            *self.buckets.entry(le.clone()).or_default() += count;
        }
        self.bytes += other.bytes;
        self.mutual_tls_bytes += other.mutual_tls_bytes;
        self.bytes_per_second += other.bytes_per_second;
        self.reporters.extend(&other.reporters);
    }

    fn edge(&self, source: &str, destination: &str) -> Edge {
        let http = self.requests > 0.0;
        Edge {
            source: source.to_owned(),
            destination: destination.to_owned(),
            protocol: if http { "http" } else { "tcp" },
            reporters: self.reporters.iter().map(|r| r.name()).collect(),
            requests: self.requests,
            errors: self.errors,
            requests_per_second: self.requests_per_second,
            error_rate: http.then(|| self.errors / self.requests),
            p50_ms: quantile(0.5, &self.buckets),
            p99_ms: quantile(0.99, &self.buckets),
            bytes_per_second: self.bytes_per_second,
            mutual_tls: if http {
                self.mutual_tls_requests >= self.requests
            } else {
                self.bytes > 0.0 && self.mutual_tls_bytes >= self.bytes
            },
            buckets: self.buckets.clone(),
        }
    }
}

/// The `q` quantile of cumulative `buckets`, as Prometheus' `histogram_quantile` computes
/// it: linear within the bucket the rank falls in (the first bucket starting at 0), the
/// highest finite bound when it falls in `+Inf`. None without observations or without
/// a `+Inf` bucket.
pub fn quantile(q: f64, buckets: &Buckets) -> Option<f64> {
    let mut sorted: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(le, count)| Some((le.parse::<f64>().ok()?, *count)))
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let &(last_bound, total) = sorted.last()?;
    if last_bound != f64::INFINITY || sorted.len() < 2 || total <= 0.0 || !(0.0..=1.0).contains(&q)
    {
        return None;
    }
    let rank = q * total;
    let index = sorted.iter().position(|(_, count)| *count >= rank)?;
    if index == sorted.len() - 1 {
        return Some(sorted[index - 1].0);
    }
    let (upper, count) = sorted[index];
    let (lower, below) = if index == 0 {
        (0.0_f64.min(upper), 0.0)
    } else {
        sorted[index - 1]
    };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / in_bucket)
}

fn workload_node(side: &(String, String)) -> Node {
    if side.1 == UNKNOWN {
        return Node {
            id: UNKNOWN.into(),
            kind: NodeKind::Unknown,
            namespace: UNKNOWN.into(),
            name: UNKNOWN.into(),
        };
    }
    Node {
        id: format!("{}/{}", side.0, side.1),
        kind: NodeKind::Workload,
        namespace: side.0.clone(),
        name: side.1.clone(),
    }
}

/// Builds the graph from every agent's window.
pub fn build(windows: &[Window]) -> Graph {
    let mut tallies: HashMap<(Key, Reporter), Tally> = HashMap::new();
    let mut requested: HashSet<(Key, Reporter)> = HashSet::new();
    let mut connected: HashSet<(Key, Reporter)> = HashSet::new();
    let mut service_names: BTreeMap<String, (String, String)> = BTreeMap::new();
    for window in windows {
        let per_second = |value: f64| {
            if window.seconds > 0.0 {
                value / window.seconds
            } else {
                0.0
            }
        };
        for sample in &window.samples {
            let reporter = match sample.label("reporter") {
                "source" => Reporter::Source,
                "destination" => Reporter::Destination,
                _ => continue,
            };
            let family = sample.name.as_str();
            if !matches!(
                family,
                "istio_requests_total"
                    | "istio_request_duration_milliseconds_bucket"
                    | "istio_tcp_sent_bytes_total"
                    | "istio_tcp_received_bytes_total"
            ) {
                continue;
            }
            let key = Key::of(sample);
            if key.service != UNKNOWN {
                let name = sample.label("destination_service_name");
                let namespace = sample.label("destination_service_namespace");
                if !name.is_empty() && name != UNKNOWN {
                    service_names
                        .entry(key.service.clone())
                        .or_insert_with(|| (namespace.to_owned(), name.to_owned()));
                }
            }
            let mutual_tls = sample.label("connection_security_policy") == "mutual_tls";
            let value = sample.value;
            let tally = tallies.entry((key.clone(), reporter)).or_default();
            tally.reporters.insert(reporter);
            match family {
                "istio_requests_total" => {
                    requested.insert((key, reporter));
                    tally.requests += value;
                    tally.requests_per_second += per_second(value);
                    if sample.label("response_code").starts_with('5') {
                        tally.errors += value;
                    }
                    if mutual_tls {
                        tally.mutual_tls_requests += value;
                    }
                }
                "istio_request_duration_milliseconds_bucket" => {
                    *tally
                        .buckets
                        .entry(sample.label("le").to_owned())
                        .or_default() += value;
                }
                _ => {
                    connected.insert((key, reporter));
                    tally.bytes += value;
                    tally.bytes_per_second += per_second(value);
                    if mutual_tls {
                        tally.mutual_tls_bytes += value;
                    }
                }
            }
        }
    }
    // One reporter per key and kind of traffic: the source's when it reports the key.
    let keys: BTreeSet<Key> = tallies.keys().map(|(key, _)| key.clone()).collect();
    let mut chosen: BTreeMap<Key, Tally> = BTreeMap::new();
    for key in keys {
        let pick = |reported: &HashSet<(Key, Reporter)>| {
            [Reporter::Source, Reporter::Destination]
                .into_iter()
                .find(|r| reported.contains(&(key.clone(), *r)))
        };
        let mut tally = Tally::default();
        if let Some(reporter) = pick(&requested) {
            if let Some(t) = tallies.get(&(key.clone(), reporter)) {
                tally.requests = t.requests;
                tally.errors = t.errors;
                tally.mutual_tls_requests = t.mutual_tls_requests;
                tally.requests_per_second = t.requests_per_second;
                tally.buckets = t.buckets.clone();
                if t.requests > 0.0 {
                    tally.reporters.insert(reporter);
                }
            }
        }
        if let Some(reporter) = pick(&connected) {
            if let Some(t) = tallies.get(&(key.clone(), reporter)) {
                tally.bytes = t.bytes;
                tally.mutual_tls_bytes = t.mutual_tls_bytes;
                tally.bytes_per_second = t.bytes_per_second;
                if t.bytes > 0.0 {
                    tally.reporters.insert(reporter);
                }
            }
        }
        if tally.requests > 0.0 || tally.bytes > 0.0 {
            chosen.insert(key, tally);
        }
    }
    assemble(windows, &chosen, &service_names)
}

/// Nodes and edges from each key's chosen figures: client → Service → serving workload,
/// or client → workload when no Service was addressed.
fn assemble(
    windows: &[Window],
    chosen: &BTreeMap<Key, Tally>,
    service_names: &BTreeMap<String, (String, String)>,
) -> Graph {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut link = |from: &Node, to: &Node, tally: &Tally| {
        edges
            .entry((from.id.clone(), to.id.clone()))
            .or_default()
            .add(tally);
    };
    for (key, tally) in chosen {
        let source = workload_node(&key.source);
        let destination = workload_node(&key.destination);
        nodes.insert(source.id.clone(), source.clone());
        if key.service == UNKNOWN {
            nodes.insert(destination.id.clone(), destination.clone());
            link(&source, &destination, tally);
            continue;
        }
        let (namespace, name) = service_names.get(&key.service).cloned().unwrap_or_else(|| {
            // A host the agents could not name: `name.namespace.svc…` or itself.
            let mut parts = key.service.split('.');
            match (parts.next(), parts.next()) {
                (Some(name), Some(namespace)) => (namespace.to_owned(), name.to_owned()),
                _ => (UNKNOWN.to_owned(), key.service.clone()),
            }
        });
        let service = Node {
            id: key.service.clone(),
            kind: NodeKind::Service,
            namespace,
            name,
        };
        nodes.insert(service.id.clone(), service.clone());
        link(&source, &service, tally);
        if destination.kind == NodeKind::Workload {
            nodes.insert(destination.id.clone(), destination.clone());
            link(&service, &destination, tally);
        }
    }
    let edges: Vec<Edge> = edges
        .iter()
        .map(|((from, to), tally)| tally.edge(from, to))
        .collect();
    let services = nodes
        .values()
        .filter(|n| n.kind == NodeKind::Service)
        .map(|service| {
            let mut total = Tally::default();
            for edge in edges.iter().filter(|e| e.destination == service.id) {
                total.add(&Tally {
                    requests: edge.requests,
                    errors: edge.errors,
                    requests_per_second: edge.requests_per_second,
                    buckets: edge.buckets.clone(),
                    bytes_per_second: edge.bytes_per_second,
                    ..Tally::default()
                });
            }
            let edge = total.edge("", &service.id);
            Signals {
                service: service.id.clone(),
                requests_per_second: edge.requests_per_second,
                error_rate: edge.error_rate,
                p50_ms: edge.p50_ms,
                p99_ms: edge.p99_ms,
                bytes_per_second: edge.bytes_per_second,
            }
        })
        .collect();
    Graph {
        window_seconds: windows.iter().map(|w| w.seconds).fold(0.0, f64::max),
        agents: windows.iter().map(|w| w.url.clone()).collect(),
        nodes: nodes.into_values().collect(),
        edges,
        services,
    }
}

/// The total request rate through the mesh: each request once (client → Service, or
/// client → workload when no Service was addressed).
pub fn total_requests_per_second(graph: &Graph) -> f64 {
    let kind: HashMap<&str, NodeKind> = graph
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.kind))
        .collect();
    graph
        .edges
        .iter()
        .filter(|e| kind.get(e.source.as_str()) != Some(&NodeKind::Service))
        .map(|e| e.requests_per_second)
        // From +0.0: an empty `sum()` of floats is -0.0, which prints as "-0.00".
        .fold(0.0, |total, rps| total + rps)
}

/// `1 agent`, `2 agents`.
pub fn agents(count: usize) -> String {
    format!("{count} agent{}", if count == 1 { "" } else { "s" })
}

/// A figure for people: `-` when absent.
pub fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// An edge's figures, a line each: rate and errors, then p99 latency (HTTP); bytes per
/// second (TCP).
pub fn edge_figures(edge: &Edge) -> Vec<String> {
    if edge.protocol == "http" {
        vec![
            format!(
                "{:.1} rps · {}% 5xx",
                edge.requests_per_second,
                figure(edge.error_rate.map(|r| r * 100.0), 1)
            ),
            format!("p99 {} ms", figure(edge.p99_ms, 1)),
        ]
    } else {
        vec![format!("{:.0} B/s", edge.bytes_per_second)]
    }
}

/// What an edge's label says on one line: `mTLS` first where the traffic is.
pub fn edge_label(edge: &Edge) -> String {
    let mut parts = Vec::new();
    if edge.mutual_tls {
        parts.push("mTLS".to_owned());
    }
    parts.extend(edge_figures(edge));
    parts.join(" · ")
}

/// Health colours, as Kiali draws them: no errors green, some orange, 5% or more red;
/// TCP edges teal.
pub fn edge_colour(edge: &Edge) -> &'static str {
    match edge.error_rate {
        None => "#17becf",
        Some(rate) if rate <= 0.0 => "#2ca02c",
        Some(rate) if rate < 0.05 => "#ff7f0e",
        Some(_) => "#d62728",
    }
}

/// The graph as Graphviz `dot` text.
pub fn dot(graph: &Graph) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace('"', "\\\"");
    let quote = |text: &str| format!("\"{}\"", escape(text));
    let mut out =
        String::from("digraph mesh {\n  rankdir=LR;\n  node [fontname=\"sans-serif\"];\n");
    for node in &graph.nodes {
        let shape = match node.kind {
            NodeKind::Workload => "ellipse",
            NodeKind::Service => "box",
            NodeKind::Unknown => "diamond",
        };
        // `\n` is dot's line break inside a label.
        out.push_str(&format!(
            "  {} [label=\"{}\\n{}\", shape={shape}];\n",
            quote(&node.id),
            escape(&node.name),
            escape(&node.namespace)
        ));
    }
    for edge in &graph.edges {
        out.push_str(&format!(
            "  {} -> {} [label={}, color=\"{}\"{}];\n",
            quote(&edge.source),
            quote(&edge.destination),
            quote(&edge_label(edge)),
            edge_colour(edge),
            if edge.mutual_tls { ", penwidth=2" } else { "" }
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::scrape::parse;

    fn window(text: &str, seconds: f64) -> Window {
        Window {
            url: "http://10.200.0.1:15020/metrics".into(),
            seconds,
            samples: parse(text).expect("parsed"),
        }
    }

    fn buckets(pairs: &[(&str, f64)]) -> Buckets {
        pairs.iter().map(|(le, c)| (le.to_string(), *c)).collect()
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_histogram_quantile_does() {
        let b = buckets(&[("1", 10.0), ("5", 90.0), ("10", 100.0), ("+Inf", 100.0)]);
        // Rank 50 lies 40 of 80 into (1, 5].
        assert_eq!(quantile(0.5, &b), Some(3.0));
        // Rank 99 lies 9 of 10 into (5, 10].
        assert_eq!(quantile(0.99, &b), Some(9.5));
        // Rank 5 lies half-way into the first bucket, which starts at 0.
        assert_eq!(quantile(0.05, &b), Some(0.5));
        // A rank in +Inf: the highest finite bound.
        let high = buckets(&[("1", 1.0), ("5", 2.0), ("+Inf", 10.0)]);
        assert_eq!(quantile(0.99, &high), Some(5.0));
        // Nothing observed, no +Inf, a single bucket: none.
        assert_eq!(quantile(0.5, &buckets(&[("1", 0.0), ("+Inf", 0.0)])), None);
        assert_eq!(quantile(0.5, &buckets(&[("1", 3.0), ("5", 4.0)])), None);
        assert_eq!(quantile(0.5, &buckets(&[("+Inf", 4.0)])), None);
        assert_eq!(quantile(1.5, &b), None);
    }

    const LABELS: &str = "source_workload=\"client-a\",source_workload_namespace=\"demo\",\
        destination_service=\"reviews.demo.svc.cluster.local\",destination_service_name=\"reviews\",\
        destination_service_namespace=\"demo\",destination_workload=\"reviews-v2\",\
        destination_workload_namespace=\"demo\"";

    fn requests(reporter: &str, code: u16, security: &str, count: f64) -> String {
        format!(
            "istio_requests_total{{reporter=\"{reporter}\",{LABELS},response_code=\"{code}\",\
             connection_security_policy=\"{security}\"}} {count}\n"
        )
    }

    fn durations(reporter: &str, pairs: &[(&str, f64)]) -> String {
        pairs
            .iter()
            .map(|(le, count)| {
                format!(
                    "istio_request_duration_milliseconds_bucket{{reporter=\"{reporter}\",{LABELS},\
                     response_code=\"200\",connection_security_policy=\"mutual_tls\",le=\"{le}\"}} {count}\n"
                )
            })
            .collect()
    }

    #[test]
    fn the_source_reporter_is_preferred_and_the_destination_fills_in() {
        // Node a: client-a's agent reports as source; node b: reviews-v2's, as destination,
        // the same 10 requests (8 × 200, 2 × 503) with a different latency.
        let a = window(
            &(requests("source", 200, "mutual_tls", 8.0)
                + &requests("source", 503, "mutual_tls", 2.0)
                + &durations("source", &[("5", 0.0), ("10", 10.0), ("+Inf", 10.0)])),
            2.0,
        );
        let b = window(
            &(requests("destination", 200, "mutual_tls", 8.0)
                + &requests("destination", 503, "mutual_tls", 2.0)
                + &durations("destination", &[("5", 10.0), ("10", 10.0), ("+Inf", 10.0)])
                // A client outside the mesh, reported by the destination only.
                + "istio_requests_total{reporter=\"destination\",source_workload=\"unknown\",\
                   destination_service=\"reviews.demo.svc.cluster.local\",destination_workload=\"reviews-v2\",\
                   destination_workload_namespace=\"demo\",response_code=\"200\",\
                   connection_security_policy=\"none\"} 4\n"),
            2.0,
        );
        let graph = build(&[a, b]);
        let ids: Vec<(&str, NodeKind)> = graph
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.kind))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("demo/client-a", NodeKind::Workload),
                ("demo/reviews-v2", NodeKind::Workload),
                ("reviews.demo.svc.cluster.local", NodeKind::Service),
                ("unknown", NodeKind::Unknown),
            ]
        );
        let edge = |from: &str, to: &str| {
            graph
                .edges
                .iter()
                .find(|e| e.source == from && e.destination == to)
                .unwrap_or_else(|| panic!("{from} → {to} in {:?}", graph.edges))
        };
        let client = edge("demo/client-a", "reviews.demo.svc.cluster.local");
        assert_eq!(client.reporters, vec!["source"]);
        assert_eq!(
            (client.requests, client.errors, client.requests_per_second),
            (10.0, 2.0, 5.0)
        );
        assert_eq!(client.error_rate, Some(0.2));
        // The source's latency: all ten in (5, 10].
        assert_eq!(client.p99_ms, Some(9.95));
        assert!(client.mutual_tls);
        let outside = edge("unknown", "reviews.demo.svc.cluster.local");
        assert_eq!(outside.reporters, vec!["destination"]);
        assert_eq!((outside.requests, outside.mutual_tls), (4.0, false));
        assert_eq!(outside.p99_ms, None);
        let serving = edge("reviews.demo.svc.cluster.local", "demo/reviews-v2");
        assert_eq!(serving.reporters, vec!["source", "destination"]);
        assert_eq!(serving.requests, 14.0);
        assert!(!serving.mutual_tls, "4 of 14 were plaintext");
        assert_eq!(graph.edges.len(), 3);
        assert_eq!(graph.services.len(), 1);
        let reviews = &graph.services[0];
        assert_eq!(reviews.requests_per_second, 7.0);
        assert_eq!(reviews.error_rate, Some(2.0 / 14.0));
        assert_eq!(total_requests_per_second(&graph), 7.0);
    }

    #[test]
    fn tcp_edges_carry_bytes_per_second_and_idle_series_are_left_out() {
        let tcp = |reporter: &str, name: &str, bytes: f64| {
            format!(
                "istio_tcp_{name}_bytes_total{{reporter=\"{reporter}\",source_workload=\"client-a\",\
                 source_workload_namespace=\"demo\",destination_service=\"db.demo.svc.cluster.local\",\
                 destination_workload=\"db\",destination_workload_namespace=\"demo\",\
                 connection_security_policy=\"mutual_tls\"}} {bytes}\n"
            )
        };
        let graph = build(&[window(
            &(tcp("source", "sent", 300.0)
                + &tcp("source", "received", 100.0)
                + &tcp("destination", "sent", 999.0)
                + &requests("source", 200, "none", 0.0)),
            4.0,
        )]);
        assert_eq!(graph.edges.len(), 2, "{:?}", graph.edges);
        let edge = graph
            .edges
            .iter()
            .find(|e| e.source == "demo/client-a")
            .expect("client-a's edge");
        assert_eq!(edge.destination, "db.demo.svc.cluster.local");
        assert_eq!((edge.protocol, edge.bytes_per_second), ("tcp", 100.0));
        assert_eq!((edge.error_rate, edge.mutual_tls), (None, true));
        let node = graph
            .nodes
            .iter()
            .find(|n| n.id == "db.demo.svc.cluster.local")
            .expect("the Service");
        assert_eq!(
            (node.namespace.as_str(), node.name.as_str()),
            ("demo", "db"),
            "a Service named by its host when the agents gave no name"
        );
        assert_eq!(graph.window_seconds, 4.0);
    }

    #[test]
    fn dot_quotes_ids_and_labels_edges() {
        let graph = build(&[window(
            &(requests("source", 200, "mutual_tls", 3.0)
                + &durations("source", &[("5", 3.0), ("+Inf", 3.0)])),
            1.0,
        )]);
        let text = dot(&graph);
        assert!(text.starts_with("digraph mesh {\n"), "{text}");
        assert!(
            text.contains("  \"demo/client-a\" -> \"reviews.demo.svc.cluster.local\" [label=\"mTLS · 3.0 rps · 0.0% 5xx · p99 4.9 ms\", color=\"#2ca02c\", penwidth=2];"),
            "{text}"
        );
        assert!(
            text.contains(
                "  \"reviews.demo.svc.cluster.local\" [label=\"reviews\\ndemo\", shape=box];"
            ),
            "{text}"
        );
    }
}
