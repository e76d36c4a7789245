//! The source side of HBONE, as Istio ambient carries traffic between node agents: one
//! HTTP/2 `CONNECT` stream per proxied connection, over mutual TLS 1.3 to port 15008 of
//! the destination's agent. The `:authority` is the endpoint `ip:port`; `Forwarded:
//! for="ip:port"` names the original client and `X-Mesh-Service` the Service it
//! addressed. TLS connections are pooled per (source identity, destination identity,
//! destination agent) and multiplexed, each carrying at most
//! [`STREAMS_PER_CONNECTION`]: a key has as many connections as its streams need, a new
//! one made once even under a burst. A connection left without streams is closed after
//! [`SPARE_IDLE_RELEASE`] while its key has others (what a burst left behind), and
//! after [`IDLE_RELEASE`] when it is the last.
//!
//! A connection is an identity claim that lasts only as long as both certificates: it is
//! not reused past [`usable_until`] (the earlier notAfter, less a margin) and is closed
//! when that instant comes, and [`HbonePool::retire_stale`] closes those whose identities
//! the current configuration no longer places there (the source's pods left this node,
//! the destination identity left that agent's node).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    identity::{
        certs::unix_now,
        spiffe::{facts, SpiffeId},
        tls::{sni_for, Identities, TlsError},
    },
    model::MeshState,
    proxy::{
        plan::{TunnelRequest, PROTOCOL_HEADER},
        socket,
    },
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
    /// The address connected from: this node's, once its Node object says it.
    from: Option<Ipv4Addr>,
}

/// A stream opened this close to the end of a connection's certificates would be cut
/// almost at once: such a connection is no longer reused.
pub const REUSE_MARGIN_SECS: i64 = 1;

/// Until when (UNIX seconds) a connection may stand for its identities: the earlier
/// notAfter of the certificate this end presented and of the one the peer presented.
pub fn usable_until(own_not_after: Option<i64>, peer_not_after: i64) -> i64 {
    own_not_after.map_or(peer_not_after, |own| own.min(peer_not_after))
}

/// Whether a pooled connection usable until `until` may carry a new stream at `now`.
pub fn reusable(now: i64, until: i64) -> bool {
    now + REUSE_MARGIN_SECS < until
}

/// Whether the current configuration still places the pooled connection's identities
/// where it goes: a local pod runs as `source`, and a pod of `destination` runs on the
/// node whose agent is `agent`.
pub fn identities_hold(
    state: &MeshState,
    trust_domain: &str,
    source: &SpiffeId,
    destination: &SpiffeId,
    agent: SocketAddrV4,
) -> bool {
    let identity =
        |w: &crate::model::Workload| SpiffeId::new(trust_domain, &w.namespace, &w.service_account);
    let source_here = state.local_workloads().any(|w| identity(w) == *source);
    let destination_there = state
        .workloads
        .values()
        .any(|w| identity(w) == *destination && state.node_ip(w) == Some(*agent.ip()));
    source_here && destination_there
}

