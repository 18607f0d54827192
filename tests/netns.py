"""Hosts as network namespaces: each on its own address on one bridge, reachable from the test.

    with Hosts() as hosts:
        redis = hosts.add("redis")                  # 10.N.0.2, its own network stack
        proc = hosts.run("redis", ["redis-server", "--bind", redis.address, ...])
        hosts.cut("redis")                          # its link down: unreachable
        hosts.heal("redis")

Needs root (``ip netns add``, veth pairs, a bridge: iproute2). Everything it makes has a name of
its own (a random tag), and ``close`` stops its processes by pid and deletes its namespaces and
links, so several runs can share the machine.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str
    link: str  # the veth end on the bridge side: down cuts the host off


class Hosts:
    """A bridge and the namespaces on it; see the module docstring."""

    def __init__(self) -> None:
        self.tag = f"{random.randrange(16**4):04x}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"cbr{self.tag}"
        self.hosts: dict[str, Host] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="citadel-hosts-"))
        self.cleanup: list[Path] = []  # directories removed by close, after the processes

    def __enter__(self) -> Hosts:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add(self, name: str) -> Host:
        index = len(self.hosts) + 2
        namespace = f"c{self.tag}-{name}"
        outer, inner = f"c{self.tag}o{index}", f"c{self.tag}i{index}"
        ip("netns", "add", namespace)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", namespace)
        ip("link", "set", outer, "master", self.bridge)
        ip("link", "set", outer, "up")
        address = f"{self.subnet}.{index}"
        ns = ("-n", namespace)
        ip(*ns, "addr", "add", f"{address}/24", "dev", inner)
        ip(*ns, "link", "set", inner, "up")
        ip(*ns, "link", "set", "lo", "up")
        ip(*ns, "route", "add", "default", "via", f"{self.subnet}.1")
        host = Host(name, namespace, address, outer)
        self.hosts[name] = host
        return host

    def run(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on host ``name``; its output goes to a log file (``log``)."""
        path = self.logs / f"{name}-{len(self.processes)}.log"
        with path.open("wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[name].namespace, *argv],
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc.citadel_log = str(path)  # type: ignore[attr-defined]
        self.processes.append(proc)
        return proc

    def cut(self, name: str) -> None:
        ip("link", "set", self.hosts[name].link, "down")

    def heal(self, name: str) -> None:
        ip("link", "set", self.hosts[name].link, "up")

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def redis_cli(host: str, port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", host, "-p", str(port), *args],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.stdout.decode()


def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.1)


def _postgres_bin() -> Path:
    versions = sorted(os.listdir("/usr/lib/postgresql"), key=int)  # Debian's layout
    return Path("/usr/lib/postgresql") / versions[-1] / "bin"


def start_postgres(hosts: Hosts) -> str:
    """A PostgreSQL server of its own on host "postgres" (a new cluster made by initdb, trust
    auth, no fsync); returns the URL of its ``postgres`` database."""
    host = hosts.add("postgres")
    data = Path(tempfile.mkdtemp(prefix="citadel-pg-"))
    shutil.chown(data, "postgres", "postgres")  # the server refuses to run as root
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]  # execs
    bin_ = _postgres_bin()
    initdb = [str(bin_ / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    subprocess.run(
        [*as_postgres, *initdb, "--no-sync", "--no-instructions"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with (data / "pg_hba.conf").open("a") as hba:  # every host on the bridge, the test's too
        hba.write(f"host all all {hosts.subnet}.0/24 trust\n")
    hosts.run(
        host.name,
        [
            *as_postgres,
            *(str(bin_ / "postgres"), "-D", str(data), "-h", host.address, "-p", "5432"),
            *("-k", str(data), "-c", "fsync=off", "-c", "max_connections=200"),
        ],
    )
    hosts.cleanup.append(data)

    def ready() -> bool:
        check = ["pg_isready", "-q", "-h", host.address, "-p", "5432"]
        return subprocess.run(check, capture_output=True, check=False).returncode == 0

    until(ready, "postgresql", timeout=30)
    return f"postgresql://postgres@{host.address}:5432/postgres"


def start_redis(hosts: Hosts, topology: str) -> str:
    """One Redis server on host "redis" ("server"; "replicated": with a replica on host
    "redis-replica", as a production server would have), or a Cluster of three masters and three
    replicas on hosts "redis-1..3" (a master and another master's replica on each); returns its
    URL."""
    base = [
        *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
        *("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"),
    ]
    if topology in ("server", "replicated"):
        redis = hosts.add("redis")
        hosts.run("redis", ["redis-server", "--bind", redis.address, "--port", "6379", *base])
        until(lambda: "PONG" in redis_cli(redis.address, 6379, "PING"), "redis")
        if topology == "replicated":
            replica = hosts.add("redis-replica")
            hosts.run(
                replica.name,
                [
                    *("redis-server", "--bind", replica.address, "--port", "6379", *base),
                    *("--replicaof", redis.address, "6379"),
                ],
            )
            until(
                lambda: "master_link_status:up" in redis_cli(replica.address, 6379, "INFO"),
                "the replica's sync",
            )
        return f"redis://{redis.address}:6379/0"
    nodes = []
    for i in (1, 2, 3):
        host = hosts.add(f"redis-{i}")
        for port in (7000, 7001):
            hosts.run(
                host.name,
                [
                    *("redis-server", "--bind", host.address, "--port", str(port), *base),
                    *("--cluster-enabled", "yes", "--cluster-node-timeout", "1000"),
                    *("--cluster-config-file", f"/tmp/nodes-{hosts.tag}-{i}-{port}.conf"),
                    *("--cluster-replica-validity-factor", "0"),
                ],
            )
            nodes.append((host.address, port))
    for address, port in nodes:
        until(lambda a=address, p=port: "PONG" in redis_cli(a, p, "PING"), "a cluster node")
    # masters first: redis-cli makes the first three masters and spreads the replicas
    order = [n for n in nodes if n[1] == 7000] + [n for n in nodes if n[1] == 7001]
    subprocess.run(
        [
            *("redis-cli", "--cluster", "create", *(f"{a}:{p}" for a, p in order)),
            *("--cluster-replicas", "1", "--cluster-yes"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    until(
        lambda: all("cluster_state:ok" in redis_cli(a, p, "CLUSTER", "INFO") for a, p in nodes),
        "the cluster",
    )
    until(
        lambda: sum("master_link_status:up" in redis_cli(a, p, "INFO") for a, p in nodes) == 3,
        "the replicas' sync",
    )
    return "redis+cluster://" + ",".join(f"{a}:{p}" for a, p in order[:3])
