"""Property-based tests (hypothesis; docs/reliability.md (Bad input)): the config loader, the matcher and the request path.

- Config loader: any text, YAML-ish token soup or mutated valid YAML either loads or raises
  ConfigError naming the file; never another exception. What loads can be dumped and matched.
- Matcher: random rule trees and entries give the same rule (and counter key) as a small
  reference implementation written here from docs/configuration.md (Descriptors and matching), independent of the service's data structures.
- Request path: random RateLimitRequest messages, random bytes and random /json bodies through the
  real running service are answered OK/OVER_LIMIT with one status per descriptor, or refused as
  invalid; never UNKNOWN, never INTERNAL, and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit_svc.app import App
from ratelimit_svc.config import goyaml
from ratelimit_svc.config.loader import VALID_KEYS, ConfigFile, load_config
from ratelimit_svc.errors import ConfigError
from ratelimit_svc.limiter.matching import match
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings

# -- the config loader ---------------------------------------------------------------------------

TOKENS = [
    "domain", "descriptors", "key", "value", "rate_limit", "unit", "requests_per_unit",
    "unlimited", "shadow_mode", "quota_mode", "name", "replaces", "detailed_metric",
    "value_to_metric", "share_threshold", "metadata", "bogus", ":", ": ", "-", "- ", " ", "  ",
    "\n", "\n  ", "\n    ", "\t", "[", "]", "{", "}", ",", "&a ", "*a", "&b ", "*b", "<<: ",
    "!!binary ", "!!set ", "!!str ", "!!int ", "!!python/object ", "!custom ", "'", '"', "---\n",
    "...\n", "#", "? ", "|\n", ">\n", "~", "null", "true", "yes", "1", "0", "-1", "4294967296",
    "0x1f", "1.5", ".nan", "2001-01-01", "second", "MINUTE", "hour", "week", "*", "x*", "a_b",
    "\\ud800", '"\\ud800"', "\x00", "\x85", "\ufeff", "é", '"\\U00110000"', "!!bool ", "!!float ",
    "!!timestamp ", "!!null ", "2001-02-30", "!!omap ", "!!pairs ", "!!merge ",
]  # fmt: skip
token_soup = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.sampled_from(["second", "minute", "hour", "day", "bogus", "", "*", "a*", "x"]),
)  # fmt: skip
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from([*sorted(VALID_KEYS), "other"]), children, max_size=5),
    ),
    max_leaves=25,
)


def dumped(value: Any) -> str:
    return yaml.dump(value, Dumper=goyaml.Dumper, allow_unicode=True)


@st.composite
def mutated_yaml(draw: st.DrawFn) -> str:
    """A valid-looking document with a few random characters replaced, inserted or removed."""
    text = dumped(draw(st.fixed_dictionaries({"domain": scalars, "descriptors": yaml_values})))
    for _ in range(draw(st.integers(0, 4))):
        if not text:
            break
        at = draw(st.integers(0, len(text) - 1))
        edit = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.sampled_from([":", "-", " ", "\n", "*", "&", "!", "[", "{", '"', "\t"]))
        if edit == "replace":
            text = text[:at] + char + text[at + 1 :]
        elif edit == "insert":
            text = text[:at] + char + text[at:]
        else:
            text = text[:at] + text[at + 1 :]
    return text


TAGS = ["", "", "!!int ", "!!bool ", "!!float ", "!!timestamp ", "!!binary ", "!!str ", "!!null ",
        "!!set ", "!!omap ", "!!pairs ", "!!seq ", "!!map ", "!local "]  # fmt: skip
leaf_text = st.one_of(
    st.sampled_from(["0", "-1", "0x", "1_0", "1:30", "yes", "maybe", "2001-02-30", "2001-01-01",
                     ".inf", ".nan", "aGk=", "@@", "{}", "[]", '"\\U00110000"', "~", "second"]),
    st.text(alphabet="0123456789abx-:.", max_size=6),
)  # fmt: skip
leaves = st.builds(lambda tag, text: f"{tag}{text}", st.sampled_from(TAGS), leaf_text)


@st.composite
def tagged_yaml(draw: st.DrawFn) -> str:
    """The config schema in flow style, each scalar under a random explicit tag."""
    leaf = lambda: draw(leaves)  # noqa: E731
    descriptor = (
        f"{{key: {leaf()}, value: {leaf()}, shadow_mode: {leaf()}, detailed_metric: {leaf()}, "
        f"rate_limit: {{unit: {leaf()}, requests_per_unit: {leaf()}, unlimited: {leaf()}, "
        f"name: {leaf()}, replaces: [{{name: {leaf()}}}]}}, metadata: {{a: {leaf()}, "
        f"b: [{leaf()}, {{c: {leaf()}}}]}}}}"
    )
    return f"{{domain: {leaf()}, descriptors: [{descriptor}]}}"


config_texts = st.one_of(
    st.text(max_size=200), token_soup, yaml_values.map(dumped), mutated_yaml(), tagged_yaml()
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=config_texts)
def test_config_loader_raises_only_config_error(text: str) -> None:
    try:
        config = load_config([ConfigFile("fuzz.yaml", text)])
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml: "), str(exc)
        return
    config.dump()  # /rlconfig works for whatever loaded
    for domain in config.domains:
        for entries in ([("key", "value")], [("a", "")], [("*", "*"), ("x", "y")]):
            match(config, domain, entries)


# -- the matcher against a reference implementation ----------------------------------------------

KEYS = ["a", "b", "a_x"]
VALUES = ["", "x", "y", "x_y", "*", "x*", "*y", "_*", "x*y"]


@dataclass
class RefNode:
    """A config descriptor as plain data; ``limit`` is a unique requests_per_unit, or None."""

    key: str
    value: str
    limit: int | None
    share_threshold: bool
    children: list[RefNode] = field(default_factory=list)

    @property
    def composite(self) -> str:
        return f"{self.key}_{self.value}" if self.value else self.key

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.value:
            out["value"] = self.value
        if self.limit is not None:
            out["rate_limit"] = {"unit": "hour", "requests_per_unit": self.limit}
        if self.share_threshold:
            out["share_threshold"] = True
        if self.children:
            out["descriptors"] = [c.to_yaml() for c in self.children]
        return out


@st.composite
def ref_trees(draw: st.DrawFn, depth: int = 0) -> list[RefNode]:
    """Siblings with distinct composite keys (as validation demands), up to 3 levels deep."""
    nodes: list[RefNode] = []
    composites: set[str] = set()
    for _ in range(draw(st.integers(0 if depth else 1, 4))):
        key, value = draw(st.sampled_from(KEYS)), draw(st.sampled_from(VALUES))
        node = RefNode(
            key, value, None, "*" in value and draw(st.booleans()),
            draw(ref_trees(depth + 1)) if depth < 2 and draw(st.booleans()) else [],
        )  # fmt: skip
        if node.composite in composites:
            continue
        composites.add(node.composite)
        if not node.children or draw(st.booleans()):
            node.limit = 0  # numbered below
        nodes.append(node)
    return nodes


def glob(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters, including none (dynamic programming, no regex)."""
    reachable = {0}
    for char in pattern:
        if char == "*":
            reachable = set(range(min(reachable), len(text) + 1)) if reachable else set()
        else:
            reachable = {i + 1 for i in reachable if i < len(text) and text[i] == char}
    return len(text) in reachable


