//! Istio's Telemetry API resolved per workload: whether the request metrics of the
//! requests a workload serves (`SERVER` mode) and sends (`CLIENT` mode) are reported,
//! where their access log lines go (MeshConfig's providers) under which CEL filter, and
//! how they are traced (sampling, the OpenTelemetry collector spans go to, custom tags).
//!
//! For `accessLogging` and `tracing`, the most specific Telemetry that sets it decides for
//! a workload — one that selects it (`selector`, `targetRefs`) over its namespace's over
//! the root namespace's — as Istio resolves them; `metrics` are merged in that order
//! (`model::metric_rules`). Without one, requests are reported wherever the agents serve
//! them request by request anyway (routing, per-request policies); a Telemetry that
//! enables the Prometheus provider for a workload makes its agent serve its HTTP ports
//! request by request so that every request is reported — the per-node counterpart of
//! adding a waypoint in Istio's ambient mode — and one that disables them stops them.

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::{
    config::{
        cel,
        istio::{self, AccessLogging, Metrics, Telemetry, WorkloadMode},
        log_format::Pattern,
        mesh_config::{Encoding, MeshConfig, OpenTelemetryProvider, OtlpHeader, ENVOY_PROVIDER},
        ClusterConfig, Resource,
    },
    model::{
        access_log::{LogEntry, LogFormat},
        metric_rules::{reports_to_prometheus, request_attributes, MetricRules},
        scope::{scope_of, Scope},
        Workload,
    },
};

/// Whether requests are reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporting {
    /// No Telemetry decides: the requests the agents serve one by one anyway.
    #[default]
    WhenServed,
    /// Every request, on every port declared HTTP.
    Always,
    Never,
}

/// What the Telemetry API says about one workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkloadTelemetry {
    /// Requests the workload serves.
    pub server: Reporting,
    /// Requests the workload sends.
    pub client: Reporting,
    /// The Telemetry that decided (`namespace/name`).
    pub decided_by: Option<String>,
    /// Which request metrics of the requests it serves are reported, with which labels;
    /// `None`: all of them, with Istio's standard labels.
    pub server_metrics: Option<Arc<MetricRules>>,
    /// The same for the requests it sends.
    pub client_metrics: Option<Arc<MetricRules>>,
    /// Where the requests the workload serves are logged.
    pub server_logs: Option<Arc<AccessLogs>>,
    /// Where the requests it sends are logged.
    pub client_logs: Option<Arc<AccessLogs>>,
    /// How the requests it serves are traced; `None`: not at all (no tracing provider).
    pub server_tracing: Option<Arc<Tracing>>,
    /// How the requests it sends are traced.
    pub client_tracing: Option<Arc<Tracing>>,
}

impl WorkloadTelemetry {
    /// A Telemetry asks for spans of the requests the workload serves: its agent serves
    /// them request by request, as for metrics.
    pub fn traces_every_request(&self) -> bool {
        self.server_tracing
            .as_ref()
            .is_some_and(|t| t.decided_by.is_some() && t.collector.is_some())
    }
}

/// Istio's default sampling percentage, where neither a Telemetry nor MeshConfig's
/// `defaultConfig.tracing.sampling` says.
pub const DEFAULT_SAMPLING: f64 = 1.0;

/// How one direction of a workload's requests is traced.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Tracing {
    /// Where spans go; `None`: context is propagated and sampled, but no span is
    /// reported (`disableSpanReporting`, or a provider the mesh cannot export to).
    pub collector: Option<Arc<Collector>>,
    /// Requests that start a sampled trace, in millionths (1% is 10_000).
    pub sampling_millionths: u32,
    /// The tags every span gets, in order: the workload's (Istio's `istio.*`,
    /// `node_id`) and the Telemetry's literal and environment `customTags`.
    pub tags: Vec<(String, String)>,
    /// `customTags` read from each request's headers.
    pub header_tags: Vec<HeaderTag>,
    /// The OpenTelemetry `service.name` of its spans: `<canonical service>.<namespace>`.
    pub service_name: String,
    /// The Telemetry that decided (`namespace/name`), `None` for MeshConfig's defaults.
    pub decided_by: Option<String>,
}

impl Tracing {
    /// The sampling percentage.
    pub fn sampling(&self) -> f64 {
        f64::from(self.sampling_millionths) / 10_000.0
    }
}

