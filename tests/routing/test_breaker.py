"""The circuit breaker: its transition table driven by calls on a fake clock, and its invariants."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citadel.errors import CitadelError, ConfigError
from citadel.routing.breaker import (
    TRANSITIONS,
    BreakerConfig,
    BreakerSnapshot,
    BreakerState,
    CircuitBreaker,
    Event,
    IllegalTransition,
    Transition,
    next_state,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FAST = 0.1  # seconds: a call well under slow_call_seconds
SLOW = 31.0


def call(
    breaker: CircuitBreaker, now: float, *, success: bool = True, duration: float = FAST
) -> Transition | None:
    """One admitted call and its outcome; fails the test if the breaker refuses it."""
    allowed, _ = breaker.allow(now)
    assert allowed
    return breaker.record(now, success=success, duration=duration)


def trip(breaker: CircuitBreaker, now: float) -> Transition:
    """Fail calls until the breaker opens; the transition that opened it."""
    for _ in range(breaker.config.consecutive_failures):
        transition = call(breaker, now, success=False)
        if transition is not None:
            return transition
    raise AssertionError("the breaker did not trip")


def half_open(breaker: CircuitBreaker, now: float) -> float:
    """Trip the breaker at ``now`` and let its back-off elapse without admitting a probe yet."""
    trip(breaker, now)
    open_until = breaker.snapshot(now).open_until
    assert open_until is not None
    return open_until


def to_half_open(breaker: CircuitBreaker, now: float) -> float:
    """Trip the breaker and admit the first probe after its back-off; the time of that probe."""
    at = half_open(breaker, now)
    allowed, transition = breaker.allow(at)
    assert allowed
    assert transition is not None
    assert HALF_OPEN == breaker.state
    return at


# --- the table, row by row ------------------------------------------------------------------


def drive_failure_rate(breaker: CircuitBreaker) -> Transition | None:
    for i in range(9):  # alternating: never two failures in a row
        assert call(breaker, float(i), success=i % 2 == 0) is None
    return call(breaker, 9.0, success=False)  # 5 failures of 10


def drive_consecutive_failures(breaker: CircuitBreaker) -> Transition | None:
    for i in range(4):
        assert call(breaker, float(i), success=False) is None
    return call(breaker, 4.0, success=False)


def drive_slow_call_rate(breaker: CircuitBreaker) -> Transition | None:
    call(breaker, 0.0)
    call(breaker, 0.0)
    for _ in range(7):
        assert call(breaker, 1.0, duration=SLOW) is None
    return call(breaker, 1.0, duration=SLOW)  # 8 slow of 10


def drive_closed_force_open(breaker: CircuitBreaker) -> Transition | None:
    return breaker.force_open(1.0)


def drive_backoff_elapsed(breaker: CircuitBreaker) -> Transition | None:
    trip(breaker, 0.0)
    assert (False, None) == breaker.allow(4.999)
    allowed, transition = breaker.allow(5.0)
    assert allowed
    return transition


def drive_open_force_open(breaker: CircuitBreaker) -> Transition | None:
    trip(breaker, 0.0)
    return breaker.force_open(1.0)


def drive_open_reset(breaker: CircuitBreaker) -> Transition | None:
    trip(breaker, 0.0)
    return breaker.reset(1.0)


def drive_probe_succeeded(breaker: CircuitBreaker) -> Transition | None:
    at = to_half_open(breaker, 0.0)
    assert (True, None) == breaker.allow(at)
    assert breaker.record(at + 1, success=True, duration=FAST) is None
    return breaker.record(at + 2, success=True, duration=FAST)


def drive_probe_failed(breaker: CircuitBreaker) -> Transition | None:
    at = to_half_open(breaker, 0.0)
    return breaker.record(at + 1, success=False, duration=FAST)


def drive_half_open_force_open(breaker: CircuitBreaker) -> Transition | None:
    at = to_half_open(breaker, 0.0)
    return breaker.force_open(at + 1)


def drive_half_open_reset(breaker: CircuitBreaker) -> Transition | None:
    at = to_half_open(breaker, 0.0)
    return breaker.reset(at + 1)


@dataclass(frozen=True)
class Row:
    drive: Callable[[CircuitBreaker], Transition | None]
    at: float  # when the driven transition happens


ROWS: dict[tuple[BreakerState, Event], Row] = {
    (CLOSED, Event.FAILURE_RATE): Row(drive_failure_rate, 9.0),
    (CLOSED, Event.CONSECUTIVE_FAILURES): Row(drive_consecutive_failures, 4.0),
    (CLOSED, Event.SLOW_CALL_RATE): Row(drive_slow_call_rate, 1.0),
    (CLOSED, Event.FORCE_OPEN): Row(drive_closed_force_open, 1.0),
    (OPEN, Event.BACKOFF_ELAPSED): Row(drive_backoff_elapsed, 5.0),
    (OPEN, Event.FORCE_OPEN): Row(drive_open_force_open, 1.0),
    (OPEN, Event.RESET): Row(drive_open_reset, 1.0),
    (HALF_OPEN, Event.PROBE_SUCCEEDED): Row(drive_probe_succeeded, 7.0),
    (HALF_OPEN, Event.PROBE_FAILED): Row(drive_probe_failed, 6.0),
    (HALF_OPEN, Event.FORCE_OPEN): Row(drive_half_open_force_open, 6.0),
    (HALF_OPEN, Event.RESET): Row(drive_half_open_reset, 6.0),
}


def test_every_row_is_driven() -> None:
    """Each row of the transition table has a test that reaches it through the public calls."""
    assert set(TRANSITIONS) == set(ROWS)


@pytest.mark.parametrize(("pair", "row"), ROWS.items(), ids=[f"{s.name}-{e.name}" for s, e in ROWS])
def test_row(pair: tuple[BreakerState, Event], row: Row) -> None:
    """Driving the breaker into a state and making the event happen follows the table's row."""
    state, event = pair
    breaker = CircuitBreaker()
    transition = row.drive(breaker)
    expected = Transition(from_state=state, to_state=TRANSITIONS[pair], event=event, at=row.at)
    assert expected == transition
    assert TRANSITIONS[pair] == breaker.state


