//! What is observed of a request served one by one, written once for the source agent
//! (routing) and the destination agent (judging): its `x-request-id` (made when absent)
//! and trace context (propagated, and this hop's span started when sampled), its size
//! as it passes, and — when its response body has gone out — its count in the
//! connection's tally, its access log line (taken when it arrives, only when a log wants
//! it or a metric's label expression does; kept when the Telemetry's filter does;
//! rendered in each provider's format and queued for the writers) and its span (queued
//! for the exporter).

use std::{
    borrow::Cow,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use http::{request, Response, Version};
use hyper::body::Incoming;

use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

use crate::{
    model::{
        access_log::LogEntry,
        lb::random,
        metric_rules::{request_attributes, MetricRules},
        telemetry::{AccessLogs, Collector, Tracing},
    },
    proxy::metered::{
        grpc_status, is_grpc, request_head_size, response_head_size, BodyEnd, Metered, Reported,
    },
    telemetry::{
        access_log::LogWriters,
        metrics::Metrics,
        request::ResponseFlags,
        request_metrics::{ConnectionTally, Measures, PeerLabels, RequestEnd},
        spans::FinishedSpan,
        timing::Side,
        trace_context::{ensure_request_id, extract, inject, plan_hop, Hop, Ids},
    },
};

/// Where a request is traced: by the source agent (a client span) or the destination
/// agent (a server span), with the Telemetry's tracing for that side.
pub struct TraceSite<'a> {
    /// `None`: no tracing provider; only `x-request-id` is made.
    pub tracing: Option<&'a Arc<Tracing>>,
    pub client: bool,
    /// The Service (or address) and port the span's operation is named after.
    pub host: &'a str,
    pub port: u16,
}

/// Where a request is counted: its connection's tally, under the labels of its peers.
pub struct Counting {
    pub tally: Arc<ConnectionTally>,
    pub peers: Arc<PeerLabels>,
}

/// One request under observation.
pub struct Observed {
    /// What was taken of the request for its log line and label expressions.
    captured: Option<Captured>,
    span: Option<Box<PendingSpan>>,
    counting: Option<Counting>,
    flags: ResponseFlags,
    started: Instant,
    /// Which agent serves it, and its time inside the agent once the response head is
    /// back (see `telemetry::timing`).
    side: Side,
    agent_time: Duration,
    grpc: bool,
    request_head: u64,
    /// The request body's bytes, counted as they pass.
    request_bytes: Arc<AtomicU64>,
    /// The request stream's gRPC messages, counted as they pass.
    request_messages: Arc<AtomicU64>,
}

impl Observed {
    /// Starts observing the request `head` — giving it an `x-request-id` and this hop's
    /// trace context; its body is to be forwarded as the counted body returned. `logs`:
    /// where its line goes; `labels`: the Telemetry rules its metrics' labels follow.
    pub fn start(
        head: &mut request::Parts,
        body: Incoming,
        logs: Option<&Arc<AccessLogs>>,
        labels: Option<&Arc<MetricRules>>,
        addresses: Addresses,
        site: TraceSite<'_>,
    ) -> (Observed, Metered<Incoming>) {
        let request_bytes = Arc::new(AtomicU64::new(0));
        let request_messages = Arc::new(AtomicU64::new(0));
        let request_head = request_head_size(head);
        let request_id = ensure_request_id(&mut head.headers, || RandomIds.trace_id());
        let span = site.tracing.and_then(|tracing| {
            let extracted = extract(&head.headers);
            let roll = random(1_000_000) as u32;
            let hop = plan_hop(&extracted, tracing.sampling(), roll, &mut RandomIds)?;
            inject(&mut head.headers, &hop, &extracted);
            let collector = tracing.collector.as_ref().filter(|_| hop.sampled)?;
            Some(Box::new(PendingSpan::capture(
                tracing,
                collector,
                &site,
                hop,
                head,
                &request_id,
                addresses,
            )))
        });
        let computes_labels = labels.is_some_and(|rules| !rules.values.is_empty());
        let grpc = is_grpc(&head.headers);
        let observed = Observed {
            captured: (logs.is_some() || computes_labels)
                .then(|| Captured::capture(logs.cloned(), head, addresses)),
            span,
            counting: None,
            flags: ResponseFlags::default(),
            started: Instant::now(),
            side: if site.client {
                Side::Source
            } else {
                Side::Destination
            },
            agent_time: Duration::ZERO,
            grpc,
            request_head,
            request_bytes: request_bytes.clone(),
            request_messages: request_messages.clone(),
        };
        let body = Metered::new(body, request_bytes);
        let body = if grpc {
            body.counting_messages(request_messages)
        } else {
            body
        };
        (observed, body)
    }

    /// Whether the request is a gRPC call (its `content-type`).
    pub fn grpc(&self) -> bool {
        self.grpc
    }

