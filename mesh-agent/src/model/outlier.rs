//! Outlier detection, as a DestinationRule's `trafficPolicy.outlierDetection` asks and as
//! Envoy does it for Istio's sidecars: passive health checking of each endpoint of a
//! destination cluster (host, subset, port) from the outcomes of the requests sent to it.
//!
//! - An endpoint is ejected the moment its count of consecutive 5xx responses reaches
//!   `consecutive5xxErrors`, its consecutive gateway errors (502, 503, 504) reach
//!   `consecutiveGatewayErrors`, or — with `splitExternalLocalOriginErrors` — its
//!   consecutive local-origin failures (connect failure, reset, timeout) reach
//!   `consecutiveLocalOriginFailures`. Without the split, a local-origin failure counts
//!   as the status Envoy maps it to: 503 for a connect failure or reset, 504 for a timeout.
//! - An ejection is refused when it would leave more than `maxEjectionPercent` of the
//!   cluster ejected, counting the endpoint being ejected (Envoy since 1.27, which Istio
//!   runs: with the default 10%, a cluster of fewer than 10 endpoints ejects none).
//! - Ejections end on the detection `interval`'s sweep: the first sweep at least
//!   `baseEjectionTime` × k after the ejection, k growing by one with each ejection and
//!   capped so that no ejection lasts more than Envoy's `max_ejection_time` (300 s, or
//!   the base time if longer); k shrinks by one at each sweep the endpoint spends back in
//!   service, counting from the second.
//! - When fewer than `minHealthPercent` of the endpoints are in service, detection is
//!   ignored and every endpoint is eligible (Envoy's panic threshold, which Istio sets
//!   from this field).
//!
//! Everything is computed from the `Instant`s the caller passes, with the sweeps laid on
//! a grid from the tracker's creation, so the state is exact without a timer task.
//! Trackers are shared by every client pod of the node (one detector per destination
//! cluster, as an ambient waypoint has, rather than one per client as sidecars have:
//! a node's pods pool what they learn of an endpoint) and outlive configuration swaps
//! ([`OutlierRegistry`]).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, Instant},
};

use serde::Serialize;

pub use crate::config::validate::InvalidSetting;
use crate::config::{
    istio::{self, OutlierDetection},
    validate::check_outlier_detection,
};

/// Istio's default `consecutive5xxErrors`.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// Envoy's `consecutive_local_origin_failure`, which Istio keeps when its field is unset.
pub const DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURES: u32 = 5;
/// Istio's default `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Istio's default `baseEjectionTime`.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Envoy's default `max_ejection_time` (Istio does not set it).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Envoy's default `max_ejection_percent`, which Istio keeps when its field is 0 or unset.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// The detection parameters for one destination cluster, with Istio's defaults applied.
/// A threshold of 0 disables that kind of ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSettings {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub split_external_local_origin_errors: bool,
    /// Counted only when `split_external_local_origin_errors`.
    pub consecutive_local_origin_failures: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Default for OutlierSettings {
    /// What an empty `outlierDetection: {}` means.
    fn default() -> Self {
        OutlierSettings {
            consecutive_5xx: DEFAULT_CONSECUTIVE_5XX,
            consecutive_gateway_errors: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failures: DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURES,
            interval: DEFAULT_INTERVAL,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            min_health_percent: 0,
        }
    }
}

/// The duration set, or the default.
pub(crate) fn duration_or(value: Option<&istio::Duration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.value)
}

impl OutlierSettings {
    /// The settings an `outlierDetection` block asks for, translated as Istio translates
    /// them for Envoy.
    pub fn from_istio(detection: &OutlierDetection) -> Result<OutlierSettings, InvalidSetting> {
        check_outlier_detection(detection)?;
        let deprecated_errors = detection
            .consecutive_errors
            .filter(|n| *n > 0)
            .map(|n| n as u32);
        // Istio reads the deprecated `consecutiveErrors` as gateway errors only, and turns
        // the 5xx count off unless `consecutive5xxErrors` is set as well (istio/api#617).
        let consecutive_5xx =
            detection
                .consecutive_5xx_errors
                .unwrap_or(if deprecated_errors.is_some() {
                    0
                } else {
                    DEFAULT_CONSECUTIVE_5XX
                });
        let consecutive_gateway_errors = detection
            .consecutive_gateway_errors
            .or(deprecated_errors)
            .unwrap_or(0);
        // Istio passes the field on only when it is above 0; Envoy's default remains.
        let consecutive_local_origin_failures = detection
            .consecutive_local_origin_failures
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURES);
        let interval = duration_or(detection.interval.as_ref(), DEFAULT_INTERVAL);
        let base_ejection_time = duration_or(
            detection.base_ejection_time.as_ref(),
            DEFAULT_BASE_EJECTION_TIME,
        );
        // Checked to be 0 to 100; Istio passes 0 on as unset.
        let max_ejection_percent = detection
            .max_ejection_percent
            .filter(|p| *p > 0)
            .map_or(DEFAULT_MAX_EJECTION_PERCENT, |p| p as u32);
        let min_health_percent = detection.min_health_percent.map_or(0, |p| p as u32);
        Ok(OutlierSettings {
            consecutive_5xx,
            consecutive_gateway_errors,
            split_external_local_origin_errors: detection
                .split_external_local_origin_errors
                .unwrap_or(false),
            consecutive_local_origin_failures,
            interval,
            base_ejection_time,
            // Envoy: "the default value (300 s) or base_ejection_time, whichever is larger".
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME.max(base_ejection_time),
            max_ejection_percent,
            min_health_percent,
        })
    }
}