ILLEGAL = [(s, e) for s in BreakerState for e in Event if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=lambda v: v.name)
def test_illegal_pair_raises_naming_both(state: BreakerState, event: Event) -> None:
    """Every pair outside the table is illegal, and the error names the event and the state."""
    with pytest.raises(IllegalTransition) as info:
        next_state(state, event)
    assert event.name in str(info.value)
    assert state.name in str(info.value)
    assert (event, state) == (info.value.event, info.value.state)
    assert isinstance(info.value, CitadelError)


def test_table_size() -> None:
    """Eleven pairs of the 24 (three states, eight events) are legal; thirteen are not."""
    assert (11, 13) == (len(TRANSITIONS), len(ILLEGAL))


# --- closed: when it trips ------------------------------------------------------------------


def test_minimum_calls_respected() -> None:
    """Nine failures out of nine do not trip on the rate when ten calls are the minimum."""
    breaker = CircuitBreaker(BreakerConfig(minimum_calls=10, consecutive_failures=100))
    for _ in range(9):
        assert call(breaker, 0.0, success=False) is None
    assert CLOSED == breaker.state
    transition = call(breaker, 0.0, success=False)
    assert transition is not None
    assert Event.FAILURE_RATE == transition.event


def test_consecutive_failures_trip_under_the_minimum() -> None:
    """Under the minimum number of calls, consecutive failures still trip the breaker."""
    breaker = CircuitBreaker(BreakerConfig(minimum_calls=10, consecutive_failures=5))
    for _ in range(4):
        assert call(breaker, 0.0, success=False) is None
    transition = call(breaker, 0.0, success=False)
    assert transition is not None
    assert Event.CONSECUTIVE_FAILURES == transition.event


def test_a_success_resets_the_consecutive_count() -> None:
    """Failures interrupted by a success are not consecutive."""
    breaker = CircuitBreaker(BreakerConfig(minimum_calls=100))
    for i in range(20):
        assert call(breaker, 0.0, success=i % 5 == 4) is None
    assert 0 == breaker.snapshot(0.0).consecutive_failures


