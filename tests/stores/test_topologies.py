"""Every Redis topology carries the shared state: one server (DB from CITADEL_TEST_REDIS), a TLS
server, a Sentinel group and a Redis Cluster, all real redis-server processes
(``redis_topologies``). The same assertions run on each; the fault cases (slot moves, a master
killed) start topologies of their own."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from redis_topologies import KINDS, ClusterGroup, Topologies, cluster, sentinel_group, wait_for
from sqlalchemy import func, select

from citadel.errors import ConfigError, StoreUnavailable
from citadel.limits.decision import Limits
from citadel.limits.redis import RedisLimiter
from citadel.metering.migrate import LEDGER
from citadel.metering.schema import usage_events
from citadel.metering.sinks import RedisStreamSink
from citadel.metering.spool import Spool
from citadel.metering.writer import LedgerWriter
from citadel.metrics import Registry
from citadel.routing.breaker import BreakerState
from citadel.routing.router import Router
from citadel.routing.shared import SharedRoutingState
from citadel.settings import Settings, load_settings
from citadel.stores.endpoint import RedisStore, connect_redis, parse
from citadel.stores.redis import Arg, RedisClient, RedisError, Script
from citadel.stores.sql import build_engine

from support import usage_event

SERVER = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")
ALL = ("server", *KINDS)
NOW = 1_800_000_000.0
CONFIG = """
routing:
  breaker: {consecutive_failures: 2, open_seconds: 30, max_open_seconds: 60}
models:
  - name: pool
    deployments:
      - {name: d-1, url: "http://127.0.0.1:9"}
      - {name: d-2, url: "http://127.0.0.1:9"}
"""


def url_of(kind: str, topologies: Topologies) -> str:
    return SERVER if kind == "server" else topologies.url(kind)


class Recording:
    """A store that records the keys of every script call before passing it on."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.calls: list[tuple[str, list[str]]] = []

    @property
    def address(self) -> str:
        return self.store.address

    async def execute(self, *args: Arg) -> Any:
        return await self.store.execute(*args)

    async def pipeline(self, commands: Sequence[tuple[Arg, ...]]) -> list[Any]:
        return await self.store.pipeline(commands)

    async def evalsha(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], *, deferred: float = 0.0
    ) -> Any:
        self.calls.append((script.sha, [str(k) for k in keys]))
        return await self.store.evalsha(script, keys, args, deferred=deferred)

    async def ping(self) -> None:
        await self.store.ping()

    async def aclose(self) -> None:
        await self.store.aclose()


# -- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "nodes", "db", "service"),
    [
        ("redis://h:1/2", "server", (("h", 1),), 2, ""),
        ("rediss://:pw@h/0?ssl_cert_reqs=none", "server", (("h", 6379),), 0, ""),
        ("redis+sentinel://a,b:2/mymaster/3", "sentinel", (("a", 26379), ("b", 2)), 3, "mymaster"),
        ("redis+cluster://a:7000,[::1]:7001", "cluster", (("a", 7000), ("::1", 7001)), 0, ""),
    ],
)
def test_urls_name_the_topology(
    url: str, kind: str, nodes: tuple[tuple[str, int], ...], db: int, service: str
) -> None:
    """Each scheme parses to its kind, nodes (default ports filled in), db and service."""
    endpoint = parse(url)
    assert (kind, nodes, db, service) == (
        endpoint.kind,
        endpoint.nodes,
        endpoint.db,
        endpoint.service,
    )
    assert (endpoint.tls is not None) == url.startswith("rediss")


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "redis://a,b/0",
        "redis://h/x",
        "redis+sentinel://a,b",
        "redis+sentinel://a/m/x",
        "redis+cluster://a/0",
        "redis+cluster://a:port",
        "rediss://h/0?ssl_cert_reqs=maybe",
        "rediss://h/0?ssl_ca_certs=/nonexistent.pem",
    ],
)
def test_bad_urls_fail_at_start(url: str) -> None:
    """A malformed endpoint is a ConfigError naming it, before anything connects."""
    with pytest.raises(ConfigError, match="redis url"):
        connect_redis(url, timeout=1.0)


