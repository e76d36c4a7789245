//! The tc programs `tc_from_pod` and `tc_to_pod` run with BPF_PROG_TEST_RUN on crafted
//! packets: what they pass, what they steer to the agent, what they drop and why, and what
//! they count — well-formed traffic, and the packets a hostile pod would craft to slip past
//! them (fragments, IP options, truncated headers, IPv6, spoofed source addresses).

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use bpf_tests::{
    add_workload, arp_request, close_server_first, connect_from, ethernet, fragmented_syn,
    icmp_packet, in_new_netns, ipv4_fragment, ipv6_frame, load, loopback_with, tcp_packet,
    tcp_packet_shaped, udp_packet, veth_interface, workload, Ipv4Shape, Loaded, TCP_ACK, TCP_SYN,
};
use mesh_agent::{
    datapath::{ip_key, monotonic_ns, service_key},
    proxy::socket::transparent_listener,
};
use mesh_common::{
    pins, programs, verdict, FlowKey, PolicyKey, PortKey, ServiceInfo, TrafficCounters, TrafficKey,
    AGENT_LEASE_KEY, AGENT_MARK, CAPTURE_MARK, DIRECTION_FROM_POD, NAME_LEN, OUTBOUND_CAPTURE_PORT,
    POLICY_ALLOW, POLICY_DENY, POLICY_DIRECT, PORT_MTLS_PERMISSIVE, PORT_MTLS_STRICT, SETTINGS_KEY,
    SETTING_CAPTURE_UNKNOWN, WORKLOAD_FLAG_LOCAL, WORKLOAD_FLAG_MTLS_STRICT,
    WORKLOAD_FLAG_MTLS_STRICT_PORTS,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// The local pod whose veth the programs run on.
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// Another local pod, on another veth.
const NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const MESHED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The index the agent would have recorded for the neighbour's veth.
const NEIGHBOUR_IFINDEX: u32 = 4000;
/// Offsets of `mark` and `ifindex` in `struct __sk_buff`, the two fields of the test
/// run's context these tests set (BPF_PROG_TEST_RUN takes the device by its index, which
/// must exist in the current network namespace).
const SKB_MARK_OFFSET: usize = 8;
const SKB_IFINDEX_OFFSET: usize = 40;
/// `ingress_ifindex`: the interface a forwarded packet entered the node on.
const SKB_INGRESS_IFINDEX_OFFSET: usize = 36;
const IPPROTO_UDP: u8 = 17;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    action: u32,
    mark: u32,
}

/// What the packet looks like to the program besides its bytes.
#[derive(Clone, Copy)]
struct Context {
    ifindex: u32,
    mark: u32,
}

/// Loads a tc program of the object into the kernel and returns its name, for `run`.
fn program(loaded: &mut Loaded, name: &'static str) -> &'static str {
    let prog: &mut SchedClassifier = loaded
        .ebpf
        .program_mut(name)
        .expect("program in the object")
        .try_into()
        .expect("a tc program");
    prog.load().expect("verifier accepts the program");
    name
}

fn run(loaded: &Loaded, name: &str, packet: &[u8], context: Context) -> Run {
    run_for_frame(loaded, name, packet, context).0
}

/// `run`, with the frame as the program left it.
fn run_for_frame(loaded: &Loaded, name: &str, packet: &[u8], context: Context) -> (Run, Vec<u8>) {
    run_arrived(loaded, name, packet, context, 0)
}

/// `run_for_frame` for a packet the node forwards, which entered it on `ingress_ifindex`.
fn run_arrived(
    loaded: &Loaded,
    name: &str,
    packet: &[u8],
    context: Context,
    ingress_ifindex: u32,
) -> (Run, Vec<u8>) {
    let prog: &SchedClassifier = loaded
        .ebpf
        .program(name)
        .expect("program in the object")
        .try_into()
        .expect("a tc program");
    let mut ctx_in = [0u8; 192];
    ctx_in[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&context.mark.to_ne_bytes());
    ctx_in[SKB_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET + 4]
        .copy_from_slice(&context.ifindex.to_ne_bytes());
    ctx_in[SKB_INGRESS_IFINDEX_OFFSET..SKB_INGRESS_IFINDEX_OFFSET + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let mut frame = vec![0u8; packet.len()];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut frame),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    let mark = u32::from_ne_bytes(
        ctx_out[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4]
            .try_into()
            .expect("4 bytes"),
    );
    (
        Run {
            action: result.return_value,
            mark,
        },
        frame,
    )
}

fn verdicts(loaded: &Loaded) -> Vec<u64> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(loaded.ebpf.map(pins::TC_VERDICTS).expect("verdict map"))
            .expect("per-CPU array");
    (0..verdict::COUNT)
        .map(|i| map.get(&i, 0).expect("verdict").iter().sum())
        .collect()
}

/// The verdict counters as `(name, count)` for the non-zero ones, so that a test states
/// every counter it expects to move and no other may.
fn counted(loaded: &Loaded) -> Vec<(&'static str, u64)> {
    verdicts(loaded)
        .into_iter()
        .enumerate()
        .filter(|(_, count)| *count > 0)
        .map(|(index, count)| (verdict::NAMES[index], count))
        .collect()
}

fn traffic(loaded: &Loaded, src: Ipv4Addr, dst: Ipv4Addr) -> TrafficCounters {
    let map: PerCpuHashMap<_, TrafficKey, TrafficCounters> =
        PerCpuHashMap::try_from(loaded.ebpf.map(pins::TRAFFIC).expect("traffic map"))
            .expect("per-CPU hash");
    let key = TrafficKey {
        src_ip: ip_key(src),
        dst_ip: ip_key(dst),
        direction: DIRECTION_FROM_POD,
    };
    map.get(&key, 0)
        .map(|per_cpu| TrafficCounters {
            packets: per_cpu.iter().map(|c| c.packets).sum(),
            bytes: per_cpu.iter().map(|c| c.bytes).sum(),
        })
        .unwrap_or_default()
}

