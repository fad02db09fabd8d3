"""Rule files read with go-yaml v2's scalar rules, one test per rule (docs/compatibility.md,
"YAML scalars"): what the reference accepts we accept with the same meaning, what it refuses we
refuse."""

from __future__ import annotations

import pytest
import yaml

from ratelimit_svc.config import goyaml
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig, Rule
from ratelimit_svc.errors import ConfigError


def load(text: str) -> RateLimitConfig:
    return load_config([ConfigFile("r.yaml", text)])


def only_rule(text: str) -> Rule:
    (rule,) = load(text).rules()
    return rule


def rule_with(field: str) -> str:
    return f"domain: d\ndescriptors:\n  - key: k\n    {field}\n    rate_limit: {{unit: hour, requests_per_unit: 5}}\n"


def limit_of(value: str) -> str:
    return f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, requests_per_unit: {value}}}\n"


@pytest.mark.parametrize("word", ["y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true", "True", "TRUE"])
def test_booleans_true_include_y_and_on(word: str) -> None:
    assert only_rule(rule_with(f"shadow_mode: {word}")).shadow_mode is True


@pytest.mark.parametrize("word", ["n", "N", "no", "NO", "off", "Off", "false", "FALSE"])
def test_booleans_false_include_n_and_off(word: str) -> None:
    assert only_rule(rule_with(f"shadow_mode: {word}")).shadow_mode is False


@pytest.mark.parametrize("word", ["'y'", "yEs", "1", "enabled"])
def test_other_words_are_not_booleans(word: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot unmarshal !!(str|int) .* into bool"):
        load(rule_with(f"shadow_mode: {word}"))


@pytest.mark.parametrize(
    ("text", "number"),
    [("0o17", 15), ("0O17", 15), ("017", 15), ("0x1F", 31), ("0b101", 5), ("1_000", 1000), ("+7", 7), ("0", 0)],
)
def test_integers_take_go_base_prefixes(text: str, number: int) -> None:
    assert only_rule(limit_of(text)).requests_per_unit == number


def test_leading_zero_with_8_or_9_is_a_float_and_refused() -> None:
    with pytest.raises(ConfigError, match=r"r\.yaml: error checking config \(line 4"):
        load(limit_of("08"))


@pytest.mark.parametrize("text", ["1:20", "1:00:00"])
def test_no_base_60(text: str) -> None:
    with pytest.raises(ConfigError, match=f"cannot unmarshal !!str `{text}` into uint32"):
        load(limit_of(text))


@pytest.mark.parametrize("text", ["1e3", "1.5", ".5", "1.", "+.5", ".inf", "-.Inf", ".nan"])
def test_floats_fail_the_key_check(text: str) -> None:
    with pytest.raises(ConfigError, match=r"error checking config \(line 4, descriptors\[0\]\.rate_limit\.requests_per_unit\)"):
        load(limit_of(text))


@pytest.mark.parametrize("text", ["1e999", "1.e5x", "0x", "1__2e", "0o8"])
def test_out_of_range_or_malformed_numbers_are_strings(text: str) -> None:
    assert goyaml.resolve_plain(text) == goyaml.STR
    with pytest.raises(ConfigError, match=f"cannot unmarshal !!str `{text}` into uint32"):
        load(limit_of(text))


def test_integers_above_int64_fail_the_key_check() -> None:
    assert goyaml.resolve_plain("18446744073709551615") == goyaml.INT  # a uint64 to go-yaml
    with pytest.raises(ConfigError, match="error checking config"):
        load(limit_of("18446744073709551615"))
    with pytest.raises(ConfigError, match="error checking config"):
        load(limit_of("18446744073709551616"))  # beyond uint64: a float


@pytest.mark.parametrize("text", ["-1", "4294967296"])
def test_integers_outside_uint32_are_type_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=f"cannot unmarshal !!int `{text}` into uint32"):
        load(limit_of(text))


@pytest.mark.parametrize(
    "text",
    ["2024-01-01", "2024-1-2", "2001-12-14t21:59:43.10-05:00", "2001-12-14T21:59:43Z", "2001-12-14 21:59:43.10"],
)
def test_timestamps_stay_strings(text: str) -> None:
    config = load(f"domain: d\ndescriptors:\n  - key: date\n    value: {text}\n    rate_limit: {{unit: hour, requests_per_unit: 1}}\n")
    assert f"date_{text}" in config.domains["d"].children


