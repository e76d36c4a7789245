//! Load balancing over a Service's endpoints, as a DestinationRule's `loadBalancer` asks:
//! `ROUND_ROBIN`, `LEAST_REQUEST` (fewest active requests of two random choices, as Envoy
//! does), `RANDOM`, `PASSTHROUGH` (the original destination), `consistentHash` (a ring or
//! Maglev table over the endpoints, keyed by the client address or a request's header,
//! cookie or query parameter: [`hashing`](super::hashing)), narrowed first by locality
//! ([`locality`](super::locality): failover priorities or `distribute` weights), with
//! Envoy's slow start (`warmup`, `warmupDurationSecs`) for endpoints new to this agent. Balancer and
//! endpoint state outlive configuration swaps ([`LbRegistry`]).

use std::{
    cell::Cell,
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    config::istio::{LoadBalancerSettings, SimpleLb},
    model::{
        hashing::{ConsistentHash, HashKey, HashTable, TableKind},
        locality::{self, LocalityPlan, LocalitySettings},
    },
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    Passthrough,
    ConsistentHash,
}

impl LbPolicy {
    /// The simple policy a DestinationRule's `loadBalancer` asks for; `None` when it sets
    /// none.
    fn from_simple(simple: Option<SimpleLb>) -> Option<LbPolicy> {
        match simple? {
            SimpleLb::Unspecified => None,
            SimpleLb::RoundRobin => Some(LbPolicy::RoundRobin),
            SimpleLb::LeastRequest | SimpleLb::LeastConn => Some(LbPolicy::LeastRequest),
            SimpleLb::Random => Some(LbPolicy::Random),
            SimpleLb::Passthrough => Some(LbPolicy::Passthrough),
        }
    }
}

/// Everything a `loadBalancer` block asks of one cluster, translated.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LbSettings {
    pub policy: LbPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<ConsistentHash>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalitySettings>,
    /// Envoy's slow start (round robin and least request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<SlowStart>,
}

/// `warmup` (or the older `warmupDurationSecs`): a new endpoint's weight grows from
/// `minimum_percent` to full over `window`, as `(age / window) ^ (1 / aggression)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SlowStart {
    #[serde(serialize_with = "seconds")]
    pub window: Duration,
    pub minimum_percent: f64,
    pub aggression: f64,
}

fn seconds<S: serde::Serializer>(window: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{}s", window.as_secs_f64()))
}

/// Envoy's defaults: `min_weight_percent` 10, `aggression` 1 (linear).
const SLOW_START_MINIMUM_PERCENT: f64 = 10.0;
const SLOW_START_AGGRESSION: f64 = 1.0;

impl SlowStart {
    /// Linear from 10%, over `window`.
    pub fn linear(window: Duration) -> SlowStart {
        SlowStart {
            window,
            minimum_percent: SLOW_START_MINIMUM_PERCENT,
            aggression: SLOW_START_AGGRESSION,
        }
    }

    /// The weight of an endpoint `age` old: 1 once the window has passed.
    pub fn weight(&self, age: Duration) -> f64 {
        if age >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let time_factor = age.as_secs_f64() / self.window.as_secs_f64();
        let aggression = if self.aggression > 0.0 {
            self.aggression
        } else {
            SLOW_START_AGGRESSION
        };
        time_factor
            .powf(1.0 / aggression)
            .max(self.minimum_percent / 100.0)
    }
}

impl LbSettings {
    /// A policy with nothing else.
    pub fn simple(policy: LbPolicy) -> LbSettings {
        LbSettings {
            policy,
            ..LbSettings::default()
        }
    }