/// How long from now until the UNIX second `until` (zero if it is past).
pub fn time_until(until: i64) -> Duration {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(until).unwrap_or(0));
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Streams one pooled connection carries at most (ztunnel's default too). Below the
/// receiving agent's limit, so that a stream is never queued behind that limit for as
/// long as the others stay open; and one TLS connection is one core's worth of
/// encryption, which more connections spread.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// A key's last pooled connection is closed once it has carried no stream for this long
/// (ztunnel's default too): traffic that comes back within it needs no new handshake.
pub const IDLE_RELEASE: Duration = Duration::from_secs(300);

/// A pooled connection its key has others besides is closed once it has carried no
/// stream for this long (checked this often, so up to twice as long): the connections a
/// burst needed do not hold memory and descriptors after it.
pub const SPARE_IDLE_RELEASE: Duration = Duration::from_secs(10);

/// A pooled connection: its generation, its sender, until when it stands for its
/// identities, the leases of its streams, and the task driving it (aborting it closes
/// the connection).
struct Pooled {
    generation: u64,
    sender: SendRequest<Bytes>,
    until: i64,
    streams: Arc<Semaphore>,
    driver: tokio::task::AbortHandle,
}

impl Pooled {
    fn idle(&self) -> bool {
        self.streams.available_permits() == STREAMS_PER_CONNECTION
    }
}

/// A stream's place on its pooled connection, given back when dropped: hold it for as
/// long as the stream is in use.
#[derive(Debug)]
pub struct StreamLease {
    _permit: OwnedSemaphorePermit,
}

/// What a stream needs from its pooled connection.
struct Lease {
    generation: u64,
    sender: SendRequest<Bytes>,
    lease: StreamLease,
}

/// One key's pooled connections, and the lock that makes a new handshake happen once.
/// Each connection put in the slot gets a new generation, so a caller clears only the
/// connection it saw fail (not one a concurrent caller has just made), and the task
/// driving a connection clears it when the connection ends.
#[derive(Default)]
struct Slot {
    pooled: Mutex<Vec<Pooled>>,
    generation: AtomicU64,
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn pooled(&self) -> MutexGuard<'_, Vec<Pooled>> {
        self.pooled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream on a pooled connection whose certificates leave it time to carry one and
    /// that has room for it.
    fn cached(&self) -> Option<Lease> {
        let now = unix_now();
        self.pooled()
            .iter()
            .filter(|p| reusable(now, p.until))
            .find_map(|p| {
                let permit = p.streams.clone().try_acquire_owned().ok()?;
                Some(Lease {
                    generation: p.generation,
                    sender: p.sender.clone(),
                    lease: StreamLease { _permit: permit },
                })
            })
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn put(&self, pooled: Pooled) {
        self.pooled().push(pooled);
    }

    /// Forgets the connection of `generation`, if it is still pooled.
    fn clear(&self, generation: u64) {
        self.pooled().retain(|p| p.generation != generation);
    }

    /// Whether the connection of `generation` carries no stream.
    fn idle(&self, generation: u64) -> bool {
        self.pooled()
            .iter()
            .any(|p| p.generation == generation && p.idle())
    }

    /// Forgets the connection of `generation` if it carries no stream and has not for
    /// `idle_for`, long enough for its place in the slot; no stream can be leased on it
    /// once forgotten.
    fn release_idle(&self, generation: u64, idle_for: Duration) -> bool {
        let mut pooled = self.pooled();
        let limit = if pooled.len() > 1 {
            SPARE_IDLE_RELEASE
        } else {
            IDLE_RELEASE
        };
        let Some(index) = pooled.iter().position(|p| p.generation == generation) else {
            return false;
        };
        if !pooled[index].idle() || idle_for < limit {
            return false;
        }
        pooled.remove(index);
        true
    }

    /// Closes the pooled connections, streams and all.
    fn retire(&self) {
        for pooled in self.pooled().drain(..) {
            pooled.driver.abort();
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

    /// A stream's place on one of the slot's connections, made now unless one has room
    /// (or a concurrent caller made one while this one waited).
    async fn lease(&self, key: &PoolKey, slot: &Arc<Slot>) -> Result<Lease, PoolError> {
        if let Some(cached) = slot.cached() {
            return Ok(cached);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(cached) = slot.cached() {
            return Ok(cached);
        }
        let agent = key.agent;
        let (sender, connection, until) = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(key))
            .await
            .map_err(|_| PoolError::Timeout {
                agent,
                timeout: CONNECT_TIMEOUT,
            })??;
        let generation = slot.next_generation();
        let driver = slot.clone();
        let task = tokio::spawn(async move {
            let mut idle_check = tokio::time::interval_at(
                tokio::time::Instant::now() + SPARE_IDLE_RELEASE,
                SPARE_IDLE_RELEASE,
            );
            let expiry = tokio::time::sleep(time_until(until));
            tokio::pin!(connection, expiry);
            let mut idle_since = None;
            loop {
                tokio::select! {
                    ended = &mut connection => {
                        if let Err(err) = ended {
                            tracing::debug!("HBONE connection to {agent}: {err}");
                        }
                        break;
                    }
                    () = &mut expiry => {
                        tracing::debug!(
                            "HBONE connection to {agent} closed: a certificate it was made with expired"
                        );
                        break;
                    }
                    now = idle_check.tick() => {
                        if !driver.idle(generation) {
                            idle_since = None;
                            continue;
                        }
                        let idle_for = now.duration_since(*idle_since.get_or_insert(now));
                        if driver.release_idle(generation, idle_for) {
                            tracing::debug!("HBONE connection to {agent} closed: no stream for {idle_for:?}");
                            return;
                        }
                    }
                }
            }
            driver.clear(generation);
        });
        let streams = Arc::new(Semaphore::new(STREAMS_PER_CONNECTION));
        let lease = StreamLease {
            _permit: streams
                .clone()
                .try_acquire_owned()
                .expect("a new connection has room for a stream"),
        };
        slot.put(Pooled {
            generation,
            sender: sender.clone(),
            until,
            streams,
            driver: task.abort_handle(),
        });
        Ok(Lease {
            generation,
            sender,
            lease,
        })
    }

    /// Closes the pooled connections whose identities `hold` no longer accepts (source,
    /// destination, agent), streams and all.
    pub fn retire_stale(&self, hold: impl Fn(&SpiffeId, &SpiffeId, SocketAddrV4) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|key, slot| {
            let keep = hold(&key.source, &key.destination, key.agent);
            if !keep {
                tracing::info!(
                    "closing HBONE connections to {} as {} for {}: the configuration no longer places these identities there",
                    key.agent,
                    key.source,
                    key.destination
                );
                slot.retire();
            }
            keep
        });
    }

    async fn connect(
        &self,
        key: &PoolKey,
    ) -> Result<
        (
            SendRequest<Bytes>,
            h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Bytes>,
            i64,
        ),
        PoolError,
    > {
        let agent = key.agent;
        // The certificate presented is the one current during the handshake: the earlier
        // notAfter of those current before and after it bounds it even across a rotation.
        let own = || self.identities.get(&key.source).map(|s| s.facts.not_after);
        let own_before = own();
        let config = self
            .identities
            .client_config(&key.source, &key.destination)
            .map_err(|source| PoolError::Tls { agent, source })?;
        let name =
            ServerName::try_from(sni_for(&key.destination)).map_err(|_| PoolError::ServerName {
                destination: key.destination.clone(),
            })?;
        // From this node's own address: the receiving agent checks that the client pod
        // runs on the node it is connected from.
        let tcp = match key.from {
            Some(from) => socket::connect_from(from, agent).await,
            None => socket::connect(agent).await,
        }
        .map_err(|source| PoolError::Connect { agent, source })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| PoolError::Connect { agent, source })?;
        let own_not_after = match (own_before, own()) {
            (Some(before), Some(after)) => Some(before.min(after)),
            (before, after) => before.or(after),
        };
        // A certificate that verified parses; were it not to, the connection is not used.
        let peer_not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| facts(leaf).ok())
            .map_or(0, |f| f.not_after);
        let until = usable_until(own_not_after, peer_not_after);
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake(tls)
            .await
            .map_err(|source| PoolError::Handshake { agent, source })?;
        Ok((sender, connection, until))
    }

    /// Opens a stream to `request.target` through the agent at `agent` (connecting from
    /// this node's address `from`, when known), as `source`, requiring the agent to prove
    /// `destination`.
    pub async fn open(
        &self,
        agent: SocketAddrV4,
        from: Option<Ipv4Addr>,
        source: &SpiffeId,
        destination: &SpiffeId,
        request: &TunnelRequest,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamLease), PoolError> {
        let key = PoolKey {
            source: source.clone(),
            destination: destination.clone(),
            agent,
            from,
        };
        let slot = self.slot(&key);
        let first = self.lease(&key, &slot).await?;
        let generation = first.generation;
        match send_connect(agent, first.sender, request).await {
            Err(err) if !err.is_answer() => {
                // The pooled connection went away since it was last used: one fresh try.
                tracing::debug!("HBONE to {agent}: {err}; reconnecting");
                slot.clear(generation);
                let again = self.lease(&key, &slot).await?;
                let (send, recv) = send_connect(agent, again.sender, request).await?;
                Ok((send, recv, again.lease))
            }
            opened => opened.map(|(send, recv)| (send, recv, first.lease)),
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
    if request.http {
        builder = builder.header(PROTOCOL_HEADER, "http");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection over an in-memory HTTP/2 connection.
    async fn pooled(generation: u64) -> Pooled {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut connection) = h2::server::handshake(server).await {
                while connection.accept().await.is_some() {}
            }
        });
        let (sender, connection) = h2::client::handshake(client)
            .await
            .expect("HTTP/2 over an in-memory pipe");
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Pooled {
            generation,
            sender,
            until: unix_now() + 3600,
            streams: Arc::new(Semaphore::new(STREAMS_PER_CONNECTION)),
            driver: driver.abort_handle(),
        }
    }

    #[tokio::test]
    async fn a_full_connection_leases_no_more_streams_until_one_ends() {
        let slot = Slot::default();
        slot.put(pooled(1).await);
        let mut leases: Vec<Lease> = (0..STREAMS_PER_CONNECTION)
            .map(|_| slot.cached().expect("room on the connection"))
            .collect();
        assert!(slot.cached().is_none(), "the connection is full");
        leases.pop();
        assert_eq!(slot.cached().map(|l| l.generation), Some(1));
    }

    #[tokio::test]
    async fn streams_past_a_full_connection_go_to_the_next_one() {
        let slot = Slot::default();
        slot.put(pooled(1).await);
        slot.put(pooled(2).await);
        let leases: Vec<Lease> = (0..STREAMS_PER_CONNECTION + 1)
            .map(|_| slot.cached().expect("room on some connection"))
            .collect();
        assert_eq!(leases[STREAMS_PER_CONNECTION - 1].generation, 1);
        assert_eq!(leases[STREAMS_PER_CONNECTION].generation, 2);
    }

    #[tokio::test]
    async fn only_a_connection_without_streams_is_released() {
        let slot = Slot::default();
        slot.put(pooled(1).await);
        let lease = slot.cached().expect("room on the connection");
        assert!(!slot.idle(1));
        assert!(
            !slot.release_idle(1, IDLE_RELEASE),
            "a stream is open on it"
        );
        drop(lease);
        assert!(slot.idle(1));
        assert!(
            !slot.release_idle(1, SPARE_IDLE_RELEASE),
            "the last connection stays longer"
        );
        assert!(slot.release_idle(1, IDLE_RELEASE));
        assert!(
            slot.cached().is_none(),
            "a released connection leases nothing"
        );
    }

    #[tokio::test]
    async fn a_spare_connection_goes_sooner_than_the_last() {
        let slot = Slot::default();
        slot.put(pooled(1).await);
        slot.put(pooled(2).await);
        assert!(!slot.release_idle(2, SPARE_IDLE_RELEASE / 2));
        assert!(slot.release_idle(2, SPARE_IDLE_RELEASE));
        assert!(
            !slot.release_idle(1, SPARE_IDLE_RELEASE),
            "now the last one"
        );
        assert_eq!(slot.cached().map(|l| l.generation), Some(1));
    }

    const TD: &str = "cluster.local";

    fn state(node: &str) -> MeshState {
        let yaml = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.200.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.200.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 10.244.1.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: web}
status: {podIP: 10.244.2.10, phase: Running}
";
        let config = crate::config::load_str(std::path::Path::new("test.yaml"), yaml);
        MeshState::build(node, &config)
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TD, "shop", sa)
    }

    const NODE_B: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 200, 0, 2), 15008);
    const NODE_A: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 200, 0, 1), 15008);

    #[test]
    fn a_connection_stands_until_the_earlier_certificate_expires() {
        assert_eq!(usable_until(Some(1_000), 2_000), 1_000, "ours first");
        assert_eq!(usable_until(Some(3_000), 2_000), 2_000, "the peer's first");
        assert_eq!(
            usable_until(None, 2_000),
            2_000,
            "no certificate of ours known: the peer's bounds it"
        );
    }

    #[test]
    fn a_pooled_connection_is_not_reused_in_its_last_second() {
        assert!(reusable(100, 102));
        assert!(
            !reusable(101, 102),
            "a stream would be cut within the second"
        );
        assert!(!reusable(102, 102));
        assert!(!reusable(200, 102), "expired");
    }

    #[test]
    fn time_until_a_past_instant_is_zero() {
        assert_eq!(time_until(0), Duration::ZERO);
        assert_eq!(time_until(unix_now() - 10), Duration::ZERO);
        let ahead = time_until(unix_now() + 100);
        assert!(ahead > Duration::from_secs(98) && ahead <= Duration::from_secs(100));
    }

    #[test]
    fn identities_hold_while_the_configuration_places_them_there() {
        let here = state("node-a");
        assert!(identities_hold(
            &here,
            TD,
            &id("client"),
            &id("web"),
            NODE_B
        ));
        assert!(
            !identities_hold(&here, TD, &id("client"), &id("web"), NODE_A),
            "web runs on node-b, not behind node-a's agent"
        );
        assert!(
            !identities_hold(&here, TD, &id("web"), &id("web"), NODE_B),
            "no pod of node-a runs as web"
        );
        let elsewhere = state("node-b");
        assert!(
            !identities_hold(&elsewhere, TD, &id("client"), &id("web"), NODE_B),
            "the client's pod is not on this node"
        );
    }
}
