# A server that accepts connections and holds them, reading nothing: the far end of the
# flood test's connections. Argument: PORT.
import resource, socket, sys

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(8192)
held = []
while True:
    held.append(listener.accept()[0])
