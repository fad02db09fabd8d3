"""Service settings: the only place the process environment is read.

``Settings.from_env(mapping)`` turns environment variables into one frozen ``Settings`` with the
reference's names and defaults (a field is its variable lower-cased; REDIS_* and REDIS_PERSECOND_*
become two ``RedisSettings`` through the single ``parse_redis``). Values are parsed as the
reference's envconfig does: booleans like Go's ``strconv.ParseBool``, integers like ``ParseInt``,
floats like ``ParseFloat``, durations like ``time.ParseDuration`` (stored as float seconds), lists
as ``a,b,c`` and maps as ``k1:v1,k2:v2``. One deliberate difference: a variable that is set but
empty means "use the default" for every non-string setting (envconfig would fail to parse it);
plain strings keep the empty value, as in the reference. Each field's parser is declared in its
type (``Annotated[int, ...]``), so the class below is the table of variables. Any bad value raises
``SettingsError`` naming the variable and the value; credentials are shown only as ``<redacted>``,
in errors, in ``repr`` and in ``redacted()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

from ratelimit_svc.errors import SettingsError

REDACTED = "<redacted>"
_N = TypeVar("_N", int, float)

# -- parsers: str -> value, raising ValueError("expected ...") ---------------------------------
# A parser's message never repeats the input: the caller shows the value itself, masked when the
# variable holds a credential.

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INT = re.compile(r"[+-]?[0-9]+")
_DEC = r"[0-9](?:_?[0-9])*"
_HEX = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_DECIMAL_FLOAT = re.compile(rf"[+-]?(?:{_DEC}(?:\.(?:{_DEC})?)?|\.{_DEC})(?:[eE][+-]?{_DEC})?")
_HEX_FLOAT = re.compile(rf"[+-]?0[xX]_?(?:{_HEX}(?:\.(?:{_HEX})?)?|\.{_HEX})[pP][+-]?{_DEC}")
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def text(raw: str) -> str:
    return raw


def boolean(raw: str) -> bool:
    """Go's strconv.ParseBool: exactly these twelve spellings."""
    if raw in _GO_TRUE:
        return True
    if raw in _GO_FALSE:
        return False
    raise ValueError("expected a boolean: true, false, 1, 0, t, f, TRUE, FALSE, True or False")


def integer(raw: str) -> int:
    """Go's strconv.ParseInt for a 64-bit int: optional sign, decimal digits, nothing else."""
    if not _INT.fullmatch(raw):
        raise ValueError("expected an integer")
    value = int(raw)
    if not -(2**63) <= value < 2**63:
        raise ValueError("expected an integer that fits in 64 bits")
    return value


def number(raw: str) -> float:
    """Go's strconv.ParseFloat (decimal or hex, ``_`` between digits); must be finite."""
    if _DECIMAL_FLOAT.fullmatch(raw):
        value = float(raw.replace("_", ""))
    elif _HEX_FLOAT.fullmatch(raw):
        value = float.fromhex(raw.replace("_", ""))
    else:
        raise ValueError("expected a number")
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def duration(raw: str) -> float:
    """Go's time.ParseDuration (``150us``, ``1.5h``, ``1h15m30.5s``, ``-1s``, ``0``), in seconds."""
    expected = "expected a duration like 150us, 10s or 1h30m"
    rest = raw[1:] if raw[:1] in ("+", "-") else raw
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(expected)
    total_ns, pos = 0, 0
    while pos < len(rest):
        part = _DURATION_PART.match(rest, pos)
        assert part is not None  # every group is optional, so it always matches
        whole, frac, unit = part.groups()
        if not whole and not frac:
            raise ValueError(expected)
        if not unit:
            raise ValueError(f"{expected}; missing unit")
        if unit not in _NS_PER_UNIT:
            raise ValueError(f"{expected}; unknown unit {unit!r}")
        scale = _NS_PER_UNIT[unit]
        total_ns += int(whole or "0") * scale
        if frac:
            total_ns += int(frac) * scale // 10 ** len(frac)  # Go truncates below 1ns too
        pos = part.end()
    negative = raw[:1] == "-"
    if total_ns > 2**63 - (0 if negative else 1):
        raise ValueError(f"{expected}; out of range")
    return -total_ns / 1e9 if negative else total_ns / 1e9