/// The local pod on a fresh interface of this namespace (returned: the context of the
/// pod's packets), a local neighbour on another veth, a remote meshed pod and a Service
/// port, as the agent's `sync_maps` records them.
fn mesh(loaded: &mut Loaded) -> Context {
    let ifindex = veth_interface("pod0");
    add_workload(loaded, POD, workload(ifindex, WORKLOAD_FLAG_LOCAL));
    add_workload(
        loaded,
        NEIGHBOUR,
        workload(NEIGHBOUR_IFINDEX, WORKLOAD_FLAG_LOCAL),
    );
    add_workload(loaded, MESHED_POD, workload(0, 0));
    let mut services: HashMap<_, mesh_common::ServiceKey, ServiceInfo> =
        HashMap::try_from(loaded.ebpf.map_mut(pins::SERVICES).expect("service map"))
            .expect("hash map");
    let info = ServiceInfo {
        namespace: [0; NAME_LEN],
        name: [0; NAME_LEN],
    };
    services
        .insert(service_key(SocketAddrV4::new(SERVICE, 80)), info, 0)
        .expect("insert service");
    let mut service_ips: HashMap<_, u32, u32> =
        HashMap::try_from(loaded.ebpf.map_mut(pins::SERVICE_IPS).expect("service IPs"))
            .expect("hash map");
    service_ips
        .insert(ip_key(SERVICE), 1, 0)
        .expect("insert service IP");
    Context { ifindex, mark: 0 }
}

#[test]
fn traffic_to_unmeshed_destinations_passes_and_is_counted() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        let syn = tcp_packet(POD, OUTSIDE, 40000, 443, TCP_SYN);
        let udp = udp_packet(POD, MESHED_POD, 5353, 53);
        let service_other_port = tcp_packet(POD, SERVICE, 40001, 8443, TCP_SYN);
        let arp = arp_request(POD, Ipv4Addr::new(169, 254, 1, 1));
        for packet in [&syn, &udp, &service_other_port, &arp] {
            let outcome = run(&loaded, prog, packet, pod);
            assert_eq!(
                outcome,
                Run {
                    action: TC_ACT_OK,
                    mark: 0
                },
                "passed, not marked"
            );
        }
        assert_eq!(counted(&loaded), [("passed", 4)]);
        let counted = traffic(&loaded, POD, OUTSIDE);
        assert_eq!(counted.packets, 1);
        assert_eq!(counted.bytes, syn.len() as u64);
        assert_eq!(
            traffic(&loaded, POD, MESHED_POD).packets,
            1,
            "UDP is counted too"
        );
    });
}

#[test]
fn new_connection_to_a_meshed_destination_without_agent_is_dropped() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        let to_pod = run(
            &loaded,
            prog,
            &tcp_packet(POD, MESHED_POD, 40000, 8080, TCP_SYN),
            pod,
        );
        let to_service = run(
            &loaded,
            prog,
            &tcp_packet(POD, SERVICE, 40001, 80, TCP_SYN),
            pod,
        );
        assert_eq!(
            (to_pod.action, to_service.action),
            (TC_ACT_SHOT, TC_ACT_SHOT)
        );
        let mid_stream = run(
            &loaded,
            prog,
            &tcp_packet(POD, SERVICE, 40002, 80, TCP_ACK),
            pod,
        );
        assert_eq!(mid_stream.action, TC_ACT_SHOT);
        assert_eq!(
            counted(&loaded),
            [("drop_no_proxy", 2), ("drop_no_flow", 1)]
        );
    });
}

#[test]
fn new_connection_to_a_meshed_destination_finds_the_capture_listener() {
    in_new_netns(|| {
        let runtime = tokio_free_listener();
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        let outcome = run(
            &loaded,
            prog,
            &tcp_packet(POD, SERVICE, 40000, 80, TCP_SYN),
            pod,
        );
        // BPF_PROG_TEST_RUN does not run at a real tc ingress, the only place where
        // bpf_sk_assign is allowed: the listener being found shows as a refused
        // assignment (never as "no proxy"), and the packet is dropped unmarked. The
        // sandbox tests cover the real steering end to end.
        assert_eq!(
            outcome,
            Run {
                action: TC_ACT_SHOT,
                mark: 0
            }
        );
        assert_eq!(counted(&loaded), [("drop_assign_failed", 1)]);
        drop(runtime);
    });
}

#[test]
fn a_syn_reopening_the_addresses_of_a_connection_in_time_wait_is_judged_as_a_new_one() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        // The agent's end of a connection it closed first holds the destination's
        // address, as the accepted socket of a captured connection does.
        loopback_with(&[POD, MESHED_POD]);
        let (server, client) = (
            SocketAddrV4::new(MESHED_POD, 8080),
            SocketAddrV4::new(POD, 40000),
        );
        let listener = std::net::TcpListener::bind(server).expect("server");
        let connection = connect_from(client, server).expect("connecting");
        let (accepted, _) = listener.accept().expect("accepting");
        close_server_first(accepted, connection);

        // The client reuses its port: the SYN is a new connection, let on to the kernel
        // marked for local delivery (where `capture_lookup` names the capture listener).
        let syn = tcp_packet(POD, MESHED_POD, 40000, 8080, TCP_SYN);
        assert_eq!(
            run(&loaded, prog, &syn, pod),
            Run {
                action: TC_ACT_OK,
                mark: CAPTURE_MARK
            }
        );
        // A late segment of the old connection still goes to its TIME_WAIT socket (the
        // test run cannot assign it: refused, as in the listener test above).
        let late_ack = tcp_packet(POD, MESHED_POD, 40000, 8080, TCP_ACK);
        assert_eq!(run(&loaded, prog, &late_ack, pod).action, TC_ACT_SHOT);
        // Judged as new, it meets the destination's policies like any new connection.
        set_policy(&mut loaded, &[(POD, MESHED_POD, 8080, POLICY_DENY)]);
        assert_eq!(run(&loaded, prog, &syn, pod).action, TC_ACT_SHOT);
        assert_eq!(
            counted(&loaded),
            [
                ("drop_assign_failed", 1),
                ("drop_policy_denied", 1),
                ("steered_reopened", 1)
            ]
        );
    });
}

#[test]
fn tcp_fragments_towards_meshed_destinations_are_dropped() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        // A SYN split after 8 bytes of its header, to a meshed pod: the first fragment
        // (MF set) carries the ports but not the flags, the second no header at all.
        let [first, rest] = fragmented_syn(POD, MESHED_POD, 40000, 8080);
        assert_eq!(run(&loaded, prog, &first, pod).action, TC_ACT_SHOT);
        assert_eq!(run(&loaded, prog, &rest, pod).action, TC_ACT_SHOT);
        // A first fragment carrying a whole SYN header, to a port of the Service address
        // that is not a Service port: the address alone makes it meshed.
        let whole_header_first = tcp_packet_shaped(
            POD,
            SERVICE,
            40001,
            9999,
            TCP_SYN,
            Ipv4Shape {
                more_fragments: true,
                ..Ipv4Shape::default()
            },
        );
        assert_eq!(
            run(&loaded, prog, &whole_header_first, pod).action,
            TC_ACT_SHOT
        );
        assert_eq!(counted(&loaded), [("drop_fragment", 3)]);

        // Towards an address outside the mesh, and a UDP fragment (judged like any UDP:
        // the protocol is in every fragment and reassembly keeps it), pass.
        let [outside_first, outside_rest] = fragmented_syn(POD, OUTSIDE, 40002, 443);
        let udp_fragment = ipv4_fragment(POD, MESHED_POD, IPPROTO_UDP, 2, false, &[0; 16]);
        for packet in [&outside_first, &outside_rest, &udp_fragment] {
            assert_eq!(run(&loaded, prog, packet, pod).action, TC_ACT_OK);
        }
        assert_eq!(counted(&loaded), [("passed", 3), ("drop_fragment", 3)]);
    });
}

