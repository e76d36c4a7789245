//! How the bounded kernel maps are filled when the mesh holds more than they do: which
//! entries are written, which are refused, and what the kernel is told so that a refused
//! entry fails closed. Pure decisions, unit-tested; `Datapath::sync_maps` carries them out.
//!
//! The order of priority is what keeps the node's own pods protected: local workloads
//! first (their entry carries the veth the source check and STRICT rely on), then the
//! rest by address, so the same entries are refused from one sync to the next. A local
//! pod that does not fit has no entry, which `tc_to_pod` and `tc_from_pod` treat as "only
//! the agent may reach it, and it may not send". A remote workload or a Service port that
//! does not fit makes the kernel hand every new connection to the agent (which knows the
//! whole mesh). A pod whose per-port mTLS overrides do not all fit is made STRICT on
//! every port instead: plaintext that a PERMISSIVE port would have taken is dropped,
//! mesh traffic still flows.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;

/// The size of each map the agent fills, set at load time (`--max-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    /// `MESH_WORKLOADS`: pods of the whole mesh.
    pub workloads: u32,
    /// `MESH_SERVICES` (cluster IP and port) and `MESH_SERVICE_IPS` (cluster IP).
    pub services: u32,
    /// `MESH_PORT_MTLS`: per-port PeerAuthentication overrides of local pods.
    pub port_overrides: u32,
    /// `MESH_POLICY`: L4 verdicts on local sources.
    pub policy: u32,
}

impl Default for Capacities {
    /// The sizes the eBPF object declares.
    fn default() -> Capacities {
        Capacities {
            workloads: 16384,
            services: 16384,
            port_overrides: 16384,
            policy: 65536,
        }
    }
}

/// The entries of one map that are written and those refused, in priority order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit<T> {
    pub admitted: Vec<T>,
    pub refused: Vec<T>,
}

/// The first `capacity` entries by `(priority, key)` (lower first) are admitted.
pub fn fit<T: Ord>(mut entries: Vec<(u8, T)>, capacity: u32) -> Fit<T> {
    entries.sort();
    let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
    let refused = entries
        .split_off(capacity.min(entries.len()))
        .into_iter()
        .map(|(_, entry)| entry)
        .collect();
    Fit {
        admitted: entries.into_iter().map(|(_, entry)| entry).collect(),
        refused,
    }
}

/// Workloads by address, local ones first.
pub fn fit_workloads(workloads: &[(Ipv4Addr, bool)], capacity: u32) -> Fit<Ipv4Addr> {
    let entries = workloads
        .iter()
        .map(|&(ip, local)| (u8::from(!local), ip))
        .collect();
    fit(entries, capacity)
}

/// Per-port overrides of local pods, all or nothing per pod (a pod with some of its
/// overrides would be judged by a mix of its own modes and its workload's): pods in
/// address order while their overrides fit. `refused` are the pods made STRICT instead.
pub fn fit_port_overrides<P>(per_pod: &BTreeMap<Ipv4Addr, Vec<P>>, capacity: u32) -> Fit<Ipv4Addr> {
    let mut room = usize::try_from(capacity).unwrap_or(usize::MAX);
    let mut fit = Fit {
        admitted: Vec::new(),
        refused: Vec::new(),
    };
    for (ip, overrides) in per_pod {
        if overrides.len() <= room {
            room -= overrides.len();
            fit.admitted.push(*ip);
        } else {
            fit.refused.push(*ip);
        }
    }
    fit
}

/// What one map holds after a sync, for the metrics and `meshctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub capacity: u32,
    /// Entries written.
    pub entries: usize,
    /// Entries the mesh needs that are not in the map (did not fit, or the kernel
    /// refused the write).
    pub refused: usize,
}

/// What a sync of the maps left, and who fails closed because of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapsReport {
    pub maps: Vec<MapUsage>,
    /// Local pods (`namespace/name`) with a reduced datapath, and how it fails closed.
    pub failing_closed: BTreeMap<String, String>,
    /// New connections to unknown destinations are handed to the agent.
    pub capture_unknown: bool,
}

