"""Plays a hostile pod with a raw socket (IP_HDRINCL): sends TCP SYNs the mesh must never
let through, each IPv4 packet with IP ID 0x4d45 so that the receiving side can tell them.

  fragments DST PORT N       N SYNs to DST:PORT, each split into two IPv4 fragments after
                             the first 8 bytes of the TCP header (ports and sequence
                             number in the first, flags in the second)
  spoof SRC DST PORT N       N whole SYNs to DST:PORT with the source address SRC
  segment SRC SPORT DST DPORT N
                             N data segments (ACK, PSH, 16 bytes) from SRC:SPORT to
                             DST:DPORT: another connection's addresses and ports

Source ports are 1001..1000+N unless given. Prints the number of IPv4 packets sent."""

import socket
import struct
import sys

ATTACK_ID = 0x4D45
IP_MF = 0x2000


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def own_address(dst):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((dst, 9))
    return probe.getsockname()[0]


def ip_header(src, dst, payload_len, frag_off):
    # The kernel fills in the header checksum for IP_HDRINCL; ID and fragment field are
    # sent as given.
    return struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + payload_len,
        ATTACK_ID,
        frag_off,
        64,
        socket.IPPROTO_TCP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )


def tcp_segment(src, dst, sport, dport, flags, payload):
    header = struct.pack("!HHIIBBHHH", sport, dport, 0x1000 + sport, 1, 0x50, flags, 64240, 0, 0)
    segment = header + payload
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0, socket.IPPROTO_TCP, len(segment))
    return header[:16] + struct.pack("!H", checksum(pseudo + segment)) + header[18:] + payload


def tcp_syn(src, dst, sport, dport):
    return tcp_segment(src, dst, sport, dport, 0x02, b"")


def main():
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    mode = sys.argv[1]
    sent = 0
    if mode == "fragments":
        dst, port, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        src = own_address(dst)
        for i in range(count):
            syn = tcp_syn(src, dst, 1001 + i, port)
            raw.sendto(ip_header(src, dst, 8, IP_MF) + syn[:8], (dst, 0))
            raw.sendto(ip_header(src, dst, len(syn) - 8, 1) + syn[8:], (dst, 0))
            sent += 2
    elif mode == "spoof":
        src, dst, port, count = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        for i in range(count):
            syn = tcp_syn(src, dst, 1001 + i, port)
            raw.sendto(ip_header(src, dst, len(syn), 0x4000) + syn, (dst, 0))
            sent += 1
    elif mode == "segment":
        src, sport, dst, dport = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        for _ in range(int(sys.argv[6])):
            segment = tcp_segment(src, dst, sport, dport, 0x18, b"forged segment!!")
            raw.sendto(ip_header(src, dst, len(segment), 0x4000) + segment, (dst, 0))
            sent += 1
    else:
        sys.exit("usage: fragments DST PORT N | spoof SRC DST PORT N | segment SRC SPORT DST DPORT N")
    print(sent)


main()
