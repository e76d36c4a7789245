//! tc programs on a meshed pod's host-side veth.
//!
//! `tc_from_pod` (ingress of the host veth, i.e. packets leaving the pod): a packet that
//! belongs to a socket the node agent owns goes to that socket; a new TCP connection
//! towards a meshed destination (a pod of the mesh or a Service port) is handed to the
//! agent's transparent capture listener with `bpf_sk_assign`, unless the destination's
//! AuthorizationPolicies deny this source on L4 facts alone (then the SYN is dropped). The mark makes the node's
//! policy route deliver the packet locally, so the accepted socket's local address is
//! the original destination: no NAT and no side table. A pod's DNS (UDP or TCP to port
//! 53, whichever server it names) goes the same way to the agent's DNS proxy, when the
//! agent turned that on. A SYN meeting the agent's TIME_WAIT socket of an earlier
//! connection with the same addresses is judged as a new connection and left to the
//! kernel, whose listener lookup `capture_lookup` answers. Everything is counted.
//!
//! A new connection between two pods of the node that the agent's verdict lets the kernel
//! carry (`POLICY_DIRECT`: allowed on L4 facts, no L7 work, while the agent lives) is not
//! steered: its SYN is forwarded as it is, and each end's packets are recognised by
//! `MESH_DIRECT_FLOWS` (both ends' entries written by the client's SYN here, after the
//! source check) before any socket lookup.
//!
//! A pod whose veth is a port of a bridge (bridge-based CNIs) is handled alike, with two
//! differences its entry in `MESH_WORKLOADS` tells: its frames must carry its own MAC (a
//! pod could otherwise take another's place in the bridge's forwarding table, or answer
//! ARP for another's address), and a frame for the agent is not given its socket (the
//! bridge's netfilter hook would drop that) but marked and readdressed to the node (its
//! veth's MAC, one of the bridge's own), so that the node's stack takes it and finds the
//! socket itself (`capture_lookup`).
//!
//! `tc_to_pod` (egress of the host veth, packets entering the pod) counts, and enforces
//! PeerAuthentication STRICT: TCP to such a pod port that the agent did not send (its
//! sockets carry `AGENT_MARK`) is plaintext that bypassed the mesh, and is dropped —
//! except the kubelet's probes (from the node's own address to a port the pod declares
//! for its probes) and the answers of connections the pod itself opened to destinations
//! outside the mesh (`MESH_POD_OPENED`, recorded by `tc_from_pod` from their SYN), and the
//! packets of direct connections that entered the node on their sender's own veth.
//!
//! Kernel maps are bounded: when a pod did not fit in `MESH_WORKLOADS` nothing but the
//! agent reaches it and it cannot send (its source is unknown), and when any workload or
//! Service port did not fit, every new connection is handed to the agent.
//!
//! Both fail closed on what they cannot judge, since a hostile pod chooses its packets'
//! shape: the same-node identity rests on the source address, so a pod may only send
//! from its own; IPv6 and other non-IPv4 frames (ARP excepted) are dropped, the mesh
//! being IPv4-only; a TCP fragment, which may not carry the header a decision needs, is
//! dropped wherever that decision matters; headers are pulled into the linear data when
//! they are not there, and a packet still too short to judge is dropped. Under
//! workload-wide STRICT, only TCP (judged per port) and ICMP errors enter the pod
//! without the agent.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{
    verdict, FlowKey, PolicyKey, PortKey, TrafficCounters, TrafficKey, AGENT_LEASE_KEY,
    AGENT_LEASE_NS, AGENT_MARK, CAPTURE_MARK, DIRECTION_FROM_POD, DIRECTION_TO_POD,
    DNS_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, POLICY_DENY, POLICY_DIRECT, PORT_MTLS_STRICT,
    WORKLOAD_FLAG_MTLS_STRICT, WORKLOAD_FLAG_MTLS_STRICT_PORTS,
};

