//! Helpers for the kernel-program tests: loading the mesh's eBPF object with its maps
//! pinned in a private bpffs directory, crafting packets, running code in a fresh
//! network namespace, and real TCP connections on its loopback (a connection left in
//! TIME_WAIT, as the agent leaves its end of one it closes first). These tests need root; they fail (never skip) without it.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{maps::HashMap, Ebpf, EbpfLoader};
use mesh_agent::datapath::{ensure_bpffs, ip_key, EBPF_OBJECT};
use mesh_common::{pins, WorkloadInfo, NAME_LEN};

/// The eBPF object loaded for one test; its pinned maps go away with it.
pub struct Loaded {
    pub ebpf: Ebpf,
    dir: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn load() -> Loaded {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "the eBPF tests need root (run them through `cargo xtask test`)"
    );
    let root = PathBuf::from("/sys/fs/bpf");
    ensure_bpffs(&root).expect("bpffs mounted at /sys/fs/bpf");
    let dir = root.join(format!(
        "mesh-tests-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating the pin directory");
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(EBPF_OBJECT)
        .expect("loading the eBPF object");
    Loaded { ebpf, dir }
}

/// A workload entry as the agent writes it, names left empty.
pub fn workload(ifindex: u32, flags: u32) -> WorkloadInfo {
    WorkloadInfo {
        namespace: [0; NAME_LEN],
        name: [0; NAME_LEN],
        workload: [0; NAME_LEN],
        service_account: [0; NAME_LEN],
        ifindex,
        flags,
        pod_mac: [0; 6],
        port_mac: [0; 6],
        bridge_ifindex: 0,
    }
}

/// Records the workload at `ip` in the loaded object's workload map.
pub fn add_workload(loaded: &mut Loaded, ip: Ipv4Addr, info: WorkloadInfo) {
    let mut workloads: HashMap<_, u32, WorkloadInfo> =
        HashMap::try_from(loaded.ebpf.map_mut(pins::WORKLOADS).expect("workload map"))
            .expect("hash map");
    workloads
        .insert(ip_key(ip), info, 0)
        .expect("insert workload");
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// How an IPv4 header is laid out beyond its addresses and protocol.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ipv4Shape<'a> {
    /// IP options, padded to a multiple of 4 bytes by the caller (ihl = 5 + len / 4).
    pub options: &'a [u8],
    /// Fragment offset in units of 8 bytes.
    pub fragment_offset: u16,
    /// The "more fragments" flag.
    pub more_fragments: bool,
}

fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    shape: Ipv4Shape,
) -> Vec<u8> {
    assert!(
        shape.options.len().is_multiple_of(4) && shape.options.len() <= 40,
        "IP options are whole words, at most 40 bytes"
    );
    let header_len = 20 + shape.options.len();
    let total = (header_len + payload_len) as u16;
    let mut frag_off = shape.fragment_offset & 0x1fff;
    if shape.more_fragments {
        frag_off |= 0x2000;
    } else if shape.fragment_offset == 0 {
        // Don't fragment, as a TCP stack sends it.
        frag_off |= 0x4000;
    }
    let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1]);
    ip.extend_from_slice(&frag_off.to_be_bytes());
    ip.extend_from_slice(&[64, protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(shape.options);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let check = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

/// An Ethernet header with the given EtherType.
pub fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// The 20 bytes of a TCP header without options (checksum not filled in).
fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp
}

/// An Ethernet + IPv4 + TCP segment (checksums of TCP are not checked by the programs).
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    tcp_packet_shaped(src, dst, sport, dport, flags, Ipv4Shape::default())
}

/// A TCP segment whose IPv4 header has the given options and fragment fields.
pub fn tcp_packet_shaped(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    shape: Ipv4Shape,
) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4_header(src, dst, 6, 20, shape));
    frame.extend(tcp_header(sport, dport, flags));
    frame
}

/// One fragment of an IPv4 datagram of `protocol`: the IPv4 header and `payload`, the
/// datagram's bytes from `offset * 8` on.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    offset: u16,
    more_fragments: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    let shape = Ipv4Shape {
        options: &[],
        fragment_offset: offset,
        more_fragments,
    };
    frame.extend(ipv4_header(src, dst, protocol, payload.len(), shape));
    frame.extend_from_slice(payload);
    frame
}

