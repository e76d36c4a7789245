//! The traffic policy a DestinationRule gives one destination (host, subset, port), merged
//! the way Istio's control plane merges it before it programs Envoy: the rule's
//! `trafficPolicy`, then its `portLevelSettings` for the port, then the subset's
//! `trafficPolicy` field by field, then the subset's `portLevelSettings` for the port.
//! A port-level entry replaces all four settings it can carry, set or not: Istio documents
//! that port-level settings do not inherit, unset ones fall back to the defaults.
//! Also the name of such a destination cluster ([`cluster_name`]).

use crate::config::istio::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings,
    OutlierDetection, TrafficPolicy,
};

/// The name of a destination cluster, as Istio names Envoy's clusters (and as its
/// metrics and `istioctl proxy-config` show them): `outbound|9080|v2|reviews.shop.svc.cluster.local`,
/// the subset empty for the whole host. Outlier trackers and pool budgets are keyed by it.
pub fn cluster_name(hostname: &str, subset: Option<&str>, port: u16) -> String {
    format!("outbound|{port}|{}|{hostname}", subset.unwrap_or_default())
}

/// The settings in force for one destination; `None` where nothing is configured (the
/// built-in default applies).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EffectivePolicy<'a> {
    pub load_balancer: Option<&'a LoadBalancerSettings>,
    pub connection_pool: Option<&'a ConnectionPoolSettings>,
    pub outlier_detection: Option<&'a OutlierDetection>,
    pub tls: Option<&'a ClientTlsSettings>,
}

impl<'a> EffectivePolicy<'a> {
    /// What `rule` says for its `subset` (none: the whole host) on `port`. An unknown subset
    /// gets the host's policy.
    pub fn resolve(rule: &'a DestinationRule, subset: Option<&str>, port: u16) -> Self {
        let mut effective = EffectivePolicy::default();
        if let Some(policy) = &rule.traffic_policy {
            effective.override_with(policy, port);
        }
        let subset_policy = subset
            .and_then(|name| rule.subsets.iter().find(|s| s.name == name))
            .and_then(|s| s.traffic_policy.as_ref());
        if let Some(policy) = subset_policy {
            effective.override_with(policy, port);
        }
        effective
    }

    /// Fields `policy` sets replace ours; then its port-level entry for `port`, if any,
    /// replaces all of them.
    fn override_with(&mut self, policy: &'a TrafficPolicy, port: u16) {
        self.load_balancer = policy.load_balancer.as_ref().or(self.load_balancer);
        self.connection_pool = policy.connection_pool.as_ref().or(self.connection_pool);
        self.outlier_detection = policy.outlier_detection.as_ref().or(self.outlier_detection);
        self.tls = policy.tls.as_ref().or(self.tls);
        let port_level = policy.port_level_settings.iter().find(|p| {
            p.port
                .as_ref()
                .and_then(|selector| selector.number)
                .is_some_and(|number| number == u32::from(port))
        });
        if let Some(port_level) = port_level {
            *self = EffectivePolicy {
                load_balancer: port_level.load_balancer.as_ref(),
                connection_pool: port_level.connection_pool.as_ref(),
                outlier_detection: port_level.outlier_detection.as_ref(),
                tls: port_level.tls.as_ref(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> DestinationRule {
        serde_norway::from_str(yaml).expect("a DestinationRule spec")
    }

    const RULE: &str = "
host: reviews
trafficPolicy:
  outlierDetection: {consecutive5xxErrors: 1}
  connectionPool: {tcp: {maxConnections: 10}}
  portLevelSettings:
  - port: {number: 9443}
    outlierDetection: {consecutive5xxErrors: 2}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 20}}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    portLevelSettings:
    - port: {number: 9080}
      connectionPool: {tcp: {maxConnections: 30}}
";

    fn consecutive_5xx(policy: &EffectivePolicy) -> Option<u32> {
        policy
            .outlier_detection
            .and_then(|o| o.consecutive_5xx_errors)
    }

    fn max_connections(policy: &EffectivePolicy) -> Option<i32> {
        policy
            .connection_pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.max_connections)
    }

    #[test]
    fn clusters_are_named_as_istio_names_them() {
        assert_eq!(
            cluster_name("reviews.shop.svc.cluster.local", Some("v2"), 9080),
            "outbound|9080|v2|reviews.shop.svc.cluster.local"
        );
        assert_eq!(
            cluster_name("api.example.com", None, 443),
            "outbound|443||api.example.com"
        );
    }

    #[test]
    fn the_host_policy_applies_where_nothing_overrides_it() {
        let rule = rule(RULE);
        let host = EffectivePolicy::resolve(&rule, None, 9080);
        assert_eq!(consecutive_5xx(&host), Some(1));
        assert_eq!(max_connections(&host), Some(10));
        let unknown_subset = EffectivePolicy::resolve(&rule, Some("v9"), 9080);
        assert_eq!(unknown_subset, host);
    }

    #[test]
    fn port_level_settings_replace_every_field_without_inheriting() {
        let rule = rule(RULE);
        let port = EffectivePolicy::resolve(&rule, None, 9443);
        assert_eq!(consecutive_5xx(&port), Some(2));
        assert_eq!(max_connections(&port), None, "not inherited from the host");
    }

    #[test]
    fn a_subset_overrides_field_by_field_then_its_own_port_level_settings_win() {
        let rule = rule(RULE);
        let v1 = EffectivePolicy::resolve(&rule, Some("v1"), 9080);
        assert_eq!(max_connections(&v1), Some(20));
        assert_eq!(consecutive_5xx(&v1), Some(1), "inherited from the host");
        let v1_tls_port = EffectivePolicy::resolve(&rule, Some("v1"), 9443);
        assert_eq!(consecutive_5xx(&v1_tls_port), Some(2));
        assert_eq!(max_connections(&v1_tls_port), Some(20));
        let v2 = EffectivePolicy::resolve(&rule, Some("v2"), 9080);
        assert_eq!(max_connections(&v2), Some(30));
        assert_eq!(consecutive_5xx(&v2), None, "the port-level entry has none");
        let v2_other_port = EffectivePolicy::resolve(&rule, Some("v2"), 9090);
        assert_eq!(consecutive_5xx(&v2_other_port), Some(3));
        assert_eq!(max_connections(&v2_other_port), Some(10));
    }
}
