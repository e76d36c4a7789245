//! The destination side of HBONE (port 15008): mutual TLS with the certificate of the
//! identity the SNI names, then one HTTP/2 `CONNECT` stream per proxied connection.
//! [`plan_inbound`] checks both identities and the destination's policies; an accepted
//! stream is delivered to the local pod as the original client. A connection lives no
//! longer than the peer's certificate, nor past a configuration in which its identities
//! no longer hold ([`identities_hold`]): then it is closed, streams and all.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    http::accept_loop,
    identity::{
        spiffe::{facts, SpiffeId},
        tls::{identity_from_sni, peer_identity, refusal_reason},
    },
    model::{MeshState, Workload},
    proxy::{
        deliver::{self, Downstream},
        error::ProxyError,
        limits::PerSource,
        plan::{plan_inbound, Refusal, TunnelRequest},
        pool::{time_until, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW},
        requests::Exchange,
        Proxy,
    },
    telemetry::result::{ConnResult, Side},
};

/// A peer that has not finished its TLS handshake by then is dropped, so idle
/// connections cannot hold the port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer agent may have open at once on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 4096;
/// TLS connections one peer address may have open (or half open) at once. A peer agent
/// pools a connection per pair of identities it carries and per 100 streams of that pair
/// (`pool::STREAMS_PER_CONNECTION`), so even a busy node stays far below this; a client
/// holding handshakes open stops here, not at the fd limit.
const MAX_CONNECTIONS_PER_PEER: usize = 4096;
/// The largest header list a `CONNECT` needs, with room to spare.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How often a connection's identities are checked against the current configuration.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the current configuration still gives the connection's identities a place:
/// a pod of this node runs as `local` (the identity the peer connected to), and some
/// pod of the mesh runs as `source` (the peer's certificate).
pub fn identities_hold(
    state: &MeshState,
    trust_domain: &str,
    source: &SpiffeId,
    local: &SpiffeId,
) -> bool {
    let identity = |w: &Workload| SpiffeId::new(trust_domain, &w.namespace, &w.service_account);
    state.local_workloads().any(|w| identity(w) == *local)
        && state.workloads.values().any(|w| identity(w) == *source)
}

/// Serves HBONE until the listener fails.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    let config = match proxy.identities.server_config() {
        Ok(config) => config,
        Err(err) => {
            tracing::error!("HBONE server: {err}");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let peers = PerSource::new(MAX_CONNECTIONS_PER_PEER);
    let intake = proxy.intake.clone();
    accept_loop("tunnel", listener, intake, move |stream, peer| {
        let (acceptor, proxy) = (acceptor.clone(), proxy.clone());
        let permit = peers.acquire(peer.ip());
        async move {
            // Held for the connection's life, streams included.
            let Some(_permit) = permit else {
                proxy.guard.metrics.tunnel_refused("peer_limit");
                return;
            };
            connection(acceptor, proxy, stream, peer).await
        }
    })
    .await;
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let metrics = &proxy.guard.metrics;
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            let reason = refusal_reason(&err);
            metrics.tunnel_refused(reason);
            tracing::info!("HBONE from {peer} refused ({reason}): {err}");
            return;
        }
        Err(_) => {
            metrics.tunnel_refused("handshake_timeout");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let source = peer_identity(session.peer_certificates());
    // A verified certificate parses; were it not to, the connection closes at once.
    let peer_not_after = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| facts(leaf).ok())
        .map_or(0, |f| f.not_after);
    let sni = session.server_name().map(str::to_owned);
    let local = sni
        .as_deref()
        .and_then(|sni| identity_from_sni(sni, &proxy.identities.trust_domain));
    let (Some(source), Some(local)) = (source, local) else {
        metrics.tunnel_refused("bad_certificate");
        return;
    };
    let mut connection = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .handshake(tls)
        .await
    {
        Ok(connection) => connection,
        Err(err) => {
            tracing::info!("HBONE from {peer}: {err}");
            return;
        }
    };
    let peers = Arc::new((source, local, sni));
    let expiry = tokio::time::sleep(time_until(peer_not_after));
    tokio::pin!(expiry);
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
    let draining = proxy.intake.stop.clone();
    let mut going_away = false;
    // Returning drops the connection: its socket closes and its streams end with it.
    loop {
        let stream = tokio::select! {
            stream = connection.accept() => stream,
            // GOAWAY: the peer opens its next streams to this agent's successor, and
            // `accept` ends once the streams in flight have.
            () = draining.cancelled(), if !going_away => {
                connection.graceful_shutdown();
                going_away = true;
                continue;
            }
            () = &mut expiry => {
                tracing::info!("closing HBONE from {peer} ({}): its certificate expired", peers.0);
                return;
            }
            _ = recheck.tick() => {
                let (source, local, _) = &*peers;
                if !identities_hold(&proxy.state.current(), &proxy.settings.trust_domain, source, local) {
                    tracing::info!(
                        "closing HBONE from {peer}: the configuration no longer has {source} reaching {local} here"
                    );
                    return;
                }
                continue;
            }
        };
        let Some(Ok((request, respond))) = stream else {
            break;
        };
        let (proxy, peers) = (proxy.clone(), peers.clone());
        tokio::spawn(async move {
            let (source, local, sni) = &*peers;
            if let Err(err) = stream_of(&proxy, source, local, sni, peer, request, respond).await {
                tracing::info!(
                    "HBONE stream from {peer}: {}",
                    crate::errors::describe(&err)
                );
            }
        });
    }
}

