//! VirtualService routing, compiled once per configuration: for a destination host and
//! the source pod, which VirtualService applies (Istio's visibility rules), which of its
//! `http` routes a request takes (first match wins; match blocks OR-ed, fields AND-ed),
//! and what the route asks for — weighted destinations, redirect, direct response,
//! rewrite, header changes, timeout, retries, faults and mirrors; and for plain TCP, which
//! `tcp` route a connection takes. Everything here is a pure decision; the proxy's router
//! carries it out.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Serialize;

use crate::{
    config::{
        istio::{
            self, grpc_code, Headers, HttpMatchRequest, HttpRetry, RedirectPortSelection, RetryOn,
            StringMatch, VirtualService,
        },
        validate::{delegate_target, fqdn},
        ClusterConfig, Resource,
    },
    model::{lb::random, query::query_param, Workload},
};

/// Istio's retry policy when a route sets none: two retries of failures that happen
/// before the upstream did any work (`DefaultPolicy` in Istio's route translation).
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// How a string of the request is matched.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
    /// An empty `StringMatch` on a header: the header is present.
    Present,
}

impl Matcher {
    fn compile(m: &StringMatch) -> Result<Matcher, String> {
        if let Some(exact) = &m.exact {
            return Ok(Matcher::Exact(exact.clone()));
        }
        if let Some(prefix) = &m.prefix {
            return Ok(Matcher::Prefix(prefix.clone()));
        }
        if let Some(pattern) = &m.regex {
            // Envoy's safe_regex matches the whole value.
            return regex::Regex::new(&format!("^(?:{})$", pattern.0))
                .map(Matcher::Regex)
                .map_err(|e| format!("regex {:?}: {e}", pattern.0));
        }
        Ok(Matcher::Present)
    }

    /// How `meshctl routes` shows it.
    fn describe(&self) -> String {
        match self {
            Matcher::Exact(exact) => format!("exact {exact}"),
            Matcher::Prefix(prefix) => format!("prefix {prefix}"),
            Matcher::Regex(regex) => format!("regex {}", regex.as_str()),
            Matcher::Present => "present".into(),
        }
    }

    fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(exact) if ignore_case => exact.eq_ignore_ascii_case(value),
            Matcher::Exact(exact) => exact == value,
            Matcher::Prefix(prefix) if ignore_case => value
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
            Matcher::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Matcher::Regex(regex) => regex.is_match(value),
            Matcher::Present => true,
        }
    }
}

/// One `match` block of an `http` route: every field set must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    uri: Option<Matcher>,
    ignore_uri_case: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(HeaderName, Matcher)>,
    without_headers: Vec<(HeaderName, Matcher)>,
    query_params: Vec<(String, Matcher)>,
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
}

/// What a route match reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    /// The path without its query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The port the client addressed.
    pub port: u16,
    pub source: &'a Workload,
}

impl RequestMatch {
    fn compile(m: &HttpMatchRequest) -> Result<RequestMatch, String> {
        let opt = |m: &Option<StringMatch>| m.as_ref().map(Matcher::compile).transpose();
        let header_list = |map: &BTreeMap<String, StringMatch>| {
            map.iter()
                .map(|(name, m)| {
                    let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("{name:?} is not a header name"))?;
                    Ok((name, Matcher::compile(m)?))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(RequestMatch {
            uri: opt(&m.uri)?,
            ignore_uri_case: m.ignore_uri_case == Some(true),
            scheme: opt(&m.scheme)?,
            method: opt(&m.method)?,
            authority: opt(&m.authority)?,
            headers: header_list(&m.headers)?,
            without_headers: header_list(&m.without_headers)?,
            query_params: m
                .query_params
                .iter()
                .map(|(k, v)| Ok((k.clone(), Matcher::compile(v)?)))
                .collect::<Result<_, String>>()?,
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        })
    }

    fn matches(&self, request: &RequestFacts) -> bool {
        let header = |name: &HeaderName| {
            request
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        self.uri
            .as_ref()
            .is_none_or(|m| m.matches(request.path, self.ignore_uri_case))
            && self
                .scheme
                .as_ref()
                .is_none_or(|m| m.matches(request.scheme, false))
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(request.method, false))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(request.authority, false))
            && self
                .headers
                .iter()
                .all(|(name, m)| header(name).is_some_and(|v| m.matches(&v, false)))
            && self
                .without_headers
                .iter()
                .all(|(name, m)| header(name).is_none_or(|v| !m.matches(&v, false)))
            && self.query_params.iter().all(|(name, m)| {
                query_param(request.query, name).is_some_and(|v| m.matches(&v, false))
            })
            && self.port.is_none_or(|p| p == request.port)
            && self
                .source_labels
                .iter()
                .all(|(k, v)| request.source.labels.get(k) == Some(v))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|ns| *ns == request.source.namespace)
    }

    /// The prefix the path matched, which a `rewrite.uri` replaces.
    fn matched_prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(Matcher::Prefix(prefix)) => Some(prefix),
            _ => None,
        }
    }
}

/// `set`, `add` and `remove` of a route's or destination's `headers`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    #[serde(serialize_with = "header_pairs")]
    set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "header_pairs")]
    add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "header_names")]
    remove: Vec<HeaderName>,
}

fn header_pairs<S: serde::Serializer>(
    pairs: &[(HeaderName, HeaderValue)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let map: BTreeMap<&str, String> = pairs
        .iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    map.serialize(serializer)
}

fn header_names<S: serde::Serializer>(
    names: &[HeaderName],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let names: Vec<&str> = names.iter().map(HeaderName::as_str).collect();
    names.serialize(serializer)
}

impl HeaderOps {
    fn compile(ops: Option<&istio::HeaderOperations>) -> Result<HeaderOps, String> {
        let Some(ops) = ops else {
            return Ok(HeaderOps::default());
        };
        let name = |n: &str| {
            HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("{n:?} is not a header name"))
        };
        let pairs = |map: &BTreeMap<String, String>| {
            map.iter()
                .map(|(k, v)| {
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| format!("{v:?} is not a header value"))?;
                    Ok((name(k)?, value))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(HeaderOps {
            set: pairs(&ops.set)?,
            add: pairs(&ops.add)?,
            remove: ops
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Removes first, then sets and adds, as Envoy's header parser does (a header both
    /// removed and set ends up set).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Request and response header changes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderChanges {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl HeaderChanges {
    fn compile(headers: Option<&Headers>) -> Result<HeaderChanges, String> {
        Ok(HeaderChanges {
            request: HeaderOps::compile(headers.and_then(|h| h.request.as_ref()))?,
            response: HeaderOps::compile(headers.and_then(|h| h.response.as_ref()))?,
        })
    }
}

/// One destination of a route, with its share of requests.
#[derive(Debug, Clone, Serialize)]
pub struct WeightedDestination {
    /// The host as a fully qualified name.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    pub headers: HeaderChanges,
}

/// What a route does with a request it matched.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Route(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse {
        #[serde(serialize_with = "status_code")]
        status: StatusCode,
        #[serde(skip)]
        body: Bytes,
    },
}

fn status_code<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

/// `redirect`: the `Location` a request is sent to instead.
#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<u16>,
    pub from_request_port: bool,
    #[serde(serialize_with = "status_code")]
    pub status: StatusCode,
}

impl Redirect {
    /// The `Location` for a request with `facts`; the query is kept, as Envoy does.
    pub fn location(&self, facts: &RequestFacts) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(facts.scheme);
        let (host, request_port) = match facts.authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => (host, Some(port)),
            _ => (facts.authority, None),
        };
        let host = self.authority.as_deref().unwrap_or(host);
        let port = match (self.port, self.from_request_port) {
            (Some(port), _) => Some(port.to_string()),
            (None, true) => Some(facts.port.to_string()),
            (None, false) if self.authority.is_none() => request_port.map(str::to_owned),
            (None, false) => None,
        };
        let path = self.uri.as_deref().unwrap_or(facts.path);
        let mut location = format!("{scheme}://{host}");
        if let Some(port) = port {
            location.push(':');
            location.push_str(&port);
        }
        location.push_str(path);
        if let Some(query) = facts.query.filter(|_| !path.contains('?')) {
            location.push('?');
            location.push_str(query);
        }
        location
    }
}