def reference_match(
    domain: str, tree: list[RefNode], entries: list[tuple[str, str]]
) -> tuple[int, str] | None:
    """The matching walk of docs/configuration.md (Descriptors and matching), literally: exact ``k_v``, else the first wildcard in config order, else the
    plain ``k``; the rule of the node at the last entry; descend only into children; never back
    up. Returns (the rule's unique limit, the counter key body)."""
    level = tree
    body = domain + "_"
    for index, (key, value) in enumerate(entries):
        wanted = f"{key}_{value}"
        child = next((n for n in level if n.composite == wanted), None)
        shared = None
        if child is None:
            child = next((n for n in level if "*" in n.composite and glob(n.composite, wanted)), None)
            if child is not None and child.share_threshold:
                # the reference: request key + "_" + the pattern less a leading "<request key>_"
                shared = child.composite.removeprefix(f"{key}_")
        if child is None:
            child = next((n for n in level if n.composite == key), None)
        if child is None:
            return None
        body += f"{key}_{value if shared is None else shared}_"
        if index == len(entries) - 1:
            return None if child.limit is None else (child.limit, body)
        if not child.children:
            return None
        level = child.children
    return None


entry_lists = st.lists(
    st.tuples(
        st.sampled_from([*KEYS, "a_x_y", "c"]),
        st.one_of(st.sampled_from(VALUES), st.text(alphabet="xy_*", max_size=4)),
    ),
    max_size=4,
)


