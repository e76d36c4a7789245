//! Delivery to a workload under its AuthorizationPolicies and RequestAuthentications.
//! Each connection is judged on its L4 facts first: denied connections are reset before
//! the workload is dialled. When the outcome needs request attributes, or a
//! RequestAuthentication applies to an HTTP port, the connection is served as HTTP/1.1 or
//! HTTP/2 (whichever the client speaks) and each request is authenticated, judged and
//! forwarded on the connection made to the workload as the original client: a denied
//! request gets `403 RBAC: access denied` and the connection stays open.

use std::{
    convert::Infallible,
    io,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    model::{security::WorkloadSecurity, Workload},
    policy::{
        authz::{self, Decision, Facts, RequestFacts, Verdict},
        jwt::{self, JwksCache, RequestParts},
        path::normalize_path,
    },
    telemetry::metrics::Metrics,
};

/// What every delivery shares: the fetched keys and the counters.
pub struct Guard {
    pub jwks: Arc<JwksCache>,
    pub metrics: Arc<Metrics>,
}

/// A connection arriving at `workload`, as its policies see it.
pub struct Arrival {
    pub facts: Facts,
    pub workload: Arc<Workload>,
    pub security: Arc<WorkloadSecurity>,
}

impl Arrival {
    /// `principal` is the peer's SPIFFE ID when known (`spiffe://` is not part of
    /// Istio's principal).
    pub fn new(
        workload: Arc<Workload>,
        security: Arc<WorkloadSecurity>,
        client: SocketAddrV4,
        target: SocketAddrV4,
        principal: Option<String>,
        sni: Option<String>,
    ) -> Arrival {
        let principal = principal.map(|p| p.trim_start_matches("spiffe://").to_owned());
        Arrival {
            facts: Facts {
                source_ip: *client.ip(),
                remote_ip: *client.ip(),
                source_principal: principal,
                destination_ip: *target.ip(),
                destination_port: target.port(),
                sni,
                request: None,
            },
            workload,
            security,
        }
    }