def test_tls_with_an_unknown_ca_is_unavailable(topologies: Topologies, tmp_path: Path) -> None:
    """A TLS server whose certificate the client cannot verify is a StoreUnavailable, at once."""
    url = topologies.url("tls").split("?")[0]  # the system CAs do not know the throwaway one

    async def body() -> None:
        store = connect_redis(url, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            await store.ping()
        assert time.monotonic() - started < 1.5
        await store.aclose()

    asyncio.run(body())


# -- the same assertions on each topology -------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_every_script_call_touches_one_slot(kind: str, topologies: Topologies) -> None:
    """The limiter's and the routing state's Lua calls each take keys of one hash slot."""

    async def body() -> None:
        store = Recording(connect_redis(url_of(kind, topologies), timeout=2.0))
        limiter = RedisLimiter(store, "UTC", 600.0)
        limits = Limits(
            requests_per_minute=10,
            tokens_per_minute=1000,
            concurrent_requests=2,
            tokens_per_day=10_000,
            tokens_per_month=100_000,
            cost_per_month_micros=1_000_000,
        )
        principal = f"slots-{uuid.uuid4().hex}"
        got = await limiter.admit(
            principal, limits, lease_id="l1", tokens=10, cost_micros=5, now=NOW
        )
        assert got.allowed
        assert got.reservation is not None
        await limiter.reconcile(got.reservation, limits, tokens=4, cost_micros=2, now=NOW + 1)
        await limiter.usage(principal, limits, NOW + 2)
        await limiter.reset(principal)
        shared = SharedRoutingState(store, replica="a", prefix=f"slots-{uuid.uuid4().hex}")
        await shared.pull(["d-1", "d-2", "d-3"])
        assert 4 == len(store.calls)
        for _, keys in store.calls:
            assert 1 == len({key_slot(k.encode()) for k in keys}), keys
        await store.aclose()

    asyncio.run(body())


def test_a_cross_slot_script_is_refused_by_the_cluster(topologies: Topologies) -> None:
    """The check above matters: the Cluster refuses a script whose keys span two slots."""

    async def body() -> None:
        store = connect_redis(topologies.url("cluster"), timeout=2.0)
        assert key_slot(b"{a}x") != key_slot(b"{b}x")
        try:
            with pytest.raises(RedisError, match="same slot"):
                await store.evalsha(Script("return 1"), ["{a}x", "{b}x"], [])
        finally:
            await store.aclose()

    asyncio.run(body())


def test_concurrent_cluster_calls_share_writes_and_keep_their_own_replies(
    topologies: Topologies,
) -> None:
    """The calls of one turn of the loop go to the Cluster as one pipeline (one write per node,
    few connections), yet each keeps its own reply: values, an error reply, NOSCRIPT answered
    with EVAL, and a cross-slot script refused alone."""
    from citadel.stores.topology import ClusterClient

    prefix = uuid.uuid4().hex

    async def body() -> None:
        store = connect_redis(topologies.url("cluster"), timeout=2.0)
        assert isinstance(store, ClusterClient)
        try:
            await store.execute("SET", f"{prefix}:string", "x")
            keys = [f"{prefix}:{i}" for i in range(300)]
            fresh = Script(f"return {{KEYS[1], '{prefix}'}}")  # never loaded: NOSCRIPT first
            replies = await asyncio.gather(
                *(store.execute("INCRBY", key, i) for i, key in enumerate(keys)),
                store.execute("INCR", f"{prefix}:string"),
                store.evalsha(fresh, [f"{{{prefix}}}k"], []),
                store.evalsha(Script("return 1"), ["{a}x", "{b}x"], []),
                return_exceptions=True,
            )
            assert list(range(300)) == replies[:300]
            assert isinstance(replies[300], RedisError)
            assert "not an integer" in str(replies[300])
            assert [f"{{{prefix}}}k".encode(), prefix.encode()] == replies[301]
            assert isinstance(replies[302], RedisError)
            assert "same slot" in str(replies[302])
            # 303 calls at once: batched, they needed about one connection per master, not 303
            assert len(store._opened) <= 6
            assert [b"299"] == [await store.execute("GET", keys[-1])]
        finally:
            await store.aclose()

    asyncio.run(body())


@pytest.mark.parametrize("kind", ALL)
def test_a_breaker_opened_on_one_replica_holds_the_others(
    kind: str, topologies: Topologies, tmp_path: Path
) -> None:
    """Replica A's breaker opening reaches B and C through each topology; both route around."""
    path = tmp_path / "citadel.yaml"
    path.write_text(CONFIG)
    settings: Settings = load_settings(str(path), {})
    prefix = f"breaker-{uuid.uuid4().hex}"

    async def body() -> None:
        routers, states = [], []
        for name in ("a", "b", "c"):
            shared = SharedRoutingState(
                connect_redis(url_of(kind, topologies), timeout=2.0), replica=name, prefix=prefix
            )
            router = Router(
                settings,
                registry=Registry(),
                rng=random.Random(7),
                on_transition=shared.on_transition,
            )
            routers.append(router)
            states.append(shared)
        a = routers[0].states["d-1"]
        while a.breaker.state is not BreakerState.OPEN:
            routers[0].begin(a)
            routers[0].end(a, 100.0, success=False, latency=0.1, error="boom")
        for shared, router in zip(states, routers, strict=True):
            await shared.sync(router, 100.0)
        for shared, router in zip(states[1:], routers[1:], strict=True):
            assert BreakerState.OPEN == router.states["d-1"].breaker.snapshot(100.0).state
            assert {"d-1": "a"} == shared.forced
        for shared in states:
            await shared.aclose()

    asyncio.run(body())


@pytest.mark.parametrize("kind", ALL)
def test_usage_events_reach_the_ledger_once(
    kind: str, topologies: Topologies, tmp_path: Path
) -> None:
    """Events XADDed by a gateway's sink reach the SQL ledger through the writer, each once."""
    stream = f"citadel:{{usage}}:test-{uuid.uuid4().hex}"
    database = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def body() -> None:
        await LEDGER.upgrade(database)
        redis = connect_redis(url_of(kind, topologies), timeout=2.0)
        sink = RedisStreamSink(
            redis, stream=stream, flush_seconds=0.02, batch_size=50, spool=Spool(tmp_path / "s")
        )
        await sink.start()
        events = [usage_event(request_id=f"r{i}") for i in range(120)]
        for e in events:
            sink.emit(e)
        await sink.aclose()
        engine = build_engine(database)
        writer = LedgerWriter(
            redis, engine, stream=stream, group="ledger", consumer="w1", batch_size=50, block_ms=10
        )
        await writer.ensure_group()
        for _ in range(50):
            await writer.step()
            if await writer.lag() == 0:
                break
        async with engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(usage_events))).scalar()
            ids = set((await conn.execute(select(usage_events.c.event_id))).scalars())
        assert 120 == count
        assert {e.event_id for e in events} == {i if isinstance(i, str) else i.hex() for i in ids}
        await redis.execute("DEL", stream)
        await redis.aclose()
        await engine.dispose()

    asyncio.run(body())


