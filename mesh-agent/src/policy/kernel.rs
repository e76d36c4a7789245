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

/// Entries beyond this many are left to the agent, which enforces the same decisions.
pub const KERNEL_VERDICTS_MAX: usize = 65536;

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