use crate::{
    maps::{
        capture_dns, capture_unknown, count_verdict, local_pod_on, meshed_destination, LocalPod,
        MESH_AGENT_LEASE, MESH_DIRECT_FLOWS, MESH_POD_OPENED, MESH_POLICY, MESH_PORT_MTLS,
        MESH_PROBE_PORTS, MESH_SERVICE_IPS, MESH_TRAFFIC, MESH_WORKLOADS,
    },
    packet::{
        arp_sender, ether_type, icmp_type, parse_ipv4, parse_tcp, source_mac, udp_ports,
        Ipv4Packet, DNS_PORT, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, TCP_FLAG_ACK, TCP_FLAG_SYN,
    },
};

/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;
const TCP_TIME_WAIT: u32 = 6;
const TCP_LISTEN: u32 = 10;
const BPF_NOEXIST: u64 = 1;
/// ICMP errors, which concern a connection or datagram of the pod: destination
/// unreachable (path MTU discovery among them), time exceeded, parameter problem.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    from_pod(&ctx)
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    to_pod(&ctx)
}

/// The IPv4 header of a frame, or the verdict on a frame that is not IPv4: ARP passes,
/// everything else is dropped and counted.
#[inline(always)]
fn ipv4_or_verdict(ctx: &TcContext) -> Result<Ipv4Packet, i32> {
    let Some(ether_type) = ether_type(ctx) else {
        return Err(drop_counted(verdict::DROP_MALFORMED));
    };
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx).ok_or_else(|| drop_counted(verdict::DROP_MALFORMED)),
        ETH_P_ARP => Err(TC_ACT_OK),
        ETH_P_IPV6 => Err(drop_counted(verdict::DROP_IPV6)),
        _ => Err(drop_counted(verdict::DROP_UNKNOWN_ETHERTYPE)),
    }
}

#[inline(always)]
fn to_pod(ctx: &TcContext) -> i32 {
    let ip = match ipv4_or_verdict(ctx) {
        Ok(ip) => ip,
        Err(action) => return action,
    };
    account(ip.saddr, ip.daddr, DIRECTION_TO_POD, ctx.len());
    // SAFETY: reading a field of the context the kernel handed us.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == AGENT_MARK {
        return TC_ACT_OK;
    }
    // This program runs only on the veths of meshed pods, so the destination is one: a
    // pod the agent could not write into the full map is reached only through the agent.
    // Its probes too: it could not answer them, its source being no one's (fail closed
    // means not ready, which is what Kubernetes should see).
    let Some(workload) = MESH_WORKLOADS.get_ptr(ip.daddr) else {
        return drop_counted(verdict::DROP_NO_WORKLOAD);
    };
    // SAFETY: a map value pointer, valid while this program runs.
    let flags = unsafe { (*workload).flags };
    if flags & (WORKLOAD_FLAG_MTLS_STRICT | WORKLOAD_FLAG_MTLS_STRICT_PORTS) == 0 {
        return TC_ACT_OK;
    }
    let workload_strict = flags & WORKLOAD_FLAG_MTLS_STRICT != 0;
    if ip.protocol == IPPROTO_TCP {
        // Its port is unknown: it may be for a STRICT one.
        if ip.fragment {
            return drop_counted(verdict::DROP_FRAGMENT);
        }
        let Some((sport, dport, tcp_flags)) = parse_tcp(ctx, ip.l4_offset) else {
            return drop_counted(verdict::DROP_MALFORMED);
        };
        let key = PortKey {
            ip: ip.daddr,
            port: u16::from_be(dport),
            _pad: 0,
        };
        // SAFETY: a map value pointer, valid while this program runs.
        let strict = match unsafe { MESH_PORT_MTLS.get(key) } {
            Some(mode) => *mode == PORT_MTLS_STRICT,
            None => workload_strict,
        };
        if !strict {
            return TC_ACT_OK;
        }
        if node_probe(&ip, key.port) {
            return TC_ACT_OK;
        }
        // SAFETY: reading a field of the context the kernel handed us.
        let arrived_on = unsafe { (*ctx.skb.skb).ingress_ifindex };
        if direct_from(&flow_key(ip.saddr, sport, ip.daddr, dport), arrived_on) {
            count_verdict(verdict::PASSED_DIRECT_STRICT);
            return TC_ACT_OK;
        }
        // A bare SYN always opens a connection into the pod, whatever was recorded.
        let opening = tcp_flags & TCP_FLAG_SYN != 0 && tcp_flags & TCP_FLAG_ACK == 0;
        if !opening && pod_opened(ip.daddr, dport, ip.saddr, sport) {
            count_verdict(verdict::PASSED_POD_OPENED);
            return TC_ACT_OK;
        }
        return drop_counted(verdict::DROP_PLAINTEXT_STRICT);
    }
    if !workload_strict {
        return TC_ACT_OK;
    }
    if ip.fragment {
        return drop_counted(verdict::DROP_FRAGMENT);
    }
    if ip.protocol == IPPROTO_ICMP {
        let Some(kind) = icmp_type(ctx, ip.l4_offset) else {
            return drop_counted(verdict::DROP_MALFORMED);
        };
        if matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        ) {
            return TC_ACT_OK;
        }
    }
    // DNS answers: a pod must resolve names under STRICT too. With the agent's DNS proxy
    // they come from the agent (marked, let in above); without it the node's resolver
    // answers from port 53 outside the mesh. A datagram forged to look like one reaches
    // only a UDP socket, which mutual TLS never protected.
    if !capture_dns()
        && ip.protocol == IPPROTO_UDP
        && udp_ports(ctx, ip.l4_offset).is_some_and(|(sport, _)| sport == DNS_PORT.to_be())
    {
        return TC_ACT_OK;
    }
    drop_counted(verdict::DROP_NON_TCP_STRICT)
}