/// How one attempt on an endpoint went, as the router reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this HTTP status (for gRPC, the HTTP status).
    Status(u16),
    /// The connection to the endpoint was made; the request's own outcome follows. Resets
    /// only the local-origin count (and only matters with the split).
    Connected,
    /// An opaque TCP connection was made: that is the whole outcome, a success.
    TcpConnected,
    /// Could not connect, or the connection was reset before a response.
    ConnectFailure,
    /// No response within the timeout.
    Timeout,
}

impl Outcome {
    /// A gRPC response's outcome: Envoy's router counts its `grpc-status` as the HTTP
    /// status gRPC maps it to (UNAVAILABLE → 503, DEADLINE_EXCEEDED → 504, INTERNAL → 500,
    /// …) unless the HTTP status itself is already a 5xx.
    pub fn grpc(http_status: u16, grpc_status: u32) -> Outcome {
        if (500..600).contains(&http_status) {
            return Outcome::Status(http_status);
        }
        Outcome::Status(match grpc_status {
            0 => 200,
            1 => 499,
            3 | 9 | 11 => 400,
            4 => 504,
            5 => 404,
            6 | 10 => 409,
            7 => 403,
            8 => 429,
            12 => 501,
            14 => 503,
            16 => 401,
            // UNKNOWN, INTERNAL, DATA_LOSS and codes gRPC does not define.
            _ => 500,
        })
    }
}

/// Why an endpoint was ejected; serialised as Envoy names the ejection types in its stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EjectionReason {
    #[serde(rename = "consecutive_5xx")]
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

impl EjectionReason {
    /// Envoy's name of the ejection type, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectionReason::Consecutive5xx => "consecutive_5xx",
            EjectionReason::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionReason::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Ejection {
    at: Instant,
    duration: Duration,
}

/// What is known of one endpoint (Envoy's host monitor).
#[derive(Debug, Default)]
struct Monitor {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local_origin: u32,
    ejection: Option<Ejection>,
    /// The multiple of the base ejection time the last ejection lasted.
    backoff: u32,
    /// The sweep that ended the last ejection: the backoff shrinks from there.
    returned_at: Option<Instant>,
    times_ejected: u64,
    last_reason: Option<EjectionReason>,
}

/// The sweep grid: sweeps at `epoch + k × interval`, k ≥ 1.
#[derive(Debug, Clone, Copy)]
struct Sweeps {
    epoch: Instant,
    interval: Duration,
}

impl Sweeps {
    fn nanos(duration: Duration) -> u128 {
        duration.as_nanos().max(1)
    }

    fn at(&self, k: u128) -> Instant {
        let nanos = u64::try_from(k.saturating_mul(Self::nanos(self.interval))).unwrap_or(u64::MAX);
        self.epoch + Duration::from_nanos(nanos)
    }

    /// The first sweep at or after `t`.
    fn at_or_after(&self, t: Instant) -> Instant {
        let since = Self::nanos(t.saturating_duration_since(self.epoch));
        let interval = Self::nanos(self.interval);
        self.at(since.div_ceil(interval).max(1))
    }

    /// The last sweep at or before `t`, if there has been one.
    fn at_or_before(&self, t: Instant) -> Option<Instant> {
        let k = t.saturating_duration_since(self.epoch).as_nanos() / Self::nanos(self.interval);
        (k >= 1).then(|| self.at(k))
    }
}

impl Monitor {
    /// Ends the ejection if a sweep up to `now` has ended it (and says so): counts start
    /// again from zero, as Envoy resets them on return.
    fn catch_up(&mut self, sweeps: Sweeps, now: Instant) -> bool {
        let Some(ejection) = self.ejection else {
            return false;
        };
        let end = sweeps.at_or_after(ejection.at + ejection.duration);
        if end > now {
            return false;
        }
        self.ejection = None;
        self.returned_at = Some(end);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local_origin = 0;
        true
    }

