//! The typed mesh state one agent works from, derived from the [`ClusterConfig`]: every
//! meshed workload by address, every Service port (Kubernetes Services and ServiceEntries)
//! by address with its endpoints, subsets and load-balancing policy, every node's address,
//! and destination resolution.

pub mod access_log;
pub mod circuit;
pub mod destination_policy;
pub mod discovery;
pub mod dns;
pub mod entry_addresses;
pub mod hashing;
pub mod lb;
pub mod locality;
pub mod metric_rules;
pub mod outlier;
pub mod peerauth;
pub mod query;
pub mod ratelimit;
pub mod routes_report;
pub mod routing;
pub mod scope;
pub mod security;
pub mod telemetry;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use mesh_common::enrollment::{
    enrolled, DefaultEnrollment, PodEnrollment, DATAPLANE_MODE_LABEL, SIDECAR_STATUS_ANNOTATION,
};
use serde::Serialize;

use crate::config::{ClusterConfig, Diagnostic, Pod, DEFAULT_ROOT_NAMESPACE};

use self::{
    circuit::PoolLimits,
    hashing::{RequestHash, RequestKeys},
    lb::{ActiveGuard, Balancer, BalancerScope, LbPolicy, LbRegistry, LbSettings},
    locality::{Locality, Placed},
    outlier::OutlierTracker,
    peerauth::WorkloadMtls,
    routing::{HostRoutes, RouteTable},
    security::{SecurityConfig, WorkloadSecurity},
    telemetry::WorkloadTelemetry,
};

/// How the agent reads the cluster: the mesh's root namespace and who is enrolled by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// Where mesh-wide policies live (Istio's `rootNamespace`).
    pub root_namespace: String,
    /// Whether pods are in the mesh when neither they nor their namespace say.
    pub default_enrollment: DefaultEnrollment,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            default_enrollment: DefaultEnrollment::None,
        }
    }
}

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
    /// The ports the kubelet probes: the node reaches them in plaintext under STRICT.
    pub probe_ports: Vec<u16>,
}

/// A destination pod labelled `mesh/splice: "false"` has its same-node flows copied
/// through the agent instead of spliced in the kernel (nor carried by the kernel alone).
pub const SPLICE_LABEL: &str = "mesh/splice";
/// A destination pod labelled `mesh/bypass: "false"` has its same-node flows carried by
/// the agent (spliced) even when the kernel could carry them alone.
pub const BYPASS_LABEL: &str = "mesh/bypass";

impl Workload {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }

    fn label_is_false(&self, label: &str) -> bool {
        self.labels.get(label).map(String::as_str) == Some("false")
    }

    /// Whether its labels let the kernel splice the same-node flows it receives.
    pub fn may_be_spliced(&self) -> bool {
        !self.label_is_false(SPLICE_LABEL)
    }

    /// Whether its labels let the kernel carry the same-node flows it receives without
    /// the agent, when nothing else needs the agent.
    pub fn may_bypass_the_agent(&self) -> bool {
        self.may_be_spliced() && !self.label_is_false(BYPASS_LABEL)
    }
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// The meshed pod behind it; `None` for a WorkloadEntry or ServiceEntry endpoint
    /// outside the mesh, which the agent reaches directly.
    #[serde(skip)]
    pub workload: Option<Arc<Workload>>,
    pub labels: BTreeMap<String, String>,
    /// Its node's (a WorkloadEntry's own `locality`).
    pub locality: Locality,
}

impl Endpoint {
    /// True when `selector`'s labels are all the endpoint's.
    pub fn has_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// A DestinationRule subset: the endpoints whose labels match, and its own policy.
#[derive(Debug, Serialize)]
pub struct SubsetState {
    pub labels: BTreeMap<String, String>,
    pub lb: LbSettings,
    #[serde(skip)]
    balancer: Balancer,
}

/// Where the clients of this agent are: its node's locality and labels (every pod it
/// serves runs there).
#[derive(Debug, Clone, Default)]
pub struct ClientPlace {
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
}

/// What a DestinationRule asks of one cluster (the host, or one subset) on one port:
/// outlier detection and connection pool limits.
#[derive(Debug, Serialize)]
pub struct ClusterPolicy {
    /// Istio's cluster name, `outbound|port|subset|host`.
    pub name: String,
    #[serde(skip)]
    pub outliers: Option<Arc<OutlierTracker>>,
    pub limits: Option<PoolLimits>,
}

#[derive(Debug, Serialize)]
pub struct ServicePortState {
    pub namespace: String,
    pub name: String,
    /// Istio's `destination_service`: `name.namespace.svc.cluster.local`, or the
    /// ServiceEntry's host.
    pub hostname: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
    /// Declared HTTP, HTTP/2 or gRPC (`appProtocol` or the port name): requests to it can
    /// be routed.
    pub http: bool,
    /// Declared HTTP/2 or gRPC: routed requests reach it over HTTP/2.
    pub http2: bool,
    pub protocol: PortProtocol,
    pub lb: LbSettings,
    #[serde(skip)]
    balancer: Balancer,
    pub subsets: BTreeMap<String, SubsetState>,
    /// Outlier detection and pool limits by subset ("" for the whole host), where a
    /// DestinationRule sets them.
    pub clusters: BTreeMap<String, ClusterPolicy>,
    /// The default route, when no VirtualService routes the host but its balancer hashes
    /// on requests: only the HTTP router sees their headers, cookies and query.
    #[serde(skip)]
    pub default_routes: Option<Arc<HostRoutes>>,
}

/// What a Service port says it speaks, as Istio reads it from `appProtocol`, a
/// ServiceEntry port's `protocol` or the port name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortProtocol {
    /// HTTP, HTTP/2 or gRPC: requests can be routed.
    Http,
    /// TLS (`tls`, `https`): `tls` routes pick a connection's destination by SNI.
    Tls,
    /// Another protocol Istio knows (`tcp`, `mongo`, `mysql`, `redis`…): carried as bytes.
    Opaque,
    /// None Istio knows: the client's first bytes tell (protocol sniffing).
    Undeclared,
}

impl PortProtocol {
    /// The protocol named by `declared`, the lower-cased `appProtocol`, `protocol` or name
    /// prefix (Istio's `protocol.Parse`, and Kubernetes' `kubernetes.io/h2c`).
    pub fn named(declared: &str) -> PortProtocol {
        match declared {
            "http" | "http2" | "grpc" | "grpc-web" | "grpc_web" | "kubernetes.io/h2c" => {
                PortProtocol::Http
            }
            "https" | "tls" => PortProtocol::Tls,
            "tcp" | "udp" | "mongo" | "mysql" | "redis" | "http_proxy" => PortProtocol::Opaque,
            _ => PortProtocol::Undeclared,
        }
    }
}

