"""What a request reports to when it ends: the router, the limiter, the metrics and the usage sink.

``Meter`` is the one place a finished ``Call`` (``citadel.gateway.call``) settles its accounts:
it tells the router how the attempt went (or just frees the slot), settles the limiter
reservation to actual usage in the background (which also returns the concurrency lease), records
the Prometheus metrics and emits the usage event. None of it blocks the response or raises.

A request answered before any ``Call`` served it (a bad body, an unknown model, the tier's 403,
the limits' 429, the fail-closed 503) is one usage event too, with no deployment, no tokens and
no cost (``Meter.unserved``): every request the gateway answered for a principal is in the ledger.
Only unauthenticated requests (401) are not: they have no principal, and are counted in the
gateway's metrics alone.

Dependencies run one way: ``meter`` <- ``upstream`` <- ``call`` <- ``proxy``; ``Target`` lives
here because both the upstream attempts and the metering label by it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from citadel.accounts.auth import Principal
from citadel.errors import StoreUnavailable
from citadel.http.client import Origin
from citadel.limits.decision import Limiter, Limits, Reservation
from citadel.metering.events import UsageEvent, UsageSink, new_event_id
from citadel.metrics import (
    GATEWAY_CLIENT_DISCONNECTS,
    GATEWAY_IN_FLIGHT,
    GATEWAY_REQUEST_DURATION,
    GATEWAY_REQUESTS,
    GATEWAY_TOKENS,
    GATEWAY_TOKENS_TOTAL,
    GATEWAY_TPOT,
    GATEWAY_TTFT,
    GATEWAY_UPSTREAM_ERRORS,
    LIMITER_FAILURES,
    Registry,
)
from citadel.routing.router import DeploymentState, Router
from citadel.settings import Deployment

_log = logging.getLogger("citadel.gateway")


@dataclass(slots=True)
class Target:
    """A deployment with its parsed origin and the label tuples its metrics use."""

    deployment: Deployment
    origin: Origin
    labels: tuple[str, str]


class Meter:
    """The router, the limiter, the metrics and the usage sink, as one finished call sees them."""

    def __init__(
        self,
        *,
        registry: Registry,
        router: Router,
        usage: UsageSink | None,
        limiter: Limiter | None,
        fail_closed: bool,
    ) -> None:
        self.router = router
        self.usage = usage
        self._limiter = limiter
        self._fail_closed = fail_closed
        self.limiter_healthy = True
        self._reconciling: set[asyncio.Task[None]] = set()
        self._limiter_failures = registry.counter(LIMITER_FAILURES)
        # /metrics lists the metrics in the order they are registered here.
        self.requests = registry.counter(GATEWAY_REQUESTS)
        self.duration = registry.histogram(GATEWAY_REQUEST_DURATION)
        self.ttft = registry.histogram(GATEWAY_TTFT)
        self.tpot = registry.histogram(GATEWAY_TPOT)
        self.tokens = registry.histogram(GATEWAY_TOKENS)
        self.tokens_total = registry.counter(GATEWAY_TOKENS_TOTAL)
        self.in_flight = registry.gauge(GATEWAY_IN_FLIGHT)
        self._upstream_errors = registry.counter(GATEWAY_UPSTREAM_ERRORS)
        self.disconnects = registry.counter(GATEWAY_CLIENT_DISCONNECTS)

    def count_error(self, target: Target, kind: str) -> None:
        self._upstream_errors.inc((*target.labels, kind))

    def route_outcome(self, state: DeploymentState, *, status: int, latency: float) -> None:
        """Tell the router how the attempt that got a response head ended (499: it just ends)."""
        now = time.monotonic()
        if status == 499:
            self.router.release(state, now)
            return
        self.router.end(state, now, success=status < 500, latency=latency, error=str(status))

    def unserved(
        self,
        principal: Principal,
        *,
        request_id: str,
        endpoint: str,
        model: str,
        status: int,
        reason: str,
        refused: bool,
        streamed: bool,
        started: float,
        wall: float,
    ) -> None:
        """The usage event of a request answered before any deployment was asked (see the
        module docstring): ``refused`` when the caller's tier or limits refused it."""
        if self.usage is None:
            return
        self.emit(
            UsageEvent(
                event_id=new_event_id(wall),
                time=wall,
                request_id=request_id,
                user=principal.user,
                team=principal.team,
                key_id=principal.key_id,
                tier=principal.tier,
                endpoint=endpoint,
                model=model,
                deployment="",
                prompt_tokens=0,
                completion_tokens=0,
                latency_seconds=time.perf_counter() - started,
                ttft_seconds=None,
                status=status,
                streamed=streamed,
                cancelled=False,
                usage_estimated=False,
                cost_micros=0,
                reason=reason,
                refused=refused,
            )
        )

    def emit(self, event: UsageEvent) -> None:
        sink = self.usage
        if sink is None:
            return
        try:
            sink.emit(event)
        except Exception:  # metering must never break a response
            _log.exception("usage sink failed")

    # -- limits ------------------------------------------------------------------------------

    def limiter_down(self, operation: str) -> None:
        self.limiter_healthy = False
        mode = "closed" if self._fail_closed else "open"
        self._limiter_failures.inc((operation, mode))
        _log.warning("limiter unavailable", extra={"operation": operation, "mode": mode})

    def settle(self, reservation: Reservation, limits: Limits, *, tokens: int, cost: int) -> None:
        """Settle the reservation to actual usage in the background (never on the response)."""
        limiter = self._limiter
        if limiter is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._settle(limiter, reservation, limits, tokens, cost)
        )
        self._reconciling.add(task)
        task.add_done_callback(self._reconciling.discard)

    async def _settle(
        self, limiter: Limiter, reservation: Reservation, limits: Limits, tokens: int, cost: int
    ) -> None:
        try:
            await limiter.reconcile(
                reservation, limits, tokens=tokens, cost_micros=cost, now=time.time()
            )
        except StoreUnavailable:
            self.limiter_down("reconcile")
        except Exception:
            _log.exception("reconciliation failed")

    async def drain(self) -> None:
        """Wait for reconciliations still under way (at shutdown)."""
        if self._reconciling:
            await asyncio.wait(list(self._reconciling), timeout=5.0)
