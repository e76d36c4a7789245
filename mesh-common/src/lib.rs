//! Types shared by the kernel programs (mesh-ebpf) and user space (mesh-agent, meshctl):
//! the keys and values of every BPF map, their pin names, and the mesh's fixed numbers.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the kernel and user space
//! agree byte for byte. IPv4 addresses are kept exactly as they appear on the wire (network
//! byte order, read as a native `u32`); ports are kept in host byte order.
#![cfg_attr(not(test), no_std)]

pub mod enrollment;

/// Bumped whenever a map's key or value layout changes; maps live under
/// `<bpffs dir>/maps-v<N>` so an agent of another layout never misreads them.
pub const MAPS_LAYOUT_VERSION: u32 = 9;

/// The agent's transparent listener for connections captured leaving a pod.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// The agent's DNS proxy (UDP and TCP), where `tc_from_pod` hands pods' DNS to port 53.
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// The agent's listener for tunnelled connections from other node agents.
pub const TUNNEL_PORT: u16 = 15008;
/// The agent's Prometheus endpoint.
pub const METRICS_PORT: u16 = 15020;
/// The agent's readiness endpoint.
pub const READY_PORT: u16 = 15021;
/// The agent's admin endpoint (localhost only).
pub const ADMIN_PORT: u16 = 15000;

/// Packet mark set on steered packets; a policy route on the node delivers marked packets
/// locally, where the socket assigned by the tc program receives them.
pub const CAPTURE_MARK: u32 = 0x0539_0000;
/// Routing table holding the `local 0.0.0.0/0 dev lo` route for marked packets.
pub const CAPTURE_ROUTE_TABLE: u32 = 133;
/// `SO_MARK` of the agent's own sockets towards pods: how the tc program tells mesh
/// traffic from plaintext that bypassed the mesh. No bit in common with `CAPTURE_MARK`.
pub const AGENT_MARK: u32 = 0x0000_1539;

/// Length of the fixed, NUL-padded name fields in map values.
pub const NAME_LEN: usize = 64;

/// Pin names of the maps, as the eBPF object declares them.
pub mod pins {
    pub const WORKLOADS: &str = "MESH_WORKLOADS";
    pub const SERVICES: &str = "MESH_SERVICES";
    pub const SERVICE_IPS: &str = "MESH_SERVICE_IPS";
    pub const TRAFFIC: &str = "MESH_TRAFFIC";
    pub const TC_VERDICTS: &str = "MESH_TC_VERDICTS";
    pub const FLOWS: &str = "MESH_FLOWS";
    pub const FLOW_EVENTS: &str = "MESH_FLOW_EVENTS";
    pub const PORT_MTLS: &str = "MESH_PORT_MTLS";
    pub const PROBE_PORTS: &str = "MESH_PROBE_PORTS";
    pub const POLICY: &str = "MESH_POLICY";
    pub const SETTINGS: &str = "MESH_SETTINGS";
    pub const SPLICE_SOURCES: &str = "MESH_SPLICE_SOURCES";
    pub const SPLICE_TARGETS: &str = "MESH_SPLICE_TARGETS";
    pub const SPLICE_PEERS: &str = "MESH_SPLICE_PEERS";
    pub const CAPTURE_LISTENERS: &str = "MESH_CAPTURE_LISTENERS";
    pub const POD_OPENED: &str = "MESH_POD_OPENED";
    pub const DIRECT_FLOWS: &str = "MESH_DIRECT_FLOWS";
    pub const AGENT_LEASE: &str = "MESH_AGENT_LEASE";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const TC_FROM_POD: &str = "tc_from_pod";
    pub const TC_TO_POD: &str = "tc_to_pod";
    pub const SOCKOPS: &str = "sockops_flows";
    pub const SPLICE_VERDICT: &str = "splice_verdict";
    pub const CAPTURE_LOOKUP: &str = "capture_lookup";
}