/// `rewrite`: what the upstream receives instead of the client's path and authority.
#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    #[serde(skip)]
    pub uri_regex: Option<(regex::Regex, String)>,
    pub authority: Option<String>,
}

impl Rewrite {
    /// The path the upstream receives for `path` (without query), given the prefix the
    /// route matched: a prefix match has only its prefix replaced, anything else the
    /// whole path.
    pub fn path(&self, path: &str, matched_prefix: Option<&str>) -> String {
        if let Some((regex, replacement)) = &self.uri_regex {
            return regex.replace_all(path, replacement.as_str()).into_owned();
        }
        match (&self.uri, matched_prefix) {
            (Some(uri), Some(prefix)) => {
                let rest = path.get(prefix.len()..).unwrap_or_default();
                format!("{uri}{rest}")
            }
            (Some(uri), None) => uri.clone(),
            (None, _) => path.to_owned(),
        }
    }
}

/// Envoy's `\1` capture references, as the regex crate spells them (`${1}`).
fn envoy_substitution(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str("${");
                out.push(*d);
                out.push('}');
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// How a route retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// How a try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// The upstream answered with this status (and this `grpc-status`, if any).
    Response { status: u16, grpc: Option<u32> },
    /// No connection could be made.
    ConnectFailure,
    /// The connection or stream was reset before a response.
    Reset,
    /// An HTTP/2 stream the upstream refused.
    RefusedStream,
    /// The per-try timeout passed with no response.
    Timeout,
}

impl RetryPolicy {
    /// Istio's policy when a route sets no `retries`.
    pub fn istio_default() -> RetryPolicy {
        let mut on = RetryOn::parse(DEFAULT_RETRY_ON).unwrap_or_default();
        on.status_codes = vec![503];
        RetryPolicy {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            per_try_timeout: None,
            on,
        }
    }

    fn compile(retry: Option<&HttpRetry>) -> Result<RetryPolicy, String> {
        let Some(retry) = retry else {
            return Ok(RetryPolicy::istio_default());
        };
        let attempts = u32::try_from(retry.attempts.unwrap_or(0)).unwrap_or(0);
        let on = match retry.retry_on.as_deref() {
            Some(text) => RetryOn::parse(text)?,
            None => RetryPolicy::istio_default().on,
        };
        Ok(RetryPolicy {
            attempts,
            per_try_timeout: retry.per_try_timeout.as_ref().map(|d| d.value),
            on,
        })
    }

    /// Whether a try that ended so is tried again (attempts left permitting).
    pub fn retries(&self, outcome: TryOutcome) -> bool {
        let on = &self.on;
        match outcome {
            TryOutcome::Response { status, grpc } => {
                on.status_codes.contains(&status)
                    || (on.five_xx && (500..600).contains(&status))
                    || (on.gateway_error && matches!(status, 502..=504))
                    || (on.retriable_4xx && status == 409)
                    || grpc.is_some_and(|code| on.grpc.contains(&code))
            }
            TryOutcome::ConnectFailure => {
                on.connect_failure || on.five_xx || on.gateway_error || on.reset
            }
            TryOutcome::Reset => on.reset || on.five_xx || on.gateway_error,
            TryOutcome::RefusedStream => on.refused_stream || on.five_xx,
            TryOutcome::Timeout => on.five_xx || on.gateway_error || on.reset,
        }
    }

    /// Envoy's backoff before retry `n` (1-based): a random time up to
    /// `(2^n - 1) × 25 ms`, capped at 250 ms.
    pub fn backoff(n: u32) -> Duration {
        let ceiling_ms = ((1u64 << n.min(10)) - 1).saturating_mul(25).min(250);
        Duration::from_millis(random(ceiling_ms as usize + 1) as u64)
    }
}

/// How an injected abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortWith {
    Http(u16),
    Grpc(u32),
}

/// `fault`: a delay and an abort, each on a share of requests (all when unset).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(AbortWith, f64)>,
}

fn percentage(value: Option<&istio::Percent>, deprecated: Option<i32>) -> f64 {
    value
        .map(|p| p.value)
        .or(deprecated.map(f64::from))
        .unwrap_or(100.0)
        .clamp(0.0, 100.0)
}

impl Fault {
    fn compile(fault: Option<&istio::HttpFaultInjection>) -> Result<Fault, String> {
        let Some(fault) = fault else {
            return Ok(Fault::default());
        };
        let delay = fault.delay.as_ref().and_then(|d| {
            let fixed = d.fixed_delay.as_ref()?;
            Some((fixed.value, percentage(d.percentage.as_ref(), d.percent)))
        });
        let abort = match &fault.abort {
            None => None,
            Some(a) => {
                let with = match (a.http_status, a.grpc_status.as_deref()) {
                    (Some(status), _) => AbortWith::Http(
                        u16::try_from(status)
                            .ok()
                            .filter(|s| (200..600).contains(s))
                            .ok_or_else(|| format!("httpStatus {status} is not an HTTP status"))?,
                    ),
                    (None, Some(name)) => AbortWith::Grpc(
                        grpc_code(name)
                            .ok_or_else(|| format!("grpcStatus {name:?} is not a gRPC status"))?,
                    ),
                    (None, None) => return Err("abort needs httpStatus or grpcStatus".into()),
                };
                Some((with, percentage(a.percentage.as_ref(), a.percent)))
            }
        };
        Ok(Fault { delay, abort })
    }

    /// Whether an event of `percent` % happens this time.
    pub fn rolls(percent: f64) -> bool {
        percent >= 100.0 || (random(1_000_000) as f64) < percent * 10_000.0
    }
}

/// `mirror`/`mirrors`: a copy of the request sent to another destination, fire and forget.
#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub percent: f64,
}

/// `corsPolicy`, applied as Envoy's CORS filter applies a route's policy.
#[derive(Debug, Clone, Serialize)]
pub struct Cors {
    #[serde(serialize_with = "matcher_descriptions")]
    allow_origins: Vec<Matcher>,
    #[serde(serialize_with = "optional_header_value")]
    allow_methods: Option<HeaderValue>,
    #[serde(serialize_with = "optional_header_value")]
    allow_headers: Option<HeaderValue>,
    #[serde(serialize_with = "optional_header_value")]
    expose_headers: Option<HeaderValue>,
    #[serde(serialize_with = "optional_header_value")]
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    /// `unmatchedPreflights: FORWARD` (the default): a preflight from an origin not
    /// allowed goes on to the upstream; `IGNORE` answers it without CORS headers.
    forward_unmatched_preflights: bool,
}

fn matcher_descriptions<S: serde::Serializer>(
    matchers: &[Matcher],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let shown: Vec<String> = matchers.iter().map(Matcher::describe).collect();
    shown.serialize(serializer)
}

fn optional_header_value<S: serde::Serializer>(
    value: &Option<HeaderValue>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    value
        .as_ref()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .serialize(serializer)
}

