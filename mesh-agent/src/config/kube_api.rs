//! The Kubernetes API as a configuration source (`--config-source kube`): kube-rs
//! watchers on Pods, Services, EndpointSlices, Namespaces, Nodes, ServiceAccounts, the
//! custom kinds of [`CUSTOM_KINDS`](super::kinds::CUSTOM_KINDS) and one ConfigMap, Istio's
//! MeshConfig (`istio-system/istio`: no other ConfigMap is read or watched). Each object
//! is kept as the document the directory source would have read from a file, so both
//! sources go through the same loader, validation and model; [`Admission`] then judges
//! the objects one by one, so an invalid object is skipped (its last good version kept)
//! while the rest keeps serving.
//! Watches relist after an API server restart or `410 Gone`, and a relisted kind replaces
//! its objects at once, without losing or replaying any.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::{
    api::{Api, ApiResource, DynamicObject},
    config::{Config, InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Client,
};
use tokio::sync::Notify;

use super::{
    admission::{Admission, Objects},
    kinds::{CustomKind, CUSTOM_KINDS},
    kube_events::EventReporter,
    mesh_config,
    source::ConfigSource,
    ClusterConfig, ConfigError, DEFAULT_ROOT_NAMESPACE,
};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading the kubeconfig: {0}")]
    Kubeconfig(#[from] KubeconfigError),
    #[error("finding the Kubernetes API (in-cluster, $KUBECONFIG or ~/.kube/config): {0}")]
    Infer(#[from] InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A watched object: the name it is loaded under (`Kind/namespace/name`) and its text.
type Document = (String, Arc<str>);

/// The objects of one kind, as its watcher reported them.
#[derive(Debug, Default)]
struct KindObjects {
    /// Whether the kind was listed once (or is not served): until every kind was, the
    /// configuration would be partial — policies missing while pods are known.
    listed: bool,
    objects: Objects,
    /// A relist in progress, swapped in whole when it completes.
    relisting: Option<Objects>,
}

impl KindObjects {
    /// Applies one watcher event; whether the objects served changed.
    fn apply(&mut self, event: Event<Document>) -> bool {
        match event {
            Event::Apply((name, text)) => self.objects.insert(name, text.clone()) != Some(text),
            Event::Delete((name, _)) => self.objects.remove(&name).is_some(),
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply((name, text)) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name, text);
                false
            }
            Event::InitDone => {
                let mut listed = self.relisting.take().unwrap_or_default();
                // The texts that did not change keep their identity: the loader knows
                // them without comparing their bytes.
                for (name, text) in &mut listed {
                    if let Some(kept) = self.objects.get(name).filter(|kept| *kept == text) {
                        *text = kept.clone();
                    }
                }
                let changed = !self.listed || listed != self.objects;
                self.objects = listed;
                self.listed = true;
                changed
            }
        }
    }

    /// The API server does not serve the kind (its CRD is not installed): it has no
    /// objects, rather than holding the whole configuration back. Its watcher keeps
    /// retrying, so objects appear once the CRD does.
    fn not_served(&mut self) -> bool {
        let changed = !self.listed || !self.objects.is_empty();
        self.listed = true;
        self.objects.clear();
        changed
    }
}

#[derive(Debug, Default)]
struct Watched {
    kinds: Vec<KindObjects>,
    /// Increases with every change to the objects.
    revision: u64,
}

fn lock(watched: &Mutex<Watched>) -> MutexGuard<'_, Watched> {
    watched.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one watcher follows: every object of a kind, or one named object.
#[derive(Debug, Clone)]
struct Watch {
    resource: ApiResource,
    /// `(namespace, name)`: only that object, which is all the agent's RBAC grants.
    only: Option<(&'static str, &'static str)>,
}

impl Watch {
    fn all(resource: ApiResource) -> Watch {
        Watch {
            resource,
            only: None,
        }
    }

    fn api(&self, client: Client) -> Api<DynamicObject> {
        match self.only {
            Some((namespace, _)) => Api::namespaced_with(client, namespace, &self.resource),
            None => Api::all_with(client, &self.resource),
        }
    }

    fn config(&self) -> watcher::Config {
        match self.only {
            Some((_, name)) => watcher::Config::default().fields(&format!("metadata.name={name}")),
            None => watcher::Config::default(),
        }
    }
}

/// What a source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything the mesh reads: the node agents' view.
    Mesh,
    /// Pods only: the CA's view, which needs no more to know which pods run where.
    Pods,
}

