//! Connections captured leaving a local pod (port 15001): the accepted socket's local
//! address is the original destination. [`plan_outbound`] decides where it goes (from
//! the client's first bytes too, peeked first when routes depend on them:
//! [`reads_opening`]); this module carries the plan out — delivered here (same node, or
//! a DISABLE workload), over HBONE to the destination's node, straight to an endpoint
//! outside the mesh, or reset when the destination's policies refuse it.

use std::{
    future::Future,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    http::accept_loop,
    identity::spiffe::SpiffeId,
    model::circuit::{Permit, PoolLimits},
    proxy::{
        copy::{copy_streams, copy_to_tunnel, Counted},
        deliver::{self, Downstream},
        error::ProxyError,
        limits::PerSource,
        plan::{plan_outbound, reads_opening, Carry, Opening, Route, TcpPool, TunnelRequest},
        requests::Exchange,
        router, socket, Proxy,
    },
    telemetry::{
        conns::flow_key,
        result::{ByteCounts, Carried, ConnResult, Side},
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
    // A DestinationRule's connectionPool: the connection counts against the source pod's
    // `tcp.maxConnections` to the cluster while it lasts, and the agent watches it.
    let limits = plan
        .pool
        .as_ref()
        .map_or_else(PoolLimits::default, |p| p.limits);
    let _connection = match &plan.pool {
        Some(pool) if !matches!(plan.route, Route::Deny { .. }) => {
            match admit_connection(proxy, pool) {
                Ok(permit) => Some(permit),
                Err(err) => {
                    reset(&client);
                    return Err(err);
                }
            }
        }
        _ => None,
    };
    let watched = plan.pool.is_some();
    let counts = result.bytes();
    match plan.route {
        Route::Deny { arrival } => {
            reset(&client);
            Err(ProxyError::Denied(arrival.describe()))
        }
        Route::Local { arrival, carry } => {
            let dialling = deliver::dial(
                &arrival,
                plan.service.clone(),
                false,
                Some(client_addr),
                result,
            );
            let upstream = within(&limits, plan.target, dialling).await?;
            keep_alive(&upstream, &limits)?;
            // The agent watches a flow a connectionPool applies to: the kernel would
            // carry a spliced one out of its sight.
            let carry = match carry {
                Carry::Splice if watched => Carry::Copy,
                carry => carry,
            };
            let carrying = deliver::carry(
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
            );
            watch(carrying, watched && carry == Carry::Copy, counts, &limits).await
        }
        Route::Plaintext { arrival, carry } => {
            let dialling = deliver::dial(&arrival, None, false, None, result);
            let upstream = within(&limits, plan.target, dialling).await?;
            keep_alive(&upstream, &limits)?;
            let carrying = deliver::carry(
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
            );
            let copied = matches!(carry, Carry::Copy | Carry::Splice);
            let carried = watch(carrying, watched && copied, counts, &limits).await;
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
                http: false,
            };
            let opening = async {
                let opened = proxy
                    .pool
                    .open(
                        agent,
                        proxy.state.current().own_ip(),
                        &source,
                        &destination,
                        &request,
                    )
                    .await;
                opened.map_err(ProxyError::from)
            };
            // The lease holds the stream's place on its pooled connection until the copy
            // ends.
            let (send, recv, _lease) = match within(&limits, plan.target, opening).await {
                Ok(stream) => stream,
                Err(err) => {
                    // Refused (policy) or unreachable: the client sees a reset.
                    reset(&client);
                    return Err(err);
                }
            };
            result.set_carried(Carried::Tunnel);
            let mut client = Counted::client(client, counts.clone());
            watch(
                copy_to_tunnel(&mut client, send, recv),
                watched,
                counts,
                &limits,
            )
            .await
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
            let connecting = async {
                socket::connect(plan.target)
                    .await
                    .map_err(|source| ProxyError::Connect {
                        target: plan.target,
                        source,
                    })
            };
            let mut upstream = within(&limits, plan.target, connecting).await?;
            keep_alive(&upstream, &limits)?;
            result.set_carried(Carried::Direct);
            let mut client = Counted::client(client, counts.clone());
            watch(
                copy_streams(&mut client, &mut upstream),
                watched,
                counts,
                &limits,
            )
            .await
        }
    }
}

/// A place in the source pod's `tcp.maxConnections` to the cluster, or the overflow,
/// counted.
fn admit_connection(proxy: &Proxy, pool: &TcpPool) -> Result<Permit, ProxyError> {
    proxy
        .budgets
        .budget(&pool.key, &pool.limits)
        .try_connection()
        .map_err(|_| {
            proxy.guard.metrics.connection_refused("max_connections");
            ProxyError::PoolOverflow {
                cluster: pool.key.cluster.clone(),
            }
        })
}