#[inline(always)]
fn from_pod(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us; at tc ingress of the
    // host veth, `ifindex` is that veth's index.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ether_type(ctx) == Some(ETH_P_ARP) {
        return arp_from_pod(ctx, ifindex);
    }
    let ip = match ipv4_or_verdict(ctx) {
        Ok(ip) => ip,
        Err(action) => return action,
    };
    let pod = match local_pod_on(ip.saddr, ifindex) {
        Some(pod) if sent_from_own_mac(ctx, &pod) => pod,
        _ => return drop_counted(verdict::DROP_SPOOFED_SOURCE),
    };
    account(ip.saddr, ip.daddr, DIRECTION_FROM_POD, ctx.len());
    if ip.protocol == IPPROTO_UDP && !ip.fragment && capture_dns() {
        let Some((sport, dport)) = udp_ports(ctx, ip.l4_offset) else {
            return drop_counted(verdict::DROP_MALFORMED);
        };
        if dport == DNS_PORT.to_be() {
            return match lookup_udp(ctx, ip.saddr, ip.daddr, sport) {
                Some(proxy) => steer(ctx, &pod, proxy, verdict::STEERED_NEW),
                None => drop_counted(verdict::DROP_NO_PROXY),
            };
        }
    }
    if ip.protocol != IPPROTO_TCP {
        count_verdict(verdict::PASSED);
        return TC_ACT_OK;
    }
    if ip.fragment {
        // Any port of a meshed address may be captured: a fragment towards one would
        // reach it uncaptured once reassembled. With incomplete maps any address may be.
        let meshed = MESH_WORKLOADS.get_ptr(ip.daddr).is_some()
            || MESH_SERVICE_IPS.get_ptr(ip.daddr).is_some()
            || capture_unknown();
        if meshed {
            return drop_counted(verdict::DROP_FRAGMENT);
        }
        count_verdict(verdict::PASSED);
        return TC_ACT_OK;
    }
    let Some((sport, dport, flags)) = parse_tcp(ctx, ip.l4_offset) else {
        return drop_counted(verdict::DROP_MALFORMED);
    };

    let new_connection = flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0;
    let sent = flow_key(ip.saddr, sport, ip.daddr, dport);
    if !new_connection && direct_from(&sent, ifindex) {
        count_verdict(verdict::DIRECT_ESTABLISHED);
        return TC_ACT_OK;
    }
    // A segment of a connection the agent already holds (its accepted socket, or its
    // upstream socket bound to the client's address) goes to that socket. A SYN meeting
    // the agent's TIME_WAIT socket of an earlier connection with the same addresses (the
    // client reused its port) opens a new connection: it is judged as one below.
    let mut reopening = false;
    if let Some(owned) = lookup(ctx, ip.saddr, ip.daddr, sport, dport, false) {
        // SAFETY: `owned` is a non-null socket returned by the lookup helper.
        if new_connection && unsafe { (*owned).state } == TCP_TIME_WAIT {
            // SAFETY: releasing the reference the lookup took.
            unsafe { bpf_sk_release(owned as *mut _) };
            reopening = true;
        } else {
            return steer(ctx, &pod, owned, verdict::STEERED_ESTABLISHED);
        }
    }

    let meshed = meshed_destination(ip.daddr, u16::from_be(dport));
    if new_connection && dport == DNS_PORT.to_be() && capture_dns() {
        if reopening {
            return reopen(ctx, &pod);
        }
        return match lookup(
            ctx,
            ip.saddr,
            ip.daddr,
            sport,
            DNS_CAPTURE_PORT.to_be(),
            true,
        ) {
            Some(proxy) => steer(ctx, &pod, proxy, verdict::STEERED_NEW),
            None => drop_counted(verdict::DROP_NO_PROXY),
        };
    }
    // With incomplete maps an unknown destination may be a meshed pod or Service that did
    // not fit: its new connections go to the agent, which knows. Other segments to unknown
    // destinations (replies of connections into the pod) pass as before.
    if !meshed && !(new_connection && capture_unknown()) {
        if new_connection {
            record_opened(ip.saddr, sport, ip.daddr, dport);
        }
        count_verdict(verdict::PASSED);
        return TC_ACT_OK;
    }
    let answer = flow_key(ip.daddr, dport, ip.saddr, sport);
    if !new_connection {
        // A direct connection whose entry for this end the LRU evicted. Its client may
        // send again what its policy verdict still lets it open directly; its server, only
        // while the client's entry says the connection is direct. (The server's port may
        // reach the client directly while the client reaches the server's port through
        // the agent: the same addresses, judged in the other direction.)
        if policy_verdict(ip.saddr, ip.daddr, u16::from_be(dport)) == POLICY_DIRECT {
            return open_direct(
                &sent,
                ifindex,
                &answer,
                ip.daddr,
                verdict::DIRECT_ESTABLISHED,
            );
        }
        if MESH_DIRECT_FLOWS.get_ptr(answer).is_some() {
            let _ = MESH_DIRECT_FLOWS.insert(sent, ifindex, 0);
            count_verdict(verdict::DIRECT_ESTABLISHED);
            return TC_ACT_OK;
        }
        return drop_counted(verdict::DROP_NO_FLOW);
    }
    match policy_verdict(ip.saddr, ip.daddr, u16::from_be(dport)) {
        POLICY_DENY => return drop_counted(verdict::DROP_POLICY_DENIED),
        POLICY_DIRECT if agent_lives() => {
            return open_direct(&sent, ifindex, &answer, ip.daddr, verdict::DIRECT_NEW);
        }
        _ => {}
    }
    // An earlier direct connection with the same addresses must not keep this one, which
    // the agent carries, from reaching it, either way.
    let _ = MESH_DIRECT_FLOWS.remove(sent);
    let _ = MESH_DIRECT_FLOWS.remove(answer);
    if reopening {
        return reopen(ctx, &pod);
    }
    match lookup(
        ctx,
        ip.saddr,
        ip.daddr,
        sport,
        OUTBOUND_CAPTURE_PORT.to_be(),
        true,
    ) {
        Some(listener) => steer(ctx, &pod, listener, verdict::STEERED_NEW),
        None => drop_counted(verdict::DROP_NO_PROXY),
    }
}

