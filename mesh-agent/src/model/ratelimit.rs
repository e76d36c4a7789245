//! Local rate limiting, as an `HTTPLocalRateLimitPolicy` (the mesh's own kind, modelled on
//! Linkerd's) asks: token buckets refilled at `requestsPerSecond`, holding up to `burst`
//! tokens, one token per request. A request passes when the policy's `total` bucket and
//! its client's bucket (the client's `overrides` entry, else its own `identity` bucket)
//! both have a token, and then takes one from each; otherwise it is answered `429` with
//! `Retry-After`, the seconds (rounded up) until both would have one.
//!
//! The arithmetic is in integers (a token is 10⁹ units, refilled at `requestsPerSecond`
//! units per nanosecond), so limits hold exactly at any rate. Memory is bounded: a bucket
//! that has refilled to full is the same as a new one and is dropped when room is
//! needed; past the bound the least recently used go first.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::config::{
    mesh_policy::{HttpLocalRateLimitPolicy, RateLimit},
    ClusterConfig, Resource,
};

/// Units of one token.
const UNIT: u128 = 1_000_000_000;
/// Buckets one limiter keeps by default.
pub const DEFAULT_MAX_BUCKETS: usize = 10_000;

/// A bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    pub requests_per_second: u32,
    pub burst: u32,
}

impl Rate {
    /// The rate a policy's block asks for; `None` when its values are invalid (the
    /// validator reports them).
    pub fn from_config(limit: &RateLimit) -> Option<Rate> {
        Rate::from_values(limit.requests_per_second, limit.burst)
    }

    fn from_values(requests_per_second: i64, burst: Option<i64>) -> Option<Rate> {
        let requests_per_second = u32::try_from(requests_per_second).ok().filter(|r| *r > 0)?;
        let burst = match burst {
            None => requests_per_second,
            Some(b) => u32::try_from(b).ok().filter(|b| *b > 0)?,
        };
        Some(Rate {
            requests_per_second,
            burst,
        })
    }
}

/// A client identity: the service account its mTLS certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

/// Rates for named clients, shared by all of them (one bucket per entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateOverride {
    pub clients: Vec<ServiceAccountRef>,
    pub rate: Rate,
}

/// What a policy limits: requests to a Service, or to workloads of its namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitTarget {
    Service {
        namespace: String,
        name: String,
    },
    Workloads {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
}

/// One `HTTPLocalRateLimitPolicy`, ready to check requests against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// `namespace/name` of the policy; names its buckets.
    pub policy: String,
    pub target: RateLimitTarget,
    pub total: Option<Rate>,
    pub identity: Option<Rate>,
    pub overrides: Vec<RateOverride>,
}

