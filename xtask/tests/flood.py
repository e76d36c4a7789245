# The hostile pod of the flood test. Arguments: IDLE_JSON TARGET COUNT. First opens the
# idle connections IDLE_JSON lists ([["10.200.0.1", 15021, 300], ...]: address, port,
# how many) and never sends a byte on them, then COUNT connections to TARGET
# ("ip:port"), which it also never writes to, and prints "ready". Then answers each
# "count" line on its standard input with how many connections the other end has reset
# or closed, as JSON: {"flood": n, "15021": n, ...}, and exits (closing everything) at
# the end of its input.
import json, resource, socket, sys

idle_targets, (host, port), count = (
    json.loads(sys.argv[1]),
    sys.argv[2].split(":"),
    int(sys.argv[3]),
)
# Thousands of sockets: the descriptor limit raised, the hard one too where root may
# (not in every container), else the soft one up to the hard one.
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

idle = {}
for address, idle_port, n in idle_targets:
    for _ in range(n):
        sock = socket.create_connection((address, idle_port), timeout=30)
        idle.setdefault(str(idle_port), []).append(sock)
flood = [socket.create_connection((host, int(port)), timeout=30) for _ in range(count)]
# Non-blocking from now on: with a timeout, Python would wait on each quiet socket
# before the peek below.
for sock in flood + [s for socks in idle.values() for s in socks]:
    sock.setblocking(False)
print("ready", flush=True)


def gone(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


for line in sys.stdin:
    if line.strip() == "count":
        counts = {port: sum(1 for s in socks if gone(s)) for port, socks in idle.items()}
        counts["flood"] = sum(1 for s in flood if gone(s))
        print(json.dumps(counts), flush=True)
