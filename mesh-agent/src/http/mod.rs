//! The agent's HTTP plumbing: the one HTTP client (CA, JWKS, meshctl), the small servers
//! for metrics, readiness and admin, the plain listener they bind, and the accept loop
//! every server of the agent and the CA runs (with the [`Intake`] that stops it when the
//! agent drains).

pub mod client;
pub mod server;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{header, HeaderValue, Response, Version};
use hyper_util::server::graceful::GracefulConnection;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A plain listener with `SO_REUSEADDR`, so a restarted agent binds at once.
pub fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Where an accept loop takes its connections from: a [`TcpListener`], or a stand-in
/// that fails on demand in tests.
pub trait Accept: Send + Sync {
    type Stream;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// How long an accept loop waits after the kernel refused an accept (out of file
/// descriptors, mostly) before trying again: connections must close before another can
/// be taken, and retrying at once would spin a core while the backlog stays full.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the accept loops of one process share: the signal to stop taking connections
/// (the agent is draining: its successor took its listeners, or it was told to stop), and
/// the connections taken so far, which draining waits for.
#[derive(Clone, Default)]
pub struct Intake {
    pub stop: CancellationToken,
    pub live: TaskTracker,
}

impl Intake {
    /// The drain as one HTTP connection served request by request takes part in it.
    pub fn connection_drain(&self) -> ConnectionDrain {
        ConnectionDrain {
            stop: self.stop.clone(),
            seen: Arc::default(),
        }
    }
}

/// One served HTTP connection's part in a drain, so that its client moves to the agent's
/// successor without an error: HTTP/2 gets `GOAWAY` (streams in flight finish, the client
/// opens new ones elsewhere); HTTP/1 answers given while draining say `connection:
/// close`, and an idle HTTP/1 connection is not closed early, since its client may be
/// sending on it at that instant (Envoy drains HTTP/1 the same way). The drain's
/// deadline ends what is left.
#[derive(Clone)]
pub struct ConnectionDrain {
    stop: CancellationToken,
    /// The HTTP version of the connection's requests: 0 none yet, 1 HTTP/1, 2 HTTP/2.
    seen: Arc<AtomicU8>,
}

impl ConnectionDrain {
    /// For a connection no drain reaches (an in-memory one whose client drains first).
    pub fn never() -> ConnectionDrain {
        Intake::default().connection_drain()
    }

    /// Records a request's version and, while draining, asks an HTTP/1 client to take its
    /// next request elsewhere.
    pub fn answer<B>(&self, version: Version, response: &mut Response<B>) {
        let http2 = version == Version::HTTP_2;
        self.seen
            .store(if http2 { 2 } else { 1 }, Ordering::Relaxed);
        if !http2 && self.stop.is_cancelled() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Serves an HTTP connection to its end, taking part in the drain as [`ConnectionDrain`]
/// says; each answer must pass through [`ConnectionDrain::answer`].
pub async fn serve_until_drained<C>(connection: C, drain: ConnectionDrain) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => return served,
        () = drain.stop.cancelled() => {
            // HTTP/2, or nothing asked yet: nothing is lost by closing gracefully now.
            if drain.seen.load(Ordering::Relaxed) != 1 {
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    connection.await
}

/// Accepts connections on `listener` and hands each to `handle` on its own task, tracked
/// by `intake`, until `intake` says stop; a failed accept is logged and retried after
/// [`ACCEPT_BACKOFF`], never fatal. The listener is dropped when the loop ends, but the
/// socket stays open as long as another descriptor of it does (one kept for a successor).
pub async fn accept_loop<L, F, Fut>(name: &'static str, listener: L, intake: Intake, handle: F)
where
    L: Accept,
    F: Fn(L::Stream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            () = intake.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                intake.live.spawn(handle(stream, peer));
            }
            Err(err) => {
                tracing::warn!("{name} accept: {err}; pausing {ACCEPT_BACKOFF:?}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Instant,
    };

    use super::*;

    /// Fails its first `failures` accepts as the kernel does out of descriptors, then
    /// waits for ever; records when it was asked.
    struct Exhausted {
        failures: usize,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl Accept for Exhausted {
        type Stream = ();
        async fn accept(&self) -> io::Result<((), SocketAddr)> {
            let call = {
                let mut calls = self.calls.lock().expect("calls");
                calls.push(Instant::now());
                calls.len()
            };
            if call <= self.failures {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_failing_accept_is_retried_after_a_pause_not_at_once() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let listener = Exhausted {
            failures: 3,
            calls: calls.clone(),
        };
        let looping = tokio::spawn(accept_loop(
            "test",
            listener,
            Intake::default(),
            |(), _| async {},
        ));
        // Three failures, then the fourth accept waits for ever: the loop kept going.
        // Waited for, not timed: a loaded machine may take longer than three pauses.
        let deadline = Instant::now() + Duration::from_secs(10);
        while calls.lock().expect("calls").len() < 4 {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                calls.lock().expect("calls")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        looping.abort();
        let calls = calls.lock().expect("calls").clone();
        assert_eq!(calls.len(), 4, "{calls:?}");
        for pair in calls.windows(2) {
            assert!(pair[1] - pair[0] >= ACCEPT_BACKOFF, "{calls:?}");
        }
    }
}