/// What the load balancer chose for a connection.
#[derive(Debug)]
pub enum Pick {
    Endpoint(usize, ActiveGuard),
    /// `PASSTHROUGH`: to the original destination.
    Passthrough,
    None,
}

/// A Service port's name: namespace, name and Istio hostname.
#[derive(Clone)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
    pub hostname: String,
}

impl ServicePortState {
    pub fn new(
        service: ServiceName,
        address: SocketAddrV4,
        endpoints: Vec<Endpoint>,
        lb: LbSettings,
        subsets: BTreeMap<String, (BTreeMap<String, String>, LbSettings)>,
        balancers: &LbRegistry,
        client: &ClientPlace,
    ) -> ServicePortState {
        let addresses: Vec<SocketAddrV4> = endpoints.iter().map(|e| e.addr).collect();
        let key = |subset: &str| format!("{}|{address}|{subset}", service.hostname);
        // Endpoint labels with their node's topology labels, for `failoverPriority`.
        let placed_labels: Vec<BTreeMap<String, String>> = endpoints
            .iter()
            .map(|e| {
                let mut labels = e.labels.clone();
                for (k, v) in e.locality.labels() {
                    labels.insert(k.to_owned(), v.to_owned());
                }
                labels
            })
            .collect();
        let balancer = |name: &str, lb: &LbSettings, members: Vec<usize>| {
            let locality = lb.locality.as_ref().and_then(|settings| {
                let placed: Vec<Placed> = members
                    .iter()
                    .map(|i| Placed {
                        locality: &endpoints[*i].locality,
                        labels: &placed_labels[*i],
                    })
                    .collect();
                locality::plan(settings, &client.locality, &client.labels, &placed)
            });
            let scope = BalancerScope {
                addresses: &addresses,
                members,
                locality,
            };
            balancers.balancer(key(name), lb, scope)
        };
        let subsets = subsets
            .into_iter()
            .map(|(subset, (labels, lb))| {
                let members = (0..endpoints.len())
                    .filter(|i| endpoints[*i].has_labels(&labels))
                    .collect();
                let state = SubsetState {
                    balancer: balancer(&subset, &lb, members),
                    labels,
                    lb,
                };
                (subset, state)
            })
            .collect();
        let balancer = balancer("", &lb, (0..endpoints.len()).collect());
        ServicePortState {
            namespace: service.namespace,
            name: service.name,
            hostname: service.hostname,
            cluster_ip: *address.ip(),
            port: address.port(),
            balancer,
            lb,
            endpoints,
            http: false,
            http2: false,
            protocol: PortProtocol::Undeclared,
            subsets,
            clusters: BTreeMap::new(),
            default_routes: None,
        }
    }

    /// Whether some balancer of this port hashes on what only a request carries.
    pub fn hashes_requests(&self) -> bool {
        std::iter::once(&self.lb)
            .chain(self.subsets.values().map(|s| &s.lb))
            .filter_map(LbSettings::hash_key)
            .any(|key| *key != hashing::HashKey::SourceIp)
    }

    /// The DestinationRule's outlier detection and limits for `subset` (or the host).
    pub fn cluster(&self, subset: Option<&str>) -> Option<&ClusterPolicy> {
        self.clusters.get(subset.unwrap_or_default())
    }

    /// The load-balancing settings of `subset` (none: the host).
    fn lb_of(&self, subset: Option<&str>) -> &LbSettings {
        subset
            .and_then(|s| self.subsets.get(s))
            .map_or(&self.lb, |s| &s.lb)
    }

    /// The endpoint for a new connection from `client`, in `subset` if one is named: a
    /// connection hashes only on its source address.
    pub fn pick(&self, client: Ipv4Addr, subset: Option<&str>) -> Pick {
        let hash = self
            .lb_of(subset)
            .hash_key()
            .and_then(|key| key.connection_hash(client));
        self.pick_where(hash, subset, |_| true)
    }

    /// The consistent hash of a request to `subset` (or the host), when its policy hashes,
    /// and the cookie to set when one was generated.
    pub fn request_hash(&self, subset: Option<&str>, request: &RequestKeys) -> RequestHash {
        self.lb_of(subset)
            .hash_key()
            .map(|key| key.request_hash(request))
            .unwrap_or_default()
    }

    /// The endpoint for a request hashing to `hash` (see [`Self::request_hash`]), but not
    /// one of `avoid` while another is eligible: a retry goes to another endpoint when
    /// there is one (Istio's `previous_hosts` predicate). Only endpoints `allowed` says
    /// yes to are eligible.
    pub fn pick_avoiding(
        &self,
        hash: Option<u64>,
        subset: Option<&str>,
        avoid: &[SocketAddrV4],
        allowed: impl Fn(SocketAddrV4) -> bool,
    ) -> Pick {
        match self.pick_where(hash, subset, |addr| !avoid.contains(&addr) && allowed(addr)) {
            Pick::None if !avoid.is_empty() => self.pick_where(hash, subset, allowed),
            picked => picked,
        }
    }

    fn pick_where(
        &self,
        hash: Option<u64>,
        subset: Option<&str>,
        allowed: impl Fn(SocketAddrV4) -> bool,
    ) -> Pick {
        let balancer = match subset.map(|s| self.subsets.get(s)) {
            Some(Some(subset)) => &subset.balancer,
            Some(None) => return Pick::None,
            None => &self.balancer,
        };
        if balancer.policy == LbPolicy::Passthrough {
            return Pick::Passthrough;
        }
        match balancer.pick(hash, |i| allowed(self.endpoints[i].addr)) {
            Some((index, guard)) => Pick::Endpoint(index, guard),
            None => Pick::None,
        }
    }
}

