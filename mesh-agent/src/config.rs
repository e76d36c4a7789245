//! The cluster configuration: Kubernetes-format YAML files in a directory (the embedded
//! default source; a Kubernetes API watch can feed the same model). Loading never stops at
//! the first problem: every object that is valid is kept, and every problem becomes a
//! [`Diagnostic`] naming file, line and object.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// `targetPort`: a number, or the name of a container port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

impl Node {
    pub fn internal_ip(&self) -> Option<Ipv4Addr> {
        self.status
            .as_ref()?
            .addresses
            .iter()
            .find(|a| a.kind == "InternalIP")
            .and_then(|a| a.address.parse().ok())
    }
}

/// Objects the mesh only needs the metadata of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetaOnly {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in the configuration, located as precisely as the input allows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: Option<usize>,
    /// `Kind namespace/name`, when the object could be identified.
    pub resource: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {severity}: ")?;
        if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Everything read from the configuration sources.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterConfig {
    pub nodes: Vec<Node>,
    pub namespaces: Vec<MetaOnly>,
    pub service_accounts: Vec<MetaOnly>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub diagnostics: Vec<Diagnostic>,
}

impl ClusterConfig {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// API groups whose kinds later mesh features give behaviour to; accepted and reported.
const ISTIO_GROUPS: [&str; 3] = [
    "networking.istio.io/",
    "security.istio.io/",
    "telemetry.istio.io/",
];

/// Standard Kubernetes kinds the mesh has no use for: skipped with a note.
const IGNORED_KUBERNETES_KINDS: [&str; 14] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "EndpointSlice",
    "Ingress",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "HorizontalPodAutoscaler",
];

/// Reads every `*.yaml`/`*.yml` file of `path` (a file or a directory, not recursive).
pub fn load_path(path: &Path) -> Result<ClusterConfig, ConfigError> {
    let mut files = Vec::new();
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let file = entry.path();
            let is_yaml = matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            if is_yaml && file.is_file() {
                files.push(file);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut config = ClusterConfig::default();
    let mut seen = HashSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        load_text(&mut config, &mut seen, &file, &text);
    }
    Ok(config)
}

/// Reads the objects of one YAML text, as if it were the file `file`.
pub fn load_str(file: &Path, text: &str) -> ClusterConfig {
    let mut config = ClusterConfig::default();
    load_text(&mut config, &mut HashSet::new(), file, text);
    config
}

/// Splits a multi-document YAML text, keeping the line each document starts on.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (index, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut current)));
            start = index + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

fn load_text(
    config: &mut ClusterConfig,
    seen: &mut HashSet<(String, String, String)>,
    file: &Path,
    text: &str,
) {
    for (line, doc) in documents(text) {
        let diag = |severity, resource: Option<String>, message: String| Diagnostic {
            severity,
            file: file.to_owned(),
            line: Some(line),
            resource,
            message,
        };
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc) {
            Ok(value) => value,
            Err(err) => {
                let at = err.location().map(|l| line + l.line() - 1).unwrap_or(line);
                config.diagnostics.push(Diagnostic {
                    line: Some(at),
                    ..diag(Severity::Error, None, format!("YAML syntax: {err}"))
                });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let cluster_scoped = matches!(kind.as_str(), "Node" | "Namespace");
        let resource = if cluster_scoped {
            format!("{kind} {name}")
        } else {
            format!("{kind} {namespace}/{name}")
        };
        if kind.is_empty() || api_version.is_empty() {
            config.diagnostics.push(diag(
                Severity::Error,
                None,
                "not a Kubernetes object: `apiVersion` and `kind` are required".into(),
            ));
            continue;
        }
        if name.is_empty() {
            config.diagnostics.push(diag(
                Severity::Error,
                Some(resource),
                "`metadata.name` is required".into(),
            ));
            continue;
        }
        if !seen.insert((kind.clone(), namespace.to_owned(), name.to_owned())) {
            config.diagnostics.push(diag(
                Severity::Error,
                Some(resource),
                "defined more than once; this definition is ignored".into(),
            ));
            continue;
        }
        let outcome = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Pod") => typed(value, |pod: Pod| {
                validate_pod(&pod)?;
                config.pods.push(pod);
                Ok(())
            }),
            ("v1", "Service") => typed(value, |service: Service| {
                validate_service(&service)?;
                config.services.push(service);
                Ok(())
            }),
            ("v1", "Node") => typed(value, |node: Node| {
                config.nodes.push(node);
                Ok(())
            }),
            ("v1", "Namespace") => typed(value, |ns: MetaOnly| {
                config.namespaces.push(ns);
                Ok(())
            }),
            ("v1", "ServiceAccount") => typed(value, |sa: MetaOnly| {
                config.service_accounts.push(sa);
                Ok(())
            }),
            (api, _) if ISTIO_GROUPS.iter().any(|g| api.starts_with(g)) => Err((
                Severity::Warning,
                format!("{api} {kind} is accepted but not enforced by this version of the mesh"),
            )),
            (_, kind) if IGNORED_KUBERNETES_KINDS.contains(&kind) => Err((
                Severity::Warning,
                format!("skipped: the mesh does not use {kind} objects"),
            )),
            (api, kind) => Err((
                Severity::Error,
                format!("unknown kind {kind} (apiVersion {api})"),
            )),
        };
        if let Err((severity, message)) = outcome {
            config
                .diagnostics
                .push(diag(severity, Some(resource), message));
        }
    }
}

