"""BACKEND_TYPE=memcache against real memcached processes (tests/support/memcache_fixtures.py): the
reference's multi-get / incr / add dance, gomemcache's sharding, expiry over 30 days, keys
memcached cannot take, MEMCACHE_SRV with refresh (an injected resolver), MEMCACHE_MAX_IDLE_CONNS,
TLS, bounded failures, and what it guarantees across several service replicas."""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from support.clock import FakeClock
from support.memcache_fixtures import MemcachedServer

from ratelimit_svc.backends import open_store
from ratelimit_svc.backends.memcache.client import pick, servers_from_srv, tls_context
from ratelimit_svc.backends.memcache.store import MemcacheStore, storage_key
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request, RequestDescriptor
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.registry import MemoryStats

KEY = "basic_key1_foo_1700000005"


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., MemcacheStore]]:
    stores: list[MemcacheStore] = []

    def make(servers: list[str] | tuple[str, ...] = (), **options: Any) -> MemcacheStore:
        store = MemcacheStore(servers, **{"op_timeout": 2.0, **options})
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def socket_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    writes: list[bytes] = []
    original_write = asyncio.StreamWriter.write

    def write(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(bytes(data))
        original_write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", write)
    yield writes


@pytest.fixture
def memcached(memcached_server: MemcachedServer) -> MemcachedServer:
    memcached_server.flush()
    return memcached_server


# -- the reference's flow ----------------------------------------------------------------------


async def test_first_hit_adds_with_expiry_then_increments(
    memcached: MemcachedServer, make_store: Callable[..., MemcacheStore]
) -> None:
    store = make_store([memcached.url])
    assert await store.increment([Increment(KEY, 3, 60, 60)]) == [3]
    assert await store.increment([Increment(KEY, 2, 60, 60)]) == [5]
    await store.close()  # waits for the background increments
    assert memcached.get(KEY) == b"5"
    stats = memcached.stats()
    assert int(stats["cmd_touch"]) == 0
    assert int(stats["incr_misses"]) >= 1 and int(stats["incr_hits"]) >= 1


async def test_reads_are_one_get_per_server_and_writes_one_write_per_server(
    memcached_factory: Callable[..., MemcachedServer],
    make_store: Callable[..., MemcacheStore],
    socket_writes: list[bytes],
) -> None:
    servers = [memcached_factory() for _ in range(3)]
    store = make_store([s.url for s in servers])
    keys = [f"spread_{i}_1700000000" for i in range(30)]
    await store.increment([Increment(key, 1, 60, 60) for key in keys])
    await store.close()
    gets = [w for w in socket_writes if w.startswith(b"get ")]
    assert len(gets) == 3 and sum(w.count(b" ") for w in gets) == 30
    incrs = [w for w in socket_writes if w.startswith(b"incr ")]
    assert len(incrs) == 3  # every miss of a server in one pipelined write
    adds = [w for w in socket_writes if w.startswith(b"add ")]
    assert len(adds) == 3 and sum(w.count(b"add ") for w in adds) == 30


async def test_sharding_is_gomemcaches_crc32_mod_n_in_the_order_given(
    memcached_factory: Callable[..., MemcachedServer], make_store: Callable[..., MemcacheStore]
) -> None:
    servers = [memcached_factory() for _ in range(3)]
    store = make_store([s.url for s in servers])
    keys = [f"shard_{i}_1700000000" for i in range(40)]
    await store.increment([Increment(key, 1, 60, 60) for key in keys])
    await store.close()
    for key in keys:
        index = zlib.crc32(key.encode()) % 3  # Go's crc32.ChecksumIEEE
        assert store.server_for(key) == servers[index].url
        assert [s.get(key) for s in servers] == [b"1" if i == index else None for i in range(3)]
    # Known values: the same as gomemcache computes.
    assert zlib.crc32(b"foo") == 0x8C736521
    assert pick(b"anything", 1) == 0


async def test_expiry_over_30_days_is_an_absolute_time() -> None:
    store = MemcacheStore(["127.0.0.1:1"], wall_clock=lambda: 1700000000.0)
    assert store._expiry(60) == 60
    assert store._expiry(2592000) == 2592000  # exactly 30 days is still relative
    assert store._expiry(2592001) == 1700000000 + 2592001
    assert store._expiry(31536000 + 300) == 1700000000 + 31536300
    await store.close()


async def test_keys_memcached_cannot_take_are_counted_under_a_digest(
    memcached: MemcachedServer, make_store: Callable[..., MemcacheStore]
) -> None:
    store = make_store([memcached.url])
    spaced, long = "d_k_with space_1700000000", "d_k_" + "x" * 300 + "_1700000000"
    assert await store.increment([Increment(spaced, 1, 60, 60), Increment(long, 2, 60, 60)]) == [1, 2]
    await store.close()
    for key, value in ((spaced, b"1"), (long, b"2")):
        digest = "ratelimit-sha256:" + hashlib.sha256(key.encode()).hexdigest()
        assert storage_key(key) == digest.encode()
        assert memcached.get(digest) == value
    assert storage_key("caf\u00e9_1") == "caf\u00e9_1".encode()  # UTF-8 is fine as it is


# -- what it guarantees --------------------------------------------------------------------------


async def test_two_replicas_may_over_admit_a_burst_but_totals_are_exact(
    memcached: MemcachedServer, make_store: Callable[..., MemcacheStore], clock: FakeClock
) -> None:
    config = load_config(
        [ConfigFile("m.yaml", "domain: m\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 20}\n")]
    )
    replicas = [make_store([memcached.url], clock=clock) for _ in range(2)]
    limiters = [Limiter(store=s, stats=MemoryStats(), options=LimiterOptions(), clock=clock) for s in replicas]
    request = Request("m", (RequestDescriptor((("k", "v"),)),))

    decisions = await asyncio.gather(*(limiters[n % 2].should_rate_limit(config, request) for n in range(100)))

    admitted = [sum(d.overall.name == "OK" for d in decisions[n::2]) for n in range(2)]
    assert all(a <= 20 for a in admitted)  # each replica alone never over-admits
    assert 20 <= sum(admitted) <= 40  # together they may, by at most what the other had in flight
    for store in replicas:
        await store.close()
    assert memcached.get("m_k_v_1699999980") == b"100"  # every hit was counted
    # Once the increments have landed, every replica sees the total.
    late = make_store([memcached.url], clock=clock)
    assert await late.get(["m_k_v_1699999980"]) == [100]


async def test_close_waits_for_the_background_increments(
    memcached: MemcachedServer, make_store: Callable[..., MemcacheStore]
) -> None:
    store = make_store([memcached.url])
    await asyncio.gather(*(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(200)))
    await store.close()
    assert memcached.get(KEY) == b"200"


# -- failures ----------------------------------------------------------------------------------


async def test_a_dead_server_fails_its_keys_fast_and_ping_needs_one_server(
    memcached_factory: Callable[..., MemcachedServer], make_store: Callable[..., MemcacheStore]
) -> None:
    alive, dead = memcached_factory(), memcached_factory()
    store = make_store([alive.url, dead.url], op_timeout=5.0)
    dead_key = next(k for k in (f"k{i}_1" for i in range(100)) if store.server_for(k) == dead.url)
    alive_key = next(k for k in (f"k{i}_1" for i in range(100)) if store.server_for(k) == alive.url)
    dead.kill()
    started = time.monotonic()
    with pytest.raises(BackendError, match=f"cannot connect to {dead.url}"):
        await store.increment([Increment(dead_key, 1, 60, 60)])
    assert time.monotonic() - started < 1.0
    assert await store.increment([Increment(alive_key, 1, 60, 60)]) == [1]
    await store.ping()
    alive.kill()
    with pytest.raises(BackendError):
        await store.ping()


async def test_a_hung_server_times_out_and_no_stale_reply_is_read_later(
    memcached_factory: Callable[..., MemcachedServer], make_store: Callable[..., MemcacheStore]
) -> None:
    server = memcached_factory()
    store = make_store([server.url], op_timeout=0.3, max_idle_conns=1)
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match=f"no answer from {server.url} within 0.3s"):
            await store.get([KEY])
        assert time.monotonic() - started < 0.8
    finally:
        server.cont()
    assert await store.get(["fresh_1", KEY]) == [0, 1]


