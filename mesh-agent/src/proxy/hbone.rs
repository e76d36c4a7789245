//! HBONE, as Istio ambient carries traffic between node agents: one HTTP/2 `CONNECT`
//! stream per proxied connection, over mutual TLS 1.3 on port 15008. The `:authority` is
//! the original destination `ip:port`; `Forwarded: for="ip:port"` names the original
//! client and `X-Mesh-Service` the Service it addressed. TLS connections are pooled per
//! (source identity, destination identity, destination agent) and multiplexed.

use std::{
    collections::HashMap,
    io,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use bytes::{Bytes, BytesMut};
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};

use super::{
    inbound::{Admission, Arrival, Guard},
    socket,
};
use crate::{
    identity::{
        spiffe::SpiffeId,
        tls::{identity_from_sni, peer_identity, refusal_reason, sni_for, Identities},
    },
    model::SharedState,
    telemetry::{
        conns::{flow_key, ConnTable},
        metrics::Metrics,
    },
};

/// Flow-control windows sized for bulk transfers across a node boundary.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// What the source agent asks of the destination agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    /// The pod address and port to reach.
    pub target: SocketAddrV4,
    /// The original client, whose address the destination pod must see.
    pub client: SocketAddrV4,
    /// The Service the client addressed, when it addressed one.
    pub service: Option<String>,
}

fn other(message: impl Into<String>) -> io::Error {
    io::Error::other(message.into())
}

fn h2_error(err: h2::Error) -> io::Error {
    match err.into_io() {
        Some(io) => io,
        None => other("HTTP/2 stream error"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    agent: SocketAddrV4,
}

/// Pooled, multiplexed HBONE connections to other node agents.
pub struct HbonePool {
    identities: Arc<Identities>,
    connections: Mutex<HashMap<PoolKey, SendRequest<Bytes>>>,
}

impl HbonePool {
    pub fn new(identities: Arc<Identities>) -> HbonePool {
        HbonePool {
            identities,
            connections: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &PoolKey) -> Option<SendRequest<Bytes>> {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn forget(&self, key: &PoolKey) {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    async fn connect(&self, key: &PoolKey) -> io::Result<SendRequest<Bytes>> {
        let config = self
            .identities
            .client_config(&key.source, &key.destination)
            .map_err(|e| other(e.to_string()))?;
        let tcp = socket::connect(key.agent).await?;
        let name =
            ServerName::try_from(sni_for(&key.destination)).map_err(|e| other(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(1 << 20)
            .handshake(tls)
            .await
            .map_err(h2_error)?;
        let agent = key.agent;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                log::debug!("HBONE connection to {agent}: {err}");
            }
        });
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), sender.clone());
        Ok(sender)
    }

    /// Opens a stream to `request.target` through the agent at `agent`, as `source`,
    /// requiring the agent to prove `destination`.
    pub async fn open(
        &self,
        agent: SocketAddrV4,
        source: &SpiffeId,
        destination: &SpiffeId,
        request: &TunnelRequest,
    ) -> io::Result<(SendStream<Bytes>, RecvStream)> {
        let key = PoolKey {
            source: source.clone(),
            destination: destination.clone(),
            agent,
        };
        // A pooled connection may have gone away since it was last used: one fresh retry.
        for attempt in 0..2 {
            let sender = match self.cached(&key) {
                Some(sender) if attempt == 0 => sender,
                _ => self.connect(&key).await?,
            };
            match send_connect(sender, request).await {
                Ok(stream) => return Ok(stream),
                Err(err) if attempt == 0 && err.kind() != io::ErrorKind::PermissionDenied => {
                    log::debug!("HBONE to {agent}: {err}; reconnecting");
                    self.forget(&key);
                }
                Err(err) => return Err(err),
            }
        }
        Err(other("unreachable"))
    }
}

async fn send_connect(
    sender: SendRequest<Bytes>,
    request: &TunnelRequest,
) -> io::Result<(SendStream<Bytes>, RecvStream)> {
    let mut sender = sender.ready().await.map_err(h2_error)?;
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(request.target.to_string())
        .header("forwarded", format!("for=\"{}\"", request.client));
    if let Some(service) = &request.service {
        builder = builder.header("x-mesh-service", service);
    }
    let connect = builder.body(()).map_err(|e| other(e.to_string()))?;
    let (response, send) = sender.send_request(connect, false).map_err(h2_error)?;
    let response = response.await.map_err(h2_error)?;
    match response.status() {
        StatusCode::OK => Ok((send, response.into_body())),
        StatusCode::FORBIDDEN => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the destination agent refused {}: 403", request.target),
        )),
        status => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the destination agent answered {status} for {}",
                request.target
            ),
        )),
    }
}

