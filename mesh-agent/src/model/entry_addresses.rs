//! Where a ServiceEntry's hosts live when the entry does not say: an address allocated
//! for each host of an entry without `addresses` (Istio's DNS auto-allocation), which
//! the DNS proxy answers and the capture takes like a cluster IP, and the endpoints of
//! `resolution: DNS` entries, looked up by the agent through the node's resolvers.
//!
//! Allocation follows Istio: hosts without a wildcard, of entries whose resolution is
//! not `NONE`, get a non-routable address of 240.240.0.0/16 (never `x.x.x.0` or
//! `x.x.x.255`). The address comes from a hash of the entry's namespace and host, so it
//! stays the same across agents, restarts and unrelated changes; two hosts on one
//! address are parted by probing onwards, in the order of their names.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::config::{
    istio::{Resolution, ServiceEntry},
    validate::fqdn,
    ClusterConfig, Resource,
};

/// Addresses that can be allocated: 256 × 254 (no `.0`, no `.255`).
const ALLOCATABLE: u32 = 256 * 254;

/// The address of allocation slot `slot` in 240.240.0.0/16.
fn slot_address(slot: u32) -> Ipv4Addr {
    let third = (slot / 254) as u8;
    let fourth = (slot % 254) as u8 + 1;
    Ipv4Addr::new(240, 240, third, fourth)
}

/// FNV-1a: small, stable across releases and platforms, and spreads short names well.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// The first slot from `preferred` on (wrapping around) not `taken`, now taken.
fn claim(taken: &mut BTreeSet<u32>, preferred: u32) -> Option<u32> {
    let slot = (0..ALLOCATABLE)
        .map(|step| (preferred + step) % ALLOCATABLE)
        .find(|slot| !taken.contains(slot))?;
    taken.insert(slot);
    Some(slot)
}

/// The hosts of an entry that name one service each (no wildcard), as FQDNs.
fn named_hosts(entry: &Resource<ServiceEntry>) -> impl Iterator<Item = String> + '_ {
    entry
        .spec
        .hosts
        .iter()
        .filter(|host| !host.contains('*'))
        .map(|host| fqdn(host, entry.namespace()).to_ascii_lowercase())
}

/// Whether Istio would allocate addresses to `entry`'s hosts.
fn allocates(entry: &ServiceEntry) -> bool {
    entry.addresses.is_empty() && entry.resolution.unwrap_or_default() != Resolution::None
}

/// Whether `entry` is resolved by DNS (`DNS`, `DNS_ROUND_ROBIN`).
pub fn resolves_by_dns(entry: &ServiceEntry) -> bool {
    matches!(
        entry.resolution.unwrap_or_default(),
        Resolution::Dns | Resolution::DnsRoundRobin
    )
}

/// The allocated address of each host of the entries without `addresses`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryAddresses {
    /// By the entry's namespace and the host's FQDN.
    by_host: BTreeMap<(String, String), Ipv4Addr>,
}

impl EntryAddresses {
    pub fn of(config: &ClusterConfig) -> EntryAddresses {
        // A Kubernetes Service's own name is its cluster IP's, never an entry's.
        let services: BTreeSet<String> = config
            .services
            .iter()
            .map(|s| fqdn(&s.metadata.name, s.metadata.namespace()).to_ascii_lowercase())
            .collect();
        let wanted: BTreeSet<(String, String)> = config
            .istio
            .service_entries
            .iter()
            .filter(|entry| allocates(&entry.spec))
            .flat_map(|entry| named_hosts(entry).map(|host| (entry.namespace().to_owned(), host)))
            .filter(|(_, host)| !services.contains(host))
            .collect();
        let mut taken = BTreeSet::new();
        let mut by_host = BTreeMap::new();
        for (namespace, host) in wanted {
            let preferred = fnv1a(&format!("{namespace}/{host}")) % ALLOCATABLE;
            // More hosts than addresses: the rest stay without one (their names are
            // forwarded, as before allocation).
            let Some(slot) = claim(&mut taken, preferred) else {
                break;
            };
            by_host.insert((namespace, host), slot_address(slot));
        }
        EntryAddresses { by_host }
    }

    /// The address allocated to `host` (an FQDN) of the entry in `namespace`.
    pub fn get(&self, namespace: &str, host: &str) -> Option<Ipv4Addr> {
        self.by_host
            .get(&(namespace.to_owned(), host.to_ascii_lowercase()))
            .copied()
    }
}

