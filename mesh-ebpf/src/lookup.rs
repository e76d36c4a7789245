//! `capture_lookup`, the node namespace's socket lookup, attached by the agent: a listener
//! lookup for a local meshed pod's new connection is answered with the agent's listener.
//!
//! tc hands a pod's new connections to the agent's listeners itself; the kernel looks a
//! listener up on its own in one case: a SYN that meets a TIME_WAIT socket of the same
//! four addresses (the agent's end of an earlier connection it closed first, which the
//! client reopens by reusing its port; `tc_from_pod` judged it as a new connection and let
//! it through as `steered_reopened`). TCP retires the TIME_WAIT socket for the SYN only if
//! a listener claims the destination, and answers with a stale ACK otherwise, which costs
//! the client a reset and a retransmitted SYN (~10 ms). This program is that claim.
//!
//! It is also how a pod on a bridge reaches the agent at all: the bridge's netfilter hook
//! (`br_netfilter`, which kube-proxy needs) drops a socket that `bpf_sk_assign` gave a
//! packet, so `tc_from_pod` only marks such a pod's packets for local delivery, and this
//! lookup names the agent's listener (or the DNS proxy's socket) for its new connections
//! and DNS queries; established connections are found as usual.
//!
//! Only packets of a local meshed pod arriving on its own veth (or its bridge) are
//! claimed, as tc would capture them: the node's other traffic (tunnels from other
//! nodes, the agent's own connections, pods outside the mesh) keeps the kernel's usual
//! lookup.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::capture_listener;

use crate::{
    maps::{
        capture_dns, capture_unknown, local_pod_arrives_on, meshed_destination,
        MESH_CAPTURE_LISTENERS,
    },
    packet::{DNS_PORT, IPPROTO_TCP, IPPROTO_UDP},
};

#[sk_lookup]
pub fn capture_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: reading fields of the context the kernel handed us.
    let (protocol, remote_ip, local_ip, local_port, ifindex) = unsafe {
        let lookup = &*ctx.lookup;
        (
            lookup.protocol,
            lookup.remote_ip4,
            lookup.local_ip4,
            lookup.local_port,
            lookup.ingress_ifindex,
        )
    };
    if !local_pod_arrives_on(remote_ip, ifindex) {
        return SK_PASS;
    }
    // `local_port` is in host order, the only field of the context that is.
    let port = local_port as u16;
    let listener = if protocol == u32::from(IPPROTO_UDP) {
        if port != DNS_PORT || !capture_dns() {
            return SK_PASS;
        }
        capture_listener::DNS_UDP
    } else if protocol != u32::from(IPPROTO_TCP) {
        return SK_PASS;
    } else if port == DNS_PORT && capture_dns() {
        capture_listener::DNS
    } else if meshed_destination(local_ip, port) || capture_unknown() {
        capture_listener::OUTBOUND
    } else {
        return SK_PASS;
    };
    // No listener in the slot (the agent is starting, or runs without the DNS proxy):
    // the lookup goes on as usual.
    let _ = MESH_CAPTURE_LISTENERS.redirect_sk_lookup(&ctx, listener, 0);
    SK_PASS
}
