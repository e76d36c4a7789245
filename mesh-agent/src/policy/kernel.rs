//! The verdicts the kernel enforces: what each destination's AuthorizationPolicies decide
//! for new connections from each local pod on L4 facts alone, so that tc drops denied
//! SYNs before the agent sees them.

use std::{
    collections::{BTreeSet, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use crate::{
    model::{MeshState, Workload},
    policy::facts::{admit, Admission, Arrival, Peer},
};

/// What the destination's policies decide for new connections from a local pod, on L4
/// facts alone: for the kernel, which drops denied SYNs before the agent sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVerdict {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    /// 0: every port without an entry of its own.
    pub port: u16,
    pub deny: bool,
}

/// The verdicts of every local pod towards every workload with policies (per port the
/// policies name, and for all other ports), and towards Service ports all of whose
/// endpoints deny it.
pub fn kernel_verdicts(state: &MeshState, trust_domain: &str) -> Vec<KernelVerdict> {
    let sources: Vec<&Arc<Workload>> = state.local_workloads().collect();
    let mut denied: HashSet<(Ipv4Addr, Ipv4Addr, u16)> = HashSet::new();
    let mut other_ports_denied: HashSet<(Ipv4Addr, Ipv4Addr)> = HashSet::new();
    let mut verdicts = Vec::new();
    for destination in state.workloads.values() {
        let security = state.security_of(destination.ip);
        if security.policies.is_empty() {
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
            let denies = |port: u16| {
                let arrival = Arrival::new(
                    state,
                    trust_domain,
                    source.ip,
                    Peer::Pod(source),
                    destination.clone(),
                    SocketAddrV4::new(destination.ip, port),
                    None,
                );
                admit(&arrival).0 == Admission::Deny
            };
            let other = denies(0);
            if other {
                other_ports_denied.insert((source.ip, destination.ip));
                verdicts.push(KernelVerdict {
                    source: source.ip,
                    destination: destination.ip,
                    port: 0,
                    deny: true,
                });
            }
            for &port in &ports {
                let deny = denies(port);
                if deny {
                    denied.insert((source.ip, destination.ip, port));
                }
                if deny != other {
                    verdicts.push(KernelVerdict {
                        source: source.ip,
                        destination: destination.ip,
                        port,
                        deny,
                    });
                }
            }
        }
    }
    let denies = |source: Ipv4Addr, target: &SocketAddrV4| {
        denied.contains(&(source, *target.ip(), target.port()))
            || (other_ports_denied.contains(&(source, *target.ip()))
                && !verdicts.iter().any(|v| {
                    v.source == source
                        && v.destination == *target.ip()
                        && v.port == target.port()
                        && !v.deny
                }))
    };
    let mut service_verdicts = Vec::new();
    for service in state.services.values() {
        let all_meshed =
            !service.endpoints.is_empty() && service.endpoints.iter().all(|e| e.workload.is_some());
        if !all_meshed {
            continue;
        }
        for source in &sources {
            if service.endpoints.iter().all(|e| denies(source.ip, &e.addr)) {
                service_verdicts.push(KernelVerdict {
                    source: source.ip,
                    destination: service.cluster_ip,
                    port: service.port,
                    deny: true,
                });
            }
        }
    }
    verdicts.extend(service_verdicts);
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const INTRUDER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    /// Two local sources, `shop/client` and `other/intruder`, beside `cluster`.
    fn verdicts(cluster: &str) -> Vec<KernelVerdict> {
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
        let state = MeshState::build("node-1", &config);
        let mut verdicts = kernel_verdicts(&state, "cluster.local");
        verdicts.sort_by_key(|v| (v.source, v.destination, v.port));
        verdicts
    }

    fn verdict(source: Ipv4Addr, destination: [u8; 4], port: u16, deny: bool) -> KernelVerdict {
        KernelVerdict {
            source,
            destination: destination.into(),
            port,
            deny,
        }
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
        let mut verdicts = kernel_verdicts(&state, "cluster.local");
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
                    deny: true
                },
                KernelVerdict {
                    source: client,
                    destination: db,
                    port: 9000,
                    deny: false
                },
            ]
        );
    }
}
