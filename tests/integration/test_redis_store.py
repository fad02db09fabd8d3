"""RedisStore against real Redis processes (tests/support/redis_fixtures.py): counters, keys and TTLs as
the reference writes them, one round trip per call, every way of connecting, bounded failures,
recovery, startup backoff with an injected sleep, and exactness under concurrency."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support.redis_fixtures import RedisServer, free_port

from ratelimit_svc.backends.redis import open_redis_store
from ratelimit_svc.backends.redis.connection import split_auth
from ratelimit_svc.backends.redis.single import RedisStore
from ratelimit_svc.errors import BackendError, CounterError
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.settings.model import RedisSettings

KEY = "basic_key1_foo_1700000005"
LOGGER = "ratelimit_svc.backends.redis"


def tcp(url: str, **options: Any) -> RedisSettings:
    return RedisSettings(socket_type="tcp", url=url, **options)


def tls_settings(server: RedisServer, **options: Any) -> RedisSettings:
    assert server.tls_files is not None
    files = server.tls_files
    defaults: dict[str, Any] = {
        "tls": True,
        "tls_cacert": str(files.ca),
        "tls_client_cert": str(files.client_cert),
        "tls_client_key": str(files.client_key),
    }
    return tcp(server.url, **{**defaults, **options})


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., RedisStore]]:
    """Build RedisStores that are closed at the end of the test, whatever happens."""
    stores: list[RedisStore] = []

    def make(cfg: RedisSettings, op_timeout: float = 2.0) -> RedisStore:
        store = RedisStore(cfg, op_timeout=op_timeout)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class FakeSleep:
    """Records the backoff intervals instead of sleeping; runs ``on_call[n]`` at the n-th call."""

    def __init__(self, on_call: dict[int, Callable[[], None]] | None = None) -> None:
        self.intervals: list[float] = []
        self.on_call = on_call or {}

    async def __call__(self, seconds: float) -> None:
        self.intervals.append(seconds)
        action = self.on_call.get(len(self.intervals))
        if action is not None:
            action()




def resp(*args: str | int) -> bytes:
    """One command in the Redis wire protocol, as the reference's client sends it."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def command_calls(server: RedisServer) -> dict[str, int]:
    with server.client() as admin:
        stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}


def other_clients(server: RedisServer) -> list[dict[str, Any]]:
    """CLIENT LIST without the admin connection asking."""
    with server.client() as admin:
        me = admin.client_id()
        return [c for c in admin.client_list() if int(c["id"]) != me]


# -- counters, keys, TTLs ------------------------------------------------------------------