/// A custom tag whose value is a request header's.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct HeaderTag {
    pub tag: String,
    #[serde(serialize_with = "header_name")]
    pub header: http::HeaderName,
    pub default_value: Option<String>,
}

fn header_name<S: serde::Serializer>(name: &http::HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

/// How spans reach a collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/HTTP, protobuf bodies.
    Http,
    /// OTLP/gRPC over HTTP/2 without TLS.
    Grpc,
}

/// The method OTLP/gRPC collectors take spans on.
const OTLP_GRPC_METHOD: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// An OpenTelemetry collector spans are exported to.
#[derive(Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Collector {
    pub provider: String,
    pub protocol: OtlpProtocol,
    /// `http://host:port/path` (for gRPC, the path of the export method).
    pub endpoint: String,
    pub timeout: std::time::Duration,
    /// Sent with every export (gRPC: as metadata); may hold credentials, so
    /// `/config_dump` leaves them out.
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
    /// Tag values are cut to this many bytes (Envoy's default 256).
    pub max_tag_length: usize,
}

impl Collector {
    /// The collector of a MeshConfig `opentelemetry` provider (checked when parsed):
    /// OTLP/gRPC unless it sets `http`, as in Istio.
    pub fn of(provider: &str, otel: &OpenTelemetryProvider) -> Collector {
        let host = otel
            .service
            .rsplit_once('/')
            .map_or(otel.service.as_str(), |(_, host)| host);
        let pairs = |headers: &[OtlpHeader]| -> Vec<(String, String)> {
            headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect()
        };
        let (protocol, path, timeout, headers) = match (&otel.http, &otel.grpc) {
            (Some(http), _) => (
                OtlpProtocol::Http,
                Some(http.path.as_str())
                    .filter(|p| !p.is_empty())
                    .unwrap_or("/v1/traces"),
                http.timeout.as_deref(),
                pairs(&http.headers),
            ),
            (None, grpc) => (
                OtlpProtocol::Grpc,
                OTLP_GRPC_METHOD,
                grpc.as_ref().and_then(|g| g.timeout.as_deref()),
                grpc.as_ref()
                    .map(|g| pairs(&g.initial_metadata))
                    .unwrap_or_default(),
            ),
        };
        Collector {
            provider: provider.to_owned(),
            protocol,
            endpoint: format!("http://{host}:{}{path}", otel.port),
            timeout: timeout
                .and_then(|t| istio::parse_duration(t).ok())
                .unwrap_or(std::time::Duration::from_secs(10)),
            headers,
            max_tag_length: otel.max_tag_length.map_or(256, |n| n as usize),
        }
    }
}

/// Istio's canonical service and revision of `workload`: its own labels first, then the
/// recommended Kubernetes labels, then `app` / `version`, then the workload's name and
/// `latest`.
pub fn canonical_names(workload: &Workload) -> (String, String) {
    let label = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| workload.labels.get(*name))
            .cloned()
    };
    (
        label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload.workload.clone()),
        label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into()),
    )
}

/// The access logs of requests in one direction.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct AccessLogs {
    pub sinks: Vec<Arc<LogSink>>,
    /// Only requests it keeps are logged.
    pub filter: Option<Arc<LogFilter>>,
}

impl AccessLogs {
    /// The lines `entry` makes, with where each goes: one per provider, none when the
    /// filter drops it. `attributes`: the request's CEL attributes if the caller built
    /// them already (else they are built here, only when there is a filter).
    pub fn lines<'a>(
        &'a self,
        entry: &'a LogEntry,
        mutual_tls: bool,
        attributes: Option<&cel_interpreter::Context>,
    ) -> impl Iterator<Item = (&'a std::path::Path, String)> + 'a {
        let kept = self.filter.as_ref().is_none_or(|f| match attributes {
            Some(context) => f.keeps(context),
            None => f.keeps(&request_attributes(entry, mutual_tls)),
        });
        self.sinks
            .iter()
            .filter(move |_| kept)
            .map(move |sink| (sink.path.as_path(), sink.format.render(entry)))
    }
}

/// A provider's destination and format.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct LogSink {
    pub provider: String,
    pub path: PathBuf,
    #[serde(skip)]
    pub format: LogFormat,
}

/// A `filter.expression` (CEL) over the request's attributes as Istio names them
/// (`request.method`, `request.path`, `request.host`, `request.headers`,
/// `request.protocol`, `response.code`, `response.flags`, `response.grpc_status`,
/// `connection.mtls`, `source.address`, `destination.address`, `upstream.address`).
#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct LogFilter(cel::Expression);

