"""Alerts to Alertmanager (API v2): what to send, and sending it without losing any.

Theory of operation. ``AlertBook`` is the pure part: it remembers every alert it has fired, by its
label set (its identity in Alertmanager), and turns each evaluation's firing set into the alerts
worth sending. A new alert is sent at once. A firing alert is re-sent only every
``resend_seconds`` (Alertmanager deduplicates by labels; re-sending keeps it alive), each time
with ``endsAt`` ``valid_seconds`` ahead, so that if this service dies its alerts resolve on their
own instead of firing forever (Prometheus does the same). An alert of a rule that no longer fires
is sent once more with ``endsAt`` = now: resolved.

``AlertmanagerClient`` is the adapter: ``submit`` puts alerts in a queue keyed by label set (a
newer state of an alert replaces the older one still waiting, so a resolve overtakes its firing),
and ``run`` posts the queue to ``POST /api/v2/alerts``. When Alertmanager is away or refuses, the
batch goes back into the queue (behind nothing newer for the same alert) and is retried after an
exponential back-off, capped. The queue is bounded: past ``max_queue`` the oldest alert is dropped
and counted (``citadel_alerting_alerts_dropped_total``), never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from citadel.errors import TransportError
from citadel.http.client import ConnectError, HttpClient, Origin, ProtocolError, ReadTimeout
from citadel.metrics import (
    ALERTING_ALERTS_DROPPED,
    ALERTING_ALERTS_SENT,
    ALERTING_DELIVERY_FAILURES,
    Registry,
)

__all__ = ["Alert", "AlertBook", "AlertmanagerClient", "AlertmanagerError", "fingerprint"]

_log = logging.getLogger("citadel.alerting")

State = Literal["firing", "resolved"]


class AlertmanagerError(TransportError):
    """Alertmanager could not be reached, or refused the alerts."""


def fingerprint(labels: Mapping[str, str]) -> str:
    """An alert's identity: its label set as one string, in a stable order."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _rfc3339(when: float) -> str:
    return (
        datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Alert:
    """One alert as Alertmanager's API v2 takes it; times in Unix seconds."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    starts_at: float
    ends_at: float
    generator_url: str = ""
    state: State = "firing"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": _rfc3339(self.starts_at),
            "endsAt": _rfc3339(self.ends_at),
        }
        if self.generator_url:
            doc["generatorURL"] = self.generator_url
        return doc


@dataclass(slots=True)
class _Entry:
    alert: Alert
    last_sent: float


class AlertBook:
    """Which alerts to send to Alertmanager, and when: deduplication, re-sending, resolving."""

    def __init__(self, *, resend_seconds: float, valid_seconds: float) -> None:
        if valid_seconds <= resend_seconds:
            raise ValueError(
                f"valid_seconds={valid_seconds} must exceed resend_seconds={resend_seconds}, "
                "or a firing alert would lapse between two sends"
            )
        self._resend = resend_seconds
        self._valid = valid_seconds
        self._firing: dict[str, _Entry] = {}
        self._owner: dict[str, str] = {}  # fingerprint -> rule

    def firing(self) -> list[Alert]:
        """The alerts firing now."""
        return [entry.alert for entry in self._firing.values()]

    def update(
        self,
        rule: str,
        firing: Iterable[tuple[Mapping[str, str], Mapping[str, str]]],
        *,
        now: float,
        generator_url: str = "",
    ) -> list[Alert]:
        """Record that ``rule`` fires exactly the alerts ``firing`` (labels, annotations) now;
        return the alerts to send: the new ones, those due to be re-sent, and the resolved."""
        out: list[Alert] = []
        seen: set[str] = set()
        for labels, notes in firing:
            key = fingerprint(labels)
            seen.add(key)
            entry = self._firing.get(key)
            if entry is None:
                alert = Alert(
                    labels=MappingProxyType(dict(labels)),
                    annotations=MappingProxyType(dict(notes)),
                    starts_at=now,
                    ends_at=now + self._valid,
                    generator_url=generator_url,
                )
                self._firing[key] = _Entry(alert, now)
                self._owner[key] = rule
                out.append(alert)
                continue
            alert = replace(entry.alert, annotations=MappingProxyType(dict(notes)))
            if now - entry.last_sent >= self._resend:
                alert = replace(alert, ends_at=now + self._valid)
                entry.last_sent = now
                out.append(alert)
            entry.alert = alert
        for key in [k for k, owner in self._owner.items() if owner == rule and k not in seen]:
            entry = self._firing.pop(key)
            del self._owner[key]
            out.append(replace(entry.alert, ends_at=now, state="resolved"))
        return out

    def forget(self, rule: str, *, now: float) -> list[Alert]:
        """Resolve every alert of ``rule`` (the rule was removed); return them to send."""
        return self.update(rule, (), now=now)


class AlertmanagerClient:
    """Posts alerts to Alertmanager's ``/api/v2/alerts``, queueing and retrying them."""

    def __init__(
        self,
        url: str,
        http: HttpClient,
        *,
        registry: Registry | None = None,
        max_queue: int = 10_000,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self._origin = Origin.parse(url)
        self._path = urlsplit(url).path.rstrip("/") + "/api/v2/alerts"
        self._http = http
        self._max_queue = max_queue
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._timeout = timeout
        self._clock = clock
        self._queue: dict[str, Alert] = {}  # insertion order: oldest first
        self._wakeup = asyncio.Event()
        self.backoff = 0.0  # the current delay before the next retry; 0 when healthy
        self.last_error: str | None = None
        self.last_success: float | None = None
        registry = registry if registry is not None else Registry()
        self._sent = registry.counter(ALERTING_ALERTS_SENT)
        self._dropped = registry.counter(ALERTING_ALERTS_DROPPED)
        self._failures = registry.counter(ALERTING_DELIVERY_FAILURES)
        for unlabelled in (self._dropped, self._failures):
            unlabelled.inc((), 0)  # a series from the start, so rate() reads 0, not nothing
        self.dropped = 0
        self.failures = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, alerts: Iterable[Alert]) -> None:
        """Queue ``alerts`` for delivery (a newer state of a queued alert replaces it)."""
        for alert in alerts:
            self._queue.pop(alert.fingerprint, None)
            self._queue[alert.fingerprint] = alert
        while len(self._queue) > self._max_queue:
            oldest = next(iter(self._queue))
            del self._queue[oldest]
            self.dropped += 1
            self._dropped.inc(())
            _log.error("alert queue full; dropped the oldest alert", extra={"alert": oldest})
        if self._queue:
            self._wakeup.set()

    async def flush(self) -> bool:
        """Try once to deliver everything queued; True when the queue is empty afterwards."""
        if not self._queue:
            return True
        batch = list(self._queue.values())
        self._queue.clear()
        try:
            await self._post(batch)
        except AlertmanagerError as exc:
            # Back into the queue, oldest first, unless a newer state arrived meanwhile.
            newer = self._queue
            self._queue = {a.fingerprint: a for a in batch if a.fingerprint not in newer}
            self._queue.update(newer)
            self.submit(())  # applies the bound
            self.failures += 1
            self._failures.inc(())
            self.last_error = str(exc)
            return False
        for alert in batch:
            self._sent.inc((alert.state,))
        self.last_success = self._clock()
        self.last_error = None
        return not self._queue

    async def run(self) -> None:
        """Deliver queued alerts until cancelled, backing off while Alertmanager is away."""
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if await self.flush():
                self.backoff = 0.0
                continue
            self.backoff = min(self._max_backoff, max(self._initial_backoff, self.backoff * 2))
            _log.warning(
                "alertmanager unreachable; retrying",
                extra={"error": self.last_error, "retry_in_seconds": self.backoff},
            )
            await asyncio.sleep(self.backoff)

    async def alerts(self) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``: the alerts Alertmanager holds (for health and tests)."""
        status, raw = await self._call("GET", b"")
        if status != 200:
            raise AlertmanagerError(f"GET {self._path} answered HTTP {status}")
        doc = orjson.loads(raw)
        return list(doc) if isinstance(doc, list) else []

    async def ping(self) -> None:
        """Raise AlertmanagerError unless Alertmanager answers its readiness check."""
        path = urlsplit(self.url).path.rstrip("/") + "/-/ready"
        status, _ = await self._call("GET", b"", path=path)
        if status != 200:
            raise AlertmanagerError(f"{self.url}/-/ready answered HTTP {status}")

    async def _post(self, batch: list[Alert]) -> None:
        body = orjson.dumps([alert.to_json() for alert in batch])
        status, raw = await self._call("POST", body)
        if status != 200:
            detail = raw[:300].decode("utf-8", "replace").strip()
            raise AlertmanagerError(f"POST {self._path} answered HTTP {status}: {detail}")

    async def _call(
        self, method: str, body: bytes, *, path: str | None = None
    ) -> tuple[int, bytes]:
        headers = [(b"accept", b"application/json")]
        if body:
            headers.append((b"content-type", b"application/json"))
        try:
            response = await self._http.request(
                method,
                self._origin,
                path or self._path,
                headers,
                body,
                connect_timeout=self._timeout,
                first_byte_timeout=self._timeout,
            )
            return response.status, await response.read()
        except (ConnectError, ReadTimeout, ProtocolError, OSError) as exc:
            raise AlertmanagerError(f"{self.url} did not answer: {exc}") from exc
