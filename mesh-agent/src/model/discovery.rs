//! Service discovery: the Service ports the mesh captures and their endpoints, from
//! Kubernetes Services (selected pods and WorkloadEntries) and ServiceEntries (their
//! addresses; inline endpoints or selected workloads), with the load-balancing policy and
//! subsets of the DestinationRule for each host, and its outlier detection and pool
//! limits per cluster.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    config::{
        istio::{DestinationRule, Resolution, ServiceEntry, ServiceEntryPort, WorkloadEntry},
        validate::fqdn,
        ClusterConfig, Diagnostic, EndpointSlice, Pod, Resource, Service, ServicePort, Severity,
        TargetPort,
    },
    model::{
        circuit::PoolLimits,
        destination_policy::{cluster_name, EffectivePolicy},
        entry_addresses::{resolves_by_dns, EntryAddresses, ResolvedNames},
        lb::{LbPolicy, LbSettings},
        locality::Locality,
        outlier::OutlierSettings,
        routing::HostRoutes,
        ClusterPolicy, Endpoint, MeshState, PortProtocol, ServiceName, ServicePortState, Workload,
    },
};

/// What one Kubernetes Service added to the state: its ports and its warnings.
#[derive(Debug, Clone, Default)]
pub struct BuiltService {
    ports: Vec<(SocketAddrV4, Arc<ServicePortState>)>,
    diagnostics: Vec<Diagnostic>,
}

/// The Services of the previous state a change to pods alone left as they were: those
/// selecting none of the pods that changed (before or after the change) and holding no
/// endpoint at their addresses. With 1,000 Services, a pod's change rebuilds the one or
/// two it belongs to instead of all of them.
pub struct UnchangedServices<'a> {
    pub built: &'a HashMap<(String, String), BuiltService>,
    /// The versions of the pods that changed: those gone and those new.
    pub changed_pods: Vec<&'a Pod>,
    pub changed_addresses: HashSet<Ipv4Addr>,
}

impl UnchangedServices<'_> {
    /// The previous build of `service`, known by `key` (its namespace and name), if kept.
    fn get(&self, key: &(String, String), service: &Service) -> Option<&BuiltService> {
        let namespace = key.0.as_str();
        let built = self.built.get(key)?;
        let selector = &service.spec.selector;
        let selects_a_changed_pod = !selector.is_empty()
            && self.changed_pods.iter().any(|pod| {
                pod.metadata.namespace() == namespace
                    && labels_match(selector, &pod.metadata.labels)
            });
        let holds_a_changed_address = built.ports.iter().any(|(_, port)| {
            port.endpoints
                .iter()
                .any(|e| self.changed_addresses.contains(e.addr.ip()))
        });
        (!selects_a_changed_pod && !holds_a_changed_address).then_some(built)
    }
}

pub fn add_services(
    state: &mut MeshState,
    config: &ClusterConfig,
    index: &ConfigIndex,
    allocated: &EntryAddresses,
    resolved: &ResolvedNames,
    unchanged: Option<&UnchangedServices>,
) {
    for service in &config.services {
        let key = (
            service.metadata.namespace().to_owned(),
            service.metadata.name.clone(),
        );
        let built = match unchanged.and_then(|unchanged| unchanged.get(&key, service)) {
            Some(built) => {
                for (address, port) in &built.ports {
                    state.services.insert(*address, port.clone());
                }
                state.diagnostics.extend(built.diagnostics.iter().cloned());
                built.clone()
            }
            None => {
                let warned = state.diagnostics.len();
                let ports = add_kubernetes_service(state, config, index, service)
                    .into_iter()
                    .filter_map(|address| Some((address, state.services.get(&address)?.clone())))
                    .collect();
                BuiltService {
                    ports,
                    diagnostics: state.diagnostics[warned..].to_vec(),
                }
            }
        };
        state.kubernetes_services.insert(key, built);
    }
    for entry in &config.istio.service_entries {
        add_service_entry(state, config, entry, allocated, resolved);
    }
}

