//! Istio's Telemetry API resolved per workload: whether the request metrics of the
//! requests a workload serves (`SERVER` mode) and sends (`CLIENT` mode) are reported.
//!
//! The most specific Telemetry with a `metrics` field decides for a workload — one that
//! selects it (`selector`, `targetRefs`) over its namespace's over the root namespace's —
//! as Istio resolves them. Without one, requests are reported wherever the agents serve
//! them request by request anyway (routing, per-request policies); a Telemetry that
//! enables the Prometheus provider for a workload makes its agent serve its HTTP ports
//! request by request so that every request is reported — the per-node counterpart of
//! adding a waypoint in Istio's ambient mode — and one that disables them stops them.

use serde::Serialize;

use crate::{
    config::{
        istio::{IstioMetric, Metrics, Telemetry, WorkloadMode},
        ClusterConfig, Resource,
    },
    model::{
        security::{scope_of, Scope},
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
}

/// Every Telemetry with metrics settings, compiled.
pub struct TelemetryConfig {
    rules: Vec<Rule>,
}

struct Rule {
    scope: Scope,
    /// 0: mesh-wide, 1: a namespace, 2: selected workloads.
    specificity: u8,
    name: String,
    server: Reporting,
    client: Reporting,
}

impl TelemetryConfig {
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
        TelemetryConfig { rules }
    }

    pub fn for_workload(&self, workload: &Workload) -> WorkloadTelemetry {
        match self.rules.iter().find(|rule| rule.scope.selects(workload)) {
            Some(rule) => WorkloadTelemetry {
                server: rule.server,
                client: rule.client,
                decided_by: Some(rule.name.clone()),
            },
            None => WorkloadTelemetry::default(),
        }
    }
}

fn compile(telemetry: &Resource<Telemetry>, config: &ClusterConfig, root_namespace: &str) -> Rule {
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
    Rule {
        scope: scope_of(
            namespace,
            selector,
            spec.target_ref.iter().chain(&spec.target_refs),
            config,
            root_namespace,
        ),
        specificity,
        name: format!("{namespace}/{}", telemetry.metadata.name),
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
}
