"""The usage event: one per request the gateway forwards, handed to a sink without blocking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
