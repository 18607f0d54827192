"""The usage event: one per request the gateway answers for a principal, handed to a sink without
blocking.

Served, failed upstream, or refused by the caller's tier or limits: every request that was
authenticated and reached a model endpoint is one event, with the status the client got and, when
it was not served, a ``reason`` (the error's code: ``model_not_allowed``, ``requests_per_minute``,
``no_deployment_available``, ``upstream_500`` ...). ``deployment`` is empty when no deployment
answered (refused before any was tried, or every one failed). ``refused`` marks the refusals of
the gateway's own policy: the tier (403) and the limits (429, and the 400 of a request larger than
a minute's tokens). Unauthenticated requests (401) have no principal: they are counted in the
gateway's metrics only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol


def new_event_id(now: float, random_bytes: bytes | None = None) -> str:
    """A unique event id, 32 hex digits, that sorts by time: the Unix time in milliseconds (12
    digits) then 80 random bits (``random_bytes``, 10 of them, or fresh ones), as in UUIDv7.

    The ledger's primary key is this id; ids in time order make every batch's inserts land at
    the right-hand edge of the index instead of at random pages all over it (bench/ledger.py).
    """
    suffix = os.urandom(10) if random_bytes is None else random_bytes
    if len(suffix) != 10:
        raise ValueError(f"random_bytes: expected 10 bytes, got {len(suffix)}")
    return f"{int(now * 1000) & 0xFFFF_FFFF_FFFF:012x}{suffix.hex()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEvent:
    """What one request used and cost."""

    event_id: str
    time: float  # Unix seconds at the start of the request
    request_id: str
    user: str
    team: str
    key_id: str
    tier: str
    endpoint: str
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    latency_seconds: float
    ttft_seconds: float | None
    status: int
    streamed: bool
    cancelled: bool
    usage_estimated: bool  # the upstream did not report usage: the gateway counted it
    cost_micros: int  # what the user is charged, in micro-USD (exact integer arithmetic)
    reason: str = ""  # why it was not served (the error's code); "" when it was
    refused: bool = False  # refused by the caller's tier or limits (403, 429), before any upstream


class UsageSink(Protocol):
    def emit(self, event: UsageEvent) -> None:
        """Accept one event; must not block (queue it and return)."""
        ...


class MemorySink:
    """Keeps every event in a list (tests, and the embedded default until the ledger lands)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.events: list[UsageEvent] = []
        self._limit = limit

    def emit(self, event: UsageEvent) -> None:
        if len(self.events) >= self._limit:
            del self.events[: self._limit // 2]
        self.events.append(event)
