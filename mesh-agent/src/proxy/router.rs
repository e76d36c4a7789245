//! Requests to a Service a VirtualService routes, served in the source pod's agent as a
//! sidecar would: each request is normalised, matched against the routes (404 `NR` when
//! none matches), faulted, redirected or answered directly as its route says, or sent to
//! a destination chosen by weight, then to an endpoint of its subset — over the same
//! paths a connection takes (this node's pod under its policies, HBONE to another node,
//! plaintext, or outside the mesh) — with the route's rewrite, header changes, timeout
//! and retries, and copies to its mirrors. Every request's outcome is recorded once
//! ([`RequestRecord`]).

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    http::{serve_until_drained, ConnectionDrain},
    model::{
        circuit::{Budget, BudgetKey, Keepalive, Overflow, Permit, PoolLimits},
        destination_policy::cluster_name,
        hashing::RequestKeys,
        metric_rules::MetricRules,
        outlier::Outcome,
        routing::{
            choose_random, AbortWith, Action, CorsVerdict, Fault, HttpRule, RequestFacts,
            RetryPolicy, Selected, TryOutcome, WeightedDestination,
        },
        telemetry::{AccessLogs, Reporting, Tracing},
        MeshState, Pick, ServicePortState, Workload,
    },
    policy::request::normalise,
    proxy::{
        copy::{TunnelStream, COPY_BUFFER},
        error::ProxyError,
        metered::{grpc_status, is_grpc, Metered, Reported},
        observe::{Addresses, Counting, Handled, Observed, TraceSite},
        plan::tunnelled,
        plan::{plan_endpoint, Carry, Route, TunnelRequest},
        requests::{
            drain, local_reply, server, strip_hop_by_hop, Exchange, Outgoing, HEADER_READ_TIMEOUT,
        },
        socket,
        upstream::{GiveBack, Key, Returning, Reuse, Sender, Stream},
        Proxy,
    },
    telemetry::{
        request::{RequestRecord, ResponseFlag},
        request_metrics::{ConnectionTally, PeerLabels, Peers, Reporter},
    },
};

/// A request body is kept for retries and mirrors up to this size (Envoy's default
/// per-request buffer limit is 1 MiB; retried requests are rarely large).
const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

type RoutedBody = Either<Returning, Full<Bytes>>;

/// Serves `client` (a pod of this node that connected to `service`) request by request.
pub async fn serve<S>(
    proxy: Arc<Proxy>,
    client: S,
    source: Arc<Workload>,
    client_addr: SocketAddrV4,
    service: Arc<ServicePortState>,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let telemetry = proxy
        .state
        .current()
        .security_of(*client_addr.ip())
        .telemetry
        .clone();
    let tally = (telemetry.client != Reporting::Never)
        .then(|| Arc::new(proxy.guard.metrics.requests.connection()));
    let logs = telemetry.client_logs;
    let labels = telemetry.client_metrics.filter(|_| tally.is_some());
    let tracing = telemetry.client_tracing;
    let drain = proxy.intake.connection_drain();
    let router = Arc::new(Router {
        proxy,
        source,
        client: client_addr,
        addressed: SocketAddrV4::new(service.cluster_ip, service.port),
        hostname: service.hostname.clone(),
    });
    let reporting = Arc::new(SourceReporting {
        tally,
        logs,
        labels,
        tracing,
        peers: Mutex::default(),
    });
    let answering = drain.clone();
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let (router, reporting) = (router.clone(), reporting.clone());
        let drain = answering.clone();
        async move {
            let version = request.version();
            let mut response = router.handle(request, &reporting).await;
            drain.answer(version, &mut response);
            Ok::<_, Infallible>(response)
        }
    });
    serve_until_drained(
        server(HEADER_READ_TIMEOUT).serve_connection(TokioIo::new(client), service),
        drain,
    )
    .await
    .map_err(ProxyError::from_serving)
}

struct Router {
    proxy: Arc<Proxy>,
    source: Arc<Workload>,
    client: SocketAddrV4,
    /// The Service address the client connected to.
    addressed: SocketAddrV4,
    hostname: String,
}

/// A routed connection's request metrics: its tally and the labels of each pod its
/// requests reached (computed once per pod).
struct SourceReporting {
    /// `None` when a Telemetry turns the source's request metrics off.
    tally: Option<Arc<ConnectionTally>>,
    /// Where its requests are logged, if anywhere.
    logs: Option<Arc<AccessLogs>>,
    /// What the source's Telemetry says of its request metrics' labels.
    labels: Option<Arc<MetricRules>>,
    /// How its requests are traced (client spans), if at all.
    tracing: Option<Arc<Tracing>>,
    peers: Mutex<Vec<KnownPeers>>,
}

