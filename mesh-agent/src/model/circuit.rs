//! Connection pool limits — Envoy's circuit breakers — as a DestinationRule's
//! `trafficPolicy.connectionPool` asks: at most `tcp.maxConnections` connections,
//! `http.http1MaxPendingRequests` requests waiting for a connection, `http.http2MaxRequests`
//! requests in flight and `http.maxRetries` retries in flight to a destination cluster
//! (host, subset, port). Over a limit the router fails the request at once with 503 and
//! Envoy's response flag `UO` (a retry over its limit is simply not made); every overflow
//! is counted. The timeouts and keepalive of the same block are carried in [`PoolLimits`]
//! for the connection code.
//!
//! Envoy counts these per upstream cluster *per proxy*, and with sidecars a proxy is one
//! client pod: `maxConnections: 100` lets every client pod open 100. One agent here serves
//! every pod of its node, so a budget is per source pod and cluster ([`BudgetKey`]): one
//! budget per cluster would divide the allowance among the node's pods, make it depend on
//! how pods are packed on nodes, and let one busy pod starve its neighbours.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use serde::Serialize;

use crate::config::{
    istio::{self, ConnectionPoolSettings},
    validate::check_connection_pool,
};

use super::outlier::{duration_or, InvalidSetting};

/// Istio's default for every count limit (2^32 − 1: no limit).
pub const UNLIMITED: u32 = u32::MAX;
/// Istio's default `tcp.connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's default `http.idleTimeout` and `tcp.idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// TCP keepalive on upstream connections; `None` fields keep the kernel's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Keepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// One destination cluster's limits, with Istio's defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolLimits {
    pub max_connections: u32,
    /// Requests waiting for a connection (Envoy's `max_pending_requests`).
    pub max_pending_requests: u32,
    /// Requests in flight, HTTP/1.1 and HTTP/2 alike (Envoy's `max_requests`).
    pub max_requests: u32,
    /// Retries in flight (Envoy's `max_retries`).
    pub max_retries: u32,
    /// Requests one upstream connection carries before it is closed; 0: no limit.
    pub max_requests_per_connection: u32,
    pub connect_timeout: Duration,
    /// An upstream HTTP connection with no request in flight this long is closed;
    /// `None`: never.
    pub http_idle_timeout: Option<Duration>,
    /// An opaque TCP connection with no bytes either way this long is closed; `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
    /// An upstream connection older than this is closed (drained); `None`: never.
    pub max_connection_duration: Option<Duration>,
    pub tcp_keepalive: Option<Keepalive>,
}

impl Default for PoolLimits {
    /// No `connectionPool` at all.
    fn default() -> Self {
        PoolLimits {
            max_connections: UNLIMITED,
            max_pending_requests: UNLIMITED,
            max_requests: UNLIMITED,
            max_retries: UNLIMITED,
            max_requests_per_connection: 0,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            http_idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            tcp_idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_connection_duration: None,
            tcp_keepalive: None,
        }
    }
}

/// A count limit (checked not to be negative); 0 means unset, as Istio passes only values
/// above 0 on to Envoy.
fn count(value: Option<i32>, unset: u32) -> u32 {
    value.filter(|n| *n > 0).map_or(unset, |n| n as u32)
}

/// A timeout where `0s` turns it off.
fn timeout(value: Option<&istio::Duration>, default: Duration) -> Option<Duration> {
    match value {
        None => Some(default),
        Some(d) if d.value.is_zero() => None,
        Some(d) => Some(d.value),
    }
}