@settings(max_examples=500, deadline=None)
@given(tree=ref_trees(), requests=st.lists(entry_lists, min_size=1, max_size=8))
def test_matcher_agrees_with_the_reference(
    tree: list[RefNode], requests: list[list[tuple[str, str]]]
) -> None:
    counter = itertools.count(1)

    def number(nodes: list[RefNode]) -> None:
        for node in nodes:
            if node.limit is not None:
                node.limit = next(counter)
            number(node.children)

    number(tree)
    text = dumped({"domain": "d", "descriptors": [n.to_yaml() for n in tree]})
    config = load_config([ConfigFile("m.yaml", text)])
    for entries in requests:
        found = match(config, "d", entries)
        got = None if found is None else (found.rule.requests_per_unit, found.key_body)
        assert got == reference_match("d", tree, entries), (entries, text)


def test_glob_reference_itself() -> None:
    assert glob("a*", "a") and glob("*", "") and glob("a*b*c", "aXbYc") and glob("*.com", "x.com")
    assert not glob("a*b", "ab_") and not glob("x", "xx") and not glob("*y", "yx")


# -- the request path through the real service ---------------------------------------------------

SERVICE_RULES = """
domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 3}
    metadata: {team: a, when: 2001-01-01}
  - key: a
    value: x*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2, name: wild}
  - key: b
    value: "*"
    value_to_metric: true
    descriptors:
      - key: c
        detailed_metric: true
        rate_limit: {unit: minute, requests_per_unit: 0}
  - key: q
    quota_mode: true
    rate_limit: {unit: day, requests_per_unit: 1, replaces: [{name: wild}]}
  - key: s
    shadow_mode: true
    rate_limit: {unit: week, requests_per_unit: 1}
  - key: u
    rate_limit: {unlimited: true}
  - key: n
"""