def test_rate_under_threshold_stays_closed() -> None:
    """Four failures in ten calls stay under a 50 % threshold."""
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=100))
    for i in range(10):
        assert call(breaker, 0.0, success=i % 5 not in (1, 3)) is None
    snapshot = breaker.snapshot(0.0)
    assert (CLOSED, 10, 0.4) == (snapshot.state, snapshot.calls_in_window, snapshot.failure_rate)


def test_old_outcomes_leave_the_window() -> None:
    """Outcomes older than the window no longer count toward the rates."""
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=100, window_seconds=30.0))
    for _ in range(9):
        call(breaker, 0.0, success=False)
    assert 9 == breaker.snapshot(29.999).calls_in_window
    assert call(breaker, 30.0, success=False) is None  # the nine have left
    assert 1 == breaker.snapshot(30.0).calls_in_window


def test_slow_calls_trip() -> None:
    """Calls that take slow_call_seconds or longer trip the breaker on the slow-call rate."""
    config = BreakerConfig(slow_call_seconds=10.0, slow_call_rate_threshold=0.5, minimum_calls=4)
    breaker = CircuitBreaker(config)
    assert call(breaker, 0.0, duration=9.999) is None
    assert call(breaker, 0.0, duration=10.0) is None
    assert call(breaker, 0.0, duration=1.0) is None
    transition = call(breaker, 0.0, duration=25.0)
    assert transition is not None
    assert Event.SLOW_CALL_RATE == transition.event
    assert OPEN == breaker.state


def test_slow_failures_count_as_slow() -> None:
    """A slow call counts toward the slow-call rate whether it succeeded or failed."""
    config = BreakerConfig(
        consecutive_failures=100, failure_rate_threshold=1.0, slow_call_rate_threshold=1.0
    )
    breaker = CircuitBreaker(config)
    for i in range(9):
        assert call(breaker, 0.0, success=i % 2 == 0, duration=SLOW) is None
    transition = call(breaker, 0.0, success=False, duration=SLOW)
    assert transition is not None
    assert Event.SLOW_CALL_RATE == transition.event


# --- open: back-off -------------------------------------------------------------------------


def test_open_refuses_until_the_backoff_ends() -> None:
    """An open breaker refuses every call before open_until, and admits a probe at it."""
    breaker = CircuitBreaker()
    trip(breaker, 100.0)
    assert 105.0 == breaker.snapshot(100.0).open_until
    for now in (100.0, 101.0, 104.999):
        assert (False, None) == breaker.allow(now)
    assert OPEN == breaker.state
    allowed, transition = breaker.allow(105.0)
    assert (True, Event.BACKOFF_ELAPSED) == (allowed, transition and transition.event)
    assert 1 == breaker.snapshot(105.0).probes_in_flight


def test_backoff_grows_capped_and_resets_after_closing() -> None:
    """Back-off is 5, 10, 20, ... seconds, capped at max_open_seconds, and 5 again once closed."""
    breaker = CircuitBreaker()
    trip(breaker, 0.0)
    holds = []
    now = 0.0
    for _ in range(7):
        snapshot = breaker.snapshot(now)
        assert snapshot.open_until is not None
        holds.append(snapshot.open_until - now)
        now = snapshot.open_until
        assert breaker.allow(now)[0]
        transition = breaker.record(now, success=False, duration=FAST)
        assert transition is not None
        assert Event.PROBE_FAILED == transition.event
    assert [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0] == holds
    assert 8 == breaker.snapshot(now).trips

    now = breaker.snapshot(now).open_until or math.nan
    assert breaker.allow(now)[0]
    assert breaker.allow(now)[0]
    assert breaker.record(now, success=True, duration=FAST) is None
    transition = breaker.record(now, success=True, duration=FAST)
    assert transition is not None
    assert (Event.PROBE_SUCCEEDED, CLOSED) == (transition.event, breaker.state)
    closed = breaker.snapshot(now)
    assert (0, 0, None) == (closed.calls_in_window, closed.trips, closed.open_until)

    trip(breaker, now)
    assert now + 5.0 == breaker.snapshot(now).open_until


