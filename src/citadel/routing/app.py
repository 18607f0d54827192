"""Wiring of the routing service (:9097): ``create_app(settings, deps)``.

The service runs a ``Router`` of its own over the same settings as the gateways, with its own
active health checks (``HealthProber``) and, when Redis is configured, the shared routing state
(``SyncLoop``): it sees the breakers the gateway replicas open and the drains that operators set.
Its API, behind the admin key (except /health, /metrics, /docs and /openapi.json):

- ``GET /v1/deployments``: each deployment's breaker, health, drain flag, latency EWMA, requests
  in flight and error rate, and each gateway replica's latest snapshot (``replicas``).
- ``POST /v1/route``: a dry run. Which model a described request would get (a virtual model such
  as ``auto`` resolved by task) and which deployment, why, and why not the others. It reads the
  router's state and never changes it: no breaker is asked (a half-open one would count a probe),
  no balancer is advanced and no decision is counted.
- ``POST /v1/deployments/{name}/drain`` and ``.../restore``: here and in the shared state, which
  every gateway replica applies at its next sync (about a second).

Errors: a bad body 400 (naming the field), a wrong key 401, an unknown model or deployment 404,
and 503 when a drain cannot reach the shared state (nothing is changed then).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from citadel.errors import BadRequest, NotFound, StoreUnavailable, Unavailable
from citadel.gateway.auth import AdminKeyAuthenticator
from citadel.http.client import HttpClient
from citadel.http.server import Request, Response
from citadel.metrics import Registry
from citadel.openai.requests import Endpoint, ParsedRequest, parse_request
from citadel.openai.tokens import estimate_prompt_tokens
from citadel.openapi import ApiRoutes, Operation, PathHandler, Schema
from citadel.routing.balancer import (
    Balancer,
    Candidate,
    CostOptimised,
    LeastOutstanding,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRandom,
    create_balancer,
    explain,
)
from citadel.routing.breaker import BreakerState
from citadel.routing.classifier import TASKS, classify
from citadel.routing.health import HealthProber
from citadel.routing.router import DeploymentState, Router
from citadel.routing.shared import SharedRoutingState, SyncLoop, deployment_rows
from citadel.service import App, DependencyHealth, service_app
from citadel.settings import Model, Settings

__all__ = ["RoutingDeps", "create_app", "default_deps"]

_SERVES: Final[Mapping[str, frozenset[str]]] = {
    "chat": frozenset({"chat", "completion"}),
    "completion": frozenset({"completion"}),
    "embedding": frozenset({"embedding"}),
}
_PROMPT_FIELDS: Final[Mapping[str, Endpoint]] = {
    "messages": "chat",
    "prompt": "completion",
    "input": "embedding",
}
_SHARED_CHECK_TIMEOUT: Final = 1.5  # seconds; /health gives each check 2


@dataclass(slots=True, kw_only=True)
class RoutingDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    client: HttpClient  # for the health probes
    registry: Registry = field(default_factory=Registry)
    shared: SharedRoutingState | None = None  # None: no Redis, this service's own view only
    clock: Callable[[], float] = time.monotonic  # the router's clock
    sync_interval: float = 1.0  # seconds between syncs of the shared state


def default_deps(settings: Settings) -> RoutingDeps:
    """Production wiring: a small HTTP client for the probes, the shared state on the Redis of
    ``endpoints.redis`` (or a redis:// ``limits.backend``) if there is one."""
    replica = f"routing-api@{socket.gethostname()}:{os.getpid()}"
    return RoutingDeps(
        client=HttpClient(max_connections_per_origin=4),
        shared=SharedRoutingState.from_settings(settings, replica=replica),
    )


def create_app(settings: Settings, deps: RoutingDeps) -> App:
    """The routing service: its admin API, /docs, /openapi.json, /health and /metrics."""
    app = service_app("routing-api", settings, deps.registry)
    api = ApiRoutes(
        app,
        title="Citadel routing",
        description="Deployment state (breakers, health, latency, load), dry-run routing "
        "decisions, and draining. Authenticate with the admin key.",
    )
    shared = deps.shared
    router = Router(
        settings,
        registry=deps.registry,
        on_transition=shared.on_transition if shared is not None else None,
    )
    loop = (
        None
        if shared is None
        # push=False: this service serves no traffic, so it is not one of the replicas listed.
        else SyncLoop(shared, router, interval=deps.sync_interval, clock=deps.clock, push=False)
    )
    service = _Service(settings, router, shared, loop, deps.clock)
    for operation, handler in service.routes():
        api.add(operation, _guarded(service.auth, handler))
    for path, summary in (("/health", "Service and dependency health"), ("/metrics", "Metrics")):
        api.describe(
            Operation(
                method="GET",
                path=path,
                summary=summary,
                tags=("operations",),
                secured=False,
                content_type="application/json" if path == "/health" else "text/plain",
                response={"type": "object"} if path == "/health" else None,
            )
        )
    app.health_check("deployments", service.deployments_health)
    app.health_check("shared_state", service.shared_health)
    prober = HealthProber(settings, deps.client, router.set_health)
    app.on_shutdown(deps.client.aclose)
    if shared is not None and loop is not None:
        app.on_shutdown(shared.aclose)
        app.on_startup(loop.start)
        app.on_shutdown(loop.stop)
    app.on_startup(prober.start)
    app.on_shutdown(prober.stop)
    return app


def _guarded(auth: AdminKeyAuthenticator, handler: PathHandler) -> PathHandler:
    async def guarded(request: Request, params: Mapping[str, str]) -> Response:
        await auth.authenticate(request.headers.get(b"authorization"))
        return await handler(request, params)

    return guarded


def _json(body: object, status: int = 200) -> Response:
    return Response(status, orjson.dumps(body))


# -- schemas ------------------------------------------------------------------------------------

_NUMBER_OR_NULL: Schema = {"type": ["number", "null"]}
DEPLOYMENT: Schema = {
    "type": "object",
    "properties": {
        "deployment": {"type": "string"},
        "model": {"type": "string"},
        "url": {"type": "string"},
        "breaker": {"enum": [s.value for s in BreakerState]},
        "breaker_open_seconds": {**_NUMBER_OR_NULL, "description": "back-off left when open"},
        "breaker_held_open": {"type": "boolean", "description": "held open for another replica"},
        "breaker_forced_by": {"type": ["string", "null"], "description": "that replica"},
        "breaker_trips": {"type": "integer"},
        "window_failure_rate": {"type": "number"},
        "healthy": {"type": "boolean"},
        "health_detail": {"type": "string"},
        "drained": {"type": "boolean"},
        "in_flight": {"type": "integer"},
        "latency_ewma_seconds": _NUMBER_OR_NULL,
        "error_rate_ewma": _NUMBER_OR_NULL,
        "requests": {"type": "integer"},
        "failures": {"type": "integer"},
        "last_error": {"type": "string"},
    },
}
_SHARED_STATE: Schema = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "unavailable", "disabled"]},
        "detail": {"type": "string"},
    },
}
DEPLOYMENTS: Schema = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": DEPLOYMENT},
        "summary": {"type": "object"},
        "shared_state": _SHARED_STATE,
        "replicas": {
            "type": ["object", "null"],
            "description": "Each gateway replica's latest rows, by replica; null when Redis is "
            "configured but unreachable; absent without Redis.",
            "additionalProperties": {"type": "array", "items": DEPLOYMENT},
        },
    },
}
CHANGED: Schema = {
    "type": "object",
    "properties": {"deployment": DEPLOYMENT, "shared": {"type": "boolean"}},
}
ROUTE_REQUEST: Schema = {
    "type": "object",
    "required": ["model"],
    "description": "An OpenAI request body (at most one of messages, prompt, input) and `task`.",
    "properties": {
        "model": {"type": "string", "description": "a model, an alias or a virtual model (auto)"},
        "messages": {"type": "array", "items": {"type": "object"}},
        "prompt": {"type": ["string", "array"]},
        "input": {"type": ["string", "array"]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "task": {"enum": list(TASKS), "description": "as the x-citadel-task header"},
    },
}
_EVALUATION: Schema = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "balancer": {"type": "string"},
        "deployment": {"type": ["string", "null"]},
        "reason": {"type": "string"},
        "note": {"type": "string"},
        "candidates": {"type": "array", "items": {"type": "object"}},
        "excluded": {"type": "array", "items": {"type": "object"}},
    },
}
ROUTE_RESULT: Schema = {
    "type": "object",
    "properties": {
        "object": {"const": "route.dry_run"},
        "requested_model": {"type": "string"},
        "virtual": {"type": "boolean"},
        "endpoint": {"enum": ["chat", "completion", "embedding"]},
        "task": {"type": "string"},
        "prompt_tokens": {"type": "integer"},
        "needed_tokens": {"type": "integer"},
        "model": {"type": ["string", "null"]},
        "model_reason": {"type": "string"},
        "deployment": {"type": ["string", "null"]},
        "deployment_model": {"type": ["string", "null"], "description": "a fallback's, maybe"},
        "reason": {"type": "string"},
        "evaluations": {
            "type": "array",
            "items": _EVALUATION,
            "description": "the model, then its fallbacks while none could take the request",
        },
    },
}


