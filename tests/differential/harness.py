"""Running request sequences through both services and tallying what differs.

Each request goes to the reference and then to ratelimit-svc over the same transport (gRPC or
``/json``), both answers are compared (``compare``), then both Redis keyspaces of the config's
domain. Both services use the wall clock, so a pair is only sent where it ends in the second it
starts: early enough in a second, and checked afterwards. A pair that still straddles a second
(a stalled machine) makes the rest of that config's sequence incomparable; it is counted as
skipped, never as equal.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.errors import ConfigError
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from .compare import (
    Context,
    Outcome,
    compare_answers,
    compare_keyspaces,
    snapshot,
)
from .generator import Config, Generator, Profile
from .processes import Pair, Service, service_pair

LATEST_START_IN_SECOND = 0.7  # a pair starts no later than this into a second


@dataclass
class Report:
    configs: int = 0
    requests: int = 0
    equal: int = 0
    explained: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # requests not compared: their config's clock alignment was lost
    unexplained: list[str] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.configs += other.configs
        self.requests += other.requests
        self.equal += other.equal
        self.explained.update(other.explained)
        self.skipped += other.skipped
        self.unexplained.extend(other.unexplained)

    def summary(self) -> str:
        explained = ", ".join(f"{k}: {v}" for k, v in sorted(self.explained.items())) or "none"
        return (
            f"{self.configs} configs, {self.requests} request pairs: {self.equal} identical, "
            f"explained by the allow-list: {explained}; unexplained differences: "
            f"{len(self.unexplained)}; skipped (clock alignment lost): {self.skipped}"
        )


def ask(service: Service, request: dict[str, Any], transport: str) -> Outcome:
    if transport == "grpc":
        stub = rls_pb2_grpc.RateLimitServiceStub(service.channel)
        message = json_format.ParseDict(request, rls_pb2.RateLimitRequest())
        try:
            response = stub.ShouldRateLimit(message, timeout=30)
        except grpc.RpcError as exc:
            return Outcome("error", detail=f"{exc.code().name}: {exc.details()}")
        return Outcome("answer", {"response": json_format.MessageToDict(response)})
    data = json.dumps(request).encode()
    http = urllib.request.Request(
        f"http://127.0.0.1:{service.http_port}/json", data=data, method="POST"
    )
    try:
        with urllib.request.urlopen(http, timeout=30) as reply:
            status, body = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    if status not in (200, 429):
        return Outcome("error", detail=f"HTTP {status}: {body[:200]!r}")
    return Outcome("answer", {"response": json.loads(body), "http": status})


def _wait_for_early_second() -> None:
    fraction = time.time() % 1
    if fraction > LATEST_START_IN_SECOND:
        time.sleep(1.0 - fraction + 0.005)


def our_config(files: dict[str, str], settings: dict[str, str]) -> RateLimitConfig | None:
    try:
        return load_config(
            [ConfigFile(name, text) for name, text in sorted(files.items())],
            merge_domains=settings.get("MERGE_DOMAIN_CONFIG") == "true",
        )
    except ConfigError:
        return None


def run_sequence(
    pair: Pair,
    settings: dict[str, str],
    config: RateLimitConfig | None,
    domain: str,
    requests: Sequence[dict[str, Any]],
    transports: Sequence[str],
    allowed: Sequence[str],
    label: str,
) -> Report:
    report = Report(configs=1)
    prefix = settings.get("CACHE_KEY_PREFIX", "")
    pattern = f"{prefix}{domain}_*"
    with pair.reference_redis.client() as ref_redis, pair.our_redis.client() as our_redis:
        for number, (request, transport) in enumerate(zip(requests, transports, strict=True)):
            report.requests += 1
            _wait_for_early_second()
            started = time.time()
            ref = ask(pair.reference, request, transport)
            ours = ask(pair.ours, request, transport)
            if int(time.time()) != int(started):
                report.skipped += len(requests) - number
                break
            where = f"{label} request {number} ({transport}) {json.dumps(request)}"
            verdict = compare_answers(Context(settings, request, config), ref, ours, allowed)
            if verdict.equal:
                report.equal += not verdict.explained_by
                report.explained.update(verdict.explained_by)
            else:
                report.unexplained.append(f"{where}:\n  reference: {ref}\n  ours:      {ours}")
            problems = compare_keyspaces(snapshot(ref_redis, pattern), snapshot(our_redis, pattern))
            for problem in problems:
                report.unexplained.append(f"{where}: Redis {problem}")
            if not verdict.equal or problems:
                break  # later answers follow from this one; report the first difference only
    return report


def run_profile(
    reference_binary: str,
    redises: Any,
    profile: Profile,
    generator: Generator,
    requests_per_config: int,
    workdir: Path,
    allowed: Sequence[str],
) -> Report:
    files = {name: text for config in profile.configs for name, text in config.files.items()}
    ours = our_config(files, profile.env)
    report = Report()
    plans = [
        (config, generator.requests(config, requests_per_config)) for config in profile.configs
    ]
    transports = {
        config.domain: [generator.random.choice(["grpc", "json"]) for _ in requests]
        for config, requests in plans
    }
    with service_pair(reference_binary, redises, files, profile.env, workdir) as pair:
        for config, requests in plans:
            label = f"{profile.name}/{config.domain}"
            report.add(
                run_sequence(
                    pair, profile.env, ours, config.domain, requests,
                    transports[config.domain], allowed, label,
                )
            )  # fmt: skip
    return report


def describe(profile: Profile) -> str:
    settings = " ".join(f"{k}={v}" for k, v in sorted(profile.env.items()))
    files = "\n".join(f"--- {name}\n{text}" for c in profile.configs for name, text in c.files.items())
    return f"profile {profile.name}: {settings}\n{files}"


__all__ = ["Config", "Report", "describe", "run_profile", "run_sequence"]
