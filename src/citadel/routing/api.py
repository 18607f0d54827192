"""The routing service's admin API: its handlers and its health checks, over one ``Router`` and
(with Redis) the shared routing state.

Behind the admin key (every route but /health, /metrics, /docs and /openapi.json):

- ``GET /v1/deployments``: each deployment's breaker, health, drain flag, latency EWMA, requests
  in flight and error rate, and each gateway replica's latest snapshot (``replicas``).
- ``POST /v1/route``: a dry run (``citadel.routing.dryrun``). Which model a described request
  would get and which deployment, why, and why not the others, without changing the router's
  state.
- ``POST /v1/deployments/{name}/drain`` and ``.../restore``: here and in the shared state, which
  every gateway replica applies at its next sync (about a second).

Errors: a bad body 400 (naming the field), a wrong key 401, an unknown model or deployment 404,
and 503 when a drain cannot reach the shared state (nothing is changed then).

Injected (``app.py``): ``routing`` (``Routing``: the settings, the router, the shared state).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec
from litestar import Controller, get, post
from litestar.params import FromPath, HeaderParameter, JSONBody, RawBody

from citadel.errors import NotFound, StoreUnavailable, Unavailable
from citadel.health import DependencyHealth
from citadel.routing.bodies import (
    Changed,
    DeploymentRow,
    Deployments,
    NoFields,
    RouteRequest,
    RouteResult,
    SharedState,
    Summary,
)
from citadel.routing.breaker import BreakerState
from citadel.routing.dryrun import breaker_refusal, dry_run
from citadel.routing.router import DeploymentState, Router
from citadel.routing.shared import SharedRoutingState, SyncLoop, deployment_rows
from citadel.settings import Model, Settings
from citadel.web import Injected, documented_body, errors

__all__ = ["CONTROLLERS", "Routing"]

_SHARED_CHECK_TIMEOUT: Final = 1.5  # seconds; /health gives each check 2


@dataclass(slots=True)
class Routing:
    """What the handlers work on: this service's router and, with Redis, the shared state."""

    settings: Settings
    router: Router
    shared: SharedRoutingState | None
    loop: SyncLoop | None
    clock: Callable[[], float]

    def rows(self) -> list[DeploymentRow]:
        forced = self.shared.forced if self.shared is not None else {}
        rows = deployment_rows(self.router, self.clock())
        for row in rows:
            row["breaker_forced_by"] = forced.get(row["deployment"])
        return msgspec.convert(rows, list[DeploymentRow])

    def row(self, name: str) -> DeploymentRow:
        return next(r for r in self.rows() if r.deployment == name)

    def state(self, name: str) -> DeploymentState:
        state = self.router.states.get(name)
        if state is None:
            known = ", ".join(self.router.states)
            raise NotFound(
                f"No deployment is named {name!r}; the deployments are: {known}.",
                param="name",
                code="deployment_not_found",
            )
        return state

    async def drain(self, name: str, *, drained: bool) -> Changed:
        state = self.state(name)
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
        return Changed(self.row(state.name), shared=self.shared is not None)

    # -- health ---------------------------------------------------------------------------------

    async def deployments_health(self) -> DependencyHealth:
        summary = _summary(self.rows())
        detail = ", ".join(
            f"{count} {what.replace('_', ' ')}"
            for what, count in msgspec.structs.asdict(summary).items()
        )
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


def _summary(rows: Sequence[DeploymentRow]) -> Summary:
    return Summary(
        deployments=len(rows),
        healthy=sum(r.healthy for r in rows),
        unhealthy=sum(not r.healthy for r in rows),
        drained=sum(r.drained for r in rows),
        breaker_open=sum(r.breaker is BreakerState.OPEN for r in rows),
        breaker_half_open=sum(r.breaker is BreakerState.HALF_OPEN for r in rows),
    )


Routing_ = Injected[Routing]
Name = Annotated[str, msgspec.Meta(description="the deployment's name")]
NoBody = JSONBody[NoFields | None]  # an action takes no fields: no body, or {}


class DeploymentsController(Controller):
    path = "/v1/deployments"
    tags = ["deployments"]  # noqa: RUF012 - Litestar's layer attribute

    @get(summary="Every deployment's state, and each replica's")
    async def list_deployments(self, routing: Routing_) -> Deployments:
        rows = routing.rows()
        reply = Deployments(
            data=rows,
            summary=_summary(rows),
            shared_state=SharedState("disabled", "no Redis is configured"),
        )
        if routing.shared is not None:
            try:
                reply.replicas = await routing.shared.replicas()
                reply.shared_state = SharedState("ok", routing.shared.client.address)
            except StoreUnavailable as exc:
                reply.replicas = None
                reply.shared_state = SharedState("unavailable", exc.detail)
        return reply

    @get("/{name:str}", summary="One deployment's state", responses=errors(404))
    async def get_deployment(self, name: FromPath[Name], routing: Routing_) -> DeploymentRow:
        return routing.row(routing.state(name).name)

    @post(
        "/{name:str}/drain",
        summary="Take a deployment out of rotation on every replica",
        status_code=200,
        responses=errors(404, 503),
    )
    async def drain(self, name: FromPath[Name], routing: Routing_, data: NoBody = None) -> Changed:
        return await routing.drain(name, drained=True)

    @post(
        "/{name:str}/restore",
        summary="Put a drained deployment back",
        status_code=200,
        responses=errors(404, 503),
    )
    async def restore(
        self, name: FromPath[Name], routing: Routing_, data: NoBody = None
    ) -> Changed:
        return await routing.drain(name, drained=False)


class RouteController(Controller):
    path = "/v1/route"
    tags = ["routing"]  # noqa: RUF012 - Litestar's layer attribute

    @post(
        summary="Dry run: which deployment a request would get, and why",
        description="Nothing is sent and nothing is counted: no breaker probe, no balancer "
        "step, no routing decision metric. The body is checked as the gateway checks it.",
        status_code=200,
        responses=errors(404),
        # The gateway's parser checks the raw body, so that a dry run refuses what the gateway
        # refuses with the same 400; RouteRequest only describes it in the document.
        operation_class=documented_body(RouteRequest),
    )
    async def route(
        self,
        body: RawBody,
        routing: Routing_,
        task: Annotated[
            str | None,
            HeaderParameter(name="x-citadel-task", description="the task, unless the body says"),
        ] = None,
    ) -> RouteResult:
        return dry_run(routing.settings, routing.router, body, task, routing.clock)


CONTROLLERS = (DeploymentsController, RouteController)