    /// The backoff multiplier at `now`: down by one for every sweep at least one interval
    /// after the return to service.
    fn backoff_at(&self, sweeps: Sweeps, now: Instant) -> u32 {
        match (self.ejection, self.returned_at, sweeps.at_or_before(now)) {
            (None, Some(returned), Some(last_sweep)) => {
                let decays = last_sweep.saturating_duration_since(returned).as_nanos()
                    / Sweeps::nanos(sweeps.interval);
                self.backoff
                    .saturating_sub(u32::try_from(decays).unwrap_or(u32::MAX))
            }
            _ => self.backoff,
        }
    }

    /// Counts `outcome`; the reason to eject when a count has just reached its threshold
    /// (reached, not passed: Envoy ejects on the error that makes the count equal the
    /// threshold, so a refused ejection is not retried until the count starts again).
    fn count(&mut self, outcome: Outcome, settings: &OutlierSettings) -> Option<EjectionReason> {
        let split = settings.split_external_local_origin_errors;
        let status = match outcome {
            Outcome::Status(status) => status,
            Outcome::TcpConnected if split => {
                self.consecutive_local_origin = 0;
                200
            }
            Outcome::TcpConnected => 200,
            Outcome::Connected => {
                self.consecutive_local_origin = 0;
                return None;
            }
            Outcome::ConnectFailure | Outcome::Timeout if split => {
                self.consecutive_local_origin += 1;
                let threshold = settings.consecutive_local_origin_failures;
                return (threshold > 0 && self.consecutive_local_origin == threshold)
                    .then_some(EjectionReason::ConsecutiveLocalOriginFailure);
            }
            Outcome::ConnectFailure => 503,
            Outcome::Timeout => 504,
        };
        if !(500..600).contains(&status) {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return None;
        }
        let mut reason = None;
        if matches!(status, 502..=504) {
            self.consecutive_gateway += 1;
            let threshold = settings.consecutive_gateway_errors;
            if threshold > 0 && self.consecutive_gateway == threshold {
                reason = Some(EjectionReason::ConsecutiveGatewayFailure);
            }
        } else {
            self.consecutive_gateway = 0;
        }
        self.consecutive_5xx += 1;
        let threshold = settings.consecutive_5xx;
        if threshold > 0 && self.consecutive_5xx == threshold {
            reason = Some(EjectionReason::Consecutive5xx);
        }
        reason
    }
}

#[derive(Debug)]
struct TrackerState {
    settings: OutlierSettings,
    epoch: Instant,
    monitors: HashMap<SocketAddrV4, Monitor>,
    /// Monitors with an ejection not yet caught up with: none means none is ejected,
    /// whatever the time, which spares the request path a walk over the monitors.
    ejected: usize,
    ejections_enforced: u64,
    /// Ejections refused by `maxEjectionPercent` (Envoy's `ejections_overflow`).
    ejections_overflow: u64,
}

impl TrackerState {
    fn sweeps(&self) -> Sweeps {
        Sweeps {
            epoch: self.epoch,
            interval: self.settings.interval,
        }
    }

    /// Returns to service every endpoint whose ejection has ended by `now`.
    fn catch_up(&mut self, now: Instant) {
        if self.ejected == 0 {
            return;
        }
        let sweeps = self.sweeps();
        for monitor in self.monitors.values_mut() {
            if monitor.catch_up(sweeps, now) {
                self.ejected -= 1;
            }
        }
    }

    /// The monitor of `endpoint`, caught up with `now`.
    fn monitor(&mut self, endpoint: SocketAddrV4, now: Instant) -> Option<&mut Monitor> {
        let sweeps = self.sweeps();
        let monitor = self.monitors.get_mut(&endpoint)?;
        if monitor.catch_up(sweeps, now) {
            self.ejected -= 1;
        }
        Some(monitor)
    }

