"""The operator's console as data: every panel of the page is one JSON document built here.

``Console`` is handed what it shows (the config snapshot and its load status, the stats, the
limiter for dry runs and its hot keys, the store, health, the backend latency record, the worker
processes' reports) and owns one task, the traffic sampler. The debug listener only routes to it
(docs/console.md). Everything is read-only except ``dry_run``, which reads counters but never
counts. Values that came from a request or a config are returned as plain JSON strings; the page
shows them as text, never as markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from ratelimit_svc.backends.latency import LatencyRecorder
from ratelimit_svc.config.files import RuntimeLocation, config_paths
from ratelimit_svc.config.rules import Node, RateLimitConfig, Rule
from ratelimit_svc.config.status import ConfigStatus
from ratelimit_svc.errors import BackendError, ConfigError, NoConfigError, RequestError
from ratelimit_svc.limiter.hotkeys import HotKey, HotKeys
from ratelimit_svc.limiter.limiter import Limiter
from ratelimit_svc.limiter.matching import explain
from ratelimit_svc.limiter.store import CounterStore
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit_svc.servers.console.summary import process_summary
from ratelimit_svc.servers.console.traffic import TrafficHistory
from ratelimit_svc.servers.health import Health
from ratelimit_svc.service import RequestLimits, check_request_limits, request_from_proto
from ratelimit_svc.settings.model import Settings

log = logging.getLogger(__name__)

MAX_LISTED_FILES = 500
MAX_DRY_RUN_BYTES = 64 * 1024
# A worker's report older than this is shown as stale (workers report every second).
STALE_REPORT_SECONDS = 10.0


class DryRunError(Exception):
    """The dry run cannot be answered; the message says why, ``status`` is the HTTP status
    (400: the request is at fault; 503: no config or the backend failed)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def rule_json(rule: Rule | None) -> dict[str, Any] | None:
    if rule is None:
        return None
    return {
        "name": rule.name,
        "stats_key": rule.stats_key,
        "requests_per_unit": rule.requests_per_unit,
        "unit": rule.unit.name,
        "algorithm": rule.algorithm.name.lower(),
        "unit_multiplier": rule.unit_multiplier,
        "burst": rule.burst,
        "charge_only_when_admitted": rule.charge_only_when_admitted,
        "more_limits": [rule_json(more) for more in rule.more],
        "unlimited": rule.unlimited,
        "shadow_mode": rule.shadow_mode,
        "quota_mode": rule.quota_mode,
        "detailed_metric": rule.detailed_metric,
        "replaces": sorted(rule.replaces),
    }


def node_json(node: Node) -> dict[str, Any]:
    # A wildcard child is held twice (by composite key and in ``wildcards``): list it once.
    unique = {id(c): c for c in [*node.children.values(), *(c for _, c in node.wildcards)]}
    children = list(unique.values())
    return {
        "key": node.key,
        "value": node.value,
        "wildcard": "*" in node.value,
        "value_to_metric": node.value_to_metric,
        "share_threshold": node.share_threshold,
        "rule": rule_json(node.rule),
        "children": [node_json(child) for child in children],
    }


