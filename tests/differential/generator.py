"""Seeded random rule files, settings and request sequences for the differential tier.

Everything a run sends is drawn from one ``random.Random(seed)``, so a seed reproduces a run. The
configs use only what both implementations support in the same way (docs/compatibility.md lists
what they do not: a trailing ``*`` is the only wildcard here, and rules carry no ``metadata``);
the fixed cases in ``cases.py`` cover the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from ratelimit_svc.config import goyaml

UNITS = ["second", "minute", "hour", "day"]
OVERRIDE_UNITS = [1, 2, 3, 4, 5, 6, 7]  # SECOND .. WEEK (protobuf numbers)
KEYS = ["k", "a", "remote", "remote_address", "x*", "path"]
VALUES = ["", "", "v", "w", "fo*", "*", "a_b", "ü", "files/*"]
REQUEST_KEYS = ["k", "a", "remote", "remote_address", "xyz", "x", "path", "other"]
REQUEST_VALUES = ["v", "w", "foo", "foo2", "address_foo2", "a_b", "ü", "files/a", "", "z"]
NAMES = ["n1", "n2", "n3"]

# Settings drawn per profile; every other setting is the same for both services.
PROFILE_CHOICES: dict[str, list[str]] = {
    "LOCAL_CACHE_SIZE_IN_BYTES": ["0", "1048576"],
    "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT": ["false", "true"],
    "CACHE_KEY_PREFIX": ["", "pfx:"],
    "LIMIT_RESPONSE_HEADERS_ENABLED": ["false", "true"],
    "SHADOW_MODE": ["false", "false", "true"],
    "QUOTA_MODE": ["false", "false", "true"],
    "RESPONSE_DYNAMIC_METADATA": ["false", "true"],
    "MERGE_DOMAIN_CONFIG": ["false", "true"],
    "NEAR_LIMIT_RATIO": ["0.8", "0.5"],
}


@dataclass
class Config:
    """One or more rule files (several when a domain is split for MERGE_DOMAIN_CONFIG)."""

    domain: str
    files: dict[str, str]  # file name (no directory) -> YAML text
    keys: list[str] = field(default_factory=list)  # descriptor keys used, for requests


@dataclass
class Profile:
    """Settings shared by a group of configs, and the configs."""

    name: str
    env: dict[str, str]
    configs: list[Config]


def dump(document: Any) -> str:
    return yaml.dump(document, Dumper=goyaml.Dumper, sort_keys=False, allow_unicode=True)


class Generator:
    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def profile(self, name: str, configs: int, first_domain: int) -> Profile:
        r = self.random
        env = {key: r.choice(choices) for key, choices in PROFILE_CHOICES.items()}
        merge = env["MERGE_DOMAIN_CONFIG"] == "true"
        return Profile(
            name, env, [self.config(f"c{first_domain + i}", merge) for i in range(configs)]
        )

    def config(self, domain: str, merge: bool) -> Config:
        r = self.random
        names: list[str] = []
        descriptors = self.descriptors(0, names)
        for node in _walk(descriptors):  # replaces only names that exist (or not, sometimes)
            limit = node.get("rate_limit")
            if limit is not None and r.random() < 0.25:
                own = limit.get("name")
                choices = [n for n in [*names, "missing"] if n != own]
                limit["replaces"] = [{"name": r.choice(choices)}]
        keys = sorted({node["key"] for node in _walk(descriptors)})
        if merge and len(descriptors) > 1 and r.random() < 0.5:
            cut = r.randrange(1, len(descriptors))
            files = {
                f"{domain}_1.yaml": dump({"domain": domain, "descriptors": descriptors[:cut]}),
                f"{domain}_2.yaml": dump({"domain": domain, "descriptors": descriptors[cut:]}),
            }
        else:
            files = {f"{domain}.yaml": dump({"domain": domain, "descriptors": descriptors})}
        return Config(domain, files, keys)

    def descriptors(self, depth: int, names: list[str]) -> list[dict[str, Any]]:
        r = self.random
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(r.randint(1, 4) if depth == 0 else r.randint(1, 3)):
            key = r.choice(KEYS)
            value = "" if key.endswith("*") else r.choice(VALUES)
            composite = f"{key}_{value}" if value else key
            if composite in seen:
                continue
            seen.add(composite)
            node: dict[str, Any] = {"key": key}
            if value:
                node["value"] = value
            children = depth < 2 and r.random() < 0.35
            if not children or r.random() < 0.5:
                node["rate_limit"] = self.rate_limit(names)
            if composite.endswith("*") and r.random() < 0.5:
                node["share_threshold"] = True
            for flag in ("shadow_mode", "quota_mode", "detailed_metric", "value_to_metric"):
                if r.random() < 0.12:
                    node[flag] = True
            if children:
                node["descriptors"] = self.descriptors(depth + 1, names)
            out.append(node)
        return out

    def rate_limit(self, names: list[str]) -> dict[str, Any]:
        r = self.random
        limit: dict[str, Any]
        if r.random() < 0.1:
            limit = {"unlimited": True}
        else:
            limit = {"unit": r.choice(UNITS), "requests_per_unit": r.choice([0, 1, 2, 3, 5, 10])}
        if r.random() < 0.3:
            name = r.choice(NAMES)
            limit["name"] = name
            names.append(name)
        return limit

    def requests(self, config: Config, count: int) -> list[dict[str, Any]]:
        """RateLimitRequest messages as protobuf JSON (usable by gRPC and ``/json`` alike)."""
        return [self.request(config) for _ in range(count)]

    def request(self, config: Config) -> dict[str, Any]:
        r = self.random
        keys = [k.rstrip("*") + ("yz" if k.endswith("*") else "") for k in config.keys]
        descriptors = []
        for _ in range(r.choice([1, 1, 2, 2, 3])):
            entries = []
            for _ in range(r.choice([1, 1, 1, 2, 2, 3])):
                key = r.choice(keys) if keys and r.random() < 0.8 else r.choice(REQUEST_KEYS)
                entries.append({"key": key, "value": r.choice(REQUEST_VALUES)})
            descriptor: dict[str, Any] = {"entries": entries}
            if r.random() < 0.15:
                descriptor["hitsAddend"] = str(r.choice([0, 1, 2, 4]))
            if r.random() < 0.07:
                descriptor["limit"] = {
                    "requestsPerUnit": r.choice([0, 1, 3, 4]),
                    "unit": r.choice(OVERRIDE_UNITS),
                }
            descriptors.append(descriptor)
        domain = config.domain if r.random() < 0.97 else "unknown-domain"
        request: dict[str, Any] = {"domain": domain, "descriptors": descriptors}
        if r.random() < 0.15:
            request["hitsAddend"] = r.choice([0, 1, 2, 3])
        return request


def _walk(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        out.append(node)
        out.extend(_walk(node.get("descriptors", [])))
    return out
