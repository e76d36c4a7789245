"""Watches what enters a pod: on the pod's eth0, records every IPv4 frame an attacker
sent (IP ID 0x4d45, the signature raw_attack.py puts on its packets) and every TCP
segment from port 8080 to a port below 1024 (the answers a forged SYN from such a port
would draw), until a frame holding the sentinel (argv[1]) arrives. Prints "ready" once
capturing, then one JSON line; exits 1 if the sentinel never came."""

import json
import socket
import sys
import time

ATTACK_ID = 0x4D45
ETH_P_ALL = 0x0003

sentinel = sys.argv[1].encode()
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sock.bind(("eth0", 0))
sock.settimeout(1.0)
print("ready", flush=True)

seen = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        frame, address = sock.recvfrom(65535)
    except socket.timeout:
        continue
    if address[2] == socket.PACKET_OUTGOING:
        continue
    if sentinel in frame:
        print(json.dumps({"sentinel": True, "seen": seen}), flush=True)
        sys.exit(0)
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    header_len = (ip[0] & 0x0F) * 4
    record = {
        "src": socket.inet_ntoa(ip[12:16]),
        "dst": socket.inet_ntoa(ip[16:20]),
        "id": int.from_bytes(ip[4:6], "big"),
        "frag": int.from_bytes(ip[6:8], "big"),
    }
    tcp = ip[header_len:]
    answer = (
        ip[9] == socket.IPPROTO_TCP
        and len(tcp) >= 4
        and int.from_bytes(tcp[0:2], "big") == 8080
        and int.from_bytes(tcp[2:4], "big") < 1024
    )
    if record["id"] == ATTACK_ID or answer:
        seen.append(record)
print(json.dumps({"sentinel": False, "seen": seen}), flush=True)
sys.exit(1)