/// Slots of the agent's listeners in `MESH_CAPTURE_LISTENERS`, where `capture_lookup`
/// finds them.
pub mod capture_listener {
    /// The transparent listener of captured TCP connections (`OUTBOUND_CAPTURE_PORT`).
    pub const OUTBOUND: u32 = 0;
    /// The DNS proxy's TCP listener (`DNS_CAPTURE_PORT`).
    pub const DNS: u32 = 1;
    /// The DNS proxy's UDP socket (`DNS_CAPTURE_PORT`), for the queries of pods on a
    /// bridge, which `tc_from_pod` cannot hand to it itself.
    pub const DNS_UDP: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// A workload (pod) known to the mesh, keyed by its IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub namespace: [u8; NAME_LEN],
    pub name: [u8; NAME_LEN],
    pub workload: [u8; NAME_LEN],
    pub service_account: [u8; NAME_LEN],
    /// Host-side veth interface index when the pod runs on this node, else 0.
    pub ifindex: u32,
    /// `WORKLOAD_FLAG_*` bits.
    pub flags: u32,
    /// A local pod whose host veth is a bridge port (bridge-based CNIs): the MAC address of
    /// the pod's interface, the only one its frames may carry, so that it cannot take
    /// another pod's place in the bridge's forwarding table. Zero when the pod is routed.
    pub pod_mac: [u8; 6],
    /// The same pod's host-side veth MAC address, which the bridge holds as one of its
    /// own for as long as the veth is its port (the bridge's address itself changes as
    /// ports come and go). Frames steered to the agent are readdressed to it: a frame
    /// addressed to another pod on the bridge would otherwise be forwarded to that pod's
    /// port instead of reaching the node's stack.
    pub port_mac: [u8; 6],
    /// The same pod's bridge interface index, where its frames reach the node's stack
    /// (and its socket lookup, which then knows them as the pod's); zero when routed.
    pub bridge_ifindex: u32,
}

/// The workload runs on this node.
pub const WORKLOAD_FLAG_LOCAL: u32 = 1;
/// PeerAuthentication STRICT for the workload: plaintext that did not come through the
/// agent is dropped (ports may override it in `PORT_MTLS`).
pub const WORKLOAD_FLAG_MTLS_STRICT: u32 = 2;
/// At least one port of the workload is STRICT in `PORT_MTLS`: a TCP fragment, whose port
/// the kernel programs cannot see, may be for it.
pub const WORKLOAD_FLAG_MTLS_STRICT_PORTS: u32 = 4;

/// Index of the one `SETTINGS` entry.
pub const SETTINGS_KEY: u32 = 0;
/// `SETTINGS` bit: some workloads or Service ports did not fit in their maps, so a
/// destination missing from them may still be meshed. `tc_from_pod` then hands every new
/// TCP connection to the agent (which knows the whole mesh and reaches destinations
/// outside it directly) instead of letting the unknown ones pass uncaptured.
pub const SETTING_CAPTURE_UNKNOWN: u32 = 1;
/// `SETTINGS` bit: `tc_from_pod` hands pods' DNS (UDP and TCP to port 53) to the agent's
/// DNS proxy on `DNS_CAPTURE_PORT`.
pub const SETTING_CAPTURE_DNS: u32 = 2;

/// Values of `PORT_MTLS`, a port's PeerAuthentication mode overriding the workload's.
pub const PORT_MTLS_PERMISSIVE: u32 = 1;
pub const PORT_MTLS_STRICT: u32 = 2;

/// Room in `PROBE_PORTS`: the probe ports of a node's pods (a few per pod).
pub const PROBE_PORTS_CAPACITY: u32 = 4096;

/// A pod address and port (`PORT_MTLS` and `PROBE_PORTS` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A new connection from a local pod to a destination (`POLICY` key); `dst_port` 0 stands
/// for every port without an entry of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub dst_port: u16,
    pub _pad: u16,
}

/// `POLICY` values: the destination's AuthorizationPolicies decide on L4 facts alone.
/// Denied: the SYN is dropped.
pub const POLICY_DENY: u32 = 1;
/// Allowed, carried by the agent (as when there is no entry).
pub const POLICY_ALLOW: u32 = 2;
/// Allowed, and nothing on the path needs the agent (a same-node pod with no L7 work):
/// the kernel forwards the connection to the pod itself (`DIRECT_FLOWS`).
pub const POLICY_DIRECT: u32 = 3;

/// `AGENT_LEASE` slot of the time (`CLOCK_MONOTONIC` ns) the agent last said it lives:
/// connections go direct only while it is recent, so that an agent that is gone leaves
/// no stale verdict in force for new connections.
pub const AGENT_LEASE_KEY: u32 = 0;
/// How old the lease may be; the agent renews it every `AGENT_LEASE_RENEW_NS`.
pub const AGENT_LEASE_NS: u64 = 3_000_000_000;
pub const AGENT_LEASE_RENEW_NS: u64 = 1_000_000_000;

