//! The spans of sampled requests, exported off the request path: a finished span is
//! queued without waiting (a full queue drops it and counts it), and one task per agent
//! batches the queue and exports each batch with the OpenTelemetry crates — over
//! OTLP/HTTP (protobuf), or OTLP/gRPC: the same protobuf message framed as one gRPC
//! message over HTTP/2 — grouped by collector and by the `service.name` of the workload
//! the span is about. A dead or slow collector costs dropped spans, never a waiting
//! request; failed exports are not retried.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue, Value,
};
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
    Resource,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::{
    http::client::{self, Transport},
    model::{
        telemetry::{Collector, OtlpProtocol},
        SharedState,
    },
};

/// Spans waiting for the exporter; past it spans are dropped (and counted).
const QUEUE_SPANS: usize = 4096;
/// At most this many spans go in one export.
const BATCH_SPANS: usize = 512;
/// A batch waits at most this long for more spans.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Exporters kept, one per collector configuration; past it they are all rebuilt.
const MAX_EXPORTERS: usize = 16;
/// Answers of a collector larger than this are refused.
const MAX_ANSWER: usize = 64 * 1024;

/// One finished span, as the request path hands it over.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub collector: Arc<Collector>,
    pub service_name: String,
    pub name: String,
    pub client: bool,
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(Cow<'static, str>, String)>,
    pub error: bool,
}

/// The node's span exporter, started on first use.
#[derive(Default)]
pub struct SpanExport {
    queue: Mutex<Option<mpsc::Sender<FinishedSpan>>>,
    /// Where a collector named as a Service of the mesh is found.
    state: SharedState,
    /// Spans dropped because the queue was full.
    pub dropped: Counter,
    /// Spans a collector did not take (unreachable, an error answer).
    pub failed: Counter,
    pub exported: Counter,
}

impl SpanExport {
    pub fn new(state: SharedState) -> SpanExport {
        SpanExport {
            state,
            ..SpanExport::default()
        }
    }

    /// Queues `span` for export; never waits.
    pub fn submit(&self, span: FinishedSpan) {
        let sender = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.get_or_insert_with(|| self.start()).clone()
        };
        if sender.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn start(&self) -> mpsc::Sender<FinishedSpan> {
        let (send, receive) = mpsc::channel(QUEUE_SPANS);
        let (failed, exported) = (self.failed.clone(), self.exported.clone());
        tokio::spawn(export_loop(receive, self.state.clone(), failed, exported));
        send
    }
}

async fn export_loop(
    mut receive: mpsc::Receiver<FinishedSpan>,
    state: SharedState,
    failed: Counter,
    exported: Counter,
) {
    let mut exporters: HashMap<Arc<Collector>, opentelemetry_otlp::SpanExporter> = HashMap::new();
    while let Some(first) = receive.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_SPANS {
            match tokio::time::timeout_at(deadline, receive.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        for ((collector, service), spans) in group(batch) {
            let count = spans.len() as u64;
            if !exporters.contains_key(&collector) {
                if exporters.len() >= MAX_EXPORTERS {
                    exporters.clear();
                }
                match exporter(&collector, &state) {
                    Ok(built) => {
                        exporters.insert(collector.clone(), built);
                    }
                    Err(err) => {
                        tracing::warn!("span exporter for {}: {err}", collector.endpoint);
                        failed.inc_by(count);
                        continue;
                    }
                }
            }
            let Some(exporter) = exporters.get_mut(&collector) else {
                continue;
            };
            exporter.set_resource(&Resource::builder_empty().with_service_name(service).build());
            match exporter.export(spans).await {
                Ok(()) => {
                    exported.inc_by(count);
                }
                Err(err) => {
                    tracing::debug!("exporting {count} spans to {}: {err}", collector.endpoint);
                    failed.inc_by(count);
                }
            }
        }
    }
}

/// Where a group of spans goes: a collector, as the spans of one `service.name`.
type Destination = (Arc<Collector>, String);

/// Spans by collector and service, converted for the exporter.
fn group(batch: Vec<FinishedSpan>) -> Vec<(Destination, Vec<SpanData>)> {
    let mut groups: Vec<(Destination, Vec<SpanData>)> = Vec::new();
    for span in batch {
        let key = (span.collector.clone(), span.service_name.clone());
        let data = span_data(span);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, spans)) => spans.push(data),
            None => groups.push((key, vec![data])),
        }
    }
    groups
}

/// The OpenTelemetry form of a finished span; tag values are cut to the collector's
/// `maxTagLength`.
pub fn span_data(span: FinishedSpan) -> SpanData {
    let limit = span.collector.max_tag_length;
    let attributes = span
        .attributes
        .into_iter()
        .map(|(key, mut value)| {
            if value.len() > limit {
                let mut cut = limit;
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                value.truncate(cut);
            }
            KeyValue::new(key, Value::from(value))
        })
        .chain(span.error.then(|| KeyValue::new("error", true)))
        .collect();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(span.trace_id),
            SpanId::from(span.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: span.parent.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: span.parent.is_some(),
        span_kind: if span.client {
            SpanKind::Client
        } else {
            SpanKind::Server
        },
        name: Cow::Owned(span.name),
        start_time: span.start,
        end_time: span.end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if span.error {
            Status::error("")
        } else {
            Status::Unset
        },
        instrumentation_scope: InstrumentationScope::builder("mesh-agent")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    }
}

