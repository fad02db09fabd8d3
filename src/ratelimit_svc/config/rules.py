"""The immutable rule tree a configuration load produces: units, rules, descriptor nodes.

A ``RateLimitConfig`` is built once per load (from files or xDS) and never changed afterwards; a
reload swaps one reference, and every in-flight request keeps the snapshot it started with.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, cast


class Unit(enum.IntEnum):
    """Window units; values are the protobuf enum numbers (RateLimitResponse.RateLimit.Unit)."""

    UNKNOWN = 0
    SECOND = 1
    MINUTE = 2
    HOUR = 3
    DAY = 4
    MONTH = 5
    YEAR = 6
    WEEK = 7

    @property
    def seconds(self) -> int:
        return _UNIT_SECONDS[self]


_UNIT_SECONDS = {
    Unit.UNKNOWN: 0,
    Unit.SECOND: 1,
    Unit.MINUTE: 60,
    Unit.HOUR: 3600,
    Unit.DAY: 86400,
    Unit.WEEK: 604800,
    Unit.MONTH: 2592000,
    Unit.YEAR: 31536000,
}


class Algorithm(enum.IntEnum):
    """How a limit counts (docs/algorithms.md); values are the xDS resource's enum numbers and the
    Lua script's algorithm codes."""

    FIXED_WINDOW = 0
    SLIDING_WINDOW = 1
    TOKEN_BUCKET = 2

    @property
    def key_tag(self) -> str:
        return _KEY_TAGS[self]


_KEY_TAGS = {
    Algorithm.FIXED_WINDOW: "fw",
    Algorithm.SLIDING_WINDOW: "sw",
    Algorithm.TOKEN_BUCKET: "tb",
}


class _RuleFields(NamedTuple):
    # The defaults are Rule.__new__'s: this class only names the fields.
    requests_per_unit: int
    unit: Unit
    stats_key: str
    name: str
    replaces: frozenset[str]
    unlimited: bool
    shadow_mode: bool
    quota_mode: bool
    detailed_metric: bool
    metadata: Mapping[str, Any] | None
    # docs/algorithms.md. A rule that leaves all of these at their defaults counts exactly as the
    # reference does, with the reference's keys.
    algorithm: Algorithm
    unit_multiplier: int
    burst: int  # token bucket size; 0: requests_per_unit
    charge_only_when_admitted: bool
    stats_suffix: str  # appended to the stats key (each limit of a list has its own)
    more: tuple[Rule, ...]  # the further limits of a list (this rule is the first)
    # Counted as the reference counts: one fixed window of one unit, the reference's key. Derived
    # from the fields above when the rule is made, because the limiter asks for every descriptor
    # of every request.
    classic: bool