/// Where a captured connection goes.
#[derive(Debug)]
pub enum Resolved {
    /// An endpoint: a meshed pod (`workload`), or an address outside the mesh.
    Endpoint {
        target: SocketAddrV4,
        workload: Option<Arc<Workload>>,
        service: Option<String>,
        /// Counts the connection as active on the endpoint while held.
        guard: Option<ActiveGuard>,
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
    /// Every node's locality, from its topology labels.
    pub localities: BTreeMap<String, Locality>,
    /// This node's locality and labels: its clients'.
    #[serde(skip)]
    pub place: ClientPlace,
    pub workloads: HashMap<Ipv4Addr, Arc<Workload>>,
    pub services: HashMap<SocketAddrV4, Arc<ServicePortState>>,
    /// PeerAuthentication modes of every workload.
    pub mtls: HashMap<Ipv4Addr, WorkloadMtls>,
    /// AuthorizationPolicies and RequestAuthentication rules of every workload.
    #[serde(serialize_with = "security_summary")]
    pub security: HashMap<Ipv4Addr, Arc<WorkloadSecurity>>,
    /// VirtualService routes by host.
    pub routes: RouteTable,
    /// Istio's `rootNamespace`: its policies apply mesh wide.
    pub root_namespace: String,
    /// Problems found while deriving the state from a valid configuration.
    pub diagnostics: Vec<Diagnostic>,
    /// Where the balancers' state lives across configurations.
    #[serde(skip)]
    pub balancers: LbRegistry,
    /// The cluster's names, for the DNS proxy.
    #[serde(skip)]
    pub dns: dns::DnsRecords,
    /// The names the agent looks up for `resolution: DNS` ServiceEntries.
    pub names_to_resolve: BTreeSet<String>,
    /// Every pod of the configuration, by its allocation: held, so that no other pod can
    /// have that address while this state lives, and an unchanged pod (shared by the
    /// document cache) is known by it in the next build.
    #[serde(skip)]
    pods_read: HashMap<usize, Arc<Pod>>,
    /// The workloads read from those pods: the next build takes over those of unchanged
    /// pods instead of reading ten thousand pods again for a change to one.
    #[serde(skip)]
    pod_workloads: HashMap<usize, Arc<Workload>>,
    /// What each Kubernetes Service added, for the next build to keep when only pods
    /// it does not select changed.
    #[serde(skip)]
    kubernetes_services: HashMap<(String, String), discovery::BuiltService>,
    /// What this state was built from besides pods (`None`: unknown).
    #[serde(skip)]
    built_from: Option<BuiltFrom>,
}

/// Everything but pods that a state is built from: two states with the same differ only
/// by their pods.
#[derive(Debug, PartialEq)]
struct BuiltFrom {
    others_revision: u64,
    node: String,
    settings: MeshSettings,
    resolved: entry_addresses::ResolvedNames,
}

impl MeshState {
    /// The state of a fresh agent (no balancer state to carry over), with Istio's
    /// default root namespace and every pod enrolled unless labelled `none`
    /// (`--default-enrollment ambient`).
    pub fn build(node: &str, config: &ClusterConfig) -> MeshState {
        let settings = MeshSettings {
            default_enrollment: DefaultEnrollment::Ambient,
            ..MeshSettings::default()
        };
        MeshState::build_with(node, config, &settings, &LbRegistry::default())
    }

    /// The state `node`'s agent works from; balancers take their state from `balancers`,
    /// so it carries over from the previous configuration.
    pub fn build_with(
        node: &str,
        config: &ClusterConfig,
        settings: &MeshSettings,
        balancers: &LbRegistry,
    ) -> MeshState {
        let nothing_resolved = entry_addresses::ResolvedNames::default();
        let nothing_before = MeshState::default();
        MeshState::build_resolved(
            node,
            config,
            settings,
            balancers,
            &nothing_resolved,
            &nothing_before,
        )
    }

