//! The HTTP connections routed requests travel on, kept per source pod and endpoint so
//! that keep-alive survives the client's connections (as a sidecar's pool does): an
//! HTTP/1.1 connection goes back to the pool when its response has been read to the end;
//! an HTTP/2 connection is shared by every request. Idle connections are dropped after
//! [`IDLE_TIMEOUT`], and a pool keeps at most [`MAX_IDLE_PER_KEY`] of them. A connection
//! is reused only under the configuration it was planned under: a new policy (say, one
//! that makes the destination judge each request) must not be walked around on a
//! connection opened before it.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{model::MeshState, proxy::requests::Outgoing};

/// Envoy's default idle timeout for upstream connections is one hour; a node agent holds
/// connections for every pod of its node, so it lets them go sooner.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per source pod and endpoint.
pub const MAX_IDLE_PER_KEY: usize = 64;

/// A byte stream to an endpoint: a socket, or a pipe into the agent's own request judge
/// or an HBONE stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Whose connection it is: a source pod's connections carry its identity and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: Ipv4Addr,
    pub endpoint: SocketAddrV4,
    pub http2: bool,
}

pub enum Sender {
    Http1(http1::SendRequest<Outgoing>),
    Http2(http2::SendRequest<Outgoing>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    /// Speaks HTTP (the version of `key`) over `io`.
    pub async fn handshake(io: Box<dyn Stream>, http2: bool) -> Result<Sender, hyper::Error> {
        let io = TokioIo::new(io);
        if http2 {
            let (send, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http2(send))
        } else {
            let (send, connection) = http1::handshake(io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http1(send))
        }
    }
}

/// A pooled connection: when it went idle, the configuration it was planned under, and
/// the connection.
type Idle = (Instant, Weak<MeshState>, Sender);

#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl Upstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pooled connection for `key`, if one is open, fresh and was planned under
    /// `current` (the others are dropped).
    pub fn take(&self, key: &Key, current: &Arc<MeshState>) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let current = Arc::downgrade(current);
        list.retain(|(since, planned, sender)| {
            !sender.is_closed()
                && now.duration_since(*since) < IDLE_TIMEOUT
                && Weak::ptr_eq(planned, &current)
        });
        let taken = match list.last() {
            // HTTP/2 is shared: it stays in the pool.
            Some((_, _, Sender::Http2(send))) => Some(Sender::Http2(send.clone())),
            Some((_, _, Sender::Http1(_))) => list.pop().map(|(_, _, sender)| sender),
            None => None,
        };
        if list.is_empty() {
            idle.remove(key);
        }
        taken
    }

    /// Keeps `sender` (planned under `planned`) for the next request of `key`.
    pub fn put(&self, key: Key, planned: Weak<MeshState>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if matches!(sender, Sender::Http2(_)) {
            list.clear();
        }
        if list.len() < MAX_IDLE_PER_KEY {
            list.push((Instant::now(), planned, sender));
        }
    }

    /// Drops every connection idle for longer than [`IDLE_TIMEOUT`].
    pub fn expire(&self) {
        let now = Instant::now();
        self.lock().retain(|_, list| {
            list.retain(|(since, planned, sender)| {
                !sender.is_closed()
                    && now.duration_since(*since) < IDLE_TIMEOUT
                    && planned.strong_count() > 0
            });
            !list.is_empty()
        });
    }
}

/// A response body from a pooled HTTP/1.1 connection: when it has been read to its end,
/// the connection goes back to the pool. Dropped before its end, the connection is
/// dropped with it (hyper closes it), as it cannot carry another request.
pub struct Returning {
    body: Incoming,
    back: Option<GiveBack>,
}

/// Where a connection goes back to when its response has been read.
pub struct GiveBack {
    pub pool: Arc<Upstreams>,
    pub key: Key,
    pub planned: Weak<MeshState>,
    pub sender: Sender,
}

impl Returning {
    pub fn new(body: Incoming, back: Option<GiveBack>) -> Returning {
        Returning { body, back }
    }

    fn give_back(&mut self) {
        if let Some(back) = self.back.take() {
            back.pool.put(back.key, back.planned, back.sender);
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
