//! tc programs on a meshed pod's host-side veth.
//!
//! `tc_from_pod` (ingress of the host veth, i.e. packets leaving the pod): a packet that
//! belongs to a socket the node agent owns goes to that socket; a new TCP connection
//! towards a meshed destination (a pod of the mesh or a Service port) is handed to the
//! agent's transparent capture listener with `bpf_sk_assign`, unless the destination's
//! AuthorizationPolicies deny this source on L4 facts alone (then the SYN is dropped). The mark makes the node's
//! policy route deliver the packet locally, so the accepted socket's local address is
//! the original destination: no NAT and no side table. Everything is counted.
//!
//! `tc_to_pod` (egress of the host veth, packets entering the pod) counts, and enforces
//! PeerAuthentication STRICT: TCP to such a pod port that the agent did not send (its
//! sockets carry `AGENT_MARK`) is plaintext that bypassed the mesh, and is dropped.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{
    verdict, PolicyKey, PortKey, ServiceKey, TrafficCounters, TrafficKey, AGENT_MARK, CAPTURE_MARK,
    DIRECTION_FROM_POD, DIRECTION_TO_POD, OUTBOUND_CAPTURE_PORT, POLICY_DENY, PORT_MTLS_STRICT,
    WORKLOAD_FLAG_MTLS_STRICT,
};

use crate::{
    maps::{
        count_verdict, MESH_POLICY, MESH_PORT_MTLS, MESH_SERVICES, MESH_TRAFFIC, MESH_WORKLOADS,
    },
    packet::{parse_ipv4, parse_tcp, IPPROTO_TCP, TCP_FLAG_ACK, TCP_FLAG_SYN},
};

const TCP_LISTEN: u32 = 10;
const BPF_NOEXIST: u64 = 1;

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    from_pod(&ctx)
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    let Some(ip) = parse_ipv4(&ctx) else {
        return TC_ACT_OK;
    };
    account(ip.saddr, ip.daddr, DIRECTION_TO_POD, ctx.len());
    // SAFETY: reading a field of the context the kernel handed us.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if ip.protocol != IPPROTO_TCP || mark == AGENT_MARK {
        return TC_ACT_OK;
    }
    let Some((_, dport, _)) = parse_tcp(&ctx, ip.l4_offset) else {
        return TC_ACT_OK;
    };
    let Some(workload) = MESH_WORKLOADS.get_ptr(ip.daddr) else {
        return TC_ACT_OK;
    };
    let key = PortKey {
        ip: ip.daddr,
        port: u16::from_be(dport),
        _pad: 0,
    };
    // SAFETY: a map value pointer, valid while this program runs.
    let strict = match unsafe { MESH_PORT_MTLS.get(key) } {
        Some(mode) => *mode == PORT_MTLS_STRICT,
        None => (unsafe { (*workload).flags } & WORKLOAD_FLAG_MTLS_STRICT) != 0,
    };
    if strict {
        count_verdict(verdict::DROP_PLAINTEXT_STRICT);
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

#[inline(always)]
fn from_pod(ctx: &TcContext) -> i32 {
    let Some(ip) = parse_ipv4(ctx) else {
        return TC_ACT_OK;
    };
    account(ip.saddr, ip.daddr, DIRECTION_FROM_POD, ctx.len());
    if ip.protocol != IPPROTO_TCP {
        count_verdict(verdict::PASSED);
        return TC_ACT_OK;
    }
    let Some((sport, dport, flags)) = parse_tcp(ctx, ip.l4_offset) else {
        count_verdict(verdict::PASSED);
        return TC_ACT_OK;
    };

    // A segment of a connection the agent already holds (its accepted socket, or its
    // upstream socket bound to the client's address) goes to that socket.
    if let Some(owned) = lookup(ctx, ip.saddr, ip.daddr, sport, dport, false) {
        return steer(ctx, owned, verdict::STEERED_ESTABLISHED);
    }

    let meshed = MESH_WORKLOADS.get_ptr(ip.daddr).is_some()
        || MESH_SERVICES
            .get_ptr(ServiceKey {
                ip: ip.daddr,
                port: u16::from_be(dport),
                _pad: 0,
            })
            .is_some();
    if !meshed {
        count_verdict(verdict::PASSED);
        return TC_ACT_OK;
    }
    if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        count_verdict(verdict::DROP_NO_FLOW);
        return TC_ACT_SHOT;
    }
    if policy_denies(ip.saddr, ip.daddr, u16::from_be(dport)) {
        count_verdict(verdict::DROP_POLICY_DENIED);
        return TC_ACT_SHOT;
    }
    match lookup(
        ctx,
        ip.saddr,
        ip.daddr,
        sport,
        OUTBOUND_CAPTURE_PORT.to_be(),
        true,
    ) {
        Some(listener) => steer(ctx, listener, verdict::STEERED_NEW),
        None => {
            count_verdict(verdict::DROP_NO_PROXY);
            TC_ACT_SHOT
        }
    }
}

