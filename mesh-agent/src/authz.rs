//! AuthorizationPolicy with Istio's semantics: which policies apply to a workload
//! (root namespace, namespace, `selector`, `targetRef(s)` to a Service), and the decision
//! for one connection or one request: CUSTOM (unsupported, so it denies what it selects)
//! and DENY first, then ALLOW if any selects the workload, else allow; AUDIT is recorded
//! on the side.
//!
//! A connection is first judged on its L4 facts alone. A rule that needs a request fact
//! (method, path, host, header, JWT) is then *unknown*, and when the outcome hangs on it
//! the connection is parsed as HTTP and each request judged with every fact known.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    config::{
        istio::{
            parse_ip_block, AuthorizationAction, AuthorizationPolicy, Condition, IpBlock,
            Operation, PolicyTargetReference, Rule, Source,
        },
        ClusterConfig, Resource,
    },
    discovery, jwt,
    peerauth::Effective,
    state::{MeshState, Workload},
};

/// Istio's `rootNamespace` default: policies there apply mesh wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The body Envoy and ztunnel answer a denied HTTP request with.
pub const DENIED_BODY: &str = "RBAC: access denied";

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

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq)]
enum Scope {
    /// Every workload of the mesh (root namespace, no selector).
    Mesh,
    /// Workloads of `namespace` (any namespace when `None`) whose labels include these;
    /// empty labels select every workload of the namespace.
    Labels {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
    /// Several scopes (one per `targetRefs` entry); a workload in any of them.
    Any(Vec<Scope>),
    /// Nothing (a `targetRef` to something that selects no workload).
    Nothing,
}

impl Scope {
    fn selects(&self, workload: &Workload) -> bool {
        match self {
            Scope::Mesh => true,
            Scope::Labels { namespace, labels } => {
                namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == workload.namespace)
                    && labels
                        .iter()
                        .all(|(k, v)| workload.labels.get(k) == Some(v))
            }
            Scope::Any(scopes) => scopes.iter().any(|s| s.selects(workload)),
            Scope::Nothing => false,
        }
    }
}

/// A condition key of `when`, as Istio spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    AuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        let bracketed = |rest: &str| -> Option<Vec<String>> {
            let mut parts = Vec::new();
            let mut rest = rest;
            while !rest.is_empty() {
                let inner = rest.strip_prefix('[')?;
                let end = inner.find(']')?;
                if end == 0 {
                    return None;
                }
                parts.push(inner[..end].to_owned());
                rest = &inner[end + 1..];
            }
            (!parts.is_empty()).then_some(parts)
        };
        let key = key.trim();
        if let Some(rest) = key.strip_prefix("request.headers") {
            return match bracketed(rest).as_deref() {
                Some([name]) => Ok(ConditionKey::RequestHeader(name.to_ascii_lowercase())),
                _ => Err(format!(
                    "invalid condition key {key:?}: expected request.headers[<name>]"
                )),
            };
        }
        if let Some(rest) = key.strip_prefix("request.auth.claims") {
            return bracketed(rest).map(ConditionKey::AuthClaims).ok_or_else(|| {
                format!("invalid condition key {key:?}: expected request.auth.claims[<name>] (nested: [a][b])")
            });
        }
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "request.auth.principal" => ConditionKey::AuthPrincipal,
            "request.auth.audiences" => ConditionKey::AuthAudiences,
            "request.auth.presenter" => ConditionKey::AuthPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            _ => return Err(format!("unknown condition key {key:?} (supported: request.headers[..], source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[..], destination.ip, destination.port, connection.sni)")),
        })
    }
}

