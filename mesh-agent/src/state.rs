//! The typed mesh state one agent works from, derived from the [`ClusterConfig`]: every
//! meshed workload by address, every Service port by cluster IP with its ready endpoints,
//! every node's address, and destination resolution (round robin over endpoints).

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::Serialize;

use crate::config::{ClusterConfig, Diagnostic, Pod, Severity, TargetPort};

/// Label that takes a pod, or every pod of a namespace, out of the mesh (Istio ambient's).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Workload {
    pub uid: String,
    pub namespace: String,
    pub pod: String,
    /// The workload name used in metrics (Istio's `*_workload` labels).
    pub workload: String,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub app: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Named container ports, for `targetPort` by name.
    pub named_ports: BTreeMap<String, u16>,
}

impl Workload {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

#[derive(Debug, Serialize)]
pub struct ServicePortState {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    #[serde(skip)]
    pub target_port: Option<TargetPort>,
    /// Ready endpoints: the selected pods and the port each serves this Service port on.
    pub endpoints: Vec<SocketAddrV4>,
    #[serde(skip)]
    next: AtomicUsize,
}

impl ServicePortState {
    /// Istio's `destination_service` form.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The next endpoint in round-robin order, if any is ready.
    pub fn pick(&self) -> Option<SocketAddrV4> {
        if self.endpoints.is_empty() {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[index])
    }
}

/// Where a captured connection goes.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A meshed pod, reached directly or through a Service.
    Workload {
        target: SocketAddrV4,
        workload: Arc<Workload>,
        service: Option<String>,
    },
    /// A Service port with no ready endpoint.
    NoEndpoints { service: String },
    /// Not an address the mesh knows.
    Unknown,
}

#[derive(Debug, Default, Serialize)]
pub struct MeshState {
    pub node: String,
    pub nodes: BTreeMap<String, Ipv4Addr>,
    pub workloads: HashMap<Ipv4Addr, Arc<Workload>>,
    pub services: HashMap<SocketAddrV4, Arc<ServicePortState>>,
    /// Problems found while deriving the state from a valid configuration.
    pub diagnostics: Vec<Diagnostic>,
}

impl MeshState {
    pub fn build(node: &str, config: &ClusterConfig) -> MeshState {
        let mut state = MeshState {
            node: node.to_owned(),
            ..MeshState::default()
        };
        for n in &config.nodes {
            if let Some(ip) = n.internal_ip() {
                state.nodes.insert(n.metadata.name.clone(), ip);
            }
        }
        let opted_out_namespaces: Vec<&str> = config
            .namespaces
            .iter()
            .filter(|ns| opted_out(&ns.metadata.labels))
            .map(|ns| ns.metadata.name.as_str())
            .collect();
        for pod in &config.pods {
            if opted_out(&pod.metadata.labels)
                || opted_out_namespaces.contains(&pod.metadata.namespace())
            {
                continue;
            }
            if let Some(workload) = workload_of(pod) {
                state.workloads.insert(workload.ip, Arc::new(workload));
            }
        }
        for service in &config.services {
            let Some(ip) = service
                .spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let namespace = service.metadata.namespace();
            let selected: Vec<&Arc<Workload>> = if service.spec.selector.is_empty() {
                Vec::new()
            } else {
                let mut pods: Vec<_> = state
                    .workloads
                    .values()
                    .filter(|w| {
                        w.namespace == namespace
                            && service
                                .spec
                                .selector
                                .iter()
                                .all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .collect();
                pods.sort_by_key(|w| w.ip);
                pods
            };
            if selected.is_empty() && !service.spec.selector.is_empty() {
                state.diagnostics.push(Diagnostic {
                    severity: Severity::Warning,
                    file: PathBuf::new(),
                    line: None,
                    resource: Some(format!("Service {namespace}/{}", service.metadata.name)),
                    field: Some("spec.selector".into()),
                    message: "the selector matches no meshed pod with an address".into(),
                });
            }
            for port in &service.spec.ports {
                let protocol = port.protocol.as_deref().unwrap_or("TCP");
                if protocol != "TCP" {
                    continue;
                }
                let endpoints = selected
                    .iter()
                    .filter_map(|w| {
                        let target = match &port.target_port {
                            None => port.port,
                            Some(TargetPort::Number(n)) => *n,
                            Some(TargetPort::Name(name)) => *w.named_ports.get(name)?,
                        };
                        Some(SocketAddrV4::new(w.ip, target))
                    })
                    .collect();
                state.services.insert(
                    SocketAddrV4::new(ip, port.port),
                    Arc::new(ServicePortState {
                        namespace: namespace.to_owned(),
                        name: service.metadata.name.clone(),
                        cluster_ip: ip,
                        port: port.port,
                        target_port: port.target_port.clone(),
                        endpoints,
                        next: AtomicUsize::new(0),
                    }),
                );
            }
        }
        state
    }

    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node == self.node)
    }

    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.workloads.get(&ip).is_some_and(|w| w.node == self.node)
    }

    /// The address of the node agent serving `workload`.
    pub fn node_ip(&self, workload: &Workload) -> Option<Ipv4Addr> {
        self.nodes.get(&workload.node).copied()
    }

    pub fn resolve(&self, original_dst: SocketAddrV4) -> Resolved {
        if let Some(service) = self.services.get(&original_dst) {
            return match service.pick() {
                Some(target) => match self.workloads.get(target.ip()) {
                    Some(workload) => Resolved::Workload {
                        target,
                        workload: workload.clone(),
                        service: Some(service.hostname()),
                    },
                    None => Resolved::NoEndpoints {
                        service: service.hostname(),
                    },
                },
                None => Resolved::NoEndpoints {
                    service: service.hostname(),
                },
            };
        }
        match self.workloads.get(original_dst.ip()) {
            Some(workload) => Resolved::Workload {
                target: original_dst,
                workload: workload.clone(),
                service: self.service_of(original_dst),
            },
            None => Resolved::Unknown,
        }
    }

    /// The Service whose endpoint `target` is, when exactly one claims it.
    pub fn service_of(&self, target: SocketAddrV4) -> Option<String> {
        let mut owners = self
            .services
            .values()
            .filter(|s| s.endpoints.contains(&target));
        let first = owners.next()?;
        owners.next().is_none().then(|| first.hostname())
    }
}

