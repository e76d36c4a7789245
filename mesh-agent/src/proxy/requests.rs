//! A connection served request by request under the destination's policies: HTTP/1.1 or
//! HTTP/2 (whichever the client speaks), each request's head normalised once (ambiguous
//! forms refused with 400), authenticated
//! (RequestAuthentication) and judged (AuthorizationPolicy), then forwarded on the one
//! connection made to the workload as the original client. A denied request gets `403
//! RBAC: access denied` (an invalid token 401) and the connection carries the next one.

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
};

use crate::{
    http::{serve_until_drained, ConnectionDrain},
    model::{
        ratelimit::{RateLimiter, RetryAfter, ServiceAccountRef},
        telemetry, MeshState, SharedState, Workload,
    },
    policy::{
        authz::{self, Decision, Verdict},
        facts::{judge_request, Arrival, RequestVerdict},
        jwt::{self, JwksCache},
    },
    proxy::{
        error::ProxyError,
        metered::Metered,
        observe::{Addresses, Counting, Handled, Observed, TraceSite},
    },
    telemetry::{
        metrics::Metrics,
        request::ResponseFlags,
        request_metrics::{ConnectionTally, PeerLabels, Peers, Reporter},
    },
};

/// What judging requests needs beyond the connection: the fetched keys, the counters and
/// the mesh's state (to label the request metrics).
pub struct Guard {
    pub jwks: Arc<JwksCache>,
    pub metrics: Arc<Metrics>,
    pub state: SharedState,
    /// The token buckets of HTTPLocalRateLimitPolicies, for the node's workloads.
    pub limiter: Arc<RateLimiter>,
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

