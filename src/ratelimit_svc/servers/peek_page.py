"""``/debug/peek`` on the debug port: the counters a descriptor maps to — current value, limit,
remaining and reset — without counting a hit (docs/observability.md (Peeking at a counter)).

``GET /debug/peek?domain=D&descriptor=k=v,k2=v2`` (``descriptor`` repeatable) answers plain text,
or JSON with ``?format=json`` or ``Accept: application/json``. Request values are escaped in the
text and encoded by json.dumps in the JSON; bad parameters are a 400 saying why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from ratelimit_svc.errors import BackendError, NoConfigError, RequestError
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.limiter.peek import CounterView, format_text

PeekFn = Callable[[Request], Awaitable[list[CounterView]]]
HELP = (
    "current value, limit and reset of a descriptor's counters, not counting: "
    "?domain=D&descriptor=k=v,k2=v2[&format=json]"
)
MAX_DESCRIPTORS = 16


def parse_descriptor(spec: str) -> RequestDescriptor:
    entries = []
    for pair in spec.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RequestError(f"descriptor entry {pair!r} is not key=value")
        entries.append((key, value))
    return RequestDescriptor(tuple(entries), hits_addend=0)


def peek_handler(peek: PeekFn) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        query = request.query
        as_json = query.get("format") == "json" or "application/json" in request.headers.get(
            "Accept", ""
        )

        def error(status: int, message: str) -> web.Response:
            if as_json:
                return web.json_response({"code": status, "message": message}, status=status)
            return web.Response(status=status, text=message + "\n")

        specs = query.getall("descriptor", [])
        domain = query.get("domain", "")
        if not domain or not specs:
            return error(400, "give ?domain=D and at least one &descriptor=k=v[,k2=v2]")
        if len(specs) > MAX_DESCRIPTORS:
            return error(400, f"at most {MAX_DESCRIPTORS} descriptors")
        try:
            descriptors = tuple(parse_descriptor(spec) for spec in specs)
            views = await peek(Request(domain, descriptors))
        except RequestError as exc:
            return error(400, str(exc))
        except (BackendError, NoConfigError) as exc:
            return error(503, str(exc))
        if as_json:
            return web.json_response(
                {"domain": domain, "descriptors": [view.as_dict() for view in views]}
            )
        return web.Response(text=format_text(domain, views))

    return handle
