"""YAML scalars read as the reference reads them (go-yaml v2), not with PyYAML's YAML 1.1 rules.

Owns the scalar resolution of rule files (docs/compatibility.md, "YAML scalars"): which plain
scalars are booleans (``y``, ``yes``, ``on``, ... as well as ``true``), null, integers (Go's base
prefixes ``0x``/``0o``/``0b``, a leading ``0`` for octal, ``_`` ignored, no base 60), floats
(``1e3``, ``.5``; out-of-range ones stay strings) and timestamps (which a Go string field or a
free-form value still sees as their text); the expansion of merge keys (``<<``); the value of a
node as Go would decode it into ``interface{}``; and a dumper that quotes every string these rules
would read as something else. The composer is PyYAML's C one where libyaml is present (its parser
messages are libyaml's, as go-yaml's are), so nodes keep their line marks for error messages.
"""

from __future__ import annotations

import base64
import datetime
import functools
import math
import operator
import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

__all__ = [
    "BINARY",
    "BOOL",
    "FLOAT",
    "INT",
    "MERGE",
    "NULL",
    "STR",
    "TIMESTAMP",
    "Dumper",
    "Loader",
    "MergeError",
    "expand_merges",
    "go_bool",
    "go_int",
    "go_text",
    "go_value",
    "resolve_plain",
]

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
FLOAT = "tag:yaml.org,2002:float"
TIMESTAMP = "tag:yaml.org,2002:timestamp"
MERGE = "tag:yaml.org,2002:merge"
BINARY = "tag:yaml.org,2002:binary"

_Base = TypeVar("_Base")
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1

_WORDS: dict[str, tuple[str, Any]] = {}
for _tag, _value, _words in (
    (BOOL, True, "y Y yes Yes YES true True TRUE on On ON"),
    (BOOL, False, "n N no No NO false False FALSE off Off OFF"),
    (NULL, None, "~ null Null NULL"),
    (FLOAT, math.nan, ".nan .NaN .NAN"),
    (FLOAT, math.inf, ".inf .Inf .INF +.inf +.Inf +.INF"),
    (FLOAT, -math.inf, "-.inf -.Inf -.INF"),
    (MERGE, "<<", "<<"),
):
    for _word in _words.split():
        _WORDS[_word] = (_tag, _value)
_WORDS[""] = (NULL, None)

# Go's ParseInt/ParseUint with base 0 (after go-yaml drops every "_"): a base prefix, or a
# leading 0 for octal; the sign only for ParseInt.
_GO_INT = re.compile(
    r"([-+]?)(?:0[xX]([0-9a-fA-F]+)|0[oO]([0-7]+)|0[bB]([01]+)|(0[0-7]*)|([1-9][0-9]*))"
)
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")  # Go's ParseFloat, for a leading "."
# The timestamp forms go-yaml tries: a date, optionally with a time ("T", "t" or a space) and,
# after a "T"/"t", an optional zone ("Z" or +hh:mm); fractional seconds optional.
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:(?:([Tt])|( ))(\d{1,2}):(\d{1,2}):(\d{1,2})(?:[.,]\d{1,9})?(Z|[-+]\d{2}:\d{2})?)?"
)


@functools.lru_cache(maxsize=4096)
def go_int(text: str) -> int | None:
    """The integer go-yaml reads from a plain scalar (int64 or uint64 range), or None. Cached:
    the key check and the loader each ask about every number of a file, and rule files repeat
    the same few (a miss costs a regular expression, a hit no Python call)."""
    found = _GO_INT.fullmatch(text.replace("_", ""))
    if found is None:
        return None
    sign, hexa, octal, binary, zero_octal, decimal = found.groups()
    if hexa is not None:
        number = int(hexa, 16)
    elif octal is not None:
        number = int(octal, 8)
    elif binary is not None:
        number = int(binary, 2)
    elif zero_octal is not None:
        number = int(zero_octal, 8)
    else:
        number = int(decimal)
    if sign == "-":
        number = -number
    if _INT64[0] <= number <= _INT64[1] or (sign == "" and 0 <= number <= _UINT64_MAX):
        return number
    return None


