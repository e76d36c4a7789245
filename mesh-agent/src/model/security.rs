//! The security configuration of each workload, compiled from AuthorizationPolicy and
//! RequestAuthentication resources: which policies and token rules apply to a workload
//! (root namespace, namespace, `selector`, `targetRef(s)` to a Service), ready for the
//! policy engine to evaluate — with the other reasons its agent serves it request by
//! request (rate limits, request telemetry).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use serde::Serialize;

use crate::{
    config::{
        condition::ConditionKey,
        istio::{AuthorizationAction, AuthorizationPolicy, JwtRule, RequestAuthentication, Rule},
        jwks::{parse_jwks, Jwks},
        ClusterConfig, Resource,
    },
    model::{
        discovery,
        ratelimit::{local_rate_limits, LocalRateLimit},
        scope::{scope_of, Scope},
        telemetry::{Reporting, TelemetryConfig, WorkloadTelemetry},
        Workload,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    fn of(action: Option<AuthorizationAction>) -> Action {
        match action.unwrap_or_default() {
            AuthorizationAction::Allow => Action::Allow,
            AuthorizationAction::Deny => Action::Deny,
            AuthorizationAction::Audit => Action::Audit,
            AuthorizationAction::Custom => Action::Custom,
        }
    }
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    scope: Scope,
    pub rules: Vec<Rule>,
    /// Parsed `when` keys, by rule and condition (checked by validation).
    pub keys: Vec<Vec<Option<ConditionKey>>>,
}

impl Policy {
    pub fn compile(
        resource: &Resource<AuthorizationPolicy>,
        config: &ClusterConfig,
        root_namespace: &str,
    ) -> Policy {
        let spec = &resource.spec;
        let namespace = resource.namespace();
        let scope = scope_of(
            namespace,
            spec.selector.as_ref().map(|s| &s.match_labels),
            spec.target_ref.iter().chain(&spec.target_refs),
            config,
            root_namespace,
        );
        let keys = spec
            .rules
            .iter()
            .map(|r| {
                r.when
                    .iter()
                    .map(|c| ConditionKey::parse(&c.key).ok())
                    .collect()
            })
            .collect();
        Policy {
            name: format!("{namespace}/{}", resource.metadata.name),
            action: Action::of(spec.action),
            scope,
            rules: spec.rules.clone(),
            keys,
        }
    }

    /// Ports the policy names (operations and `destination.port` conditions).
    pub fn named_ports(&self) -> impl Iterator<Item = u16> + '_ {
        let operations = self
            .rules
            .iter()
            .flat_map(|r| &r.to)
            .flat_map(|t| t.operation.ports.iter().chain(&t.operation.not_ports));
        let conditions = self
            .rules
            .iter()
            .zip(&self.keys)
            .flat_map(|(rule, keys)| rule.when.iter().zip(keys))
            .filter(|(_, key)| *key == &Some(ConditionKey::DestinationPort))
            .flat_map(|(c, _)| c.values.iter().chain(&c.not_values));
        operations
            .chain(conditions)
            .filter_map(|p| p.trim().parse().ok())
    }

    pub fn applies_to(&self, workload: &Workload) -> bool {
        self.scope.selects(workload)
    }
}

/// The AuthorizationPolicies and RequestAuthentication rules of one workload.
#[derive(Debug, Default, Clone)]
pub struct WorkloadSecurity {
    pub policies: Vec<Arc<Policy>>,
    pub jwt_rules: Vec<Arc<TokenRule>>,
    /// Ports Services declare as HTTP: where RequestAuthentication applies.
    pub http_ports: BTreeSet<u16>,
    /// The HTTPLocalRateLimitPolicy limiting requests to the workload's HTTP ports.
    pub rate_limit: Option<Arc<LocalRateLimit>>,
    /// What the Telemetry API asks to be reported of its requests.
    pub telemetry: WorkloadTelemetry,
}

impl WorkloadSecurity {
    /// No policy, no token rule and no request to report: connections are not judged
    /// at all.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
            && self.jwt_rules.is_empty()
            && self.rate_limit.is_none()
            && !self.observes_every_request()
    }

    /// Every request it serves is counted, logged or traced.
    fn observes_every_request(&self) -> bool {
        self.telemetry.server == Reporting::Always
            || self.telemetry.server_logs.is_some()
            || self.telemetry.traces_every_request()
    }

    /// Whether every request to `port` is to be reported or logged (so served one by
    /// one).
    pub fn reports_requests(&self, port: u16) -> bool {
        self.observes_every_request() && self.http_ports.contains(&port)
    }

    /// Whether requests to `port` are counted against a rate limit.
    pub fn limits_rate(&self, port: u16) -> bool {
        self.rate_limit.is_some() && self.http_ports.contains(&port)
    }

    /// Whether requests to `port` are checked for tokens.
    pub fn authenticates(&self, port: u16) -> bool {
        !self.jwt_rules.is_empty() && self.http_ports.contains(&port)
    }

    /// Whether a RequestAuthentication gives the workload claims in request headers
    /// (`outputPayloadToHeader`, `outputClaimToHeaders`): headers a client could forge
    /// wherever its requests are not read.
    pub fn sets_claim_headers(&self) -> bool {
        self.jwt_rules.iter().any(|rule| {
            rule.output_payload_to_header.is_some() || !rule.output_claim_to_headers.is_empty()
        })
    }
}

