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
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    config::{
        condition::ConditionKey,
        istio::{parse_ip_block, Condition, IpBlock, Operation, Rule, Source},
    },
    model::security::{Action, Policy},
};

/// The body Envoy and ztunnel answer a denied HTTP request with.
pub const DENIED_BODY: &str = "RBAC: access denied";

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

    /// The client's service account (`namespace`, `name`), from its mutual TLS or
    /// same-node identity.
    pub fn source_account(&self) -> Option<(&str, &str)> {
        let principal = self.source_principal.as_deref()?;
        let (_, rest) = principal.split_once("/ns/")?;
        rest.split_once("/sa/")
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
    evaluate_with(policies, facts, true)
}

/// The decision for a connection on a port that does not speak HTTP, where no request
/// will be seen: a rule that needs request attributes is settled as Istio settles it for
/// TCP traffic — in an ALLOW policy it does not match, in a DENY (or CUSTOM) policy it
/// does, so the connection fails closed.
pub fn evaluate_tcp(policies: &[Arc<Policy>], facts: &Facts) -> Decision {
    evaluate_with(policies, facts, false)
}

fn evaluate_with(policies: &[Arc<Policy>], facts: &Facts, request_follows: bool) -> Decision {
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
            let (result, rule, reasons) = policy_matches(policy, facts);
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
                (Tri::Unknown, Some(rule))
                    if !request_follows && matches!(action, Action::Custom | Action::Deny) =>
                {
                    deny_match.get_or_insert(Match {
                        policy: policy.name.clone(),
                        action,
                        rule,
                    });
                }
                (Tri::Unknown, _) if request_follows => {
                    // AUDIT only records: it never makes a connection be parsed.
                    match action {
                        Action::Allow => allow_pending = true,
                        Action::Custom | Action::Deny => pending = true,
                        Action::Audit => {}
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

/// Whether some rule of `policy` matches, with the first reason each rule did not.
fn policy_matches(policy: &Policy, facts: &Facts) -> (Tri, Option<usize>, Vec<String>) {
    let mut reasons = Vec::new();
    let mut unknown = None;
    for (index, rule) in policy.rules.iter().enumerate() {
        let mut why = Why::default();
        match rule_matches(rule, &policy.keys[index], facts, &mut why) {
            Tri::Yes => return (Tri::Yes, Some(index), reasons),
            Tri::Unknown => {
                unknown.get_or_insert(index);
            }
            Tri::No => {}
        }
        reasons.push(format!(
            "rules[{index}]: {}",
            why.0.unwrap_or_else(|| "needs request attributes".into())
        ));
    }
    if policy.rules.is_empty() {
        reasons.push("no rules: matches nothing".into());
    }
    match unknown {
        Some(index) => (Tri::Unknown, Some(index), reasons),
        None => (Tri::No, None, reasons),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates_match_segments() {
        assert!(path_matches("/api/{*}/info", "/api/v1/info"));
        assert!(!path_matches("/api/{*}/info", "/api/v1/x/info"));
        assert!(path_matches("/api/{**}", "/api/a/b/c"));
        assert!(!path_matches("/api/{*}", "/api/"));
    }
}
