//! Delivery to a workload, written once for every arm that delivers: a same-node pod
//! (from the outbound capture), a DISABLE workload reached in plaintext, and a pod of
//! this node reached over HBONE. The workload is dialled (as the original client when it
//! is on this node), then the bytes are spliced in the kernel, copied, or served request
//! by request, as the plan says.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::{
    policy::facts::Arrival,
    proxy::{
        client_hello::HELLO_LIMIT,
        copy::{copy_streams, copy_to_tunnel, Counted, TunnelStream},
        error::ProxyError,
        plan::{opening_of, opens_http, Carry, Opening},
        requests::Exchange,
        socket, Proxy,
    },
    telemetry::{
        conns::flow_key,
        result::{Carried, ConnResult},
    },
};

/// The client's side of a delivered connection.
pub enum Downstream {
    /// The pod's socket, accepted by the capture listener.
    Socket(TcpStream),
    /// An HBONE stream from another node's agent, with the bytes already read from it.
    Tunnel {
        send: SendStream<Bytes>,
        recv: RecvStream,
        prefix: Bytes,
    },
}

/// How long a sniffed connection's first bytes are waited for (Istio's protocol
/// detection timeout was 100 ms): a server-first protocol, whose client sends nothing
/// first, is carried as bytes after it.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a TLS ClientHello that has begun may take to arrive whole (Envoy's listener
/// filters allow 15 s; a real client sends it in one go).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells whether `downstream` opens with an HTTP request ([`opens_http`]), from its first
/// bytes or their absence for [`SNIFF_TIMEOUT`]. A socket is only peeked at; a tunnel's
/// bytes read meanwhile travel on as its prefix.
async fn sniff(downstream: Downstream) -> Result<(bool, Downstream), ProxyError> {
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    match downstream {
        Downstream::Socket(client) => {
            let mut first = [0u8; 32];
            let http = loop {
                let peeked = tokio::time::timeout_at(deadline.into(), client.peek(&mut first));
                match peeked.await {
                    Err(_) => break false,
                    Ok(peeked) => match peeked? {
                        // Closed before a request: nothing to serve.
                        0 => break false,
                        length => match opens_http(&first[..length]) {
                            Some(http) => break http,
                            // A request line's start, the rest yet to come.
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        },
                    },
                }
            };
            Ok((http, Downstream::Socket(client)))
        }
        Downstream::Tunnel {
            send,
            mut recv,
            prefix,
        } => {
            let mut first = BytesMut::from(&prefix[..]);
            let http = loop {
                if let Some(http) = opens_http(&first) {
                    break http;
                }
                match tokio::time::timeout_at(deadline.into(), recv.data()).await {
                    Ok(Some(chunk)) => {
                        let chunk = chunk?;
                        let _ = recv.flow_control().release_capacity(chunk.len());
                        first.extend_from_slice(&chunk);
                    }
                    Ok(None) | Err(_) => break false,
                }
            };
            Ok((
                http,
                Downstream::Tunnel {
                    send,
                    recv,
                    prefix: first.freeze(),
                },
            ))
        }
    }
}

