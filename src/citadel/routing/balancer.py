"""Balancers: pure choice of one deployment among a model's candidates.

Theory of operation
-------------------
The caller filters first: a candidate is a deployment that is healthy, whose breaker lets a request
through, that is not being drained and that this request has not already tried. It describes each
one as a ``Candidate`` (weight, requests in flight, concurrency cap, peak-EWMA latency, price) and
asks a balancer to ``pick`` one. Balancers do no I/O and read no clock; the random ones take a
``random.Random`` so that a seeded one makes them exact in tests.

Every balancer first sets aside the *full* candidates (``in_flight >= max_concurrency`` with a cap
set), unless all of them are full: then it chooses among all, and the deployment's own queue or
429 is the backpressure. A weight of zero or less counts as a tiny weight, a last resort.

*Load* below is ``(in_flight + 1) / weight``: the share of the deployment one more request would
take. The ``+ 1`` makes weights matter when everything is idle (the heavier deployment wins)
and makes latency matter even for an idle deployment.

- ``round_robin``: smooth weighted round-robin (nginx). Each pick adds every candidate's weight to
  its running credit, takes the one with the most, and charges it the total. Weights 3:1 give
  ``a a b a``: shares exact over every cycle, interleaved rather than bursty. Credits are kept by
  name, so a candidate absent from one pick (tried, drained) keeps its credit for the next.
- ``weighted_random``: independent picks with probability proportional to weight.
- ``least_outstanding``: the lowest load; ties broken at random.
- ``power_of_two``: two distinct candidates drawn at random, the one with the lower load. Nearly as
  good as least-outstanding at spreading load, and it does not herd every gateway worker onto the
  one deployment that looks idle in a stale view.
- ``peak_ewma``: power of two choices on ``latency * load``, Finagle's and Linkerd's balancer. A
  candidate with no latency data counts as the fastest known, so a new deployment gets tried.
  Latency is floored at 1 ms so that load still separates deployments whose latency reads as 0.
- ``cost_optimised``: the cheapest candidates whose latency is unknown or within the target; the
  fallback balancer chooses among equally cheap ones. When none is within the target, the fallback
  chooses among all, so a slow fleet still serves.

``explain`` turns a choice into one line of text for the dry-run endpoint.

``WeightedRoundRobin`` is the original deployment-level interface the gateway still uses: a thin
wrapper over ``RoundRobin`` that takes a set of names to exclude.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from citadel.settings import BALANCERS, Deployment, Price

__all__ = [
    "BALANCERS",
    "Balancer",
    "Candidate",
    "CostOptimised",
    "LeastOutstanding",
    "PeakEwmaBalancer",
    "PowerOfTwoChoices",
    "RoundRobin",
    "WeightedRandom",
    "WeightedRoundRobin",
    "blended_per_1k",
    "create_balancer",
    "explain",
]

_TINY_WEIGHT: Final = 1e-9  # a weight <= 0: chosen only when nothing else is
_LATENCY_FLOOR: Final = 0.001  # seconds; below it, load alone decides between deployments


@dataclass(frozen=True, slots=True)
class Candidate:
    """A deployment as a balancer sees it."""

    name: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrency: int = 0  # 0 = unlimited; a full deployment is not picked unless all are full
    latency: float | None = None  # peak-EWMA seconds (TTFT for streams); None = no data yet
    cost_per_1k: float = 0.0  # blended price per 1k tokens, see blended_per_1k

    @property
    def full(self) -> bool:
        return 0 < self.max_concurrency <= self.in_flight


def blended_per_1k(price: Price) -> float:
    """One price per 1000 tokens: the mean of the input and output prices."""
    return (price.input_per_1k + price.output_per_1k) / 2


class Balancer(Protocol):
    """Chooses one of a non-empty sequence of candidates; ``ValueError`` if it is empty."""

    name: str

    def pick(self, candidates: Sequence[Candidate]) -> Candidate: ...


# --- Shared pieces ------------------------------------------------------------------------------


def _open(candidates: Sequence[Candidate]) -> Sequence[Candidate]:
    """The candidates that are not full, or all of them when every one is full."""
    if not candidates:
        raise ValueError("a balancer needs at least one candidate, got none")
    for c in candidates:
        if 0 < c.max_concurrency <= c.in_flight:
            return [c for c in candidates if not 0 < c.max_concurrency <= c.in_flight] or candidates
    return candidates


def _weight(c: Candidate) -> float:
    return c.weight if c.weight > 0 else _TINY_WEIGHT


def _load(c: Candidate) -> float:
    """The share of the deployment one more request would take."""
    return (c.in_flight + 1) / (c.weight if c.weight > 0 else _TINY_WEIGHT)


def _two(rng: random.Random, n: int) -> tuple[int, int]:
    """Two distinct indices below ``n`` (n >= 2), uniformly."""
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    return i, j + (j >= i)


def _latency_for_unknown(candidates: Sequence[Candidate]) -> float:
    """The latency a candidate without data counts as: the lowest known, so it gets tried."""
    known = [c.latency for c in candidates if c.latency is not None]
    return min(known) if known else 1.0


def _latency_score(c: Candidate, unknown: float) -> float:
    """Peak-EWMA latency (floored) times the square root of load.

    Finagle multiplies by the load itself, which suits servers that answer one request at a
    time. Model servers batch (vLLM's continuous batching): a few more requests in flight cost a
    fast deployment little, so linear weighting sent traffic to a 5x slower one as soon as the
    fast ones had four requests each, and its latency showed in the p99 (bench/routing.py).
    """
    latency = unknown if c.latency is None else c.latency
    weight = c.weight if c.weight > 0 else _TINY_WEIGHT
    floored = latency if latency > _LATENCY_FLOOR else _LATENCY_FLOOR
    return floored * math.sqrt((c.in_flight + 1) / weight)


# --- The balancers -----------------------------------------------------------------------------


class RoundRobin:
    """Smooth weighted round-robin (nginx), deterministic, with credits kept by name."""

    __slots__ = ("_credit",)
    name = "round_robin"

    def __init__(self) -> None:
        self._credit: dict[str, float] = {}

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        pool = _open(candidates)
        if len(pool) == 1:
            return pool[0]  # adding its weight and charging it the total leaves its credit as is
        credit = self._credit
        best: Candidate | None = None
        best_credit = -math.inf
        total = 0.0
        for c in pool:
            w = c.weight if c.weight > 0 else _TINY_WEIGHT
            total += w
            current = credit.get(c.name, 0.0) + w
            credit[c.name] = current
            if current > best_credit:
                best, best_credit = c, current
        assert best is not None
        credit[best.name] = best_credit - total
        return best


class WeightedRandom:
    """Independent picks, each candidate with probability proportional to its weight."""

    __slots__ = ("_rng",)
    name = "weighted_random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        pool = _open(candidates)
        if len(pool) == 1:
            return pool[0]
        point = self._rng.random() * sum(_weight(c) for c in pool)
        for c in pool:
            point -= _weight(c)
            if point < 0:
                return c
        return pool[-1]  # rounding left a sliver past the last weight


class LeastOutstanding:
    """The candidate with the lowest load (in flight per weight); ties broken at random."""

    __slots__ = ("_rng",)
    name = "least_outstanding"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        pool = _open(candidates)
        if len(pool) == 1:
            return pool[0]
        lowest = math.inf
        ties: list[Candidate] = []
        for c in pool:
            load = (c.in_flight + 1) / (c.weight if c.weight > 0 else _TINY_WEIGHT)
            if load < lowest:
                lowest, ties = load, [c]
            elif load == lowest:
                ties.append(c)
        return ties[0] if len(ties) == 1 else ties[self._rng.randrange(len(ties))]


class PowerOfTwoChoices:
    """Of two distinct candidates drawn at random, the one with the lower load."""

    __slots__ = ("_rng",)
    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        pool = _open(candidates)
        if len(pool) == 1:
            return pool[0]
        i, j = _two(self._rng, len(pool))
        a, b = pool[i], pool[j]
        return b if self._prefers(b, a, pool) else a

    def _prefers(self, b: Candidate, a: Candidate, pool: Sequence[Candidate]) -> bool:
        """``b`` over ``a``: a strictly lower load (a tie keeps the first draw)."""
        return _load(b) < _load(a)


class PeakEwmaBalancer(PowerOfTwoChoices):
    """Power of two choices on peak-EWMA latency times load (Finagle, Linkerd)."""

    __slots__ = ()
    name = "peak_ewma"

    def _prefers(self, b: Candidate, a: Candidate, pool: Sequence[Candidate]) -> bool:
        no_data = a.latency is None or b.latency is None
        unknown = _latency_for_unknown(pool) if no_data else 1.0  # 1.0: unused
        return _latency_score(b, unknown) < _latency_score(a, unknown)


class CostOptimised:
    """The cheapest candidates within the latency target, split by the fallback balancer."""

    __slots__ = ("_fallback", "latency_target")
    name = "cost_optimised"

    def __init__(
        self,
        rng: random.Random,
        *,
        latency_target: float,
        fallback: Balancer | None = None,
    ) -> None:
        if not (latency_target > 0 and math.isfinite(latency_target)):
            raise ValueError(f"latency_target={latency_target!r}: expected a finite number > 0")
        self.latency_target = latency_target
        self._fallback = fallback if fallback is not None else PeakEwmaBalancer(rng)

    @property
    def fallback(self) -> Balancer:
        return self._fallback

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        pool = _open(candidates)
        return self._fallback.pick(self.shortlist(pool)[0])

    def shortlist(self, pool: Sequence[Candidate]) -> tuple[Sequence[Candidate], bool]:
        """The candidates the fallback chooses among, and whether they are within the target."""
        target = self.latency_target
        fast = [c for c in pool if c.latency is None or c.latency <= target]
        if not fast:
            return pool, False
        cheapest = min(c.cost_per_1k for c in fast)
        return [c for c in fast if c.cost_per_1k == cheapest], True


def create_balancer(name: str, rng: random.Random, *, latency_target: float = 2.0) -> Balancer:
    """The balancer called ``name`` (see BALANCERS); cost_optimised falls back to peak_ewma."""
    if name == "round_robin":
        return RoundRobin()
    if name == "weighted_random":
        return WeightedRandom(rng)
    if name == "least_outstanding":
        return LeastOutstanding(rng)
    if name == "power_of_two":
        return PowerOfTwoChoices(rng)
    if name == "peak_ewma":
        return PeakEwmaBalancer(rng)
    if name == "cost_optimised":
        return CostOptimised(rng, latency_target=latency_target, fallback=PeakEwmaBalancer(rng))
    raise ValueError(f"balancer {name!r}: expected one of {', '.join(BALANCERS)}")


# --- Explanations -------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:.3g}"


def explain(balancer: Balancer, candidates: Sequence[Candidate], chosen: Candidate) -> str:
    """One line saying why ``balancer`` chose ``chosen`` among ``candidates``."""
    pool = _open(candidates)
    full = sum(c.full for c in candidates)
    if not full:
        among = f"among {len(candidates)}"
    elif full == len(candidates):
        among = f"among {len(candidates)}, all full"
    else:
        among = f"among {len(pool)} not full of {len(candidates)}"
    return f"{balancer.name}: {chosen.name}, {_reason(balancer, pool, chosen)} {among}"


def _reason(balancer: Balancer, pool: Sequence[Candidate], chosen: Candidate) -> str:
    total = sum(_weight(c) for c in pool)
    share = f"weight {_num(chosen.weight)} of {_num(total)}"
    in_flight = f"{chosen.in_flight} in flight"
    if isinstance(balancer, RoundRobin):
        return f"next in smooth weighted round-robin, {share}"
    if isinstance(balancer, WeightedRandom):
        return f"drawn at random with {share} ({_weight(chosen) / total:.0%})"
    if isinstance(balancer, LeastOutstanding):
        return f"lowest in-flight per weight {_num(_load(chosen))} ({in_flight})"
    if isinstance(balancer, PeakEwmaBalancer):  # before its base, PowerOfTwoChoices
        unknown = _latency_for_unknown(pool)
        latency = "no latency data" if chosen.latency is None else f"{_num(chosen.latency)} s"
        score = _num(_latency_score(chosen, unknown))
        return f"lower latency×load score of two drawn, {score} ({latency}, {in_flight})"
    if isinstance(balancer, PowerOfTwoChoices):
        return f"lower in-flight per weight of two drawn, {_num(_load(chosen))} ({in_flight})"
    if isinstance(balancer, CostOptimised):
        shortlist, within = balancer.shortlist(pool)
        target = _num(balancer.latency_target)
        then = _reason(balancer.fallback, shortlist, chosen)
        if not within:
            return f"none within the {target} s latency target, so {balancer.fallback.name}: {then}"
        cost = _num(chosen.cost_per_1k)
        return (
            f"cheapest within the {target} s latency target at {cost}/1k tokens "
            f"({len(shortlist)} as cheap; {balancer.fallback.name}: {then})"
        )
    return "chosen"


# --- The gateway's original interface ----------------------------------------------------------


class WeightedRoundRobin:
    """Smooth weighted round-robin over one model's deployments, skipping excluded names."""

    __slots__ = ("_by_name", "_candidates", "_round_robin")

    def __init__(self, deployments: Sequence[Deployment]) -> None:
        if not deployments:
            raise ValueError("a balancer needs at least one deployment, got none")
        self._by_name = {d.name: d for d in deployments}
        self._candidates = tuple(Candidate(d.name, weight=d.weight) for d in deployments)
        self._round_robin = RoundRobin()

    def pick(self, exclude: frozenset[str] = frozenset()) -> Deployment | None:
        """The next deployment not in ``exclude`` (by name), or None when every one is excluded."""
        candidates: Sequence[Candidate] = self._candidates
        if exclude:
            candidates = [c for c in candidates if c.name not in exclude]
            if not candidates:
                return None
        return self._by_name[self._round_robin.pick(candidates).name]
