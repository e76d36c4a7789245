//! In-kernel splicing of same-node flows: the agent puts its two sockets of a flow that
//! needs neither TLS nor L7 processing (the one accepted from the client, the one it
//! opened to the server) into `MESH_SPLICE_TARGETS`, pairs their cookies in
//! `MESH_SPLICE_PEERS`, then adds them to `MESH_SPLICE_SOURCES`, to which this verdict
//! is attached. Bytes arriving on a source then leave through its peer without waking
//! user space. A socket without a peer keeps its bytes (`SK_PASS`).

use aya_ebpf::{
    bindings::sk_action::SK_PASS, helpers::bpf_get_socket_cookie, macros::stream_verdict,
    programs::SkBuffContext,
};

use crate::maps::{MESH_SPLICE_PEERS, MESH_SPLICE_TARGETS};

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the cookie of the socket the skb arrived on.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a map value pointer, valid while this program runs.
    if let Some(peer) = unsafe { MESH_SPLICE_PEERS.get(cookie) } {
        let mut peer = *peer;
        // On success the skb is queued for sending on the peer; on failure (the peer is
        // gone) the bytes stay on this socket for the agent.
        let _ = MESH_SPLICE_TARGETS.redirect_skb(&ctx, &mut peer, 0);
    }
    SK_PASS
}
