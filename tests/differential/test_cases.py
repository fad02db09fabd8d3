"""Fixed differential cases, one per behaviour docs/compatibility.md says we match (or differ in,
with its allow-list ID): the same rules, settings and requests to both services, answers and
Redis keys compared exactly as in the random run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.redis_fixtures import RedisServer, free_port
from support.xds_server import AdsServer

from .harness import ask, our_config, run_sequence
from .processes import ROOT, common_env, service_pair


def entries(*pairs: str, hits: int | None = None, limit: tuple[int, str] | None = None) -> dict[str, Any]:
    descriptor: dict[str, Any] = {"entries": [dict(zip(("key", "value"), p.split("=", 1), strict=True)) for p in pairs]}
    if hits is not None:
        descriptor["hitsAddend"] = str(hits)
    if limit is not None:
        descriptor["limit"] = {"requestsPerUnit": limit[0], "unit": limit[1]}
    return descriptor


@dataclass(frozen=True)
class Case:
    domain: str
    rules: str
    requests: Sequence[Sequence[dict[str, Any]]]  # each request: its descriptors
    expect_explained: frozenset[str] = frozenset()  # allow-list IDs the case must need


STOP_RULES = """
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: z
    rate_limit: {unit: hour, requests_per_unit: 0}
"""

STOP_CACHE = {"STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": "true", "LOCAL_CACHE_SIZE_IN_BYTES": "1048576"}
PLAIN = {"RESPONSE_DYNAMIC_METADATA": "true", "LIMIT_RESPONSE_HEADERS_ENABLED": "true"}

CASES: dict[str, tuple[dict[str, str], Case]] = {
    # STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT with a local cache: no wrong over-limit answer
    "stop-increment-local-cache": (STOP_CACHE, Case(
        "i1", STOP_RULES,
        [[entries("z=a")], [entries("z=a"), entries("k=c", hits=4)], [entries("k=c")]],
    )),
    # remaining of the descriptors not incremented, and their zero-valued keys
    "stop-increment-remaining": (STOP_CACHE, Case(
        "i2", STOP_RULES, [[entries("k=a"), entries("z=a")], [entries("k=a")]],
    )),
    # QUOTA_MODE next to an unlimited descriptor: the pinned reference never fails on quota
    "quota-mode-unlimited": ({"QUOTA_MODE": "true"}, Case(
        "i3",
        "descriptors:\n  - key: u\n    rate_limit: {unlimited: true}\n"
        "  - key: z\n    rate_limit: {unit: hour, requests_per_unit: 0}\n",
        [[entries("u=1"), entries("z=1")]],
        frozenset({"quota-mode-upstream"}),
    )),
    "unlimited-never-replaced": (PLAIN, Case(
        "i4",
        "descriptors:\n  - key: u\n    rate_limit: {unlimited: true, name: free}\n"
        "  - key: big\n    rate_limit: {unit: hour, requests_per_unit: 10, replaces: [{name: free}]}\n",
        [[entries("u=1"), entries("big=1")]],
        frozenset({"dynamic-metadata-shape"}),
    )),
    "yaml-go-scalars": (PLAIN, Case(
        "i5",
        "descriptors:\n"
        "  - key: base\n    rate_limit: &hourly {unit: hour, requests_per_unit: 0o17}\n"
        "  - key: merged\n    rate_limit:\n      requests_per_unit: 9\n      <<: *hourly\n      name: m\n"
        "  - key: later\n    rate_limit:\n      <<: *hourly\n      requests_per_unit: 2\n"
        "  - key: date\n    value: 2024-01-01\n    shadow_mode: y\n"
        "    rate_limit: {unit: Hour, requests_per_unit: 0x2}\n",
        [[entries("base=1")], [entries("merged=1"), entries("later=1")], [entries("later=1")]]
        + [[entries("date=2024-01-01")]] * 3,
        frozenset({"dynamic-metadata-shape"}),
    )),
    "share-threshold-key-split": (PLAIN, Case(
        "i6",
        "descriptors:\n  - key: remote_address\n    value: fo*\n    share_threshold: true\n"
        "    rate_limit: {unit: hour, requests_per_unit: 5}\n",
        [[entries("remote_address=foo1")], [entries("remote=address_foo2")], [entries("remote_address=fo*")]],
        frozenset({"dynamic-metadata-shape"}),
    )),
    "wildcard-in-key": (PLAIN, Case(
        "i7",
        "descriptors:\n  - key: x*\n    share_threshold: true\n"
        "    rate_limit: {unit: hour, requests_per_unit: 2}\n"
        "  - key: y*\n    rate_limit: {unit: hour, requests_per_unit: 2}\n",
        [[entries("xyz=v")], [entries("xa=w")], [entries("xyz=v")], [entries("yes=1"), entries("y=2")]],
        frozenset({"dynamic-metadata-shape"}),
    )),
    "override-limit-metadata": (PLAIN, Case(
        "i8",
        "descriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n",
        [[entries("k=1", limit=(4, "HOUR"))], [entries("k=1", limit=(4, "HOUR"), hits=3)]],
        frozenset({"dynamic-metadata-shape"}),
    )),
    # a base-60 number: both refuse the whole config, so both refuse every request
    "yaml-no-base-60": ({}, Case(
        "i9",
        "descriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1:20}\n",
        [[entries("k=1")]],
        frozenset({"error-status-codes"}),
    )),
}


def _groups() -> dict[str, list[str]]:
    """Cases by their settings: one service pair serves every case of a group (each case has its
    own domain), which keeps the tier short."""
    groups: dict[str, list[str]] = {}
    for name, (settings, _case) in CASES.items():
        label = ",".join(f"{k}={v}" for k, v in sorted(settings.items())) or "defaults"
        groups.setdefault(label, []).append(name)
    return groups


GROUPS = _groups()


@pytest.mark.parametrize("group", list(GROUPS))
def test_fixed_cases_answer_alike(
    group: str,
    reference_binary: str,
    redises: tuple[RedisServer, RedisServer],
    allowed: dict[str, str],
    tmp_path: Path,
) -> None:
    names = GROUPS[group]
    settings = CASES[names[0]][0]
    files = {f"{c.domain}.yaml": f"domain: {c.domain}\n{c.rules}" for _s, c in map(CASES.get, names)}  # type: ignore[misc]
    ours = our_config(files, settings)
    failures = []
    with service_pair(reference_binary, redises, files, settings, tmp_path) as pair:
        for name in names:
            case = CASES[name][1]
            requests = [{"domain": case.domain, "descriptors": list(d)} for d in case.requests]
            for transport in ("grpc", "json"):
                for _attempt in range(3):  # again if a stalled machine broke clock alignment
                    for redis_server in redises:
                        redis_server.flushall()
                    report = run_sequence(
                        pair, settings, ours, case.domain, requests, [transport] * len(requests),
                        list(allowed), f"{name}/{transport}",
                    )  # fmt: skip
                    if report.skipped == 0:
                        break
                assert report.skipped == 0, "clock alignment lost three times"
                if report.unexplained:
                    failures.extend(report.unexplained)
                elif set(report.explained) != case.expect_explained:
                    failures.append(f"{name}/{transport}: needed {report.summary()}")
    assert not failures, "\n".join(failures)


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip


async def test_xds_node_metadata_reaches_the_control_plane_alike(
    reference_binary: str, redises: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    """CONFIG_GRPC_XDS_NODE_METADATA as both services send it in their first DiscoveryRequest."""
    servers = [AdsServer(), AdsServer()]
    processes = []
    try:
        for server in servers:
            await server.start()
        for name, server, redis_server in zip(("reference", "ours"), servers, redises, strict=True):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "RUNTIME_"))},
                **common_env(tmp_path / name, redis_server.url),
                "CONFIG_TYPE": "GRPC_XDS_SOTW",
                "CONFIG_GRPC_XDS_SERVER_URL": f"127.0.0.1:{server.port}",
                "CONFIG_GRPC_XDS_NODE_ID": "differential",
                "CONFIG_GRPC_XDS_NODE_METADATA": "a:b=c,novalue,k=v=w, spaced = yes ",
                "FORCE_START_WITHOUT_INITIAL_CONFIG": "true",
                "GRPC_PORT": str(free_port()), "PORT": str(free_port()), "DEBUG_PORT": str(free_port()),
            }  # fmt: skip
            command = [reference_binary] if name == "reference" else [sys.executable, "-m", "ratelimit_svc"]
            processes.append(await asyncio.to_thread(spawn, command, env, tmp_path / f"{name}.log"))
        seen = [await server.wait_request(lambda s: True) for server in servers]
        nodes = [dict(s.request.node.metadata) for s in seen]
        assert nodes[0] == nodes[1] == {"a:b": "c", "k": "v=w", " spaced ": " yes "}
        assert seen[0].request.node.id == seen[1].request.node.id == "differential"
    finally:
        for process in processes:
            process.kill()
            await asyncio.to_thread(process.wait)
        for server in servers:
            await server.stop()


# Rows of kind `reference-version`: the pinned reference lacks what we follow from upstream. These
# check that the documented difference is real (so the row goes once the pin moves past it).
VERSION_DIFFERENCES = {
    "rule-metadata": (
        "descriptors:\n  - key: k\n    metadata: {team: a}\n"
        "    rate_limit: {unit: hour, requests_per_unit: 1}\n",
        entries("k=1"),
        ("error", "OK"),  # the reference refuses the key, so it has no config at all
    ),
    "wildcard-middle": (
        "descriptors:\n  - key: k\n    value: a*b\n    rate_limit: {unit: hour, requests_per_unit: 0}\n",
        entries("k=axxb"),
        ("OK", "OVER_LIMIT"),  # the reference takes the inner `*` literally: no rule matches
    ),
}


@pytest.mark.parametrize("name", list(VERSION_DIFFERENCES))
def test_reference_version_difference_is_as_documented(
    name: str,
    reference_binary: str,
    redises: tuple[RedisServer, RedisServer],
    allowed: dict[str, str],
    tmp_path: Path,
) -> None:
    assert allowed.get(name) == "reference-version"
    rules, descriptor, expected = VERSION_DIFFERENCES[name]
    files = {"v.yaml": f"domain: v\n{rules}"}
    request = {"domain": "v", "descriptors": [descriptor]}
    with service_pair(reference_binary, redises, files, {}, tmp_path) as pair:
        outcomes = [ask(service, request, "grpc") for service in (pair.reference, pair.ours)]
    got = tuple(
        "error" if outcome.kind == "error" else outcome.body["response"]["overallCode"]
        for outcome in outcomes
    )
    assert got == expected, outcomes