/// The labels of requests to a pod (`None`: outside the mesh), in mutual TLS or not.
type KnownPeers = (Option<Arc<Workload>>, bool, Arc<PeerLabels>);

impl SourceReporting {
    fn peers(
        &self,
        router: &Router,
        record: &RequestRecord,
        tally: &ConnectionTally,
    ) -> Arc<PeerLabels> {
        let mut known = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let same = |pod: &Option<Arc<Workload>>| match (pod, &record.destination) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if let Some((_, _, peers)) = known
            .iter()
            .find(|(pod, tls, _)| same(pod) && *tls == record.mutual_tls)
        {
            return peers.clone();
        }
        let peers = Arc::new(PeerLabels::new(
            &router.proxy.state.current(),
            &Peers {
                reporter: Reporter::Source,
                source: Some(&router.source),
                source_principal: None,
                destination: record.destination.as_deref(),
                service: Some(&record.service),
                mutual_tls: record.mutual_tls,
                rules: self.labels.as_ref(),
            },
            tally.settings(),
        ));
        // A connection's requests reach a handful of pods; a bound keeps a long-lived
        // one from growing this without end as pods come and go.
        if known.len() >= MAX_PEERS_PER_CONNECTION {
            known.remove(0);
        }
        known.push((record.destination.clone(), record.mutual_tls, peers.clone()));
        peers
    }
}

/// Labels a routed connection keeps for the pods its requests reached.
const MAX_PEERS_PER_CONNECTION: usize = 32;

/// A request's body: as it arrives, or read whole so it can be sent again.
enum RequestBody {
    Streamed(Option<Metered<Incoming>>),
    Buffered(Bytes),
}

impl RequestBody {
    /// The body for the next try; `None` when a streamed body was already sent.
    fn next(&mut self) -> Option<Outgoing> {
        match self {
            RequestBody::Streamed(body) => body.take().map(Either::Left),
            RequestBody::Buffered(bytes) => Some(Either::Right(Full::new(bytes.clone()))),
        }
    }
}

/// Why a try produced no response.
#[derive(Debug)]
enum TryFailure {
    Connect(String),
    Reset(String),
    RefusedStream,
    Denied,
}