/// A Service port, keyed by its cluster IP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: [u8; NAME_LEN],
    pub name: [u8; NAME_LEN],
}

/// Direction of a packet relative to the pod whose veth saw it.
pub const DIRECTION_FROM_POD: u32 = 0;
pub const DIRECTION_TO_POD: u32 = 1;

/// Per-CPU packet and byte counters per address pair and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TrafficKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub direction: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Indexes of the per-CPU `TC_VERDICTS` array: what the tc programs did with packets,
/// drops by reason included.
pub mod verdict {
    /// A SYN towards a meshed destination handed to the agent's capture listener.
    pub const STEERED_NEW: u32 = 0;
    /// A packet of a flow the agent already owns, handed to its socket.
    pub const STEERED_ESTABLISHED: u32 = 1;
    /// Left to the kernel's normal forwarding.
    pub const PASSED: u32 = 2;
    /// Dropped: a new connection to a meshed destination while no agent listens.
    pub const DROP_NO_PROXY: u32 = 3;
    /// Dropped: a mid-stream packet to a meshed destination that no agent socket owns.
    pub const DROP_NO_FLOW: u32 = 4;
    /// Dropped: the kernel refused to assign the packet to the agent's socket.
    pub const DROP_ASSIGN_FAILED: u32 = 5;
    /// Dropped: plaintext to a pod under PeerAuthentication STRICT, not from the mesh.
    pub const DROP_PLAINTEXT_STRICT: u32 = 6;
    /// A new connection an AuthorizationPolicy denies on L4 facts alone (same-node source).
    pub const DROP_POLICY_DENIED: u32 = 7;
    /// Dropped: an IPv4 fragment of TCP from a pod towards a meshed destination, or any
    /// fragment to a pod with a STRICT port not sent by the agent. A fragment may not carry
    /// the TCP header the decision needs, so it is never judged by one.
    pub const DROP_FRAGMENT: u32 = 8;
    /// Dropped: headers that cannot be read even after pulling them into the linear data
    /// (a truncated packet), or an IPv4 header with a bad version or length.
    pub const DROP_MALFORMED: u32 = 9;
    /// Dropped: IPv6 leaving or entering a meshed pod (the mesh is IPv4-only).
    pub const DROP_IPV6: u32 = 10;
    /// Dropped: a frame leaving or entering a meshed pod that is neither IPv4, ARP nor IPv6.
    pub const DROP_UNKNOWN_ETHERTYPE: u32 = 11;
    /// Dropped: an IPv4 packet leaving a pod with a source address that is not the
    /// address of the pod on that interface.
    pub const DROP_SPOOFED_SOURCE: u32 = 12;
    /// Dropped: non-TCP IPv4 to a pod under workload-wide STRICT that the agent did not
    /// send (ICMP errors excepted: they belong to the pod's own connections).
    pub const DROP_NON_TCP_STRICT: u32 = 13;
    /// Dropped: a packet entering a pod that has no entry in `WORKLOADS` (the map was
    /// full when the agent filled it) and that the agent did not send: such a pod is
    /// reached only through the agent, which judges what it delivers.
    pub const DROP_NO_WORKLOAD: u32 = 14;
    /// Plaintext to a STRICT pod let in: a kubelet probe, from the node's own address to a
    /// port the pod declares for its probes (`PROBE_PORTS`).
    pub const PASSED_NODE_PROBE: u32 = 15;
    /// A SYN towards a meshed destination that meets the agent's TIME_WAIT socket of an
    /// earlier connection with the same addresses (the client reused its port): judged as
    /// a new connection, then left to the kernel, which retires the TIME_WAIT socket for
    /// the listener `capture_lookup` names.
    pub const STEERED_REOPENED: u32 = 16;
    /// Passed STRICT: TCP into a pod that answers a connection the pod itself opened to a
    /// destination outside the mesh (`POD_OPENED`).
    pub const PASSED_POD_OPENED: u32 = 17;
    /// A SYN the kernel forwards to a same-node pod itself (`POLICY_DIRECT`).
    pub const DIRECT_NEW: u32 = 18;
    /// A later packet of such a connection, either way (`DIRECT_FLOWS`).
    pub const DIRECT_ESTABLISHED: u32 = 19;
    /// Passed STRICT: a packet of a connection the kernel forwards directly, which entered
    /// the node on its sender's own veth (where `tc_from_pod` judged it).
    pub const PASSED_DIRECT_STRICT: u32 = 20;
    pub const COUNT: u32 = 21;

