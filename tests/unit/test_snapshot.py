"""A config snapshot between processes (docs/reliability.md): what ``encode`` writes, ``decode``
rebuilds node for node, and decoding or releasing a big tree lets the event loop run between
slices."""

from __future__ import annotations

import asyncio

import pytest

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import Node, RateLimitConfig
from ratelimit_svc.config.snapshot import SLICE_NODES, decode, encode, release

RULES = """
domain: a
descriptors:
  - key: k
    value: "v*"
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 1, name: first}
  - key: k
    value: exact
    detailed_metric: true
    rate_limit: {unit: hour, requests_per_unit: 2, replaces: [{name: first}]}
    descriptors:
      - key: inner
        value_to_metric: true
        metadata: {team: x, n: [1, 2]}
        rate_limit: {unit: second, requests_per_unit: 3}
  - key: k
    value: "*z"
    rate_limit: {unit: day, requests_per_unit: 4}
  - key: "x*"
    rate_limit: {unit: day, requests_per_unit: 5}
---
domain: b
descriptors:
  - key: only
    rate_limit: {unlimited: true}
"""


def shape(node: Node) -> tuple[object, ...]:
    return (
        node.key, node.value, node.composite, node.rule, node.value_to_metric,
        node.share_threshold, [(c, shape(n)) for c, n in node.children.items()],
        [(p.pattern, n.composite) for p, n in node.wildcards],
    )  # fmt: skip


def big(count: int) -> RateLimitConfig:
    lines = ["domain: big\ndescriptors:\n"]
    lines += [f"  - key: c\n    value: v{i}\n    rate_limit: {{unit: minute, requests_per_unit: 5}}\n" for i in range(count)]
    return load_config([ConfigFile("big.yaml", "".join(lines))])


async def test_decode_rebuilds_what_encode_wrote() -> None:
    config = load_config([ConfigFile("r.yaml", RULES)])
    copy = await decode(encode(config))
    assert copy is not None
    assert list(copy.domains) == ["a", "b"]
    assert {d: shape(n) for d, n in copy.domains.items()} == {d: shape(n) for d, n in config.domains.items()}
    assert copy.dump() == config.dump()
    assert await decode(encode(None)) is None


async def test_decoding_and_releasing_a_big_tree_let_the_loop_run() -> None:
    config = big(5 * SLICE_NODES)
    turns = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    copy = await decode(encode(config))
    assert copy is not None and len(list(copy.rules())) == 5 * SLICE_NODES
    assert turns - before >= 5  # at least one turn per slice
    before = turns
    await release(copy)
    assert turns - before >= 5
    done.set()
    await task


async def test_rules_and_nodes_stay_immutable_and_cross_processes_whole() -> None:
    config = load_config(
        [
            ConfigFile(
                "r.yaml",
                RULES
                + "  - key: listed\n    rate_limit:\n"
                + "      - {unit: minute, requests_per_unit: 10}\n"
                + "      - {unit: hour, requests_per_unit: 100}\n",
            )
        ]
    )
    copy = await decode(encode(config))
    assert copy is not None
    listed = copy.domains["b"].children["listed"].rule
    assert listed is not None and not listed.classic and len(listed.limits) == 2
    assert listed == config.domains["b"].children["listed"].rule
    plain = copy.domains["a"].children["k_exact"].rule
    assert plain is not None and plain.classic
    node = copy.domains["a"].children["k_exact"]
    for target, name in ((plain, "requests_per_unit"), (node, "rule"), (node, "children")):
        with pytest.raises(AttributeError):
            setattr(target, name, None)
    # Nodes are places in the tree: equal only to themselves, hashable by identity.
    twin = config.domains["a"].children["k_exact"]
    assert node != twin and node == node and len({node, twin}) == 2