impl Router {
    async fn handle(
        &self,
        request: Request<Incoming>,
        reporting: &Arc<SourceReporting>,
    ) -> Response<Reported<RoutedBody>> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        let addresses = Addresses {
            local: Some(self.addressed),
            remote: Some(self.client),
            mutual_tls: false,
        };
        let site = TraceSite {
            tracing: reporting.tracing.as_ref(),
            client: true,
            host: &self.hostname,
            port: self.addressed.port(),
        };
        let (mut observed, body) = Observed::start(
            &mut parts,
            body,
            reporting.logs.as_ref(),
            reporting.labels.as_ref(),
            addresses,
            site,
        );
        let grpc = observed.grpc();
        let request = Request::from_parts(parts, body);
        let mut record = RequestRecord::new(&self.hostname);
        let mut response = self.route(request, &mut record).await;
        if grpc {
            response = grpc_local_reply(response).await;
        }
        record.finish(response.status(), started.elapsed());
        self.proxy.guard.metrics.request_routed(&record);
        let counting = reporting.tally.as_ref().map(|tally| Counting {
            tally: tally.clone(),
            peers: reporting.peers(self, &record, tally),
        });
        let handled = Handled {
            upstream: record.upstream,
            cluster: record.cluster.clone(),
            route: record.route.clone(),
            details: None,
            upstream_wait: record.upstream_wait,
        };
        observed.respond(&response, counting, record.flags, handled);
        observed.report(response, &self.proxy.guard.metrics)
    }

    async fn route(
        &self,
        request: Request<Metered<Incoming>>,
        record: &mut RequestRecord,
    ) -> Response<RoutedBody> {
        let (mut parts, body) = request.into_parts();
        let view = match normalise(&mut parts) {
            Ok(view) => view,
            Err(rejection) => return reply(rejection.status(), rejection.body()),
        };
        let state = self.proxy.state.current();
        let Some(routes) = state
            .services
            .get(&self.addressed)
            .and_then(|service| state.http_routes(service, &self.source.namespace))
        else {
            record.flag(ResponseFlag::NoRoute);
            drain(body).await;
            return reply(StatusCode::NOT_FOUND, "");
        };
        let facts = RequestFacts {
            method: &view.method,
            scheme: "http",
            authority: &view.host,
            path: &view.path,
            query: view.query.as_deref(),
            headers: &parts.headers,
            port: self.addressed.port(),
            source: &self.source,
        };
        let Some(Selected {
            rule,
            matched_prefix,
        }) = routes.select(&facts)
        else {
            record.flag(ResponseFlag::NoRoute);
            drain(body).await;
            return reply(StatusCode::NOT_FOUND, "");
        };
        record.route = Some(rule.name.clone());
        // Envoy's CORS filter comes before fault injection and the router.
        let cors = rule.cors.as_ref().map_or(CorsVerdict::Untouched, |cors| {
            cors.judge(&view.method, &parts.headers)
        });
        let allowed = match cors {
            CorsVerdict::Untouched => None,
            CorsVerdict::Allow(headers) => Some(headers),
            // Envoy's answer to a preflight: 200, the CORS headers and nothing else.
            CorsVerdict::AnswerPreflight(headers) => {
                let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
                response.headers_mut().extend(headers);
                return response;
            }
            CorsVerdict::IgnorePreflight => {
                return Response::new(Either::Right(Full::new(Bytes::new())))
            }
        };
        let location = match &rule.action {
            Action::Redirect(redirect) => HeaderValue::from_str(&redirect.location(&facts)).ok(),
            _ => None,
        };
        // Every answer from here on, forwarded or local (abort, redirect, timeout), gets
        // an allowed origin's CORS headers, as Envoy's filter adds them on the way back.
        let mut response = async {
            let grpc = is_grpc(&parts.headers);
            if let Some((delay, percent)) = rule.fault.delay {
                if Fault::rolls(percent) {
                    record.flag(ResponseFlag::DelayInjected);
                    tokio::time::sleep(delay).await;
                }
            }
            if let Some((abort, percent)) = rule.fault.abort {
                if Fault::rolls(percent) {
                    record.flag(ResponseFlag::FaultInjected);
                    // Read first: an HTTP/2 client still sending would see its stream
                    // reset after the answer.
                    drain(body).await;
                    return aborted(abort);
                }
            }
            let destinations = match &rule.action {
                Action::Redirect(redirect) => {
                    let mut response = reply(redirect.status, "");
                    if let Some(location) = location {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    return response;
                }
                Action::DirectResponse { status, body } => {
                    let mut response = Response::new(Either::Right(Full::new(body.clone())));
                    *response.status_mut() = *status;
                    return response;
                }
                Action::Route(destinations) => destinations,
            };
            let Some(destination) = choose_random(destinations) else {
                record.flag(ResponseFlag::NoHealthyUpstream);
                return reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            if let Some(rewrite) = &rule.rewrite {
                let path = rewrite.path(&view.path, matched_prefix);
                let authority = rewrite.authority.as_deref().unwrap_or(&view.host);
                set_target(&mut parts, &path, view.query.as_deref(), authority);
            }
            rule.headers.request.apply(&mut parts.headers);
            destination.headers.request.apply(&mut parts.headers);
            let timeout = grpc_timeout(&parts).or(rule.timeout);
            let retries = &rule.retries;
            let mut body = if retries.attempts > 0 || !rule.mirrors.is_empty() {
                match buffer(body).await {
                    Some(body) => body,
                    None => return reply(StatusCode::BAD_REQUEST, "invalid request body"),
                }
            } else {
                RequestBody::Streamed(Some(body))
            };
            if let RequestBody::Buffered(bytes) = &body {
                self.mirror(&state, rule, &parts, bytes);
            }
            let forwarded = self.forward(
                &state,
                destination,
                &parts,
                &mut body,
                retries,
                grpc,
                record,
            );
            let response = match timeout {
                Some(limit) => match tokio::time::timeout(limit, forwarded).await {
                    Ok(response) => response,
                    Err(_) => {
                        record.flag(ResponseFlag::UpstreamTimeout);
                        return reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                    }
                },
                None => forwarded.await,
            };
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            rule.headers.response.apply(&mut head.headers);
            destination.headers.response.apply(&mut head.headers);
            Response::from_parts(head, body)
        }
        .await;
        if let Some(headers) = allowed {
            response.headers_mut().extend(headers);
        }
        response
    }

    /// Sends the request to `destination`: the endpoint by the destination's balancer,
    /// hashing the request when its policy hashes (a generated cookie is set on the
    /// answer, as Envoy sets it).
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        state: &Arc<MeshState>,
        destination: &WeightedDestination,
        parts: &Parts,
        body: &mut RequestBody,
        retries: &RetryPolicy,
        grpc: bool,
        record: &mut RequestRecord,
    ) -> Response<RoutedBody> {
        let Some(service) =
            state.service_port(&destination.host, destination.port, self.addressed.port())
        else {
            record.flag(ResponseFlag::NoHealthyUpstream);
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let keys = RequestKeys {
            headers: &parts.headers,
            query: parts.uri.query(),
            client: self.client,
            addressed: self.addressed,
        };
        let hashed = service.request_hash(destination.subset.as_deref(), &keys);
        let mut response = self
            .tries(
                state,
                service,
                destination,
                parts,
                body,
                retries,
                grpc,
                hashed.hash,
                record,
            )
            .await;
        if let Some(cookie) = hashed
            .set_cookie
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        response
    }

    /// Tries `destination` as the retry policy allows; each retry picks another endpoint
    /// when there is one (Istio's `previous_hosts` predicate).
    #[allow(clippy::too_many_arguments)]
    async fn tries(
        &self,
        state: &Arc<MeshState>,
        service: &Arc<ServicePortState>,
        destination: &WeightedDestination,
        parts: &Parts,
        body: &mut RequestBody,
        retries: &RetryPolicy,
        grpc: bool,
        hash: Option<u64>,
        record: &mut RequestRecord,
    ) -> Response<RoutedBody> {
        let cluster = service.cluster(destination.subset.as_deref());
        let key = BudgetKey {
            source: self.source.key(),
            cluster: cluster.map_or_else(
                || {
                    cluster_name(
                        &service.hostname,
                        destination.subset.as_deref(),
                        service.port,
                    )
                },
                |c| c.name.clone(),
            ),
        };
        let limits = cluster
            .and_then(|c| c.limits.as_ref())
            .unwrap_or(&UNCONFIGURED_LIMITS);
        let budget = self.proxy.budgets.budget(&key, limits);
        record.cluster = Some(key.cluster.clone());
        // Held until the response head is back: the request, and its place on a
        // connection (waiting as a pending request while all are busy).
        let _request = match budget.try_request() {
            Ok(permit) => permit,
            Err(overflow) => return overflowed(overflow, record),
        };
        let _connection = match connection_permit(&budget).await {
            Ok(permit) => permit,
            Err(overflow) => return overflowed(overflow, record),
        };
        let tracker = cluster.and_then(|c| c.outliers.clone());
        let addresses: Vec<SocketAddrV4> = service.endpoints.iter().map(|e| e.addr).collect();
        let eligible = tracker
            .as_ref()
            .map(|t| t.eligible(&addresses, Instant::now()));
        let allowed = |addr: SocketAddrV4| match &eligible {
            None => true,
            Some(flags) => addresses
                .iter()
                .position(|a| *a == addr)
                .is_none_or(|i| flags[i]),
        };
        let mut tried = Vec::new();
        let mut _retry = None;
        loop {
            let endpoint =
                match service.pick_avoiding(hash, destination.subset.as_deref(), &tried, allowed) {
                    Pick::Endpoint(index, _guard) => service.endpoints[index].clone(),
                    Pick::Passthrough | Pick::None => {
                        record.flag(ResponseFlag::NoHealthyUpstream);
                        return reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
                    }
                };
            tried.push(endpoint.addr);
            record.attempts += 1;
            record.upstream = Some(endpoint.addr);
            record.mutual_tls = endpoint
                .workload
                .as_ref()
                .is_some_and(|pod| tunnelled(state, pod, endpoint.addr.port()));
            record.destination = endpoint.workload.clone();
            let Some(request_body) = body.next() else {
                record.flag(ResponseFlag::UpstreamRetryLimitExceeded);
                return reply(StatusCode::SERVICE_UNAVAILABLE, "upstream reset");
            };
            let mut head = clone_head(parts);
            for_upstream(&mut head, service.http2);
            let request = Request::from_parts(head, request_body);
            let attempt = self.send(
                state,
                endpoint.addr,
                endpoint.workload.as_ref(),
                &service.hostname,
                limits,
                request,
            );
            let waiting = Instant::now();
            let outcome = match retries.per_try_timeout {
                Some(limit) => tokio::time::timeout(limit, attempt).await.ok(),
                None => Some(attempt.await),
            };
            record.upstream_wait += waiting.elapsed();
            let retries_left = record.attempts <= retries.attempts;
            let (response, try_outcome) = match outcome {
                None => (None, TryOutcome::Timeout),
                Some(Ok(response)) => {
                    let status = response.status().as_u16();
                    let code = grpc.then(|| grpc_status(response.headers())).flatten();
                    let outcome = TryOutcome::Response { status, grpc: code };
                    (Some(response), outcome)
                }
                Some(Err(TryFailure::Denied)) => {
                    return reply(StatusCode::FORBIDDEN, crate::policy::authz::DENIED_BODY)
                }
                Some(Err(TryFailure::Connect(why))) => {
                    tracing::debug!("{} → {}: {why}", self.client, endpoint.addr);
                    (None, TryOutcome::ConnectFailure)
                }
                Some(Err(TryFailure::Reset(why))) => {
                    tracing::debug!("{} → {}: {why}", self.client, endpoint.addr);
                    (None, TryOutcome::Reset)
                }
                Some(Err(TryFailure::RefusedStream)) => (None, TryOutcome::RefusedStream),
            };
            if let Some(tracker) = &tracker {
                if let Some(reason) =
                    tracker.record(endpoint.addr, outlier_outcome(try_outcome), Instant::now())
                {
                    tracing::info!(
                        "outlier detection ejected {} from {}: {reason:?}",
                        endpoint.addr,
                        tracker.cluster()
                    );
                    self.proxy
                        .guard
                        .metrics
                        .outlier_ejected(tracker.cluster(), reason);
                }
            }
            let mut again = retries_left && retries.retries(try_outcome) && body.can_resend();
            if again {
                // `maxRetries`: past it the last answer stands.
                match budget.try_retry() {
                    Err(_) => again = false,
                    Ok(permit) => _retry = Some(permit),
                }
            }
            if !again {
                return match (response, try_outcome) {
                    (Some(response), outcome) => {
                        // A retriable answer that stands because the tries ran out: Envoy
                        // flags it as it flags a failed last try.
                        if record.attempts > 1 && retries.retries(outcome) {
                            record.flag(ResponseFlag::UpstreamRetryLimitExceeded);
                        }
                        response
                    }
                    (None, outcome) => {
                        let exhausted = record.attempts > 1;
                        if exhausted {
                            record.flag(ResponseFlag::UpstreamRetryLimitExceeded);
                        }
                        failure_reply(outcome, record)
                    }
                };
            }
            let backoff = RetryPolicy::backoff(record.attempts);
            tokio::time::sleep(backoff).await;
            record.upstream_wait += backoff;
        }
    }

    /// One try: a pooled connection to `endpoint` (or a new one, as the destination's
    /// `limits` say), the request, its response head.
    async fn send(
        &self,
        state: &Arc<MeshState>,
        endpoint: SocketAddrV4,
        workload: Option<&Arc<Workload>>,
        hostname: &str,
        limits: &PoolLimits,
        request: Request<Outgoing>,
    ) -> Result<Response<RoutedBody>, TryFailure> {
        let planned = Arc::downgrade(state);
        let key = Key {
            source: *self.client.ip(),
            endpoint,
            http2: request.version() == Version::HTTP_2,
        };
        let reuse = Reuse::of(limits);
        let upstreams = &self.proxy.upstreams;
        let (mut sender, mut carried, mut reused) = match upstreams.take(&key, state, reuse) {
            Some((sender, carried)) => (sender, carried, true),
            None => (
                self.connect(state, key, workload, hostname, limits).await?,
                1,
                false,
            ),
        };
        let mut request = request;
        loop {
            if let Sender::Http1(send) = &mut sender {
                if send.ready().await.is_err() {
                    sender = self.connect(state, key, workload, hostname, limits).await?;
                    (carried, reused) = (1, false);
                }
            }
            let sent = match &mut sender {
                Sender::Http2(send) => {
                    if !reused {
                        let shared = Sender::Http2(send.clone());
                        upstreams.put(key, planned.clone(), shared, carried, reuse);
                    }
                    send.try_send_request(request).await
                }
                Sender::Http1(send) => send.try_send_request(request).await,
            };
            match sent {
                Ok(response) => {
                    let back = match sender {
                        Sender::Http1(send) => Some(GiveBack {
                            pool: upstreams.clone(),
                            key,
                            planned,
                            sender: Sender::Http1(send),
                            carried,
                            reuse,
                        }),
                        Sender::Http2(_) => None,
                    };
                    return Ok(response.map(|b| Either::Left(Returning::new(b, back))));
                }
                // A pooled connection the upstream closed before the request went out:
                // nothing was sent, so it goes out again on a new connection (Envoy
                // does the same for a connection that closes while idle).
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => {
                        request = unsent;
                        sender = self.connect(state, key, workload, hostname, limits).await?;
                        (carried, reused) = (1, false);
                    }
                    _ => return Err(reset_or_refused(failed.into_error())),
                },
            }
        }
    }

    /// A new connection to `key.endpoint`, given up after the destination's
    /// `connectTimeout` (a connect failure, as Envoy counts it).
    async fn connect(
        &self,
        state: &MeshState,
        key: Key,
        workload: Option<&Arc<Workload>>,
        hostname: &str,
        limits: &PoolLimits,
    ) -> Result<Sender, TryFailure> {
        let opening = self.open(state, key, workload, hostname, limits.tcp_keepalive);
        tokio::time::timeout(limits.connect_timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(TryFailure::Connect(format!(
                    "not connected within the connect timeout of {:?}",
                    limits.connect_timeout
                )))
            })
    }

    /// Opens a connection to `key.endpoint` the way a connection from the source pod
    /// would go: this node's pod under its policies (each request judged when they need
    /// it), HBONE to the endpoint's node, plaintext for DISABLE, or straight outside the
    /// mesh. A socket to the endpoint gets the destination's TCP keepalive.
    async fn open(
        &self,
        state: &MeshState,
        key: Key,
        workload: Option<&Arc<Workload>>,
        hostname: &str,
        keepalive: Option<Keepalive>,
    ) -> Result<Sender, TryFailure> {
        let connect_failure = |e: &dyn std::fmt::Display| TryFailure::Connect(e.to_string());
        let (route, decision) = plan_endpoint(
            state,
            &self.proxy.settings,
            &self.source,
            *self.client.ip(),
            key.endpoint,
            workload,
        )
        .map_err(|e| connect_failure(&e))?;
        let as_client = SocketAddrV4::new(*self.client.ip(), 0);
        let io: Box<dyn Stream> = match route {
            Route::Deny { arrival } => {
                if let Some(decision) = &decision {
                    self.proxy.guard.count(decision, "connection", &arrival);
                }
                return Err(TryFailure::Denied);
            }
            Route::Local { arrival, carry } | Route::Plaintext { arrival, carry } => {
                if let Some(decision) = &decision {
                    self.proxy.guard.count(decision, "connection", &arrival);
                }
                let local = arrival.workload.node == state.node;
                let socket = if local {
                    socket::connect_as(as_client, key.endpoint).await
                } else {
                    socket::connect(key.endpoint).await
                }
                .map_err(|e| connect_failure(&e))?;
                if let Some(keepalive) = keepalive {
                    socket::keep_alive(&socket, keepalive).map_err(|e| connect_failure(&e))?;
                }
                if matches!(carry, Carry::Http | Carry::Sniff) {
                    // The destination's per-request policies judge what goes on it (HTTP
                    // on a sniffed port too: the router speaks it).
                    let arrival = match carry {
                        Carry::Sniff => Arc::new(arrival.as_http()),
                        _ => arrival,
                    };
                    let (ours, judged) = tokio::io::duplex(COPY_BUFFER);
                    let guard = self.proxy.guard.clone();
                    let exchange = Exchange {
                        service: Some(hostname.to_owned()),
                        client: Some(self.client),
                        mutual_tls: false,
                    };
                    tokio::spawn(async move {
                        // Its client is this router, which the drain reaches first.
                        let served = guard.serve_http(
                            judged,
                            socket,
                            arrival,
                            exchange,
                            ConnectionDrain::never(),
                        );
                        if let Err(err) = served.await {
                            tracing::debug!("routed request judge: {err}");
                        }
                    });
                    Box::new(ours)
                } else {
                    Box::new(socket)
                }
            }
            Route::Tunnel {
                agent,
                source,
                destination,
            } => {
                let request = TunnelRequest {
                    target: key.endpoint,
                    client: self.client,
                    service: Some(hostname.to_owned()),
                    http: true,
                };
                let (send, recv, lease) = self
                    .proxy
                    .pool
                    .open(
                        agent,
                        self.proxy.state.current().own_ip(),
                        &source,
                        &destination,
                        &request,
                    )
                    .await
                    .map_err(|e| match e {
                        crate::proxy::pool::PoolError::Refused { status, .. }
                            if status == StatusCode::FORBIDDEN =>
                        {
                            TryFailure::Denied
                        }
                        other => connect_failure(&crate::errors::describe(&other)),
                    })?;
                Box::new(TunnelStream::holding(send, recv, lease))
            }
            Route::Direct => Box::new(
                socket::connect(key.endpoint)
                    .await
                    .map_err(|e| connect_failure(&e))?,
            ),
            Route::Routed { .. } => {
                return Err(TryFailure::Connect(format!(
                    "{} is a Service address, not an endpoint",
                    key.endpoint
                )))
            }
        };
        Sender::handshake(io, key.http2)
            .await
            .map_err(|e| connect_failure(&e))
    }

    /// Sends a copy of the request to each mirror its percentage picks, and forgets it:
    /// the client sees only the primary's answer. The copy's authority gets `-shadow`, as
    /// Envoy marks mirrored requests.
    fn mirror(&self, state: &Arc<MeshState>, rule: &HttpRule, parts: &Parts, body: &Bytes) {
        for mirror in &rule.mirrors {
            if !Fault::rolls(mirror.percent) {
                continue;
            }
            let Some(service) =
                state.service_port(&mirror.host, mirror.port, self.addressed.port())
            else {
                continue;
            };
            let Pick::Endpoint(index, _) =
                service.pick(*self.client.ip(), mirror.subset.as_deref())
            else {
                continue;
            };
            let endpoint = service.endpoints[index].clone();
            let mut head = clone_head(parts);
            shadow_authority(&mut head);
            for_upstream(&mut head, service.http2);
            let request = Request::from_parts(head, Either::Right(Full::new(body.clone())));
            let router = Router {
                proxy: self.proxy.clone(),
                source: self.source.clone(),
                client: self.client,
                addressed: self.addressed,
                hostname: service.hostname.clone(),
            };
            let state = self.proxy.state.current();
            let limits = service
                .cluster(mirror.subset.as_deref())
                .and_then(|c| c.limits)
                .unwrap_or(*UNCONFIGURED_LIMITS);
            tokio::spawn(async move {
                let sent = router
                    .send(
                        &state,
                        endpoint.addr,
                        endpoint.workload.as_ref(),
                        &router.hostname,
                        &limits,
                        request,
                    )
                    .await;
                if let Ok(response) = sent {
                    // Read to the end so the connection returns to the pool.
                    let _ = response.into_body().collect().await;
                }
            });
        }
    }
}