    /// The response head is back: how the request was handled, and where it is counted
    /// (`None`: it is not).
    pub fn respond<B>(
        &mut self,
        response: &Response<B>,
        counting: Option<Counting>,
        flags: ResponseFlags,
        handled: Handled,
    ) {
        self.counting = counting;
        self.flags = flags;
        self.agent_time = self.started.elapsed().saturating_sub(handled.upstream_wait);
        if let Some(span) = &mut self.span {
            span.cluster = handled.cluster.clone();
        }
        if let Some(captured) = &mut self.captured {
            captured.respond(response, flags, handled);
        }
    }

    /// Whether anything is recorded of the request.
    fn wanted(&self) -> bool {
        self.captured.is_some() || self.counting.is_some() || self.span.is_some()
    }

    /// `response`, counting and logging its request when its body has gone out.
    pub fn report<B>(
        mut self,
        response: Response<B>,
        metrics: &Arc<Metrics>,
    ) -> Response<Reported<B>> {
        metrics.timing.agent_time(self.side, self.agent_time);
        if !self.wanted() {
            return response.map(Reported::unreported);
        }
        let (parts, body) = response.into_parts();
        let code = parts.status.as_u16();
        let response_head = response_head_size(&parts);
        let head_status = self.grpc.then(|| grpc_status(&parts.headers)).flatten();
        let metrics = metrics.clone();
        let report = Box::new(move |end: BodyEnd| {
            let took = self.started.elapsed();
            let body_bytes = self.request_bytes.load(Ordering::Relaxed);
            let measures = Measures {
                duration: took,
                request_bytes: self.request_head + body_bytes,
                response_bytes: response_head + end.bytes,
                request_messages: self.request_messages.load(Ordering::Relaxed),
                response_messages: end.messages,
            };
            if let Some(span) = self.span {
                let finished = span.finish(code, self.flags, &measures, metrics.mesh_id());
                metrics.spans.submit(finished);
            }
            if let Some(captured) = &mut self.captured {
                captured.complete(end, body_bytes, took);
            }
            // Built once, for the label expressions (and the log filter, which builds
            // them itself when no expression needs them).
            let labelled = self
                .counting
                .as_ref()
                .and_then(|counting| counting.peers.rules())
                .is_some_and(|rules| !rules.values.is_empty());
            let context = self
                .captured
                .as_ref()
                .filter(|_| labelled)
                .map(|captured| request_attributes(&captured.entry, captured.mutual_tls));
            if let Some(counting) = &self.counting {
                let outcome = RequestEnd {
                    grpc: self.grpc,
                    response_code: code,
                    grpc_status: end.grpc_status,
                    flags: self.flags,
                };
                let tags = match (counting.peers.rules(), &context) {
                    (Some(rules), Some(context)) => rules.evaluate(context),
                    _ => Vec::new(),
                };
                counting
                    .tally
                    .record(&counting.peers, outcome, tags.into(), &measures);
            }
            if let Some(captured) = self.captured {
                captured.log(&metrics.access_logs, context.as_ref());
            }
        });
        Response::from_parts(parts, Reported::new(body, self.grpc, head_status, report))
    }
}

/// Trace and span ids from the OpenTelemetry SDK's generator (a thread-local generator
/// seeded from the operating system).
struct RandomIds;

impl Ids for RandomIds {
    fn trace_id(&mut self) -> u128 {
        u128::from_be_bytes(RandomIdGenerator::default().new_trace_id().to_bytes())
    }
    fn span_id(&mut self) -> u64 {
        u64::from_be_bytes(RandomIdGenerator::default().new_span_id().to_bytes())
    }
}