/// The two fragments of a TCP SYN split after the first 8 bytes of its header (the
/// smallest fragment payload): the first carries only the ports and the sequence number,
/// the second the flags.
pub fn fragmented_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> [Vec<u8>; 2] {
    let tcp = tcp_header(sport, dport, TCP_SYN);
    [
        ipv4_fragment(src, dst, 6, 0, true, &tcp[..8]),
        ipv4_fragment(src, dst, 6, 1, false, &tcp[8..]),
    ]
}

pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4_header(src, dst, 17, 8, Ipv4Shape::default()));
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&[0, 8, 0, 0]);
    frame
}

/// An ICMP message of the given type and code with 8 bytes of body.
pub fn icmp_packet(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4_header(src, dst, 1, 8, Ipv4Shape::default()));
    frame.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
    frame
}

/// An ARP request (who has `target`, tell `sender`).
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = ethernet(0x0806);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

pub fn ipv6_frame() -> Vec<u8> {
    let mut frame = ethernet(0x86dd);
    frame.extend_from_slice(&[0x60; 40]);
    frame
}

/// Creates a veth pair in the current network namespace and returns the index of its
/// first end: an interface other than `lo` for the programs' view of "the pod's veth".
pub fn veth_interface(name: &str) -> u32 {
    let peer = format!("{name}p");
    let status = std::process::Command::new("ip")
        .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
        .status()
        .expect("running ip");
    assert!(status.success(), "ip link add {name} type veth");
    mesh_agent::datapath::ifindex(name).expect("the interface's index")
}

/// Runs `f` on a thread inside a new, empty network namespace.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare on this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("test thread panicked")
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("running ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

/// Brings `lo` up in the current network namespace with `addresses` on it, so that
/// connections between them stay on loopback.
pub fn loopback_with(addresses: &[Ipv4Addr]) {
    ip(&["link", "set", "lo", "up"]);
    for address in addresses {
        ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
    }
}

/// A TCP connection from exactly `from` (address and port, as a client reusing its port
/// would) to `to`.
pub fn connect_from(from: SocketAddrV4, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&from.into())?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

/// Ends a connection server side first, as an HTTP/1.0 server (and the agent relaying
/// it) does: `server` sends its FIN, the client reads to the end and closes, and the
/// server's end stays in TIME_WAIT, which this waits to see.
pub fn close_server_first(server: TcpStream, mut client: TcpStream) {
    let ends = (
        socket_v4(server.local_addr()),
        socket_v4(server.peer_addr()),
    );
    drop(server);
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .expect("reading to the server's FIN");
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_time_wait(ends.0, ends.1) {
        assert!(
            Instant::now() < deadline,
            "the server's end {} → {} never entered TIME_WAIT",
            ends.0,
            ends.1
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn socket_v4(address: std::io::Result<std::net::SocketAddr>) -> SocketAddrV4 {
    match address.expect("a connected socket's address") {
        std::net::SocketAddr::V4(v4) => v4,
        other => panic!("not IPv4: {other}"),
    }
}

/// Whether this thread's network namespace holds a TIME_WAIT socket from `local` to
/// `peer` (read from /proc/thread-self/net/tcp: addresses in the kernel's byte order,
/// state 06).
pub fn in_time_wait(local: SocketAddrV4, peer: SocketAddrV4) -> bool {
    let hex = |a: SocketAddrV4| {
        format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )
    };
    let (local, peer) = (hex(local), hex(peer));
    std::fs::read_to_string("/proc/thread-self/net/tcp")
        .expect("reading /proc/thread-self/net/tcp")
        .lines()
        .skip(1)
        .any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1..4) == Some(&[local.as_str(), peer.as_str(), "06"])
        })
}

/// How many times the kernel retransmitted on `stream` (TCP_INFO's total): 0 after a
/// connect means the SYN was answered the first time.
pub fn retransmissions(stream: &TcpStream) -> u32 {
    // SAFETY: an all-zero tcp_info is a valid value of this plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}