impl LocalRateLimit {
    /// The policy as the model uses it; `None` when it has no usable target or a rate is
    /// invalid (the validator reports which).
    pub fn from_config(resource: &Resource<HttpLocalRateLimitPolicy>) -> Option<LocalRateLimit> {
        let spec = &resource.spec;
        let namespace = resource.namespace().to_owned();
        let target = match (&spec.target_ref, &spec.selector) {
            (Some(target), None)
                if target.kind == "Service"
                    && target.namespace.as_ref().is_none_or(|n| *n == namespace) =>
            {
                RateLimitTarget::Service {
                    namespace: namespace.clone(),
                    name: target.name.clone(),
                }
            }
            (None, Some(selector)) => RateLimitTarget::Workloads {
                namespace: namespace.clone(),
                labels: selector.match_labels.clone(),
            },
            _ => return None,
        };
        let rate = |limit: &Option<RateLimit>| match limit {
            None => Some(None),
            Some(limit) => Rate::from_config(limit).map(Some),
        };
        let overrides = spec
            .overrides
            .iter()
            .map(|o| {
                let clients = o
                    .client_refs
                    .iter()
                    .filter(|c| c.kind == "ServiceAccount")
                    .map(|c| ServiceAccountRef {
                        namespace: c.namespace.clone().unwrap_or_else(|| namespace.clone()),
                        name: c.name.clone(),
                    })
                    .collect();
                Some(RateOverride {
                    clients,
                    rate: Rate::from_values(o.requests_per_second, o.burst)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(LocalRateLimit {
            policy: format!("{namespace}/{}", resource.metadata.name),
            target,
            total: rate(&spec.total)?,
            identity: rate(&spec.identity)?,
            overrides,
        })
    }

    /// Whether it limits requests to the Service `namespace/name`.
    pub fn applies_to_service(&self, namespace: &str, name: &str) -> bool {
        matches!(&self.target, RateLimitTarget::Service { namespace: n, name: s } if n == namespace && s == name)
    }

    /// Whether it limits requests to a workload of `namespace` labelled `labels`.
    pub fn applies_to_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        matches!(&self.target, RateLimitTarget::Workloads { namespace: n, labels: selector }
            if n == namespace && selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// The bucket and rate of `client` (`None`: no identity), if any applies.
    fn client_bucket(&self, client: Option<&ServiceAccountRef>) -> Option<(Scope, Rate)> {
        if let Some(client) = client {
            let entry = self
                .overrides
                .iter()
                .position(|o| o.clients.contains(client));
            if let Some(index) = entry {
                return Some((Scope::Override(index), self.overrides[index].rate));
            }
        }
        let rate = self.identity?;
        Some(match client {
            Some(client) => (Scope::Identity(client.clone()), rate),
            None => (Scope::Unauthenticated, rate),
        })
    }
}

/// Every valid `HTTPLocalRateLimitPolicy` of the configuration; of several targeting one
/// Service, the first read (the validator reports the others as ignored).
pub fn local_rate_limits(config: &ClusterConfig) -> Vec<LocalRateLimit> {
    let mut limits: Vec<LocalRateLimit> = Vec::new();
    for policy in config
        .mesh
        .http_local_rate_limits
        .iter()
        .filter_map(LocalRateLimit::from_config)
    {
        let taken = matches!(policy.target, RateLimitTarget::Service { .. })
            && limits.iter().any(|l| l.target == policy.target);
        if !taken {
            limits.push(policy);
        }
    }
    limits
}

/// Which of a policy's buckets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Total,
    Identity(ServiceAccountRef),
    /// Clients without an identity share one bucket.
    Unauthenticated,
    /// The `overrides` entry of that index.
    Override(usize),
}

/// A bucket's name: its policy, what one `total` covers (the caller's choice, e.g. the
/// destination pod, so that a policy limits each pod as Linkerd's does), and the scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub policy: String,
    pub instance: String,
    pub scope: Scope,
}

/// How long until a request would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// The status the client gets.
    pub const STATUS: u16 = 429;
    /// Envoy's response flag for a rate-limited request.
    pub const RESPONSE_FLAG: &'static str = "RL";

    /// The `Retry-After` header's value: whole seconds, rounded up, at least 1.
    pub fn seconds(&self) -> u64 {
        let whole = self.0.as_secs();
        let rounded = if self.0.subsec_nanos() > 0 {
            whole + 1
        } else {
            whole
        };
        rounded.max(1)
    }
}

#[derive(Debug)]
struct Bucket {
    /// In units of 1/[`UNIT`] token.
    tokens: u128,
    updated: Instant,
    rate: Rate,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: u128::from(rate.burst) * UNIT,
            updated: now,
            rate,
        }
    }

    fn capacity(&self) -> u128 {
        u128::from(self.rate.burst) * UNIT
    }

    /// Brings the bucket to `now` under `rate` (a new configuration may have changed it).
    fn refill(&mut self, rate: Rate, now: Instant) {
        self.rate = rate;
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        let added = elapsed.saturating_mul(u128::from(rate.requests_per_second));
        self.tokens = self.tokens.saturating_add(added).min(self.capacity());
        self.updated = self.updated.max(now);
    }

    fn has_token(&self) -> bool {
        self.tokens >= UNIT
    }

    /// Until the bucket holds a token.
    fn wait(&self) -> Duration {
        let missing = UNIT.saturating_sub(self.tokens);
        let nanos = missing.div_ceil(u128::from(self.rate.requests_per_second));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Refilled to the brim by `now`: no different from a new bucket.
    fn idle(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        let added = elapsed.saturating_mul(u128::from(self.rate.requests_per_second));
        self.tokens.saturating_add(added) >= self.capacity()
    }
}

/// Token buckets, by [`BucketKey`]; shared by the request paths of one agent.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<BucketKey, Bucket>>,
    max_buckets: usize,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(DEFAULT_MAX_BUCKETS)
    }
}