    /// Whether detection is set aside because too few endpoints are in service (after
    /// [`Self::catch_up`]).
    fn panicking(&self) -> bool {
        let total = self.monitors.len();
        let healthy = total - self.ejected;
        total > 0 && healthy * 100 < self.settings.min_health_percent as usize * total
    }
}

/// The outlier detector of one destination cluster: a monitor per endpoint address.
#[derive(Debug)]
pub struct OutlierTracker {
    cluster: String,
    state: Mutex<TrackerState>,
}

impl OutlierTracker {
    /// A tracker on its own (the registry makes shared ones), its sweeps counted from `now`.
    pub fn new(
        cluster: String,
        settings: OutlierSettings,
        endpoints: &[SocketAddrV4],
        now: Instant,
    ) -> OutlierTracker {
        let tracker = OutlierTracker {
            cluster,
            state: Mutex::new(TrackerState {
                settings,
                epoch: now,
                monitors: HashMap::new(),
                ejected: 0,
                ejections_enforced: 0,
                ejections_overflow: 0,
            }),
        };
        tracker.update(settings, endpoints);
        tracker
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn settings(&self) -> OutlierSettings {
        self.lock().settings
    }

    /// Takes a new configuration: new settings, and the cluster's endpoints now. Endpoints
    /// that stay keep their state; departed ones are forgotten. Meant for configuration
    /// time (it visits every endpoint), not for each request.
    pub fn update(&self, settings: OutlierSettings, endpoints: &[SocketAddrV4]) {
        let current: HashSet<&SocketAddrV4> = endpoints.iter().collect();
        let mut state = self.lock();
        state.settings = settings;
        state.monitors.retain(|addr, _| current.contains(addr));
        for addr in endpoints {
            state.monitors.entry(*addr).or_default();
        }
        state.ejected = state
            .monitors
            .values()
            .filter(|m| m.ejection.is_some())
            .count();
    }

    /// Counts the outcome of an attempt on `endpoint`; the reason, when it ejected the
    /// endpoint. Outcomes of endpoints not in the cluster (any more) are ignored.
    pub fn record(
        &self,
        endpoint: SocketAddrV4,
        outcome: Outcome,
        now: Instant,
    ) -> Option<EjectionReason> {
        let mut state = self.lock();
        let (settings, sweeps) = (state.settings, state.sweeps());
        let monitor = state.monitor(endpoint, now)?;
        let reason = monitor.count(outcome, &settings)?;
        if monitor.ejection.is_some() {
            return None;
        }
        state.catch_up(now);
        let total = state.monitors.len();
        let after = state.ejected + 1;
        if after * 100 > settings.max_ejection_percent as usize * total {
            state.ejections_overflow += 1;
            return None;
        }
        let monitor = state.monitors.get_mut(&endpoint)?;
        let mut backoff = monitor.backoff_at(sweeps, now);
        // Grows until the ejection reaches the longest allowed, then stays.
        if settings.base_ejection_time.saturating_mul(backoff) < settings.max_ejection_time {
            backoff += 1;
        }
        monitor.backoff = backoff;
        monitor.ejection = Some(Ejection {
            at: now,
            duration: settings
                .base_ejection_time
                .saturating_mul(backoff)
                .min(settings.max_ejection_time),
        });
        monitor.returned_at = None;
        monitor.times_ejected += 1;
        monitor.last_reason = Some(reason);
        state.ejected += 1;
        state.ejections_enforced += 1;
        Some(reason)
    }

    /// Whether `endpoint` is ejected at `now` (panic mode aside: see [`Self::eligible`]).
    pub fn is_ejected(&self, endpoint: SocketAddrV4, now: Instant) -> bool {
        self.lock()
            .monitor(endpoint, now)
            .is_some_and(|monitor| monitor.ejection.is_some())
    }

    /// For each of `endpoints`, whether the balancer may pick it at `now`: every endpoint
    /// not ejected, or every endpoint when fewer than `minHealthPercent` of the cluster
    /// are in service. Endpoints the tracker does not know are eligible.
    pub fn eligible(&self, endpoints: &[SocketAddrV4], now: Instant) -> Vec<bool> {
        let mut state = self.lock();
        state.catch_up(now);
        if state.ejected == 0 || state.panicking() {
            return vec![true; endpoints.len()];
        }
        endpoints
            .iter()
            .map(|addr| {
                state
                    .monitors
                    .get(addr)
                    .is_none_or(|m| m.ejection.is_none())
            })
            .collect()
    }

    /// The state at `now`, for `meshctl routes` and the metrics.
    pub fn snapshot(&self, now: Instant) -> OutlierSnapshot {
        let mut state = self.lock();
        state.catch_up(now);
        let sweeps = state.sweeps();
        let mut endpoints: Vec<EndpointOutlierState> = state
            .monitors
            .iter()
            .map(|(addr, monitor)| EndpointOutlierState {
                address: *addr,
                ejected: monitor.ejection.is_some(),
                returns_in_ms: monitor.ejection.map(|ejection| {
                    let end = sweeps.at_or_after(ejection.at + ejection.duration);
                    end.saturating_duration_since(now).as_millis() as u64
                }),
                times_ejected: monitor.times_ejected,
                backoff: monitor.backoff_at(sweeps, now),
                last_reason: monitor.last_reason,
                consecutive_5xx: monitor.consecutive_5xx,
                consecutive_gateway_errors: monitor.consecutive_gateway,
                consecutive_local_origin_failures: monitor.consecutive_local_origin,
            })
            .collect();
        endpoints.sort_by_key(|e| e.address);
        OutlierSnapshot {
            cluster: self.cluster.clone(),
            ejected: state.ejected,
            panic: state.panicking(),
            ejections_enforced: state.ejections_enforced,
            ejections_overflow: state.ejections_overflow,
            endpoints,
        }
    }
}

/// One endpoint's outlier state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointOutlierState {
    pub address: SocketAddrV4,
    pub ejected: bool,
    /// Until the sweep that returns it to service.
    pub returns_in_ms: Option<u64>,
    pub times_ejected: u64,
    /// The multiple of `baseEjectionTime` the last (or current) ejection lasted, less the
    /// sweeps spent in service since.
    pub backoff: u32,
    pub last_reason: Option<EjectionReason>,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub consecutive_local_origin_failures: u32,
}

/// One cluster's outlier state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSnapshot {
    pub cluster: String,
    /// Endpoints ejected now.
    pub ejected: usize,
    /// Fewer than `minHealthPercent` in service: every endpoint is used.
    pub panic: bool,
    pub ejections_enforced: u64,
    /// Ejections `maxEjectionPercent` refused.
    pub ejections_overflow: u64,
    pub endpoints: Vec<EndpointOutlierState>,
}