/// Records a connection a pod opens towards a destination outside the mesh (ports as on
/// the wire).
#[inline(always)]
fn record_opened(pod: u32, pod_port: u16, peer: u32, peer_port: u16) {
    let _ = MESH_POD_OPENED.insert(flow_key(pod, pod_port, peer, peer_port), 1, 0);
}

/// Whether a segment from `peer` to `pod` belongs to a connection the pod opened itself
/// (ports as on the wire). Only the pod's own SYN, source-checked, records one; an
/// outsider would have to send from that exact peer address and port, on a connection
/// the pod chose to run in plaintext.
#[inline(always)]
fn pod_opened(pod: u32, pod_port: u16, peer: u32, peer_port: u16) -> bool {
    MESH_POD_OPENED
        .get_ptr(flow_key(pod, pod_port, peer, peer_port))
        .is_some()
}

/// ARP from a pod passes when it speaks for the pod's own address from the pod's own MAC:
/// on a bridge, a pod announcing another pod's address would draw that pod's traffic,
/// the agent's plaintext deliveries to it included.
#[inline(always)]
fn arp_from_pod(ctx: &TcContext, ifindex: u32) -> i32 {
    let Some(sender) = arp_sender(ctx) else {
        return drop_counted(verdict::DROP_MALFORMED);
    };
    let own = match local_pod_on(sender, ifindex) {
        Some(pod) => sent_from_own_mac(ctx, &pod),
        // A local pod that did not fit in the workload map has no entry to check: it
        // must still answer the node's ARP, the agent being the one peer it may have.
        None => capture_unknown() && MESH_WORKLOADS.get_ptr(sender).is_none(),
    };
    if !own {
        return drop_counted(verdict::DROP_SPOOFED_SOURCE);
    }
    count_verdict(verdict::PASSED);
    TC_ACT_OK
}