impl RateLimiter {
    /// A limiter keeping at most `max_buckets` buckets (at least 1).
    pub fn new(max_buckets: usize) -> RateLimiter {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            max_buckets: max_buckets.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<BucketKey, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a token from the bucket `key` (refilled at `rate`), or says how long until
    /// it has one.
    pub fn check(&self, key: &BucketKey, rate: Rate, now: Instant) -> Result<(), RetryAfter> {
        let mut buckets = self.lock();
        self.make_room(&mut buckets, &[key], now);
        let bucket = buckets
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(rate, now));
        bucket.refill(rate, now);
        if !bucket.has_token() {
            return Err(RetryAfter(bucket.wait()));
        }
        bucket.tokens -= UNIT;
        Ok(())
    }

    /// Checks a request to `instance` (what one `total` bucket covers) from `client`
    /// against `policy`: takes a token from its total and its client bucket, or from
    /// neither and says how long until both have one.
    pub fn check_request(
        &self,
        policy: &LocalRateLimit,
        instance: &str,
        client: Option<&ServiceAccountRef>,
        now: Instant,
    ) -> Result<(), RetryAfter> {
        let key = |scope| BucketKey {
            policy: policy.policy.clone(),
            instance: instance.to_owned(),
            scope,
        };
        let limits: Vec<(BucketKey, Rate)> = policy
            .total
            .map(|rate| (key(Scope::Total), rate))
            .into_iter()
            .chain(
                policy
                    .client_bucket(client)
                    .map(|(scope, rate)| (key(scope), rate)),
            )
            .collect();
        let mut buckets = self.lock();
        let keys: Vec<&BucketKey> = limits.iter().map(|(k, _)| k).collect();
        self.make_room(&mut buckets, &keys, now);
        let mut wait = None;
        for (key, rate) in &limits {
            let bucket = buckets
                .entry(key.clone())
                .or_insert_with(|| Bucket::full(*rate, now));
            bucket.refill(*rate, now);
            if !bucket.has_token() {
                wait = wait.max(Some(bucket.wait()));
            }
        }
        if let Some(wait) = wait {
            return Err(RetryAfter(wait));
        }
        for (key, _) in &limits {
            if let Some(bucket) = buckets.get_mut(key) {
                bucket.tokens -= UNIT;
            }
        }
        Ok(())
    }