    /// Takes a token for a request to `arrival`'s workload from its HTTPLocalRateLimitPolicy,
    /// if one limits the port: one `total` bucket per pod (as Linkerd limits each server),
    /// the client's bucket by its service account.
    fn check_rate(&self, arrival: &Arrival) -> Result<(), RetryAfter> {
        let security = &arrival.security;
        let Some(limit) = security
            .rate_limit
            .as_ref()
            .filter(|_| security.limits_rate(arrival.facts.destination_port))
        else {
            return Ok(());
        };
        let client = arrival
            .facts
            .source_account()
            .map(|(namespace, name)| ServiceAccountRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        let checked = self.limiter.check_request(
            limit,
            &arrival.workload.key(),
            client.as_ref(),
            Instant::now(),
        );
        if checked.is_err() {
            self.metrics.rate_limited(&limit.policy);
            tracing::info!(
                target: "mesh::authz",
                "429 {}: over {}",
                arrival.describe(),
                limit.policy
            );
        }
        checked
    }

    /// Serves `downstream` as HTTP, judging each request and forwarding allowed ones on
    /// `upstream` (the connection to the workload).
    pub async fn serve_http<S>(
        self: Arc<Self>,
        downstream: S,
        upstream: TcpStream,
        arrival: Arc<Arrival>,
        exchange: Exchange,
        drain: ConnectionDrain,
    ) -> Result<(), ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let upstream = Arc::new(Upstream {
            socket: Mutex::new(Some(upstream)),
            sender: tokio::sync::Mutex::new(None),
            closing: Arc::new(AtomicBool::new(false)),
        });
        let reporting = self.reporting(&arrival, &exchange).map(Arc::new);
        let workload =
            SocketAddrV4::new(arrival.facts.destination_ip, arrival.facts.destination_port);
        let addresses = Addresses {
            local: Some(workload),
            remote: exchange.client,
            mutual_tls: exchange.mutual_tls,
        };
        // Server spans are named after the Service the client addressed, as Istio's
        // inbound decorator names them, else the workload's address.
        let span_host: Arc<str> = exchange
            .service
            .clone()
            .unwrap_or_else(|| workload.ip().to_string())
            .into();
        let answering = drain.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let (guard, arrival, upstream) = (self.clone(), arrival.clone(), upstream.clone());
            let (reporting, span_host) = (reporting.clone(), span_host.clone());
            let drain = answering.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                let version = parts.version;
                let telemetry = &arrival.security.telemetry;
                let site = TraceSite {
                    tracing: telemetry.server_tracing.as_ref(),
                    client: false,
                    host: &span_host,
                    port: workload.port(),
                };
                let (mut observed, body) = Observed::start(
                    &mut parts,
                    body,
                    telemetry.server_logs.as_ref(),
                    telemetry
                        .server_metrics
                        .as_ref()
                        .filter(|_| reporting.is_some()),
                    addresses,
                    site,
                );
                let request = Request::from_parts(parts, body);
                let mut upstream_wait = Duration::ZERO;
                let mut response = guard
                    .handle(request, &arrival, &upstream, &mut upstream_wait)
                    .await;
                drain.answer(version, &mut response);
                let handled = Handled {
                    upstream: Some(workload),
                    cluster: Some(format!("inbound|{}||", workload.port())),
                    upstream_wait,
                    ..Handled::default()
                };
                let counting = reporting.as_deref().map(|(tally, peers)| Counting {
                    tally: tally.clone(),
                    peers: peers.clone(),
                });
                observed.respond(&response, counting, ResponseFlags::default(), handled);
                Ok::<_, Infallible>(observed.report(response, &guard.metrics))
            }
        });
        serve_until_drained(
            server(HEADER_READ_TIMEOUT).serve_connection(TokioIo::new(downstream), service),
            drain,
        )
        .await
        .map_err(ProxyError::from_serving)
    }

    /// The request metrics of a connection to `arrival`'s workload; `None` when a
    /// Telemetry turns them off.
    fn reporting(
        &self,
        arrival: &Arrival,
        exchange: &Exchange,
    ) -> Option<(Arc<ConnectionTally>, Arc<PeerLabels>)> {
        if arrival.security.telemetry.server == telemetry::Reporting::Never {
            return None;
        }
        let tally = self.metrics.requests.connection();
        let state = self.state.current();
        let principal = arrival.facts.source_principal.as_deref();
        let source = source_workload(&state, arrival.facts.source_ip, principal);
        let peers = PeerLabels::new(
            &state,
            &Peers {
                reporter: Reporter::Destination,
                source: source.as_deref(),
                source_principal: principal,
                destination: Some(&arrival.workload),
                service: exchange.service.as_deref(),
                mutual_tls: exchange.mutual_tls,
                rules: arrival.security.telemetry.server_metrics.as_ref(),
            },
            tally.settings(),
        );
        Some((Arc::new(tally), Arc::new(peers)))
    }

    async fn handle(
        &self,
        request: Request<Metered<Incoming>>,
        arrival: &Arrival,
        upstream: &Upstream,
        upstream_wait: &mut Duration,
    ) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let closing = asks_to_close(&parts);
        let judging = Instant::now();
        let verdict = judge_request(arrival, &self.jwks, &mut parts, jwt::now_seconds());
        self.metrics.timing.policy_evaluation(judging.elapsed());
        let decision = match verdict {
            RequestVerdict::Malformed(rejection) => {
                tracing::info!(
                    target: "mesh::authz",
                    "400 {}: {rejection}",
                    arrival.describe()
                );
                drain(body).await;
                return local_reply(rejection.status(), rejection.body());
            }
            RequestVerdict::Unauthenticated(err) => {
                self.metrics.jwt_validation("rejected", err.reason());
                tracing::info!(
                    target: "mesh::authz",
                    "401 {} {} {}: {err}",
                    arrival.describe(),
                    parts.method,
                    parts.uri.path(),
                );
                drain(body).await;
                let mut reply = local_reply(StatusCode::UNAUTHORIZED, "Jwt verification fails");
                reply.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return reply;
            }
            RequestVerdict::Judged {
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
        if decision.verdict != Verdict::Allow {
            drain(body).await;
            return local_reply(StatusCode::FORBIDDEN, authz::DENIED_BODY);
        }
        if let Err(wait) = self.check_rate(arrival) {
            drain(body).await;
            let mut reply = local_reply(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait.seconds()));
            return reply;
        }
        // `normalise` left the head as it is judged: forwarded as it is, but for the
        // client's wish to close, which went with the hop-by-hop headers.
        if closing {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            upstream.closing.store(true, Ordering::Relaxed);
        }
        let waiting = Instant::now();
        let sent = upstream.send(Request::from_parts(parts, body)).await;
        *upstream_wait = waiting.elapsed();
        match sent {
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

/// How long a client may take to send a request head (and, kept alive, the next one):
/// a pod that opens connections and never finishes a head would otherwise hold two
/// descriptors and a task each for ever. Generous for a slow client, as Envoy's
/// `request_headers_timeout` would be if set.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 streams a client may have open at once on one connection. Envoy allows 2^31-1
/// and hyper 200; every open stream costs a task and buffers here, and one pod's
/// connection is judged request by request, so 1024 lets a gRPC client multiplex freely
/// while bounding what one connection can make the agent hold.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// The largest HTTP/2 header list (decoded) a request may carry: Envoy's default is 60
/// KiB (`max_request_headers_kb`), hyper's 16 MiB, which one pod could make the agent
/// decode and hold per stream. Larger heads are refused with 431.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// The server side of a judged connection, HTTP/1.1 or HTTP/2, with its bounds.
pub fn server(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    builder
}

/// A body the proxy sends: one it received, or one it wrote.
pub type Body = Either<Incoming, Full<Bytes>>;

/// A request body the proxy sends on: one it received (counted as it passes), or one it
/// holds whole.
pub type Outgoing = Either<Metered<Incoming>, Full<Bytes>>;

/// Where the requests of a judged connection came from and were headed, for their
/// metrics and logs.
pub struct Exchange {
    /// The Service host the client addressed, when known.
    pub service: Option<String>,
    /// The client's address, when known.
    pub client: Option<SocketAddrV4>,
    /// The requests arrived over HBONE (mutual TLS).
    pub mutual_tls: bool,
}

/// The client's workload, when its address and its identity agree: a request's source
/// address alone names nobody unless it came with that pod's identity.
pub fn source_workload(
    state: &MeshState,
    ip: std::net::Ipv4Addr,
    principal: Option<&str>,
) -> Option<Arc<Workload>> {
    let workload = state.workloads.get(&ip)?;
    let (_, account) = principal?.split_once("/ns/")?;
    (account.split_once("/sa/")?
        == (
            workload.namespace.as_str(),
            workload.service_account.as_str(),
        ))
        .then(|| workload.clone())
}

pub fn local_reply(status: StatusCode, text: &'static str) -> Response<Body> {
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

/// Whether an HTTP/1 request asks for its connection to close after the response
/// (`Connection: close`, or HTTP/1.0 without `keep-alive`). The connection to the
/// workload is this client's alone (opened from its address and port), so the wish is
/// passed on: the workload then closes first, as it would without the mesh, and the
/// agent's end does not wait in TIME_WAIT holding the client's address and port, which
/// a client opening connections quickly would otherwise find taken within a minute.
fn asks_to_close(parts: &http::request::Parts) -> bool {
    let has = |token: &str| {
        parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match parts.version {
        Version::HTTP_10 => !has("keep-alive"),
        Version::HTTP_11 => has("close"),
        _ => false,
    }
}

/// On responses: requests are cleaned by `normalise` before they are judged.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
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

/// The connection to the workload, opened as HTTP/1.1 or HTTP/2 on the first request;
/// `closing` once a request asked the workload to close it.
struct Upstream {
    socket: Mutex<Option<TcpStream>>,
    sender: tokio::sync::Mutex<Option<Sender>>,
    closing: Arc<AtomicBool>,
}

/// How long the agent waits for a workload asked to close to do so before closing
/// itself.
const WORKLOAD_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Drives an HTTP/1 connection to the workload. When a request asked to close, the
/// agent lets the workload close first (its FIN usually follows the response at once):
/// closing as soon as the response is read would race it, and the side that closes
/// first keeps the client's address and port in TIME_WAIT.
async fn drive_http1(
    connection: http1::Connection<TokioIo<TcpStream>, Metered<Incoming>>,
    closing: Arc<AtomicBool>,
) {
    let Ok(parts) = connection.without_shutdown().await else {
        return;
    };
    if !closing.load(Ordering::Relaxed) {
        return;
    }
    let mut socket = parts.io.into_inner();
    let mut scratch = [0u8; 512];
    let _ = tokio::time::timeout(WORKLOAD_CLOSE_WAIT, async {
        while matches!(socket.read(&mut scratch).await, Ok(read) if read > 0) {}
    })
    .await;
}

enum Sender {
    H1(http1::SendRequest<Metered<Incoming>>),
    H2(http2::SendRequest<Metered<Incoming>>),
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("the workload connection is gone")]
    Gone,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Upstream {
    async fn send(
        &self,
        request: Request<Metered<Incoming>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
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
                tokio::spawn(drive_http1(connection, self.closing.clone()));
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

pub async fn drain(body: Metered<Incoming>) {
    let mut body = body;
    let mut read = 0;
    while read < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;

    /// Serves `io` with [`server`], answering every request 200.
    fn serve(io: DuplexStream, header_read_timeout: Duration) -> tokio::task::JoinHandle<()> {
        let service = service_fn(|_: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        tokio::spawn(async move {
            let _ = server(header_read_timeout)
                .serve_connection(TokioIo::new(io), service)
                .await;
        })
    }

    #[test]
    fn only_an_http1_request_asking_to_close_is_passed_on_as_closing() {
        let asks = |version: Version, connection: Option<&str>| {
            let mut request = Request::builder().version(version).uri("/");
            if let Some(value) = connection {
                request = request.header(header::CONNECTION, value);
            }
            let (parts, ()) = request.body(()).expect("request").into_parts();
            asks_to_close(&parts)
        };
        assert!(asks(Version::HTTP_11, Some("close")));
        assert!(asks(Version::HTTP_11, Some("TE, Close")));
        assert!(!asks(Version::HTTP_11, None));
        assert!(!asks(Version::HTTP_11, Some("keep-alive")));
        assert!(asks(Version::HTTP_10, None));
        assert!(!asks(Version::HTTP_10, Some("Keep-Alive")));
        assert!(!asks(Version::HTTP_2, Some("close")));
    }

    #[tokio::test]
    async fn an_http1_client_that_never_finishes_its_head_is_let_go() {
        let (mut client, server) = tokio::io::duplex(4096);
        let served = serve(server, Duration::from_millis(100));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n")
            .await
            .expect("write");
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection was let go")
            .expect("served");
    }

    #[tokio::test]
    async fn http2_streams_and_header_lists_are_bounded() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let _served = serve(server, Duration::from_secs(600));
        let (mut send, connection) = h2::client::handshake(client).await.expect("h2");
        tokio::spawn(connection);
        let get = |extra: Option<String>| {
            let mut request = Request::get("http://web/");
            if let Some(value) = extra {
                request = request.header("x-big", value);
            }
            request.body(()).expect("request")
        };

        // A first exchange: the server's SETTINGS have arrived by its end.
        let (response, _) = send.send_request(get(None), true).expect("send");
        assert_eq!(response.await.expect("response").status(), StatusCode::OK);
        assert_eq!(
            send.current_max_send_streams(),
            MAX_CONCURRENT_STREAMS as usize
        );

        // A header list over the bound is not served.
        let big = "a".repeat(MAX_HEADER_LIST_BYTES as usize + 1024);
        let refused = match send.send_request(get(Some(big)), true) {
            Err(_) => true,
            Ok((response, _)) => match response.await {
                Err(_) => true,
                Ok(response) => response.status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            },
        };
        assert!(refused);
    }
}
