# A backend speaking three protocols on ports no Service declares, for the sniffing and
# tls route tests; every answer names the pod (POD_NAME) that gave it:
#   8443  TLS (certificate and key: argv[1], argv[2]): each read answered "<pod>:<bytes>"
#   9080  HTTP/1.1: JSON {"pod", "path", "headers"}, header x-served-by
#   7000  server first: "banner <pod>\n" on connect, then each read answered "<pod>:<bytes>"
import json, os, socket, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POD = os.environ.get("POD_NAME", "unknown")


def echo(conn, banner):
    with conn:
        if banner:
            conn.sendall(f"banner {POD}\n".encode())
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(POD.encode() + b":" + data)


def serve(port, wrap, banner):
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)
    while True:
        conn, _ = listener.accept()

        def handle(conn=conn):
            try:
                echo(wrap(conn), banner)
            except (OSError, ssl.SSLError):
                conn.close()

        threading.Thread(target=handle, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = json.dumps(
            {"pod": POD, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.send_header("x-served-by", POD)
        self.end_headers()
        self.wfile.write(data)


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
threading.Thread(
    target=serve, args=(8443, lambda c: context.wrap_socket(c, server_side=True), False), daemon=True
).start()
threading.Thread(target=serve, args=(7000, lambda c: c, True), daemon=True).start()
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", 9080), Handler).serve_forever()