def seconds(raw: str) -> float:
    """A plain number of seconds (``2.5``) or a Go duration (``2500ms``)."""
    try:
        return number(raw)
    except ValueError:
        pass
    try:
        return duration(raw)
    except ValueError:
        raise ValueError("expected a number of seconds or a duration like 30s") from None


def string_list(raw: str) -> tuple[str, ...]:
    """``a, b,c`` -> ("a", "b", "c"); items are stripped and empty items dropped."""
    return tuple(item for item in (part.strip() for part in raw.split(",")) if item)


def string_map(raw: str) -> Mapping[str, str]:
    """``k1:v1,k2:v2`` -> {"k1": "v1", "k2": "v2"}; split on the first ``:``, parts stripped."""
    pairs: dict[str, str] = {}
    for number_, pair in enumerate(raw.split(","), start=1):
        if not pair.strip():
            continue
        key, colon, value = pair.partition(":")
        if not colon:
            raise ValueError(f"expected k1:v1,k2:v2; pair {number_} has no ':'")
        if not key.strip():
            raise ValueError(f"expected k1:v1,k2:v2; pair {number_} has an empty key")
        pairs[key.strip()] = value.strip()
    return MappingProxyType(pairs)


def node_metadata(raw: str) -> Mapping[str, str]:
    """CONFIG_GRPC_XDS_NODE_METADATA: ``k1=v1,k2=v2`` as the reference writes it, or ``k1:v1``.

    Each pair splits on whichever of ``=`` and ``:`` comes first, so values may contain the other.
    """
    pairs: dict[str, str] = {}
    for number_, pair in enumerate(raw.split(","), start=1):
        if not pair.strip():
            continue
        cut = min((i for i in (pair.find("="), pair.find(":")) if i >= 0), default=-1)
        if cut < 0:
            raise ValueError(f"expected k1=v1,k2=v2; pair {number_} has no '=' or ':'")
        key, value = pair[:cut].strip(), pair[cut + 1 :].strip()
        if not key:
            raise ValueError(f"expected k1=v1,k2=v2; pair {number_} has an empty key")
        pairs[key] = value
    return MappingProxyType(pairs)


def choice(*options: str) -> Callable[[str], str]:
    """One of ``options``, matched case-insensitively and stored in the options' case."""
    by_folded = {option.casefold(): option for option in options}

    def parse(raw: str) -> str:
        try:
            return by_folded[raw.casefold()]
        except KeyError:
            raise ValueError(f"expected one of: {', '.join(options)}") from None

    return parse


def within(
    parse: Callable[[str], _N], low: _N, high: _N | None = None, *, above: bool = False
) -> Callable[[str], _N]:
    """``parse``, then require ``low <= value <= high`` (``low < value`` when ``above``)."""
    if above:
        bound = f"must be > {low}"
    elif high is None:
        bound = f"must be >= {low}"
    else:
        bound = f"must be from {low} to {high}"

    def checked(raw: str) -> _N:
        value = parse(raw)
        if value < low or (above and value == low) or (high is not None and value > high):
            raise ValueError(bound)
        return value

    return checked


def _empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


# -- the vocabulary of the tables below --------------------------------------------------------


class _Secret:
    """Marks a credential: the whole value (or, for a map, every value) is never shown."""


SECRET = _Secret()

Text = Annotated[str, text]
Secret = Annotated[str, text, SECRET]
Bool = Annotated[bool, boolean]
Int = Annotated[int, integer]
Count = Annotated[int, within(integer, 0)]
Port = Annotated[int, within(integer, 0, 65535)]
Float = Annotated[float, number]
Duration = Annotated[float, duration]
List = Annotated[tuple[str, ...], string_list]
Map = Annotated[Mapping[str, str], string_map]
SecretMap = Annotated[Mapping[str, str], string_map, SECRET]