    fn describe(&self) -> String {
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
}

/// What to do with a connection.
pub enum Admission {
    Deny(Decision),
    Tcp,
    Http,
}

type Body = Either<Incoming, Full<Bytes>>;

fn local_reply(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Headers that belong to one hop and are not forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The connection to the workload, opened as HTTP/1.1 or HTTP/2 on the first request.
struct Upstream {
    socket: Mutex<Option<TcpStream>>,
    sender: tokio::sync::Mutex<Option<Sender>>,
}

enum Sender {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

impl Upstream {
    async fn send(&self, request: Request<Incoming>) -> io::Result<Response<Incoming>> {
        let failed = |e: hyper::Error| io::Error::other(e.to_string());
        let mut sender = self.sender.lock().await;
        if sender.is_none() {
            let socket = self
                .socket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| io::Error::other("the workload connection is gone"))?;
            let io = TokioIo::new(socket);
            *sender = Some(if request.version() == Version::HTTP_2 {
                let (send, connection) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(failed)?;
                tokio::spawn(connection);
                Sender::H2(send)
            } else {
                let (send, connection) = http1::handshake(io).await.map_err(failed)?;
                tokio::spawn(connection);
                Sender::H1(send)
            });
        }
        match sender.as_mut() {
            Some(Sender::H1(send)) => send.send_request(request).await.map_err(failed),
            Some(Sender::H2(send)) => {
                let mut send = send.clone();
                drop(sender);
                send.send_request(request).await.map_err(failed)
            }
            None => Err(io::Error::other("no workload connection")),
        }
    }
}

/// A body the client sent with a request that is refused is read (up to this much) so
/// the connection can carry the next request.
const DRAIN_LIMIT: usize = 1 << 20;

async fn drain(body: Incoming) {
    let mut body = body;
    let mut read = 0;
    while read < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
}

impl Guard {
    fn count(&self, decision: &Decision, layer: &str, arrival: &Arrival) {
        for audit in &decision.audited {
            self.metrics
                .authz_decision("audit", &audit.policy, layer, &arrival.workload);
            log::info!(
                target: "mesh::authz",
                "AUDIT {} matched {} rules[{}] ({layer})",
                arrival.describe(),
                audit.policy,
                audit.rule
            );
        }
        let verdict = match decision.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::NeedsRequest => return,
        };
        self.metrics
            .authz_decision(verdict, decision.policy_label(), layer, &arrival.workload);
        if decision.verdict == Verdict::Deny {
            log::info!(
                target: "mesh::authz",
                "DENY {} ({layer}): {}",
                arrival.describe(),
                decision.reason()
            );
        }
    }

    /// Judges a connection on what is known before any byte of it.
    pub fn admit(&self, arrival: &Arrival) -> Admission {
        if arrival.security.is_empty() {
            return Admission::Tcp;
        }
        let decision = authz::evaluate(&arrival.security.policies, &arrival.facts);
        self.count(&decision, "connection", arrival);
        match decision.verdict {
            Verdict::Deny => Admission::Deny(decision),
            Verdict::Allow
                if !arrival
                    .security
                    .authenticates(arrival.facts.destination_port) =>
            {
                Admission::Tcp
            }
            _ => Admission::Http,
        }
    }

    /// Serves `downstream` as HTTP, judging each request, forwarding allowed ones on
    /// `upstream` (the connection to the workload).
    pub async fn serve_http<S>(
        self: Arc<Self>,
        downstream: S,
        upstream: TcpStream,
        arrival: Arc<Arrival>,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let upstream = Arc::new(Upstream {
            socket: Mutex::new(Some(upstream)),
            sender: tokio::sync::Mutex::new(None),
        });
        let service = service_fn(move |request| {
            let (guard, arrival, upstream) = (self.clone(), arrival.clone(), upstream.clone());
            async move { Ok::<_, Infallible>(guard.handle(request, &arrival, &upstream).await) }
        });
        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(downstream), service)
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        arrival: &Arrival,
        upstream: &Upstream,
    ) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let raw_path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let Some((path, query)) = normalize_path(&raw_path) else {
            drain(body).await;
            return local_reply(StatusCode::BAD_REQUEST, "Bad Request: invalid path");
        };
        let security = &arrival.security;
        let mut auth = None;
        if security.authenticates(arrival.facts.destination_port) {
            let request = RequestParts {
                headers: &parts.headers,
                query: query.as_deref(),
            };
            match jwt::authenticate(
                &security.jwt_rules,
                &self.jwks,
                &request,
                jwt::now_seconds(),
            ) {
                Ok(found) => {
                    for name in jwt::output_headers(&security.jwt_rules) {
                        parts.headers.remove(name.as_str());
                    }
                    if let Some(found) = found {
                        self.metrics.jwt_validation("accepted", "-");
                        if let Some(name) = &found.remove_header {
                            parts.headers.remove(name.as_str());
                        }
                        for (name, value) in &found.set_headers {
                            if let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(name.as_bytes()),
                                HeaderValue::from_str(value),
                            ) {
                                parts.headers.insert(name, value);
                            }
                        }
                        auth = Some(found.facts);
                    }
                }
                Err(err) => {
                    self.metrics.jwt_validation("rejected", err.reason());
                    log::info!(
                        target: "mesh::authz",
                        "401 {} {} {}: {err}",
                        arrival.describe(),
                        parts.method,
                        path
                    );
                    drain(body).await;
                    let mut reply = local_reply(StatusCode::UNAUTHORIZED, "Jwt verification fails");
                    reply.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    );
                    return reply;
                }
            }
        }
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let mut facts = arrival.facts.clone();
        facts.request = Some(RequestFacts {
            method: parts.method.as_str().to_owned(),
            host,
            path: path.clone(),
            headers: parts
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            auth,
        });
        let decision = authz::evaluate(&security.policies, &facts);
        self.count(&decision, "request", arrival);
        if decision.verdict != Verdict::Allow {
            drain(body).await;
            return local_reply(StatusCode::FORBIDDEN, authz::DENIED_BODY);
        }
        let path_and_query = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut uri = parts.uri.clone().into_parts();
        if parts.version != Version::HTTP_2 {
            uri.scheme = None;
            uri.authority = None;
        }
        uri.path_and_query = path_and_query.parse().ok();
        match Uri::from_parts(uri) {
            Ok(uri) => parts.uri = uri,
            Err(_) => return local_reply(StatusCode::BAD_REQUEST, "Bad Request: invalid URI"),
        }
        strip_hop_by_hop(&mut parts.headers);
        match upstream.send(Request::from_parts(parts, body)).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(err) => {
                log::info!("{}: upstream: {err}", arrival.describe());
                local_reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream connect error or disconnect/reset before headers",
                )
            }
        }
    }
}
