//! The tc program `tc_from_pod` run with BPF_PROG_TEST_RUN on crafted packets: what it
//! passes, what it steers to the agent, what it drops and why, and what it counts.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use bpf_tests::{in_new_netns, ipv6_frame, load, tcp_packet, udp_packet, Loaded, TCP_ACK, TCP_SYN};
use mesh_agent::{
    datapath::{ip_key, service_key},
    proxy::socket::transparent_listener,
};
use mesh_common::{
    pins, programs, verdict, ServiceInfo, TrafficCounters, TrafficKey, WorkloadInfo, CAPTURE_MARK,
    DIRECTION_FROM_POD, NAME_LEN, OUTBOUND_CAPTURE_PORT,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const MESHED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Offset of `mark` in `struct __sk_buff`.
const SKB_MARK_OFFSET: usize = 8;

struct Run {
    action: u32,
    mark: u32,
}

fn program(loaded: &mut Loaded) -> &mut SchedClassifier {
    let prog: &mut SchedClassifier = loaded
        .ebpf
        .program_mut(programs::TC_FROM_POD)
        .expect("program in the object")
        .try_into()
        .expect("a tc program");
    prog.load().expect("verifier accepts tc_from_pod");
    prog
}

fn run(prog: &SchedClassifier, packet: &[u8]) -> Run {
    let ctx_in = [0u8; 192];
    let mut ctx_out = [0u8; 192];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
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
    Run {
        action: result.return_value,
        mark,
    }
}

fn verdicts(loaded: &Loaded) -> Vec<u64> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(loaded.ebpf.map(pins::TC_VERDICTS).expect("verdict map"))
            .expect("per-CPU array");
    (0..verdict::COUNT)
        .map(|i| map.get(&i, 0).expect("verdict").iter().sum())
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

fn mesh_destinations(loaded: &mut Loaded) {
    let mut workloads: HashMap<_, u32, WorkloadInfo> =
        HashMap::try_from(loaded.ebpf.map_mut(pins::WORKLOADS).expect("workload map"))
            .expect("hash map");
    let info = WorkloadInfo {
        namespace: [0; NAME_LEN],
        name: [0; NAME_LEN],
        workload: [0; NAME_LEN],
        service_account: [0; NAME_LEN],
        ifindex: 0,
        flags: 0,
    };
    workloads
        .insert(ip_key(MESHED_POD), info, 0)
        .expect("insert workload");
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
}

#[test]
fn traffic_to_unmeshed_destinations_passes_and_is_counted() {
    in_new_netns(|| {
        let mut loaded = load();
        mesh_destinations(&mut loaded);
        let prog = program(&mut loaded);
        let syn = tcp_packet(POD, OUTSIDE, 40000, 443, TCP_SYN);
        let udp = udp_packet(POD, MESHED_POD, 5353, 53);
        let service_other_port = tcp_packet(POD, SERVICE, 40001, 8443, TCP_SYN);
        for packet in [&syn, &udp, &service_other_port] {
            let outcome = run(prog, packet);
            assert_eq!(outcome.action, TC_ACT_OK);
            assert_eq!(outcome.mark, 0, "passed packets are not marked");
        }
        assert_eq!(run(prog, &ipv6_frame()).action, TC_ACT_OK);
        // A TCP header cut short cannot open a connection: left to the kernel, which drops it.
        let truncated = tcp_packet(POD, SERVICE, 40002, 80, TCP_SYN);
        assert_eq!(run(prog, &truncated[..38]).action, TC_ACT_OK);

        assert_eq!(verdicts(&loaded)[verdict::PASSED as usize], 4);
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
        mesh_destinations(&mut loaded);
        let prog = program(&mut loaded);
        let to_pod = run(prog, &tcp_packet(POD, MESHED_POD, 40000, 8080, TCP_SYN));
        let to_service = run(prog, &tcp_packet(POD, SERVICE, 40001, 80, TCP_SYN));
        assert_eq!(
            (to_pod.action, to_service.action),
            (TC_ACT_SHOT, TC_ACT_SHOT)
        );
        let mid_stream = run(prog, &tcp_packet(POD, SERVICE, 40002, 80, TCP_ACK));
        assert_eq!(mid_stream.action, TC_ACT_SHOT);
        let counts = verdicts(&loaded);
        assert_eq!(counts[verdict::DROP_NO_PROXY as usize], 2);
        assert_eq!(counts[verdict::DROP_NO_FLOW as usize], 1);
        assert_eq!(counts[verdict::PASSED as usize], 0);
    });
}

#[test]
fn new_connection_to_a_meshed_destination_finds_the_capture_listener() {
    in_new_netns(|| {
        let runtime = tokio_free_listener();
        let mut loaded = load();
        mesh_destinations(&mut loaded);
        let prog = program(&mut loaded);
        let outcome = run(prog, &tcp_packet(POD, SERVICE, 40000, 80, TCP_SYN));
        let counts = verdicts(&loaded);
        // BPF_PROG_TEST_RUN does not run at a real tc ingress, where bpf_sk_assign is
        // allowed: the listener being found shows as a refused assignment, not as
        // "no proxy". The sandbox tests cover the real steering end to end.
        assert_eq!(
            counts[verdict::DROP_NO_PROXY as usize],
            0,
            "the capture listener was not found"
        );
        assert_eq!(
            counts[verdict::STEERED_NEW as usize] + counts[verdict::DROP_ASSIGN_FAILED as usize],
            1
        );
        if counts[verdict::STEERED_NEW as usize] == 1 {
            assert_eq!((outcome.action, outcome.mark), (TC_ACT_OK, CAPTURE_MARK));
        }
        drop(runtime);
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
