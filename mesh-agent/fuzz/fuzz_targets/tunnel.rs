//! The HBONE `CONNECT` an agent receives from another agent: `proxy::plan::TunnelRequest::parse`
//! reads the head, `plan_inbound` checks both identities and the destination's policies
//! against a fixed cluster (seeds/config_loader/cluster.yaml, this node being node-a).
//!
//! The input is a head in the crate's text form (an HTTP/2 `:method: CONNECT` head, as
//! agents send it) with settings `@local <SPIFFE ID>` (the identity the peer's TLS session
//! named), `@peer <SPIFFE ID>` (the peer's certificate), `@agent <IPv4>` (the peer agent's
//! address, node-b's by default) and `@sni <name>`. A stream the plan accepts must be for
//! a pod of this node, made to that pod's identity, and carry a client whose identity is
//! the peer's, running on the peer agent's node.

#![no_main]

use std::{net::Ipv4Addr, path::Path, sync::LazyLock};

use http::Request;
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    config::load_str,
    identity::spiffe::SpiffeId,
    model::MeshState,
    proxy::plan::{plan_inbound, TunnelRequest},
};
use mesh_agent_fuzz::{head, setting, CLUSTER};

const TRUST_DOMAIN: &str = "cluster.local";

static STATE: LazyLock<MeshState> = LazyLock::new(|| {
    let config = load_str(Path::new("cluster.yaml"), CLUSTER);
    let errors: Vec<String> = config.errors().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "the fuzz cluster has errors: {errors:?}");
    MeshState::build("node-a", &config)
});

/// The identity named by setting `name`, or `default`; `None` when it is not a SPIFFE ID
/// (TLS never hands over such an identity).
fn identity(data: &[u8], name: &str, default: &str) -> Option<SpiffeId> {
    let text = match setting(data, name) {
        Some(value) => std::str::from_utf8(value).ok()?,
        None => default,
    };
    text.parse().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(parts) = head(data) else {
        return;
    };
    let request = Request::from_parts(parts, ());
    let Some(tunnel) = TunnelRequest::parse(&request) else {
        return;
    };
    let (Some(local), Some(peer)) = (
        identity(data, "local", "spiffe://cluster.local/ns/shop/sa/near"),
        identity(data, "peer", "spiffe://cluster.local/ns/shop/sa/client"),
    ) else {
        return;
    };
    let sni = setting(data, "sni").map(|s| String::from_utf8_lossy(s).into_owned());
    let state = &*STATE;
    let agent = setting(data, "agent")
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
        .unwrap_or(Ipv4Addr::new(10, 200, 0, 2));
    let Ok(plan) = plan_inbound(state, TRUST_DOMAIN, &local, &peer, agent, sni, &tunnel) else {
        return;
    };
    let of = |w: &mesh_agent::model::Workload| {
        SpiffeId::new(TRUST_DOMAIN, &w.namespace, &w.service_account)
    };
    let target = &plan.arrival.workload;
    assert_eq!(target.ip, *tunnel.target.ip(), "delivered to another pod");
    assert_eq!(target.node, "node-a", "delivered to a pod of another node");
    assert_eq!(of(target), local, "delivered to a pod of another identity");
    let client = state
        .workloads
        .get(tunnel.client.ip())
        .expect("an accepted client is a meshed pod");
    assert_eq!(
        of(client),
        peer,
        "a peer carried a client of another identity"
    );
    assert_eq!(
        state.node_ip(client),
        Some(agent),
        "an agent carried a client of another node"
    );
    let principal = format!(
        "{}/ns/{}/sa/{}",
        peer.trust_domain, peer.namespace, peer.service_account
    );
    assert_eq!(
        plan.arrival.facts.source_principal.as_deref(),
        Some(principal.as_str()),
        "judged as another principal"
    );
    assert_eq!(plan.arrival.facts.destination_port, tunnel.target.port());
});
