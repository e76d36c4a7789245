//! The one builder of the facts a destination's policies judge a connection on, used by
//! the proxy (same-node, DISABLE and HBONE arrivals), the kernel's verdicts and `meshctl
//! policy check`, so the three can never judge the same flow differently; and the
//! admission decision taken on those facts before any byte of the connection.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use http::{request::Parts, HeaderName, HeaderValue};

use crate::{
    model::{peerauth::Effective, security::WorkloadSecurity, MeshState, Workload},
    policy::{
        authz::{self, Decision, Facts, Verdict},
        jwt::{self, Authenticated, JwksCache, JwtError, RequestParts},
        request::{normalise, Rejection},
    },
};

/// Who is on the other end of a connection, as far as the destination can tell.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// A meshed pod, known by its address. Its identity counts unless the destination
    /// port has mutual TLS disabled: the connection is then plaintext, and the
    /// destination knows no more of it than of any other client.
    Pod(&'a Workload),
    /// A peer that proved its SPIFFE ID with mutual TLS (HBONE).
    MutualTls(&'a str),
}

/// `trust-domain/ns/<ns>/sa/<sa>`: a principal as Istio's policies spell it.
pub fn principal_of(trust_domain: &str, workload: &Workload) -> String {
    format!(
        "{trust_domain}/ns/{}/sa/{}",
        workload.namespace, workload.service_account
    )
}

/// The facts of a connection from `client` (`peer`) to `target` on `destination`.
pub fn connection_facts(
    state: &MeshState,
    trust_domain: &str,
    client: Ipv4Addr,
    peer: Peer,
    target: SocketAddrV4,
    sni: Option<String>,
) -> Facts {
    let plaintext = state
        .mtls
        .get(target.ip())
        .is_some_and(|m| m.for_port(target.port()) == Effective::Disable);
    let source_principal = match peer {
        Peer::Pod(workload) if !plaintext => Some(principal_of(trust_domain, workload)),
        Peer::MutualTls(spiffe_id) => Some(spiffe_id.trim_start_matches("spiffe://").to_owned()),
        Peer::Pod(_) => None,
    };
    Facts {
        source_ip: client,
        remote_ip: client,
        source_principal,
        destination_ip: *target.ip(),
        destination_port: target.port(),
        sni,
        request: None,
    }
}

/// A connection arriving at `workload`, as its policies see it.
#[derive(Debug)]
pub struct Arrival {
    pub facts: Facts,
    pub workload: Arc<Workload>,
    pub security: Arc<WorkloadSecurity>,
}

impl Arrival {
    pub fn new(
        state: &MeshState,
        trust_domain: &str,
        client: Ipv4Addr,
        peer: Peer,
        workload: Arc<Workload>,
        target: SocketAddrV4,
        sni: Option<String>,
    ) -> Arrival {
        Arrival {
            facts: connection_facts(state, trust_domain, client, peer, target, sni),
            security: state.security_of(workload.ip),
            workload,
        }
    }

    /// `client (principal) → ip:port (namespace/pod)`, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}) → {}:{} ({})",
            self.facts.source_ip,
            self.facts
                .source_principal
                .as_deref()
                .unwrap_or("no identity"),
            self.facts.destination_ip,
            self.facts.destination_port,
            self.workload.key()
        )
    }

    /// Whether the destination port speaks HTTP (a Service declares it so): only there
    /// can requests be parsed and judged one by one.
    pub fn speaks_http(&self) -> bool {
        self.security
            .http_ports
            .contains(&self.facts.destination_port)
    }

    /// The same arrival on a port found to carry HTTP (its first bytes opened a
    /// request), where the workload's RequestAuthentication then applies as on a port
    /// declared HTTP.
    pub fn as_http(&self) -> Arrival {
        let mut security = (*self.security).clone();
        security.http_ports.insert(self.facts.destination_port);
        Arrival {
            facts: self.facts.clone(),
            workload: self.workload.clone(),
            security: Arc::new(security),
        }
    }
}

