# Keeps traffic flowing until a file appears, then says what happened, as JSON.
#   echo HOST PORT STOP_FILE  one TCP connection: random chunks sent at a steady pace and
#                             read back from an echo server; at the end, whether every
#                             byte came back in order
#   http URL STOP_FILE        HTTP/1.1 GETs one after another on a kept-alive connection
#                             (a new one only when the server says `connection: close`);
#                             at the end, how many succeeded, failed, succeeded since
#                             the last failure, and connections used
# Prints "started" once the first exchange succeeded, so the caller knows traffic flows;
# exits with 1 if none did within 30 s.
import hashlib, http.client, json, os, socket, sys, threading, time, urllib.parse

mode = sys.argv[1]


def started():
    print("started", flush=True)


if mode == "echo":
    host, port, stop = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    s = socket.create_connection((host, port), timeout=60)
    sent, received = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "received": 0}

    def read():
        while chunk := s.recv(1 << 16):
            received.update(chunk)
            counts["received"] += len(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    first = True
    while first or not os.path.exists(stop):
        chunk = os.urandom(16384)
        s.sendall(chunk)
        sent.update(chunk)
        counts["sent"] += len(chunk)
        if first:
            deadline = time.monotonic() + 30
            while counts["received"] < len(chunk):
                if time.monotonic() > deadline:
                    print(f"no echo of the first {len(chunk)} bytes within 30 s "
                          f"(got {counts['received']})", file=sys.stderr, flush=True)
                    os._exit(1)
                time.sleep(0.01)
            started()
            first = False
        time.sleep(0.02)
    s.shutdown(socket.SHUT_WR)
    reader.join()
    print(json.dumps({**counts, "intact": sent.digest() == received.digest()}))
elif mode == "http":
    url, stop = urllib.parse.urlsplit(sys.argv[2]), sys.argv[3]
    ok = failed = connections = since_failure = 0
    errors = []
    announced = False
    connection = None
    stop_seen = None
    start_deadline = time.monotonic() + 30
    while True:
        if not announced and time.monotonic() > start_deadline:
            print(f"no request succeeded within 30 s: {errors[:5]}", file=sys.stderr, flush=True)
            sys.exit(1)
        if os.path.exists(stop):
            stop_seen = stop_seen or time.monotonic()
            # Until a request succeeds after the last failure, for 30 s at most.
            if since_failure or time.monotonic() - stop_seen > 30:
                break
        if connection is None:
            connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
            connections += 1
        try:
            connection.request("GET", url.path or "/")
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                ok += 1
                since_failure += 1
            else:
                failed += 1
                since_failure = 0
                errors.append(f"status {response.status}")
            if response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as err:
            failed += 1
            since_failure = 0
            errors.append(f"{type(err).__name__}: {err}")
            connection = None
        if ok and not announced:
            started()
            announced = True
        time.sleep(0.005)
    print(json.dumps({"ok": ok, "failed": failed, "since_failure": since_failure,
                      "connections": connections, "errors": errors[:5]}))
