"""The rule fields of docs/algorithms.md at load: what they build, every error with its file, line
and place, the xDS resource's new fields, the /rlconfig dump, ratelimit-config-check and the
backends that cannot count them."""

from __future__ import annotations

import re

import pytest
from google.protobuf import any_pb2

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import Algorithm, Rule, Unit
from ratelimit_svc.config.xds import load_resources
from ratelimit_svc.errors import ConfigError, SettingsError
from ratelimit_svc.main import config_check_main
from ratelimit_svc.pb.ratelimit.config.ratelimit.v3 import rls_conf_pb2
from ratelimit_svc.settings.model import Settings

GOOD = """\
domain: d
descriptors:
  - key: sliding
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: sliding_window}
  - key: bucket
    charge_only_when_admitted: true
    rate_limit: {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 30}
  - key: five
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 100}
  - key: two
    rate_limit:
      - {unit: second, requests_per_unit: 10}
      - {unit: hour, requests_per_unit: 1000, algorithm: sliding_window}
  - key: plain
    rate_limit: {unit: minute, requests_per_unit: 3}
"""


def rules() -> dict[str, Rule]:
    config = load_config([ConfigFile("good.yaml", GOOD)])
    return {rule.stats_key.rpartition(".")[2]: rule for rule in config.rules()}


def test_the_new_fields_build_rules() -> None:
    r = rules()
    assert r["sliding"].algorithm is Algorithm.SLIDING_WINDOW and not r["sliding"].classic
    assert (r["bucket"].algorithm, r["bucket"].burst, r["bucket"].charge_only_when_admitted) == (
        Algorithm.TOKEN_BUCKET, 30, True,
    )
    assert r["five"].window_seconds == 300
    first, second = r["two"].limits
    assert (first.unit, first.stats_suffix) == (Unit.SECOND, ".per_second")
    assert (second.unit, second.algorithm, second.stats_suffix) == (
        Unit.HOUR, Algorithm.SLIDING_WINDOW, ".per_hour_sliding_window",
    )
    assert r["plain"].classic and r["plain"] == Rule(3, Unit.MINUTE, stats_key="d.plain")


def test_rlconfig_dump_shows_the_new_fields_and_nothing_new_for_plain_rules() -> None:
    dump = load_config([ConfigFile("good.yaml", GOOD)]).dump().splitlines()
    assert dump[-1] == (
        "d.plain: unit=MINUTE requests_per_unit=3, shadow_mode: false, quota_mode: false"
    )
    assert "limits: 10 per second, token_bucket burst 30, charge_only_when_admitted: true" in dump[1]
    assert dump[2].endswith("limits: 100 per 5 minute, fixed_window")
    assert dump[3].endswith("limits: 10 per second, fixed_window; 1000 per hour, sliding_window")


ERRORS = [
    # (rate_limit text, message, line, path)
    (
        "{unit: second, requests_per_unit: 1, algorithm: leaky}",
        "invalid rate limit algorithm 'leaky' (expected fixed_window, sliding_window or token_bucket)",
        4, "descriptors[0].rate_limit.algorithm",
    ),
    (
        "{unit: second, requests_per_unit: 1, algorithm: Sliding_Window}",
        "invalid rate limit algorithm 'Sliding_Window'",
        4, "descriptors[0].rate_limit.algorithm",
    ),
    (
        "{unit: second, requests_per_unit: 1, burst: 5}",
        "config error, unknown key 'burst'",
        4, "descriptors[0].rate_limit",
    ),
    (
        "{unit: second, requests_per_unit: 1, algorithm: token_bucket, burst: 0}",
        "burst must be at least 1",
        4, "descriptors[0].rate_limit.burst",
    ),
    (
        "{unit: second, requests_per_unit: 1, algorithm: token_bucket, burst: -1}",
        "error loading config file: line 4: cannot unmarshal !!int `-1` into uint32",
        4, "descriptors[0].rate_limit.burst",
    ),
    (
        "{unit: second, requests_per_unit: 0, algorithm: token_bucket}",
        "token_bucket needs requests_per_unit of at least 1",
        4, "descriptors[0].rate_limit.requests_per_unit",
    ),
    (
        "{unit: second, requests_per_unit: 1, unit_multiplier: 0}",
        "unit_multiplier must be at least 1",
        4, "descriptors[0].rate_limit.unit_multiplier",
    ),
    (
        "{unit: year, requests_per_unit: 1, unit_multiplier: 11}",
        "unit_multiplier makes the window 346896000 seconds long; at most 315360000",
        4, "descriptors[0].rate_limit.unit_multiplier",
    ),
    (
        "{unlimited: true, algorithm: sliding_window}",
        "should not specify algorithm, burst or unit_multiplier when unlimited",
        4, "descriptors[0].rate_limit",
    ),
    ("[]", "a rate_limit list must not be empty", 4, "descriptors[0].rate_limit"),
    (
        "[{unit: second, requests_per_unit: 1, name: n}]",
        "'name' is not allowed in a rate_limit list",
        4, "descriptors[0].rate_limit[0].name",
    ),
    (
        "[{unit: second, requests_per_unit: 1}, {unit: minute, requests_per_unit: 1, unlimited: true}]",
        "'unlimited' is not allowed in a rate_limit list",
        4, "descriptors[0].rate_limit[1].unlimited",
    ),
    (
        "[{unit: minute, requests_per_unit: 1}, {unit: second, unit_multiplier: 60, requests_per_unit: 5}]",
        "two limits with the same algorithm and window",
        4, "descriptors[0].rate_limit[1]",
    ),
    (
        "[{unit: second, requests_per_unit: 1}, {unit: fortnight, requests_per_unit: 1}]",
        "invalid rate limit unit 'fortnight'",
        4, "descriptors[0].rate_limit[1]",
    ),
]