type Outcome = Result<(), (Severity, String)>;

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    accept: impl FnOnce(T) -> Result<(), String>,
) -> Outcome {
    let object: T = serde_yaml::from_value(value)
        .map_err(|err| (Severity::Error, format!("invalid object: {err}")))?;
    accept(object).map_err(|message| (Severity::Error, message))
}

fn validate_pod(pod: &Pod) -> Result<(), String> {
    match pod.spec.node_name.as_deref() {
        None | Some("") => {
            return Err("pod without a node: `spec.nodeName` is required".into());
        }
        Some(_) => {}
    }
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        ip.parse::<Ipv4Addr>()
            .map_err(|_| format!("`status.podIP`: {ip:?} is not an IPv4 address"))?;
    }
    Ok(())
}

fn validate_service(service: &Service) -> Result<(), String> {
    if let Some(ip) = service.spec.cluster_ip.as_deref() {
        if ip != "None" && ip.parse::<Ipv4Addr>().is_err() {
            return Err(format!(
                "`spec.clusterIP`: {ip:?} is not an IPv4 address or \"None\""
            ));
        }
    }
    for (index, port) in service.spec.ports.iter().enumerate() {
        if port.port == 0 {
            return Err(format!("`spec.ports[{index}].port` must be 1-65535"));
        }
        if let Some(TargetPort::Number(0)) = port.target_port {
            return Err(format!("`spec.ports[{index}].targetPort` must be 1-65535"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> ClusterConfig {
        load_str(Path::new("test.yaml"), text)
    }

    #[test]
    fn multi_document_file_loads_every_kind() {
        let config = load(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
             spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n\
             status: {podIP: 10.244.1.2}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n",
        );
        assert!(config.diagnostics.is_empty(), "{:?}", config.diagnostics);
        assert_eq!(config.namespaces.len(), 1);
        assert_eq!(
            config.pods[0].spec.containers[0].ports[0].container_port,
            8080
        );
        assert_eq!(
            config.services[0].spec.ports[0].target_port,
            Some(TargetPort::Name("http".into()))
        );
    }

    #[test]
    fn broken_document_is_reported_with_its_line_and_the_rest_still_loads() {
        let config = load(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: x\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        );
        assert_eq!(config.namespaces.len(), 2);
        let errors: Vec<_> = config.errors().collect();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("YAML syntax"));
        assert!(
            matches!(errors[0].line, Some(5..=8)),
            "{:?}",
            errors[0].line
        );
    }

    #[test]
    fn unknown_kind_and_pod_without_node_are_errors_naming_the_object() {
        let config = load(
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w, namespace: ns}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: lost}\nspec: {containers: []}\n",
        );
        let messages: Vec<String> = config.errors().map(|d| d.to_string()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].contains("Widget ns/w: unknown kind Widget"));
        assert!(messages[1].contains("test.yaml:5: error: Pod default/lost: pod without a node"));
        assert!(config.pods.is_empty());
    }

    #[test]
    fn istio_and_unused_kubernetes_kinds_are_warnings() {
        let config = load(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        );
        assert_eq!(config.errors().count(), 0);
        assert_eq!(config.diagnostics.len(), 2);
    }

    #[test]
    fn bad_addresses_and_duplicates_are_rejected() {
        let config = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        );
        let messages: Vec<String> = config.errors().map(|d| d.message.clone()).collect();
        assert!(messages[0].contains("clusterIP"), "{messages:?}");
        assert!(
            messages[1].contains("defined more than once"),
            "{messages:?}"
        );
        assert_eq!(config.namespaces.len(), 1);
    }
}
