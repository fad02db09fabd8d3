"""Matching request descriptors to rules, counter key bodies and stats keys
(docs/configuration.md (Descriptors and matching))."""

from __future__ import annotations

import pytest

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig, Unit
from ratelimit_svc.limiter.matching import Override, descriptor_key, match

RULES = """
domain: d
descriptors:
  - key: exact
    value: v1
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: exact
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: wild
    value: foo*
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: wild
    value: "*.com"
    rate_limit: {unit: second, requests_per_unit: 4}
  - key: wild
    value: /api/*/x
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: wild
    value: a*b*c
    rate_limit: {unit: second, requests_per_unit: 6}
  - key: nest
    value: a
    descriptors:
      - key: inner
        rate_limit: {unit: minute, requests_per_unit: 7}
  - key: nest
    descriptors:
      - key: inner
        value: only
        rate_limit: {unit: minute, requests_per_unit: 8}
  - key: both
    rate_limit: {unit: hour, requests_per_unit: 9}
    descriptors:
      - key: deeper
        rate_limit: {unit: hour, requests_per_unit: 10}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 11}
  - key: detailed
    detailed_metric: true
    descriptors:
      - key: x
        detailed_metric: true
        rate_limit: {unit: second, requests_per_unit: 12}
  - key: vtm
    value_to_metric: true
    descriptors:
      - key: route
        value: r*
        value_to_metric: true
        descriptors:
          - key: leaf
            value: fixed
            rate_limit: {unit: second, requests_per_unit: 13}
  - key: novtm
    descriptors:
      - key: route
        value: r*
        rate_limit: {unit: second, requests_per_unit: 14}
"""


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("rules.yaml", RULES)])


def limit_of(config: RateLimitConfig, *entries: tuple[str, str]) -> int | None:
    found = match(config, "d", list(entries))
    return None if found is None else found.rule.requests_per_unit


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param([("exact", "v1")], 1, id="exact-value-wins"),
        pytest.param([("exact", "other")], 2, id="value-less-default-key"),
        pytest.param([("exact", "")], 2, id="default-key-matches-empty-value"),
        pytest.param([("wild", "foobar")], 3, id="suffix-wildcard"),
        pytest.param([("wild", "foo")], 3, id="wildcard-matches-empty-run"),
        pytest.param([("wild", "example.com")], 4, id="prefix-wildcard"),
        pytest.param([("wild", "/api/v1/x")], 5, id="middle-wildcard"),
        pytest.param([("wild", "/api/v1/y")], None, id="middle-wildcard-mismatch"),
        pytest.param([("wild", "aXXbYYc")], 6, id="several-wildcards"),
        pytest.param([("wild", "zzz")], None, id="no-wildcard-matches"),
        pytest.param([("nest", "a"), ("inner", "anything")], 7, id="nested-exact-then-default"),
        pytest.param([("nest", "b"), ("inner", "only")], 8, id="nested-default-then-exact"),
        pytest.param([("nest", "a"), ("inner", "only")], 7, id="no-backtracking"),
        pytest.param([("nest", "a")], None, id="fewer-entries-no-rule-at-node"),
        pytest.param([("both", "x")], 9, id="fewer-entries-rule-at-node"),
        pytest.param([("both", "x"), ("deeper", "y")], 10, id="descend-to-child-rule"),
        pytest.param([("exact", "v1"), ("more", "x")], None, id="more-entries-than-path"),
        pytest.param([("unknown", "x")], None, id="unknown-key"),
        pytest.param([("Exact", "v1")], None, id="keys-are-case-sensitive"),
    ],
)
def test_match_rule(config: RateLimitConfig, entries: list[tuple[str, str]], expected: int | None) -> None:
    assert limit_of(config, *entries) == expected


def test_first_wildcard_in_config_order_wins() -> None:
    rules = """
domain: d
descriptors:
  - key: k
    value: a*
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: k
    value: ab*
    rate_limit: {unit: second, requests_per_unit: 2}
"""
    config = load_config([ConfigFile("w.yaml", rules)])
    assert limit_of(config, ("k", "abc")) == 1


