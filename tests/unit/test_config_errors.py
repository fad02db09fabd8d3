"""Every config validation error (docs/configuration.md (Config errors)), one fixture each, with the reference's exact text.

Each message must start with ``<config name>: <reference text>`` (the config name being the name the
file was passed under) and then say where in the file the problem is (``line N``, plus the path of
the node when there is one). Fixtures live in ``tests/fixtures/config_errors``; the order cases pin
which error wins when a file has several.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ERRORS = FIXTURES / "config_errors"
OK = FIXTURES / "config_ok"


@dataclass(frozen=True)
class Case:
    files: tuple[str, ...]  # fixture names under config_errors/, loaded in this order
    message: str  # reference text; the error is `<last file>: <message>` + location
    line: int  # the line the location must name
    path: str | None = None  # the node path the location must name, when there is a node
    open_ended: bool = False  # message is a prefix (`error loading config file: <detail>`)
    detail: tuple[str, ...] = ()  # substrings the detail must contain


CASES: dict[str, Case] = {
    # 1. YAML parse error
    "yaml_parse_error": Case(
        ("yaml_parse_error.yaml",),
        "error loading config file: ",
        line=4,
        open_ended=True,
        # libyaml's words (as go-yaml's), or PyYAML's own parser's where libyaml is absent
        detail=("did not find expected '-' indicator" if yaml.__with_libyaml__ else "expected <block end>",),
    ),
    # 2. key check
    "key_not_string": Case(
        ("key_not_string.yaml",),
        "config error, key is not of type string: 1",
        line=4,
        path="descriptors[0]",
    ),
    "unknown_key": Case(("unknown_key.yaml",), "config error, unknown key 'foo'", line=2),
    "unknown_key_nested": Case(
        ("unknown_key_nested.yaml",),
        "config error, unknown key 'requestsperunit'",
        line=9,
        path="descriptors[0].descriptors[0].rate_limit",
    ),
    "list_not_map": Case(
        ("list_not_map.yaml",),
        "config error, yaml file contains list of type other than map: a",
        line=4,
        path="descriptors[1]",
    ),
    "float_scalar": Case(
        ("float_scalar.yaml",),
        "error checking config",
        line=6,
        path="descriptors[0].rate_limit.requests_per_unit",
    ),
    # 3. type errors
    "negative_requests_per_unit": Case(
        ("negative_requests_per_unit.yaml",),
        "error loading config file: ",
        line=6,
        path="descriptors[0].rate_limit.requests_per_unit",
        open_ended=True,
        detail=("`-1`", "uint32"),
    ),
    "requests_per_unit_not_int": Case(
        ("requests_per_unit_not_int.yaml",),
        "error loading config file: ",
        line=6,
        path="descriptors[0].rate_limit.requests_per_unit",
        open_ended=True,
        detail=("`ten`", "uint32"),
    ),
    "descriptors_not_list": Case(
        ("descriptors_not_list.yaml",),
        "error loading config file: ",
        line=4,
        path="descriptors[0].descriptors",
        open_ended=True,
        detail=("`subkey1`",),
    ),
    # 4. domain
    "empty_domain": Case(("empty_domain.yaml",), "config file cannot have empty domain", line=1),
    "missing_domain": Case(
        ("missing_domain.yaml",), "config file cannot have empty domain", line=1
    ),
    "empty_file": Case(("empty_file.yaml",), "config file cannot have empty domain", line=1),
    # 5. duplicate domain: reported against the second file
    "duplicate_domain": Case(
        ("duplicate_domain_1.yaml", "duplicate_domain_2.yaml"),
        "duplicate domain 'test-domain' in config file",
        line=2,
        path="domain",
    ),
    # 6. per descriptor
    "descriptor_empty_key": Case(
        ("descriptor_empty_key.yaml",),
        "descriptor has empty key",
        line=5,
        path="descriptors[0].descriptors[0]",
    ),
    "descriptor_missing_key": Case(
        ("descriptor_missing_key.yaml",),
        "descriptor has empty key",
        line=4,
        path="descriptors[1]",
    ),
    "duplicate_composite_key": Case(
        ("duplicate_composite_key.yaml",),
        "duplicate descriptor composite key 'test-domain.key1_value1'",
        line=8,
        path="descriptors[1]",
    ),
    "duplicate_composite_key_nested": Case(
        ("duplicate_composite_key_nested.yaml",),
        "duplicate descriptor composite key 'd.k1_v1.k2'",
        line=12,
        path="descriptors[0].descriptors[2]",
    ),
    "invalid_unit": Case(
        ("invalid_unit.yaml",),
        "invalid rate limit unit 'foo'",
        line=5,
        path="descriptors[0].rate_limit",
    ),
    "empty_unit": Case(
        ("empty_unit.yaml",),
        "invalid rate limit unit ''",
        line=5,
        path="descriptors[0].rate_limit",
    ),
    "missing_unit": Case(
        ("missing_unit.yaml",),
        "invalid rate limit unit ''",
        line=5,
        path="descriptors[0].rate_limit",
    ),
    "unlimited_with_unit": Case(
        ("unlimited_with_unit.yaml",),
        "should not specify rate limit unit when unlimited",
        line=5,
        path="descriptors[0].rate_limit",
    ),
    "replaces_empty": Case(
        ("replaces_empty.yaml",),
        "should not have an empty replaces entry",
        line=5,
        path="descriptors[0].rate_limit",
    ),
    "replaces_self": Case(
        ("replaces_self.yaml",),
        "replaces should not contain name of same descriptor",
        line=5,
        path="descriptors[0].rate_limit",
    ),
    "share_threshold_without_wildcard": Case(
        ("share_threshold_without_wildcard.yaml",),
        "share_threshold can only be used with wildcard values (containing '*'), "
        "but found key 'path_/users'",
        line=6,
        path="descriptors[0].descriptors[0]",
    ),
    # Lines count from the top of the file, across `---` documents.
    "multi_document": Case(
        ("multi_document.yaml",),
        "config error, unknown key 'burst'",
        line=14,
        path="descriptors[0].rate_limit",
    ),
    # Order of the checks (docs/configuration.md (Config errors): "The checks run in this order").
    "order_unknown_key_before_empty_domain": Case(
        ("order_unknown_key_before_empty_domain.yaml",),
        "config error, unknown key 'ratelimit'",
        line=4,
        path="descriptors[0]",
    ),
    "order_type_error_before_empty_domain": Case(
        ("order_type_error_before_empty_domain.yaml",),
        "error loading config file: ",
        line=5,
        open_ended=True,
        detail=("`-5`", "uint32"),
    ),
    "order_key_check_before_type_error": Case(
        ("order_key_check_before_type_error.yaml",),
        "config error, unknown key 'shadowmode'",
        line=8,
        path="descriptors[1]",
    ),
    "order_empty_domain_before_descriptors": Case(
        ("order_empty_domain_before_descriptors.yaml",),
        "config file cannot have empty domain",
        line=1,
    ),
    "order_depth_first": Case(
        ("order_depth_first.yaml",),
        "invalid rate limit unit 'fortnight'",
        line=7,
        path="descriptors[0].descriptors[0].rate_limit",
    ),
    "order_duplicate_before_unit": Case(
        ("order_duplicate_before_unit.yaml",),
        "duplicate descriptor composite key 'test-domain.key1'",
        line=7,
        path="descriptors[1]",
    ),
    "order_unit_before_share_threshold": Case(
        ("order_unit_before_share_threshold.yaml",),
        "invalid rate limit unit 'fortnight'",
        line=6,
        path="descriptors[0].rate_limit",
    ),
}


def fixture(name: str, directory: Path = ERRORS) -> ConfigFile:
    return ConfigFile(name, (directory / name).read_text(encoding="utf-8"))


def load_error(files: list[ConfigFile], *, merge_domains: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(files, merge_domains=merge_domains)
    return str(info.value)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_message(case: Case) -> None:
    message = load_error([fixture(name) for name in case.files])

    prefix = f"{case.files[-1]}: {case.message}"
    assert message.startswith(prefix), message
    rest = message[len(prefix) :]
    if not case.open_ended:
        # Nothing may follow the reference text but the location.
        assert rest.startswith(" ("), message
    for part in case.detail:
        assert part in rest, message
    assert re.search(rf"\bline {case.line}\b", rest), message
    if case.path is not None:
        assert case.path in rest, message


def test_every_error_fixture_has_a_case() -> None:
    used = {name for case in CASES.values() for name in case.files}
    assert used == {p.name for p in ERRORS.iterdir()}


def test_error_is_one_line() -> None:
    # A parse error from the YAML library spans lines; the log line must not.
    message = load_error([fixture("yaml_parse_error.yaml")])
    assert "\n" not in message


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad_first", "bad_last"])
def test_one_bad_file_rejects_the_whole_load(bad_first: bool) -> None:
    good = [fixture("basic_config.yaml", OK), fixture("messaging.yaml", OK)]
    bad = fixture("unknown_key.yaml")
    files = [bad, *good] if bad_first else [*good, bad]
    message = load_error(files)
    assert message.startswith("unknown_key.yaml: config error, unknown key 'foo'")


def test_duplicate_domain_within_one_file() -> None:
    text = "domain: d\n---\ndomain: e\n---\ndomain: d\n"
    message = load_error([ConfigFile("multi.yaml", text)])
    assert message.startswith("multi.yaml: duplicate domain 'd' in config file (line 5")


def test_duplicate_composite_key_across_merged_files() -> None:
    first = "domain: d\ndescriptors:\n  - key: k1\n    value: v1\n"
    second = "domain: d\ndescriptors:\n  - key: k2\n  - key: k1\n    value: v1\n"
    message = load_error(
        [ConfigFile("a.yaml", first), ConfigFile("b.yaml", second)], merge_domains=True
    )
    assert message.startswith("b.yaml: duplicate descriptor composite key 'd.k1_v1' (line 4")


def test_config_name_is_used_verbatim() -> None:
    # The runtime passes names relative to the config dir; ratelimit-config-check full paths.
    text = (ERRORS / "unknown_key.yaml").read_text(encoding="utf-8")
    message = load_error([ConfigFile("/etc/ratelimit/config/team/unknown_key.yaml", text)])
    assert message.startswith(
        "/etc/ratelimit/config/team/unknown_key.yaml: config error, unknown key 'foo' (line 2"
    )


def test_metadata_subtree_is_not_key_checked() -> None:
    config = load_config([fixture("metadata.yaml", OK)])
    [rule] = config.rules()
    assert rule.metadata == {
        "owner": "team-a",
        "not_a_config_key": 1.5,
        "1": "non-string key",
        "tags": ["a", "b"],
        "nested": {"anything": [{"goes": "here"}]},
    }