class Console:
    """The console's panels for one running service."""

    def __init__(
        self,
        settings: Settings,
        *,
        config: Callable[[], RateLimitConfig | None],
        status: ConfigStatus,
        stats: Any,  # MemoryStats: key_totals, snapshot
        limiter: Limiter,
        store: CounterStore | None,
        health: Health,
        recorder: LatencyRecorder | None,
        request_limits: RequestLimits | None = None,
        workers: Callable[[], Mapping[int, Mapping[str, Any]]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.config = config
        self.status = status
        self.stats = stats
        self.limiter = limiter
        self.store = store
        self.health = health
        self.recorder = recorder
        self.request_limits = request_limits or RequestLimits()
        self.workers = workers
        self.clock = clock
        self.traffic_history = TrafficHistory(
            stats, domains=lambda: (self.config() or _NO_CONFIG).domains, clock=clock
        )
        self._task: asyncio.Task[None] | None = None

    # -- the sampler ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._sample_forever(), name="console-traffic"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample_forever(self) -> None:
        while True:
            self.traffic_history.sample()
            await asyncio.sleep(self.traffic_history.interval)

    # -- panels ----------------------------------------------------------------------------------

    def rules(self) -> dict[str, Any]:
        config = self.config()
        status = self.status
        error = status.last_error
        return {
            "domains": [
                {"domain": name, "descriptors": node_json(root)["children"]}
                for name, root in sorted((config or _NO_CONFIG).domains.items())
            ],
            "source": self._source(),
            "loaded_at": status.loaded_at,
            "loads": status.loads,
            "failures": status.failures,
            "last_error": None if error is None else {
                "message": error.message, "at": error.at, "file": error.file, "line": error.line,
            },
        }  # fmt: skip

    def _source(self) -> dict[str, Any]:
        settings = self.settings
        if self.status.source == "xds":
            return {
                "type": "xds",
                "server": settings.xds.server_url,
                "version": self.status.xds_version,
                "nonce": self.status.xds_nonce,
            }
        directory = None
        if settings.runtime_subdirectory:
            directory = (
                Path(settings.runtime_root)
                / settings.runtime_subdirectory
                / settings.runtime_appdirectory
            )
        return {
            "type": "file",
            "directory": None if directory is None else str(directory),
            "files": [] if directory is None else list_files(
                directory,
                RuntimeLocation(
                    settings.runtime_root,
                    settings.runtime_subdirectory,
                    settings.runtime_appdirectory,
                    settings.runtime_ignoredotfiles,
                    settings.runtime_ignore_patterns,
                ),
            ),
        }

    def traffic(self) -> dict[str, Any]:
        return self.traffic_history.as_json()

    def hot_keys(self) -> dict[str, Any]:
        now = self.clock()
        table = self.limiter.hot_keys or HotKeys()
        merged = HotKeys(table.capacity)
        merged.merge(table.top(now), int(now))
        for report in self.workers().values():
            received = float(report.get("at", now))
            keys = [HotKey.from_dict(k, received) for k in report.get("hot_keys", ())]
            merged.merge(keys, int(now))
        top = merged.top(now)
        return {
            "near_limit_ratio": self.settings.near_limit_ratio,
            "keys": [key.as_dict(now) for key in top],
        }

    def backend(self) -> dict[str, Any]:
        settings = self.settings
        kind = settings.backend_type
        detail = ""
        if kind == "redis":
            detail = settings.redis.type + (" + per-second" if settings.redis_persecond else "")
        elif kind == "memcache":
            detail = "srv" if settings.memcache.srv else f"{len(settings.memcache.host_port)} hosts"
        now = self.clock()
        processes = [{"role": "primary", **process_summary(self.store, self.recorder, self.health)}]
        for index, report in sorted(self.workers().items()):
            summary = dict(report.get("summary", {}))
            summary["stale"] = now - float(report.get("at", now)) > STALE_REPORT_SECONDS
            processes.append({"role": f"worker {index}", **summary})
        stats = self.stats.snapshot()
        return {
            "type": kind,
            "detail": detail,
            "healthy": self.health.healthy,
            "errors": {
                "backend": stats.get("ratelimit.service.call.should_rate_limit.redis_error", 0),
                "service": stats.get("ratelimit.service.call.should_rate_limit.service_error", 0),
            },
            "processes": processes,
        }

    # -- the dry run -----------------------------------------------------------------------------

    async def dry_run(self, body: bytes) -> dict[str, Any]:
        """A RateLimitRequest in proto JSON (as HTTP ``/json`` takes it) answered with every
        hits_addend 0: nothing is counted. Raises DryRunError for a body we cannot answer."""
        if len(body) > MAX_DRY_RUN_BYTES:
            raise DryRunError(f"request body over {MAX_DRY_RUN_BYTES} bytes")
        message = rls_pb2.RateLimitRequest()
        try:
            json_format.Parse(body, message)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            raise DryRunError(f"not a RateLimitRequest in JSON: {exc}") from None
        request = request_from_proto(message)
        config = self.config()
        try:
            check_request_limits(request, self.request_limits)
            decision, matches, current = await self.limiter.dry_run(config, request)
        except RequestError as exc:
            raise DryRunError(str(exc)) from None
        except (NoConfigError, BackendError) as exc:
            raise DryRunError(str(exc), 503) from None
        assert config is not None
        known = request.domain in config.domains
        descriptors = []
        for index, descriptor in enumerate(request.descriptors):
            status, found = decision.statuses[index], matches[index]
            steps = explain(config, request.domain, descriptor.entries) if known else []
            descriptors.append({
                "entries": [{"key": k, "value": v} for k, v in descriptor.entries],
                "path": [
                    {"key": s.key, "value": s.value, "how": s.how, "node": s.node,
                     "rule": None if s.rule is None else s.rule.stats_key}
                    for s in steps
                ],
                "override": descriptor.override is not None,
                "rule": rule_json(found.rule if found is not None else None),
                "stats_key": found.stats_key if found is not None else None,
                "code": status.code.name,
                "current": current[index],
                "remaining": status.remaining,
                "reset_seconds": status.reset_seconds,
                "why": _why(known, found, steps, descriptor.override is not None),
            })  # fmt: skip
        return {
            "domain": request.domain,
            "domain_known": known,
            "overall_code": decision.overall.name,
            "descriptors": descriptors,
        }


def _why(known: bool, found: Any, steps: list[Any], override: bool) -> str:
    if not known:
        return "the domain is not in the loaded config: no limit applies"
    if override:
        return "the request carries its own limit (override): it replaces the tree's rule"
    if found is not None and not found.rule.classic and not found.rule.unlimited:
        return (
            f"matched a {found.rule.algorithm.name.lower()} rule: the dry run reads plain fixed "
            "windows only, so its count is not shown and it takes no part in the overall code"
        )
    if found is not None:
        return "matched: the walk ended on a node with a rate limit"
    if steps and steps[-1].how == "none":
        return f"no match: nothing in the tree for entry '{steps[-1].key}' at this level"
    if steps and steps[-1].rule is None:
        return "no match: the walk ended on a node without a rate limit"
    return "no match, or replaced by another descriptor's rule (replaces)"


def list_files(directory: Path, location: RuntimeLocation) -> list[dict[str, Any]]:
    """The config files below ``directory``, as the loader finds them, with their modification
    times (at most MAX_LISTED_FILES; a file that vanishes meanwhile is left out)."""
    found: list[dict[str, Any]] = []
    try:
        paths = config_paths(directory, location=location)
    except ConfigError:
        return found  # the load's own error says why (the status panel shows it)
    for name, path in paths:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        found.append({"name": name, "mtime": mtime})
        if len(found) >= MAX_LISTED_FILES:
            break
    return found


def dumps(document: Any) -> str:
    """Compact JSON with ``<``, ``>`` and ``&`` escaped, so that no value can close a script
    element or open a tag even where the JSON lands inside HTML."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_NO_CONFIG = RateLimitConfig(domains={})