class BackgroundService:
    """The real App on its own event loop in a thread, so that sync hypothesis tests can call it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.grpc_port = 0
        self.http_port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: App | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="service", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__ / __exit__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with App(Settings.from_env(self.env)) as app:
            assert app.grpc is not None and app.http is not None
            self._app, self.grpc_port, self.http_port = app, app.grpc.port, app.http.port
            self._ready.set()
            await app.run()

    def __enter__(self) -> BackgroundService:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._app is not None:
            self._loop.call_soon_threadsafe(self._app.stop)
        self._thread.join(30)
        if self._error is not None:
            raise self._error


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundService]:
    root: Path = tmp_path_factory.mktemp("props")
    (root / "rl" / "config").mkdir(parents=True)
    (root / "rl" / "config" / "d.yaml").write_text(SERVICE_RULES)
    env = {
        "BACKEND_TYPE": "memory", "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0",
        "HOST": "127.0.0.1", "PORT": "0", "DEBUG_HOST": "127.0.0.1", "DEBUG_PORT": "0",
        "USE_STATSD": "false", "RUNTIME_ROOT": str(root), "RUNTIME_SUBDIRECTORY": "rl",
        "RUNTIME_WATCH_ROOT": "false", "RESPONSE_DYNAMIC_METADATA": "true",
        "LIMIT_RESPONSE_HEADERS_ENABLED": "true", "LOCAL_CACHE_SIZE_IN_BYTES": "2000",
        "MAX_DESCRIPTORS_PER_REQUEST": "8", "MAX_ENTRIES_PER_DESCRIPTOR": "4",
        "MAX_VALUE_BYTES": "64",
    }  # fmt: skip
    with BackgroundService(env) as service:
        yield service


@pytest.fixture(scope="module")
def channel(running: BackgroundService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as chan:
        yield chan


texts = st.one_of(
    st.sampled_from(["a", "b", "c", "q", "s", "u", "n", "x", "xa", "x*", ""]),
    st.text(max_size=70),
)
entries = st.builds(ratelimit_pb2.RateLimitDescriptor.Entry, key=texts, value=texts)
overrides = st.builds(
    ratelimit_pb2.RateLimitDescriptor.RateLimitOverride,
    requests_per_unit=st.integers(0, 2**32 - 1),
    unit=st.integers(0, 9),  # 8 and 9 are not units: an open enum carries them anyway
)


@st.composite
def descriptors(draw: st.DrawFn) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(entries=draw(st.lists(entries, max_size=6)))
    if draw(st.integers(0, 5)) == 0:
        d.limit.CopyFrom(draw(overrides))
    if draw(st.booleans()):
        d.hits_addend.value = draw(st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1)))
    return d


requests = st.builds(
    rls_pb2.RateLimitRequest,
    domain=st.one_of(st.just("d"), texts),
    descriptors=st.lists(descriptors(), max_size=10),
    hits_addend=st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
)


def assert_answered(channel: grpc.Channel, request: rls_pb2.RateLimitRequest) -> None:
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)
    try:
        response = stub.ShouldRateLimit(request, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        return
    assert response.overall_code in (
        rls_pb2.RateLimitResponse.OK,
        rls_pb2.RateLimitResponse.OVER_LIMIT,
    )
    assert len(response.statuses) == len(request.descriptors)
    assert all(s.code != rls_pb2.RateLimitResponse.UNKNOWN for s in response.statuses)


def still_serving(channel: grpc.Channel) -> None:
    d = ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key="u", value="v")
    response = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain="d", descriptors=[d]), timeout=10
    )
    assert response.statuses[0].limit_remaining == 2**32 - 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_random_requests_are_answered_never_unknown(
    channel: grpc.Channel, request: rls_pb2.RateLimitRequest
) -> None:
    assert_answered(channel, request)


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), requests.map(lambda r: r.SerializeToString()[:-1])))
def test_random_bytes_are_answered_or_refused_as_invalid(
    channel: grpc.Channel, data: bytes
) -> None:
    raw = channel.unary_unary(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        request_serializer=None,
        response_deserializer=None,
    )
    try:
        raw(data, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    still_serving(channel)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["domain", "descriptors", "entries", "key", "value", "limit", "hitsAddend",
                 "hits_addend", "requestsPerUnit", "unit", "x"]
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=20,
)  # fmt: skip


def post_json(port: int, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/json", body=body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@settings(max_examples=150, deadline=None)
@given(
    body=st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        requests.map(lambda r: _request_json(r)),
        st.binary(max_size=100),
    )
)
def test_random_json_bodies_get_an_http_answer(running: BackgroundService, body: bytes) -> None:
    assert post_json(running.http_port, body) in (200, 429, 400)


def _request_json(request: rls_pb2.RateLimitRequest) -> bytes:
    from google.protobuf import json_format

    return json_format.MessageToJson(request).encode()


def test_still_serving_after_all_of_it(channel: grpc.Channel, running: BackgroundService) -> None:
    still_serving(channel)
    body = b'{"domain": "d", "descriptors": [{"entries": [{"key": "u", "value": "v"}]}]}'
    assert post_json(running.http_port, body) == 200