/// Copies between a TCP connection and an HBONE stream until both directions end;
/// returns the bytes carried each way (TCP → stream, stream → TCP).
pub async fn splice<T: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut T,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<(u64, u64)> {
    let (mut reader, mut writer) = tokio::io::split(tcp);
    let upstream = async {
        // Read straight into a buffer whose filled part is handed to h2 without a copy;
        // once h2 has written a chunk, `reserve` takes the same allocation back.
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut total = 0u64;
        loop {
            buf.reserve(CHUNK);
            let n = reader.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_error)?;
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| other("HBONE stream closed"))?
                    .map_err(h2_error)?;
                let chunk = data.split_to(granted.min(data.len()));
                send.send_data(chunk, false).map_err(h2_error)?;
            }
        }
    };
    let downstream = async {
        let mut total = 0u64;
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(h2_error)?;
            writer.write_all(&chunk).await?;
            total += chunk.len() as u64;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        writer.shutdown().await?;
        Ok(total)
    };
    tokio::try_join!(upstream, downstream)
}

/// Serves HBONE on the tunnel port: TLS with the destination's certificate, then
/// `CONNECT` streams to local pods.
pub async fn serve(
    listener: TcpListener,
    identities: Arc<Identities>,
    state: SharedState,
    conns: Arc<ConnTable>,
    metrics: Arc<Metrics>,
    guard: Arc<Guard>,
) {
    let config = match identities.server_config() {
        Ok(config) => config,
        Err(err) => {
            log::error!("HBONE server: {err}");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("tunnel accept: {err}");
                continue;
            }
        };
        let (acceptor, identities, state, conns, metrics, guard) = (
            acceptor.clone(),
            identities.clone(),
            state.clone(),
            conns.clone(),
            metrics.clone(),
            guard.clone(),
        );
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(err) => {
                    let reason = refusal_reason(&err);
                    metrics.tunnel_refused(reason);
                    log::info!("HBONE from {peer} refused ({reason}): {err}");
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            let source = peer_identity(session.peer_certificates());
            let sni = session.server_name().map(str::to_owned);
            let local = sni
                .as_deref()
                .and_then(|sni| identity_from_sni(sni, &identities.trust_domain));
            let (Some(source), Some(local)) = (source, local) else {
                metrics.tunnel_refused("bad_certificate");
                return;
            };
            let mut connection = match h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(1 << 20)
                .handshake(tls)
                .await
            {
                Ok(connection) => connection,
                Err(err) => {
                    log::info!("HBONE from {peer}: {err}");
                    return;
                }
            };
            while let Some(stream) = connection.accept().await {
                let Ok((request, respond)) = stream else {
                    break;
                };
                let context = Stream {
                    source: source.clone(),
                    local: local.clone(),
                    sni: sni.clone(),
                    guard: guard.clone(),
                    state: state.clone(),
                    conns: conns.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(async move {
                    if let Err(err) = context.handle(request, respond).await {
                        log::info!("HBONE stream from {peer}: {err}");
                    }
                });
            }
        });
    }
}

/// Buffer between the tunnel stream and the HTTP server of a connection judged per
/// request.
const HTTP_PIPE_BYTES: usize = 64 * 1024;

struct Stream {
    source: SpiffeId,
    local: SpiffeId,
    sni: Option<String>,
    guard: Arc<Guard>,
    state: SharedState,
    conns: Arc<ConnTable>,
    metrics: Arc<Metrics>,
}

fn respond_with(
    respond: &mut h2::server::SendResponse<Bytes>,
    status: StatusCode,
) -> io::Result<SendStream<Bytes>> {
    let response = Response::builder()
        .status(status)
        .body(())
        .map_err(|e| other(e.to_string()))?;
    respond
        .send_response(response, status != StatusCode::OK)
        .map_err(h2_error)
}