/// What a route's CORS policy makes of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsVerdict {
    /// Not a CORS request (no `Origin`), or one from an origin not allowed: routed as
    /// usual, the response left alone.
    Untouched,
    /// A preflight from an allowed origin: answered here, 200 with these headers, and
    /// not forwarded.
    AnswerPreflight(HeaderMap),
    /// A preflight from an origin not allowed under `unmatchedPreflights: IGNORE`:
    /// answered here, 200 without CORS headers.
    IgnorePreflight,
    /// A request from an allowed origin: routed, and its response gets these headers.
    Allow(HeaderMap),
}

impl Cors {
    fn compile(policy: Option<&istio::CorsPolicy>) -> Result<Option<Cors>, String> {
        let Some(policy) = policy else {
            return Ok(None);
        };
        // Istio reads the deprecated `allowOrigin` (exact origins) only without
        // `allowOrigins`.
        let allow_origins = if policy.allow_origins.is_empty() {
            policy
                .allow_origin
                .iter()
                .map(|origin| Matcher::Exact(origin.clone()))
                .collect()
        } else {
            policy
                .allow_origins
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    Matcher::compile(m).map_err(|e| format!("corsPolicy.allowOrigins[{i}]: {e}"))
                })
                .collect::<Result<_, _>>()?
        };
        let joined = |field: &str, values: &[String]| {
            if values.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(&values.join(","))
                .map(Some)
                .map_err(|_| format!("corsPolicy.{field}: not a header value"))
        };
        Ok(Some(Cors {
            allow_origins,
            allow_methods: joined("allowMethods", &policy.allow_methods)?,
            allow_headers: joined("allowHeaders", &policy.allow_headers)?,
            expose_headers: joined("exposeHeaders", &policy.expose_headers)?,
            max_age: policy
                .max_age
                .as_ref()
                .map(|age| HeaderValue::from(age.value.as_secs())),
            allow_credentials: policy.allow_credentials == Some(true),
            forward_unmatched_preflights: policy.unmatched_preflights
                != Some(istio::UnmatchedPreflights::Ignore),
        }))
    }

    /// Envoy's `isOriginAllowed`: a matcher that takes `*` allows every origin.
    fn allows(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*", false) || m.matches(origin, false))
    }

    /// What this policy makes of a request with `method` and `headers`.
    pub fn judge(&self, method: &str, headers: &HeaderMap) -> CorsVerdict {
        let Some(origin) = headers
            .get(http::header::ORIGIN)
            .filter(|origin| !origin.is_empty())
        else {
            return CorsVerdict::Untouched;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let preflight = method == "OPTIONS"
            && headers
                .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        let mut answer = HeaderMap::new();
        match (preflight, allowed) {
            (false, false) => CorsVerdict::Untouched,
            (true, false) if self.forward_unmatched_preflights => CorsVerdict::Untouched,
            (true, false) => CorsVerdict::IgnorePreflight,
            (true, true) => {
                answer.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                if self.allow_credentials {
                    answer.insert(
                        http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                        HeaderValue::from_static("true"),
                    );
                }
                let optional = [
                    (
                        http::header::ACCESS_CONTROL_ALLOW_METHODS,
                        &self.allow_methods,
                    ),
                    (
                        http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                        &self.allow_headers,
                    ),
                    (http::header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
                ];
                for (name, value) in optional {
                    if let Some(value) = value {
                        answer.insert(name, value.clone());
                    }
                }
                CorsVerdict::AnswerPreflight(answer)
            }
            (false, true) => {
                answer.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                if self.allow_credentials {
                    answer.insert(
                        http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                        HeaderValue::from_static("true"),
                    );
                }
                if let Some(expose) = &self.expose_headers {
                    answer.insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
                }
                CorsVerdict::Allow(answer)
            }
        }
    }
}

/// One `http` route of a VirtualService.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRule {
    /// The route's `name`, or `<VirtualService>.<index>`.
    pub name: String,
    /// The root route's match blocks, for a route a delegate VirtualService gives: one of
    /// them must hold as well.
    #[serde(skip)]
    root_matches: Vec<RequestMatch>,
    #[serde(skip)]
    matches: Vec<RequestMatch>,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Fault,
    pub headers: HeaderChanges,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

impl HttpRule {
    /// `Some` when this route takes `request`, with the prefix its path matched (a
    /// delegated route's own, else its root's).
    fn takes(&self, request: &RequestFacts) -> Option<Option<&str>> {
        let root_prefix = first_match(&self.root_matches, request)?;
        let own_prefix = first_match(&self.matches, request)?;
        Some(own_prefix.or(root_prefix))
    }
}

/// `Some` when `blocks` is empty or one of them holds for `request`, with the prefix the
/// holding block's path matched.
fn first_match<'a>(blocks: &'a [RequestMatch], request: &RequestFacts) -> Option<Option<&'a str>> {
    if blocks.is_empty() {
        return Some(None);
    }
    blocks
        .iter()
        .find(|m| m.matches(request))
        .map(RequestMatch::matched_prefix)
}

/// The route a request takes, and the match block that took it.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub rule: &'a HttpRule,
    /// The prefix the path matched, for `rewrite.uri`.
    pub matched_prefix: Option<&'a str>,
}

/// A `tcp` route: connections matching it go to one of its destinations by weight.
#[derive(Debug, Clone, Serialize)]
pub struct TcpRule {
    #[serde(skip)]
    ports: Vec<Option<u16>>,
    #[serde(skip)]
    source_labels: Vec<BTreeMap<String, String>>,
    #[serde(skip)]
    subnets: Vec<Vec<(Ipv4Addr, u8)>>,
    pub destinations: Vec<WeightedDestination>,
}

/// A `tls` route: a TLS connection whose ClientHello names one of a match block's
/// `sniHosts` (and whose other fields hold) goes to one of its destinations by weight.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRule {
    pub matches: Vec<TlsMatch>,
    pub destinations: Vec<WeightedDestination>,
}

/// One `match` block of a `tls` route.
#[derive(Debug, Clone, Serialize)]
pub struct TlsMatch {
    /// Lower-cased; `*.example.com` takes every name under `example.com`, `*` every name.
    pub sni_hosts: Vec<String>,
    pub port: Option<u16>,
    #[serde(skip)]
    subnets: Vec<(Ipv4Addr, u8)>,
    #[serde(skip)]
    source_labels: BTreeMap<String, String>,
    #[serde(skip)]
    source_namespace: Option<String>,
}

impl TlsMatch {
    fn holds(&self, source: &Workload, destination: std::net::SocketAddrV4, sni: &str) -> bool {
        self.sni_hosts.iter().any(|host| sni_matches(host, sni))
            && self.port.is_none_or(|p| p == destination.port())
            && (self.subnets.is_empty()
                || self
                    .subnets
                    .iter()
                    .any(|(net, len)| in_subnet(*destination.ip(), *net, *len)))
            && self
                .source_labels
                .iter()
                .all(|(k, v)| source.labels.get(k) == Some(v))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|ns| *ns == source.namespace)
    }
}

/// Whether the server name `sni` is one `pattern` (an `sniHosts` entry, lower-cased)
/// takes, as Envoy's `server_names` match: exactly, or under a `*.` wildcard's domain.
fn sni_matches(pattern: &str, sni: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) if suffix.starts_with('.') => {
            sni.len() > suffix.len()
                && sni
                    .get(sni.len() - suffix.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
        }
        _ => pattern.eq_ignore_ascii_case(sni),
    }
}