/// One AuthorizationPolicy, ready to evaluate.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    scope: Scope,
    rules: Vec<Rule>,
    /// Parsed `when` keys, by rule and condition (checked by validation).
    keys: Vec<Vec<Option<ConditionKey>>>,
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
    fn named_ports(&self) -> impl Iterator<Item = u16> + '_ {
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

    /// Whether some rule matches, with the first reason each rule did not.
    fn matches(&self, facts: &Facts) -> (Tri, Option<usize>, Vec<String>) {
        let mut reasons = Vec::new();
        let mut unknown = false;
        for (index, rule) in self.rules.iter().enumerate() {
            let mut why = Why::default();
            match rule_matches(rule, &self.keys[index], facts, &mut why) {
                Tri::Yes => return (Tri::Yes, Some(index), reasons),
                Tri::Unknown => unknown = true,
                Tri::No => {}
            }
            reasons.push(format!(
                "rules[{index}]: {}",
                why.0.unwrap_or_else(|| "needs request attributes".into())
            ));
        }
        if self.rules.is_empty() {
            reasons.push("no rules: matches nothing".into());
        }
        (if unknown { Tri::Unknown } else { Tri::No }, None, reasons)
    }
}

/// The workloads a security policy of `namespace` applies to.
fn scope_of<'a>(
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    target_refs: impl Iterator<Item = &'a PolicyTargetReference>,
    config: &ClusterConfig,
    root_namespace: &str,
) -> Scope {
    let refs: Vec<&PolicyTargetReference> = target_refs.collect();
    if !refs.is_empty() {
        return Scope::Any(
            refs.iter()
                .map(|r| target_scope(r, namespace, config))
                .collect(),
        );
    }
    let labels = selector.cloned().unwrap_or_default();
    if namespace == root_namespace && labels.is_empty() {
        Scope::Mesh
    } else {
        Scope::Labels {
            namespace: (namespace != root_namespace).then(|| namespace.to_owned()),
            labels,
        }
    }
}

fn target_scope(target: &PolicyTargetReference, namespace: &str, config: &ClusterConfig) -> Scope {
    let target_namespace = target.namespace.as_deref().unwrap_or(namespace);
    if target.kind != "Service" || target_namespace != namespace {
        return Scope::Nothing;
    }
    config
        .services
        .iter()
        .find(|s| s.metadata.namespace() == namespace && s.metadata.name == target.name)
        .map(|s| s.spec.selector.clone())
        .filter(|labels| !labels.is_empty())
        .map_or(Scope::Nothing, |labels| Scope::Labels {
            namespace: Some(namespace.to_owned()),
            labels,
        })
}

/// The result of a JWT accepted by RequestAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuthFacts {
    /// `iss/sub`.
    pub principal: String,
    pub audiences: Vec<String>,
    pub presenter: Option<String>,
    pub claims: serde_json::Value,
}

/// What is known of one HTTP request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestFacts {
    pub method: String,
    /// `:authority` or `Host`.
    pub host: String,
    /// Normalised (see [`normalize_path`]), without the query.
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub auth: Option<AuthFacts>,
}

impl RequestFacts {
    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }
}

/// What is known of one connection, and of its current request once HTTP is parsed.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub source_ip: Ipv4Addr,
    /// The peer's address as the original client (no trusted proxies: the source).
    pub remote_ip: Ipv4Addr,
    /// `trust-domain/ns/<ns>/sa/<sa>`, when the peer's identity is known.
    pub source_principal: Option<String>,
    pub destination_ip: Ipv4Addr,
    pub destination_port: u16,
    pub sni: Option<String>,
    pub request: Option<RequestFacts>,
}

impl Facts {
    fn source_namespace(&self) -> Option<&str> {
        let principal = self.source_principal.as_deref()?;
        let (_, rest) = principal.split_once("/ns/")?;
        rest.split('/').next()
    }

    fn source_service_account(&self) -> Option<String> {
        let principal = self.source_principal.as_deref()?;
        let (_, rest) = principal.split_once("/ns/")?;
        let (ns, sa) = rest.split_once("/sa/")?;
        Some(format!("{ns}/{sa}"))
    }
}

/// Kleene logic: a rule needing a request attribute is unknown before the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    No,
    Yes,
    Unknown,
}

impl Tri {
    fn of(b: bool) -> Tri {
        if b {
            Tri::Yes
        } else {
            Tri::No
        }
    }

