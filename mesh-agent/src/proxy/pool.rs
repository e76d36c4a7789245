//! The source side of HBONE, as Istio ambient carries traffic between node agents: one
//! HTTP/2 `CONNECT` stream per proxied connection, over mutual TLS 1.3 to port 15008 of
//! the destination's agent. The `:authority` is the endpoint `ip:port`; `Forwarded:
//! for="ip:port"` names the original client and `X-Mesh-Service` the Service it
//! addressed. TLS connections are pooled per (source identity, destination identity,
//! destination agent), multiplexed, and made once per key even under a burst.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;

use crate::{
    identity::{
        spiffe::SpiffeId,
        tls::{sni_for, Identities, TlsError},
    },
    proxy::{plan::TunnelRequest, socket},
};

/// Flow-control windows sized for bulk transfers across a node boundary.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("TLS configuration for HBONE to {agent}")]
    Tls {
        agent: SocketAddrV4,
        source: TlsError,
    },
    #[error("{destination} is not a valid TLS server name")]
    ServerName { destination: SpiffeId },
    #[error("connecting to the agent at {agent}")]
    Connect {
        agent: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("HTTP/2 with the agent at {agent}")]
    Handshake {
        agent: SocketAddrV4,
        source: h2::Error,
    },
    #[error("the agent at {agent} did not complete a connection within {timeout:?}")]
    Timeout {
        agent: SocketAddrV4,
        timeout: Duration,
    },
    #[error("CONNECT to {target}")]
    Request {
        target: SocketAddrV4,
        source: http::Error,
    },
    #[error("the agent at {agent} refused {target}: {status}")]
    Refused {
        agent: SocketAddrV4,
        target: SocketAddrV4,
        status: StatusCode,
    },
}

impl PoolError {
    /// The destination decided (its policies, or what it knows of the target): asking
    /// again over a new connection would get the same answer.
    fn is_answer(&self) -> bool {
        matches!(self, PoolError::Refused { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    agent: SocketAddrV4,
}

/// One key's pooled connection, and the lock that makes its handshake happen once.
/// Each connection put in the slot gets a new generation, so a caller clears only the
/// connection it saw fail (not one a concurrent caller has just made), and the task
/// driving a connection clears it when the connection ends.
#[derive(Default)]
struct Slot {
    sender: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    generation: AtomicU64,
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn cached(&self) -> Option<(u64, SendRequest<Bytes>)> {
        self.sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn put(&self, sender: SendRequest<Bytes>) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, sender));
        generation
    }

    /// Forgets the connection of `generation`, if it is still the pooled one.
    fn clear(&self, generation: u64) {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if sender.as_ref().is_some_and(|(g, _)| *g == generation) {
            *sender = None;
        }
    }
}

/// How long a new connection to another agent may take (TCP, TLS and HTTP/2
/// handshakes), so that an agent that drops SYNs fails its callers quickly instead of
/// after the kernel's connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pooled, multiplexed HBONE connections to other node agents.
pub struct HbonePool {
    identities: Arc<Identities>,
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
}

impl HbonePool {
    pub fn new(identities: Arc<Identities>) -> HbonePool {
        HbonePool {
            identities,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// The slot's connection, made now unless one is pooled (or made by a concurrent
    /// caller while this one waited).
    async fn sender(
        &self,
        key: &PoolKey,
        slot: &Arc<Slot>,
    ) -> Result<(u64, SendRequest<Bytes>), PoolError> {
        if let Some(cached) = slot.cached() {
            return Ok(cached);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(cached) = slot.cached() {
            return Ok(cached);
        }
        let agent = key.agent;
        let (sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(key))
            .await
            .map_err(|_| PoolError::Timeout {
                agent,
                timeout: CONNECT_TIMEOUT,
            })??;
        let generation = slot.put(sender.clone());
        let driver = slot.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!("HBONE connection to {agent}: {err}");
            }
            driver.clear(generation);
        });
        Ok((generation, sender))
    }

    async fn connect(
        &self,
        key: &PoolKey,
    ) -> Result<
        (
            SendRequest<Bytes>,
            h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Bytes>,
        ),
        PoolError,
    > {
        let agent = key.agent;
        let config = self
            .identities
            .client_config(&key.source, &key.destination)
            .map_err(|source| PoolError::Tls { agent, source })?;
        let name =
            ServerName::try_from(sni_for(&key.destination)).map_err(|_| PoolError::ServerName {
                destination: key.destination.clone(),
            })?;
        let tcp = socket::connect(agent)
            .await
            .map_err(|source| PoolError::Connect { agent, source })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| PoolError::Connect { agent, source })?;
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake(tls)
            .await
            .map_err(|source| PoolError::Handshake { agent, source })
    }

    /// Opens a stream to `request.target` through the agent at `agent`, as `source`,
    /// requiring the agent to prove `destination`.
    pub async fn open(
        &self,
        agent: SocketAddrV4,
        source: &SpiffeId,
        destination: &SpiffeId,
        request: &TunnelRequest,
    ) -> Result<(SendStream<Bytes>, RecvStream), PoolError> {
        let key = PoolKey {
            source: source.clone(),
            destination: destination.clone(),
            agent,
        };
        let slot = self.slot(&key);
        let (generation, sender) = self.sender(&key, &slot).await?;
        match send_connect(agent, sender, request).await {
            Err(err) if !err.is_answer() => {
                // The pooled connection went away since it was last used: one fresh try.
                tracing::debug!("HBONE to {agent}: {err}; reconnecting");
                slot.clear(generation);
                let (_, sender) = self.sender(&key, &slot).await?;
                send_connect(agent, sender, request).await
            }
            opened => opened,
        }
    }
}

async fn send_connect(
    agent: SocketAddrV4,
    sender: SendRequest<Bytes>,
    request: &TunnelRequest,
) -> Result<(SendStream<Bytes>, RecvStream), PoolError> {
    let stream_error = |source| PoolError::Handshake { agent, source };
    let mut sender = sender.ready().await.map_err(stream_error)?;
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(request.target.to_string())
        .header("forwarded", format!("for=\"{}\"", request.client));
    if let Some(service) = &request.service {
        builder = builder.header("x-mesh-service", service);
    }
    let connect = builder.body(()).map_err(|source| PoolError::Request {
        target: request.target,
        source,
    })?;
    let (response, send) = sender.send_request(connect, false).map_err(stream_error)?;
    let response = response.await.map_err(stream_error)?;
    match response.status() {
        StatusCode::OK => Ok((send, response.into_body())),
        status => Err(PoolError::Refused {
            agent,
            target: request.target,
            status,
        }),
    }
}