/// The routes one VirtualService gives its hosts.
#[derive(Debug, Serialize)]
pub struct HostRoutes {
    /// `namespace/name` of the VirtualService.
    pub virtual_service: String,
    #[serde(skip)]
    namespace: String,
    #[serde(skip)]
    exported_to: Option<Vec<String>>,
    pub http: Vec<HttpRule>,
    pub tls: Vec<TlsRule>,
    pub tcp: Vec<TcpRule>,
}

impl HostRoutes {
    fn visible_from(&self, namespace: &str) -> bool {
        self.exported_to
            .as_ref()
            .is_none_or(|to| to.iter().any(|n| n == namespace))
    }

    /// The routes Istio gives a host no VirtualService routes: one route, `default`, to
    /// the whole host with Istio's default retries.
    pub fn default_for(hostname: &str, namespace: &str) -> HostRoutes {
        let destination = WeightedDestination {
            host: hostname.to_owned(),
            subset: None,
            port: None,
            weight: 100,
            headers: HeaderChanges::default(),
        };
        HostRoutes {
            virtual_service: "-".to_owned(),
            namespace: namespace.to_owned(),
            exported_to: None,
            http: vec![HttpRule {
                name: "default".to_owned(),
                matches: Vec::new(),
                action: Action::Route(vec![destination]),
                rewrite: None,
                timeout: None,
                retries: RetryPolicy::istio_default(),
                fault: Fault::default(),
                headers: HeaderChanges::default(),
                mirrors: Vec::new(),
                cors: None,
                root_matches: Vec::new(),
            }],
            tls: Vec::new(),
            tcp: Vec::new(),
        }
    }

    /// The route a request takes: `None` when no route matches (Envoy's `NR`: 404).
    pub fn select<'a>(&'a self, request: &RequestFacts) -> Option<Selected<'a>> {
        self.http.iter().find_map(|rule| {
            rule.takes(request).map(|matched_prefix| Selected {
                rule,
                matched_prefix,
            })
        })
    }

    /// Whether `rule` (one of these routes) takes `request`.
    pub fn select_rule(&self, rule: &HttpRule, request: &RequestFacts) -> bool {
        rule.takes(request).is_some()
    }

    /// The `tls` route a TLS connection from `source` to `destination` whose ClientHello
    /// names `sni` takes; none without a name.
    pub fn select_tls(
        &self,
        source: &Workload,
        destination: std::net::SocketAddrV4,
        sni: Option<&str>,
    ) -> Option<&TlsRule> {
        let sni = sni?;
        self.tls.iter().find(|rule| {
            rule.matches
                .iter()
                .any(|m| m.holds(source, destination, sni))
        })
    }

    /// The `tcp` route a connection from `source` to `destination` takes.
    pub fn select_tcp(
        &self,
        source: &Workload,
        destination: std::net::SocketAddrV4,
    ) -> Option<&TcpRule> {
        self.tcp.iter().find(|rule| {
            if rule.ports.is_empty() {
                return true;
            }
            (0..rule.ports.len()).any(|i| {
                rule.ports[i].is_none_or(|p| p == destination.port())
                    && rule.source_labels[i]
                        .iter()
                        .all(|(k, v)| source.labels.get(k) == Some(v))
                    && (rule.subnets[i].is_empty()
                        || rule.subnets[i]
                            .iter()
                            .any(|(net, len)| in_subnet(*destination.ip(), *net, *len)))
            })
        })
    }
}

fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// One of `destinations` by weight; `roll` is uniform in `0..total weight`.
pub fn choose(destinations: &[WeightedDestination], roll: u32) -> Option<&WeightedDestination> {
    let mut left = roll;
    destinations.iter().find(|d| {
        if left < d.weight {
            return true;
        }
        left -= d.weight;
        false
    })
}

/// One of `destinations` by weight, at random.
pub fn choose_random(destinations: &[WeightedDestination]) -> Option<&WeightedDestination> {
    let total: u32 = destinations.iter().map(|d| d.weight).sum();
    if total == 0 {
        return None;
    }
    choose(destinations, random(total as usize) as u32)
}

/// Every VirtualService of the mesh (`gateways` empty or `mesh`), by host.
#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    by_host: BTreeMap<String, Vec<Arc<HostRoutes>>>,
}

/// A VirtualService that could not be compiled, and why (the validator reports the same
/// problems with their lines; this keeps the rest of the table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub virtual_service: String,
    pub message: String,
}

impl RouteTable {
    pub fn build(config: &ClusterConfig) -> (RouteTable, Vec<CompileError>) {
        let mut table = RouteTable::default();
        let mut errors = Vec::new();
        let mut services: Vec<&Resource<VirtualService>> =
            config.istio.virtual_services.iter().collect();
        // Istio orders VirtualServices of one host by age; names stand in for it here.
        services.sort_by(|a, b| {
            (a.namespace(), &a.metadata.name).cmp(&(b.namespace(), &b.metadata.name))
        });
        for vs in services {
            if !vs.spec.gateways.is_empty() && !vs.spec.gateways.iter().any(|g| g == "mesh") {
                continue;
            }
            match compile(vs, &config.istio.virtual_services) {
                Ok((routes, left_out)) => {
                    let name = format!("{}/{}", vs.namespace(), vs.metadata.name);
                    errors.extend(left_out.into_iter().map(|message| CompileError {
                        virtual_service: name.clone(),
                        message,
                    }));
                    let routes = Arc::new(routes);
                    for host in &vs.spec.hosts {
                        table
                            .by_host
                            .entry(fqdn(host, vs.namespace()))
                            .or_default()
                            .push(routes.clone());
                    }
                }
                Err(message) => errors.push(CompileError {
                    virtual_service: format!("{}/{}", vs.namespace(), vs.metadata.name),
                    message,
                }),
            }
        }
        (table, errors)
    }

    /// The VirtualService a pod of `source_namespace` uses for `host`: one of its own
    /// namespace first, then any other visible to it; an exact host before a wildcard
    /// (the longest wildcard first).
    pub fn for_host(&self, host: &str, source_namespace: &str) -> Option<&Arc<HostRoutes>> {
        if let Some(found) = self
            .by_host
            .get(host)
            .and_then(|c| preferred(c, source_namespace))
        {
            return Some(found);
        }
        let mut wildcards: Vec<(&String, &Vec<Arc<HostRoutes>>)> = self
            .by_host
            .iter()
            .filter(|(pattern, _)| {
                pattern
                    .strip_prefix('*')
                    .is_some_and(|suffix| host.ends_with(suffix))
            })
            .collect();
        wildcards.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.len()));
        wildcards
            .into_iter()
            .find_map(|(_, c)| preferred(c, source_namespace))
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// Every host with its VirtualServices, for `meshctl routes`.
    pub fn hosts(&self) -> impl Iterator<Item = (&String, &Vec<Arc<HostRoutes>>)> {
        self.by_host.iter()
    }
}

/// Of the VirtualServices of one host visible from `namespace`, the one of that namespace,
/// else the first.
fn preferred<'a>(
    candidates: &'a [Arc<HostRoutes>],
    namespace: &str,
) -> Option<&'a Arc<HostRoutes>> {
    let visible: Vec<&Arc<HostRoutes>> = candidates
        .iter()
        .filter(|r| r.visible_from(namespace))
        .collect();
    visible
        .iter()
        .find(|r| r.namespace == namespace)
        .or(visible.first())
        .copied()
}