    fn and(self, other: impl FnOnce() -> Tri) -> Tri {
        match self {
            Tri::No => Tri::No,
            Tri::Yes => other(),
            Tri::Unknown => match other() {
                Tri::No => Tri::No,
                _ => Tri::Unknown,
            },
        }
    }
}

/// The first reason a rule did not match.
#[derive(Default)]
struct Why(Option<String>);

impl Why {
    fn check(&mut self, result: Tri, reason: impl FnOnce() -> String) -> Tri {
        if result == Tri::No && self.0.is_none() {
            self.0 = Some(reason());
        }
        result
    }
}

/// Istio's string match: `*` is presence, `*x` a suffix, `x*` a prefix, else exact.
pub fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn ip_matches(block: &str, ip: Ipv4Addr) -> bool {
    let Ok((IpAddr::V4(net), len)) = parse_ip_block(block) else {
        return false;
    };
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(net) & mask == u32::from(ip) & mask
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    let without_port = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host.as_str(), |(h, _)| h);
    string_matches(&pattern, &host) || string_matches(&pattern, without_port)
}

/// Path matching: Istio's string forms, plus templates where `{*}` is one segment and
/// `{**}` the rest of the path.
fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern.contains('{') {
        return template_matches(pattern, path);
    }
    string_matches(pattern, path)
}

fn template_matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    for (index, part) in pattern.iter().enumerate() {
        match *part {
            "{**}" => return path.len() > index,
            "{*}" => {
                if path.get(index).is_none_or(|s| s.is_empty()) {
                    return false;
                }
            }
            literal => {
                if path.get(index) != Some(&literal) {
                    return false;
                }
            }
        }
    }
    pattern.len() == path.len()
}

/// `values` (one must match) and `notValues` (none may) of one attribute. `value` is
/// `None` when the attribute is absent, and `Unknown` when it is a request attribute not
/// yet known.
fn attribute<T>(
    values: &[String],
    not_values: &[String],
    value: Known<T>,
    matches: impl Fn(&str, &T) -> bool,
) -> Tri {
    if values.is_empty() && not_values.is_empty() {
        return Tri::Yes;
    }
    let value = match value {
        Known::Unknown => return Tri::Unknown,
        Known::Absent => None,
        Known::Value(v) => Some(v),
    };
    let any = |list: &[String]| {
        value
            .as_ref()
            .is_some_and(|v| list.iter().any(|p| matches(p, v)))
    };
    Tri::of((values.is_empty() || any(values)) && !any(not_values))
}

enum Known<T> {
    Unknown,
    Absent,
    Value(T),
}

impl<T> Known<T> {
    fn from_option(value: Option<T>) -> Known<T> {
        value.map_or(Known::Absent, Known::Value)
    }
}

fn request_attribute<T>(facts: &Facts, get: impl FnOnce(&RequestFacts) -> Option<T>) -> Known<T> {
    match &facts.request {
        None => Known::Unknown,
        Some(request) => Known::from_option(get(request)),
    }
}

fn auth_attribute<T>(facts: &Facts, get: impl FnOnce(&AuthFacts) -> Option<T>) -> Known<T> {
    request_attribute(facts, |r| r.auth.as_ref().and_then(get))
}

fn blocks(list: &[IpBlock]) -> Vec<String> {
    list.iter().map(|b| b.0.clone()).collect()
}

