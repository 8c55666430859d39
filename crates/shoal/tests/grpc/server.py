"""A gRPC test server for shoal's tests: generic raw-bytes handlers (no protoc needed).

Service shoal.test.Echo:
  Unary(bytes) -> b"NAME:" + bytes; trailing metadata x-instance=NAME, x-trailer=t
  Sleep(ms as text) -> b"slept" after that many ms
  Fail("CODE:message") -> aborts with that status
  Flaky(key) -> UNAVAILABLE for the first two calls with a key, then b"NAME:ok" (calls
    counted across servers sharing $FLAKY_DIR)
  Count(n) -> n messages b"NAME:i" (server streaming)
  Concat(stream) -> all messages joined (client streaming)
  Chat(stream) -> each message echoed back as b"NAME:" + msg (bidirectional)
  Broken(n) -> n messages, then UNAVAILABLE (a failure after the response headers)
  Hold(ms) -> one message at once, then another after ms (a long server stream)
Plus grpc.health.v1.Health, all SERVING; SIGUSR1 flips the "" service to NOT_SERVING,
SIGUSR2 back to SERVING.

Usage: server.py PORT NAME [MAX_CONCURRENT_STREAMS]   (PORT "-": $PORT)
"""

import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# PORT "-": from $PORT (as a shoal process fleet starts its instances).
port = int(os.environ["PORT"]) if sys.argv[1] == "-" else int(sys.argv[1])
name = sys.argv[2].encode()
max_streams = int(sys.argv[3]) if len(sys.argv) > 3 else 0

flaky = {}
lock = threading.Lock()


def unary(req, ctx):
    ctx.set_trailing_metadata((("x-instance", name.decode()), ("x-trailer", "t")))
    return name + b":" + req


def sleep(req, ctx):
    time.sleep(int(req) / 1000)
    return b"slept"


def fail(req, ctx):
    code, _, msg = req.decode().partition(":")
    ctx.abort(getattr(grpc.StatusCode, code), msg)


def flaky_call(req, ctx):
    # Counted across every server given the same FLAKY_DIR (one file per key, a byte per
    # call), so "the service" fails twice whichever instances the calls reach.
    d = os.environ.get("FLAKY_DIR")
    if d:
        with open(os.path.join(d, req.decode()), "ab") as f:
            f.write(b"x")
            f.flush()
            n = f.tell() - 1
    else:
        with lock:
            n = flaky.get(req, 0)
            flaky[req] = n + 1
    if n < 2:
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
    return name + b":ok"


def count(req, ctx):
    for i in range(int(req)):
        yield name + b":" + str(i).encode()


def concat(it, ctx):
    return b"".join(it)


def chat(it, ctx):
    for m in it:
        yield name + b":" + m


def broken(req, ctx):
    for i in range(int(req)):
        yield name + b":" + str(i).encode()
    ctx.abort(grpc.StatusCode.UNAVAILABLE, "broken after headers")


def hold(req, ctx):
    yield name + b":first"
    time.sleep(int(req) / 1000)
    yield name + b":last"


def h(kind, fn):
    return kind(fn, request_deserializer=None, response_serializer=None)


handlers = {
    "Unary": h(grpc.unary_unary_rpc_method_handler, unary),
    "Sleep": h(grpc.unary_unary_rpc_method_handler, sleep),
    "Fail": h(grpc.unary_unary_rpc_method_handler, fail),
    "Flaky": h(grpc.unary_unary_rpc_method_handler, flaky_call),
    "Count": h(grpc.unary_stream_rpc_method_handler, count),
    "Concat": h(grpc.stream_unary_rpc_method_handler, concat),
    "Chat": h(grpc.stream_stream_rpc_method_handler, chat),
    "Broken": h(grpc.unary_stream_rpc_method_handler, broken),
    "Hold": h(grpc.unary_stream_rpc_method_handler, hold),
}

options = [("grpc.max_concurrent_streams", max_streams)] if max_streams else []
server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shoal.test.Echo", handlers),))
hs = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(hs, server)
hs.set("", health_pb2.HealthCheckResponse.SERVING)
hs.set("shoal.test.Echo", health_pb2.HealthCheckResponse.SERVING)


def flip(status):
    def f(*_):
        hs.set("", status)
        hs.set("shoal.test.Echo", status)

    return f


signal.signal(signal.SIGUSR1, flip(health_pb2.HealthCheckResponse.NOT_SERVING))
signal.signal(signal.SIGUSR2, flip(health_pb2.HealthCheckResponse.SERVING))
signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
