//! Istio's Telemetry API resolved per workload: whether the request metrics of the
//! requests a workload serves (`SERVER` mode) and sends (`CLIENT` mode) are reported, and
//! where their access log lines go (MeshConfig's providers) under which CEL filter.
//!
//! For each of `metrics` and `accessLogging`, the most specific Telemetry that sets it
//! decides for a workload — one that selects it (`selector`, `targetRefs`) over its
//! namespace's over the root namespace's — as Istio resolves them. Without one, requests are reported wherever the agents serve
//! them request by request anyway (routing, per-request policies); a Telemetry that
//! enables the Prometheus provider for a workload makes its agent serve its HTTP ports
//! request by request so that every request is reported — the per-node counterpart of
//! adding a waypoint in Istio's ambient mode — and one that disables them stops them.

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::{
    config::{
        istio::{AccessLogging, IstioMetric, Metrics, Telemetry, WorkloadMode},
        log_format::Pattern,
        mesh_config::{Encoding, MeshConfig, ENVOY_PROVIDER},
        ClusterConfig, Resource,
    },
    model::{
        access_log::{LogEntry, LogFormat},
        scope::{scope_of, Scope},
        Workload,
    },
};

/// The provider Istio's default metrics go to; a `metrics` entry that names no provider
/// configures it.
const PROMETHEUS: &str = "prometheus";

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
    /// Where the requests the workload serves are logged.
    pub server_logs: Option<Arc<AccessLogs>>,
    /// Where the requests it sends are logged.
    pub client_logs: Option<Arc<AccessLogs>>,
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
    /// filter drops it.
    pub fn lines<'a>(
        &'a self,
        entry: &'a LogEntry,
        mutual_tls: bool,
    ) -> impl Iterator<Item = (&'a std::path::Path, String)> + 'a {
        let kept = self
            .filter
            .as_ref()
            .is_none_or(|f| f.keeps(entry, mutual_tls));
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
#[derive(Serialize)]
pub struct LogFilter {
    pub expression: String,
    #[serde(skip)]
    program: cel_interpreter::Program,
}

impl std::fmt::Debug for LogFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LogFilter").field(&self.expression).finish()
    }
}

impl PartialEq for LogFilter {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression
    }
}
impl Eq for LogFilter {}

impl LogFilter {
    pub fn compile(expression: &str) -> Result<LogFilter, String> {
        let program = cel_interpreter::Program::compile(expression)
            .map_err(|err| format!("{expression:?} is not a CEL expression: {err}"))?;
        Ok(LogFilter {
            expression: expression.to_owned(),
            program,
        })
    }

    /// Whether `entry` is logged: the expression is true. An expression that cannot be
    /// evaluated for it (a missing header, a type mismatch) keeps the line, as a log
    /// that loses lines silently is worse than one with a line too many.
    pub fn keeps(&self, entry: &LogEntry, mutual_tls: bool) -> bool {
        use std::collections::HashMap;

        use cel_interpreter::{Context, Value};
        let text = |s: &str| Value::String(Arc::new(s.to_owned()));
        let address =
            |a: Option<std::net::SocketAddrV4>| a.map_or(Value::Null, |a| text(&a.to_string()));
        let headers: HashMap<String, Value> = entry
            .request_headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), text(value.to_str().ok()?)))
            })
            .collect();
        let request: HashMap<&str, Value> = HashMap::from([
            ("method", text(&entry.method)),
            ("path", text(&entry.path)),
            ("host", text(&entry.authority)),
            ("protocol", text(entry.protocol)),
            ("headers", headers.into()),
        ]);
        let grpc_status = entry
            .response_headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
            .map_or(Value::Null, Value::Int);
        let response: HashMap<&str, Value> = HashMap::from([
            ("code", Value::Int(entry.response_code.into())),
            ("flags", text(&entry.response_flags)),
            ("grpc_status", grpc_status),
        ]);
        let mut context = Context::default();
        context.add_variable_from_value("request", request);
        context.add_variable_from_value("response", response);
        context.add_variable_from_value(
            "connection",
            HashMap::from([("mtls", Value::Bool(mutual_tls))]),
        );
        context.add_variable_from_value(
            "source",
            HashMap::from([("address", address(entry.downstream_remote))]),
        );
        context.add_variable_from_value(
            "destination",
            HashMap::from([("address", address(entry.downstream_local))]),
        );
        context.add_variable_from_value(
            "upstream",
            HashMap::from([("address", address(entry.upstream_host))]),
        );
        !matches!(self.program.execute(&context), Ok(Value::Bool(false)))
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
}

struct Rule {
    scope: Scope,
    /// 0: mesh-wide, 1: a namespace, 2: selected workloads.
    specificity: u8,
    name: String,
    server: Reporting,
    client: Reporting,
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
            .map(|t| compile(t, config, root_namespace))
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
        TelemetryConfig {
            rules,
            log_rules,
            default_logs: (!default_sinks.is_empty()).then(|| {
                Arc::new(AccessLogs {
                    sinks: default_sinks,
                    filter: None,
                })
            }),
        }
    }

    pub fn for_workload(&self, workload: &Workload) -> WorkloadTelemetry {
        let mut found = match self.rules.iter().find(|rule| rule.scope.selects(workload)) {
            Some(rule) => WorkloadTelemetry {
                server: rule.server,
                client: rule.client,
                decided_by: Some(rule.name.clone()),
                ..WorkloadTelemetry::default()
            },
            None => WorkloadTelemetry::default(),
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
        found
    }
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

fn compile(telemetry: &Resource<Telemetry>, config: &ClusterConfig, root_namespace: &str) -> Rule {
    let (scope, specificity, name) = scope_and_name(telemetry, config, root_namespace);
    let spec = &telemetry.spec;
    Rule {
        scope,
        specificity,
        name,
        server: reporting(&spec.metrics, WorkloadMode::Server),
        client: reporting(&spec.metrics, WorkloadMode::Client),
    }
}

/// What `metrics` say of the request count in `mode`: the Prometheus provider's entries
/// decide, each override that matches the request metrics in `mode` in turn.
fn reporting(metrics: &[Metrics], mode: WorkloadMode) -> Reporting {
    let mut decided = Reporting::WhenServed;
    for entry in metrics {
        let prometheus =
            entry.providers.is_empty() || entry.providers.iter().any(|p| p.name == PROMETHEUS);
        if !prometheus {
            continue;
        }
        let mut enabled = true;
        for over in &entry.overrides {
            let selector = over.selector.as_ref();
            let metric = selector
                .and_then(|s| s.metric)
                .unwrap_or(IstioMetric::AllMetrics);
            let applies_to_mode = match selector.and_then(|s| s.mode) {
                None | Some(WorkloadMode::ClientAndServer) => true,
                Some(other) => other == mode,
            };
            let custom = selector.is_some_and(|s| s.custom_metric.is_some());
            if applies_to_mode && !custom && counts_requests(metric) {
                enabled = !over.disabled.unwrap_or(false);
            }
        }
        decided = if enabled {
            Reporting::Always
        } else {
            Reporting::Never
        };
    }
    decided
}

/// The request metrics are reported together: disabling any of them stops the count.
fn counts_requests(metric: IstioMetric) -> bool {
    matches!(
        metric,
        IstioMetric::AllMetrics
            | IstioMetric::RequestCount
            | IstioMetric::RequestDuration
            | IstioMetric::RequestSize
            | IstioMetric::ResponseSize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_most_specific_telemetry_decides_and_overrides_match_by_mode() {
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
            (Reporting::Never, Reporting::Always)
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
}