@pytest.mark.parametrize(("rate_limit", "message", "line", "path"), ERRORS)
def test_errors_name_file_line_and_place(rate_limit: str, message: str, line: int, path: str) -> None:
    text = f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {rate_limit}\n"
    with pytest.raises(ConfigError) as caught:
        load_config([ConfigFile("rules/bad.yaml", text)])
    error = str(caught.value)
    assert error.startswith("rules/bad.yaml: "), error
    assert message in error, error
    assert re.search(rf"\bline {line}\b", error), error
    assert path in error, error


def test_charge_only_when_admitted_must_be_a_bool() -> None:
    text = "domain: d\ndescriptors:\n  - key: k\n    charge_only_when_admitted: maybe\n"
    with pytest.raises(ConfigError, match=r"line 4: cannot unmarshal !!str `maybe` into bool"):
        load_config([ConfigFile("b.yaml", text)])


@pytest.mark.parametrize(
    ("descriptor", "what"),
    [
        ("rate_limit: {unit: second, requests_per_unit: 1, algorithm: sliding_window}", "algorithm sliding_window"),
        ("charge_only_when_admitted: true\n    rate_limit: {unit: second, requests_per_unit: 1}", "charge_only_when_admitted"),
    ],
)
def test_memcache_refuses_what_it_cannot_count(descriptor: str, what: str) -> None:
    text = f"domain: d\ndescriptors:\n  - key: k\n    {descriptor}\n"
    files = [ConfigFile("m.yaml", text)]
    load_config(files)  # fine elsewhere
    with pytest.raises(ConfigError, match=rf"^m\.yaml: {what} is not supported with BACKEND_TYPE=memcache .*line"):
        load_config(files, fixed_windows_only="memcache")
    # Plain fixed windows of any length still load.
    load_config(
        [ConfigFile("ok.yaml", "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, unit_multiplier: 5, requests_per_unit: 1}\n")],
        fixed_windows_only="memcache",
    )


def test_global_charge_only_refuses_memcache() -> None:
    with pytest.raises(SettingsError, match=r"CHARGE_ONLY_WHEN_ADMITTED=true .* BACKEND_TYPE=memcache"):
        Settings.from_env({"CHARGE_ONLY_WHEN_ADMITTED": "true", "BACKEND_TYPE": "memcache"})


def _any(config: rls_conf_pb2.RateLimitConfig) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(config)
    return packed


def test_xds_resource_carries_the_new_fields() -> None:
    Policy, Descriptor = rls_conf_pb2.RateLimitPolicy, rls_conf_pb2.RateLimitDescriptor
    config = rls_conf_pb2.RateLimitConfig(
        name="xds-1",
        domain="d",
        descriptors=[
            Descriptor(
                key="bucket",
                charge_only_when_admitted=True,
                rate_limit=Policy(
                    unit=rls_conf_pb2.SECOND, requests_per_unit=10,
                    algorithm=rls_conf_pb2.TOKEN_BUCKET, burst=30,
                ),
            ),
            Descriptor(
                key="two",
                rate_limit=Policy(unit=rls_conf_pb2.SECOND, requests_per_unit=10),
                additional_limits=[
                    Policy(
                        unit=rls_conf_pb2.MINUTE, unit_multiplier=5, requests_per_unit=100,
                        algorithm=rls_conf_pb2.SLIDING_WINDOW,
                    )
                ],
            ),
        ],
    )
    loaded = {r.stats_key: r for r in load_resources([_any(config)]).rules()}
    bucket, two = loaded["d.bucket"], loaded["d.two"]
    assert (bucket.algorithm, bucket.burst, bucket.charge_only_when_admitted) == (
        Algorithm.TOKEN_BUCKET, 30, True,
    )
    assert [(lim.requests_per_unit, lim.window_seconds, lim.algorithm) for lim in two.limits] == [
        (10, 1, Algorithm.FIXED_WINDOW), (100, 300, Algorithm.SLIDING_WINDOW),
    ]


def test_xds_errors_in_new_fields_name_the_place() -> None:
    config = rls_conf_pb2.RateLimitConfig(
        name="xds-2",
        domain="d",
        descriptors=[
            rls_conf_pb2.RateLimitDescriptor(
                key="k",
                rate_limit=rls_conf_pb2.RateLimitPolicy(
                    unit=rls_conf_pb2.SECOND, requests_per_unit=1, burst=3
                ),
            )
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"^xds-2: burst is only for algorithm token_bucket .*\(descriptors\[0\]\.rate_limit\.burst\)$",
    ):
        load_resources([_any(config)])


def test_config_check_knows_the_new_fields(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "configs"  # type: ignore[operator]
    directory.mkdir()
    (directory / "good.yaml").write_text(GOOD)
    config_check_main(["--config_dir", str(directory)])
    assert capsys.readouterr().out.endswith("all rate limit configs ok\n")
    with pytest.raises(SystemExit) as exited:
        config_check_main(["--config_dir", str(directory), "--backend_type", "memcache"])
    assert exited.value.code == 1
    assert "algorithm sliding_window is not supported with BACKEND_TYPE=memcache" in capsys.readouterr().out