def test_outcomes_while_open_change_nothing() -> None:
    """Calls admitted before the trip that end while open neither move nor feed the breaker."""
    breaker = CircuitBreaker()
    assert breaker.allow(0.0)[0]  # still running when the breaker trips
    trip(breaker, 0.0)
    before = breaker.snapshot(1.0)
    assert breaker.record(1.0, success=False, duration=SLOW) is None
    assert before == breaker.snapshot(1.0)


# --- half-open: probes ----------------------------------------------------------------------


def test_half_open_admits_exactly_the_probe_limit() -> None:
    """Half-open lets half_open_probes calls through at once, and refuses the next."""
    breaker = CircuitBreaker(BreakerConfig(half_open_probes=3, probes_to_close=5))
    at = to_half_open(breaker, 0.0)
    assert (True, None) == breaker.allow(at)
    assert (True, None) == breaker.allow(at)
    assert (False, None) == breaker.allow(at)
    assert 3 == breaker.snapshot(at).probes_in_flight
    assert breaker.record(at, success=True, duration=FAST) is None  # one probe ends: one slot
    assert (True, None) == breaker.allow(at)
    assert (False, None) == breaker.allow(at)


def test_release_frees_a_probe_slot() -> None:
    """A probe that ends without an outcome frees its slot, and does not count as a success."""
    breaker = CircuitBreaker(BreakerConfig(half_open_probes=1, probes_to_close=1))
    at = to_half_open(breaker, 0.0)
    assert (False, None) == breaker.allow(at)
    breaker.release(at + 1)
    assert (HALF_OPEN, 0) == (breaker.state, breaker.snapshot(at + 1).probes_in_flight)
    assert (True, None) == breaker.allow(at + 1)
    transition = breaker.record(at + 2, success=True, duration=FAST)
    assert transition is not None
    assert CLOSED == transition.to_state


def test_a_slow_probe_counts_as_failed() -> None:
    """A probe that succeeds slowly reopens the breaker: closing would only trip it again."""
    breaker = CircuitBreaker()
    at = to_half_open(breaker, 0.0)
    transition = breaker.record(at + SLOW, success=True, duration=SLOW)
    assert transition is not None
    assert (Event.PROBE_FAILED, OPEN) == (transition.event, breaker.state)


def test_calls_from_before_half_open_are_not_probes() -> None:
    """A call admitted while closed that ends while half-open frees no probe slot and closes
    nothing; its failure still reopens the breaker."""
    breaker = CircuitBreaker(BreakerConfig(half_open_probes=1, probes_to_close=1))
    assert breaker.allow(0.0)[0]  # an old call, still running
    assert breaker.allow(0.0)[0]  # another
    at = to_half_open(breaker, 0.0)
    assert breaker.record(at, success=True, duration=FAST) is None  # taken as the old call's
    assert (HALF_OPEN, 1) == (breaker.state, breaker.snapshot(at).probes_in_flight)
    assert (False, None) == breaker.allow(at)
    transition = breaker.record(at, success=False, duration=FAST)
    assert transition is not None
    assert (Event.PROBE_FAILED, OPEN) == (transition.event, breaker.state)


# --- admin ----------------------------------------------------------------------------------


def test_force_open_holds_until_reset() -> None:
    """A forced-open breaker refuses every call however long it waits, until it is reset."""
    breaker = CircuitBreaker()
    assert breaker.force_open(0.0) is not None
    assert breaker.force_open(1.0) is None  # already held
    assert math.inf == breaker.snapshot(1.0).open_until
    assert (False, None) == breaker.allow(1e9)
    transition = breaker.reset(1e9)
    assert transition is not None
    assert (Event.RESET, CLOSED) == (transition.event, breaker.state)
    assert (True, None) == breaker.allow(1e9)


