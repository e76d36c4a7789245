//! The Kubernetes objects the mesh reads: Node, Namespace, ServiceAccount, Pod, Service
//! (only the fields it uses; the rest of a Kubernetes object is accepted and ignored).

use std::{collections::BTreeMap, net::Ipv4Addr};

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
    /// Set once the object is being deleted (a pod then terminates: it may still run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

impl Pod {
    /// Whether the pod's address is its own identity: it runs (a pod without a phase, as
    /// written by hand for the directory source, is taken to), not on the node's network.
    /// A pending pod may not run yet, a finished one's address may already be another's.
    pub fn holds_its_address(&self) -> bool {
        !self.spec.host_network && self.is_running()
    }

    /// Whether the pod runs (or, without a phase, is taken to): only then is its address
    /// a Service endpoint.
    pub fn is_running(&self) -> bool {
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        phase.is_none_or(|p| p == "Running")
    }

    /// Whether the kubelet reports the pod Ready (its readiness probes pass): only a ready
    /// pod gets a Service's traffic. A pod without the condition (hand-written YAML)
    /// counts as ready.
    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.kind == "Ready"))
            .is_none_or(|ready| ready.status == "True")
    }

    /// Whether the pod is being deleted: Kubernetes takes it out of its Services' ready
    /// endpoints, and keeps it as a serving one only while it is ready.
    pub fn is_terminating(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    /// The pod's address while it runs.
    pub fn running_address(&self) -> Option<std::net::Ipv4Addr> {
        if !self.is_running() {
            return None;
        }
        self.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
    }

    /// Named container ports, for a Service's `targetPort` by name.
    pub fn named_ports(&self) -> BTreeMap<String, u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect()
    }
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
    /// A pod on the node's network has the node's address: never a workload's identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
    /// With `subdomain` naming a headless Service of the pod's namespace, the pod's own
    /// DNS name is `hostname.subdomain.namespace.svc.cluster.local` (a StatefulSet's
    /// pods get both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
}

impl Container {
    /// The ports the kubelet probes, named ports resolved against this container's.
    pub fn probe_ports(&self) -> impl Iterator<Item = u16> + '_ {
        [
            &self.liveness_probe,
            &self.readiness_probe,
            &self.startup_probe,
        ]
        .into_iter()
        .flatten()
        .flat_map(|probe| [&probe.http_get, &probe.tcp_socket, &probe.grpc])
        .flatten()
        .filter_map(|action| match &action.port {
            TargetPort::Number(port) => Some(*port),
            TargetPort::Name(name) => self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        })
    }
}

/// A kubelet probe; the mesh reads only where it connects.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<ProbeAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<ProbeAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<ProbeAction>,
}

/// The port of a probe's `httpGet`, `tcpSocket` or `grpc` action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeAction {
    pub port: TargetPort,
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PodCondition>,
}

/// A condition the kubelet reports on a pod; the mesh reads `Ready`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
}

/// An EndpointSlice (`discovery.k8s.io/v1`): where a Service without a selector sends
/// its traffic (`default/kubernetes`, endpoints kept by another controller or by hand).
/// The mesh reads the slices of selector-less Services only; a Service with a selector
/// has its endpoints from the pods it selects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Vec<SlicePort>,
}

/// The label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    /// The Service (of the slice's namespace) it belongs to.
    pub fn service(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: SliceConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The endpoint's own name under a headless Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl SliceEndpoint {
    /// Ready, as Kubernetes reads an absent condition: unknown counts as ready.
    pub fn is_ready(&self) -> bool {
        self.conditions.ready != Some(false)
    }

    /// Terminating but still serving: used only when a Service has no ready endpoint.
    pub fn is_serving_terminating(&self) -> bool {
        self.conditions.terminating == Some(true)
            && self.conditions.serving.unwrap_or(self.is_ready())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SliceConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SlicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
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
    /// Pods that are not ready are endpoints too (for peers that must find each other
    /// before they are ready).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_not_ready_addresses: bool,
    /// `ClusterIP` (the default), `NodePort`, `LoadBalancer` or `ExternalName`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
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

pub fn validate_pod(pod: &Pod) -> Result<(), String> {
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        ip.parse::<Ipv4Addr>()
            .map_err(|_| format!("`status.podIP`: {ip:?} is not an IPv4 address"))?;
    }
    Ok(())
}

pub fn validate_service(service: &Service) -> Result<(), String> {
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