impl RequestBody {
    fn can_resend(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }
}

/// Reads a body whole when it is small enough to send again; a larger one is streamed
/// once (and not retried), as Envoy does past its buffer limit. `None` when the client's
/// body breaks off or outgrows its announced length: nothing of it is forwarded.
async fn buffer(body: Metered<Incoming>) -> Option<RequestBody> {
    use hyper::body::Body as _;
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    if !small {
        return Some(RequestBody::Streamed(Some(body)));
    }
    let collected = Limited::new(body, RETRY_BUFFER_LIMIT as usize)
        .collect()
        .await
        .ok()?;
    Some(RequestBody::Buffered(collected.to_bytes()))
}

fn reset_or_refused(err: hyper::Error) -> TryFailure {
    let refused = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        == Some(h2::Reason::REFUSED_STREAM);
    if refused {
        TryFailure::RefusedStream
    } else {
        TryFailure::Reset(err.to_string())
    }
}

/// A place on a connection: one of `maxConnections`, or a wait as one of
/// `http1MaxPendingRequests` until one is free (Envoy queues requests, it does not fail
/// them, while connections are all busy).
async fn connection_permit(budget: &Arc<Budget>) -> Result<Permit, Overflow> {
    if let Ok(permit) = budget.try_connection() {
        return Ok(permit);
    }
    let _pending = budget.try_pending()?;
    loop {
        tokio::time::sleep(PENDING_POLL).await;
        if let Ok(permit) = budget.try_connection() {
            return Ok(permit);
        }
    }
}