class Rule(_RuleFields):
    """A limit attached to a descriptor node (or built from a request's limit override).

    Immutable, and a named tuple rather than a frozen dataclass: a frozen dataclass sets each
    field through ``object.__setattr__`` when it is made, about seven times the cost of making
    this tuple, and every rule of a config is made twice per load (built in the load process,
    rebuilt by the serving process, docs/reliability.md). Two rules are equal when every field
    is.
    """

    __slots__ = ()

    def __new__(
        cls,
        requests_per_unit: int,
        unit: Unit,
        stats_key: str,
        name: str = "",
        replaces: frozenset[str] = frozenset(),
        unlimited: bool = False,
        shadow_mode: bool = False,
        quota_mode: bool = False,
        detailed_metric: bool = False,
        metadata: Mapping[str, Any] | None = None,
        algorithm: Algorithm = Algorithm.FIXED_WINDOW,
        unit_multiplier: int = 1,
        burst: int = 0,
        charge_only_when_admitted: bool = False,
        stats_suffix: str = "",
        more: tuple[Rule, ...] = (),
    ) -> Rule:
        classic = (
            algorithm is Algorithm.FIXED_WINDOW
            and unit_multiplier == 1
            and not more
            and not charge_only_when_admitted
        )
        return _new_tuple(
            cls,
            (
                requests_per_unit, unit, stats_key, name, replaces, unlimited, shadow_mode,
                quota_mode, detailed_metric, metadata, algorithm, unit_multiplier, burst,
                charge_only_when_admitted, stats_suffix, more, classic,
            ),
        )  # fmt: skip

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Every rule of a config crosses between processes on each load (config/snapshot.py):
        # unpickled as one C call with its fields as they are (``classic`` included), not
        # through ``__new__``'s arguments.
        return (_new_tuple, (Rule, tuple(self)))

    def with_more(self, more: tuple[Rule, ...]) -> Rule:
        """This rule as the first limit of a list whose further limits are ``more``."""
        return self._replace(more=more, classic=self.classic and not more)

    @property
    def window_seconds(self) -> int:
        return self.unit.seconds * self.unit_multiplier

    @property
    def limits(self) -> tuple[Rule, ...]:
        return (self, *self.more)

    def describe(self) -> str:
        """One limit in words for /rlconfig: ``10 per 5 minute, sliding_window``."""
        every = f"{self.unit_multiplier} " if self.unit_multiplier != 1 else ""
        text = f"{self.requests_per_unit} per {every}{self.unit.name.lower()}"
        text += f", {self.algorithm.name.lower()}"
        if self.algorithm is Algorithm.TOKEN_BUCKET:
            text += f" burst {self.burst or self.requests_per_unit}"
        return text


_new_tuple = tuple.__new__


class _NodeFields(NamedTuple):
    key: str
    value: str
    composite: str
    rule: Rule | None
    children: dict[str, Node]
    wildcards: list[tuple[re.Pattern[str], Node]]
    value_to_metric: bool = False
    share_threshold: bool = False


class Node(_NodeFields):
    """One descriptor of the tree. ``children`` holds exact children by composite key (``k`` or
    ``k_v``); ``wildcards`` holds, in config order, the children whose value contains ``*``.

    A named tuple, as ``Rule`` (made twice per load, each node), but compared and hashed by
    identity: two nodes with the same fields are still two places in the tree. Its children are
    filled in while the tree is built; nothing changes a node once its config is adopted.
    """

    __slots__ = ()
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    @classmethod
    def root(cls) -> Node:
        """A domain's root: no key, no rule, children to come."""
        return new_node(("", "", "", None, {}, [], False, False))

    @property
    def has_children(self) -> bool:
        return bool(self.children)


# A node from its fields in order (key, value, composite, rule, children, wildcards,
# value_to_metric, share_threshold): one C call, half the cost of ``Node(...)``.
new_node = cast(
    Callable[[tuple[str, str, str, Rule | None, dict[str, Node], list[Any], bool, bool]], Node],
    partial(_new_tuple, Node),
)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """One complete, validated configuration: domain name → root node (children only)."""

    domains: Mapping[str, Node]

    def rules(self) -> Iterable[Rule]:
        """Every rule, depth-first in config order (used by /rlconfig and tests)."""

        def walk(node: Node) -> Iterable[Rule]:
            for child in node.children.values():
                if child.rule is not None:
                    yield child.rule
                yield from walk(child)

        for root in self.domains.values():
            yield from walk(root)

    def dump(self) -> str:
        """The reference's /rlconfig format, one line per rule."""
        lines = []
        for rule in self.rules():
            line = (
                f"{rule.stats_key}: unit={rule.unit.name} "
                f"requests_per_unit={rule.requests_per_unit}, "
                f"shadow_mode: {str(rule.shadow_mode).lower()}, "
                f"quota_mode: {str(rule.quota_mode).lower()}"
            )
            if not rule.classic:  # only rules using docs/algorithms.md say more than the reference
                line += ", limits: " + "; ".join(limit.describe() for limit in rule.limits)
                if rule.charge_only_when_admitted:
                    line += ", charge_only_when_admitted: true"
            lines.append(line)
        return "\n".join(lines) + ("\n" if lines else "")


EMPTY_CONFIG = RateLimitConfig(domains={})


def wildcard_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` matches any run of characters (including none); everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)
