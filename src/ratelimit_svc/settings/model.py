"""Service settings: the only place the process environment is read. ``Settings.from_env(mapping)``
turns environment variables into one frozen ``Settings`` with the reference's names and defaults,
grouped by concern: each group (``RedisSettings``, ``MemcacheSettings``, ``XdsSettings``,
``StatsSettings``, ``TracingSettings``, ``GrpcTlsSettings``) is read from its prefix, and a
component is handed only its group. Each field's parser and meaning are declared in its type, so
the classes below are the table of variables (docs/configuration.md is generated from them). A set-
but-empty variable means "use the default" for every non-string setting; plain strings keep the
empty value, as in the reference. A bad value raises ``SettingsError`` naming the variable and the
value; credentials show only as ``<redacted>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Annotated, Any, ClassVar, get_args, get_origin, get_type_hints

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.parse import (
    REDACTED,
    SECRET,
    Bool,
    Count,
    Doc,
    Duration,
    Float,
    List,
    Map,
    Port,
    Secret,
    SecretMap,
    Text,
    Var,
    choice,
    duration,
    empty_map,
    integer,
    node_metadata,
    number,
    seconds,
    text,
    within,
)

HOUR = 3600.0
# A config file larger than this is refused before it is parsed (docs/reliability.md).
CONFIG_MAX_FILE_BYTES = 16 * 1024 * 1024
REDIS_URL = "/var/run/nutcracker/ratelimit.sock"
REDIS_PERSECOND_URL = "/var/run/nutcracker/ratelimitpersecond.sock"


class _Group:
    """A group of settings read from one prefix; ``redacted()`` and ``repr`` mask credentials."""

    PREFIX: ClassVar[str] = ""

    def __repr__(self) -> str:
        return _repr(self)

    def redacted(self) -> dict[str, object]:
        """Every field as plain data (lists, dicts), credentials replaced by ``<redacted>``."""
        return _redacted(self)


@dataclass(frozen=True, slots=True, repr=False)
class RedisSettings(_Group):
    """One Redis connection (REDIS_* or REDIS_PERSECOND_*); see ``parse_redis``."""

    socket_type: Annotated[str, choice("unix", "tcp"), Doc("`unix` or `tcp`")] = "unix"
    type: Annotated[
        str,
        choice("single", "sentinel", "cluster"),
        Doc("`single`, `sentinel` (URL `mastername,host:port,...`) or `cluster` (seed list)"),
    ] = "single"
    url: Annotated[
        Text,
        Doc(
            "socket path, `host:port` with `tcp`, or `redis://[user:password@]host[:port][/db]`"
            " (`rediss://`: TLS)"
        ),
    ] = REDIS_URL
    pool_size: Annotated[
        Count, Doc("accepted; one pipelined connection per server carries every call")
    ] = 10
    auth: Annotated[Secret, Doc("`password` or `user:password` (never logged)")] = field(
        default="", repr=False
    )
    sentinel_auth: Annotated[Secret, Doc("password of the sentinels")] = field(
        default="", repr=False
    )
    tls: Annotated[Bool, Doc("TLS to Redis")] = False
    tls_client_cert: Annotated[Text, Doc("client certificate file (mutual TLS)")] = ""
    tls_client_key: Annotated[Text, Doc("its key file")] = ""
    tls_cacert: Annotated[Text, Doc("CA bundle that signs the server's certificate")] = ""
    tls_skip_hostname_verification: Annotated[Bool, Doc("do not check the server's name")] = False
    pipeline_window: Annotated[
        Duration, Doc("coalesce the commands of concurrent requests for this long (0 = off)")
    ] = 0.0
    pipeline_limit: Annotated[Count, Doc("at most this many requests per pipeline (0 = any)")] = 0
    db: Annotated[Count, Doc("database to SELECT (or the `/db` of a `redis://` URL)")] = 0


def parse_redis(env: Mapping[str, str], prefix: str, default_url: str) -> RedisSettings:
    """Read one Redis connection from ``prefix`` + SOCKET_TYPE, TYPE, URL, POOL_SIZE, AUTH, ...

    The same function reads REDIS_* and REDIS_PERSECOND_*; only the default URL differs. A URL
    ``redis://[user:password@]host[:port][/db]`` (``rediss://``: TLS) is taken apart here, so
    that the credentials live only in ``auth`` (docs/backends.md, Connecting).
    """
    values = {"url": default_url, **_read(RedisSettings, env, prefix)}
    if str(values["url"]).startswith(("redis://", "rediss://")):
        values.update(_redis_url(str(values["url"]), prefix, values))
    return RedisSettings(**values)


def _redis_url(url: str, prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a ``redis://`` or ``rediss://`` URL stands for; errors never show the
    password."""
    from urllib.parse import unquote, urlsplit

    variable = f"{prefix}URL"
    scheme, _, rest = url.partition("://")
    userinfo, at, hostinfo = rest.rpartition("@")
    shown = f"{scheme}://{'<redacted>@' if at else ''}{hostinfo}"

    def invalid(reason: str) -> SettingsError:
        return SettingsError(f"invalid value for {variable}: {shown!r} ({reason})")

    if values.get("type", "single") != "single":
        raise invalid(f"a redis:// URL is for {prefix}TYPE=single")
    try:
        parts = urlsplit(f"{scheme}://{hostinfo}")
        host, port = parts.hostname, parts.port or 6379
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if not host:
        raise invalid("expected redis://[user:password@]host[:port][/db]")
    if parts.query or parts.fragment:
        raise invalid("query parameters are not supported")
    database = parts.path.removeprefix("/")
    if database and not database.isdigit():
        raise invalid(f"the database must be a number, not {database!r}")
    settings: dict[str, Any] = {
        "url": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "socket_type": "tcp",
        "tls": bool(values.get("tls")) or scheme == "rediss",
    }
    if database:
        if values.get("db") and values["db"] != int(database):
            raise invalid(f"database {database} in {variable}, {values['db']} in {prefix}DB")
        settings["db"] = int(database)
    if at:
        if values.get("auth"):
            raise invalid(f"credentials in both {variable} and {prefix}AUTH")
        user, colon, password = userinfo.partition(":")
        if not colon:
            raise invalid("a user name without a password")
        user, password = unquote(user), unquote(password)
        settings["auth"] = f"{user}:{password}" if user else password
    return settings