fn set_capture_unknown(loaded: &mut Loaded) {
    let mut settings: Array<_, u32> =
        Array::try_from(loaded.ebpf.map_mut(pins::SETTINGS).expect("settings map")).expect("array");
    settings
        .set(SETTINGS_KEY, SETTING_CAPTURE_UNKNOWN, 0)
        .expect("set the capture bit");
}

#[test]
fn with_incomplete_maps_new_connections_to_unknown_destinations_go_to_the_agent() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        set_capture_unknown(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        // A SYN to an address the maps do not hold may be for a pod that did not fit: no
        // agent listens here, so it is dropped where it used to pass.
        let syn = run(
            &loaded,
            prog,
            &tcp_packet(POD, OUTSIDE, 40000, 443, TCP_SYN),
            pod,
        );
        assert_eq!(syn.action, TC_ACT_SHOT);
        // Other segments to unknown destinations (replies of connections into the pod)
        // pass; TCP fragments towards them may carry a SYN and are dropped.
        let reply = tcp_packet(POD, OUTSIDE, 8080, 40000, TCP_SYN | TCP_ACK);
        assert_eq!(run(&loaded, prog, &reply, pod).action, TC_ACT_OK);
        let [first, rest] = fragmented_syn(POD, OUTSIDE, 40001, 443);
        assert_eq!(run(&loaded, prog, &first, pod).action, TC_ACT_SHOT);
        assert_eq!(run(&loaded, prog, &rest, pod).action, TC_ACT_SHOT);
        assert_eq!(
            counted(&loaded),
            [("passed", 1), ("drop_no_proxy", 1), ("drop_fragment", 2)]
        );
    });
}

#[test]
fn a_pod_missing_from_the_workload_map_is_reached_only_by_the_agent() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let missing = Ipv4Addr::new(10, 244, 1, 99);
        let prog = program(&mut loaded, programs::TC_TO_POD);
        let plaintext = run(
            &loaded,
            prog,
            &tcp_packet(MESHED_POD, missing, 40000, 8080, TCP_SYN),
            pod,
        );
        let udp = run(
            &loaded,
            prog,
            &udp_packet(MESHED_POD, missing, 5353, 53),
            pod,
        );
        assert_eq!((plaintext.action, udp.action), (TC_ACT_SHOT, TC_ACT_SHOT));
        let from_agent = Context {
            mark: AGENT_MARK,
            ..pod
        };
        let judged = run(
            &loaded,
            prog,
            &tcp_packet(MESHED_POD, missing, 40001, 8080, TCP_SYN),
            from_agent,
        );
        assert_eq!(
            judged.action, TC_ACT_OK,
            "the agent judged what it delivers"
        );
        assert_eq!(counted(&loaded), [("drop_no_workload", 2)]);
    });
}

/// IP options of the given length: NOPs (a misparse reads them as port 257).
fn nop_options(len: usize) -> Vec<u8> {
    vec![1; len]
}

#[test]
fn a_syn_with_ip_options_is_judged_like_one_without() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let mut policy: HashMap<_, PolicyKey, u32> =
            HashMap::try_from(loaded.ebpf.map_mut(pins::POLICY).expect("policy map"))
                .expect("hash map");
        let denied = PolicyKey {
            src_ip: ip_key(POD),
            dst_ip: ip_key(MESHED_POD),
            dst_port: 9090,
            _pad: 0,
        };
        policy.insert(denied, POLICY_DENY, 0).expect("insert");
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        for len in [0, 4, 12, 40] {
            let options = nop_options(len);
            let shape = Ipv4Shape {
                options: &options,
                ..Ipv4Shape::default()
            };
            let to_denied = tcp_packet_shaped(POD, MESHED_POD, 40000, 9090, TCP_SYN, shape);
            let to_captured = tcp_packet_shaped(POD, MESHED_POD, 40001, 8080, TCP_SYN, shape);
            let to_outside = tcp_packet_shaped(POD, OUTSIDE, 40002, 9090, TCP_SYN, shape);
            assert_eq!(
                run(&loaded, prog, &to_denied, pod).action,
                TC_ACT_SHOT,
                "{len}"
            );
            assert_eq!(
                run(&loaded, prog, &to_captured, pod).action,
                TC_ACT_SHOT,
                "{len}"
            );
            assert_eq!(
                run(&loaded, prog, &to_outside, pod).action,
                TC_ACT_OK,
                "{len}"
            );
        }
        assert_eq!(
            counted(&loaded),
            [
                ("passed", 4),
                ("drop_no_proxy", 4),
                ("drop_policy_denied", 4)
            ]
        );
    });
}

#[test]
fn a_pod_may_only_send_from_its_own_address() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        // The neighbour's address, a remote pod's, an address outside the mesh: from this
        // pod's interface, all are forged, whatever the protocol.
        for source in [NEIGHBOUR, MESHED_POD, OUTSIDE, Ipv4Addr::UNSPECIFIED] {
            let syn = tcp_packet(source, MESHED_POD, 40000, 8080, TCP_SYN);
            assert_eq!(
                run(&loaded, prog, &syn, pod).action,
                TC_ACT_SHOT,
                "{source}"
            );
        }
        let udp = udp_packet(NEIGHBOUR, OUTSIDE, 5353, 53);
        assert_eq!(run(&loaded, prog, &udp, pod).action, TC_ACT_SHOT);
        // The pod's own address on another interface (lo here: not the pod's veth).
        let elsewhere = Context { ifindex: 1, ..pod };
        let own = tcp_packet(POD, OUTSIDE, 40001, 443, TCP_SYN);
        assert_eq!(run(&loaded, prog, &own, elsewhere).action, TC_ACT_SHOT);
        assert_eq!(counted(&loaded), [("drop_spoofed_source", 6)]);
        assert_eq!(
            traffic(&loaded, NEIGHBOUR, MESHED_POD).packets,
            0,
            "forged packets are not accounted to the pod they impersonate"
        );

        // Its own address on its own interface passes, and so does ARP.
        assert_eq!(run(&loaded, prog, &own, pod).action, TC_ACT_OK);
        let arp = arp_request(POD, NEIGHBOUR);
        assert_eq!(run(&loaded, prog, &arp, pod).action, TC_ACT_OK);
        assert_eq!(
            counted(&loaded),
            [("passed", 2), ("drop_spoofed_source", 6)]
        );
    });
}

