//! Bodies that measure what passes through them, for the request metrics: [`Metered`]
//! counts a request body's bytes into a counter the response's report reads, and
//! [`Reported`] reports once when a response body ends — or is dropped, when the client
//! goes away first — with its size and the gRPC status of its trailers.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// A body whose data bytes are added to `bytes` as they pass.
pub struct Metered<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Metered<B> {
        Metered { inner, bytes }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy)]
pub struct BodyEnd {
    pub bytes: u64,
    /// `grpc-status` of the trailers, when they carried one.
    pub grpc_status: Option<u32>,
}

type Report = Box<dyn FnOnce(BodyEnd) + Send>;

/// A response body that calls its report once, at its end.
pub struct Reported<B> {
    inner: B,
    end: BodyEnd,
    report: Option<Report>,
}

impl<B> Reported<B> {
    /// `grpc_status` is the status the response head carried (a trailers-only answer).
    pub fn new(inner: B, grpc_status: Option<u32>, report: Report) -> Reported<B> {
        Reported {
            inner,
            end: BodyEnd {
                bytes: 0,
                grpc_status,
            },
            report: Some(report),
        }
    }

    /// A body nobody reports on (request metrics are off).
    pub fn unreported(inner: B) -> Reported<B> {
        Reported {
            inner,
            end: BodyEnd {
                bytes: 0,
                grpc_status: None,
            },
            report: None,
        }
    }

    fn finish(&mut self) {
        if let Some(report) = self.report.take() {
            report(self.end);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Reported<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.end.bytes += data.len() as u64;
                } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    self.end.grpc_status = Some(status);
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Reported<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The `grpc-status` of a response head or trailers.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The size of a head as HTTP/1.1 would write it: what Envoy counts in a request's or
/// response's size beside the body.
fn head_size(headers: &http::HeaderMap, first_line: usize) -> u64 {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (first_line + 2 + fields + 2) as u64
}

/// Whether a request is gRPC (its content type says so).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The size of a request head as HTTP/1.1 writes it.
pub fn request_head_size(parts: &http::request::Parts) -> u64 {
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    head_size(&parts.headers, parts.method.as_str().len() + target + 10)
}

/// The size of a response head as HTTP/1.1 writes it.
pub fn response_head_size(parts: &http::response::Parts) -> u64 {
    let reason = parts.status.canonical_reason().map_or(0, str::len);
    head_size(&parts.headers, 13 + reason)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn a_response_reports_its_bytes_and_trailer_status_once() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let body = Reported::new(
            Full::new(Bytes::from_static(b"hello world"))
                .with_trailers(std::future::ready(Some(Ok(trailers)))),
            None,
            Box::new(move |end| seen.lock().expect("lock").push(end)),
        );
        body.collect().await.expect("body");
        let ends = ends.lock().expect("lock");
        assert_eq!(ends.len(), 1);
        assert_eq!((ends[0].bytes, ends[0].grpc_status), (11, Some(14)));
    }

    #[tokio::test]
    async fn a_response_dropped_half_way_still_reports() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let body = Reported::new(
            Full::new(Bytes::from_static(b"unread")),
            Some(0),
            Box::new(move |end| seen.lock().expect("lock").push(end)),
        );
        drop(body);
        let ends = ends.lock().expect("lock");
        assert_eq!(
            (ends.len(), ends[0].bytes, ends[0].grpc_status),
            (1, 0, Some(0))
        );
    }

    #[tokio::test]
    async fn a_request_body_is_counted_as_it_passes() {
        let bytes = Arc::new(AtomicU64::new(0));
        let body = Metered::new(Full::new(Bytes::from_static(b"0123456789")), bytes.clone());
        body.collect().await.expect("body");
        assert_eq!(bytes.load(Ordering::Relaxed), 10);
    }
}
