"""The routing service's admin API: its handlers and its health checks, over one ``Router`` and
(with Redis) the shared routing state.

Behind the admin key (every route but /health, /metrics, /docs and /openapi.json):

- ``GET /v1/deployments``: each deployment's breaker, health, drain flag, latency EWMA, requests
  in flight and error rate as the gateways see them: the latest snapshots the gateway replicas
  pushed to the shared state, merged (``merge_rows``; ``view: gateways``), or this service's own
  router when no replica reported (``view: routing-service``: no traffic, only its own probes);
  each replica's snapshot as it is under ``replicas``. ``GET /v1/deployments/{name}`` likewise.
- ``POST /v1/route``: a dry run (``citadel.routing.dryrun``). Which model a described request
  would get (for the caller's ``tier`` when given) and which deployment, why, and why not the
  others, without changing the router's state.
- ``POST /v1/deployments/{name}/drain`` and ``.../restore``: here and in the shared state, which
  every gateway replica applies at its next sync (about a second). Draining the last deployment
  of a model not drained yet is a 409 (every request for it would be a 503) unless ``?force=true``.

Errors: a bad body 400 (naming the field), a wrong key 401, an unknown model or deployment 404,
a drain of a model's last deployment without ``force`` 409, and 503 when a drain cannot reach the
shared state (nothing is changed then).

Injected (``app.py``): ``routing`` (``Routing``: the settings, the router, the shared state).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, get, post
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, RawBody

from citadel.errors import Conflict, NotFound, StoreUnavailable, Unavailable
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

__all__ = ["CONTROLLERS", "Routing", "merge_rows"]

_SHARED_CHECK_TIMEOUT: Final = 1.5  # seconds; /health gives each check 2
_SEVERITY: Final = {"closed": 0, "half_open": 1, "open": 2}
_SUMMED: Final = ("in_flight", "requests", "failures", "breaker_trips")
_WEIGHTED: Final = ("latency_ewma_seconds", "error_rate_ewma")


def merge_rows(
    own: list[dict[str, Any]], replicas: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Each of ``own`` rows (this service's router) merged with the gateway replicas' rows of
    the same deployment, as the gateways see it: in flight, requests, failures and trips summed;
    latency and error-rate EWMAs averaged over the replicas weighted by their requests; the
    breaker the worst one's (open, then half-open; this service's row first on a tie, as it
    knows who holds a breaker); unhealthy when any replica's probe says so; drained when any
    is (the shared drain set is the truth; a replica applies it at its next sync). A field a
    replica did not send is left out of the merge; a deployment no replica reports keeps this
    service's row. ``reported_by`` counts the replicas merged."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(replicas):
        for row in replicas[name]:
            if isinstance(row, dict) and isinstance(row.get("deployment"), str):
                by_name.setdefault(row["deployment"], []).append(row)
    merged = []
    for row in own:
        theirs = by_name.get(row["deployment"], [])
        out = {**row, "reported_by": len(theirs)}
        if theirs:
            for name in _SUMMED:
                values = [r[name] for r in theirs if isinstance(r.get(name), int)]
                if values:
                    out[name] = sum(values)
            for name in _WEIGHTED:
                pairs = [
                    (float(r[name]), max(1, int(r.get("requests") or 0)))
                    for r in theirs
                    if isinstance(r.get(name), int | float)
                ]
                total = sum(w for _, w in pairs)
                out[name] = sum(v * w for v, w in pairs) / total if pairs else None
            rates = [r["window_failure_rate"] for r in theirs if "window_failure_rate" in r]
            out["window_failure_rate"] = max(rates, default=row["window_failure_rate"])
            worst = max([row, *theirs], key=lambda r: _SEVERITY.get(r.get("breaker", ""), -1))
            if worst is not row:
                for name in ("breaker", "breaker_open_seconds", "breaker_held_open"):
                    if name in worst:
                        out[name] = worst[name]
            sick = [r for r in theirs if r.get("healthy") is False]
            if sick:
                out["healthy"] = False
                out["health_detail"] = str(sick[0].get("health_detail", "unhealthy"))
            elif any(r.get("healthy") is True for r in theirs):
                out["healthy"] = True
                out["health_detail"] = next(
                    str(r.get("health_detail", "")) for r in theirs if r.get("healthy")
                )
            out["drained"] = row["drained"] or any(r.get("drained") is True for r in theirs)
            errors = [r for r in theirs if r.get("last_error")]
            if errors:
                latest = max(errors, key=lambda r: r.get("failures") or 0)
                out["last_error"] = str(latest["last_error"])
        merged.append(out)
    return merged


@dataclass(slots=True)
class Routing:
    """What the handlers work on: this service's router and, with Redis, the shared state."""

    settings: Settings
    router: Router
    shared: SharedRoutingState | None
    loop: SyncLoop | None
    clock: Callable[[], float]

    def own_rows(self) -> list[dict[str, Any]]:
        """This service's router's rows (its own probes, no traffic)."""
        forced = self.shared.forced if self.shared is not None else {}
        rows = deployment_rows(self.router, self.clock())
        for row in rows:
            row["breaker_forced_by"] = forced.get(row["deployment"])
        return rows

    def rows(self) -> list[DeploymentRow]:
        return msgspec.convert(self.own_rows(), list[DeploymentRow])

    def row(self, name: str) -> DeploymentRow:
        return next(r for r in self.rows() if r.deployment == name)

    async def listing(self) -> Deployments:
        """The deployments as the gateways see them (merged from the replicas' snapshots in
        the shared state), else as this service does, with each replica's rows."""
        own = self.own_rows()
        replicas: dict[str, list[dict[str, Any]]] | None = {}
        shared_state = SharedState("disabled", "no Redis is configured")
        if self.shared is not None:
            try:
                replicas = await self.shared.replicas()
                shared_state = SharedState("ok", self.shared.client.address)
            except StoreUnavailable as exc:
                replicas = None
                shared_state = SharedState("unavailable", exc.detail)
        merged = merge_rows(own, replicas or {})
        rows = msgspec.convert(merged, list[DeploymentRow])
        reply = Deployments(
            data=rows,
            summary=_summary(rows),
            shared_state=shared_state,
            view="gateways" if any(r.reported_by for r in rows) else "routing-service",
        )
        if self.shared is not None:
            reply.replicas = replicas
        return reply

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

    async def drain(self, name: str, *, drained: bool, force: bool = False) -> Changed:
        state = self.state(name)
        if drained and not state.drained and not force:
            others = [
                s.name
                for s in self.router.deployments_of(state.model)
                if s is not state and not s.drained
            ]
            if not others:
                raise Conflict(
                    f"{state.name} is the last deployment of model {state.model!r} not drained: "
                    "draining it would make every request for the model a 503. Restore another "
                    "deployment first, or drain with ?force=true.",
                    param="force",
                    code="last_deployment",
                )
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
        return await routing.listing()

    @get("/{name:str}", summary="One deployment's state", responses=errors(404))
    async def get_deployment(self, name: FromPath[Name], routing: Routing_) -> DeploymentRow:
        found = routing.state(name).name
        return next(r for r in (await routing.listing()).data if r.deployment == found)

    @post(
        "/{name:str}/drain",
        summary="Take a deployment out of rotation on every replica",
        status_code=200,
        responses=errors(404, 409, 503),
    )
    async def drain(
        self,
        name: FromPath[Name],
        routing: Routing_,
        data: NoBody = None,
        force: Annotated[
            FromQuery[bool],
            msgspec.Meta(description="drain even the last deployment of its model not drained"),
        ] = False,
    ) -> Changed:
        return await routing.drain(name, drained=True, force=force)

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
