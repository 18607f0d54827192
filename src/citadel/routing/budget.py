"""The retry budget: retries may add at most a set share of load, so that an outage of one
deployment cannot turn into a retry storm on the others. Pure, with ``now`` passed in.

Theory of operation
-------------------
The budget is Finagle's and Linkerd's (tower's ``TpsBudget``): a balance of tokens. Each original
request deposits ``ratio`` tokens; a retry withdraws one, and is refused when less than one is
available. Deposits and withdrawals both expire once they are ``window_seconds`` old, and on top
of what the window holds there is a reserve of ``min_per_second * window_seconds`` tokens, so that
a deployment with little traffic can still retry a little::

    available = reserve + ratio * requests_in_window - retries_in_window

The guarantee: over any run of ``T`` seconds, ``retries <= ratio * requests + min_per_second *
(T + window_seconds)``: the retries beyond the deposits are paid by the reserve, which refills
at most once per window. Let ``X(t)`` be the retries minus ``ratio`` times the requests up to
``t``. Deposits and withdrawals expire together, so after a retry at ``s`` the window's net
withdrawal, ``X(s) - X(c)`` with ``c`` the window's start (``c <= s - window_seconds``), is at
most the reserve. ``X`` grows only at retries, hence ``max X`` up to ``t`` is at most one reserve
more than ``max X`` up to ``t - window_seconds``, and by induction at most
``reserve * (T / window_seconds + 1)``. A retry outlives the deposits that paid for it, so the
balance can fall below zero for a while: that debt is what keeps a deposit from paying twice.

The window is kept in one-second buckets (a deque, appended to and pruned from in O(1)
amortised). An entry expires when its bucket is more than ``ceil(window_seconds)`` seconds old, so
it lives between ``window_seconds`` and one second more: never less, which would let the reserve
refill faster than ``min_per_second``. Tokens are counted in integer millionths, so that sums of
``ratio`` stay exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from citadel.errors import ConfigError

SCALE: Final = 1_000_000  # token units per token


@dataclass(frozen=True, kw_only=True, slots=True)
class BudgetSnapshot:
    """The budget as seen at ``now``: counts over the window, and the tokens left."""

    requests: int
    retries: int
    available: float  # tokens; a retry needs one. 0 when in debt (spent deposits expired first)


class RetryBudget:
    """The retry budget of one scope (a model, or the whole gateway)."""

    __slots__ = ("_buckets", "_deposit", "_requests", "_reserve", "_retries", "_span")

    def __init__(
        self, *, ratio: float = 0.2, min_per_second: float = 1.0, window_seconds: float = 10.0
    ) -> None:
        if not (isinstance(ratio, int | float) and 0 <= ratio < math.inf):
            raise ConfigError("ratio", ratio, "a finite number >= 0")
        if not (isinstance(min_per_second, int | float) and 0 <= min_per_second < math.inf):
            raise ConfigError("min_per_second", min_per_second, "a finite number >= 0")
        if not (isinstance(window_seconds, int | float) and 0 < window_seconds < math.inf):
            raise ConfigError("window_seconds", window_seconds, "a positive finite number")
        self._deposit = round(ratio * SCALE)
        self._reserve = math.floor(min_per_second * window_seconds * SCALE)
        self._span = math.ceil(window_seconds)  # buckets older than this many seconds expire
        # [second, requests, retries] per second that saw any, oldest first.
        self._buckets: deque[list[int]] = deque()
        self._requests = 0  # over the buckets
        self._retries = 0

    def record_request(self, now: float) -> None:
        """An original request (not a retry) was sent: it deposits ``ratio`` tokens."""
        self._bucket(now)[1] += 1
        self._requests += 1

    def try_retry(self, now: float) -> bool:
        """Withdraw one token for a retry; False (and nothing withdrawn) when none is left."""
        self._prune(now)
        if self._units() < SCALE:
            return False
        self._bucket(now)[2] += 1
        self._retries += 1
        return True

    def snapshot(self, now: float) -> BudgetSnapshot:
        """The window's counts and the tokens left at ``now``."""
        self._prune(now)
        return BudgetSnapshot(
            requests=self._requests,
            retries=self._retries,
            available=max(self._units(), 0) / SCALE,
        )

    def _units(self) -> int:
        return self._reserve + self._deposit * self._requests - SCALE * self._retries

    def _bucket(self, now: float) -> list[int]:
        """The bucket of ``now``'s second (the newest one if the clock stepped back)."""
        second = math.floor(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] >= second:
            return buckets[-1]
        self._prune(now)
        bucket = [second, 0, 0]
        buckets.append(bucket)
        return bucket

    def _prune(self, now: float) -> None:
        buckets = self._buckets
        oldest = math.floor(now) - self._span - 1  # buckets of this second and older have expired
        while buckets and buckets[0][0] <= oldest:
            _, requests, retries = buckets.popleft()
            self._requests -= requests
            self._retries -= retries