fn destination(
    d: &istio::Destination,
    namespace: &str,
    weight: u32,
    headers: HeaderChanges,
) -> WeightedDestination {
    WeightedDestination {
        host: fqdn(&d.host, namespace),
        subset: d.subset.clone(),
        port: d
            .port
            .as_ref()
            .and_then(|p| p.number)
            .and_then(|n| u16::try_from(n).ok()),
        weight,
        headers,
    }
}

/// A destination's weight: a lone destination without one takes everything.
fn weight_of(weight: Option<i32>, alone: bool) -> u32 {
    match weight {
        Some(w) => u32::try_from(w).unwrap_or(0),
        None if alone => 100,
        None => 0,
    }
}

/// A delegate's route with what it leaves unset taken from the root route, as Istio merges
/// them (`mergeHTTPRoute`); the root's match is kept apart and AND-ed at selection.
fn inherit(root: &istio::HttpRoute, child: &istio::HttpRoute) -> istio::HttpRoute {
    let mut merged = child.clone();
    merged.rewrite = merged.rewrite.or_else(|| root.rewrite.clone());
    merged.timeout = merged.timeout.or_else(|| root.timeout.clone());
    merged.retries = merged.retries.or_else(|| root.retries.clone());
    merged.fault = merged.fault.or_else(|| root.fault.clone());
    merged.headers = merged.headers.or_else(|| root.headers.clone());
    merged.cors_policy = merged.cors_policy.or_else(|| root.cors_policy.clone());
    if merged.mirror.is_none() && merged.mirrors.is_empty() {
        merged.mirror = root.mirror.clone();
        merged.mirrors = root.mirrors.clone();
        merged.mirror_percentage = merged
            .mirror_percentage
            .or_else(|| root.mirror_percentage.clone());
        merged.mirror_percent = merged.mirror_percent.or(root.mirror_percent);
    }
    merged
}

/// One `http` route, named `name`, of a VirtualService of `namespace` (the delegate's, for
/// a delegated route: its short hosts are its own namespace's), under `root_matches`.
fn compile_http(
    route: &istio::HttpRoute,
    name: String,
    namespace: &str,
    root_matches: Vec<RequestMatch>,
) -> Result<HttpRule, String> {
    let matches = route
        .matches
        .iter()
        .map(RequestMatch::compile)
        .collect::<Result<Vec<_>, _>>()?;
    let action = if let Some(redirect) = &route.redirect {
        let code = redirect.redirect_code.unwrap_or(301);
        Action::Redirect(Redirect {
            uri: redirect.uri.clone(),
            authority: redirect.authority.clone(),
            scheme: redirect.scheme.clone(),
            port: redirect.port.and_then(|p| u16::try_from(p).ok()),
            from_request_port: redirect.derive_port == Some(RedirectPortSelection::FromRequestPort),
            status: u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(StatusCode::is_redirection)
                .ok_or_else(|| format!("redirectCode {code} is not a redirection"))?,
        })
    } else if let Some(direct) = &route.direct_response {
        let status = u16::try_from(direct.status)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| format!("status {} is not an HTTP status", direct.status))?;
        let body = match &direct.body {
            Some(istio::HttpBody {
                string: Some(text), ..
            }) => Bytes::from(text.clone()),
            Some(istio::HttpBody {
                bytes: Some(encoded),
                ..
            }) => {
                use base64::Engine;
                Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|e| format!("directResponse.body.bytes: {e}"))?,
                )
            }
            _ => Bytes::new(),
        };
        Action::DirectResponse { status, body }
    } else {
        let alone = route.route.len() == 1;
        Action::Route(
            route
                .route
                .iter()
                .map(|r| {
                    Ok(destination(
                        &r.destination,
                        namespace,
                        weight_of(r.weight, alone),
                        HeaderChanges::compile(r.headers.as_ref())?,
                    ))
                })
                .collect::<Result<_, String>>()?,
        )
    };
    let rewrite = route
        .rewrite
        .as_ref()
        .map(|r| {
            let uri_regex = r
                .uri_regex_rewrite
                .as_ref()
                .and_then(|rr| Some((rr.pattern.as_ref()?, rr.rewrite.as_deref()?)))
                .map(|(pattern, replacement)| {
                    regex::Regex::new(&pattern.0)
                        .map(|re| (re, envoy_substitution(replacement)))
                        .map_err(|e| format!("uriRegexRewrite {:?}: {e}", pattern.0))
                })
                .transpose()?;
            Ok::<_, String>(Rewrite {
                uri: r.uri.clone(),
                uri_regex,
                authority: r.authority.clone(),
            })
        })
        .transpose()?;
    let mut mirrors: Vec<Mirror> = route
        .mirror
        .iter()
        .map(|m| Mirror {
            host: fqdn(&m.host, namespace),
            subset: m.subset.clone(),
            port: m
                .port
                .as_ref()
                .and_then(|p| p.number)
                .and_then(|n| u16::try_from(n).ok()),
            percent: percentage(
                route.mirror_percentage.as_ref(),
                route.mirror_percent.and_then(|p| i32::try_from(p).ok()),
            ),
        })
        .collect();
    mirrors.extend(route.mirrors.iter().map(|m| {
        Mirror {
            host: fqdn(&m.destination.host, namespace),
            subset: m.destination.subset.clone(),
            port: m
                .destination
                .port
                .as_ref()
                .and_then(|p| p.number)
                .and_then(|n| u16::try_from(n).ok()),
            percent: percentage(m.percentage.as_ref(), None),
        }
    }));
    Ok(HttpRule {
        name,
        root_matches,
        matches,
        action,
        rewrite,
        timeout: route
            .timeout
            .as_ref()
            .map(|d| d.value)
            .filter(|d| !d.is_zero()),
        retries: RetryPolicy::compile(route.retries.as_ref())?,
        fault: Fault::compile(route.fault.as_ref())?,
        headers: HeaderChanges::compile(route.headers.as_ref())?,
        mirrors,
        cors: Cors::compile(route.cors_policy.as_ref())?,
    })
}

