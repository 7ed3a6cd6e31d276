"""A real Redis Cluster for the tests: 3 primaries and 3 replicas of the embedded stack's binary.

Each node is a child process (`cli.stack.spawn`, so it dies with the test process) on a free port,
with its append-only file and `nodes.conf` in a directory of its own. The cluster is formed by
`redis-cli --cluster create`, the tool shipped beside that `redis-server`. Every wait is on a
condition the nodes report (`cluster_state:ok`, replication links up and caught up), under a
deadline.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from cli import stack
from core.settings import Settings
from tests.support.waits import wait_for

HOST = stack.LOCALHOST
BUS_OFFSET = 10_000  # Redis listens for its cluster bus on port + 10000
# Ports below the kernel's ephemeral range (32768 up), so `stack.free_port` and outgoing
# connections rarely take one; the bus ports (30000-39999) are probed as well.
PORT_RANGE = range(20_000, 30_000)
NODE_TIMEOUT_MS = 1000  # a primary unreachable this long is failed over: a test waits seconds, not 15
START_DEADLINE = 30.0


def redis_cli_binary() -> str:
    """The `redis-cli` beside the `redis-server` the embedded stack runs (both come from one build)."""
    server = Path(stack.redis_binary())
    cli = server.with_name("redis-cli")
    if not cli.exists():
        raise RuntimeError(f"no redis-cli beside {server}")
    return str(cli)


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports whose cluster bus port (port + 10000) is free too."""
    chosen: list[int] = []
    candidates = random.sample(PORT_RANGE, len(PORT_RANGE))
    for port in candidates:
        if len(chosen) == count:
            break
        if not stack.port_in_use(HOST, port) and not stack.port_in_use(HOST, port + BUS_OFFSET):
            chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError(f"fewer than {count} free port pairs in {PORT_RANGE}")
    return chosen


