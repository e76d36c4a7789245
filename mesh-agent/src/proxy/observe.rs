//! What is observed of a request served one by one, written once for the source agent
//! (routing) and the destination agent (judging): its size as it passes, and — when its
//! response body has gone out — its count in the connection's tally and its access log
//! line (taken when it arrives, only when a log wants it; kept when the Telemetry's
//! filter does; rendered in each provider's format and queued for the writers).

use std::{
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use http::{request, Response, Version};
use hyper::body::Incoming;

use crate::{
    model::{access_log::LogEntry, telemetry::AccessLogs},
    proxy::metered::{
        grpc_status, is_grpc, request_head_size, response_head_size, BodyEnd, Metered, Reported,
    },
    telemetry::{
        access_log::LogWriters,
        metrics::Metrics,
        request::ResponseFlags,
        request_metrics::{ConnectionTally, Measures, PeerLabels, RequestEnd},
    },
};

/// Where a request is counted: its connection's tally, under the labels of its peers.
pub struct Counting {
    pub tally: Arc<ConnectionTally>,
    pub peers: Arc<PeerLabels>,
}

/// One request under observation.
pub struct Observed {
    line: Option<PendingLine>,
    counting: Option<Counting>,
    flags: ResponseFlags,
    started: Instant,
    grpc: bool,
    request_head: u64,
    /// The request body's bytes, counted as they pass.
    request_bytes: Arc<AtomicU64>,
}

impl Observed {
    /// Starts observing the request `head`; its body is to be forwarded as the counted
    /// body returned.
    pub fn start(
        head: &request::Parts,
        body: Incoming,
        logs: Option<&Arc<AccessLogs>>,
        addresses: Addresses,
    ) -> (Observed, Metered<Incoming>) {
        let request_bytes = Arc::new(AtomicU64::new(0));
        let observed = Observed {
            line: logs.map(|logs| PendingLine::capture(logs, head, addresses)),
            counting: None,
            flags: ResponseFlags::default(),
            started: Instant::now(),
            grpc: is_grpc(&head.headers),
            request_head: request_head_size(head),
            request_bytes: request_bytes.clone(),
        };
        (observed, Metered::new(body, request_bytes))
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
        if let Some(line) = &mut self.line {
            line.respond(response, flags, handled);
        }
    }

    /// Whether anything is recorded of the request.
    fn wanted(&self) -> bool {
        self.line.is_some() || self.counting.is_some()
    }

    /// `response`, counting and logging its request when its body has gone out.
    pub fn report<B>(self, response: Response<B>, metrics: &Arc<Metrics>) -> Response<Reported<B>> {
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
            if let Some(counting) = &self.counting {
                let outcome = RequestEnd {
                    grpc: self.grpc,
                    response_code: code,
                    grpc_status: end.grpc_status,
                    flags: self.flags,
                };
                let measures = Measures {
                    duration: took,
                    request_bytes: self.request_head + body_bytes,
                    response_bytes: response_head + end.bytes,
                };
                counting.tally.record(&counting.peers, outcome, &measures);
            }
            if let Some(line) = self.line {
                line.finish(&metrics.access_logs, end, body_bytes, took);
            }
        });
        Response::from_parts(parts, Reported::new(body, head_status, report))
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

/// A request's line, waiting for its response to end.
struct PendingLine {
    logs: Arc<AccessLogs>,
    entry: LogEntry,
    mutual_tls: bool,
}

impl PendingLine {
    /// Takes what the line needs from the request head as it arrived.
    fn capture(logs: &Arc<AccessLogs>, head: &request::Parts, addresses: Addresses) -> PendingLine {
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
        PendingLine {
            logs: logs.clone(),
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

    /// Writes the line (in every provider's format) when the filter keeps it.
    fn finish(mut self, writers: &LogWriters, end: BodyEnd, request_bytes: u64, took: Duration) {
        self.entry.duration = took;
        self.entry.bytes_received = request_bytes;
        self.entry.bytes_sent = end.bytes;
        for (path, line) in self.logs.lines(&self.entry, self.mutual_tls) {
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
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}
