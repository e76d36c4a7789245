//! The node agent's proxy, in stages: a pure plan (`plan`: captured connection or HBONE
//! stream + mesh state → what to do), then the I/O that carries it out — `outbound`
//! (connections captured leaving local pods), `inbound` (HBONE from other agents),
//! `deliver` (to a workload of this node, once for every arm), `requests` (HTTP judged
//! request by request), `router` (requests a VirtualService routes, sent on `upstream`
//! connections), `pool` (HBONE to other agents), `limits` (connections per
//! source), `copy` and `socket`; `client_hello` reads a TLS ClientHello's server name.

pub mod client_hello;
pub mod copy;
pub mod deliver;
pub mod dns;
pub mod error;
pub mod inbound;
pub mod limits;
pub mod metered;
pub mod observe;
pub mod outbound;
pub mod plan;
pub mod pool;
pub mod requests;
pub mod router;
pub mod socket;
pub mod upstream;

use std::sync::Arc;

use crate::{
    datapath::splice::Splicer,
    http::Intake,
    identity::tls::Identities,
    model::circuit::Budgets,
    model::SharedState,
    proxy::{plan::PlanSettings, pool::HbonePool, requests::Guard, upstream::Upstreams},
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
    /// HTTP connections of routed requests.
    pub upstreams: Arc<Upstreams>,
    /// Connection pool budgets of routed requests, per source pod and cluster.
    pub budgets: Budgets,
    /// In-kernel splicing of same-node flows, when enabled and loaded.
    pub splicer: Option<Arc<Splicer>>,
    /// The connections taken on the capture and tunnel ports, and the signal to stop
    /// taking them and to close served HTTP connections gracefully (the agent drains).
    pub intake: Intake,
}