fn source_matches(source: &Source, facts: &Facts, at: &str, why: &mut Why) -> Tri {
    let principal = Known::from_option(facts.source_principal.clone());
    let namespace = Known::from_option(facts.source_namespace().map(str::to_owned));
    let exact = |p: &str, v: &String| string_matches(p, v);
    let ip = |p: &str, v: &Ipv4Addr| ip_matches(p, *v);
    let request_principal = || auth_attribute(facts, |a| Some(a.principal.clone()));
    let checks: [(&str, Tri); 6] = [
        (
            "principals",
            attribute(
                &source.principals,
                &source.not_principals,
                clone_known(&principal),
                exact,
            ),
        ),
        (
            "requestPrincipals",
            attribute(
                &source.request_principals,
                &source.not_request_principals,
                request_principal(),
                exact,
            ),
        ),
        (
            "namespaces",
            attribute(
                &source.namespaces,
                &source.not_namespaces,
                clone_known(&namespace),
                exact,
            ),
        ),
        (
            "serviceAccounts",
            attribute(
                &source.service_accounts,
                &source.not_service_accounts,
                Known::from_option(facts.source_service_account()),
                exact,
            ),
        ),
        (
            "ipBlocks",
            attribute(
                &blocks(&source.ip_blocks),
                &blocks(&source.not_ip_blocks),
                Known::Value(facts.source_ip),
                ip,
            ),
        ),
        (
            "remoteIpBlocks",
            attribute(
                &blocks(&source.remote_ip_blocks),
                &blocks(&source.not_remote_ip_blocks),
                Known::Value(facts.remote_ip),
                ip,
            ),
        ),
    ];
    let mut result = Tri::Yes;
    for (field, outcome) in checks {
        let outcome = why.check(outcome, || {
            format!(
                "{at}.{field}: the source ({}) does not match",
                describe_source(facts)
            )
        });
        result = result.and(|| outcome);
    }
    result
}

fn clone_known(value: &Known<String>) -> Known<String> {
    match value {
        Known::Unknown => Known::Unknown,
        Known::Absent => Known::Absent,
        Known::Value(v) => Known::Value(v.clone()),
    }
}

fn describe_source(facts: &Facts) -> String {
    match &facts.source_principal {
        Some(p) => format!("{p} at {}", facts.source_ip),
        None => format!("no mTLS identity, at {}", facts.source_ip),
    }
}

fn operation_matches(operation: &Operation, facts: &Facts, at: &str, why: &mut Why) -> Tri {
    let port = |p: &str, v: &u16| p.trim().parse::<u16>() == Ok(*v);
    let checks: [(&str, Tri); 4] = [
        (
            "ports",
            attribute(
                &operation.ports,
                &operation.not_ports,
                Known::Value(facts.destination_port),
                port,
            ),
        ),
        (
            "hosts",
            attribute(
                &operation.hosts,
                &operation.not_hosts,
                request_attribute(facts, |r| Some(r.host.clone())),
                |p, v: &String| host_matches(p, v),
            ),
        ),
        (
            "methods",
            attribute(
                &operation.methods,
                &operation.not_methods,
                request_attribute(facts, |r| Some(r.method.clone())),
                |p, v: &String| p == v,
            ),
        ),
        (
            "paths",
            attribute(
                &operation.paths,
                &operation.not_paths,
                request_attribute(facts, |r| Some(r.path.clone())),
                |p, v: &String| path_matches(p, v),
            ),
        ),
    ];
    let mut result = Tri::Yes;
    for (field, outcome) in checks {
        let outcome = why.check(outcome, || {
            let value = match (field, &facts.request) {
                ("ports", _) => facts.destination_port.to_string(),
                ("hosts", Some(r)) => r.host.clone(),
                ("methods", Some(r)) => r.method.clone(),
                ("paths", Some(r)) => r.path.clone(),
                _ => String::new(),
            };
            format!("{at}.{field}: {value:?} does not match")
        });
        result = result.and(|| outcome);
    }
    result
}

fn claim_values(claims: &serde_json::Value, path: &[String]) -> Option<Vec<String>> {
    let mut value = claims;
    for part in path {
        value = value.get(part)?;
    }
    Some(match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        other => vec![other.to_string()],
    })
}

