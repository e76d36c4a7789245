//! The cluster configuration: Kubernetes-format YAML files in a directory (the embedded
//! default source; a Kubernetes API watch can feed the same model). Kubernetes objects the
//! mesh uses ([`kube`]) and Istio's resource kinds ([`istio`]) are read into one typed
//! [`ClusterConfig`]. Loading never stops at the first problem: every valid object is
//! kept, and every problem becomes a [`Diagnostic`] naming file, line, object and field.

pub mod admission;
pub mod cel;
pub mod condition;
pub mod istio;
pub mod jwks;
pub mod kinds;
pub mod kube;
pub mod kube_api;
pub mod kube_events;
pub mod log_format;
pub mod mesh_config;
pub mod mesh_policy;
pub mod openapi;
pub mod origin;
pub mod source;
pub mod validate;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use kinds::{NETWORKING, SECURITY, TELEMETRY};
pub use kube::*;

/// Istio's `rootNamespace` default: policies there apply mesh wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

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
    /// The field's path in the object, e.g. `spec.http[0].route[1].weight`.
    pub field: Option<String>,
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
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Where an object was read from; not part of the object's identity.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub file: PathBuf,
    /// The line its document starts on.
    pub line: usize,
    /// The document's text, to locate fields in it.
    pub text: String,
}

impl PartialEq for Origin {
    fn eq(&self, _: &Origin) -> bool {
        true
    }
}

/// An Istio resource: its metadata and its typed `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<T> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: T,
    /// What a cluster reports back (e.g. from `kubectl get -o yaml`); not configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_norway::Value>,
    #[serde(skip)]
    pub origin: Origin,
}

impl<T> Resource<T> {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    /// `Kind namespace/name`, as diagnostics name objects.
    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace(), self.metadata.name)
    }
}

/// Istio's configuration, by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IstioConfig {
    pub virtual_services: Vec<Resource<istio::VirtualService>>,
    pub destination_rules: Vec<Resource<istio::DestinationRule>>,
    pub gateways: Vec<Resource<istio::Gateway>>,
    pub service_entries: Vec<Resource<istio::ServiceEntry>>,
    pub sidecars: Vec<Resource<istio::Sidecar>>,
    pub workload_entries: Vec<Resource<istio::WorkloadEntry>>,
    pub workload_groups: Vec<Resource<istio::WorkloadGroup>>,
    pub peer_authentications: Vec<Resource<istio::PeerAuthentication>>,
    pub request_authentications: Vec<Resource<istio::RequestAuthentication>>,
    pub authorization_policies: Vec<Resource<istio::AuthorizationPolicy>>,
    pub telemetries: Vec<Resource<istio::Telemetry>>,
}

/// Everything read from the configuration sources.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterConfig {
    pub nodes: Vec<Node>,
    pub namespaces: Vec<MetaOnly>,
    pub service_accounts: Vec<MetaOnly>,
    /// Shared: a change of one pod rebuilds the configuration without copying the rest.
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Service>,
    /// EndpointSlices, for the Services without a selector.
    pub endpoint_slices: Vec<EndpointSlice>,
    pub istio: IstioConfig,
    /// The mesh's own kinds (`policy.mesh.dev`).
    pub mesh: mesh_policy::MeshPolicies,
    /// Istio's MeshConfig (the `istio` ConfigMap of `istio-system`), when there is one.
    pub mesh_config: mesh_config::MeshConfig,
    pub diagnostics: Vec<Diagnostic>,
    /// Objects the source left out for their errors while serving the rest (the
    /// Kubernetes API source, see [`admission`]); not in `diagnostics`, which would
    /// reject the whole configuration.
    pub skipped: Vec<Diagnostic>,
    /// Read through a [`DocumentCache`]: a number that changes whenever an object other
    /// than a pod does, so that a state built after a change to pods alone can keep what
    /// did not depend on them. `None`: unknown, every object may have changed.
    #[serde(skip)]
    pub others_revision: Option<u64>,
}

