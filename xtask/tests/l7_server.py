# An HTTP/1.1 backend for the routing tests: answers every request with JSON saying which
# pod served it and what it received (method, path, headers), and misbehaves on demand:
#   /status/<code>        answers <code>
#   /delay/<ms>           answers after <ms> milliseconds
#   /flaky/<key>          answers 500 on every other request of <key> (first one fails)
#   /failon/<pod>         answers 503 when this pod is <pod>, 200 otherwise
#   /seen                 how many requests with each Host this pod has served
#   /connections          how many connections this pod has been sent requests on
# OPTIONS is answered like GET, so a CORS preflight that reaches it says so.
import collections, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POD = os.environ.get("POD_NAME", "unknown")
lock = threading.Lock()
flaky = collections.Counter()
hosts = collections.Counter()
peers = set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = self.path.split("?")[0].strip("/").split("/")
        status = 200
        with lock:
            hosts[self.headers.get("host", "")] += 1
            peers.add(self.client_address)
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
        elif parts[0] == "delay" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000)
        elif parts[0] == "failon" and len(parts) > 1:
            status = 503 if parts[1] == POD else 200
        elif parts[0] == "flaky" and len(parts) > 1:
            with lock:
                flaky[parts[1]] += 1
                if flaky[parts[1]] % 2 == 1:
                    status = 500
        if parts[0] == "seen":
            with lock:
                reply = dict(hosts)
        elif parts[0] == "connections":
            with lock:
                reply = {"connections": len(peers)}
        else:
            reply = {
                "pod": POD,
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body_bytes": len(body),
            }
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-served-by", POD)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = answer


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
