"""A gRPC client for shoal's tests; prints one JSON object per run.

Usage: client.py TARGET SCENARIO [ARG] [--tls CA_FILE SERVER_NAME]
Scenarios: unary N (N calls on one channel: instances seen, trailers), streams (server,
client and bidirectional streaming), fail CODE, flaky KEY, deadline MS_TIMEOUT MS_SLEEP,
broken, concurrent N HOLD_MS (N server streams at once).
"""

import json
import sys
import threading
import time

import grpc

args = sys.argv[1:]
tls = None
if "--tls" in args:
    i = args.index("--tls")
    tls = (args[i + 1], args[i + 2])
    del args[i : i + 3]
target, scenario, rest = args[0], args[1], args[2:]

if tls:
    creds = grpc.ssl_channel_credentials(open(tls[0], "rb").read())
    channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", tls[1])])
else:
    channel = grpc.insecure_channel(target)


def m(kind, method):
    return getattr(channel, kind)("/shoal.test.Echo/" + method, request_serializer=None, response_deserializer=None)


def err(e):
    return {"code": e.code().name, "details": e.details()}


out = {}
if scenario == "unary":
    seen, trailers, errors = {}, None, []
    for i in range(int(rest[0])):
        try:
            resp, call = m("unary_unary", "Unary").with_call(b"hi%d" % i)
            inst = resp.split(b":")[0].decode()
            seen[inst] = seen.get(inst, 0) + 1
            trailers = dict(call.trailing_metadata())
        except grpc.RpcError as e:
            errors.append(err(e))
    out = {"seen": seen, "trailers": trailers, "errors": errors}
elif scenario == "streams":
    server = [r.decode() for r in m("unary_stream", "Count")(b"5")]
    client = m("stream_unary", "Concat")(iter([b"a", b"b", b"c"])).decode()
    bidi = [r.decode() for r in m("stream_stream", "Chat")(iter([b"x", b"y", b"z"]))]
    out = {"server": server, "client": client, "bidi": bidi}
elif scenario == "fail":
    try:
        m("unary_unary", "Fail")(rest[0].encode())
        out = {"code": "OK"}
    except grpc.RpcError as e:
        out = err(e)
elif scenario == "flaky":
    try:
        out = {"code": "OK", "reply": m("unary_unary", "Flaky")(rest[0].encode()).decode()}
    except grpc.RpcError as e:
        out = err(e)
elif scenario == "deadline":
    t = time.monotonic()
    try:
        m("unary_unary", "Sleep")(rest[1].encode(), timeout=int(rest[0]) / 1000)
        out = {"code": "OK"}
    except grpc.RpcError as e:
        out = err(e)
    out["ms"] = (time.monotonic() - t) * 1000
elif scenario == "broken":
    got = []
    try:
        for r in m("unary_stream", "Broken")(b"2"):
            got.append(r.decode())
        out = {"code": "OK"}
    except grpc.RpcError as e:
        out = err(e)
    out["got"] = got
elif scenario == "concurrent":
    n, hold = int(rest[0]), rest[1].encode()
    results = []

    def one():
        try:
            results.append([r.decode() for r in m("unary_stream", "Hold")(hold)])
        except grpc.RpcError as e:
            results.append(err(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out = {"ok": sum(1 for r in results if isinstance(r, list) and len(r) == 2), "results": results}
print(json.dumps(out), flush=True)
