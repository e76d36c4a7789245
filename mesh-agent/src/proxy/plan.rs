//! The proxy's decisions, apart from its I/O: for a connection captured leaving a local
//! pod, or an HBONE `CONNECT` arriving from another agent, and the mesh state of the
//! moment, what to do — which endpoint, which workload, how to carry the bytes (spliced
//! in the kernel, copied, served as HTTP, tunnelled, straight), and the facts and decision
//! of the destination's policies. The functions here read the state and the load
//! balancers and nothing else; `outbound` and `inbound` carry the plans out.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use http::{Method, Request, StatusCode};
use mesh_common::TUNNEL_PORT;

use crate::{
    identity::spiffe::SpiffeId,
    model::{
        circuit::{BudgetKey, PoolLimits},
        lb::ActiveGuard,
        peerauth::Effective,
        routing::{choose_random, HostRoutes, WeightedDestination},
        MeshState, Pick, PortProtocol, Resolved, ServicePortState, Workload,
    },
    policy::{
        authz::Decision,
        facts::{admit, Admission, Arrival, Peer},
    },
    proxy::client_hello::{read_hello, Hello},
};

/// Why a captured connection cannot be carried anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{client} → {original_dst}: the source is not a meshed pod of this node")]
    NotLocalSource {
        client: SocketAddrV4,
        original_dst: SocketAddrV4,
    },
    #[error("{client} → {original_dst}: Service {service} has no ready endpoint")]
    NoEndpoints {
        client: SocketAddrV4,
        original_dst: SocketAddrV4,
        service: String,
    },
    #[error("node {node} of {pod} has no known address")]
    NoNodeAddress { pod: String, node: String },
}

/// How the bytes of a connection delivered on this node are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Spliced in the kernel (same node, no L7 work, splicing allowed).
    Splice,
    /// Copied through the agent.
    Copy,
    /// Served as HTTP, each request judged.
    Http,
    /// Served as HTTP if the client's first bytes open a request ([`opens_http`]), else
    /// copied.
    Sniff,
}

/// Whether a connection whose first bytes are `first` opens an HTTP request: a method
/// token (capital letters; the HTTP/2 preface starts with `PRI`) then a space. `None`
/// while too few bytes have come to tell.
pub fn opens_http(first: &[u8]) -> Option<bool> {
    const LONGEST_METHOD: usize = 20;
    for (at, byte) in first.iter().enumerate() {
        match byte {
            b' ' => return Some(at > 0),
            b'A'..=b'Z' if at < LONGEST_METHOD => {}
            _ => return Some(false),
        }
    }
    None
}

/// What the first bytes of a captured connection showed, when they were read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Not read: nothing in the plan depends on them.
    NotRead,
    /// An HTTP/1 request line or the HTTP/2 preface.
    Http,
    /// A TLS ClientHello, with the server name it asks for, if any.
    Tls(Option<String>),
    /// Anything else, or nothing within the sniffing timeout (a server-first protocol).
    Other,
}

/// What `first`, the bytes a client sent so far, opens with; `None` while too few have
/// come to tell.
pub fn opening_of(first: &[u8]) -> Option<Opening> {
    match read_hello(first) {
        Hello::ClientHello { sni } => Some(Opening::Tls(sni)),
        Hello::Incomplete => None,
        Hello::NotTls => Some(match opens_http(first)? {
            true => Opening::Http,
            false => Opening::Other,
        }),
    }
}

/// Whether a connection from `client` to `original_dst` has its first bytes read before
/// it is planned ([`Opening`]): only when a VirtualService visible to the client gives
/// the Service routes that depend on them — `http` or `tls` routes on a port that
/// declares no protocol, `tls` routes on a port declared TLS. Every other connection
/// keeps its fast path, with no wait for the client's first bytes.
pub fn reads_opening(state: &MeshState, client: SocketAddrV4, original_dst: SocketAddrV4) -> bool {
    let (Some(source), Some(service)) = (
        state.workloads.get(client.ip()),
        state.services.get(&original_dst),
    ) else {
        return false;
    };
    let Some(routes) = state.routes.for_host(&service.hostname, &source.namespace) else {
        return false;
    };
    match service.protocol {
        PortProtocol::Undeclared => !routes.http.is_empty() || !routes.tls.is_empty(),
        PortProtocol::Tls => !routes.tls.is_empty(),
        PortProtocol::Http | PortProtocol::Opaque => false,
    }
}

/// What the source agent does with a captured connection.
#[derive(Debug)]
pub enum Route {
    /// A pod of this node, reached as the original client under its policies.
    Local { arrival: Arc<Arrival>, carry: Carry },
    /// PeerAuthentication DISABLE: the workload is reached in plaintext from this node,
    /// which applies its policies (it would see no mesh identity).
    Plaintext { arrival: Arc<Arrival>, carry: Carry },
    /// Over HBONE to the agent of the destination's node, as the source's identity.
    Tunnel {
        agent: SocketAddrV4,
        source: SpiffeId,
        destination: SpiffeId,
    },
    /// An endpoint outside the mesh, reached directly from this node.
    Direct,
    /// Refused on L4 facts: the client is reset.
    Deny { arrival: Arc<Arrival> },
    /// An HTTP port of a Service a VirtualService routes: served request by request, each
    /// routed on its own.
    Routed {
        service: Arc<ServicePortState>,
        routes: Arc<HostRoutes>,
    },
}

