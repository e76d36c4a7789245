# Sends 2 MiB through a TCP echo server at argv[1]:argv[2] and checks the echo; prints "ok <bytes>".
import hashlib, os, socket, sys, threading
data = os.urandom(2 << 20)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
sender.start()
echoed = bytearray()
while chunk := s.recv(65536):
    echoed += chunk
sender.join()
same = hashlib.sha256(data).digest() == hashlib.sha256(echoed).digest()
print(("ok" if same else "corrupted"), len(echoed))
