//! Bounds-checked access to the Ethernet, IPv4 and TCP headers of a tc packet.

use aya_ebpf::programs::TcContext;

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_TCP: u8 = 6;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

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

#[repr(C)]
pub struct TcpPorts {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub data_offset: u8,
    pub flags: u8,
}

/// The fields of an IPv4 packet the programs decide on; addresses and ports as on the wire.
pub struct Ipv4Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub protocol: u8,
    pub l4_offset: usize,
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Parses Ethernet + IPv4; `None` for anything else or a truncated packet.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4Packet> {
    let ether_type: *const u16 = ptr_at(ctx, 12)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { *ether_type }) != ETH_P_IP {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HDR_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    Some(Ipv4Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        protocol: ip.protocol,
        l4_offset: ETH_HDR_LEN + ihl,
    })
}

/// Source port, destination port (both as on the wire) and flags of a TCP segment.
#[inline(always)]
pub fn parse_tcp(ctx: &TcContext, offset: usize) -> Option<(u16, u16, u8)> {
    // The verifier needs a constant bound on the variable IPv4 header length.
    if offset > ETH_HDR_LEN + 60 {
        return None;
    }
    let tcp: *const TcpPorts = ptr_at(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    let tcp = unsafe { &*tcp };
    Some((tcp.source, tcp.dest, tcp.flags))
}