/// The source MAC of the crafted frames (`bpf_tests::ethernet`), the pod's own here.
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const PORT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

/// `mesh`, with the local pod's veth a port of a bridge, as `sync_maps` records it.
fn bridged_mesh(loaded: &mut Loaded) -> Context {
    let pod = mesh(loaded);
    let mut info = workload(pod.ifindex, WORKLOAD_FLAG_LOCAL);
    info.pod_mac = POD_MAC;
    info.port_mac = PORT_MAC;
    info.bridge_ifindex = pod.ifindex + 1;
    add_workload(loaded, POD, info);
    pod
}

fn with_source_mac(mut frame: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    frame[6..12].copy_from_slice(&mac);
    frame
}

#[test]
fn a_bridged_pods_captured_frames_are_marked_and_readdressed_to_its_bridge() {
    in_new_netns(|| {
        let listener = tokio_free_listener();
        let mut loaded = load();
        let pod = bridged_mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);

        // A connection to a meshed pod, addressed to another MAC than the bridge's (a
        // neighbour on the bridge is reached at its own): marked for the node's stack (no
        // socket assigned, which the bridge's netfilter hook would drop) and readdressed
        // to the bridge, which then passes it up.
        let syn = tcp_packet(POD, MESHED_POD, 40000, 8080, TCP_SYN);
        let (outcome, frame) = run_for_frame(&loaded, prog, &syn, pod);
        assert_eq!(
            outcome,
            Run {
                action: TC_ACT_OK,
                mark: CAPTURE_MARK
            }
        );
        assert_eq!(
            frame[0..6],
            PORT_MAC,
            "addressed to the node, at its port's MAC"
        );
        assert_eq!(frame[6..], syn[6..], "nothing else changed");

        // Outside the mesh: left as it was, to be bridged or routed as usual.
        let outside = tcp_packet(POD, OUTSIDE, 40001, 443, TCP_SYN);
        let (outcome, frame) = run_for_frame(&loaded, prog, &outside, pod);
        assert_eq!((outcome.action, frame), (TC_ACT_OK, outside));
        assert_eq!(counted(&loaded), [("steered_new", 1), ("passed", 1)]);
        drop(listener);
    });
}

#[test]
fn a_bridged_pod_is_held_to_its_own_mac_and_its_arp_to_its_own_address() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = bridged_mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        let other_mac = [0x02, 0, 0, 0, 0, 9];

        // Another source MAC would move another pod's entry in the bridge's table.
        let borrowed = with_source_mac(tcp_packet(POD, OUTSIDE, 40000, 443, TCP_SYN), other_mac);
        assert_eq!(run(&loaded, prog, &borrowed, pod).action, TC_ACT_SHOT);
        // ARP for another pod's address would draw that pod's traffic.
        let claim = arp_request(NEIGHBOUR, POD);
        assert_eq!(run(&loaded, prog, &claim, pod).action, TC_ACT_SHOT);
        let from_other_mac = with_source_mac(arp_request(POD, NEIGHBOUR), other_mac);
        assert_eq!(run(&loaded, prog, &from_other_mac, pod).action, TC_ACT_SHOT);
        // Cut short, or not IPv4 over Ethernet: nothing to judge.
        let mut short = arp_request(POD, NEIGHBOUR);
        short.truncate(24);
        assert_eq!(run(&loaded, prog, &short, pod).action, TC_ACT_SHOT);
        assert_eq!(
            counted(&loaded),
            [("drop_malformed", 1), ("drop_spoofed_source", 3)]
        );

        let own = arp_request(POD, NEIGHBOUR);
        assert_eq!(run(&loaded, prog, &own, pod).action, TC_ACT_OK);
        let own = tcp_packet(POD, OUTSIDE, 40001, 443, TCP_SYN);
        assert_eq!(run(&loaded, prog, &own, pod).action, TC_ACT_OK);
        assert_eq!(
            counted(&loaded),
            [
                ("passed", 2),
                ("drop_malformed", 1),
                ("drop_spoofed_source", 3)
            ]
        );
    });
}

#[test]
fn arp_for_an_address_missing_from_the_map_passes_only_while_the_maps_are_incomplete() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        // With complete maps every local pod is in them: an unknown address is forged.
        let unlisted = Ipv4Addr::new(10, 244, 1, 9);
        let arp = arp_request(unlisted, NEIGHBOUR);
        assert_eq!(run(&loaded, prog, &arp, pod).action, TC_ACT_SHOT);
        // A pod that did not fit must still answer the node's ARP (the agent is its one
        // peer); another listed pod's address stays forged.
        set_capture_unknown(&mut loaded);
        assert_eq!(run(&loaded, prog, &arp, pod).action, TC_ACT_OK);
        let claim = arp_request(NEIGHBOUR, POD);
        assert_eq!(run(&loaded, prog, &claim, pod).action, TC_ACT_SHOT);
        assert_eq!(
            counted(&loaded),
            [("passed", 1), ("drop_spoofed_source", 2)]
        );
    });
}

#[test]
fn frames_that_cannot_be_judged_are_dropped_both_ways() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        add_workload(
            &mut loaded,
            POD,
            workload(pod.ifindex, WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT),
        );
        // The same frames from the pod, and to it (STRICT, where TCP is judged by port).
        let frames = |src: Ipv4Addr, dst: Ipv4Addr| -> [(&str, Vec<u8>, &str); 5] {
            let syn = tcp_packet(src, dst, 40000, 8080, TCP_SYN);
            let mut bad_version = syn.clone();
            bad_version[14] = 0x65;
            let mut short_ihl = syn.clone();
            short_ihl[14] = 0x44;
            [
                ("IPv6", ipv6_frame(), "drop_ipv6"),
                (
                    "another EtherType",
                    ethernet(0x88b5),
                    "drop_unknown_ethertype",
                ),
                (
                    "a TCP header cut short",
                    syn[..38].to_vec(),
                    "drop_malformed",
                ),
                (
                    "IP version 6 in an IPv4 frame",
                    bad_version,
                    "drop_malformed",
                ),
                (
                    "an IPv4 header length below 20",
                    short_ihl,
                    "drop_malformed",
                ),
            ]
        };
        let cases = frames(POD, MESHED_POD);
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        for (what, frame, _) in &cases {
            assert_eq!(
                run(&loaded, prog, frame, pod).action,
                TC_ACT_SHOT,
                "from the pod: {what}"
            );
        }
        let prog = program(&mut loaded, programs::TC_TO_POD);
        for (what, frame, _) in &frames(MESHED_POD, POD) {
            assert_eq!(
                run(&loaded, prog, frame, pod).action,
                TC_ACT_SHOT,
                "to the pod: {what}"
            );
        }
        let mut expected: Vec<(&str, u64)> = Vec::new();
        for reason in verdict::NAMES {
            let per_program = cases.iter().filter(|(_, _, r)| *r == reason).count() as u64;
            if per_program > 0 {
                expected.push((reason, 2 * per_program));
            }
        }
        assert_eq!(counted(&loaded), expected);
    });
}

