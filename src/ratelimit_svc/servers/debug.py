"""The debug listener on DEBUG_HOST:DEBUG_PORT: the index, ``/rlconfig``, ``/stats``, ``/settings``
(credentials redacted), and in place of Go's pprof ``/debug/tasks``, ``/debug/threads`` and
``/debug/tracemalloc`` (docs/operations.md (Debug port)).

The debug port has no authentication, so what could be turned against the service is off unless
DEBUG_PROFILING_ENABLED=true: the three ``/debug/`` endpoints answer 403 (tracing every allocation
with deep stacks cuts throughput several times over; a task dump of a busy service is large).
Every parameter is bounded: a value out of range is a 400 naming it, never a 500
(docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import threading
import traceback
import tracemalloc
from collections.abc import Callable, Mapping
from types import FrameType

from aiohttp import web

from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.servers.console.model import Console, DryRunError, dumps
from ratelimit_svc.servers.console.page import SECURITY_HEADERS, console_page
from ratelimit_svc.servers.http_api import Listener, start_listener
from ratelimit_svc.servers.peek_page import HELP as PEEK_HELP
from ratelimit_svc.servers.peek_page import PeekFn, peek_handler
from ratelimit_svc.settings.model import Settings

log = logging.getLogger(__name__)

ENDPOINTS = {
    "/": "this list of endpoints",
    "/rlconfig": "print out the currently loaded configuration for debugging",
    "/stats": "print out stats",
    "/settings": "the effective settings as JSON, credentials redacted",
    "/debug/tasks": "every asyncio task and its stack",
    "/debug/threads": "every thread and its stack",
    "/console": "the operator's console: rules, live traffic, hot keys, backend, dry run",
    "/console/api/rules": "the loaded rule tree, its source and the last load error (JSON)",
    "/console/api/traffic": "per-domain and per-rule rates over the last minutes (JSON)",
    "/console/api/hot-keys": "the counters over or near their limit now (JSON)",
    "/console/api/backend": "backend type, health, breaker, latency, errors, pool (JSON)",
    "/console/api/dry-run": "POST a RateLimitRequest as JSON: the answer, counting nothing",
    "/debug/tracemalloc": (
        "top allocation sites; ?start=1[&frames=N] to start tracing, ?stop=1 to stop, "
        "?limit=N (default 25), ?key=lineno|filename|traceback"
    ),
}
PROFILING = frozenset({"/debug/tasks", "/debug/threads", "/debug/tracemalloc"})
DEFAULT_TRACEMALLOC_LIMIT = 25
MAX_TRACEMALLOC_LIMIT = 1000
DEFAULT_TRACEMALLOC_FRAMES = 10
MAX_TRACEMALLOC_FRAMES = 100
_KEY_TYPES = ("lineno", "filename", "traceback")
_DIGITS = re.compile(r"[0-9]{1,9}")


def _text(body: str) -> web.Response:
    return web.Response(text=body)


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise web.HTTPBadRequest(
            text=f"{name} must be an integer from 1 to {maximum}, got {raw[:20]!r}\n"
        )
    return int(raw)


def _await_chain(coro: object) -> list[FrameType]:
    """The frames of a suspended coroutine and of everything it awaits, outermost first.

    (``Task.get_stack`` gives only the outermost frame of a suspended task.)
    """
    frames: list[FrameType] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def format_frames(frames: list[FrameType]) -> list[str]:
    summary = traceback.StackSummary.extract(
        (frame, frame.f_lineno or frame.f_code.co_firstlineno) for frame in frames
    )
    return summary.format()


def dump_tasks() -> str:
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"{len(tasks)} asyncio tasks\n")
    for task in tasks:
        coro = task.get_coro()
        out.write(f"\n--- {task.get_name()}: {getattr(coro, '__qualname__', coro)!r}\n")
        out.writelines(format_frames(_await_chain(coro)))
    return out.getvalue()


def dump_threads() -> str:
    out = io.StringIO()
    frames = sys._current_frames()
    threads = sorted(threading.enumerate(), key=lambda t: t.name)
    out.write(f"{len(threads)} threads\n")
    for thread in threads:
        daemon = " (daemon)" if thread.daemon else ""
        out.write(f"\n--- {thread.name}{daemon} ident={thread.ident}\n")
        frame = frames.get(thread.ident) if thread.ident is not None else None
        stack: list[FrameType] = []
        while frame is not None:
            stack.append(frame)
            frame = frame.f_back
        out.writelines(format_frames(stack[::-1]))
    return out.getvalue()


def tracemalloc_top(limit: int, key_type: str) -> str:
    """The top ``limit`` allocation sites (run in a worker thread: a snapshot can take a while)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
            tracemalloc.Filter(False, "<unknown>"),
        )
    )
    current, peak = tracemalloc.get_traced_memory()
    lines = [
        f"traced memory: current {current} bytes, peak {peak} bytes, "
        f"{tracemalloc.get_traceback_limit()} frames per trace",
        f"top {limit} by {key_type}:",
    ]
    for stat in snapshot.statistics(key_type)[:limit]:
        lines.append(str(stat))
        if key_type == "traceback":
            lines.extend(f"    {line}" for line in stat.traceback.format())
    return "\n".join(lines) + "\n"


