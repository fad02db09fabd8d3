"""Building the rule tree from parsed descriptors: the checks every config source shares (empty
keys, duplicates, units, replaces, share_threshold) and the ``Node``/``Rule`` tree they produce. The
YAML loader (config/loader.py) and the xDS client (config/xds.py) each parse their own input into
``ParsedDescriptor`` trees and hand them here, so both give the reference's error texts; only the
place an error points at differs (a line and path in a file, a path in an xDS resource)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ratelimit_svc.config.rules import Node, Rule, Unit, wildcard_pattern
from ratelimit_svc.errors import ConfigError

# Where an error points: (the input's node, or None; the path in the document) -> " (...)".
Locate = Callable[[Any, str], str]


@dataclass(slots=True)
class ParsedLimit:
    node: Any  # the source's handle on it (a YAML node; None from xDS), for error locations
    unit: str
    requests_per_unit: int
    unlimited: bool
    name: str
    replaces: list[str]


@dataclass(slots=True)
class ParsedDescriptor:
    node: Any
    path: str
    key: str
    value: str
    rate_limit: ParsedLimit | None
    shadow_mode: bool
    quota_mode: bool
    detailed_metric: bool
    value_to_metric: bool
    share_threshold: bool
    metadata: dict[str, Any] | None
    children: list[ParsedDescriptor]


class Builder:
    """Adds the domains of one config document (named ``name``) to ``domains``."""

    def __init__(self, name: str, domains: dict[str, Node], merge: bool, locate: Locate) -> None:
        self.name = name
        self.domains = domains
        self.merge = merge
        self.locate = locate

    def error(self, message: str, node: Any = None, path: str = "") -> ConfigError:
        return ConfigError(f"{self.name}: {message}{self.locate(node, path)}")

    def add_domain(
        self,
        domain: str,
        descriptors: list[ParsedDescriptor],
        *,
        document: Any = None,
        domain_node: Any = None,
    ) -> None:
        if not domain:
            raise self.error("config file cannot have empty domain", document)
        root = self.domains.get(domain)
        if root is not None and not self.merge:
            raise self.error(f"duplicate domain '{domain}' in config file", domain_node, "domain")
        if root is None:
            root = Node(key="", value="", composite="")
            self.domains[domain] = root
        self.add_descriptors(root, domain + ".", descriptors)

    def add_descriptors(
        self, parent: Node, parent_key: str, descriptors: list[ParsedDescriptor]
    ) -> None:
        for d in descriptors:
            if not d.key:
                raise self.error("descriptor has empty key", d.node, d.path)
            composite = f"{d.key}_{d.value}" if d.value else d.key
            stats_key = parent_key + composite
            if composite in parent.children:
                raise self.error(
                    f"duplicate descriptor composite key '{stats_key}'", d.node, d.path
                )
            rule = self.build_rule(d, stats_key)
            if d.share_threshold and "*" not in d.value:
                raise self.error(
                    "share_threshold can only be used with wildcard values (containing '*'), "
                    f"but found key '{composite}'",
                    d.node,
                    d.path,
                )
            node = Node(
                key=d.key,
                value=d.value,
                composite=composite,
                rule=rule,
                value_to_metric=d.value_to_metric,
                share_threshold=d.share_threshold,
            )
            self.add_descriptors(node, stats_key + ".", d.children)
            parent.children[composite] = node
            if "*" in d.value:
                parent.wildcards.append((wildcard_pattern(composite), node))

    def build_rule(self, d: ParsedDescriptor, stats_key: str) -> Rule | None:
        limit = d.rate_limit
        if limit is None:
            return None
        path = f"{d.path}.rate_limit"
        unit = Unit.__members__.get(limit.unit.upper(), Unit.UNKNOWN)
        valid_unit = unit is not Unit.UNKNOWN
        if limit.unlimited:
            if valid_unit:
                raise self.error(
                    "should not specify rate limit unit when unlimited", limit.node, path
                )
        elif not valid_unit:
            raise self.error(f"invalid rate limit unit '{limit.unit}'", limit.node, path)
        for name in limit.replaces:
            if not name:
                raise self.error("should not have an empty replaces entry", limit.node, path)
            if name == limit.name:
                raise self.error(
                    "replaces should not contain name of same descriptor", limit.node, path
                )
        return Rule(
            requests_per_unit=limit.requests_per_unit,
            unit=unit,
            stats_key=stats_key,
            name=limit.name,
            replaces=frozenset(limit.replaces),
            unlimited=limit.unlimited,
            shadow_mode=d.shadow_mode,
            quota_mode=d.quota_mode,
            detailed_metric=d.detailed_metric,
            metadata=d.metadata,
        )