impl ClusterConfig {
    /// Adds what `other` read (its objects after this one's; its MeshConfig, if it read
    /// one). Every field is named, so that a new one cannot be forgotten here.
    fn absorb(&mut self, other: ClusterConfig) {
        let ClusterConfig {
            nodes,
            namespaces,
            service_accounts,
            pods,
            services,
            endpoint_slices,
            istio,
            mesh,
            mesh_config,
            diagnostics,
            skipped,
            others_revision: _,
        } = other;
        self.nodes.extend(nodes);
        self.namespaces.extend(namespaces);
        self.service_accounts.extend(service_accounts);
        self.pods.extend(pods);
        self.services.extend(services);
        self.endpoint_slices.extend(endpoint_slices);
        let IstioConfig {
            virtual_services,
            destination_rules,
            gateways,
            service_entries,
            sidecars,
            workload_entries,
            workload_groups,
            peer_authentications,
            request_authentications,
            authorization_policies,
            telemetries,
        } = istio;
        self.istio.virtual_services.extend(virtual_services);
        self.istio.destination_rules.extend(destination_rules);
        self.istio.gateways.extend(gateways);
        self.istio.service_entries.extend(service_entries);
        self.istio.sidecars.extend(sidecars);
        self.istio.workload_entries.extend(workload_entries);
        self.istio.workload_groups.extend(workload_groups);
        self.istio.peer_authentications.extend(peer_authentications);
        self.istio
            .request_authentications
            .extend(request_authentications);
        self.istio
            .authorization_policies
            .extend(authorization_policies);
        self.istio.telemetries.extend(telemetries);
        let mesh_policy::MeshPolicies {
            http_local_rate_limits,
        } = mesh;
        self.mesh
            .http_local_rate_limits
            .extend(http_local_rate_limits);
        if mesh_config != mesh_config::MeshConfig::default() {
            self.mesh_config = mesh_config;
        }
        self.diagnostics.extend(diagnostics);
        self.skipped.extend(skipped);
    }

    /// Whether this holds pods and nothing else a mesh state is built from (their
    /// warnings aside).
    fn holds_pods_only(&self) -> bool {
        let ClusterConfig {
            nodes,
            namespaces,
            service_accounts,
            pods,
            services,
            endpoint_slices,
            istio,
            mesh,
            mesh_config,
            diagnostics: _,
            skipped: _,
            others_revision: _,
        } = self;
        let IstioConfig {
            virtual_services,
            destination_rules,
            gateways,
            service_entries,
            sidecars,
            workload_entries,
            workload_groups,
            peer_authentications,
            request_authentications,
            authorization_policies,
            telemetries,
        } = istio;
        let mesh_policy::MeshPolicies {
            http_local_rate_limits,
        } = mesh;
        !pods.is_empty()
            && nodes.is_empty()
            && namespaces.is_empty()
            && service_accounts.is_empty()
            && services.is_empty()
            && endpoint_slices.is_empty()
            && virtual_services.is_empty()
            && destination_rules.is_empty()
            && gateways.is_empty()
            && service_entries.is_empty()
            && sidecars.is_empty()
            && workload_entries.is_empty()
            && workload_groups.is_empty()
            && peer_authentications.is_empty()
            && request_authentications.is_empty()
            && authorization_policies.is_empty()
            && telemetries.is_empty()
            && http_local_rate_limits.is_empty()
            && *mesh_config == mesh_config::MeshConfig::default()
    }

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

/// Standard Kubernetes kinds the mesh has no use for: skipped with a note.
const IGNORED_KUBERNETES_KINDS: [&str; 13] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Ingress",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "HorizontalPodAutoscaler",
];

/// Reads every `*.yaml`/`*.yml` file of `path` (a file or a directory, not recursive) and
/// checks the whole.
pub fn load_path(path: &Path) -> Result<ClusterConfig, ConfigError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ConfigError::Read { path, source }
    };
    let meta = std::fs::metadata(path).map_err(read_error(path))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(read_error(path))?.flatten() {
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
        let text = std::fs::read_to_string(&file).map_err(read_error(&file))?;
        load_text(&mut config, &mut seen, &file, &text);
    }
    validate::validate(&mut config);
    Ok(config)
}

/// Reads and checks one YAML text, as if it were the file `file`.
pub fn load_str(file: &Path, text: &str) -> ClusterConfig {
    let mut config = ClusterConfig::default();
    load_text(&mut config, &mut HashSet::new(), file, text);
    validate::validate(&mut config);
    config
}

/// Reads and checks documents of one object each, named `name` in diagnostics (the
/// objects of the Kubernetes API source), as the files of a directory are.
pub fn load_documents<'a>(
    documents: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> ClusterConfig {
    let mut config = ClusterConfig::default();
    let mut seen = HashSet::new();
    for (name, text) in documents {
        load_text(&mut config, &mut seen, Path::new(name), text);
    }
    validate::validate(&mut config);
    config
}

