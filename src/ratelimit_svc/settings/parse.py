"""Reading environment values as the reference's envconfig does: booleans like Go's
``strconv.ParseBool``, integers like ``ParseInt``, floats like ``ParseFloat``, durations like
``time.ParseDuration`` (as float seconds), lists as ``a,b,c`` and maps as ``k1:v1,k2:v2``. A parser
raises ``ValueError("expected ...")`` and never repeats its input (the caller shows it, masked for
credentials). The ``Annotated`` vocabulary at the end is what settings/model.py declares with."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, TypeVar

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
    """CONFIG_GRPC_XDS_NODE_METADATA, read as the reference reads it (docs/compatibility.md):
    entries split on ``,``, each on its first ``=``, nothing trimmed; an entry without ``=`` is
    skipped. So ``a:b=c`` is ``{"a:b": "c"}`` and ``novalue,k=v`` is ``{"k": "v"}``."""
    pairs: dict[str, str] = {}
    for pair in raw.split(","):
        key, equals, value = pair.partition("=")
        if equals:
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


def empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


# -- the vocabulary of the settings tables -------------------------------------------------------


class _Secret:
    """Marks a credential: the whole value (or, for a map, every value) is never shown."""


SECRET = _Secret()


@dataclass(frozen=True, slots=True)
class Doc:
    """What a setting means, for the generated settings table (docs/configuration.md)."""

    text: str


@dataclass(frozen=True, slots=True)
class Var:
    """The variable's name, where it is not the group's prefix + the field's name."""

    name: str

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