fn condition_matches(condition: &Condition, key: Option<&ConditionKey>, facts: &Facts) -> Tri {
    let Some(key) = key else {
        // An unknown key is a validation error; should one get here, it matches nothing.
        return Tri::No;
    };
    let (values, not_values) = (&condition.values, &condition.not_values);
    let text = |p: &str, v: &String| string_matches(p, v);
    let any_of = |p: &str, v: &Vec<String>| v.iter().any(|v| string_matches(p, v));
    let ip = |p: &str, v: &Ipv4Addr| ip_matches(p, *v);
    match key {
        ConditionKey::RequestHeader(name) => attribute(
            values,
            not_values,
            request_attribute(facts, |r| r.header(name)),
            text,
        ),
        ConditionKey::SourceIp => attribute(values, not_values, Known::Value(facts.source_ip), ip),
        ConditionKey::RemoteIp => attribute(values, not_values, Known::Value(facts.remote_ip), ip),
        ConditionKey::DestinationIp => {
            attribute(values, not_values, Known::Value(facts.destination_ip), ip)
        }
        ConditionKey::DestinationPort => attribute(
            values,
            not_values,
            Known::Value(facts.destination_port),
            |p, v: &u16| p.trim().parse::<u16>() == Ok(*v),
        ),
        ConditionKey::SourceNamespace => attribute(
            values,
            not_values,
            Known::from_option(facts.source_namespace().map(str::to_owned)),
            text,
        ),
        ConditionKey::SourcePrincipal => attribute(
            values,
            not_values,
            Known::from_option(facts.source_principal.clone()),
            text,
        ),
        ConditionKey::ConnectionSni => attribute(
            values,
            not_values,
            Known::from_option(facts.sni.clone()),
            text,
        ),
        ConditionKey::AuthPrincipal => attribute(
            values,
            not_values,
            auth_attribute(facts, |a| Some(a.principal.clone())),
            text,
        ),
        ConditionKey::AuthAudiences => attribute(
            values,
            not_values,
            auth_attribute(facts, |a| Some(a.audiences.clone())),
            any_of,
        ),
        ConditionKey::AuthPresenter => attribute(
            values,
            not_values,
            auth_attribute(facts, |a| a.presenter.clone()),
            text,
        ),
        ConditionKey::AuthClaims(path) => attribute(
            values,
            not_values,
            auth_attribute(facts, |a| claim_values(&a.claims, path)),
            any_of,
        ),
    }
}

fn rule_matches(rule: &Rule, keys: &[Option<ConditionKey>], facts: &Facts, why: &mut Why) -> Tri {
    let from = if rule.from.is_empty() {
        Tri::Yes
    } else {
        any(rule
            .from
            .iter()
            .enumerate()
            .map(|(i, f)| source_matches(&f.source, facts, &format!("from[{i}].source"), why)))
    };
    from.and(|| {
        if rule.to.is_empty() {
            Tri::Yes
        } else {
            any(rule.to.iter().enumerate().map(|(i, t)| {
                operation_matches(&t.operation, facts, &format!("to[{i}].operation"), why)
            }))
        }
    })
    .and(|| {
        rule.when
            .iter()
            .enumerate()
            .fold(Tri::Yes, |acc, (i, condition)| {
                acc.and(|| {
                    why.check(
                        condition_matches(condition, keys.get(i).and_then(Option::as_ref), facts),
                        || format!("when[{i}]: {} does not match", condition.key),
                    )
                })
            })
    })
}

fn any(results: impl Iterator<Item = Tri>) -> Tri {
    let mut unknown = false;
    for result in results {
        match result {
            Tri::Yes => return Tri::Yes,
            Tri::Unknown => unknown = true,
            Tri::No => {}
        }
    }
    if unknown {
        Tri::Unknown
    } else {
        Tri::No
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Decidable only per HTTP request.
    NeedsRequest,
}

/// A policy that decided, or was recorded (AUDIT).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    pub policy: String,
    pub action: Action,
    pub rule: usize,
}

/// A policy that applied but did not match, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Miss {
    pub policy: String,
    pub action: Action,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The policy whose rule decided; `None` when no policy applied (allowed) or no ALLOW
    /// policy matched (denied by default).
    pub decided_by: Option<Match>,
    pub audited: Vec<Match>,
    pub not_matched: Vec<Miss>,
}