@dataclass(frozen=True, slots=True, repr=False)
class MemcacheSettings(_Group):
    """BACKEND_TYPE=memcache (docs/backends.md)."""

    PREFIX: ClassVar[str] = "MEMCACHE_"

    host_port: Annotated[List, Doc("memcached servers, `host:port,...`")] = ()
    max_idle_conns: Annotated[Count, Doc("idle connections kept per server")] = 2
    srv: Annotated[Text, Doc("an SRV record to find the servers by (instead of HOST_PORT)")] = ""
    srv_refresh: Annotated[Duration, Doc("how often to look the SRV record up (0 = once)")] = 0.0
    tls: Annotated[Bool, Doc("TLS to memcached")] = False
    tls_client_cert: Annotated[Text, Doc("client certificate file")] = ""
    tls_client_key: Annotated[Text, Doc("its key file")] = ""
    tls_cacert: Annotated[Text, Doc("CA bundle")] = ""
    tls_skip_hostname_verification: Annotated[Bool, Doc("do not check the server's name")] = False


@dataclass(frozen=True, slots=True, repr=False)
class XdsSettings(_Group):
    """CONFIG_TYPE=GRPC_XDS_SOTW: the xDS client (docs/xds.md)."""

    PREFIX: ClassVar[str] = "CONFIG_GRPC_XDS_"

    node_id: Annotated[Text, Doc("the node id sent to the management server")] = "default"
    node_metadata: Annotated[
        Mapping[str, str], node_metadata, Doc("node metadata, `k1=v1,k2=v2`")
    ] = field(default_factory=empty_map, hash=False)
    server_url: Annotated[Text, Doc("the management server, `host:port`")] = "localhost:18000"
    server_connect_retry_interval: Annotated[Duration, Doc("accepted, as the reference's")] = 3.0
    # Extra headers sent to the xDS server usually carry a token.
    client_additional_headers: Annotated[
        SecretMap, Doc("gRPC metadata sent with the stream, `k1:v1,...` (values never shown)")
    ] = field(default_factory=empty_map, hash=False)
    server_use_tls: Annotated[Bool, Doc("TLS to the management server")] = False
    client_tls_cert: Annotated[Text, Doc("client certificate file")] = ""
    client_tls_key: Annotated[Text, Doc("its key file")] = ""
    server_tls_cacert: Annotated[Text, Doc("CA bundle")] = ""
    server_tls_san: Annotated[Text, Doc("the SAN the server's certificate must carry")] = ""
    backoff_initial_interval: Annotated[
        Duration, Var("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL"), Doc("first reconnect delay")
    ] = 10.0
    backoff_max_interval: Annotated[
        Duration, Var("XDS_CLIENT_BACKOFF_MAX_INTERVAL"), Doc("longest reconnect delay")
    ] = 60.0
    backoff_random_factor: Annotated[
        Float, Var("XDS_CLIENT_BACKOFF_RANDOM_FACTOR"), Doc("jitter factor")
    ] = 0.5
    backoff_jitter: Annotated[
        Bool, Var("XDS_CLIENT_BACKOFF_JITTER"), Doc("randomize reconnect delays")
    ] = True
    max_msg_size_in_bytes: Annotated[
        int,
        within(integer, 1),
        Var("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES"),
        Doc("largest xDS message accepted"),
    ] = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True, repr=False)
