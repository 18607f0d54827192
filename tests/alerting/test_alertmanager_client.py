"""Tests for Alertmanager delivery: deduplication, resolving, and retrying while it is away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from citadel.alerting.alertmanager import AlertBook, AlertmanagerClient
from citadel.http.client import HttpClient
from citadel.http.server import HttpServer, Request, Response
from citadel.metrics import Registry

from support import free_port

LABELS = {"alertname": "Latency", "severity": "warning"}
NOTES = {"summary": "p99 will pass 2 s", "expected_crossing": "2030-01-01T00:00:00Z"}


def test_a_new_alert_is_sent_then_deduplicated_until_the_resend_interval() -> None:
    """A firing alert is sent once, re-sent only after resend_seconds, each time valid ahead."""
    book = AlertBook(resend_seconds=60, valid_seconds=240)
    [first] = book.update("Latency", [(LABELS, NOTES)], now=1000.0, generator_url="http://g")
    assert ("firing", 1000.0, 1240.0, "http://g") == (
        first.state,
        first.starts_at,
        first.ends_at,
        first.generator_url,
    )
    assert [] == book.update("Latency", [(LABELS, NOTES)], now=1030.0)
    [again] = book.update("Latency", [(LABELS, {"summary": "new"})], now=1060.0)
    assert (1000.0, 1300.0, "new") == (again.starts_at, again.ends_at, again.annotations["summary"])
    assert [again.fingerprint] == [a.fingerprint for a in book.firing()]


def test_an_alert_no_longer_firing_is_resolved_once_with_ends_at_now() -> None:
    """When a rule stops firing a series, that alert is sent resolved with endsAt = now, once."""
    book = AlertBook(resend_seconds=60, valid_seconds=240)
    other = {**LABELS, "instance": "b"}
    book.update("Latency", [(LABELS, NOTES), (other, NOTES)], now=1000.0)
    book.update("Other", [({"alertname": "Other"}, {})], now=1000.0)
    [resolved] = book.update("Latency", [(other, NOTES)], now=1010.0)
    assert ("resolved", 1000.0, 1010.0) == (resolved.state, resolved.starts_at, resolved.ends_at)
    assert dict(LABELS) == dict(resolved.labels)
    assert [] == book.update("Latency", [(other, NOTES)], now=1020.0)
    assert 2 == len(book.firing())  # the other rule's alert is untouched


def test_the_wire_format_is_alertmanager_api_v2() -> None:
    """labels, annotations, startsAt, endsAt (RFC 3339) and generatorURL."""
    book = AlertBook(resend_seconds=60, valid_seconds=240)
    [alert] = book.update("Latency", [(LABELS, NOTES)], now=0.0, generator_url="http://g/x")
    assert {
        "labels": LABELS,
        "annotations": NOTES,
        "startsAt": "1970-01-01T00:00:00.000Z",
        "endsAt": "1970-01-01T00:04:00.000Z",
        "generatorURL": "http://g/x",
    } == alert.to_json()


def test_valid_seconds_must_outlast_the_resend_interval() -> None:
    """A firing alert must not lapse between two sends."""
    with pytest.raises(ValueError, match="valid_seconds"):
        AlertBook(resend_seconds=60, valid_seconds=60)


class FakeAlertmanager:
    """An in-process HTTP server answering POST /api/v2/alerts, recording what it got."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.status = 200
        self.server = HttpServer(self.handle)

    async def handle(self, request: Request) -> Response:
        assert ("POST", "/api/v2/alerts") == (request.method, request.path)
        if self.status != 200:
            return Response(self.status, b'{"error": "nope"}')
        self.received.extend(orjson.loads(request.body))
        return Response(200, b"")


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (polling the state the client exposes) until ``check()`` holds."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_alerts_are_posted_and_counted() -> None:
    """flush posts the queue in one request and counts what was sent, by state."""

    async def test() -> None:
        fake, registry, http = FakeAlertmanager(), Registry(), HttpClient()
        await fake.server.start("127.0.0.1", 0)
        client = AlertmanagerClient(f"http://127.0.0.1:{fake.server.port}", http, registry=registry)
        book = AlertBook(resend_seconds=60, valid_seconds=240)
        client.submit(book.update("Latency", [(LABELS, NOTES)], now=1000.0))
        assert await client.flush()
        client.submit(book.update("Latency", [], now=1010.0))
        assert await client.flush()
        # Firing valid until 1240; then resolved with endsAt = 1010.
        ends = ["1970-01-01T00:20:40.000Z", "1970-01-01T00:16:50.000Z"]
        assert ends == [a["endsAt"] for a in fake.received]
        text = registry.render().decode()
        assert 'citadel_alerting_alerts_sent_total{state="firing"} 1.0' in text
        assert 'citadel_alerting_alerts_sent_total{state="resolved"} 1.0' in text
        await http.aclose()
        await fake.server.shutdown(1)

    run(test)


def test_while_alertmanager_is_away_alerts_wait_and_are_retried_with_backoff() -> None:
    """Unreachable or refusing: the alert stays queued, back-off grows, and it arrives later."""

    async def test() -> None:
        port, http, registry = free_port(), HttpClient(), Registry()
        client = AlertmanagerClient(
            f"http://127.0.0.1:{port}",
            http,
            registry=registry,
            initial_backoff=0.05,
            max_backoff=0.2,
            timeout=1,
        )
        book = AlertBook(resend_seconds=60, valid_seconds=240)
        client.submit(book.update("Latency", [(LABELS, NOTES)], now=1000.0))
        runner = asyncio.create_task(client.run())
        await until(lambda: client.failures >= 3)
        assert 1 == client.queued
        assert client.backoff > 0.05
        assert client.last_error is not None
        assert "did not answer" in client.last_error
        # It resolves while Alertmanager is away: the resolve replaces the queued firing state.
        client.submit(book.update("Latency", [], now=1010.0))
        assert 1 == client.queued
        fake = FakeAlertmanager()
        fake.status = 503
        await fake.server.start("127.0.0.1", port)
        failures = client.failures
        await until(lambda: client.failures > failures)
        assert "HTTP 503" in (client.last_error or "")
        fake.status = 200
        await until(lambda: bool(fake.received))
        [alert] = fake.received
        assert "1970-01-01T00:16:50.000Z" == alert["endsAt"]  # resolved at 1010
        assert (0, None) == (client.queued, client.last_error)
        assert "citadel_alerting_alertmanager_failures_total" in registry.render().decode()
        runner.cancel()
        await http.aclose()
        await fake.server.shutdown(1)

    run(test)


def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    """Past max_queue the oldest alert is dropped, and the drop is counted, never silent."""

    async def test() -> None:
        registry = Registry()
        client = AlertmanagerClient(
            f"http://127.0.0.1:{free_port()}", HttpClient(), registry=registry, max_queue=2
        )
        book = AlertBook(resend_seconds=60, valid_seconds=240)
        alerts = [({"alertname": f"a{i}"}, {}) for i in range(3)]
        client.submit(book.update("r", alerts, now=0.0))
        assert (2, 1) == (client.queued, client.dropped)
        assert "citadel_alerting_alerts_dropped_total 1.0" in registry.render().decode()

    run(test)