    /// What `settings` asks for, `default` where it sets no policy; locality failover
    /// needs `outlier_detection` on the same cluster, as in Istio.
    pub fn from_istio(
        settings: Option<&LoadBalancerSettings>,
        default: LbPolicy,
        outlier_detection: bool,
    ) -> LbSettings {
        let hash = settings
            .and_then(|s| s.consistent_hash.as_ref())
            .and_then(ConsistentHash::from_istio);
        let policy = if hash.is_some() {
            LbPolicy::ConsistentHash
        } else {
            LbPolicy::from_simple(settings.and_then(|s| s.simple)).unwrap_or(default)
        };
        let warmup = settings.and_then(|s| match &s.warmup {
            Some(warmup) => warmup.duration.as_ref().map(|d| SlowStart {
                window: d.value,
                minimum_percent: warmup.minimum_percent.unwrap_or(SLOW_START_MINIMUM_PERCENT),
                aggression: warmup.aggression.unwrap_or(SLOW_START_AGGRESSION),
            }),
            None => s
                .warmup_duration_secs
                .as_ref()
                .map(|d| SlowStart::linear(d.value)),
        });
        let warmup = warmup.filter(|w| {
            !w.window.is_zero() && matches!(policy, LbPolicy::RoundRobin | LbPolicy::LeastRequest)
        });
        LbSettings {
            policy,
            hash,
            locality: LocalitySettings::from_istio(
                settings.and_then(|s| s.locality_lb_setting.as_ref()),
                outlier_detection,
            ),
            warmup,
        }
    }

    /// One line for `meshctl routes`: the policy, its hash key and table, locality load
    /// balancing, slow start.
    pub fn describe(&self) -> String {
        let policy = serde_json::to_value(self.policy)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut parts = vec![policy];
        if let Some(hash) = &self.hash {
            let key = match &hash.key {
                HashKey::SourceIp => "source IP".to_owned(),
                HashKey::Header(name) => format!("header {name}"),
                HashKey::QueryParameter(name) => format!("query parameter {name}"),
                HashKey::Cookie(cookie) => match cookie.ttl {
                    Some(ttl) => {
                        format!("cookie {} (generated, ttl {}s)", cookie.name, ttl.as_secs())
                    }
                    None => format!("cookie {}", cookie.name),
                },
            };
            let table = match hash.table {
                TableKind::RingHash { minimum_ring_size } => {
                    format!("ring hash of at least {minimum_ring_size}")
                }
                TableKind::Maglev { table_size } => format!("maglev table of {table_size}"),
            };
            parts.push(format!("on {key}, {table}"));
        }
        if let Some(locality) = &self.locality {
            if !locality.distribute.is_empty() {
                let entries: Vec<String> = locality
                    .distribute
                    .iter()
                    .map(|(from, to)| {
                        let to: Vec<String> = to.iter().map(|(l, w)| format!("{l} {w}%")).collect();
                        format!("{from} → {}", to.join(" "))
                    })
                    .collect();
                parts.push(format!("locality distribute {}", entries.join("; ")));
            } else if !locality.failover_priority.is_empty() {
                parts.push(format!(
                    "locality failover by {}",
                    locality.failover_priority.join(", ")
                ));
            } else {
                let regions: Vec<String> = locality
                    .failover
                    .iter()
                    .map(|(from, to)| format!(" {from} → {to}"))
                    .collect();
                parts.push(format!("locality failover{}", regions.concat()));
            }
        }
        if let Some(warmup) = self.warmup {
            parts.push(format!("warmup {}s", warmup.window.as_secs()));
        }
        parts.join("; ")
    }

    /// The hash key, for consistent hashing.
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash.as_ref().map(|h| &h.key)
    }
}

/// What a balancer knows of one endpoint, shared by every balancer that has it and kept
/// across configuration swaps (keyed by address in the [`LbRegistry`]): the connections
/// (or requests) active on it now, and when this agent first saw it (slow start).
#[derive(Debug)]
pub struct EndpointStats {
    active: AtomicUsize,
    seen: Instant,
}

