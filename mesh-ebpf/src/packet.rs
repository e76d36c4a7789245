//! Bounds-checked access to the Ethernet, ARP, IPv4, TCP and ICMP headers of a tc packet.
//!
//! A header that is not in the linear data is pulled in (`bpf_skb_pull_data`) and looked
//! at again before it is given up on: how the kernel happened to lay a packet out must
//! never decide whether it is judged. `None` from here means the packet really is too
//! short or malformed, and the programs drop it.

use aya_ebpf::programs::TcContext;

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ARP_HARDWARE_ETHERNET: u16 = 1;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// The DNS port: answers from the cluster's resolver come from it.
pub const DNS_PORT: u16 = 53;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag and fragment offset, in host order of `frag_off`.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// The longest IPv4 header (ihl 15).
const IPV4_MAX_HDR_LEN: usize = 60;

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The first 14 bytes of a TCP header: the ports, sequence numbers and flags.
#[repr(C)]
pub struct TcpPorts {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub data_offset: u8,
    pub flags: u8,
}

/// An ARP message for IPv4 over Ethernet, up to the sender's addresses.
#[repr(C)]
pub struct ArpIpv4 {
    pub hardware: u16,
    pub protocol: u16,
    pub hardware_len: u8,
    pub protocol_len: u8,
    pub operation: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
}

/// An ICMP header (type, code, checksum and the four bytes every message has).
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub checksum: u16,
    pub rest: u32,
}

/// A UDP header.
#[repr(C)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

/// The fields of an IPv4 packet the programs decide on; addresses as on the wire.
pub struct Ipv4Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub protocol: u8,
    /// Where the L4 header starts: after the Ethernet header and every IP option.
    pub l4_offset: usize,
    /// A fragment, first or not (Cilium's `ipv4_is_fragment`): a non-first fragment
    /// carries no L4 header, a first one may carry a truncated one, so its L4 header is
    /// never read.
    pub fragment: bool,
}

/// A pointer to a `T` at `offset` when it lies in the linear data.
#[inline(always)]
fn linear<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// A pointer to a `T` at `offset`, pulling the packet's first `offset + size_of::<T>()`
/// bytes into the linear data when they are not there yet.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    if let Some(ptr) = linear(ctx, offset) {
        return Some(ptr);
    }
    // Fails when the packet is shorter than that: nothing to judge, then.
    ctx.pull_data((offset + core::mem::size_of::<T>()) as u32)
        .ok()?;
    linear(ctx, offset)
}

/// The EtherType of the frame (host order); `None` for a frame shorter than its header.
#[inline(always)]
pub fn ether_type(ctx: &TcContext) -> Option<u16> {
    let ether_type: *const u16 = ptr_at(ctx, 12)?;
    // SAFETY: bounds checked by ptr_at.
    Some(u16::from_be(unsafe { *ether_type }))
}

/// The source MAC address of the frame (already known to hold its Ethernet header).
#[inline(always)]
pub fn source_mac(ctx: &TcContext) -> Option<[u8; 6]> {
    let mac: *const [u8; 6] = ptr_at(ctx, 6)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { *mac })
}

/// The sender's protocol address (as on the wire) of an ARP message for IPv4 over
/// Ethernet; `None` for a message cut short or of any other kind.
#[inline(always)]
pub fn arp_sender(ctx: &TcContext) -> Option<u32> {
    let arp: *const ArpIpv4 = ptr_at(ctx, ETH_HDR_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let arp = unsafe { &*arp };
    let ipv4_over_ethernet = u16::from_be(arp.hardware) == ARP_HARDWARE_ETHERNET
        && u16::from_be(arp.protocol) == ETH_P_IP
        && arp.hardware_len == 6
        && arp.protocol_len == 4;
    // The sender address is not 4-byte aligned in the message.
    ipv4_over_ethernet.then(|| u32::from_ne_bytes(arp.sender_ip))
}

/// Parses the IPv4 header of a frame whose EtherType is IPv4; `None` when it is cut short
/// or is not a valid IPv4 header (version, header length).
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4Packet> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HDR_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    Some(Ipv4Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        protocol: ip.protocol,
        l4_offset: ETH_HDR_LEN + ihl,
        fragment: u16::from_be(ip.frag_off) & (IP_MF | IP_OFFSET) != 0,
    })
}

/// Source port, destination port (both as on the wire) and flags of a TCP segment.
#[inline(always)]
pub fn parse_tcp(ctx: &TcContext, offset: usize) -> Option<(u16, u16, u8)> {
    // The verifier needs a constant bound on the variable IPv4 header length.
    if offset > ETH_HDR_LEN + IPV4_MAX_HDR_LEN {
        return None;
    }
    let tcp: *const TcpPorts = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    let tcp = unsafe { &*tcp };
    Some((tcp.source, tcp.dest, tcp.flags))
}

/// The type of an ICMP message.
#[inline(always)]
pub fn icmp_type(ctx: &TcContext, offset: usize) -> Option<u8> {
    if offset > ETH_HDR_LEN + IPV4_MAX_HDR_LEN {
        return None;
    }
    // The whole 8-byte header, which every ICMP message has (a one-byte read would also
    // be checked in a form the verifier does not credit with a range).
    let icmp: *const IcmpHdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { (*icmp).kind })
}

/// The UDP source and destination ports, in network order.
#[inline(always)]
pub fn udp_ports(ctx: &TcContext, offset: usize) -> Option<(u16, u16)> {
    if offset > ETH_HDR_LEN + IPV4_MAX_HDR_LEN {
        return None;
    }
    let udp: *const UdpHdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { ((*udp).source, (*udp).dest) })
}