impl Decision {
    pub fn reason(&self) -> String {
        match (&self.decided_by, self.verdict) {
            (Some(m), _) => format!("{} {} rules[{}]", action_word(m.action), m.policy, m.rule),
            (None, Verdict::Deny) => "no ALLOW policy matched".into(),
            (None, Verdict::Allow) => "no policy applies".into(),
            (None, Verdict::NeedsRequest) => "needs the HTTP request".into(),
        }
    }

    /// The policy named in metrics: the decider, or `-` for the defaults.
    pub fn policy_label(&self) -> &str {
        self.decided_by.as_ref().map_or("-", |m| m.policy.as_str())
    }
}

fn action_word(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
        Action::Custom => "CUSTOM (unsupported, fails closed)",
    }
}

/// The decision of `policies` (those applying to the destination workload) for `facts`.
pub fn evaluate(policies: &[Arc<Policy>], facts: &Facts) -> Decision {
    let mut not_matched = Vec::new();
    let mut audited = Vec::new();
    let mut pending = false;
    let mut deny_match = None;
    let mut allow_match = None;
    let mut any_allow = false;
    let mut allow_pending = false;
    // CUSTOM first, as Istio orders them (here it denies), then DENY, then ALLOW.
    let order = [Action::Custom, Action::Deny, Action::Allow, Action::Audit];
    for action in order {
        for policy in policies.iter().filter(|p| p.action == action) {
            if action == Action::Allow {
                any_allow = true;
            }
            let (result, rule, reasons) = policy.matches(facts);
            match (result, rule) {
                (Tri::Yes, Some(rule)) => {
                    let matched = Match {
                        policy: policy.name.clone(),
                        action,
                        rule,
                    };
                    match action {
                        Action::Custom | Action::Deny => {
                            deny_match.get_or_insert(matched);
                        }
                        Action::Allow => {
                            allow_match.get_or_insert(matched);
                        }
                        Action::Audit => audited.push(matched),
                    }
                }
                (Tri::Unknown, _) => {
                    match action {
                        Action::Allow => allow_pending = true,
                        _ => pending = true,
                    }
                    not_matched.push(Miss {
                        policy: policy.name.clone(),
                        action,
                        reasons,
                    });
                }
                _ => not_matched.push(Miss {
                    policy: policy.name.clone(),
                    action,
                    reasons,
                }),
            }
        }
    }
    let (verdict, decided_by) = if let Some(deny) = deny_match {
        (Verdict::Deny, Some(deny))
    } else if pending {
        (Verdict::NeedsRequest, None)
    } else if let Some(allow) = allow_match {
        (Verdict::Allow, Some(allow))
    } else if allow_pending {
        (Verdict::NeedsRequest, None)
    } else if any_allow {
        (Verdict::Deny, None)
    } else {
        (Verdict::Allow, None)
    };
    Decision {
        verdict,
        decided_by,
        audited,
        not_matched,
    }
}

/// What the destination's policies decide for new connections from a local pod, on L4
/// facts alone: for the kernel, which drops denied SYNs before the agent sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVerdict {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    /// 0: every port without an entry of its own.
    pub port: u16,
    pub deny: bool,
}

/// Entries beyond this many are left to the agent, which enforces the same decisions.
pub const KERNEL_VERDICTS_MAX: usize = 65536;