impl EndpointStats {
    fn new(seen: Instant) -> EndpointStats {
        EndpointStats {
            active: AtomicUsize::new(0),
            seen,
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Where a balancer's state comes from: the same [`EndpointStats`] for the same endpoint
/// address, and the same round-robin cursor for the same Service port and subset, from
/// one configuration to the next, so a reload resets neither least-request counts, nor
/// rotation, nor an endpoint's age. Entries no configuration uses any more are dropped on
/// [`LbRegistry::prune`].
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

fn shared<K: std::hash::Hash + Eq, T>(
    map: &mut HashMap<K, Weak<T>>,
    key: K,
    fresh: impl FnOnce() -> T,
) -> Arc<T> {
    if let Some(live) = map.get(&key).and_then(Weak::upgrade) {
        return live;
    }
    let fresh = Arc::new(fresh());
    map.insert(key, Arc::downgrade(&fresh));
    fresh
}

/// What a balancer is built over: the port's endpoint addresses, the positions of those
/// it chooses among (a subset's), and their locality plan.
pub struct BalancerScope<'a> {
    pub addresses: &'a [SocketAddrV4],
    pub members: Vec<usize>,
    /// Per member, as [`locality::plan`] made it.
    pub locality: Option<LocalityPlan>,
}

impl LbRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A balancer over `scope`, its cursor named by `key` (Service port and subset); its
    /// hash table, if any, is built here, once per configuration.
    pub fn balancer(&self, key: String, settings: &LbSettings, scope: BalancerScope) -> Balancer {
        self.balancer_at(key, settings, scope, Instant::now())
    }

    /// [`balancer`](Self::balancer) at `now`: endpoints not known yet are first seen then.
    pub fn balancer_at(
        &self,
        key: String,
        settings: &LbSettings,
        scope: BalancerScope,
        now: Instant,
    ) -> Balancer {
        let mut registry = self.lock();
        let members: Vec<SocketAddrV4> =
            scope.members.iter().map(|i| scope.addresses[*i]).collect();
        Balancer {
            policy: settings.policy,
            next: shared(&mut registry.cursors, key, AtomicUsize::default),
            endpoints: scope
                .addresses
                .iter()
                .map(|addr| shared(&mut registry.endpoints, *addr, || EndpointStats::new(now)))
                .collect(),
            table: settings
                .hash
                .as_ref()
                .map(|hash| HashTable::build(hash.table, &members)),
            members: scope.members,
            locality: scope.locality,
            warmup: settings.warmup,
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
    /// Every endpoint of the port, by index.
    endpoints: Vec<Arc<EndpointStats>>,
    /// The indices this balancer chooses among.
    members: Vec<usize>,
    /// Over `members` (entry `m` is `members[m]`).
    table: Option<HashTable>,
    locality: Option<LocalityPlan>,
    warmup: Option<SlowStart>,
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
fn random_u64() -> u64 {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A random number below `bound`.
pub fn random(bound: usize) -> usize {
    (random_u64() >> 33) as usize % bound
}

impl Balancer {
    /// The index of the endpoint for a new connection or request hashing to `hash` (for
    /// consistent hashing; none: a random point, as Envoy picks), among the endpoints
    /// `eligible` allows; `None` when none is eligible. `PASSTHROUGH` picks nothing: the
    /// caller uses the original destination.
    pub fn pick(
        &self,
        hash: Option<u64>,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<(usize, ActiveGuard)> {
        self.pick_at(hash, eligible, Instant::now())
    }

    /// [`pick`](Self::pick) at `now` (the endpoints' slow start is reckoned from it).
    pub fn pick_at(
        &self,
        hash: Option<u64>,
        eligible: impl Fn(usize) -> bool,
        now: Instant,
    ) -> Option<(usize, ActiveGuard)> {
        if self.policy == LbPolicy::Passthrough {
            return None;
        }
        let usable: Vec<bool> = self
            .members
            .iter()
            .map(|i| *i < self.endpoints.len() && eligible(*i))
            .collect();
        if !usable.contains(&true) {
            return None;
        }
        let usable = self.by_locality(usable, hash);
        let candidates: Vec<usize> = (0..usable.len()).filter(|m| usable[*m]).collect();
        let weights: Option<Vec<f64>> = self.warmup.and_then(|warmup| {
            let weights: Vec<f64> = candidates
                .iter()
                .map(|m| {
                    let seen = self.endpoints[self.members[*m]].seen;
                    warmup.weight(now.saturating_duration_since(seen))
                })
                .collect();
            weights.iter().any(|w| *w < 1.0).then_some(weights)
        });
        let member = match self.policy {
            LbPolicy::Passthrough => return None,
            LbPolicy::RoundRobin => match &weights {
                Some(weights) => candidates[weighted_random(weights)],
                None => candidates[self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()],
            },
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
                // Active requests per unit of weight: a warming endpoint counts as busier.
                let load = |c: usize| {
                    let active = self.endpoints[self.members[candidates[c]]].active() as f64;
                    (active + 1.0) / weights.as_ref().map_or(1.0, |w| w[c])
                };
                if load(second) < load(first) {
                    candidates[second]
                } else {
                    candidates[first]
                }
            }
            LbPolicy::ConsistentHash => {
                let point = hash.unwrap_or_else(random_u64);
                match &self.table {
                    Some(table) => table.lookup(point, |m| usable[m])?,
                    None => candidates[random(candidates.len())],
                }
            }
        };
        let index = self.members[member];
        let endpoint = self.endpoints[index].clone();
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Some((index, ActiveGuard { endpoint }))
    }

    /// Narrows `usable` (per member) to one priority level or locality group, drawn by
    /// Envoy's priority load or the groups' weights, each scaled by the share of its
    /// endpoints still usable; a hash draws by itself, so a key stays with its level.
    fn by_locality(&self, usable: Vec<bool>, hash: Option<u64>) -> Vec<bool> {
        let draw = |bound: usize| match hash {
            Some(h) => (h % bound as u64) as usize,
            None => random(bound),
        };
        let (levels, of): (usize, Vec<Option<usize>>) = match &self.locality {
            None => return usable,
            Some(LocalityPlan::Priorities(priorities)) => (
                priorities.iter().max().map_or(0, |p| *p as usize + 1),
                priorities.iter().map(|p| Some(*p as usize)).collect(),
            ),
            Some(LocalityPlan::Weighted { weights, group }) => (weights.len(), group.clone()),
        };
        let mut counts = vec![(0usize, 0usize); levels];
        for (member, level) in of.iter().enumerate() {
            if let Some(level) = level {
                counts[*level].1 += 1;
                if usable[member] {
                    counts[*level].0 += 1;
                }
            }
        }
        let chosen = match &self.locality {
            Some(LocalityPlan::Weighted { weights, .. }) => {
                let effective: Vec<usize> = weights
                    .iter()
                    .zip(&counts)
                    .map(|(w, (healthy, total))| *w as usize * locality::health(*healthy, *total))
                    .collect();
                let sum: usize = effective.iter().sum();
                if sum == 0 {
                    return usable
                        .iter()
                        .zip(&of)
                        .map(|(u, level)| *u && level.is_some())
                        .collect();
                }
                let mut draw = draw(sum);
                effective
                    .iter()
                    .position(|w| {
                        let here = draw < *w;
                        draw = draw.saturating_sub(*w);
                        here
                    })
                    .unwrap_or(0)
            }
            _ => {
                let loads = locality::priority_loads(&counts);
                let level = locality::level_for(&loads, draw(100));
                // All unhealthy: the first level that still has a usable endpoint.
                if counts[level].0 == 0 {
                    counts.iter().position(|(h, _)| *h > 0).unwrap_or(level)
                } else {
                    level
                }
            }
        };
        usable
            .iter()
            .zip(&of)
            .map(|(u, level)| *u && *level == Some(chosen))
            .collect()
    }
}

/// An index drawn with probability proportional to its weight.
fn weighted_random(weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut point = random(1 << 30) as f64 / f64::from(1 << 30) * total;
    for (i, w) in weights.iter().enumerate() {
        if point < *w {
            return i;
        }
        point -= w;
    }
    weights.len() - 1
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::hashing::fixed_hash;

    fn keys(n: usize) -> Vec<SocketAddrV4> {
        (0..n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i as u8), 8080))
            .collect()
    }

    fn scope(addresses: &[SocketAddrV4]) -> BalancerScope<'_> {
        BalancerScope {
            addresses,
            members: (0..addresses.len()).collect(),
            locality: None,
        }
    }

    fn with(settings: LbSettings, n: usize) -> Balancer {
        LbRegistry::default().balancer("test".into(), &settings, scope(&keys(n)))
    }

    fn balancer(policy: LbPolicy, n: usize) -> Balancer {
        with(LbSettings::simple(policy), n)
    }

    fn hashing(key: HashKey, table: TableKind, n: usize) -> Balancer {
        let settings = LbSettings {
            policy: LbPolicy::ConsistentHash,
            hash: Some(ConsistentHash { key, table }),
            ..LbSettings::default()
        };
        with(settings, n)
    }

    const RING: TableKind = TableKind::RingHash {
        minimum_ring_size: 1024,
    };

    fn counts(balancer: &Balancer, n: usize, picks: usize, hold: bool) -> Vec<usize> {
        let mut counts = vec![0; n];
        let mut held = Vec::new();
        for _ in 0..picks {
            let (index, guard) = balancer.pick(None, |_| true).expect("a pick");
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
        let busy: Vec<_> = (0..50)
            .filter_map(|_| balancer.pick(None, |i| i == 0))
            .collect();
        let picks: Vec<usize> = (0..200)
            .filter_map(|_| balancer.pick(None, |_| true).map(|(i, _)| i))
            .collect();
        assert!(picks.iter().filter(|i| **i == 1).count() > 140, "{picks:?}");
        drop(busy);
    }

    #[test]
    fn source_ip_hash_is_sticky_and_moves_only_the_leaving_endpoints_clients() {
        let balancer = hashing(HashKey::SourceIp, RING, 4);
        let pick = |client: Ipv4Addr, eligible: &dyn Fn(usize) -> bool| {
            let hash = HashKey::SourceIp.connection_hash(client);
            balancer.pick(hash, eligible).map(|(i, _)| i)
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
    fn header_keys_stick_on_either_table_and_a_missing_key_spreads_at_random() {
        for table in [RING, TableKind::Maglev { table_size: 65_537 }] {
            let balancer = hashing(HashKey::Header("x-user".into()), table, 4);
            let mut owners = std::collections::BTreeSet::new();
            for user in 0..20u32 {
                let hash = Some(fixed_hash(0, format!("user-{user}").as_bytes()));
                let first = balancer.pick(hash, |_| true).map(|(i, _)| i);
                for _ in 0..10 {
                    assert_eq!(balancer.pick(hash, |_| true).map(|(i, _)| i), first);
                }
                owners.extend(first);
            }
            assert!(owners.len() > 1, "{table:?}: every user on {owners:?}");
            let unkeyed = counts(&balancer, 4, 4000, false);
            assert!(unkeyed.iter().all(|c| *c > 700), "{table:?}: {unkeyed:?}");
        }
    }

    #[test]
    fn a_subsets_table_holds_only_its_members() {
        let addresses = keys(4);
        let settings = LbSettings {
            policy: LbPolicy::ConsistentHash,
            hash: Some(ConsistentHash {
                key: HashKey::SourceIp,
                table: RING,
            }),
            ..LbSettings::default()
        };
        let subset = LbRegistry::default().balancer(
            "v2".into(),
            &settings,
            BalancerScope {
                addresses: &addresses,
                members: vec![1, 3],
                locality: None,
            },
        );
        for key in 0..100u32 {
            let (index, _) = subset
                .pick(Some(fixed_hash(0, &key.to_be_bytes())), |_| true)
                .expect("a member");
            assert!(index == 1 || index == 3, "{index}");
        }
    }

    #[test]
    fn passthrough_picks_nothing_and_eligibility_narrows_the_choice() {
        assert!(balancer(LbPolicy::Passthrough, 3)
            .pick(None, |_| true)
            .is_none());
        let balancer = balancer(LbPolicy::RoundRobin, 3);
        for _ in 0..10 {
            let (index, _) = balancer
                .pick(None, |i| i == 1)
                .expect("the subset's endpoint");
            assert_eq!(index, 1);
        }
        assert!(balancer.pick(None, |_| false).is_none());
    }

    fn by_priority(priorities: Vec<u32>, policy: LbPolicy) -> Balancer {
        let addresses = keys(priorities.len());
        LbRegistry::default().balancer(
            "locality".into(),
            &LbSettings::simple(policy),
            BalancerScope {
                addresses: &addresses,
                members: (0..addresses.len()).collect(),
                locality: Some(LocalityPlan::Priorities(priorities)),
            },
        )
    }

    #[test]
    fn locality_priorities_keep_traffic_local_until_its_endpoints_are_ejected() {
        let balancer = by_priority(vec![1, 0, 1], LbPolicy::RoundRobin);
        assert_eq!(counts(&balancer, 3, 300, false), vec![0, 300, 0]);
        // The local endpoint ejected: all of its load fails over to the next level.
        let mut spread = vec![0; 3];
        for _ in 0..300 {
            let (i, _) = balancer.pick(None, |i| i != 1).expect("a pick");
            spread[i] += 1;
        }
        assert_eq!(spread, vec![150, 0, 150]);
    }

    #[test]
    fn a_partly_ejected_priority_spills_its_overprovisioned_share() {
        // Three local endpoints, one ejected: 140 × 2/3 = 93% stays local.
        let balancer = by_priority(vec![0, 0, 0, 1], LbPolicy::Random);
        let mut remote = 0;
        for _ in 0..20_000 {
            let (i, _) = balancer.pick(None, |i| i != 0).expect("a pick");
            remote += usize::from(i == 3);
        }
        assert!(
            (1_100..=1_700).contains(&remote),
            "{remote} of 20000 (7% expected)"
        );
    }

    #[test]
    fn distribute_weights_split_by_locality_group() {
        let addresses = keys(3);
        let balancer = LbRegistry::default().balancer(
            "distribute".into(),
            &LbSettings::simple(LbPolicy::RoundRobin),
            BalancerScope {
                addresses: &addresses,
                members: vec![0, 1, 2],
                locality: Some(LocalityPlan::Weighted {
                    weights: vec![80, 20],
                    group: vec![Some(0), Some(1), None],
                }),
            },
        );
        let spread = counts(&balancer, 3, 10_000, false);
        assert_eq!(spread[2], 0, "a locality no entry names gets nothing");
        assert!((7_700..=8_300).contains(&spread[0]), "{spread:?}");
    }

    #[test]
    fn slow_start_grows_linearly_from_ten_percent_or_as_warmup_says() {
        let linear = SlowStart::linear(Duration::from_secs(60));
        assert_eq!(linear.weight(Duration::ZERO), 0.1);
        assert_eq!(linear.weight(Duration::from_secs(30)), 0.5);
        assert_eq!(linear.weight(Duration::from_secs(60)), 1.0);
        assert_eq!(linear.weight(Duration::from_secs(3)), 0.1);
        let gentle = SlowStart {
            window: Duration::from_secs(100),
            minimum_percent: 5.0,
            aggression: 2.0,
        };
        assert_eq!(gentle.weight(Duration::from_secs(25)), 0.5);
        assert_eq!(gentle.weight(Duration::ZERO), 0.05);
    }

    #[test]
    fn a_new_endpoint_warms_up_while_known_ones_keep_their_age() {
        let registry = LbRegistry::default();
        let settings = LbSettings {
            warmup: Some(SlowStart::linear(Duration::from_secs(100))),
            ..LbSettings::simple(LbPolicy::RoundRobin)
        };
        let start = Instant::now();
        let first = registry.balancer_at("web".into(), &settings, scope(&keys(1)), start);
        // A reload 50 s later adds an endpoint; the first keeps the age it had.
        let later = start + Duration::from_secs(50);
        let second = registry.balancer_at("web".into(), &settings, scope(&keys(2)), later);
        drop(first);
        // At 75 s the old endpoint weighs 0.75, the new one 0.25: a quarter of the picks.
        let at = start + Duration::from_secs(75);
        let new_picks = (0..20_000)
            .filter_map(|_| second.pick_at(None, |_| true, at).map(|(i, _)| i))
            .filter(|i| *i == 1)
            .count();
        assert!(new_picks.abs_diff(5_000) < 600, "{new_picks} of 20000");
        // Past the window, plain round robin again.
        let warm = start + Duration::from_secs(200);
        let picks: Vec<usize> = (0..4)
            .filter_map(|_| second.pick_at(None, |_| true, warm).map(|(i, _)| i))
            .collect();
        assert!(picks == [0, 1, 0, 1] || picks == [1, 0, 1, 0], "{picks:?}");
    }

    #[test]
    fn a_new_configuration_keeps_the_rotation_and_the_active_counts() {
        let registry = LbRegistry::default();
        let endpoints = keys(3);
        let settings = LbSettings::simple(LbPolicy::RoundRobin);
        let before = registry.balancer("web:80".into(), &settings, scope(&endpoints));
        let (first, held) = before.pick(None, |_| true).expect("pick");
        assert_eq!(first, 0);
        // A reload builds new balancers over the same endpoints (one more added).
        let mut grown = endpoints.clone();
        grown.push(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), 8080));
        let after = registry.balancer("web:80".into(), &settings, scope(&grown));
        drop(before);
        let (next, _) = after.pick(None, |_| true).expect("pick");
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
    fn settings_translate_istios_load_balancer() {
        let parse = |yaml: &str, outliers: bool| {
            let settings: LoadBalancerSettings = serde_norway::from_str(yaml).expect("yaml");
            LbSettings::from_istio(Some(&settings), LbPolicy::RoundRobin, outliers)
        };
        let hashed = parse(
            "consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 101}}",
            false,
        );
        assert_eq!(hashed.policy, LbPolicy::ConsistentHash);
        assert_eq!(
            hashed.hash.as_ref().map(|h| h.table),
            Some(TableKind::Maglev { table_size: 101 })
        );
        assert_eq!(
            hashed.locality, None,
            "no failover without outlier detection"
        );
        let warm = parse("{simple: LEAST_REQUEST, warmupDurationSecs: 30s}", true);
        assert_eq!(warm.policy, LbPolicy::LeastRequest);
        assert_eq!(
            warm.warmup,
            Some(SlowStart::linear(Duration::from_secs(30)))
        );
        let newer = parse(
            "{simple: ROUND_ROBIN, warmupDurationSecs: 30s, \
             warmup: {duration: 60s, minimumPercent: 20, aggression: 2}}",
            false,
        );
        assert_eq!(
            newer.warmup,
            Some(SlowStart {
                window: Duration::from_secs(60),
                minimum_percent: 20.0,
                aggression: 2.0
            }),
            "warmup wins over the deprecated warmupDurationSecs"
        );
        assert!(
            warm.locality.is_some(),
            "failover on by default with outlier detection"
        );
        let random = parse("{simple: RANDOM, warmupDurationSecs: 30s}", false);
        assert_eq!(
            random.warmup, None,
            "slow start is for round robin and least request"
        );
        assert_eq!(
            LbSettings::from_istio(None, LbPolicy::Passthrough, false),
            LbSettings::simple(LbPolicy::Passthrough)
        );
        let cookie = parse(
            "consistentHash: {httpCookie: {name: session, ttl: 60s}}\n\
             localityLbSetting: {failover: [{from: r1, to: r2}]}",
            true,
        );
        assert_eq!(
            cookie.describe(),
            "CONSISTENT_HASH; on cookie session (generated, ttl 60s), ring hash of at least \
             1024; locality failover r1 → r2"
        );
        assert_eq!(
            hashed.describe(),
            "CONSISTENT_HASH; on header x-user, maglev table of 101"
        );
        assert_eq!(
            warm.describe(),
            "LEAST_REQUEST; locality failover; warmup 30s"
        );
    }
}
