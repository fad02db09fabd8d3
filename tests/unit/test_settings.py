"""Environment variables, their reference defaults, parsing, errors and redaction
(docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.model import RedisSettings, Settings, parse_redis, variables
from ratelimit_svc.settings.parse import (
    REDACTED,
    boolean,
    duration,
    integer,
    number,
    seconds,
    string_list,
    string_map,
)

REDIS_DEFAULTS: dict[str, object] = {
    "socket_type": "unix",
    "type": "single",
    "url": "/var/run/nutcracker/ratelimit.sock",
    "pool_size": 10,
    "auth": "",
    "sentinel_auth": "",
    "tls": False,
    "tls_client_cert": "",
    "tls_client_key": "",
    "tls_cacert": "",
    "tls_skip_hostname_verification": False,
    "pipeline_window": 0.0,
    "pipeline_limit": 0,
    "db": 0,  # ours: the database to SELECT (docs/backends.md, Connecting)
}

# The reference's defaults (envoyproxy/ratelimit src/settings/settings.go), plus ours (docs/configuration.md (Settings)).
DEFAULTS: dict[str, object] = {
    "host": "0.0.0.0",
    "port": 8080,
    "debug_host": "0.0.0.0",
    "debug_port": 6070,
    "debug_profiling_enabled": False,
    "http_idle_timeout": 60.0,
    "grpc_host": "0.0.0.0",
    "grpc_port": 8081,
    "grpc_uds": "",
    "grpc_max_connection_age": 86400.0,
    "grpc_max_connection_age_grace": 3600.0,
    "grpc_server_use_tls": False,
    "grpc_server_tls_cert": "",
    "grpc_server_tls_key": "",
    "grpc_client_tls_cacert": "",
    "grpc_client_tls_san": "",
    "log_level": "WARN",
    "log_format": "text",
    "config_type": "FILE",
    "force_start_without_initial_config": False,
    "config_grpc_xds_node_id": "default",
    "config_grpc_xds_node_metadata": {},
    "config_grpc_xds_server_url": "localhost:18000",
    "config_grpc_xds_server_connect_retry_interval": 3.0,
    "config_grpc_xds_client_additional_headers": {},
    "config_grpc_xds_server_use_tls": False,
    "config_grpc_xds_client_tls_cert": "",
    "config_grpc_xds_client_tls_key": "",
    "config_grpc_xds_server_tls_cacert": "",
    "config_grpc_xds_server_tls_san": "",
    "xds_client_backoff_initial_interval": 10.0,
    "xds_client_backoff_max_interval": 60.0,
    "xds_client_backoff_random_factor": 0.5,
    "xds_client_backoff_jitter": True,
    "use_statsd": True,
    "statsd_host": "localhost",
    "statsd_port": 8125,
    "statsd_protocol": "tcp",
    "use_dog_statsd": False,
    "use_dog_statsd_mogrifiers": [],
    "use_prometheus": False,
    "prometheus_addr": ":9090",
    "prometheus_path": "/metrics",
    "extra_tags": {},
    "stats_flush_interval": 10.0,
    "disable_stats": False,
    "runtime_root": "/srv/runtime_data/current",
    "runtime_subdirectory": "",
    "runtime_appdirectory": "config",
    "runtime_ignoredotfiles": False,
    "runtime_watch_root": True,
    "runtime_ignore_patterns": [],
    "config_max_file_bytes": 16 * 1024 * 1024,
    "expiration_jitter_max_seconds": 300,
    "local_cache_size_in_bytes": 0,
    "near_limit_ratio": 0.8,
    "cache_key_prefix": "",
    "backend_type": "redis",
    "stop_cache_key_increment_when_overlimit": False,
    "charge_only_when_admitted": False,
    "ietf_ratelimit_headers_enabled": False,
    "limit_response_headers_enabled": False,
    "limit_limit_header": "RateLimit-Limit",
    "limit_remaining_header": "RateLimit-Remaining",
    "limit_reset_header": "RateLimit-Reset",
    "healthy_with_at_least_one_config_loaded": False,
    **{f"redis_{name}": value for name, value in REDIS_DEFAULTS.items()},
    "redis_persecond": False,
    **{f"redis_persecond_{name}": value for name, value in REDIS_DEFAULTS.items()},
    "redis_persecond_url": "/var/run/nutcracker/ratelimitpersecond.sock",
    "redis_health_check_active_connection": False,
    "redis_op_timeout": 1.0,
    "redis_startup_initial_interval": 1.0,
    "redis_startup_max_interval": 30.0,
    "redis_startup_max_elapsed_time": 0.0,
    "breaker_failure_threshold": 5,
    "breaker_cooldown": 2.0,
    "backend_max_in_flight": 1000,
    "max_descriptors_per_request": 256,
    "max_entries_per_descriptor": 64,
    "max_value_bytes": 65536,
    "max_request_bytes": 4194304,
    "memcache_host_port": [],
    "memcache_max_idle_conns": 2,
    "memcache_srv": "",
    "memcache_srv_refresh": 0.0,
    "memcache_tls": False,
    "memcache_tls_client_cert": "",
    "memcache_tls_client_key": "",
    "memcache_tls_cacert": "",
    "memcache_tls_skip_hostname_verification": False,
    "shadow_mode": False,
    "quota_mode": False,
    "response_dynamic_metadata": False,
    "merge_domain_config": False,
    "tracing_enabled": False,
    "tracing_service_name": "RateLimit",
    "tracing_service_namespace": "",
    "tracing_service_instance_id": "",
    "tracing_exporter_protocol": "http",
    "tracing_sampling_rate": 1.0,
    "shutdown_drain_seconds": 0.0,
    "stats_max_keys": 10_000,
    "xds_client_max_msg_size_in_bytes": 256 * 1024 * 1024,
    "workers": 0,
    "grpc_server": "pyvoy",
}

REDIS_FIELDS = [f.name for f in dataclasses.fields(RedisSettings)]
ALL_VARIABLES = [variable for variable, _, _ in variables(Settings())]


def flat_raw(settings: Settings) -> dict[str, object]:
    """Every setting by its variable (lower case), as stored."""
    return {variable.lower(): value for variable, _, value in variables(settings)}


def flat(settings: Settings) -> dict[str, object]:
    """Every setting by its variable (lower case), as plain data with credentials redacted."""
    plain: dict[str, object] = {}
    for variable, row, value in variables(settings):
        if row.secret and value:
            value = dict.fromkeys(value, REDACTED) if isinstance(value, Mapping) else REDACTED
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        plain[variable.lower()] = value
    return plain


def raw_values(obj: object) -> list[object]:
    """Every field value, nested settings included, bypassing any redaction."""
    values: list[object] = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        values.extend(raw_values(value) if dataclasses.is_dataclass(value) else [value])
    return values


def error_for(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_are_the_references() -> None:
    assert flat(Settings.from_env({})) == DEFAULTS


def test_every_field_has_a_checked_default() -> None:
    assert sorted(flat(Settings())) == sorted(DEFAULTS)
    assert len(ALL_VARIABLES) == len(set(ALL_VARIABLES)) == len(DEFAULTS)
    assert REDIS_FIELDS == list(REDIS_DEFAULTS)


def test_constructed_defaults_equal_parsed_defaults() -> None:
    assert Settings() == Settings.from_env({})
    assert hash(Settings()) == hash(Settings.from_env({}))


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "HOME": "/root", "REDIS_NOPE": "x"}) == Settings()


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({"EXTRA_TAGS": "a:b"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.stats.extra_tags["a"] = "c"  # type: ignore[index]


# -- parsers -------------------------------------------------------------------------------------

GO_BOOLS = [
    ("1", True), ("t", True), ("T", True), ("TRUE", True), ("true", True), ("True", True),
    ("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False), ("False", False),
]  # fmt: skip
BAD_BOOLS = ["yes", "no", "on", "off", "tRUE", "fALSE", "y", "2", "-1", " true", "true ", "01"]


@pytest.mark.parametrize(("raw", "expected"), GO_BOOLS)
def test_booleans_are_go_parsebool(raw: str, expected: bool) -> None:
    assert boolean(raw) is expected
    assert Settings.from_env({"SHADOW_MODE": raw}).shadow_mode is expected
    assert Settings.from_env({"RUNTIME_WATCH_ROOT": raw}).runtime_watch_root is expected


@pytest.mark.parametrize("raw", BAD_BOOLS)
def test_other_boolean_spellings_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="expected a boolean"):
        boolean(raw)
    message = error_for({"QUOTA_MODE": raw})
    assert message.startswith(f"invalid value for QUOTA_MODE: {raw!r} (expected a boolean")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0", 0), ("8", 8), ("+8", 8), ("-8", -8), ("007", 7), ("65535", 65535),
     ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -(2**63))],
)  # fmt: skip
def test_integers_are_go_parseint(raw: str, expected: int) -> None:
    assert integer(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["1.5", "", " 3", "3 ", "1e3", "0x10", "1_000", "abc", "+", "--1", "\u0663",
     "9223372036854775808", "-9223372036854775809"],
)  # fmt: skip
def test_non_integers_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="expected an integer"):
        integer(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0.8", 0.8), ("1", 1.0), (".5", 0.5), ("1.", 1.0), ("+0.5", 0.5), ("-0.5", -0.5),
     ("1e-3", 0.001), ("1E3", 1000.0), ("1_0.5", 10.5), ("0x1p-2", 0.25), ("0X.8P1", 1.0)],
)  # fmt: skip
def test_floats_are_go_parsefloat(raw: str, expected: float) -> None:
    assert number(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", " 1", "1 ", "1,5", "0.5.5", "_1", "1__0", "1_", "e3", ".", "0x1", "abc",
     "inf", "-Inf", "NaN", "1e400"],
)  # fmt: skip
def test_non_numbers_and_non_finite_numbers_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match=r"expected a (finite )?number"):
        number(raw)


GO_DURATIONS = [
    ("0", 0.0), ("+0", 0.0), ("-0", 0.0), ("0s", 0.0),
    ("150us", 150e-6), ("2\u00b5s", 2e-6), ("2\u03bcs", 2e-6), ("5ns", 5e-9),
    ("300ms", 0.3), ("10s", 10.0), ("1m", 60.0), ("1h", 3600.0), ("1.5h", 5400.0),
    ("1h15m30.5s", 4530.5), ("-1s", -1.0), ("+5s", 5.0), ("1.s", 1.0), (".5s", 0.5),
    ("1m1m", 120.0), ("9223372036854775807ns", (2**63 - 1) / 1e9),
    ("-9223372036854775808ns", -(2**63) / 1e9),
]  # fmt: skip
BAD_DURATIONS = [
    ("10", "missing unit"), ("1.5", "missing unit"), ("1s5", "missing unit"), ("1d", "unknown unit 'd'"),
    ("1h 30m", "unknown unit 'h '"), ("1S", "unknown unit 'S'"), ("1sec", "unknown unit 'sec'"),
    ("", ""), ("-", ""), ("s", ""), (".s", ""), ("-.s", ""), (" 1s", ""),
    ("9223372036854775808ns", "out of range"), ("2562048h", "out of range"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), GO_DURATIONS)
def test_durations_are_go_parseduration(raw: str, expected: float) -> None:
    assert duration(raw) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(("raw", "problem"), BAD_DURATIONS)
def test_bad_durations_are_rejected(raw: str, problem: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like 150us, 10s or 1h30m") as caught:
        duration(raw)
    assert problem in str(caught.value)


def test_duration_variables_are_stored_as_seconds() -> None:
    settings = Settings.from_env(
        {
            "GRPC_MAX_CONNECTION_AGE": "90m",
            "REDIS_PIPELINE_WINDOW": "150us",
            "STATS_FLUSH_INTERVAL": "1.5s",
        }
    )
    assert settings.grpc_max_connection_age == 5400.0
    assert settings.redis.pipeline_window == pytest.approx(150e-6)
    assert settings.stats.stats_flush_interval == 1.5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0", 0.0), ("2.5", 2.5), ("15", 15.0), ("2500ms", 2.5), ("1m", 60.0), ("1m30s", 90.0)],
)
def test_shutdown_drain_takes_seconds_or_a_duration(raw: str, expected: float) -> None:
    assert seconds(raw) == expected
    assert Settings.from_env({"SHUTDOWN_DRAIN_SECONDS": raw}).shutdown_drain_seconds == expected


@pytest.mark.parametrize("raw", ["abc", "1d", "1 s", "s"])
def test_shutdown_drain_rejects_other_text(raw: str) -> None:
    message = error_for({"SHUTDOWN_DRAIN_SECONDS": raw})
    assert message == (
        f"invalid value for SHUTDOWN_DRAIN_SECONDS: {raw!r} "
        "(expected a number of seconds or a duration like 30s)"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", ()), ("a", ("a",)), ("a,b", ("a", "b")), (" a , b ", ("a", "b")),
     ("a,,b,", ("a", "b")), (",", ()), ("h1:11211,h2:11211", ("h1:11211", "h2:11211"))],
)  # fmt: skip
def test_lists_are_comma_separated(raw: str, expected: tuple[str, ...]) -> None:
    assert string_list(raw) == expected
    assert Settings.from_env({"MEMCACHE_HOST_PORT": raw}).memcache.host_port == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", {}), ("a:b", {"a": "b"}), ("a:b,c:d", {"a": "b", "c": "d"}),
     (" a : b , c:d ", {"a": "b", "c": "d"}), ("url:http://x:1", {"url": "http://x:1"}),
     ("a:", {"a": ""}), ("a:b,", {"a": "b"}), ("a:1,a:2", {"a": "2"})],
)  # fmt: skip
def test_maps_are_key_colon_value_pairs(raw: str, expected: dict[str, str]) -> None:
    assert dict(string_map(raw)) == expected
    assert dict(Settings.from_env({"EXTRA_TAGS": raw}).stats.extra_tags) == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [("a", "pair 1 has no ':'"), ("a:b,c", "pair 2 has no ':'"), (":b", "pair 1 has an empty key"),
     ("a:b, :c", "pair 2 has an empty key")],
)  # fmt: skip
def test_bad_maps_are_rejected(raw: str, problem: str) -> None:
    message = error_for({"EXTRA_TAGS": raw})
    assert message == f"invalid value for EXTRA_TAGS: {raw!r} (expected k1:v1,k2:v2; {problem})"


# -- enums and ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("LOG_LEVEL", "Warning", "log_level", "WARNING"),
        ("LOG_LEVEL", "trace", "log_level", "TRACE"),
        ("LOG_LEVEL", "panic", "log_level", "PANIC"),
        ("LOG_FORMAT", "JSON", "log_format", "json"),
        ("CONFIG_TYPE", "grpc_xds_sotw", "config_type", "GRPC_XDS_SOTW"),
        ("BACKEND_TYPE", "Memcache", "backend_type", "memcache"),
        ("BACKEND_TYPE", "memory", "backend_type", "memory"),
        ("STATSD_PROTOCOL", "UDP", "statsd_protocol", "udp"),
        ("TRACING_EXPORTER_PROTOCOL", "gRPC", "tracing_exporter_protocol", "grpc"),
    ],
)
def test_enums_are_case_insensitive_and_normalised(
    variable: str, raw: str, field: str, expected: str
) -> None:
    assert flat_raw(Settings.from_env({variable: raw}))[field] == expected


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        (
            "LOG_LEVEL",
            "verbose",
            "expected one of: TRACE, DEBUG, INFO, WARN, WARNING, ERROR, FATAL, PANIC",
        ),
        ("LOG_FORMAT", "xml", "expected one of: text, json"),
        ("CONFIG_TYPE", "GRPC_XDS_DELTA", "expected one of: FILE, GRPC_XDS_SOTW"),
        ("BACKEND_TYPE", "dynamo", "expected one of: redis, memcache, memory"),
        ("STATSD_PROTOCOL", "quic", "expected one of: tcp, udp"),
        ("TRACING_EXPORTER_PROTOCOL", "zipkin", "expected one of: http, grpc"),
        ("REDIS_TYPE", "replica", "expected one of: single, sentinel, cluster"),
        ("REDIS_SOCKET_TYPE", "udp", "expected one of: unix, tcp"),
        ("REDIS_PERSECOND_TYPE", "replica", "expected one of: single, sentinel, cluster"),
    ],
)
def test_bad_enum_values_are_rejected(variable: str, raw: str, expected: str) -> None:
    assert error_for({variable: raw}) == f"invalid value for {variable}: {raw!r} ({expected})"


@pytest.mark.parametrize(
    ("variable", "raw", "bound"),
    [
        ("PORT", "65536", "must be from 0 to 65535"),
        ("PORT", "-1", "must be from 0 to 65535"),
        ("DEBUG_PORT", "70000", "must be from 0 to 65535"),
        ("GRPC_PORT", "99999", "must be from 0 to 65535"),
        ("STATSD_PORT", "-5", "must be from 0 to 65535"),
        ("EXPIRATION_JITTER_MAX_SECONDS", "-1", "must be >= 0"),
        ("LOCAL_CACHE_SIZE_IN_BYTES", "-1", "must be >= 0"),
        ("REDIS_POOL_SIZE", "-1", "must be >= 0"),
        ("REDIS_OP_TIMEOUT", "0", "must be > 0.0"),
        ("REDIS_OP_TIMEOUT", "-1s", "must be > 0.0"),
        ("TRACING_SAMPLING_RATE", "1.5", "must be from 0.0 to 1.0"),
        ("TRACING_SAMPLING_RATE", "-0.1", "must be from 0.0 to 1.0"),
        ("SHUTDOWN_DRAIN_SECONDS", "-1", "must be >= 0.0"),
    ],
)
def test_out_of_range_values_are_rejected(variable: str, raw: str, bound: str) -> None:
    assert error_for({variable: raw}) == f"invalid value for {variable}: {raw!r} ({bound})"


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"PORT": "0"}, "port", 0),
        ({"PORT": "65535"}, "port", 65535),
        ({"EXPIRATION_JITTER_MAX_SECONDS": "0"}, "expiration_jitter_max_seconds", 0),
        ({"REDIS_OP_TIMEOUT": "1ns"}, "redis_op_timeout", 1e-9),
        ({"TRACING_SAMPLING_RATE": "0"}, "tracing_sampling_rate", 0.0),
        ({"NEAR_LIMIT_RATIO": "0.9"}, "near_limit_ratio", 0.9),
        ({"XDS_CLIENT_BACKOFF_RANDOM_FACTOR": "0.25"}, "xds_client_backoff_random_factor", 0.25),
    ],
)
def test_values_at_the_bounds_are_accepted(
    env: dict[str, str], field: str, expected: object
) -> None:
    assert flat_raw(Settings.from_env(env))[field] == expected


# -- every kind of invalid value names the variable and the value --------------------------------

INVALID = [
    ("REDIS_POOL_SIZE", "abc", "expected an integer"),
    ("PORT", "80.5", "expected an integer"),
    ("PORT", " 8080", "expected an integer"),
    ("USE_STATSD", "yes", "expected a boolean"),
    ("NEAR_LIMIT_RATIO", "high", "expected a number"),
    ("NEAR_LIMIT_RATIO", "NaN", "expected a number"),
    ("NEAR_LIMIT_RATIO", "1e999", "expected a finite number"),
    ("STATS_FLUSH_INTERVAL", "10", "expected a duration like 150us, 10s or 1h30m; missing unit"),
    (
        "GRPC_MAX_CONNECTION_AGE",
        "1d",
        "expected a duration like 150us, 10s or 1h30m; unknown unit 'd'",
    ),
    ("REDIS_PERSECOND_PIPELINE_WINDOW", "fast", "expected a duration like 150us, 10s or 1h30m"),
    ("EXTRA_TAGS", "zone=eu", "expected k1:v1,k2:v2; pair 1 has no ':'"),
    ("STATS_MAX_KEYS", "0", "must be >= 1"),
    ("REDIS_PERSECOND_POOL_SIZE", "1.5", "expected an integer"),
    ("REDIS_PERSECOND_TLS", "yes please", "expected a boolean"),
]


@pytest.mark.parametrize(("variable", "raw", "expected"), INVALID)
def test_invalid_values_name_the_variable_and_the_value(
    variable: str, raw: str, expected: str
) -> None:
    message = error_for({variable: raw})
    assert message.startswith(f"invalid value for {variable}: {raw!r} ({expected}")
    assert message.endswith(")")


@pytest.mark.parametrize(
    ("variable", "field"),
    [("PORT", "port"), ("USE_STATSD", "use_statsd"), ("NEAR_LIMIT_RATIO", "near_limit_ratio"),
     ("STATS_FLUSH_INTERVAL", "stats_flush_interval"), ("LOG_LEVEL", "log_level"),
     ("BACKEND_TYPE", "backend_type"), ("EXTRA_TAGS", "extra_tags"),
     ("MEMCACHE_HOST_PORT", "memcache_host_port"), ("SHUTDOWN_DRAIN_SECONDS", "shutdown_drain_seconds"),
     ("REDIS_OP_TIMEOUT", "redis_op_timeout")],
)  # fmt: skip
def test_empty_non_string_values_mean_the_default(variable: str, field: str) -> None:
    assert flat_raw(Settings.from_env({variable: ""}))[field] == flat_raw(Settings())[field]


def test_empty_strings_stay_empty_as_in_the_reference() -> None:
    settings = Settings.from_env(
        {"STATSD_HOST": "", "RUNTIME_APPDIRECTORY": "", "REDIS_URL": "", "LIMIT_LIMIT_HEADER": ""}
    )
    assert settings.stats.statsd_host == ""
    assert settings.runtime_appdirectory == ""
    assert settings.redis.url == ""
    assert settings.limit_limit_header == ""


# -- credentials ---------------------------------------------------------------------------------

CREDENTIAL_VARIABLES = [
    name
    for name in ALL_VARIABLES
    if any(w in name for w in ("AUTH", "PASSWORD", "TOKEN", "SECRET"))
]


def test_the_known_credentials_are_covered() -> None:
    assert {
        "REDIS_AUTH",
        "REDIS_SENTINEL_AUTH",
        "REDIS_PERSECOND_AUTH",
        "REDIS_PERSECOND_SENTINEL_AUTH",
    } <= set(CREDENTIAL_VARIABLES)


@pytest.mark.parametrize("variable", CREDENTIAL_VARIABLES)
def test_credentials_never_appear_in_repr_or_redacted(variable: str) -> None:
    secret = "hunter2-s3cr3t"
    settings = Settings.from_env({variable: f"admin:{secret}"})
    assert any(secret in str(value) for value in raw_values(settings))  # really stored
    for shown in (repr(settings), str(settings), json.dumps(settings.redacted())):
        assert secret not in shown
        assert REDACTED in shown
    assert secret not in repr(settings.redis) + repr(settings.redis_persecond_settings)


def test_credentials_are_stored_and_redacted_per_connection() -> None:
    settings = Settings.from_env({"REDIS_AUTH": "user:pw1", "REDIS_PERSECOND_SENTINEL_AUTH": "pw2"})
    assert settings.redis.auth == "user:pw1"
    assert settings.redis_persecond_settings.sentinel_auth == "pw2"
    redis = settings.redacted()["redis"]
    persecond = settings.redacted()["redis_persecond_settings"]
    assert isinstance(redis, dict) and isinstance(persecond, dict)
    assert (redis["auth"], redis["sentinel_auth"]) == (REDACTED, "")
    assert (persecond["auth"], persecond["sentinel_auth"]) == ("", REDACTED)
    assert "auth=''" in repr(settings.redis_persecond_settings)


def test_xds_header_values_are_credentials() -> None:
    settings = Settings.from_env(
        {"CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS": "authorization:Bearer tok3n"}
    )
    assert settings.xds.client_additional_headers == {"authorization": "Bearer tok3n"}
    assert "tok3n" not in repr(settings)
    assert settings.redacted()["xds"]["client_additional_headers"] == {  # type: ignore[index]
        "authorization": REDACTED
    }


def test_credentials_never_appear_in_errors() -> None:
    message = error_for({"CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS": "authorization Bearer tok3n"})
    assert message == (
        "invalid value for CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS: '<redacted>' "
        "(expected k1:v1,k2:v2; pair 1 has no ':')"
    )
    message = error_for({"REDIS_AUTH": "pw-s3cr3t", "USE_PROMETHEUS": "true"})
    assert "s3cr3t" not in message


def test_redacted_is_plain_json_data() -> None:
    settings = Settings.from_env({"EXTRA_TAGS": "a:b", "USE_DOG_STATSD_MOGRIFIERS": "x,y"})
    plain = settings.redacted()
    assert json.loads(json.dumps(plain)) == plain
    assert plain["stats"]["extra_tags"] == {"a": "b"}  # type: ignore[index]
    assert plain["stats"]["use_dog_statsd_mogrifiers"] == ["x", "y"]  # type: ignore[index]


# -- REDIS_ and REDIS_PERSECOND_ -------------------------------------------------------------------

REDIS_VALUES: list[tuple[str, str, object]] = [
    ("SOCKET_TYPE", "TCP", "tcp"),
    ("TYPE", "SENTINEL", "sentinel"),
    ("URL", "mymaster,h1:26379,h2:26379", "mymaster,h1:26379,h2:26379"),
    ("POOL_SIZE", "25", 25),
    ("AUTH", "user:pw", "user:pw"),
    ("SENTINEL_AUTH", "spw", "spw"),
    ("TLS", "true", True),
    ("TLS_CLIENT_CERT", "/c.pem", "/c.pem"),
    ("TLS_CLIENT_KEY", "/k.pem", "/k.pem"),
    ("TLS_CACERT", "/ca.pem", "/ca.pem"),
    ("TLS_SKIP_HOSTNAME_VERIFICATION", "1", True),
    ("PIPELINE_WINDOW", "150us", 150e-6),
    ("PIPELINE_LIMIT", "8", 8),
    ("DB", "3", 3),
]


def test_redis_variables_cover_every_field() -> None:
    assert sorted(name.lower() for name, _, _ in REDIS_VALUES) == sorted(REDIS_FIELDS)


@pytest.mark.parametrize("prefix", ["REDIS_", "REDIS_PERSECOND_"])
def test_parse_redis_reads_every_variable_under_its_prefix(prefix: str) -> None:
    env = {prefix + name: raw for name, raw, _ in REDIS_VALUES}
    parsed = parse_redis(env, prefix, "/default.sock")
    for name, _, expected in REDIS_VALUES:
        assert getattr(parsed, name.lower()) == pytest.approx(expected), name


def test_parse_redis_uses_its_default_url_and_reference_defaults() -> None:
    assert parse_redis({}, "REDIS_PERSECOND_", "/p.sock") == RedisSettings(url="/p.sock")
    assert parse_redis({}, "REDIS_", "/r.sock").redacted() == {**REDIS_DEFAULTS, "url": "/r.sock"}


def test_the_two_prefixes_do_not_mix() -> None:
    settings = Settings.from_env(
        {"REDIS_PERSECOND": "true", "REDIS_URL": "main:6379", "REDIS_POOL_SIZE": "3",
         "REDIS_PERSECOND_URL": "second:6379", "REDIS_PERSECOND_TYPE": "cluster"}
    )  # fmt: skip
    assert settings.redis_persecond is True
    assert (settings.redis.url, settings.redis.pool_size, settings.redis.type) == (
        "main:6379",
        3,
        "single",
    )
    persecond = settings.redis_persecond_settings
    assert (persecond.url, persecond.pool_size, persecond.type) == ("second:6379", 10, "cluster")


def test_redis_persecond_flag_is_not_a_prefix_variable() -> None:
    assert Settings.from_env({"REDIS_PERSECOND": "false"}).redis_persecond is False
    message = error_for({"REDIS_PERSECOND": "maybe"})
    assert message.startswith("invalid value for REDIS_PERSECOND: 'maybe' (expected a boolean")


def test_parse_redis_errors_name_the_prefixed_variable() -> None:
    with pytest.raises(
        SettingsError,
        match=r"^invalid value for REDIS_PERSECOND_POOL_SIZE: 'x' \(expected an integer\)$",
    ):
        parse_redis(
            {"REDIS_PERSECOND_POOL_SIZE": "x", "REDIS_POOL_SIZE": "5"}, "REDIS_PERSECOND_", ""
        )


# -- combinations --------------------------------------------------------------------------------

SINK_CASES: list[tuple[dict[str, str], str | None]] = [
    ({}, "statsd"),
    ({"USE_PROMETHEUS": "true"}, None),  # USE_STATSD defaults to true, as in the reference
    ({"USE_DOG_STATSD": "true"}, None),
    ({"USE_STATSD": "false", "USE_PROMETHEUS": "true"}, "prometheus"),
    ({"USE_STATSD": "false", "USE_DOG_STATSD": "true"}, "dog"),
    ({"USE_STATSD": "false"}, "none"),
    ({"USE_STATSD": "false", "USE_DOG_STATSD": "true", "USE_PROMETHEUS": "true"}, None),
]


@pytest.mark.parametrize(("env", "sink"), SINK_CASES)
def test_only_one_stats_sink(env: dict[str, str], sink: str | None) -> None:
    if sink is not None:
        Settings.from_env(env)
        return
    message = error_for(env)
    assert message.startswith("only one of USE_STATSD, USE_DOG_STATSD, USE_PROMETHEUS may be true")
    for variable, raw in env.items():
        assert (f"{variable}=true" in message) == (raw == "true")


def test_prometheus_alone_names_the_defaulted_statsd() -> None:
    message = error_for({"USE_PROMETHEUS": "true"})
    assert "USE_STATSD=true, USE_PROMETHEUS=true" in message
    assert "USE_STATSD=false" in message


@pytest.mark.parametrize(
    ("env", "ok"),
    [({"MEMCACHE_HOST_PORT": "a:11211"}, True), ({"MEMCACHE_SRV": "_mc._tcp.example"}, True),
     ({"MEMCACHE_HOST_PORT": "a:11211", "MEMCACHE_SRV": "_mc._tcp.example"}, False),
     ({"MEMCACHE_HOST_PORT": " , ", "MEMCACHE_SRV": "_mc._tcp.example"}, True)],
)  # fmt: skip
def test_memcache_host_port_and_srv_are_exclusive(env: dict[str, str], ok: bool) -> None:
    if ok:
        Settings.from_env(env)
        return
    assert error_for(env) == (
        "MEMCACHE_HOST_PORT and MEMCACHE_SRV are both set ('a:11211' and '_mc._tcp.example'): set only one"
    )


# -- a realistic environment end to end ----------------------------------------------------------


def test_a_full_environment() -> None:
    env = {
        "PORT": "18080", "GRPC_PORT": "18081", "GRPC_UDS": "/tmp/rls.sock", "LOG_LEVEL": "info",
        "LOG_FORMAT": "json", "BACKEND_TYPE": "memory", "USE_STATSD": "false", "USE_PROMETHEUS": "true",
        "EXTRA_TAGS": "env:prod,region:eu", "NEAR_LIMIT_RATIO": "0.9", "EXPIRATION_JITTER_MAX_SECONDS": "0",
        "LOCAL_CACHE_SIZE_IN_BYTES": "1048576", "CACHE_KEY_PREFIX": "rl:", "RUNTIME_ROOT": "/etc/rl",
        "RUNTIME_SUBDIRECTORY": "ratelimit", "RUNTIME_WATCH_ROOT": "false",
        "RUNTIME_IGNORE_PATTERNS": "*~, *.swp,4913", "SHADOW_MODE": "True",
        "REDIS_OP_TIMEOUT": "250ms", "REDIS_STARTUP_MAX_ELAPSED_TIME": "2m", "SHUTDOWN_DRAIN_SECONDS": "5",
        "TRACING_SAMPLING_RATE": "0.1", "USE_DOG_STATSD_MOGRIFIERS": "A, B",
    }  # fmt: skip
    s = Settings.from_env(env)
    expected: dict[str, Any] = {
        "port": 18080, "grpc_port": 18081, "grpc_uds": "/tmp/rls.sock", "log_level": "INFO",
        "log_format": "json", "backend_type": "memory", "use_statsd": False, "use_prometheus": True,
        "extra_tags": {"env": "prod", "region": "eu"}, "near_limit_ratio": 0.9,
        "expiration_jitter_max_seconds": 0, "local_cache_size_in_bytes": 1048576,
        "cache_key_prefix": "rl:", "runtime_root": "/etc/rl", "runtime_subdirectory": "ratelimit",
        "runtime_watch_root": False, "shadow_mode": True, "redis_op_timeout": 0.25,
        "runtime_ignore_patterns": ("*~", "*.swp", "4913"),
        "redis_startup_max_elapsed_time": 120.0, "shutdown_drain_seconds": 5.0,
        "tracing_sampling_rate": 0.1, "use_dog_statsd_mogrifiers": ("A", "B"),
    }  # fmt: skip
    assert {name: flat_raw(s)[name] for name in expected} == expected
    untouched = {name for name in DEFAULTS if name not in expected}
    assert {n: v for n, v in flat(s).items() if n in untouched} == {
        n: v for n, v in DEFAULTS.items() if n in untouched
    }


@pytest.mark.parametrize("parse", [boolean, integer, number, duration, seconds])
def test_parsers_raise_value_error_for_empty_input(parse: Callable[[str], object]) -> None:
    # from_env never passes "" to these (empty means default); used directly they still refuse it
    with pytest.raises(ValueError):
        parse("")


def test_tiny_and_fractional_durations_truncate_like_go() -> None:
    assert duration("1.0000000001s") == 1.0  # below 1ns is dropped
    assert duration("0.9ns") == 0.0
    assert duration("1.9ns") == 1e-9
    assert duration("1.9999999999s") == 1.999999999
    assert math.isclose(duration("1.000000001s"), 1.000000001)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("zone=eu,rack=r1", {"zone": "eu", "rack": "r1"}),
        ("a:b=c,url=http://x=y", {"a:b": "c", "url": "http://x=y"}),  # only the first '=' splits
        ("novalue,k=v", {"k": "v"}),  # an entry without '=' is skipped, not refused
        ("zone:eu", {}),
        (" k = v ,=empty", {" k ": " v ", "": "empty"}),  # nothing is trimmed
        ("", {}),
    ],
)
def test_xds_node_metadata_reads_like_the_reference(raw: str, expected: dict[str, str]) -> None:
    settings = Settings.from_env({"CONFIG_GRPC_XDS_NODE_METADATA": raw})
    assert dict(settings.xds.node_metadata) == expected


def test_our_limits_have_defaults_and_parse() -> None:
    assert (Settings().stats_max_keys, Settings().xds.max_msg_size_in_bytes) == (
        10_000,
        256 * 1024 * 1024,
    )
    settings = Settings.from_env(
        {"STATS_MAX_KEYS": "50", "XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES": "1048576"}
    )
    assert (settings.stats_max_keys, settings.xds.max_msg_size_in_bytes) == (50, 1048576)