/// The verdicts of every local pod towards every workload with policies (per port the
/// policies name, and for all other ports), and towards Service ports all of whose
/// endpoints deny it.
pub fn kernel_verdicts(state: &MeshState, trust_domain: &str) -> Vec<KernelVerdict> {
    let sources: Vec<&Arc<Workload>> = state.local_workloads().collect();
    let mut denied: HashSet<(Ipv4Addr, Ipv4Addr, u16)> = HashSet::new();
    let mut other_ports_denied: HashSet<(Ipv4Addr, Ipv4Addr)> = HashSet::new();
    let mut verdicts = Vec::new();
    for destination in state.workloads.values() {
        let security = state.security_of(destination.ip);
        if security.policies.is_empty() {
            continue;
        }
        let mut ports: BTreeSet<u16> = security
            .policies
            .iter()
            .flat_map(|p| p.named_ports())
            .collect();
        ports.extend(destination.named_ports.values());
        ports.extend(&security.http_ports);
        let mtls = state.mtls.get(&destination.ip);
        for source in sources.iter().filter(|s| s.ip != destination.ip) {
            let principal = format!(
                "{trust_domain}/ns/{}/sa/{}",
                source.namespace, source.service_account
            );
            let denies = |port: u16| {
                let plaintext = mtls.is_some_and(|m| m.for_port(port) == Effective::Disable);
                let facts = Facts {
                    source_ip: source.ip,
                    remote_ip: source.ip,
                    source_principal: (!plaintext).then(|| principal.clone()),
                    destination_ip: destination.ip,
                    destination_port: port,
                    sni: None,
                    request: None,
                };
                evaluate(&security.policies, &facts).verdict == Verdict::Deny
            };
            let other = denies(0);
            if other {
                other_ports_denied.insert((source.ip, destination.ip));
                verdicts.push(KernelVerdict {
                    source: source.ip,
                    destination: destination.ip,
                    port: 0,
                    deny: true,
                });
            }
            for &port in &ports {
                let deny = denies(port);
                if deny {
                    denied.insert((source.ip, destination.ip, port));
                }
                if deny != other {
                    verdicts.push(KernelVerdict {
                        source: source.ip,
                        destination: destination.ip,
                        port,
                        deny,
                    });
                }
            }
        }
    }
    let denies = |source: Ipv4Addr, target: &SocketAddrV4| {
        denied.contains(&(source, *target.ip(), target.port()))
            || (other_ports_denied.contains(&(source, *target.ip()))
                && !verdicts.iter().any(|v| {
                    v.source == source
                        && v.destination == *target.ip()
                        && v.port == target.port()
                        && !v.deny
                }))
    };
    let mut service_verdicts = Vec::new();
    for service in state.services.values() {
        let all_meshed =
            !service.endpoints.is_empty() && service.endpoints.iter().all(|e| e.workload.is_some());
        if !all_meshed {
            continue;
        }
        for source in &sources {
            if service.endpoints.iter().all(|e| denies(source.ip, &e.addr)) {
                service_verdicts.push(KernelVerdict {
                    source: source.ip,
                    destination: service.cluster_ip,
                    port: service.port,
                    deny: true,
                });
            }
        }
    }
    verdicts.extend(service_verdicts);
    verdicts
}