/// The watches of `scope`: for the mesh, Kubernetes' own kinds that it reads, the custom
/// ones, and the MeshConfig's ConfigMap.
fn watches(scope: Scope) -> Vec<Watch> {
    use k8s_openapi::api::{
        core::v1::{ConfigMap, Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    };
    if scope == Scope::Pods {
        return vec![Watch::all(ApiResource::erase::<Pod>(&()))];
    }
    let mut watches: Vec<Watch> = [
        ApiResource::erase::<Node>(&()),
        ApiResource::erase::<Namespace>(&()),
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
    ]
    .into_iter()
    .map(Watch::all)
    .collect();
    watches.extend(CUSTOM_KINDS.iter().map(custom_resource).map(Watch::all));
    watches.push(Watch {
        resource: ApiResource::erase::<ConfigMap>(&()),
        only: Some((DEFAULT_ROOT_NAMESPACE, mesh_config::CONFIG_MAP)),
    });
    watches
}

fn custom_resource(kind: &CustomKind) -> ApiResource {
    let version = kind.watched_version();
    ApiResource {
        group: kind.group.to_owned(),
        version: version.to_owned(),
        api_version: format!("{}/{version}", kind.group),
        kind: kind.kind.to_owned(),
        plural: kind.plural.to_owned(),
    }
}

/// The object as a document of its own: with its `apiVersion` and `kind` (items of a
/// list carry neither), without `managedFields` (bookkeeping of the API server, often
/// larger than the object).
fn document(resource: &ApiResource, object: DynamicObject) -> Document {
    let name = match &object.metadata.namespace {
        Some(namespace) => format!(
            "{}/{namespace}/{}",
            resource.kind,
            object.metadata.name.as_deref().unwrap_or_default()
        ),
        None => format!(
            "{}/{}",
            resource.kind,
            object.metadata.name.as_deref().unwrap_or_default()
        ),
    };
    let mut value = serde_json::to_value(&object).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("apiVersion".into(), resource.api_version.clone().into());
        fields.insert("kind".into(), resource.kind.clone().into());
        if let Some(meta) = fields.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
    }
    // A JSON value always renders as YAML.
    (
        name,
        serde_norway::to_string(&value).unwrap_or_default().into(),
    )
}

fn document_event(resource: &ApiResource, event: Event<DynamicObject>) -> Event<Document> {
    match event {
        Event::Apply(o) => Event::Apply(document(resource, o)),
        Event::Delete(o) => Event::Delete(document(resource, o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(document(resource, o)),
        Event::InitDone => Event::InitDone,
    }
}

fn not_served(err: &watcher::Error) -> bool {
    matches!(
        err,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.is_not_found()
    )
}

/// Keeps one kind's objects in line with the API server, for as long as the agent runs.
async fn watch(
    client: Client,
    watch: Watch,
    index: usize,
    watched: Arc<Mutex<Watched>>,
    changes: Arc<Notify>,
) {
    let resource = &watch.resource;
    let mut events = watcher(watch.api(client), watch.config())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(event) => {
                let event = document_event(resource, event);
                lock(&watched).kinds[index].apply(event)
            }
            Err(err) if not_served(&err) => {
                let changed = lock(&watched).kinds[index].not_served();
                if changed {
                    tracing::warn!(
                        "the API server does not serve {} ({}): none are read until it does",
                        resource.plural,
                        resource.api_version
                    );
                }
                changed
            }
            Err(err) => {
                tracing::warn!("watching {}: {err}", resource.plural);
                false
            }
        };
        if changed {
            lock(&watched).revision += 1;
            changes.notify_one();
        }
    }
}

/// The Kubernetes API, watched.
pub struct KubeSource {
    server: String,
    client: Client,
    watched: Arc<Mutex<Watched>>,
    changes: Arc<Notify>,
    taken: Option<u64>,
    admission: Admission,
    /// Reports skipped objects in Events (the agent's source; not a one-off reader's).
    events: Option<EventReporter>,
}

/// A client of the Kubernetes API and the server's address, for messages.
#[derive(Clone)]
pub struct ApiClient {
    pub client: Client,
    pub server: String,
}

/// Connects with `kubeconfig`, else in-cluster or the default kubeconfig.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<ApiClient, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            Config::from_custom_kubeconfig(
                Kubeconfig::read_from(path)?,
                &KubeConfigOptions::default(),
            )
            .await?
        }
        None => Config::infer().await?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config)?;
    Ok(ApiClient { client, server })
}

