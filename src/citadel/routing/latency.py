"""Latency and error-rate estimates: exponentially weighted moving averages over irregular samples.

Theory of operation
-------------------
Samples arrive when requests finish, so they are irregular in time; a fixed per-sample weight would
let a burst of samples wash out history in a second and a trickle hold it for minutes. Both
averages here weigh the past by elapsed time instead: a sample taken ``dt`` seconds after the
previous one gets weight ``1 - w`` with ``w = exp(-dt / tau)``, so history is forgotten at the same
rate in time (about 63 % per ``tau``) whatever the request rate. Two samples at one instant leave
the second without weight, as in Finagle.

``PeakEwma`` is the peak-sensitive variant of Finagle's and Linkerd's balancers: a peak replaces
the estimate at once, and a lower sample only pulls it down gradually. Unlike Finagle's, a peak
must be *confirmed*: the estimate jumps to the smaller of the last two samples, so it takes two
slow responses in a row, not one. On this noisy 2-core host a single late response of a fast
deployment (a pause of the gateway or the host) otherwise lifted its estimate to near that of a
5x slower peer for about a second, and the balancer sent the slow one enough requests to show in
the p99 (bench/routing.py). A deployment that turns slow is still avoided from its second slow
response, and trusted again only after a run of fast ones. For streams the sample is the time to
first token, the latency a caller notices.

``Ewma`` is the plain average, for rates such as the fraction of requests that failed (observe
1.0 for a failure, 0.0 for a success).

An estimate with no sample for ``stale_after_seconds`` (default five ``tau``, when the old value
weighs under 1 %) reads as ``initial`` again (None by default: no data), and the next sample
starts afresh. Balancers try a deployment with no data, so one that was avoided
for being slow is probed again once its bad record has aged out, instead of being shunned forever
on evidence it can no longer refresh.

Both are O(1) in time and memory, take ``now`` from the caller, and never read a clock.
"""

from __future__ import annotations

import math

__all__ = ["Ewma", "PeakEwma"]


class Ewma:
    """A time-weighted moving average: each sample pulls the estimate by ``1 - exp(-dt / tau)``."""

    __slots__ = ("_initial", "_stale_after", "_stamp", "_tau", "_value")

    def __init__(
        self,
        *,
        tau_seconds: float = 10.0,
        initial: float | None = None,
        stale_after_seconds: float | None = None,
    ) -> None:
        if not (tau_seconds > 0 and math.isfinite(tau_seconds)):
            raise ValueError(f"tau_seconds={tau_seconds!r}: expected a finite number > 0")
        stale_after = 5 * tau_seconds if stale_after_seconds is None else stale_after_seconds
        if not stale_after > 0:
            raise ValueError(f"stale_after_seconds={stale_after_seconds!r}: expected a number > 0")
        self._tau = tau_seconds
        self._initial = initial
        self._stale_after = stale_after
        self._value: float | None = None
        self._stamp = -math.inf

    @property
    def tau_seconds(self) -> float:
        return self._tau

    def observe(self, sample: float, now: float) -> None:
        """Fold in ``sample`` taken at ``now`` (seconds, any monotonic origin)."""
        value = self._current(now)
        if value is None:
            self._value = sample
        else:
            w = self._weight(now)
            self._value = value * w + sample * (1.0 - w)
        if now > self._stamp:
            self._stamp = now

    def value(self, now: float) -> float | None:
        """The estimate at ``now``: ``initial`` before the first sample and once it is stale."""
        value = self._current(now)
        return self._initial if value is None else value

    def _current(self, now: float) -> float | None:
        """The estimate from samples, or None if there is none or it is stale."""
        if now - self._stamp > self._stale_after:
            return None
        return self._value

    def _weight(self, now: float) -> float:
        """The weight of the past: 1 for no elapsed time (or a clock read out of order)."""
        elapsed = now - self._stamp
        return math.exp(-elapsed / self._tau) if elapsed > 0 else 1.0


class PeakEwma(Ewma):
    """A peak-sensitive moving average: jumps to a confirmed peak, decays towards lower samples."""

    __slots__ = ("_last",)
    _last: float  # the previous sample; set by the first observe, read only after it

    def observe(self, sample_seconds: float, now: float) -> None:
        """Fold in a latency measured at ``now``: a peak two samples agree on is taken whole."""
        value = self._current(now)
        if value is None:
            self._value = sample_seconds
        else:
            w = self._weight(now)
            averaged = value * w + sample_seconds * (1.0 - w)
            # The peak this sample and the previous one agree on: a lone outlier (a pause of the
            # gateway or the host) only pulls the estimate like the plain average.
            confirmed = sample_seconds if sample_seconds < self._last else self._last
            self._value = confirmed if confirmed > averaged else averaged
        self._last = sample_seconds
        if now > self._stamp:
            self._stamp = now
