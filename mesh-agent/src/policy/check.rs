//! `meshctl policy check`: what the destination's policies decide for a connection (and
//! a request) from one pod to a pod or a Service, evaluated by the same code the proxy
//! runs, on the agent's live configuration and fetched keys.

use std::{net::SocketAddrV4, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    model::{peerauth::Effective, MeshState, Workload},
    policy::{
        authz::{self, AuthFacts, Decision, Match, Miss, RequestFacts, Verdict},
        jwt::{self, JwksCache, RequestParts},
        path::normalize_path,
    },
    proxy::inbound::Arrival,
};

/// What to check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckRequest {
    /// A pod: `namespace/name`, or `name` in `default`.
    pub from: String,
    /// A pod (`namespace/name`) or a Service (`namespace/name`, `name.namespace`, or its
    /// hostname).
    pub to: String,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub jwt: Option<String>,
}

/// The answer for one destination workload.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointReport {
    pub workload: String,
    pub address: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// What the client would see: `connected`, `reset`, or an HTTP status.
    pub outcome: String,
    /// `connection` (decided before any byte) or `request`.
    pub layer: String,
    pub decided_by: Option<Match>,
    pub reason: String,
    pub audited: Vec<Match>,
    pub not_matched: Vec<Miss>,
    /// The RequestAuthentication result, when one applies.
    pub authentication: Option<String>,
    pub request_principal: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub source: String,
    pub source_principal: Option<String>,
    pub destination: String,
    /// `allow` when every endpoint allows, else `deny`.
    pub decision: String,
    pub endpoints: Vec<EndpointReport>,
}

fn find_pod(state: &MeshState, name: &str) -> Result<Arc<Workload>, String> {
    let (namespace, pod) = name.split_once('/').unwrap_or(("default", name));
    state
        .workloads
        .values()
        .find(|w| w.namespace == namespace && w.pod == pod)
        .cloned()
        .ok_or_else(|| format!("no meshed pod {namespace}/{pod}"))
}

/// One workload `to` stands for: where it is reached, and the `Host` a client would use.
struct Target {
    workload: Arc<Workload>,
    address: SocketAddrV4,
    host: String,
}

/// The workloads and ports `to` stands for at `port`, and how to name it.
fn destinations(state: &MeshState, to: &str, port: u16) -> Result<(String, Vec<Target>), String> {
    if let Ok(pod) = find_pod(state, to) {
        let address = SocketAddrV4::new(pod.ip, port);
        let target = Target {
            workload: pod.clone(),
            address,
            host: address.to_string(),
        };
        return Ok((pod.key(), vec![target]));
    }
    let service = state
        .services
        .values()
        .find(|s| {
            s.port == port
                && (format!("{}/{}", s.namespace, s.name) == to
                    || format!("{}.{}", s.name, s.namespace) == to
                    || s.hostname == to)
        })
        .ok_or_else(|| format!("{to:?} is neither a meshed pod nor a Service with port {port}"))?;
    let endpoints = service
        .endpoints
        .iter()
        .filter_map(|e| {
            Some(Target {
                workload: e.workload.clone()?,
                address: e.addr,
                host: service.hostname.clone(),
            })
        })
        .collect::<Vec<_>>();
    if endpoints.is_empty() {
        return Err(format!(
            "Service {}/{} port {port} has no meshed endpoint",
            service.namespace, service.name
        ));
    }
    Ok((
        format!("{}/{}:{port}", service.namespace, service.name),
        endpoints,
    ))
}