def go_bool(text: str) -> bool | None:
    """The boolean a scalar is to go-yaml (``y``, ``on``, ``False``, ...), or None."""
    tag, value = _WORDS.get(text, (STR, None))
    return bool(value) if tag == BOOL else None


def _is_timestamp(text: str) -> bool:
    found = _TIMESTAMP.fullmatch(text)
    if found is None:
        return False
    year, month, day, letter_t, space, hour, minute, second, zone = found.groups()
    if (letter_t is not None and zone is None) or (space is not None and zone is not None):
        return False  # go-yaml's "T" form needs a zone, its space-separated form has none
    try:
        datetime.date(int(year), int(month), int(day))
    except ValueError:
        return False
    if hour is None:
        return True
    if not (int(hour) < 24 and int(minute) < 60 and int(second) < 60):
        return False
    if zone is not None and zone != "Z":
        return int(zone[1:3]) <= 24 and int(zone[4:6]) <= 60
    return True


def _go_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))  # Go refuses a value out of float64's range
    except ValueError:
        return False


def resolve_plain(text: str) -> str:
    """The tag go-yaml v2 gives a plain (unquoted, untagged) scalar."""
    word = _WORDS.get(text)
    if word is not None:
        return word[0]
    first = text[0]
    if first == ".":
        return FLOAT if _DOT_FLOAT.fullmatch(text) and _go_float(text) else STR
    if (first.isdigit() and first.isascii()) or first in "+-":
        if _is_timestamp(text):
            return TIMESTAMP
        if go_int(text) is not None:
            return INT
        plain = text.replace("_", "")
        if _YAML_FLOAT.fullmatch(plain) and _go_float(plain):
            return FLOAT
    return STR


# The first characters of the plain scalars ``resolve_plain`` can read as other than a string
# (its words, numbers, ``.5``): any other plain scalar is a string without asking it.
_NOT_ONLY_TEXT = frozenset(word[0] for word in _WORDS if word) | frozenset("0123456789+-.")
_resolve_plain = functools.lru_cache(maxsize=4096)(resolve_plain)  # files repeat their numbers


def _resolve(kind: type[yaml.Node], value: Any, implicit: Any) -> str:
    """Scalar resolution by go-yaml v2's rules; collections keep PyYAML's default tags.
    ``implicit`` is (plain, quoted) for a scalar and one bool for a collection."""
    # The composer asks once per node: most are keys and names, strings by their first letter.
    if kind is yaml.ScalarNode:
        if implicit[0] and (not value or value[0] in _NOT_ONLY_TEXT):
            return _resolve_plain(value)
        return STR
    return "tag:yaml.org,2002:seq" if kind is yaml.SequenceNode else "tag:yaml.org,2002:map"


def _go_scalars(name: str, base: type[_Base], doc: str) -> type[_Base]:
    """A subclass of ``base`` whose ``resolve`` is ``_resolve``, the module function itself (no
    method lookup per node). Made with ``type``, not a class statement: where this module is
    compiled (mypyc) a class statement would make a native class, which cannot extend PyYAML's
    C parser.

    The composer also calls ``descend_resolver(parent, index)`` and ``ascend_resolver()`` around
    every node, to track the path for PyYAML's path resolvers (``add_path_resolver``), which
    ``_resolve`` does not use and these classes never have. Two C callables that take those
    arguments and change nothing stand in for PyYAML's Python methods: 0.02 s less per 10,000
    descriptors (docs/reliability.md, "Where the time goes")."""
    made: type[_Base] = type(
        name,
        (base,),
        {
            "resolve": staticmethod(_resolve),
            "descend_resolver": staticmethod(operator.is_),
            "ascend_resolver": staticmethod(tuple),
            "__doc__": doc,
            "__module__": __name__,
        },
    )
    return made


