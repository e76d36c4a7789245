//! Istio's MeshConfig, as users already keep it: the `mesh` key of the `istio` ConfigMap
//! in `istio-system`. The mesh reads the telemetry part — the classic `accessLogFile`,
//! `accessLogEncoding` and `accessLogFormat`, the `extensionProviders` a Telemetry names
//! (`envoyFileAccessLog`) and the `defaultProviders` — and leaves the rest alone: a
//! MeshConfig holds many settings for Istio's control plane that mean nothing here.

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

impl MeshConfig {
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
