"""Who publishes the deployments, alerts and metrics topics, and what: the router on each change
of a deployment's state (not per request), the alert scheduler when an alert starts or resolves
(not on re-sends), and the metrics digest from the usage topic, one replica at a time."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.alerting.alertmanager import AlertBook
from citadel.alerting.definitions import parse_alerting
from citadel.alerting.engine import Evaluator, Scheduler
from citadel.feed import Entry, MemoryFeed, RedisFeed
from citadel.feed.open import USAGE
from citadel.feed.publisher import Publisher
from citadel.feed.redis import stream_key
from citadel.metering.ledger import encode_event
from citadel.metrics import Registry
from citadel.routing.router import Router
from citadel.settings import load_settings
from citadel.stores.redis import RedisClient
from citadel.streaming.digest import METRICS, MetricsDigest, digest

from support import usage_event

REDIS_URL = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")


async def events(feed: MemoryFeed, topic: str) -> list[dict[str, Any]]:
    page = await feed.read(topic, "0-0")
    return [orjson.loads(e.data) for e in page.entries]


def test_the_router_publishes_breaker_health_and_drain_changes_once_each(tmp_path: Path) -> None:
    path = tmp_path / "citadel.yaml"
    path.write_text(
        """
routing: {breaker: {consecutive_failures: 2, open_seconds: 30}}
models:
  - name: pool
    deployments:
      - {name: d-1, url: "http://127.0.0.1:9"}
"""
    )
    settings = load_settings(str(path), {})

    async def main() -> list[dict[str, Any]]:
        feed = MemoryFeed()
        publisher = Publisher(feed, source="gw@test")
        await publisher.start()
        router = Router(settings, registry=Registry(), events=publisher.sink("deployments"))
        state = router.states["d-1"]
        for _ in range(50):  # requests that change nothing publish nothing
            router.begin(state)
            router.end(state, 1.0, success=True, latency=0.01)
        for _ in range(2):
            router.begin(state)
            router.end(state, 2.0, success=False, latency=0.01, error="boom")
        router.set_health("d-1", False, "probe failed")
        router.set_health("d-1", False, "probe failed again")  # no change
        router.set_health("d-1", True, "ok")
        router.drain("d-1")
        router.drain("d-1")  # no change
        await publisher.aclose()
        return await events(feed, "deployments")

    published = asyncio.run(main())
    assert [(e["kind"], e.get("to"), e.get("healthy"), e.get("drained")) for e in published] == [
        ("breaker", "open", None, None),
        ("health", None, False, None),
        ("health", None, True, None),
        ("drain", None, None, True),
    ]
    assert published[0]["from"] == "closed"
    assert published[0]["reason"] == "consecutive_failures"
    assert all(e["source"] == "gw@test" and e["deployment"] == "d-1" for e in published)


def test_the_routers_load_is_sampled_each_interval_and_only_when_it_moved(tmp_path: Path) -> None:
    """Load changes with every request, so it is not published per request: the LoadReporter
    sends one load event per deployment and interval, and none for an idle deployment."""
    from citadel.routing.load import LoadReporter

    path = tmp_path / "citadel.yaml"
    path.write_text(
        """
models:
  - name: pool
    deployments:
      - {name: d-1, url: "http://127.0.0.1:9"}
      - {name: d-2, url: "http://127.0.0.1:9"}