    /// Names as reported by meshctl and the metrics (`reason` label).
    pub const NAMES: [&str; COUNT as usize] = [
        "steered_new",
        "steered_established",
        "passed",
        "drop_no_proxy",
        "drop_no_flow",
        "drop_assign_failed",
        "drop_plaintext_strict",
        "drop_policy_denied",
        "drop_fragment",
        "drop_malformed",
        "drop_ipv6",
        "drop_unknown_ethertype",
        "drop_spoofed_source",
        "drop_non_tcp_strict",
        "drop_no_workload",
        "passed_node_probe",
        "steered_reopened",
        "passed_pod_opened",
        "direct_new",
        "direct_established",
        "passed_direct_strict",
    ];
}

/// A TCP connection of a pod, as seen from the pod's socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u16,
    pub remote_port: u16,
}

/// The pod's socket opened the connection (client side).
pub const FLOW_ROLE_CLIENT: u32 = 1;
/// The pod's socket accepted the connection (server side).
pub const FLOW_ROLE_SERVER: u32 = 2;

/// L4 facts of one connection, gathered by the sockops program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// `bpf_ktime_get_ns()` when the connection was established.
    pub opened_ns: u64,
    /// `bpf_ktime_get_ns()` of the last update.
    pub updated_ns: u64,
    /// Bytes the peer acknowledged (sent by the pod).
    pub bytes_sent: u64,
    /// Bytes the pod received.
    pub bytes_received: u64,
    pub srtt_us: u32,
    pub total_retrans: u32,
    /// `FLOW_ROLE_*`.
    pub role: u32,
    /// `FLOW_FLAG_*` (formerly padding: zero in entries older agents made).
    pub flags: u32,
}

/// The peer's FIN arrived: it is counted in `bytes_received` and taken off at close.
pub const FLOW_FLAG_FIN_RECEIVED: u32 = 1;
/// The kernel carries the connection directly between two pods of the node, without the
/// agent (`DIRECT_FLOWS` holds this end).
pub const FLOW_FLAG_DIRECT: u32 = 2;

pub const FLOW_EVENT_OPEN: u32 = 1;
pub const FLOW_EVENT_CLOSE: u32 = 2;

/// Size of the `FLOW_EVENTS` ring buffer.
pub const FLOW_EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Unread bytes in `FLOW_EVENTS` past which sockops wakes the agent. Below it, events
/// wait for the agent's periodic drain: a wakeup is an interrupt the program raises on
/// its own CPU, which under connection churn cost more than the rest of the program.
/// A quarter of the ring leaves room for a burst between a wakeup and the read.
pub const FLOW_EVENTS_WAKEUP_BYTES: u64 = FLOW_EVENTS_RING_BYTES as u64 / 4;

/// A record of the `FLOW_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    /// `FLOW_EVENT_*`.
    pub kind: u32,
    pub _pad: u32,
    pub stats: FlowStats,
}

/// Writes `src` into a NUL-padded fixed field, truncating what does not fit.
pub fn fill_name(dst: &mut [u8; NAME_LEN], src: &str) {
    *dst = [0; NAME_LEN];
    let len = src.len().min(NAME_LEN);
    dst[..len].copy_from_slice(&src.as_bytes()[..len]);
}

/// Reads a NUL-padded fixed field back.
pub fn name_str(src: &[u8; NAME_LEN]) -> &str {
    let len = src.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    core::str::from_utf8(&src[..len]).unwrap_or("<invalid utf-8>")
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are `#[repr(C)]`, `Copy`, made only of integers with explicit
    // padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for WorkloadInfo {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for TrafficKey {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowStats {}
    unsafe impl aya::Pod for FlowEvent {}
}

/// The channel a `rust-toolchain.toml` names (`channel = "…"`): mesh-ebpf's pins the
/// nightly that builds the eBPF object, read by mesh-agent's build script and by xtask.
pub fn toolchain_channel(toolchain_toml: &str) -> Option<&str> {
    toolchain_toml
        .lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"'))
        .next()
}
