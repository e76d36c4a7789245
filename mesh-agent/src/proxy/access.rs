//! The access log of requests served one by one: what a request's line needs is taken
//! when it arrives (only when a log wants it), completed with its response, and — when
//! its body has gone out and the Telemetry's filter keeps it — rendered in each
//! provider's format and queued for the writers.

use std::{
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{request, Response, Version};

use crate::{
    model::{access_log::LogEntry, telemetry::AccessLogs},
    proxy::metered::BodyEnd,
    telemetry::{access_log::LogWriters, request::ResponseFlags},
};

/// Where a request came from and went to.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The address the client connected to (a Service's, or the workload's).
    pub local: Option<SocketAddrV4>,
    pub remote: Option<SocketAddrV4>,
    pub mutual_tls: bool,
}

/// A request's line, waiting for its response to end.
pub struct PendingLine {
    logs: Arc<AccessLogs>,
    entry: LogEntry,
    mutual_tls: bool,
}

impl PendingLine {
    /// Takes what the line needs from the request head as it arrived.
    pub fn capture(
        logs: &Arc<AccessLogs>,
        head: &request::Parts,
        addresses: Addresses,
    ) -> PendingLine {
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
    pub fn respond<B>(&mut self, response: &Response<B>, flags: ResponseFlags, handled: Handled) {
        self.entry.response_code = response.status().as_u16();
        self.entry.response_headers = response.headers().clone();
        self.entry.response_flags = flags.to_string();
        self.entry.upstream_host = handled.upstream;
        self.entry.upstream_cluster = handled.cluster;
        self.entry.route_name = handled.route;
        self.entry.response_code_details = handled.details;
    }

    /// Writes the line (in every provider's format) when the filter keeps it.
    pub fn finish(
        mut self,
        writers: &LogWriters,
        end: BodyEnd,
        request_bytes: u64,
        took: Duration,
    ) {
        self.entry.duration = took;
        self.entry.bytes_received = request_bytes;
        self.entry.bytes_sent = end.bytes;
        if let Some(filter) = &self.logs.filter {
            if !filter.keeps(&self.entry, self.mutual_tls) {
                return;
            }
        }
        for sink in &self.logs.sinks {
            writers.write(&sink.path, sink.format.render(&self.entry));
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