#[test]
fn under_strict_only_tcp_judged_per_port_and_icmp_errors_enter_without_the_agent() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        add_workload(
            &mut loaded,
            POD,
            workload(pod.ifindex, WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT),
        );
        let mut ports: HashMap<_, PortKey, u32> =
            HashMap::try_from(loaded.ebpf.map_mut(pins::PORT_MTLS).expect("port map"))
                .expect("hash map");
        let permissive_port = PortKey {
            ip: ip_key(POD),
            port: 8080,
            _pad: 0,
        };
        ports
            .insert(permissive_port, PORT_MTLS_PERMISSIVE, 0)
            .expect("insert");
        let prog = program(&mut loaded, programs::TC_TO_POD);
        let from_peer = Context {
            ifindex: 1,
            mark: 0,
        };
        let from_agent = Context {
            ifindex: 1,
            mark: AGENT_MARK,
        };
        let options = nop_options(8);
        let with_options = Ipv4Shape {
            options: &options,
            ..Ipv4Shape::default()
        };
        let [first, rest] = fragmented_syn(MESHED_POD, POD, 40000, 8080);
        let cases = [
            (
                "plaintext SYN",
                tcp_packet(MESHED_POD, POD, 40000, 9090, TCP_SYN),
                TC_ACT_SHOT,
            ),
            (
                "plaintext SYN with IP options",
                tcp_packet_shaped(MESHED_POD, POD, 40000, 9090, TCP_SYN, with_options),
                TC_ACT_SHOT,
            ),
            (
                "SYN to the PERMISSIVE port",
                tcp_packet(MESHED_POD, POD, 40000, 8080, TCP_SYN),
                TC_ACT_OK,
            ),
            (
                "SYN with IP options to the PERMISSIVE port",
                tcp_packet_shaped(MESHED_POD, POD, 40000, 8080, TCP_SYN, with_options),
                TC_ACT_OK,
            ),
            ("first fragment", first, TC_ACT_SHOT),
            ("non-first fragment", rest, TC_ACT_SHOT),
            ("UDP", udp_packet(MESHED_POD, POD, 5353, 5353), TC_ACT_SHOT),
            (
                "a DNS answer (UDP from port 53)",
                udp_packet(OUTSIDE, POD, 53, 5353),
                TC_ACT_OK,
            ),
            (
                "ICMP echo request",
                icmp_packet(MESHED_POD, POD, ICMP_ECHO_REQUEST, 0),
                TC_ACT_SHOT,
            ),
            (
                "ICMP fragmentation needed",
                icmp_packet(OUTSIDE, POD, ICMP_DEST_UNREACH, 4),
                TC_ACT_OK,
            ),
            (
                "ICMP time exceeded",
                icmp_packet(OUTSIDE, POD, ICMP_TIME_EXCEEDED, 0),
                TC_ACT_OK,
            ),
            (
                "ICMP parameter problem",
                icmp_packet(OUTSIDE, POD, ICMP_PARAMETERPROB, 0),
                TC_ACT_OK,
            ),
        ];
        for (what, packet, action) in &cases {
            assert_eq!(
                run(&loaded, prog, packet, from_peer).action,
                *action,
                "{what}"
            );
        }
        assert_eq!(
            counted(&loaded),
            [
                ("drop_plaintext_strict", 2),
                ("drop_fragment", 2),
                ("drop_non_tcp_strict", 2)
            ]
        );
        // The agent's own packets (its sockets carry the mark) are not judged.
        for (what, packet, _) in &cases {
            assert_eq!(
                run(&loaded, prog, packet, from_agent).action,
                TC_ACT_OK,
                "{what}"
            );
        }
        assert_eq!(
            counted(&loaded),
            [
                ("drop_plaintext_strict", 2),
                ("drop_fragment", 2),
                ("drop_non_tcp_strict", 2)
            ]
        );
    });
}

#[test]
fn one_strict_port_makes_tcp_fragments_to_the_pod_unjudgeable() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        add_workload(
            &mut loaded,
            POD,
            workload(
                pod.ifindex,
                WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT_PORTS,
            ),
        );
        let mut ports: HashMap<_, PortKey, u32> =
            HashMap::try_from(loaded.ebpf.map_mut(pins::PORT_MTLS).expect("port map"))
                .expect("hash map");
        let strict_port = PortKey {
            ip: ip_key(POD),
            port: 5432,
            _pad: 0,
        };
        ports
            .insert(strict_port, PORT_MTLS_STRICT, 0)
            .expect("insert");
        let prog = program(&mut loaded, programs::TC_TO_POD);
        let from_peer = Context {
            ifindex: 1,
            mark: 0,
        };
        let [first, rest] = fragmented_syn(MESHED_POD, POD, 40000, 5432);
        let cases = [
            (
                "SYN to the STRICT port",
                tcp_packet(MESHED_POD, POD, 40000, 5432, TCP_SYN),
                TC_ACT_SHOT,
            ),
            (
                "SYN to another port",
                tcp_packet(MESHED_POD, POD, 40000, 8080, TCP_SYN),
                TC_ACT_OK,
            ),
            ("first fragment", first, TC_ACT_SHOT),
            ("non-first fragment", rest, TC_ACT_SHOT),
            (
                "UDP (the workload is PERMISSIVE)",
                udp_packet(MESHED_POD, POD, 5353, 5353),
                TC_ACT_OK,
            ),
        ];
        for (what, packet, action) in &cases {
            assert_eq!(
                run(&loaded, prog, packet, from_peer).action,
                *action,
                "{what}"
            );
        }
        assert_eq!(
            counted(&loaded),
            [("drop_plaintext_strict", 1), ("drop_fragment", 2)]
        );
    });
}