impl PoolLimits {
    /// The limits a `connectionPool` block asks for.
    pub fn from_istio(settings: &ConnectionPoolSettings) -> Result<PoolLimits, InvalidSetting> {
        check_connection_pool(settings)?;
        let mut limits = PoolLimits::default();
        if let Some(tcp) = &settings.tcp {
            limits.max_connections = count(tcp.max_connections, UNLIMITED);
            limits.connect_timeout =
                duration_or(tcp.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT);
            limits.tcp_idle_timeout = timeout(tcp.idle_timeout.as_ref(), DEFAULT_IDLE_TIMEOUT);
            limits.max_connection_duration = tcp
                .max_connection_duration
                .as_ref()
                .map(|d| d.value)
                .filter(|d| !d.is_zero());
            limits.tcp_keepalive = tcp.tcp_keepalive.as_ref().map(|k| Keepalive {
                probes: k.probes.filter(|p| *p > 0),
                time: k.time.as_ref().map(|d| d.value).filter(|d| !d.is_zero()),
                interval: k
                    .interval
                    .as_ref()
                    .map(|d| d.value)
                    .filter(|d| !d.is_zero()),
            });
        }
        if let Some(http) = &settings.http {
            limits.max_pending_requests = count(http.http1_max_pending_requests, UNLIMITED);
            limits.max_requests = count(http.http2_max_requests, UNLIMITED);
            limits.max_retries = count(http.max_retries, UNLIMITED);
            limits.max_requests_per_connection = count(http.max_requests_per_connection, 0);
            limits.http_idle_timeout = timeout(http.idle_timeout.as_ref(), DEFAULT_IDLE_TIMEOUT);
        }
        Ok(limits)
    }

    /// Whether a connection that has carried `requests` may carry another.
    pub fn connection_reusable(&self, requests: u32) -> bool {
        self.max_requests_per_connection == 0 || requests < self.max_requests_per_connection
    }
}

/// The limit a request, retry or connection ran into, and what Envoy does then:
/// - `Requests`, `PendingRequests`: the request is answered 503 with the response flag
///   `UO` ([`Overflow::RESPONSE_FLAG`]);
/// - `Connections`: for HTTP, no new connection is opened and the request waits for one
///   of the pool's (as a pending request, so `PendingRequests` decides whether it may
///   wait); for an opaque TCP connection, the client's connection is closed (`UO`);
/// - `Retries`: the retry is not made and the last attempt's response stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Overflow {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Overflow {
    /// Envoy's response flag for an upstream overflow.
    pub const RESPONSE_FLAG: &'static str = "UO";
    /// The status the client gets.
    pub const STATUS: u16 = 503;

    const ALL: [Overflow; 4] = [
        Overflow::Connections,
        Overflow::PendingRequests,
        Overflow::Requests,
        Overflow::Retries,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overflow::Connections => "maxConnections",
            Overflow::PendingRequests => "http1MaxPendingRequests",
            Overflow::Requests => "http2MaxRequests",
            Overflow::Retries => "maxRetries",
        })
    }
}

/// Whose budget: a source pod (`namespace/name`) towards a destination cluster
/// ([`super::destination_policy::cluster_name`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetKey {
    pub source: String,
    pub cluster: String,
}

/// One source pod's use of one cluster: what is in flight now against the limits, and the
/// overflows so far. Limits change in place on reload; what is in flight stays counted.
#[derive(Debug)]
pub struct Budget {
    key: BudgetKey,
    limits: [AtomicU32; 4],
    in_use: [AtomicU32; 4],
    overflows: [AtomicU64; 4],
}

/// Something in flight under a [`Budget`]; it stops counting when dropped.
#[derive(Debug)]
#[must_use = "the permit counts only while it is held"]
pub struct Permit {
    budget: Arc<Budget>,
    kind: Overflow,
}