/// Whether `labels` carry every label of `selector` (an empty one selects everything).
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn warn(state: &mut MeshState, resource: String, field: &str, message: String) {
    state.diagnostics.push(Diagnostic {
        severity: Severity::Warning,
        file: PathBuf::new(),
        line: None,
        resource: Some(resource),
        field: Some(field.into()),
        message,
    });
}

/// The DestinationRule for `hostname`: the one in the Service's namespace first (Istio's
/// lookup order puts the rule beside the Service before any other).
fn destination_rule<'a>(
    config: &'a ClusterConfig,
    hostname: &str,
    namespace: &str,
) -> Option<&'a Resource<DestinationRule>> {
    let rules = config.istio.destination_rules.iter();
    let mut matching: Vec<&Resource<DestinationRule>> = rules
        .filter(|dr| fqdn(&dr.spec.host, dr.namespace()) == hostname)
        .collect();
    matching.sort_by_key(|dr| dr.namespace() != namespace);
    matching.into_iter().next()
}

type Subsets = BTreeMap<String, (BTreeMap<String, String>, LbSettings)>;

/// The load balancing `rule` gives `subset` (none: the host) on `port`, merged as Istio
/// merges it (port-level settings included); `default` where it sets no policy.
fn lb_settings(
    rule: Option<&Resource<DestinationRule>>,
    subset: Option<&str>,
    port: u16,
    default: LbPolicy,
) -> LbSettings {
    let Some(rule) = rule else {
        return LbSettings::simple(default);
    };
    let effective = EffectivePolicy::resolve(&rule.spec, subset, port);
    LbSettings::from_istio(
        effective.load_balancer,
        default,
        effective.outlier_detection.is_some(),
    )
}

/// The host's load balancing on `port`, and each subset's with its labels.
fn policies(
    rule: Option<&Resource<DestinationRule>>,
    port: u16,
    default: LbPolicy,
) -> (LbSettings, Subsets) {
    let host = lb_settings(rule, None, port, default);
    let subsets = rule
        .map(|rule| {
            rule.spec
                .subsets
                .iter()
                .map(|s| {
                    let lb = lb_settings(Some(rule), Some(&s.name), port, default);
                    (s.name.clone(), (s.labels.clone(), lb))
                })
                .collect()
        })
        .unwrap_or_default();
    (host, subsets)
}

/// The locality of a pod on `node`.
fn locality_on(state: &MeshState, node: Option<&str>) -> Locality {
    node.and_then(|n| state.localities.get(n))
        .cloned()
        .unwrap_or_default()
}

/// The outlier detection and pool limits `rule` gives the host and each of its subsets on
/// this port; trackers carry their state over from the previous configuration. Values the
/// validator refuses never get here; a setting that does not translate is left out.
fn cluster_policies(
    state: &MeshState,
    rule: Option<&Resource<DestinationRule>>,
    port: &ServicePortState,
) -> BTreeMap<String, ClusterPolicy> {
    let Some(rule) = rule else {
        return BTreeMap::new();
    };
    let addresses: Vec<SocketAddrV4> = port.endpoints.iter().map(|e| e.addr).collect();
    let now = std::time::Instant::now();
    std::iter::once(None)
        .chain(rule.spec.subsets.iter().map(|s| Some(s.name.as_str())))
        .filter_map(|subset| {
            let effective = EffectivePolicy::resolve(&rule.spec, subset, port.port);
            let name = cluster_name(&port.hostname, subset, port.port);
            let outliers = effective
                .outlier_detection
                .and_then(|d| OutlierSettings::from_istio(d).ok())
                .map(|settings| {
                    state
                        .balancers
                        .outliers
                        .tracker(&name, settings, &addresses, now)
                });
            let limits = effective
                .connection_pool
                .and_then(|p| PoolLimits::from_istio(p).ok());
            (outliers.is_some() || limits.is_some()).then(|| {
                let policy = ClusterPolicy {
                    name,
                    outliers,
                    limits,
                };
                (subset.unwrap_or_default().to_owned(), policy)
            })
        })
        .collect()
}

