//! `meshctl policy check`: what the destination's policies decide for a connection (and
//! a request) from one pod to a pod or a Service, evaluated by the same code the proxy
//! runs, on the agent's live configuration and fetched keys.

use std::{net::SocketAddrV4, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    model::{MeshState, Workload},
    policy::{
        authz::{self, Decision, Match, Miss, Verdict},
        facts::{admit, judge_request, principal_of, Admission, Arrival, Peer, RequestVerdict},
        jwt::{self, Authenticated, JwksCache},
        kernel::carried_by_the_kernel,
    },
};

/// Why a check could not be answered: the request names something the agent does not
/// know, or carries input that is not valid.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no meshed pod {0}")]
    NoPod(String),
    #[error("{to:?} is neither a meshed pod nor a Service with port {port}")]
    NoDestination { to: String, port: u16 },
    #[error("Service {service} port {port} has no meshed endpoint")]
    NoEndpoint { service: String, port: u16 },
    #[error("--method/--path: {0}")]
    Request(String),

    #[error("--header {0:?}: invalid header name")]
    HeaderName(String),
    #[error("--header {0}: invalid header value")]
    HeaderValue(String),
    #[error("--jwt: the token is not a valid header value")]
    Token,
}

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
    /// `kernel` when the kernel carries the connection pod to pod alone (no agent on the
    /// path), `agent` when the agent does.
    pub carried_by: String,
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

fn find_pod(state: &MeshState, name: &str) -> Result<Arc<Workload>, CheckError> {
    let (namespace, pod) = name.split_once('/').unwrap_or(("default", name));
    state
        .workloads
        .values()
        .find(|w| w.namespace == namespace && w.pod == pod)
        .cloned()
        .ok_or_else(|| CheckError::NoPod(format!("{namespace}/{pod}")))
}

/// One workload `to` stands for: where it is reached, and the `Host` a client would use.
struct Target {
    workload: Arc<Workload>,
    address: SocketAddrV4,
    host: String,
    /// Reached at the pod's own address (not balanced from a Service's by the agent).
    by_pod_address: bool,
}

