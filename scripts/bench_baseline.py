"""The benchmark's yardstick: the least a Python + grpcio ShouldRateLimit server can do.

A grpc.aio servicer that parses the RateLimitRequest (grpc's generated deserializer, as any
servicer does) and returns one constant RateLimitResponse, on the same grpc server options as the
service. Whatever our service costs above this is our own code; this is the ceiling of one Python
process on this machine. ``scripts/bench.py`` starts it as ``python scripts/bench_baseline.py
--port N`` (add ``--uvloop`` to run it on uvloop, as the service does when uvloop is installed) and
waits for the ``Listening for gRPC on`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--server", choices=("grpcio", "pyvoy"), default="grpcio")
    args = parser.parse_args()
    if args.server != "grpcio":
        sys.exit(f"bench_baseline: no {args.server} floor in this tree")
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
