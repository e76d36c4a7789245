//! Locality load balancing, as Istio programs Envoy for a DestinationRule's
//! `localityLbSetting`: localities from the nodes' topology labels, failover priorities
//! (same region/zone/subzone first, `failover` regions, or `failoverPriority` labels),
//! `distribute` weights, and Envoy's priority load with its overprovisioning factor of 1.4
//! when a priority's endpoints are partly ejected. Pure functions; the balancer applies
//! them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::istio::LocalityLoadBalancerSetting;

pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Envoy's default overprovisioning factor, in percent: a priority level with 1/1.4 of
/// its endpoints healthy still takes all of its load.
const OVERPROVISIONING_PERCENT: usize = 140;

/// Where a node (and every pod on it) is.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// From a node's labels; an absent label is an empty part.
    pub fn of_labels(labels: &BTreeMap<String, String>) -> Locality {
        let get = |key: &str| labels.get(key).cloned().unwrap_or_default();
        Locality {
            region: get(REGION_LABEL),
            zone: get(ZONE_LABEL),
            subzone: get(SUBZONE_LABEL),
        }
    }

    /// Istio's `region/zone/subzone` form (a WorkloadEntry's `locality`).
    pub fn from_path(path: &str) -> Locality {
        let mut parts = path.splitn(3, '/').map(str::to_owned);
        Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }

    /// The topology labels this locality stands for, for `failoverPriority`.
    pub fn labels(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (REGION_LABEL, self.region.as_str()),
            (ZONE_LABEL, self.zone.as_str()),
            (SUBZONE_LABEL, self.subzone.as_str()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `region/zone/subzone` without empty trailing parts; `-` for none at all.
        let path = format!("{}/{}/{}", self.region, self.zone, self.subzone);
        match path.trim_end_matches('/') {
            "" => f.write_str("-"),
            trimmed => f.write_str(trimmed),
        }
    }
}

/// Istio's `LocalityMatch`: each part of `pattern` equals the locality's, or is `*`; a
/// shorter pattern matches every locality below it.
pub fn matches(pattern: &str, locality: &Locality) -> bool {
    let parts = [&locality.region, &locality.zone, &locality.subzone];
    pattern
        .split('/')
        .zip(parts)
        .all(|(want, have)| want == "*" || want == have)
}

/// `localityLbSetting`, translated for one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LocalitySettings {
    /// `distribute`: `(from, [(to, weight)])`.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// `failover`: `(from region, to region)`.
    pub failover: Vec<(String, String)>,
    pub failover_priority: Vec<String>,
    /// Whether the cluster has outlier detection: Istio applies failover only then, since
    /// nothing else would ever move traffic to a lower priority.
    pub outlier_detection: bool,
}

