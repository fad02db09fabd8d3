"""What a valid configuration loads into, and where the files come from
(docs/configuration.md (The rule file, Where files come from)).

``load_config`` is checked through the rule tree, the rules and the reference's /rlconfig dump;
``read_config_files`` and ``load_from_files`` against real directory trees built under tmp_path
(subdirectories, dot-files, a Kubernetes ConfigMap layout, a symlinked RUNTIME_ROOT).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ratelimit_svc.config.files import RuntimeLocation, load_from_files, read_config_files
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import Node, RateLimitConfig, Rule, Unit
from ratelimit_svc.errors import ConfigError

OK = Path(__file__).resolve().parents[1] / "fixtures" / "config_ok"


def load(text: str, name: str = "test.yaml") -> RateLimitConfig:
    return load_config([ConfigFile(name, text)])


def one_rule(text: str) -> Rule:
    [rule] = load(text).rules()
    return rule


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def domain_text(domain: str, key: str = "key1", rpu: int = 5) -> str:
    return (
        f"domain: {domain}\ndescriptors:\n  - key: {key}\n"
        f"    rate_limit:\n      unit: second\n      requests_per_unit: {rpu}\n"
    )


# -- the reference-style examples, through the /rlconfig dump ------------------------------------

EXPECTED_DUMP = """\
all_keys.route_checkout: unit=HOUR requests_per_unit=100, shadow_mode: true, quota_mode: true
all_keys.route_checkout.path_/api/*: unit=MINUTE requests_per_unit=0, shadow_mode: false, quota_mode: false
all_keys.route: unit=HOUR requests_per_unit=1000, shadow_mode: false, quota_mode: false
all_keys.internal: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false
test-domain.key1_value1.subkey1: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false
test-domain.key1_value1.subkey1_subvalue1: unit=SECOND requests_per_unit=10, shadow_mode: false, quota_mode: false
test-domain.key2: unit=MINUTE requests_per_unit=20, shadow_mode: false, quota_mode: false
test-domain.key2_value2: unit=MINUTE requests_per_unit=30, shadow_mode: false, quota_mode: false
test-domain.key3: unit=HOUR requests_per_unit=1, shadow_mode: false, quota_mode: false
test-domain.key4: unit=DAY requests_per_unit=1, shadow_mode: false, quota_mode: false
test-domain.key5_value5: unit=DAY requests_per_unit=15, shadow_mode: false, quota_mode: false
test-domain.key5_value5.subkey5_subvalue5: unit=DAY requests_per_unit=25, shadow_mode: false, quota_mode: false
messaging.message_type_marketing.to_number: unit=DAY requests_per_unit=5, shadow_mode: false, quota_mode: false
messaging.to_number: unit=DAY requests_per_unit=100, shadow_mode: false, quota_mode: false
metadata.key1: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false
wildcard.host_api.*: unit=SECOND requests_per_unit=1, shadow_mode: false, quota_mode: false
wildcard.host_*.example.com: unit=SECOND requests_per_unit=2, shadow_mode: false, quota_mode: false
wildcard.host_www.example.com: unit=SECOND requests_per_unit=3, shadow_mode: false, quota_mode: false
wildcard.path_/api/*/items: unit=SECOND requests_per_unit=4, shadow_mode: false, quota_mode: false
wildcard.host: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false
"""


def test_reference_examples_dump() -> None:
    files = read_config_files(OK)
    assert [f.name for f in files] == [
        "all_keys.yaml",
        "basic_config.yaml",
        "messaging.yaml",
        "metadata.yaml",
        "wildcard.yaml",
    ]
    config = load_config(files)
    assert list(config.domains) == ["all_keys", "test-domain", "messaging", "metadata", "wildcard"]
    assert config.dump() == EXPECTED_DUMP


def test_basic_config_tree() -> None:
    root = load_config(read_config_files(OK)).domains["test-domain"]
    assert list(root.children) == [
        "key1_value1",
        "key2",
        "key2_value2",
        "key2_value3",
        "key3",
        "key4",
        "key5_value5",
    ]
    # Only children: exists for nesting.
    key1 = root.children["key1_value1"]
    assert key1.rule is None
    assert list(key1.children) == ["subkey1", "subkey1_subvalue1"]
    # Neither rate_limit nor children: an explicit "no limit" match.
    whitelisted = root.children["key2_value3"]
    assert (whitelisted.key, whitelisted.value, whitelisted.rule) == ("key2", "value3", None)
    assert not whitelisted.has_children
    # A rule and children at once.
    key5 = root.children["key5_value5"]
    assert key5.rule is not None and key5.rule.requests_per_unit == 15
    assert list(key5.children) == ["subkey5_subvalue5"]


def test_every_allowed_key() -> None:
    root = load_config([ConfigFile("all_keys.yaml", (OK / "all_keys.yaml").read_text())]).domains[
        "all_keys"
    ]
    checkout = root.children["route_checkout"]
    assert checkout.rule == Rule(
        requests_per_unit=100,
        unit=Unit.HOUR,
        stats_key="all_keys.route_checkout",
        name="checkout_hourly",
        replaces=frozenset({"global_hourly"}),
        unlimited=False,
        shadow_mode=True,
        quota_mode=True,
        detailed_metric=True,
        metadata={"owner": "payments"},
    )
    assert (checkout.key, checkout.value, checkout.composite) == (
        "route",
        "checkout",
        "route_checkout",
    )
    assert checkout.value_to_metric is True
    assert checkout.share_threshold is False

    path = checkout.children["path_/api/*"]
    assert path.share_threshold is True
    assert path.value_to_metric is False
    assert path.rule == Rule(
        requests_per_unit=0, unit=Unit.MINUTE, stats_key="all_keys.route_checkout.path_/api/*"
    )
    assert [node for _, node in checkout.wildcards] == [path]

    assert root.children["route"].rule == Rule(
        requests_per_unit=1000, unit=Unit.HOUR, stats_key="all_keys.route", name="global_hourly"
    )
    assert root.children["internal"].rule == Rule(
        requests_per_unit=0, unit=Unit.UNKNOWN, stats_key="all_keys.internal", unlimited=True
    )


def test_rules_in_config_order_depth_first() -> None:
    config = load_config(read_config_files(OK))
    keys = [rule.stats_key for rule in config.rules()]
    assert keys == [line.split(": unit=")[0] for line in EXPECTED_DUMP.splitlines()]


# -- units ---------------------------------------------------------------------------------------

UNITS = [
    ("second", Unit.SECOND, 1),
    ("minute", Unit.MINUTE, 60),
    ("hour", Unit.HOUR, 3600),
    ("day", Unit.DAY, 86400),
    ("week", Unit.WEEK, 604800),
    ("month", Unit.MONTH, 2592000),
    ("year", Unit.YEAR, 31536000),
]


@pytest.mark.parametrize(
    "spelling", [str.lower, str.title, str.upper], ids=["lower", "title", "upper"]
)
@pytest.mark.parametrize(("unit_text", "unit", "seconds"), UNITS, ids=[u[0] for u in UNITS])
def test_unit_case_insensitive_with_window(
    spelling: Callable[[str], str], unit_text: str, unit: Unit, seconds: int
) -> None:
    written = spelling(unit_text)
    rule = one_rule(
        f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: {written}, requests_per_unit: 7}}\n"
    )
    assert rule.unit is unit
    assert rule.unit.seconds == seconds
    assert rule.requests_per_unit == 7


def test_unit_values_are_the_protobuf_enum_numbers() -> None:
    assert {u.name: int(u) for u in Unit} == {
        "UNKNOWN": 0,
        "SECOND": 1,
        "MINUTE": 2,
        "HOUR": 3,
        "DAY": 4,
        "MONTH": 5,
        "YEAR": 6,
        "WEEK": 7,
    }


# -- requests_per_unit -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [("0", 0), ("1", 1), ("4294967295", 4294967295), (None, 0)],
    ids=["zero", "one", "uint32_max", "absent"],
)
def test_requests_per_unit(written: str | None, expected: int) -> None:
    rpu = "" if written is None else f", requests_per_unit: {written}"
    rule = one_rule(f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: second{rpu}}}\n")
    assert rule.requests_per_unit == expected


def test_requests_per_unit_above_uint32_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^t\.yaml: error loading config file: .*uint32"):
        load_config(
            [
                ConfigFile(
                    "t.yaml",
                    "domain: d\ndescriptors:\n  - key: k\n"
                    "    rate_limit: {unit: second, requests_per_unit: 4294967296}\n",
                )
            ]
        )


def test_unlimited_needs_no_unit() -> None:
    rule = one_rule("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true}\n")
    assert rule == Rule(requests_per_unit=0, unit=Unit.UNKNOWN, stats_key="d.k", unlimited=True)


# -- keys and values ---------------------------------------------------------------------------


def test_value_less_key() -> None:
    root = load("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second}\n").domains[
        "d"
    ]
    node = root.children["k"]
    assert (node.key, node.value, node.composite) == ("k", "", "k")
    assert node.rule is not None and node.rule.stats_key == "d.k"
    assert root.wildcards == []


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("0123", "0123"),
        ("123", "123"),
        ("true", "true"),
        ("yes", "yes"),
        ("0x1F", "0x1F"),
        ("'quoted'", "quoted"),
        ("~", ""),
        ("", ""),
    ],
    ids=["leading_zero", "int", "bool", "yaml11_bool", "hex", "quoted", "null", "empty"],
)
def test_scalar_value_keeps_source_text(written: str, value: str) -> None:
    root = load(f"domain: d\ndescriptors:\n  - key: k\n    value: {written}\n").domains["d"]
    [node] = root.children.values()
    assert node.value == value
    assert node.composite == (f"k_{value}" if value else "k")


def test_scalar_key_and_domain_keep_source_text() -> None:
    config = load("domain: 007\ndescriptors:\n  - key: 10\n    rate_limit: {unit: second}\n")
    assert list(config.domains) == ["007"]
    [rule] = config.rules()
    assert rule.stats_key == "007.10"


def test_domain_without_descriptors() -> None:
    config = load("domain: empty\n")
    assert list(config.domains) == ["empty"]
    assert config.domains["empty"].children == {}
    assert config.dump() == ""


def test_no_files_no_domains() -> None:
    config = load_config([])
    assert config.domains == {}
    assert list(config.rules()) == []
    assert config.dump() == ""


def test_wildcard_children_in_config_order() -> None:
    root = load_config(read_config_files(OK)).domains["wildcard"]
    assert [node.composite for _, node in root.wildcards] == [
        "host_api.*",
        "host_*.example.com",
        "path_/api/*/items",
    ]
    # Exact and plain children are found by composite key; wildcard ones are there too.
    assert list(root.children) == [
        "host_api.*",
        "host_*.example.com",
        "host_www.example.com",
        "path_/api/*/items",
        "host",
    ]
    api, example, items = (pattern for pattern, _ in root.wildcards)
    assert api.fullmatch("host_api.v1")
    assert api.fullmatch("host_api.")
    assert not api.fullmatch("host_apiXv1")  # everything but '*' is literal
    assert example.fullmatch("host_www.example.com")
    assert not example.fullmatch("host_www.example.org")
    assert items.fullmatch("path_/api/v1/items")
    assert items.fullmatch("path_/api//items")
    assert not items.fullmatch("path_/api/v1/items/1")


# -- several domains: `---` documents and MERGE_DOMAIN_CONFIG -------------------------------------


def test_several_documents_are_several_domains() -> None:
    text = (
        domain_text("first")
        + "---\n"
        + domain_text("second", key="key2")
        + "---\n---\n# an empty document in between is ignored\n---\n"
        + domain_text("third", rpu=9)
    )
    config = load(text)
    assert list(config.domains) == ["first", "second", "third"]
    assert config.dump() == (
        "first.key1: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false\n"
        "second.key2: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false\n"
        "third.key1: unit=SECOND requests_per_unit=9, shadow_mode: false, quota_mode: false\n"
    )


def test_merge_domains_from_two_files() -> None:
    files = [
        ConfigFile("a.yaml", domain_text("shared", key="key1") + "---\n" + domain_text("other")),
        ConfigFile("b.yaml", domain_text("shared", key="key2", rpu=50)),
    ]
    config = load_config(files, merge_domains=True)
    assert list(config.domains) == ["shared", "other"]
    assert list(config.domains["shared"].children) == ["key1", "key2"]
    assert config.dump() == (
        "shared.key1: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false\n"
        "shared.key2: unit=SECOND requests_per_unit=50, shadow_mode: false, quota_mode: false\n"
        "other.key1: unit=SECOND requests_per_unit=5, shadow_mode: false, quota_mode: false\n"
    )


def test_merge_domains_keeps_duplicate_composite_keys_an_error() -> None:
    files = [
        ConfigFile("a.yaml", domain_text("shared")),
        ConfigFile("b.yaml", domain_text("shared")),
    ]
    with pytest.raises(ConfigError) as info:
        load_config(files, merge_domains=True)
    assert str(info.value).startswith(
        "b.yaml: duplicate descriptor composite key 'shared.key1' (line 3"
    )


def test_without_merge_the_same_domain_twice_is_an_error() -> None:
    files = [
        ConfigFile("a.yaml", domain_text("shared")),
        ConfigFile("b.yaml", domain_text("shared", key="key2")),
    ]
    with pytest.raises(ConfigError) as info:
        load_config(files)
    assert str(info.value).startswith("b.yaml: duplicate domain 'shared' in config file (line 1")


def test_config_is_frozen() -> None:
    config = load(domain_text("d"))
    [rule] = config.rules()
    with pytest.raises(AttributeError):
        rule.requests_per_unit = 6  # type: ignore[misc]
    node: Node = config.domains["d"].children["key1"]
    with pytest.raises(AttributeError):
        node.rule = None  # type: ignore[misc]


# -- runtime: where the files come from ------------------------------------------------------------


def test_read_config_files_recursive_lexical_any_extension(tmp_path: Path) -> None:
    write(tmp_path / "b.yaml", "domain: b\n")
    write(tmp_path / "a.yaml", "domain: a\n")
    write(tmp_path / "a" / "x.yaml", "domain: ax\n")
    write(tmp_path / "a" / "sub" / "y.json", "domain: asuby\n")
    write(tmp_path / "team" / "a.yaml", "domain: team\n")
    write(tmp_path / "c", "domain: c\n")
    write(tmp_path / "notes.txt", "domain: notes\n")

    files = read_config_files(tmp_path)

    assert files == [
        ConfigFile("a/sub/y.json", "domain: asuby\n"),
        ConfigFile("a/x.yaml", "domain: ax\n"),
        ConfigFile("a.yaml", "domain: a\n"),
        ConfigFile("b.yaml", "domain: b\n"),
        ConfigFile("c", "domain: c\n"),
        ConfigFile("notes.txt", "domain: notes\n"),
        ConfigFile("team/a.yaml", "domain: team\n"),
    ]


def dotted_tree(root: Path) -> None:
    write(root / "a.yaml", "domain: a\n")
    write(root / ".hidden.yaml", "domain: hidden\n")
    write(root / ".git" / "config.yaml", "domain: git\n")
    write(root / "team" / ".b.yaml.swp", "domain: swp\n")
    write(root / "team" / "b.yaml", "domain: b\n")


def test_dotfiles_read_by_default(tmp_path: Path) -> None:
    dotted_tree(tmp_path)
    names = [f.name for f in read_config_files(tmp_path)]
    assert names == [
        ".git/config.yaml",
        ".hidden.yaml",
        "a.yaml",
        "team/.b.yaml.swp",
        "team/b.yaml",
    ]


def test_dotfiles_and_dotdirs_skipped_with_ignore_dotfiles(tmp_path: Path) -> None:
    dotted_tree(tmp_path)
    names = [f.name for f in read_config_files(tmp_path, location=RuntimeLocation("", "", "", ignore_dotfiles=True))]
    assert names == ["a.yaml", "team/b.yaml"]


def test_only_regular_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "domain: a\n")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(tmp_path / "fifo.yaml")
    assert [f.name for f in read_config_files(tmp_path)] == ["a.yaml"]


def configmap(config_dir: Path, files: dict[str, str]) -> None:
    """The layout kubelet writes for a mounted ConfigMap."""
    timestamped = config_dir / "..2024_01_01_00_00_00.123"
    for name, text in files.items():
        write(timestamped / name, text)
    (config_dir / "..data").symlink_to(timestamped.name, target_is_directory=True)
    for name in files:
        (config_dir / name).symlink_to(Path("..data") / name)


def test_kubernetes_configmap_layout_with_ignore_dotfiles(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    configmap(
        config_dir,
        {"basic.yaml": domain_text("basic"), "messaging.yaml": domain_text("messaging")},
    )

    files = read_config_files(config_dir, location=RuntimeLocation("", "", "", ignore_dotfiles=True))
    assert [f.name for f in files] == ["basic.yaml", "messaging.yaml"]

    location = RuntimeLocation(str(tmp_path.parent), tmp_path.name, "config", ignore_dotfiles=True)
    config = load_from_files(location)
    assert config is not None
    assert list(config.domains) == ["basic", "messaging"]
    assert [r.stats_key for r in config.rules()] == ["basic.key1", "messaging.key1"]


def test_kubernetes_configmap_layout_without_ignore_dotfiles(tmp_path: Path) -> None:
    # Without RUNTIME_IGNOREDOTFILES the timestamped copy is read too: each domain twice.
    configmap(tmp_path, {"basic.yaml": domain_text("basic")})
    files = read_config_files(tmp_path)
    assert [f.name for f in files] == ["..2024_01_01_00_00_00.123/basic.yaml", "basic.yaml"]
    with pytest.raises(ConfigError) as info:
        load_config(files)
    assert str(info.value).startswith("basic.yaml: duplicate domain 'basic' in config file")


def test_symlinked_runtime_root(tmp_path: Path) -> None:
    write(tmp_path / "v1" / "ratelimit" / "config" / "basic.yaml", domain_text("basic", rpu=1))
    write(tmp_path / "v2" / "ratelimit" / "config" / "basic.yaml", domain_text("basic", rpu=2))
    current = tmp_path / "current"
    current.symlink_to("v1", target_is_directory=True)
    location = RuntimeLocation(str(current), "ratelimit", "config")

    config = load_from_files(location)
    assert config is not None
    assert [r.requests_per_unit for r in config.rules()] == [1]

    # The atomic swap: ln -s v2 tmp && mv -T tmp current.
    (tmp_path / "tmp").symlink_to("v2", target_is_directory=True)
    os.replace(tmp_path / "tmp", current)
    config = load_from_files(location)
    assert config is not None
    assert [r.requests_per_unit for r in config.rules()] == [2]


def test_config_dir_is_root_subdirectory_appdirectory(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "app" / "team" / "a.yaml", domain_text("a"))
    write(tmp_path / "sub" / "other" / "b.yaml", domain_text("b"))
    location = RuntimeLocation(str(tmp_path), "sub", "app")
    assert location.config_dir == tmp_path / "sub" / "app"
    config = load_from_files(location)
    assert config is not None
    assert list(config.domains) == ["a"]


def test_empty_subdirectory_means_no_file_config(tmp_path: Path) -> None:
    write(tmp_path / "config" / "a.yaml", domain_text("a"))
    location = RuntimeLocation(str(tmp_path), "", "config")
    assert location.config_dir is None
    assert load_from_files(location) is None


def test_missing_directory_is_an_empty_config(tmp_path: Path) -> None:
    location = RuntimeLocation(str(tmp_path), "nothing", "config")
    config = load_from_files(location)
    assert config is not None
    assert config.domains == {}
    assert read_config_files(tmp_path / "nothing" / "config") == []


def test_file_not_utf8_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "config" / "a.yaml", domain_text("a"))
    bad = tmp_path / "sub" / "config" / "team" / "bad.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"domain: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_from_files(RuntimeLocation(str(tmp_path), "sub", "config"))
    message = str(info.value)
    assert message.startswith("team/bad.yaml: error loading config file: "), message
    assert "utf-8" in message


def test_validation_errors_name_the_relative_path(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "config" / "a.yaml", domain_text("a"))
    write(tmp_path / "sub" / "config" / "team" / "b.yaml", "domain: b\nfoo: 1\n")
    with pytest.raises(ConfigError) as info:
        load_from_files(RuntimeLocation(str(tmp_path), "sub", "config"))
    assert str(info.value).startswith("team/b.yaml: config error, unknown key 'foo' (line 2")


@pytest.mark.parametrize("merge", [False, True], ids=["no_merge", "merge"])
def test_load_from_files_passes_merge_domains(tmp_path: Path, merge: bool) -> None:
    write(tmp_path / "s" / "c" / "a.yaml", domain_text("shared", key="key1"))
    write(tmp_path / "s" / "c" / "b.yaml", domain_text("shared", key="key2"))
    location = RuntimeLocation(str(tmp_path), "s", "c")
    if not merge:
        with pytest.raises(ConfigError, match=r"^b\.yaml: duplicate domain 'shared'"):
            load_from_files(location)
        return
    config = load_from_files(location, merge_domains=True)
    assert config is not None
    assert [r.stats_key for r in config.rules()] == ["shared.key1", "shared.key2"]
