//! The agent's HTTP plumbing: the one HTTP client (CA, JWKS, meshctl), the small servers
//! for metrics, readiness and admin, the plain listener they bind, and the accept loop
//! every server of the agent and the CA runs (with the [`Intake`] that stops it when the
//! agent drains).

pub mod client;
pub mod server;

use std::{future::Future, io, net::SocketAddr, time::Duration};

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
    /// Whether connections served request by request should close after the current
    /// request (HTTP/1.1 `Connection: close`, HTTP/2 `GOAWAY`).
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.clone().cancelled_owned()
    }
}

/// Serves an HTTP connection to its end; if `draining` comes first, asks it to finish
/// gracefully (HTTP/1.1 closes after the response in flight, HTTP/2 sends `GOAWAY` and
/// lets its streams end), so clients move to the agent's successor without an error.
pub async fn serve_until_drained<C>(
    connection: C,
    draining: impl Future<Output = ()>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(connection, draining);
    tokio::select! {
        served = connection.as_mut() => return served,
        () = &mut draining => connection.as_mut().graceful_shutdown(),
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