def test_reset_clears_the_window_and_backoff() -> None:
    """After a reset the breaker starts over: an empty window, no trips, the first back-off."""
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=100, minimum_calls=10))
    for _ in range(10):
        call(breaker, 0.0, success=False)
    assert breaker.allow(5.0)[0]
    assert breaker.record(5.0, success=False, duration=FAST) is not None  # back-off now 10
    assert breaker.reset(6.0) is not None
    assert breaker.reset(6.0) is None  # already closed
    expected = BreakerSnapshot(
        state=CLOSED,
        calls_in_window=0,
        failure_rate=0.0,
        slow_call_rate=0.0,
        consecutive_failures=0,
        open_until=None,
        trips=0,
        probes_in_flight=0,
    )
    assert expected == breaker.snapshot(6.0)
    for _ in range(10):
        call(breaker, 7.0, success=False)
    assert 12.0 == breaker.snapshot(7.0).open_until


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("window_seconds", 0.0),
        ("open_seconds", -1.0),
        ("max_open_seconds", math.inf),
        ("failure_rate_threshold", 1.5),
        ("slow_call_rate_threshold", -0.1),
        ("minimum_calls", 0),
        ("half_open_probes", 0),
        ("probes_to_close", True),
    ],
)
def test_config_rejects_bad_values(key: str, value: object) -> None:
    """A bad setting is refused with its key in the message."""
    with pytest.raises(ConfigError, match=key):
        BreakerConfig(**{key: value})  # type: ignore[arg-type]


# --- invariants -----------------------------------------------------------------------------


@dataclass
class Call:
    """A call the breaker admitted: a probe if admitted while half-open, in half-open ``epoch``."""

    probe: bool
    epoch: int


