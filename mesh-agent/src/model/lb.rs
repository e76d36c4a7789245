//! Connection-level load balancing over a Service's endpoints, as a DestinationRule's
//! `loadBalancer` asks: `ROUND_ROBIN`, `LEAST_REQUEST` (fewest active connections of two
//! random choices, as Envoy does), `RANDOM`, `PASSTHROUGH` (the original destination), and
//! `consistentHash.useSourceIp` (rendezvous hashing on the client address: the same client
//! keeps its endpoint, and an endpoint leaving moves only its own clients). Balancer and
//! endpoint state outlive configuration swaps ([`LbRegistry`]).

use std::{
    cell::Cell,
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
};

use serde::Serialize;

use crate::config::istio::{LoadBalancerSettings, SimpleLb};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    Passthrough,
    SourceIpHash,
}

impl LbPolicy {
    /// The policy a DestinationRule's `loadBalancer` asks for; `None` when it sets none.
    pub fn from_settings(settings: &LoadBalancerSettings) -> Option<LbPolicy> {
        if settings
            .consistent_hash
            .as_ref()
            .is_some_and(|c| c.use_source_ip == Some(true))
        {
            return Some(LbPolicy::SourceIpHash);
        }
        match settings.simple? {
            SimpleLb::Unspecified => None,
            SimpleLb::RoundRobin => Some(LbPolicy::RoundRobin),
            SimpleLb::LeastRequest | SimpleLb::LeastConn => Some(LbPolicy::LeastRequest),
            SimpleLb::Random => Some(LbPolicy::Random),
            SimpleLb::Passthrough => Some(LbPolicy::Passthrough),
        }
    }
}

/// What a balancer knows of one endpoint, shared by every balancer that has it and kept
/// across configuration swaps (keyed by address in the [`LbRegistry`]): the connections
/// active on it now.
#[derive(Debug, Default)]
pub struct EndpointStats {
    active: AtomicUsize,
}

impl EndpointStats {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Where a balancer's state comes from: the same [`EndpointStats`] for the same endpoint
/// address, and the same round-robin cursor for the same Service port and subset, from
/// one configuration to the next, so a reload resets neither least-request counts nor
/// rotation. Entries no configuration uses any more are dropped on [`LbRegistry::prune`].
#[derive(Debug, Default, Clone)]
pub struct LbRegistry {
    inner: Arc<Mutex<Registry>>,
    /// Outlier detection's view of endpoints, kept across configurations the same way.
    pub outliers: crate::model::outlier::OutlierRegistry,
}

#[derive(Debug, Default)]
struct Registry {
    endpoints: HashMap<SocketAddrV4, Weak<EndpointStats>>,
    cursors: HashMap<String, Weak<AtomicUsize>>,
}

fn shared<K: std::hash::Hash + Eq, T: Default>(map: &mut HashMap<K, Weak<T>>, key: K) -> Arc<T> {
    if let Some(live) = map.get(&key).and_then(Weak::upgrade) {
        return live;
    }
    let fresh = Arc::new(T::default());
    map.insert(key, Arc::downgrade(&fresh));
    fresh
}

impl LbRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A balancer for `endpoints`, its cursor named by `key` (Service port and subset).
    pub fn balancer(&self, key: String, policy: LbPolicy, endpoints: &[SocketAddrV4]) -> Balancer {
        let mut registry = self.lock();
        Balancer {
            policy,
            next: shared(&mut registry.cursors, key),
            endpoints: endpoints
                .iter()
                .map(|addr| shared(&mut registry.endpoints, *addr))
                .collect(),
        }
    }

    /// Forgets the state no balancer holds any more.
    pub fn prune(&self) {
        let mut registry = self.lock();
        registry
            .endpoints
            .retain(|_, stats| stats.strong_count() > 0);
        registry
            .cursors
            .retain(|_, cursor| cursor.strong_count() > 0);
        drop(registry);
        self.outliers.prune();
    }

    /// The stats of the endpoint at `addr`, if a balancer has it.
    pub fn endpoint(&self, addr: SocketAddrV4) -> Option<Arc<EndpointStats>> {
        self.lock().endpoints.get(&addr).and_then(Weak::upgrade)
    }
}

