//! The verdicts the kernel enforces: what each destination's AuthorizationPolicies decide
//! for new connections from each local pod on L4 facts alone, so that tc drops denied
//! SYNs before the agent sees them, and which connections between two pods of the node
//! need nothing of the agent, so that tc lets the kernel carry them alone.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use crate::{
    model::{MeshState, Workload},
    policy::facts::{admit, Admission, Arrival, Peer},
};

/// What becomes of a new connection from a local pod, decided before the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelAction {
    /// The destination's policies deny it on L4 facts: the SYN is dropped.
    Deny,
    /// The agent carries it (the default, and what the kernel does without a verdict).
    Agent,
    /// The kernel carries it to the pod alone: same node, allowed on L4 facts, and no
    /// request to read, no token or rate limit of the agent's.
    Direct,
}

/// One verdict for the kernel's policy map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVerdict {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    /// 0: every port without an entry of its own.
    pub port: u16,
    pub action: KernelAction,
}

/// The verdicts of every local pod towards every workload with policies (per port that
/// matters, and for all other ports), towards every pod of the node when `bypass` lets
/// the kernel carry connections alone, and towards Service ports all of whose endpoints
/// deny it. A source–destination pair's verdicts are adjacent, pairs with a `Direct`
/// verdict last (see [`whole_pairs_within`]).
pub fn kernel_verdicts(state: &MeshState, trust_domain: &str, bypass: bool) -> Vec<KernelVerdict> {
    let sources: Vec<&Arc<Workload>> = state.local_workloads().collect();
    let mut pairs: Vec<Vec<KernelVerdict>> = Vec::new();
    let mut decided: HashMap<(Ipv4Addr, Ipv4Addr, u16), KernelAction> = HashMap::new();
    for destination in state.workloads.values() {
        let security = state.security_of(destination.ip);
        let may_bypass = bypass && bypass_allowed_towards(state, destination);
        if security.policies.is_empty() && !may_bypass {
            continue;
        }
        let mut ports: BTreeSet<u16> = security
            .policies
            .iter()
            .flat_map(|p| p.named_ports())
            .collect();
        ports.extend(destination.named_ports.values());
        ports.extend(&security.http_ports);
        // Ports whose mutual TLS mode differs from the workload's: the source's identity
        // may count there and not on the other ports.
        ports.extend(
            state
                .mtls
                .get(&destination.ip)
                .into_iter()
                .flat_map(|m| m.ports.keys().copied()),
        );
        for source in sources.iter().filter(|s| s.ip != destination.ip) {
            let direct = may_bypass && bypass_allowed_from(state, source);
            let action =
                |port| kernel_action(state, trust_domain, direct, source, destination, port);
            let verdict = |port, action| KernelVerdict {
                source: source.ip,
                destination: destination.ip,
                port,
                action,
            };
            let other = action(0);
            let mut pair = Vec::new();
            if other != KernelAction::Agent {
                pair.push(verdict(0, other));
            }
            for &port in &ports {
                let own = action(port);
                if own != other {
                    pair.push(verdict(port, own));
                }
            }
            for v in &pair {
                decided.insert((v.source, v.destination, v.port), v.action);
            }
            if !pair.is_empty() {
                pairs.push(pair);
            }
        }
    }
    let action_at = |source: Ipv4Addr, target: &SocketAddrV4| {
        decided
            .get(&(source, *target.ip(), target.port()))
            .or_else(|| decided.get(&(source, *target.ip(), 0)))
            .copied()
            .unwrap_or(KernelAction::Agent)
    };
    for service in state.services.values() {
        let all_meshed =
            !service.endpoints.is_empty() && service.endpoints.iter().all(|e| e.workload.is_some());
        if !all_meshed {
            continue;
        }
        for source in &sources {
            let all_deny = service
                .endpoints
                .iter()
                .all(|e| action_at(source.ip, &e.addr) == KernelAction::Deny);
            if all_deny {
                pairs.push(vec![KernelVerdict {
                    source: source.ip,
                    destination: service.cluster_ip,
                    port: service.port,
                    action: KernelAction::Deny,
                }]);
            }
        }
    }
    // Stable: pairs keep the order they were found in within each kind.
    pairs.sort_by_key(|pair| pair.iter().any(|v| v.action == KernelAction::Direct));
    pairs.into_iter().flatten().collect()
}

/// Whether the kernel may carry connections to `destination` alone: a pod of this node
/// whose labels let it.
fn bypass_allowed_towards(state: &MeshState, destination: &Workload) -> bool {
    destination.node == state.node && destination.may_bypass_the_agent()
}