/// A WorkloadEntry as an endpoint on `port_name`/`default_port`; `None` when its address
/// is not an IPv4 address.
fn entry_endpoint(
    state: &MeshState,
    entry: &WorkloadEntry,
    port_name: Option<&str>,
    default_port: u16,
) -> Option<Endpoint> {
    let ip: Ipv4Addr = entry.address.as_deref()?.parse().ok()?;
    Some(entry_endpoint_at(state, entry, ip, port_name, default_port))
}

/// A WorkloadEntry as an endpoint at `ip`, its address or one its name resolved to.
fn entry_endpoint_at(
    state: &MeshState,
    entry: &WorkloadEntry,
    ip: Ipv4Addr,
    port_name: Option<&str>,
    default_port: u16,
) -> Endpoint {
    let port = port_name
        .and_then(|name| entry.ports.get(name))
        .and_then(|p| u16::try_from(*p).ok())
        .unwrap_or(default_port);
    let workload = state.workloads.get(&ip).cloned();
    let locality = match &entry.locality {
        Some(path) => Locality::from_path(path),
        None => locality_on(state, workload.as_ref().map(|w| w.node.as_str())),
    };
    Endpoint {
        addr: SocketAddrV4::new(ip, port),
        workload,
        labels: entry.labels.clone(),
        locality,
    }
}

/// The endpoints of a ServiceEntry's WorkloadEntry: its address, or, given by name to a
/// `resolution: DNS` entry, what the name resolved to (none until it has).
fn entry_endpoints(
    state: &MeshState,
    entry: &WorkloadEntry,
    port_name: Option<&str>,
    default_port: u16,
    resolved: Option<&ResolvedNames>,
) -> Vec<Endpoint> {
    let Some(address) = entry.address.as_deref() else {
        return Vec::new();
    };
    let ips: Vec<Ipv4Addr> = match (address.parse::<Ipv4Addr>(), resolved) {
        (Ok(ip), _) => vec![ip],
        (Err(_), Some(resolved)) => resolved
            .get(&address.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
            .unwrap_or_default(),
        (Err(_), None) => Vec::new(),
    };
    ips.into_iter()
        .map(|ip| entry_endpoint_at(state, entry, ip, port_name, default_port))
        .collect()
}

/// A pod a Service selects.
struct SelectedPod {
    ip: Ipv4Addr,
    /// The pod's workload when it is in the mesh.
    workload: Option<Arc<Workload>>,
    labels: BTreeMap<String, String>,
    named_ports: BTreeMap<String, u16>,
    locality: Locality,
}

/// Pods by namespace and label, so that a selector finds its pods among those carrying
/// its rarest label rather than in a scan of every pod (10,000 pods × 1,000 Services
/// would otherwise cost ten million comparisons at every change); EndpointSlices by
/// their Service, for the same reason.
pub struct ConfigIndex<'a> {
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a Pod>>,
    /// By namespace, then Service name.
    slices: HashMap<&'a str, HashMap<&'a str, Vec<&'a EndpointSlice>>>,
}