/// What one source pod may have in flight to one cluster when no DestinationRule sets
/// limits. Istio lifts Envoy's defaults (1024 each) to 2^32-1 for sidecars, where one
/// pod's proxy only hurts that pod; here a pod's requests cost the node agent every other
/// pod relies on, so Envoy's 1024 concurrent requests stay as a bound.
static UNCONFIGURED_LIMITS: std::sync::LazyLock<PoolLimits> =
    std::sync::LazyLock::new(|| PoolLimits {
        max_requests: 1024,
        ..PoolLimits::default()
    });

/// How often a pending request looks for a free connection.
const PENDING_POLL: Duration = Duration::from_millis(1);

/// A request over a connection pool limit: failed fast with 503, as Envoy's circuit
/// breakers answer.
fn overflowed(overflow: Overflow, record: &mut RequestRecord) -> Response<RoutedBody> {
    record.flag(ResponseFlag::UpstreamOverflow);
    tracing::debug!("circuit breaker: {overflow}");
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    )
}

/// What outlier detection learns from a try.
fn outlier_outcome(outcome: TryOutcome) -> Outcome {
    match outcome {
        TryOutcome::Response {
            status,
            grpc: Some(code),
        } => Outcome::grpc(status, code),
        TryOutcome::Response { status, grpc: None } => Outcome::Status(status),
        TryOutcome::ConnectFailure | TryOutcome::Reset | TryOutcome::RefusedStream => {
            Outcome::ConnectFailure
        }
        TryOutcome::Timeout => Outcome::Timeout,
    }
}