/// Whether the kernel may carry connections from `source` alone: a pod of this node.
fn bypass_allowed_from(state: &MeshState, source: &Workload) -> bool {
    source.node == state.node
}

/// What becomes of a new connection from `source` to `destination`'s `port` (0: a port
/// with no verdict of its own) before the agent sees it; `Direct` only where `direct`.
fn kernel_action(
    state: &MeshState,
    trust_domain: &str,
    direct: bool,
    source: &Arc<Workload>,
    destination: &Arc<Workload>,
    port: u16,
) -> KernelAction {
    let arrival = Arrival::new(
        state,
        trust_domain,
        source.ip,
        Peer::Pod(source),
        destination.clone(),
        SocketAddrV4::new(destination.ip, port),
        None,
    );
    match admit(&arrival).0 {
        Admission::Deny => KernelAction::Deny,
        Admission::Tcp if direct => KernelAction::Direct,
        _ => KernelAction::Agent,
    }
}

/// Whether a new connection from `source` to the pod `destination`'s `port` (addressed
/// to the pod) is carried by the kernel alone, with `bypass` on: what
/// [`kernel_verdicts`] writes for it, for `meshctl policy check`.
pub fn carried_by_the_kernel(
    state: &MeshState,
    trust_domain: &str,
    bypass: bool,
    source: &Arc<Workload>,
    destination: &Arc<Workload>,
    port: u16,
) -> bool {
    let direct = bypass
        && source.ip != destination.ip
        && bypass_allowed_towards(state, destination)
        && bypass_allowed_from(state, source);
    direct
        && kernel_action(state, trust_domain, direct, source, destination, port)
            == KernelAction::Direct
}

/// The longest prefix of `verdicts` (as [`kernel_verdicts`] orders them) that fits in
/// `room` entries without splitting a source–destination pair: a pair's port entries
/// only mean what they should together (a `Direct` all-ports entry without the port that
/// needs the agent would carry that port's connections past its L7 policy), while a pair
/// left out altogether is carried by the agent, which judges it in full. Pairs that let
/// the kernel carry connections come last, so they are the first left out.
pub fn whole_pairs_within(verdicts: &[KernelVerdict], room: usize) -> &[KernelVerdict] {
    if verdicts.len() <= room {
        return verdicts;
    }
    let mut end = room;
    while end > 0 {
        let (last, next) = (&verdicts[end - 1], &verdicts[end]);
        if (last.source, last.destination) != (next.source, next.destination) {
            break;
        }
        end -= 1;
    }
    &verdicts[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const INTRUDER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    /// Two local sources, `shop/client` and `other/intruder`, beside `cluster`.
    fn state_of(cluster: &str) -> MeshState {
        let config = load_str(
            std::path::Path::new("kernel.yaml"),
            &format!(
                "apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop}}
spec: {{nodeName: node-1, serviceAccountName: client}}
status: {{podIP: 10.244.1.10}}
---
apiVersion: v1
kind: Pod
metadata: {{name: intruder, namespace: other}}
spec: {{nodeName: node-1, serviceAccountName: intruder}}
status: {{podIP: 10.244.1.11}}
---
{cluster}"
            ),
        );
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        MeshState::build("node-1", &config)
    }

    /// The verdicts of the two sources, sorted.
    fn all_verdicts(cluster: &str, bypass: bool) -> Vec<KernelVerdict> {
        let mut verdicts = kernel_verdicts(&state_of(cluster), "cluster.local", bypass);
        verdicts.sort_by_key(|v| (v.source, v.destination, v.port));
        verdicts
    }

    /// The verdicts with the kernel carrying nothing alone.
    fn verdicts(cluster: &str) -> Vec<KernelVerdict> {
        all_verdicts(cluster, false)
    }

    fn verdict(source: Ipv4Addr, destination: [u8; 4], port: u16, deny: bool) -> KernelVerdict {
        KernelVerdict {
            source,
            destination: destination.into(),
            port,
            action: if deny {
                KernelAction::Deny
            } else {
                KernelAction::Agent
            },
        }
    }

    /// The verdicts towards `destination` with the kernel allowed to carry connections.
    fn bypass_verdicts(cluster: &str, destination: [u8; 4]) -> Vec<KernelVerdict> {
        let destination = Ipv4Addr::from(destination);
        all_verdicts(cluster, true)
            .into_iter()
            .filter(|v| v.destination == destination)
            .collect()
    }

    fn direct(
        source: Ipv4Addr,
        destination: [u8; 4],
        port: u16,
        action: KernelAction,
    ) -> KernelVerdict {
        KernelVerdict {
            source,
            destination: destination.into(),
            port,
            action,
        }
    }

    const PLAIN: &str = "apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop, labels: {app: plain}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.1.20}
";

    /// A Service declaring plain's 8080 HTTP.
    const PLAIN_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: plain}, ports: [{name: http, port: 80, targetPort: 8080}]}