    /// [`MeshState::build_with`], with the endpoints `resolution: DNS` ServiceEntries
    /// resolved to, and what `previous` read from the pods that did not change.
    pub fn build_resolved(
        node: &str,
        config: &ClusterConfig,
        settings: &MeshSettings,
        balancers: &LbRegistry,
        resolved: &entry_addresses::ResolvedNames,
        previous: &MeshState,
    ) -> MeshState {
        let root_namespace = settings.root_namespace.as_str();
        let built_from = config.others_revision.map(|others_revision| BuiltFrom {
            others_revision,
            node: node.to_owned(),
            settings: settings.clone(),
            resolved: resolved.clone(),
        });
        let pods_alone_changed = built_from.is_some() && built_from == previous.built_from;
        let mut state = MeshState {
            node: node.to_owned(),
            root_namespace: root_namespace.to_owned(),
            balancers: balancers.clone(),
            built_from,
            ..MeshState::default()
        };
        for n in &config.nodes {
            if let Some(ip) = n.internal_ip() {
                state.nodes.insert(n.metadata.name.clone(), ip);
            }
            let locality = Locality::of_labels(&n.metadata.labels);
            if n.metadata.name == node {
                state.place = ClientPlace {
                    locality: locality.clone(),
                    labels: n.metadata.labels.clone(),
                };
            }
            state.localities.insert(n.metadata.name.clone(), locality);
        }
        let namespace_labels: HashMap<&str, &str> = config
            .namespaces
            .iter()
            .filter_map(|ns| {
                let mode = ns.metadata.labels.get(DATAPLANE_MODE_LABEL)?;
                Some((ns.metadata.name.as_str(), mode.as_str()))
            })
            .collect();
        for pod in &config.pods {
            let key = Arc::as_ptr(pod) as usize;
            state.pods_read.insert(key, pod.clone());
            let labels = PodEnrollment {
                pod_label: pod
                    .metadata
                    .labels
                    .get(DATAPLANE_MODE_LABEL)
                    .map(String::as_str),
                namespace_label: namespace_labels.get(pod.metadata.namespace()).copied(),
                has_sidecar: pod
                    .metadata
                    .annotations
                    .contains_key(SIDECAR_STATUS_ANNOTATION),
            };
            if !enrolled(labels, settings.default_enrollment) {
                continue;
            }
            // Held by the previous state, a pod at `key` is that very pod.
            let workload = match previous.pod_workloads.get(&key) {
                Some(workload) => workload.clone(),
                None => match workload_of(pod) {
                    Some(workload) => Arc::new(workload),
                    None => continue,
                },
            };
            state.workloads.insert(workload.ip, workload.clone());
            state.pod_workloads.insert(key, workload);
        }
        let unchanged_services = pods_alone_changed.then(|| {
            let changed_pods: Vec<&Pod> = config
                .pods
                .iter()
                .filter(|pod| {
                    !previous
                        .pods_read
                        .contains_key(&(Arc::as_ptr(pod) as usize))
                })
                .chain(
                    previous
                        .pods_read
                        .iter()
                        .filter(|(key, _)| !state.pods_read.contains_key(key))
                        .map(|(_, pod)| pod),
                )
                .map(|pod| &**pod)
                .collect();
            let changed_addresses = changed_pods
                .iter()
                .filter_map(|pod| pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
                .collect();
            discovery::UnchangedServices {
                built: &previous.kubernetes_services,
                changed_pods,
                changed_addresses,
            }
        });
        let allocated = entry_addresses::EntryAddresses::of(config);
        let index = discovery::ConfigIndex::of(config);
        discovery::add_services(
            &mut state,
            config,
            &index,
            &allocated,
            resolved,
            unchanged_services.as_ref(),
        );
        state.dns = dns::DnsRecords::of(config, &index, &allocated);
        state.names_to_resolve = entry_addresses::names_to_resolve(config);
        state.mtls = state
            .workloads
            .values()
            .map(|w| (w.ip, peerauth::modes(config, w, root_namespace)))
            .collect();
        let security = SecurityConfig::compile(config, root_namespace);
        // Only pods changed: an unchanged workload keeps its policies.
        let kept_security = |w: &Arc<Workload>| {
            let unchanged = previous.workloads.get(&w.ip)?;
            (pods_alone_changed && Arc::ptr_eq(unchanged, w))
                .then(|| previous.security.get(&w.ip).cloned())
                .flatten()
        };
        state.security = state
            .workloads
            .values()
            .map(|w| {
                let security =
                    kept_security(w).unwrap_or_else(|| Arc::new(security.for_workload(config, w)));
                (w.ip, security)
            })
            .collect();
        let (routes, unroutable) = RouteTable::build(config);
        state.routes = routes;
        state
            .diagnostics
            .extend(unroutable.into_iter().map(|e| Diagnostic {
                severity: crate::config::Severity::Warning,
                file: std::path::PathBuf::new(),
                line: None,
                resource: Some(format!("VirtualService {}", e.virtual_service)),
                field: None,
                message: format!("{}; its routes are not used", e.message),
            }));
        balancers.prune();
        state
    }

    /// The policies of the workload at `ip` (none for an address outside the mesh).
    pub fn security_of(&self, ip: Ipv4Addr) -> Arc<WorkloadSecurity> {
        self.security.get(&ip).cloned().unwrap_or_default()
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

    /// This node's address, when its Node object gives one.
    pub fn own_ip(&self) -> Option<Ipv4Addr> {
        self.nodes.get(&self.node).copied()
    }

    /// Where a connection from `client` to `original_dst` goes: a Service port's endpoint
    /// chosen by its load-balancing policy, or the pod addressed directly.
    pub fn resolve(&self, original_dst: SocketAddrV4, client: Ipv4Addr) -> Resolved {
        if let Some(service) = self.services.get(&original_dst) {
            return match service.pick(client, None) {
                Pick::Endpoint(index, guard) => {
                    let endpoint = &service.endpoints[index];
                    Resolved::Endpoint {
                        target: endpoint.addr,
                        workload: endpoint.workload.clone(),
                        service: Some(service.hostname.clone()),
                        guard: Some(guard),
                    }
                }
                Pick::Passthrough => Resolved::Endpoint {
                    target: original_dst,
                    workload: self.workloads.get(original_dst.ip()).cloned(),
                    service: Some(service.hostname.clone()),
                    guard: None,
                },
                Pick::None => Resolved::NoEndpoints {
                    service: service.hostname.clone(),
                },
            };
        }
        match self.workloads.get(original_dst.ip()) {
            Some(workload) => Resolved::Endpoint {
                target: original_dst,
                workload: Some(workload.clone()),
                service: self.service_of(original_dst),
                guard: None,
            },
            None => Resolved::Unknown,
        }
    }

    /// The HTTP routes requests from `source_namespace` to `service` take: its
    /// VirtualService's, else its default route when its balancer hashes on requests.
    pub fn http_routes(
        &self,
        service: &ServicePortState,
        source_namespace: &str,
    ) -> Option<Arc<HostRoutes>> {
        match self.routes.for_host(&service.hostname, source_namespace) {
            Some(routes) => Some(routes.clone()),
            None if service.http => service.default_routes.clone(),
            None => None,
        }
    }

    /// A Service port of the Service (or ServiceEntry host) named `hostname`.
    pub fn service_by_host(&self, hostname: &str) -> Option<&ServicePortState> {
        self.services
            .values()
            .find(|s| s.hostname == hostname)
            .map(|s| s.as_ref())
    }

    /// Where a connection the agent makes itself (a JWKS fetch, a span export) to
    /// `host:port` goes when `host` names a Service port of the mesh — by its cluster IP,
    /// its full name or the shorter `name.namespace` and `name.namespace.svc`, or a
    /// ServiceEntry's host: the endpoints' addresses (empty when none is ready). `None`:
    /// not a Service; the host is dialled as it is. The node has no route to cluster IPs
    /// of its own (kube-proxy need not be there), so the agent resolves them as it does
    /// for pods.
    pub fn service_endpoints(&self, host: &str, port: u16) -> Option<Vec<SocketAddrV4>> {
        let service = match host.parse::<Ipv4Addr>() {
            Ok(ip) => self.services.get(&SocketAddrV4::new(ip, port))?.as_ref(),
            Err(_) => {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                let expanded = match host.split('.').count() {
                    2 => format!("{host}.svc.cluster.local"),
                    3 if host.ends_with(".svc") => format!("{host}.cluster.local"),
                    _ => host.clone(),
                };
                self.services
                    .values()
                    .filter(|s| s.port == port)
                    .find(|s| s.hostname == host)
                    .or_else(|| {
                        self.services
                            .values()
                            .filter(|s| s.port == port)
                            .find(|s| s.hostname == expanded)
                    })?
                    .as_ref()
            }
        };
        Some(service.endpoints.iter().map(|e| e.addr).collect())
    }

    /// The address the agent dials for its own connection to `host:port`: one of the
    /// endpoints, at random, when `host` names a Service port of the mesh (see
    /// [`MeshState::service_endpoints`]); else `host:port` as it is (an address, or a
    /// name for the system's resolver). An error when the Service has no ready endpoint.
    pub fn dial(&self, host: &str, port: u16) -> Result<String, String> {
        match self.service_endpoints(host, port) {
            None => Ok(format!("{host}:{port}")),
            Some(endpoints) if endpoints.is_empty() => {
                Err(format!("the Service {host}:{port} has no ready endpoint"))
            }
            Some(endpoints) => Ok(endpoints[lb::random(endpoints.len())].to_string()),
        }
    }

    /// The port of the Service (or ServiceEntry host) `hostname` a route destination
    /// names: its `port`, else the only port, else the port the client addressed.
    pub fn service_port(
        &self,
        hostname: &str,
        port: Option<u16>,
        addressed: u16,
    ) -> Option<&Arc<ServicePortState>> {
        let mut ports: Vec<&Arc<ServicePortState>> = self
            .services
            .values()
            .filter(|s| s.hostname == hostname)
            .collect();
        ports.sort_by_key(|s| (s.port, s.cluster_ip));
        match port {
            Some(port) => ports.into_iter().find(|s| s.port == port),
            None if ports.iter().all(|s| s.port == ports[0].port) => ports.first().copied(),
            None => ports.into_iter().find(|s| s.port == addressed),
        }
    }

    /// The Service whose endpoint `target` is, when exactly one claims it.
    pub fn service_of(&self, target: SocketAddrV4) -> Option<String> {
        let mut owners = self
            .services
            .values()
            .filter(|s| s.endpoints.iter().any(|e| e.addr == target));
        let first = owners.next()?;
        owners.next().is_none().then(|| first.hostname.clone())
    }
}

/// The workload a pod is, while it runs: its address stands for its identity only then.
/// A pod that has finished (`Succeeded`, `Failed`) keeps its `podIP` in its status while
/// the address goes to another pod, and one not running yet (`Pending`, `Unknown`) may
/// never hold it. A status without a phase (a hand-written configuration file) counts as
/// running.
fn workload_of(pod: &Pod) -> Option<Workload> {
    if !pod.holds_its_address() {
        return None;
    }
    let ip = pod.running_address()?;
    let labels = pod.metadata.labels.clone();
    let named_ports = pod.named_ports();
    let mut probe_ports: Vec<u16> = pod
        .spec
        .containers
        .iter()
        .flat_map(|c| c.probe_ports())
        .collect();
    probe_ports.sort_unstable();
    probe_ports.dedup();
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
        probe_ports,
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

    /// Swaps `state` in and returns the state it replaces, for the caller to drop: with
    /// 10,000 pods that takes milliseconds, which readers must not wait behind the lock.
    pub fn replace(&self, state: MeshState) -> Arc<MeshState> {
        let state = Arc::new(state);
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            state,
        )
    }
}

/// `config_dump` shows, per workload, the names of the policies that apply.
fn security_summary<S: serde::Serializer>(
    security: &HashMap<Ipv4Addr, Arc<WorkloadSecurity>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let summary: BTreeMap<String, serde_json::Value> = security
        .iter()
        .filter(|(_, s)| !s.is_empty() || s.telemetry != WorkloadTelemetry::default())
        .map(|(ip, s)| {
            let policies: Vec<String> = s
                .policies
                .iter()
                .map(|p| format!("{:?} {}", p.action, p.name))
                .collect();
            let jwt: Vec<String> = s.jwt_rules.iter().map(|r| r.issuer.clone()).collect();
            (
                ip.to_string(),
                serde_json::json!({
                    "authorization": policies,
                    "jwt_issuers": jwt,
                    "http_ports": s.http_ports,
                    "telemetry": s.telemetry,
                }),
            )
        })
        .collect();
    summary.serialize(serializer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn state_from(yaml: &str) -> MeshState {
        MeshState::build("node-1", &load_str(std::path::Path::new("test.yaml"), yaml))
    }

    #[test]
    fn a_service_without_a_selector_goes_to_the_ready_endpoints_of_its_slices() {
        let state = state_from(
            "apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.30}
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443, targetPort: 6443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}
addressType: IPv4
endpoints:
- addresses: [10.200.0.253]
- addresses: [10.200.0.254]
  conditions: {ready: false}
ports: [{name: https, port: 6443, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kubernetes-v6, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}
addressType: IPv6
endpoints:
- addresses: ['fd00::1']
ports: [{name: https, port: 6443}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.7.7
  ports: [{name: sql, port: 5432}, {name: admin, port: 9000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.244.1.30, 10.200.0.50]
  conditions: {ready: true}
ports: [{name: sql, port: 15432}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec:
  clusterIP: 10.96.7.8
  ports: [{port: 80}]
",
        );
        let endpoints = |service: &str| -> Vec<(String, bool)> {
            let port = &state.services[&service.parse::<SocketAddrV4>().expect("addr")];
            port.endpoints
                .iter()
                .map(|e| (e.addr.to_string(), e.workload.is_some()))
                .collect()
        };
        // Ready (or unknown) IPv4 endpoints only, at the slice port of the same name.
        assert_eq!(
            endpoints("10.96.0.1:443"),
            [("10.200.0.253:6443".into(), false)]
        );
        assert_eq!(
            endpoints("10.96.7.7:5432"),
            [
                ("10.244.1.30:15432".into(), true),
                ("10.200.0.50:15432".into(), false)
            ],
            "a meshed pod's address is its workload"
        );
        assert_eq!(
            endpoints("10.96.7.7:9000"),
            [],
            "no slice port of that name"
        );
        assert!(
            !state
                .services
                .contains_key(&"10.96.7.8:80".parse().expect("addr")),
            "no selector and no slice: not captured"
        );
    }

    #[test]
    fn the_agents_own_connections_to_a_service_go_to_its_endpoints() {
        let state = state_from(
            "apiVersion: v1
kind: Pod
metadata: {name: keys-1, namespace: auth, labels: {app: keys, istio.io/dataplane-mode: none}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: keys, namespace: auth}
spec:
  clusterIP: 10.96.50.31
  selector: {app: keys}
  ports: [{name: http, port: 80, targetPort: 8000}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: auth}
spec:
  clusterIP: 10.96.50.32
  selector: {app: nobody}
  ports: [{port: 80}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: idp, namespace: auth}
spec:
  hosts: [idp.internal]
  addresses: [10.97.0.9]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 10.200.0.77}]
",
        );
        let keys = Some(vec!["10.244.1.9:8000".parse().expect("addr")]);
        for host in [
            "10.96.50.31",
            "keys.auth",
            "keys.auth.svc",
            "keys.auth.svc.cluster.local",
            "Keys.Auth.svc.cluster.local.",
        ] {
            assert_eq!(state.service_endpoints(host, 80), keys, "{host}");
        }
        assert_eq!(
            state.service_endpoints("idp.internal", 443),
            Some(vec!["10.200.0.77:443".parse().expect("addr")])
        );
        assert_eq!(state.service_endpoints("empty.auth", 80), Some(vec![]));
        // Not a Service port of the mesh: dialled as it is.
        assert_eq!(state.service_endpoints("keys.auth", 8080), None);
        assert_eq!(state.service_endpoints("10.244.1.9", 8000), None);
        assert_eq!(state.service_endpoints("keys", 80), None);
        assert_eq!(state.service_endpoints("example.com", 443), None);
    }

    #[test]
    fn only_a_running_pod_is_a_workload() {
        let pod = |name: &str, ip: &str, phase: &str| {
            format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-1}}\nstatus: {{podIP: {ip}{phase}}}\n")
        };
        let yaml = [
            pod("running", "10.244.1.2", ", phase: Running"),
            pod("done", "10.244.1.3", ", phase: Succeeded"),
            pod("failed", "10.244.1.4", ", phase: Failed"),
            pod("starting", "10.244.1.5", ", phase: Pending"),
            pod("unknown", "10.244.1.6", ", phase: Unknown"),
            pod("hand-written", "10.244.1.7", ""),
        ]
        .concat();
        let state = state_from(&yaml);
        let mut pods: Vec<&str> = state.workloads.values().map(|w| w.pod.as_str()).collect();
        pods.sort();
        assert_eq!(pods, ["hand-written", "running"]);
        assert!(
            !state.workloads.contains_key(&Ipv4Addr::new(10, 244, 1, 3)),
            "a finished pod's address is no one's identity"
        );
    }

    #[test]
    fn a_rebuild_after_pods_changed_keeps_what_they_did_not_touch_and_equals_a_fresh_build() {
        let pod = |name: &str, ip: &str, app: &str, ready: &str| -> Arc<str> {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\n\
                 spec: {{nodeName: node-1}}\n\
                 status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: '{ready}'}}]}}\n"
            )
            .into()
        };
        let service = |name: &str, ip: &str, app: &str| -> Arc<str> {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{clusterIP: {ip}, selector: {{app: {app}}}, ports: [{{port: 80}}]}}\n"
            )
            .into()
        };
        let mut documents: BTreeMap<&str, Arc<str>> = BTreeMap::from([
            ("web-1", pod("web-1", "10.244.1.2", "web", "True")),
            ("web-2", pod("web-2", "10.244.1.3", "web", "True")),
            ("db-1", pod("db-1", "10.244.1.5", "db", "True")),
            ("web", service("web", "10.96.0.10", "web")),
            ("db", service("db", "10.96.0.11", "db")),
            ("cache", service("cache", "10.96.0.12", "cache")),
            (
                "external",
                "apiVersion: v1\nkind: Service\nmetadata: {name: external, namespace: shop}\n\
                 spec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}\n"
                    .into(),
            ),
            (
                "external-slice",
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: external, namespace: shop, labels: {kubernetes.io/service-name: external}}\n\
                 addressType: IPv4\nendpoints: [{addresses: [10.244.1.5]}]\nports: [{port: 80}]\n"
                    .into(),
            ),
            (
                "namespace",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n".into(),
            ),
        ]);
        let mut cache = crate::config::DocumentCache::default();
        let balancers = LbRegistry::default();
        let build = |config: &ClusterConfig, previous: &MeshState| {
            MeshState::build_resolved(
                "node-1",
                config,
                &MeshSettings::default(),
                &balancers,
                &entry_addresses::ResolvedNames::default(),
                previous,
            )
        };
        let json = |state: &MeshState| serde_json::to_value(state).expect("json");
        let port = |state: &MeshState, ip: [u8; 4]| {
            state.services[&SocketAddrV4::new(Ipv4Addr::from(ip), 80)].clone()
        };
        let endpoints = |state: &MeshState, ip: [u8; 4]| -> Vec<String> {
            port(state, ip)
                .endpoints
                .iter()
                .map(|e| e.addr.to_string())
                .collect()
        };
        let mut state = build(
            &cache.load(documents.iter().map(|(n, t)| (*n, t))),
            &MeshState::default(),
        );
        type Step<'a> = (&'a str, &'a str, Option<Arc<str>>);
        let steps: [Step; 6] = [
            (
                "a pod moves and leaves its Service for another",
                "web-2",
                Some(pod("web-2", "10.244.1.4", "cache", "True")),
            ),
            (
                "a pod is no longer ready",
                "db-1",
                Some(pod("db-1", "10.244.1.5", "db", "False")),
            ),
            (
                "a pod comes",
                "web-3",
                Some(pod("web-3", "10.244.1.6", "web", "True")),
            ),
            ("a pod goes", "web-1", None),
            (
                "a Service changes its selector",
                "db",
                Some(service("db", "10.96.0.11", "web")),
            ),
            (
                "a pod takes a gone pod's address",
                "db-2",
                Some(pod("db-2", "10.244.1.2", "db", "True")),
            ),
        ];
        for (what, name, text) in steps {
            match text {
                Some(text) => documents.insert(name, text),
                None => documents.remove(name),
            };
            let config = cache.load(documents.iter().map(|(n, t)| (*n, t)));
            let rebuilt = build(&config, &state);
            assert_eq!(
                json(&rebuilt),
                json(&build(&config, &MeshState::default())),
                "{what}"
            );
            for endpoint in rebuilt.services.values().flat_map(|port| &port.endpoints) {
                let current = rebuilt.workloads.get(endpoint.addr.ip());
                let held = endpoint.workload.as_ref();
                assert!(
                    current
                        .zip(held)
                        .map_or(current.is_none() && held.is_none(), |(c, h)| Arc::ptr_eq(
                            c, h
                        )),
                    "{what}: the endpoint {} holds its pod's current workload",
                    endpoint.addr
                );
            }
            state = rebuilt;
        }
        assert_eq!(endpoints(&state, [10, 96, 0, 10]), ["10.244.1.6:80"]);
        assert_eq!(endpoints(&state, [10, 96, 0, 11]), ["10.244.1.6:80"]);
        assert_eq!(endpoints(&state, [10, 96, 0, 12]), ["10.244.1.4:80"]);

        // Another pod of `web` changes: `cache` is kept whole, with the workload of its pod.
        let before = state;
        documents.insert("web-3", pod("web-3", "10.244.1.7", "web", "True"));
        let config = cache.load(documents.iter().map(|(n, t)| (*n, t)));
        let after = build(&config, &before);
        assert!(Arc::ptr_eq(
            &port(&before, [10, 96, 0, 12]),
            &port(&after, [10, 96, 0, 12])
        ));
        assert!(!Arc::ptr_eq(
            &port(&before, [10, 96, 0, 10]),
            &port(&after, [10, 96, 0, 10])
        ));
        let moved = Ipv4Addr::new(10, 244, 1, 4);
        assert!(Arc::ptr_eq(
            &before.workloads[&moved],
            &after.workloads[&moved]
        ));
        assert_eq!(endpoints(&after, [10, 96, 0, 10]), ["10.244.1.7:80"]);
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

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 50);

    fn target(state: &MeshState, dst: &str) -> (SocketAddrV4, Option<String>, Option<String>) {
        match state.resolve(dst.parse().expect("addr"), CLIENT) {
            Resolved::Endpoint {
                target,
                workload,
                service,
                ..
            } => (target, workload.map(|w| w.pod.clone()), service),
            other => panic!("{dst}: unexpected {other:?}"),
        }
    }

    #[test]
    fn service_resolves_round_robin_over_named_target_ports() {
        let state = state_from(CLUSTER);
        let picks: Vec<SocketAddrV4> = (0..4)
            .map(|_| {
                let (addr, _, service) = target(&state, "10.96.0.10:80");
                assert_eq!(service.as_deref(), Some("web.shop.svc.cluster.local"));
                addr
            })
            .collect();
        let a = "10.244.1.2:8080".parse().expect("addr");
        let b = "10.244.2.2:8081".parse().expect("addr");
        assert_eq!(picks, vec![a, b, a, b]);
    }

    #[test]
    fn only_running_pods_off_the_host_network_hold_an_identity() {
        let pod = |name: &str, ip: &str, extra_spec: &str, phase: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{nodeName: node-1{extra_spec}}}\nstatus: {{podIP: {ip}{phase}}}\n"
            )
        };
        let yaml = [
            pod("running", "10.244.1.20", "", ", phase: Running"),
            pod("unstated", "10.244.1.21", "", ""),
            pod("pending", "10.244.1.22", "", ", phase: Pending"),
            pod("done", "10.244.1.23", "", ", phase: Succeeded"),
            pod("failed", "10.244.1.24", "", ", phase: Failed"),
            pod(
                "host",
                "10.200.0.1",
                ", hostNetwork: true",
                ", phase: Running",
            ),
        ]
        .concat();
        let state = state_from(&yaml);
        let mut pods: Vec<&str> = state.workloads.values().map(|w| w.pod.as_str()).collect();
        pods.sort();
        assert_eq!(pods, ["running", "unstated"]);
    }

    #[test]
    fn opted_out_pods_are_not_meshed_and_empty_selectors_are_reported() {
        let state = state_from(CLUSTER);
        assert!(!state.workloads.contains_key(&Ipv4Addr::new(10, 244, 1, 9)));
        assert_eq!(state.local_workloads().count(), 1);
        assert!(matches!(
            state.resolve("10.96.0.11:80".parse().expect("addr"), CLIENT),
            Resolved::NoEndpoints { .. }
        ));
        assert_eq!(state.diagnostics.len(), 1);
        assert!(state.diagnostics[0]
            .message
            .contains("matches no running pod"));
    }

    #[test]
    fn by_default_only_pods_labelled_ambient_or_in_an_ambient_namespace_are_enrolled() {
        let yaml = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {istio.io/dataplane-mode: none}}