#[test]
fn a_strict_pods_own_connections_outside_the_mesh_are_answered_and_nothing_else() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        add_workload(
            &mut loaded,
            POD,
            workload(pod.ifindex, WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT),
        );
        let from_pod = program(&mut loaded, programs::TC_FROM_POD);
        let to_pod = program(&mut loaded, programs::TC_TO_POD);
        let inbound = Context {
            ifindex: 1,
            mark: 0,
        };
        let answer = tcp_packet(OUTSIDE, POD, 443, 40000, TCP_SYN | TCP_ACK);
        assert_eq!(
            run(&loaded, to_pod, &answer, inbound).action,
            TC_ACT_SHOT,
            "before the pod opened anything, an answer is plaintext into a STRICT pod"
        );

        // The pod opens a connection to an address outside the mesh.
        let syn = tcp_packet(POD, OUTSIDE, 40000, 443, TCP_SYN);
        assert_eq!(run(&loaded, from_pod, &syn, pod).action, TC_ACT_OK);
        for segment in [
            tcp_packet(OUTSIDE, POD, 443, 40000, TCP_SYN | TCP_ACK),
            tcp_packet(OUTSIDE, POD, 443, 40000, TCP_ACK),
        ] {
            assert_eq!(run(&loaded, to_pod, &segment, inbound).action, TC_ACT_OK);
        }
        // Not that connection, or a SYN opening one into the pod: dropped.
        for (what, segment) in [
            (
                "a SYN on the same addresses",
                tcp_packet(OUTSIDE, POD, 443, 40000, TCP_SYN),
            ),
            (
                "another peer port",
                tcp_packet(OUTSIDE, POD, 444, 40000, TCP_ACK),
            ),
            (
                "another pod port",
                tcp_packet(OUTSIDE, POD, 443, 40001, TCP_ACK),
            ),
            (
                "another peer",
                tcp_packet(MESHED_POD, POD, 443, 40000, TCP_ACK),
            ),
        ] {
            assert_eq!(
                run(&loaded, to_pod, &segment, inbound).action,
                TC_ACT_SHOT,
                "{what}"
            );
        }
        // A connection to a meshed destination goes to the agent and records nothing.
        let captured = tcp_packet(POD, MESHED_POD, 40002, 8080, TCP_SYN);
        run(&loaded, from_pod, &captured, pod);
        let answer = tcp_packet(MESHED_POD, POD, 8080, 40002, TCP_SYN | TCP_ACK);
        assert_eq!(run(&loaded, to_pod, &answer, inbound).action, TC_ACT_SHOT);
        assert_eq!(
            counted(&loaded),
            [
                ("passed", 1),
                ("drop_no_proxy", 1),
                ("drop_plaintext_strict", 6),
                ("passed_pod_opened", 2)
            ]
        );
    });
}

#[test]
fn under_strict_the_node_reaches_only_the_probe_ports_in_plaintext() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        add_workload(
            &mut loaded,
            POD,
            workload(pod.ifindex, WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT),
        );
        let node = Ipv4Addr::new(169, 254, 1, 1);
        // A local pod that did not fit in the workload map: only the agent reaches it,
        // probes or not (its answers could not leave: its source is no one's).
        let unlisted = Ipv4Addr::new(10, 244, 1, 9);
        let mut probes: HashMap<_, PortKey, u32> =
            HashMap::try_from(loaded.ebpf.map_mut(pins::PROBE_PORTS).expect("probe map"))
                .expect("hash map");
        for pod in [POD, unlisted] {
            let probe_port = PortKey {
                ip: ip_key(pod),
                port: 8081,
                _pad: 0,
            };
            probes.insert(probe_port, ip_key(node), 0).expect("insert");
        }
        let prog = program(&mut loaded, programs::TC_TO_POD);
        let from_node = Context {
            ifindex: 1,
            mark: 0,
        };
        let cases = [
            (
                "the node's SYN to the probe port",
                tcp_packet(node, POD, 40000, 8081, TCP_SYN),
                TC_ACT_OK,
            ),
            (
                "the node's ACK to the probe port",
                tcp_packet(node, POD, 40000, 8081, TCP_ACK),
                TC_ACT_OK,
            ),
            (
                "the node's SYN to another port",
                tcp_packet(node, POD, 40001, 8080, TCP_SYN),
                TC_ACT_SHOT,
            ),
            (
                "another address's SYN to the probe port",
                tcp_packet(MESHED_POD, POD, 40002, 8081, TCP_SYN),
                TC_ACT_SHOT,
            ),
            (
                "a neighbour pod's SYN to the probe port",
                tcp_packet(NEIGHBOUR, POD, 40003, 8081, TCP_SYN),
                TC_ACT_SHOT,
            ),
            (
                "the node's SYN to the probe port of a pod missing from the map",
                tcp_packet(node, unlisted, 40004, 8081, TCP_SYN),
                TC_ACT_SHOT,
            ),
            (
                "the node's SYN to another port of that pod",
                tcp_packet(node, unlisted, 40005, 8080, TCP_SYN),
                TC_ACT_SHOT,
            ),
        ];
        for (what, packet, action) in &cases {
            assert_eq!(
                run(&loaded, prog, packet, from_node).action,
                *action,
                "{what}"
            );
        }
        assert_eq!(
            counted(&loaded),
            [
                ("drop_plaintext_strict", 3),
                ("drop_no_workload", 2),
                ("passed_node_probe", 2)
            ]
        );
    });
}

/// `MESH_POLICY` entries, as the agent's `sync_maps` writes `kernel_verdicts`.
fn set_policy(loaded: &mut Loaded, entries: &[(Ipv4Addr, Ipv4Addr, u16, u32)]) {
    let mut policy: HashMap<_, PolicyKey, u32> =
        HashMap::try_from(loaded.ebpf.map_mut(pins::POLICY).expect("policy map"))
            .expect("hash map");
    for &(src, dst, port, verdict) in entries {
        let key = PolicyKey {
            src_ip: ip_key(src),
            dst_ip: ip_key(dst),
            dst_port: port,
            _pad: 0,
        };
        policy.insert(key, verdict, 0).expect("insert policy");
    }
}