/// The path as policies see it and the workload receives it: percent-encoded unreserved
/// characters and `/` `\` decoded, `\` turned into `/`, repeated slashes merged, dot
/// segments removed, remaining escapes in upper case. So `/a/../b`, `/a%2Fb`, `//a` and
/// `/A%2e%2E/b` cannot pass a rule written for their normal form. The query is kept
/// apart. `None` for a path that is not a valid origin-form path.
pub fn normalize_path(raw: &str) -> Option<(String, Option<String>)> {
    let raw = raw.split('#').next().unwrap_or_default();
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (raw, None),
    };
    if !path.starts_with('/') && !path.starts_with('\\') && !path.starts_with('%') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = path.get(i + 1..i + 3)?;
                let byte = u8::from_str_radix(hex, 16).ok()?;
                match byte {
                    0 => return None,
                    b'/' | b'\\' => decoded.push('/'),
                    b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                        decoded.push(char::from(b))
                    }
                    b => decoded.push_str(&format!("%{b:02X}")),
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            b if b.is_ascii_graphic() => {
                decoded.push(char::from(b));
                i += 1;
            }
            _ => return None,
        }
    }
    if !decoded.starts_with('/') {
        return None;
    }
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (index, segment) in parts.iter().enumerate() {
        match *segment {
            "" => trailing_slash = index == last,
            "." => trailing_slash = index == last,
            ".." => {
                segments.pop();
                trailing_slash = index == last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || normal.is_empty() {
        normal.push('/');
    }
    Some((normal, query))
}

/// The AuthorizationPolicies and RequestAuthentication rules of one workload.
#[derive(Debug, Default)]
pub struct WorkloadSecurity {
    pub policies: Vec<Arc<Policy>>,
    pub jwt_rules: Vec<Arc<jwt::Rule>>,
    /// Ports Services declare as HTTP: where RequestAuthentication applies.
    pub http_ports: BTreeSet<u16>,
}

impl WorkloadSecurity {
    /// No policy and no token rule: connections are not judged at all.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.jwt_rules.is_empty()
    }

    /// Whether requests to `port` are checked for tokens.
    pub fn authenticates(&self, port: u16) -> bool {
        !self.jwt_rules.is_empty() && self.http_ports.contains(&port)
    }
}

/// Every AuthorizationPolicy and RequestAuthentication rule of the configuration,
/// compiled, to be handed to the workloads they apply to.
pub struct SecurityConfig {
    policies: Vec<Arc<Policy>>,
    jwt_rules: Vec<(Scope, Arc<jwt::Rule>)>,
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
                jwt_rules.push((scope.clone(), Arc::new(jwt::Rule::compile(ra, rule))));
            }
        }
        SecurityConfig {
            policies,
            jwt_rules,
        }
    }

    pub fn for_workload(&self, config: &ClusterConfig, workload: &Workload) -> WorkloadSecurity {
        WorkloadSecurity {
            http_ports: discovery::http_ports(config, workload),
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_before_matching() {
        let n = |p: &str| normalize_path(p).map(|(p, _)| p);
        assert_eq!(n("/a/../b").as_deref(), Some("/b"));
        assert_eq!(n("/a/./b/").as_deref(), Some("/a/b/"));
        assert_eq!(n("//admin//x").as_deref(), Some("/admin/x"));
        assert_eq!(n("/admin%2Fx").as_deref(), Some("/admin/x"));
        assert_eq!(n("/admin%2fx").as_deref(), Some("/admin/x"));
        assert_eq!(n("/%61dmin").as_deref(), Some("/admin"));
        assert_eq!(n("/a%2e%2E/admin").as_deref(), Some("/a../admin"));
        assert_eq!(n("/x/%2e%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(n("\\admin\\x").as_deref(), Some("/admin/x"));
        assert_eq!(n("/a%3fb?q=1").as_deref(), Some("/a%3Fb"));
        assert_eq!(n("/../..").as_deref(), Some("/"));
        assert_eq!(n("/a%zz"), None);
        assert_eq!(n("/a%00b"), None);
        assert_eq!(n("relative"), None);
        assert_eq!(
            normalize_path("/p?x=1&y").map(|(_, q)| q),
            Some(Some("x=1&y".into()))
        );
    }

    #[test]
    fn condition_keys_parse_as_istio_spells_them() {
        assert_eq!(
            ConditionKey::parse("request.headers[X-Token]"),
            Ok(ConditionKey::RequestHeader("x-token".into()))
        );
        assert_eq!(
            ConditionKey::parse("request.auth.claims[a][b]"),
            Ok(ConditionKey::AuthClaims(vec!["a".into(), "b".into()]))
        );
        assert!(ConditionKey::parse("request.headers").is_err());
        assert!(ConditionKey::parse("request.auth.claims[]").is_err());
        assert!(ConditionKey::parse("source.user").is_err());
    }

    #[test]
    fn path_templates_match_segments() {
        assert!(path_matches("/api/{*}/info", "/api/v1/info"));
        assert!(!path_matches("/api/{*}/info", "/api/v1/x/info"));
        assert!(path_matches("/api/{**}", "/api/a/b/c"));
        assert!(!path_matches("/api/{*}", "/api/"));
    }
}