status: {podIP: 10.244.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: with-sidecar, namespace: shop, annotations: {sidecar.istio.io/status: '{}'}}
status: {podIP: 10.244.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: joined, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
status: {podIP: 10.244.1.6}
---
apiVersion: v1
kind: Pod
metadata: {name: unlisted-namespace, namespace: other}
status: {podIP: 10.244.1.7}
";
        let config = load_str(std::path::Path::new("test.yaml"), yaml);
        let enrolled_pods = |default_enrollment| {
            let settings = MeshSettings {
                default_enrollment,
                ..MeshSettings::default()
            };
            let state = MeshState::build_with("node-1", &config, &settings, &LbRegistry::default());
            let mut pods: Vec<String> = state.workloads.values().map(|w| w.pod.clone()).collect();
            pods.sort();
            pods
        };
        assert_eq!(enrolled_pods(DefaultEnrollment::None), ["joined", "web"]);
        assert_eq!(
            enrolled_pods(DefaultEnrollment::Ambient),
            ["joined", "old", "unlisted-namespace", "web"]
        );
    }

    #[test]
    fn a_service_resolves_to_its_ready_pods_outside_the_mesh_without_a_workload() {
        let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: legacy, labels: {app: api}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.2.8, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: api-old, namespace: legacy, labels: {app: api}}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.9, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: api-starting, namespace: legacy, labels: {app: api}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.2.10, phase: Running, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: legacy}
