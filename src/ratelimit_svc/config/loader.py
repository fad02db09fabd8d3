"""Rate-limit configuration: the YAML schema and its validation, producing the rule tree.

A load takes every config document at once and either returns a complete ``RateLimitConfig`` or
raises ``ConfigError`` with the reference's message text, prefixed by the config name and followed
by where in the file the problem is. YAML is walked as a node tree (not plain Python objects) so
that scalars keep their source text (``value: 0123`` stays ``"0123"`` as in Go) and every error can
name its line; scalars are typed by go-yaml v2's rules and merge keys expanded (``goyaml``,
docs/compatibility.md). The result is frozen: a reload builds a new one and swaps a single
reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
from yaml import MappingNode, ScalarNode, SequenceNode

from ratelimit_svc.config import goyaml
from ratelimit_svc.config.build import Builder, ParsedDescriptor, ParsedLimit
from ratelimit_svc.config.rules import Node, RateLimitConfig
from ratelimit_svc.errors import ConfigError

VALID_KEYS = frozenset(
    "domain key value descriptors rate_limit unit requests_per_unit unlimited shadow_mode "
    "quota_mode name replaces detailed_metric value_to_metric share_threshold metadata".split()
    # docs/algorithms.md
    + "algorithm burst unit_multiplier charge_only_when_admitted".split()
)

_STR = goyaml.STR
_INT = goyaml.INT
_BOOL = goyaml.BOOL
_NULL = goyaml.NULL
# What the reference's key check lets through as a leaf: Go's string, int (int64 range), bool and
# nil; a timestamp is a string to it. A float or an integer above int64 is "error checking config".
_LEAF_TAGS = frozenset({_STR, _INT, _BOOL, _NULL, goyaml.TIMESTAMP, goyaml.BINARY})
_INT64_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1
# Refused before any recursive walk: deeper nesting (or a recursive alias) would exhaust the stack,
# and an alias bomb ("billion laughs") the CPU. go-yaml, which the reference uses, also refuses
# excessive aliasing. Real configs are a few levels deep and alias little.
MAX_DEPTH = 100
_ALIAS_VISITS_ALLOWED = 100_000  # plus 10 per distinct node
# A descriptor's flags, in the order they are checked.
_FLAGS = (
    "charge_only_when_admitted", "shadow_mode", "quota_mode", "detailed_metric",
    "value_to_metric", "share_threshold",
)  # fmt: skip
_FLAG_SET = frozenset(_FLAGS)
_NO_FLAGS = (False,) * len(_FLAGS)
# A limit's fields besides its unit and number (and replaces, read before them).
_RARE_LIMIT_KEYS = frozenset({"unlimited", "name", "algorithm", "burst", "unit_multiplier"})


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """Raw config text and the name it is reported under (path relative to the config dir)."""

    name: str
    text: str


def load_config(
    files: Sequence[ConfigFile], *, merge_domains: bool = False, fixed_windows_only: str = ""
) -> RateLimitConfig:
    """Validate and build the whole configuration; the first error rejects the load.

    ``fixed_windows_only`` names a backend that counts only plain fixed windows (memcache): rules
    needing more are refused at load (docs/algorithms.md)."""
    domains: dict[str, Node] = {}
    for config_file in files:
        for document in _documents(config_file):
            loader = _Loader(config_file.name, document, domains, merge_domains)
            loader.fixed_windows_only = fixed_windows_only
            try:
                loader.load()
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
                # A safety net: a defect no check above names must still be a ConfigError, so
                # that a reload keeps the old config instead of failing with a traceback.
                raise ConfigError(
                    f"{config_file.name}: error loading config file: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
    return RateLimitConfig(domains=domains)


def _documents(config_file: ConfigFile) -> list[yaml.Node | None]:
    try:
        documents: list[yaml.Node | None] = list(
            yaml.compose_all(config_file.text, Loader=goyaml.Loader)
        )
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{config_file.name}: error loading config file: {_parser_message(exc)}"
        ) from None
    except RecursionError:  # PyYAML's composer recurses once per level
        raise ConfigError(
            f"{config_file.name}: error loading config file: nested more than {MAX_DEPTH} deep"
        ) from None
    except (ValueError, OverflowError) as exc:  # the scanner's chr() on "\U00110000"
        raise ConfigError(
            f"{config_file.name}: error loading config file: invalid escape in a string: {exc}"
        ) from None
    for document in documents:
        if not _check_shape(config_file.name, document, anchors="&" in config_file.text):
            continue
        try:
            goyaml.expand_merges(document)
        except goyaml.MergeError as exc:
            raise ConfigError(
                f"{config_file.name}: error loading config file: {exc}{_where(exc.node, '')}"
            ) from None
    present = [d for d in documents if not _is_null(d)]
    # An empty file is one empty document (and so fails "cannot have empty domain"), as in Go.
    return present or [None]


def _check_shape(name: str, document: yaml.Node | None, *, anchors: bool = True) -> bool:
    """Refuse nesting deeper than MAX_DEPTH (a recursive alias is infinitely deep) and excessive
    aliasing, walking with an explicit stack so that the check itself cannot overflow; whether
    any mapping has a merge key (``<<``). Only collections are stacked (a scalar nests nothing),
    and only a collection seen again counts as an alias visit (aliasing a scalar costs no more
    than writing it out): this walk sees every node of the document, so it is kept lean (one
    loop over each collection's items, no lists built). With no ``anchors`` in the text there
    is no alias either, so no node can be seen twice."""
    stack: list[tuple[yaml.Node, int]] = [(document, 1)] if document is not None else []
    push, pop = stack.append, stack.pop
    mapping_node, sequence_node, scalar_node = MappingNode, SequenceNode, ScalarNode
    merge = goyaml.MERGE
    seen: set[int] = set()
    alias_visits = 0
    merges = False
    while stack:
        node, depth = pop()
        if anchors and id(node) in seen:
            alias_visits += 1
            if alias_visits > _ALIAS_VISITS_ALLOWED + 10 * len(seen):
                raise ConfigError(
                    f"{name}: error loading config file: document contains excessive aliasing"
                )
        elif anchors:
            seen.add(id(node))
        items = node.value
        if not items or isinstance(node, scalar_node):
            continue
        below = depth + 1
        if isinstance(node, mapping_node):
            if depth >= MAX_DEPTH:
                _too_deep(name, items[-1][1])
            for key, value in items:
                if key.tag == merge:
                    merges = True
                if not isinstance(key, scalar_node):
                    push((key, below))
                if not isinstance(value, scalar_node):
                    push((value, below))
        elif isinstance(node, sequence_node):
            if depth >= MAX_DEPTH:
                _too_deep(name, items[-1])
            for item in items:
                if not isinstance(item, scalar_node):
                    push((item, below))
    return merges


def _too_deep(name: str, node: yaml.Node) -> NoReturn:
    raise ConfigError(
        f"{name}: error loading config file: nested more than {MAX_DEPTH} deep "
        f"(or a recursive alias){_where(node, '')}"
    )


def _json_like(value: Any, path: str) -> Any:
    """Metadata as dynamic metadata (a protobuf Struct) can hold it: keys become text and dates
    their ISO text; anything else a Struct cannot hold raises ValueError naming where it is."""
    if isinstance(value, dict):
        return {str(k): _json_like(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_json_like(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float) and math.isfinite(value) and abs(value) < 2**1000:
        return value
    kind = "number" if isinstance(value, int | float) else type(value).__name__
    raise ValueError(f"{path}: a {kind} value ({value!r:.40}) cannot be dynamic metadata")


def _is_token_bucket(mapping: MappingNode) -> bool:
    return any(
        isinstance(k, ScalarNode) and k.value == "algorithm"
        and isinstance(v, ScalarNode) and v.value == "token_bucket"
        for k, v in mapping.value
    )


def _fits_go_int(node: yaml.Node) -> bool:
    """An integer go-yaml decodes as Go's ``int`` (not ``uint64``), as the key check demands."""
    number = goyaml.go_int(node.value) if isinstance(node, ScalarNode) else None
    return number is not None and number <= _INT64_MAX


def _is_null(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag == _NULL)


def _parser_message(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, without PyYAML's source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})"
    return _one_line(str(exc))


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _at(path: str, name: str) -> str:
    """``path.name`` (joined only for an error message: most fields are fine)."""
    return f"{path}.{name}" if name else path


def _where(node: yaml.Node | None, path: str) -> str:
    if node is None:  # an empty file: nothing to point at but its first line
        return f" (line 1, {path})" if path else " (line 1)"
    line = node.start_mark.line + 1
    return f" (line {line}, {path})" if path else f" (line {line})"


def _go_format(node: yaml.Node) -> str:
    """Render a YAML node roughly as Go's %v renders the decoded value."""
    if isinstance(node, ScalarNode):
        return str(node.value)
    if isinstance(node, SequenceNode):
        return "[" + " ".join(_go_format(item) for item in node.value) + "]"
    pairs = " ".join(f"{_go_format(k)}:{_go_format(v)}" for k, v in node.value)
    return f"map[{pairs}]"


class _Loader:
    """Validates and loads one YAML document (one domain) into ``domains``."""

    def __init__(
        self, name: str, document: yaml.Node | None, domains: dict[str, Node], merge: bool
    ) -> None:
        self.name = name
        self.document = document
        self.domains = domains
        self.merge = merge
        self.fixed_windows_only = ""

    def error(self, message: str, node: yaml.Node | None = None, path: str = "") -> ConfigError:
        return ConfigError(f"{self.name}: {message}{_where(node, path)}")

    # -- step 2: key check over the whole tree --------------------------------------------------

    def check_keys(self, node: MappingNode, path: str) -> None:
        # Sees every pair of the document: the plain string value (most of them) costs one
        # compare, and a pair's path is only made for a collection below it or an error.
        for key_node, value_node in node.value:
            if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR):
                raise self.error(
                    f"config error, key is not of type string: {_go_format(key_node)}",
                    key_node,
                    path,
                )
            key = key_node.value
            if key not in VALID_KEYS:
                raise self.error(f"config error, unknown key '{key}'", key_node, path)
            if key == "burst" and not _is_token_bucket(node):
                # Known only next to `algorithm: token_bucket`; elsewhere the reference's error.
                raise self.error(
                    "config error, unknown key 'burst' (it goes with algorithm token_bucket: "
                    "docs/algorithms.md)",
                    key_node,
                    path,
                )
            if key == "metadata":
                continue  # free-form; returned as-is in dynamic metadata
            tag = value_node.tag
            if tag == _STR and isinstance(value_node, ScalarNode):
                continue
            child_path = f"{path}.{key}" if path else key
            if isinstance(value_node, SequenceNode):
                for index, element in enumerate(value_node.value):
                    if not isinstance(element, MappingNode):
                        raise self.error(
                            "config error, yaml file contains list of type other than map: "
                            f"{_go_format(element)}",
                            element,
                            f"{child_path}[{index}]",
                        )
                    self.check_keys(element, f"{child_path}[{index}]")
            elif isinstance(value_node, MappingNode):
                self.check_keys(value_node, child_path)
            elif tag == _INT and goyaml.go_int(value_node.value) is None:
                raise self.error(  # an explicit `!!int 0x`
                    f"error loading config file: cannot decode !!str `{value_node.value}` as a "
                    "!!int",
                    value_node,
                    child_path,
                )
            elif tag not in _LEAF_TAGS or (tag == _INT and not _fits_go_int(value_node)):
                raise self.error("error checking config", value_node, child_path)

    # -- step 3: types ---------------------------------------------------------------------------

    def type_error(self, node: yaml.Node, path: str, expected: str) -> ConfigError:
        kind = node.tag.rsplit(":", 1)[-1] if isinstance(node, ScalarNode) else (
            "seq" if isinstance(node, SequenceNode) else "map"
        )
        shown = f" `{node.value}`" if isinstance(node, ScalarNode) else ""
        line = node.start_mark.line + 1
        return ConfigError(
            f"{self.name}: error loading config file: line {line}: cannot unmarshal "
            f"!!{kind}{shown} into {expected} ({path})"
        )

    def text(self, node: yaml.Node | None, path: str, name: str = "") -> str:
        if node is not None and node.tag == _STR and isinstance(node, ScalarNode):
            return str(node.value)  # the usual case, first
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return ""
        if not isinstance(node, ScalarNode):
            raise self.type_error(node, _at(path, name), "string")
        try:
            return goyaml.go_text(node)
        except ValueError as exc:
            raise self.error(f"error loading config file: {exc}", node, _at(path, name)) from None

    def boolean(self, node: yaml.Node | None, path: str, name: str = "") -> bool:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return False
        value = goyaml.go_bool(node.value) if isinstance(node, ScalarNode) else None
        if node.tag != _BOOL or value is None:  # `!!bool maybe` too
            raise self.type_error(node, _at(path, name), "bool")
        return value

    def uint32(self, node: yaml.Node | None, path: str, name: str = "") -> int:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return 0
        if isinstance(node, ScalarNode) and node.tag == _INT:
            number = goyaml.go_int(node.value)  # None: `!!int 0x`
            if number is not None and 0 <= number <= _UINT32_MAX:
                return number
        raise self.type_error(node, _at(path, name), "uint32")

    def mapping(self, node: yaml.Node | None, path: str, name: str = "") -> dict[str, yaml.Node]:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return {}
        if not isinstance(node, MappingNode):
            raise self.type_error(node, _at(path, name), "map")
        return {k.value: v for k, v in node.value}

    def sequence(self, node: yaml.Node | None, path: str, name: str = "") -> list[yaml.Node]:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return []
        if not isinstance(node, SequenceNode):
            raise self.type_error(node, _at(path, name), "list")
        return list(node.value)

    def free_form(self, node: yaml.Node | None, path: str, name: str = "") -> dict[str, Any] | None:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return None
        if not isinstance(node, MappingNode):
            raise self.type_error(node, _at(path, name), "map")
        try:
            value = goyaml.go_value(node)
        except ValueError as exc:  # `!!float x`
            raise self.error(
                f"error loading config file: cannot construct a value: {exc}",
                node,
                _at(path, name),
            ) from None
        try:
            plain: dict[str, Any] = _json_like(value, _at(path, name))
        except ValueError as exc:
            raise self.error(f"error loading config file: {exc}", node, _at(path, name)) from None
        return plain

    # -- steps 4-6 -------------------------------------------------------------------------------

    def load(self) -> None:
        document = self.document
        if document is not None and not isinstance(document, MappingNode):
            raise self.type_error(document, "document root", "map")
        if document is not None:
            self.check_keys(document, "")
        fields = self.mapping(document, "")
        domain = self.text(fields.get("domain"), "domain")
        descriptors = self.sequence(fields.get("descriptors"), "descriptors")
        # Type-check the whole document before semantic checks, as the reference decodes it first.
        parsed = [self.parse_descriptor(d, f"descriptors[{i}]") for i, d in enumerate(descriptors)]
        builder = Builder(
            self.name, self.domains, self.merge, _where, fixed_windows_only=self.fixed_windows_only
        )
        builder.add_domain(
            domain, parsed, document=document, domain_node=fields.get("domain")
        )

    def parse_descriptor(self, node: yaml.Node, path: str) -> ParsedDescriptor:
        # Runs once per descriptor of a file: a field that is absent costs no call (each would
        # only return its default), and the checks still run in the order the fields are listed.
        fields = self.mapping(node, path)
        get = fields.get
        limits: list[ParsedLimit] = []
        rl_node = get("rate_limit")
        if rl_node is not None and not _is_null(rl_node):
            rl_path = f"{path}.rate_limit"
            if isinstance(rl_node, SequenceNode):  # a list of limits (docs/algorithms.md)
                limits = [
                    self.parse_limit(item, f"{rl_path}[{i}]", in_list=True)
                    for i, item in enumerate(rl_node.value)
                ]
                if not limits:
                    raise self.error("a rate_limit list must not be empty", rl_node, rl_path)
            else:
                limits = [self.parse_limit(rl_node, rl_path)]
                limits[0].path = ""  # a single limit: the reference's place
        children = (
            [
                self.parse_descriptor(child, f"{path}.descriptors[{i}]")
                for i, child in enumerate(self.sequence(get("descriptors"), path, "descriptors"))
            ]
            if "descriptors" in fields
            else []
        )
        key = self.text(get("key"), path, "key")
        value = self.text(get("value"), path, "value")
        flags = (
            tuple([self.boolean(get(name), path, name) for name in _FLAGS])
            if not _FLAG_SET.isdisjoint(fields)
            else _NO_FLAGS
        )
        metadata = (
            self.free_form(get("metadata"), path, "metadata") if "metadata" in fields else None
        )
        # By position (config/build.py); the flags are in the fields' order.
        return ParsedDescriptor(
            node, path, key, value, limits[0] if limits else None, limits[1:],
            flags[0], flags[1], flags[2], flags[3], flags[4], flags[5], metadata, children,
        )  # fmt: skip

    def parse_limit(self, node: yaml.Node, rl_path: str, *, in_list: bool = False) -> ParsedLimit:
        rl = self.mapping(node, rl_path)
        get = rl.get
        replaces = []
        if "replaces" in rl:
            for i, item in enumerate(self.sequence(get("replaces"), rl_path, "replaces")):
                entry = self.mapping(item, f"{rl_path}.replaces[{i}]")
                replaces.append(self.text(entry.get("name"), f"{rl_path}.replaces[{i}].name"))
        unit = self.text(get("unit"), rl_path, "unit")
        requests_per_unit = self.uint32(get("requests_per_unit"), rl_path, "requests_per_unit")
        if _RARE_LIMIT_KEYS.isdisjoint(rl):  # the usual limit: a unit and a number
            return ParsedLimit(node, rl_path, unit, requests_per_unit, False, "", replaces, in_list)
        return ParsedLimit(
            node=node,
            path=rl_path,
            unit=unit,
            requests_per_unit=requests_per_unit,
            unlimited=self.boolean(get("unlimited"), rl_path, "unlimited"),
            name=self.text(get("name"), rl_path, "name"),
            replaces=replaces,
            algorithm=self.text(get("algorithm"), rl_path, "algorithm"),
            algorithm_node=get("algorithm"),
            burst=self.uint32(get("burst"), rl_path, "burst") if "burst" in rl else None,
            burst_node=get("burst"),
            unit_multiplier=(
                self.uint32(get("unit_multiplier"), rl_path, "unit_multiplier")
                if "unit_multiplier" in rl
                else None
            ),
            multiplier_node=get("unit_multiplier"),
            in_list=in_list,
        )
