//! Connection-level load balancing over a Service's endpoints, as a DestinationRule's
//! `loadBalancer` asks: `ROUND_ROBIN`, `LEAST_REQUEST` (fewest active connections of two
//! random choices, as Envoy does), `RANDOM`, `PASSTHROUGH` (the original destination), and
//! `consistentHash.useSourceIp` (rendezvous hashing on the client address: the same client
//! keeps its endpoint, and an endpoint leaving moves only its own clients).

use std::{
    cell::Cell,
    hash::{Hash, Hasher},
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
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

/// Chooses among `len` endpoints; keeps the round-robin cursor and the active
/// connection count of each endpoint.
#[derive(Debug)]
pub struct Balancer {
    pub policy: LbPolicy,
    next: AtomicUsize,
    active: Arc<Vec<AtomicUsize>>,
}

/// An active connection to an endpoint; the count drops when it is dropped.
#[derive(Debug)]
pub struct ActiveGuard {
    active: Arc<Vec<AtomicUsize>>,
    index: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.active[self.index].fetch_sub(1, Ordering::Relaxed);
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
fn random(bound: usize) -> usize {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % bound
    })
}

impl Balancer {
    pub fn new(policy: LbPolicy, endpoints: usize) -> Balancer {
        Balancer {
            policy,
            next: AtomicUsize::new(0),
            active: Arc::new((0..endpoints).map(|_| AtomicUsize::new(0)).collect()),
        }
    }

    /// The index of the endpoint for a new connection from `client`, among the endpoints
    /// `eligible` allows (a subset); `None` when none is eligible. `PASSTHROUGH` picks
    /// nothing: the caller uses the original destination.
    pub fn pick(
        &self,
        client: Ipv4Addr,
        endpoint_keys: &[impl Hash],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<(usize, ActiveGuard)> {
        let candidates: Vec<usize> = (0..endpoint_keys.len()).filter(|i| eligible(*i)).collect();
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
                let load = |i: usize| self.active[i].load(Ordering::Relaxed);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            LbPolicy::SourceIpHash => *candidates.iter().max_by_key(|i| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                client.hash(&mut hasher);
                endpoint_keys[**i].hash(&mut hasher);
                hasher.finish()
            })?,
        };
        self.active[index].fetch_add(1, Ordering::Relaxed);
        Some((
            index,
            ActiveGuard {
                active: self.active.clone(),
                index,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.1.{i}:8080")).collect()
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
        let balancer = Balancer::new(LbPolicy::RoundRobin, 3);
        assert_eq!(counts(&balancer, 3, 3000, false), vec![1000, 1000, 1000]);
    }

    #[test]
    fn random_is_even_within_a_few_percent() {
        let balancer = Balancer::new(LbPolicy::Random, 4);
        for count in counts(&balancer, 4, 40_000, false) {
            assert!((9_400..=10_600).contains(&count), "{count}");
        }
    }

    #[test]
    fn least_request_balances_held_connections() {
        let balancer = Balancer::new(LbPolicy::LeastRequest, 4);
        let spread = counts(&balancer, 4, 4000, true);
        let (min, max) = (spread.iter().min().copied(), spread.iter().max().copied());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 100),
            "{spread:?}"
        );
        assert!(balancer
            .active
            .iter()
            .all(|a| a.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let balancer = Balancer::new(LbPolicy::LeastRequest, 2);
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
        let balancer = Balancer::new(LbPolicy::SourceIpHash, 4);
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
        assert!(Balancer::new(LbPolicy::Passthrough, 3)
            .pick(Ipv4Addr::LOCALHOST, &keys, |_| true)
            .is_none());
        let balancer = Balancer::new(LbPolicy::RoundRobin, 3);
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
}