/// The documents read so far, so that a change to one object does not read every other
/// again: a Kubernetes cluster changes a pod at a time, and reading ten thousand pods for
/// each would hold the rest of a reload together. Each document is read on its own, as the
/// API source's are (one object each, unique by kind, namespace and name).
#[derive(Default)]
pub struct DocumentCache {
    /// By document name: the text and what it read as.
    read: HashMap<String, CachedDocument>,
    /// Tells the documents of this call from those gone since the last.
    pass: u64,
    /// Grows when a document other than a pod's is read, changed or gone.
    others_revision: u64,
}

struct CachedDocument {
    text: Arc<str>,
    fragment: ClusterConfig,
    pass: u64,
}

impl DocumentCache {
    /// [`load_documents`], reading only the documents new or changed since the last call.
    /// The texts are shared with the caller: an unchanged one is known by its pointer
    /// before its bytes are compared.
    pub fn load<'a>(
        &mut self,
        documents: impl IntoIterator<Item = (&'a str, &'a Arc<str>)>,
    ) -> ClusterConfig {
        self.pass += 1;
        let pass = self.pass;
        let mut config = ClusterConfig::default();
        for (name, text) in documents {
            match self.read.get_mut(name) {
                Some(cached) if Arc::ptr_eq(&cached.text, text) || cached.text == *text => {
                    cached.pass = pass;
                    config.absorb(cached.fragment.clone());
                }
                _ => {
                    let mut fragment = ClusterConfig::default();
                    load_text(&mut fragment, &mut HashSet::new(), Path::new(name), text);
                    config.absorb(fragment.clone());
                    let text = text.clone();
                    let read = CachedDocument {
                        text,
                        fragment,
                        pass,
                    };
                    let replaced = self.read.insert(name.to_owned(), read);
                    let others = [replaced.as_ref(), self.read.get(name)]
                        .into_iter()
                        .flatten()
                        .any(|read| !read.fragment.holds_pods_only());
                    if others {
                        self.others_revision += 1;
                    }
                }
            }
        }
        let mut others_gone = false;
        self.read.retain(|_, cached| {
            let kept = cached.pass == pass;
            others_gone |= !kept && !cached.fragment.holds_pods_only();
            kept
        });
        if others_gone {
            self.others_revision += 1;
        }
        validate::validate(&mut config);
        config.others_revision = Some(self.others_revision);
        config
    }
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

/// Why a document was not taken: severity, field path, message and, when known, line.
struct Rejection {
    severity: Severity,
    field: Option<String>,
    message: String,
    line: Option<usize>,
}

impl Rejection {
    fn error(message: String) -> Rejection {
        Rejection {
            severity: Severity::Error,
            field: None,
            message,
            line: None,
        }
    }

