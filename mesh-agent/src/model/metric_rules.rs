//! What Telemetry `metrics` entries say of one workload's metrics in one direction:
//! which of Istio's standard metrics (request and TCP) are reported, and how their labels
//! change (`tagOverrides`: a standard label removed, or a label set to a CEL expression's
//! value over the request's or the connection's attributes).
//!
//! As in Istio, the entries of every Telemetry that applies to a workload are merged from
//! the least specific to the most specific (root namespace, then the workload's namespace,
//! then those that select it), so a namespace can add a label the mesh-wide Telemetry does
//! not have and a workload can turn a metric back on.

use std::{collections::HashMap, sync::Arc};

use cel_interpreter::{Context, Value};
use serde::Serialize;

use crate::config::{
    cel,
    istio::{IstioMetric, Metrics, TagOperation, WorkloadMode},
};

/// The provider Istio's default metrics go to; a `metrics` entry that names no provider
/// configures it.
pub const PROMETHEUS: &str = "prometheus";

/// Istio's standard metrics, as `overrides[].match.metric` names them: the request
/// metrics, then the TCP metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StandardMetric {
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    GrpcRequestMessages,
    GrpcResponseMessages,
    TcpOpenedConnections,
    TcpClosedConnections,
    TcpSentBytes,
    TcpReceivedBytes,
}

impl StandardMetric {
    pub const ALL: [StandardMetric; 10] = [
        StandardMetric::RequestCount,
        StandardMetric::RequestDuration,
        StandardMetric::RequestSize,
        StandardMetric::ResponseSize,
        StandardMetric::GrpcRequestMessages,
        StandardMetric::GrpcResponseMessages,
        StandardMetric::TcpOpenedConnections,
        StandardMetric::TcpClosedConnections,
        StandardMetric::TcpSentBytes,
        StandardMetric::TcpReceivedBytes,
    ];

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A set of standard metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MetricSet(u16);

impl MetricSet {
    const EVERY: MetricSet = MetricSet(0b11_1111_1111);
    /// The request metrics: with all of them off, requests are not counted at all.
    const REQUESTS: MetricSet = MetricSet(0b11_1111);

    /// The metrics an override's `match.metric` names.
    fn of(metric: IstioMetric) -> MetricSet {
        let one = |m: StandardMetric| MetricSet(m.bit());
        match metric {
            IstioMetric::AllMetrics => MetricSet::EVERY,
            IstioMetric::RequestCount => one(StandardMetric::RequestCount),
            IstioMetric::RequestDuration => one(StandardMetric::RequestDuration),
            IstioMetric::RequestSize => one(StandardMetric::RequestSize),
            IstioMetric::ResponseSize => one(StandardMetric::ResponseSize),
            IstioMetric::GrpcRequestMessages => one(StandardMetric::GrpcRequestMessages),
            IstioMetric::GrpcResponseMessages => one(StandardMetric::GrpcResponseMessages),
            IstioMetric::TcpOpenedConnections => one(StandardMetric::TcpOpenedConnections),
            IstioMetric::TcpClosedConnections => one(StandardMetric::TcpClosedConnections),
            IstioMetric::TcpSentBytes => one(StandardMetric::TcpSentBytes),
            IstioMetric::TcpReceivedBytes => one(StandardMetric::TcpReceivedBytes),
        }
    }

    pub fn contains(self, metric: StandardMetric) -> bool {
        self.0 & metric.bit() != 0
    }

    fn contains_all(self, other: MetricSet) -> bool {
        self.0 & other.0 == other.0
    }
}

impl Serialize for MetricSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(StandardMetric::ALL.iter().filter(|m| self.contains(**m)))
    }
}

/// A label a Telemetry changes on some request metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TagChange {
    pub metrics: MetricSet,
    pub label: String,
    /// The index of its value in [`MetricRules::values`]; `None`: the label is removed.
    pub upsert: Option<usize>,
}

/// A label's value: a CEL expression over the request's attributes.
#[derive(Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TagValue(cel::Expression);

/// The label value of an expression that cannot be evaluated for a request (a header it
/// lacks), as Istio writes it.
pub const UNKNOWN_VALUE: &str = "unknown";

impl TagValue {
    pub fn compile(expression: &str) -> Result<TagValue, String> {
        cel::Expression::compile(expression).map(TagValue)
    }

    pub fn expression(&self) -> &str {
        &self.0.expression
    }

    /// The label value for a request whose attributes are `context`: strings as they
    /// are, numbers and booleans written out, anything else [`UNKNOWN_VALUE`].
    pub fn evaluate(&self, context: &Context) -> String {
        match self.0.execute(context) {
            Ok(Value::String(text)) => text.as_str().to_owned(),
            Ok(Value::Int(n)) => n.to_string(),
            Ok(Value::UInt(n)) => n.to_string(),
            Ok(Value::Float(n)) => n.to_string(),
            Ok(Value::Bool(b)) => b.to_string(),
            _ => UNKNOWN_VALUE.to_owned(),
        }
    }
}