@dataclass(frozen=True)
class NodeInfo:
    """One line of `CLUSTER NODES`, as a node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None  # for a replica, the id of its primary
    slots: tuple[str, ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags


def parse_cluster_nodes(text: str) -> list[NodeInfo]:
    nodes = []
    for line in text.strip().splitlines():
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        nodes.append(
            NodeInfo(
                node_id=fields[0],
                port=int(address.rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")),
                primary_id=None if fields[3] == "-" else fields[3],
                slots=tuple(fields[8:]),
            )
        )
    return nodes


@dataclass
class Node:
    port: int
    child: stack.Child

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.child.proc.poll() is None

    def client(self) -> Redis:
        """A plain client of this node alone (no redirections followed); close it after use."""
        return Redis(host=HOST, port=self.port, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)

    def info(self, section: str) -> dict[str, object]:
        with self.client() as r:
            return dict(r.info(section))

    def cluster_info(self) -> dict[str, str]:
        with self.client() as r:
            text = r.execute_command("CLUSTER", "INFO")
        assert isinstance(text, str)
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def cluster_nodes(self) -> list[NodeInfo]:
        with self.client() as r:
            # redis-py parses CLUSTER NODES into a dict; the raw text keeps every field.
            text = r.execute_command("CLUSTER", "NODES")
        assert isinstance(text, str)
        return parse_cluster_nodes(text)

    def myself(self) -> NodeInfo:
        return next(n for n in self.cluster_nodes() if "myself" in n.flags)


@dataclass
class LocalCluster:
    """The nodes started by `running_cluster`; who is primary is asked of the nodes, never assumed."""

    nodes: list[Node]
    data_dir: Path
    appendfsync: str = Settings.redis_appendfsync

    @property
    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.alive]

    @property
    def url(self) -> str:
        """A `REDIS_URL` naming one live node (the cluster client finds the others)."""
        return f"redis://{HOST}:{self.alive[0].port}/0"

    def node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def topology(self) -> list[NodeInfo]:
        """The cluster as a live node sees it."""
        return self.alive[0].cluster_nodes()

    def primaries(self) -> list[Node]:
        return [self.node(n.port) for n in self.topology() if n.is_primary and not n.failed]

    def replicas_of(self, primary: Node) -> list[Node]:
        seen = self.topology()
        primary_id = next(n.node_id for n in seen if n.port == primary.port)
        return [self.node(n.port) for n in seen if n.primary_id == primary_id and not n.failed]

    def healthy(self, *, replicas: int = 0) -> bool:
        """Every live node says `cluster_state:ok`, every primary has at least `replicas` replicas,
        and every replica has caught up with its primary (link up, no sync running, same
        replication offset)."""
        try:
            if any(node.cluster_info().get("cluster_state") != "ok" for node in self.alive):
                return False
            return all(self._replicas_in_sync(primary, replicas) for primary in self.primaries())
        except (OSError, RedisError):  # a node still starting, or the one just killed
            return False

    def _replicas_in_sync(self, primary: Node, wanted: int) -> bool:
        replicas = self.replicas_of(primary)
        if len(replicas) < wanted:
            return False
        offset = primary.info("replication").get("master_repl_offset")
        for replica in replicas:
            info = replica.info("replication")
            if info.get("master_link_status") != "up" or info.get("master_sync_in_progress") != 0:
                return False
            if info.get("slave_repl_offset") != offset:
                return False
        return True

    def wait_healthy(self, *, replicas: int = 0, timeout: float = START_DEADLINE) -> None:
        wait_for(lambda: self.healthy(replicas=replicas), timeout)

    def kill_primary(self, primary: Node, timeout: float = START_DEADLINE) -> Node:
        """SIGKILL `primary` (no shutdown, no last write to its file) and return its replica once
        that replica is a primary and every live node says the cluster is ok again."""
        replica = self.replicas_of(primary)[0]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(primary.child.proc.pid, signal.SIGKILL)
        primary.child.proc.wait(timeout)

        def promoted() -> bool:
            try:
                if not replica.myself().is_primary:
                    return False
                return all(node.cluster_info().get("cluster_state") == "ok" for node in self.alive)
            except (OSError, RedisError):  # a node still starting, or the one just killed
                return False

        wait_for(promoted, timeout)
        return replica

    def restart(self, node: Node, *, replicas: int = 1, timeout: float = START_DEADLINE) -> None:
        """Start a stopped node again on its port and directory (its `nodes.conf` makes it rejoin,
        as a replica of whoever took over its slots) and wait until the cluster is healthy with
        `replicas` replicas per primary, caught up."""
        assert not node.alive
        started = _start_node(self.data_dir, node.port, self.appendfsync)
        node.child = started.child
        self.wait_healthy(replicas=replicas, timeout=timeout)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.child.stop()


def _start_node(data_dir: Path, port: int, appendfsync: str) -> Node:
    node_dir = data_dir / f"redis-cluster-{port}"
    node_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        stack.redis_binary(), "--bind", HOST, "--port", str(port), "--dir", str(node_dir),
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        # A replica may take over however long ago it last heard from its primary: the tests kill
        # primaries on purpose and want the failover, not a cluster left down.
        "--cluster-replica-validity-factor", "0",
        "--appendonly", "yes", "--appendfsync", appendfsync,
        "--save", "", "--protected-mode", "no", "--loglevel", "warning",
        "--maxmemory", Settings.redis_maxmemory, "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    child = stack.spawn(f"redis-cluster-{port}", argv, data_dir / "logs")
    node = Node(port, child)
    try:
        stack.wait_for_port(HOST, port, START_DEADLINE, child.proc, what="redis-server", log_path=child.log_path)
    except BaseException:
        child.stop()
        raise
    return node


@contextlib.contextmanager
def running_cluster(
    data_dir: Path, primaries: int = 3, appendfsync: str = Settings.redis_appendfsync
) -> Iterator[LocalCluster]:
    """`primaries` primaries with one replica each, formed, in sync, and stopped when the block exits."""
    cluster = LocalCluster(nodes=[], data_dir=data_dir, appendfsync=appendfsync)
    try:
        for port in free_cluster_ports(primaries * 2):
            cluster.nodes.append(_start_node(data_dir, port, appendfsync))
        argv = [
            redis_cli_binary(), "--cluster", "create", *(node.address for node in cluster.nodes),
            "--cluster-replicas", "1", "--cluster-yes",
        ]  # fmt: skip
        created = subprocess.run(argv, capture_output=True, timeout=START_DEADLINE, check=False)
        if created.returncode != 0:
            raise stack.StartError(f"redis-cli --cluster create failed: {created.stdout.decode()[-500:]}")
        cluster.wait_healthy(replicas=1)
        yield cluster
    finally:
        cluster.stop()
