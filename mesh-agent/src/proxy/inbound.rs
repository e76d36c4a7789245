//! Connections tunnelled in from other node agents (port 15008): the request names a pod
//! of this node, which is reached with the original client's address as source.

use std::{io, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use super::{flow_key, socket, tunnel, ConnTable};
use crate::state::SharedState;

pub async fn serve(listener: TcpListener, state: SharedState, conns: Arc<ConnTable>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("tunnel accept: {err}");
                continue;
            }
        };
        let state = state.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, &state, &conns).await {
                log::info!("tunnel from {peer}: {err}");
            }
        });
    }
}

async fn handle(stream: TcpStream, state: &SharedState, conns: &ConnTable) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (request, mut downstream) = tunnel::accept(stream).await?;
    let state = state.current();
    let Some(workload) = state
        .workloads
        .get(request.target.ip())
        .filter(|w| w.node == state.node)
        .cloned()
    else {
        tunnel::respond(&mut downstream, "404 Not Found").await?;
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not a meshed pod of this node", request.target),
        ));
    };
    let mut upstream = match socket::connect_as(request.client, request.target).await {
        Ok(upstream) => upstream,
        Err(err) => {
            tunnel::respond(&mut downstream, "503 Service Unavailable").await?;
            return Err(err);
        }
    };
    let server_key = flow_key(request.target, socket::v4(upstream.local_addr()?)?);
    conns.insert(server_key, Some(workload), request.service);
    tunnel::respond(&mut downstream, "200 OK").await?;
    let copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    conns.finish(&server_key);
    copied.map(|_| ())
}