/// How one workload's request metrics in one direction are reported.
#[derive(Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct MetricRules {
    /// Metrics not reported.
    pub disabled: MetricSet,
    /// Label changes, applied in order.
    pub tags: Vec<TagChange>,
    /// The expressions computed for each request, in the order `tags` point at them.
    pub values: Vec<TagValue>,
}

impl MetricRules {
    /// Whether every request metric is off: no request is counted at all.
    pub fn reports_nothing(&self) -> bool {
        self.disabled.contains_all(MetricSet::REQUESTS)
    }

    /// The labels of a series of `metric`: `standard`, changed as the rules say, with
    /// `values` the request's values of [`MetricRules::values`]; `None` when the metric
    /// is off.
    pub fn labels<'a>(
        &'a self,
        metric: StandardMetric,
        standard: &[(&'static str, &'a str)],
        values: &'a [String],
    ) -> Option<Vec<(&'a str, &'a str)>> {
        if self.disabled.contains(metric) {
            return None;
        }
        let mut labels: Vec<(&str, &str)> = standard.to_vec();
        for change in self.tags.iter().filter(|c| c.metrics.contains(metric)) {
            let label = change.label.as_str();
            match change
                .upsert
                .map(|i| values.get(i).map_or(UNKNOWN_VALUE, String::as_str))
            {
                None => labels.retain(|(name, _)| *name != label),
                Some(value) => match labels.iter_mut().find(|(name, _)| *name == label) {
                    Some(existing) => existing.1 = value,
                    None => labels.push((label, value)),
                },
            }
        }
        Some(labels)
    }

    /// The request's values of the expressions, in order.
    pub fn evaluate(&self, context: &Context) -> Vec<String> {
        self.values.iter().map(|v| v.evaluate(context)).collect()
    }

    /// Applies one Telemetry's `metrics` entries for the Prometheus provider in `mode`,
    /// after those of less specific Telemetries. Invalid expressions were refused by
    /// validation; here they are left out.
    pub fn apply(&mut self, metrics: &[Metrics], mode: WorkloadMode) {
        for entry in metrics.iter().filter(|entry| reports_to_prometheus(entry)) {
            for over in &entry.overrides {
                let selector = over.selector.as_ref();
                let applies_to_mode = match selector.and_then(|s| s.mode) {
                    None | Some(WorkloadMode::ClientAndServer) => true,
                    Some(other) => other == mode,
                };
                if !applies_to_mode || selector.is_some_and(|s| s.custom_metric.is_some()) {
                    continue;
                }
                let metrics = MetricSet::of(
                    selector
                        .and_then(|s| s.metric)
                        .unwrap_or(IstioMetric::AllMetrics),
                );
                match over.disabled {
                    Some(true) => self.disabled.0 |= metrics.0,
                    Some(false) => self.disabled.0 &= !metrics.0,
                    None => {}
                }
                for (label, tag) in &over.tag_overrides {
                    let upsert = match tag.operation.unwrap_or(TagOperation::Upsert) {
                        TagOperation::Remove => None,
                        TagOperation::Upsert => {
                            let Some(Ok(value)) = tag.value.as_deref().map(TagValue::compile)
                            else {
                                continue;
                            };
                            Some(self.value_index(value))
                        }
                    };
                    self.tags.push(TagChange {
                        metrics,
                        label: label.clone(),
                        upsert,
                    });
                }
            }
        }
    }

    fn value_index(&mut self, value: TagValue) -> usize {
        match self.values.iter().position(|v| *v == value) {
            Some(i) => i,
            None => {
                self.values.push(value);
                self.values.len() - 1
            }
        }
    }
}

/// Whether a `metrics` entry configures the Prometheus provider (naming none does).
pub fn reports_to_prometheus(entry: &Metrics) -> bool {
    entry.providers.is_empty() || entry.providers.iter().any(|p| p.name == PROMETHEUS)
}

/// The attributes of a TCP connection as CEL sees them, for label values of the TCP
/// metrics: `connection.mtls`, `source.address` and `destination.address`; any `request`
/// or `response` attribute is missing, so an expression over them gives
/// [`UNKNOWN_VALUE`].
pub fn connection_attributes(
    source: std::net::SocketAddrV4,
    destination: std::net::SocketAddrV4,
    mutual_tls: bool,
) -> Context<'static> {
    let address = |a: std::net::SocketAddrV4| Value::String(Arc::new(a.to_string()));
    let mut context = Context::default();
    context.add_variable_from_value(
        "connection",
        HashMap::from([("mtls", Value::Bool(mutual_tls))]),
    );
    context.add_variable_from_value("source", HashMap::from([("address", address(source))]));
    context.add_variable_from_value(
        "destination",
        HashMap::from([("address", address(destination))]),
    );
    context
}