/// Chooses among a Service port's (or subset's) endpoints.
#[derive(Debug)]
pub struct Balancer {
    pub policy: LbPolicy,
    next: Arc<AtomicUsize>,
    endpoints: Vec<Arc<EndpointStats>>,
}

/// An active connection to an endpoint; the count drops when it is dropped.
#[derive(Debug)]
pub struct ActiveGuard {
    endpoint: Arc<EndpointStats>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    (nanos ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// xorshift64*: plenty for spreading connections, and no dependency.
pub fn random(bound: usize) -> usize {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % bound
    })
}

/// The rendezvous weight of `endpoint` for `client`: FNV-1a over both addresses, then
/// SplitMix64's finaliser to spread the bits. Fixed by this code alone (unlike std's
/// `DefaultHasher`, which may change between Rust releases), so agents built by
/// different toolchains send a client to the same endpoint.
fn affinity(client: Ipv4Addr, endpoint: SocketAddrV4) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = client
        .octets()
        .into_iter()
        .chain(endpoint.ip().octets())
        .chain(endpoint.port().to_be_bytes());
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl Balancer {
    /// The index of the endpoint for a new connection from `client`, among the endpoints
    /// `eligible` allows (a subset); `None` when none is eligible. `PASSTHROUGH` picks
    /// nothing: the caller uses the original destination. `addresses` are the endpoints'
    /// addresses, in the balancer's order.
    pub fn pick(
        &self,
        client: Ipv4Addr,
        addresses: &[SocketAddrV4],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<(usize, ActiveGuard)> {
        let candidates: Vec<usize> = (0..self.endpoints.len().min(addresses.len()))
            .filter(|i| eligible(*i))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let index = match self.policy {
            LbPolicy::Passthrough => return None,
            LbPolicy::RoundRobin => {
                candidates[self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()]
            }
            LbPolicy::Random => candidates[random(candidates.len())],
            LbPolicy::LeastRequest => {
                // Two *different* candidates when there are two: comparing an endpoint
                // with itself would waste the choice.
                let n = candidates.len();
                let first = random(n);
                let second = if n > 1 {
                    (first + 1 + random(n - 1)) % n
                } else {
                    first
                };
                let (a, b) = (candidates[first], candidates[second]);
                if self.endpoints[b].active() < self.endpoints[a].active() {
                    b
                } else {
                    a
                }
            }
            LbPolicy::SourceIpHash => *candidates
                .iter()
                .max_by_key(|i| affinity(client, addresses[**i]))?,
        };
        let endpoint = self.endpoints[index].clone();
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Some((index, ActiveGuard { endpoint }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<SocketAddrV4> {
        (0..n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i as u8), 8080))
            .collect()
    }

    fn balancer(policy: LbPolicy, n: usize) -> Balancer {
        LbRegistry::default().balancer("test".into(), policy, &keys(n))
    }

    fn counts(balancer: &Balancer, n: usize, picks: usize, hold: bool) -> Vec<usize> {
        let keys = keys(n);
        let mut counts = vec![0; n];
        let mut held = Vec::new();
        for c in 0..picks {
            let client = Ipv4Addr::from(0x0af4_0000 + c as u32);
            let (index, guard) = balancer.pick(client, &keys, |_| true).expect("a pick");
            counts[index] += 1;
            if hold {
                held.push(guard);
            }
        }
        counts
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let balancer = balancer(LbPolicy::RoundRobin, 3);
        assert_eq!(counts(&balancer, 3, 3000, false), vec![1000, 1000, 1000]);
    }

    #[test]
    fn random_is_even_within_a_few_percent() {
        let balancer = balancer(LbPolicy::Random, 4);
        for count in counts(&balancer, 4, 40_000, false) {
            assert!((9_400..=10_600).contains(&count), "{count}");
        }
    }

    #[test]
    fn least_request_balances_held_connections() {
        let balancer = balancer(LbPolicy::LeastRequest, 4);
        let spread = counts(&balancer, 4, 4000, true);
        let (min, max) = (spread.iter().min().copied(), spread.iter().max().copied());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 100),
            "{spread:?}"
        );
        assert!(balancer.endpoints.iter().all(|e| e.active() == 0));
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let balancer = balancer(LbPolicy::LeastRequest, 2);
        let keys = keys(2);
        let busy: Vec<_> = (0..50)
            .filter_map(|_| balancer.pick(Ipv4Addr::LOCALHOST, &keys, |i| i == 0))
            .collect();
        let picks: Vec<usize> = (0..200)
            .filter_map(|_| {
                balancer
                    .pick(Ipv4Addr::LOCALHOST, &keys, |_| true)
                    .map(|(i, _)| i)
            })
            .collect();
        assert!(picks.iter().filter(|i| **i == 1).count() > 140, "{picks:?}");
        drop(busy);
    }

    #[test]
    fn source_ip_hash_is_sticky_and_moves_only_the_leaving_endpoints_clients() {
        let balancer = balancer(LbPolicy::SourceIpHash, 4);
        let keys = keys(4);
        let pick = |client: Ipv4Addr, eligible: &dyn Fn(usize) -> bool| {
            balancer.pick(client, &keys, eligible).map(|(i, _)| i)
        };
        let clients: Vec<Ipv4Addr> = (0..400).map(|c| Ipv4Addr::from(0x0af4_0100 + c)).collect();
        let before: Vec<usize> = clients.iter().filter_map(|c| pick(*c, &|_| true)).collect();
        let again: Vec<usize> = clients.iter().filter_map(|c| pick(*c, &|_| true)).collect();
        assert_eq!(before, again, "a client keeps its endpoint");
        let mut per_endpoint = [0; 4];
        before.iter().for_each(|i| per_endpoint[*i] += 1);
        assert!(per_endpoint.iter().all(|n| *n > 50), "{per_endpoint:?}");
        let after: Vec<usize> = clients
            .iter()
            .filter_map(|c| pick(*c, &|i| i != 2))
            .collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "only the clients of the removed endpoint move");
            }
        }
    }

    #[test]
    fn passthrough_picks_nothing_and_subsets_narrow_the_choice() {
        let keys = keys(3);
        assert!(balancer(LbPolicy::Passthrough, 3)
            .pick(Ipv4Addr::LOCALHOST, &keys, |_| true)
            .is_none());
        let balancer = balancer(LbPolicy::RoundRobin, 3);
        for _ in 0..10 {
            let (index, _) = balancer
                .pick(Ipv4Addr::LOCALHOST, &keys, |i| i == 1)
                .expect("the subset's endpoint");
            assert_eq!(index, 1);
        }
        assert!(balancer
            .pick(Ipv4Addr::LOCALHOST, &keys, |_| false)
            .is_none());
    }

    #[test]
    fn a_new_configuration_keeps_the_rotation_and_the_active_counts() {
        let registry = LbRegistry::default();
        let endpoints = keys(3);
        let before = registry.balancer("web:80".into(), LbPolicy::RoundRobin, &endpoints);
        let (first, held) = before
            .pick(Ipv4Addr::LOCALHOST, &endpoints, |_| true)
            .expect("pick");
        assert_eq!(first, 0);
        // A reload builds new balancers over the same endpoints (one more added).
        let mut grown = endpoints.clone();
        grown.push(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), 8080));
        let after = registry.balancer("web:80".into(), LbPolicy::RoundRobin, &grown);
        drop(before);
        let (next, _) = after
            .pick(Ipv4Addr::LOCALHOST, &grown, |_| true)
            .expect("pick");
        assert_eq!(next, 1, "the rotation continues where it was");
        assert_eq!(
            registry.endpoint(endpoints[0]).map(|e| e.active()),
            Some(1),
            "the connection held across the reload still counts"
        );
        drop(held);
        assert_eq!(registry.endpoint(endpoints[0]).map(|e| e.active()), Some(0));
        drop(after);
        registry.prune();
        assert!(
            registry.endpoint(endpoints[0]).is_none(),
            "unused state is dropped"
        );
    }

    #[test]
    fn source_ip_affinity_is_fixed_by_this_code() {
        // Pinned values: a change here would send clients to other endpoints than agents
        // built from an earlier release do.
        let client = Ipv4Addr::new(10, 244, 1, 50);
        let endpoint = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 8080);
        assert_eq!(affinity(client, endpoint), affinity(client, endpoint));
        assert_eq!(affinity(client, endpoint), 0x5c1f_f263_b695_510c);
    }
}
