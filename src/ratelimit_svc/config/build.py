"""Building the rule tree from parsed descriptors: the checks every config source shares (empty
keys, duplicates, units, replaces, share_threshold) and the ``Node``/``Rule`` tree they produce. The
YAML loader (config/loader.py) and the xDS client (config/xds.py) each parse their own input into
``ParsedDescriptor`` trees and hand them here, so both give the reference's error texts; only the
place an error points at differs (a line and path in a file, a path in an xDS resource)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ratelimit_svc.config.rules import Algorithm, Node, Rule, Unit, new_node, wildcard_pattern
from ratelimit_svc.errors import ConfigError

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import Settings

# The longest window: times are microseconds in doubles in the Redis scripts (docs/algorithms.md).
MAX_WINDOW_SECONDS = 10 * 365 * 86400

def fixed_windows_only(settings: Settings) -> str:
    """The backend's name when it counts only plain fixed windows (memcache: no atomic
    read-modify-write), else "" (``load_config``'s ``fixed_windows_only``)."""
    return settings.backend_type if settings.backend_type == "memcache" else ""


_UNITS = {unit.name: unit for unit in Unit}  # (Unit.__members__ makes a new proxy per call)
_NO_NAMES: frozenset[str] = frozenset()

# Where an error points: (the input's node, or None; the path in the document) -> " (...)".
Locate = Callable[[Any, str], str]


# The YAML loader makes one ParsedLimit and one ParsedDescriptor per descriptor of a file, by
# position: keyword arguments cost about as much again as the object (docs/reliability.md, "Where
# the time goes"), so the fields it always gives come first, in the order it has them.
@dataclass(slots=True)
class ParsedLimit:
    node: Any  # the source's handle on it (a YAML node; None from xDS), for error locations
    # where the limit is ("": ``<descriptor>.rate_limit``)
    path: str
    unit: str
    requests_per_unit: int
    unlimited: bool
    name: str
    replaces: list[str]
    in_list: bool  # written as an element of a list of limits
    # docs/algorithms.md. The ``*_node`` fields are the source's handles on each field, for
    # error locations.
    algorithm: str = ""
    algorithm_node: Any = None
    burst: int | None = None
    burst_node: Any = None
    unit_multiplier: int | None = None
    multiplier_node: Any = None


@dataclass(slots=True)
class ParsedDescriptor:
    node: Any
    path: str
    key: str
    value: str
    rate_limit: ParsedLimit | None
    # docs/algorithms.md: further limits (``rate_limit`` is then the first of a list).
    more_limits: list[ParsedLimit]
    charge_only_when_admitted: bool
    shadow_mode: bool
    quota_mode: bool
    detailed_metric: bool
    value_to_metric: bool
    share_threshold: bool
    metadata: dict[str, Any] | None
    children: list[ParsedDescriptor]


class Builder:
    """Adds the domains of one config document (named ``name``) to ``domains``."""

    def __init__(
        self,
        name: str,
        domains: dict[str, Node],
        merge: bool,
        locate: Locate,
        *,
        fixed_windows_only: str = "",
    ) -> None:
        self.name = name
        self.domains = domains
        self.merge = merge
        self.locate = locate
        # A backend that counts only plain fixed windows (memcache): docs/algorithms.md.
        self.fixed_windows_only = fixed_windows_only

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
            root = Node.root()
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
            # ``*`` anywhere in the composite (key or value) makes a wildcard, as in the reference.
            wildcard = "*" in composite
            if d.share_threshold and not wildcard:
                raise self.error(
                    "share_threshold can only be used with wildcard values (containing '*'), "
                    f"but found key '{composite}'",
                    d.node,
                    d.path,
                )
            # Its fields in order, with its own empty children, in one C call (docs/reliability.md,
            # "Where the time goes").
            node = new_node(
                (d.key, d.value, composite, rule, {}, [], d.value_to_metric, d.share_threshold)
            )
            if d.children:
                self.add_descriptors(node, stats_key + ".", d.children)
            parent.children[composite] = node
            if wildcard:
                parent.wildcards.append((wildcard_pattern(composite), node))

    def build_rule(self, d: ParsedDescriptor, stats_key: str) -> Rule | None:
        first = d.rate_limit
        if first is None:
            return None
        if not d.more_limits and not first.in_list:  # one limit, the reference's form
            return self.build_limit(d, first, stats_key, "")
        limits = [first, *d.more_limits]
        if d.more_limits or first.in_list:
            for index, limit in enumerate(limits):
                limit.path = limit.path or f"{d.path}.rate_limit[{index}]"
                for key, given in (
                    ("name", limit.name),
                    ("replaces", limit.replaces),
                    ("unlimited", limit.unlimited),
                ):
                    if given:
                        raise self.error(
                            f"'{key}' is not allowed in a rate_limit list (give it a single "
                            "limit)",
                            limit.node,
                            f"{limit.path}.{key}",
                        )
        if not d.more_limits:
            return self.build_limit(d, first, stats_key, "")
        rules = [self.build_limit(d, limit, stats_key, _stats_suffix(limit)) for limit in limits]
        seen: dict[tuple[Algorithm, int], str] = {}
        for limit, rule in zip(limits, rules, strict=True):
            window = (rule.algorithm, rule.window_seconds)
            if window in seen:
                raise self.error(
                    f"two limits with the same algorithm and window ({seen[window]} and "
                    f"{limit.path})",
                    limit.node,
                    limit.path,
                )
            seen[window] = limit.path
        return rules[0].with_more(tuple(rules[1:]))

    def build_limit(
        self, d: ParsedDescriptor, limit: ParsedLimit, stats_key: str, suffix: str
    ) -> Rule:
        path = limit.path or f"{d.path}.rate_limit"
        unit = _UNITS.get(limit.unit.upper(), Unit.UNKNOWN)
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
        algorithm = self.algorithm(limit, path) if limit.algorithm else Algorithm.FIXED_WINDOW
        if (
            limit.unlimited
            or limit.burst is not None
            or limit.unit_multiplier is not None
            or algorithm is not Algorithm.FIXED_WINDOW
            or self.fixed_windows_only
        ):  # else none of these checks applies (one unit is never longer than 10 years)
            self.check_algorithm_fields(d, limit, algorithm, unit, path)
        # Positional, in the order of Rule's fields: matching 15 keywords by name costs more
        # (docs/reliability.md, "Where the time goes").
        return Rule(
            limit.requests_per_unit,
            unit,
            stats_key,
            limit.name,
            frozenset(limit.replaces) if limit.replaces else _NO_NAMES,
            limit.unlimited,
            d.shadow_mode,
            d.quota_mode,
            d.detailed_metric,
            d.metadata,
            algorithm,
            1 if limit.unit_multiplier is None else limit.unit_multiplier,  # unit_multiplier
            limit.burst or 0,  # burst
            d.charge_only_when_admitted,
            suffix,  # stats_suffix
        )

    def algorithm(self, limit: ParsedLimit, path: str) -> Algorithm:
        if not limit.algorithm:
            return Algorithm.FIXED_WINDOW
        found = Algorithm.__members__.get(limit.algorithm.upper())
        if found is None or limit.algorithm != limit.algorithm.lower():
            raise self.error(
                f"invalid rate limit algorithm '{limit.algorithm}' "
                "(expected fixed_window, sliding_window or token_bucket)",
                limit.algorithm_node,
                f"{path}.algorithm",
            )
        return found

    def check_algorithm_fields(
        self, d: ParsedDescriptor, limit: ParsedLimit, algorithm: Algorithm, unit: Unit, path: str
    ) -> None:
        """The fields of docs/algorithms.md, once the unit and algorithm are known."""
        multiplier = 1 if limit.unit_multiplier is None else limit.unit_multiplier
        if limit.unlimited and (
            limit.algorithm or limit.burst is not None or limit.unit_multiplier is not None
        ):
            raise self.error(
                "should not specify algorithm, burst or unit_multiplier when unlimited",
                limit.node,
                path,
            )
        if multiplier < 1:
            raise self.error(
                "unit_multiplier must be at least 1",
                limit.multiplier_node,
                f"{path}.unit_multiplier",
            )
        if not limit.unlimited and unit.seconds * multiplier > MAX_WINDOW_SECONDS:
            raise self.error(
                f"unit_multiplier makes the window {unit.seconds * multiplier} seconds long; "
                f"at most {MAX_WINDOW_SECONDS} (10 years)",
                limit.multiplier_node,
                f"{path}.unit_multiplier",
            )
        if limit.burst is not None:
            # (The YAML loader already calls it the reference's unknown key elsewhere.)
            if algorithm is not Algorithm.TOKEN_BUCKET:
                raise self.error(
                    "burst is only for algorithm token_bucket (docs/algorithms.md)",
                    limit.burst_node,
                    f"{path}.burst",
                )
            if limit.burst < 1:
                raise self.error("burst must be at least 1", limit.burst_node, f"{path}.burst")
        if algorithm is Algorithm.TOKEN_BUCKET and limit.requests_per_unit < 1:
            raise self.error(
                "token_bucket needs requests_per_unit of at least 1 (its refill rate)",
                limit.node,
                f"{path}.requests_per_unit",
            )
        if self.fixed_windows_only and (
            algorithm is not Algorithm.FIXED_WINDOW or d.charge_only_when_admitted
        ):
            what = (
                f"algorithm {algorithm.name.lower()}"
                if algorithm is not Algorithm.FIXED_WINDOW
                else "charge_only_when_admitted"
            )
            raise self.error(
                f"{what} is not supported with BACKEND_TYPE={self.fixed_windows_only} "
                "(fixed windows only; docs/algorithms.md)",
                limit.algorithm_node if limit.algorithm else d.node,
                path if limit.algorithm else d.path,
            )


def _stats_suffix(limit: ParsedLimit) -> str:
    """``.per_second``, ``.per_5_minute``: each limit of a list has its own stats."""
    every = f"{limit.unit_multiplier}_" if limit.unit_multiplier not in (None, 1) else ""
    suffix = f".per_{every}{limit.unit.lower()}"
    if limit.algorithm and limit.algorithm != "fixed_window":
        suffix += f"_{limit.algorithm}"
    return suffix