impl LogFilter {
    pub fn compile(expression: &str) -> Result<LogFilter, String> {
        cel::Expression::compile(expression).map(LogFilter)
    }

    /// Whether the request whose attributes are `context` is logged: the expression is
    /// true. An expression that cannot be evaluated for it (a missing header, a type
    /// mismatch) keeps the line, as a log that loses lines silently is worse than one
    /// with a line too many.
    pub fn keeps(&self, context: &cel_interpreter::Context) -> bool {
        !matches!(
            self.0.execute(context),
            Ok(cel_interpreter::Value::Bool(false))
        )
    }
}

/// The access log providers MeshConfig defines, by name.
pub fn log_providers(mesh: &MeshConfig) -> Result<Vec<Arc<LogSink>>, String> {
    let mut sinks = Vec::new();
    if !mesh.access_log_file.is_empty() {
        let format = match (mesh.access_log_encoding, mesh.access_log_format.as_str()) {
            (Some(Encoding::Json), "") => LogFormat::default_json(),
            (_, "") => LogFormat::default_text(),
            (Some(Encoding::Json), text) => {
                let labels: std::collections::BTreeMap<String, String> = serde_json::from_str(text)
                    .map_err(|err| {
                        format!(
                            "accessLogFormat: JSON encoding needs a JSON object of labels: {err}"
                        )
                    })?;
                LogFormat::json(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .map_err(|err| format!("accessLogFormat: {err}"))?
            }
            (_, text) => LogFormat::Text(
                Pattern::parse(text).map_err(|err| format!("accessLogFormat: {err}"))?,
            ),
        };
        sinks.push(Arc::new(LogSink {
            provider: ENVOY_PROVIDER.into(),
            path: PathBuf::from(&mesh.access_log_file),
            format,
        }));
    }
    for provider in &mesh.extension_providers {
        let Some(file) = &provider.envoy_file_access_log else {
            continue;
        };
        let at = |err: String| format!("extensionProviders {}: {err}", provider.name);
        let format = match &file.log_format {
            None => LogFormat::default_text(),
            Some(format) => match &format.text {
                Some(text) => LogFormat::Text(Pattern::parse(text).map_err(at)?),
                None if format.labels.is_empty() => LogFormat::default_json(),
                None => {
                    LogFormat::json(format.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                        .map_err(at)?
                }
            },
        };
        sinks.push(Arc::new(LogSink {
            provider: provider.name.clone(),
            path: PathBuf::from(&file.path),
            format,
        }));
    }
    Ok(sinks)
}

/// Every Telemetry with metrics or access log settings, compiled.
pub struct TelemetryConfig {
    rules: Vec<Rule>,
    log_rules: Vec<LogRule>,
    /// Logging where no Telemetry says anything: MeshConfig's default providers (or its
    /// `accessLogFile`).
    default_logs: Option<Arc<AccessLogs>>,
    trace_rules: Vec<TraceRule>,
    tracing_defaults: TracingDefaults,
}

/// What MeshConfig says of tracing where no Telemetry does.
struct TracingDefaults {
    /// `enableTracing: false` turns tracing off everywhere.
    enabled: bool,
    /// `defaultProviders.tracing`'s first provider, if any.
    provider: Option<String>,
    /// `defaultConfig.tracing.sampling`, else Istio's 1%.
    sampling: f64,
    /// The collectors MeshConfig's `opentelemetry` providers define, by provider name.
    collectors: Vec<Arc<Collector>>,
}

impl TracingDefaults {
    fn collector(&self, provider: &str) -> Option<Arc<Collector>> {
        self.collectors
            .iter()
            .find(|c| c.provider == provider)
            .cloned()
    }
}

struct TraceRule {
    scope: Scope,
    specificity: u8,
    name: String,
    /// `None`: no entry for the mode, a less specific Telemetry decides.
    server: Option<TraceEntry>,
    client: Option<TraceEntry>,
}

/// What a `tracing` entry decided for a mode.
#[derive(Clone)]
struct TraceEntry {
    provider: Option<String>,
    sampling: Option<f64>,
    disable_span_reporting: bool,
    custom_tags: Vec<(String, istio::CustomTag)>,
}

struct Rule {
    scope: Scope,
    /// 0: mesh-wide, 1: a namespace, 2: selected workloads.
    specificity: u8,
    name: String,
    metrics: Vec<Metrics>,
}

struct LogRule {
    scope: Scope,
    specificity: u8,
    name: String,
    /// `None`: no entry for the mode, a less specific Telemetry decides.
    server: Option<Logging>,
    client: Option<Logging>,
}

/// What an `accessLogging` entry decided: these logs, or none (`disabled`).
type Logging = Option<Arc<AccessLogs>>;

impl TelemetryConfig {
    /// Invalid pieces (a format, a filter) were refused by validation; here they are
    /// left out.
    pub fn compile(config: &ClusterConfig, root_namespace: &str) -> TelemetryConfig {
        let mut rules: Vec<Rule> = config
            .istio
            .telemetries
            .iter()
            .filter(|t| !t.spec.metrics.is_empty())
            .map(|t| {
                let (scope, specificity, name) = scope_and_name(t, config, root_namespace);
                Rule {
                    scope,
                    specificity,
                    name,
                    metrics: t.spec.metrics.clone(),
                }
            })
            .collect();
        // Most specific first; among equals, by name, so the choice never depends on the
        // order files were read in.
        rules.sort_by(|a, b| {
            b.specificity
                .cmp(&a.specificity)
                .then_with(|| a.name.cmp(&b.name))
        });
        let sinks = log_providers(&config.mesh_config).unwrap_or_default();
        let defaults = &config.mesh_config.default_providers.access_logging;
        let default_sinks: Vec<Arc<LogSink>> = if defaults.is_empty() {
            sinks
                .iter()
                .filter(|s| s.provider == ENVOY_PROVIDER)
                .cloned()
                .collect()
        } else {
            named(&sinks, defaults)
        };
        let mut log_rules: Vec<LogRule> = config
            .istio
            .telemetries
            .iter()
            .filter(|t| !t.spec.access_logging.is_empty())
            .map(|t| {
                let (scope, specificity, name) = scope_and_name(t, config, root_namespace);
                let logs = &t.spec.access_logging;
                LogRule {
                    scope,
                    specificity,
                    name,
                    server: access_logs(logs, WorkloadMode::Server, &sinks, &default_sinks),
                    client: access_logs(logs, WorkloadMode::Client, &sinks, &default_sinks),
                }
            })
            .collect();
        log_rules.sort_by(|a, b| {
            b.specificity
                .cmp(&a.specificity)
                .then_with(|| a.name.cmp(&b.name))
        });
        let mut trace_rules: Vec<TraceRule> = config
            .istio
            .telemetries
            .iter()
            .filter(|t| !t.spec.tracing.is_empty())
            .map(|t| {
                let (scope, specificity, name) = scope_and_name(t, config, root_namespace);
                TraceRule {
                    scope,
                    specificity,
                    name,
                    server: trace_entry(&t.spec.tracing, WorkloadMode::Server),
                    client: trace_entry(&t.spec.tracing, WorkloadMode::Client),
                }
            })
            .collect();
        trace_rules.sort_by(|a, b| {
            b.specificity
                .cmp(&a.specificity)
                .then_with(|| a.name.cmp(&b.name))
        });
        let mesh = &config.mesh_config;
        let tracing_defaults = TracingDefaults {
            enabled: mesh.enable_tracing != Some(false),
            provider: mesh.default_providers.tracing.first().cloned(),
            sampling: mesh
                .default_config
                .tracing
                .as_ref()
                .and_then(|t| t.sampling)
                .unwrap_or(DEFAULT_SAMPLING),
            collectors: mesh
                .extension_providers
                .iter()
                .filter_map(|p| Some(Arc::new(Collector::of(&p.name, p.opentelemetry.as_ref()?))))
                .collect(),
        };
        TelemetryConfig {
            rules,
            log_rules,
            trace_rules,
            tracing_defaults,
            default_logs: (!default_sinks.is_empty()).then(|| {
                Arc::new(AccessLogs {
                    sinks: default_sinks,
                    filter: None,
                })
            }),
        }
    }

    pub fn for_workload(&self, workload: &Workload) -> WorkloadTelemetry {
        let (server, server_metrics) = self.metrics(workload, WorkloadMode::Server);
        let (client, client_metrics) = self.metrics(workload, WorkloadMode::Client);
        let mut found = WorkloadTelemetry {
            server,
            client,
            decided_by: self
                .rules
                .iter()
                .find(|rule| rule.scope.selects(workload))
                .map(|rule| rule.name.clone()),
            server_metrics,
            client_metrics,
            ..WorkloadTelemetry::default()
        };
        let decided = |mode: fn(&LogRule) -> &Option<Logging>| {
            self.log_rules
                .iter()
                .filter(|rule| rule.scope.selects(workload))
                .find_map(|rule| mode(rule).clone())
                .unwrap_or_else(|| self.default_logs.clone())
        };
        found.server_logs = decided(|rule| &rule.server);
        found.client_logs = decided(|rule| &rule.client);
        found.server_tracing = self.tracing(workload, |rule| &rule.server);
        found.client_tracing = self.tracing(workload, |rule| &rule.client);
        found
    }

    /// Whether `workload`'s requests in `mode` are reported and under which rules: the
    /// `metrics` of every Telemetry that applies, merged from the least specific to the
    /// most specific, as Istio merges them.
    fn metrics(
        &self,
        workload: &Workload,
        mode: WorkloadMode,
    ) -> (Reporting, Option<Arc<MetricRules>>) {
        let mut rules = MetricRules::default();
        let mut reported = false;
        for rule in self
            .rules
            .iter()
            .rev()
            .filter(|r| r.scope.selects(workload))
        {
            reported |= rule.metrics.iter().any(reports_to_prometheus);
            rules.apply(&rule.metrics, mode);
        }
        let reporting = if !reported {
            Reporting::WhenServed
        } else if rules.reports_nothing() {
            Reporting::Never
        } else {
            Reporting::Always
        };
        // Kept when no request is counted: the TCP metrics follow them too.
        let changed = rules != MetricRules::default();
        (reporting, changed.then(|| Arc::new(rules)))
    }

    /// How `workload`'s requests in one mode are traced: the most specific Telemetry
    /// with a `tracing` entry for the mode, else MeshConfig's default provider.
    fn tracing(
        &self,
        workload: &Workload,
        mode: fn(&TraceRule) -> &Option<TraceEntry>,
    ) -> Option<Arc<Tracing>> {
        let defaults = &self.tracing_defaults;
        if !defaults.enabled {
            return None;
        }
        let decided = self
            .trace_rules
            .iter()
            .filter(|rule| rule.scope.selects(workload))
            .find_map(|rule| Some((rule.name.clone(), mode(rule).clone()?)));
        let (decided_by, entry) = match decided {
            Some((name, entry)) => (Some(name), entry),
            None => (
                None,
                TraceEntry {
                    provider: Some(defaults.provider.clone()?),
                    sampling: None,
                    disable_span_reporting: false,
                    custom_tags: Vec::new(),
                },
            ),
        };
        let provider = entry.provider.or_else(|| defaults.provider.clone());
        let collector = provider
            .filter(|_| !entry.disable_span_reporting)
            .and_then(|name| defaults.collector(&name));
        let sampling = entry.sampling.unwrap_or(defaults.sampling);
        let (canonical_service, canonical_revision) = canonical_names(workload);
        let mut tags = vec![
            (
                "istio.canonical_service".to_owned(),
                canonical_service.clone(),
            ),
            ("istio.canonical_revision".to_owned(), canonical_revision),
            ("istio.namespace".to_owned(), workload.namespace.clone()),
            (
                "node_id".to_owned(),
                format!(
                    "sidecar~{}~{}.{}~{}.svc.cluster.local",
                    workload.ip, workload.pod, workload.namespace, workload.namespace
                ),
            ),
        ];
        let mut header_tags = Vec::new();
        for (tag, custom) in &entry.custom_tags {
            if let Some(literal) = &custom.literal {
                tags.push((tag.clone(), literal.value.clone()));
            } else if let Some(env) = &custom.environment {
                let value = std::env::var(&env.name)
                    .ok()
                    .or_else(|| env.default_value.clone());
                if let Some(value) = value {
                    tags.push((tag.clone(), value));
                }
            } else if let Some(header) = &custom.header {
                if let Ok(name) = http::HeaderName::from_bytes(header.name.as_bytes()) {
                    header_tags.push(HeaderTag {
                        tag: tag.clone(),
                        header: name,
                        default_value: header.default_value.clone(),
                    });
                }
            }
        }
        Some(Arc::new(Tracing {
            collector,
            sampling_millionths: (sampling.clamp(0.0, 100.0) * 10_000.0).round() as u32,
            tags,
            header_tags,
            service_name: format!("{canonical_service}.{}", workload.namespace),
            decided_by,
        }))
    }
}

/// What `tracing` says for `mode`: the last entry that matches the mode decides; `None`
/// when no entry matches it.
fn trace_entry(tracing: &[istio::Tracing], mode: WorkloadMode) -> Option<TraceEntry> {
    tracing
        .iter()
        .rfind(|entry| match entry.selector.as_ref().and_then(|s| s.mode) {
            None | Some(WorkloadMode::ClientAndServer) => true,
            Some(other) => other == mode,
        })
        .map(|entry| TraceEntry {
            provider: entry.providers.first().map(|p| p.name.clone()),
            sampling: entry.random_sampling_percentage,
            disable_span_reporting: entry.disable_span_reporting == Some(true),
            custom_tags: entry
                .custom_tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
}

/// The sinks of the providers `names` lists (unknown names were reported by validation).
fn named(sinks: &[Arc<LogSink>], names: &[String]) -> Vec<Arc<LogSink>> {
    sinks
        .iter()
        .filter(|s| names.contains(&s.provider))
        .cloned()
        .collect()
}

/// What `logging` says for `mode`: the last entry that matches the mode decides (an
/// entry is disabled, or names its providers — the default ones when it names none — and
/// its filter); `None` when no entry matches the mode.
fn access_logs(
    logging: &[AccessLogging],
    mode: WorkloadMode,
    sinks: &[Arc<LogSink>],
    default_sinks: &[Arc<LogSink>],
) -> Option<Logging> {
    let mut decided = None;
    for entry in logging {
        let applies = match entry.selector.as_ref().and_then(|s| s.mode) {
            None | Some(WorkloadMode::ClientAndServer) => true,
            Some(other) => other == mode,
        };
        if !applies {
            continue;
        }
        if entry.disabled == Some(true) {
            decided = Some(None);
            continue;
        }
        let names: Vec<String> = entry.providers.iter().map(|p| p.name.clone()).collect();
        let chosen = if names.is_empty() {
            default_sinks.to_vec()
        } else {
            named(sinks, &names)
        };
        let filter = entry
            .filter
            .as_ref()
            .and_then(|f| LogFilter::compile(&f.expression).ok())
            .map(Arc::new);
        decided = Some((!chosen.is_empty()).then(|| {
            Arc::new(AccessLogs {
                sinks: chosen,
                filter,
            })
        }));
    }
    decided
}

fn scope_and_name(
    telemetry: &Resource<Telemetry>,
    config: &ClusterConfig,
    root_namespace: &str,
) -> (Scope, u8, String) {
    let spec = &telemetry.spec;
    let namespace = telemetry.namespace();
    let selector = spec.selector.as_ref().map(|s| &s.match_labels);
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    let specificity = if targeted || selector.is_some_and(|labels| !labels.is_empty()) {
        2
    } else if namespace == root_namespace {
        0
    } else {
        1
    };
    let scope = scope_of(
        namespace,
        selector,
        spec.target_ref.iter().chain(&spec.target_refs),
        config,
        root_namespace,
    );
    (
        scope,
        specificity,
        format!("{namespace}/{}", telemetry.metadata.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::metric_rules::StandardMetric;

    const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-1, serviceAccountName: db}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: jobs}
spec: {nodeName: node-1, serviceAccountName: batch}
status: {podIP: 10.244.1.12}
";

    fn telemetry_of(extra: &str, pod: &str) -> WorkloadTelemetry {
        let config =
            crate::config::load_str(std::path::Path::new("t.yaml"), &format!("{PODS}{extra}"));
        let workload = crate::model::MeshState::build("node-1", &config)
            .workloads
            .values()
            .find(|w| w.pod == pod)
            .cloned()
            .expect("pod");
        TelemetryConfig::compile(&config, "istio-system").for_workload(&workload)
    }

    const MESH_ON: &str = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
";

    #[test]
    fn without_a_telemetry_requests_are_reported_where_they_are_served() {
        assert_eq!(telemetry_of("", "web"), WorkloadTelemetry::default());
    }

    #[test]
    fn a_mesh_wide_telemetry_reports_every_request_of_every_workload() {
        let found = telemetry_of(MESH_ON, "batch");
        assert_eq!(
            (found.server, found.client),
            (Reporting::Always, Reporting::Always)
        );
        assert_eq!(
            found.decided_by.as_deref(),
            Some("istio-system/mesh-default")
        );
    }

    #[test]
    fn telemetries_merge_and_overrides_match_by_metric_and_mode() {
        let extra = format!(
            "{MESH_ON}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: quiet-shop, namespace: shop}}
spec:
  metrics:
  - overrides:
    - match: {{metric: REQUEST_COUNT, mode: SERVER}}
      disabled: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: db-off, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  metrics:
  - providers: [{{name: prometheus}}]
    overrides:
    - disabled: true
"
        );
        let web = telemetry_of(&extra, "web");
        assert_eq!(
            (web.server, web.client),
            (Reporting::Always, Reporting::Always),
            "only the request count is off, the other request metrics go on"
        );
        let server = web.server_metrics.expect("the server side changed");
        assert!(server.disabled.contains(StandardMetric::RequestCount));
        assert!(!server.disabled.contains(StandardMetric::RequestDuration));
        assert_eq!(
            web.client_metrics, None,
            "the client side keeps the defaults"
        );
        assert_eq!(web.decided_by.as_deref(), Some("shop/quiet-shop"));
        let db = telemetry_of(&extra, "db");
        assert_eq!((db.server, db.client), (Reporting::Never, Reporting::Never));
        let batch = telemetry_of(&extra, "batch");
        assert_eq!(batch.server, Reporting::Always);
    }

    #[test]
    fn entries_for_other_providers_and_tcp_metrics_do_not_decide_requests() {
        let extra = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: other, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: stackdriver}]
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: TCP_OPENED_CONNECTIONS}
      disabled: true
";
        let found = telemetry_of(extra, "web");
        assert_eq!(found.server, Reporting::Always);
    }

    #[test]
    fn mesh_config_access_log_file_logs_everywhere_until_a_telemetry_turns_it_off() {
        let mesh = "---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    accessLogFile: /dev/stdout
";
        let everywhere = telemetry_of(mesh, "batch");
        let logs = everywhere.server_logs.expect("logged by default");
        assert_eq!(logs.sinks[0].provider, "envoy");
        assert!(everywhere.client_logs.is_some());
        let off = format!(
            "{mesh}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: quiet, namespace: shop}}
spec:
  accessLogging:
  - match: {{mode: SERVER}}
    disabled: true
"
        );
        let web = telemetry_of(&off, "web");
        assert!(web.server_logs.is_none());
        assert!(web.client_logs.is_some(), "only the server side is off");
        assert!(telemetry_of(&off, "batch").server_logs.is_some());
    }

    const TRACING_MESH: &str = "---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    defaultConfig: {tracing: {sampling: 5}}
    extensionProviders:
    - name: otel
      opentelemetry:
        service: observability/collector.observability.svc.cluster.local
        port: 4318
        http: {path: /otlp/v1/traces, timeout: 2s, headers: [{name: x-tenant, value: mesh}]}
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
";

    #[test]
    fn a_provider_without_http_exports_over_grpc_as_in_istio() {
        let otel = OpenTelemetryProvider {
            service: "observability/collector.observability.svc.cluster.local".into(),
            port: 4317,
            max_tag_length: None,
            http: None,
            grpc: Some(crate::config::mesh_config::OtlpGrpc {
                timeout: Some("3s".into()),
                initial_metadata: vec![OtlpHeader {
                    name: "x-tenant".into(),
                    value: "mesh".into(),
                }],
            }),
        };
        let collector = Collector::of("otel", &otel);
        assert_eq!(collector.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            collector.endpoint,
            "http://collector.observability.svc.cluster.local:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(collector.timeout, std::time::Duration::from_secs(3));
        assert_eq!(
            collector.headers,
            [("x-tenant".to_owned(), "mesh".to_owned())]
        );
        let bare = Collector::of("otel", &OpenTelemetryProvider { grpc: None, ..otel });
        assert_eq!(
            (bare.protocol, bare.timeout),
            (OtlpProtocol::Grpc, std::time::Duration::from_secs(10))
        );
    }

    #[test]
    fn without_a_default_provider_or_a_telemetry_nothing_is_traced() {
        let found = telemetry_of(TRACING_MESH, "web");
        assert_eq!((found.server_tracing, found.client_tracing), (None, None));
    }

    #[test]
    fn mesh_config_default_provider_traces_at_its_default_sampling() {
        let mesh = TRACING_MESH.replace(
            "    defaultConfig:",
            "    defaultProviders: {tracing: [otel]}\n    defaultConfig:",
        );
        let found = telemetry_of(&mesh, "web");
        let tracing = found.server_tracing.clone().expect("traced");
        assert_eq!(tracing.sampling(), 5.0);
        assert_eq!(tracing.decided_by, None);
        let collector = tracing.collector.as_ref().expect("a collector");
        assert_eq!(
            collector.endpoint,
            "http://collector.observability.svc.cluster.local:4318/otlp/v1/traces"
        );
        assert_eq!(collector.protocol, OtlpProtocol::Http);
        assert_eq!(collector.timeout, std::time::Duration::from_secs(2));
        assert_eq!(
            collector.headers,
            [("x-tenant".to_owned(), "mesh".to_owned())]
        );
        assert_eq!(tracing.service_name, "web.shop");
        assert_eq!(
            tracing.tags,
            [
                ("istio.canonical_service".to_owned(), "web".to_owned()),
                ("istio.canonical_revision".to_owned(), "latest".to_owned()),
                ("istio.namespace".to_owned(), "shop".to_owned()),
                (
                    "node_id".to_owned(),
                    "sidecar~10.244.1.10~web.shop~shop.svc.cluster.local".to_owned()
                ),
            ]
        );
        assert!(
            !found.traces_every_request(),
            "MeshConfig's default does not make a workload's requests be served one by one"
        );
        let off = mesh.replace(
            "    defaultConfig:",
            "    enableTracing: false\n    defaultConfig:",
        );
        assert_eq!(telemetry_of(&off, "web").server_tracing, None);
    }

    #[test]
    fn the_most_specific_telemetry_decides_tracing_per_mode() {
        let extra = format!(
            "{TRACING_MESH}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-tracing, namespace: istio-system}}
spec:
  tracing:
  - providers: [{{name: otel}}]
    randomSamplingPercentage: 100
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: shop-tracing, namespace: shop}}
spec:
  tracing:
  - match: {{mode: SERVER}}
    providers: [{{name: otel}}]
    randomSamplingPercentage: 0.5
    customTags:
      team: {{literal: {{value: payments}}}}
      tenant: {{header: {{name: x-tenant, defaultValue: none}}}}
      home: {{environment: {{name: MESH_TEST_NO_SUCH_VARIABLE, defaultValue: unset}}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: db-quiet, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  tracing:
  - disableSpanReporting: true
"
        );
        let web = telemetry_of(&extra, "web");
        let server = web.server_tracing.as_ref().expect("server traced");
        assert_eq!(server.decided_by.as_deref(), Some("shop/shop-tracing"));
        assert_eq!(server.sampling_millionths, 5_000);
        assert_eq!(
            server.tags[4..],
            [
                ("home".to_owned(), "unset".to_owned()),
                ("team".to_owned(), "payments".to_owned()),
            ]
        );
        assert_eq!(server.header_tags.len(), 1);
        assert_eq!(server.header_tags[0].header.as_str(), "x-tenant");
        assert_eq!(server.header_tags[0].default_value.as_deref(), Some("none"));
        assert!(web.traces_every_request());
        // The namespace's Telemetry says nothing of CLIENT: the root namespace's decides.
        let client = web.client_tracing.as_ref().expect("client traced");
        assert_eq!(
            client.decided_by.as_deref(),
            Some("istio-system/mesh-tracing")
        );
        assert_eq!(client.sampling(), 100.0);
        // A selected workload's Telemetry, without providers or sampling: MeshConfig's
        // sampling, no spans reported, context still propagated.
        let db = telemetry_of(&extra, "db");
        let db_server = db.server_tracing.as_ref().expect("db traced");
        assert_eq!(db_server.decided_by.as_deref(), Some("shop/db-quiet"));
        assert_eq!(
            (db_server.sampling(), db_server.collector.is_none()),
            (5.0, true)
        );
        assert!(!db.traces_every_request());
        // A zipkin provider is not exported to.
        let zipkin = extra.replace(
            "providers: [{name: otel}]\n    randomSamplingPercentage: 100",
            "providers: [{name: zipkin}]",
        );
        let batch = telemetry_of(&zipkin, "batch");
        assert!(batch.server_tracing.expect("traced").collector.is_none());
    }
}