    /// Before `needed` buckets are added: drops the full ones when the bound is reached,
    /// then, if that freed too little, the least recently used eighth (so that the scan
    /// is paid once per many insertions).
    fn make_room(
        &self,
        buckets: &mut HashMap<BucketKey, Bucket>,
        needed: &[&BucketKey],
        now: Instant,
    ) {
        let missing = needed.iter().filter(|k| !buckets.contains_key(**k)).count();
        if buckets.len() + missing <= self.max_buckets {
            return;
        }
        buckets.retain(|key, bucket| needed.contains(&key) || !bucket.idle(now));
        if buckets.len() + missing <= self.max_buckets {
            return;
        }
        let target = (self.max_buckets - self.max_buckets / 8).saturating_sub(missing);
        let mut by_age: Vec<(Instant, BucketKey)> = buckets
            .iter()
            .filter(|(key, _)| !needed.contains(key))
            .map(|(key, bucket)| (bucket.updated, key.clone()))
            .collect();
        by_age.sort_by_key(|(updated, _)| *updated);
        let excess = buckets.len().saturating_sub(target);
        for (_, key) in by_age.into_iter().take(excess) {
            buckets.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn rate(requests_per_second: u32, burst: u32) -> Rate {
        Rate {
            requests_per_second,
            burst,
        }
    }

    fn key(scope: Scope) -> BucketKey {
        BucketKey {
            policy: "shop/web".into(),
            instance: "shop/web-1".into(),
            scope,
        }
    }

    fn sa(name: &str) -> ServiceAccountRef {
        ServiceAccountRef {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn passes(results: impl Iterator<Item = Result<(), RetryAfter>>) -> usize {
        results.filter(Result::is_ok).count()
    }

    #[test]
    fn the_burst_passes_then_429_with_retry_after_until_refilled() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let rate = rate(2, 5);
        let total = key(Scope::Total);
        assert_eq!(passes((0..5).map(|_| limiter.check(&total, rate, t0))), 5);
        // Empty: a token every 500 ms.
        assert_eq!(
            limiter.check(&total, rate, t0),
            Err(RetryAfter(Duration::from_millis(500)))
        );
        let at = t0 + Duration::from_millis(200);
        let refused = limiter.check(&total, rate, at).expect_err("still empty");
        assert_eq!(refused, RetryAfter(Duration::from_millis(300)));
        assert_eq!(refused.seconds(), 1, "rounded up");
        let at = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check(&total, rate, at), Ok(()));
        assert!(limiter.check(&total, rate, at).is_err());
        // Ten seconds idle refill only up to the burst.
        let later = at + Duration::from_secs(10);
        assert_eq!(
            passes((0..7).map(|_| limiter.check(&total, rate, later))),
            5
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let slow = rate(1, 1);
        let one = key(Scope::Unauthenticated);
        limiter.check(&one, slow, t0).expect("the burst");
        let refused = limiter.check(&one, slow, t0).expect_err("empty");
        assert_eq!((refused.0, refused.seconds()), (Duration::from_secs(1), 1));
        let refused = limiter
            .check(&one, slow, t0 + Duration::from_millis(1))
            .expect_err("still empty");
        assert_eq!(refused.seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(2001)).seconds(), 3);
        assert_eq!(RetryAfter(Duration::ZERO).seconds(), 1);
        assert_eq!(RetryAfter::STATUS, 429);
    }

    #[test]
    fn a_steady_rate_passes_exactly_requests_per_second() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let rate = rate(100, 1);
        let total = key(Scope::Total);
        // 1000 requests a second for 3 s, after the first burst token: 100 per second.
        let passed = passes(
            (1..=3000).map(|ms| limiter.check(&total, rate, t0 + Duration::from_millis(ms))),
        );
        assert_eq!(passed, 300);
    }

    fn load_policy(yaml: &str) -> LocalRateLimit {
        let config = crate::config::load_str(Path::new("test.yaml"), yaml);
        local_rate_limits(&config).pop().expect("a valid policy")
    }

    #[test]
    fn the_first_policy_for_a_service_wins_and_invalid_ones_are_left_out() {
        let config = crate::config::load_str(
            Path::new("test.yaml"),
            &format!(
                "{POLICY}---\n{}---\n{}",
                POLICY.replace(
                    "name: web, namespace: shop",
                    "name: second, namespace: shop"
                ),
                POLICY
                    .replace("name: web, namespace: shop", "name: bad, namespace: shop")
                    .replace("{kind: Service, name: web}", "{kind: Service, name: api}")
                    .replace("requestsPerSecond: 10", "requestsPerSecond: 0"),
            ),
        );
        let names: Vec<String> = local_rate_limits(&config)
            .into_iter()
            .map(|l| l.policy)
            .collect();
        assert_eq!(names, vec!["shop/web"]);
    }

    const POLICY: &str = "\
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  total: {requestsPerSecond: 10, burst: 4}
  identity: {requestsPerSecond: 1, burst: 2}
  overrides:
  - requestsPerSecond: 5
    burst: 3
    clientRefs:
    - {kind: ServiceAccount, name: batch}
    - {kind: ServiceAccount, name: cron, namespace: ops}
";

    #[test]
    fn policies_are_read_with_their_targets_and_defaults() {
        let policy = load_policy(POLICY);
        assert_eq!(policy.policy, "shop/web");
        assert!(policy.applies_to_service("shop", "web"));
        assert!(!policy.applies_to_service("other", "web"));
        assert_eq!(policy.total, Some(rate(10, 4)));
        assert_eq!(
            policy.overrides[0].clients,
            vec![
                sa("batch"),
                ServiceAccountRef {
                    namespace: "ops".into(),
                    name: "cron".into()
                }
            ]
        );
        let selected = load_policy(
            "apiVersion: policy.mesh.dev/v1alpha1\nkind: HTTPLocalRateLimitPolicy\n\
             metadata: {name: api, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: api}}, total: {requestsPerSecond: 50}}\n",
        );
        assert_eq!(
            selected.total,
            Some(rate(50, 50)),
            "burst defaults to the rate"
        );
        let labels = BTreeMap::from([("app".to_owned(), "api".to_owned())]);
        assert!(selected.applies_to_workload("shop", &labels));
        assert!(!selected.applies_to_workload("shop", &BTreeMap::new()));
    }

    #[test]
    fn each_identity_has_its_own_bucket_under_the_total() {
        let policy = load_policy(POLICY);
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let check = |client: Option<&ServiceAccountRef>| {
            limiter.check_request(&policy, "shop/web-1", client, t0)
        };
        // Each identity: burst 2.
        assert_eq!(passes((0..3).map(|_| check(Some(&sa("a"))))), 2);
        assert_eq!(
            check(Some(&sa("a"))),
            Err(RetryAfter(Duration::from_secs(1))),
            "one identity token a second"
        );
        assert_eq!(passes((0..3).map(|_| check(Some(&sa("b"))))), 2);
        // The total (burst 4) is now spent, for everyone.
        assert_eq!(
            check(Some(&sa("c"))),
            Err(RetryAfter(Duration::from_millis(100))),
            "ten total tokens a second"
        );
        // A refused request took nothing: 100 ms later the total has one token for c.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(
            limiter.check_request(&policy, "shop/web-1", Some(&sa("c")), later),
            Ok(())
        );
        // Another instance has its own total.
        assert_eq!(
            limiter.check_request(&policy, "shop/web-2", Some(&sa("a")), t0),
            Ok(())
        );
    }