impl Permit {
    /// Which limit it counts against.
    pub fn kind(&self) -> Overflow {
        self.kind
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.in_use[self.kind.index()].fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    fn new(key: BudgetKey, limits: &PoolLimits) -> Budget {
        let budget = Budget {
            key,
            limits: Default::default(),
            in_use: Default::default(),
            overflows: Default::default(),
        };
        budget.set_limits(limits);
        budget
    }

    fn set_limits(&self, limits: &PoolLimits) {
        for (kind, limit) in [
            (Overflow::Connections, limits.max_connections),
            (Overflow::PendingRequests, limits.max_pending_requests),
            (Overflow::Requests, limits.max_requests),
            (Overflow::Retries, limits.max_retries),
        ] {
            self.limits[kind.index()].store(limit, Ordering::Release);
        }
    }

    fn try_acquire(self: &Arc<Self>, kind: Overflow) -> Result<Permit, Overflow> {
        let limit = self.limits[kind.index()].load(Ordering::Acquire);
        let taken =
            self.in_use[kind.index()].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Permit {
                budget: self.clone(),
                kind,
            }),
            Err(_) => {
                self.overflows[kind.index()].fetch_add(1, Ordering::Relaxed);
                Err(kind)
            }
        }
    }

    /// A request in flight (`http2MaxRequests`), held until its response ends.
    pub fn try_request(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.try_acquire(Overflow::Requests)
    }

    /// A request waiting for a connection (`http1MaxPendingRequests`), held until it has one.
    pub fn try_pending(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.try_acquire(Overflow::PendingRequests)
    }

    /// A retry in flight (`maxRetries`), held until the retry's response ends.
    pub fn try_retry(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.try_acquire(Overflow::Retries)
    }

    /// An upstream connection (`maxConnections`), held while it is open. For HTTP, an
    /// overflow means "wait for a pooled connection" (see [`Overflow`]), not a 503.
    pub fn try_connection(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.try_acquire(Overflow::Connections)
    }

    /// What is in flight, the limits and the overflows so far.
    pub fn snapshot(&self) -> BudgetSnapshot {
        let usage = |kind: Overflow| Usage {
            in_use: self.in_use[kind.index()].load(Ordering::Acquire),
            limit: self.limits[kind.index()].load(Ordering::Acquire),
            overflows: self.overflows[kind.index()].load(Ordering::Relaxed),
        };
        BudgetSnapshot {
            source: self.key.source.clone(),
            cluster: self.key.cluster.clone(),
            connections: usage(Overflow::Connections),
            pending_requests: usage(Overflow::PendingRequests),
            requests: usage(Overflow::Requests),
            retries: usage(Overflow::Retries),
        }
    }

    fn idle(&self) -> bool {
        Overflow::ALL
            .iter()
            .all(|kind| self.in_use[kind.index()].load(Ordering::Acquire) == 0)
    }
}

/// One limit's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub in_use: u32,
    pub limit: u32,
    pub overflows: u64,
}

/// One budget's state, for `meshctl routes` (pool occupancy) and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSnapshot {
    pub source: String,
    pub cluster: String,
    pub connections: Usage,
    pub pending_requests: Usage,
    pub requests: Usage,
    pub retries: Usage,
}

/// Every budget of the agent, by source pod and cluster; shared, and kept across
/// configuration swaps so that what is in flight stays counted.
#[derive(Debug, Default, Clone)]
pub struct Budgets {
    inner: Arc<Mutex<HashMap<BudgetKey, Arc<Budget>>>>,
}

impl Budgets {
    fn lock(&self) -> MutexGuard<'_, HashMap<BudgetKey, Arc<Budget>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budget of `key`, with `limits` in force (a configuration may have changed them).
    pub fn budget(&self, key: &BudgetKey, limits: &PoolLimits) -> Arc<Budget> {
        let mut budgets = self.lock();
        if let Some(budget) = budgets.get(key) {
            budget.set_limits(limits);
            return budget.clone();
        }
        let budget = Arc::new(Budget::new(key.clone(), limits));
        budgets.insert(key.clone(), budget.clone());
        budget
    }

    /// A request in flight for `key` under `limits`.
    pub fn try_request(&self, key: &BudgetKey, limits: &PoolLimits) -> Result<Permit, Overflow> {
        self.budget(key, limits).try_request()
    }

    /// A request waiting for a connection for `key` under `limits`.
    pub fn try_pending(&self, key: &BudgetKey, limits: &PoolLimits) -> Result<Permit, Overflow> {
        self.budget(key, limits).try_pending()
    }

