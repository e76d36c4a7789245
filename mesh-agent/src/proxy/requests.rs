//! A connection served request by request under the destination's policies: HTTP/1.1 or
//! HTTP/2 (whichever the client speaks), each request's head normalised once (ambiguous
//! forms refused with 400), authenticated
//! (RequestAuthentication) and judged (AuthorizationPolicy), then forwarded on the one
//! connection made to the workload as the original client. A denied request gets `403
//! RBAC: access denied` (an invalid token 401) and the connection carries the next one.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
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
    policy::{
        authz::{self, Decision, Verdict},
        facts::{judge_request, Arrival, RequestVerdict},
        jwt::{self, JwksCache},
        request::normalise,
    },
    proxy::error::ProxyError,
    telemetry::metrics::Metrics,
};

/// What judging requests needs beyond the connection: the fetched keys and the counters.
pub struct Guard {
    pub jwks: Arc<JwksCache>,
    pub metrics: Arc<Metrics>,
}

impl Guard {
    /// Counts (and logs) a decision on `arrival`, decided at `layer`.
    pub fn count(&self, decision: &Decision, layer: &str, arrival: &Arrival) {
        for audit in &decision.audited {
            self.metrics
                .authz_decision("audit", &audit.policy, layer, &arrival.workload);
            tracing::info!(
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
            tracing::info!(
                target: "mesh::authz",
                "DENY {} ({layer}): {}",
                arrival.describe(),
                decision.reason()
            );
        }
    }

    /// Serves `downstream` as HTTP, judging each request and forwarding allowed ones on
    /// `upstream` (the connection to the workload).
    pub async fn serve_http<S>(
        self: Arc<Self>,
        downstream: S,
        upstream: TcpStream,
        arrival: Arc<Arrival>,
    ) -> Result<(), ProxyError>
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
            .map_err(|err| match err.downcast::<hyper::Error>() {
                Ok(err) => ProxyError::Http(*err),
                Err(err) => ProxyError::Io(std::io::Error::other(err)),
            })
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        arrival: &Arrival,
        upstream: &Upstream,
    ) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let view = match normalise(&mut parts) {
            Ok(view) => view,
            Err(rejection) => {
                tracing::info!(
                    target: "mesh::authz",
                    "400 {}: {rejection}",
                    arrival.describe()
                );
                drain(body).await;
                return local_reply(rejection.status(), rejection.body());
            }
        };
        let (method, path) = (view.method.clone(), view.path.clone());
        let verdict = judge_request(
            arrival,
            &self.jwks,
            view,
            &mut parts.headers,
            jwt::now_seconds(),
        );
        let decision = match verdict {
            RequestVerdict::Unauthenticated(err) => {
                self.metrics.jwt_validation("rejected", err.reason());
                tracing::info!(
                    target: "mesh::authz",
                    "401 {} {method} {path}: {err}",
                    arrival.describe(),
                );
                drain(body).await;
                let mut reply = local_reply(StatusCode::UNAUTHORIZED, "Jwt verification fails");
                reply.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return reply;
            }
            RequestVerdict::Forbidden {
                decision,
                authenticated,
            } => {
                if authenticated.is_some() {
                    self.metrics.jwt_validation("accepted", "-");
                }
                self.count(&decision, "request", arrival);
                drain(body).await;
                return local_reply(StatusCode::FORBIDDEN, authz::DENIED_BODY);
            }
            RequestVerdict::Forward {
                decision,
                authenticated,
            } => {
                if authenticated.is_some() {
                    self.metrics.jwt_validation("accepted", "-");
                }
                decision
            }
        };
        self.count(&decision, "request", arrival);
        // `normalise` left the head as it is judged: forwarded as it is.
        match upstream.send(Request::from_parts(parts, body)).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(err) => {
                tracing::info!("{}: upstream: {err}", arrival.describe());
                local_reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream connect error or disconnect/reset before headers",
                )
            }
        }
    }
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

/// On responses: requests are cleaned by `normalise` before they are judged.
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

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("the workload connection is gone")]
    Gone,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Upstream {
    async fn send(&self, request: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.sender.lock().await;
        if sender.is_none() {
            let socket = self
                .socket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or(UpstreamError::Gone)?;
            let io = TokioIo::new(socket);
            *sender = Some(if request.version() == Version::HTTP_2 {
                let (send, connection) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                Sender::H2(send)
            } else {
                let (send, connection) = http1::handshake(io).await?;
                tokio::spawn(connection);
                Sender::H1(send)
            });
        }
        match sender.as_mut() {
            Some(Sender::H1(send)) => Ok(send.send_request(request).await?),
            Some(Sender::H2(send)) => {
                let mut send = send.clone();
                drop(sender);
                Ok(send.send_request(request).await?)
            }
            None => Err(UpstreamError::Gone),
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