class StatsSettings(_Group):
    """The stats sink: statsd, DogStatsD or Prometheus, one at a time (docs/observability.md)."""

    use_statsd: Annotated[Bool, Doc("send stats to statsd (the reference's default)")] = True
    statsd_host: Annotated[Text, Doc("statsd host")] = "localhost"
    statsd_port: Annotated[Port, Doc("statsd port")] = 8125
    statsd_protocol: Annotated[str, choice("tcp", "udp"), Doc("`tcp` or `udp`")] = "tcp"
    use_dog_statsd: Annotated[Bool, Doc("send DogStatsD (tags) instead")] = False
    use_dog_statsd_mogrifiers: Annotated[List, Doc("DogStatsD name mogrifiers to apply")] = ()
    use_prometheus: Annotated[Bool, Doc("serve Prometheus metrics instead")] = False
    prometheus_addr: Annotated[Text, Doc("Prometheus listener address")] = ":9090"
    prometheus_path: Annotated[Text, Doc("Prometheus metrics path")] = "/metrics"
    extra_tags: Annotated[Map, Doc("tags added to every stat, `k1:v1,...`")] = field(
        default_factory=empty_map, hash=False
    )
    stats_flush_interval: Annotated[Duration, Doc("how often stats are sent")] = 10.0
    disable_stats: Annotated[Bool, Doc("no stats sink at all")] = False


@dataclass(frozen=True, slots=True, repr=False)
class TracingSettings(_Group):
    """OpenTelemetry tracing (docs/observability.md)."""

    PREFIX: ClassVar[str] = "TRACING_"

    enabled: Annotated[Bool, Doc("export spans by OTLP")] = False
    service_name: Annotated[Text, Doc("`service.name` of the spans")] = "RateLimit"
    service_namespace: Annotated[Text, Doc("`service.namespace`")] = ""
    service_instance_id: Annotated[Text, Doc("`service.instance.id`")] = ""
    exporter_protocol: Annotated[str, choice("http", "grpc"), Doc("OTLP over `http` or `grpc`")] = (
        "http"
    )
    sampling_rate: Annotated[float, within(number, 0.0, 1.0), Doc("share of traces sampled")] = 1.0


@dataclass(frozen=True, slots=True, repr=False)
class GrpcTlsSettings(_Group):
    """TLS and mutual TLS on the gRPC port (docs/operations.md)."""

    PREFIX: ClassVar[str] = "GRPC_"

    server_use_tls: Annotated[Bool, Doc("serve gRPC over TLS")] = False
    server_tls_cert: Annotated[Text, Doc("server certificate file (reloaded when it changes)")] = ""
    server_tls_key: Annotated[Text, Doc("its key file")] = ""
    client_tls_cacert: Annotated[Text, Doc("CA bundle for client certificates (mutual TLS)")] = ""
    client_tls_san: Annotated[Text, Doc("the SAN a client certificate must carry")] = ""