/// The workloads and ports `to` stands for at `port`, and how to name it.
fn destinations(
    state: &MeshState,
    to: &str,
    port: u16,
) -> Result<(String, Vec<Target>), CheckError> {
    if let Ok(pod) = find_pod(state, to) {
        let address = SocketAddrV4::new(pod.ip, port);
        let target = Target {
            workload: pod.clone(),
            address,
            host: address.to_string(),
            by_pod_address: true,
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
        .ok_or_else(|| CheckError::NoDestination {
            to: to.to_owned(),
            port,
        })?;
    let endpoints = service
        .endpoints
        .iter()
        .filter_map(|e| {
            Some(Target {
                workload: e.workload.clone()?,
                address: e.addr,
                host: service.hostname.clone(),
                by_pod_address: false,
            })
        })
        .collect::<Vec<_>>();
    if endpoints.is_empty() {
        return Err(CheckError::NoEndpoint {
            service: format!("{}/{}", service.namespace, service.name),
            port,
        });
    }
    Ok((
        format!("{}/{}:{port}", service.namespace, service.name),
        endpoints,
    ))
}

/// `kernel_bypass`: whether the agent lets the kernel carry connections alone
/// (`--kernel-bypass`).
pub fn check(
    state: &MeshState,
    trust_domain: &str,
    kernel_bypass: bool,
    jwks: &JwksCache,
    request: &CheckRequest,
) -> Result<CheckReport, CheckError> {
    let source = find_pod(state, &request.from)?;
    let (destination, targets) = destinations(state, &request.to, request.port)?;
    let mut endpoints = Vec::new();
    for Target {
        workload,
        address: target,
        host,
        by_pod_address,
    } in targets
    {
        let by_kernel = by_pod_address
            && carried_by_the_kernel(
                state,
                trust_domain,
                kernel_bypass,
                &source,
                &workload,
                target.port(),
            );
        let arrival = Arrival::new(
            state,
            trust_domain,
            source.ip,
            Peer::Pod(&source),
            workload,
            target,
            None,
        );
        let mut endpoint = check_endpoint(&arrival, jwks, request, &host)?;
        endpoint.carried_by = if by_kernel { "kernel" } else { "agent" }.into();
        endpoints.push(endpoint);
    }
    let decision = if endpoints.iter().all(|e| e.decision == "allow") {
        "allow"
    } else {
        "deny"
    };
    Ok(CheckReport {
        source: source.key(),
        source_principal: Some(principal_of(trust_domain, &source)),
        destination,
        decision: decision.into(),
        endpoints,
    })
}

fn report(arrival: &Arrival, decision: &Decision, layer: &str, outcome: &str) -> EndpointReport {
    EndpointReport {
        workload: arrival.workload.key(),
        address: format!(
            "{}:{}",
            arrival.facts.destination_ip, arrival.facts.destination_port
        ),
        decision: if decision.verdict == Verdict::Allow {
            "allow".into()
        } else {
            "deny".into()
        },
        outcome: outcome.into(),
        layer: layer.into(),
        decided_by: decision.decided_by.clone(),
        reason: decision.reason(),
        audited: decision.audited.clone(),
        not_matched: decision.not_matched.clone(),
        authentication: None,
        request_principal: None,
        carried_by: "agent".into(),
    }
}

/// Judges one endpoint as the proxy would: [`admit`] on the connection, then
/// [`judge_request`] on the request when the connection is served as HTTP, the same two
/// functions the proxy calls.
fn check_endpoint(
    arrival: &Arrival,
    jwks: &JwksCache,
    request: &CheckRequest,
    host: &str,
) -> Result<EndpointReport, CheckError> {
    let (admission, decision) = admit(arrival);
    let connection = decision.unwrap_or_else(|| authz::evaluate(&[], &arrival.facts));
    // The request checked is HTTP: on a sniffed port it is served as on an HTTP port.
    let sniffed;
    let arrival = match admission {
        Admission::Deny => return Ok(report(arrival, &connection, "connection", "reset")),
        Admission::Tcp => return Ok(report(arrival, &connection, "connection", "connected")),
        Admission::Http => arrival,
        Admission::Sniff => {
            sniffed = arrival.as_http();
            &sniffed
        }
    };
    // The request as a client would send it, normalised as the proxy normalises it.
    let mut builder = http::Request::builder()
        .method(request.method.as_deref().unwrap_or("GET"))
        .uri(request.path.as_deref().unwrap_or("/"));
    let mut has_host = false;
    for (name, value) in &request.headers {
        let header = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CheckError::HeaderName(name.clone()))?;
        let value = http::HeaderValue::from_str(value)
            .map_err(|_| CheckError::HeaderValue(name.clone()))?;
        has_host |= header == http::header::HOST;
        builder = builder.header(header, value);
    }
    if !has_host {
        builder = builder.header(http::header::HOST, host);
    }
    if let Some(token) = &request.jwt {
        let value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| CheckError::Token)?;
        builder = builder.header(http::header::AUTHORIZATION, value);
    }
    let (mut head, ()) = builder
        .body(())
        .map_err(|err| CheckError::Request(err.to_string()))?
        .into_parts();
    let authenticates = arrival
        .security
        .authenticates(arrival.facts.destination_port);
    let describe = |authenticated: &Option<Box<Authenticated>>| match authenticated {
        Some(found) => Some(format!("token of {} accepted", found.issuer)),
        None if authenticates => Some("no token".into()),
        None => None,
    };
    Ok(
        match judge_request(arrival, jwks, &mut head, jwt::now_seconds()) {
            RequestVerdict::Malformed(rejection) => EndpointReport {
                decision: "deny".into(),
                decided_by: None,
                reason: format!("the request is refused before any policy: {rejection}"),
                ..report(arrival, &connection, "request", "400")
            },
            RequestVerdict::Judged {
                decision,
                authenticated,
            } => {
                let outcome = if decision.verdict == Verdict::Allow {
                    "forwarded"
                } else {
                    "403"
                };
                EndpointReport {
                    authentication: describe(&authenticated),
                    request_principal: authenticated.map(|a| a.facts.principal),
                    ..report(arrival, &decision, "request", outcome)
                }
            }
            RequestVerdict::Unauthenticated(err) => EndpointReport {
                decision: "deny".into(),
                decided_by: None,
                reason: format!("RequestAuthentication: {err}"),
                authentication: Some(format!("rejected: {err}")),
                ..report(arrival, &connection, "request", "401")
            },
        },
    )
}
