//! Connections captured leaving a local pod (port 15001): the accepted socket's local
//! address is the original destination. [`plan_outbound`] decides where it goes (from
//! the client's first bytes too, peeked first when routes depend on them:
//! [`reads_opening`]); this module carries the plan out — delivered here (same node, or
//! a DISABLE workload), over HBONE to the destination's node, straight to an endpoint
//! outside the mesh, or reset when the destination's policies refuse it.

use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    http::accept_loop,
    identity::spiffe::SpiffeId,
    proxy::{
        copy::{copy_streams, copy_to_tunnel, Counted},
        deliver::{self, Downstream},
        error::ProxyError,
        limits::PerSource,
        plan::{plan_outbound, reads_opening, Carry, Opening, Route, TunnelRequest},
        requests::Exchange,
        router, socket, Proxy,
    },
    telemetry::{
        conns::flow_key,
        result::{Carried, ConnResult, Side},
    },
};

/// Captured connections one pod may have open at once. Each costs the agent two file
/// descriptors and two buffers; a busy gateway pod rarely holds more than a few hundred
/// (Envoy's default circuit breaker allows 1024 per upstream cluster), so 4096 leaves a
/// legitimate pod room while a flood stops at 8192 descriptors, a fraction of the raised
/// limit, and the node's other pods keep being served.
const MAX_CONNECTIONS_PER_SOURCE: usize = 4096;

/// Accepts captured connections until the listener fails.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    let sources = PerSource::new(MAX_CONNECTIONS_PER_SOURCE);
    let intake = proxy.intake.clone();
    accept_loop("outbound", listener, intake, move |client, peer| {
        let proxy = proxy.clone();
        let permit = sources.acquire(peer.ip());
        async move {
            // Held until the connection is done with.
            let Some(_permit) = permit else {
                proxy.guard.metrics.connection_refused("source_limit");
                tracing::debug!("outbound connection from {peer}: over the per-source limit");
                reset(&client);
                return;
            };
            if let Err(err) = handle(&proxy, client).await {
                tracing::info!("outbound connection: {}", crate::errors::describe(&err));
            }
        }
    })
    .await;
}

/// Refuses a connection: reset, not closed, so the client sees at once that it was
/// refused.
fn reset(client: &TcpStream) {
    let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
}

async fn handle(proxy: &Arc<Proxy>, client: TcpStream) -> Result<(), ProxyError> {
    client.set_nodelay(true)?;
    let client_addr = socket::v4(client.peer_addr()?)?;
    let original_dst = socket::v4(client.local_addr()?)?;
    let mut result = ConnResult::new(
        proxy.conns.clone(),
        proxy.guard.metrics.clone(),
        Side::Outbound,
        client_addr,
        original_dst,
    );
    let outcome = carry_out(proxy, client, client_addr, original_dst, &mut result).await;
    if let Err(err) = &outcome {
        result.fail(crate::errors::describe(err));
    }
    outcome
}

async fn carry_out(
    proxy: &Arc<Proxy>,
    client: TcpStream,
    client_addr: SocketAddrV4,
    original_dst: SocketAddrV4,
    result: &mut ConnResult,
) -> Result<(), ProxyError> {
    let state = proxy.state.current();
    let opening = if reads_opening(&state, client_addr, original_dst) {
        deliver::read_opening(&client).await?
    } else {
        Opening::NotRead
    };
    // Nowhere to carry it: the client's connection is closed, as before any policy.
    let plan = plan_outbound(&state, &proxy.settings, client_addr, original_dst, &opening)?;
    let trust_domain = &proxy.settings.trust_domain;
    let spiffe = |w: &crate::model::Workload| {
        SpiffeId::new(trust_domain, &w.namespace, &w.service_account).to_string()
    };
    result.set_target(plan.target);
    let cluster = format!(
        "outbound|{}||{}",
        original_dst.port(),
        plan.service.as_deref().unwrap_or("")
    );
    let logs = state
        .security_of(*client_addr.ip())
        .telemetry
        .client_logs
        .clone();
    result.log_to(logs, cluster);
    result.set_principals(
        Some(spiffe(&plan.source)),
        plan.destination.as_deref().map(spiffe),
    );
    result.track(
        flow_key(client_addr, original_dst),
        plan.destination.clone(),
        plan.service.clone(),
        plan.mutual_tls(),
    );
    if let (
        Some(decision),
        Route::Deny { arrival } | Route::Local { arrival, .. } | Route::Plaintext { arrival, .. },
    ) = (&plan.decision, &plan.route)
    {
        proxy.guard.count(decision, "connection", arrival);
    }
    match plan.route {
        Route::Deny { arrival } => {
            reset(&client);
            Err(ProxyError::Denied(arrival.describe()))
        }
        Route::Local { arrival, carry } => {
            let upstream = deliver::dial(
                &arrival,
                plan.service.clone(),
                false,
                Some(client_addr),
                result,
            )
            .await?;
            deliver::carry(
                proxy,
                arrival,
                carry,
                Downstream::Socket(client),
                upstream,
                Exchange {
                    service: plan.service.clone(),
                    client: Some(client_addr),
                    mutual_tls: false,
                },
                result,
            )
            .await
        }
        Route::Plaintext { arrival, carry } => {
            let upstream = deliver::dial(&arrival, None, false, None, result).await?;
            let carried = deliver::carry(
                proxy,
                arrival,
                carry,
                Downstream::Socket(client),
                upstream,
                Exchange {
                    service: plan.service.clone(),
                    client: Some(client_addr),
                    mutual_tls: false,
                },
                result,
            )
            .await;
            if !matches!(carry, Carry::Http | Carry::Sniff) {
                result.set_carried(Carried::Direct);
            }
            carried
        }
        Route::Tunnel {
            agent,
            source,
            destination,
        } => {
            let request = TunnelRequest {
                target: plan.target,
                client: client_addr,
                service: plan.service.clone(),
            };
            let (send, recv) = match proxy
                .pool
                .open(
                    agent,
                    proxy.state.current().own_ip(),
                    &source,
                    &destination,
                    &request,
                )
                .await
            {
                Ok(stream) => stream,
                Err(err) => {
                    // Refused (policy) or unreachable: the client sees a reset.
                    reset(&client);
                    return Err(err.into());
                }
            };
            result.set_carried(Carried::Tunnel);
            let mut client = Counted::client(client, result.bytes());
            copy_to_tunnel(&mut client, send, recv).await
        }
        Route::Routed { service, .. } => {
            result.set_carried(Carried::Routed);
            let client = Counted::client(client, result.bytes());
            router::serve(
                proxy.clone(),
                client,
                plan.source.clone(),
                client_addr,
                service,
            )
            .await
        }
        Route::Direct => {
            let mut upstream =
                socket::connect(plan.target)
                    .await
                    .map_err(|source| ProxyError::Connect {
                        target: plan.target,
                        source,
                    })?;
            result.set_carried(Carried::Direct);
            let mut client = Counted::client(client, result.bytes());
            copy_streams(&mut client, &mut upstream).await
        }
    }
}
