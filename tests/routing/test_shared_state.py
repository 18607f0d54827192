"""Routing state shared through Redis (DB 12): two routers in one process play two replicas,
each test under a key prefix of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from citadel.errors import StoreUnavailable
from citadel.metrics import Registry
from citadel.routing.breaker import BreakerState
from citadel.routing.router import Router
from citadel.routing.shared import (
    Pulled,
    RemoteOpen,
    SharedRoutingState,
    SyncLoop,
    deployment_rows,
    redis_url,
)
from citadel.settings import Endpoints, LimitsSettings, Model, Settings, load_settings
from citadel.stores.redis import RedisClient

from support import free_port

REDIS = "redis://127.0.0.1:6379/12"
CONFIG = """
routing:
  breaker: {consecutive_failures: 2, open_seconds: 30, max_open_seconds: 60}
models:
  - name: pool
    deployments:
      - {name: d-1, url: "http://127.0.0.1:9"}
      - {name: d-2, url: "http://127.0.0.1:9"}
"""
OPEN_SECONDS = 30.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "citadel.yaml"
    path.write_text(CONFIG)
    return load_settings(str(path), {})


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"test-shared-{uuid.uuid4().hex}"
    yield name

    async def clean() -> None:
        client = RedisClient.from_url(REDIS, timeout=1.0)
        try:
            keys = await client.execute("KEYS", f"{name}:*")
            if keys:
                await client.execute("DEL", *keys)
        finally:
            await client.aclose()

    asyncio.run(clean())


@dataclass
class Replica:
    name: str
    model: Model
    router: Router
    shared: SharedRoutingState

    def trip(self, deployment: str, now: float) -> None:
        """Fail calls to ``deployment`` until its breaker opens."""
        state = self.router.states[deployment]
        while state.breaker.state is not BreakerState.OPEN:
            self.router.begin(state)
            self.router.end(state, now, success=False, latency=0.1, error="boom")

    def picks(self, now: float, times: int = 20) -> set[str]:
        model = self.model
        picked = set()
        for _ in range(times):
            selection = self.router.select(model, frozenset(), now)
            assert selection is not None
            self.router.begin(selection.state)
            self.router.end(selection.state, now, success=True, latency=0.01)
            picked.add(selection.state.name)
        return picked


def replica(settings: Settings, name: str, prefix: str, url: str = REDIS) -> Replica:
    shared = SharedRoutingState(RedisClient.from_url(url, timeout=0.5), replica=name, prefix=prefix)
    router = Router(
        settings, registry=Registry(), rng=random.Random(7), on_transition=shared.on_transition
    )
    return Replica(name, settings.models[0], router, shared)


def run(
    settings: Settings, prefix: str, body: Callable[[Replica, Replica], Awaitable[None]]
) -> None:
    """Run ``body`` with replicas "a" and "b" on one event loop, closing their clients after."""

    async def main() -> None:
        a, b = replica(settings, "a", prefix), replica(settings, "b", prefix)
        try:
            await body(a, b)
        finally:
            await a.shared.aclose()
            await b.shared.aclose()

    asyncio.run(main())


def test_a_breaker_opened_on_one_replica_is_held_open_on_the_other(
    settings: Settings, prefix: str
) -> None:
    """A breaker that opens on replica A holds B's open too after they sync, and B routes around
    the deployment; A keeps its own back-off and B publishes nothing back."""

    async def body(a: Replica, b: Replica) -> None:
        a.trip("d-1", now=100.0)
        assert 1 == a.shared.pending
        await a.shared.sync(a.router, 100.0)
        assert 0 == a.shared.pending
        # B's clock is its own: only durations cross between replicas.
        await b.shared.sync(b.router, 5_000.0)

        held = b.router.states["d-1"].breaker.snapshot(5_000.0)
        assert BreakerState.OPEN == held.state
        assert {"d-1": "a"} == b.shared.forced
        assert {"d-2"} == b.picks(5_000.0)
        assert 0 == b.shared.pending
        own = a.router.states["d-1"].breaker.snapshot(100.0)
        assert 100.0 + OPEN_SECONDS == own.open_until
        assert {} == a.shared.forced

        await b.shared.sync(b.router, 5_001.0)
        await a.shared.sync(a.router, 101.0)
        pulled = await a.shared.pull(["d-1", "d-2"])
        assert ["d-1"] == list(pulled.open)
        assert "a" == pulled.open["d-1"].replica
        assert 0 < pulled.open["d-1"].seconds <= OPEN_SECONDS
        row = next(r for r in deployment_rows(b.router, 5_001.0) if r["deployment"] == "d-1")
        assert (True, None) == (row["breaker_held_open"], row["breaker_open_seconds"])

    run(settings, prefix, body)


def test_a_held_breaker_closes_when_the_remote_entry_expires(
    settings: Settings, prefix: str
) -> None:
    """When the replica that opened a breaker lets its entry expire, the replicas that held
    theirs open for it reset them and route to the deployment again."""

    async def body(a: Replica, b: Replica) -> None:
        a.trip("d-1", now=100.0)
        await a.shared.sync(a.router, 100.0)
        await b.shared.sync(b.router, 200.0)
        assert BreakerState.OPEN == b.router.states["d-1"].breaker.state

        await b.shared.client.execute("DEL", f"{prefix}:{{routing}}:open:d-1")  # it expired
        await b.shared.sync(b.router, 201.0)

        assert BreakerState.CLOSED == b.router.states["d-1"].breaker.state
        assert {} == b.shared.forced
        assert {"d-1", "d-2"} == b.picks(201.0)

    run(settings, prefix, body)


def test_an_entry_expires_with_the_back_off(settings: Settings, prefix: str) -> None:
    """An open entry lives as long as the back-off left when it was published, and a back-off
    already over is not published at all."""

    async def body(a: Replica, b: Replica) -> None:
        await a.shared.publish_open("d-1", open_until=112.0, now=100.0)
        await a.shared.publish_open("d-2", open_until=99.0, now=100.0)
        pulled = await b.shared.pull(["d-1", "d-2"])
        assert ["d-1"] == list(pulled.open)
        assert 11.0 < pulled.open["d-1"].seconds <= 12.0
        ttl = await a.shared.client.execute("PTTL", f"{prefix}:{{routing}}:open:d-1")
        assert 11_000 < ttl <= 12_000

    run(settings, prefix, body)


def test_a_drain_on_one_replica_is_seen_by_the_other(settings: Settings, prefix: str) -> None:
    """A drain written through one replica's shared state drains the deployment on every replica
    at its next sync; a restore puts it back."""

    async def body(a: Replica, b: Replica) -> None:
        await a.shared.drain("d-2", True)
        await b.shared.sync(b.router, 10.0)
        assert b.router.states["d-2"].drained
        assert {"d-1"} == b.picks(10.0)
        assert frozenset({"d-2"}) == (await a.shared.pull(["d-1", "d-2"])).drained

        await a.shared.drain("d-2", False)
        await b.shared.sync(b.router, 11.0)
        assert not b.router.states["d-2"].drained
        assert {"d-1", "d-2"} == b.picks(11.0)

    run(settings, prefix, body)


def test_each_replica_routes_alone_when_redis_is_away(settings: Settings, prefix: str) -> None:
    """With Redis unreachable a sync raises StoreUnavailable; each router keeps routing on its
    own state, and the unpublished opening waits for the next sync."""
    dead = f"redis://127.0.0.1:{free_port()}/12"

    async def main() -> None:
        a = replica(settings, "a", prefix, url=dead)
        b = replica(settings, "b", prefix, url=dead)
        a.trip("d-1", now=100.0)
        with pytest.raises(StoreUnavailable):
            await a.shared.sync(a.router, 100.0)
        with pytest.raises(StoreUnavailable):
            await b.shared.sync(b.router, 100.0)
        assert 1 == a.shared.pending
        assert {"d-2"} == a.picks(100.0)
        assert {"d-1", "d-2"} == b.picks(100.0)
        await a.shared.aclose()
        await b.shared.aclose()

    asyncio.run(main())


def test_the_sync_loop_warns_once_per_outage(
    settings: Settings, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Syncs against an unreachable Redis log one warning per outage, however many fail, and
    one line when Redis is back."""
    dead = f"redis://127.0.0.1:{free_port()}/12"

    async def main() -> None:
        a = replica(settings, "a", prefix, url=dead)
        unreachable, live = a.shared.client, RedisClient.from_url(REDIS, timeout=0.5)
        loop = SyncLoop(a.shared, a.router)
        try:
            for client in (unreachable, live, unreachable):
                a.shared.client = client
                for _ in range(3):
                    await loop.step()
        finally:
            await unreachable.aclose()
            await live.aclose()
        assert loop.available is False
        assert "StoreUnavailable" in loop.last_error

    with caplog.at_level(logging.INFO, logger="citadel.routing.shared"):
        asyncio.run(main())
    assert [
        "shared routing state unavailable; this replica routes alone",
        "shared routing state is back",
        "shared routing state unavailable; this replica routes alone",
    ] == [r.getMessage() for r in caplog.records if r.name == "citadel.routing.shared"]


