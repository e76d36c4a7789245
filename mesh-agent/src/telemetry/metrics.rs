//! Prometheus metrics of the node agent. TCP metrics carry Istio's standard names and
//! labels (`telemetry::tcp_metrics`); their counts come from the kernel: the sockops
//! program's flow events (ring buffer) and its per-connection map, joined with what the
//! proxy decided for the connection (which endpoint and Service it reached). The same
//! events give a connection the kernel carried alone its client's access log line.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use mesh_common::{
    verdict, FlowEvent, FlowKey, FlowStats, FLOW_EVENT_CLOSE, FLOW_EVENT_OPEN, FLOW_FLAG_DIRECT,
    FLOW_ROLE_CLIENT,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{io::unix::AsyncFd, time::MissedTickBehavior};

use crate::{
    datapath::{ip_from_key, monotonic_ns},
    model::{
        access_log::LogEntry, metric_rules::connection_attributes, outlier::EjectionReason,
        MeshState, SharedState, Workload,
    },
    telemetry::{
        access_log::LogWriters,
        conns::ConnTable,
        process::ProcessCollector,
        request::RequestRecord,
        request_metrics::{
            Departed, LabelSettings, PeerLabels, Peers, Reporter, RequestMetrics, TagValues,
        },
        spans::SpanExport,
        tcp_metrics::{TcpKey, TcpMetrics},
        timing::Timing,
    },
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    decision: String,
    policy: String,
    layer: String,
    destination_workload: String,
    destination_workload_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CarriedLabels {
    how: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwtLabels {
    result: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoutedLabels {
    destination_service: String,
    route: String,
    response_code: String,
    response_flags: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EjectionLabels {
    cluster: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Flows older than this are labelled with what is known even if the proxy's record of
/// them never appears (a connection the agent did not carry).
const LABEL_WAIT: Duration = Duration::from_secs(2);

struct LiveFlow {
    seen: Instant,
    labels: Option<Arc<TcpKey>>,
    sent: u64,
    received: u64,
}

/// How often request series are checked for expiry: each check walks every series.
const EXPIRY_SWEEP: Duration = Duration::from_secs(10);

/// How often the flow event ring is read without being woken: sockops wakes the agent
/// only when the ring fills past `FLOW_EVENTS_WAKEUP_BYTES`, so this bounds how late a
/// connection's open or close reaches the metrics.
const FLOW_EVENT_DRAIN: Duration = Duration::from_millis(100);

/// The kernel maps the metrics read.
pub struct KernelMaps {
    pub flow_events: RingBuf<MapData>,
    pub flows: BpfHashMap<MapData, FlowKey, FlowStats>,
    pub verdicts: PerCpuArray<MapData, u64>,
}

struct Tracker {
    live: HashMap<FlowKey, LiveFlow>,
    flows: BpfHashMap<MapData, FlowKey, FlowStats>,
    verdicts: PerCpuArray<MapData, u64>,
    verdicts_reported: [u64; verdict::COUNT as usize],
}

pub struct Metrics {
    registry: Registry,
    tcp: TcpMetrics,
    tc_packets: Family<VerdictLabels, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
    tunnel_refusals: Family<ReasonLabels, Counter>,
    connection_refusals: Family<ReasonLabels, Counter>,
    certificate_requests: Family<ResultLabels, Counter>,
    dns_queries: Family<ResultLabels, Counter>,
    outlier_ejections: Family<EjectionLabels, Counter>,
    authz_decisions: Family<AuthzLabels, Counter>,
    jwt_validations: Family<JwtLabels, Counter>,
    carried: Family<CarriedLabels, Counter>,
    routed: Family<RoutedLabels, Counter>,
    rate_limited: Family<PolicyLabels, Counter>,
    pub config_generation: Gauge,
    pub config_objects_skipped: Gauge,
    pub enrolled_pods: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    map_refused: Family<MapLabels, Gauge>,
    tracker: Mutex<Option<Tracker>>,
    /// Istio's request metrics, tallied per connection.
    pub requests: RequestMetrics,
    /// The access logs' writers.
    pub access_logs: LogWriters,
    /// The spans' exporter.
    pub spans: SpanExport,
    /// Time inside the agent and policy evaluation time per request.
    pub timing: Timing,
    state: SharedState,
    conns: Arc<ConnTable>,
    trust_domain: String,
    expired: Mutex<Instant>,
}

impl Metrics {
    pub fn new(state: SharedState, conns: Arc<ConnTable>, requests: RequestMetrics) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(requests.clone()));
        let tcp = TcpMetrics::default();
        registry.register_collector(Box::new(tcp.clone()));
        let timing = Timing::default();
        registry.register_collector(Box::new(timing.clone()));
        registry.register_collector(Box::new(ProcessCollector));
        let access_logs = LogWriters::default();
        registry.register(
            "mesh_access_log_lines_written",
            "Access log lines written",
            access_logs.written.clone(),
        );
        registry.register(
            "mesh_access_log_lines_dropped",
            "Access log lines dropped because their writer was behind (a slow disk never slows requests)",
            access_logs.dropped.clone(),
        );
        let spans = SpanExport::new(state.clone());
        registry.register(
            "mesh_spans_exported",
            "Trace spans a collector took",
            spans.exported.clone(),
        );
        registry.register(
            "mesh_spans_dropped",
            "Trace spans dropped because the exporter's queue was full (a slow or dead collector never slows requests)",
            spans.dropped.clone(),
        );
        registry.register(
            "mesh_spans_export_failed",
            "Trace spans a collector did not take (unreachable or an error answer; not retried)",
            spans.failed.clone(),
        );
        let tc_packets = Family::<VerdictLabels, Counter>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let tunnel_refusals = Family::<ReasonLabels, Counter>::default();
        let connection_refusals = Family::<ReasonLabels, Counter>::default();
        let certificate_requests = Family::<ResultLabels, Counter>::default();
        let dns_queries = Family::<ResultLabels, Counter>::default();
        let outlier_ejections = Family::<EjectionLabels, Counter>::default();
        let authz_decisions = Family::<AuthzLabels, Counter>::default();
        let jwt_validations = Family::<JwtLabels, Counter>::default();
        let carried = Family::<CarriedLabels, Counter>::default();
        let routed = Family::<RoutedLabels, Counter>::default();
        let rate_limited = Family::<PolicyLabels, Counter>::default();
        let config_generation = Gauge::default();
        let config_objects_skipped = Gauge::default();
        let enrolled_pods = Gauge::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let map_capacity = Family::<MapLabels, Gauge>::default();
        let map_refused = Family::<MapLabels, Gauge>::default();
        registry.register(
            "mesh_tc_packets",
            "Packets seen by the tc programs on pod veths, by verdict (drops by reason)",
            tc_packets.clone(),
        );
        registry.register(
            "mesh_config_reloads",
            "Configuration loads, by result (rejected ones leave the last good configuration serving)",
            config_reloads.clone(),
        );
        registry.register(
            "mesh_certificate_requests",
            "Certificate signing requests this agent made to the CA, by result (issued, failed: the certificate in hand stays in use until it expires)",
            certificate_requests.clone(),
        );
        registry.register(
            "mesh_dns_queries",
            "DNS queries of local pods the agent's DNS proxy handled, by result (answered, nxdomain, forwarded, failed, truncated, malformed; refused: not a local pod; overloaded: dropped over the proxy's limits)",
            dns_queries.clone(),
        );
        registry.register(
            "mesh_outlier_ejections",
            "Endpoints ejected by outlier detection, by destination cluster and Envoy's ejection type (meshctl routes shows who is ejected now)",
            outlier_ejections.clone(),
        );
        registry.register(
            "mesh_tunnel_refusals",
            "HBONE connections and streams refused by this agent, by reason",
            tunnel_refusals.clone(),
        );
        registry.register(
            "mesh_connections_refused",
            "Captured pod connections reset before they were carried, by reason (source_limit: the pod holds its limit of concurrent connections; max_connections: over its DestinationRule's connectionPool.tcp.maxConnections)",
            connection_refusals.clone(),
        );
        registry.register(
            "mesh_authz_decisions",
            "AuthorizationPolicy decisions on connections (layer=connection, kernel) and HTTP requests (layer=request), by decision (allow, deny, audit) and deciding policy (- for the defaults)",
            authz_decisions.clone(),
        );
        registry.register(
            "mesh_jwt_validations",
            "Request tokens checked against RequestAuthentication rules, by result and reason",
            jwt_validations.clone(),
        );
        registry.register(
            "mesh_connections_carried",
            "Pod connections this agent carried, by how: kernel (pod to pod in the kernel, no agent socket), spliced (in the kernel), copied (through the agent), http (parsed per request), tunnel (HBONE to another node), direct (outside the mesh or DISABLE)",
            carried.clone(),
        );
        registry.register(
            "mesh_routed_requests",
            "Requests routed by a VirtualService in the source pod's agent, by Service, route, response code and Envoy response flags",
            routed.clone(),
        );
        registry.register(
            "mesh_rate_limited_requests",
            "Requests answered 429 by an HTTPLocalRateLimitPolicy, by policy",
            rate_limited.clone(),
        );
        registry.register(
            "mesh_config_generation",
            "Generation of the configuration being served",
            config_generation.clone(),
        );
        registry.register(
            "mesh_config_objects_skipped",
            "Objects of the Kubernetes API left out for their errors (their last good version, if any, serving)",
            config_objects_skipped.clone(),
        );
        registry.register(
            "mesh_enrolled_pods",
            "Local pods with the mesh programs attached",
            enrolled_pods.clone(),
        );
        registry.register(
            "mesh_map_entries",
            "Entries the agent wrote into a kernel map",
            map_entries.clone(),
        );
        registry.register(
            "mesh_map_capacity",
            "Entries a kernel map holds at most",
            map_capacity.clone(),
        );
        registry.register(
            "mesh_map_refused_entries",
            "Entries the mesh needs that are not in a kernel map (it is full); the datapath fails closed for them",
            map_refused.clone(),
        );
        Metrics {
            registry,
            tcp,
            tc_packets,
            config_reloads,
            tunnel_refusals,
            connection_refusals,
            certificate_requests,
            dns_queries,
            outlier_ejections,
            authz_decisions,
            jwt_validations,
            carried,
            routed,
            rate_limited,
            config_generation,
            config_objects_skipped,
            enrolled_pods,
            map_entries,
            map_capacity,
            map_refused,
            tracker: Mutex::new(None),
            trust_domain: requests.settings.trust_domain.clone(),
            requests,
            access_logs,
            spans,
            timing,
            state,
            conns,
            expired: Mutex::new(Instant::now()),
        }
    }

    /// Istio's mesh ID, the `istio.mesh_id` of spans: the trust domain, as Istio
    /// defaults it.
    pub fn mesh_id(&self) -> &str {
        &self.trust_domain
    }

    /// What a kernel map holds after the last sync.
    pub fn map_usage(&self, map: &str, entries: usize, capacity: u32, refused: usize) {
        let labels = MapLabels { map: map.into() };
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.map_entries.get_or_create(&labels).set(gauge(entries));
        self.map_capacity
            .get_or_create(&labels)
            .set(i64::from(capacity));
        self.map_refused.get_or_create(&labels).set(gauge(refused));
    }

    /// Counts an endpoint of `cluster` ejected by outlier detection.
    pub fn outlier_ejected(&self, cluster: &str, reason: EjectionReason) {
        self.outlier_ejections
            .get_or_create(&EjectionLabels {
                cluster: cluster.to_owned(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a certificate request to the CA by whether it was issued.
    pub fn certificate_requested(&self, issued: bool) {
        let result = if issued { "issued" } else { "failed" };
        self.certificate_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts a DNS query the proxy handled, by its result.
    pub fn dns_query(&self, result: &'static str) {
        self.dns_queries
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn tunnel_refused(&self, reason: &str) {
        self.tunnel_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a captured connection reset before it was planned.
    /// Counts a routed request by its outcome.
    pub fn request_routed(&self, record: &RequestRecord) {
        self.routed
            .get_or_create(&RoutedLabels {
                destination_service: record.service.clone(),
                route: record.route.clone().unwrap_or_else(|| "-".into()),
                response_code: record.status.map_or("0".into(), |s| s.as_u16().to_string()),
                response_flags: record.flags.to_string(),
            })
            .inc();
    }

    /// Counts a request an HTTPLocalRateLimitPolicy refused.
    pub fn rate_limited(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .inc();
    }

    pub fn connection_refused(&self, reason: &str) {
        self.connection_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one authorization decision on `destination`.
    pub fn authz_decision(
        &self,
        decision: &str,
        policy: &str,
        layer: &str,
        destination: &Workload,
    ) {
        self.authz_decisions
            .get_or_create(&AuthzLabels {
                decision: decision.into(),
                policy: policy.into(),
                layer: layer.into(),
                destination_workload: destination.workload.clone(),
                destination_workload_namespace: destination.namespace.clone(),
            })
            .inc();
    }

    /// Counts a pod connection by how it was carried.
    pub fn carried(&self, how: &str) {
        self.carried
            .get_or_create(&CarriedLabels { how: how.into() })
            .inc();
    }

    pub fn jwt_validation(&self, result: &str, reason: &str) {
        self.jwt_validations
            .get_or_create(&JwtLabels {
                result: result.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn config_reload(&self, accepted: bool) {
        let result = if accepted { "success" } else { "rejected" };
        self.config_reloads
            .get_or_create(&ReloadLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Starts reading the kernel's flow events; returns when the ring buffer fails.
    pub async fn run(self: Arc<Self>, maps: KernelMaps) {
        let KernelMaps {
            flow_events,
            flows,
            verdicts,
        } = maps;
        *self.lock() = Some(Tracker {
            live: HashMap::new(),
            flows,
            verdicts,
            verdicts_reported: [0; verdict::COUNT as usize],
        });
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring.
        let registered = unsafe { AsyncFd::register(flow_events) };
        let mut events = match registered {
            Ok(fd) => fd,
            Err(err) => {
                tracing::error!("polling the flow event ring buffer: {err}");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut drain = tokio::time::interval(FLOW_EVENT_DRAIN);
        drain.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = events.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(err) => {
                            tracing::error!("flow event ring buffer (fd {}): {err}", events.get_ref().as_raw_fd());
                            return;
                        }
                    };
                    let batch = read_flow_events(guard.get_inner_mut());
                    guard.clear_ready();
                    self.apply_events(&batch);
                }
                _ = drain.tick() => {
                    let batch = read_flow_events(events.get_mut());
                    self.apply_events(&batch);
                }
                _ = tick.tick() => {
                    self.refresh();
                    self.conns.sweep();
                    self.expire_series();
                }
            }
        }
    }

    /// Forgets request series of workloads that left, every [`EXPIRY_SWEEP`].
    fn expire_series(&self) {
        let mut last = self.expired.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(*last) >= EXPIRY_SWEEP {
            *last = now;
            let state = self.state.current();
            self.requests.expire(&state, now);
            self.expire_tcp(&state, now);
        }
    }

    /// Forgets the TCP series of workloads that left, idle for the expiry time and with no
    /// flow open.
    fn expire_tcp(&self, state: &MeshState, now: Instant) {
        let departed = Departed::of(state);
        let expiry = self.requests.expiry();
        let mut guard = self.lock();
        let Some(tracker) = guard.as_mut() else {
            return;
        };
        let open: HashSet<&TcpKey> = tracker
            .live
            .values()
            .filter_map(|f| f.labels.as_deref())
            .collect();
        self.tcp.expire(&open, &departed, expiry, now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Tracker>> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply_events(&self, events: &[FlowEvent]) {
        let state = self.state.current();
        let mut guard = self.lock();
        let Some(tracker) = guard.as_mut() else {
            return;
        };
        for event in events {
            match event.kind {
                FLOW_EVENT_OPEN => {
                    if event.stats.flags & FLOW_FLAG_DIRECT != 0
                        && event.stats.role == FLOW_ROLE_CLIENT
                    {
                        self.carried("kernel");
                    }
                    tracker.live.insert(
                        event.key,
                        LiveFlow {
                            seen: Instant::now(),
                            labels: None,
                            sent: 0,
                            received: 0,
                        },
                    );
                    self.settle(&state, &event.key, &event.stats, tracker, false);
                }
                FLOW_EVENT_CLOSE => {
                    tracker.live.entry(event.key).or_insert(LiveFlow {
                        seen: Instant::now(),
                        labels: None,
                        sent: 0,
                        received: 0,
                    });
                    if let Some(labels) =
                        self.settle(&state, &event.key, &event.stats, tracker, true)
                    {
                        self.tcp.closed(&labels);
                    }
                    if event.stats.flags & FLOW_FLAG_DIRECT != 0
                        && event.stats.role == FLOW_ROLE_CLIENT
                    {
                        self.log_direct(&state, &event.key, &event.stats);
                    }
                    tracker.live.remove(&event.key);
                    self.conns.remove(&event.key);
                }
                _ => {}
            }
        }
    }

    /// Writes the client's access log line of a connection the kernel carried alone, as
    /// the agent writes one for a connection it carries (it saw none of it).
    fn log_direct(&self, state: &MeshState, key: &FlowKey, stats: &FlowStats) {
        let security = state.security_of(ip_from_key(key.local_ip));
        let Some(logs) = security.telemetry.client_logs.as_ref() else {
            return;
        };
        let entry = direct_log_entry(state, key, stats, monotonic_ns(), SystemTime::now());
        for (path, line) in logs.lines(&entry, false, None) {
            self.access_logs.write(path, line);
        }
    }

    /// Labels the flow when that is possible and brings its byte counters up to `stats`.
    fn settle(
        &self,
        state: &MeshState,
        key: &FlowKey,
        stats: &FlowStats,
        tracker: &mut Tracker,
        closing: bool,
    ) -> Option<Arc<TcpKey>> {
        let flow = tracker.live.get_mut(key)?;
        if flow.labels.is_none() {
            let record = self.conns.get(key);
            // The agent keeps no record of a connection the kernel carries alone.
            let direct = stats.flags & FLOW_FLAG_DIRECT != 0;
            let patient = !closing && !direct && flow.seen.elapsed() < LABEL_WAIT;
            if record.is_none() && patient {
                return None;
            }
            let labels = Arc::new(tcp_key(
                state,
                key,
                stats,
                record.as_ref(),
                &self.requests.settings,
            )?);
            self.tcp.opened(&labels);
            flow.labels = Some(labels);
        }
        let labels = flow.labels.clone()?;
        let sent = stats.bytes_sent.saturating_sub(flow.sent);
        let received = stats.bytes_received.saturating_sub(flow.received);
        if sent > 0 || received > 0 {
            self.tcp.moved(&labels, sent, received);
            flow.sent = flow.sent.max(stats.bytes_sent);
            flow.received = flow.received.max(stats.bytes_received);
        }
        Some(labels)
    }

    /// Brings live flows and the tc verdict counters up to the kernel's figures.
    fn refresh(&self) {
        let state = self.state.current();
        let mut guard = self.lock();
        let Some(tracker) = guard.as_mut() else {
            return;
        };
        let keys: Vec<FlowKey> = tracker.live.keys().copied().collect();
        for key in keys {
            if let Ok(stats) = tracker.flows.get(&key, 0) {
                self.settle(&state, &key, &stats, tracker, false);
            }
        }
        for index in 0..verdict::COUNT {
            let Ok(per_cpu) = tracker.verdicts.get(&index, 0) else {
                continue;
            };
            let total: u64 = per_cpu.iter().sum();
            let reported = &mut tracker.verdicts_reported[index as usize];
            if total > *reported {
                self.tc_packets
                    .get_or_create(&VerdictLabels {
                        verdict: verdict::NAMES[index as usize].into(),
                    })
                    .inc_by(total - *reported);
                *reported = total;
            }
        }
    }

    /// The metrics in Prometheus' text exposition format (0.0.4), current to this moment.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {err}");
        }
        openmetrics_to_prometheus_text(&out)
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples `x_total`.
/// Prometheus' classic text format (what `promtool check metrics` and every scraper
/// accept) names the family after its samples and has no `# EOF` or `# UNIT` lines.
/// Every event waiting in the ring.
fn read_flow_events(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowEvent>() {
            // SAFETY: the kernel wrote a whole FlowEvent (checked length); read_unaligned
            // copes with the ring's 8-byte alignment.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) });
        }
    }
    batch
}

fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(text) = help.take() {
                let text = text.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The access log entry of a connection the kernel carried alone, from its client's
/// close event (`key` and `stats` from the client's socket) read at `now_ns`
/// (`CLOCK_MONOTONIC`) and `now`: what `ConnResult` logs for a connection the agent
/// carries, the client's bytes sent being the bytes received from downstream.
fn direct_log_entry(
    state: &MeshState,
    key: &FlowKey,
    stats: &FlowStats,
    now_ns: u64,
    now: SystemTime,
) -> LogEntry {
    let client = SocketAddrV4::new(ip_from_key(key.local_ip), key.local_port);
    let server = SocketAddrV4::new(ip_from_key(key.remote_ip), key.remote_port);
    let service = state.service_of(server).unwrap_or_default();
    LogEntry::connection(
        now - Duration::from_nanos(now_ns.saturating_sub(stats.opened_ns)),
        Duration::from_nanos(stats.updated_ns.saturating_sub(stats.opened_ns)),
        (stats.bytes_sent, stats.bytes_received),
        client,
        server,
        (server, format!("outbound|{}||{service}", server.port())),
    )
}

/// Istio's labels for a pod connection, seen from the pod at the key's local end:
/// `reporter="source"` for the client's socket, `"destination"` for the server's; under
/// that pod's Telemetry rules for the direction, their label expressions evaluated over
/// the connection.
fn tcp_key(
    state: &MeshState,
    key: &FlowKey,
    stats: &FlowStats,
    record: Option<&crate::telemetry::conns::ConnRecord>,
    settings: &LabelSettings,
) -> Option<TcpKey> {
    let local = state.workloads.get(&ip_from_key(key.local_ip))?;
    let remote_ip = ip_from_key(key.remote_ip);
    let remote_addr = std::net::SocketAddrV4::new(remote_ip, key.remote_port);
    let local_addr = std::net::SocketAddrV4::new(ip_from_key(key.local_ip), key.local_port);
    let telemetry = &state.security_of(local.ip).telemetry;
    let client = stats.role == FLOW_ROLE_CLIENT;
    let (reporter, source, destination, service, rules, addresses) = if client {
        let destination = match record {
            Some(record) => record.destination.clone(),
            None => state.workloads.get(&remote_ip).cloned(),
        };
        let service = record
            .and_then(|r| r.service.clone())
            .or_else(|| state.services.get(&remote_addr).map(|s| s.hostname.clone()))
            .or_else(|| state.service_of(remote_addr));
        (
            Reporter::Source,
            Some(local.clone()),
            destination,
            service,
            telemetry.client_metrics.as_ref(),
            (local_addr, remote_addr),
        )
    } else {
        let service = record
            .and_then(|r| r.service.clone())
            .or_else(|| state.service_of(local_addr));
        (
            Reporter::Destination,
            state.workloads.get(&remote_ip).cloned(),
            Some(local.clone()),
            service,
            telemetry.server_metrics.as_ref(),
            (remote_addr, local_addr),
        )
    };
    let mutual_tls = record.is_some_and(|r| r.mutual_tls);
    let peers = PeerLabels::new(
        state,
        &Peers {
            reporter,
            source: source.as_deref(),
            source_principal: None,
            destination: destination.as_deref(),
            service: service.as_deref(),
            mutual_tls,
            rules,
        },
        settings,
    );
    let tags = match rules {
        Some(rules) if !rules.values.is_empty() => rules
            .evaluate(&connection_attributes(addresses.0, addresses.1, mutual_tls))
            .into_boxed_slice(),
        _ => TagValues::default(),
    };
    Some(TcpKey { peers, tags })
}

#[cfg(test)]
pub fn test_requests() -> RequestMetrics {
    RequestMetrics::new(
        crate::telemetry::request_metrics::LabelSettings {
            trust_domain: "cluster.local".into(),
            cluster: "Kubernetes".into(),
        },
        Duration::from_secs(600),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_for_the_prometheus_text_format() {
        let text = openmetrics_to_prometheus_text(
            "# HELP istio_tcp_sent_bytes Bytes sent.\n# TYPE istio_tcp_sent_bytes counter\n\
             istio_tcp_sent_bytes_total{reporter=\"source\"} 5\n\
             # HELP mesh_config_generation Generation.\n# TYPE mesh_config_generation gauge\n\
             mesh_config_generation 2\n# EOF\n",
        );
        assert_eq!(
            text,
            "# HELP istio_tcp_sent_bytes_total Bytes sent.\n# TYPE istio_tcp_sent_bytes_total counter\n\
             istio_tcp_sent_bytes_total{reporter=\"source\"} 5\n\
             # HELP mesh_config_generation Generation.\n# TYPE mesh_config_generation gauge\n\
             mesh_config_generation 2\n"
        );
    }

    #[test]
    fn a_service_entry_is_labelled_with_its_own_namespace_not_its_host() {
        let config = crate::config::load_str(
            std::path::Path::new("se.yaml"),
            "apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.10}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: payments}
spec:
  hosts: [db.internal]
  addresses: [10.97.0.5]
  ports: [{number: 5432, name: tcp-db, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.200.0.50}]
",
        );
        let state = MeshState::build("node-1", &config);
        let key = FlowKey {
            local_ip: crate::datapath::ip_key("10.244.1.10".parse().expect("ip")),
            remote_ip: crate::datapath::ip_key("10.97.0.5".parse().expect("ip")),
            local_port: 40000,
            remote_port: 5432,
        };
        let stats = FlowStats {
            role: FLOW_ROLE_CLIENT,
            ..FlowStats::default()
        };
        let found = tcp_key(&state, &key, &stats, None, &settings()).expect("labels");
        let labels: HashMap<&str, &str> = found.peers.tcp_label_pairs().into_iter().collect();
        assert_eq!(labels["destination_service"], "db.internal");
        assert_eq!(labels["destination_service_name"], "db.internal");
        assert_eq!(labels["destination_service_namespace"], "payments");
        assert_eq!(labels["source_workload"], "client");
        assert_eq!(labels["reporter"], "source");
        assert_eq!(labels["request_protocol"], "tcp");
        assert!(!labels.contains_key("response_code"));
    }

    fn settings() -> LabelSettings {
        LabelSettings {
            trust_domain: "cluster.local".into(),
            cluster: "east".into(),
        }
    }

    fn pod(name: &str, ip: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{nodeName: node-1, serviceAccountName: {name}}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
    }

    fn flow(client: &str, server: &str) -> FlowKey {
        FlowKey {
            local_ip: crate::datapath::ip_key(client.parse().expect("ip")),
            remote_ip: crate::datapath::ip_key(server.parse().expect("ip")),
            local_port: 40000,
            remote_port: 5432,
        }
    }

    fn client_stats(sent: u64, received: u64) -> FlowStats {
        FlowStats {
            role: FLOW_ROLE_CLIENT,
            bytes_sent: sent,
            bytes_received: received,
            ..FlowStats::default()
        }
    }

    #[test]
    fn a_connection_the_kernel_carried_is_logged_as_the_agent_logs_one() {
        let cluster = pod("client", "10.244.1.10", "app: client")
            + &pod("db", "10.244.1.20", "app: db")
            + "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
               spec: {clusterIP: 10.96.0.20, selector: {app: db}, ports: [{port: 5432}]}\n";
        let state = MeshState::build(
            "node-1",
            &crate::config::load_str(std::path::Path::new("c.yaml"), &cluster),
        );
        let stats = FlowStats {
            opened_ns: 1_000_000_000,
            updated_ns: 1_250_000_000,
            ..client_stats(100, 40)
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let entry = direct_log_entry(
            &state,
            &flow("10.244.1.10", "10.244.1.20"),
            &stats,
            3_000_000_000,
            now,
        );
        // Opened two seconds before the event was read, closed 250 ms after it opened.
        assert_eq!(entry.start, now - Duration::from_secs(2));
        assert_eq!(entry.duration, Duration::from_millis(250));
        // Downstream is the client: what it sent, the proxy would have received.
        assert_eq!((entry.bytes_received, entry.bytes_sent), (100, 40));
        let server: SocketAddrV4 = "10.244.1.20:5432".parse().expect("address");
        assert_eq!(entry.upstream_host, Some(server));
        assert_eq!(entry.downstream_local, Some(server));
        assert_eq!(
            entry.downstream_remote,
            Some("10.244.1.10:40000".parse().expect("address"))
        );
        assert_eq!(
            entry.upstream_cluster.as_deref(),
            Some("outbound|5432||db.shop.svc.cluster.local")
        );
        assert_eq!(
            (entry.response_code, entry.response_flags.as_str()),
            (0, "-")
        );
    }

    fn encoded(tcp: &TcpMetrics) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(tcp.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    }

    #[test]
    fn tcp_series_carry_istios_standard_labels_and_follow_the_telemetry_rules() {
        let cluster = pod("client", "10.244.1.10", "app: client, version: v1")
            + &pod("db", "10.244.1.20", "app: db, version: v7")
            + "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: tcp, namespace: shop}\n\
               spec:\n  metrics:\n  - overrides:\n    - match: {metric: TCP_SENT_BYTES, mode: CLIENT}\n      \
               disabled: true\n    - match: {metric: TCP_OPENED_CONNECTIONS}\n      tagOverrides:\n        \
               source_principal: {operation: REMOVE}\n        to: {value: destination.address}\n        \
               secure: {value: 'connection.mtls'}\n        method: {value: request.method}\n";
        let state = MeshState::build(
            "node-1",
            &crate::config::load_str(std::path::Path::new("c.yaml"), &cluster),
        );
        let tcp = TcpMetrics::default();
        let key = Arc::new(
            tcp_key(
                &state,
                &flow("10.244.1.10", "10.244.1.20"),
                &client_stats(0, 0),
                None,
                &settings(),
            )
            .expect("labels"),
        );
        tcp.opened(&key);
        tcp.moved(&key, 100, 40);
        tcp.closed(&key);
        let text = encoded(&tcp);
        let standard = "reporter=\"source\",source_workload=\"client\",source_canonical_service=\"client\",\
            source_canonical_revision=\"v1\",source_workload_namespace=\"shop\",\
            source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_app=\"client\",\
            source_version=\"v1\",source_cluster=\"east\",destination_workload=\"db\",\
            destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/db\",\
            destination_app=\"db\",destination_version=\"v7\",destination_service=\"unknown\",\
            destination_canonical_service=\"db\",destination_canonical_revision=\"v7\",\
            destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",\
            destination_cluster=\"east\",request_protocol=\"tcp\",response_flags=\"-\",\
            connection_security_policy=\"none\"";
        assert!(
            text.contains(&format!(
                "istio_tcp_received_bytes_total{{{standard}}} 40\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "istio_tcp_connections_closed_total{{{standard}}} 1\n"
            )),
            "{text}"
        );
        // Turned off for the client side.
        assert!(!text.contains("istio_tcp_sent_bytes_total{"), "{text}");
        // The opened count: source_principal removed, labels from the connection, and a
        // request attribute a connection does not have is unknown.
        let opened = standard.replace(
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",",
            "",
        ) + ",method=\"unknown\",secure=\"false\",to=\"10.244.1.20:5432\"";
        assert!(
            text.contains(&format!(
                "istio_tcp_connections_opened_total{{{opened}}} 1\n"
            )),
            "{text}"
        );
    }

    #[test]
    fn tcp_series_of_a_workload_that_left_expire_once_idle_and_closed() {
        let here = pod("client", "10.244.1.10", "app: client");
        let cluster = here.clone()
            + &pod("job-1", "10.244.1.21", "app: job")
            + &pod("job-2", "10.244.1.22", "app: job");
        let load = |yaml: &str| {
            MeshState::build(
                "node-1",
                &crate::config::load_str(std::path::Path::new("c.yaml"), yaml),
            )
        };
        let (before, after) = (load(&cluster), load(&here));
        let tcp = TcpMetrics::default();
        let key = |server: &str| {
            Arc::new(
                tcp_key(
                    &before,
                    &flow("10.244.1.10", server),
                    &client_stats(0, 0),
                    None,
                    &settings(),
                )
                .expect("labels"),
            )
        };
        let (gone, busy) = (key("10.244.1.21"), key("10.244.1.22"));
        tcp.opened(&gone);
        tcp.opened(&busy);
        let open = HashSet::from([busy.as_ref()]);
        let departed = Departed::of(&after);
        let expiry = Duration::from_secs(60);
        let now = Instant::now();
        tcp.expire(&open, &departed, expiry, now);
        assert!(encoded(&tcp).contains("destination_workload=\"job-1\""));
        tcp.expire(&open, &departed, expiry, now + Duration::from_secs(61));
        let text = encoded(&tcp);
        assert!(!text.contains("destination_workload=\"job-1\""), "{text}");
        assert!(text.contains("destination_workload=\"job-2\""), "{text}");
        // A workload still in the mesh keeps its series however idle.
        tcp.expire(
            &HashSet::new(),
            &Departed::of(&before),
            expiry,
            now + Duration::from_secs(61),
        );
        assert!(encoded(&tcp).contains("destination_workload=\"job-2\""));
    }

    #[test]
    fn refused_connections_are_counted_by_reason() {
        let metrics = Metrics::new(SharedState::default(), Arc::default(), test_requests());
        metrics.connection_refused("source_limit");
        metrics.connection_refused("source_limit");
        let text = metrics.encode();
        assert!(
            text.contains("mesh_connections_refused_total{reason=\"source_limit\"} 2\n"),
            "{text}"
        );
    }
}
