"""A config snapshot between processes: encoded where it is built (the config-load process, or a
thread), decoded by the serving process on its own event loop a slice at a time, and freed in
steps when replaced (docs/reliability.md).

Unpickling a whole tree at once, even in a thread, stalls the loop: the thread holds the GIL for
most of a second per 100,000 rules, and on a busy machine every hand-back of the GIL waits for
the scheduler. So the encoded form is a run of pickled slices of ``SLICE_NODES`` node records
in depth-first order (each naming its parent by position); ``decode`` unpickles one slice where
it lies (no copy of the whole), links its nodes into the tree and idles a moment before the
next. The cyclic garbage collector is paused meanwhile and the finished tree moved out of its
reach (``gc.freeze``): otherwise the million new objects of a big config trigger full
collections that hold the GIL for 100 ms and more each. A tree has no cycles, so reference
counting alone frees it.
"""

from __future__ import annotations

import gc
import pickle
import re
import struct
from collections import deque
from collections.abc import Iterator
from typing import Any

from ratelimit_svc.config.rules import Node, RateLimitConfig, new_node

SLICE_NODES = 1000  # about 5 ms of decoding (up to 25 on a busy machine; make bench-reload)
# Idle time between slices: gRPC's completion-queue thread needs the GIL to hand each call event
# to the loop, and only gets it at once while this thread waits; sleep(0) never waits.
PAUSE_SECONDS = 0.001
_HEAD = struct.Struct("!I")  # the length of the pickled slice lengths
_gc_pauses = 0  # decodes in progress (each pauses the collector until the last one ends)


def encode(config: RateLimitConfig | None) -> bytes:
    """``config`` as slices of node records (None stays None): the lengths of the slices (pickled,
    after their own 4-byte length), then the slices, each a pickled list of records. ``decode``
    unpickles each slice where it lies, so a big snapshot is never copied whole."""
    slices: list[bytes] = []
    batch: list[tuple[Any, ...]] = []
    for record in _records(config) if config is not None else ():
        batch.append(record)
        if len(batch) == SLICE_NODES:
            slices.append(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
            batch = []
    if batch:
        slices.append(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
    lengths = None if config is None else [len(piece) for piece in slices]
    head = pickle.dumps(lengths, pickle.HIGHEST_PROTOCOL)
    return b"".join([_HEAD.pack(len(head)), head, *slices])


def _records(config: RateLimitConfig) -> Iterator[tuple[Any, ...]]:
    """(parent position or the domain name, key, value, composite, rule, value_to_metric,
    share_threshold, wildcard pattern or None) for every node, parents before children, children
    in config order. A node's place among its parent's wildcards is its place among its children,
    as config/build.py links them."""
    position = 0
    pending: list[tuple[int | str, Node, re.Pattern[str] | None]] = [
        (domain, root, None) for domain, root in reversed(list(config.domains.items()))
    ]
    while pending:
        parent, node, pattern = pending.pop()
        yield (
            parent, node.key, node.value, node.composite, node.rule,
            node.value_to_metric, node.share_threshold, pattern,
        )  # fmt: skip
        if node.wildcards:
            patterns = {id(child): wildcard for wildcard, child in node.wildcards}
            pending.extend(
                (position, child, patterns.get(id(child)))
                for child in reversed(node.children.values())
            )
        elif node.children:
            pending.extend((position, child, None) for child in reversed(node.children.values()))
        position += 1


async def decode(data: bytes) -> RateLimitConfig | None:
    """The config ``encode`` made, rebuilt on the event loop one slice at a time."""
    # asyncio only where the loop is used: the config load process imports this module for
    # ``encode`` and stays without it (config/load_child.py).
    import asyncio

    global _gc_pauses
    view = memoryview(data)
    (size,) = _HEAD.unpack_from(view)
    lengths: list[int] | None = pickle.loads(view[_HEAD.size : _HEAD.size + size])
    if lengths is None:
        return None
    nodes: list[Node] = []
    domains: dict[str, Node] = {}
    start = _HEAD.size + size
    _gc_pauses += 1
    gc.disable()
    try:
        for length in lengths:
            piece = view[start : start + length]
            start += length
            for parent, key, value, composite, rule, to_metric, share, pattern in pickle.loads(
                piece
            ):
                node = new_node((key, value, composite, rule, {}, [], to_metric, share))
                nodes.append(node)
                if isinstance(parent, str):
                    domains[parent] = node
                    continue
                above = nodes[parent]
                above.children[composite] = node
                if pattern is not None:
                    above.wildcards.append((pattern, node))
            await asyncio.sleep(PAUSE_SECONDS)
        gc.freeze()  # the new tree (and what else lives now) is never scanned again
    finally:
        _gc_pauses -= 1
        if not _gc_pauses:
            gc.enable()
    return RateLimitConfig(domains=domains)


async def release(config: RateLimitConfig) -> None:
    """Free a replaced config one slice of nodes at a time on the event loop (freeing a whole
    tree is one deallocation cascade). Requests that still hold it (each keeps the snapshot it
    started with) are unaffected: this only drops references."""
    import asyncio  # as in decode

    pending: list[Node] = list(config.domains.values())
    del config
    nodes: deque[Node] = deque()  # parents before their children
    while pending:
        for _ in range(min(SLICE_NODES, len(pending))):
            node = pending.pop()
            nodes.append(node)
            pending.extend(node.children.values())
        await asyncio.sleep(PAUSE_SECONDS)
    while nodes:
        for _ in range(min(SLICE_NODES, len(nodes))):
            nodes.popleft()  # frees this node alone: its children are still held here
        await asyncio.sleep(PAUSE_SECONDS)
