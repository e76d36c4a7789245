//! Every map of the mesh, pinned by name under the agent's bpffs directory so that the
//! agent, a restarted agent and meshctl all see the same maps. Layouts are in mesh-common.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf, SockHash, SockMap},
};
use mesh_common::{
    verdict, FlowKey, FlowStats, PolicyKey, PortKey, ServiceInfo, ServiceKey, TrafficCounters,
    TrafficKey, WorkloadInfo,
};

/// Pod IPv4 → workload: every meshed pod of the cluster, local ones flagged.
#[map]
pub static MESH_WORKLOADS: HashMap<u32, WorkloadInfo> = HashMap::pinned(16384, 0);

/// Service cluster IP and port → Service: captured like meshed pods.
#[map]
pub static MESH_SERVICES: HashMap<ServiceKey, ServiceInfo> = HashMap::pinned(16384, 0);

/// Service cluster IP → how many of its ports are in `MESH_SERVICES`: an IPv4 fragment
/// carries no port, so it is judged by its destination address alone.
#[map]
pub static MESH_SERVICE_IPS: HashMap<u32, u32> = HashMap::pinned(16384, 0);

/// Local pod address and port → PeerAuthentication mode overriding the workload's.
#[map]
pub static MESH_PORT_MTLS: HashMap<PortKey, u32> = HashMap::pinned(16384, 0);

/// Local pod address and port declared for its kubelet probes → the node's own address
/// the kernel sends from towards that pod: plaintext from there to there passes STRICT.
#[map]
pub static MESH_PROBE_PORTS: HashMap<PortKey, u32> =
    HashMap::pinned(mesh_common::PROBE_PORTS_CAPACITY, 0);

/// Local pod → destination (and port): what AuthorizationPolicies decide on L4 facts.
#[map]
pub static MESH_POLICY: HashMap<PolicyKey, u32> = HashMap::pinned(65536, 0);

/// Settings of the datapath the agent sets (`mesh_common::SETTING_*` bits at
/// `SETTINGS_KEY`): today whether the maps are incomplete.
#[map]
pub static MESH_SETTINGS: Array<u32> = Array::pinned(1, 0);

/// The agent's sockets of spliced flows whose received bytes the verdict redirects, by
/// socket cookie. Not pinned: the sockets live and die with the agent that owns them.
#[map]
pub static MESH_SPLICE_SOURCES: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// The same sockets as redirect targets (no program on this map, so joining it leaves a
/// socket's receive path alone).
#[map]
pub static MESH_SPLICE_TARGETS: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// The agent's listeners, at the `mesh_common::capture_listener` slots, for
/// `capture_lookup`. Not pinned: they are the running agent's sockets.
#[map]
pub static MESH_CAPTURE_LISTENERS: SockMap =
    SockMap::with_max_entries(mesh_common::capture_listener::COUNT, 0);

/// Socket cookie → the cookie of the socket its bytes go out of.
#[map]
pub static MESH_SPLICE_PEERS: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);

/// Packets and bytes per address pair and direction, as seen on pod veths.
#[map]
pub static MESH_TRAFFIC: LruPerCpuHashMap<TrafficKey, TrafficCounters> =
    LruPerCpuHashMap::pinned(65536, 0);

/// What the tc programs did with packets, by `mesh_common::verdict` index.
#[map]
pub static MESH_TC_VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(verdict::COUNT, 0);

/// Open TCP connections of meshed pods.
#[map]
pub static MESH_FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::pinned(65536, 0);

/// Connections local pods opened themselves towards destinations outside the mesh, by
/// the pod's end (`local_*` the pod's address and port), recorded from their SYN: the
/// answers of such a connection enter a STRICT pod without the agent, since STRICT is
/// about connections into the pod, not the pod's own.
#[map]
pub static MESH_POD_OPENED: LruHashMap<FlowKey, u32> = LruHashMap::pinned(65536, 0);

/// Connections the kernel forwards between two pods of the node without the agent
/// (`POLICY_DIRECT`), one entry per end, keyed by what that end sends (`local_*` its own
/// address and port), valued with the index of the host veth its packets enter on. The
/// client's SYN writes both; an entry the LRU evicted is written again by that end's next
/// packet, from the policy map (the client) or the client's entry (the server).
#[map]
pub static MESH_DIRECT_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(131072, 0);

/// When the agent last said it lives (`mesh_common::AGENT_LEASE_KEY`).
#[map]
pub static MESH_AGENT_LEASE: Array<u64> = Array::pinned(1, 0);

/// Open and close events of pod connections, for the agent's metrics.
#[map]
pub static MESH_FLOW_EVENTS: RingBuf = RingBuf::pinned(mesh_common::FLOW_EVENTS_RING_BYTES, 0);

#[inline(always)]
pub fn count_verdict(index: u32) {
    if let Some(counter) = MESH_TC_VERDICTS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Whether `ip` (network order) and `port` (host order) are a meshed destination: a
/// pod of the mesh (any port) or a Service port.
#[inline(always)]
pub fn meshed_destination(ip: u32, port: u16) -> bool {
    MESH_WORKLOADS.get_ptr(ip).is_some()
        || MESH_SERVICES
            .get_ptr(ServiceKey { ip, port, _pad: 0 })
            .is_some()
}

/// A local pod's link-layer facts (`WorkloadInfo::pod_mac`, `port_mac`), zero when it
/// is routed.
pub struct LocalPod {
    pub pod_mac: [u8; 6],
    pub port_mac: [u8; 6],
    pub bridged: bool,
}

/// The local pod at `ip` (network order) if its host veth has index `ifindex` (the agent
/// records each local pod's veth index in its workload entry).
#[inline(always)]
pub fn local_pod_on(ip: u32, ifindex: u32) -> Option<LocalPod> {
    let workload = MESH_WORKLOADS.get_ptr(ip)?;
    // SAFETY: a map value pointer, valid while the program runs.
    unsafe {
        ((*workload).ifindex == ifindex).then(|| LocalPod {
            pod_mac: (*workload).pod_mac,
            port_mac: (*workload).port_mac,
            bridged: (*workload).bridge_ifindex != 0,
        })
    }
}

/// Whether `ip` (network order) is a local pod whose packets reach the node's stack on
/// `ifindex`: its own veth, or the bridge that veth is a port of. Packets from a bridged
/// pod to a meshed destination are delivered locally only with the mark `tc_from_pod`
/// sets after checking their source (the mark does not cross from a pod's namespace).
#[inline(always)]
pub fn local_pod_arrives_on(ip: u32, ifindex: u32) -> bool {
    // SAFETY: a map value pointer, valid while the program runs.
    MESH_WORKLOADS.get_ptr(ip).is_some_and(|workload| unsafe {
        (*workload).ifindex == ifindex
            || ((*workload).bridge_ifindex != 0 && (*workload).bridge_ifindex == ifindex)
    })
}

/// Whether some workloads or Service ports did not fit in their maps: a destination
/// missing from them may be meshed all the same.
#[inline(always)]
pub fn capture_unknown() -> bool {
    setting(mesh_common::SETTING_CAPTURE_UNKNOWN)
}

/// Whether pods' DNS goes to the agent's DNS proxy.
#[inline(always)]
pub fn capture_dns() -> bool {
    setting(mesh_common::SETTING_CAPTURE_DNS)
}

#[inline(always)]
fn setting(bit: u32) -> bool {
    MESH_SETTINGS
        .get(mesh_common::SETTINGS_KEY)
        .is_some_and(|bits| bits & bit != 0)
}
