//! Istio's MeshConfig, as users already keep it: the `mesh` key of the `istio` ConfigMap
//! in `istio-system`. The mesh reads the telemetry part — the classic `accessLogFile`,
//! `accessLogEncoding` and `accessLogFormat`, the `extensionProviders` a Telemetry names
//! (`envoyFileAccessLog`, `opentelemetry`; `zipkin` is recognised and reported as
//! unsupported), the `defaultProviders`, `enableTracing` and
//! `defaultConfig.tracing.sampling` — and leaves the rest alone: a MeshConfig holds many
//! settings for Istio's control plane that mean nothing here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::log_format::Pattern;

/// The ConfigMap Istio reads its MeshConfig from, and its key.
pub const CONFIG_MAP: &str = "istio";
pub const MESH_KEY: &str = "mesh";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    /// Where Envoy's built-in provider (`envoy`) writes; empty: no access log by default.
    pub access_log_file: String,
    pub access_log_encoding: Option<Encoding>,
    pub access_log_format: String,
    pub extension_providers: Vec<ExtensionProvider>,
    pub default_providers: DefaultProviders,
    /// Istio's switch for tracing as a whole (default on).
    pub enable_tracing: Option<bool>,
    pub default_config: ProxyConfig,
}

/// `defaultConfig`: the proxies' defaults; only `tracing.sampling` concerns the mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyConfig {
    pub tracing: Option<ProxyTracing>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyTracing {
    /// The percentage of requests that start a sampled trace (0–100; Istio's default 1).
    pub sampling: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Encoding {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DefaultProviders {
    pub access_logging: Vec<String>,
    pub metrics: Vec<String>,
    pub tracing: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtensionProvider {
    pub name: String,
    pub envoy_file_access_log: Option<FileAccessLog>,
    pub opentelemetry: Option<OpenTelemetryProvider>,
    /// Recognised so a Telemetry naming it is told it is unsupported; its settings are
    /// not read.
    pub zipkin: Option<serde_json::Value>,
}

/// `extensionProviders[].opentelemetry`: an OTLP collector. As in Istio, spans go over
/// OTLP/gRPC to `{service}:{port}` unless `http` is set, then over OTLP/HTTP (protobuf)
/// to `http://{service}:{port}{http.path}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OpenTelemetryProvider {
    /// `[<namespace>/]<hostname>` as Istio writes it, or an address.
    pub service: String,
    pub port: u32,
    pub max_tag_length: Option<u32>,
    pub http: Option<OtlpHttp>,
    pub grpc: Option<OtlpGrpc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OtlpGrpc {
    pub timeout: Option<String>,
    pub initial_metadata: Vec<OtlpHeader>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OtlpHttp {
    pub path: String,
    pub timeout: Option<String>,
    pub headers: Vec<OtlpHeader>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OtlpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FileAccessLog {
    pub path: String,
    pub log_format: Option<LogFormatConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogFormatConfig {
    pub text: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// The MeshConfig in the `mesh` key's text, its log formats checked; the error names
/// what is wrong.
pub fn parse(text: &str) -> Result<MeshConfig, String> {
    if text.trim().is_empty() {
        return Ok(MeshConfig::default());
    }
    let mesh: MeshConfig =
        serde_norway::from_str(text).map_err(|err| format!("data.mesh: {err}"))?;
    if !mesh.access_log_format.is_empty() {
        let checked = match mesh.access_log_encoding {
            Some(Encoding::Json) => {
                serde_json::from_str::<BTreeMap<String, String>>(&mesh.access_log_format)
                    .map_err(|err| format!("a JSON object of labels is needed: {err}"))
                    .and_then(|labels| {
                        labels
                            .values()
                            .try_for_each(|p| Pattern::parse(p).map(drop))
                    })
            }
            _ => Pattern::parse(&mesh.access_log_format).map(drop),
        };
        checked.map_err(|err| format!("data.mesh: accessLogFormat: {err}"))?;
    }
    if let Some(sampling) = mesh
        .default_config
        .tracing
        .as_ref()
        .and_then(|t| t.sampling)
    {
        check_percentage(sampling)
            .map_err(|err| format!("data.mesh: defaultConfig.tracing.sampling: {err}"))?;
    }
    for (i, provider) in mesh.extension_providers.iter().enumerate() {
        if let Some(otel) = &provider.opentelemetry {
            check_opentelemetry(otel).map_err(|err| {
                format!(
                    "data.mesh: extensionProviders[{i}] ({}): opentelemetry.{err}",
                    provider.name
                )
            })?;
        }
    }
    for provider in &mesh.extension_providers {
        let Some(format) = provider
            .envoy_file_access_log
            .as_ref()
            .and_then(|f| f.log_format.as_ref())
        else {
            continue;
        };
        let patterns = format.text.iter().chain(format.labels.values());
        for pattern in patterns {
            Pattern::parse(pattern).map_err(|err| {
                format!(
                    "data.mesh: extensionProviders {}: logFormat: {err}",
                    provider.name
                )
            })?;
        }
    }
    Ok(mesh)
}

/// A sampling percentage: a number from 0 to 100.
pub fn check_percentage(value: f64) -> Result<(), String> {
    if (0.0..=100.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{value} is not a percentage between 0 and 100"))
    }
}

/// A collector address the exporter can reach: a service, a port, an absolute path.
fn check_opentelemetry(otel: &OpenTelemetryProvider) -> Result<(), String> {
    let host = otel
        .service
        .rsplit_once('/')
        .map_or(otel.service.as_str(), |(_, host)| host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ':') {
        return Err(format!(
            "service: {:?} is not a host name or address",
            otel.service
        ));
    }
    if !(1..=65535).contains(&otel.port) {
        return Err(format!("port: {} is not a port number", otel.port));
    }
    if otel.http.is_some() && otel.grpc.is_some() {
        return Err("grpc: set it or http, not both".into());
    }
    if let Some(http) = &otel.http {
        if !http.path.is_empty() && !http.path.starts_with('/') {
            return Err(format!("http.path: {:?} does not start with /", http.path));
        }
        check_export_settings("http", http.timeout.as_deref(), "headers", &http.headers)?;
    }
    if let Some(grpc) = &otel.grpc {
        check_export_settings(
            "grpc",
            grpc.timeout.as_deref(),
            "initialMetadata",
            &grpc.initial_metadata,
        )?;
    }
    Ok(())
}

/// An export's timeout and the headers (or gRPC metadata) sent with it.
fn check_export_settings(
    protocol: &str,
    timeout: Option<&str>,
    headers_field: &str,
    headers: &[OtlpHeader],
) -> Result<(), String> {
    if let Some(timeout) = timeout {
        crate::config::istio::parse_duration(timeout)
            .map_err(|err| format!("{protocol}.timeout: {err}"))?;
    }
    for (j, header) in headers.iter().enumerate() {
        let valid = http::HeaderName::from_bytes(header.name.as_bytes()).is_ok()
            && http::HeaderValue::from_str(&header.value).is_ok();
        if !valid {
            return Err(format!(
                "{protocol}.{headers_field}[{j}]: {:?} is not a valid header",
                header.name
            ));
        }
    }
    Ok(())
}

impl MeshConfig {
    /// The tracing providers it defines, by name.
    pub fn tracing_providers(&self) -> impl Iterator<Item = &ExtensionProvider> {
        self.extension_providers
            .iter()
            .filter(|p| p.opentelemetry.is_some() || p.zipkin.is_some())
    }

    /// The names of the access log providers it defines.
    pub fn access_log_providers(&self) -> Vec<&str> {
        let builtin = (!self.access_log_file.is_empty()).then_some(ENVOY_PROVIDER);
        builtin
            .into_iter()
            .chain(
                self.extension_providers
                    .iter()
                    .filter(|p| p.envoy_file_access_log.is_some())
                    .map(|p| p.name.as_str()),
            )
            .collect()
    }
}

/// Envoy's built-in access log provider: MeshConfig's `accessLogFile`.
pub const ENVOY_PROVIDER: &str = "envoy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_access_log_settings_and_providers_are_read_and_the_rest_ignored() {
        let mesh = parse(
            "accessLogFile: /dev/stdout
accessLogEncoding: JSON
enablePrometheusMerge: true
defaultConfig: {discoveryAddress: istiod.istio-system.svc:15012}
extensionProviders:
- name: errors-only
  envoyFileAccessLog:
    path: /var/log/mesh/errors.log
    logFormat: {labels: {code: '%RESPONSE_CODE%'}}
- name: otel
  opentelemetry: {service: collector.observability.svc.cluster.local, port: 4317}
defaultProviders: {accessLogging: [errors-only]}
",
        )
        .expect("MeshConfig");
        assert_eq!(mesh.access_log_file, "/dev/stdout");
        assert_eq!(mesh.access_log_encoding, Some(Encoding::Json));
        assert_eq!(mesh.extension_providers.len(), 2);
        assert_eq!(mesh.default_providers.access_logging, ["errors-only"]);
    }

    #[test]
    fn tracing_providers_and_sampling_are_read_and_checked() {
        let mesh = parse(
            "enableTracing: true
defaultConfig: {tracing: {sampling: 2.5}}
extensionProviders:
- name: otel
  opentelemetry:
    service: observability/otel-collector.observability.svc.cluster.local
    port: 4318
    maxTagLength: 99
    http: {path: /v1/traces, timeout: 1s}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
defaultProviders: {tracing: [otel]}
",
        )
        .expect("MeshConfig");
        let names: Vec<&str> = mesh.tracing_providers().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["otel", "zipkin"]);
        assert_eq!(
            mesh.default_config.tracing.and_then(|t| t.sampling),
            Some(2.5)
        );
        assert_eq!(mesh.default_providers.tracing, ["otel"]);
        for (text, expected) in [
            (
                "defaultConfig: {tracing: {sampling: -1}}",
                "data.mesh: defaultConfig.tracing.sampling: -1 is not a percentage between 0 and 100",
            ),
            (
                "extensionProviders: [{name: o, opentelemetry: {service: '', port: 4318}}]",
                "data.mesh: extensionProviders[0] (o): opentelemetry.service: \"\" is not a host name or address",
            ),
            (
                "extensionProviders: [{name: o, opentelemetry: {service: c, port: 0}}]",
                "data.mesh: extensionProviders[0] (o): opentelemetry.port: 0 is not a port number",
            ),
            (
                "extensionProviders: [{name: o, opentelemetry: {service: c, port: 4318, http: {path: v1}}}]",
                "data.mesh: extensionProviders[0] (o): opentelemetry.http.path: \"v1\" does not start with /",
            ),
            (
                "extensionProviders: [{name: o, opentelemetry: {service: c, port: 4318, http: {timeout: soon}}}]",
                "data.mesh: extensionProviders[0] (o): opentelemetry.http.timeout: ",
            ),
            (
                "extensionProviders: [{name: o, opentelemetry: {service: c, port: 4317, grpc: {initialMetadata: [{name: 'a b', value: x}]}}}]",
                "data.mesh: extensionProviders[0] (o): opentelemetry.grpc.initialMetadata[0]: \"a b\" is not a valid header",
            ),
            (
                "extensionProviders: [{name: o, opentelemetry: {service: c, port: 4317, grpc: {}, http: {}}}]",
                "data.mesh: extensionProviders[0] (o): opentelemetry.grpc: set it or http, not both",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn a_log_format_with_an_unknown_operator_is_refused() {
        let err = parse(
            "extensionProviders:\n- name: bad\n  envoyFileAccessLog:\n    path: /dev/stdout\n    logFormat: {text: '%NO_SUCH%'}\n",
        )
        .expect_err("unknown operator");
        assert!(err.contains("extensionProviders bad"), "{err}");
        assert!(err.contains("NO_SUCH"), "{err}");
    }

    #[test]
    fn a_broken_mesh_config_is_an_error_that_says_where() {
        let err = parse("accessLogEncoding: YAML\n").expect_err("unknown encoding");
        assert!(err.starts_with("data.mesh: "), "{err}");
        assert!(err.contains("YAML"), "{err}");
    }
}