/// Whether the frame carries the pod's own source MAC, which matters only on a bridge
/// (whose forwarding table learns from it); routed pods' entries hold none.
#[inline(always)]
fn sent_from_own_mac(ctx: &TcContext, pod: &LocalPod) -> bool {
    if is_zero_mac(&pod.pod_mac) {
        return true;
    }
    source_mac(ctx).is_some_and(|mac| same_mac(&mac, &pod.pod_mac))
}

/// Byte by byte: the eBPF target has no `memcmp` to call.
#[inline(always)]
fn same_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

#[inline(always)]
fn is_zero_mac(mac: &[u8; 6]) -> bool {
    same_mac(mac, &[0; 6])
}

/// Readdresses a frame of a bridged pod to the MAC of its host-side veth, one of the
/// bridge's own addresses, so that the bridge hands it to the node's stack instead of
/// forwarding it to the port of the pod it was addressed to; and makes it the host's,
/// as its new address says (the type was judged by the old one on arrival, and the stack
/// drops frames for other hosts). Routed pods' frames already go to the node.
#[inline(always)]
fn to_the_node(ctx: &TcContext, pod: &LocalPod) -> bool {
    is_zero_mac(&pod.port_mac)
        || (ctx.store(0, &pod.port_mac, 0).is_ok() && ctx.change_type(PACKET_HOST).is_ok())
}

/// Whether a TCP packet into a pod is its kubelet's probe, counted if it is: from the node
/// address its probes come from to a port it declares for them (`MESH_PROBE_PORTS`). The
/// probes come from the node, not through the agent, and their source cannot be forged:
/// pods are held to their own address, and the kernel drops packets arriving from outside
/// with one of the node's own as a martian.
#[inline(always)]
fn node_probe(ip: &Ipv4Packet, port: u16) -> bool {
    let key = PortKey {
        ip: ip.daddr,
        port,
        _pad: 0,
    };
    // SAFETY: a map value pointer, valid while this program runs.
    let probe = unsafe { MESH_PROBE_PORTS.get(key) }.is_some_and(|node| *node == ip.saddr);
    if probe {
        count_verdict(verdict::PASSED_NODE_PROBE);
    }
    probe
}

/// A pod connection's end as the packets it sends show it (`MESH_DIRECT_FLOWS` and
/// sockops' key; ports as on the wire).
#[inline(always)]
fn flow_key(saddr: u32, sport: u16, daddr: u32, dport: u16) -> FlowKey {
    FlowKey {
        local_ip: saddr,
        remote_ip: daddr,
        local_port: u16::from_be(sport),
        remote_port: u16::from_be(dport),
    }
}

/// Records a connection the kernel carries directly from the client's packet `sent`, on
/// its veth `ifindex`, to the local pod `server`: both ends' entries, the answers' with
/// the server's veth (an entry naming no veth is written again by the server's first
/// packet, the client's entry vouching for it).
#[inline(always)]
fn open_direct(sent: &FlowKey, ifindex: u32, answer: &FlowKey, server: u32, outcome: u32) -> i32 {
    // SAFETY: a map value pointer, valid while this program runs.
    let server_ifindex = MESH_WORKLOADS
        .get_ptr(server)
        .map_or(0, |w| unsafe { (*w).ifindex });
    let _ = MESH_DIRECT_FLOWS.insert(sent, ifindex, 0);
    let _ = MESH_DIRECT_FLOWS.insert(answer, server_ifindex, 0);
    count_verdict(outcome);
    TC_ACT_OK
}

