//! Bodies that measure what passes through them, for the request metrics: [`Metered`]
//! counts a request body's bytes (and gRPC messages) into counters the response's report
//! reads, and [`Reported`] reports once when a response body ends — or is dropped, when
//! the client goes away first — with its size, its gRPC messages and the gRPC status of
//! its trailers.

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

/// Counts the gRPC messages of a stream as its bytes pass: each message is a 5-byte
/// prefix (a compression flag and a big-endian length) and that many bytes. A message is
/// counted when its prefix begins, as Envoy's gRPC stats count them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GrpcFrames {
    messages: u64,
    /// Bytes of the current prefix read so far (0: none, the next byte starts one).
    prefix_read: u8,
    length: u32,
    payload_left: u64,
}

impl GrpcFrames {
    pub fn feed(&mut self, mut data: &[u8]) {
        while let Some((&byte, rest)) = data.split_first() {
            if self.payload_left > 0 {
                let skipped = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= skipped as u64;
                data = &data[skipped..];
                continue;
            }
            if self.prefix_read == 0 {
                self.messages += 1;
            } else {
                self.length = self.length << 8 | u32::from(byte);
            }
            self.prefix_read += 1;
            if self.prefix_read == 5 {
                self.payload_left = u64::from(self.length);
                self.prefix_read = 0;
                self.length = 0;
            }
            data = rest;
        }
    }

    pub fn messages(&self) -> u64 {
        self.messages
    }
}

/// A body whose data bytes are added to `bytes` as they pass, and, for gRPC, whose
/// messages are added to `messages`.
pub struct Metered<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    messages: Option<(GrpcFrames, Arc<AtomicU64>)>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Metered<B> {
        Metered {
            inner,
            bytes,
            messages: None,
        }
    }

    /// Also counts the body's gRPC messages into `messages`.
    pub fn counting_messages(mut self, messages: Arc<AtomicU64>) -> Metered<B> {
        self.messages = Some((GrpcFrames::default(), messages));
        self
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
                if let Some((frames, messages)) = &mut self.messages {
                    let before = frames.messages();
                    frames.feed(data);
                    messages.fetch_add(frames.messages() - before, Ordering::Relaxed);
                }
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
    /// gRPC messages, when the body was counted as a gRPC stream.
    pub messages: u64,
    /// `grpc-status` of the trailers, when they carried one.
    pub grpc_status: Option<u32>,
}

type Report = Box<dyn FnOnce(BodyEnd) + Send>;

/// A response body that calls its report once, at its end.
pub struct Reported<B> {
    inner: B,
    end: BodyEnd,
    /// The gRPC messages of a gRPC answer.
    frames: Option<GrpcFrames>,
    report: Option<Report>,
}

impl<B> Reported<B> {
    /// `grpc_status` is the status the response head carried (a trailers-only answer);
    /// with `grpc` the body's messages are counted.
    pub fn new(inner: B, grpc: bool, grpc_status: Option<u32>, report: Report) -> Reported<B> {
        Reported {
            inner,
            end: BodyEnd {
                bytes: 0,
                messages: 0,
                grpc_status,
            },
            frames: grpc.then(GrpcFrames::default),
            report: Some(report),
        }
    }

    /// A body nobody reports on (request metrics are off).
    pub fn unreported(inner: B) -> Reported<B> {
        Reported {
            inner,
            end: BodyEnd {
                bytes: 0,
                messages: 0,
                grpc_status: None,
            },
            frames: None,
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
                    if let Some(frames) = &mut self.frames {
                        frames.feed(data);
                        self.end.messages = frames.messages();
                    }
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
            false,
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
            true,
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

    /// Three gRPC messages (one empty, one of 300 bytes) cut at awkward places.
    fn three_messages() -> Vec<u8> {
        let mut stream = vec![0, 0, 0, 0, 2, b'h', b'i', 0, 0, 0, 0, 0, 1, 0, 0, 1, 44];
        stream.extend(std::iter::repeat_n(7u8, 300));
        stream
    }

    #[test]
    fn grpc_messages_are_counted_whatever_the_chunking() {
        let stream = three_messages();
        for chunk in [1, 2, 3, 5, 7, 16, 1000] {
            let mut frames = GrpcFrames::default();
            for piece in stream.chunks(chunk) {
                frames.feed(piece);
            }
            assert_eq!(frames.messages(), 3, "chunks of {chunk}");
        }
        let mut half = GrpcFrames::default();
        half.feed(&stream[..3]);
        assert_eq!(half.messages(), 1, "a message counts from its first byte");
        let mut hostile = GrpcFrames::default();
        hostile.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert_eq!(hostile.messages(), 1, "a huge length is only skipped");
    }

    #[tokio::test]
    async fn grpc_bodies_count_their_messages_both_ways() {
        let (bytes, messages) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let request = Metered::new(Full::new(Bytes::from(three_messages())), bytes.clone())
            .counting_messages(messages.clone());
        request.collect().await.expect("body");
        assert_eq!(messages.load(Ordering::Relaxed), 3);
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let response = Reported::new(
            Full::new(Bytes::from(three_messages())),
            true,
            None,
            Box::new(move |end| seen.lock().expect("lock").push(end)),
        );
        response.collect().await.expect("body");
        assert_eq!(ends.lock().expect("lock")[0].messages, 3);
    }
}