/// The names the agent looks up for `resolution: DNS` entries: their endpoints given by
/// name, or, without endpoints (or a workload selector), their hosts themselves.
pub fn names_to_resolve(config: &ClusterConfig) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in config
        .istio
        .service_entries
        .iter()
        .filter(|entry| resolves_by_dns(&entry.spec))
    {
        let spec = &entry.spec;
        if spec.endpoints.is_empty() && spec.workload_selector.is_none() {
            names.extend(named_hosts(entry));
        }
        names.extend(
            spec.endpoints
                .iter()
                .filter_map(|endpoint| endpoint.address.as_deref())
                .filter(|address| address.parse::<Ipv4Addr>().is_err())
                .filter(|address| !address.starts_with("unix://"))
                .map(|name| name.trim_end_matches('.').to_ascii_lowercase()),
        );
    }
    names
}

/// What the node's resolvers answered for the names of [`names_to_resolve`]: IPv4
/// addresses by name (lower case, no final dot).
pub type ResolvedNames = BTreeMap<String, Vec<Ipv4Addr>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> ClusterConfig {
        let config = crate::config::load_documents([("cluster.yaml", yaml)]);
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        config
    }

    const ENTRIES: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.example.com, '*.wild.example.com', db.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: given, namespace: shop}
spec:
  hosts: [given.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [passthrough.example.com]
  ports: [{number: 80, name: http}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-name, namespace: shop}
spec:
  hosts: [mirror.internal]
  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints: [{address: mirror-a.example.net}, {address: 10.1.0.2}]
";

    #[test]
    fn hosts_without_addresses_get_one_of_240_240_per_host() {
        let addresses = EntryAddresses::of(&config(ENTRIES));
        let api = addresses.get("shop", "api.example.com").expect("allocated");
        let db = addresses.get("shop", "DB.example.com").expect("allocated");
        assert_ne!(api, db);
        for ip in [api, db] {
            assert_eq!(ip.octets()[..2], [240, 240]);
            assert!(![0, 255].contains(&ip.octets()[3]), "{ip}");
        }
        assert!(addresses.get("shop", "*.wild.example.com").is_none());
        assert!(addresses.get("shop", "given.example.com").is_none());
        assert!(addresses.get("shop", "passthrough.example.com").is_none());
        assert!(addresses.get("other", "api.example.com").is_none());
    }

    #[test]
    fn an_address_stays_when_other_entries_come_and_go() {
        let before = EntryAddresses::of(&config(ENTRIES));
        let more = format!(
            "{ENTRIES}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: later, namespace: shop}}
spec:
  hosts: [later.example.com]
  ports: [{{number: 80, name: http}}]
  resolution: DNS
"
        );
        let after = EntryAddresses::of(&config(&more));
        for host in ["api.example.com", "db.example.com", "mirror.internal"] {
            assert_eq!(before.get("shop", host), after.get("shop", host), "{host}");
        }
        assert!(after.get("shop", "later.example.com").is_some());
    }

    #[test]
    fn a_kubernetes_service_name_is_never_allocated() {
        let yaml = format!(
            "{ENTRIES}---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop}}
spec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shadow, namespace: shop}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  ports: [{{number: 80, name: http}}]
  resolution: DNS
"
        );
        let addresses = EntryAddresses::of(&config(&yaml));
        assert!(addresses
            .get("shop", "reviews.shop.svc.cluster.local")
            .is_none());
    }

    #[test]
    fn colliding_hosts_are_parted_by_probing() {
        let mut taken = BTreeSet::new();
        let slots: Vec<Option<u32>> = (0..3).map(|_| claim(&mut taken, ALLOCATABLE - 1)).collect();
        assert_eq!(slots, [Some(ALLOCATABLE - 1), Some(0), Some(1)]);
        let mut full: BTreeSet<u32> = (0..ALLOCATABLE).collect();
        assert_eq!(claim(&mut full, 7), None);
        assert_eq!(
            slot_address(ALLOCATABLE - 1),
            Ipv4Addr::new(240, 240, 255, 254)
        );
        assert_eq!(slot_address(0), Ipv4Addr::new(240, 240, 0, 1));
        assert_eq!(slot_address(254), Ipv4Addr::new(240, 240, 1, 1));
    }

    #[test]
    fn dns_entries_resolve_their_named_endpoints_or_else_their_hosts() {
        let names = names_to_resolve(&config(ENTRIES));
        let expected: BTreeSet<String> =
            ["api.example.com", "db.example.com", "mirror-a.example.net"]
                .map(str::to_owned)
                .into();
        assert_eq!(names, expected);
    }
}
