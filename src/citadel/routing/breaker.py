"""The circuit breaker of one deployment: a pure state machine, with ``now`` passed in.

Theory of operation
-------------------
A breaker is in one of three states, and moves between them only along the rows of
``TRANSITIONS``; every other (state, event) pair raises ``IllegalTransition``::

    CLOSED --FAILURE_RATE / CONSECUTIVE_FAILURES / SLOW_CALL_RATE / FORCE_OPEN--> OPEN
    OPEN --BACKOFF_ELAPSED--> HALF_OPEN       OPEN --FORCE_OPEN--> OPEN (held until reset)
    HALF_OPEN --PROBE_SUCCEEDED--> CLOSED     HALF_OPEN --PROBE_FAILED / FORCE_OPEN--> OPEN
    OPEN, HALF_OPEN --RESET--> CLOSED

The adapter asks ``allow(now)`` before it sends a call to the deployment, and reports every call
that was allowed exactly once: ``record(now, success=..., duration=...)`` when the outcome is
known, or ``release(now)`` when the call ended without one (the client went away). Both return
the ``Transition`` they caused, if any, so that the adapter can log it and count it.

*Closed* admits everything and keeps a sliding window of the outcomes of the last
``window_seconds`` (a deque with running counters: each outcome is appended once and pruned once).
It trips when, after an outcome, the window holds at least ``minimum_calls`` calls and their
failure rate reaches ``failure_rate_threshold``; when ``consecutive_failures`` calls in a row
failed (a hard outage trips at once, even at low traffic); or when, again over at least
``minimum_calls`` calls, the share of calls that took ``slow_call_seconds`` or longer reaches
``slow_call_rate_threshold``. Since every outcome is judged as it arrives, a breaker left closed by
``record`` always has its window under the thresholds.

*Open* refuses everything for a back-off: ``open_seconds`` on the first trip, multiplied by
``backoff_multiplier`` on each failed probe, capped at ``max_open_seconds``, and reset once the
breaker closes again. The first ``allow`` after the back-off moves the breaker to half-open (the
breaker has no timer: the transition happens when someone asks). An admin ``force_open`` holds it
open with no back-off at all, until ``reset``.

*Half-open* lets at most ``half_open_probes`` calls through at a time; an admitted call is a
probe. One failed (or slow) probe opens the breaker again with a longer back-off: a slow probe
counts as failed because closing on it would only trip the slow-call rule again.
``probes_to_close`` successful probes close it, with an empty window.

Calls admitted before the breaker went half-open may still be running when it does; they are not
probes, yet the breaker cannot tell which call an outcome belongs to (the API has no tickets). So
on entering half-open it notes how many calls are in flight, and attributes each outcome to those
first. A probe slot therefore never frees early (the probe limit holds); a success is counted
toward closing only when it can only have been a probe's; a failure always reopens, whoever sent
it. Outcomes that arrive while open change nothing but the count of calls in flight.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from citadel.errors import CitadelError, ConfigError


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Event(enum.Enum):
    FAILURE_RATE = "failure_rate"  # the window's failure rate reached the threshold
    CONSECUTIVE_FAILURES = "consecutive_failures"  # that many calls failed in a row
    SLOW_CALL_RATE = "slow_call_rate"  # the window's slow-call rate reached the threshold
    BACKOFF_ELAPSED = "backoff_elapsed"  # a call was asked for after the back-off
    PROBE_SUCCEEDED = "probe_succeeded"  # the last of ``probes_to_close`` probes succeeded
    PROBE_FAILED = "probe_failed"  # a call failed, or a probe was slow, while half-open
    FORCE_OPEN = "force_open"  # an admin drained the deployment
    RESET = "reset"  # an admin restored the deployment


CLOSED: Final = BreakerState.CLOSED
OPEN: Final = BreakerState.OPEN
HALF_OPEN: Final = BreakerState.HALF_OPEN

TRANSITIONS: Final[Mapping[tuple[BreakerState, Event], BreakerState]] = MappingProxyType(
    {
        (CLOSED, Event.FAILURE_RATE): OPEN,
        (CLOSED, Event.CONSECUTIVE_FAILURES): OPEN,
        (CLOSED, Event.SLOW_CALL_RATE): OPEN,
        (CLOSED, Event.FORCE_OPEN): OPEN,
        (OPEN, Event.BACKOFF_ELAPSED): HALF_OPEN,
        (OPEN, Event.FORCE_OPEN): OPEN,  # from a back-off to a hold until reset
        (OPEN, Event.RESET): CLOSED,
        (HALF_OPEN, Event.PROBE_SUCCEEDED): CLOSED,
        (HALF_OPEN, Event.PROBE_FAILED): OPEN,
        (HALF_OPEN, Event.FORCE_OPEN): OPEN,
        (HALF_OPEN, Event.RESET): CLOSED,
    }
)


class IllegalTransition(CitadelError):
    """An event that the transition table does not allow in the breaker's current state."""

    def __init__(self, event: Event, state: BreakerState) -> None:
        self.event = event
        self.state = state
        super().__init__(f"event {event.name} is not allowed in state {state.name}")


