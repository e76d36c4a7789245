//! The agent's HTTP plumbing: the one HTTP client (CA, JWKS, meshctl), the small servers
//! for metrics, readiness and admin, and the plain listener they bind.

pub mod client;
pub mod server;

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// A plain listener with `SO_REUSEADDR`, so a restarted agent binds at once.
pub fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
