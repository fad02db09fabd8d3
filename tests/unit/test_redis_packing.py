"""The Redis client's increments packed by hand (backends/redis/protocol.py, docs/performance.md
(What the hot path avoids)) against hiredis's packing of the same commands."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_svc.backends.redis.protocol import increment_commands, pack, pack_increments
from ratelimit_svc.limiter.store import Increment

increments = st.lists(
    st.builds(
        Increment,
        key=st.text(max_size=40),
        hits=st.integers(0, 5000) | st.integers(0, 2**63 - 1),
        window=st.integers(1, 86400),
        ttl=st.integers(0, 5000) | st.integers(0, 2**40),
    ),
    max_size=6,
)


@given(increments)
@settings(max_examples=300)
def test_increments_pack_as_hiredis_packs_their_commands(batch: list[Increment]) -> None:
    assert pack_increments(batch) == pack(increment_commands(batch))


def test_increment_commands_are_incrby_then_expire_per_key() -> None:
    batch = [Increment("a_1", 2, 60, 61), Increment("b_1", 1, 1, 5)]
    assert increment_commands(batch) == [
        ("INCRBY", "a_1", 2), ("EXPIRE", "a_1", 61), ("INCRBY", "b_1", 1), ("EXPIRE", "b_1", 5),
    ]  # fmt: skip