/// The attributes of a request as CEL sees them, for access log filters and label
/// values: `request.*`, `response.*`, `connection.mtls`, `source.address`,
/// `destination.address`, `upstream.address`.
pub fn request_attributes(
    entry: &crate::model::access_log::LogEntry,
    mutual_tls: bool,
) -> Context<'static> {
    let text = |s: &str| Value::String(Arc::new(s.to_owned()));
    let address =
        |a: Option<std::net::SocketAddrV4>| a.map_or(Value::Null, |a| text(&a.to_string()));
    let headers: HashMap<String, Value> = entry
        .request_headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), text(value.to_str().ok()?))))
        .collect();
    let request: HashMap<&str, Value> = HashMap::from([
        ("method", text(&entry.method)),
        ("path", text(&entry.path)),
        (
            "url_path",
            text(entry.path.split('?').next().unwrap_or_default()),
        ),
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
    context
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::access_log::LogEntry;

    fn metrics(yaml: &str) -> Vec<Metrics> {
        serde_norway::from_str(yaml).expect("metrics")
    }

    fn entry() -> LogEntry {
        let mut request_headers = http::HeaderMap::new();
        request_headers.insert("x-user", http::HeaderValue::from_static("ada"));
        LogEntry {
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            protocol: "HTTP/1.1",
            request_headers,
            method: "GET".into(),
            path: "/api/v1?q=1".into(),
            authority: "reviews:9080".into(),
            response_headers: http::HeaderMap::new(),
            response_code: 503,
            response_flags: "UF".into(),
            response_code_details: None,
            bytes_received: 0,
            bytes_sent: 0,
            upstream_host: None,
            upstream_cluster: None,
            downstream_local: None,
            downstream_remote: None,
            route_name: None,
        }
    }

    #[test]
    fn label_values_are_cel_over_the_request_and_unknown_when_missing() {
        let context = request_attributes(&entry(), true);
        let value = |expression: &str| {
            TagValue::compile(expression)
                .expect("compiles")
                .evaluate(&context)
        };
        assert_eq!(value("request.host"), "reviews:9080");
        assert_eq!(value("request.url_path"), "/api/v1");
        assert_eq!(value("request.headers['x-user']"), "ada");
        assert_eq!(value("request.headers['x-missing']"), UNKNOWN_VALUE);
        assert_eq!(value("response.code"), "503");
        assert_eq!(value("connection.mtls"), "true");
        assert_eq!(value("'fixed'"), "fixed");
        assert_eq!(value("response.code >= 500 ? 'error' : 'ok'"), "error");
    }

    #[test]
    fn telemetries_merge_from_the_mesh_to_the_workload_in_order() {
        let mut rules = MetricRules::default();
        rules.apply(
            &metrics(
                "- overrides:
  - tagOverrides: {user: {value: \"request.headers['x-user']\"}}
  - match: {metric: REQUEST_SIZE}
    disabled: true",
            ),
            WorkloadMode::Server,
        );
        rules.apply(
            &metrics(
                "- providers: [{name: prometheus}]
  overrides:
  - match: {metric: REQUEST_COUNT, mode: SERVER}
    tagOverrides: {user: {operation: REMOVE}, request_protocol: {value: \"'h'\"}}
  - match: {metric: REQUEST_SIZE}
    disabled: false
  - match: {mode: CLIENT}
    disabled: true
  - match: {metric: TCP_SENT_BYTES}
    disabled: true
- providers: [{name: stackdriver}]
  overrides: [{disabled: true}]",
            ),
            WorkloadMode::Server,
        );
        assert_eq!(
            rules.disabled,
            MetricSet(StandardMetric::TcpSentBytes.bit()),
            "the request metrics turned back on, a TCP metric off"
        );
        assert!(!rules.reports_nothing());
        let standard = [("reporter", "destination"), ("request_protocol", "http")];
        let values = vec!["ada".to_owned(), "h".to_owned()];
        assert_eq!(
            rules.labels(StandardMetric::RequestCount, &standard, &values),
            Some(vec![("reporter", "destination"), ("request_protocol", "h")]),
            "the later Telemetry removes the earlier's label and changes a standard one"
        );
        assert_eq!(
            rules.labels(StandardMetric::ResponseSize, &standard, &values),
            Some(vec![
                ("reporter", "destination"),
                ("request_protocol", "http"),
                ("user", "ada")
            ])
        );
        let mut off = MetricRules::default();
        off.apply(
            &metrics("- overrides: [{disabled: true}]"),
            WorkloadMode::Client,
        );
        assert!(off.reports_nothing());
        assert_eq!(
            off.labels(StandardMetric::RequestCount, &standard, &[]),
            None
        );
    }
}
