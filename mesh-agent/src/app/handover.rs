//! Replacing a node's agent without refusing a connection, as Envoy's hot restart does:
//! the new agent, once ready, asks the running one over a unix socket for its listening
//! sockets (passed with `SCM_RIGHTS`), so the same sockets — their queues of connections
//! not yet accepted included — go on with the new process; the old one stops accepting,
//! tells its HTTP clients to reconnect and drains its live connections.
//!
//! The exchange, one line each way and the descriptors:
//! successor → `mesh-agent handover 1`; agent → `listeners capture tunnel metrics ready
//! admin` with the five descriptors in that order; successor → `taken`. Only a process of
//! the agent's own user may ask (`SO_PEERCRED`), and the socket lives in a directory only
//! the agent mounts; a pod never reaches it.

use std::{
    io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write},
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_common::{ADMIN_PORT, METRICS_PORT, OUTBOUND_CAPTURE_PORT, READY_PORT, TUNNEL_PORT};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::{http::listener, proxy::socket};

const REQUEST: &str = "mesh-agent handover 1";
const TAKEN: &str = "taken";
/// The listeners in the order they are passed.
const NAMES: [&str; 5] = ["capture", "tunnel", "metrics", "ready", "admin"];
/// How long either side waits for the other's next line: both are local processes.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("the running agent answered {answer:?}, not its listeners")]
    Answer { answer: String },
    #[error("the running agent passed {count} descriptors, not {}", NAMES.len())]
    Descriptors { count: usize },
    #[error("the {name} descriptor is not a TCP listener on port {port}")]
    NotTheListener { name: &'static str, port: u16 },
}

/// The agent's listening sockets.
pub struct Listeners {
    pub capture: TcpListener,
    pub tunnel: TcpListener,
    pub metrics: TcpListener,
    pub ready: TcpListener,
    pub admin: TcpListener,
}

/// Where each listener is bound, in [`NAMES`] order.
pub fn addresses() -> [SocketAddr; 5] {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    [
        any(OUTBOUND_CAPTURE_PORT),
        any(TUNNEL_PORT),
        any(METRICS_PORT),
        any(READY_PORT),
        SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)),
    ]
}

impl Listeners {
    /// Binds every listener afresh (no agent ran, or it ended without handing over).
    pub fn bind() -> anyhow::Result<Listeners> {
        use anyhow::Context;
        let [capture, tunnel, metrics, ready, admin] = addresses();
        let plain = |addr: SocketAddr| listener(addr).with_context(|| format!("binding {addr}"));
        Ok(Listeners {
            capture: socket::transparent_listener(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                capture.port(),
            ))
            .with_context(|| format!("binding the capture listener on {capture}"))?,
            tunnel: plain(tunnel)?,
            metrics: plain(metrics)?,
            ready: plain(ready)?,
            admin: plain(admin)?,
        })
    }

    fn in_order(&self) -> [&TcpListener; 5] {
        [
            &self.capture,
            &self.tunnel,
            &self.metrics,
            &self.ready,
            &self.admin,
        ]
    }

    /// Descriptors of the same sockets, kept to hand over after the accept loops that
    /// own these are gone.
    pub fn duplicates(&self) -> io::Result<Vec<OwnedFd>> {
        self.in_order()
            .into_iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect()
    }

    /// Listeners from passed descriptors, each checked to be the socket listening at its
    /// address: a descriptor in the wrong place would serve one port's traffic as another's.
    fn from_descriptors(
        fds: Vec<OwnedFd>,
        expected: [SocketAddr; 5],
    ) -> Result<Listeners, HandoverError> {
        if fds.len() != NAMES.len() {
            return Err(HandoverError::Descriptors { count: fds.len() });
        }
        let mut listeners = Vec::with_capacity(NAMES.len());
        for ((fd, name), addr) in fds.into_iter().zip(NAMES).zip(expected) {
            let wrong = || HandoverError::NotTheListener {
                name,
                port: addr.port(),
            };
            let std = std::net::TcpListener::from(fd);
            let sock = socket2::SockRef::from(&std);
            let listening = sock.is_listener().unwrap_or(false)
                && sock.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr);
            if !listening {
                return Err(wrong());
            }
            std.set_nonblocking(true).map_err(|_| wrong())?;
            listeners.push(TcpListener::from_std(std).map_err(|_| wrong())?);
        }
        let mut listeners = listeners.into_iter();
        let mut next = || {
            listeners
                .next()
                .ok_or(HandoverError::Descriptors { count: 0 })
        };
        Ok(Listeners {
            capture: next()?,
            tunnel: next()?,
            metrics: next()?,
            ready: next()?,
            admin: next()?,
        })
    }
}

/// The running agent's handover socket, if one answers at `path`.
pub fn find_predecessor(path: &Path) -> Option<UnixStream> {
    UnixStream::connect(path).ok()
}

/// Takes the listeners of the agent at the other end of `predecessor` (bound at
/// `expected`, [`addresses`] but in tests); from the moment this returns, the caller must
/// accept on them (the predecessor no longer does).
pub async fn take_over(
    predecessor: UnixStream,
    path: &Path,
    expected: [SocketAddr; 5],
) -> Result<Listeners, HandoverError> {
    let socket_error = |source| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    let fds = tokio::task::spawn_blocking(move || receive_listeners(predecessor))
        .await
        .map_err(|e| socket_error(io::Error::other(e)))?
        .map_err(|e| match e {
            Received::Io(source) => socket_error(source),
            Received::Refused(err) => err,
        })?;
    Listeners::from_descriptors(fds, expected)
}

enum Received {
    Io(io::Error),
    Refused(HandoverError),
}