class Model:
    """Drives a breaker with a sequence of operations and checks it after each one, against the
    invariants of the issue and an independent model of the sliding window."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config)
        self.now = 0.0
        self.in_flight: list[Call] = []
        self.epoch = 0  # entries into half-open so far
        self.outcomes: list[tuple[float, bool, bool]] = []  # recorded while closed, since closing

    def run(self, op: tuple[str, int, bool, bool, float]) -> None:
        kind, n, success, slow, dt = op
        if kind == "allow":
            for _ in range(n):
                self.allow()
        elif kind == "record" and self.in_flight:
            self.record(self.in_flight.pop(n % len(self.in_flight)), success, slow)
        elif kind == "release" and self.in_flight:
            self.in_flight.pop(n % len(self.in_flight))
            state = self.breaker.state
            self.breaker.release(self.now)
            assert state == self.breaker.state
        elif kind == "advance":
            self.now += dt
        elif kind == "force_open":
            self.follow(self.breaker.force_open(self.now))
            assert OPEN == self.breaker.state
        elif kind == "reset":
            self.follow(self.breaker.reset(self.now))
            assert CLOSED == self.breaker.state
        self.check()

    def follow(self, transition: Transition | None) -> None:
        if transition is None:
            return
        assert TRANSITIONS[transition.from_state, transition.event] == transition.to_state
        assert (self.now, transition.to_state) == (transition.at, self.breaker.state)
        if transition.to_state is HALF_OPEN:
            self.epoch += 1
        elif transition.to_state is CLOSED:
            self.outcomes.clear()
        elif transition.event is not Event.FORCE_OPEN:  # the back-off stays within its bounds
            open_until = self.breaker.snapshot(self.now).open_until
            assert open_until is not None
            slack = 1e-9 * max(1.0, self.now)  # open_until - now is rounded
            hold = open_until - self.now
            assert self.config.open_seconds - slack <= hold <= self.config.max_open_seconds + slack

    def allow(self) -> None:
        before = self.breaker.state
        allowed, transition = self.breaker.allow(self.now)
        self.follow(transition)
        if before is OPEN and allowed:  # (c) open admits only once its back-off has ended
            assert transition is not None
            assert Event.BACKOFF_ELAPSED == transition.event
        if before is CLOSED:
            assert allowed
        if allowed:
            assert self.breaker.state is not OPEN
            self.in_flight.append(Call(probe=self.breaker.state is HALF_OPEN, epoch=self.epoch))

    def record(self, _call: Call, success: bool, slow: bool) -> None:
        before = self.breaker.state
        duration = self.config.slow_call_seconds if slow else 0.0
        transition = self.breaker.record(self.now, success=success, duration=duration)
        self.follow(transition)
        if before is OPEN:
            assert transition is None
        if before is CLOSED:
            self.outcomes.append((self.now, not success, slow))
            if self.breaker.state is CLOSED:  # (b) never left closed over a threshold
                self.check_window()

    def check_window(self) -> None:
        horizon = self.now - self.config.window_seconds
        window = [o for o in self.outcomes if o[0] > horizon]
        calls = len(window)
        failure_rate = sum(o[1] for o in window) / calls if calls else 0.0
        slow_rate = sum(o[2] for o in window) / calls if calls else 0.0
        if calls >= self.config.minimum_calls:
            assert failure_rate < self.config.failure_rate_threshold
            assert slow_rate < self.config.slow_call_rate_threshold
        snapshot = self.breaker.snapshot(self.now)
        assert (calls, failure_rate, slow_rate) == (
            snapshot.calls_in_window,
            snapshot.failure_rate,
            snapshot.slow_call_rate,
        )
        assert snapshot.consecutive_failures < self.config.consecutive_failures

    def check(self) -> None:
        snapshot = self.breaker.snapshot(self.now)
        if snapshot.state is HALF_OPEN:  # (a) never more probes in flight than allowed
            probes = sum(c.probe and c.epoch == self.epoch for c in self.in_flight)
            assert probes <= snapshot.probes_in_flight <= self.config.half_open_probes
        if snapshot.state is OPEN:  # (c) open refuses before its back-off ends
            assert snapshot.open_until is not None
            if self.now < snapshot.open_until:
                assert (False, None) == self.breaker.allow(self.now)  # a refusal changes nothing


CONFIGS = st.builds(
    BreakerConfig,
    window_seconds=st.sampled_from([1.0, 5.0, 30.0]),
    minimum_calls=st.integers(1, 6),
    failure_rate_threshold=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    consecutive_failures=st.integers(1, 8),
    slow_call_seconds=st.sampled_from([1.0, 10.0]),
    slow_call_rate_threshold=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    open_seconds=st.sampled_from([0.5, 5.0]),
    backoff_multiplier=st.sampled_from([1.0, 2.0, 3.0]),
    max_open_seconds=st.sampled_from([5.0, 20.0]),
    half_open_probes=st.integers(1, 4),
    probes_to_close=st.integers(1, 5),
)
_N = st.integers(0, 1000)
_DT = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 5.0, 30.0]), st.floats(0.0, 60.0))
_ALLOW = st.tuples(st.just("allow"), st.integers(1, 6), st.just(True), st.just(False), st.just(0.0))
_RECORD = st.tuples(st.just("record"), _N, st.booleans(), st.booleans(), st.just(0.0))
_RELEASE = st.tuples(st.just("release"), _N, st.just(True), st.just(False), st.just(0.0))
_ADVANCE = st.tuples(st.just("advance"), st.just(0), st.just(True), st.just(False), _DT)
_ADMIN = st.tuples(
    st.sampled_from(["force_open", "reset"]),
    st.just(0),
    st.just(True),
    st.just(False),
    st.just(0.0),
)
_KINDS = {
    "allow": _ALLOW,
    "record": _RECORD,
    "release": _RELEASE,
    "advance": _ADVANCE,
    "admin": _ADMIN,
}
_WEIGHTED = (
    ["allow"] * 4 + ["record"] * 5 + ["release"] + ["advance"] * 2 + ["admin"]
)  # admin: rare
OPS = st.lists(st.sampled_from(_WEIGHTED).flatmap(_KINDS.__getitem__), min_size=50, max_size=200)


@settings(max_examples=300, deadline=None)
@given(config=CONFIGS, ops=OPS)
def test_breaker_invariants(
    config: BreakerConfig, ops: list[tuple[str, int, bool, bool, float]]
) -> None:
    """Under any sequence of calls, outcomes, releases, admin actions and clock steps: half-open
    never has more probes in flight than allowed, a breaker left closed by an outcome is under
    its thresholds, and open never admits before its back-off ends."""
    model = Model(config)
    for op in ops:
        model.run(op)
