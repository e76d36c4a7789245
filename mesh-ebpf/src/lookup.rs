//! `capture_lookup`, the node namespace's socket-lookup program: a connection request for
//! a meshed destination that reaches a listener lookup goes to the agent's capture
//! listener. tc already hands new SYNs to that listener directly; the lookup matters
//! when a SYN meets a TIME_WAIT socket of an earlier connection with the same addresses
//! (the agent's end of a flow it closed first): TCP then accepts the SYN only if a
//! listener claims the destination, and this program is that claim, so the old socket
//! gives way instead of answering with a stale ACK.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::ServiceKey;

use crate::{
    maps::{MESH_CAPTURE_LISTENER, MESH_SERVICES, MESH_WORKLOADS},
    packet::IPPROTO_TCP,
};

#[sk_lookup]
pub fn capture_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: reading fields of the context the kernel handed us.
    let (protocol, ip, port) = unsafe {
        let lookup = &*ctx.lookup;
        (lookup.protocol, lookup.local_ip4, lookup.local_port)
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return SK_PASS;
    }
    let service = ServiceKey {
        ip,
        port: port as u16,
        _pad: 0,
    };
    if MESH_WORKLOADS.get_ptr(ip).is_some() || MESH_SERVICES.get_ptr(service).is_some() {
        // No listener in the map (the agent is starting): the lookup goes on as usual.
        let _ = MESH_CAPTURE_LISTENER.redirect_sk_lookup(&ctx, 0, 0);
    }
    SK_PASS
}