impl From<io::Error> for Received {
    fn from(err: io::Error) -> Received {
        Received::Io(err)
    }
}

fn receive_listeners(stream: UnixStream) -> Result<Vec<OwnedFd>, Received> {
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    (&stream).write_all(format!("{REQUEST}\n").as_bytes())?;
    let mut line = [0u8; 256];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut line)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = message {
            fds.extend(passed);
        }
    }
    let answer = String::from_utf8_lossy(&line[..received.bytes.min(line.len())])
        .trim_end()
        .to_owned();
    if answer != format!("listeners {}", NAMES.join(" ")) {
        return Err(Received::Refused(HandoverError::Answer { answer }));
    }
    (&stream).write_all(format!("{TAKEN}\n").as_bytes())?;
    Ok(fds)
}

/// Offers `listeners` (descriptors from [`Listeners::duplicates`]) at `path` until a
/// successor takes them; then cancels `taken`. Replaces a socket file left at `path` by
/// an agent that is gone.
pub async fn offer(
    path: PathBuf,
    listeners: Vec<OwnedFd>,
    taken: CancellationToken,
) -> Result<(), HandoverError> {
    let socket_error = |source| HandoverError::Socket {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(socket_error)?;
    }
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(socket_error(err)),
        _ => {}
    }
    let server = UnixListener::bind(&path).map_err(socket_error)?;
    let listeners = std::sync::Arc::new(listeners);
    loop {
        let (stream, _) = match server.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("handover socket {}: {err}", path.display());
                tokio::time::sleep(crate::http::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let stream = stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        });
        let passing = listeners.clone();
        let handed = tokio::task::spawn_blocking(move || hand_over(stream?, &passing))
            .await
            .map_err(io::Error::other)
            .and_then(|handed| handed);
        match handed {
            Ok(()) => {
                tracing::info!("listeners handed over to the successor; draining");
                taken.cancel();
                return Ok(());
            }
            Err(err) => tracing::warn!(
                "handover on {} not completed, still serving: {err}",
                path.display()
            ),
        }
    }
}

fn hand_over(stream: UnixStream, listeners: &[OwnedFd]) -> io::Result<()> {
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    if peer.uid != rustix::process::geteuid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "asked by pid {} of uid {}, not of this agent's user",
                peer.pid.as_raw_nonzero(),
                peer.uid.as_raw()
            ),
        ));
    }
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    expect_line(&mut reader, REQUEST)?;
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|fd| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptors"));
    }
    let answer = format!("listeners {}\n", NAMES.join(" "));
    sendmsg(
        &stream,
        &[IoSlice::new(answer.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io::Error::from)?;
    // Until the successor says it holds them, this agent keeps accepting: a successor
    // that died on the way must not leave the ports unserved.
    expect_line(&mut reader, TAKEN)
}

fn expect_line(reader: &mut impl BufRead, expected: &str) -> io::Result<()> {
    let mut line = String::new();
    reader.by_ref().take(256).read_line(&mut line)?;
    if line.trim_end() == expected {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected {expected:?}, got {:?}", line.trim_end()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn loopback_listeners() -> (Listeners, [SocketAddr; 5]) {
        let mut bound = Vec::new();
        for _ in NAMES {
            bound.push(
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .await
                    .expect("bind"),
            );
        }
        let addresses: Vec<SocketAddr> = bound
            .iter()
            .map(|l| l.local_addr().expect("address"))
            .collect();
        let mut bound = bound.into_iter();
        let mut next = || bound.next().expect("five");
        let listeners = Listeners {
            capture: next(),
            tunnel: next(),
            metrics: next(),
            ready: next(),
            admin: next(),
        };
        (listeners, addresses.try_into().expect("five addresses"))
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mesh-handover-{}-{name}.sock", std::process::id()))
    }

    #[tokio::test]
    async fn a_successor_takes_the_listeners_with_the_connections_queued_on_them() {
        let (listeners, addresses) = loopback_listeners().await;
        let path = socket_path("queued");
        let taken = CancellationToken::new();
        let offered = tokio::spawn(offer(
            path.clone(),
            listeners.duplicates().expect("duplicates"),
            taken.clone(),
        ));
        // The old agent's accept loops are gone; its sockets stay open through the copies.
        drop(listeners);
        // Connected before the handover, accepted by nobody yet: it waits in the queue.
        let mut queued = tokio::net::TcpStream::connect(addresses[1])
            .await
            .expect("connect");
        queued.write_all(b"ping").await.expect("write");

        let predecessor = loop {
            if let Some(stream) = find_predecessor(&path) {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let successor = take_over(predecessor, &path, addresses)
            .await
            .expect("taken over");
        tokio::time::timeout(Duration::from_secs(10), taken.cancelled())
            .await
            .expect("the old agent learns it was replaced");
        offered.await.expect("joined").expect("offered");

        let (mut accepted, _) = successor.tunnel.accept().await.expect("accept");
        let mut ping = [0; 4];
        accepted.read_exact(&mut ping).await.expect("read");
        assert_eq!(&ping, b"ping");
        accepted.write_all(b"pong").await.expect("write");
        queued.read_exact(&mut ping).await.expect("read");
        assert_eq!(&ping, b"pong");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn descriptors_of_other_sockets_are_refused_by_name() {
        let (listeners, mut addresses) = loopback_listeners().await;
        addresses.swap(2, 3);
        let err = Listeners::from_descriptors(listeners.duplicates().expect("dup"), addresses)
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            format!(
                "the metrics descriptor is not a TCP listener on port {}",
                addresses[2].port()
            )
        );
        let err = Listeners::from_descriptors(Vec::new(), addresses)
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            "the running agent passed 0 descriptors, not 5"
        );
    }
}
