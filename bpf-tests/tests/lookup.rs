//! `capture_lookup`, the node namespace's socket lookup, attached as the agent attaches it
//! in a fresh network namespace, with real connections on its loopback standing in for a
//! pod's: which connections reach the agent's listeners (a local meshed pod's, from its
//! own interface, to a meshed destination or to port 53), which keep the kernel's usual
//! lookup, and a client reusing its port while the agent's end of its previous connection
//! is in TIME_WAIT, answered at the first SYN; and a pod on a bridge, whose connections and
//! DNS queries arrive on the bridge and reach the agent only through this lookup.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    time::Duration,
};

use aya::maps::Array;
use bpf_tests::{
    add_workload, close_server_first, connect_from, in_new_netns, in_time_wait, load,
    loopback_with, retransmissions, workload, Loaded,
};
use mesh_agent::datapath::{capture_lookup::CaptureLookup, ifindex};
use mesh_common::{capture_listener, pins, SETTINGS_KEY, SETTING_CAPTURE_DNS, WORKLOAD_FLAG_LOCAL};

/// A local meshed pod whose "veth" is the loopback its connections arrive on.
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// A local meshed pod recorded on another interface: connections from its address on
/// loopback did not come from it.
const ELSEWHERE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const MESHED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const UNMESHED: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A local meshed pod on a bridge, which the loopback stands for here.
const BRIDGED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);

/// The mesh's object loaded in a fresh namespace whose loopback carries every address
/// above, with the workload map as the agent fills it.
fn meshed_loopback() -> Loaded {
    let mut loaded = load();
    loopback_with(&[
        POD,
        ELSEWHERE_POD,
        MESHED_POD,
        UNMESHED,
        RESOLVER,
        BRIDGED_POD,
    ]);
    let lo = ifindex("lo").expect("lo");
    add_workload(&mut loaded, POD, workload(lo, WORKLOAD_FLAG_LOCAL));
    let mut bridged = workload(lo + 5000, WORKLOAD_FLAG_LOCAL);
    bridged.bridge_ifindex = lo;
    add_workload(&mut loaded, BRIDGED_POD, bridged);
    add_workload(
        &mut loaded,
        ELSEWHERE_POD,
        workload(lo + 4000, WORKLOAD_FLAG_LOCAL),
    );
    add_workload(&mut loaded, MESHED_POD, workload(0, 0));
    loaded
}

/// Sets `SETTING_CAPTURE_DNS`, as the agent does when it runs its DNS proxy.
fn turn_dns_capture_on(loaded: &mut Loaded) {
    let mut settings: Array<_, u32> =
        Array::try_from(loaded.ebpf.map_mut(pins::SETTINGS).expect("settings map")).expect("array");
    settings
        .set(SETTINGS_KEY, SETTING_CAPTURE_DNS, 0)
        .expect("turning the DNS capture on");
}

