"""Throwaway Redis topologies for tests: a TLS server, a Sentinel group and a Cluster.

Each runs as real redis-server processes on loopback in a temporary directory, started by the
test session and stopped by pid; ``url`` is what ``REDIS_ENDPOINT`` would say.

    with tls_server() as url: ...        # rediss://127.0.0.1:P/0?ssl_ca_certs=...
    with sentinel_group() as group: ...  # group.url, group.kill_master()
    with cluster() as group: ...         # group.url, group.kill_master()
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import free_port


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = random.randint(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


_BASE = [
    *("--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--protected-mode", "no"),
    *("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"),  # replicas sync at once
]


@dataclass
class Group:
    """Running servers: their ports and processes, and the URL to reach them by."""

    url: str
    workdir: Path
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, timeout=10, check=False
        )
        return done.stdout.decode().strip()

    def stop(self, port: int) -> None:
        """SIGKILL one server (a crash, not a shutdown)."""
        proc = self.processes.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for port in list(self.processes):
            self.stop(port)


def start(group: Group, port: int, *args: str, sentinel: bool = False) -> None:
    logfile = group.workdir / f"{port}.log"
    if sentinel:
        conf = group.workdir / f"sentinel-{port}.conf"
        conf.write_text("\n".join(args) + "\n")
        argv = ["redis-server", str(conf), "--sentinel", "--port", str(port)]
    else:
        argv = ["redis-server", "--port", str(port), "--dir", str(group.workdir), *_BASE, *args]
    with logfile.open("wb") as log:
        group.processes[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    group.ports.append(port)
    wait_for(lambda: group.cli(port, "PING") == "PONG", f"redis on {port}")


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not ready within {timeout} s")


@contextlib.contextmanager
def tls_server() -> Iterator[str]:
    """One redis-server with TLS only, its certificate signed by a throwaway CA."""
    with tempfile.TemporaryDirectory(prefix="citadel-tls-") as tmp:
        d = Path(tmp)

        def ssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, capture_output=True, check=True)

        ssl(
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key"),
            *("-out", "ca.pem", "-days", "1", "-subj", "/CN=citadel test CA"),
        )
        ssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key"),
            *("-out", "server.csr", "-subj", "/CN=127.0.0.1"),
        )
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        ssl(
            *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext"),
        )
        port = free_port()
        argv = [
            *("redis-server", "--port", "0", "--tls-port", str(port), "--dir", tmp, *_BASE),
            *("--tls-cert-file", "server.pem", "--tls-key-file", "server.key"),
            *("--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"),
        ]
        with (d / "log").open("wb") as log:
            proc = subprocess.Popen(argv, cwd=d, stdout=log, stderr=subprocess.STDOUT)
        try:
            tls = ["--tls", "--cacert", str(d / "ca.pem")]
            wait_for(
                lambda: (
                    subprocess.run(
                        ["redis-cli", "-p", str(port), *tls, "PING"],
                        capture_output=True,
                        check=False,
                    ).stdout.strip()
                    == b"PONG"
                ),
                "TLS redis",
            )
            yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={d / 'ca.pem'}"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def sentinel_group(sentinels: int = 3, down_after_ms: int = 1000) -> Iterator[SentinelGroup]:
    """A master, a replica and ``sentinels`` Sentinels watching it as ``mymaster``."""
    with tempfile.TemporaryDirectory(prefix="citadel-sentinel-") as tmp:
        group = SentinelGroup(url="", workdir=Path(tmp))
        try:
            master, replica = free_port(), free_port()
            start(group, master)
            start(group, replica, "--replicaof", "127.0.0.1", str(master))
            group.data_ports = [master, replica]
            conf = [
                f"sentinel monitor mymaster 127.0.0.1 {master} 2",
                f"sentinel down-after-milliseconds mymaster {down_after_ms}",
                "sentinel failover-timeout mymaster 5000",
                "sentinel parallel-syncs mymaster 1",
            ]
            ports = [free_port() for _ in range(sentinels)]
            for port in ports:
                start(group, port, *conf, sentinel=True)
            group.sentinel_ports = ports
            hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
            group.url = f"redis+sentinel://{hosts}/mymaster/0"
            wait_for(
                lambda: group.cli(replica, "INFO", "replication").count("master_link_status:up"),
                "the replica's link",
            )
            yield group
        finally:
            group.close()


@dataclass
class SentinelGroup(Group):
    data_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)

    def master_port(self) -> int:
        reply = self.cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", "mymaster")
        return int(reply.split()[1])

    def kill_master(self) -> int:
        """SIGKILL the current master; the Sentinels promote the replica."""
        port = self.master_port()
        self.stop(port)
        return port


def replication_offsets(info: str) -> tuple[int, list[int]]:
    """A master's ``INFO replication``: its offset and the offset each replica acknowledged."""
    fields = dict(line.strip().split(":", 1) for line in info.splitlines() if ":" in line)
    replicas = [
        int(dict(kv.split("=", 1) for kv in v.split(","))["offset"])
        for k, v in fields.items()
        if k.startswith("slave") and k[5:].isdigit()
    ]
    return int(fields["master_repl_offset"]), replicas


