"""The routing service's admin API: its routes, their handlers, its OpenAPI descriptions and its
health checks, over one ``Router`` and (with Redis) the shared routing state.

Behind the admin key (except /health, /metrics, /docs and /openapi.json):

- ``GET /v1/deployments``: each deployment's breaker, health, drain flag, latency EWMA, requests
  in flight and error rate, and each gateway replica's latest snapshot (``replicas``).
- ``POST /v1/route``: a dry run (``citadel.routing.dryrun``). Which model a described request
  would get and which deployment, why, and why not the others, without changing the router's
  state.
- ``POST /v1/deployments/{name}/drain`` and ``.../restore``: here and in the shared state, which
  every gateway replica applies at its next sync (about a second).

Errors: a bad body 400 (naming the field), a wrong key 401, an unknown model or deployment 404,
and 503 when a drain cannot reach the shared state (nothing is changed then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson

from citadel.errors import BadRequest, NotFound, StoreUnavailable, Unavailable
from citadel.gateway.auth import AdminKeyAuthenticator
from citadel.http.server import Request, Response
from citadel.openapi import Operation, PathHandler, Schema
from citadel.routing.breaker import BreakerState
from citadel.routing.dryrun import ROUTE_REQUEST, ROUTE_RESULT, breaker_refusal, dry_run
from citadel.routing.router import DeploymentState, Router
from citadel.routing.shared import SharedRoutingState, SyncLoop, deployment_rows
from citadel.service import DependencyHealth
from citadel.settings import Model, Settings

__all__ = ["CHANGED", "DEPLOYMENT", "DEPLOYMENTS", "RoutingApi"]

_SHARED_CHECK_TIMEOUT: Final = 1.5  # seconds; /health gives each check 2


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

# -- the handlers -------------------------------------------------------------------------------


class RoutingApi:
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
            not s.drained and s.healthy and breaker_refusal(s, now) is None
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
        return _json(dry_run(self.settings, self.router, request, self.clock))


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


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        "deployments": len(rows),
        "healthy": sum(bool(r["healthy"]) for r in rows),
        "unhealthy": sum(not r["healthy"] for r in rows),
        "drained": sum(bool(r["drained"]) for r in rows),
        "breaker_open": sum(r["breaker"] == BreakerState.OPEN.value for r in rows),
        "breaker_half_open": sum(r["breaker"] == BreakerState.HALF_OPEN.value for r in rows),
    }