_C_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Loader = _go_scalars(
    "Loader",
    _C_LOADER,
    """Composes YAML with go-yaml v2's scalar tags (libyaml's parser when present).

    The composer asks once per node, and most scalars (keys, names: strings by their first
    letter) are answered in a few operations. Caching whole answers did not pay: a big file's
    names are all distinct.""",
)
Dumper = _go_scalars(
    "Dumper",
    yaml.SafeDumper,
    """Dumps so that ``Loader`` reads every string back as a string: a string that go-yaml
    would read as a boolean, number or null (``y``, ``0o17``, ``1e3``) is quoted.""",
)


class MergeError(ValueError):
    """A ``<<`` whose value is not a mapping or a list of mappings; ``node`` is that value."""

    def __init__(self, node: yaml.Node) -> None:
        super().__init__("map merge requires map or sequence of maps as the value")
        self.node = node


def expand_merges(document: yaml.Node | None) -> None:
    """Replace every ``<<: mapping`` (or list of mappings) pair by the merged pairs, in place.

    go-yaml decodes pairs in order, so keys after a ``<<`` override merged ones and merged ones
    override keys before it; in a list of mappings the earlier mappings win. A caller that turns
    pairs into a dict (the last pair wins) therefore gets go-yaml's result. The document must be
    free of recursive aliases (the loader's shape check refuses them first).
    """
    done: set[int] = set()

    def pairs_of(mapping: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        expand(mapping)
        return list(mapping.value)

    def expand(node: yaml.Node) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            if id(current) in done:
                continue
            done.add(id(current))
            if isinstance(current, yaml.SequenceNode):
                stack.extend(current.value)
            elif isinstance(current, yaml.MappingNode):
                if any(key.tag == MERGE for key, _ in current.value):
                    current.value = _merged(current.value, pairs_of)
                for key, value in current.value:
                    stack.extend((key, value))

    if document is not None:
        expand(document)


def _merged(
    pairs: list[tuple[yaml.Node, yaml.Node]],
    pairs_of: Callable[[yaml.MappingNode], list[tuple[yaml.Node, yaml.Node]]],
) -> list[tuple[yaml.Node, yaml.Node]]:
    result: list[tuple[yaml.Node, yaml.Node]] = []
    for key, value in pairs:
        if key.tag != MERGE:
            result.append((key, value))
        elif isinstance(value, yaml.MappingNode):
            result.extend(pairs_of(value))
        elif isinstance(value, yaml.SequenceNode):
            for item in reversed(value.value):
                if not isinstance(item, yaml.MappingNode):
                    raise MergeError(item)
                result.extend(pairs_of(item))
        else:
            raise MergeError(value)
    return result


def go_text(node: yaml.ScalarNode) -> str:
    """A scalar as a Go string field holds it: its source text, or the decoded ``!!binary``."""
    if node.tag != BINARY:
        return str(node.value)
    try:
        return base64.b64decode("".join(str(node.value).split()), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("!!binary value contains invalid base64 data (or is not UTF-8)") from None


def _key_text(key: yaml.Node) -> str:
    return go_text(key) if isinstance(key, yaml.ScalarNode) else str(go_value(key))


def go_value(node: yaml.Node) -> Any:
    """The value go-yaml v2 decodes a node into ``interface{}`` as (merges already expanded):
    timestamps stay text, integers follow Go's forms, keys become text (as they do in a Struct).
    Raises ValueError for a scalar with an explicit tag it cannot read."""
    if isinstance(node, yaml.MappingNode):
        return {_key_text(key): go_value(value) for key, value in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [go_value(item) for item in node.value]
    assert isinstance(node, yaml.ScalarNode)
    text = str(node.value)
    tag = node.tag
    if tag in (STR, TIMESTAMP, MERGE, BINARY):
        return go_text(node)
    word = _WORDS.get(text)
    if tag in (BOOL, NULL) and word is not None and word[0] == tag:
        return word[1]
    if tag == INT:
        number = go_int(text)
        if number is not None:
            return number
    if tag == FLOAT:
        if word is not None and word[0] == FLOAT:
            return word[1]
        plain = text.replace("_", "")
        if _go_float(plain):
            return float(plain)
    raise ValueError(f"cannot decode `{text:.40}` as {tag.rsplit(':', 1)[-1]}")