fn opted_out(labels: &BTreeMap<String, String>) -> bool {
    labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none")
}

fn workload_of(pod: &Pod) -> Option<Workload> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let labels = pod.metadata.labels.clone();
    let named_ports = pod
        .spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .filter_map(|p| Some((p.name.clone()?, p.container_port)))
        .collect();
    Some(Workload {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace().to_owned(),
        pod: pod.metadata.name.clone(),
        workload: workload_name(pod),
        service_account: pod
            .spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        node: pod.spec.node_name.clone().unwrap_or_default(),
        ip,
        app: labels
            .get("app.kubernetes.io/name")
            .or_else(|| labels.get("app"))
            .cloned(),
        labels,
        named_ports,
    })
}

/// Istio's workload name: a pod made by a Deployment is named
/// `<deployment>-<pod-template-hash>-<suffix>`, and the Deployment is the workload; a bare
/// pod is its own workload.
fn workload_name(pod: &Pod) -> String {
    let name = &pod.metadata.name;
    pod.metadata
        .labels
        .get("pod-template-hash")
        .and_then(|hash| {
            let (prefix, _) = name.rsplit_once('-')?;
            prefix.strip_suffix(&format!("-{hash}")).map(str::to_owned)
        })
        .unwrap_or_else(|| name.clone())
}

/// The current state, swapped whole on every accepted configuration change.
#[derive(Clone, Default)]
pub struct SharedState(Arc<std::sync::RwLock<Arc<MeshState>>>);

impl SharedState {
    pub fn current(&self) -> Arc<MeshState> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, state: MeshState) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn state_from(yaml: &str) -> MeshState {
        MeshState::build("node-1", &load_str(std::path::Path::new("test.yaml"), yaml))
    }

    const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 10.200.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: shop, labels: {app: web, istio.io/dataplane-mode: none}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: nothing}, ports: [{port: 80}]}
";

    #[test]
    fn service_resolves_round_robin_over_named_target_ports() {
        let state = state_from(CLUSTER);
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
        let picks: Vec<SocketAddrV4> = (0..4)
            .map(|_| match state.resolve(vip) {
                Resolved::Workload {
                    target, service, ..
                } => {
                    assert_eq!(service.as_deref(), Some("web.shop.svc.cluster.local"));
                    target
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let a = "10.244.1.2:8080".parse().expect("addr");
        let b = "10.244.2.2:8081".parse().expect("addr");
        assert_eq!(picks, vec![a, b, a, b]);
    }

    #[test]
    fn opted_out_pods_are_not_meshed_and_empty_selectors_are_reported() {
        let state = state_from(CLUSTER);
        assert!(!state.workloads.contains_key(&Ipv4Addr::new(10, 244, 1, 9)));
        assert_eq!(state.local_workloads().count(), 1);
        assert!(matches!(
            state.resolve("10.96.0.11:80".parse().expect("addr")),
            Resolved::NoEndpoints { .. }
        ));
        assert_eq!(state.diagnostics.len(), 1);
        assert!(state.diagnostics[0]
            .message
            .contains("matches no meshed pod"));
    }

    #[test]
    fn pod_address_resolves_to_itself_with_its_service() {
        let state = state_from(CLUSTER);
        match state.resolve("10.244.2.2:8081".parse().expect("addr")) {
            Resolved::Workload {
                workload, service, ..
            } => {
                assert_eq!(workload.pod, "web-b");
                assert_eq!(service.as_deref(), Some("web.shop.svc.cluster.local"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            state.resolve("10.244.9.9:80".parse().expect("addr")),
            Resolved::Unknown
        ));
    }
}