/// The plan for one captured connection.
#[derive(Debug)]
pub struct OutboundPlan {
    /// The endpoint: the original destination, or the Service endpoint chosen.
    pub target: SocketAddrV4,
    /// The meshed pod at `target`; `None` outside the mesh.
    pub destination: Option<Arc<Workload>>,
    /// The Service (hostname) the client addressed or whose endpoint it reached.
    pub service: Option<String>,
    pub source: Arc<Workload>,
    pub route: Route,
    /// The connection-time decision of the destination's policies, when it has any.
    pub decision: Option<Decision>,
    /// Counts the connection as active on its endpoint (LEAST_REQUEST) while held.
    pub active: Option<ActiveGuard>,
    /// The connection pool settings of the destination cluster of a TCP flow to a
    /// Service, when a DestinationRule gives them.
    pub pool: Option<TcpPool>,
}

/// A DestinationRule's `connectionPool` as a plain TCP flow to its cluster meets it: the
/// source pod's budget there (`tcp.maxConnections`) and the limits.
#[derive(Debug, Clone)]
pub struct TcpPool {
    pub key: BudgetKey,
    pub limits: PoolLimits,
}

impl TcpPool {
    /// The settings of `service`'s cluster (of `subset`) for a connection from `source`;
    /// `None` when no DestinationRule gives it a `connectionPool`.
    fn of(source: &Workload, service: &ServicePortState, subset: Option<&str>) -> Option<TcpPool> {
        let cluster = service.cluster(subset)?;
        Some(TcpPool {
            key: BudgetKey {
                source: source.key(),
                cluster: cluster.name.clone(),
            },
            limits: cluster.limits?,
        })
    }
}

impl OutboundPlan {
    /// Whether the connection crosses nodes over mutual TLS.
    pub fn mutual_tls(&self) -> bool {
        matches!(self.route, Route::Tunnel { .. })
    }
}

/// Settings of this agent that plans depend on.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub trust_domain: String,
    /// In-kernel splicing is enabled and loaded.
    pub kernel_splice: bool,
}

fn spiffe_id(trust_domain: &str, workload: &Workload) -> SpiffeId {
    SpiffeId::new(trust_domain, &workload.namespace, &workload.service_account)
}

/// Plans a connection from `client` (a pod of this node) to `original_dst` that opened
/// with `opening` ([`Opening::NotRead`] unless [`reads_opening`] asked for it).
pub fn plan_outbound(
    state: &MeshState,
    settings: &PlanSettings,
    client: SocketAddrV4,
    original_dst: SocketAddrV4,
    opening: &Opening,
) -> Result<OutboundPlan, PlanError> {
    let source = state
        .workloads
        .get(client.ip())
        .filter(|_| state.is_local(*client.ip()))
        .cloned()
        .ok_or(PlanError::NotLocalSource {
            client,
            original_dst,
        })?;
    if let Some(routed) = routed(state, settings, &source, client, original_dst, opening)? {
        return Ok(routed);
    }
    let (target, destination, service, active) = match state.resolve(original_dst, *client.ip()) {
        Resolved::Endpoint {
            target,
            workload,
            service,
            guard,
        } => (target, workload, service, guard),
        Resolved::NoEndpoints { service } => {
            return Err(PlanError::NoEndpoints {
                client,
                original_dst,
                service,
            })
        }
        // Outside the mesh: the kernel hands such connections over only when its maps are
        // incomplete (`SETTING_CAPTURE_UNKNOWN`), and they go on as they would have.
        Resolved::Unknown => (original_dst, None, None, None),
    };
    let pool = state
        .services
        .get(&original_dst)
        .and_then(|addressed| TcpPool::of(&source, addressed, None));
    let (route, decision) = plan_endpoint(
        state,
        settings,
        &source,
        *client.ip(),
        target,
        destination.as_ref(),
    )?;
    Ok(OutboundPlan {
        target,
        destination,
        service,
        source,
        route,
        decision,
        active,
        pool,
    })
}

/// A connection to a Service a VirtualService routes: a port declared HTTP, or one
/// declaring nothing that opened with HTTP, is served request by request
/// ([`Route::Routed`]) when there are `http` routes; a TLS opening takes the `tls` route
/// its server name matches, else (and any other connection) the `tcp` route that matches,
/// which picks the connection's destination by weight — Istio's TLS ports fall back on
/// `tcp` routes likewise. `None` when no VirtualService route applies.
fn routed(
    state: &MeshState,
    settings: &PlanSettings,
    source: &Arc<Workload>,
    client: SocketAddrV4,
    original_dst: SocketAddrV4,
    opening: &Opening,
) -> Result<Option<OutboundPlan>, PlanError> {
    let Some(service) = state.services.get(&original_dst) else {
        return Ok(None);
    };
    let Some(routes) = state.http_routes(service, &source.namespace) else {
        return Ok(None);
    };
    let speaks_http = match service.protocol {
        PortProtocol::Http => true,
        PortProtocol::Undeclared => *opening == Opening::Http,
        PortProtocol::Tls | PortProtocol::Opaque => false,
    };
    if speaks_http && !routes.http.is_empty() {
        return Ok(Some(OutboundPlan {
            target: original_dst,
            destination: None,
            service: Some(service.hostname.clone()),
            source: source.clone(),
            route: Route::Routed {
                service: service.clone(),
                routes: routes.clone(),
            },
            decision: None,
            active: None,
            pool: None,
        }));
    }
    let sni = match (opening, service.protocol) {
        (Opening::Tls(sni), PortProtocol::Tls | PortProtocol::Undeclared) => Some(sni.as_deref()),
        _ => None,
    };
    let tls_rule = sni.and_then(|sni| routes.select_tls(source, original_dst, sni));
    let destinations = match tls_rule {
        Some(rule) => &rule.destinations,
        None => match routes.select_tcp(source, original_dst) {
            Some(rule) => &rule.destinations,
            None => return Ok(None),
        },
    };
    let Some(destination) = choose_random(destinations) else {
        return Ok(None);
    };
    to_destination(state, settings, source, client, original_dst, destination).map(Some)
}