fn exporter(
    collector: &Collector,
    state: &SharedState,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpClient {
            timeout: collector.timeout,
            grpc: collector.protocol == OtlpProtocol::Grpc,
            state: state.clone(),
        })
        .with_endpoint(collector.endpoint.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(collector.timeout)
        .with_headers(collector.headers.iter().cloned().collect())
        .with_retry_policy(RetryPolicy::disabled())
        .build()
}

/// The agent's own HTTP client (`http::client`) as the OTLP exporter's transport: a
/// connection per export, a bounded answer, a deadline. For a gRPC collector the
/// exporter's protobuf body becomes one gRPC message to the export method, and the gRPC
/// status decides. A collector named as a Service of the mesh is reached at one of its
/// endpoints.
struct OtlpClient {
    timeout: Duration,
    grpc: bool,
    state: SharedState,
}

impl std::fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpClient")
            .field("timeout", &self.timeout)
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
enum OtlpError {
    #[error("{0} names no host")]
    NoHost(String),
    #[error("{0}")]
    NoEndpoint(String),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    Http(#[from] http::Error),
    #[error("the collector answered gRPC status {0}")]
    Grpc(String),
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        Ok(self.exchange(request).await?)
    }
}

impl OtlpClient {
    async fn exchange(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, OtlpError> {
        let (parts, body) = request.into_parts();
        let authority = parts
            .uri
            .authority()
            .ok_or_else(|| OtlpError::NoHost(parts.uri.to_string()))?;
        let address = self
            .state
            .current()
            .dial(authority.host(), authority.port_u16().unwrap_or(80))
            .map_err(OtlpError::NoEndpoint)?;
        let mut headers: Vec<(http::HeaderName, http::HeaderValue)> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = if self.grpc {
            headers.retain(|(name, _)| name != http::header::CONTENT_TYPE);
            headers.push((
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            ));
            headers.push((http::header::TE, http::HeaderValue::from_static("trailers")));
            grpc_message(&body)
        } else {
            body
        };
        let answer = client::send(
            &Transport::Plain,
            client::Request {
                method: parts.method,
                host: authority.as_str().to_owned(),
                address,
                path: parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                headers,
                body,
                max_body: MAX_ANSWER,
                timeout: self.timeout,
                http2: self.grpc,
            },
        )
        .await?;
        if self.grpc {
            grpc_outcome(answer.status, &answer.headers, &answer.trailers)
                .map_err(OtlpError::Grpc)?;
            return Ok(http::Response::builder()
                .status(http::StatusCode::OK)
                .body(bytes::Bytes::new())?);
        }
        Ok(http::Response::builder()
            .status(answer.status)
            .body(answer.body)?)
    }
}

/// `message` as one uncompressed gRPC message: a zero flag, its length, its bytes.
fn grpc_message(message: &[u8]) -> bytes::Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    framed.extend_from_slice(message);
    framed.into()
}

/// Whether a gRPC call succeeded: HTTP 200 and `grpc-status: 0` in the trailers (or the
/// head of a trailers-only answer); otherwise what went wrong.
fn grpc_outcome(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    trailers: &http::HeaderMap,
) -> Result<(), String> {
    if status != http::StatusCode::OK {
        return Err(format!("none: HTTP {status}"));
    }
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
    };
    match field("grpc-status") {
        Some("0") => Ok(()),
        Some(code) => Err(format!("{code} ({})", field("grpc-message").unwrap_or(""))),
        None => Err("none: the answer carried no grpc-status".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_is_one_uncompressed_grpc_message() {
        assert_eq!(&grpc_message(b"abc")[..], [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(&grpc_message(b"")[..], [0, 0, 0, 0, 0]);
    }

    #[test]
    fn the_grpc_status_decides_whether_the_collector_took_the_spans() {
        let fields = |pairs: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        let none = http::HeaderMap::new();
        let ok = http::StatusCode::OK;
        assert_eq!(
            grpc_outcome(ok, &none, &fields(&[("grpc-status", "0")])),
            Ok(())
        );
        assert_eq!(
            grpc_outcome(ok, &fields(&[("grpc-status", "0")]), &none),
            Ok(()),
            "a trailers-only answer"
        );
        assert_eq!(
            grpc_outcome(
                ok,
                &none,
                &fields(&[("grpc-status", "14"), ("grpc-message", "overloaded")])
            ),
            Err("14 (overloaded)".into())
        );
        assert_eq!(
            grpc_outcome(ok, &none, &none),
            Err("none: the answer carried no grpc-status".into())
        );
        assert_eq!(
            grpc_outcome(http::StatusCode::NOT_FOUND, &none, &none),
            Err("none: HTTP 404 Not Found".into())
        );
    }
}