HOUR = 3600.0
REDIS_URL = "/var/run/nutcracker/ratelimit.sock"
REDIS_PERSECOND_URL = "/var/run/nutcracker/ratelimitpersecond.sock"


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """One Redis connection (REDIS_* or REDIS_PERSECOND_*); see ``parse_redis``."""

    socket_type: Annotated[str, choice("unix", "tcp")] = "unix"
    type: Annotated[str, choice("single", "sentinel", "cluster")] = "single"
    url: Text = REDIS_URL
    pool_size: Count = 10
    auth: Secret = field(default="", repr=False)
    sentinel_auth: Secret = field(default="", repr=False)
    tls: Bool = False
    tls_client_cert: Text = ""
    tls_client_key: Text = ""
    tls_cacert: Text = ""
    tls_skip_hostname_verification: Bool = False
    pipeline_window: Duration = 0.0
    pipeline_limit: Count = 0

    def __repr__(self) -> str:
        return _repr(self)

    def redacted(self) -> dict[str, object]:
        """Every field as plain data, credentials replaced by ``<redacted>`` when set."""
        return _redacted(self)


def parse_redis(env: Mapping[str, str], prefix: str, default_url: str) -> RedisSettings:
    """Read one Redis connection from ``prefix`` + SOCKET_TYPE, TYPE, URL, POOL_SIZE, AUTH, ...

    The same function reads REDIS_* and REDIS_PERSECOND_*; only the default URL differs.
    """
    return RedisSettings(**{"url": default_url, **_read(RedisSettings, env, prefix)})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the service; field = environment variable lower-cased."""

    host: Text = "0.0.0.0"
    port: Port = 8080
    debug_host: Text = "0.0.0.0"
    debug_port: Port = 6070
    grpc_host: Text = "0.0.0.0"
    grpc_port: Port = 8081
    grpc_uds: Text = ""
    grpc_max_connection_age: Duration = 24 * HOUR
    grpc_max_connection_age_grace: Duration = 1 * HOUR
    grpc_server_use_tls: Bool = False
    grpc_server_tls_cert: Text = ""
    grpc_server_tls_key: Text = ""
    grpc_client_tls_cacert: Text = ""
    grpc_client_tls_san: Text = ""
    log_level: Annotated[
        str, choice("TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL", "PANIC")
    ] = "WARN"
    log_format: Annotated[str, choice("text", "json")] = "text"
    config_type: Annotated[str, choice("FILE", "GRPC_XDS_SOTW")] = "FILE"
    force_start_without_initial_config: Bool = False

    config_grpc_xds_node_id: Text = "default"
    config_grpc_xds_node_metadata: Annotated[Mapping[str, str], node_metadata] = field(
        default_factory=_empty_map, hash=False
    )
    config_grpc_xds_server_url: Text = "localhost:18000"
    config_grpc_xds_server_connect_retry_interval: Duration = 3.0
    # Extra headers sent to the xDS server usually carry a token.
    config_grpc_xds_client_additional_headers: SecretMap = field(
        default_factory=_empty_map, hash=False
    )
    config_grpc_xds_server_use_tls: Bool = False
    config_grpc_xds_client_tls_cert: Text = ""
    config_grpc_xds_client_tls_key: Text = ""
    config_grpc_xds_server_tls_cacert: Text = ""
    config_grpc_xds_server_tls_san: Text = ""
    xds_client_backoff_initial_interval: Duration = 10.0
    xds_client_backoff_max_interval: Duration = 60.0
    xds_client_backoff_random_factor: Float = 0.5
    xds_client_backoff_jitter: Bool = True

    use_statsd: Bool = True
    statsd_host: Text = "localhost"
    statsd_port: Port = 8125
    statsd_protocol: Annotated[str, choice("tcp", "udp")] = "tcp"
    use_dog_statsd: Bool = False
    use_dog_statsd_mogrifiers: List = ()
    use_prometheus: Bool = False
    prometheus_addr: Text = ":9090"
    prometheus_path: Text = "/metrics"
    extra_tags: Map = field(default_factory=_empty_map, hash=False)
    stats_flush_interval: Duration = 10.0
    disable_stats: Bool = False

    runtime_root: Text = "/srv/runtime_data/current"
    runtime_subdirectory: Text = ""
    runtime_appdirectory: Text = "config"
    runtime_ignoredotfiles: Bool = False
    runtime_watch_root: Bool = True

    expiration_jitter_max_seconds: Count = 300
    local_cache_size_in_bytes: Count = 0
    near_limit_ratio: Float = 0.8
    cache_key_prefix: Text = ""
    backend_type: Annotated[str, choice("redis", "memcache", "memory")] = "redis"
    stop_cache_key_increment_when_overlimit: Bool = False

    limit_response_headers_enabled: Bool = False
    limit_limit_header: Text = "RateLimit-Limit"
    limit_remaining_header: Text = "RateLimit-Remaining"
    limit_reset_header: Text = "RateLimit-Reset"
    healthy_with_at_least_one_config_loaded: Bool = False

    redis: RedisSettings = RedisSettings()
    redis_persecond: Bool = False
    redis_persecond_settings: RedisSettings = RedisSettings(url=REDIS_PERSECOND_URL)
    redis_health_check_active_connection: Bool = False
    redis_op_timeout: Annotated[float, within(duration, 0.0, above=True)] = 1.0
    redis_startup_initial_interval: Duration = 1.0
    redis_startup_max_interval: Duration = 30.0
    redis_startup_max_elapsed_time: Duration = 0.0

    # Ours (SPEC 12, README: Reliability): fail fast when the backend fails (0 = off / unbounded)
    # and bound what one request may carry (0 = no limit).
    breaker_failure_threshold: Count = 5
    breaker_cooldown: Annotated[float, within(seconds, 0.0)] = 2.0
    backend_max_in_flight: Count = 1000
    max_descriptors_per_request: Count = 256
    max_entries_per_descriptor: Count = 64
    max_value_bytes: Count = 65536
    max_request_bytes: Annotated[int, within(integer, 1024, 2**31 - 1)] = 4 * 1024 * 1024

    memcache_host_port: List = ()
    memcache_max_idle_conns: Count = 2
    memcache_srv: Text = ""
    memcache_srv_refresh: Duration = 0.0
    memcache_tls: Bool = False
    memcache_tls_client_cert: Text = ""
    memcache_tls_client_key: Text = ""
    memcache_tls_cacert: Text = ""
    memcache_tls_skip_hostname_verification: Bool = False

    shadow_mode: Bool = False
    quota_mode: Bool = False
    response_dynamic_metadata: Bool = False
    merge_domain_config: Bool = False

    tracing_enabled: Bool = False
    tracing_service_name: Text = "RateLimit"
    tracing_service_namespace: Text = ""
    tracing_service_instance_id: Text = ""
    tracing_exporter_protocol: Annotated[str, choice("http", "grpc")] = "http"
    tracing_sampling_rate: Annotated[float, within(number, 0.0, 1.0)] = 1.0

    shutdown_drain_seconds: Annotated[float, within(seconds, 0.0)] = 0.0
    # Ours: how many rule stats keys the stats LRU holds (high-cardinality values are bounded).
    stats_max_keys: Annotated[int, within(integer, 1)] = 10_000
    # The reference's limit on one xDS message.
    xds_client_max_msg_size_in_bytes: Annotated[int, within(integer, 1)] = 256 * 1024 * 1024
    # Ours (README: Performance): gRPC worker processes sharing GRPC_PORT. 0 = one per CPU with
    # a shared backend, 1 with BACKEND_TYPE=memory or GRPC_UDS (see workers.worker_count).
    workers: Count = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read every setting from ``env`` (``os.environ`` or a plain dict in tests).

        Unset variables take the reference's defaults; so do set-but-empty ones, except plain
        strings, which keep the empty value. Raises ``SettingsError`` naming the first bad
        variable and its value (credentials masked).
        """
        settings = cls(
            **_read(cls, env, ""),
            redis=parse_redis(env, "REDIS_", REDIS_URL),
            redis_persecond_settings=parse_redis(env, "REDIS_PERSECOND_", REDIS_PERSECOND_URL),
        )
        settings._check_combinations()
        return settings

    def _check_combinations(self) -> None:
        sinks = {
            "USE_STATSD": self.use_statsd,
            "USE_DOG_STATSD": self.use_dog_statsd,
            "USE_PROMETHEUS": self.use_prometheus,
        }
        if sum(sinks.values()) > 1:
            enabled = ", ".join(f"{name}=true" for name, on in sinks.items() if on)
            raise SettingsError(
                f"only one of USE_STATSD, USE_DOG_STATSD, USE_PROMETHEUS may be true, got "
                f"{enabled} (USE_STATSD defaults to true: set USE_STATSD=false to use another)"
            )
        if self.memcache_host_port and self.memcache_srv:
            raise SettingsError(
                f"MEMCACHE_HOST_PORT and MEMCACHE_SRV are both set "
                f"({','.join(self.memcache_host_port)!r} and {self.memcache_srv!r}): set only one"
            )
        if self.workers > 1 and self.backend_type == "memory":
            raise SettingsError(
                f"WORKERS={self.workers} needs a backend shared by the worker processes: "
                "BACKEND_TYPE=memory counts in each process, which would multiply every limit "
                "by the number of workers (use WORKERS=1, or BACKEND_TYPE=redis)"
            )
        if self.workers > 1 and self.grpc_uds:
            raise SettingsError(
                f"WORKERS={self.workers} needs a TCP port the workers can share (SO_REUSEPORT): "
                f"GRPC_UDS={self.grpc_uds!r} is a unix socket (use WORKERS=1, or GRPC_PORT)"
            )

    def __repr__(self) -> str:
        return _repr(self)

    def redacted(self) -> dict[str, object]:
        """Every field as plain data (lists, dicts), credentials replaced by ``<redacted>``."""
        return _redacted(self)