def add_console_routes(app: web.Application, console: Console) -> None:
    """The console page and its JSON (docs/console.md); only the dry run takes a body."""
    page = console_page()

    def json_response(document: object, status: int = 200) -> web.Response:
        return web.Response(
            text=dumps(document), status=status, content_type="application/json",
            headers=SECURITY_HEADERS,
        )  # fmt: skip

    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text=page.html, content_type="text/html", headers=page.headers
        )

    async def dry_run(request: web.Request) -> web.Response:
        # A JSON content type cannot be sent cross-site without a CORS preflight, which this
        # listener never grants: another site open in the operator's browser cannot post here.
        if request.content_type != "application/json":
            return json_response({"error": "send the request as application/json"}, 415)
        try:
            return json_response(await console.dry_run(await request.read()))
        except DryRunError as exc:
            return json_response({"error": str(exc)}, exc.status)

    for path, panel in (
        ("/console/api/rules", console.rules),
        ("/console/api/traffic", console.traffic),
        ("/console/api/hot-keys", console.hot_keys),
        ("/console/api/backend", console.backend),
    ):
        async def handler(
            request: web.Request, panel: Callable[[], object] = panel
        ) -> web.Response:
            return json_response(panel())

        app.router.add_get(path, handler)
    app.router.add_get("/console", index)
    app.router.add_get("/console/", index)
    app.router.add_post("/console/api/dry-run", dry_run)


def build_debug_app(
    settings: Settings,
    config: Callable[[], RateLimitConfig | None],
    stats: Callable[[], Mapping[str, int]],
    console: Console | None = None,
    peek: PeekFn | None = None,
) -> web.Application:
    profiling = settings.debug_profiling_enabled

    async def index(request: web.Request) -> web.Response:
        endpoints = {**ENDPOINTS, **({"/debug/peek": PEEK_HELP} if peek is not None else {})}
        return _text(
            "".join(
                f"{path}: {help_}\n"
                if profiling or path not in PROFILING
                else f"{path}: off (DEBUG_PROFILING_ENABLED=false)\n"
                for path, help_ in sorted(endpoints.items())
            )
        )

    async def rlconfig(request: web.Request) -> web.Response:
        current = config()
        return _text(current.dump() if current is not None else "")

    async def stats_endpoint(request: web.Request) -> web.Response:
        return _text("".join(f"{name}: {value}\n" for name, value in sorted(stats().items())))

    async def settings_endpoint(request: web.Request) -> web.Response:
        return web.json_response(settings.redacted(), dumps=lambda d: json.dumps(d, indent=2))

    async def tasks(request: web.Request) -> web.Response:
        return _text(dump_tasks())

    async def threads(request: web.Request) -> web.Response:
        return _text(dump_threads())

    async def tracemalloc_endpoint(request: web.Request) -> web.Response:
        if "stop" in request.query:
            tracemalloc.stop()
            return _text("tracemalloc stopped\n")
        if "start" in request.query:
            frames = _int_param(
                request, "frames", DEFAULT_TRACEMALLOC_FRAMES, MAX_TRACEMALLOC_FRAMES
            )
            if tracemalloc.is_tracing():
                return _text(
                    f"tracemalloc already tracing ({tracemalloc.get_traceback_limit()} frames)\n"
                )
            tracemalloc.start(frames)
            return _text(
                f"tracemalloc started ({frames} frames per trace); "
                "GET /debug/tracemalloc for the top allocation sites\n"
            )
        if not tracemalloc.is_tracing():
            return _text(
                "tracemalloc is not tracing: GET /debug/tracemalloc?start=1 to start it "
                "(or run with PYTHONTRACEMALLOC=N)\n"
            )
        limit = _int_param(request, "limit", DEFAULT_TRACEMALLOC_LIMIT, MAX_TRACEMALLOC_LIMIT)
        key_type = request.query.get("key", "lineno")
        if key_type not in _KEY_TYPES:
            raise web.HTTPBadRequest(text=f"key must be one of {', '.join(_KEY_TYPES)}\n")
        return _text(await asyncio.to_thread(tracemalloc_top, limit, key_type))

    async def off(request: web.Request) -> web.Response:
        return web.Response(
            status=403,
            text=f"{request.path} is off: set DEBUG_PROFILING_ENABLED=true to enable it\n",
        )

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/rlconfig", rlconfig)
    app.router.add_get("/stats", stats_endpoint)
    app.router.add_get("/settings", settings_endpoint)
    app.router.add_get("/debug/tasks", tasks if profiling else off)
    app.router.add_get("/debug/threads", threads if profiling else off)
    app.router.add_get("/debug/tracemalloc", tracemalloc_endpoint if profiling else off)
    if console is not None:
        add_console_routes(app, console)
    if peek is not None:
        app.router.add_get("/debug/peek", peek_handler(peek))
    return app


async def start_debug_server(
    settings: Settings,
    config: Callable[[], RateLimitConfig | None],
    stats: Callable[[], Mapping[str, int]],
    console: Console | None = None,
    peek: PeekFn | None = None,
) -> Listener:
    app = build_debug_app(settings, config, stats, console, peek)
    listener = await start_listener(
        app,
        settings.debug_host,
        settings.debug_port,
        what="debug",
        setting="DEBUG_HOST/DEBUG_PORT",
        idle_timeout=settings.http_idle_timeout,
    )
    log.warning("Listening for debug on '%s'", listener.address)
    return listener
