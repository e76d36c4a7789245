//! Connections captured leaving a local pod (port 15001): the accepted socket's local
//! address is the original destination; it is resolved (pod, or Service → endpoint) and
//! carried either straight to a pod of this node or through the tunnel to the agent of
//! the destination's node.

use std::{io, net::SocketAddrV4, sync::Arc};

use mesh_common::TUNNEL_PORT;
use tokio::net::{TcpListener, TcpStream};

use super::{flow_key, socket, tunnel, ConnTable};
use crate::state::{Resolved, SharedState};

pub async fn serve(listener: TcpListener, state: SharedState, conns: Arc<ConnTable>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("outbound accept: {err}");
                continue;
            }
        };
        let state = state.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, &state, &conns).await {
                log::info!("outbound connection: {err}");
            }
        });
    }
}

async fn handle(mut client: TcpStream, state: &SharedState, conns: &ConnTable) -> io::Result<()> {
    client.set_nodelay(true)?;
    let client_addr = socket::v4(client.peer_addr()?)?;
    let original_dst = socket::v4(client.local_addr()?)?;
    let state = state.current();
    if !state.is_local(*client_addr.ip()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{client_addr} → {original_dst}: source is not a meshed pod of this node"),
        ));
    }
    let (target, workload, service) = match state.resolve(original_dst) {
        Resolved::Workload {
            target,
            workload,
            service,
        } => (target, workload, service),
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
    conns.insert(client_key, workload.clone(), service.clone());

    let result = if workload.node == state.node {
        let mut upstream = socket::connect_as(client_addr, target).await?;
        let server_key = flow_key(target, socket::v4(upstream.local_addr()?)?);
        conns.insert(server_key, workload.clone(), service.clone());
        let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        conns.finish(&server_key);
        copied
    } else {
        let agent_ip = state.node_ip(&workload).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "node {} of {} has no known address",
                    workload.node,
                    workload.key()
                ),
            )
        })?;
        let request = tunnel::TunnelRequest {
            target,
            client: client_addr,
            service,
        };
        let mut upstream = tunnel::open(SocketAddrV4::new(agent_ip, TUNNEL_PORT), &request).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    conns.finish(&client_key);
    result.map(|_| ())
}