    #[test]
    fn overrides_replace_the_identity_limit_and_share_one_bucket() {
        let mut policy = load_policy(POLICY);
        policy.total = None;
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let cron = ServiceAccountRef {
            namespace: "ops".into(),
            name: "cron".into(),
        };
        let check = |client: &ServiceAccountRef| {
            limiter.check_request(&policy, "shop/web-1", Some(client), t0)
        };
        assert_eq!(passes((0..2).map(|_| check(&sa("batch")))), 2);
        assert_eq!(
            passes((0..5).map(|_| check(&cron))),
            1,
            "burst 3 shared with batch"
        );
        // Clients without an identity share the identity rate.
        let anonymous = || limiter.check_request(&policy, "shop/web-1", None, t0);
        assert_eq!(passes((0..5).map(|_| anonymous())), 2);
    }

    #[test]
    fn memory_is_bounded_and_full_buckets_go_first() {
        let limiter = RateLimiter::new(8);
        let t0 = Instant::now();
        let rate = rate(1, 1);
        for i in 0..8 {
            limiter
                .check(&key(Scope::Identity(sa(&format!("c{i}")))), rate, t0)
                .expect("a new client's first request");
        }
        assert_eq!(limiter.len(), 8);
        // One second on, every bucket is full again: a ninth client makes them all go.
        let later = t0 + Duration::from_secs(1);
        limiter
            .check(&key(Scope::Identity(sa("c8"))), rate, later)
            .expect("first request");
        assert_eq!(limiter.len(), 1);
        // With no full bucket to drop, the least recently used eighth goes.
        for i in 0..7 {
            limiter
                .check(
                    &key(Scope::Identity(sa(&format!("d{i}")))),
                    rate,
                    later + Duration::from_millis(i),
                )
                .expect("first request");
        }
        assert_eq!(limiter.len(), 8);
        limiter
            .check(
                &key(Scope::Identity(sa("e"))),
                rate,
                later + Duration::from_millis(10),
            )
            .expect("first request");
        assert!(limiter.len() <= 8, "{}", limiter.len());
        assert!(
            limiter
                .check(
                    &key(Scope::Identity(sa("d6"))),
                    rate,
                    later + Duration::from_millis(10)
                )
                .is_err(),
            "a recent bucket was kept"
        );
    }
}