/// `connecting`, given up after the destination's `connectTimeout` (Istio's 10 s
/// default without a DestinationRule).
async fn within<T>(
    limits: &PoolLimits,
    target: SocketAddrV4,
    connecting: impl Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    let limit = limits.connect_timeout;
    tokio::time::timeout(limit, connecting)
        .await
        .unwrap_or_else(|_| {
            Err(ProxyError::Connect {
                target,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within the connect timeout of {limit:?}"),
                ),
            })
        })
}

fn keep_alive(upstream: &TcpStream, limits: &PoolLimits) -> Result<(), ProxyError> {
    if let Some(keepalive) = limits.tcp_keepalive {
        socket::keep_alive(upstream, keepalive)?;
    }
    Ok(())
}

/// Why a watched flow ends before its peers end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// No byte either way for `tcp.idleTimeout`.
    Idle,
    /// `tcp.maxConnectionDuration` reached.
    Lasted,
}

/// Whether a flow that has carried `total` bytes, last seen moving at `moved`, ends
/// `now`: idle for `limits.tcp_idle_timeout`, or older than `maxConnectionDuration`
/// since `opened`.
fn ending(limits: &PoolLimits, opened: Instant, moved: Instant, now: Instant) -> Option<Ending> {
    if limits
        .max_connection_duration
        .is_some_and(|longest| now.duration_since(opened) >= longest)
    {
        return Some(Ending::Lasted);
    }
    limits
        .tcp_idle_timeout
        .is_some_and(|idle| now.duration_since(moved) >= idle)
        .then_some(Ending::Idle)
}

/// How often a watched flow is looked at: a quarter of its shortest limit, so it ends
/// within a quarter of that limit past it.
fn watch_interval(limits: &PoolLimits) -> Option<Duration> {
    let shortest = [limits.tcp_idle_timeout, limits.max_connection_duration]
        .into_iter()
        .flatten()
        .min()?;
    Some((shortest / 4).max(Duration::from_millis(50)))
}

/// Carries a TCP flow a connectionPool applies to (`watched`) until it ends, or until
/// it has been idle for `tcp.idleTimeout` or lasted `maxConnectionDuration`, as Envoy's
/// TCP proxy ends it: both sides are closed.
async fn watch(
    carrying: impl Future<Output = Result<(), ProxyError>>,
    watched: bool,
    counts: Arc<ByteCounts>,
    limits: &PoolLimits,
) -> Result<(), ProxyError> {
    let Some(interval) = watch_interval(limits).filter(|_| watched) else {
        return carrying.await;
    };
    let watching = async {
        let opened = Instant::now();
        let (mut seen, mut moved) = (counts.total(), opened);
        loop {
            tokio::time::sleep(interval).await;
            let now = Instant::now();
            let total = counts.total();
            if total != seen {
                (seen, moved) = (total, now);
            }
            if let Some(ending) = ending(limits, opened, moved, now) {
                return ending;
            }
        }
    };
    tokio::select! {
        carried = carrying => carried,
        ending = watching => Err(ProxyError::Ended(match ending {
            Ending::Idle => "idle for the destination's tcp.idleTimeout",
            Ending::Lasted => "the destination's tcp.maxConnectionDuration reached",
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_flow_ends_when_idle_or_old_enough() {
        let limits = PoolLimits {
            tcp_idle_timeout: Some(Duration::from_secs(2)),
            max_connection_duration: Some(Duration::from_secs(10)),
            ..PoolLimits::default()
        };
        let opened = Instant::now();
        let at = |secs: u64| opened + Duration::from_secs(secs);
        assert_eq!(
            ending(&limits, opened, at(1), at(2)),
            None,
            "moved a second ago"
        );
        assert_eq!(ending(&limits, opened, at(1), at(3)), Some(Ending::Idle));
        assert_eq!(ending(&limits, opened, at(9), at(10)), Some(Ending::Lasted));
        let forever = PoolLimits {
            tcp_idle_timeout: None,
            ..PoolLimits::default()
        };
        assert_eq!(
            ending(&forever, opened, opened, at(86_400)),
            None,
            "0s: never"
        );
        assert_eq!(watch_interval(&forever), None, "nothing to watch");
        assert_eq!(watch_interval(&limits), Some(Duration::from_millis(500)));
        assert_eq!(
            watch_interval(&PoolLimits::default()),
            Some(Duration::from_secs(900)),
            "Istio's one-hour default"
        );
    }
}
