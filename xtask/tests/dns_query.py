"""Asks a DNS server one A question, over UDP or TCP, and prints what came back:
`rcode=N answers=A,B` (no resolver library in between, so the test sees the wire)."""

import argparse
import socket
import struct


def question(name: str) -> bytes:
    header = struct.pack(">HHHHHH", 0x4D53, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack(">HH", 1, 1)


def skip_name(message: bytes, offset: int) -> int:
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def addresses(message: bytes) -> list:
    count = struct.unpack(">H", message[6:8])[0]
    offset = skip_name(message, 12) + 4
    found = []
    for _ in range(count):
        offset = skip_name(message, offset)
        kind, _, _, length = struct.unpack(">HHIH", message[offset : offset + 10])
        offset += 10
        if kind == 1 and length == 4:
            found.append(socket.inet_ntoa(message[offset : offset + 4]))
        offset += length
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--server", default="10.96.0.10")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--tcp", action="store_true")
    args = parser.parse_args()
    query = question(args.name)
    if args.tcp:
        with socket.create_connection((args.server, args.port), timeout=5) as conn:
            conn.sendall(struct.pack(">H", len(query)) + query)
            length = struct.unpack(">H", conn.recv(2))[0]
            reply = b""
            while len(reply) < length:
                reply += conn.recv(length - len(reply))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(3)
            udp.sendto(query, (args.server, args.port))
            try:
                reply, sender = udp.recvfrom(4096)
            except socket.timeout:
                print("no answer")
                return
            print(f"from={sender[0]}:{sender[1]}", end=" ")
    assert reply[:2] == query[:2], "an answer to another query"
    print(f"rcode={reply[3] & 0x0F} answers={','.join(addresses(reply))}")


if __name__ == "__main__":
    main()