def test_timestamp_is_a_type_error_in_a_number() -> None:
    with pytest.raises(ConfigError, match=r"cannot unmarshal !!timestamp `2024-01-01` into uint32"):
        load(limit_of("2024-01-01"))


@pytest.mark.parametrize("text", ["2024-02-30", "2001-12-14T21:59:43", "24-01-01"])
def test_not_quite_timestamps_are_plain_strings(text: str) -> None:
    assert goyaml.resolve_plain(text) == goyaml.STR


@pytest.mark.parametrize("text", ["", "~", "null", "Null", "NULL"])
def test_nulls_are_empty(text: str) -> None:
    config = load(f"domain: d\ndescriptors:\n  - key: k\n    value: {text}\n    rate_limit: {{unit: hour, requests_per_unit: 1}}\n")
    assert "k" in config.domains["d"].children


def test_merge_keys_expand_in_go_order() -> None:
    text = """
domain: d
descriptors:
  - key: base
    rate_limit: &hourly {unit: hour, requests_per_unit: 5}
  - key: a
    rate_limit:
      <<: *hourly
  - key: b
    rate_limit:
      requests_per_unit: 1
      <<: *hourly
      unit: minute
  - key: c
    rate_limit:
      <<: [{requests_per_unit: 7}, *hourly]
"""
    children = load(text).domains["d"].children
    got = {k: (n.rule.requests_per_unit, n.rule.unit.name) for k, n in children.items() if n.rule}
    # a key before "<<" is overridden by the merge, a key after it overrides the merge; in a list
    # the earlier mapping wins
    assert got == {"base": (5, "HOUR"), "a": (5, "HOUR"), "b": (5, "MINUTE"), "c": (7, "HOUR")}


def test_merge_of_a_scalar_is_refused_with_its_line() -> None:
    with pytest.raises(ConfigError, match=r"map merge requires map or sequence of maps as the value \(line 5\)"):
        load("domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      <<: 5\n")


def test_quoted_merge_key_is_an_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown key '<<'"):
        load("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {'<<': {unit: hour}}\n")


def test_the_dumper_quotes_what_the_loader_would_retype() -> None:
    words = ["y", "off", "0o17", "1e3", "2024-01-01", "", "~", "<<", "plain", "08"]
    text = yaml.dump(words, Dumper=goyaml.Dumper)
    nodes = yaml.compose(text, Loader=goyaml.Loader)
    assert [node.tag for node in nodes.value] == [goyaml.STR] * len(words)
    assert [node.value for node in nodes.value] == words


def test_the_c_composer_keeps_line_marks() -> None:
    node = yaml.compose("a: 1\nb:\n  - x\n", Loader=goyaml.Loader)
    assert node.value[1][1].value[0].start_mark.line == 2


def test_the_loader_tags_every_plain_scalar_as_resolve_plain_does() -> None:
    # The composer's resolver skips the go-yaml rules for scalars by their first character
    # (docs/compatibility.md, "YAML scalars"): every word, number and date must still reach them.
    texts = [w for w in goyaml._WORDS if w] + [
        "0o17", "017", "0x1F", "+7", "-3", "1_000", "08", "1e3", ".5", "+.5", "-.5e3", "1.",
        "2024-01-01", "2024-01-01 10:00:00", "2024-01-01T10:00:00Z", "plain", "client-0001",
        "x1", "Yess", "nope", "truthy", "~x", "<<x", ".x", "_1", "١٢",
    ]  # fmt: skip
    node = yaml.compose("[" + ", ".join(texts) + "]", Loader=goyaml.Loader)
    assert [item.value for item in node.value] == texts
    assert [item.tag for item in node.value] == [goyaml.resolve_plain(t) for t in texts]
    assert {goyaml.BOOL, goyaml.NULL, goyaml.INT, goyaml.FLOAT, goyaml.TIMESTAMP, goyaml.MERGE} < {
        item.tag for item in node.value
    }


@pytest.mark.parametrize("cls", [goyaml.Loader, goyaml.Dumper])
def test_the_loader_and_dumper_have_no_path_resolvers(cls: type) -> None:
    # Their path hooks do nothing (config/goyaml.py): a path resolver added would not apply.
    assert not cls.yaml_path_resolvers
    assert cls.descend_resolver(None, None) is not None  # callable with the composer's arguments
    assert cls.ascend_resolver() is not None