/// A connection a `tls` or `tcp` route sends to `destination`: an endpoint of its host
/// (and subset) by the host's balancer, reached as any endpoint is.
fn to_destination(
    state: &MeshState,
    settings: &PlanSettings,
    source: &Arc<Workload>,
    client: SocketAddrV4,
    original_dst: SocketAddrV4,
    destination: &WeightedDestination,
) -> Result<OutboundPlan, PlanError> {
    let no_endpoints = || PlanError::NoEndpoints {
        client,
        original_dst,
        service: destination.host.clone(),
    };
    let chosen = state
        .service_port(&destination.host, destination.port, original_dst.port())
        .ok_or_else(no_endpoints)?;
    match chosen.pick(*client.ip(), destination.subset.as_deref()) {
        Pick::Endpoint(index, guard) => {
            let endpoint = &chosen.endpoints[index];
            let (route, decision) = plan_endpoint(
                state,
                settings,
                source,
                *client.ip(),
                endpoint.addr,
                endpoint.workload.as_ref(),
            )?;
            Ok(OutboundPlan {
                target: endpoint.addr,
                destination: endpoint.workload.clone(),
                service: Some(chosen.hostname.clone()),
                source: source.clone(),
                route,
                decision,
                active: Some(guard),
                pool: TcpPool::of(source, chosen, destination.subset.as_deref()),
            })
        }
        Pick::Passthrough | Pick::None => Err(no_endpoints()),
    }
}

/// How the source agent reaches `target` (the meshed pod `destination`, or an address
/// outside the mesh) for `source`, and the connection-time decision of the destination's
/// policies when they are judged here.
pub fn plan_endpoint(
    state: &MeshState,
    settings: &PlanSettings,
    source: &Workload,
    client_ip: Ipv4Addr,
    target: SocketAddrV4,
    destination: Option<&Arc<Workload>>,
) -> Result<(Route, Option<Decision>), PlanError> {
    let trust_domain = settings.trust_domain.as_str();
    let mut decision = None;
    let route = match destination {
        None => Route::Direct,
        Some(pod) => {
            let local = pod.node == state.node;
            if !tunnelled(state, pod, target.port()) {
                let arrival = Arc::new(Arrival::new(
                    state,
                    trust_domain,
                    client_ip,
                    Peer::Pod(source),
                    pod.clone(),
                    target,
                    None,
                ));
                let (admission, judged) = admit(&arrival);
                decision = judged;
                let splice = local && settings.kernel_splice && pod.may_be_spliced();
                let carry = match admission {
                    Admission::Deny => Carry::Copy,
                    Admission::Http => Carry::Http,
                    Admission::Sniff => Carry::Sniff,
                    Admission::Tcp if splice => Carry::Splice,
                    Admission::Tcp => Carry::Copy,
                };
                match (admission, local) {
                    (Admission::Deny, _) => Route::Deny { arrival },
                    (_, true) => Route::Local { arrival, carry },
                    (_, false) => Route::Plaintext { arrival, carry },
                }
            } else {
                let agent_ip = state.node_ip(pod).ok_or_else(|| PlanError::NoNodeAddress {
                    pod: pod.key(),
                    node: pod.node.clone(),
                })?;
                Route::Tunnel {
                    agent: SocketAddrV4::new(agent_ip, TUNNEL_PORT),
                    source: spiffe_id(trust_domain, source),
                    destination: spiffe_id(trust_domain, pod),
                }
            }
        }
    };
    Ok((route, decision))
}

/// Whether a connection to `pod`'s `port` crosses to its node over HBONE (mutual TLS):
/// not when the pod is on this node, nor when its PeerAuthentication disables mutual TLS.
pub fn tunnelled(state: &MeshState, pod: &Workload, port: u16) -> bool {
    let disabled = state
        .mtls
        .get(&pod.ip)
        .is_some_and(|m| m.for_port(port) == Effective::Disable);
    pod.node != state.node && !disabled
}

/// The `CONNECT` header by which the source agent says it speaks HTTP on the stream.
pub const PROTOCOL_HEADER: &str = "x-mesh-protocol";

/// What a source agent asks of a destination agent in an HBONE `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    /// The pod address and port to reach.
    pub target: SocketAddrV4,
    /// The original client, whose address the destination pod must see.
    pub client: SocketAddrV4,
    /// The Service the client addressed, when it addressed one.
    pub service: Option<String>,
    /// The source agent speaks HTTP on the stream: the upstream of requests it routed.
    /// The destination then judges it request by request whatever it knows of the port
    /// yet: a stream planned for bytes while the Service that declares the port HTTP has
    /// not reached this node would carry every later request of the pooled upstream
    /// connection unjudged and uncounted.
    pub http: bool,
}

