"""Our Python's cost per ShouldRateLimit request without a transport (docs/performance.md, Where
the CPU goes on pyvoy): the App on the memory store or a Redis, its gRPC-over-ASGI application
(servers/grpc_asgi.py) called directly with 64 requests at a time, the bench's rules and 1 to 5
descriptors. It prints CPU µs per request; under callgrind (``--callgrind``) it measures only the
requests, so the instruction count divided by the requests is the figure, e.g.

    valgrind --tool=callgrind --instr-atstart=no python scripts/bench_inprocess.py --callgrind 5

Redis needs ``--redis host:port`` (a running server; this script starts none).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import COMMON_ENV, RULES
from transport_bench import request_file

from ratelimit_svc.app import App
from ratelimit_svc.servers.grpc_asgi import AsgiGrpc, start_asgi_grpc
from ratelimit_svc.service import SHOULD_RATE_LIMIT
from ratelimit_svc.settings.model import Settings

IN_FLIGHT = 64
OK_TRAILERS = [(b"grpc-status", b"0")]


def instrument(on: bool) -> None:
    """Turn callgrind's instrumentation on or off for this process (callgrind_control)."""
    control = subprocess.Popen(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        stdout=subprocess.DEVNULL,
    )
    while control.poll() is None:  # valgrind reads the request while this process runs
        time.sleep(0.002)


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp())
    config = work / "runtime" / "bench" / "config"
    config.mkdir(parents=True)
    (config / "bench.yaml").write_text(RULES)
    env = dict(COMMON_ENV, RUNTIME_ROOT=str(work / "runtime"), LOG_LEVEL="warn")
    env.update(BACKEND_TYPE="memory", GRPC_PORT="0", PORT="0", DEBUG_PORT="0")
    if args.redis:  # a long op timeout: callgrind runs the service fifty times slower
        env.update(BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=args.redis)
        env.update(REDIS_OP_TIMEOUT="60s")
    body = request_file(work, "bench", [f"k{i}" for i in range(1, args.descriptors + 1)])
    headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    if args.grpc_timeout:
        headers.append((b"grpc-timeout", args.grpc_timeout.encode()))
    scope = {"type": "http", "http_version": "2", "method": "POST", "path": SHOULD_RATE_LIMIT,
             "headers": headers}  # fmt: skip
    event = {"type": "http.request", "body": body.read_bytes(), "more_body": False}
    answered: list[Any] = []

    async def receive() -> dict[str, Any]:
        return event

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.trailers":
            answered.append(message["headers"])

    settings = Settings.from_env(env)
    async with App(settings, operator_ports=False, grpc_server=start_asgi_grpc) as app:
        assert app.config is not None, "the rules did not load"
        assert isinstance(app.grpc, AsgiGrpc)
        asgi = app.grpc.asgi

        async def batch() -> None:
            await asyncio.gather(*[asgi(scope, receive, send) for _ in range(IN_FLIGHT)])

        for _ in range(20):  # warm up
            await batch()
        answered.clear()
        if args.callgrind:
            instrument(True)
        cpu = time.process_time()
        for _ in range(args.batches):
            await batch()
        cpu = time.process_time() - cpu
        if args.callgrind:
            instrument(False)
    requests = args.batches * IN_FLIGHT
    if answered != [OK_TRAILERS] * requests:
        raise SystemExit(f"{requests - answered.count(OK_TRAILERS)} requests not answered OK")
    print(f"{args.descriptors} descriptor(s), {env['BACKEND_TYPE']}: {requests} requests, "
          f"{cpu / requests * 1e6:.1f} µs CPU each")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("descriptors", type=int, choices=range(1, 6))
    parser.add_argument("--batches", type=int, default=20, help=f"of {IN_FLIGHT} requests")
    parser.add_argument("--redis", default="", help="host:port of a running Redis")
    parser.add_argument("--grpc-timeout", default="", help="e.g. 20S: sent with every request")
    parser.add_argument("--callgrind", action="store_true", help="instrument only the requests")
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