/// Whether the destination's policies deny this source on L4 facts: the port's own entry
/// if there is one, else the destination's entry for every other port.
#[inline(always)]
fn policy_denies(src: u32, dst: u32, port: u16) -> bool {
    let exact = PolicyKey {
        src_ip: src,
        dst_ip: dst,
        dst_port: port,
        _pad: 0,
    };
    // SAFETY: map value pointers, valid while this program runs.
    if let Some(value) = unsafe { MESH_POLICY.get(exact) } {
        return *value == POLICY_DENY;
    }
    let other_ports = PolicyKey {
        dst_port: 0,
        ..exact
    };
    unsafe { MESH_POLICY.get(other_ports) }.is_some_and(|value| *value == POLICY_DENY)
}

/// Looks a socket up in the node's network namespace by the packet's 4-tuple. With
/// `listener` false only connected sockets qualify (a wildcard listener such as the
/// metrics port must never swallow pod traffic); with `listener` true only a listener.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    listener: bool,
) -> Option<*mut bpf_sock> {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = sport;
    tuple.__bindgen_anon_1.ipv4.dport = dport;
    // SAFETY: the tuple is a valid IPv4 tuple of the size given; the returned socket is
    // released below or by the caller through `steer`.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut tuple,
            core::mem::size_of::<[u32; 3]>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a non-null socket returned by the lookup helper.
    let is_listener = unsafe { (*sk).state } == TCP_LISTEN;
    if is_listener == listener {
        Some(sk)
    } else {
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk as *mut _) };
        None
    }
}

#[inline(always)]
fn steer(ctx: &TcContext, sk: *mut bpf_sock, outcome: u32) -> i32 {
    // SAFETY: `sk` came from the lookup helper and is released right after.
    let assigned = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) };
    // SAFETY: releasing the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut _) };
    if assigned != 0 {
        count_verdict(verdict::DROP_ASSIGN_FAILED);
        return TC_ACT_SHOT;
    }
    ctx.set_mark(CAPTURE_MARK);
    count_verdict(outcome);
    TC_ACT_OK
}

#[inline(always)]
fn account(src_ip: u32, dst_ip: u32, direction: u32, len: u32) {
    let key = TrafficKey {
        src_ip,
        dst_ip,
        direction,
    };
    match MESH_TRAFFIC.get_ptr_mut(key) {
        Some(counters) => {
            // SAFETY: per-CPU value, no other writer while this program runs on this CPU.
            unsafe {
                (*counters).packets += 1;
                (*counters).bytes += len as u64;
            }
        }
        None => {
            let _ = MESH_TRAFFIC.insert(
                key,
                TrafficCounters {
                    packets: 1,
                    bytes: len as u64,
                },
                BPF_NOEXIST,
            );
        }
    }
}