/// What to do with a connection, decided before any byte of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Refused: reset (or 403 on an HBONE CONNECT).
    Deny,
    /// Carried as bytes.
    Tcp,
    /// Served as HTTP: each request authenticated and judged.
    Http,
    /// Served as HTTP if the client's first bytes open a request, else carried as bytes:
    /// a port not declared HTTP of a workload given claims in headers, which a request
    /// on that port must not be able to forge (sidecars sniff such ports the same way).
    Sniff,
}

/// The connection-time decision for `arrival`: its policies on L4 facts; per request when
/// the outcome needs request attributes or tokens are checked on the port. On a port that
/// does not speak HTTP no request will ever be seen, so rules that need one are settled
/// as Istio settles them for TCP: an ALLOW rule does not match, a DENY rule does.
pub fn admit(arrival: &Arrival) -> (Admission, Option<Decision>) {
    if arrival.security.is_empty() {
        return (Admission::Tcp, None);
    }
    let (security, port) = (&arrival.security, arrival.facts.destination_port);
    let http = arrival.speaks_http();
    let decision = if http {
        authz::evaluate(&arrival.security.policies, &arrival.facts)
    } else {
        authz::evaluate_tcp(&arrival.security.policies, &arrival.facts)
    };
    let admission = match decision.verdict {
        Verdict::Deny => Admission::Deny,
        Verdict::NeedsRequest => Admission::Http,
        Verdict::Allow
            if http
                && (security.authenticates(port)
                    || security.limits_rate(port)
                    || security.reports_requests(port)) =>
        {
            Admission::Http
        }
        Verdict::Allow if !http && security.sets_claim_headers() => Admission::Sniff,
        Verdict::Allow => Admission::Tcp,
    };
    (admission, Some(decision))
}

/// What the destination's policies make of one request.
#[derive(Debug)]
pub enum RequestVerdict {
    /// A head that cannot be read one way only: 400 before any policy.
    Malformed(Rejection),
    /// A token that does not verify: 401.
    Unauthenticated(JwtError),
    /// Judged by authorization: forwarded when `decision` allows, else 403.
    /// `authenticated` is the token that verified, if any.
    Judged {
        decision: Decision,
        authenticated: Option<Box<Authenticated>>,
    },
}

/// Normalises one request head on a connection admitted for HTTP
/// ([`crate::policy::request::normalise`]), then authenticates and judges it: output
/// headers of RequestAuthentication are removed from a request without a verified token
/// (a client cannot forge them), set from a verified one, and the token's header is
/// removed unless the rule forwards it. What is judged is what `head` then forwards. The
/// proxy and `meshctl policy check` both judge requests with this one function.
pub fn judge_request(
    arrival: &Arrival,
    jwks: &JwksCache,
    head: &mut Parts,
    now: u64,
) -> RequestVerdict {
    let view = match normalise(head) {
        Ok(view) => view,
        Err(rejection) => return RequestVerdict::Malformed(rejection),
    };
    let headers = &mut head.headers;
    let security = &arrival.security;
    let mut authenticated = None;
    if security.authenticates(arrival.facts.destination_port) {
        let parts = RequestParts {
            headers,
            query: view.query.as_deref(),
        };
        match jwt::authenticate(&security.jwt_rules, jwks, &parts, now) {
            Ok(found) => {
                for name in jwt::output_headers(&security.jwt_rules) {
                    headers.remove(name.as_str());
                }
                if let Some(found) = found {
                    if let Some(name) = &found.remove_header {
                        headers.remove(name.as_str());
                    }
                    for (name, value) in &found.set_headers {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(name.as_bytes()),
                            HeaderValue::from_str(value),
                        ) {
                            headers.insert(name, value);
                        }
                    }
                    authenticated = Some(Box::new(found));
                }
            }
            Err(err) => return RequestVerdict::Unauthenticated(err),
        }
    }
    let mut facts = arrival.facts.clone();
    facts.request = Some(view.into_facts(headers, authenticated.as_ref().map(|a| a.facts.clone())));
    RequestVerdict::Judged {
        decision: authz::evaluate(&security.policies, &facts),
        authenticated,
    }
}
