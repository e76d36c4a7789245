# Makes argv[2] HTTP requests to argv[1], a new connection each, and prints how many each
# backend answered (the body is the serving pod's name), as JSON.
import collections, json, sys, urllib.request
counts = collections.Counter()
for _ in range(int(sys.argv[2])):
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        counts[response.read().decode().strip()] += 1
print(json.dumps(counts))