spec: {clusterIP: 10.96.0.20, selector: {app: api}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443, targetPort: 6443}]}
---
apiVersion: v1
kind: Service
metadata: {name: api-peers, namespace: legacy}
spec:
  clusterIP: 10.96.0.21
  selector: {app: api}
  publishNotReadyAddresses: true
  ports: [{port: 80, targetPort: http}]
";
        let config = load_str(std::path::Path::new("test.yaml"), yaml);
        let state = MeshState::build_with(
            "node-1",
            &config,
            &MeshSettings::default(),
            &LbRegistry::default(),
        );
        assert!(state.workloads.is_empty(), "nothing is enrolled");
        // Neither the finished pod nor the one that is not ready yet gets traffic.
        for _ in 0..3 {
            let (addr, workload, service) = target(&state, "10.96.0.20:80");
            assert_eq!(addr, "10.244.2.8:8080".parse().expect("addr"));
            assert_eq!(workload, None);
            assert_eq!(service.as_deref(), Some("api.legacy.svc.cluster.local"));
        }
        // A Service without a selector is not the mesh's to route: the Kubernetes API's
        // own Service passes uncaptured, to the node's Service routing.
        assert!(matches!(
            state.resolve("10.96.0.1:443".parse().expect("addr"), CLIENT),
            Resolved::Unknown
        ));
        assert!(!state.services.keys().any(|addr| addr.port() == 443));
        // Unless the Service publishes not-ready addresses.
        let mut peers: Vec<SocketAddrV4> =
            (0..4).map(|_| target(&state, "10.96.0.21:80").0).collect();
        peers.sort();
        peers.dedup();
        let expected: Vec<SocketAddrV4> = ["10.244.2.8:8080", "10.244.2.10:8080"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        assert_eq!(peers, expected);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
        let pod = |name: &str, ip: &str, terminating: bool, ready: bool| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: legacy, labels: {{app: api}}{}}}\n\
                 spec: {{nodeName: node-2, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: '{}'}}]}}\n---\n",
                if terminating { ", deletionTimestamp: '2026-12-03T08:00:00Z'" } else { "" },
                if ready { "True" } else { "False" },
            )
        };
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: legacy}\n\
            spec: {clusterIP: 10.96.0.20, selector: {app: api}, ports: [{port: 80, targetPort: http}]}\n";
        let endpoints = |pods: &str| -> Vec<String> {
            let config = load_str(std::path::Path::new("t.yaml"), &format!("{pods}{service}"));
            let state = MeshState::build_with(
                "node-1",
                &config,
                &MeshSettings::default(),
                &LbRegistry::default(),
            );
            let mut found: Vec<String> = state.services[&"10.96.0.20:80".parse().expect("addr")]
                .endpoints
                .iter()
                .map(|e| e.addr.ip().to_string())
                .collect();
            found.sort();
            found
        };
        let old = pod("old", "10.244.2.8", true, true);
        let new = pod("new", "10.244.2.9", false, true);
        // A pod being deleted leaves the rotation while another is ready.
        assert_eq!(endpoints(&format!("{old}{new}")), ["10.244.2.9"]);
        // With none ready, the terminating pods still serving take the traffic.
        let starting = pod("new", "10.244.2.9", false, false);
        assert_eq!(endpoints(&format!("{old}{starting}")), ["10.244.2.8"]);
        let stopping = pod("old", "10.244.2.8", true, false);
        assert!(endpoints(&format!("{stopping}{starting}")).is_empty());

        // The same from EndpointSlices, for a Service without a selector.
        let slice = |conditions: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: ext-1, namespace: legacy, labels: {{kubernetes.io/service-name: ext}}}}\n\
                 addressType: IPv4\nports: [{{name: '', port: 9000}}]\nendpoints:\n{conditions}---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: legacy}}\n\
                 spec: {{clusterIP: 10.96.0.30, ports: [{{port: 90, targetPort: 9000}}]}}\n"
            )
        };
        let slice_endpoints = |conditions: &str| -> Vec<String> {
            let config = load_str(std::path::Path::new("t.yaml"), &slice(conditions));
            let state = MeshState::build_with(
                "node-1",
                &config,
                &MeshSettings::default(),
                &LbRegistry::default(),
            );
            state.services[&"10.96.0.30:90".parse().expect("addr")]
                .endpoints
                .iter()
                .map(|e| e.addr.to_string())
                .collect()
        };
        let leaving = "- {addresses: [10.0.0.8], conditions: {ready: false, serving: true, terminating: true}}\n";
        let staying = "- {addresses: [10.0.0.9], conditions: {ready: true, serving: true, terminating: false}}\n";
        let gone = "- {addresses: [10.0.0.7], conditions: {ready: false, serving: false, terminating: true}}\n";
        assert_eq!(
            slice_endpoints(&format!("{leaving}{staying}")),
            ["10.0.0.9:9000"]
        );
        assert_eq!(
            slice_endpoints(&format!("{leaving}{gone}")),
            ["10.0.0.8:9000"]
        );
        assert!(slice_endpoints(gone).is_empty());
    }

    #[test]
    fn pod_address_resolves_to_itself_with_its_service() {
        let state = state_from(CLUSTER);
        let (_, pod, service) = target(&state, "10.244.2.2:8081");
        assert_eq!(pod.as_deref(), Some("web-b"));
        assert_eq!(service.as_deref(), Some("web.shop.svc.cluster.local"));
        assert!(matches!(
            state.resolve("10.244.9.9:80".parse().expect("addr"), CLIENT),
            Resolved::Unknown
        ));
    }

    const VERSIONS: &str = "