# -- faults --------------------------------------------------------------------------------------


async def admit_until(
    limiter: RedisLimiter, principal: str, limits: Limits, count: int, deadline: float
) -> tuple[int, int, int]:
    """Ask ``count`` admissions, retrying those that meet an outage until ``deadline``;
    returns (admitted, refused, outages met)."""
    admitted = refused = outages = 0
    for i in range(count):
        while True:
            try:
                got = await limiter.admit(
                    principal, limits, lease_id=f"l{i}", tokens=1, cost_micros=0, now=NOW
                )
            except StoreUnavailable:
                outages += 1
                assert time.monotonic() < deadline, "the store did not recover"
                await asyncio.sleep(0.05)
                continue
            admitted += got.allowed
            refused += not got.allowed
            break
    return admitted, refused, outages


def test_slot_moves_are_followed(topologies: Topologies) -> None:
    """A principal's slot migrated between masters mid-traffic (ASK while it moves, MOVED after):
    every call is answered and the limit stays exact."""
    group = topologies.cluster()
    principal = f"moving-{uuid.uuid4().hex}"
    tag = f"{{u:{principal}}}"
    slot = key_slot(tag.encode())
    limits = Limits(tokens_per_day=50)

    async def body() -> None:
        limiter = RedisLimiter(connect_redis(group.url, timeout=2.0), "UTC", 600.0)
        source = group.master_of(tag)
        target = next(p for p in group.masters() if p != source)
        first = await admit_until(limiter, principal, limits, 20, time.monotonic() + 10)
        ids = {p: group.cli(p, "CLUSTER", "MYID") for p in (source, target)}
        group.cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source])
        group.cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target])
        # While the slot moves a script meets TRYAGAIN (its keys are split between the nodes)
        # and then ASK (all of them moved); after the move, MOVED.
        middle = asyncio.create_task(
            admit_until(limiter, principal, limits, 10, time.monotonic() + 10)
        )
        await asyncio.sleep(0.1)
        keys = group.cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        assert keys
        await asyncio.to_thread(
            subprocess.run,
            [
                *("redis-cli", "-p", str(source), "MIGRATE", "127.0.0.1", str(target)),
                *("", "0", "5000", "KEYS", *keys),
            ],
            check=True,
            capture_output=True,
        )
        await asyncio.sleep(0.2)
        # the order redis-cli --cluster follows: the target, the source, then the others
        for port in sorted(group.masters(), key=lambda p: (p != target, p != source)):
            group.cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target])
        middle_counts = await middle
        last = await admit_until(limiter, principal, limits, 40, time.monotonic() + 10)
        assert target == group.master_of(tag)
        assert 50 == first[0] + middle_counts[0] + last[0]
        assert 20 == first[1] + middle_counts[1] + last[1]
        usage = await limiter.usage(principal, limits, NOW)
        assert 50 == usage.limits[0].used
        await limiter.reset(principal)
        await limiter.aclose()

    asyncio.run(body())
    gc.collect()  # a connection the client left open warns here, in this test, not later