fn respond_with(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
) -> Result<SendStream<Bytes>, ProxyError> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    Ok(respond.send_response(response, status != StatusCode::OK)?)
}

/// Answers a refused stream and records why.
fn refuse(proxy: &Proxy, respond: &mut SendResponse<Bytes>, refusal: Refusal) -> ProxyError {
    if let Some(denied) = &refusal.denied {
        let (arrival, decision) = &**denied;
        proxy.guard.count(decision, "connection", arrival);
    }
    proxy.guard.metrics.tunnel_refused(refusal.reason);
    let _ = respond_with(respond, refusal.status);
    ProxyError::Denied(refusal.message)
}

async fn stream_of(
    proxy: &Proxy,
    source: &SpiffeId,
    local: &SpiffeId,
    sni: &Option<String>,
    peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Result<(), ProxyError> {
    // The tunnel port listens on IPv4 only; anything else cannot be a node's agent.
    let peer_agent = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    };
    let Some(tunnel) = TunnelRequest::parse(&request) else {
        return Err(refuse(
            proxy,
            &mut respond,
            Refusal {
                status: StatusCode::BAD_REQUEST,
                reason: "bad_request",
                message: "malformed CONNECT".into(),
                denied: None,
            },
        ));
    };
    let state = proxy.state.current();
    let plan = match plan_inbound(
        &state,
        &proxy.settings.trust_domain,
        local,
        source,
        peer_agent,
        sni.clone(),
        &tunnel,
    ) {
        Ok(plan) => plan,
        Err(refusal) => return Err(refuse(proxy, &mut respond, refusal)),
    };
    if let Some(decision) = &plan.decision {
        proxy.guard.count(decision, "connection", &plan.arrival);
    }
    let mut result = ConnResult::new(
        proxy.conns.clone(),
        proxy.guard.metrics.clone(),
        Side::Inbound,
        tunnel.client,
        tunnel.target,
    );
    result.set_principals(Some(source.to_string()), Some(local.to_string()));
    let logs = plan.arrival.security.telemetry.server_logs.clone();
    result.log_to(logs, format!("inbound|{}||", tunnel.target.port()));
    let delivered = async {
        let upstream = match deliver::dial(
            &plan.arrival,
            tunnel.service.clone(),
            true,
            Some(tunnel.client),
            &mut result,
        )
        .await
        {
            Ok(upstream) => upstream,
            Err(err) => {
                let _ = respond_with(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return Err(err);
            }
        };
        let send = respond_with(&mut respond, StatusCode::OK)?;
        let recv = request.into_body();
        deliver::carry(
            proxy,
            plan.arrival,
            plan.carry,
            Downstream::Tunnel {
                send,
                recv,
                prefix: Bytes::new(),
            },
            upstream,
            Exchange {
                service: tunnel.service.clone(),
                client: Some(tunnel.client),
                mutual_tls: true,
            },
            &mut result,
        )
        .await
    }
    .await;
    if let Err(err) = &delivered {
        result.fail(crate::errors::describe(err));
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_holds_while_both_identities_have_pods_this_side_needs() {
        let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: web}
status: {podIP: 10.244.2.10}
";
        let config = crate::config::load_str(std::path::Path::new("test.yaml"), yaml);
        let id = |sa: &str| SpiffeId::new("cluster.local", "shop", sa);
        let node_b = MeshState::build("node-b", &config);
        assert!(identities_hold(
            &node_b,
            "cluster.local",
            &id("client"),
            &id("web")
        ));
        assert!(
            !identities_hold(&node_b, "cluster.local", &id("client"), &id("client")),
            "no pod of node-b runs as the identity the peer connected to"
        );
        assert!(
            !identities_hold(&node_b, "cluster.local", &id("gone"), &id("web")),
            "no pod runs as the peer's identity"
        );
        let node_a = MeshState::build("node-a", &config);
        assert!(
            !identities_hold(&node_a, "cluster.local", &id("client"), &id("web")),
            "web is not on node-a"
        );
    }
}