    fn warning(message: String) -> Rejection {
        Rejection {
            severity: Severity::Warning,
            ..Rejection::error(message)
        }
    }
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
            field: None,
            message,
        };
        let value: serde_norway::Value = match serde_norway::from_str(&doc) {
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
        let origin = Origin {
            file: file.to_owned(),
            line,
            text: doc.clone(),
        };
        let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
        let istio = &mut config.istio;
        let outcome = match (group, kind.as_str()) {
            ("", "Pod") if version == "v1" => kube_object(value, |pod: Pod| {
                validate_pod(&pod).map_err(Rejection::error)?;
                let unscheduled = pod.spec.node_name.as_deref().unwrap_or_default().is_empty();
                config.pods.push(Arc::new(pod));
                if unscheduled {
                    return Err(Rejection::warning(
                        "pod without a node (`spec.nodeName` unset): not scheduled, so no agent serves it".into(),
                    ));
                }
                Ok(())
            }),
            ("", "Service") if version == "v1" => kube_object(value, |service: Service| {
                validate_service(&service).map_err(Rejection::error)?;
                config.services.push(service);
                Ok(())
            }),
            ("discovery.k8s.io", "EndpointSlice") if version == "v1" => {
                kube_object(value, |slice: EndpointSlice| {
                    config.endpoint_slices.push(slice);
                    Ok(())
                })
            }
            ("", "Node") if version == "v1" => kube_object(value, |node: Node| {
                config.nodes.push(node);
                Ok(())
            }),
            ("", "Namespace") if version == "v1" => kube_object(value, |ns: MetaOnly| {
                config.namespaces.push(ns);
                Ok(())
            }),
            ("", "ServiceAccount") if version == "v1" => kube_object(value, |sa: MetaOnly| {
                config.service_accounts.push(sa);
                Ok(())
            }),
            ("", "ConfigMap")
                if version == "v1"
                    && name == mesh_config::CONFIG_MAP
                    && namespace == DEFAULT_ROOT_NAMESPACE =>
            {
                let text = value
                    .get("data")
                    .and_then(|data| data.get(mesh_config::MESH_KEY))
                    .and_then(|mesh| mesh.as_str())
                    .unwrap_or_default();
                mesh_config::parse(text)
                    .map(|mesh| config.mesh_config = mesh)
                    .map_err(Rejection::error)
            }
            ("networking.istio.io", "EnvoyFilter") | ("extensions.istio.io", "WasmPlugin") => {
                Err(Rejection::error(format!(
                    "{kind} is not supported: this mesh has no Envoy to patch or extend"
                )))
            }
            ("networking.istio.io", "VirtualService") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.virtual_services,
            ),
            ("networking.istio.io", "DestinationRule") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.destination_rules,
            ),
            ("networking.istio.io", "Gateway") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.gateways,
            ),
            ("networking.istio.io", "ServiceEntry") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.service_entries,
            ),
            ("networking.istio.io", "Sidecar") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.sidecars,
            ),
            ("networking.istio.io", "WorkloadEntry") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.workload_entries,
            ),
            ("networking.istio.io", "WorkloadGroup") => istio_object(
                &NETWORKING,
                version,
                line,
                origin,
                &doc,
                &mut istio.workload_groups,
            ),
            ("security.istio.io", "PeerAuthentication") => istio_object(
                &SECURITY,
                version,
                line,
                origin,
                &doc,
                &mut istio.peer_authentications,
            ),
            ("security.istio.io", "RequestAuthentication") => istio_object(
                &SECURITY,
                version,
                line,
                origin,
                &doc,
                &mut istio.request_authentications,
            ),
            ("security.istio.io", "AuthorizationPolicy") => istio_object(
                &SECURITY,
                version,
                line,
                origin,
                &doc,
                &mut istio.authorization_policies,
            ),
            ("telemetry.istio.io", "Telemetry") => istio_object(
                &TELEMETRY,
                version,
                line,
                origin,
                &doc,
                &mut istio.telemetries,
            ),
            (mesh_policy::GROUP, "HTTPLocalRateLimitPolicy") => istio_object(
                &mesh_policy::VERSIONS,
                version,
                line,
                origin,
                &doc,
                &mut config.mesh.http_local_rate_limits,
            ),
            (_, kind) if IGNORED_KUBERNETES_KINDS.contains(&kind) => Err(Rejection::warning(
                format!("skipped: the mesh does not use {kind} objects"),
            )),
            _ => Err(Rejection::error(format!(
                "unknown kind {kind} (apiVersion {api_version})"
            ))),
        };
        if let Err(rejection) = outcome {
            config.diagnostics.push(Diagnostic {
                line: rejection.line.or(Some(line)),
                field: rejection.field,
                ..diag(rejection.severity, Some(resource), rejection.message)
            });
        }
    }
}

fn kube_object<T: DeserializeOwned>(
    value: serde_norway::Value,
    accept: impl FnOnce(T) -> Result<(), Rejection>,
) -> Result<(), Rejection> {
    let object: T = serde_norway::from_value(value)
        .map_err(|err| Rejection::error(format!("invalid object: {err}")))?;
    accept(object)
}