def test_a_cluster_master_killed_mid_load_recovers() -> None:
    """Killing the master of a principal's slot: calls fail as an outage (never a wrong answer)
    until its replica is promoted, then recover by themselves; the limit stays exact."""
    principal = f"failover-{uuid.uuid4().hex}"
    tag = f"{{u:{principal}}}"
    limits = Limits(tokens_per_day=60)

    async def body(group: ClusterGroup) -> None:
        limiter = RedisLimiter(connect_redis(group.url, timeout=0.5), "UTC", 600.0)
        before = await admit_until(limiter, principal, limits, 30, time.monotonic() + 10)
        killed = await asyncio.to_thread(group.kill_master, tag)
        # replicas copy asynchronously: wait for the promotion before counting on the data
        after = await admit_until(limiter, principal, limits, 50, time.monotonic() + 30)
        assert killed != group.master_of(tag)
        assert (30, 0) == before[:2]
        assert 0 < after[2], "the kill was never seen"
        assert 30 + after[0] <= 60 + 1  # the write in flight at the kill may be lost or kept
        assert 0 < after[1]
        await limiter.aclose()

    with cluster() as group:
        asyncio.run(body(group))
    gc.collect()


def test_a_sentinel_failover_mid_load_recovers() -> None:
    """Killing the Sentinel group's master: calls fail as an outage until the Sentinels promote
    the replica, then reach the new master by themselves."""
    principal = f"sentinel-{uuid.uuid4().hex}"

    async def body() -> None:
        with sentinel_group() as group:
            store = connect_redis(group.url, timeout=0.5)
            assert RedisClient is not type(store)
            limiter = RedisLimiter(store, "UTC", 600.0)
            limits = Limits(tokens_per_day=100)
            before = await admit_until(limiter, principal, limits, 20, time.monotonic() + 10)
            old = await asyncio.to_thread(group.kill_master)
            after = await admit_until(limiter, principal, limits, 20, time.monotonic() + 30)
            # the Sentinel asked may learn of the promotion a moment after the one that led it
            wait_for(lambda: old != group.master_port(), "the Sentinels to agree on the new master")
            assert (20, 0) == before[:2]
            assert (20, 0) == after[:2]
            assert 0 < after[2]
            await limiter.aclose()

    asyncio.run(body())


def test_a_call_whose_connection_was_reset_before_sending_is_retried() -> None:
    """redis-py's RedisCluster closes every connection when one call meets a connection error,
    and a call between its connection check and its write then writes to a closed connection.
    The Cluster client's connections say so (nothing was sent), and such a call is retried; the
    same reset after the write is an outage, never a retry."""
    from redis.asyncio.connection import Connection

    from citadel.stores.topology import _guarded, _RedisPyStore, _Unsent

    async def body() -> None:
        opened: set[Connection] = set()
        connection = _guarded(Connection, opened)(host="127.0.0.1", port=6379)
        await connection.connect()
        assert {connection} == opened
        await connection.send_command("PING")
        assert b"PONG" == await connection.read_response()
        await connection.disconnect()  # what RedisCluster.aclose does under a busy call
        with pytest.raises(_Unsent, match="closed before the write"):
            await connection._send_packed_command([b"PING\r\n"])

        class Client:  # fails the way a guarded connection does, then answers
            def __init__(self, failure: BaseException, failures: int) -> None:
                self.failure, self.failures, self.calls = failure, failures, 0
                self.response_callbacks: dict[str, object] = {}

            async def execute_command(self, *args: object) -> bytes:
                self.calls += 1
                if self.calls <= self.failures:
                    raise self.failure
                return b"PONG"

        unsent = Client(_Unsent("closed before the write"), failures=2)
        assert b"PONG" == await _RedisPyStore(unsent, "x", 2.0).execute("PING")
        assert 3 == unsent.calls
        after_send = Client(AttributeError("'NoneType' has no attribute 'read'"), failures=1)
        with pytest.raises(StoreUnavailable, match="reset under this call"):
            await _RedisPyStore(after_send, "x", 2.0).execute("PING")
        assert 1 == after_send.calls

    asyncio.run(body())