fn refused(from: SocketAddrV4, to: SocketAddrV4) -> bool {
    connect_from(from, to).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn a_local_pods_connection_to_a_meshed_destination_reaches_the_capture_listener() {
    in_new_netns(|| {
        let mut loaded = meshed_loopback();
        let capture = TcpListener::bind("0.0.0.0:15001").expect("capture listener");
        let mut lookup = CaptureLookup::attach(&mut loaded.ebpf).expect("attaching");
        let destination = SocketAddrV4::new(MESHED_POD, 8080);
        let from = |ip, port| SocketAddrV4::new(ip, port);

        // Until the agent names its listener, nothing is claimed.
        assert!(refused(from(POD, 40000), destination));
        lookup
            .claim(capture_listener::OUTBOUND, &capture)
            .expect("claiming");

        let client = connect_from(from(POD, 40001), destination).expect("captured");
        let (accepted, peer) = capture.accept().expect("accepting");
        assert_eq!(
            (accepted.local_addr().ok(), peer),
            (Some(destination.into()), from(POD, 40001).into()),
            "the capture listener holds the original destination"
        );
        // Not from the pod's own interface, or not to a meshed destination: the usual
        // lookup, which finds no listener there.
        assert!(refused(from(ELSEWHERE_POD, 40002), destination));
        assert!(refused(from(POD, 40003), SocketAddrV4::new(UNMESHED, 8080)));

        // The agent closes first, and the client reopens the same four addresses while
        // the agent's end is in TIME_WAIT: answered at once, the old socket retired.
        close_server_first(accepted, client);
        let again = connect_from(from(POD, 40001), destination).expect("reopened");
        let (reopened, _) = capture.accept().expect("accepting the reopened connection");
        assert_eq!(retransmissions(&again), 0, "the first SYN was answered");
        assert!(!in_time_wait(destination, from(POD, 40001)));
        drop((reopened, again));
    });
}

#[test]
fn a_local_pods_dns_over_tcp_reaches_the_dns_listener_while_the_capture_is_on() {
    in_new_netns(|| {
        let mut loaded = meshed_loopback();
        let dns = TcpListener::bind("0.0.0.0:15053").expect("DNS listener");
        let mut lookup = CaptureLookup::attach(&mut loaded.ebpf).expect("attaching");
        lookup.claim(capture_listener::DNS, &dns).expect("claiming");
        let resolver = SocketAddrV4::new(RESOLVER, 53);

        assert!(
            refused(SocketAddrV4::new(POD, 40000), resolver),
            "capture off"
        );
        turn_dns_capture_on(&mut loaded);
        let _client = connect_from(SocketAddrV4::new(POD, 40001), resolver).expect("captured");
        let (accepted, _) = dns.accept().expect("accepting");
        assert_eq!(accepted.local_addr().ok(), Some(resolver.into()));
    });
}

#[test]
fn a_bridged_pods_connections_and_dns_queries_arriving_on_its_bridge_reach_the_agent() {
    in_new_netns(|| {
        let mut loaded = meshed_loopback();
        let capture = TcpListener::bind("0.0.0.0:15001").expect("capture listener");
        let dns = UdpSocket::bind("0.0.0.0:15053").expect("DNS socket");
        dns.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut lookup = CaptureLookup::attach(&mut loaded.ebpf).expect("attaching");
        lookup
            .claim(capture_listener::OUTBOUND, &capture)
            .expect("claiming");
        lookup
            .claim(capture_listener::DNS_UDP, &dns)
            .expect("claiming the DNS socket");
        turn_dns_capture_on(&mut loaded);

        let destination = SocketAddrV4::new(MESHED_POD, 8080);
        let _client =
            connect_from(SocketAddrV4::new(BRIDGED_POD, 40000), destination).expect("captured");
        let (accepted, _) = capture.accept().expect("accepting");
        assert_eq!(accepted.local_addr().ok(), Some(destination.into()));

        let pod_socket = UdpSocket::bind(SocketAddrV4::new(BRIDGED_POD, 40001)).expect("bind");
        pod_socket
            .send_to(b"query", SocketAddrV4::new(RESOLVER, 53))
            .expect("sending");
        let mut buffer = [0u8; 16];
        let (len, from) = dns
            .recv_from(&mut buffer)
            .expect("the DNS socket got the query");
        assert_eq!(
            (&buffer[..len], from),
            (&b"query"[..], SocketAddrV4::new(BRIDGED_POD, 40001).into())
        );

        // Datagrams to other ports, and from pods not on this bridge, are left alone.
        pod_socket
            .send_to(b"other", SocketAddrV4::new(RESOLVER, 5353))
            .expect("sending");
        let routed_elsewhere =
            UdpSocket::bind(SocketAddrV4::new(ELSEWHERE_POD, 40002)).expect("bind");
        routed_elsewhere
            .send_to(b"elsewhere", SocketAddrV4::new(RESOLVER, 53))
            .expect("sending");
        dns.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert!(dns.recv_from(&mut buffer).is_err(), "nothing else arrived");
    });
}
