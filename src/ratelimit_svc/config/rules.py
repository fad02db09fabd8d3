"""The immutable rule tree a configuration load produces: units, rules, descriptor nodes.

A ``RateLimitConfig`` is built once per load (from files or xDS) and never changed afterwards; a
reload swaps one reference, and every in-flight request keeps the snapshot it started with.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True, slots=True)
class Rule:
    """A limit attached to a descriptor node (or built from a request's limit override)."""

    requests_per_unit: int
    unit: Unit
    stats_key: str
    name: str = ""
    replaces: frozenset[str] = frozenset()
    unlimited: bool = False
    shadow_mode: bool = False
    quota_mode: bool = False
    detailed_metric: bool = False
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One descriptor of the tree. ``children`` holds exact children by composite key (``k`` or
    ``k_v``); ``wildcards`` holds, in config order, the children whose value contains ``*``."""

    key: str
    value: str
    composite: str
    rule: Rule | None = None
    children: dict[str, Node] = field(default_factory=dict)
    wildcards: list[tuple[re.Pattern[str], Node]] = field(default_factory=list)
    value_to_metric: bool = False
    share_threshold: bool = False

    @property
    def has_children(self) -> bool:
        return bool(self.children)


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
            lines.append(
                f"{rule.stats_key}: unit={rule.unit.name} "
                f"requests_per_unit={rule.requests_per_unit}, "
                f"shadow_mode: {str(rule.shadow_mode).lower()}, "
                f"quota_mode: {str(rule.quota_mode).lower()}"
            )
        return "\n".join(lines) + ("\n" if lines else "")


EMPTY_CONFIG = RateLimitConfig(domains={})


def wildcard_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` matches any run of characters (including none); everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)