async def test_max_idle_conns_bounds_the_connections_kept(
    memcached: MemcachedServer, make_store: Callable[..., MemcacheStore]
) -> None:
    store = make_store([memcached.url], max_idle_conns=2)
    await asyncio.gather(*(store.get([f"idle_{i}"]) for i in range(20)))
    (server,) = store._servers
    assert server.opened >= 3  # concurrent calls open what they need...
    assert len(server._idle) == 2  # ...and only MEMCACHE_MAX_IDLE_CONNS stay open


# -- servers from SRV -----------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, records: list[tuple[str, int]]) -> None:
        self.records = records
        self.names: list[str] = []
        self.fail = False
        self.changed = asyncio.Event()

    async def __call__(self, name: str) -> list[tuple[str, int]]:
        self.names.append(name)
        if self.fail:
            raise BackendError("memcache: SRV lookup failed: injected")
        return list(self.records)


async def test_srv_servers_are_sorted_like_the_reference() -> None:
    assert servers_from_srv([("b.example.", 11211), ("a.example.", 11212), ("a.example.", 11211)]) == [
        "a.example.:11211",
        "a.example.:11212",
        "b.example.:11211",
    ]


async def test_dns_srv_records_are_read_with_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.asyncresolver
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    from ratelimit_svc.backends.memcache.client import dns_srv_records

    asked: list[tuple[str, str]] = []

    async def resolve(name: str, rdtype: str) -> list[Any]:
        asked.append((name, rdtype))
        return [
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SRV, text)
            for text in ("10 5 11211 mc2.example.org.", "10 5 11212 mc1.example.org.")
        ]

    monkeypatch.setattr(dns.asyncresolver, "resolve", resolve)
    records = await dns_srv_records("_memcache._tcp.example.org")
    assert asked == [("_memcache._tcp.example.org", "SRV")]
    assert servers_from_srv(records) == ["mc1.example.org.:11212", "mc2.example.org.:11211"]