impl<'a> ConfigIndex<'a> {
    pub fn of(config: &'a ClusterConfig) -> ConfigIndex<'a> {
        let mut by_label: HashMap<(&str, &str, &str), Vec<&Pod>> = HashMap::new();
        for pod in &config.pods {
            for (key, value) in &pod.metadata.labels {
                by_label
                    .entry((pod.metadata.namespace(), key, value))
                    .or_default()
                    .push(pod);
            }
        }
        let mut slices: HashMap<&str, HashMap<&str, Vec<&EndpointSlice>>> = HashMap::new();
        for slice in &config.endpoint_slices {
            if let (Some(service), "IPv4") = (slice.service(), slice.address_type.as_str()) {
                slices
                    .entry(slice.metadata.namespace())
                    .or_default()
                    .entry(service)
                    .or_default()
                    .push(slice);
            }
        }
        ConfigIndex { by_label, slices }
    }

    /// The IPv4 EndpointSlices of `service` (of its namespace, labelled with its name).
    pub fn slices_of(&self, service: &Service) -> &[&'a EndpointSlice] {
        self.slices
            .get(service.metadata.namespace())
            .and_then(|services| services.get(service.metadata.name.as_str()))
            .map_or(&[], Vec::as_slice)
    }

    /// The pods of `namespace` that `selector` (not empty) picks, in the order given.
    pub fn selected(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<&'a Pod> {
        let rarest = selector
            .iter()
            .map(|(key, value)| {
                self.by_label
                    .get(&(namespace, key.as_str(), value.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|pods| pods.len())
            .unwrap_or_default();
        rarest
            .iter()
            .copied()
            .filter(|pod| labels_match(selector, &pod.metadata.labels))
            .collect()
    }
}

fn add_kubernetes_service(
    state: &mut MeshState,
    config: &ClusterConfig,
    index: &ConfigIndex,
    service: &Service,
) -> Vec<SocketAddrV4> {
    let mut added = Vec::new();
    let Some(ip) = service
        .spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return added;
    };
    let namespace = service.metadata.namespace();
    let selector = &service.spec.selector;
    let slices = index.slices_of(service);
    // A Service without a selector (`default/kubernetes`, endpoints kept by another
    // controller or by hand) has its endpoints in its EndpointSlices; without any slice
    // it is left to the node's own Service routing, never captured with nowhere to go.
    if selector.is_empty() && slices.is_empty() {
        return added;
    }
    let hostname = format!("{}.{namespace}.svc.cluster.local", service.metadata.name);
    // Every running, ready pod the selector picks is an endpoint, as in the Service's
    // EndpointSlices: a meshed one with its workload, one outside the mesh (not enrolled,
    // host network) reached directly. A terminating pod is not ready; while still ready
    // it serves only when no pod is (as kube-proxy falls back to serving endpoints).
    let publish_not_ready = service.spec.publish_not_ready_addresses;
    let selected: Vec<&Pod> = if selector.is_empty() {
        Vec::new()
    } else {
        index
            .selected(namespace, selector)
            .into_iter()
            .filter(|pod| pod.running_address().is_some())
            .collect()
    };
    let ready: Vec<&Pod> = selected
        .iter()
        .copied()
        .filter(|pod| publish_not_ready || (pod.is_ready() && !pod.is_terminating()))
        .collect();
    let serving = if ready.is_empty() {
        selected
            .into_iter()
            .filter(|pod| pod.is_terminating() && pod.is_ready())
            .collect()
    } else {
        ready
    };
    let mut pods: Vec<SelectedPod> = serving
        .into_iter()
        .filter_map(|pod| {
            let ip = pod.running_address()?;
            Some(SelectedPod {
                ip,
                workload: state.workloads.get(&ip).cloned(),
                labels: pod.metadata.labels.clone(),
                named_ports: pod.named_ports(),
                locality: locality_on(state, pod.spec.node_name.as_deref()),
            })
        })
        .collect();
    pods.sort_by_key(|p| p.ip);
    pods.dedup_by_key(|p| p.ip);
    let entries: Vec<&Resource<WorkloadEntry>> = config
        .istio
        .workload_entries
        .iter()
        .filter(|we| {
            !selector.is_empty()
                && we.namespace() == namespace
                && labels_match(selector, &we.spec.labels)
        })
        .collect();
    let resource = format!("Service {namespace}/{}", service.metadata.name);
    if pods.is_empty() && entries.is_empty() && !selector.is_empty() {
        warn(
            state,
            resource,
            "spec.selector",
            "the selector matches no running pod with an address".into(),
        );
    }
    let rule = destination_rule(config, &hostname, namespace);
    for port in service
        .spec
        .ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
    {
        let mut endpoints: Vec<Endpoint> = pods
            .iter()
            .filter_map(|pod| {
                let target = target_port(port, &pod.named_ports)?;
                Some(Endpoint {
                    addr: SocketAddrV4::new(pod.ip, target),
                    workload: pod.workload.clone(),
                    labels: pod.labels.clone(),
                    locality: pod.locality.clone(),
                })
            })
            .collect();
        if selector.is_empty() {
            endpoints.extend(slice_endpoints(state, slices, port));
        }
        let default_port = match &port.target_port {
            Some(TargetPort::Number(n)) => *n,
            _ => port.port,
        };
        endpoints.extend(
            entries.iter().filter_map(|we| {
                entry_endpoint(state, &we.spec, port.name.as_deref(), default_port)
            }),
        );
        let name = ServiceName {
            namespace: namespace.to_owned(),
            name: service.metadata.name.clone(),
            hostname: hostname.clone(),
        };
        let address = SocketAddrV4::new(ip, port.port);
        let (lb, subsets) = policies(rule, port.port, LbPolicy::RoundRobin);
        let mut port_state = ServicePortState::new(
            name,
            address,
            endpoints,
            lb,
            subsets,
            &state.balancers,
            &state.place,
        );
        port_state.http = is_http(port);
        port_state.http2 = is_http2(port);
        port_state.protocol = PortProtocol::named(&declared_protocol(port));
        port_state.clusters = cluster_policies(state, rule, &port_state);
        port_state.default_routes = default_routes(&port_state);
        state.services.insert(address, Arc::new(port_state));
        added.push(address);
    }
    added
}

/// The ready IPv4 endpoints `slices` give for the Service port `port` (the slice port of
/// the same name), each once; a meshed pod's address with its workload.
fn slice_endpoints(
    state: &MeshState,
    slices: &[&EndpointSlice],
    port: &ServicePort,
) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    // The slices that carry the port, with its number there.
    let carrying: Vec<(&EndpointSlice, u16)> = slices
        .iter()
        .filter_map(|slice| {
            let number = slice
                .ports
                .iter()
                .find(|p| {
                    p.name.as_deref().unwrap_or_default()
                        == port.name.as_deref().unwrap_or_default()
                })
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .and_then(|p| p.port)?;
            Some((*slice, number))
        })
        .collect();
    // Terminating endpoints that still serve stand in only when none of the port is ready.
    let any_ready = carrying
        .iter()
        .flat_map(|(slice, _)| slice.endpoints.iter())
        .any(|e| e.is_ready());
    for (slice, number) in carrying {
        for endpoint in slice.endpoints.iter().filter(|e| {
            if any_ready {
                e.is_ready()
            } else {
                e.is_serving_terminating()
            }
        }) {
            for ip in endpoint
                .addresses
                .iter()
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
            {
                let addr = SocketAddrV4::new(ip, number);
                if endpoints.iter().any(|e| e.addr == addr) {
                    continue;
                }
                let workload = state.workloads.get(&ip).cloned();
                endpoints.push(Endpoint {
                    addr,
                    labels: workload
                        .as_ref()
                        .map(|w| w.labels.clone())
                        .unwrap_or_default(),
                    workload,
                    locality: locality_on(state, endpoint.node_name.as_deref()),
                });
            }
        }
    }
    endpoints
}

/// The default route of an HTTP port whose balancer hashes on requests.
fn default_routes(port: &ServicePortState) -> Option<Arc<HostRoutes>> {
    (port.http && port.hashes_requests())
        .then(|| Arc::new(HostRoutes::default_for(&port.hostname, &port.namespace)))
}

fn target_port(port: &ServicePort, named: &BTreeMap<String, u16>) -> Option<u16> {
    match &port.target_port {
        None => Some(port.port),
        Some(TargetPort::Number(n)) => Some(*n),
        Some(TargetPort::Name(name)) => named.get(name).copied(),
    }
}

/// Istio's explicit protocol selection: `appProtocol`, else the port name's prefix.
fn declared_protocol(port: &ServicePort) -> String {
    let declared = port
        .app_protocol
        .as_deref()
        .or(port.name.as_deref())
        .unwrap_or_default()
        .to_ascii_lowercase();
    declared.split('-').next().unwrap_or_default().to_owned()
}

fn is_http(port: &ServicePort) -> bool {
    matches!(
        declared_protocol(port).as_str(),
        "http" | "http2" | "grpc" | "grpc_web" | "kubernetes.io/h2c"
    )
}

/// Ports whose servers speak HTTP/2 (gRPC, h2c): routed requests reach them over HTTP/2,
/// whatever the client spoke; other HTTP ports get HTTP/1.1, as Istio's default
/// `h2UpgradePolicy` does.
fn is_http2(port: &ServicePort) -> bool {
    matches!(
        declared_protocol(port).as_str(),
        "http2" | "grpc" | "kubernetes.io/h2c"
    )
}

/// The Services with a selector, by namespace and one label of their selector: those
/// that may pick a workload are found among the Services under its own labels, not in a
/// scan of every Service for every workload.
#[derive(Debug, Default)]
pub struct SelectorIndex {
    /// Namespace → label key → label value → positions in the configuration's Services
    /// (nested, so that a workload's labels look it up without building a key).
    by_label: HashMap<String, HashMap<String, HashMap<String, Vec<usize>>>>,
}

impl SelectorIndex {
    pub fn of(services: &[Service]) -> SelectorIndex {
        let mut index = SelectorIndex::default();
        for (position, service) in services.iter().enumerate() {
            // Every label of a selector must match, so any one of them finds it.
            if let Some((key, value)) = service.spec.selector.iter().next() {
                index
                    .by_label
                    .entry(service.metadata.namespace().to_owned())
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default()
                    .push(position);
            }
        }
        index
    }

    /// The ports of `workload` that the Services of `config` (those this index was built
    /// from) selecting it declare as HTTP, HTTP/2 or gRPC.
    pub fn http_ports(&self, config: &ClusterConfig, workload: &Workload) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        let Some(by_key) = self.by_label.get(&workload.namespace) else {
            return ports;
        };
        for (key, value) in &workload.labels {
            let Some(positions) = by_key.get(key).and_then(|by_value| by_value.get(value)) else {
                continue;
            };
            for service in positions.iter().filter_map(|p| config.services.get(*p)) {
                if !labels_match(&service.spec.selector, &workload.labels) {
                    continue;
                }
                for port in service.spec.ports.iter().filter(|p| is_http(p)) {
                    if let Some(target) = target_port(port, &workload.named_ports) {
                        ports.insert(target);
                    }
                }
            }
        }
        ports
    }
}

/// The hosts of `entry` the mesh captures, each with its addresses: the entry's own
/// `addresses` for its first host, or else the address allocated to each host.
fn captured_hosts(
    state: &mut MeshState,
    entry: &Resource<ServiceEntry>,
    allocated: &EntryAddresses,
) -> Vec<(String, Vec<Ipv4Addr>)> {
    let namespace = entry.namespace();
    let spec = &entry.spec;
    if spec.addresses.is_empty() {
        return spec
            .hosts
            .iter()
            .filter_map(|host| {
                let ip = allocated.get(namespace, &fqdn(host, namespace))?;
                Some((host.clone(), vec![ip]))
            })
            .collect();
    }
    let Some(host) = spec.hosts.first() else {
        return Vec::new();
    };
    let mut addresses = Vec::new();
    for (i, block) in spec.addresses.iter().enumerate() {
        let single = block.0.strip_suffix("/32").unwrap_or(&block.0);
        match single.parse::<Ipv4Addr>() {
            Ok(ip) => addresses.push(ip),
            Err(_) => warn(
                state,
                entry.describe(),
                &format!("spec.addresses[{i}]"),
                format!(
                    "{} is not captured: only single IPv4 addresses are",
                    block.0
                ),
            ),
        }
    }
    if addresses.is_empty() {
        return Vec::new();
    }
    vec![(host.clone(), addresses)]
}

fn add_service_entry(
    state: &mut MeshState,
    config: &ClusterConfig,
    entry: &Resource<ServiceEntry>,
    allocated: &EntryAddresses,
    resolved: &ResolvedNames,
) {
    let namespace = entry.namespace();
    let spec = &entry.spec;
    let hosts = captured_hosts(state, entry, allocated);
    if hosts.is_empty() {
        return;
    }
    let by_dns = resolves_by_dns(spec).then_some(resolved);
    let selected_pods: Vec<_> = match &spec.workload_selector {
        Some(selector) => {
            let mut pods: Vec<_> = state
                .workloads
                .values()
                .filter(|w| w.namespace == namespace && labels_match(&selector.labels, &w.labels))
                .cloned()
                .collect();
            pods.sort_by_key(|w| w.ip);
            pods
        }
        None => Vec::new(),
    };
    let selected_entries: Vec<&WorkloadEntry> = match &spec.workload_selector {
        Some(selector) => config
            .istio
            .workload_entries
            .iter()
            .filter(|we| {
                we.namespace() == namespace && labels_match(&selector.labels, &we.spec.labels)
            })
            .map(|we| &we.spec)
            .collect(),
        None => spec.endpoints.iter().collect(),
    };
    for (i, we) in spec.endpoints.iter().enumerate() {
        let by_name = we
            .address
            .as_deref()
            .is_some_and(|a| a.parse::<Ipv4Addr>().is_err());
        if by_name && by_dns.is_none() {
            warn(
                state,
                entry.describe(),
                &format!("spec.endpoints[{i}].address"),
                "only IPv4 endpoint addresses are used; names are resolved with \
                 `resolution: DNS`"
                    .into(),
            );
        }
    }
    let no_endpoints = selected_pods.is_empty() && selected_entries.is_empty();
    // Without endpoints, a DNS entry's endpoints are its hosts themselves.
    let hosts_are_endpoints = no_endpoints && spec.workload_selector.is_none();
    let default_policy = if no_endpoints && spec.resolution.unwrap_or_default() == Resolution::None
    {
        LbPolicy::Passthrough
    } else {
        LbPolicy::RoundRobin
    };
    for port in &spec.ports {
        let Ok(number) = u16::try_from(port.number) else {
            continue;
        };
        let default_port = target_of(port).unwrap_or(number);
        let mut endpoints: Vec<Endpoint> = selected_pods
            .iter()
            .map(|w| Endpoint {
                addr: SocketAddrV4::new(w.ip, default_port),
                workload: Some(w.clone()),
                labels: w.labels.clone(),
                locality: locality_on(state, Some(&w.node)),
            })
            .collect();
        endpoints.extend(
            selected_entries.iter().flat_map(|we| {
                entry_endpoints(state, we, port.name.as_deref(), default_port, by_dns)
            }),
        );
        for (host, addresses) in &hosts {
            let hostname = fqdn(host, namespace);
            let mut endpoints = endpoints.clone();
            if let Some(resolved) = by_dns.filter(|_| hosts_are_endpoints) {
                let ips = resolved.get(&hostname.to_ascii_lowercase());
                endpoints.extend(ips.into_iter().flatten().map(|ip| Endpoint {
                    addr: SocketAddrV4::new(*ip, default_port),
                    workload: state.workloads.get(ip).cloned(),
                    labels: BTreeMap::new(),
                    locality: Locality::default(),
                }));
            }
            let rule = destination_rule(config, &hostname, namespace);
            let name = ServiceName {
                namespace: namespace.to_owned(),
                name: host.clone(),
                hostname,
            };
            for ip in addresses {
                let address = SocketAddrV4::new(*ip, number);
                let (lb, subsets) = policies(rule, number, default_policy);
                let mut port_state = ServicePortState::new(
                    name.clone(),
                    address,
                    endpoints.clone(),
                    lb,
                    subsets,
                    &state.balancers,
                    &state.place,
                );
                port_state.http = entry_port_is_http(port);
                port_state.protocol = PortProtocol::named(&entry_port_protocol(port));
                port_state.http2 = entry_port_protocol(port) != "http"
                    && port_state.http
                    && entry_port_protocol(port) != "grpc-web";
                port_state.clusters = cluster_policies(state, rule, &port_state);
                port_state.default_routes = default_routes(&port_state);
                state.services.insert(address, Arc::new(port_state));
            }
        }
    }
}

/// A ServiceEntry port's `protocol` (HTTP, HTTP2, GRPC), else its name's prefix.
fn entry_port_protocol(port: &ServiceEntryPort) -> String {
    let declared = port
        .protocol
        .as_deref()
        .or(port.name.as_deref())
        .unwrap_or_default()
        .to_ascii_lowercase();
    declared.split('-').next().unwrap_or_default().to_owned()
}

fn entry_port_is_http(port: &ServiceEntryPort) -> bool {
    matches!(
        entry_port_protocol(port).as_str(),
        "http" | "http2" | "grpc" | "grpc-web"
    )
}

fn target_of(port: &ServiceEntryPort) -> Option<u16> {
    port.target_port.and_then(|p| u16::try_from(p).ok())
}