@dataclass(frozen=True, slots=True, repr=False)
class Settings(_Group):
    """Every setting of the service; a top-level field is its variable lower-cased."""

    # -- listeners
    host: Annotated[Text, Doc("HTTP listener (`/healthcheck`, `/json`)")] = "0.0.0.0"
    port: Annotated[Port, Doc("HTTP port")] = 8080
    debug_host: Annotated[Text, Doc("debug listener (`/rlconfig`, `/stats`, ...)")] = "0.0.0.0"
    debug_port: Annotated[Port, Doc("debug port")] = 6070
    debug_profiling_enabled: Annotated[
        Bool, Doc("ours: serve `/debug/tasks`, `/debug/threads`, `/debug/tracemalloc`")
    ] = False
    http_idle_timeout: Annotated[
        float,
        within(seconds, 0.0, above=True),
        Doc("ours: close an HTTP or debug connection idle this long"),
    ] = 60.0
    grpc_host: Annotated[Text, Doc("gRPC listener")] = "0.0.0.0"
    grpc_port: Annotated[Port, Doc("gRPC port")] = 8081
    grpc_uds: Annotated[Text, Doc("a unix socket path to serve gRPC on instead")] = ""
    grpc_max_connection_age: Annotated[
        Duration, Doc("close gRPC connections this old, so long-lived ones re-spread")
    ] = 24 * HOUR
    grpc_max_connection_age_grace: Annotated[
        Duration, Doc("time given to calls on a connection being closed for age")
    ] = 1 * HOUR
    grpc_server: Annotated[
        str,
        choice("pyvoy", "grpcio"),
        Doc("ours: the server carrying the gRPC port (docs/transports.md)"),
    ] = "pyvoy"
    grpc_tls: GrpcTlsSettings = GrpcTlsSettings()
    log_level: Annotated[
        str,
        choice("TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL", "PANIC"),
        Doc("`debug`, `info`, `warn`, `error` (any case)"),
    ] = "WARN"
    log_format: Annotated[str, choice("text", "json"), Doc("`text` or `json`")] = "text"

    # -- where the rules come from
    config_type: Annotated[
        str, choice("FILE", "GRPC_XDS_SOTW"), Doc("`FILE` or `GRPC_XDS_SOTW` (xDS)")
    ] = "FILE"
    force_start_without_initial_config: Annotated[
        Bool, Doc("serve before the first xDS config arrives")
    ] = False
    xds: XdsSettings = XdsSettings()
    runtime_root: Annotated[Text, Doc("config root")] = "/srv/runtime_data/current"
    runtime_subdirectory: Annotated[
        Text, Doc("subdirectory of the root; empty means no file config at all")
    ] = ""
    runtime_appdirectory: Annotated[Text, Doc("directory under it holding the rule files")] = (
        "config"
    )
    runtime_ignoredotfiles: Annotated[Bool, Doc("skip files whose name starts with `.`")] = False
    runtime_watch_root: Annotated[
        Bool, Doc("watch the root's symlink swap (`true`) or the directory itself (`false`)")
    ] = True
    runtime_ignore_patterns: Annotated[
        List,
        Doc(
            "ours: file names (globs) neither loaded nor watched, e.g. editors' "
            "`*~,*.swp,.#*,4913` (`make run` sets them)"
        ),
    ] = ()
    config_max_file_bytes: Annotated[
        int, within(integer, 1), Doc("ours: a larger config file fails the load, named")
    ] = CONFIG_MAX_FILE_BYTES
    merge_domain_config: Annotated[
        Bool, Doc("merge files that declare the same domain instead of failing")
    ] = False
    healthy_with_at_least_one_config_loaded: Annotated[
        Bool, Doc("unhealthy until a config with a domain is loaded")
    ] = False

    # -- counting and answering
    backend_type: Annotated[
        str, choice("redis", "memcache", "memory"), Doc("`redis`, `memcache` or `memory`")
    ] = "redis"
    expiration_jitter_max_seconds: Annotated[Count, Doc("random extra TTL on counters")] = 300
    local_cache_size_in_bytes: Annotated[
        Count, Doc("in-process cache of over-limit keys, in bytes (0 = off)")
    ] = 0
    near_limit_ratio: Annotated[Float, Doc("share of a limit that counts as near it")] = 0.8
    cache_key_prefix: Annotated[Text, Doc("prefix of every counter key")] = ""
    stop_cache_key_increment_when_overlimit: Annotated[
        Bool, Doc("a request over one limit does not count against the others")
    ] = False
    charge_only_when_admitted: Annotated[
        Bool,
        Doc("every rule is charged only when the whole request is admitted (docs/algorithms.md)"),
    ] = False
    ietf_ratelimit_headers_enabled: Annotated[
        Bool, Doc("add the IETF draft's `RateLimit` and `RateLimit-Policy` response headers")
    ] = False
    shadow_mode: Annotated[Bool, Doc("never answer OVER_LIMIT overall (stats still count)")] = False
    quota_mode: Annotated[Bool, Doc("every rule is a quota rule")] = False
    response_dynamic_metadata: Annotated[
        Bool, Doc("return the request's and matched rules' metadata as dynamic metadata")
    ] = False
    limit_response_headers_enabled: Annotated[
        Bool, Doc("add the limit, remaining and reset response headers")
    ] = False
    limit_limit_header: Annotated[Text, Doc("its limit header")] = "RateLimit-Limit"
    limit_remaining_header: Annotated[Text, Doc("its remaining header")] = "RateLimit-Remaining"
    limit_reset_header: Annotated[Text, Doc("its reset header")] = "RateLimit-Reset"

    # -- backends
    redis: RedisSettings = RedisSettings()
    redis_persecond: Annotated[
        Bool, Doc("a second Redis (REDIS_PERSECOND_*) for SECOND-unit counters")
    ] = False
    redis_persecond_settings: RedisSettings = RedisSettings(url=REDIS_PERSECOND_URL)
    redis_health_check_active_connection: Annotated[Bool, Doc("accepted, as the reference's")] = (
        False
    )
    redis_op_timeout: Annotated[
        float, within(duration, 0.0, above=True), Doc("ours: bound on every backend call")
    ] = 1.0
    redis_startup_initial_interval: Annotated[Duration, Doc("first retry of the startup PING")] = (
        1.0
    )
    redis_startup_max_interval: Annotated[Duration, Doc("longest delay between retries")] = 30.0
    redis_startup_max_elapsed_time: Annotated[Duration, Doc("give up after this (0 = never)")] = (
        0.0
    )
    memcache: MemcacheSettings = MemcacheSettings()
    breaker_failure_threshold: Annotated[
        Count, Doc("ours: consecutive backend failures that open the circuit (0 = off)")
    ] = 5
    breaker_cooldown: Annotated[
        float, within(seconds, 0.0), Doc("ours: how long the circuit stays open")
    ] = 2.0
    backend_max_in_flight: Annotated[
        Count, Doc("ours: backend calls waiting at once before shedding (0 = unbounded)")
    ] = 1000

    # -- bounds on one request (ours; 0 = no limit)
    max_descriptors_per_request: Annotated[Count, Doc("ours: descriptors in one request")] = 256
    max_entries_per_descriptor: Annotated[Count, Doc("ours: entries in one descriptor")] = 64
    max_value_bytes: Annotated[Count, Doc("ours: bytes of one key or value")] = 65536
    max_request_bytes: Annotated[
        int, within(integer, 1024, 2**31 - 1), Doc("ours: bytes of one gRPC request")
    ] = 4 * 1024 * 1024

    # -- stats, tracing, lifecycle
    stats: StatsSettings = StatsSettings()
    stats_max_keys: Annotated[
        int, within(integer, 1), Doc("ours: rule stats keys kept (an LRU bounds high cardinality)")
    ] = 10_000
    tracing: TracingSettings = TracingSettings()
    shutdown_drain_seconds: Annotated[
        float, within(seconds, 0.0), Doc("ours: unhealthy-but-serving time before closing")
    ] = 0.0
    workers: Annotated[
        Count,
        Doc("ours: gRPC processes sharing the port (0 = one per CPU with a shared backend)"),
    ] = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read every setting from ``env`` (``os.environ`` or a plain dict in tests).

        Unset variables take the reference's defaults; so do set-but-empty ones, except plain
        strings, which keep the empty value. Raises ``SettingsError`` naming the first bad
        variable and its value (credentials masked).
        """
        settings = cls(
            **_read(cls, env, ""),
            grpc_tls=GrpcTlsSettings(**_read(GrpcTlsSettings, env, GrpcTlsSettings.PREFIX)),
            xds=XdsSettings(**_read(XdsSettings, env, XdsSettings.PREFIX)),
            redis=parse_redis(env, "REDIS_", REDIS_URL),
            redis_persecond_settings=parse_redis(env, "REDIS_PERSECOND_", REDIS_PERSECOND_URL),
            memcache=MemcacheSettings(**_read(MemcacheSettings, env, MemcacheSettings.PREFIX)),
            stats=StatsSettings(**_read(StatsSettings, env, StatsSettings.PREFIX)),
            tracing=TracingSettings(**_read(TracingSettings, env, TracingSettings.PREFIX)),
        )
        settings._check_combinations()
        return settings

    def _check_combinations(self) -> None:
        stats = self.stats
        sinks = {
            "USE_STATSD": stats.use_statsd,
            "USE_DOG_STATSD": stats.use_dog_statsd,
            "USE_PROMETHEUS": stats.use_prometheus,
        }
        if sum(sinks.values()) > 1:
            enabled = ", ".join(f"{name}=true" for name, on in sinks.items() if on)
            raise SettingsError(
                f"only one of USE_STATSD, USE_DOG_STATSD, USE_PROMETHEUS may be true, got "
                f"{enabled} (USE_STATSD defaults to true: set USE_STATSD=false to use another)"
            )
        memcache = self.memcache
        if memcache.host_port and memcache.srv:
            raise SettingsError(
                f"MEMCACHE_HOST_PORT and MEMCACHE_SRV are both set "
                f"({','.join(memcache.host_port)!r} and {memcache.srv!r}): set only one"
            )
        if self.charge_only_when_admitted and self.backend_type == "memcache":
            raise SettingsError(
                "CHARGE_ONLY_WHEN_ADMITTED=true needs an atomic check-and-charge, which "
                "BACKEND_TYPE=memcache cannot do (docs/algorithms.md): use redis or memory"
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


# -- the machinery that walks a table ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variable:
    """One row of a group's table: how a field is read and shown."""

    field: str
    suffix: str | None  # the variable after the prefix; None when Var names it whole
    name: str | None  # the whole name from Var
    parse: Callable[[str], Any] | None  # None: not a variable (a nested group)
    secret: bool
    doc: str

    def variable(self, prefix: str) -> str:
        return self.name if self.name is not None else prefix + (self.suffix or "")