#[test]
fn a_port_entry_of_the_policy_map_wins_over_the_all_ports_entry() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        // Port 0 is "every other port" of the destination.
        set_policy(
            &mut loaded,
            &[
                (POD, MESHED_POD, 0, POLICY_DENY),
                (POD, MESHED_POD, 8080, POLICY_ALLOW),
                (POD, NEIGHBOUR, 0, POLICY_ALLOW),
                (POD, NEIGHBOUR, 9090, POLICY_DENY),
                (POD, SERVICE, 80, POLICY_DENY),
                // Another source's entry never judges this pod's SYNs.
                (NEIGHBOUR, MESHED_POD, 8080, POLICY_DENY),
            ],
        );
        let prog = program(&mut loaded, programs::TC_FROM_POD);
        // No capture listener here: a SYN the policy lets through is dropped as
        // `drop_no_proxy`, one it denies as `drop_policy_denied`, both unmarked.
        let cases = [
            (
                "the port's ALLOW over the all-ports DENY",
                MESHED_POD,
                8080,
                "drop_no_proxy",
            ),
            (
                "another port of that destination: the all-ports DENY",
                MESHED_POD,
                9090,
                "drop_policy_denied",
            ),
            (
                "the port's DENY over the all-ports ALLOW",
                NEIGHBOUR,
                9090,
                "drop_policy_denied",
            ),
            (
                "another port of that destination: the all-ports ALLOW",
                NEIGHBOUR,
                8080,
                "drop_no_proxy",
            ),
            ("a denied Service port", SERVICE, 80, "drop_policy_denied"),
        ];
        for (sport, (what, dst, port, reason)) in (40000..).zip(cases) {
            let before = counted(&loaded);
            let outcome = run(
                &loaded,
                prog,
                &tcp_packet(POD, dst, sport, port, TCP_SYN),
                pod,
            );
            assert_eq!(
                outcome,
                Run {
                    action: TC_ACT_SHOT,
                    mark: 0
                },
                "{what}"
            );
            let moved: Vec<_> = counted(&loaded)
                .into_iter()
                .filter(|c| !before.contains(c))
                .map(|(name, _)| name)
                .collect();
            assert_eq!(moved, [reason], "{what}");
        }
        assert_eq!(
            counted(&loaded),
            [("drop_no_proxy", 2), ("drop_policy_denied", 3)]
        );

        // With the agent listening, the allowed SYN reaches the capture listener (the
        // refused assignment BPF_PROG_TEST_RUN always gives), the denied one never does.
        let listener = tokio_free_listener();
        let allowed = run(
            &loaded,
            prog,
            &tcp_packet(POD, MESHED_POD, 40010, 8080, TCP_SYN),
            pod,
        );
        let denied = run(
            &loaded,
            prog,
            &tcp_packet(POD, MESHED_POD, 40011, 9090, TCP_SYN),
            pod,
        );
        assert_eq!((allowed.action, denied.action), (TC_ACT_SHOT, TC_ACT_SHOT));
        assert_eq!(
            counted(&loaded),
            [
                ("drop_no_proxy", 2),
                ("drop_assign_failed", 1),
                ("drop_policy_denied", 4)
            ]
        );
        drop(listener);
    });
}

#[test]
fn under_strict_only_the_agents_exact_mark_lets_plaintext_tcp_in() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        add_workload(
            &mut loaded,
            POD,
            workload(pod.ifindex, WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT),
        );
        let prog = program(&mut loaded, programs::TC_TO_POD);
        let syn = tcp_packet(MESHED_POD, POD, 40000, 9090, TCP_SYN);
        let mid_stream = tcp_packet(MESHED_POD, POD, 40000, 9090, TCP_ACK);
        // The capture mark, the agent's mark with another bit, no mark: none is the
        // agent's socket, so all of it is plaintext that bypassed the mesh.
        for mark in [0, CAPTURE_MARK, AGENT_MARK | 0x0001_0000, AGENT_MARK << 1] {
            for packet in [&syn, &mid_stream] {
                let outcome = run(&loaded, prog, packet, Context { ifindex: 1, mark });
                assert_eq!(
                    outcome,
                    Run {
                        action: TC_ACT_SHOT,
                        mark
                    },
                    "mark {mark:#x}"
                );
            }
        }
        assert_eq!(counted(&loaded), [("drop_plaintext_strict", 8)]);
        for packet in [&syn, &mid_stream] {
            let outcome = run(
                &loaded,
                prog,
                packet,
                Context {
                    ifindex: 1,
                    mark: AGENT_MARK,
                },
            );
            assert_eq!(
                outcome,
                Run {
                    action: TC_ACT_OK,
                    mark: AGENT_MARK
                }
            );
        }
        assert_eq!(
            counted(&loaded),
            [("drop_plaintext_strict", 8)],
            "the agent's packets pass uncounted"
        );
        // A PERMISSIVE pod takes plaintext from anyone.
        add_workload(&mut loaded, POD, workload(pod.ifindex, WORKLOAD_FLAG_LOCAL));
        let outcome = run(
            &loaded,
            prog,
            &syn,
            Context {
                ifindex: 1,
                mark: 0,
            },
        );
        assert_eq!(
            outcome,
            Run {
                action: TC_ACT_OK,
                mark: 0
            }
        );
        assert_eq!(counted(&loaded), [("drop_plaintext_strict", 8)]);
    });
}

/// The agent's lease, renewed now.
fn renew_lease(loaded: &mut Loaded) {
    let mut lease: Array<_, u64> =
        Array::try_from(loaded.ebpf.map_mut(pins::AGENT_LEASE).expect("lease map")).expect("array");
    lease
        .set(AGENT_LEASE_KEY, monotonic_ns(), 0)
        .expect("renew the lease");
}

/// The key of a connection's end that sends from `from` to `to`.
fn flow_key(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey {
        local_ip: ip_key(from.0),
        remote_ip: ip_key(to.0),
        local_port: from.1,
        remote_port: to.1,
    }
}

/// `MESH_DIRECT_FLOWS`: the veth a direct connection's end sends on, by what it sends.
fn direct_entry(loaded: &Loaded, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) -> Option<u32> {
    let flows: HashMap<_, FlowKey, u32> =
        HashMap::try_from(loaded.ebpf.map(pins::DIRECT_FLOWS).expect("direct flows"))
            .expect("hash map");
    flows.get(&flow_key(from, to), 0).ok()
}

