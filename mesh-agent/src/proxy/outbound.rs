//! Connections captured leaving a local pod (port 15001): the accepted socket's local
//! address is the original destination; it is resolved (pod, or Service → endpoint) and
//! carried straight to a pod of this node (spliced in the kernel when no L7 work is
//! needed), over HBONE (mutual TLS, the source pod's
//! identity) to the agent of the destination's node, or directly to an endpoint outside
//! the mesh.

use std::{io, net::SocketAddrV4, sync::Arc, time::Duration};

use mesh_common::TUNNEL_PORT;
use tokio::net::{TcpListener, TcpStream};

use super::{
    hbone::{self, HbonePool, TunnelRequest},
    inbound::{Admission, Arrival, Guard},
    socket,
};
use crate::{
    datapath::splice::Splicer,
    identity::tls::Identities,
    model::{peerauth::Effective, Resolved, SharedState, Workload},
    telemetry::conns::{flow_key, ConnTable},
};

/// What the outbound side needs beyond the connection itself.
pub struct Outbound {
    pub state: SharedState,
    pub conns: Arc<ConnTable>,
    pub pool: HbonePool,
    pub identities: Arc<Identities>,
    pub guard: Arc<Guard>,
    /// In-kernel splicing of same-node flows, when enabled and loaded.
    pub splicer: Option<Arc<Splicer>>,
}

/// A destination pod labelled `mesh/splice: "false"` has its same-node flows copied
/// through the agent instead of spliced in the kernel.
pub const SPLICE_LABEL: &str = "mesh/splice";

/// Buffer per direction of a copied flow: one read fills a typical socket's burst, so a
/// bulk flow costs few system calls; allocated once per flow and reused.
const COPY_BUFFER: usize = 64 * 1024;

async fn copy(client: &mut TcpStream, upstream: &mut TcpStream) -> io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(client, upstream, COPY_BUFFER, COPY_BUFFER).await
}

/// Serves a connection whose requests the destination's policies judge one by one.
async fn serve_http(
    guard: &Arc<Guard>,
    client: TcpStream,
    upstream: TcpStream,
    arrival: Arc<Arrival>,
) -> io::Result<(u64, u64)> {
    guard.metrics.carried("http");
    guard
        .clone()
        .serve_http(client, upstream, arrival)
        .await
        .map(|()| (0, 0))
}

/// Carries a same-node flow: spliced in the kernel when possible, else copied.
async fn carry_local(
    outbound: &Outbound,
    destination: &Workload,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> io::Result<(u64, u64)> {
    let splice_allowed = destination.labels.get(SPLICE_LABEL).map(String::as_str) != Some("false");
    let metrics = &outbound.guard.metrics;
    if let (Some(splicer), true) = (&outbound.splicer, splice_allowed) {
        match splicer.splice(client, upstream) {
            Ok(spliced) => {
                let (sent, received, both) = spliced.run().await?;
                metrics.carried(if both { "spliced" } else { "copied" });
                return Ok((sent, received));
            }
            Err(err) => log::debug!("splicing {}: {err}; copying instead", destination.key()),
        }
    }
    metrics.carried("copied");
    copy(client, upstream).await
}

/// Refuses a connection the destination's policies deny: reset, not closed, so the
/// client sees at once that it was refused.
fn reset(client: &TcpStream, arrival: &Arrival) -> io::Error {
    let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} → {}: denied by policy",
            arrival.facts.source_ip,
            arrival.workload.key()
        ),
    )
}

pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("outbound accept: {err}");
                continue;
            }
        };
        let outbound = outbound.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, &outbound).await {
                log::info!("outbound connection: {err}");
            }
        });
    }
}