/// Reads an Istio resource (or one of the mesh's own) straight from its document text, so that an error knows the
/// field's path and line.
fn istio_object<T: DeserializeOwned + Default>(
    versions: &[&str],
    version: &str,
    first_line: usize,
    origin: Origin,
    doc: &str,
    into: &mut Vec<Resource<T>>,
) -> Result<(), Rejection> {
    if !versions.contains(&version) {
        return Err(Rejection::error(format!(
            "unsupported apiVersion {version}: this kind is served as {}",
            versions.join(", ")
        )));
    }
    let deserializer = serde_norway::Deserializer::from_str(doc);
    match serde_path_to_error::deserialize::<_, Resource<T>>(deserializer) {
        Ok(mut resource) => {
            resource.origin = origin;
            into.push(resource);
            Ok(())
        }
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let line = inner.location().map(|l| first_line + l.line() - 1);
            let mut message = inner.to_string();
            // The YAML error appends " at line L column C"; the diagnostic has its own line.
            if let Some(at) = message.find(" at line ") {
                message.truncate(at);
            }
            Err(Rejection {
                severity: Severity::Error,
                field: (path != ".").then_some(path),
                message,
                line,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> ClusterConfig {
        load_str(Path::new("test.yaml"), text)
    }

    #[test]
    fn cached_documents_read_as_fresh_ones_and_a_changed_one_is_read_again() {
        let pod = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop}}\n\
                 spec: {{nodeName: node-1}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
            )
        };
        let mesh =
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
                    data: {mesh: 'accessLogFile: /dev/stdout'}\n";
        let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                      metadata: {name: p, namespace: shop}\nspec: {action: MAYBE}\n";
        let first = pod("10.244.1.2");
        let documents = [("pod", first.as_str()), ("mesh", mesh), ("broken", broken)];
        let mut cache = DocumentCache::default();
        let fresh = load_documents(documents);
        let shared: Vec<(&str, Arc<str>)> =
            documents.iter().map(|(n, t)| (*n, Arc::from(*t))).collect();
        for round in 0..3 {
            // The same texts, then copies of them: known by pointer, then by their bytes.
            let copies: Vec<(&str, Arc<str>)> =
                shared.iter().map(|(n, t)| (*n, Arc::from(&**t))).collect();
            let texts = if round == 2 { &copies } else { &shared };
            let cached = ClusterConfig {
                others_revision: None,
                ..cache.load(texts.iter().map(|(n, t)| (*n, t)))
            };
            assert_eq!(format!("{cached:?}"), format!("{fresh:?}"));
        }
        assert_eq!(fresh.mesh_config.access_log_file, "/dev/stdout");
        assert_eq!(fresh.errors().count(), 1);

        let moved = pod("10.244.1.3");
        let texts: [(&str, Arc<str>); 2] = [("pod", moved.as_str().into()), ("mesh", mesh.into())];
        let cached = cache.load(texts.iter().map(|(n, t)| (*n, t)));
        assert_eq!(
            cached.pods[0].running_address(),
            Some("10.244.1.3".parse().expect("ip"))
        );
        assert_eq!(cached.errors().count(), 0, "the removed document is gone");
        assert_eq!(cached.mesh_config.access_log_file, "/dev/stdout");
    }

    #[test]
    fn the_document_cache_tells_a_change_to_pods_alone_from_any_other() {
        let pod = |ip: &str, node: &str| -> Arc<str> {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop}}\nspec: {{nodeName: '{node}'}}\nstatus: {{podIP: {ip}}}\n").into()
        };
        let service = |port: u16| -> Arc<str> {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}\n").into()
        };
        let mut cache = DocumentCache::default();
        let mut revision = |documents: &[(&str, &Arc<str>)]| {
            cache
                .load(documents.iter().copied())
                .others_revision
                .expect("known")
        };
        let (first_pod, moved_pod, unscheduled) = (
            pod("10.244.1.2", "n1"),
            pod("10.244.1.3", "n1"),
            pod("10.244.1.3", ""),
        );
        let (first_service, changed_service) = (service(80), service(81));
        let start = revision(&[("pod", &first_pod), ("service", &first_service)]);
        assert_eq!(
            revision(&[("pod", &moved_pod), ("service", &first_service)]),
            start
        );
        assert_eq!(
            revision(&[("pod", &unscheduled), ("service", &first_service)]),
            start,
            "a pod's warning is the pod's"
        );
        assert_eq!(
            revision(&[("service", &first_service)]),
            start,
            "a pod gone"
        );
        let changed = revision(&[("service", &changed_service)]);
        assert!(changed > start);
        let gone = revision(&[("pod", &first_pod)]);
        assert!(gone > changed);
        assert!(
            revision(&[("pod", &first_service)]) > gone,
            "a pod's document now holds a Service"
        );
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
    fn unknown_kind_is_an_error_and_an_unscheduled_pod_a_warning() {
        let config = load(
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w, namespace: ns}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: lost}\nspec: {containers: []}\n",
        );
        let messages: Vec<String> = config.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].contains("error: Widget ns/w: unknown kind Widget"));
        assert!(messages[1].contains("test.yaml:5: warning: Pod default/lost: pod without a node"));
        assert_eq!(config.pods.len(), 1);
    }

    #[test]
    fn unused_kubernetes_kinds_are_skipped_with_a_warning() {
        let config = load("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        assert_eq!(config.errors().count(), 0);
        assert_eq!(config.diagnostics.len(), 1);
        assert!(config.diagnostics[0].message.contains("skipped"));
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
