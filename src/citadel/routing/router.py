"""The router: which deployment serves a request, and what it learns from each outcome.

Theory of operation. The router keeps one ``DeploymentState`` per deployment: in-flight count,
peak-EWMA latency (time to first token for streams, whole latency otherwise), an error-rate EWMA,
a circuit breaker, the active health verdict from the prober, and an operator's drain flag.

``select`` builds the candidates of a model: not excluded (already tried for this request), not
drained, breaker not open (or open past its back-off), and healthy; if no deployment is healthy it
uses them all rather than none (health checks can be wrong; the breakers still protect). The
model's balancer picks one; the breaker then has the last word (a half-open breaker admits only
its probes), and a refusal there excludes that deployment and picks again.

Passive health is the breaker fed by live traffic: failure rate, consecutive failures and slow
calls open it; active health is the prober's periodic request. Either takes a deployment out of
rotation; both let it back: the breaker through half-open probes, the prober after a good probe.

Retries draw on one ``RetryBudget`` per router: each original request deposits a fraction of a
retry, so a full outage cannot multiply the load by more than that fraction (plus a small floor).

Everything here is synchronous and takes ``now``; the gateway and the routing service drive it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from citadel.metrics import (
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    DEPLOYMENT_HEALTHY,
    ROUTING_DECISIONS,
    ROUTING_RETRIES,
    Registry,
)
from citadel.routing.balancer import Balancer, Candidate, create_balancer, explain
from citadel.routing.breaker import BreakerConfig, BreakerState, CircuitBreaker, Transition
from citadel.routing.budget import RetryBudget
from citadel.routing.classifier import ModelChoice, choose_model, classify
from citadel.routing.latency import Ewma, PeakEwma
from citadel.settings import Deployment, Model, Settings

_STATE_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
_KINDS_FOR = {"chat": ("chat",), "completion": ("chat", "completion"), "embedding": ("embedding",)}


@dataclass(slots=True)
class DeploymentState:
    """What the router knows about one deployment."""

    deployment: Deployment
    model: str
    breaker: CircuitBreaker
    # A 1 s decay: with a 10 s one (Finagle's) a single slow response of a fast deployment kept
    # its score up for seconds, sending traffic to a 5x slower peer (bench/routing.py).
    latency: PeakEwma = field(
        default_factory=lambda: PeakEwma(tau_seconds=1.0, stale_after_seconds=30.0)
    )
    errors: Ewma = field(default_factory=Ewma)
    in_flight: int = 0
    healthy: bool = True
    health_detail: str = "not probed yet"
    drained: bool = False
    requests: int = 0
    failures: int = 0
    last_error: str = ""

    @property
    def name(self) -> str:
        return self.deployment.name

    def cost_per_1k(self, model: Model) -> float:
        price = self.deployment.price or model.price
        return (price.input_per_1k + price.output_per_1k) / 2

    def candidate(self, model: Model, now: float) -> Candidate:
        """This deployment as a balancer sees it at ``now``."""
        return Candidate(
            name=self.name,
            weight=self.deployment.weight,
            in_flight=self.in_flight,
            max_concurrency=self.deployment.max_concurrency,
            latency=self.latency.value(now),
            cost_per_1k=self.cost_per_1k(model),
        )


@dataclass(frozen=True, slots=True)
class Selection:
    """A deployment chosen for one attempt; ``reason`` says why (worked out only when asked)."""

    state: DeploymentState
    balancer: Balancer | None
    candidates: Sequence[Candidate]

    @property
    def reason(self) -> str:
        if self.balancer is None:
            return f"the only deployment that can take it: {self.state.name}"
        chosen = next(c for c in self.candidates if c.name == self.state.name)
        return explain(self.balancer, self.candidates, chosen)


def breaker_config(settings: Settings) -> BreakerConfig:
    b = settings.routing.breaker
    return BreakerConfig(
        window_seconds=b.window_seconds,
        minimum_calls=b.minimum_calls,
        failure_rate_threshold=b.failure_rate_threshold,
        consecutive_failures=b.consecutive_failures,
        slow_call_seconds=b.slow_call_seconds,
        slow_call_rate_threshold=b.slow_call_rate_threshold,
        open_seconds=b.open_seconds,
        backoff_multiplier=b.backoff_multiplier,
        max_open_seconds=b.max_open_seconds,
        half_open_probes=b.half_open_probes,
        probes_to_close=b.probes_to_close,
    )


class Router:
    """Deployment choice, outcome bookkeeping, retry budget and model specialisation."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry,
        rng: random.Random | None = None,
        on_transition: Callable[[DeploymentState, Transition], None] | None = None,
        events: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._settings = settings
        rng = rng if rng is not None else random.Random()
        routing = settings.routing
        config = breaker_config(settings)
        self.states: dict[str, DeploymentState] = {}
        self._by_model: dict[str, list[DeploymentState]] = {}
        self._balancers: dict[str, Balancer] = {}
        for model in settings.models:
            states = [
                DeploymentState(deployment=d, model=model.name, breaker=CircuitBreaker(config))
                for d in model.deployments
            ]
            self._by_model[model.name] = states
            self.states.update((s.name, s) for s in states)
            self._balancers[model.name] = create_balancer(
                model.balancer or routing.balancer,
                rng,
                latency_target=routing.latency_target_seconds,
            )
        self.budget = RetryBudget(ratio=routing.retry_budget_ratio)
        self.virtual = frozenset(routing.virtual_models)
        self._on_transition = on_transition
        # Each change of a deployment's state (breaker, health, drain) as a JSON object, for the
        # event feed's ``deployments`` topic; called on changes only, never per request.
        self._events = events
        self._load_marks = dict.fromkeys(self.states, (0, 0))  # (in flight, requests)
        self._decisions = registry.counter(ROUTING_DECISIONS)
        self._retries = registry.counter(ROUTING_RETRIES)
        self._transitions = registry.counter(BREAKER_TRANSITIONS)
        self._breaker_state = registry.gauge(BREAKER_STATE)
        self._healthy = registry.gauge(DEPLOYMENT_HEALTHY)
        for state in self.states.values():
            self._breaker_state.set((state.name,), 0.0)
            self._healthy.set((state.name,), 1.0)

    # -- choosing -----------------------------------------------------------------------------

    def resolve(
        self,
        name: str,
        *,
        endpoint: str,
        prompt_text: str,
        needed_tokens: int,
        hint: str | None,
        allowed: Callable[[Model], bool],
        now: float | None = None,
    ) -> ModelChoice | None:
        """The best model for a virtual model name (``auto``), by task, fit and price; with
        ``now``, a model none of whose deployments could serve (``servable``) is passed over for
        the next fit."""
        task = (
            "embedding"
            if endpoint == "embedding"
            else classify(prompt_text, estimated_tokens=needed_tokens, hint=hint)
        )
        kinds = _KINDS_FOR[endpoint]
        models = [m for m in self._settings.models if m.kind in kinds]
        return choose_model(
            task,
            needed_tokens=needed_tokens,
            models=models,
            allowed=allowed,
            servable=None if now is None else (lambda m: self.servable(m, now)),
        )

    def servable(self, model: Model, now: float) -> bool:
        """Whether a deployment of ``model`` could take a request at ``now``: not drained, its
        breaker not refusing (closed, or open past its back-off), and passing its health probe."""
        return any(
            not s.drained and s.healthy and self._breaker_may_allow(s, now)
            for s in self._by_model[model.name]
        )

    def select(self, model: Model, exclude: frozenset[str], now: float) -> Selection | None:
        """A deployment of ``model`` for one attempt, or None when none can take it."""
        states = self._by_model[model.name]
        balancer = self._balancers[model.name]
        excluded = set(exclude)
        while True:
            usable = [
                s
                for s in states
                if s.name not in excluded and not s.drained and self._breaker_may_allow(s, now)
            ]
            healthy = [s for s in usable if s.healthy] or usable
            if not healthy:
                return None
            candidates: list[Candidate] = []
            if len(healthy) == 1:  # nothing to balance
                state = healthy[0]
            else:
                candidates = [s.candidate(model, now) for s in healthy]
                state = self.states[balancer.pick(candidates).name]
            allowed, transition = state.breaker.allow(now)
            if transition is not None:
                self._record_transition(state, transition)
            if not allowed:
                excluded.add(state.name)
                continue
            self._decisions.inc((model.name, state.name, balancer.name))
            return Selection(state, balancer if candidates else None, candidates)

    @staticmethod
    def _breaker_may_allow(state: DeploymentState, now: float) -> bool:
        breaker = state.breaker
        if breaker.state is not BreakerState.OPEN:
            return True
        open_until = breaker.snapshot(now).open_until
        return open_until is not None and open_until <= now

    # -- outcomes -----------------------------------------------------------------------------

    def begin(self, state: DeploymentState) -> None:
        state.in_flight += 1
        state.requests += 1

    def end(
        self,
        state: DeploymentState,
        now: float,
        *,
        success: bool,
        latency: float,
        error: str = "",
    ) -> None:
        """The outcome of one attempt that ``begin`` started."""
        state.in_flight = max(0, state.in_flight - 1)
        if success:
            state.latency.observe(latency, now)
        else:
            state.failures += 1
            state.last_error = error
        state.errors.observe(0.0 if success else 1.0, now)
        transition = state.breaker.record(now, success=success, duration=latency)
        if transition is not None:
            self._record_transition(state, transition)

    def release(self, state: DeploymentState, now: float) -> None:
        """An attempt that ended without an outcome (the client went away)."""
        state.in_flight = max(0, state.in_flight - 1)
        state.breaker.release(now)

    def _record_transition(self, state: DeploymentState, transition: Transition) -> None:
        self._transitions.inc(
            (
                state.name,
                transition.from_state.value,
                transition.to_state.value,
                transition.event.name.lower(),
            )
        )
        self._breaker_state.set((state.name,), _STATE_VALUE[transition.to_state])
        if self._on_transition is not None:
            self._on_transition(state, transition)
        if self._events is not None:
            self._events(
                {
                    "kind": "breaker",
                    "deployment": state.name,
                    "model": state.model,
                    "from": transition.from_state.value,
                    "to": transition.to_state.value,
                    "reason": transition.event.name.lower(),
                }
            )

    # -- retries ------------------------------------------------------------------------------

    def original_request(self, now: float) -> None:
        self.budget.record_request(now)

    def may_retry(self, model: str, now: float) -> bool:
        allowed = self.budget.try_retry(now)
        self._retries.inc((model, "attempted" if allowed else "budget_exhausted"))
        return allowed

    # -- operators and the prober -------------------------------------------------------------

    def set_health(self, name: str, healthy: bool, detail: str) -> None:
        state = self.states[name]
        changed = state.healthy != healthy
        state.healthy = healthy
        state.health_detail = detail
        self._healthy.set((name,), 1.0 if healthy and not state.drained else 0.0)
        if changed and self._events is not None:
            self._events(
                {
                    "kind": "health",
                    "deployment": name,
                    "model": state.model,
                    "healthy": healthy,
                    "detail": detail,
                }
            )

    def drain(self, name: str, drained: bool = True) -> DeploymentState:
        """Take a deployment out of rotation (or put it back); KeyError for an unknown name."""
        state = self.states[name]
        changed = state.drained != drained
        state.drained = drained
        self._healthy.set((name,), 1.0 if state.healthy and not drained else 0.0)
        if changed and self._events is not None:
            self._events(
                {"kind": "drain", "deployment": name, "model": state.model, "drained": drained}
            )
        return state

    def report_load(self, now: float) -> int:
        """A ``load`` event for each deployment whose in-flight count or request total moved
        since the last report (``citadel.routing.load`` calls this on an interval, so the feed
        carries load at a bounded rate, never per request); returns how many were sent."""
        if self._events is None:
            return 0
        sent = 0
        for state in self.states.values():
            mark = (state.in_flight, state.requests)
            if self._load_marks.get(state.name) == mark:
                continue
            self._load_marks[state.name] = mark
            self._events(
                {
                    "kind": "load",
                    "deployment": state.name,
                    "model": state.model,
                    "in_flight": state.in_flight,
                    "requests": state.requests,
                    "latency_ewma_seconds": state.latency.value(now),
                    "error_rate_ewma": state.errors.value(now),
                }
            )
            sent += 1
        return sent

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Every deployment's state, for the routing service and /health."""
        rows = []
        for state in self.states.values():
            breaker = state.breaker.snapshot(now)
            rows.append(
                {
                    "deployment": state.name,
                    "model": state.model,
                    "url": state.deployment.url,
                    "breaker": breaker.state.value,
                    "breaker_open_until": breaker.open_until,
                    "breaker_trips": breaker.trips,
                    "window_failure_rate": round(breaker.failure_rate, 4),
                    "healthy": state.healthy,
                    "health_detail": state.health_detail,
                    "drained": state.drained,
                    "in_flight": state.in_flight,
                    "latency_ewma_seconds": state.latency.value(now),
                    "error_rate_ewma": state.errors.value(now),
                    "requests": state.requests,
                    "failures": state.failures,
                    "last_error": state.last_error,
                }
            )
        return rows

    def deployments_of(self, model: str) -> Sequence[DeploymentState]:
        return self._by_model[model]