def next_state(state: BreakerState, event: Event) -> BreakerState:
    """The state that ``event`` leads to from ``state``, by the table."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(event, state) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how it closes again (``routing.breaker`` in the settings)."""

    window_seconds: float = 30.0
    minimum_calls: int = 10  # the rates are judged over at least this many calls
    failure_rate_threshold: float = 0.5
    consecutive_failures: int = 5
    slow_call_seconds: float = 30.0  # a call this long or longer is slow
    slow_call_rate_threshold: float = 0.8
    open_seconds: float = 5.0  # the first back-off
    backoff_multiplier: float = 2.0  # applied on each failed probe
    max_open_seconds: float = 120.0
    half_open_probes: int = 2  # probes in flight at once
    probes_to_close: int = 2  # successful probes that close the breaker

    def __post_init__(self) -> None:
        for key in (
            "window_seconds",
            "slow_call_seconds",
            "open_seconds",
            "backoff_multiplier",
            "max_open_seconds",
        ):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ConfigError(key, value, "a positive finite number")
        for key in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise ConfigError(key, value, "a number from 0 to 1")
        for key in ("minimum_calls", "consecutive_failures", "half_open_probes", "probes_to_close"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(key, value, "an integer >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class Transition:
    """One move of a breaker, for the adapter to log and count."""

    from_state: BreakerState
    to_state: BreakerState
    event: Event
    at: float


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerSnapshot:
    """A breaker as seen at ``now``, for the admin API and the metrics."""

    state: BreakerState
    calls_in_window: int
    failure_rate: float  # over the window; 0.0 when it is empty
    slow_call_rate: float
    consecutive_failures: int
    open_until: float | None  # when open: the end of the back-off (inf when forced open)
    trips: int  # openings since the breaker was last closed; the back-off grows with them
    probes_in_flight: int  # when half-open: probe slots taken


_ADMITTED: Final = (True, None)
_REFUSED: Final = (False, None)


class CircuitBreaker:
    """The breaker of one deployment; see the module docstring for its rules."""

    __slots__ = (
        "_backoff",
        "_calls",
        "_config",
        "_consecutive",
        "_failures",
        "_in_flight",
        "_open_until",
        "_probe_successes",
        "_probes",
        "_slow",
        "_stale",
        "_state",
        "_trips",
        "_window",
    )

    def __init__(self, config: BreakerConfig = BreakerConfig()) -> None:
        self._config = config
        self._state = CLOSED
        # The window: (time, failed, slow) per outcome recorded while closed, and its counters.
        self._window: deque[tuple[float, bool, bool]] = deque()
        self._calls = 0
        self._failures = 0
        self._slow = 0
        self._consecutive = 0
        self._backoff = min(config.open_seconds, config.max_open_seconds)
        self._open_until = math.inf
        self._trips = 0
        self._in_flight = 0  # admitted calls not yet recorded or released
        self._stale = 0  # half-open: in-flight calls admitted before it, not yet accounted for
        self._probes = 0  # half-open: probe slots taken
        self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def config(self) -> BreakerConfig:
        return self._config

    def allow(self, now: float) -> tuple[bool, Transition | None]:
        """May a call go to the deployment now? Every admitted call must be recorded or released."""
        state = self._state
        if state is CLOSED:
            self._in_flight += 1
            return _ADMITTED
        if state is OPEN:
            if now < self._open_until:
                return _REFUSED
            transition = self._fire(Event.BACKOFF_ELAPSED, now)
            self._probes = 1  # this call is the first probe
            self._in_flight += 1
            return True, transition
        if self._probes < self._config.half_open_probes:
            self._probes += 1
            self._in_flight += 1
            return _ADMITTED
        return _REFUSED

    def record(self, now: float, *, success: bool, duration: float) -> Transition | None:
        """The outcome of an admitted call; ``duration`` in seconds decides whether it was slow."""
        config = self._config
        slow = duration >= config.slow_call_seconds
        state = self._state
        if state is CLOSED:
            if self._in_flight:
                self._in_flight -= 1
            self._prune(now)
            self._window.append((now, not success, slow))
            self._calls += 1
            if success:
                self._consecutive = 0
            else:
                self._failures += 1
                self._consecutive += 1
            if slow:
                self._slow += 1
            calls = self._calls
            if calls >= config.minimum_calls:
                if self._failures / calls >= config.failure_rate_threshold:
                    return self._fire(Event.FAILURE_RATE, now)
                if self._slow / calls >= config.slow_call_rate_threshold:
                    return self._fire(Event.SLOW_CALL_RATE, now)
            if self._consecutive >= config.consecutive_failures:
                return self._fire(Event.CONSECUTIVE_FAILURES, now)
            return None
        was_probe = self._finish()
        if state is OPEN:
            return None
        if not success or (was_probe and slow):
            return self._fire(Event.PROBE_FAILED, now)
        if was_probe:
            self._probe_successes += 1
            if self._probe_successes >= config.probes_to_close:
                return self._fire(Event.PROBE_SUCCEEDED, now)
        return None

    def release(self, now: float) -> None:
        """An admitted call ended without an outcome: its probe slot, if it held one, is free."""
        self._finish()

    def force_open(self, now: float) -> Transition | None:
        """Drain the deployment until ``reset``; None when it is already held open."""
        if self._state is OPEN and self._open_until == math.inf:
            return None
        return self._fire(Event.FORCE_OPEN, now)

    def reset(self, now: float) -> Transition | None:
        """Close the breaker with a clean slate; None when it is already closed."""
        if self._state is CLOSED:
            return None
        return self._fire(Event.RESET, now)

    def snapshot(self, now: float) -> BreakerSnapshot:
        """The breaker at ``now``; it moves no state (an open breaker past its back-off still
        reads open until the next ``allow``), it only drops outcomes that left the window."""
        self._prune(now)
        calls = self._calls
        state = self._state
        return BreakerSnapshot(
            state=state,
            calls_in_window=calls,
            failure_rate=self._failures / calls if calls else 0.0,
            slow_call_rate=self._slow / calls if calls else 0.0,
            consecutive_failures=self._consecutive,
            open_until=self._open_until if state is OPEN else None,
            trips=self._trips,
            probes_in_flight=self._probes,
        )

    def _prune(self, now: float) -> None:
        """Drop the outcomes that left the window ``(now - window_seconds, now]``."""
        window = self._window
        horizon = now - self._config.window_seconds
        while window and window[0][0] <= horizon:
            _, failed, slow = window.popleft()
            self._calls -= 1
            self._failures -= failed
            self._slow -= slow

    def _finish(self) -> bool:
        """One admitted call ended; True when it can only have been a half-open probe."""
        if self._in_flight:
            self._in_flight -= 1
        if self._stale:
            self._stale -= 1
            return False
        if self._probes:
            self._probes -= 1
            return True
        return False

    def _fire(self, event: Event, now: float) -> Transition:
        """The one place the state changes: by the table, with each state's entry actions."""
        old = self._state
        new = next_state(old, event)
        config = self._config
        if new is OPEN:
            if event is Event.FORCE_OPEN:
                self._open_until = math.inf
            else:
                if event is Event.PROBE_FAILED:
                    self._backoff = min(
                        self._backoff * config.backoff_multiplier, config.max_open_seconds
                    )
                self._trips += 1
                self._open_until = now + self._backoff
        elif new is HALF_OPEN:
            self._stale = self._in_flight
        else:
            self._window.clear()
            self._calls = self._failures = self._slow = self._consecutive = 0
            self._backoff = min(config.open_seconds, config.max_open_seconds)
            self._trips = 0
            self._open_until = math.inf
        if new is not HALF_OPEN:
            self._stale = 0
        self._probes = 0
        self._probe_successes = 0
        self._state = new
        return Transition(from_state=old, to_state=new, event=event, at=now)
