"""Real Redis Clusters and Sentinel setups for tests, built from tests/support/redis_fixtures.py servers.

A cluster is made of ``redis-server --cluster-enabled yes`` nodes on free ports, joined with
CLUSTER ADDSLOTSRANGE / MEET / REPLICATE (no redis-cli needed), and ready once every node reports
``cluster_state:ok``, knows every other node, and every replica's link to its master is up. A
Sentinel setup is a master, a replica and one ``redis-server --sentinel`` watching them (quorum 1),
all with passwords, ready once the sentinel sees the replica as healthy. Every wait polls with a
deadline; nothing sleeps for a fixed time.

Fixtures:
- ``redis_cluster`` (session): 3 masters, no replicas; shared, so tests use distinct keys or
  ``flushall()``.
- ``redis_cluster_factory`` (function): ``factory(masters=3, replicas=1, node_timeout_ms=...)``,
  for tests that break a cluster (failover); all nodes are killed at the end of the test.
- ``redis_sentinel`` (session) and ``redis_sentinel_factory`` (function): ``SentinelSetup``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from support.redis_fixtures import HOST, RedisServer, _binary_or_skip, free_port

READY_TIMEOUT_SECONDS = 20.0
SLOTS = 16384
MASTER_NAME = "mymaster"
REDIS_PASSWORD = "redis-pw-1"
SENTINEL_PASSWORD = "sentinel-pw-2"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = READY_TIMEOUT_SECONDS) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        else:
            if result:
                return result
        time.sleep(0.02)  # poll interval, not a wait for state
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last_error}" if last_error else ""))


class ExtraArgsServer(RedisServer):
    """A RedisServer with more command-line options (cluster mode, replication, passwords).

    A cluster node gets its bus port from ``--cluster-port`` (a free port of its own, kept across
    restarts on the same port): the default, port + 10000, may be taken or beyond 65535.
    """

    def __init__(
        self, binary: str, extra_args: Sequence[str], *, cluster: bool = False, **options: Any
    ) -> None:
        super().__init__(binary, **options)
        self.extra_args = list(extra_args)
        self.cluster = cluster
        self.bus_port = 0
        self._bus_for_port = -1

    def _args(self) -> list[str]:
        args = [*super()._args(), *self.extra_args]
        if self.cluster:
            if self._bus_for_port != self.port:  # a new attempt on a new port: a new bus port
                self.bus_port, self._bus_for_port = free_port(), self.port
            args += ["--cluster-port", str(self.bus_port)]
        return args

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info(section))


# -- Redis Cluster ---------------------------------------------------------------------------


class RedisCluster:
    """Cluster nodes; ``masters`` and ``replicas_of(master)`` as created (roles may change)."""

    def __init__(self, binary: str, masters: int, replicas: int, node_timeout_ms: int) -> None:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # Slots of a failed master fail alone; the rest of the cluster keeps serving.
            "--cluster-require-full-coverage", "no",
            # Replicas sync at once (the default waits 5 s for more replicas to share a sync).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        self.nodes = [ExtraArgsServer(binary, args, cluster=True) for _ in range(masters * (1 + replicas))]
        self.masters = self.nodes[:masters]
        self._replicas = [
            self.nodes[masters + index * replicas : masters + (index + 1) * replicas]
            for index in range(masters)
        ]

    def replicas_of(self, master: RedisServer) -> list[ExtraArgsServer]:
        """The replicas created for ``master`` (one of ``masters``)."""
        return self._replicas[self.masters.index(master)]  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        """REDIS_URL: every master as a seed."""
        return ",".join(node.url for node in self.masters)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        step = SLOTS // len(self.masters)
        for index, master in enumerate(self.masters):
            last = SLOTS - 1 if index == len(self.masters) - 1 else (index + 1) * step - 1
            with master.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", index * step, last)
        # Distinct config epochs from the start (as redis-cli --cluster create sets them): else the
        # nodes settle their epoch collisions by gossip for a while after they meet, and a slot
        # handed over meanwhile can bounce between nodes.
        for epoch, node in enumerate(self.nodes, start=1):
            with node.client() as client:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", HOST, node.port, node.bus_port)
        wait_for(self._all_know_each_other, "cluster nodes to meet")
        for master in self.masters:
            master_id = self.node_id(master)
            for replica in self.replicas_of(master):
                with replica.client() as client:
                    client.execute_command("CLUSTER", "REPLICATE", master_id)
        wait_for(self.healthy, "the cluster to be ready")

    def node_id(self, node: RedisServer) -> str:
        with node.client() as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def _all_know_each_other(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                lines = client.execute_command("CLUSTER", "NODES").decode().splitlines()
            if len(lines) < len(self.nodes) or any("handshake" in line for line in lines):
                return False
        return True

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok and every running replica is in sync."""
        for node in self.nodes:
            if not node.running:
                continue
            with node.client() as client:
                state = client.execute_command("CLUSTER", "INFO").decode()
                replication = client.info("replication")
            if "cluster_state:ok" not in state:
                return False
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def owner_of(self, key: str) -> ExtraArgsServer:
        """The running node that serves ``key``'s slot now (asked of any running node)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for node in self.nodes:
            if not node.running:
                continue
            with node.client() as client:
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no running node knows who serves {key!r}")

    def wait_replicated(self, master: RedisServer) -> None:
        """Every write so far on ``master`` has reached its replicas (WAIT)."""
        replicas = len(self.replicas_of(master))
        if replicas:
            with master.client() as client:
                acked = client.execute_command("WAIT", replicas, 5000)
            assert acked >= replicas, f"only {acked} of {replicas} replicas acknowledged"

    def flushall(self) -> None:
        for node in self.masters:
            if node.running:
                with node.client() as client:
                    with contextlib.suppress(redis.ResponseError):  # a replica now: read-only
                        client.flushall()

    def command_calls(self, node: RedisServer, command: str) -> int:
        with node.client() as client:
            stats = client.info("commandstats")
        entry = stats.get(f"cmdstat_{command.lower()}")
        return int(entry["calls"]) if entry else 0

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _start_cluster(masters: int, replicas: int, node_timeout_ms: int) -> RedisCluster:
    cluster = RedisCluster(_binary_or_skip(), masters, replicas, node_timeout_ms)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    # A long node timeout: this cluster never fails over, and a loaded CI machine must not make
    # nodes suspect one another.
    cluster = _start_cluster(masters=3, replicas=0, node_timeout_ms=15000)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_factory() -> Iterator[Callable[..., RedisCluster]]:
    clusters: list[RedisCluster] = []

    def factory(masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> RedisCluster:
        cluster = _start_cluster(masters, replicas, node_timeout_ms)
        clusters.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in clusters:
            cluster.close()


# -- Sentinel ----------------------------------------------------------------------------------


class SentinelProcess:
    """One ``redis-server <conf> --sentinel`` on a free port (TCP only), with a password."""

    def __init__(self, binary: str, master: RedisServer, directory: Path) -> None:
        self.binary = binary
        self.master = master
        self.dir = directory
        self.port = 0
        self.password = SENTINEL_PASSWORD
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        for _ in range(20):
            self.port = free_port()
            conf = self.dir / "sentinel.conf"
            conf.write_text(
                f"port {self.port}\n"
                f"bind {HOST}\n"
                f"dir {self.dir}\n"
                f"requirepass {self.password}\n"
                f"sentinel monitor {MASTER_NAME} {HOST} {self.master.port} 1\n"
                f"sentinel auth-pass {MASTER_NAME} {REDIS_PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
            )
            self._output = open(self.dir / "sentinel.log", "ab")  # closed in kill()
            self._process = subprocess.Popen(
                [self.binary, str(conf), "--sentinel"],
                stdout=self._output,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
            try:
                wait_for(self._answers, "the sentinel to answer PING", timeout=10)
                return
            except TimeoutError:
                log = (self.dir / "sentinel.log").read_text(errors="replace")
                self.kill()
                if "already in use" not in log:
                    raise RuntimeError(f"sentinel did not start:\n{log[-2000:]}") from None
        raise RuntimeError("sentinel could not bind a port")

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise TimeoutError("sentinel exited")
        with socket.create_connection((HOST, self.port), timeout=0.5):
            pass
        with self.client() as client:
            return bool(client.ping())

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=self.port, password=self.password, socket_timeout=5, retry=None
        )

    def kill(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process.wait()
            self._process = None
        if self._output is not None:
            self._output.close()
            self._output = None


class SentinelSetup:
    """A master, a replica and a sentinel; ``url`` is REDIS_URL for REDIS_TYPE=sentinel."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.master = ExtraArgsServer(
            binary,
            ["--masterauth", REDIS_PASSWORD, "--repl-diskless-sync-delay", "0"],
            requirepass=REDIS_PASSWORD,
        )
        self.replica: ExtraArgsServer | None = None
        self.sentinel: SentinelProcess | None = None

    @property
    def servers(self) -> list[ExtraArgsServer]:
        return [s for s in (self.master, self.replica) if s is not None]

    @property
    def url(self) -> str:
        assert self.sentinel is not None
        return f"{MASTER_NAME},{self.sentinel.url}"

    def start(self) -> None:
        self.master.start()
        replica_args = ["--masterauth", REDIS_PASSWORD, "--repl-diskless-sync-delay", "0"]
        replica_args += ["--replicaof", HOST, str(self.master.port)]
        self.replica = ExtraArgsServer(self.binary, replica_args, requirepass=REDIS_PASSWORD)
        self.replica.start()
        wait_for(lambda: self._link_up(self.replica), "the replica to sync")
        self.sentinel = SentinelProcess(self.binary, self.master, self.master.dir)
        self.sentinel.start()
        wait_for(self._replica_known, "the sentinel to see a healthy replica")

    @staticmethod
    def _link_up(server: RedisServer | None) -> bool:
        assert server is not None
        with server.client() as client:
            return client.info("replication").get("master_link_status") == "up"

    def _replica_known(self) -> bool:
        assert self.sentinel is not None
        with self.sentinel.client() as client:
            replicas = client.sentinel_slaves(MASTER_NAME)
        return any(
            r["is_slave"] and not r["is_sdown"] and r["master-link-status"] == "ok"
            for r in replicas
        )

    def master_port(self) -> int:
        """The master's port according to the sentinel."""
        assert self.sentinel is not None
        with self.sentinel.client() as client:
            _host, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
            )
        return int(port)

    def current_master(self) -> ExtraArgsServer:
        port = self.master_port()
        return next(server for server in self.servers if server.port == port)

    def failover(self) -> ExtraArgsServer:
        """SENTINEL FAILOVER; returns the new master once the sentinel names it and it is
        writable."""
        assert self.sentinel is not None
        old = self.master_port()
        with self.sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self.master_port() != old, "the sentinel to name a new master")
        new = self.current_master()
        wait_for(lambda: new.info("replication")["role"] == "master", "the promotion")
        return new

    def flushall(self) -> None:
        self.current_master().flushall()

    def close(self) -> None:
        if self.sentinel is not None:
            self.sentinel.kill()
        for server in self.servers:
            server.close()


def _start_sentinel() -> SentinelSetup:
    setup = SentinelSetup(_binary_or_skip())
    try:
        setup.start()
    except BaseException:
        setup.close()
        raise
    return setup


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelSetup]:
    setup = _start_sentinel()
    try:
        yield setup
    finally:
        setup.close()


@pytest.fixture
def redis_sentinel_factory() -> Iterator[Callable[[], SentinelSetup]]:
    setups: list[SentinelSetup] = []

    def factory() -> SentinelSetup:
        setup = _start_sentinel()
        setups.append(setup)
        return setup

    try:
        yield factory
    finally:
        for setup in setups:
            setup.close()