# -- the handlers -------------------------------------------------------------------------------


class _Service:
    """The handlers, over one router and its shared state."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        shared: SharedRoutingState | None,
        loop: SyncLoop | None,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.router = router
        self.shared = shared
        self.loop = loop
        self.clock = clock
        self.auth = AdminKeyAuthenticator(settings.gateway.admin_key)

    def routes(self) -> list[tuple[Operation, PathHandler]]:
        def op(method: str, path: str, summary: str, **details: Any) -> Operation:
            return Operation(method=method, path=path, summary=summary, **details)

        return [
            (op("GET", "/v1/deployments", "Every deployment's state, and each replica's",
                tags=("deployments",), response=DEPLOYMENTS), self.list_deployments),
            (op("GET", "/v1/deployments/{name}", "One deployment's state",
                tags=("deployments",), response=DEPLOYMENT, errors=(404,)), self.get_deployment),
            (op("POST", "/v1/deployments/{name}/drain",
                "Take a deployment out of rotation on every replica", tags=("deployments",),
                response=CHANGED, errors=(400, 404, 503)), self.drain),
            (op("POST", "/v1/deployments/{name}/restore", "Put a drained deployment back",
                tags=("deployments",), response=CHANGED, errors=(400, 404, 503)), self.restore),
            (op("POST", "/v1/route", "Dry run: which deployment a request would get, and why",
                tags=("routing",), request=ROUTE_REQUEST, response=ROUTE_RESULT,
                description="Nothing is sent and nothing is counted: no breaker probe, no "
                "balancer step, no routing decision metric.", errors=(400, 404)), self.route),
        ]  # fmt: skip

    # -- deployments ----------------------------------------------------------------------------

    def _rows(self, now: float) -> list[dict[str, Any]]:
        forced = self.shared.forced if self.shared is not None else {}
        rows = deployment_rows(self.router, now)
        for row in rows:
            row["breaker_forced_by"] = forced.get(row["deployment"])
        return rows

    def _state(self, name: str) -> DeploymentState:
        state = self.router.states.get(name)
        if state is None:
            known = ", ".join(self.router.states)
            raise NotFound(
                f"No deployment is named {name!r}; the deployments are: {known}.",
                param="name",
                code="deployment_not_found",
            )
        return state

    async def list_deployments(self, request: Request, params: Mapping[str, str]) -> Response:
        rows = self._rows(self.clock())
        body: dict[str, Any] = {"object": "list", "data": rows, "summary": _summary(rows)}
        if self.shared is None:
            body["shared_state"] = {"status": "disabled", "detail": "no Redis is configured"}
        else:
            try:
                body["replicas"] = await self.shared.replicas()
                body["shared_state"] = {"status": "ok", "detail": self.shared.client.address}
            except StoreUnavailable as exc:
                body["replicas"] = None
                body["shared_state"] = {"status": "unavailable", "detail": exc.detail}
        return _json(body)

    async def get_deployment(self, request: Request, params: Mapping[str, str]) -> Response:
        name = self._state(params["name"]).name
        return _json(next(r for r in self._rows(self.clock()) if r["deployment"] == name))

    async def drain(self, request: Request, params: Mapping[str, str]) -> Response:
        return await self._drain(request, params["name"], drained=True)

    async def restore(self, request: Request, params: Mapping[str, str]) -> Response:
        return await self._drain(request, params["name"], drained=False)

    async def _drain(self, request: Request, name: str, *, drained: bool) -> Response:
        _empty_object(request.body)
        state = self._state(name)
        if self.shared is not None:
            # Shared first: while Redis answers its drained set is the truth every sync applies,
            # so a change made only here would be undone by this service's next sync.
            try:
                await self.shared.drain(state.name, drained)
            except StoreUnavailable as exc:
                raise Unavailable(
                    f"The shared routing state (Redis) is unavailable: {exc.detail}; nothing "
                    "was changed. Try again later."
                ) from exc
        self.router.drain(state.name, drained)
        row = next(r for r in self._rows(self.clock()) if r["deployment"] == state.name)
        return _json({"deployment": row, "shared": self.shared is not None})

    # -- health ---------------------------------------------------------------------------------

    async def deployments_health(self) -> DependencyHealth:
        rows = self._rows(self.clock())
        summary = _summary(rows)
        detail = ", ".join(f"{count} {what.replace('_', ' ')}" for what, count in summary.items())
        stranded = [m.name for m in self.settings.models if not self._routable(m)]
        if stranded:
            detail += f"; no healthy deployment for {', '.join(stranded)}"
            return DependencyHealth("degraded", detail)
        return DependencyHealth("ok", detail)

    def _routable(self, model: Model) -> bool:
        now = self.clock()
        return any(
            not s.drained and s.healthy and _breaker_admits(s, now) is None
            for s in self.router.deployments_of(model.name)
        )

    async def shared_health(self) -> DependencyHealth:
        shared, loop = self.shared, self.loop
        if shared is None or loop is None:
            return DependencyHealth("disabled", "no Redis configured: this service's view only")
        try:
            async with asyncio.timeout(_SHARED_CHECK_TIMEOUT):
                await shared.ping()
        except (StoreUnavailable, TimeoutError) as exc:
            detail = exc.detail if isinstance(exc, StoreUnavailable) else "no answer in time"
            return DependencyHealth("down", f"{detail} (each replica routes alone)")
        if loop.available is False:
            return DependencyHealth("degraded", f"last sync failed: {loop.last_error}")
        return DependencyHealth("ok", shared.client.address)

    # -- the dry run ----------------------------------------------------------------------------

    async def route(self, request: Request, params: Mapping[str, str]) -> Response:
        parsed, endpoint, hint = _parse_route(request)
        settings, router = self.settings, self.router
        model = settings.model(parsed.model)
        virtual = model is None and parsed.model in router.virtual
        if model is None and not virtual:
            raise NotFound(
                f"The model `{parsed.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        if endpoint is None:  # no prompt given: the endpoint the model serves first
            endpoint = "chat" if model is None else _first_endpoint(model)
        if parsed.stream and endpoint == "embedding":
            raise BadRequest(
                "Invalid value for 'stream': embeddings cannot be streamed.", param="stream"
            )
        prompt_tokens = estimate_prompt_tokens(parsed) if parsed.endpoint == endpoint else 0
        reply = 0 if endpoint == "embedding" else parsed.max_tokens
        needed = prompt_tokens + (
            reply if reply is not None else settings.limits.default_max_tokens
        )
        task = (
            "embedding"
            if endpoint == "embedding"
            else classify(parsed.prompt_text, estimated_tokens=prompt_tokens, hint=hint)
        )
        body: dict[str, Any] = {
            "object": "route.dry_run",
            "requested_model": parsed.model,
            "virtual": virtual,
            "endpoint": endpoint,
            "stream": parsed.stream,
            "task": task,
            "prompt_tokens": prompt_tokens,
            "needed_tokens": needed,
        }
        if model is None:
            choice = router.resolve(
                parsed.model,
                endpoint=endpoint,
                prompt_text=parsed.prompt_text,
                needed_tokens=needed,
                hint=hint,
                allowed=lambda m: True,
            )
            if choice is None:
                body |= {
                    "model": None,
                    "model_reason": f"no model of this kind fits {needed} tokens with the reply",
                    "deployment": None,
                    "deployment_model": None,
                    "reason": "no model fits, so no deployment is chosen",
                    "evaluations": [],
                }
                return _json(body)
            model, model_reason = choice.model, choice.reason
        elif model.name == parsed.model:
            model_reason = f"{model.name} is named in the request"
        else:
            model_reason = f"{parsed.model} is an alias of {model.name}"
        if endpoint not in _SERVES[model.kind]:
            raise BadRequest(
                f"The model `{model.name}` is a {model.kind} model and does not serve "
                f"{endpoint} requests.",
                param="model",
                code="model_not_supported",
            )
        body |= {"model": model.name, "model_reason": model_reason}
        evaluations = []
        chosen: dict[str, Any] | None = None
        for candidate_model in self._chain(model):
            evaluation = _evaluate(settings, router, candidate_model, self.clock())
            evaluations.append(evaluation)
            if evaluation["deployment"] is not None:
                chosen = evaluation
                break
        if chosen is None:
            tried = ", ".join(e["model"] for e in evaluations)
            reason = f"no deployment of {tried} can take the request; the gateway answers 503"
        else:
            reason = chosen["reason"]
            if chosen["model"] != model.name:
                reason = f"every deployment of {model.name} is out; fallback {chosen['model']}: "
                reason += chosen["reason"]
        body |= {
            "deployment": chosen["deployment"] if chosen is not None else None,
            "deployment_model": chosen["model"] if chosen is not None else None,
            "reason": reason,
            "evaluations": evaluations,
        }
        return _json(body)

    def _chain(self, model: Model) -> list[Model]:
        chain = [model]
        for name in model.fallbacks:
            fallback = self.settings.model(name)
            if fallback is not None and fallback not in chain:
                chain.append(fallback)
        return chain


# -- the dry run, as pure functions over the router's state ---------------------------------------


def _parse_route(request: Request) -> tuple[ParsedRequest, Endpoint | None, str | None]:
    """The described request, the endpoint its prompt field implies (None: no prompt given),
    and the task hint (``task``, else the ``x-citadel-task`` header)."""
    raw = request.body
    try:
        body = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        body = None  # parse_request names the problem
    if not isinstance(body, dict):
        parse_request("chat", raw)  # raises the 400 for an empty, unreadable or non-object body
        raise AssertionError("parse_request accepted a body that is not an object")
    given = [name for name in _PROMPT_FIELDS if body.get(name) is not None]
    if len(given) > 1:
        raise BadRequest(
            f"Give at most one of 'messages', 'prompt' and 'input'; got {' and '.join(given)}.",
            param=given[1],
        )
    hint = body.get("task", request.header(b"x-citadel-task"))
    if hint is not None and (not isinstance(hint, str) or hint.strip().lower() not in TASKS):
        raise BadRequest(
            f"'task' must be one of {', '.join(TASKS)}; got {hint!r}.",
            param="task",
            code="unknown_task",
        )
    if given:
        endpoint = _PROMPT_FIELDS[given[0]]
        return parse_request(endpoint, raw), endpoint, hint
    # No prompt: the other fields are still checked, as a completion with an empty prompt.
    return parse_request("completion", orjson.dumps({**body, "prompt": ""})), None, hint


def _first_endpoint(model: Model) -> Endpoint:
    kind = model.kind
    return "embedding" if kind == "embedding" else "completion" if kind == "completion" else "chat"


def _empty_object(raw: bytes) -> None:
    """An admin action takes no fields: an empty body or ``{}``."""
    if not raw.strip():
        return
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The body is not JSON: {exc}.", code="invalid_json") from exc
    if body != {}:
        raise BadRequest("This action takes no fields: send no body or {}.", code="invalid_body")


def _breaker_admits(state: DeploymentState, now: float) -> str | None:
    """Why the breaker would refuse the next request, or None (without asking it: a half-open
    breaker would count a probe)."""
    snapshot = state.breaker.snapshot(now)
    if snapshot.state is BreakerState.OPEN:
        until = snapshot.open_until
        if until is None or math.isinf(until):
            return "breaker held open (open on another replica)"
        if until > now:
            return f"breaker open for another {until - now:.3g} s"
    elif (
        snapshot.state is BreakerState.HALF_OPEN
        and snapshot.probes_in_flight >= state.breaker.config.half_open_probes
    ):
        return "breaker half-open with every probe slot taken"
    return None


def _evaluate(settings: Settings, router: Router, model: Model, now: float) -> dict[str, Any]:
    """What ``Router.select`` would do for ``model``, and why, without its side effects."""
    excluded: list[dict[str, Any]] = []
    usable: list[DeploymentState] = []
    for state in router.deployments_of(model.name):
        reasons = []
        if state.drained:
            reasons.append("drained by an operator")
        refusal = _breaker_admits(state, now)
        if refusal is not None:
            reasons.append(refusal)
        if reasons:
            if not state.healthy:
                reasons.append(f"unhealthy: {state.health_detail}")
            excluded.append({"deployment": state.name, "reasons": reasons})
        else:
            usable.append(state)
    healthy = [s for s in usable if s.healthy]
    for state in usable:
        if healthy and not state.healthy:
            reason = f"unhealthy: {state.health_detail}"
            excluded.append({"deployment": state.name, "reasons": [reason]})
    pool = healthy or usable
    name = model.balancer or settings.routing.balancer
    evaluation: dict[str, Any] = {"model": model.name, "balancer": name}
    if not pool:
        evaluation |= {
            "deployment": None,
            "reason": "every deployment is drained or has its breaker open",
            "candidates": [],
            "excluded": excluded,
        }
        return evaluation
    candidates = [
        Candidate(
            name=s.name,
            weight=s.deployment.weight,
            in_flight=s.in_flight,
            max_concurrency=s.deployment.max_concurrency,
            latency=s.latency.value(now),
            cost_per_1k=s.cost_per_1k(model),
        )
        for s in pool
    ]
    # A balancer of the same kind, fresh and seeded: the live one is not advanced by a dry run.
    balancer = create_balancer(
        name, random.Random(0), latency_target=settings.routing.latency_target_seconds
    )
    chosen = balancer.pick(candidates)
    reason = explain(balancer, candidates, chosen)
    if not healthy:
        reason += " (no deployment is healthy, so the unhealthy ones are tried)"
    breaker = router.states[chosen.name].breaker.snapshot(now).state
    if breaker is not BreakerState.CLOSED:
        reason += " (its breaker's back-off is over: this request would be a half-open probe)"
    evaluation |= {
        "deployment": chosen.name,
        "reason": reason,
        "note": _note(balancer),
        "candidates": _scores(candidates, router, now),
        "excluded": excluded,
    }
    return evaluation


def _note(balancer: Balancer) -> str:
    inner = balancer.fallback if isinstance(balancer, CostOptimised) else balancer
    if isinstance(inner, RoundRobin):
        return "round_robin rotates: the requests after this one go to the others in turn"
    if isinstance(inner, WeightedRandom | PowerOfTwoChoices):  # PeakEwmaBalancer too
        return (
            f"{inner.name} draws at random: a live request may get another candidate "
            "(compare their scores)"
        )
    if isinstance(inner, LeastOutstanding):
        return "least_outstanding breaks ties at random"
    return ""


def _scores(candidates: Sequence[Candidate], router: Router, now: float) -> list[dict[str, Any]]:
    """Each candidate with what the balancers weigh: load = (in flight + 1) / weight, and the
    peak-EWMA score = max(latency, 1 ms) * load, a candidate without latency data counting as
    the fastest known (as in ``citadel.routing.balancer``)."""
    known = [c.latency for c in candidates if c.latency is not None]
    unknown = min(known) if known else 1.0
    rows = []
    for c in candidates:
        load = (c.in_flight + 1) / (c.weight if c.weight > 0 else 1e-9)
        latency = unknown if c.latency is None else c.latency
        state = router.states[c.name]
        rows.append(
            {
                "deployment": c.name,
                "weight": c.weight,
                "in_flight": c.in_flight,
                "max_concurrency": c.max_concurrency,
                "full": c.full,
                "latency_ewma_seconds": c.latency,
                "load": round(load, 6),
                "latency_score": round(max(latency, 0.001) * load, 6),
                "cost_per_1k": c.cost_per_1k,
                "healthy": state.healthy,
                "breaker": state.breaker.snapshot(now).state.value,
            }
        )
    return rows


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        "deployments": len(rows),
        "healthy": sum(bool(r["healthy"]) for r in rows),
        "unhealthy": sum(not r["healthy"] for r in rows),
        "drained": sum(bool(r["drained"]) for r in rows),
        "breaker_open": sum(r["breaker"] == BreakerState.OPEN.value for r in rows),
        "breaker_half_open": sum(r["breaker"] == BreakerState.HALF_OPEN.value for r in rows),
    }