/// The answer when no try produced a response.
fn failure_reply(outcome: TryOutcome, record: &mut RequestRecord) -> Response<RoutedBody> {
    match outcome {
        TryOutcome::Timeout => {
            record.flag(ResponseFlag::UpstreamTimeout);
            reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
        }
        TryOutcome::ConnectFailure => {
            record.flag(ResponseFlag::UpstreamConnectionFailure);
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            )
        }
        TryOutcome::Reset | TryOutcome::RefusedStream | TryOutcome::Response { .. } => {
            record.flag(ResponseFlag::UpstreamConnectionTermination);
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            )
        }
    }
}

fn reply(status: StatusCode, text: &'static str) -> Response<RoutedBody> {
    local_reply(status, text).map(|body| match body {
        Either::Right(full) => Either::Right(full),
        Either::Left(_) => Either::Right(Full::new(Bytes::new())),
    })
}

/// A local reply (an error of the agent's own, not an upstream's answer) to a gRPC
/// request, as Envoy sends it: HTTP 200, a Trailers-Only response whose `grpc-status`
/// maps the HTTP status as Envoy's `httpToGrpcStatus` does and whose `grpc-message` is the
/// reply's text. Upstream answers and replies already in gRPC (an injected gRPC abort)
/// pass unchanged.
async fn grpc_local_reply(response: Response<RoutedBody>) -> Response<RoutedBody> {
    let (mut head, body) = response.into_parts();
    let local = match body {
        Either::Right(local)
            if head.status.as_u16() >= 400 && !head.headers.contains_key("grpc-status") =>
        {
            local
        }
        body => return Response::from_parts(head, body),
    };
    let text = match local.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let code = grpc_status_of(head.status);
    head.status = StatusCode::OK;
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    head.headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&grpc_message(&text)) {
        head.headers.insert("grpc-message", message);
    }
    Response::from_parts(head, Either::Right(Full::new(Bytes::new())))
}