/// A sampled request's span, waiting for its response to end.
struct PendingSpan {
    tracing: Arc<Tracing>,
    collector: Arc<Collector>,
    hop: Hop,
    client: bool,
    name: String,
    start: SystemTime,
    /// Tags known when the request arrived.
    tags: Vec<(Cow<'static, str>, String)>,
    /// Envoy's cluster name of where it went.
    cluster: Option<String>,
}

impl PendingSpan {
    /// Takes the tags Envoy sets from the request head as it goes on (with its
    /// `x-request-id`), and the Telemetry's header tags.
    fn capture(
        tracing: &Arc<Tracing>,
        collector: &Arc<Collector>,
        site: &TraceSite<'_>,
        hop: Hop,
        head: &request::Parts,
        request_id: &http::HeaderValue,
        addresses: Addresses,
    ) -> PendingSpan {
        let text = |value: Option<&http::HeaderValue>| {
            value
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| text(head.headers.get(http::header::HOST)));
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut tags: Vec<(Cow<'static, str>, String)> = vec![
            ("component".into(), "proxy".into()),
            ("http.url".into(), format!("http://{authority}{path}")),
            ("http.method".into(), head.method.as_str().to_owned()),
            ("http.protocol".into(), protocol(head.version).to_owned()),
            ("downstream_cluster".into(), "-".into()),
            (
                "user_agent".into(),
                text(head.headers.get(http::header::USER_AGENT)),
            ),
            ("guid:x-request-id".into(), text(Some(request_id))),
            (
                "peer.address".into(),
                addresses
                    .remote
                    .map_or_else(|| "-".to_owned(), |a| a.ip().to_string()),
            ),
        ];
        tags.extend(
            tracing
                .tags
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), v.clone())),
        );
        for tag in &tracing.header_tags {
            let value = head
                .headers
                .get(&tag.header)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| tag.default_value.clone());
            if let Some(value) = value {
                tags.push((Cow::Owned(tag.tag.clone()), value));
            }
        }
        PendingSpan {
            tracing: tracing.clone(),
            collector: collector.clone(),
            hop,
            client: site.client,
            name: format!("{}:{}/*", site.host, site.port),
            start: SystemTime::now(),
            tags,
            cluster: None,
        }
    }

    /// The span, with the tags of the response.
    fn finish(
        self,
        code: u16,
        flags: ResponseFlags,
        measures: &Measures,
        mesh_id: &str,
    ) -> FinishedSpan {
        let mut attributes = self.tags;
        let cluster = self.cluster.unwrap_or_else(|| "-".into());
        attributes.extend([
            ("http.status_code".into(), code.to_string()),
            ("response_flags".into(), flags.to_string()),
            ("request_size".into(), measures.request_bytes.to_string()),
            ("response_size".into(), measures.response_bytes.to_string()),
            ("upstream_cluster".into(), cluster.clone()),
            ("upstream_cluster.name".into(), cluster),
            ("istio.mesh_id".into(), mesh_id.to_owned()),
        ]);
        FinishedSpan {
            collector: self.collector,
            service_name: self.tracing.service_name.clone(),
            name: self.name,
            client: self.client,
            trace_id: self.hop.trace_id,
            span_id: self.hop.span_id,
            parent: self.hop.parent,
            start: self.start,
            end: self.start + measures.duration,
            attributes,
            error: code >= 500,
        }
    }
}

/// Where a request came from and went to.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The address the client connected to (a Service's, or the workload's).
    pub local: Option<SocketAddrV4>,
    pub remote: Option<SocketAddrV4>,
    pub mutual_tls: bool,
}

/// What is known of a request for its log line and its metrics' label expressions,
/// waiting for its response to end.
struct Captured {
    /// Where its line goes, if anywhere.
    logs: Option<Arc<AccessLogs>>,
    entry: LogEntry,
    mutual_tls: bool,
}

impl Captured {
    /// Takes what is needed from the request head as it arrived.
    fn capture(
        logs: Option<Arc<AccessLogs>>,
        head: &request::Parts,
        addresses: Addresses,
    ) -> Captured {
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                head.headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        Captured {
            logs,
            entry: LogEntry {
                start: SystemTime::now(),
                duration: Duration::ZERO,
                protocol: protocol(head.version),
                request_headers: head.headers.clone(),
                method: head.method.as_str().to_owned(),
                path: head
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                authority,
                response_headers: http::HeaderMap::new(),
                response_code: 0,
                response_flags: "-".into(),
                response_code_details: None,
                bytes_received: 0,
                bytes_sent: 0,
                upstream_host: None,
                upstream_cluster: None,
                downstream_local: addresses.local,
                downstream_remote: addresses.remote,
                route_name: None,
            },
            mutual_tls: addresses.mutual_tls,
        }
    }

    /// The response head and how the request was handled.
    fn respond<B>(&mut self, response: &Response<B>, flags: ResponseFlags, handled: Handled) {
        self.entry.response_code = response.status().as_u16();
        self.entry.response_headers = response.headers().clone();
        self.entry.response_flags = flags.to_string();
        self.entry.upstream_host = handled.upstream;
        self.entry.upstream_cluster = handled.cluster;
        self.entry.route_name = handled.route;
        self.entry.response_code_details = handled.details;
    }

    /// What is known once the response has ended.
    fn complete(&mut self, end: BodyEnd, request_bytes: u64, took: Duration) {
        self.entry.duration = took;
        self.entry.bytes_received = request_bytes;
        self.entry.bytes_sent = end.bytes;
    }

    /// Writes the line (in every provider's format) when the filter keeps it;
    /// `attributes`: the request's CEL attributes, if already built.
    fn log(self, writers: &LogWriters, attributes: Option<&cel_interpreter::Context>) {
        let Some(logs) = &self.logs else {
            return;
        };
        for (path, line) in logs.lines(&self.entry, self.mutual_tls, attributes) {
            writers.write(path, line);
        }
    }
}

/// How a request was handled, for its line.
#[derive(Debug, Default)]
pub struct Handled {
    pub upstream: Option<SocketAddrV4>,
    /// Envoy's cluster name (`outbound|port|subset|host`, `inbound|port||`).
    pub cluster: Option<String>,
    pub route: Option<String>,
    /// Why the agent answered itself (`rbac_access_denied`, ...).
    pub details: Option<String>,
    /// Time spent waiting for the upstream's response head (tries and backoff).
    pub upstream_wait: Duration,
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}