impl TunnelRequest {
    /// Reads a `CONNECT`: `:authority` is the target, `Forwarded: for="ip:port"` the
    /// client, `X-Mesh-Service` the Service, `X-Mesh-Protocol: http` a routed request's
    /// upstream. `None` for anything else.
    pub fn parse<B>(request: &Request<B>) -> Option<TunnelRequest> {
        if request.method() != Method::CONNECT {
            return None;
        }
        let target = request.uri().authority()?.as_str().parse().ok()?;
        let client = request
            .headers()
            .get("forwarded")?
            .to_str()
            .ok()?
            .strip_prefix("for=\"")?
            .strip_suffix('"')?
            .parse()
            .ok()?;
        let service = request
            .headers()
            .get("x-mesh-service")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let http = request
            .headers()
            .get(PROTOCOL_HEADER)
            .is_some_and(|v| v == "http");
        Some(TunnelRequest {
            target,
            client,
            service,
            http,
        })
    }
}

/// An HBONE stream the destination agent refuses, and how it answers.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    /// The `reason` label of `mesh_tunnel_refusals_total`.
    pub reason: &'static str,
    pub message: String,
    /// The policies' decision, when they refused it.
    pub denied: Option<Box<(Arc<Arrival>, Decision)>>,
}

impl Refusal {
    /// 403 for identities that do not add up (no policy decided it).
    fn forbidden(reason: &'static str, message: String) -> Refusal {
        Refusal {
            status: StatusCode::FORBIDDEN,
            reason,
            message,
            denied: None,
        }
    }
}

/// The plan for an HBONE stream this agent accepts.
#[derive(Debug)]
pub struct InboundPlan {
    pub arrival: Arc<Arrival>,
    /// `Copy` or `Http` (splicing is for same-node flows).
    pub carry: Carry,
    pub decision: Option<Decision>,
}

/// Plans an HBONE stream from the peer agent at `peer_agent` that proved `peer` over a
/// TLS session made to `local` (the identity its SNI named).
pub fn plan_inbound(
    state: &MeshState,
    trust_domain: &str,
    local: &SpiffeId,
    peer: &SpiffeId,
    peer_agent: Ipv4Addr,
    sni: Option<String>,
    request: &TunnelRequest,
) -> Result<InboundPlan, Refusal> {
    let TunnelRequest {
        target,
        client,
        http,
        ..
    } = *request;
    let workload = state
        .workloads
        .get(target.ip())
        .filter(|w| w.node == state.node)
        .cloned()
        .ok_or_else(|| Refusal {
            status: StatusCode::NOT_FOUND,
            reason: "unknown_destination",
            message: format!("{target} is not a meshed pod of this node"),
            denied: None,
        })?;
    let identity = spiffe_id(trust_domain, &workload);
    if identity != *local {
        return Err(Refusal::forbidden(
            "wrong_destination_identity",
            format!("{target} is {identity}, but the connection was made to {local}"),
        ));
    }
    // The peer's certificate must be the identity of the workload at the address it
    // claims to connect from.
    let client_workload = state.workloads.get(client.ip());
    let claimed = client_workload.map(|w| spiffe_id(trust_domain, w));
    if claimed.as_ref() != Some(peer) {
        return Err(Refusal::forbidden(
            "wrong_source_identity",
            format!(
                "peer {peer} claims to carry {client}, which is {}",
                claimed.map_or("no meshed workload".into(), |c| c.to_string())
            ),
        ));
    }
    // And the agent carrying it must be the one of that workload's node: a node's agent
    // holds certificates of its own pods' identities only, so another node's agent with
    // a pod of the same service account cannot speak for this address.
    let client_node = client_workload.and_then(|w| state.node_ip(w));
    if client_node != Some(peer_agent) {
        return Err(Refusal::forbidden(
            "wrong_source_node",
            format!(
                "the agent at {peer_agent} claims to carry {client}, whose node is {}",
                client_node.map_or("unknown".into(), |ip| ip.to_string())
            ),
        ));
    }
    let peer_id = peer.to_string();
    let arrival = Arrival::new(
        state,
        trust_domain,
        *client.ip(),
        Peer::MutualTls(&peer_id),
        workload,
        target,
        sni,
    );
    let arrival = Arc::new(if http { arrival.as_http() } else { arrival });
    let (admission, decision) = admit(&arrival);
    let carry = match admission {
        Admission::Deny => {
            let reason = decision.as_ref().map_or_else(String::new, Decision::reason);
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                reason: "policy_denied",
                message: format!("{client} → {target}: {reason}"),
                denied: decision.map(|decision| Box::new((arrival, decision))),
            });
        }
        Admission::Http => Carry::Http,
        Admission::Sniff => Carry::Sniff,
        Admission::Tcp => Carry::Copy,
    };
    Ok(InboundPlan {
        arrival,
        carry,
        decision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    const TD: &str = "cluster.local";

    const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.200.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.200.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: near, namespace: shop, labels: {app: near}}
spec: {nodeName: node-a, serviceAccountName: near}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: near-copied, namespace: shop, labels: {app: near-copied, mesh/splice: \"false\"}}
spec: {nodeName: node-a}
status: {podIP: 10.244.1.21}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: shop, labels: {app: far}}
spec: {nodeName: node-b, serviceAccountName: far}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Pod
metadata: {name: remote-client, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: client}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: far}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: near, namespace: shop}
spec: {clusterIP: 10.96.0.21, selector: {app: near}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.internal]
  addresses: [10.97.0.6]
  ports: [{number: 80, name: http}]
  resolution: NONE