def test_counter_key_body_and_stats_key(config: RateLimitConfig) -> None:
    found = match(config, "d", [("nest", "a"), ("inner", "zz")])
    assert found is not None
    assert found.key_body == "d_nest_a_inner_zz_"
    assert found.stats_key == "d.nest_a.inner"


def test_share_threshold_uses_pattern_in_key(config: RateLimitConfig) -> None:
    a = match(config, "d", [("files", "files/a.pdf")])
    b = match(config, "d", [("files", "files/b.csv")])
    assert a is not None and b is not None
    assert a.key_body == b.key_body == "d_files_files/*_"
    assert a.stats_key == "d.files_files/*"


def test_detailed_metric_stats_key(config: RateLimitConfig) -> None:
    found = match(config, "d", [("detailed", "abc"), ("x", "")])
    assert found is not None
    assert found.stats_key == "d.detailed_abc.x"


def test_value_to_metric_stats_key(config: RateLimitConfig) -> None:
    found = match(config, "d", [("vtm", "u1"), ("route", "r42"), ("leaf", "fixed")])
    assert found is not None
    assert found.stats_key == "d.vtm_u1.route_r42.leaf_fixed"
    assert found.rule.stats_key == "d.vtm.route_r*.leaf_fixed"


def test_wildcard_without_value_to_metric_keeps_pattern(config: RateLimitConfig) -> None:
    found = match(config, "d", [("novtm", "u1"), ("route", "r42")])
    assert found is not None
    assert found.stats_key == "d.novtm.route_r*"


def test_override_replaces_tree(config: RateLimitConfig) -> None:
    found = match(config, "d", [("exact", "v1"), ("k", "")], Override(42, Unit.HOUR))
    assert found is not None
    assert (found.rule.requests_per_unit, found.rule.unit) == (42, Unit.HOUR)
    assert found.rule.name == "" and not found.rule.shadow_mode
    assert found.stats_key == "d.exact_v1.k"
    assert found.key_body == "d_exact_v1_k__"


def test_descriptor_key() -> None:
    assert descriptor_key("dom", [("a", "1"), ("b", "")]) == "dom.a_1.b"


PLAIN_RULES = """
domain: p
descriptors:
  - key: plain
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: plain
    value: v1
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: vtm
    value_to_metric: true
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: detailed
    detailed_metric: true
    rate_limit: {unit: second, requests_per_unit: 4}
  - key: parent
    descriptors:
      - key: child
        rate_limit: {unit: second, requests_per_unit: 5}
  - key: empty
    value: ""
    rate_limit: {unit: second, requests_per_unit: 6}
  - key: "plain_"
    rate_limit: {unit: second, requests_per_unit: 7}
"""


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (("plain", "v1"), (2, "p_plain_v1_", "p.plain_v1")),  # the exact child
        (("plain", "other"), (1, "p_plain_other_", "p.plain")),  # the key's child
        (("plain", ""), (7, "p_plain__", "p.plain")),  # no value: "plain_" is an exact hit
        (("vtm", "u1"), (3, "p_vtm_u1_", "p.vtm_u1")),  # the value goes into the stats key
        (("detailed", "d1"), (4, "p_detailed_d1_", "p.detailed_d1")),
        (("parent", "x"), None),  # a node without a rule at the last entry
        (("empty", "e"), (6, "p_empty_e_", "p.empty")),
        (("missing", "v"), None),
    ],
)
def test_one_entry_descriptors_without_wildcards(
    entry: tuple[str, str], expected: tuple[int, str, str] | None
) -> None:
    # One entry with a value is matched without the level loop when no wildcard is there to try
    # (docs/performance.md); it must answer as the loop does, stats key included.
    config = load_config([ConfigFile("plain.yaml", PLAIN_RULES)])
    found = match(config, "p", [entry])
    got = None if found is None else (found.rule.requests_per_unit, found.key_body, found.stats_key)
    assert got == expected
