"""Matching one request descriptor against a domain's rule tree: the rule, the counter key's body
and the stats key (docs/configuration.md (Descriptors and matching)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ratelimit_svc.config.rules import Node, RateLimitConfig, Rule, Unit
from ratelimit_svc.limiter.tuples import builder

Entry = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Override:
    """A limit sent by Envoy with the descriptor; it replaces the tree's rule."""

    requests_per_unit: int
    unit: Unit


class Match(NamedTuple):
    """The rule a descriptor matched, its counter key body and its stats key (a named tuple: one
    is built per descriptor of every request, four times faster than a frozen dataclass)."""

    rule: Rule
    key_body: str  # "<domain>_<k>_<v>_..._" ; the window start is appended by the limiter
    stats_key: str


_match = builder(Match)


def descriptor_key(domain: str, entries: Sequence[Entry]) -> str:
    """``<domain>.<k_v>.<k_v>`` (``k`` alone for an empty value): stats key of overrides and of
    detailed_metric rules."""
    return domain + "." + ".".join(f"{k}_{v}" if v else k for k, v in entries)


def _key_body(domain: str, entries: Sequence[Entry]) -> str:
    return domain + "_" + "".join(f"{k}_{v}_" for k, v in entries)


def _pattern_value(pattern: str, key: str) -> str:
    """The value part of a wildcard composite for a request key: the composite without a leading
    ``<key>_``, or all of it when it does not start so (a ``*`` in the config's key, or a key that
    splits at another ``_``). The reference builds share_threshold counter keys this way, so the
    same traffic writes the same Redis keys (docs/compatibility.md)."""
    prefix = key + "_"
    return pattern[len(prefix) :] if pattern.startswith(prefix) else pattern


def match(
    config: RateLimitConfig,
    domain: str,
    entries: Sequence[Entry],
    override: Override | None = None,
) -> Match | None:
    """The rule for one descriptor, or None (no limit applies). The caller checks the domain."""
    root = config.domains[domain]
    if override is not None:
        key = descriptor_key(domain, entries)
        rule = Rule(override.requests_per_unit, override.unit, stats_key=key)
        return Match(rule, _key_body(domain, entries), key)
    if len(entries) == 1 and entries[0][1]:
        # The most common descriptor: one entry with a value, answered by the exact child or,
        # when no wildcard is there to try first, by the key's child: the loop below finds the
        # same node, and the rule's own stats key unless the value goes into it.
        key, value = entries[0]
        composite = f"{key}_{value}"
        child = root.children.get(composite)
        if child is None and not root.wildcards:
            child = root.children.get(key)
            if child is None:
                return None
            if child.value_to_metric:  # the stats key carries the value: the loop below
                child = None
        if child is not None:
            if child.rule is None:
                return None
            if not child.rule.detailed_metric:
                return _match((child.rule, f"{domain}_{composite}_", child.rule.stats_key))

    # The hot path of every request: one ``k_v`` string per level, built once and reused for the
    # exact lookup, the wildcard test, the counter key and the runtime stats key.
    node = root
    counter_parts: list[str] = []  # "k_v" per level (share_threshold: "k_<pattern>")
    metric_parts: list[str] = []
    value_to_metric_used = False
    found: Node | None = None
    last = len(entries) - 1
    for index, (key, value) in enumerate(entries):
        composite = f"{key}_{value}"
        child = node.children.get(composite)
        exact = child is not None
        if child is None:
            for pattern, candidate in node.wildcards:
                if pattern.fullmatch(composite):
                    child = candidate
                    break
            else:
                child = node.children.get(key)
                if child is None:
                    return None

        runtime_part = composite if value else key
        if exact:
            counter_parts.append(composite)
            metric_parts.append(runtime_part)
        elif child.share_threshold:
            shared = f"{key}_{_pattern_value(child.composite, key)}"
            counter_parts.append(shared)
            metric_parts.append(shared)
        else:
            counter_parts.append(composite)
            if child.value_to_metric:
                metric_parts.append(runtime_part)
            elif "*" in child.composite:
                metric_parts.append(f"{key}_{_pattern_value(child.composite, key)}")
            else:
                metric_parts.append(child.composite)

        if metric_parts[-1] != child.composite:
            value_to_metric_used = True  # the stats key differs from the rule's config path
        if index == last:
            found = child
        elif child.has_children:
            node = child
            continue
        break

    if found is None or found.rule is None:
        return None
    rule = found.rule
    if rule.detailed_metric:
        stats_key = descriptor_key(domain, entries)
    elif value_to_metric_used:
        stats_key = domain + "." + ".".join(metric_parts)
    else:
        stats_key = rule.stats_key
    return _match((rule, f"{domain}_{'_'.join(counter_parts)}_", stats_key))


@dataclass(frozen=True, slots=True)
class Step:
    """One level of ``explain``'s walk: the request entry, the node it led to and how (``exact``
    ``k_v`` child, ``wildcard`` child, plain ``key`` child, or ``none``: the walk stops)."""

    key: str
    value: str
    how: str
    node: str = ""  # the node's composite key in the config (its pattern for a wildcard)
    rule: Rule | None = None


def explain(config: RateLimitConfig, domain: str, entries: Sequence[Entry]) -> list[Step]:
    """The path ``match`` takes through the tree for ``entries``, level by level (the console's
    dry run, docs/console.md). Kept beside ``match`` and tested against it: the same greedy walk,
    written for reading rather than speed."""
    node = config.domains.get(domain)
    steps: list[Step] = []
    if node is None:
        return steps
    for index, (key, value) in enumerate(entries):
        composite = f"{key}_{value}"
        how, child = "exact", node.children.get(composite)
        if child is None:
            how = "wildcard"
            child = next((c for p, c in node.wildcards if p.fullmatch(composite)), None)
        if child is None:
            how, child = "key", node.children.get(key)
        if child is None:
            steps.append(Step(key, value, "none"))
            return steps
        steps.append(Step(key, value, how, child.composite, child.rule))
        if index < len(entries) - 1 and not child.has_children:
            steps.append(Step(*entries[index + 1], "none"))
            return steps
        node = child
    return steps