/// `text` as gRPC's `grpc-message` carries it: percent-encoded outside printable ASCII
/// (and `%` itself).
fn grpc_message(text: &[u8]) -> String {
    text.iter()
        .map(|b| match b {
            b' '..=b'~' if *b != b'%' => char::from(*b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Envoy's `httpToGrpcStatus`: the gRPC status a client reads from an HTTP error.
fn grpc_status_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// An injected abort: an HTTP status, or a gRPC status in a trailers-only response.
fn aborted(abort: AbortWith) -> Response<RoutedBody> {
    match abort {
        AbortWith::Http(status) => reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "fault filter abort",
        ),
        AbortWith::Grpc(code) => {
            let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            response
        }
    }
}

/// gRPC's `grpc-timeout` (`<digits><unit>`), which Istio lets override the route timeout.
fn grpc_timeout(parts: &Parts) -> Option<Duration> {
    let value = parts.headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The head of a request, again (for a retry or a mirror).
fn clone_head(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// Points the request at `path?query` on `authority` (`:authority` on HTTP/2, `Host` on
/// HTTP/1.1, as `normalise` left them).
fn set_target(parts: &mut Parts, path: &str, query: Option<&str>, authority: &str) {
    let target = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let uri = if parts.version >= Version::HTTP_2 {
        format!("http://{authority}{target}").parse::<Uri>()
    } else {
        target.parse::<Uri>()
    };
    if let Ok(uri) = uri {
        parts.uri = uri;
    }
    if parts.version < Version::HTTP_2 {
        if let Ok(host) = HeaderValue::from_str(authority) {
            parts.headers.insert(header::HOST, host);
        }
    }
}

/// The request's authority: the URI's (HTTP/2), else `Host` (HTTP/1.1).
fn authority_of(parts: &Parts) -> String {
    parts
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
        .unwrap_or_default()
}

/// The head in the HTTP version the upstream speaks: HTTP/1.1 carries the authority in
/// `Host` and an origin-form target, HTTP/2 in `:authority` (the URI).
fn for_upstream(parts: &mut Parts, http2: bool) {
    let was_http2 = parts.version >= Version::HTTP_2;
    if was_http2 == http2 {
        return;
    }
    let authority = authority_of(parts);
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if http2 {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
        if let Ok(uri) = format!("http://{authority}{target}").parse() {
            parts.uri = uri;
        }
    } else {
        parts.version = Version::HTTP_11;
        if let Ok(host) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, host);
        }
        if let Ok(uri) = target.parse() {
            parts.uri = uri;
        }
    }
}

/// `host` → `host-shadow` (keeping the port).
fn shadow_authority(parts: &mut Parts) {
    let authority = authority_of(parts);
    let shadowed = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (path, None),
    };
    set_target(parts, &path, query.as_deref(), &shadowed);
}

#[cfg(test)]
mod tests {
    use hyper::body::Body;

    use super::*;

    #[tokio::test]
    async fn local_errors_reach_grpc_clients_as_grpc_statuses() {
        let timed_out = grpc_local_reply(reply(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
        ))
        .await;
        assert_eq!(timed_out.status(), StatusCode::OK);
        let headers = timed_out.headers();
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], "14");
        assert_eq!(headers["grpc-message"], "upstream request timeout");
        assert!(timed_out.body().is_end_stream(), "Trailers-Only");

        assert_eq!(
            grpc_message("50% ünïcode\n".as_bytes()),
            "50%25 %C3%BCn%C3%AFcode%0A"
        );

        let aborted = grpc_local_reply(aborted(AbortWith::Grpc(8))).await;
        assert_eq!(aborted.headers()["grpc-status"], "8", "already gRPC: kept");
        let redirect = grpc_local_reply(reply(StatusCode::MOVED_PERMANENTLY, "")).await;
        assert_eq!(redirect.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            [400, 401, 403, 404, 429, 503, 500]
                .map(|s| grpc_status_of(StatusCode::from_u16(s).expect("status"))),
            [13, 16, 7, 12, 14, 14, 2]
        );
    }
}