---
apiVersion: v1
kind: Pod
metadata: {name: api-v1, namespace: shop, labels: {app: api, version: v1}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v2, namespace: shop, labels: {app: api, version: v2}}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.20}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: api-vm, namespace: shop}
spec: {address: 10.200.0.99, labels: {app: api, version: v2}, ports: {http: 9090}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: shop}
spec:
  host: api
  trafficPolicy:
    loadBalancer:
      consistentHash: {useSourceIp: true}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
";

    #[test]
    fn workload_entries_join_services_and_destination_rules_set_policy_and_subsets() {
        let state = state_from(&format!("{CLUSTER}{VERSIONS}"));
        let api = state
            .services
            .get(&"10.96.0.20:80".parse().expect("addr"))
            .expect("api Service");
        assert_eq!(api.lb.policy, LbPolicy::ConsistentHash);
        let endpoints: Vec<String> = api.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            endpoints,
            ["10.244.1.20:8080", "10.244.2.20:8080", "10.200.0.99:9090"]
        );
        assert!(
            api.endpoints[2].workload.is_none(),
            "a WorkloadEntry is outside the mesh"
        );
        let sticky = target(&state, "10.96.0.20:80").0;
        for _ in 0..10 {
            assert_eq!(
                target(&state, "10.96.0.20:80").0,
                sticky,
                "source-IP hashing is sticky"
            );
        }
        assert_eq!(api.subsets["v2"].lb.policy, LbPolicy::RoundRobin);
        let v2: Vec<usize> = (0..4)
            .map(|_| match api.pick(CLIENT, Some("v2")) {
                Pick::Endpoint(index, _) => index,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(v2, [1, 2, 1, 2]);
        assert!(matches!(api.pick(CLIENT, Some("v3")), Pick::None));
    }

    #[test]
    fn hashing_on_requests_routes_the_host_without_a_virtual_service() {
        let hashed = VERSIONS.replace("useSourceIp: true", "httpHeaderName: x-user");
        let state = state_from(&format!("{CLUSTER}{hashed}"));
        let api = &state.services[&"10.96.0.20:80".parse().expect("addr")];
        let routes = state.http_routes(api, "shop").expect("the default route");
        assert_eq!(routes.http.len(), 1);
        assert_eq!(routes.http[0].name, "default");
        let by_source = state_from(&format!("{CLUSTER}{VERSIONS}"));
        let api = &by_source.services[&"10.96.0.20:80".parse().expect("addr")];
        assert!(
            by_source.http_routes(api, "shop").is_none(),
            "the source address is known per connection"
        );
    }

    #[test]
    fn localities_come_from_the_nodes_and_failover_stays_in_the_zone() {
        let yaml = "\
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z2}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1}
";
        let config = load_str(std::path::Path::new("test.yaml"), yaml);
        for (node, local) in [("node-1", "10.244.1.2:8080"), ("node-2", "10.244.2.2:8080")] {
            let state = MeshState::build_with(
                node,
                &config,
                &MeshSettings::default(),
                &LbRegistry::default(),
            );
            assert_eq!(
                state.place.locality.to_string(),
                if node == "node-1" { "r1/z1" } else { "r1/z2" }
            );
            for _ in 0..4 {
                assert_eq!(
                    target(&state, "10.96.0.10:80").0.to_string(),
                    local,
                    "{node}"
                );
            }
        }
    }

    #[test]
    fn service_entries_capture_their_addresses() {
        let state = state_from(&format!(
            "{CLUSTER}{VERSIONS}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: shop}}
spec:
  hosts: [db.internal]
  addresses: [10.97.0.5/32, 10.98.0.0/16]
  ports: [{{number: 5432, name: tcp-db, protocol: TCP}}]
  resolution: STATIC
  endpoints:
  - address: 10.200.0.50
  - address: 10.200.0.51
    ports: {{tcp-db: 6432}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: shop}}
spec:
  hosts: [legacy.internal]
  addresses: [10.97.0.6]
  ports: [{{number: 80, name: http}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api-alias, namespace: shop}}
spec:
  hosts: [api.internal]
  addresses: [10.97.0.7]
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  workloadSelector: {{labels: {{app: api, version: v1}}}}
"
        ));
        let picks: Vec<String> = (0..2)
            .map(|_| target(&state, "10.97.0.5:5432").0.to_string())
            .collect();
        assert_eq!(picks, ["10.200.0.50:5432", "10.200.0.51:6432"]);
        assert_eq!(
            target(&state, "10.97.0.5:5432").2.as_deref(),
            Some("db.internal")
        );
        assert!(state
            .diagnostics
            .iter()
            .any(|d| d.message.contains("10.98.0.0/16 is not captured")));
        let (passthrough, _, _) = target(&state, "10.97.0.6:80");
        assert_eq!(
            passthrough.to_string(),
            "10.97.0.6:80",
            "resolution NONE passes through"
        );
        let (selected, pod, _) = target(&state, "10.97.0.7:80");
        assert_eq!(
            (selected.to_string(), pod.as_deref()),
            ("10.244.1.20:8080".into(), Some("api-v1"))
        );
    }
}
