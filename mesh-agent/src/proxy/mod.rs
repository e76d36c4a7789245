//! The node agent's proxy, in stages: a pure plan (`plan`: captured connection or HBONE
//! stream + mesh state → what to do), then the I/O that carries it out — `outbound`
//! (connections captured leaving local pods), `inbound` (HBONE from other agents),
//! `deliver` (to a workload of this node, once for every arm), `requests` (HTTP judged
//! request by request), `pool` (HBONE to other agents), `copy` and `socket`.

pub mod copy;
pub mod deliver;
pub mod error;
pub mod inbound;
pub mod outbound;
pub mod plan;
pub mod pool;
pub mod requests;
pub mod socket;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    datapath::splice::Splicer,
    identity::tls::Identities,
    model::SharedState,
    proxy::{plan::PlanSettings, pool::HbonePool, requests::Guard},
    telemetry::conns::ConnTable,
};

/// What every connection the proxy carries shares.
pub struct Proxy {
    pub state: SharedState,
    pub settings: PlanSettings,
    pub identities: Arc<Identities>,
    pub guard: Arc<Guard>,
    pub conns: Arc<ConnTable>,
    pub pool: HbonePool,
    /// In-kernel splicing of same-node flows, when enabled and loaded.
    pub splicer: Option<Arc<Splicer>>,
}

/// How long an accept loop waits after the kernel refused an accept (out of file
/// descriptors, say) before trying again, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` and hands each to `handle` on its own task.
pub async fn accept_loop<F, Fut>(name: &'static str, listener: TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(err) => {
                tracing::warn!("{name} accept: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
