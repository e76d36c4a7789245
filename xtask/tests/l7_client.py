# Makes HTTP/1.1 requests for the routing tests and prints, as JSON, how many answers
# each (status, serving pod) pair got, the slowest answer in milliseconds, and the first
# answer (status, headers, body). Arguments: URL COUNT [HEADERS_JSON] [keepalive|new].
import collections, http.client, json, sys, time, urllib.parse

url = urllib.parse.urlsplit(sys.argv[1])
count = int(sys.argv[2])
headers = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
keepalive = len(sys.argv) > 4 and sys.argv[4] == "keepalive"
target = url.path + ("?" + url.query if url.query else "")
counts = collections.Counter()
first = None
slowest = 0.0
connection = None
for _ in range(count):
    if connection is None or not keepalive:
        connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
    started = time.monotonic()
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = response.read()
        status = response.status
        pod = response.getheader("x-served-by", "-")
        answer = {"status": status, "headers": dict(response.getheaders()), "body": body.decode(errors="replace")}
    except (OSError, http.client.HTTPException) as err:
        status, pod, answer = 0, type(err).__name__, {"status": 0, "error": str(err)}
        connection = None
    slowest = max(slowest, (time.monotonic() - started) * 1000)
    counts[f"{status} {pod}"] += 1
    if first is None:
        first = answer
    if not keepalive and connection is not None:
        connection.close()
print(json.dumps({"counts": counts, "slowest_ms": slowest, "first": first}))