async def test_srv_lookup_and_periodic_refresh(
    memcached_factory: Callable[..., MemcachedServer], make_store: Callable[..., MemcacheStore]
) -> None:
    first, second = memcached_factory(), memcached_factory()
    resolver = FakeResolver([("127.0.0.1", first.port)])
    store = make_store(srv="_memcache._tcp.example.org", srv_refresh=0.02, resolver=resolver)
    await store.start()
    assert resolver.names[0] == "_memcache._tcp.example.org"
    assert store.servers == [first.url]
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]

    resolver.fail = True  # a failed refresh keeps the servers it had
    count = len(resolver.names)
    deadline = time.monotonic() + 5
    while len(resolver.names) < count + 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert store.servers == [first.url]

    resolver.fail = False
    resolver.records = [("127.0.0.1", second.port), ("127.0.0.1", first.port)]
    deadline = time.monotonic() + 5
    while len(store.servers) != 2:
        assert time.monotonic() < deadline, "the refresh never picked up the new record"
        await asyncio.sleep(0.01)
    assert store.servers == sorted([first.url, second.url])


async def test_srv_startup_failures(make_store: Callable[..., MemcacheStore]) -> None:
    with pytest.raises(BackendError, match="SRV parts"):
        MemcacheStore(srv="memcache.example.org")
    resolver = FakeResolver([])
    with pytest.raises(BackendError, match="lists no server"):
        await make_store(srv="_memcache._tcp.example.org", resolver=resolver).start()
    resolver.fail = True
    with pytest.raises(BackendError, match="injected"):
        await make_store(srv="_memcache._tcp.example.org", resolver=resolver).start()


# -- TLS ------------------------------------------------------------------------------------------


async def test_tls_with_a_client_certificate(
    memcached_factory: Callable[..., MemcachedServer], make_store: Callable[..., MemcacheStore]
) -> None:
    server = memcached_factory(tls=True, verify_clients=True)
    files = server.tls_files
    assert files is not None
    context = tls_context(cacert=str(files.ca), client_cert=str(files.client_cert), client_key=str(files.client_key))
    store = make_store([server.url], tls=context)
    assert await store.increment([Increment(KEY, 2, 60, 60)]) == [2]
    await store.ping()

    untrusted = make_store([server.url], tls=tls_context(cacert=str(files.other_ca)), op_timeout=2.0)
    with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusted.get([KEY])


async def test_tls_hostname_check_and_skipping_it(
    memcached_factory: Callable[..., MemcachedServer], make_store: Callable[..., MemcacheStore]
) -> None:
    server = memcached_factory(tls=True, tls_hostnames=("memcached.example.org",))
    files = server.tls_files
    assert files is not None
    strict = make_store([server.url], tls=tls_context(cacert=str(files.ca)))
    with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
        await strict.get([KEY])
    relaxed = make_store([server.url], tls=tls_context(cacert=str(files.ca), skip_hostname=True))
    assert await relaxed.get([KEY]) == [0]


# -- settings -------------------------------------------------------------------------------------


async def test_backend_table_opens_a_memcache_store(memcached: MemcachedServer, clock: FakeClock) -> None:
    env = {"BACKEND_TYPE": "memcache", "MEMCACHE_HOST_PORT": memcached.url, "MEMCACHE_MAX_IDLE_CONNS": "3", "USE_STATSD": "false"}
    store = await open_store(Settings.from_env(env), clock, MemoryStats().scope("ratelimit"))
    try:
        inner = getattr(store, "inner", store)
        assert isinstance(inner, MemcacheStore) and repr(inner) == f"MemcacheStore({memcached.url}, max_idle_conns=3)"
        assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
        await store.ping()
    finally:
        await store.close()
    assert memcached.get(KEY) == b"1"


async def test_bad_tls_files_are_a_clear_startup_error(clock: FakeClock, tmp_path: Any) -> None:
    env = {
        "BACKEND_TYPE": "memcache",
        "MEMCACHE_HOST_PORT": "127.0.0.1:11211",
        "MEMCACHE_TLS": "true",
        "MEMCACHE_TLS_CACERT": str(tmp_path / "missing.pem"),
        "USE_STATSD": "false",
    }
    with pytest.raises(BackendError, match="MEMCACHE_TLS"):
        await open_store(Settings.from_env(env), clock, MemoryStats().scope("ratelimit"))