/// The routes of `vs`, and why delegating routes were left out: a delegation that
/// cannot be followed (its VirtualService missing, hidden, with hosts of its own, or
/// delegating again — things another namespace may change) drops that route alone, as
/// Istio drops it, and the rest of the VirtualService keeps serving.
fn compile(
    vs: &Resource<VirtualService>,
    virtual_services: &[Resource<VirtualService>],
) -> Result<(HostRoutes, Vec<String>), String> {
    let namespace = vs.namespace();
    let vs_name = &vs.metadata.name;
    let mut http = Vec::new();
    let mut left_out = Vec::new();
    for (i, route) in vs.spec.http.iter().enumerate() {
        let at = |e: String| format!("spec.http[{i}]: {e}");
        let Some(delegate) = &route.delegate else {
            let name = route
                .name
                .clone()
                .unwrap_or_else(|| format!("{vs_name}.{i}"));
            http.push(compile_http(route, name, namespace, Vec::new()).map_err(at)?);
            continue;
        };
        // Validation rejects a route that sets both; the route table leaves them out.
        if !route.route.is_empty() || route.redirect.is_some() || route.direct_response.is_some() {
            return Err(at(
                "only one of route, redirect, directResponse and delegate may be set".into(),
            ));
        }
        let target = match delegate_target(delegate, namespace, virtual_services) {
            Ok(target) => target,
            Err(problem) => {
                left_out.push(at(problem));
                continue;
            }
        };
        let root_matches = route
            .matches
            .iter()
            .map(RequestMatch::compile)
            .collect::<Result<Vec<_>, _>>()
            .map_err(at)?;
        let target_name = format!("{}/{}", target.namespace(), target.metadata.name);
        for (j, child) in target.spec.http.iter().enumerate() {
            let name = child
                .name
                .clone()
                .unwrap_or_else(|| format!("{}.{j}", target.metadata.name));
            let merged = inherit(route, child);
            let rule = compile_http(&merged, name, target.namespace(), root_matches.clone())
                .map_err(|e| at(format!("delegate {target_name} spec.http[{j}]: {e}")))?;
            http.push(rule);
        }
    }
    let tcp = vs
        .spec
        .tcp
        .iter()
        .map(|route| {
            let alone = route.route.len() == 1;
            TcpRule {
                ports: route
                    .matches
                    .iter()
                    .map(|m| m.port.and_then(|p| u16::try_from(p).ok()))
                    .collect(),
                source_labels: route
                    .matches
                    .iter()
                    .map(|m| m.source_labels.clone())
                    .collect(),
                subnets: route
                    .matches
                    .iter()
                    .map(|m| {
                        m.destination_subnets
                            .iter()
                            .filter_map(|block| parse_subnet(&block.0))
                            .collect()
                    })
                    .collect(),
                destinations: route
                    .route
                    .iter()
                    .map(|r| {
                        destination(
                            &r.destination,
                            namespace,
                            weight_of(r.weight, alone),
                            HeaderChanges::default(),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    let exported_to = crate::model::scope::export_scope(&vs.spec.export_to, namespace);
    let tls = vs
        .spec
        .tls
        .iter()
        .enumerate()
        .map(|(i, route)| compile_tls(route, namespace).map_err(|e| format!("spec.tls[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    let routes = HostRoutes {
        virtual_service: format!("{namespace}/{vs_name}"),
        namespace: namespace.to_owned(),
        exported_to,
        http,
        tls,
        tcp,
    };
    Ok((routes, left_out))
}

fn compile_tls(route: &istio::TlsRoute, namespace: &str) -> Result<TlsRule, String> {
    if route.matches.is_empty() {
        return Err("match: a tls route needs a match block with sniHosts".into());
    }
    let matches = route
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| {
            if m.sni_hosts.is_empty() {
                return Err(format!("match[{j}].sniHosts: required in a tls route"));
            }
            Ok(TlsMatch {
                sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                port: m.port.and_then(|p| u16::try_from(p).ok()),
                subnets: m
                    .destination_subnets
                    .iter()
                    .filter_map(|block| parse_subnet(&block.0))
                    .collect(),
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
            })
        })
        .collect::<Result<_, String>>()?;
    let alone = route.route.len() == 1;
    Ok(TlsRule {
        matches,
        destinations: route
            .route
            .iter()
            .map(|r| {
                destination(
                    &r.destination,
                    namespace,
                    weight_of(r.weight, alone),
                    HeaderChanges::default(),
                )
            })
            .collect(),
    })
}

fn parse_subnet(text: &str) -> Option<(Ipv4Addr, u8)> {
    match text.split_once('/') {
        Some((ip, len)) => Some((ip.parse().ok()?, len.parse().ok().filter(|l| *l <= 32)?)),
        None => Some((text.parse().ok()?, 32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn table(yaml: &str) -> RouteTable {
        let config = load_str(std::path::Path::new("vs.yaml"), yaml);
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        let (table, errors) = RouteTable::build(&config);
        assert!(errors.is_empty(), "{errors:?}");
        table
    }

    fn pod(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: String::new(),
            namespace: namespace.into(),
            pod: "client".into(),
            workload: "client".into(),
            service_account: "default".into(),
            node: "node-a".into(),
            ip: Ipv4Addr::new(10, 244, 1, 10),
            app: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            named_ports: BTreeMap::new(),
            probe_ports: Vec::new(),
        }
    }

    struct Req {
        method: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        headers: HeaderMap,
        source: Workload,
    }

    fn get(path: &'static str) -> Req {
        Req {
            method: "GET",
            path,
            query: None,
            headers: HeaderMap::new(),
            source: pod("shop", &[]),
        }
    }

    impl Req {
        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.insert(name, HeaderValue::from_static(value));
            self
        }

        fn facts(&self) -> RequestFacts<'_> {
            RequestFacts {
                method: self.method,
                scheme: "http",
                authority: "reviews:9080",
                path: self.path,
                query: self.query,
                headers: &self.headers,
                port: 9080,
                source: &self.source,
            }
        }
    }

    const CANARY: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    - uri: {prefix: /beta}
      ignoreUriCase: true
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v3}
      weight: 10
";

    fn route_name(table: &RouteTable, request: &Req) -> Option<String> {
        table
            .for_host("reviews.shop.svc.cluster.local", &request.source.namespace)?
            .select(&request.facts())
            .map(|s| s.rule.name.clone())
    }

    #[test]
    fn match_blocks_are_ored_and_the_first_matching_route_wins() {
        let table = table(CANARY);
        assert_eq!(
            route_name(&table, &get("/").header("end-user", "jason")).as_deref(),
            Some("jason")
        );
        assert_eq!(
            route_name(&table, &get("/BETA/x")).as_deref(),
            Some("jason"),
            "ignoreUriCase"
        );
        assert_eq!(
            route_name(&table, &get("/").header("end-user", "json")).as_deref(),
            Some("reviews.1")
        );
    }

    #[test]
    fn weights_split_requests_in_proportion() {
        let table = table(CANARY);
        let routes = table
            .for_host("reviews.shop.svc.cluster.local", "shop")
            .expect("routes");
        let Action::Route(destinations) = &routes.http[1].action else {
            panic!("a route");
        };
        let subset = |roll| choose(destinations, roll).and_then(|d| d.subset.clone());
        assert_eq!(subset(0).as_deref(), Some("v1"));
        assert_eq!(subset(89).as_deref(), Some("v1"));
        assert_eq!(subset(90).as_deref(), Some("v3"));
        assert_eq!(subset(99).as_deref(), Some("v3"));
        assert_eq!(subset(100), None);
        let v3 = (0..10_000)
            .filter(|_| choose_random(destinations).and_then(|d| d.subset.as_deref()) == Some("v3"))
            .count();
        assert!((800..=1200).contains(&v3), "{v3} of 10000 to v3");
    }

    #[test]
    fn fields_of_one_match_block_all_hold() {
        let table = table(
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - name: strict
    match:
    - method: {exact: POST}
      uri: {regex: '/api/v[0-9]+/.*'}
      queryParams: {debug: {exact: '1'}}
      withoutHeaders: {x-skip: {}}
      sourceLabels: {app: web}
      port: 9080
    route: [{destination: {host: reviews}}]
",
        );
        let mut request = get("/api/v2/items");
        request.method = "POST";
        request.query = Some("a=b&debug=1");
        request.source = pod("shop", &[("app", "web")]);
        assert_eq!(route_name(&table, &request).as_deref(), Some("strict"));
        request.query = Some("debug=2");
        assert_eq!(route_name(&table, &request), None, "query param");
        request.query = Some("debug=1");
        let skipped = request.header("x-skip", "anything");
        assert_eq!(route_name(&table, &skipped), None, "withoutHeaders");
        let mut other = get("/api/v2/items");
        other.method = "POST";
        other.query = Some("debug=1");
        assert_eq!(route_name(&table, &other), None, "sourceLabels");
    }

    #[test]
    fn the_source_namespace_s_own_virtual_service_wins_and_export_to_hides() {
        let table = table(
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-private, namespace: other}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  exportTo: [.]
  http: [{name: private, route: [{destination: {host: reviews.shop.svc.cluster.local}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: public, namespace: shop}
spec:
  hosts: [reviews]
  http: [{name: public, route: [{destination: {host: reviews}}]}]
",
        );
        let host = "reviews.shop.svc.cluster.local";
        let name = |ns: &str| table.for_host(host, ns).map(|r| r.virtual_service.clone());
        assert_eq!(name("other").as_deref(), Some("other/a-private"));
        assert_eq!(name("shop").as_deref(), Some("shop/public"));
        assert_eq!(name("third").as_deref(), Some("shop/public"));
    }

    #[test]
    fn istio_s_default_retries_and_explicit_ones() {
        let default = RetryPolicy::istio_default();
        assert_eq!(default.attempts, 2);
        assert!(default.retries(TryOutcome::Response {
            status: 503,
            grpc: None
        }));
        assert!(!default.retries(TryOutcome::Response {
            status: 500,
            grpc: None
        }));
        assert!(default.retries(TryOutcome::ConnectFailure));
        assert!(default.retries(TryOutcome::Response {
            status: 200,
            grpc: Some(14)
        }));
        assert!(!default.retries(TryOutcome::Timeout));

        let five = RetryOn::parse("5xx").expect("parse");
        let policy = RetryPolicy {
            attempts: 3,
            per_try_timeout: None,
            on: five,
        };
        assert!(policy.retries(TryOutcome::Response {
            status: 500,
            grpc: None
        }));
        assert!(policy.retries(TryOutcome::Timeout));
        assert!(!policy.retries(TryOutcome::Response {
            status: 404,
            grpc: None
        }));
        let codes = RetryOn::parse("retriable-status-codes,418, gateway-error").expect("parse");
        assert_eq!(codes.status_codes, vec![418]);
        assert!(codes.gateway_error);
        assert!(RetryOn::parse("5xx,sometimes").is_err());
        for n in 1..6 {
            assert!(RetryPolicy::backoff(n) <= Duration::from_millis(250));
        }
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_or_the_whole_path() {
        let rewrite = Rewrite {
            uri: Some("/v2".into()),
            uri_regex: None,
            authority: None,
        };
        assert_eq!(rewrite.path("/v1/items", Some("/v1")), "/v2/items");
        assert_eq!(rewrite.path("/exact", None), "/v2");
        let regex = Rewrite {
            uri: None,
            uri_regex: Some((
                regex::Regex::new("^/service/([^/]+)(/.*)$").expect("regex"),
                envoy_substitution("\\2/instance/\\1"),
            )),
            authority: None,
        };
        assert_eq!(
            regex.path("/service/foo/v1/api", None),
            "/v1/api/instance/foo"
        );
    }

    #[test]
    fn redirects_keep_what_they_do_not_replace() {
        let request = get("/old");
        let mut facts = request.facts();
        facts.query = Some("q=1");
        let redirect = Redirect {
            uri: Some("/new".into()),
            authority: None,
            scheme: None,
            port: None,
            from_request_port: false,
            status: StatusCode::MOVED_PERMANENTLY,
        };
        assert_eq!(redirect.location(&facts), "http://reviews:9080/new?q=1");
        let elsewhere = Redirect {
            authority: Some("ratings".into()),
            scheme: Some("https".into()),
            ..redirect
        };
        assert_eq!(elsewhere.location(&facts), "https://ratings/new?q=1");
    }

    #[test]
    fn tcp_routes_match_port_and_subnet() {
        let table = table(
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.96.0.0/16]}]
    route:
    - {destination: {host: db, subset: primary}, weight: 80}
    - {destination: {host: db, subset: replica}, weight: 20}
",
        );
        let routes = table
            .for_host("db.shop.svc.cluster.local", "shop")
            .expect("routes");
        let source = pod("shop", &[]);
        let rule = routes
            .select_tcp(&source, "10.96.3.4:5432".parse().expect("addr"))
            .expect("matched");
        assert_eq!(rule.destinations.len(), 2);
        assert!(routes
            .select_tcp(&source, "10.97.3.4:5432".parse().expect("addr"))
            .is_none());
        assert!(routes
            .select_tcp(&source, "10.96.3.4:5433".parse().expect("addr"))
            .is_none());
    }

    fn cors_of(yaml_policy: &str) -> Cors {
        let table = table(&format!(
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - corsPolicy: {yaml_policy}
    route: [{{destination: {{host: web}}}}]
"
        ));
        let routes = table
            .for_host("web.shop.svc.cluster.local", "shop")
            .expect("routes");
        routes.http[0].cors.clone().expect("a CORS policy")
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    fn shown(map: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = map
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().expect("text").to_owned()))
            .collect();
        pairs.sort();
        pairs
    }

    #[test]
    fn cors_preflights_from_allowed_origins_are_answered_and_requests_get_their_headers() {
        let cors = cors_of(
            "{allowOrigins: [{exact: 'https://shop.example'}, {regex: 'https://.*[.]partner[.]example'}], \
             allowMethods: [GET, POST], allowHeaders: [x-token, content-type], \
             exposeHeaders: [x-trace], maxAge: 24h, allowCredentials: true}",
        );
        let preflight = |origin: &'static str| {
            cors.judge(
                "OPTIONS",
                &headers(&[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                ]),
            )
        };
        let CorsVerdict::AnswerPreflight(answer) = preflight("https://a.partner.example") else {
            panic!("answered");
        };
        assert_eq!(
            shown(&answer),
            [
                ("access-control-allow-credentials", "true"),
                ("access-control-allow-headers", "x-token,content-type"),
                ("access-control-allow-methods", "GET,POST"),
                ("access-control-allow-origin", "https://a.partner.example"),
                ("access-control-max-age", "86400"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        // Regexes match whole origins; FORWARD is the default for others.
        assert_eq!(
            preflight("https://a.partner.example.evil"),
            CorsVerdict::Untouched
        );
        assert_eq!(preflight("https://evil.example"), CorsVerdict::Untouched);
        let CorsVerdict::Allow(added) =
            cors.judge("GET", &headers(&[("origin", "https://shop.example")]))
        else {
            panic!("allowed");
        };
        assert_eq!(
            shown(&added),
            [
                ("access-control-allow-credentials", "true"),
                ("access-control-allow-origin", "https://shop.example"),
                ("access-control-expose-headers", "x-trace"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        // OPTIONS without Access-Control-Request-Method is an actual request; no Origin
        // is no CORS request at all.
        assert!(matches!(
            cors.judge("OPTIONS", &headers(&[("origin", "https://shop.example")])),
            CorsVerdict::Allow(_)
        ));
        assert_eq!(cors.judge("GET", &HeaderMap::new()), CorsVerdict::Untouched);
        assert_eq!(
            cors.judge("GET", &headers(&[("origin", "https://evil.example")])),
            CorsVerdict::Untouched
        );
    }

    #[test]
    fn unmatched_preflights_are_ignored_on_request_and_the_deprecated_list_is_exact() {
        let cors = cors_of("{allowOrigin: ['https://old.example'], unmatchedPreflights: IGNORE}");
        let preflight = |origin: &'static str| {
            cors.judge(
                "OPTIONS",
                &headers(&[("origin", origin), ("access-control-request-method", "GET")]),
            )
        };
        assert_eq!(
            preflight("https://old.example.x"),
            CorsVerdict::IgnorePreflight
        );
        let CorsVerdict::AnswerPreflight(answer) = preflight("https://old.example") else {
            panic!("answered");
        };
        assert_eq!(
            shown(&answer),
            [(
                "access-control-allow-origin".to_owned(),
                "https://old.example".to_owned()
            )]
        );
        // Envoy's rule: a matcher that takes `*` allows every origin, which is echoed.
        let any = cors_of("{allowOrigins: [{exact: '*'}]}");
        let CorsVerdict::Allow(added) =
            any.judge("GET", &headers(&[("origin", "https://any.example")]))
        else {
            panic!("allowed");
        };
        assert_eq!(added["access-control-allow-origin"], "https://any.example");
    }

    const DELEGATION: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: api
    match: [{uri: {prefix: /api}}, {uri: {prefix: /v1/api}}]
    delegate: {name: api, namespace: team}
    timeout: 3s
  - name: rest
    route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: team}
spec:
  exportTo: [shop]
  http:
  - name: beta
    match: [{headers: {x-beta: {exact: 'on'}}}]
    timeout: 1s
    route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: api-backend}}]
";

    #[test]
    fn delegated_routes_hold_under_the_root_match_and_inherit_what_they_leave_unset() {
        let table = table(DELEGATION);
        let routes = table
            .for_host("reviews.shop.svc.cluster.local", "shop")
            .expect("routes");
        assert_eq!(
            table.hosts().count(),
            1,
            "the delegate has no host of its own"
        );
        let names: Vec<&str> = routes.http.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["beta", "api.1", "rest"]);
        assert_eq!(
            route_name(&table, &get("/api/x").header("x-beta", "on")).as_deref(),
            Some("beta")
        );
        assert_eq!(
            route_name(&table, &get("/v1/api").header("x-beta", "on")).as_deref(),
            Some("beta")
        );
        assert_eq!(route_name(&table, &get("/api/x")).as_deref(), Some("api.1"));
        assert_eq!(
            route_name(&table, &get("/other").header("x-beta", "on")).as_deref(),
            Some("rest"),
            "the root's match holds too"
        );
        assert_eq!(routes.http[0].timeout, Some(Duration::from_secs(1)));
        assert_eq!(
            routes.http[1].timeout,
            Some(Duration::from_secs(3)),
            "inherited"
        );
        let Action::Route(destinations) = &routes.http[1].action else {
            panic!("a route");
        };
        assert_eq!(
            destinations[0].host, "api-backend.team.svc.cluster.local",
            "short names are the delegate's namespace's"
        );
        let selected = routes.select(&get("/api/items").facts()).expect("selected");
        assert_eq!(
            selected.matched_prefix,
            Some("/api"),
            "the root's prefix rewrites"
        );
    }

    #[test]
    fn delegation_to_a_missing_hidden_hosted_or_delegating_service_is_refused() {
        let errors = |yaml: &str| {
            let config = load_str(std::path::Path::new("vs.yaml"), yaml);
            let (_, errors) = RouteTable::build(&config);
            errors
                .into_iter()
                .map(|e| format!("{}: {}", e.virtual_service, e.message))
                .collect::<Vec<_>>()
        };
        let missing = DELEGATION.replace("delegate: {name: api,", "delegate: {name: nope,");
        assert_eq!(
            errors(&missing),
            ["shop/root: spec.http[0]: delegate team/nope: no such VirtualService is visible to namespace shop"]
        );
        let config = load_str(std::path::Path::new("vs.yaml"), &missing);
        let (table, _) = RouteTable::build(&config);
        let kept = table
            .for_host("reviews.shop.svc.cluster.local", "shop")
            .expect("the root VirtualService is kept");
        let names: Vec<&str> = kept.http.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["rest"], "without its delegating route");
        let hidden = DELEGATION.replace("exportTo: [shop]", "exportTo: [.]");
        assert_eq!(
            errors(&hidden),
            ["shop/root: spec.http[0]: delegate team/api: no such VirtualService is visible to namespace shop"]
        );
        let hosted = DELEGATION.replace("  exportTo: [shop]", "  hosts: [api]\n  exportTo: [shop]");
        assert_eq!(
            errors(&hosted),
            ["shop/root: spec.http[0]: delegate team/api has hosts: a delegate VirtualService has none"]
        );
        let twice = DELEGATION.replace(
            "  - route: [{destination: {host: api-backend}}]",
            "  - delegate: {name: deeper}",
        );
        assert_eq!(
            errors(&twice),
            [
                "shop/root: spec.http[0]: delegate team/api delegates again: only one level of delegation is supported",
                "team/api: spec.http[1]: delegate team/deeper: no such VirtualService is visible to namespace team",
            ]
        );
    }

    #[test]
    fn tls_routes_take_a_connection_by_server_name_port_and_source() {
        let table = table(
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tls, namespace: shop}
spec:
  hosts: [secure]
  tls:
  - match: [{sniHosts: [A.Example], port: 443, sourceLabels: {app: web}}]
    route: [{destination: {host: secure, subset: a}}]
  - match: [{sniHosts: ['*.b.example'], sourceNamespace: shop}]
    route: [{destination: {host: secure, subset: b}}]
",
        );
        let routes = table
            .for_host("secure.shop.svc.cluster.local", "shop")
            .expect("routes");
        let web = pod("shop", &[("app", "web")]);
        let other = pod("else", &[]);
        let at = |port: &str| format!("10.96.0.9:{port}").parse().expect("addr");
        let subset = |source: &Workload, port: &str, sni: Option<&str>| {
            routes
                .select_tls(source, at(port), sni)
                .and_then(|rule| rule.destinations[0].subset.clone())
        };
        assert_eq!(subset(&web, "443", Some("a.example")).as_deref(), Some("a"));
        assert_eq!(subset(&web, "8443", Some("a.example")), None, "port");
        assert_eq!(
            subset(&other, "443", Some("a.example")),
            None,
            "sourceLabels"
        );
        assert_eq!(
            subset(&web, "443", Some("x.b.example")).as_deref(),
            Some("b")
        );
        assert_eq!(
            subset(&web, "443", Some("b.example")),
            None,
            "a wildcard needs a label"
        );
        assert_eq!(
            subset(&other, "443", Some("x.b.example")),
            None,
            "sourceNamespace"
        );
        assert_eq!(subset(&web, "443", None), None, "no server name");
    }

    #[test]
    fn a_tls_route_without_server_names_does_not_compile() {
        let config = load_str(
            std::path::Path::new("vs.yaml"),
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tls, namespace: shop}
spec:
  hosts: [secure]
  tls:
  - match: [{port: 443}]
    route: [{destination: {host: secure}}]
",
        );
        let (_, errors) = RouteTable::build(&config);
        assert_eq!(
            errors[0].message,
            "spec.tls[0]: match[0].sniHosts: required in a tls route"
        );
    }

    #[test]
    fn faults_and_direct_responses_compile() {
        let table = table(
            "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - fault:
      delay: {fixedDelay: 2s, percentage: {value: 50}}
      abort: {grpcStatus: UNAVAILABLE}
    route: [{destination: {host: ratings}}]
",
        );
        let routes = table
            .for_host("ratings.shop.svc.cluster.local", "shop")
            .expect("routes");
        match &routes.http[0].action {
            Action::DirectResponse { status, body } => {
                assert_eq!(status.as_u16(), 418);
                assert_eq!(&body[..], b"short and stout");
            }
            other => panic!("{other:?}"),
        }
        let fault = &routes.http[1].fault;
        assert_eq!(fault.delay, Some((Duration::from_secs(2), 50.0)));
        assert_eq!(fault.abort, Some((AbortWith::Grpc(14), 100.0)));
        assert!(Fault::rolls(100.0));
        assert!(!Fault::rolls(0.0));
    }
}