";

    const CLIENT: &str = "10.244.1.10:40000";

    /// An AuthorizationPolicy of the `shop` namespace on the `near` pod.
    fn policy_on_near(name: &str, rules: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: near}}}}\n{rules}"
        )
    }

    /// The address of node-b, where the HBONE client pod 10.244.2.10 runs.
    const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);

    fn mesh(extra: &str) -> MeshState {
        let yaml = format!("{CLUSTER}{extra}");
        let config = load_str(std::path::Path::new("plan.yaml"), &yaml);
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        MeshState::build("node-a", &config)
    }

    fn settings(kernel_splice: bool) -> PlanSettings {
        PlanSettings {
            trust_domain: TD.into(),
            kernel_splice,
        }
    }

    fn plan_to(state: &MeshState, dst: &str) -> Result<OutboundPlan, PlanError> {
        plan_outbound(
            state,
            &settings(true),
            CLIENT.parse().expect("client"),
            dst.parse().expect("destination"),
            &Opening::NotRead,
        )
    }

    fn carry_of(plan: &OutboundPlan) -> Option<Carry> {
        match &plan.route {
            Route::Local { carry, .. } | Route::Plaintext { carry, .. } => Some(*carry),
            _ => None,
        }
    }

    #[test]
    fn a_same_node_pod_without_policies_is_spliced_unless_labelled_or_disabled() {
        let state = mesh("");
        let plan = plan_to(&state, "10.244.1.20:8080").expect("plan");
        assert!(matches!(plan.route, Route::Local { .. }));
        assert_eq!(carry_of(&plan), Some(Carry::Splice));
        assert_eq!(plan.target.to_string(), "10.244.1.20:8080");
        assert!(!plan.mutual_tls());

        let copied = plan_to(&state, "10.244.1.21:8080").expect("plan");
        assert_eq!(carry_of(&copied), Some(Carry::Copy), "mesh/splice: false");

        let no_splicing = plan_outbound(
            &state,
            &settings(false),
            CLIENT.parse().expect("client"),
            "10.244.1.20:8080".parse().expect("destination"),
            &Opening::NotRead,
        )
        .expect("plan");
        assert_eq!(carry_of(&no_splicing), Some(Carry::Copy));
    }

    #[test]
    fn a_pod_on_another_node_is_tunnelled_as_the_source_identity() {
        let state = mesh("");
        let plan = plan_to(&state, "10.244.2.20:8080").expect("plan");
        match &plan.route {
            Route::Tunnel {
                agent,
                source,
                destination,
            } => {
                assert_eq!(agent.to_string(), "10.200.0.2:15008");
                assert_eq!(
                    source.to_string(),
                    "spiffe://cluster.local/ns/shop/sa/client"
                );
                assert_eq!(
                    destination.to_string(),
                    "spiffe://cluster.local/ns/shop/sa/far"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(plan.mutual_tls());
        assert_eq!(plan.service.as_deref(), Some("far.shop.svc.cluster.local"));
    }

    #[test]
    fn a_service_address_resolves_to_an_endpoint_and_keeps_the_service() {
        let state = mesh("");
        let plan = plan_to(&state, "10.96.0.20:80").expect("plan");
        assert_eq!(plan.target.to_string(), "10.244.2.20:8080");
        assert_eq!(
            plan.destination.as_ref().map(|w| w.pod.as_str()),
            Some("far")
        );
        assert_eq!(plan.service.as_deref(), Some("far.shop.svc.cluster.local"));
        assert!(plan.active.is_some(), "the endpoint counts the connection");
        assert!(matches!(plan.route, Route::Tunnel { .. }));

        let local = plan_to(&state, "10.96.0.21:80").expect("plan");
        assert_eq!(local.target.to_string(), "10.244.1.20:8080");
        assert_eq!(carry_of(&local), Some(Carry::Splice));
    }

    #[test]
    fn a_service_entry_without_endpoints_passes_through_directly() {
        let state = mesh("");
        let plan = plan_to(&state, "10.97.0.6:80").expect("plan");
        assert!(matches!(plan.route, Route::Direct));
        assert_eq!(plan.target.to_string(), "10.97.0.6:80");
        assert!(plan.destination.is_none());
        assert_eq!(plan.service.as_deref(), Some("legacy.internal"));
    }

    #[test]
    fn peer_authentication_disable_reaches_the_workload_in_plaintext_without_identity() {
        let state = mesh(
            "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: off, namespace: shop}
spec: {selector: {matchLabels: {app: far}}, mtls: {mode: DISABLE}}
",
        );
        let plan = plan_to(&state, "10.244.2.20:8080").expect("plan");
        match &plan.route {
            Route::Plaintext { arrival, carry } => {
                assert_eq!(*carry, Carry::Copy, "never spliced across nodes");
                assert_eq!(
                    arrival.facts.source_principal, None,
                    "plaintext has no identity"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(!plan.mutual_tls());
    }

    #[test]
    fn a_same_node_source_is_judged_with_its_identity() {
        let state = mesh(&policy_on_near(
            "only-client",
            "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n",
        ));
        let plan = plan_to(&state, "10.244.1.20:8080").expect("plan");
        match &plan.route {
            Route::Local { arrival, carry } => {
                assert_eq!(*carry, Carry::Splice);
                assert_eq!(
                    arrival.facts.source_principal.as_deref(),
                    Some("cluster.local/ns/shop/sa/client")
                );
            }
            other => panic!("{other:?}"),
        }
        let decided = plan.decision.and_then(|d| d.decided_by).expect("decided");
        assert_eq!(decided.policy, "shop/only-client");
    }

    #[test]
    fn a_connection_denied_on_l4_facts_is_refused_before_any_byte() {
        let state = mesh(&policy_on_near(
            "no-client",
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n",
        ));
        let plan = plan_to(&state, "10.96.0.21:80").expect("plan");
        assert!(matches!(plan.route, Route::Deny { .. }), "{:?}", plan.route);
        let decided = plan.decision.and_then(|d| d.decided_by).expect("decided");
        assert_eq!(decided.policy, "shop/no-client");
    }

    fn needs_method() -> String {
        policy_on_near(
            "get-only",
            "  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
        )
    }

    #[test]
    fn a_policy_on_request_attributes_makes_an_http_port_be_served_as_http() {
        let state = mesh(&needs_method());
        let plan = plan_to(&state, "10.244.1.20:8080").expect("plan");
        assert_eq!(carry_of(&plan), Some(Carry::Http));
    }

    #[test]
    fn request_attributes_on_a_port_that_is_not_http_settle_the_connection_as_tcp() {
        let state = mesh(&needs_method());
        // 9000 is declared by no Service: no request will be parsed there, so the ALLOW
        // rule on GET cannot match and nothing else allows: denied, not parsed.
        let plan = plan_to(&state, "10.244.1.20:9000").expect("plan");
        assert!(matches!(plan.route, Route::Deny { .. }), "{:?}", plan.route);

        let deny = mesh(&policy_on_near(
            "no-post",
            "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
        ));
        let plan = plan_to(&deny, "10.244.1.20:9000").expect("plan");
        assert!(
            matches!(plan.route, Route::Deny { .. }),
            "a DENY rule needing a request fails closed on TCP"
        );
        let plan = plan_to(&deny, "10.244.1.20:8080").expect("plan");
        assert_eq!(carry_of(&plan), Some(Carry::Http));
    }

    #[test]
    fn claims_in_headers_make_a_port_not_declared_http_be_sniffed() {
        let jwt = |outputs: &str| {
            format!(
                "---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: near-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: near}}}}
  jwtRules: [{{issuer: issuer.example, jwks: '{{\"keys\": []}}'{outputs}}}]
"
            )
        };
        for outputs in [
            ", outputPayloadToHeader: x-jwt",
            ", outputClaimToHeaders: [{header: x-sub, claim: sub}]",
        ] {
            let state = mesh(&jwt(outputs));
            let plan = plan_to(&state, "10.244.1.20:9000").expect("plan");
            assert_eq!(
                carry_of(&plan),
                Some(Carry::Sniff),
                "{outputs}: never spliced"
            );
            let plan = plan_to(&state, "10.244.1.20:8080").expect("plan");
            assert_eq!(
                carry_of(&plan),
                Some(Carry::Http),
                "{outputs}: declared HTTP"
            );
        }
        // Tokens checked but no claim handed on: nothing to forge on other ports.
        let state = mesh(&jwt(""));
        let plan = plan_to(&state, "10.244.1.20:9000").expect("plan");
        assert_eq!(carry_of(&plan), Some(Carry::Splice));
    }

    /// Two pods behind one Service port that declares no protocol (`web`), a subset each,
    /// and a VirtualService on it with `routes` (YAML under `spec:`).
    fn sniffed_service(routes: &str) -> String {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: back-a, namespace: shop, labels: {{app: back, version: a}}}}
spec: {{nodeName: node-b, serviceAccountName: back}}
status: {{podIP: 10.244.2.30}}
---
apiVersion: v1
kind: Pod
metadata: {{name: back-b, namespace: shop, labels: {{app: back, version: b}}}}
spec: {{nodeName: node-b, serviceAccountName: back}}
status: {{podIP: 10.244.2.31}}
---
apiVersion: v1
kind: Service
metadata: {{name: back, namespace: shop}}
spec:
  clusterIP: 10.96.0.30
  selector: {{app: back}}
  ports: [{{name: web, port: 443, targetPort: 8443}}, {{name: tls, port: 8443}}, {{name: http-x, port: 80}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: back, namespace: shop}}
spec:
  host: back
  subsets: [{{name: a, labels: {{version: a}}}}, {{name: b, labels: {{version: b}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: back, namespace: shop}}
spec:
  hosts: [back]
{routes}"
        )
    }

    const SNI_ROUTES: &str = "  tls:
  - match: [{sniHosts: [a.example]}]
    route: [{destination: {host: back, subset: a}}]
  - match: [{sniHosts: ['*.b.example', b.example]}]
    route: [{destination: {host: back, subset: b}}]
";

    fn opened(state: &MeshState, dst: &str, opening: Opening) -> OutboundPlan {
        plan_outbound(
            state,
            &settings(true),
            CLIENT.parse().expect("client"),
            dst.parse().expect("destination"),
            &opening,
        )
        .expect("plan")
    }

    fn reads(state: &MeshState, dst: &str) -> bool {
        reads_opening(
            state,
            CLIENT.parse().expect("client"),
            dst.parse().expect("destination"),
        )
    }

    #[test]
    fn only_ports_whose_routes_depend_on_the_first_bytes_have_them_read() {
        let http_routes = "  http:\n  - route: [{destination: {host: back, subset: a}}]\n";
        let state = mesh(&sniffed_service(http_routes));
        assert!(reads(&state, "10.96.0.30:443"), "undeclared, http routes");
        assert!(!reads(&state, "10.96.0.30:80"), "declared HTTP: no wait");
        assert!(!reads(&state, "10.96.0.30:8443"), "TLS without tls routes");
        assert!(!reads(&state, "10.96.0.20:80"), "no VirtualService");
        assert!(!reads(&state, "10.244.2.30:8443"), "a pod address");
        let state = mesh(&sniffed_service(SNI_ROUTES));
        assert!(reads(&state, "10.96.0.30:443"), "undeclared, tls routes");
        assert!(reads(&state, "10.96.0.30:8443"), "declared TLS, tls routes");
        assert!(!reads(&state, "10.96.0.30:80"), "declared HTTP");
        let tcp_routes = "  tcp:\n  - route: [{destination: {host: back, subset: a}}]\n";
        let state = mesh(&sniffed_service(tcp_routes));
        assert!(
            !reads(&state, "10.96.0.30:443"),
            "tcp routes need no first bytes"
        );
    }

    #[test]
    fn an_undeclared_port_opened_with_http_is_routed_and_other_bytes_go_on_as_tcp() {
        let routes = "  http:\n  - route: [{destination: {host: back, subset: a}}]\n";
        let state = mesh(&sniffed_service(routes));
        let http = opened(&state, "10.96.0.30:443", Opening::Http);
        assert!(
            matches!(http.route, Route::Routed { .. }),
            "{:?}",
            http.route
        );
        for opening in [Opening::Other, Opening::Tls(Some("a.example".into()))] {
            let plan = opened(&state, "10.96.0.30:443", opening.clone());
            assert!(matches!(plan.route, Route::Tunnel { .. }), "{opening:?}");
            assert_eq!(plan.service.as_deref(), Some("back.shop.svc.cluster.local"));
        }
    }

    #[test]
    fn a_tls_opening_goes_where_its_server_name_routes_it() {
        let state = mesh(&sniffed_service(SNI_ROUTES));
        for port in [443, 8443] {
            let dst = format!("10.96.0.30:{port}");
            for (sni, target) in [
                ("a.example", "10.244.2.30"),
                ("b.example", "10.244.2.31"),
                ("x.b.example", "10.244.2.31"),
            ] {
                for _ in 0..4 {
                    let plan = opened(&state, &dst, Opening::Tls(Some(sni.into())));
                    assert_eq!(plan.target.ip().to_string(), target, "{sni} on {port}");
                    assert!(matches!(plan.route, Route::Tunnel { .. }));
                }
            }
        }
        // No route for the name (or no name): the Service as it is, both endpoints.
        let mut targets = std::collections::BTreeSet::new();
        for _ in 0..4 {
            for opening in [Opening::Tls(Some("c.example".into())), Opening::Tls(None)] {
                targets.insert(opened(&state, "10.96.0.30:443", opening).target.to_string());
            }
        }
        assert_eq!(
            targets.into_iter().collect::<Vec<_>>(),
            ["10.244.2.30:8443", "10.244.2.31:8443"]
        );
    }

    #[test]
    fn the_opening_is_told_from_the_first_bytes() {
        assert_eq!(opening_of(b"GET / HTTP/1.1\r\n"), Some(Opening::Http));
        assert_eq!(opening_of(b"PRI * HTTP/2.0\r\n"), Some(Opening::Http));
        assert_eq!(opening_of(b"GE"), None);
        assert_eq!(opening_of(b""), None);
        assert_eq!(opening_of(b"\x16\x03"), None, "a hello under way");
        assert_eq!(opening_of(b"SSH-2.0-x"), Some(Opening::Other));
        assert_eq!(opening_of(b"\0\0\0\x08"), Some(Opening::Other));
    }

    #[test]
    fn the_first_bytes_tell_an_http_request_from_other_protocols() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST ",
            b"PRI * HTTP/2.0\r\n",
            b"M-SEARCH",
        ] {
            let expected = if http.starts_with(b"M-") {
                Some(false)
            } else {
                Some(true)
            };
            assert_eq!(
                opens_http(http),
                expected,
                "{}",
                String::from_utf8_lossy(http)
            );
        }
        for other in [
            &b"\x16\x03\x01"[..],
            b"SSH-2.0",
            b" GET",
            b"get /",
            b"\0\0",
            b"HELLO\n",
        ] {
            assert_eq!(opens_http(other), Some(false), "{other:?}");
        }
        for undecided in [&b""[..], b"G", b"OPTIONS", b"ABCDEFGHIJKLMNOPQRS"] {
            assert_eq!(opens_http(undecided), None, "{undecided:?}");
        }
        assert_eq!(
            opens_http(b"ABCDEFGHIJKLMNOPQRSTU "),
            Some(false),
            "no method is that long"
        );
    }

    #[test]
    fn a_rate_limited_http_port_is_served_as_http_and_other_ports_are_not() {
        let state = mesh(
            "---
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: near, namespace: shop}
spec: {targetRef: {kind: Service, name: near}, total: {requestsPerSecond: 10}}
",
        );
        let plan = plan_to(&state, "10.244.1.20:8080").expect("plan");
        assert_eq!(carry_of(&plan), Some(Carry::Http));
        let plan = plan_to(&state, "10.244.1.20:9000").expect("plan");
        assert_eq!(carry_of(&plan), Some(Carry::Splice), "not an HTTP port");
        let plan = plan_to(&state, "10.244.2.20:8080").expect("plan");
        assert!(
            matches!(plan.route, Route::Tunnel { .. }),
            "far is not limited"
        );
    }

    #[test]
    fn an_audit_rule_on_request_attributes_does_not_make_a_connection_be_parsed() {
        let state = mesh(&policy_on_near(
            "audit-posts",
            "  action: AUDIT\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
        ));
        let plan = plan_to(&state, "10.244.1.20:8080").expect("plan");
        assert_eq!(carry_of(&plan), Some(Carry::Splice));
    }

    #[test]
    fn connections_that_cannot_be_carried_say_why_and_those_outside_the_mesh_go_direct() {
        let state = mesh(
            "---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 10.96.0.30, selector: {app: nothing}, ports: [{port: 80}]}
",
        );
        assert!(matches!(
            plan_to(&state, "10.96.0.30:80"),
            Err(PlanError::NoEndpoints { .. })
        ));
        let outside = plan_to(&state, "10.9.9.9:80").expect("a destination outside the mesh");
        assert!(matches!(outside.route, Route::Direct));
        assert_eq!(outside.target, "10.9.9.9:80".parse().expect("address"));
        assert!(outside.destination.is_none() && outside.decision.is_none());
        let from_elsewhere = plan_outbound(
            &state,
            &settings(true),
            "10.244.2.10:40000".parse().expect("client"),
            "10.244.1.20:8080".parse().expect("destination"),
            &Opening::NotRead,
        );
        assert!(matches!(
            from_elsewhere,
            Err(PlanError::NotLocalSource { .. })
        ));
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TD, "shop", sa)
    }

    fn connect(target: &str, client: &str) -> TunnelRequest {
        TunnelRequest {
            target: target.parse().expect("target"),
            client: client.parse().expect("client"),
            service: None,
            http: false,
        }
    }

    #[test]
    fn an_hbone_stream_is_checked_against_both_identities() {
        let state = mesh("");
        let request = connect("10.244.1.20:8080", "10.244.2.10:5000");
        let plan = plan_inbound(
            &state,
            TD,
            &id("near"),
            &id("client"),
            NODE_B,
            None,
            &request,
        )
        .expect("accepted");
        assert_eq!(plan.carry, Carry::Copy);
        assert_eq!(
            plan.arrival.facts.source_principal.as_deref(),
            Some("cluster.local/ns/shop/sa/client")
        );
        let refused = |local: &str, peer: &str, request: &TunnelRequest| {
            plan_inbound(&state, TD, &id(local), &id(peer), NODE_B, None, request)
                .expect_err("refused")
                .reason
        };
        assert_eq!(
            refused("far", "client", &request),
            "wrong_destination_identity"
        );
        assert_eq!(refused("near", "far", &request), "wrong_source_identity");
        assert_eq!(
            refused(
                "far",
                "client",
                &connect("10.244.2.20:8080", "10.244.2.10:5000")
            ),
            "unknown_destination",
            "a pod of another node is not delivered from here"
        );
        // The right certificate, carried by an agent that is not the client's node's.
        for agent in [Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 0, 9)] {
            let refusal = plan_inbound(
                &state,
                TD,
                &id("near"),
                &id("client"),
                agent,
                None,
                &request,
            )
            .expect_err("refused");
            assert_eq!(
                (refusal.status, refusal.reason),
                (StatusCode::FORBIDDEN, "wrong_source_node")
            );
            assert_eq!(
                refusal.message,
                format!("the agent at {agent} claims to carry 10.244.2.10:5000, whose node is 10.200.0.2")
            );
        }
    }

    #[test]
    fn a_routed_requests_stream_is_judged_per_request_on_a_port_not_yet_declared_http() {
        let state = mesh(&policy_on_near(
            "gets",
            "  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
        ));
        let plan = |http: bool| {
            let request = TunnelRequest {
                http,
                ..connect("10.244.1.20:9090", "10.244.2.10:5000")
            };
            plan_inbound(
                &state,
                TD,
                &id("near"),
                &id("client"),
                NODE_B,
                None,
                &request,
            )
        };
        // Bytes to a port no Service declares HTTP: a rule on methods cannot match them.
        assert_eq!(plan(false).expect_err("denied").reason, "policy_denied");
        assert_eq!(plan(true).expect("accepted").carry, Carry::Http);
    }

    #[test]
    fn an_hbone_stream_denied_by_policy_is_refused_with_403() {
        let state = mesh(
            "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nobody, namespace: shop}
spec: {selector: {matchLabels: {app: near}}}
",
        );
        let refusal = plan_inbound(
            &state,
            TD,
            &id("near"),
            &id("client"),
            NODE_B,
            None,
            &connect("10.244.1.20:8080", "10.244.2.10:5000"),
        )
        .expect_err("denied");
        assert_eq!(
            (refusal.status, refusal.reason),
            (StatusCode::FORBIDDEN, "policy_denied")
        );
    }

    #[test]
    fn connect_requests_are_read_from_authority_and_forwarded() {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.244.1.20:8080")
            .header("forwarded", "for=\"10.244.2.10:5000\"")
            .header("x-mesh-service", "near.shop.svc.cluster.local")
            .body(())
            .expect("request");
        let parsed = TunnelRequest::parse(&request).expect("parsed");
        assert!(!parsed.http);
        assert_eq!(parsed.target.to_string(), "10.244.1.20:8080");
        assert_eq!(parsed.client.to_string(), "10.244.2.10:5000");
        assert_eq!(
            parsed.service.as_deref(),
            Some("near.shop.svc.cluster.local")
        );
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://10.244.1.20:8080/")
            .body(())
            .expect("request");
        assert_eq!(TunnelRequest::parse(&get), None);
        let unnamed = Request::builder()
            .method(Method::CONNECT)
            .uri("10.244.1.20:8080")
            .body(())
            .expect("request");
        assert_eq!(TunnelRequest::parse(&unnamed), None, "no Forwarded");
        let routed = Request::builder()
            .method(Method::CONNECT)
            .uri("10.244.1.20:8080")
            .header("forwarded", "for=\"10.244.2.10:5000\"")
            .header(PROTOCOL_HEADER, "http")
            .body(())
            .expect("request");
        assert!(TunnelRequest::parse(&routed).expect("parsed").http);
    }
}