# -- the machinery that walks a table ----------------------------------------------------------


_Table = dict[str, tuple[Callable[[str], Any] | None, bool]]


def _table_of(cls: type) -> _Table:
    """Field name -> (parser, is_secret) from the ``Annotated`` types; no parser: not a variable."""
    table: _Table = {}
    for name, hint in get_type_hints(cls, include_extras=True).items():
        extras = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        parsers = [extra for extra in extras if callable(extra) and extra is not SECRET]
        table[name] = (parsers[0] if parsers else None, SECRET in extras)
    return table


_TABLES: dict[type, _Table] = {cls: _table_of(cls) for cls in (RedisSettings, Settings)}


def _read(cls: type, env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """Parse the variables of ``cls``'s table that ``env`` sets; absent ones are left out."""
    values: dict[str, Any] = {}
    for name, (parse, secret) in _TABLES[cls].items():
        variable = prefix + name.upper()
        raw = env.get(variable)
        if parse is None or raw is None or (raw == "" and parse is not text):
            continue
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            shown = REDACTED if secret else raw
            raise SettingsError(f"invalid value for {variable}: {shown!r} ({exc})") from None
    return values


def _masked(value: object, secret: bool) -> object:
    if not secret or not value:
        return value
    if isinstance(value, Mapping):
        return dict.fromkeys(value, REDACTED)
    return REDACTED


def _repr(obj: RedisSettings | Settings) -> str:
    table = _TABLES[type(obj)]
    parts = []
    for f in fields(obj):
        value = _masked(getattr(obj, f.name), table[f.name][1])
        parts.append(f"{f.name}={dict(value) if isinstance(value, Mapping) else value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def _redacted(obj: RedisSettings | Settings) -> dict[str, object]:
    table = _TABLES[type(obj)]
    plain: dict[str, object] = {}
    for f in fields(obj):
        value = _masked(getattr(obj, f.name), table[f.name][1])
        if isinstance(value, RedisSettings):
            value = value.redacted()
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        plain[f.name] = value
    return plain