@contextlib.contextmanager
def cluster(masters: int = 3, replicas: int = 1) -> Iterator[ClusterGroup]:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each."""
    with tempfile.TemporaryDirectory(prefix="citadel-cluster-") as tmp:
        group = ClusterGroup(url="", workdir=Path(tmp))
        try:
            ports = [cluster_port() for _ in range(masters * (1 + replicas))]
            for port in ports:
                start(
                    group,
                    port,
                    *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                    *("--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"),
                )
            subprocess.run(
                [
                    *("redis-cli", "--cluster", "create"),
                    *(f"127.0.0.1:{p}" for p in ports),
                    *("--cluster-replicas", str(replicas), "--cluster-yes"),
                ],
                capture_output=True,
                check=True,
                timeout=60,
            )
            wait_for(lambda: group.healthy(ports), "the cluster")
            # a replica can take over only once its first sync is done
            wait_for(lambda: group.replicas_synced(masters * replicas), "the replicas' sync")
            group.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:2])
            yield group
        finally:
            group.close()


@dataclass
class ClusterGroup(Group):
    def healthy(self, ports: list[int] | None = None) -> bool:
        return all(
            "cluster_state:ok" in self.cli(p, "CLUSTER", "INFO")
            for p in (ports or list(self.processes))
        )

    def master_of(self, key: str) -> int:
        live = next(iter(self.processes))
        slot = self.cli(live, "CLUSTER", "KEYSLOT", key)
        for line in self.cli(live, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= int(slot) <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise AssertionError(f"no master serves {key}")

    def replicas_synced(self, count: int) -> bool:
        synced = sum(
            "master_link_status:up" in self.cli(p, "INFO", "replication") for p in self.processes
        )
        return synced == count

    def masters(self) -> list[int]:
        """The ports of the live masters."""
        live = next(iter(self.processes))
        found = []
        for line in self.cli(live, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                found.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return found

    def kill_master(self, key: str) -> int:
        """SIGKILL the master serving ``key`` once its replica holds what it acknowledged so far
        (replication is asynchronous: a write in flight at the kill may still be lost, but not a
        backlog the replica had yet to fetch); its replica takes over."""
        port = self.master_of(key)
        self.wait_replicated(port)
        self.stop(port)
        return port

    def wait_replicated(self, port: int) -> None:
        """Until every replica of the master on ``port`` has acknowledged its current offset."""

        def offsets() -> tuple[int, list[int]]:
            return replication_offsets(self.cli(port, "INFO", "replication"))

        target, _ = offsets()
        wait_for(
            lambda: (found := offsets()[1]) and min(found) >= target,
            f"the replicas of {port} at offset {target}",
        )


KINDS = ("tls", "sentinel", "cluster")


class Topologies:
    """Each kind of topology, started on first use and kept for the test session."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._started: dict[str, str | SentinelGroup | ClusterGroup] = {}

    def __enter__(self) -> Topologies:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _get(self, kind: str) -> str | SentinelGroup | ClusterGroup:
        if kind not in self._started:
            starter = {"tls": tls_server, "sentinel": sentinel_group, "cluster": cluster}[kind]
            self._started[kind] = self._stack.enter_context(starter())  # type: ignore[operator]
        return self._started[kind]

    def url(self, kind: str) -> str:
        found = self._get(kind)
        return found if isinstance(found, str) else found.url

    def cluster(self) -> ClusterGroup:
        found = self._get("cluster")
        assert isinstance(found, ClusterGroup)
        return found


@pytest.fixture(scope="session")
def topologies() -> Iterator[Topologies]:
    """The TLS server, Sentinel group and Cluster of this test session (see Topologies)."""
    with Topologies() as found:
        yield found