def test_sync_loops_carry_an_opening_between_replicas(settings: Settings, prefix: str) -> None:
    """With both loops running, a breaker that opens on A is open on B well within a second:
    the opening wakes A's loop rather than waiting for its interval."""

    async def body(a: Replica, b: Replica) -> None:
        loops = [SyncLoop(a.shared, a.router, interval=5.0), SyncLoop(b.shared, b.router)]
        for loop in loops:
            await loop.start()
        try:
            await asyncio.sleep(0.05)  # both loops have had their first sync
            a.trip("d-1", now=time.monotonic())
            deadline = time.monotonic() + 2.0
            while b.router.states["d-1"].breaker.state is not BreakerState.OPEN:
                assert time.monotonic() < deadline, "B never held d-1 open"
                await asyncio.sleep(0.01)
        finally:
            for loop in loops:
                await loop.stop()
        assert all(loop.available for loop in loops)

    run(settings, prefix, body)


def test_snapshots_round_trip(settings: Settings, prefix: str) -> None:
    """A replica's pushed rows come back under its name, portable (seconds left, not a
    monotonic time), until its snapshot expires; then the replica is forgotten."""

    async def body(a: Replica, b: Replica) -> None:
        rows = [{"deployment": "d-1", "breaker": "closed", "in_flight": 3}]
        await a.shared.push_snapshot(rows)
        b.trip("d-2", now=50.0)
        await b.shared.sync(b.router, 50.0)

        replicas = await a.shared.replicas()
        assert ["a", "b"] == sorted(replicas)
        assert rows == replicas["a"]
        d2 = next(r for r in replicas["b"] if r["deployment"] == "d-2")
        assert ("open", OPEN_SECONDS) == (d2["breaker"], d2["breaker_open_seconds"])
        assert "breaker_open_until" not in d2
        ttl = await a.shared.client.execute("PTTL", f"{prefix}:{{routing}}:snapshot:a")
        assert 0 < ttl <= 10_000

        await a.shared.client.execute("DEL", f"{prefix}:{{routing}}:snapshot:a")
        assert ["b"] == list(await b.shared.replicas())
        members = await a.shared.client.execute("SMEMBERS", f"{prefix}:{{routing}}:replicas")
        assert [b"b"] == members

    run(settings, prefix, body)


