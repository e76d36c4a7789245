//! The HTTP connections routed requests travel on, kept per source pod and endpoint so
//! that keep-alive survives the client's connections (as a sidecar's pool does): an
//! HTTP/1.1 connection goes back to the pool when its response has been read to the end;
//! an HTTP/2 connection is shared by every request. A DestinationRule's
//! `connectionPool.http` says how long a connection may stay idle (`idleTimeout`, at most
//! [`IDLE_TIMEOUT`]) and how many requests it carries (`maxRequestsPerConnection`) before
//! it is closed ([`Reuse`]); a pool keeps at most [`MAX_IDLE_PER_KEY`] idle connections.
//! A connection is reused only under the configuration it was planned under: a new
//! policy (say, one that makes the destination judge each request) must not be walked
//! around on a connection opened before it.

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

use crate::{
    model::{circuit::PoolLimits, MeshState},
    proxy::requests::Outgoing,
};

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

/// How long a connection may wait in the pool for its next request, and how many
/// requests it may carry, as the destination's `connectionPool.http` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    pub idle_limit: Duration,
    /// 0: no limit.
    pub max_requests: u32,
}

impl Reuse {
    /// Istio's `idleTimeout` (default one hour, `0s`: none) is capped at the agent's own
    /// [`IDLE_TIMEOUT`]: one agent holds connections for every pod of its node.
    pub fn of(limits: &PoolLimits) -> Reuse {
        Reuse {
            idle_limit: limits
                .http_idle_timeout
                .map_or(IDLE_TIMEOUT, |limit| limit.min(IDLE_TIMEOUT)),
            max_requests: limits.max_requests_per_connection,
        }
    }

    /// Whether a connection that has carried `carried` requests may carry another.
    fn allows_another(&self, carried: u32) -> bool {
        self.max_requests == 0 || carried < self.max_requests
    }
}

/// A pooled connection: when it went idle (HTTP/2: when it was last used), how long it
/// may stay so, the configuration it was planned under, the requests it has carried, and
/// the connection.
struct Idle {
    since: Instant,
    idle_limit: Duration,
    planned: Weak<MeshState>,
    carried: u32,
    sender: Sender,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.since) < self.idle_limit
    }
}