impl Stream {
    fn refuse(
        &self,
        respond: &mut h2::server::SendResponse<Bytes>,
        status: StatusCode,
        reason: &'static str,
        message: String,
    ) -> io::Error {
        self.metrics.tunnel_refused(reason);
        let _ = respond_with(respond, status);
        io::Error::new(io::ErrorKind::PermissionDenied, message)
    }

    async fn handle(
        self,
        request: Request<RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) -> io::Result<()> {
        let target: Option<SocketAddrV4> = request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok());
        let client: Option<SocketAddrV4> = request
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("for=\""))
            .and_then(|v| v.strip_suffix('"'))
            .and_then(|v| v.parse().ok());
        let service = request
            .headers()
            .get("x-mesh-service")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (Some(target), Some(client), true) =
            (target, client, request.method() == Method::CONNECT)
        else {
            return Err(self.refuse(
                &mut respond,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "malformed CONNECT".into(),
            ));
        };
        let state = self.state.current();
        let identity_of = |w: &crate::model::Workload| {
            SpiffeId::new(&self.local.trust_domain, &w.namespace, &w.service_account)
        };
        let Some(workload) = state
            .workloads
            .get(target.ip())
            .filter(|w| w.node == state.node)
            .cloned()
        else {
            return Err(self.refuse(
                &mut respond,
                StatusCode::NOT_FOUND,
                "unknown_destination",
                format!("{target} is not a meshed pod of this node"),
            ));
        };
        if identity_of(&workload) != self.local {
            return Err(self.refuse(
                &mut respond,
                StatusCode::FORBIDDEN,
                "wrong_destination_identity",
                format!(
                    "{target} is {}, but the connection was made to {}",
                    identity_of(&workload),
                    self.local
                ),
            ));
        }
        // The peer's certificate must be the identity of the workload at the address it
        // claims to connect from.
        let claimed = state.workloads.get(client.ip()).map(|w| identity_of(w));
        if claimed.as_ref() != Some(&self.source) {
            return Err(self.refuse(
                &mut respond,
                StatusCode::FORBIDDEN,
                "wrong_source_identity",
                format!(
                    "peer {} claims to carry {client}, which is {}",
                    self.source,
                    claimed.map_or("no meshed workload".into(), |c| c.to_string())
                ),
            ));
        }
        let arrival = Arc::new(Arrival::new(
            workload.clone(),
            state.security_of(workload.ip),
            client,
            target,
            Some(self.source.to_string()),
            self.sni.clone(),
        ));
        let admission = self.guard.admit(&arrival);
        if let Admission::Deny(decision) = &admission {
            return Err(self.refuse(
                &mut respond,
                StatusCode::FORBIDDEN,
                "policy_denied",
                format!("{client} → {target}: {}", decision.reason()),
            ));
        }
        let mut upstream = match socket::connect_as(client, target).await {
            Ok(upstream) => upstream,
            Err(err) => {
                let _ = respond_with(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return Err(err);
            }
        };
        let server_key = flow_key(target, socket::v4(upstream.local_addr()?)?);
        self.conns.insert(server_key, Some(workload), service, true);
        let send = respond_with(&mut respond, StatusCode::OK)?;
        let result = match admission {
            Admission::Http => {
                let (mut tunnel_end, http_end) = tokio::io::duplex(HTTP_PIPE_BYTES);
                let guard = self.guard.clone();
                let serving = tokio::spawn(guard.serve_http(http_end, upstream, arrival));
                let spliced = splice(&mut tunnel_end, send, request.into_body()).await;
                if let Ok(Err(err)) = serving.await {
                    log::info!("HTTP from {client} to {target}: {err}");
                }
                spliced
            }
            _ => splice(&mut upstream, send, request.into_body()).await,
        };
        self.conns.finish(&server_key);
        let (to_client, from_client) = result?;
        log::debug!(
            target: "mesh::access",
            "inbound {client} → {target} source_principal={} destination_principal={} connection_security_policy=mutual_tls received={from_client} sent={to_client}",
            self.source,
            self.local
        );
        Ok(())
    }
}