def test_apply_ignores_this_replicas_own_entry(settings: Settings, prefix: str) -> None:
    """A replica's own entry, which may outlive its back-off by the publishing delay, never
    holds its own breaker open."""
    a = replica(settings, "a", prefix)
    a.shared.apply(a.router, Pulled(frozenset(), {"d-1": RemoteOpen("a", 1.0)}), 10.0)
    assert BreakerState.CLOSED == a.router.states["d-1"].breaker.state
    a.shared.apply(a.router, Pulled(frozenset(), {"d-1": RemoteOpen("z", 1.0)}), 10.0)
    assert BreakerState.OPEN == a.router.states["d-1"].breaker.state
    assert 0 == a.shared.pending  # a held breaker is not published


def test_redis_url_comes_from_the_endpoint_or_the_limits_backend(settings: Settings) -> None:
    """host:port becomes a redis:// URL; a redis:// limits backend is used when no endpoint is
    set; memory:// means no shared state."""

    def with_(redis: str | None, backend: str = "memory://") -> Settings:
        return dataclasses.replace(
            settings, endpoints=Endpoints(redis=redis), limits=LimitsSettings(backend=backend)
        )

    assert "redis://127.0.0.1:6379" == redis_url(with_("127.0.0.1:6379"))
    assert "redis://h:1/3" == redis_url(with_("redis://h:1/3"))
    assert redis_url(with_("memory://")) is None
    assert "redis://h:2/0" == redis_url(with_(None, "redis://h:2/0"))
    assert redis_url(with_(None)) is None
    assert SharedRoutingState.from_settings(with_(None), replica="x") is None
