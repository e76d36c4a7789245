# A hostile client for the request-form tests: sends request heads written byte by byte,
# HTTP/1.1 as raw text and HTTP/2 as raw frames (prior knowledge, HPACK literals without
# Huffman coding or indexing, so that any name, value, order and repetition goes out as
# written). Arguments: HOST PORT CASES_JSON, where each case is {"h1": "request head"}
# (latin-1: each character one byte, so bytes above 0x7F can be sent) or {"h2": [[name,
# value], ...]} (pseudo-headers included, in order). Prints one JSON answer per case,
# {"status": 400, "body": "..."}, or {"status": 0, "error": "..."} when no response came.
# One connection per case.
import json, socket, struct, sys

host, port, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])


def read_exactly(sock, n, buf):
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def h1(head):
    sock = socket.create_connection((host, port), timeout=10)
    try:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("closed before a response head: %r" % data)
            data += chunk
        raw_head, body = data.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = read_exactly(sock, int(headers["content-length"]), body)[
                : int(headers["content-length"])
            ]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                while b"\r\n" not in body:
                    body += sock.recv(65536)
                size_line, body = body.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                body = read_exactly(sock, size + 2, body)
                if size == 0:
                    break
                out, body = out + body[:size], body[size + 2 :]
            body = out
        return {"status": status, "body": body.decode("utf-8", "replace")}
    finally:
        sock.close()


def integer(value, prefix_bits, first):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name, value):
    # Literal header field without indexing, new name (RFC 7541 §6.2.2), no Huffman.
    name, value = name.encode("latin-1"), value.encode("latin-1")
    return b"\x00" + integer(len(name), 7, 0) + name + integer(len(value), 7, 0) + value


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


# Huffman codes of the digits (RFC 7541 Appendix B): all a :status value needs.
DIGITS = {"00000": "0", "00001": "1", "00010": "2", "011001": "3", "011010": "4",
          "011011": "5", "011100": "6", "011101": "7", "011110": "8", "011111": "9"}
STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}


def read_integer(block, i, prefix_bits):
    limit = (1 << prefix_bits) - 1
    value = block[i] & limit
    i += 1
    if value < limit:
        return value, i
    shift = 0
    while True:
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def status_of(block):
    """The :status of a response header block: the first field, as servers send it."""
    i = 0
    while block[i] & 0xE0 == 0x20:  # dynamic table size updates
        _, i = read_integer(block, i, 5)
    first = block[i]
    if first & 0x80:
        index, _ = read_integer(block, i, 7)
        return STATIC_STATUS[index]
    _, i = read_integer(block, i, 6 if first & 0x40 else 4)
    huffman = bool(block[i] & 0x80)
    length, i = read_integer(block, i, 7)
    value = block[i : i + length]
    if not huffman:
        return int(value)
    bits, text, code = "".join(format(b, "08b") for b in value), "", ""
    for bit in bits:
        code += bit
        if code in DIGITS:
            text, code = text + DIGITS[code], ""
    return int(text)


def h2(fields):
    sock = socket.create_connection((host, port), timeout=10)
    try:
        block = b"".join(literal(n, v) for n, v in fields)
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + frame(4, 0, 0, b"")
            # HEADERS, END_STREAM | END_HEADERS, stream 1.
            + frame(1, 0x5, 1, block)
        )
        buf, status, body = b"", None, b""
        while True:
            buf = read_exactly(sock, 9, buf)
            length = int.from_bytes(buf[:3], "big")
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = read_exactly(sock, 9 + length, buf)
            payload, buf = buf[9 : 9 + length], buf[9 + length :]
            if kind == 4 and not flags & 0x1:
                sock.sendall(frame(4, 0x1, 0, b""))
            elif kind == 7:
                code = int.from_bytes(payload[4:8], "big")
                return {"status": 0, "error": "GOAWAY %d" % code}
            elif kind == 3 and stream == 1:
                return {"status": 0, "error": "RST_STREAM %d" % int.from_bytes(payload, "big")}
            elif kind == 1 and stream == 1:
                if flags & 0x8:  # padded
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & 0x20:  # priority
                    payload = payload[5:]
                status = status_of(payload)
                if flags & 0x1:
                    break
            elif kind == 0 and stream == 1:
                body += payload
                if flags & 0x1:
                    break
        return {"status": status, "body": body.decode("utf-8", "replace")}
    finally:
        sock.close()


answers = []
for case in cases:
    try:
        answers.append(h1(case["h1"]) if "h1" in case else h2(case["h2"]))
    except (OSError, EOFError, ValueError, IndexError, KeyError) as err:
        answers.append({"status": 0, "error": "%s: %s" % (type(err).__name__, err)})
print(json.dumps(answers))
