//! Socket construction for the proxy: the transparent capture listener, and upstream
//! connections that carry the original client's address as their source, so the server
//! pod sees who really called it (the replies come back to the agent because the tc
//! program hands packets of this 4-tuple to this socket).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use mesh_common::AGENT_MARK;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::model::circuit::Keepalive;

fn tcp_socket() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A listener that accepts connections for any destination address (`IP_TRANSPARENT`):
/// the accepted socket's local address is the connection's original destination.
pub fn transparent_listener(addr: SocketAddrV4) -> io::Result<TcpListener> {
    let socket = tcp_socket()?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?;
    // Accepted sockets inherit the mark: replies to pods count as mesh traffic.
    socket.set_mark(AGENT_MARK)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `dst` from `src` (an address of another host: the client pod's), keeping
/// the client's port when it is free and any port otherwise.
pub async fn connect_as(src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = tcp_socket()?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_mark(AGENT_MARK)?;
    if socket.bind(&SocketAddr::V4(src).into()).is_err() {
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(*src.ip(), 0)).into())?;
    }
    let stream = TcpSocket::from_std_stream(socket.into())
        .connect(dst.into())
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `dst` from this node's own addresses.
pub async fn connect(dst: SocketAddrV4) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `dst` from the address `src` of this host (any port).
pub async fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = tcp_socket()?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    let stream = TcpSocket::from_std_stream(socket.into())
        .connect(dst.into())
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Turns TCP keepalive on for `stream` with the settings a DestinationRule gives
/// (`tcpKeepalive`); what it leaves out keeps the kernel's value.
pub fn keep_alive(stream: &TcpStream, settings: Keepalive) -> io::Result<()> {
    let mut keepalive = TcpKeepalive::new();
    if let Some(time) = settings.time {
        keepalive = keepalive.with_time(time);
    }
    if let Some(interval) = settings.interval {
        keepalive = keepalive.with_interval(interval);
    }
    if let Some(probes) = settings.probes {
        keepalive = keepalive.with_retries(probes);
    }
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

pub fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(v6) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("IPv6 address {v6} is not supported yet"),
        )),
    }
}