impl KubeSource {
    /// Connects with `kubeconfig` (see [`connect`]) and watches what the mesh reads.
    pub async fn start(kubeconfig: Option<&Path>) -> Result<KubeSource, KubeSourceError> {
        Ok(KubeSource::watch(connect(kubeconfig).await?, Scope::Mesh).await)
    }

    /// Starts a watcher per kind of `scope` on the current runtime, and returns once every
    /// kind was listed.
    pub async fn watch(api: ApiClient, scope: Scope) -> KubeSource {
        let ApiClient { client, server } = api;
        let kept = client.clone();
        let watches = watches(scope);
        let watched = Arc::new(Mutex::new(Watched {
            kinds: watches.iter().map(|_| KindObjects::default()).collect(),
            revision: 0,
        }));
        let changes = Arc::new(Notify::new());
        for (index, each) in watches.iter().enumerate() {
            tokio::spawn(watch(
                client.clone(),
                each.clone(),
                index,
                watched.clone(),
                changes.clone(),
            ));
        }
        let mut reported = Instant::now();
        loop {
            let waiting: Vec<&str> = {
                let watched = lock(&watched);
                watches
                    .iter()
                    .zip(&watched.kinds)
                    .filter(|(_, kind)| !kind.listed)
                    .map(|(each, _)| each.resource.plural.as_str())
                    .collect()
            };
            if waiting.is_empty() {
                break;
            }
            if reported.elapsed() > Duration::from_secs(10) {
                tracing::info!("waiting for {server} to list {}", waiting.join(", "));
                reported = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("watching {server}");
        KubeSource {
            server,
            client: kept,
            watched,
            changes,
            taken: None,
            admission: Admission::default(),
            events: None,
        }
    }

    /// Reports each object it skips in a Kubernetes Event on the object.
    pub fn reporting_events(mut self) -> KubeSource {
        self.events = Some(EventReporter::new(self.client.clone()));
        self
    }
}

impl ConfigSource for KubeSource {
    fn describe(&self) -> String {
        self.server.clone()
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.changes.clone())
    }

    fn poll(&mut self) -> Option<Result<ClusterConfig, ConfigError>> {
        let current: Objects = {
            let watched = lock(&self.watched);
            if self.taken == Some(watched.revision) {
                return None;
            }
            self.taken = Some(watched.revision);
            watched
                .kinds
                .iter()
                .flat_map(|kind| kind.objects.iter())
                .map(|(name, text)| (name.clone(), text.clone()))
                .collect()
        };
        let admitted = self.admission.admit(&current);
        if let Some(events) = &mut self.events {
            events.report(&admitted.skipped, &current);
        }
        Some(Ok(ClusterConfig {
            skipped: admitted.skipped,
            ..admitted.config
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, text: &str) -> Document {
        (name.to_owned(), text.into())
    }

    #[test]
    fn a_relist_replaces_the_objects_at_once_and_only_a_real_change_counts() {
        let mut kind = KindObjects::default();
        assert!(!kind.apply(Event::Init));
        assert!(!kind.apply(Event::InitApply(doc("a", "1"))));
        assert!(!kind.listed, "not listed before InitDone");
        assert!(kind.apply(Event::InitDone));
        assert!(kind.listed);
        assert!(kind.apply(Event::Apply(doc("b", "1"))));
        assert!(!kind.apply(Event::Apply(doc("b", "1"))), "same text");
        // A relist after 410 Gone: `a` was deleted meanwhile, `b` changed. The old
        // objects serve until the relist is complete.
        assert!(!kind.apply(Event::Init));
        assert!(!kind.apply(Event::InitApply(doc("b", "2"))));
        assert_eq!(kind.objects.len(), 2);
        assert!(kind.apply(Event::InitDone));
        assert_eq!(kind.objects, BTreeMap::from([("b".into(), "2".into())]));
        // The same relist again changes nothing.
        kind.apply(Event::Init);
        kind.apply(Event::InitApply(doc("b", "2")));
        assert!(!kind.apply(Event::InitDone));
        assert!(kind.apply(Event::Delete(doc("b", "2"))));
        assert!(!kind.apply(Event::Delete(doc("b", "2"))));
    }

    #[test]
    fn the_agent_role_in_deploy_grants_exactly_what_is_watched() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mesh-agent.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/mesh-agent.yaml");
        let role = text
            .split("\n---")
            .find(|doc| doc.lines().any(|l| l == "kind: ClusterRole"))
            .expect("a ClusterRole");
        let role: serde_norway::Value = serde_norway::from_str(role).expect("yaml");
        let strings = |v: &serde_norway::Value| -> Vec<String> {
            v.as_sequence()
                .expect("a list")
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let mut granted = std::collections::BTreeSet::new();
        for rule in role["rules"].as_sequence().expect("rules") {
            if strings(&rule["verbs"]) == ["create"] {
                // Beside the watches, only the Events reporting invalid objects.
                assert_eq!(strings(&rule["resources"]), ["events"]);
                assert_eq!(strings(&rule["apiGroups"]), [""]);
                continue;
            }
            assert_eq!(strings(&rule["verbs"]), ["list", "watch"]);
            let names = match &rule["resourceNames"] {
                serde_norway::Value::Null => None,
                names => Some(strings(names)),
            };
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    granted.insert((group.clone(), resource, names.clone()));
                }
            }
        }
        let watched: std::collections::BTreeSet<_> = watches(Scope::Mesh)
            .into_iter()
            .map(|w| {
                let names = w.only.map(|(_, name)| vec![name.to_owned()]);
                (w.resource.group, w.resource.plural, names)
            })
            .collect();
        assert_eq!(granted, watched);

        // The chart grants the same, word for word.
        let chart = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/chart/templates/agent-rbac.yaml"
        );
        let chart = std::fs::read_to_string(chart).expect("the chart's RBAC");
        let rules = |text: &str| -> String {
            let start = text.find("\nrules:\n").expect("rules");
            let rest = &text[start..];
            rest[..rest.find("\n---").unwrap_or(rest.len())].to_owned()
        };
        assert_eq!(rules(&chart), rules(&text));
    }

    #[test]
    fn the_ca_role_grants_its_pod_watch_and_token_reviews_in_deploy_and_the_chart() {
        let read = |path: &str| {
            std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
                .expect(path)
        };
        let rules = |text: &str| -> String {
            let start = text.find("\nrules:\n").expect("rules");
            let rest = &text[start..];
            rest[..rest.find("\n---").unwrap_or(rest.len())].to_owned()
        };
        let plain = rules(&read("deploy/mesh-ca.yaml"));
        assert_eq!(plain, rules(&read("deploy/chart/templates/ca.yaml")));
        let role: serde_norway::Value =
            serde_norway::from_str(plain.trim_start()).expect("rules yaml");
        let granted: Vec<(String, String, String)> = role["rules"]
            .as_sequence()
            .expect("rules")
            .iter()
            .map(|rule| {
                let one = |key: &str| {
                    let list = rule[key].as_sequence().expect(key);
                    assert_eq!(list.len(), 1, "{key}: one each");
                    list[0].as_str().expect(key).to_owned()
                };
                (
                    one("apiGroups"),
                    one("resources"),
                    rule["verbs"]
                        .as_sequence()
                        .expect("verbs")
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .collect();
        let pods = &watches(Scope::Pods)[0].resource;
        assert_eq!(
            granted,
            [
                (
                    pods.group.clone(),
                    pods.plural.clone(),
                    "list,watch".to_owned()
                ),
                (
                    "authentication.k8s.io".to_owned(),
                    "tokenreviews".to_owned(),
                    "create".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn a_kind_the_server_does_not_serve_counts_as_listed_and_empty() {
        let mut kind = KindObjects::default();
        assert!(kind.not_served());
        assert!(kind.listed);
        assert!(!kind.not_served());
    }

    #[test]
    fn an_object_from_a_list_becomes_the_document_a_file_would_hold() {
        let resource = ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&());
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "node-1", "hostNetwork": false, "containers": []},
            "status": {"phase": "Running", "podIP": "10.244.1.2"},
        }))
        .expect("object");
        let (name, text) = document(&resource, object);
        assert_eq!(name, "Pod/shop/web");
        assert!(!text.contains("managedFields"), "{text}");
        let config = super::super::load_documents([(name.as_str(), &*text)]);
        assert!(config.diagnostics.is_empty(), "{:?}", config.diagnostics);
        assert_eq!(config.pods[0].metadata.uid.as_deref(), Some("u1"));
        assert!(config.pods[0].holds_its_address());

        let vs = custom_resource(&CUSTOM_KINDS[0]);
        assert_eq!(vs.api_version, "networking.istio.io/v1");
        let node = ApiResource::erase::<k8s_openapi::api::core::v1::Node>(&());
        let object: DynamicObject =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}}))
                .expect("object");
        assert_eq!(document(&node, object).0, "Node/n1");
    }
}