/// Why the agent is not ready because of its maps, if it is not: each full map.
pub fn problem(maps: &[MapUsage]) -> Option<String> {
    let full: Vec<String> = maps
        .iter()
        .filter(|m| m.refused > 0)
        .map(|m| {
            format!(
                "{} full: {} of {} entries refused (capacity {})",
                m.map,
                m.refused,
                m.entries + m.refused,
                m.capacity
            )
        })
        .collect();
    (!full.is_empty()).then(|| full.join("; "))
}

/// Whether the kernel must capture new connections to destinations it does not know:
/// when a workload, a Service port or a Service address is missing from its map.
pub fn must_capture_unknown(
    workloads_refused: usize,
    services_refused: usize,
    service_ips_refused: usize,
) -> bool {
    workloads_refused + services_refused + service_ips_refused > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, last)
    }

    #[test]
    fn everything_fits_below_capacity() {
        let fit = fit_workloads(&[(ip(2), false), (ip(1), true)], 2);
        assert_eq!(fit.admitted, [ip(1), ip(2)]);
        assert!(fit.refused.is_empty());
    }

    #[test]
    fn local_workloads_come_first_then_addresses_in_order() {
        let workloads = [
            (ip(1), false),
            (ip(9), true),
            (ip(3), false),
            (ip(5), true),
            (ip(2), false),
        ];
        let fit = fit_workloads(&workloads, 3);
        assert_eq!(fit.admitted, [ip(5), ip(9), ip(1)]);
        assert_eq!(fit.refused, [ip(2), ip(3)]);
    }

    #[test]
    fn local_workloads_beyond_capacity_are_refused_by_address() {
        let workloads = [(ip(4), true), (ip(3), true), (ip(7), false), (ip(1), true)];
        let fit = fit_workloads(&workloads, 2);
        assert_eq!(fit.admitted, [ip(1), ip(3)]);
        assert_eq!(fit.refused, [ip(4), ip(7)]);
    }

    #[test]
    fn a_zero_capacity_refuses_everything() {
        let fit = fit(vec![(0, 1), (1, 2)], 0);
        assert!(fit.admitted.is_empty());
        assert_eq!(fit.refused, [1, 2]);
    }

    #[test]
    fn port_overrides_are_all_or_nothing_per_pod() {
        let per_pod = BTreeMap::from([
            (ip(1), vec![80, 81]),
            (ip(2), vec![80, 81, 82]),
            (ip(3), vec![90]),
        ]);
        let fit = fit_port_overrides(&per_pod, 3);
        assert_eq!(
            fit.admitted,
            [ip(1), ip(3)],
            "the third pod's one override fits"
        );
        assert_eq!(fit.refused, [ip(2)]);
        let all = fit_port_overrides(&per_pod, 6);
        assert_eq!((all.admitted.len(), all.refused.len()), (3, 0));
    }

    #[test]
    fn unknown_destinations_are_captured_when_a_destination_map_refused_one() {
        assert!(!must_capture_unknown(0, 0, 0));
        assert!(must_capture_unknown(1, 0, 0));
        assert!(must_capture_unknown(0, 1, 0));
        assert!(must_capture_unknown(0, 0, 1));
    }

    #[test]
    fn the_problem_names_each_full_map() {
        let usage = |map, capacity, entries, refused| MapUsage {
            map,
            capacity,
            entries,
            refused,
        };
        let mut maps = vec![
            usage("MESH_WORKLOADS", 4, 4, 3),
            usage("MESH_SERVICES", 16, 2, 0),
        ];
        assert_eq!(
            problem(&maps).as_deref(),
            Some("MESH_WORKLOADS full: 3 of 7 entries refused (capacity 4)")
        );
        maps[0].refused = 0;
        assert_eq!(problem(&maps), None);
    }
}