impl LocalitySettings {
    /// What `setting` asks for (Istio's mesh default, on, when the rule says nothing);
    /// `None` when locality load balancing is off or has nothing to do.
    pub fn from_istio(
        setting: Option<&LocalityLoadBalancerSetting>,
        outlier_detection: bool,
    ) -> Option<LocalitySettings> {
        if setting.is_some_and(|s| s.enabled == Some(false)) {
            return None;
        }
        let settings = LocalitySettings {
            distribute: setting
                .map(|s| {
                    s.distribute
                        .iter()
                        .map(|d| {
                            let to = d.to.iter().map(|(k, v)| (k.clone(), *v)).collect();
                            (d.from.clone(), to)
                        })
                        .collect()
                })
                .unwrap_or_default(),
            failover: setting
                .map(|s| {
                    s.failover
                        .iter()
                        .map(|f| (f.from.clone(), f.to.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            failover_priority: setting
                .map(|s| s.failover_priority.clone())
                .unwrap_or_default(),
            outlier_detection,
        };
        (!settings.distribute.is_empty() || outlier_detection).then_some(settings)
    }
}

/// How a balancer narrows its choice by locality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalityPlan {
    /// The priority of each endpoint (0 first, consecutive).
    Priorities(Vec<u32>),
    /// The weight of each endpoint's locality group, and the group of each endpoint
    /// (`None`: its locality gets no traffic).
    Weighted {
        weights: Vec<u32>,
        group: Vec<Option<usize>>,
    },
}

/// A balancer endpoint as locality load balancing sees it.
pub struct Placed<'a> {
    pub locality: &'a Locality,
    /// The pod's labels with its node's topology labels, for `failoverPriority`.
    pub labels: &'a BTreeMap<String, String>,
}

/// The plan for a client at `client` (the agent's node: its locality and labels) over
/// `endpoints`; `None` when nothing narrows the choice. `distribute` wins over failover
/// (Istio applies one of them), and `failoverPriority` over `failover`.
pub fn plan(
    settings: &LocalitySettings,
    client: &Locality,
    client_labels: &BTreeMap<String, String>,
    endpoints: &[Placed],
) -> Option<LocalityPlan> {
    if !settings.distribute.is_empty() {
        return distribute(settings, client, endpoints);
    }
    if !settings.outlier_detection {
        return None;
    }
    let priorities = if settings.failover_priority.is_empty() {
        let localities: Vec<&Locality> = endpoints.iter().map(|e| e.locality).collect();
        failover_priorities(client, &localities, &settings.failover)
    } else {
        let labels: Vec<&BTreeMap<String, String>> = endpoints.iter().map(|e| e.labels).collect();
        label_priorities(client_labels, &labels, &settings.failover_priority)
    };
    Some(LocalityPlan::Priorities(priorities))
}

/// Istio's `applyLocalityFailover`: 0 for the same region, zone and subzone, 1 for the same
/// zone, 2 for the same region, 3 for another region — or 4 when a `failover` entry from
/// the client's region names another one; then compacted to consecutive priorities.
pub fn failover_priorities(
    client: &Locality,
    endpoints: &[&Locality],
    failover: &[(String, String)],
) -> Vec<u32> {
    let raw: Vec<u32> = endpoints
        .iter()
        .map(|e| {
            if e.region != client.region {
                match failover.iter().find(|(from, _)| *from == client.region) {
                    Some((_, to)) if *to != e.region => 4,
                    _ => 3,
                }
            } else if e.zone != client.zone {
                2
            } else if e.subzone != client.subzone {
                1
            } else {
                0
            }
        })
        .collect();
    compact(raw)
}

/// Istio's `failoverPriority`: an endpoint matching the client on the first `n` labels
/// (and not the next) gets priority `labels - n`; `label=value` compares with the value
/// given instead of the client's.
pub fn label_priorities(
    client: &BTreeMap<String, String>,
    endpoints: &[&BTreeMap<String, String>],
    keys: &[String],
) -> Vec<u32> {
    let raw: Vec<u32> = endpoints
        .iter()
        .map(|labels| {
            let matched = keys
                .iter()
                .take_while(|key| {
                    let (name, want) = match key.split_once('=') {
                        Some((name, value)) => (name, Some(value)),
                        None => (key.as_str(), client.get(key.as_str()).map(String::as_str)),
                    };
                    want.is_some() && labels.get(name).map(String::as_str) == want
                })
                .count();
            (keys.len() - matched) as u32
        })
        .collect();
    compact(raw)
}

/// Renumbers priorities 0, 1, 2… in order, leaving no empty level.
fn compact(raw: Vec<u32>) -> Vec<u32> {
    let mut levels: Vec<u32> = raw.clone();
    levels.sort_unstable();
    levels.dedup();
    raw.iter()
        .map(|p| levels.iter().position(|l| l == p).unwrap_or(0) as u32)
        .collect()
}

/// Istio's `applyLocalityWeights`: the first `distribute` entry whose `from` matches the
/// client gives each `to` locality its weight, shared among the endpoints it matches
/// (each endpoint's group is the first `to` matching it); endpoints matched by none get
/// no traffic. `None` when no entry is from the client's locality.
fn distribute(
    settings: &LocalitySettings,
    client: &Locality,
    endpoints: &[Placed],
) -> Option<LocalityPlan> {
    let (_, to) = settings
        .distribute
        .iter()
        .find(|(from, _)| matches(from, client))?;
    let group = endpoints
        .iter()
        .map(|e| {
            to.iter()
                .position(|(pattern, _)| matches(pattern, e.locality))
        })
        .collect();
    let weights = to.iter().map(|(_, weight)| *weight).collect();
    Some(LocalityPlan::Weighted { weights, group })
}

/// Envoy's health of a level: healthy endpoints over all, times the overprovisioning
/// factor, at most 100.
pub fn health(healthy: usize, total: usize) -> usize {
    if total == 0 {
        return 0;
    }
    (OVERPROVISIONING_PERCENT * healthy / total).min(100)
}

/// Envoy's priority load: each level in order takes its health, up to what is left of
/// 100%; when the levels' health adds up to less than 100 they are scaled up to it. All to
/// the first level when none is healthy. `levels` are `(healthy, total)`.
pub fn priority_loads(levels: &[(usize, usize)]) -> Vec<usize> {
    let health: Vec<usize> = levels.iter().map(|(h, t)| health(*h, *t)).collect();
    let total_health = health.iter().sum::<usize>().min(100);
    let mut loads = vec![0; levels.len()];
    if total_health == 0 {
        if let Some(first) = loads.first_mut() {
            *first = 100;
        }
        return loads;
    }
    let mut left = 100;
    for (load, h) in loads.iter_mut().zip(&health) {
        *load = left.min(h * 100 / total_health);
        left -= *load;
    }
    // Rounding leftovers go to the first level with health, as Envoy puts them.
    if let Some(first) = health.iter().position(|h| *h > 0) {
        loads[first] += left;
    }
    loads
}

/// The level a draw in `0..100` falls in, by `loads`.
pub fn level_for(loads: &[usize], draw: usize) -> usize {
    let mut bound = 0;
    for (level, load) in loads.iter().enumerate() {
        bound += load;
        if draw < bound {
            return level;
        }
    }
    loads.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(path: &str) -> Locality {
        Locality::from_path(path)
    }

    #[test]
    fn localities_come_from_topology_labels() {
        let labels: BTreeMap<String, String> = [
            (REGION_LABEL, "r1"),
            (ZONE_LABEL, "z-a"),
            ("kubernetes.io/hostname", "node-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(Locality::of_labels(&labels), at("r1/z-a"));
        assert_eq!(at("r1/z-a/s1").to_string(), "r1/z-a/s1");
        assert_eq!(at("r1/z-a").to_string(), "r1/z-a");
        assert_eq!(Locality::default().to_string(), "-");
        assert_eq!(at("r1/z-a").labels().count(), 2);
    }

    #[test]
    fn patterns_match_by_part_with_trailing_wildcards() {
        let here = at("r1/z-a/s1");
        assert!(matches("r1", &here));
        assert!(matches("r1/*", &here));
        assert!(matches("*", &here));
        assert!(matches("r1/z-a/s1", &here));
        assert!(!matches("r1/z-b", &here));
        assert!(!matches("r2/*", &here));
    }

    #[test]
    fn failover_priorities_follow_istio() {
        let client = at("r1/z-a/s1");
        let endpoints = [
            at("r1/z-a/s1"),
            at("r1/z-a/s2"),
            at("r1/z-b"),
            at("r2/z-c"),
            at("r3/z-d"),
        ];
        let refs: Vec<&Locality> = endpoints.iter().collect();
        assert_eq!(failover_priorities(&client, &refs, &[]), [0, 1, 2, 3, 3]);
        let failover = [("r1".to_owned(), "r3".to_owned())];
        assert_eq!(
            failover_priorities(&client, &refs, &failover),
            [0, 1, 2, 4, 3]
        );
        // Empty levels close up: no same-subzone endpoint.
        assert_eq!(failover_priorities(&client, &refs[2..], &[]), [0, 1, 1]);
    }

    #[test]
    fn failover_priority_labels_count_the_matching_prefix() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let client = map(&[("net", "n1"), (REGION_LABEL, "r1")]);
        let a = map(&[("net", "n1"), (REGION_LABEL, "r1")]);
        let b = map(&[("net", "n1"), (REGION_LABEL, "r2")]);
        let c = map(&[("net", "n2"), (REGION_LABEL, "r1")]);
        let keys = ["net".to_owned(), REGION_LABEL.to_owned()];
        assert_eq!(label_priorities(&client, &[&a, &b, &c], &keys), [0, 1, 2]);
        let pinned = ["net=n2".to_owned()];
        assert_eq!(label_priorities(&client, &[&a, &c], &pinned), [1, 0]);
    }

    #[test]
    fn priority_load_spills_with_the_overprovisioning_factor() {
        assert_eq!(priority_loads(&[(1, 1), (1, 1)]), [100, 0]);
        assert_eq!(priority_loads(&[(0, 1), (1, 1)]), [0, 100]);
        // 2 of 3 healthy: 140 × 2/3 = 93%, the rest spills over.
        assert_eq!(priority_loads(&[(2, 3), (3, 3)]), [93, 7]);
        // 5 of 7 healthy is still a full level (140 × 5/7 = 100).
        assert_eq!(priority_loads(&[(5, 7), (1, 1)]), [100, 0]);
        // Not enough health anywhere: scaled up to 100%.
        assert_eq!(priority_loads(&[(1, 4), (1, 4)]), [50, 50]);
        assert_eq!(priority_loads(&[(0, 2), (0, 1)]), [100, 0]);
        assert_eq!(level_for(&[93, 7], 92), 0);
        assert_eq!(level_for(&[93, 7], 93), 1);
        assert_eq!(level_for(&[0, 100], 0), 1);
    }

    fn settings(yaml: &str) -> Option<LocalitySettings> {
        let setting: LocalityLoadBalancerSetting = serde_norway::from_str(yaml).expect("yaml");
        LocalitySettings::from_istio(Some(&setting), true)
    }

    #[test]
    fn failover_needs_outlier_detection_and_can_be_disabled() {
        assert_eq!(settings("enabled: false"), None);
        assert_eq!(LocalitySettings::from_istio(None, false), None);
        let default = LocalitySettings::from_istio(None, true).expect("on by default");
        let empty = BTreeMap::new();
        let (a, b) = (at("r1/z-a"), at("r1/z-b"));
        let placed = [
            Placed {
                locality: &b,
                labels: &empty,
            },
            Placed {
                locality: &a,
                labels: &empty,
            },
        ];
        assert_eq!(
            plan(&default, &a, &empty, &placed),
            Some(LocalityPlan::Priorities(vec![1, 0]))
        );
        let without_detection = LocalitySettings {
            outlier_detection: false,
            ..default
        };
        assert_eq!(plan(&without_detection, &a, &empty, &placed), None);
    }

    #[test]
    fn distribute_weighs_the_client_localitys_targets() {
        let distribute = settings(
            "distribute:\n- from: r1/z-a/*\n  to: {r1/z-a/*: 80, r1/z-b/*: 20}\n\
             - from: r1/z-b/*\n  to: {r1/z-b/*: 100}\n",
        )
        .expect("settings");
        let empty = BTreeMap::new();
        let (a, b, c) = (at("r1/z-a"), at("r1/z-b"), at("r2/z-c"));
        let placed: Vec<Placed> = [&a, &b, &c, &a]
            .into_iter()
            .map(|locality| Placed {
                locality,
                labels: &empty,
            })
            .collect();
        assert_eq!(
            plan(&distribute, &a, &empty, &placed),
            Some(LocalityPlan::Weighted {
                weights: vec![80, 20],
                group: vec![Some(0), Some(1), None, Some(0)],
            })
        );
        assert_eq!(
            plan(&distribute, &b, &empty, &placed),
            Some(LocalityPlan::Weighted {
                weights: vec![100],
                group: vec![None, Some(0), None, None],
            })
        );
        assert_eq!(plan(&distribute, &c, &empty, &placed), None);
    }
}
