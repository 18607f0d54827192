"""Balancers: pure choice of one deployment among a model's candidates.

The first balancer is smooth weighted round-robin (nginx's algorithm): every deployment gets a
share of requests proportional to its weight, interleaved rather than in bursts, and the choice is
deterministic, which keeps tests exact. Deployments that already failed this request are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

from citadel.settings import Deployment


class WeightedRoundRobin:
    """Smooth weighted round-robin over one model's deployments."""

    __slots__ = ("_current", "_deployments", "_total", "_weights")

    def __init__(self, deployments: Sequence[Deployment]) -> None:
        if not deployments:
            raise ValueError("a balancer needs at least one deployment")
        self._deployments = tuple(deployments)
        self._weights = tuple(max(d.weight, 0.0) or 1e-9 for d in self._deployments)
        self._total = sum(self._weights)
        self._current = [0.0] * len(self._deployments)

    def pick(self, exclude: frozenset[str] = frozenset()) -> Deployment | None:
        """The next deployment not in ``exclude`` (by name), or None when every one is excluded."""
        if len(self._deployments) == 1:
            only = self._deployments[0]
            return None if only.name in exclude else only
        best = -1
        current = self._current
        total = 0.0
        for i, deployment in enumerate(self._deployments):
            if deployment.name in exclude:
                continue
            current[i] += self._weights[i]
            total += self._weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self._deployments[best]