async def test_increment_returns_each_counter_after_the_increment(
    redis_db: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    store = make_store(tcp(redis_db.url))
    both = [Increment("a_1", 1, 60, 60), Increment("b_1", 3, 60, 60)]
    assert await store.increment(both) == [1, 3]
    assert await store.increment(both) == [2, 6]
    assert await store.get(["a_1", "b_1", "missing"]) == [2, 6, 0]
    assert await store.increment([]) == []
    assert await store.get([]) == []


async def test_expire_is_set_to_the_ttl(
    redis_db: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    store = make_store(tcp(redis_db.url))
    await store.increment([Increment(KEY, 1, 1, 301), Increment("hour_key", 2, 3600, 3600)])
    with redis_db.client() as admin:
        assert 299 <= admin.ttl(KEY) <= 301
        assert 3598 <= admin.ttl("hour_key") <= 3600


async def test_keys_are_byte_identical_to_what_is_passed(
    redis_db: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    store = make_store(tcp(redis_db.url))
    keys = [KEY, "prefix:basic_key1_foo_1700000005", "d_k_caf\u00e9 \u2603_1699920000"]
    await store.increment([Increment(k, 7, 60, 60) for k in keys])
    with redis_db.client() as admin:
        assert sorted(admin.keys("*")) == sorted(k.encode() for k in keys)
        assert admin.get(KEY.encode()) == b"7"
    assert await store.get(keys) == [7, 7, 7]


async def test_increment_is_one_write_of_all_commands_and_one_round_trip(
    redis_db: RedisServer,
    make_store: Callable[..., RedisStore],
    socket_writes: list[bytes],
) -> None:
    store = make_store(tcp(redis_db.url))
    await store.ping()  # the connection handshake has its own writes; measure after it
    socket_writes.clear()
    before = command_calls(redis_db)

    values = await store.increment([Increment(KEY, 1, 1, 301), Increment("k2_1", 5, 60, 77)])

    assert values == [1, 5]
    expected = resp("INCRBY", KEY, 1) + resp("EXPIRE", KEY, 301)
    expected += resp("INCRBY", "k2_1", 5) + resp("EXPIRE", "k2_1", 77)
    assert socket_writes == [expected]
    after = command_calls(redis_db)
    assert after["incrby"] - before.get("incrby", 0) == 2
    assert after["expire"] - before.get("expire", 0) == 2


async def test_get_is_one_mget(
    redis_db: RedisServer,
    make_store: Callable[..., RedisStore],
    socket_writes: list[bytes],
) -> None:
    store = make_store(tcp(redis_db.url))
    await store.ping()
    socket_writes.clear()
    assert await store.get(["a_1", "b_1"]) == [0, 0]
    assert socket_writes == [resp("MGET", "a_1", "b_1")]


async def test_exactly_1_to_200_for_200_concurrent_increments(
    redis_db: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    store = make_store(tcp(redis_db.url, pool_size=10))
    results = await asyncio.gather(
        *(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(200))
    )
    assert sorted(values[0] for values in results) == list(range(1, 201))
    assert await store.get([KEY]) == [200]


async def test_key_error_reply_is_a_counter_error_and_the_connection_stays_in_step(
    redis_db: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    store = make_store(tcp(redis_db.url, pool_size=1))
    with redis_db.client() as admin:
        admin.lpush("a_list", "x")
        admin.set("not_a_number", "abc")
    with pytest.raises(CounterError, match="'a_list' cannot be counted: WRONGTYPE"):
        await store.increment([Increment("a_list", 1, 60, 60), Increment("ok_1", 1, 60, 60)])
    with pytest.raises(CounterError, match="'not_a_number' holds b'abc'"):
        await store.get(["not_a_number"])
    # One pooled connection: a desynchronised socket would hand these calls earlier replies.
    assert await store.increment([Increment("fresh_1", 9, 60, 60)]) == [9]
    assert await store.get(["ok_1", "fresh_1"]) == [1, 9]


# -- ways of connecting --------------------------------------------------------------------


async def test_unix_socket(redis_db: RedisServer, make_store: Callable[..., RedisStore]) -> None:
    store = make_store(RedisSettings(socket_type="unix", url=redis_db.unix_path))
    assert await store.increment([Increment(KEY, 4, 60, 60)]) == [4]
    with redis_db.client() as admin:
        assert admin.get(KEY) == b"4"


def test_split_auth_uses_the_first_colon() -> None:
    assert split_auth("") == (None, None)
    assert split_auth("pw") == (None, "pw")
    assert split_auth("alice:pa:ss") == ("alice", "pa:ss")


async def test_auth_password(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(requirepass="s3cret-pw")
    store = make_store(tcp(server.url, auth="s3cret-pw"))
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]


async def test_auth_user_and_password(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(requirepass="admin-pw", users=["alice on >pa:ss-9 ~* +@all"])
    store = make_store(tcp(server.url, auth="alice:pa:ss-9"))
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
    assert [c["user"] for c in other_clients(server)] == ["alice"]


@pytest.mark.parametrize(
    ("users", "auth", "secret"),
    [
        ((), "wrong-pw-1234", "wrong-pw-1234"),
        (("alice on >right-pw ~* +@all",), "alice:wrong-pw-5678", "wrong-pw-5678"),
    ],
    ids=["password", "user:password"],
)
async def test_wrong_credentials_fail_without_showing_them(
    redis_server_factory: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
    users: tuple[str, ...],
    auth: str,
    secret: str,
) -> None:
    server = redis_server_factory(requirepass="right-pw", users=users)
    caplog.set_level(logging.DEBUG)
    sleep = FakeSleep()
    with pytest.raises(BackendError) as caught:
        await open_redis_store(
            tcp(server.url, auth=auth),
            op_timeout=2.0,
            startup_initial_interval=1.0,
            startup_max_interval=1.0,
            startup_max_elapsed=2.0,
            sleep=sleep,
        )
    message = str(caught.value)
    assert message.startswith("redis: ")
    assert server.url in message
    assert "gave up after 3 attempts" in message
    assert sleep.intervals == [1.0, 1.0]
    assert secret not in message
    assert caught.value.__cause__ is None
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING] * 2
    assert secret not in caplog.text
    store = RedisStore(tcp(server.url, auth=auth), op_timeout=1.0)
    assert secret not in repr(store)
    await store.close()


# -- TLS -----------------------------------------------------------------------------------


async def test_tls_with_ca_and_client_certificate(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(tls=True, tls_auth_clients="yes")
    store = make_store(tls_settings(server))
    assert await store.increment([Increment(KEY, 2, 60, 60)]) == [2]
    with server.client() as admin:
        assert admin.get(KEY) == b"2"


async def test_tls_server_requiring_a_client_certificate_refuses_one_without(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(tls=True, tls_auth_clients="yes")
    store = make_store(tls_settings(server, tls_client_cert="", tls_client_key=""))
    with pytest.raises(BackendError, match=f"^redis: .*{server.port}"):
        await store.ping()


async def test_tls_untrusted_server_certificate_is_refused(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(tls=True)
    assert server.tls_files is not None
    store = make_store(tls_settings(server, tls_cacert=str(server.tls_files.other_ca)))
    with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
        await store.ping()


async def test_tls_hostname_verification_and_skipping_it(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory(tls=True, tls_hostnames=["redis.invalid"])
    checked = make_store(tls_settings(server))
    with pytest.raises(BackendError, match=r"CERTIFICATE_VERIFY_FAILED.*(?i:hostname|IP address)"):
        await checked.ping()
    unchecked = make_store(tls_settings(server, tls_skip_hostname_verification=True))
    assert await unchecked.increment([Increment(KEY, 1, 60, 60)]) == [1]
    # Skipping the name check still verifies the chain.
    assert server.tls_files is not None
    untrusted = make_store(
        tls_settings(
            server, tls_skip_hostname_verification=True, tls_cacert=str(server.tls_files.other_ca)
        )
    )
    with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusted.ping()


def test_tls_over_a_unix_socket_is_refused() -> None:
    with pytest.raises(
        BackendError, match="REDIS_TLS is not supported with REDIS_SOCKET_TYPE=unix"
    ):
        RedisStore(RedisSettings(socket_type="unix", url="/tmp/x.sock", tls=True), op_timeout=1)


# -- pool ----------------------------------------------------------------------------------


async def test_one_connection_carries_every_concurrent_call_in_one_write(
    redis_db: RedisServer, make_store: Callable[..., RedisStore], socket_writes: list[bytes]
) -> None:
    """Commands of calls made in one loop turn leave in one socket write, on one connection,
    whatever REDIS_POOL_SIZE says (docs/backends.md, The client)."""
    store = make_store(tcp(redis_db.url, pool_size=3))
    await store.ping()
    socket_writes.clear()

    results = await asyncio.gather(
        *(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(100))
    )

    assert sorted(r[0] for r in results) == list(range(1, 101))
    assert len(socket_writes) == 1
    assert socket_writes[0] == (resp("INCRBY", KEY, 1) + resp("EXPIRE", KEY, 60)) * 100
    assert len(other_clients(redis_db)) == 1
    assert store.pool_stats() == {"cx_active": 1, "cx_total": 1, "cx_local_close": 0}
    await store.close()
    assert store.pool_stats() == {"cx_active": 0, "cx_total": 1, "cx_local_close": 1}


# -- failures and recovery -----------------------------------------------------------------


async def test_hung_server_times_out_and_no_stale_reply_is_read_later(
    redis_db: RedisServer, make_store: Callable[..., RedisStore]
) -> None:
    op_timeout = 0.3
    store = make_store(tcp(redis_db.url, pool_size=2), op_timeout=op_timeout)
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
    assert await store.get([KEY]) == [1]

    redis_db.stop()
    try:
        started = time.monotonic()
        # Three calls on a pool of two: both connections get a request stuck in flight, the
        # third waits for a connection; every one must answer within the bound.
        outcomes = await asyncio.gather(
            store.increment([Increment(KEY, 1, 60, 60)]),
            store.increment([Increment(KEY, 1, 60, 60)]),
            store.get([KEY]),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    finally:
        redis_db.cont()

    assert all(isinstance(o, BackendError) for o in outcomes), outcomes
    assert elapsed < op_timeout + 0.5
    assert any(str(redis_db.port) in str(o) for o in outcomes)

    # The server now answers the stuck requests too; none of those replies may reach these calls.
    for hits in (5, 6, 7, 8):
        assert await store.increment([Increment(f"fresh_{hits}", hits, 60, 60)]) == [hits]
    assert await store.get([f"fresh_{h}" for h in (5, 6, 7, 8)]) == [5, 6, 7, 8]
    with redis_db.client() as admin:
        stored = int(admin.get(KEY))
    assert 1 <= stored <= 3  # the stuck increments may or may not have been applied
    assert await store.increment([Increment(KEY, 10, 60, 60)]) == [stored + 10]


async def test_killed_server_fails_fast_and_restart_recovers_the_same_store(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory()
    store = make_store(tcp(server.url, pool_size=2), op_timeout=5.0)
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]

    server.kill()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(BackendError, match=f"^redis: .*{server.port}"):
            await store.increment([Increment(KEY, 1, 60, 60)])
        assert time.monotonic() - started < 0.5  # refused at once, not the 5 s timeout

    server.restart()
    assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]  # new empty server
    assert await store.get([KEY]) == [1]


async def test_restart_between_calls_is_invisible(
    redis_server_factory: Callable[..., RedisServer], make_store: Callable[..., RedisStore]
) -> None:
    server = redis_server_factory()
    store = make_store(tcp(server.url, pool_size=3), op_timeout=2.0)
    await asyncio.gather(*(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(10)))
    assert store.pool_stats()["cx_active"] == 1

    server.restart()
    # restart() blocked the event loop; a running service's loop would already have seen the
    # old server's FIN on the pooled sockets. A few loop passes (no wall-clock wait) do the same.
    for _ in range(3):
        await asyncio.sleep(0)

    results = await asyncio.gather(
        *(store.increment([Increment(KEY, 1, 60, 60)]) for _ in range(10))
    )
    assert sorted(r[0] for r in results) == list(range(1, 11))


# -- startup -------------------------------------------------------------------------------


async def test_startup_retries_with_exponential_backoff_until_the_server_answers(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens here until the fourth sleep
    sleep = FakeSleep(on_call={4: lambda: redis_server_factory(port=port)})
    caplog.set_level(logging.WARNING, logger=LOGGER)

    store = await open_redis_store(
        tcp(f"127.0.0.1:{port}", auth="", pool_size=2),
        op_timeout=1.0,
        startup_initial_interval=0.5,
        startup_max_interval=3.0,
        startup_max_elapsed=0,
        sleep=sleep,
    )
    try:
        assert sleep.intervals == [0.5, 1.0, 2.0, 3.0]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 4
        assert all(f"127.0.0.1:{port}" in w for w in warnings), warnings
        assert await store.increment([Increment(KEY, 1, 60, 60)]) == [1]
    finally:
        await store.close()


async def test_startup_gives_up_after_max_elapsed(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    sleep = FakeSleep()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(BackendError) as caught:
        await open_redis_store(
            tcp(f"127.0.0.1:{port}", auth="alice:top-secret-42"),
            op_timeout=1.0,
            startup_initial_interval=1.0,
            startup_max_interval=4.0,
            startup_max_elapsed=10.0,
            sleep=sleep,
        )
    # 1 + 2 + 4 = 7 s, then the remaining 3 s, then one last attempt at 10 s.
    assert sleep.intervals == [1.0, 2.0, 4.0, 3.0]
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "gave up after 5 attempts" in message
    assert "top-secret-42" not in message
    assert "top-secret-42" not in caplog.text
    assert len(caplog.records) == 4


@pytest.mark.parametrize(
    ("redis_type", "url", "store_class"),
    [("sentinel", "mymaster,127.0.0.1:1", "SentinelStore"), ("cluster", "127.0.0.1:1", "ClusterStore")],
)
async def test_open_redis_store_picks_the_store_for_redis_type(
    redis_type: str, url: str, store_class: str
) -> None:
    """Sentinel and cluster have their own stores (tests/test_sentinel.py, test_redis_cluster.py);
    RedisStore itself is only for REDIS_TYPE=single."""
    sleep = FakeSleep()
    with pytest.raises(BackendError, match="gave up after"):
        await open_redis_store(
            tcp(url, type=redis_type),
            op_timeout=1.0,
            startup_initial_interval=1.0,
            startup_max_interval=1.0,
            startup_max_elapsed=0.001,
            sleep=sleep,
        )
    from ratelimit_svc.backends.redis import create_redis_store

    store = create_redis_store(tcp(url, type=redis_type), op_timeout=1.0)
    assert type(store).__name__ == store_class
    await store.close()
    with pytest.raises(BackendError, match=f"RedisStore is for REDIS_TYPE=single, not '{redis_type}'"):
        RedisStore(tcp(url, type=redis_type), op_timeout=1.0)


@pytest.mark.parametrize("url", ["localhost", "localhost:", ":6379", "host:port", "h:70000"])
def test_invalid_tcp_url(url: str) -> None:
    with pytest.raises(BackendError, match="invalid REDIS_URL"):
        RedisStore(tcp(url), op_timeout=1.0)


def test_repr_names_the_server_and_never_the_credentials() -> None:
    store = RedisStore(tcp("10.0.0.1:6379", auth="bob:hunter2", pool_size=4), op_timeout=1.0)
    assert repr(store) == "RedisStore(tcp 10.0.0.1:6379)"
