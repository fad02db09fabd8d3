"""The benchmark's yardsticks: the least a Python ShouldRateLimit server can do on each transport.

A grpc.aio servicer that parses the RateLimitRequest (grpc's generated deserializer, as any
servicer does) and returns one constant RateLimitResponse, on the same grpc server options as the
service. Whatever our service costs above this is our own code; this is the ceiling of one Python
process on this machine. ``scripts/bench.py`` starts it as ``python scripts/bench_baseline.py
--port N`` (add ``--uvloop`` to run it on uvloop, as the service does when uvloop is installed) and
waits for the ``Listening for gRPC on`` line. With ``--server pyvoy`` the floor is pyvoy's own
command line running ``scripts/bench_floor_pyvoy.py`` (gRPC over ASGI answering the same constant
response) in Envoy: the transport's cost before any rate limiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

RESPONSE = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
RESPONSE.statuses.add(code=rls_pb2.RateLimitResponse.OK, limit_remaining=999)


class ConstantServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        return RESPONSE


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(ConstantServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"Listening for gRPC on '{host}:{bound}'", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def serve_pyvoy(host: str, port: int) -> int:
    """pyvoy's command line running scripts/bench_floor_pyvoy.py until SIGTERM/SIGINT."""
    port = port or _free_port(host)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    argv = [
        str(Path(sys.executable).with_name("pyvoy")), "bench_floor_pyvoy:app", "--address", host,
        "--port", str(port), "--no-lifespan", "--log-level", "error",
        *(["--loop", "uvloop"] if importlib.util.find_spec("uvloop") else []),
    ]  # fmt: skip
    child = subprocess.Popen(argv, env=env, cwd=Path(__file__).parent)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deadline = time.monotonic() + 60
    while child.poll() is None and not stop.is_set():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            print(f"Listening for gRPC on '{host}:{port}'", file=sys.stderr, flush=True)
            break
        if time.monotonic() > deadline:
            child.kill()
            return 1
        time.sleep(0.05)
    while child.poll() is None and not stop.wait(0.2):
        pass
    if child.poll() is not None:
        return 1  # pyvoy stopped on its own
    child.terminate()
    try:
        code = child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    return 0 if code in (0, -signal.SIGTERM) else 1


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--server", choices=("grpcio", "pyvoy"), default="grpcio")
    args = parser.parse_args()
    if args.server == "pyvoy":
        sys.exit(serve_pyvoy(args.host, args.port))
    logging.basicConfig(level=logging.WARNING)
    if args.uvloop:
        import uvloop

        runner: contextlib.AbstractContextManager[asyncio.Runner] = asyncio.Runner(
            loop_factory=uvloop.new_event_loop
        )
    else:
        runner = asyncio.Runner()
    with runner as r:
        r.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