#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl Upstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pooled connection for `key`, if one is open, fresh and was planned under
    /// `current` (the others are dropped), with the requests it will have carried once it
    /// carries the next one. An HTTP/2 connection stays in the pool for other requests
    /// until it has carried as many as `reuse` allows.
    pub fn take(&self, key: &Key, current: &Arc<MeshState>, reuse: Reuse) -> Option<(Sender, u32)> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let current = Arc::downgrade(current);
        list.retain(|entry| entry.usable(now) && Weak::ptr_eq(&entry.planned, &current));
        let taken = match list.last_mut() {
            Some(Idle {
                sender: Sender::Http2(send),
                carried,
                since,
                ..
            }) => {
                *carried += 1;
                *since = now;
                let taken = (Sender::Http2(send.clone()), *carried);
                if !reuse.allows_another(*carried) {
                    list.pop();
                }
                Some(taken)
            }
            Some(Idle {
                sender: Sender::Http1(_),
                ..
            }) => list.pop().map(|entry| (entry.sender, entry.carried + 1)),
            None => None,
        };
        if list.is_empty() {
            idle.remove(key);
        }
        taken
    }

    /// Keeps `sender` (planned under `planned`, `carried` requests so far) for the next
    /// request of `key`, unless it has carried as many as `reuse` allows: then it is
    /// dropped, which closes it once its last response is read.
    pub fn put(
        &self,
        key: Key,
        planned: Weak<MeshState>,
        sender: Sender,
        carried: u32,
        reuse: Reuse,
    ) {
        if sender.is_closed() || !reuse.allows_another(carried) {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if matches!(sender, Sender::Http2(_)) {
            list.clear();
        }
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle {
                since: Instant::now(),
                idle_limit: reuse.idle_limit,
                planned,
                carried,
                sender,
            });
        }
    }

    /// Drops every connection idle for longer than its limit, and those planned under a
    /// configuration that is gone.
    pub fn expire(&self) {
        let now = Instant::now();
        self.lock().retain(|_, list| {
            list.retain(|entry| entry.usable(now) && entry.planned.strong_count() > 0);
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
    pub carried: u32,
    pub reuse: Reuse,
}

impl Returning {
    pub fn new(body: Incoming, back: Option<GiveBack>) -> Returning {
        Returning { body, back }
    }

    fn give_back(&mut self) {
        if let Some(back) = self.back.take() {
            back.pool.put(
                back.key,
                back.planned,
                back.sender,
                back.carried,
                back.reuse,
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client connection over an in-memory pipe; the far end is kept open by `peers`.
    async fn sender(http2: bool, peers: &mut Vec<tokio::io::DuplexStream>) -> Sender {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        peers.push(theirs);
        Sender::handshake(Box::new(ours), http2)
            .await
            .expect("handshake")
    }

    fn key(http2: bool) -> Key {
        Key {
            source: Ipv4Addr::new(10, 244, 1, 5),
            endpoint: SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 9080),
            http2,
        }
    }

    fn reuse(max_requests: u32) -> Reuse {
        Reuse {
            idle_limit: IDLE_TIMEOUT,
            max_requests,
        }
    }

    #[tokio::test]
    async fn an_http1_connection_goes_back_until_it_has_carried_its_maximum() {
        let (pool, state, mut peers) =
            (Upstreams::default(), Arc::new(MeshState::default()), vec![]);
        let planned = Arc::downgrade(&state);
        let first = sender(false, &mut peers).await;
        pool.put(key(false), planned.clone(), first, 1, reuse(2));
        let (second, carried) = pool.take(&key(false), &state, reuse(2)).expect("pooled");
        assert_eq!(carried, 2, "the request it is taken for is its second");
        assert!(
            pool.take(&key(false), &state, reuse(2)).is_none(),
            "taken out"
        );
        pool.put(key(false), planned, second, carried, reuse(2));
        assert!(
            pool.take(&key(false), &state, reuse(2)).is_none(),
            "two requests carried: not kept"
        );
    }

    #[tokio::test]
    async fn an_http2_connection_is_shared_until_it_has_carried_its_maximum() {
        let (pool, state, mut peers) =
            (Upstreams::default(), Arc::new(MeshState::default()), vec![]);
        let shared = sender(true, &mut peers).await;
        pool.put(key(true), Arc::downgrade(&state), shared, 1, reuse(3));
        let carried: Vec<u32> = std::iter::from_fn(|| pool.take(&key(true), &state, reuse(3)))
            .map(|(_, carried)| carried)
            .collect();
        assert_eq!(
            carried,
            vec![2, 3],
            "shared by the next two requests, then retired"
        );
        let unlimited = sender(true, &mut peers).await;
        pool.put(key(true), Arc::downgrade(&state), unlimited, 1, reuse(0));
        for expected in 2..50 {
            let (_, carried) = pool.take(&key(true), &state, reuse(0)).expect("shared");
            assert_eq!(carried, expected);
        }
    }

    #[tokio::test]
    async fn a_connection_idle_past_its_limit_or_planned_under_another_configuration_is_not_reused()
    {
        let (pool, state, mut peers) =
            (Upstreams::default(), Arc::new(MeshState::default()), vec![]);
        let idle_at_once = Reuse {
            idle_limit: Duration::ZERO,
            max_requests: 0,
        };
        let first = sender(false, &mut peers).await;
        pool.put(key(false), Arc::downgrade(&state), first, 1, idle_at_once);
        assert!(pool.take(&key(false), &state, idle_at_once).is_none());
        let second = sender(false, &mut peers).await;
        pool.put(key(false), Arc::downgrade(&state), second, 1, reuse(0));
        let newer = Arc::new(MeshState::default());
        assert!(pool.take(&key(false), &newer, reuse(0)).is_none());
        let third = sender(false, &mut peers).await;
        pool.put(key(false), Arc::downgrade(&state), third, 1, reuse(0));
        pool.expire();
        assert!(
            pool.take(&key(false), &state, reuse(0)).is_some(),
            "fresh, kept"
        );
    }

    #[test]
    fn idle_timeouts_are_capped_at_the_agents_own() {
        let mut limits = PoolLimits::default();
        assert_eq!(Reuse::of(&limits).idle_limit, IDLE_TIMEOUT, "Istio's 1 h");
        limits.http_idle_timeout = None;
        assert_eq!(Reuse::of(&limits).idle_limit, IDLE_TIMEOUT, "0s: none");
        limits.http_idle_timeout = Some(Duration::from_secs(2));
        limits.max_requests_per_connection = 1;
        assert_eq!(
            Reuse::of(&limits),
            Reuse {
                idle_limit: Duration::from_secs(2),
                max_requests: 1
            }
        );
    }
}