/// Where trackers come from: the same [`OutlierTracker`] for the same cluster name
/// ([`super::destination_policy::cluster_name`]) from one configuration to the next, so a
/// reload neither returns ejected endpoints nor forgets error counts. Trackers no
/// configuration holds any more are dropped on [`OutlierRegistry::prune`].
#[derive(Debug, Default, Clone)]
pub struct OutlierRegistry {
    inner: Arc<Mutex<HashMap<String, Weak<OutlierTracker>>>>,
}

impl OutlierRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<OutlierTracker>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tracker of `cluster`, updated to `settings` and `endpoints`; a new one (its
    /// sweeps counted from `now`) if none is alive.
    pub fn tracker(
        &self,
        cluster: &str,
        settings: OutlierSettings,
        endpoints: &[SocketAddrV4],
        now: Instant,
    ) -> Arc<OutlierTracker> {
        let mut trackers = self.lock();
        if let Some(live) = trackers.get(cluster).and_then(Weak::upgrade) {
            live.update(settings, endpoints);
            return live;
        }
        let fresh = Arc::new(OutlierTracker::new(
            cluster.to_owned(),
            settings,
            endpoints,
            now,
        ));
        trackers.insert(cluster.to_owned(), Arc::downgrade(&fresh));
        fresh
    }

    /// The live tracker of `cluster`.
    pub fn get(&self, cluster: &str) -> Option<Arc<OutlierTracker>> {
        self.lock().get(cluster).and_then(Weak::upgrade)
    }

    /// Forgets the trackers no configuration holds any more.
    pub fn prune(&self) {
        self.lock().retain(|_, tracker| tracker.strong_count() > 0);
    }

    /// Every live tracker's state at `now`, by cluster name.
    pub fn snapshots(&self, now: Instant) -> Vec<OutlierSnapshot> {
        let trackers: Vec<Arc<OutlierTracker>> =
            self.lock().values().filter_map(Weak::upgrade).collect();
        let mut snapshots: Vec<OutlierSnapshot> =
            trackers.iter().map(|t| t.snapshot(now)).collect();
        snapshots.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        snapshots
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn endpoints(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i), 8080))
            .collect()
    }

    fn settings(yaml: &str) -> OutlierSettings {
        let detection: OutlierDetection = serde_norway::from_str(yaml).expect("outlierDetection");
        OutlierSettings::from_istio(&detection).expect("valid settings")
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A tracker over `n` endpoints whose sweeps run at whole multiples of `interval`
    /// from `t0`.
    fn new_tracker(yaml: &str, n: u8) -> (OutlierTracker, Vec<SocketAddrV4>, Instant) {
        let t0 = Instant::now();
        let endpoints = endpoints(n);
        let tracker = OutlierTracker::new("web|80".into(), settings(yaml), &endpoints, t0);
        (tracker, endpoints, t0)
    }

    fn fail(
        tracker: &OutlierTracker,
        endpoint: SocketAddrV4,
        times: u32,
        status: u16,
        at: Instant,
    ) {
        for _ in 0..times {
            tracker.record(endpoint, Outcome::Status(status), at);
        }
    }

    #[test]
    fn istio_defaults_and_translations() {
        let defaults = settings("{}");
        assert_eq!(defaults, OutlierSettings::default());
        assert_eq!(defaults.consecutive_5xx, 5);
        assert_eq!(defaults.interval, secs(10));
        assert_eq!(defaults.base_ejection_time, secs(30));
        assert_eq!(defaults.max_ejection_time, secs(300));
        assert_eq!(defaults.max_ejection_percent, 10);
        assert_eq!(defaults.min_health_percent, 0);
        assert_eq!(defaults.consecutive_gateway_errors, 0, "off unless set");
        let deprecated = settings("{consecutiveErrors: 7}");
        assert_eq!(
            (
                deprecated.consecutive_gateway_errors,
                deprecated.consecutive_5xx
            ),
            (7, 0),
            "consecutiveErrors means gateway errors only"
        );
        let long_base = settings("{baseEjectionTime: 10m, maxEjectionPercent: 0}");
        assert_eq!(long_base.max_ejection_time, secs(600));
        assert_eq!(
            long_base.max_ejection_percent, 10,
            "0 keeps Envoy's default"
        );
        let bad = |yaml: &str| {
            let detection: OutlierDetection = serde_norway::from_str(yaml).expect("parses");
            OutlierSettings::from_istio(&detection).map_err(|e| e.to_string())
        };
        assert_eq!(
            bad("{maxEjectionPercent: 101}"),
            Err("maxEjectionPercent: 101 is not a percentage (0 to 100)".into())
        );
        assert_eq!(
            bad("{interval: 500us}"),
            Err("interval: \"500us\" is shorter than 1ms".into())
        );
        assert!(bad("{minHealthPercent: -1}").is_err());
    }

    #[test]
    fn ejected_on_exactly_the_nth_consecutive_5xx_and_a_success_starts_the_count_again() {
        let (tracker, eps, t0) =
            new_tracker("{consecutive5xxErrors: 3, maxEjectionPercent: 100}", 2);
        fail(&tracker, eps[0], 2, 500, t0);
        tracker.record(eps[0], Outcome::Status(200), t0);
        fail(&tracker, eps[0], 2, 500, t0);
        assert!(
            !tracker.is_ejected(eps[0], t0),
            "2 in a row after a success"
        );
        assert_eq!(
            tracker.record(eps[0], Outcome::Status(503), t0),
            Some(EjectionReason::Consecutive5xx)
        );
        assert!(tracker.is_ejected(eps[0], t0));
        assert_eq!(tracker.eligible(&eps, t0), vec![false, true]);
        // 4xx are not server errors.
        fail(&tracker, eps[1], 10, 404, t0);
        assert!(!tracker.is_ejected(eps[1], t0));
    }

    #[test]
    fn grpc_statuses_count_as_the_http_status_they_map_to() {
        assert_eq!(Outcome::grpc(200, 0), Outcome::Status(200));
        assert_eq!(Outcome::grpc(200, 14), Outcome::Status(503));
        assert_eq!(Outcome::grpc(200, 4), Outcome::Status(504));
        assert_eq!(Outcome::grpc(200, 13), Outcome::Status(500));
        assert_eq!(Outcome::grpc(200, 5), Outcome::Status(404));
        assert_eq!(
            Outcome::grpc(502, 0),
            Outcome::Status(502),
            "an HTTP 5xx stands"
        );
        let (tracker, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, maxEjectionPercent: 100}",
            1,
        );
        tracker.record(eps[0], Outcome::grpc(200, 14), t0);
        assert_eq!(
            tracker.record(eps[0], Outcome::grpc(200, 4), t0),
            Some(EjectionReason::ConsecutiveGatewayFailure)
        );
    }

    #[test]
    fn gateway_errors_count_on_their_own_and_other_5xx_break_their_run() {
        let (tracker, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, maxEjectionPercent: 100}",
            2,
        );
        tracker.record(eps[0], Outcome::Status(502), t0);
        tracker.record(eps[0], Outcome::Status(500), t0);
        tracker.record(eps[0], Outcome::Status(504), t0);
        assert!(
            !tracker.is_ejected(eps[0], t0),
            "500 is not a gateway error"
        );
        assert_eq!(
            tracker.record(eps[0], Outcome::Timeout, t0),
            Some(EjectionReason::ConsecutiveGatewayFailure),
            "a timeout counts as 504 without the split"
        );
        fail(&tracker, eps[1], 50, 500, t0);
        assert!(!tracker.is_ejected(eps[1], t0), "5xx detection is off");
    }

    #[test]
    fn local_origin_failures_count_as_5xx_unless_split() {
        let (tracker, eps, t0) =
            new_tracker("{consecutive5xxErrors: 2, maxEjectionPercent: 100}", 2);
        tracker.record(eps[0], Outcome::ConnectFailure, t0);
        tracker.record(eps[0], Outcome::Connected, t0);
        assert_eq!(
            tracker.record(eps[0], Outcome::ConnectFailure, t0),
            Some(EjectionReason::Consecutive5xx),
            "a connection made is no success of the request"
        );
        let (split, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 2, splitExternalLocalOriginErrors: true, \
              consecutiveLocalOriginFailures: 3, maxEjectionPercent: 100}",
            2,
        );
        split.record(eps[0], Outcome::ConnectFailure, t0);
        split.record(eps[0], Outcome::Timeout, t0);
        split.record(eps[0], Outcome::Connected, t0);
        split.record(eps[0], Outcome::ConnectFailure, t0);
        split.record(eps[0], Outcome::ConnectFailure, t0);
        assert!(
            !split.is_ejected(eps[0], t0),
            "the connection reset the count"
        );
        assert_eq!(
            split.record(eps[0], Outcome::Timeout, t0),
            Some(EjectionReason::ConsecutiveLocalOriginFailure)
        );
        // Upstream 5xx count apart from local-origin failures.
        split.record(eps[1], Outcome::ConnectFailure, t0);
        split.record(eps[1], Outcome::Status(500), t0);
        assert!(!split.is_ejected(eps[1], t0));
        assert_eq!(
            split.record(eps[1], Outcome::Status(500), t0),
            Some(EjectionReason::Consecutive5xx)
        );
    }

    #[test]
    fn returned_on_the_first_sweep_after_base_times_k_and_k_grows_then_decays() {
        // Sweeps every 10 s from t0; base 30 s.
        let (tracker, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 1, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}",
            2,
        );
        let ep = eps[0];
        // First ejection at t0+5: 30 s, so until the sweep at t0+40 (35 is no sweep).
        assert!(tracker
            .record(ep, Outcome::Status(500), t0 + secs(5))
            .is_some());
        assert!(tracker.is_ejected(ep, t0 + secs(39)));
        assert!(!tracker.is_ejected(ep, t0 + secs(40)));
        // Ejected again at t0+41: 60 s, until the sweep at t0+110 (101 is no sweep).
        assert!(tracker
            .record(ep, Outcome::Status(500), t0 + secs(41))
            .is_some());
        let snapshot = tracker.snapshot(t0 + secs(50));
        assert_eq!(snapshot.endpoints[0].returns_in_ms, Some(60_000));
        assert_eq!(snapshot.endpoints[0].backoff, 2);
        assert!(tracker.is_ejected(ep, t0 + secs(109)));
        assert!(!tracker.is_ejected(ep, t0 + secs(110)));
        // Back in service from t0+110: the sweep at 120 takes k from 2 to 1, 130 to 0.
        assert_eq!(tracker.snapshot(t0 + secs(119)).endpoints[0].backoff, 2);
        assert_eq!(tracker.snapshot(t0 + secs(120)).endpoints[0].backoff, 1);
        // Ejected at t0+125 with k = 1 + 1: 60 s, until the sweep at t0+190.
        assert!(tracker
            .record(ep, Outcome::Status(500), t0 + secs(125))
            .is_some());
        assert!(tracker.is_ejected(ep, t0 + secs(189)));
        assert!(!tracker.is_ejected(ep, t0 + secs(190)));
        assert_eq!(
            tracker.snapshot(t0 + secs(190)).endpoints[0].times_ejected,
            3
        );
    }

    #[test]
    fn ejections_never_last_longer_than_the_maximum() {
        let (tracker, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 100s, maxEjectionPercent: 100}",
            1,
        );
        let mut now = t0;
        let mut lengths = Vec::new();
        for _ in 0..5 {
            assert!(tracker.record(eps[0], Outcome::Status(500), now).is_some());
            let ejected_at = now;
            while tracker.is_ejected(eps[0], now) {
                now += secs(1);
            }
            lengths.push((now - ejected_at).as_secs());
        }
        assert_eq!(lengths, vec![100, 200, 300, 300, 300]);
    }

    #[test]
    fn max_ejection_percent_counts_the_endpoint_being_ejected() {
        // 10 endpoints, 20%: two may be out at once; the default 10% of 5 endpoints: none.
        let (tracker, eps, t0) =
            new_tracker("{consecutive5xxErrors: 1, maxEjectionPercent: 20}", 10);
        for ep in &eps[..3] {
            tracker.record(*ep, Outcome::Status(500), t0);
        }
        let eligible = tracker.eligible(&eps, t0);
        assert_eq!(eligible.iter().filter(|e| !**e).count(), 2);
        assert!(eligible[2], "the third was refused");
        let snapshot = tracker.snapshot(t0);
        assert_eq!((snapshot.ejected, snapshot.ejections_overflow), (2, 1));
        let (small, eps, t0) = new_tracker("{consecutive5xxErrors: 1}", 5);
        assert_eq!(small.record(eps[0], Outcome::Status(500), t0), None);
        assert!(!small.is_ejected(eps[0], t0));
    }

    #[test]
    fn below_min_health_percent_every_endpoint_is_eligible() {
        let (tracker, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 1, maxEjectionPercent: 100, minHealthPercent: 50}",
            4,
        );
        tracker.record(eps[0], Outcome::Status(500), t0);
        tracker.record(eps[1], Outcome::Status(500), t0);
        assert_eq!(
            tracker.eligible(&eps, t0),
            vec![false, false, true, true],
            "50% in service"
        );
        tracker.record(eps[2], Outcome::Status(500), t0);
        assert_eq!(
            tracker.eligible(&eps, t0),
            vec![true; 4],
            "25% < 50%: panic"
        );
        assert!(tracker.snapshot(t0).panic);
        assert!(
            tracker.is_ejected(eps[2], t0),
            "still ejected, merely not honoured"
        );
        // Without a minimum, an all-ejected cluster has no eligible endpoint (503 UH).
        let (strict, eps, t0) =
            new_tracker("{consecutive5xxErrors: 1, maxEjectionPercent: 100}", 1);
        strict.record(eps[0], Outcome::Status(500), t0);
        assert_eq!(strict.eligible(&eps, t0), vec![false]);
    }

    #[test]
    fn returns_seen_one_endpoint_at_a_time_keep_the_ejected_count_right() {
        let (tracker, eps, t0) = new_tracker(
            "{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 10s, maxEjectionPercent: 100}",
            3,
        );
        tracker.record(eps[0], Outcome::Status(500), t0);
        tracker.record(eps[1], Outcome::Status(500), t0 + secs(5));
        assert!(
            !tracker.is_ejected(eps[0], t0 + secs(10)),
            "back at its sweep"
        );
        assert_eq!(
            tracker.eligible(&eps, t0 + secs(10)),
            vec![true, false, true]
        );
        assert_eq!(tracker.snapshot(t0 + secs(10)).ejected, 1);
        assert_eq!(tracker.eligible(&eps, t0 + secs(15)), vec![true; 3]);
        assert_eq!(tracker.snapshot(t0 + secs(15)).ejected, 0);
    }

    #[test]
    fn a_reload_keeps_ejections_and_counts_and_forgets_departed_endpoints() {
        let registry = OutlierRegistry::default();
        let t0 = Instant::now();
        let eps = endpoints(3);
        let yaml = "{consecutive5xxErrors: 2, maxEjectionPercent: 100}";
        let before = registry.tracker("web|80", settings(yaml), &eps, t0);
        fail(&before, eps[0], 2, 500, t0);
        before.record(eps[1], Outcome::Status(500), t0);
        let after = registry.tracker("web|80", settings(yaml), &eps[..2], t0 + secs(1));
        drop(before);
        assert!(after.is_ejected(eps[0], t0 + secs(1)));
        assert_eq!(
            after.record(eps[1], Outcome::Status(500), t0 + secs(1)),
            Some(EjectionReason::Consecutive5xx),
            "the count carried over"
        );
        let snapshot = &registry.snapshots(t0 + secs(1))[0];
        assert_eq!(snapshot.endpoints.len(), 2, "the departed endpoint is gone");
        drop(after);
        registry.prune();
        assert!(registry.get("web|80").is_none());
    }

    #[test]
    fn snapshot_serialises_for_meshctl() {
        let (tracker, eps, t0) =
            new_tracker("{consecutive5xxErrors: 1, maxEjectionPercent: 100}", 1);
        tracker.record(eps[0], Outcome::Status(500), t0);
        let json = serde_json::to_value(tracker.snapshot(t0)).expect("json");
        assert_eq!(json["endpoints"][0]["address"], "10.244.1.1:8080");
        assert_eq!(json["endpoints"][0]["ejected"], true);
        assert_eq!(json["endpoints"][0]["lastReason"], "consecutive_5xx");
        assert_eq!(json["endpoints"][0]["returnsInMs"], 30_000);
    }
}