/// What moved in the verdict counters since `before`.
fn moved(loaded: &Loaded, before: &[(&'static str, u64)]) -> Vec<&'static str> {
    counted(loaded)
        .into_iter()
        .filter(|c| !before.contains(c))
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn a_connection_between_two_pods_of_the_node_goes_direct_while_the_agent_lives() {
    in_new_netns(|| {
        let mut loaded = load();
        let pod = mesh(&mut loaded);
        let neighbour_ifindex = veth_interface("pod1");
        add_workload(
            &mut loaded,
            NEIGHBOUR,
            workload(
                neighbour_ifindex,
                WORKLOAD_FLAG_LOCAL | WORKLOAD_FLAG_MTLS_STRICT,
            ),
        );
        let neighbour = Context {
            ifindex: neighbour_ifindex,
            mark: 0,
        };
        // Direct to the neighbour except on 9090, which needs the agent (an L7 policy);
        // the neighbour reaches the pod through the agent.
        set_policy(
            &mut loaded,
            &[
                (POD, NEIGHBOUR, 0, POLICY_DIRECT),
                (POD, NEIGHBOUR, 9090, POLICY_ALLOW),
            ],
        );
        let from_pod = program(&mut loaded, programs::TC_FROM_POD);
        let to_pod = program(&mut loaded, programs::TC_TO_POD);
        let passed = Run {
            action: TC_ACT_OK,
            mark: 0,
        };
        let dropped = Run {
            action: TC_ACT_SHOT,
            mark: 0,
        };
        let step = |loaded: &Loaded, prog, packet: &[u8], at: Context, ingress: u32| {
            let before = counted(loaded);
            let (outcome, _) = run_arrived(loaded, prog, packet, at, ingress);
            (outcome, moved(loaded, &before))
        };

        // No agent lease: the verdict is not trusted, the SYN goes the agent's way (and,
        // no agent listening here, is dropped).
        let syn = tcp_packet(POD, NEIGHBOUR, 40000, 8080, TCP_SYN);
        assert_eq!(
            step(&loaded, from_pod, &syn, pod, 0),
            (dropped, vec!["drop_no_proxy"])
        );
        assert_eq!(direct_entry(&loaded, (POD, 40000), (NEIGHBOUR, 8080)), None);

        renew_lease(&mut loaded);
        let syn = tcp_packet(POD, NEIGHBOUR, 40001, 8080, TCP_SYN);
        assert_eq!(
            step(&loaded, from_pod, &syn, pod, 0),
            (passed, vec!["direct_new"]),
            "forwarded as it is, unmarked"
        );
        assert_eq!(
            direct_entry(&loaded, (POD, 40001), (NEIGHBOUR, 8080)),
            Some(pod.ifindex)
        );
        assert_eq!(
            direct_entry(&loaded, (NEIGHBOUR, 8080), (POD, 40001)),
            Some(neighbour_ifindex)
        );

        // Into the STRICT neighbour: only what entered the node on the pod's own veth.
        assert_eq!(
            step(&loaded, to_pod, &syn, neighbour, pod.ifindex),
            (passed, vec!["passed_direct_strict"])
        );
        for (what, ingress) in [
            ("from the node itself", 0),
            ("from another interface", neighbour_ifindex),
        ] {
            assert_eq!(
                step(&loaded, to_pod, &syn, neighbour, ingress),
                (dropped, vec!["drop_plaintext_strict"]),
                "{what}"
            );
        }

        // The answers and the rest of the connection, both ways, by their entries.
        let syn_ack = tcp_packet(NEIGHBOUR, POD, 8080, 40001, TCP_SYN | TCP_ACK);
        assert_eq!(
            step(&loaded, from_pod, &syn_ack, neighbour, 0),
            (passed, vec!["direct_established"])
        );
        let ack = tcp_packet(POD, NEIGHBOUR, 40001, 8080, TCP_ACK);
        assert_eq!(
            step(&loaded, from_pod, &ack, pod, 0),
            (passed, vec!["direct_established"])
        );
        // Another pod's veth cannot use them.
        assert_eq!(
            step(&loaded, from_pod, &ack, neighbour, 0),
            (dropped, vec!["drop_spoofed_source"])
        );

        // Evicted entries: the client's next packet writes both again from its verdict,
        // the server's only while the client's entry is there.
        let forget = |loaded: &mut Loaded, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)| {
            let mut flows: HashMap<_, FlowKey, u32> = HashMap::try_from(
                loaded
                    .ebpf
                    .map_mut(pins::DIRECT_FLOWS)
                    .expect("direct flows"),
            )
            .expect("hash map");
            flows
                .remove(&flow_key(from, to))
                .expect("an entry to evict");
        };
        forget(&mut loaded, (NEIGHBOUR, 8080), (POD, 40001));
        assert_eq!(
            step(&loaded, from_pod, &syn_ack, neighbour, 0),
            (passed, vec!["direct_established"]),
            "the server, vouched for by the client's entry"
        );
        forget(&mut loaded, (POD, 40001), (NEIGHBOUR, 8080));
        forget(&mut loaded, (NEIGHBOUR, 8080), (POD, 40001));
        assert_eq!(
            step(&loaded, from_pod, &syn_ack, neighbour, 0),
            (dropped, vec!["drop_no_flow"]),
            "the server alone cannot say the connection is direct"
        );
        assert_eq!(
            step(&loaded, from_pod, &ack, pod, 0),
            (passed, vec!["direct_established"]),
            "the client can"
        );
        assert_eq!(
            direct_entry(&loaded, (NEIGHBOUR, 8080), (POD, 40001)),
            Some(neighbour_ifindex)
        );

        // The port that needs the agent: its SYN is the agent's and takes away the
        // entries an earlier direct connection of the same addresses left; its segments
        // without an agent socket are dropped, from the client and from the server.
        renew_lease(&mut loaded);
        let stale = tcp_packet(POD, NEIGHBOUR, 40002, 9090, TCP_SYN);
        set_policy(&mut loaded, &[(POD, NEIGHBOUR, 9090, POLICY_DIRECT)]);
        assert_eq!(
            step(&loaded, from_pod, &stale, pod, 0),
            (passed, vec!["direct_new"])
        );
        set_policy(&mut loaded, &[(POD, NEIGHBOUR, 9090, POLICY_ALLOW)]);
        assert_eq!(
            step(&loaded, from_pod, &stale, pod, 0),
            (dropped, vec!["drop_no_proxy"])
        );
        assert_eq!(direct_entry(&loaded, (POD, 40002), (NEIGHBOUR, 9090)), None);
        assert_eq!(direct_entry(&loaded, (NEIGHBOUR, 9090), (POD, 40002)), None);
        for (what, packet, at) in [
            (
                "client",
                tcp_packet(POD, NEIGHBOUR, 40002, 9090, TCP_ACK),
                pod,
            ),
            (
                "server",
                tcp_packet(NEIGHBOUR, POD, 9090, 40002, TCP_ACK),
                neighbour,
            ),
        ] {
            assert_eq!(
                step(&loaded, from_pod, &packet, at, 0),
                (dropped, vec!["drop_no_flow"]),
                "{what}"
            );
        }
        // Once the neighbour may reach the pod's ports directly, what it sends to them
        // passes: nothing it could not send on a direct connection of its own.
        set_policy(&mut loaded, &[(NEIGHBOUR, POD, 0, POLICY_DIRECT)]);
        assert_eq!(
            step(
                &loaded,
                from_pod,
                &tcp_packet(NEIGHBOUR, POD, 9090, 40002, TCP_ACK),
                neighbour,
                0
            ),
            (passed, vec!["direct_established"])
        );
    });
}

/// The agent's transparent capture listener, bound in the current network namespace.
fn tokio_free_listener() -> std::net::TcpListener {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let listener = transparent_listener(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        OUTBOUND_CAPTURE_PORT,
    ))
    .expect("capture listener");
    listener.into_std().expect("std listener")
}
