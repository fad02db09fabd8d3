"""The pyvoy floor's application: gRPC over ASGI (servers/grpc_asgi.py) answering ShouldRateLimit
with one constant response, run in Envoy by pyvoy. ``scripts/bench_baseline.py --server pyvoy``
starts it; what ratelimit-svc costs above it on pyvoy is its own code (docs/performance.md)."""

from __future__ import annotations

from collections.abc import Callable

from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit_svc.servers.grpc_asgi import GrpcAsgiApp, HealthState, Metadata
from ratelimit_svc.service import SHOULD_RATE_LIMIT

_RESPONSE = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
_RESPONSE.statuses.add(code=rls_pb2.RateLimitResponse.OK, limit_remaining=999)
_ANSWER: bytes = _RESPONSE.SerializeToString()


async def constant(
    request: bytes, time_left: float | None, metadata: Callable[[], Metadata]
) -> bytes:
    rls_pb2.RateLimitRequest.FromString(request)  # parsed, as any servicer does
    return _ANSWER


app = GrpcAsgiApp({SHOULD_RATE_LIMIT: constant}, HealthState(), max_message_bytes=4 * 1024 * 1024)