"""
    )
    settings = load_settings(str(path), {})

    async def main() -> list[dict[str, Any]]:
        feed = MemoryFeed()
        publisher = Publisher(feed, source="gw@test")
        await publisher.start()
        router = Router(settings, registry=Registry(), events=publisher.sink("deployments"))
        reporter = LoadReporter(router, interval=0.05)
        await reporter.start()
        state = router.states["d-1"]
        await asyncio.sleep(0.12)  # idle: nothing to report
        for _ in range(30):
            router.begin(state)
        router.end(state, time.monotonic(), success=True, latency=0.2)  # the router's clock
        await asyncio.sleep(0.12)  # reported once, then unchanged
        await reporter.stop()
        await publisher.aclose()
        return await events(feed, "deployments")

    published = asyncio.run(main())
    assert [("load", "d-1", "pool", 29, 30)] == [
        (e["kind"], e["deployment"], e["model"], e["in_flight"], e["requests"]) for e in published
    ]
    assert published[0]["latency_ewma_seconds"] > 0
    with pytest.raises(ValueError, match="interval"):
        LoadReporter(Router(settings, registry=Registry()), interval=0)


def test_the_scheduler_publishes_an_alert_when_it_fires_and_when_it_resolves() -> None:
    from citadel.alerting.prometheus import Series

    now = 1_700_000_000.0

    def line(slope: float, start: float = 0.0) -> list[Series]:
        times = tuple(now - 29 + i for i in range(30))
        values = tuple(start + slope * i for i in range(30))
        return [Series(labels={"job": "gw"}, times=times, values=values)]

    class Source:
        series = line(2.0)

        async def fetch(self, rule: Any, *, now: float) -> list[Series]:
            return self.series

    async def main() -> list[dict[str, Any]]:
        feed = MemoryFeed()
        publisher = Publisher(feed, source="alerting@test")
        await publisher.start()
        settings = parse_alerting({"rules": [{"name": "Requests", "kind": "forecast",
            "query": "sum(x)", "threshold": 100, "horizon_seconds": 60, "step_seconds": 1,
            "min_points": 5, "model": "linear"}]})  # fmt: skip
        source = Source()
        clock = [now]
        scheduler = Scheduler(
            settings=settings,
            evaluator=Evaluator(),
            sources={"prometheus": source},
            book=AlertBook(resend_seconds=60, valid_seconds=240),
            notifier=None,
            clock=lambda: clock[0],
            events=publisher.sink("alerts"),
        )
        await scheduler.evaluate_all()
        clock[0] += 120  # re-sent to Alertmanager, but not a new event
        await scheduler.evaluate_all()
        source.series = line(0.0, start=10)
        clock[0] += 1
        await scheduler.evaluate_all()
        await publisher.aclose()
        return await events(feed, "alerts")

    fired, resolved = asyncio.run(main())
    assert (fired["state"], fired["rule"], fired["ends_at"]) == ("firing", "Requests", None)
    assert fired["labels"]["alertname"] == "Requests"
    assert resolved["state"] == "resolved"
    assert resolved["fingerprint"] == fired["fingerprint"]
    assert resolved["ends_at"] == now + 121


def test_a_full_publisher_queue_drops_and_counts_instead_of_growing() -> None:
    async def main() -> tuple[int, int]:
        feed = MemoryFeed()
        publisher = Publisher(feed, source="s", queue=3)
        for i in range(5):  # not started: nothing drains the queue
            publisher.emit("alerts", {"n": i})
        await publisher.start()
        await publisher.aclose()
        return publisher.dropped, len((await feed.read("alerts", "0-0")).entries)

    assert asyncio.run(main()) == (2, 3)


def test_the_digest_counts_requests_errors_tokens_and_p95_per_model() -> None:
    base = usage_event()
    evs = [
        replace(base, model="a", latency_seconds=i / 100, prompt_tokens=1, completion_tokens=2)
        for i in range(1, 21)
    ]
    evs += [replace(base, model="b", status=502), replace(base, model="b", status=429)]
    body = digest(evs, 2.0)
    assert body["requests_per_second"] == 11.0
    assert body["models"]["a"] == {
        "requests_per_second": 10.0,
        "errors_per_second": 0.0,
        "tokens_per_second": 30.0,
        "p95_latency_seconds": 0.19,
    }
    assert body["models"]["b"]["errors_per_second"] == 0.5  # 5xx only
    assert digest([], 1.0)["models"] == {}


def test_the_metrics_digest_publishes_usage_rates_each_interval() -> None:
    async def main() -> dict[str, Any]:
        feed = MemoryFeed()
        metrics = MetricsDigest(feed, owner="me", interval=0.2)
        async with feed.subscribe(METRICS) as sub:
            await metrics.start()
            await asyncio.sleep(0.05)
            for _ in range(4):
                feed.publish_nowait(USAGE, encode_event(replace(usage_event(), model="m")))
            entry = await asyncio.wait_for(anext(sub), 5)
        await metrics.aclose()
        assert isinstance(entry, Entry)
        body: dict[str, Any] = orjson.loads(entry.data)
        return body

    first = asyncio.run(main())
    rate = first["models"]["m"]["requests_per_second"]
    assert rate * first["interval_seconds"] == pytest.approx(4, abs=0.05)
    assert first["source"] == "me"


def test_one_replica_at_a_time_holds_the_lead_on_redis() -> None:
    name = f"t{uuid.uuid4().hex[:12]}"

    async def main() -> list[bool]:
        client = RedisClient.from_url(REDIS_URL, timeout=1.0)
        feed = RedisFeed(client, lambda: RedisClient.from_url(REDIS_URL, timeout=5.0))
        try:
            taken = [
                await feed.lead(name, "a", 0.3),
                await feed.lead(name, "b", 0.3),
                await feed.lead(name, "a", 0.3),  # extended
            ]
            await asyncio.sleep(0.5)
            taken.append(await feed.lead(name, "b", 0.3))  # a stopped: b takes over
            taken.append(await feed.lead(name, "a", 0.3))
            return taken
        finally:
            await client.execute("DEL", f"{stream_key(name)}:lead")
            await feed.aclose()
            await client.aclose()

    assert asyncio.run(main()) == [True, False, True, True, False]
    assert asyncio.run(MemoryFeed().lead(name, "anyone", 1.0))