pub fn check(
    state: &MeshState,
    trust_domain: &str,
    jwks: &JwksCache,
    request: &CheckRequest,
) -> Result<CheckReport, String> {
    let source = find_pod(state, &request.from)?;
    let (destination, targets) = destinations(state, &request.to, request.port)?;
    let principal = format!(
        "{trust_domain}/ns/{}/sa/{}",
        source.namespace, source.service_account
    );
    let client = SocketAddrV4::new(source.ip, 40000);
    let mut endpoints = Vec::new();
    for Target {
        workload,
        address: target,
        host,
    } in targets
    {
        let plaintext = state
            .mtls
            .get(&workload.ip)
            .is_some_and(|m| m.for_port(target.port()) == Effective::Disable);
        let arrival = Arrival::new(
            workload.clone(),
            state.security_of(workload.ip),
            client,
            target,
            (!plaintext).then(|| principal.clone()),
            None,
        );
        endpoints.push(check_endpoint(&arrival, jwks, request, &host)?);
    }
    let decision = if endpoints.iter().all(|e| e.decision == "allow") {
        "allow"
    } else {
        "deny"
    };
    Ok(CheckReport {
        source: source.key(),
        source_principal: Some(principal),
        destination,
        decision: decision.into(),
        endpoints,
    })
}

fn check_endpoint(
    arrival: &Arrival,
    jwks: &JwksCache,
    request: &CheckRequest,
    host: &str,
) -> Result<EndpointReport, String> {
    let security = &arrival.security;
    let connection = authz::evaluate(&security.policies, &arrival.facts);
    let port = arrival.facts.destination_port;
    // As the proxy decides: per request only when the connection's facts do not settle it
    // or tokens are checked on this port.
    let per_request = connection.verdict == Verdict::NeedsRequest
        || (connection.verdict == Verdict::Allow && security.authenticates(port));
    let report = |decision: &Decision, layer: &str, outcome: String| EndpointReport {
        workload: arrival.workload.key(),
        address: format!("{}:{port}", arrival.facts.destination_ip),
        decision: if decision.verdict == Verdict::Allow {
            "allow".into()
        } else {
            "deny".into()
        },
        outcome,
        layer: layer.into(),
        decided_by: decision.decided_by.clone(),
        reason: decision.reason(),
        audited: decision.audited.clone(),
        not_matched: decision.not_matched.clone(),
        authentication: None,
        request_principal: None,
    };
    if !per_request {
        let outcome = if connection.verdict == Verdict::Allow {
            "connected"
        } else {
            "reset"
        };
        return Ok(report(&connection, "connection", outcome.into()));
    }
    let raw_path = request.path.clone().unwrap_or_else(|| "/".into());
    let (path, query) = normalize_path(&raw_path)
        .ok_or_else(|| format!("--path {raw_path:?} is not a valid request path"))?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &request.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("--header {name:?}: invalid header name"))?;
        let value = http::HeaderValue::from_str(value)
            .map_err(|_| format!("--header {name}: invalid header value"))?;
        headers.append(name, value);
    }
    if let Some(token) = &request.jwt {
        let value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| "--jwt: the token is not a valid header value".to_owned())?;
        headers.insert(http::header::AUTHORIZATION, value);
    }
    let mut authentication = None;
    let mut auth: Option<AuthFacts> = None;
    if security.authenticates(port) {
        let parts = RequestParts {
            headers: &headers,
            query: query.as_deref(),
        };
        match jwt::authenticate(&security.jwt_rules, jwks, &parts, jwt::now_seconds()) {
            Ok(Some(found)) => {
                authentication = Some(format!("token of {} accepted", found.issuer));
                auth = Some(found.facts);
            }
            Ok(None) => authentication = Some("no token".into()),
            Err(err) => {
                let mut refused = report(&connection, "request", "401".into());
                refused.decision = "deny".into();
                refused.decided_by = None;
                refused.reason = format!("RequestAuthentication: {err}");
                refused.authentication = Some(format!("rejected: {err}"));
                return Ok(refused);
            }
        }
    }
    let mut facts = arrival.facts.clone();
    facts.request = Some(RequestFacts {
        method: request.method.clone().unwrap_or_else(|| "GET".into()),
        host: headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(host)
            .to_owned(),
        path,
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        auth: auth.clone(),
    });
    let decision = authz::evaluate(&security.policies, &facts);
    let outcome = if decision.verdict == Verdict::Allow {
        "forwarded"
    } else {
        "403"
    };
    let mut result = report(&decision, "request", outcome.into());
    result.authentication = authentication;
    result.request_principal = auth.map(|a| a.principal);
    Ok(result)
}