/// Whether `sent` belongs to a connection the kernel carries directly and entered the
/// node on its sender's veth `ifindex`, where `tc_from_pod` checked its source.
#[inline(always)]
fn direct_from(sent: &FlowKey, ifindex: u32) -> bool {
    // SAFETY: a map value pointer, valid while this program runs.
    ifindex != 0 && unsafe { MESH_DIRECT_FLOWS.get(sent) }.is_some_and(|on| *on == ifindex)
}

/// Whether the agent renewed its lease lately: verdicts it wrote are only trusted for new
/// direct connections while it lives to keep them current.
#[inline(always)]
fn agent_lives() -> bool {
    // SAFETY: reading the clock has no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    MESH_AGENT_LEASE
        .get(AGENT_LEASE_KEY)
        .is_some_and(|renewed| now.wrapping_sub(*renewed) < AGENT_LEASE_NS)
}

/// What the destination's policies decide for this source on L4 facts (`POLICY_*`, 0
/// when nothing): the port's own entry if there is one, else the destination's entry for
/// every other port.
#[inline(always)]
fn policy_verdict(src: u32, dst: u32, port: u16) -> u32 {
    let exact = PolicyKey {
        src_ip: src,
        dst_ip: dst,
        dst_port: port,
        _pad: 0,
    };
    // SAFETY: map value pointers, valid while this program runs.
    if let Some(value) = unsafe { MESH_POLICY.get(exact) } {
        return *value;
    }
    let other_ports = PolicyKey {
        dst_port: 0,
        ..exact
    };
    unsafe { MESH_POLICY.get(other_ports) }.map_or(0, |value| *value)
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

/// The agent's DNS proxy socket for a pod's datagram (`sport` in network order): the
/// unconnected UDP socket bound to `DNS_CAPTURE_PORT`.
#[inline(always)]
fn lookup_udp(ctx: &TcContext, saddr: u32, daddr: u32, sport: u16) -> Option<*mut bpf_sock> {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = sport;
    tuple.__bindgen_anon_1.ipv4.dport = DNS_CAPTURE_PORT.to_be();
    // SAFETY: as in `lookup`; the socket is released by `steer`.
    let sk = unsafe {
        bpf_sk_lookup_udp(
            ctx.skb.skb as *mut _,
            &mut tuple,
            core::mem::size_of::<[u32; 3]>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    (!sk.is_null()).then_some(sk)
}

#[inline(always)]
fn drop_counted(reason: u32) -> i32 {
    count_verdict(reason);
    TC_ACT_SHOT
}

/// Lets a SYN that meets the agent's TIME_WAIT socket (already judged as a new
/// connection) go on to the kernel, marked for local delivery: TCP accepts a SYN on a
/// TIME_WAIT socket only for a listener of its destination, which `capture_lookup` names,
/// and then retires the old socket. Assigning the listener here instead would not do:
/// the kernel refuses a connection request whose addresses a TIME_WAIT socket holds.
#[inline(always)]
fn reopen(ctx: &TcContext, pod: &LocalPod) -> i32 {
    if !to_the_node(ctx, pod) {
        return drop_counted(verdict::DROP_MALFORMED);
    }
    ctx.set_mark(CAPTURE_MARK);
    count_verdict(verdict::STEERED_REOPENED);
    TC_ACT_OK
}

#[inline(always)]
fn steer(ctx: &TcContext, pod: &LocalPod, sk: *mut bpf_sock, outcome: u32) -> i32 {
    // A bridge's netfilter hook would drop the assignment: a bridged pod's packet is only
    // marked, and the node's own lookups (`capture_lookup` for listeners) find the socket.
    let assigned = if pod.bridged {
        0
    } else {
        // SAFETY: `sk` came from the lookup helper and is released right after.
        unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) }
    };
    // SAFETY: releasing the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut _) };
    if assigned != 0 {
        return drop_counted(verdict::DROP_ASSIGN_FAILED);
    }
    if !to_the_node(ctx, pod) {
        return drop_counted(verdict::DROP_MALFORMED);
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
