"""docs/backends.md (Local over-limit cache): the local over-limit cache is bounded by LOCAL_CACHE_SIZE_IN_BYTES and forgets keys
when their window ends."""

from __future__ import annotations

from ratelimit_svc.limiter.localcache import ENTRY_OVERHEAD_BYTES, LocalCache


def test_entries_expire_with_their_window() -> None:
    cache = LocalCache(4096)
    cache.add("d_k_v_1700000000", expires_at=1700000060)
    assert cache.contains("d_k_v_1700000000", now=1700000059)
    assert not cache.contains("d_k_v_1700000000", now=1700000060)
    assert len(cache) == 0 and cache.used_bytes == 0


def test_size_is_bounded_by_bytes_oldest_evicted_first() -> None:
    key_bytes = len("key-00000") + ENTRY_OVERHEAD_BYTES
    cache = LocalCache(10 * key_bytes)
    for n in range(1000):
        cache.add(f"key-{n:05d}", expires_at=2_000_000_000)
        assert cache.used_bytes <= cache.max_bytes
    assert len(cache) == 10
    assert cache.evacuate_count == 990
    assert not cache.contains("key-00000", now=0)
    assert cache.contains("key-00999", now=0)


def test_key_larger_than_the_cache_is_not_kept() -> None:
    cache = LocalCache(ENTRY_OVERHEAD_BYTES + 4)
    cache.add("x" * 100, expires_at=2_000_000_000)
    assert len(cache) == 0 and cache.used_bytes == 0


def test_re_adding_a_key_does_not_double_count() -> None:
    cache = LocalCache(4096)
    cache.add("k", expires_at=10)
    cache.add("k", expires_at=20)
    assert len(cache) == 1 and cache.used_bytes == 1 + ENTRY_OVERHEAD_BYTES
    assert cache.contains("k", now=15)