/// Every AuthorizationPolicy and RequestAuthentication rule of the configuration,
/// compiled, to be handed to the workloads they apply to.
pub struct SecurityConfig {
    policies: Vec<Arc<Policy>>,
    jwt_rules: Vec<(Scope, Arc<TokenRule>)>,
    rate_limits: Vec<Arc<LocalRateLimit>>,
    telemetry: TelemetryConfig,
    selectors: discovery::SelectorIndex,
}

impl SecurityConfig {
    pub fn compile(config: &ClusterConfig, root_namespace: &str) -> SecurityConfig {
        let policies = config
            .istio
            .authorization_policies
            .iter()
            .map(|p| Arc::new(Policy::compile(p, config, root_namespace)))
            .collect();
        let mut jwt_rules = Vec::new();
        for ra in &config.istio.request_authentications {
            let scope = scope_of(
                ra.namespace(),
                ra.spec.selector.as_ref().map(|s| &s.match_labels),
                ra.spec.target_ref.iter().chain(&ra.spec.target_refs),
                config,
                root_namespace,
            );
            for rule in &ra.spec.jwt_rules {
                jwt_rules.push((scope.clone(), Arc::new(TokenRule::compile(ra, rule))));
            }
        }
        SecurityConfig {
            policies,
            jwt_rules,
            rate_limits: local_rate_limits(config)
                .into_iter()
                .map(Arc::new)
                .collect(),
            telemetry: TelemetryConfig::compile(config, root_namespace),
            selectors: discovery::SelectorIndex::of(&config.services),
        }
    }

    pub fn for_workload(&self, config: &ClusterConfig, workload: &Workload) -> WorkloadSecurity {
        WorkloadSecurity {
            http_ports: self.selectors.http_ports(config, workload),
            policies: self
                .policies
                .iter()
                .filter(|p| p.applies_to(workload))
                .cloned()
                .collect(),
            jwt_rules: self
                .jwt_rules
                .iter()
                .filter(|(scope, _)| scope.selects(workload))
                .map(|(_, rule)| rule.clone())
                .collect(),
            rate_limit: self
                .rate_limits
                .iter()
                .find(|limit| limits_workload(limit, config, workload))
                .cloned(),
            telemetry: self.telemetry.for_workload(workload),
        }
    }
}

/// Whether `limit` applies to `workload`: it selects the workload's labels, or targets a
/// Service that selects the workload (the limit then holds for each of its pods).
fn limits_workload(limit: &LocalRateLimit, config: &ClusterConfig, workload: &Workload) -> bool {
    if limit.applies_to_workload(&workload.namespace, &workload.labels) {
        return true;
    }
    config.services.iter().any(|service| {
        let selector = &service.spec.selector;
        service.metadata.namespace() == workload.namespace
            && limit.applies_to_service(&workload.namespace, &service.metadata.name)
            && !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
    })
}

/// Where a rule looks for its token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Location {
    Header { name: String, prefix: String },
    Param(String),
    Cookie(String),
}

/// Where a rule's keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    Inline(Arc<Jwks>),
    Uri {
        uri: String,
        timeout: Duration,
    },
    /// Inline keys that did not parse (a validation error): every token fails.
    Invalid,
}

/// One `jwtRules` entry, ready to use.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRule {
    /// `namespace/name` of the RequestAuthentication.
    pub policy: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub locations: Vec<Location>,
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Vec<(String, String)>,
    pub forward_original_token: bool,
}

/// The default timeout of a `jwksUri` fetch, as Istio's.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl TokenRule {
    pub fn compile(resource: &Resource<RequestAuthentication>, rule: &JwtRule) -> TokenRule {
        let mut locations: Vec<Location> = rule
            .from_headers
            .iter()
            .map(|h| Location::Header {
                name: h.name.to_ascii_lowercase(),
                prefix: h.prefix.clone().unwrap_or_default(),
            })
            .chain(rule.from_params.iter().cloned().map(Location::Param))
            .chain(rule.from_cookies.iter().cloned().map(Location::Cookie))
            .collect();
        if locations.is_empty() {
            locations = vec![
                Location::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                },
                Location::Param("access_token".into()),
            ];
        }
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            (Some(inline), _) => parse_jwks(inline)
                .map(|k| KeySource::Inline(Arc::new(k)))
                .unwrap_or(KeySource::Invalid),
            (None, Some(uri)) => KeySource::Uri {
                uri: uri.clone(),
                timeout: rule
                    .timeout
                    .as_ref()
                    .map_or(DEFAULT_FETCH_TIMEOUT, |t| t.value),
            },
            (None, None) => KeySource::Invalid,
        };
        TokenRule {
            policy: format!("{}/{}", resource.namespace(), resource.metadata.name),
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            locations,
            output_payload_to_header: rule.output_payload_to_header.clone(),
            output_claim_to_headers: rule
                .output_claim_to_headers
                .iter()
                .map(|c| (c.header.clone(), c.claim.clone()))
                .collect(),
            forward_original_token: rule.forward_original_token.unwrap_or(false),
        }
    }
}