/// What a captured client's first bytes open with ([`opening_of`]), peeked (left in the
/// socket for whatever serves it), at most [`HELLO_LIMIT`] bytes. Nothing within
/// [`SNIFF_TIMEOUT`] is a server-first protocol (or a client holding back):
/// [`Opening::Other`]. Bytes that have begun but not finished an opening by then do not
/// lose their routes by going slowly: the start of a request line is served as HTTP (the
/// router answers 400 if it is not), and a TLS hello is waited for up to
/// [`HELLO_TIMEOUT`], then the connection is refused.
pub async fn read_opening(client: &TcpStream) -> Result<Opening, ProxyError> {
    let started = Instant::now();
    let mut first = vec![0u8; HELLO_LIMIT];
    let mut seen = 0;
    loop {
        let deadline = started
            + if seen == 0 {
                SNIFF_TIMEOUT
            } else {
                HELLO_TIMEOUT
            };
        let peeked = tokio::time::timeout_at(deadline.into(), client.peek(&mut first));
        let length = match peeked.await {
            Err(_) => return Ok(Opening::Other),
            Ok(peeked) => peeked?,
        };
        if length == 0 {
            return Ok(Opening::Other);
        }
        if let Some(opening) = opening_of(&first[..length]) {
            return Ok(opening);
        }
        seen = length;
        if started.elapsed() >= SNIFF_TIMEOUT && opens_http(&first[..length]).is_none() {
            return Ok(Opening::Http);
        }
        if started.elapsed() >= HELLO_TIMEOUT {
            return Err(ProxyError::Ended("a TLS ClientHello unfinished after 5 s"));
        }
        // A peek returns at once while bytes wait unread: the rest is waited for.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Dials the workload of `arrival`: as the original client (its address as the source)
/// when the workload is on this node, so it sees who called; from this node otherwise.
/// The socket's flow is recorded for the metrics to label.
pub async fn dial(
    arrival: &Arrival,
    service: Option<String>,
    mutual_tls: bool,
    as_client: Option<std::net::SocketAddrV4>,
    result: &mut ConnResult,
) -> Result<TcpStream, ProxyError> {
    let target =
        std::net::SocketAddrV4::new(arrival.facts.destination_ip, arrival.facts.destination_port);
    let connected = match as_client {
        Some(client) => socket::connect_as(client, target).await,
        None => socket::connect(target).await,
    };
    let upstream = connected.map_err(|source| ProxyError::Connect { target, source })?;
    if as_client.is_some() {
        let local = socket::v4(upstream.local_addr()?)?;
        result.track(
            flow_key(target, local),
            Some(arrival.workload.clone()),
            service,
            mutual_tls,
        );
    }
    Ok(upstream)
}

/// Carries `downstream` (`exchange` says where it came from and was headed) to the
/// workload on `upstream` as `carry` says.
pub async fn carry(
    proxy: &Proxy,
    arrival: Arc<Arrival>,
    carry: Carry,
    downstream: Downstream,
    mut upstream: TcpStream,
    exchange: Exchange,
    result: &mut ConnResult,
) -> Result<(), ProxyError> {
    let counts = result.bytes();
    let (carry, arrival, downstream) = match carry {
        Carry::Sniff => match sniff(downstream).await? {
            (true, downstream) => (Carry::Http, Arc::new(arrival.as_http()), downstream),
            (false, downstream) => (Carry::Copy, arrival, downstream),
        },
        carry => (carry, arrival, downstream),
    };
    match (carry, downstream) {
        (Carry::Http, Downstream::Socket(client)) => {
            result.set_carried(Carried::Http);
            let client = Counted::client(client, counts);
            proxy
                .guard
                .clone()
                .serve_http(
                    client,
                    upstream,
                    arrival,
                    exchange,
                    proxy.intake.connection_drain(),
                )
                .await
        }
        (Carry::Http, Downstream::Tunnel { send, recv, prefix }) => {
            result.set_carried(Carried::Http);
            let tunnel = TunnelStream::new(send, recv).read_ahead(prefix);
            proxy
                .guard
                .clone()
                .serve_http(
                    Counted::client(tunnel, counts),
                    upstream,
                    arrival,
                    exchange,
                    proxy.intake.connection_drain(),
                )
                .await
        }
        (Carry::Splice, Downstream::Socket(mut client)) => {
            if let Some(splicer) = &proxy.splicer {
                match splicer.splice(&client, &upstream) {
                    Ok(spliced) => {
                        let (sent, received, both) = spliced.run().await?;
                        counts.add(sent, received);
                        result.set_carried(if both {
                            Carried::Spliced
                        } else {
                            Carried::Copied
                        });
                        return Ok(());
                    }
                    Err(err) => tracing::debug!(
                        "splicing {}: {err}; copying instead",
                        arrival.workload.key()
                    ),
                }
            }
            result.set_carried(Carried::Copied);
            let mut client = Counted::client(&mut client, counts);
            copy_streams(&mut client, &mut upstream).await
        }
        (Carry::Copy | Carry::Sniff, Downstream::Socket(client)) => {
            result.set_carried(Carried::Copied);
            let mut client = Counted::client(client, counts);
            copy_streams(&mut client, &mut upstream).await
        }
        (Carry::Copy | Carry::Splice | Carry::Sniff, Downstream::Tunnel { send, recv, prefix }) => {
            result.set_carried(Carried::Copied);
            let mut workload = Counted::workload(upstream, counts);
            workload.write_all(&prefix).await?;
            copy_to_tunnel(&mut workload, send, recv).await
        }
    }
}