";

    #[test]
    fn the_kernel_carries_same_node_connections_that_need_nothing_of_the_agent() {
        use KernelAction::*;
        let plain = [10, 244, 1, 20];
        assert_eq!(
            bypass_verdicts(PLAIN, plain),
            [
                direct(CLIENT, plain, 0, Direct),
                direct(INTRUDER, plain, 0, Direct)
            ]
        );
        // Not a pod of another node, nor one labelled out.
        let remote = PLAIN.replace("node-1", "node-2");
        assert_eq!(bypass_verdicts(&remote, plain), []);
        let opted_out = PLAIN.replace("{app: plain}", "{app: plain, mesh/bypass: \"false\"}");
        assert_eq!(bypass_verdicts(&opted_out, plain), []);
        let copied = PLAIN.replace("{app: plain}", "{app: plain, mesh/splice: \"false\"}");
        assert_eq!(bypass_verdicts(&copied, plain), []);
        // Without bypass the same pod has no verdict at all.
        assert_eq!(verdicts(PLAIN), []);
    }

    #[test]
    fn a_port_with_l7_work_stays_with_the_agent_and_denied_sources_are_dropped() {
        use KernelAction::*;
        let plain = [10, 244, 1, 20];
        // shop may reach plain's 9000; GET on 8080 (HTTP by its Service) is judged per
        // request.
        let l7 = format!(
            "{PLAIN}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: plain, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: plain}}}}
  rules:
  - from: [{{source: {{namespaces: [shop]}}}}]
    to: [{{operation: {{ports: [\"9000\"]}}}}]
  - from: [{{source: {{namespaces: [shop]}}}}]
    to: [{{operation: {{ports: [\"8080\"], methods: [GET]}}}}]
---
{PLAIN_SERVICE}"
        );
        assert_eq!(
            bypass_verdicts(&l7, plain),
            [
                direct(CLIENT, plain, 0, Deny),
                direct(CLIENT, plain, 8080, Agent),
                direct(CLIENT, plain, 9000, Direct),
                direct(INTRUDER, plain, 0, Deny),
            ]
        );
        // A token rule on the HTTP port, a rate limit, or every request reported there:
        // that port stays with the agent, the others go direct.
        // meshctl policy check says the same, port by port.
        let state = state_of(&l7);
        let pod = |ip: Ipv4Addr| state.workloads[&ip].clone();
        let plain = Ipv4Addr::from(plain);
        let carried = |source, port, bypass| {
            carried_by_the_kernel(
                &state,
                "cluster.local",
                bypass,
                &pod(source),
                &pod(plain),
                port,
            )
        };
        assert!(carried(CLIENT, 9000, true));
        assert!(!carried(CLIENT, 8080, true), "judged per request");
        assert!(!carried(CLIENT, 7000, true), "denied");
        assert!(!carried(INTRUDER, 9000, true), "denied");
        assert!(!carried(CLIENT, 9000, false), "--kernel-bypass false");
        let jwt = format!(
            "{PLAIN}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: plain, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: plain}}}}
  jwtRules: [{{issuer: issuer.example, jwksUri: \"https://issuer.example/jwks\"}}]
---
{PLAIN_SERVICE}"
        );
        only_the_http_port_stays_with_the_agent(&jwt);
    }

    /// Both sources go direct to plain except on its HTTP port 8080.
    fn only_the_http_port_stays_with_the_agent(cluster: &str) {
        use KernelAction::*;
        let plain = [10, 244, 1, 20];
        assert_eq!(
            bypass_verdicts(cluster, plain),
            [
                direct(CLIENT, plain, 0, Direct),
                direct(CLIENT, plain, 8080, Agent),
                direct(INTRUDER, plain, 0, Direct),
                direct(INTRUDER, plain, 8080, Agent),
            ]
        );
    }

    #[test]
    fn access_logs_keep_the_agent_only_where_requests_are_logged() {
        // Logged everywhere: a connection's line is written from its close event, but
        // each request on the port its Service declares HTTP is logged by the agent.
        let logged = format!(
            "{PLAIN}---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    accessLogFile: /dev/stdout
---
{PLAIN_SERVICE}"
        );
        only_the_http_port_stays_with_the_agent(&logged);
    }

    #[test]
    fn a_pair_is_written_whole_or_not_at_all() {
        use KernelAction::*;
        let web = [10, 244, 1, 20];
        let db = [10, 244, 1, 30];
        let verdicts = [
            direct(CLIENT, web, 0, Deny),
            direct(CLIENT, web, 8080, Agent),
            direct(CLIENT, db, 0, Direct),
            direct(CLIENT, db, 5432, Agent),
            direct(INTRUDER, db, 0, Direct),
        ];
        assert_eq!(whole_pairs_within(&verdicts, 9), verdicts);
        assert_eq!(whole_pairs_within(&verdicts, 5), verdicts);
        assert_eq!(whole_pairs_within(&verdicts, 4), &verdicts[..4]);
        assert_eq!(whole_pairs_within(&verdicts, 3), &verdicts[..2]);
        assert_eq!(whole_pairs_within(&verdicts, 1), []);
    }

    #[test]
    fn a_port_specific_allow_is_kept_over_the_all_ports_deny() {
        // Only shop may reach web, and only on 8080: every other port of web is denied
        // to everyone, 8080 is allowed to the client alone.
        let verdicts = verdicts(
            "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.1.20}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"8080\"]}}]}]
",
        );
        let web = [10, 244, 1, 20];
        assert_eq!(
            verdicts,
            [
                verdict(CLIENT, web, 0, true),
                verdict(CLIENT, web, 8080, false),
                verdict(INTRUDER, web, 0, true),
            ]
        );
    }

    #[test]
    fn a_service_port_is_denied_where_every_endpoint_denies() {
        // web's two endpoints both deny the intruder: its SYNs to the Service address
        // are dropped too. mixed has an endpoint without policies: the kernel cannot
        // tell which endpoint a connection will reach, so it leaves the Service alone.
        let verdicts = verdicts(
            "apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.21}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.22}
---
apiVersion: v1
kind: Pod
metadata: {name: mixed-1, namespace: shop, labels: {app: mixed, guarded: \"yes\"}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.31}
---
apiVersion: v1
kind: Pod
metadata: {name: mixed-2, namespace: shop, labels: {app: mixed}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.32}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: mixed, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: mixed}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-intruders, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {namespaces: [other]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-intruders-guarded, namespace: shop}
spec:
  selector: {matchLabels: {guarded: \"yes\"}}
  action: DENY
  rules: [{from: [{source: {namespaces: [other]}}]}]
",
        );
        assert_eq!(
            verdicts,
            [
                verdict(INTRUDER, [10, 96, 0, 10], 80, true),
                verdict(INTRUDER, [10, 244, 1, 21], 0, true),
                verdict(INTRUDER, [10, 244, 1, 22], 0, true),
                verdict(INTRUDER, [10, 244, 1, 31], 0, true),
            ]
        );
    }

    #[test]
    fn under_disable_no_principal_is_known_so_a_principal_rule_denies_everyone() {
        // The same policy on two workloads: on db the client's identity is known from
        // its address on this node (mutual TLS), on plain-db (DISABLE) traffic arrives
        // in plaintext and carries no principal, so even the client is denied. (db and
        // plain-db, local pods too, are not the client: each denies the other.)
        let verdicts = verdicts(
            "apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.40}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-db, namespace: shop, labels: {app: db, plain: \"yes\"}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.41}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: plain, namespace: shop}
spec:
  selector: {matchLabels: {plain: \"yes\"}}
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
",
        );
        assert_eq!(
            verdicts,
            [
                verdict(CLIENT, [10, 244, 1, 41], 0, true),
                verdict(INTRUDER, [10, 244, 1, 40], 0, true),
                verdict(INTRUDER, [10, 244, 1, 41], 0, true),
                verdict([10, 244, 1, 40].into(), [10, 244, 1, 41], 0, true),
                verdict([10, 244, 1, 41].into(), [10, 244, 1, 40], 0, true),
            ]
        );
    }

    #[test]
    fn a_port_level_mtls_mode_gets_its_own_verdict() {
        // db is DISABLE but STRICT on 9000, and allows only the client's identity: on
        // 9000 the identity counts (mutual TLS), on the other ports it cannot.
        let config = load_str(
            std::path::Path::new("kernel.yaml"),
            "apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.20}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: DISABLE}
  portLevelMtls: {9000: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
",
        );
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        let state = MeshState::build("node-1", &config);
        let mut verdicts = kernel_verdicts(&state, "cluster.local", false);
        verdicts.sort_by_key(|v| v.port);
        let client = Ipv4Addr::new(10, 244, 1, 10);
        let db = Ipv4Addr::new(10, 244, 1, 20);
        assert_eq!(
            verdicts,
            [
                KernelVerdict {
                    source: client,
                    destination: db,
                    port: 0,
                    action: KernelAction::Deny
                },
                KernelVerdict {
                    source: client,
                    destination: db,
                    port: 9000,
                    action: KernelAction::Agent
                },
            ]
        );
    }
}