async fn handle(mut client: TcpStream, outbound: &Outbound) -> io::Result<()> {
    client.set_nodelay(true)?;
    let client_addr = socket::v4(client.peer_addr()?)?;
    let original_dst = socket::v4(client.local_addr()?)?;
    let conns = &outbound.conns;
    let state = outbound.state.current();
    if !state.is_local(*client_addr.ip()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{client_addr} → {original_dst}: source is not a meshed pod of this node"),
        ));
    }
    // The guard counts the connection as active on its endpoint (LEAST_REQUEST) until
    // this function returns.
    let (target, workload, service, _active) = match state.resolve(original_dst, *client_addr.ip())
    {
        Resolved::Endpoint {
            target,
            workload,
            service,
            guard,
        } => (target, workload, service, guard),
        Resolved::NoEndpoints { service } => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{client_addr} → {original_dst}: Service {service} has no ready endpoint"),
            ));
        }
        Resolved::Unknown => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{client_addr} → {original_dst}: not a meshed destination"),
            ));
        }
    };
    let client_key = flow_key(client_addr, original_dst);
    let remote = workload.as_ref().is_some_and(|pod| pod.node != state.node);
    // PeerAuthentication DISABLE: no mutual TLS to this workload.
    let disabled = workload.as_ref().is_some_and(|pod| {
        state
            .mtls
            .get(&pod.ip)
            .is_some_and(|m| m.for_port(target.port()) == Effective::Disable)
    });
    let mutual_tls = remote && !disabled;
    conns.insert(client_key, workload.clone(), service.clone(), mutual_tls);

    let source_principal = || {
        state.workloads.get(client_addr.ip()).map(|w| {
            outbound
                .identities
                .spiffe_id(&w.namespace, &w.service_account)
                .to_string()
        })
    };
    let guard = &outbound.guard;
    // The destination's policies on this connection, delivered from this node; a
    // denied client is reset.
    let admit = |pod: &Arc<Workload>, principal: Option<String>| {
        let arrival = Arc::new(Arrival::new(
            pod.clone(),
            state.security_of(pod.ip),
            client_addr,
            target,
            principal,
            None,
        ));
        match guard.admit(&arrival) {
            Admission::Deny(_) => {
                conns.finish(&client_key);
                Err(reset(&client, &arrival))
            }
            admission => Ok((arrival, admission)),
        }
    };
    let result = match &workload {
        // Same node: the destination's policies are applied here, with the source's
        // identity known from its address.
        Some(pod) if pod.node == state.node => {
            let (arrival, admission) = admit(pod, source_principal())?;
            let mut upstream = socket::connect_as(client_addr, target).await?;
            let server_key = flow_key(target, socket::v4(upstream.local_addr()?)?);
            conns.insert(server_key, workload.clone(), service.clone(), false);
            let delivered = match admission {
                Admission::Http => serve_http(guard, client, upstream, arrival).await,
                _ => carry_local(outbound, pod, &mut client, &mut upstream).await,
            };
            conns.finish(&server_key);
            delivered
        }
        // DISABLE: reached in plaintext, straight from this node, so this node applies
        // the destination's policies (the peer has no mTLS identity).
        Some(pod) if disabled => {
            let (arrival, admission) = admit(pod, None)?;
            let mut upstream = socket::connect(target).await?;
            match admission {
                Admission::Http => serve_http(guard, client, upstream, arrival).await,
                _ => {
                    guard.metrics.carried("direct");
                    copy(&mut client, &mut upstream).await
                }
            }
        }
        Some(pod) => {
            let agent_ip = state.node_ip(pod).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("node {} of {} has no known address", pod.node, pod.key()),
                )
            })?;
            let request = TunnelRequest {
                target,
                client: client_addr,
                service,
            };
            let source_pod = state.workloads.get(client_addr.ip()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{client_addr} is not a meshed pod"),
                )
            })?;
            let identities = &outbound.identities;
            let source = identities.spiffe_id(&source_pod.namespace, &source_pod.service_account);
            let destination = identities.spiffe_id(&pod.namespace, &pod.service_account);
            let agent = SocketAddrV4::new(agent_ip, TUNNEL_PORT);
            let (send, recv) = match outbound
                .pool
                .open(agent, &source, &destination, &request)
                .await
            {
                Ok(stream) => stream,
                Err(err) => {
                    // Refused (policy) or unreachable: the client sees a reset.
                    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    conns.finish(&client_key);
                    return Err(err);
                }
            };
            guard.metrics.carried("tunnel");
            hbone::splice(&mut client, send, recv).await
        }
        // An endpoint outside the mesh (a WorkloadEntry, a ServiceEntry endpoint, a
        // passthrough destination): reached from this node directly.
        None => {
            let mut upstream = socket::connect(target).await?;
            guard.metrics.carried("direct");
            copy(&mut client, &mut upstream).await
        }
    };
    conns.finish(&client_key);
    let (sent, received) = result?;
    let principal = |w: Option<&Arc<crate::model::Workload>>| {
        w.map_or("unknown".into(), |w| {
            outbound
                .identities
                .spiffe_id(&w.namespace, &w.service_account)
                .to_string()
        })
    };
    log::debug!(
        target: "mesh::access",
        "outbound {client_addr} → {original_dst} ({target}) source_principal={} destination_principal={} connection_security_policy={} sent={sent} received={received}",
        principal(state.workloads.get(client_addr.ip())),
        principal(workload.as_ref()),
        if mutual_tls { "mutual_tls" } else { "none" },
    );
    Ok(())
}