    /// A retry in flight for `key` under `limits`.
    pub fn try_retry(&self, key: &BudgetKey, limits: &PoolLimits) -> Result<Permit, Overflow> {
        self.budget(key, limits).try_retry()
    }

    /// A connection for `key` under `limits`.
    pub fn try_connection(&self, key: &BudgetKey, limits: &PoolLimits) -> Result<Permit, Overflow> {
        self.budget(key, limits).try_connection()
    }

    /// Forgets the budgets of pods and clusters gone (`keep` says no) once nothing is in
    /// flight under them; their overflow counts go with them.
    pub fn prune(&self, keep: impl Fn(&BudgetKey) -> bool) {
        self.lock()
            .retain(|key, budget| keep(key) || !budget.idle());
    }

    /// Every budget's state, ordered by source then cluster.
    pub fn snapshot(&self) -> Vec<BudgetSnapshot> {
        let mut snapshots: Vec<BudgetSnapshot> =
            self.lock().values().map(|b| b.snapshot()).collect();
        snapshots.sort_by(|a, b| (&a.source, &a.cluster).cmp(&(&b.source, &b.cluster)));
        snapshots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(yaml: &str) -> PoolLimits {
        let settings: ConnectionPoolSettings =
            serde_norway::from_str(yaml).expect("connectionPool");
        PoolLimits::from_istio(&settings).expect("valid limits")
    }

    fn key(source: &str) -> BudgetKey {
        BudgetKey {
            source: source.into(),
            cluster: "outbound|9080||reviews.shop.svc.cluster.local".into(),
        }
    }

    #[test]
    fn istio_defaults_and_translations() {
        assert_eq!(limits("{}"), PoolLimits::default());
        let defaults = PoolLimits::default();
        assert_eq!(defaults.max_connections, 4_294_967_295);
        assert_eq!(defaults.max_retries, UNLIMITED);
        assert_eq!(defaults.connect_timeout, Duration::from_secs(10));
        assert_eq!(defaults.http_idle_timeout, Some(Duration::from_secs(3600)));
        let set = limits(
            "{tcp: {maxConnections: 1, connectTimeout: 250ms, idleTimeout: 0s, \
               tcpKeepalive: {time: 60s, probes: 3}}, \
              http: {http1MaxPendingRequests: 2, http2MaxRequests: 0, maxRetries: 4, \
               maxRequestsPerConnection: 1, idleTimeout: 30s}}",
        );
        assert_eq!(set.max_connections, 1);
        assert_eq!(set.connect_timeout, Duration::from_millis(250));
        assert_eq!(set.tcp_idle_timeout, None, "0s turns it off");
        assert_eq!(
            set.tcp_keepalive,
            Some(Keepalive {
                probes: Some(3),
                time: Some(Duration::from_secs(60)),
                interval: None
            })
        );
        assert_eq!(set.max_pending_requests, 2);
        assert_eq!(set.max_requests, UNLIMITED, "0 means unset");
        assert_eq!(set.max_retries, 4);
        assert_eq!(set.http_idle_timeout, Some(Duration::from_secs(30)));
        assert!(set.connection_reusable(0));
        assert!(
            !set.connection_reusable(1),
            "1 request per connection: no keep-alive"
        );
        assert!(defaults.connection_reusable(1_000_000));
        let bad = |yaml: &str| {
            let settings: ConnectionPoolSettings = serde_norway::from_str(yaml).expect("parses");
            PoolLimits::from_istio(&settings).map_err(|e| e.to_string())
        };
        assert_eq!(
            bad("{http: {maxRetries: -1}}"),
            Err("http.maxRetries: -1 is negative".into())
        );
        assert_eq!(
            bad("{tcp: {connectTimeout: 0s}}"),
            Err("tcp.connectTimeout: \"0s\" is shorter than 1ms".into())
        );
    }

    #[test]
    fn requests_overflow_at_exactly_the_limit_and_are_counted() {
        let budgets = Budgets::default();
        let limits = limits("{http: {http2MaxRequests: 3}}");
        let held: Vec<Permit> = (0..3)
            .map(|_| {
                budgets
                    .try_request(&key("shop/web-1"), &limits)
                    .expect("within the limit")
            })
            .collect();
        assert_eq!(
            budgets.try_request(&key("shop/web-1"), &limits).err(),
            Some(Overflow::Requests)
        );
        assert_eq!(Overflow::STATUS, 503);
        assert_eq!(Overflow::RESPONSE_FLAG, "UO");
        let snapshot = &budgets.snapshot()[0];
        assert_eq!(
            snapshot.requests,
            Usage {
                in_use: 3,
                limit: 3,
                overflows: 1
            }
        );
        drop(held);
        assert!(
            budgets.try_request(&key("shop/web-1"), &limits).is_ok(),
            "freed on drop"
        );
    }

    #[test]
    fn concurrent_requests_get_exactly_the_limit() {
        let budgets = Budgets::default();
        let limits = limits("{http: {http2MaxRequests: 50}}");
        let budget = budgets.budget(&key("shop/web-1"), &limits);
        let granted: Vec<Permit> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..100)
                            .filter_map(|_| budget.try_request().ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("worker"))
                .collect()
        });
        assert_eq!(granted.len(), 50);
        assert_eq!(budget.snapshot().requests.overflows, 350);
    }

    #[test]
    fn each_limit_is_its_own_budget() {
        let budgets = Budgets::default();
        let limits =
            limits("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRetries: 2}}");
        let budget = budgets.budget(&key("shop/web-1"), &limits);
        let _connection = budget.try_connection().expect("one connection");
        assert_eq!(budget.try_connection().err(), Some(Overflow::Connections));
        let _pending = budget.try_pending().expect("one pending");
        assert_eq!(budget.try_pending().err(), Some(Overflow::PendingRequests));
        let retries = [budget.try_retry(), budget.try_retry(), budget.try_retry()];
        assert_eq!(
            retries
                .iter()
                .map(|r| r.as_ref().err().copied())
                .collect::<Vec<_>>(),
            vec![None, None, Some(Overflow::Retries)]
        );
        assert!(budget.try_request().is_ok(), "requests are unlimited here");
        assert_eq!(Overflow::Retries.to_string(), "maxRetries");
    }

    #[test]
    fn every_source_pod_has_its_own_budget() {
        let budgets = Budgets::default();
        let limits = limits("{http: {http2MaxRequests: 1}}");
        let _first = budgets
            .try_request(&key("shop/web-1"), &limits)
            .expect("web-1");
        assert!(budgets.try_request(&key("shop/web-1"), &limits).is_err());
        assert!(
            budgets.try_request(&key("shop/web-2"), &limits).is_ok(),
            "a neighbour's use does not count"
        );
    }

    #[test]
    fn a_reload_changes_limits_in_place_and_keeps_what_is_in_flight() {
        let budgets = Budgets::default();
        let two = limits("{http: {http2MaxRequests: 2}}");
        let held = [
            budgets.try_request(&key("shop/web-1"), &two).expect("1"),
            budgets.try_request(&key("shop/web-1"), &two).expect("2"),
        ];
        let three = limits("{http: {http2MaxRequests: 3}}");
        let third = budgets
            .try_request(&key("shop/web-1"), &three)
            .expect("3 under the new limit");
        assert!(budgets.try_request(&key("shop/web-1"), &three).is_err());
        let one = limits("{http: {http2MaxRequests: 1}}");
        drop(third);
        assert!(
            budgets.try_request(&key("shop/web-1"), &one).is_err(),
            "2 in flight are over the lowered limit"
        );
        budgets.prune(|_| false);
        assert_eq!(
            budgets.snapshot().len(),
            1,
            "kept while requests are in flight"
        );
        drop(held);
        budgets.prune(|_| false);
        assert!(budgets.snapshot().is_empty());
    }
}