def table(cls: type) -> list[Variable]:
    """The variables of a settings class, in declaration order, from its ``Annotated`` types."""
    rows = []
    for name, hint in get_type_hints(cls, include_extras=True).items():
        if name == "PREFIX":
            continue
        extras = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        parsers = [extra for extra in extras if callable(extra) and extra is not SECRET]
        docs = [extra.text for extra in extras if isinstance(extra, Doc)]
        names = [extra.name for extra in extras if isinstance(extra, Var)]
        rows.append(
            Variable(
                field=name,
                suffix=None if names else name.upper(),
                name=names[0] if names else None,
                parse=parsers[0] if parsers else None,
                secret=SECRET in extras,
                doc=docs[0] if docs else "",
            )
        )
    return rows


GROUPS: tuple[type, ...] = (
    RedisSettings,
    MemcacheSettings,
    XdsSettings,
    StatsSettings,
    TracingSettings,
    GrpcTlsSettings,
    Settings,
)
_TABLES: dict[type, list[Variable]] = {cls: table(cls) for cls in GROUPS}


def _read(cls: type, env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """Parse the variables of ``cls``'s table that ``env`` sets; absent ones are left out."""
    values: dict[str, Any] = {}
    for row in _TABLES[cls]:
        if row.parse is None:
            continue
        variable = row.variable(prefix)
        raw = env.get(variable)
        if raw is None or (raw == "" and row.parse is not text):
            continue
        try:
            values[row.field] = row.parse(raw)
        except ValueError as exc:
            shown = REDACTED if row.secret else raw
            raise SettingsError(f"invalid value for {variable}: {shown!r} ({exc})") from None
    return values


# Where each nested group's variables start (the groups of ``Settings`` that have no PREFIX of
# their own, the two Redis connections, are named here).
_NESTED_PREFIX = {"redis": "REDIS_", "redis_persecond_settings": "REDIS_PERSECOND_"}


def variables(settings: _Group, prefix: str = "") -> Iterator[tuple[str, Variable, object]]:
    """Every setting as (variable, its row, its value), nested groups flattened, in declaration
    order: the generated settings table and the tests walk this."""
    for row in _TABLES[type(settings)]:
        value = getattr(settings, row.field)
        if isinstance(value, _Group):
            nested = _NESTED_PREFIX.get(row.field, type(value).PREFIX)
            yield from variables(value, nested)
        else:
            yield row.variable(prefix), row, value


def _masked(value: object, secret: bool) -> object:
    if not secret or not value:
        return value
    if isinstance(value, Mapping):
        return dict.fromkeys(value, REDACTED)
    return REDACTED


def _values(obj: object) -> Iterator[tuple[str, object]]:
    secret = {row.field: row.secret for row in _TABLES[type(obj)]}
    for f in fields(obj):  # type: ignore[arg-type]
        yield f.name, _masked(getattr(obj, f.name), secret[f.name])


def _repr(obj: object) -> str:
    parts = [
        f"{name}={dict(value) if isinstance(value, Mapping) else value!r}"
        for name, value in _values(obj)
    ]
    return f"{type(obj).__name__}({', '.join(parts)})"


def _redacted(obj: object) -> dict[str, object]:
    plain: dict[str, object] = {}
    for name, value in _values(obj):
        if isinstance(value, _Group):
            value = value.redacted()
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        plain[name] = value
    assert is_dataclass(obj)
    return plain
