"""What the subscriptions deliver, read from the live event feed (``citadel.feed``) that every
replica sees: ``usageEvents`` (the ``usage`` topic: the metering stream the gateways write),
``deploymentState`` (the ``deployments`` topic: each router's breaker, health, drain and load
changes, from every gateway, streaming and GraphQL process) and ``alerts`` (the ``alerts``
topic: the predictive-alerting scheduler's alerts as they start firing and resolve).

A feed entry is decoded once for all the subscribers it reaches (``functools.lru_cache`` on the
entry), so ``fanout.SharedEventExecutor`` can hand one execution to every subscriber with the same
document, variables and scope. Scoping and filtering happen in ``follow``'s ``keep`` before an
event is yielded: a user's key gets its own usage, the deployments of the models its tier and
key allow, and the alerts of its team's ledger rules.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from citadel.errors import BadRequest, Forbidden, NotFound
from citadel.feed import Entry, Lagged
from citadel.graphql.fanout import shareable
from citadel.graphql.types import User, context
from citadel.metering.ledger import decode_event

__all__ = [
    "ALERTS",
    "DEPLOYMENTS",
    "AlertEvent",
    "DeploymentStateEvent",
    "UsageEvent",
    "UsageEventFilter",
    "alert_event",
    "deployment_event",
    "follow",
    "usage_event",
    "usage_filter",
    "visible_models",
]

DEPLOYMENTS = "deployments"
ALERTS = "alerts"

E = TypeVar("E")


async def follow(
    info: Info,
    topic: str,
    after: str | None,
    decode: Callable[[Entry], E | None],
    keep: Callable[[E], bool],
) -> AsyncGenerator[E, None]:
    """The events of ``topic`` after ``after`` (None: from now on) that ``keep`` lets through,
    each with fresh loaders (a long subscription never serves rows read at its start)."""
    ctx = context(info)
    try:
        subscription = ctx.services.feed.subscribe(topic, after=after)
    except ValueError as exc:
        raise BadRequest(str(exc), param="after") from exc
    async with subscription as sub:
        async for item in sub:
            if isinstance(item, Lagged):
                continue  # a slow reader skips ahead; its position says where it is
            event = decode(item)
            if event is not None and keep(event):
                ctx.fresh()
                yield event


def _time(seconds: Any) -> datetime:
    return datetime.fromtimestamp(float(seconds), UTC)


def _json(entry: Entry) -> dict[str, Any] | None:
    try:
        value = orjson.loads(entry.data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# -- usage ------------------------------------------------------------------------------------


@shareable
@strawberry.type(description="One request's usage, as it finished.")
class UsageEvent:
    position: str = strawberry.field(description="the feed position (resume after it)")
    event_id: str
    time: datetime
    request_id: str
    user_id: strawberry.ID
    team_id: strawberry.ID | None
    key_id: str
    tier: str
    endpoint: str
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    latency_seconds: float
    ttft_seconds: float | None
    status: int
    streamed: bool
    cost_usd: float
    user_record: strawberry.Private[str]

    @strawberry.field(description="The user who made the request (read anew for each event).")
    async def user(self, info: Info) -> User | None:
        found = await context(info).loaders.user.load(self.user_record)
        return None if found is None else User.of(found)


@strawberry.input(description="Only the events matching these (each optional).")
class UsageEventFilter:
    user: str | None = None
    team: str | None = None
    model: str | None = None


@functools.lru_cache(maxsize=1024)
def usage_event(entry: Entry) -> UsageEvent | None:
    """The event of a feed entry, decoded once for all the subscribers it reaches."""
    try:
        event = decode_event(entry.data)
    except (ValueError, KeyError):
        return None
    return UsageEvent(
        position=entry.position,
        event_id=event.event_id,
        time=_time(event.time),
        request_id=event.request_id,
        user_id=strawberry.ID(event.user),
        team_id=strawberry.ID(event.team) if event.team else None,
        key_id=event.key_id,
        tier=event.tier,
        endpoint=event.endpoint,
        model=event.model,
        deployment=event.deployment,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        latency_seconds=event.latency_seconds,
        ttft_seconds=event.ttft_seconds,
        status=event.status,
        streamed=event.streamed,
        cost_usd=event.cost_micros / 1_000_000,
        user_record=event.user,
    )


def usage_filter(wanted: UsageEventFilter | None, info: Info) -> Callable[[UsageEvent], bool]:
    viewer = context(info).viewer

    def keep(event: UsageEvent) -> bool:
        if not viewer.may_see_user(str(event.user_id)):
            return False
        if wanted is None:
            return True
        return (
            (wanted.user is None or wanted.user == str(event.user_id))
            and (wanted.team is None or wanted.team == (event.team_id or ""))
            and (wanted.model is None or wanted.model == event.model)
        )

    return keep


@strawberry.type
class _Published:
    """What every event a process published to the feed has."""

    position: str = strawberry.field(description="the feed position (resume after it)")
    time: datetime
    source: str = strawberry.field(
        description="the process that published it (gateway@host:pid, predictive-alerting@...)"
    )


# -- deployments ------------------------------------------------------------------------------


@shareable
@strawberry.type(
    description="A change of one deployment's state, as the router of one gateway (streaming, "
    "GraphQL) process saw it: `kind` says which fields are set."
)
class DeploymentStateEvent(_Published):
    kind: str = strawberry.field(description="breaker, health, drain or load")
    deployment: str
    model: str
    breaker: str | None = strawberry.field(description="breaker: the new state (closed, open...)")
    breaker_from: str | None = strawberry.field(description="breaker: the state before")
    reason: str | None = strawberry.field(description="breaker: what moved it (failure, ...)")
    healthy: bool | None = strawberry.field(description="health: the probe's verdict")
    health_detail: str | None
    drained: bool | None = strawberry.field(description="drain: out of rotation or back")
    in_flight: int | None = strawberry.field(description="load: requests running on it now")
    requests: int | None = strawberry.field(description="load: requests sent since start")
    latency_ewma_seconds: float | None = strawberry.field(description="load: peak-EWMA latency")
    error_rate_ewma: float | None = strawberry.field(description="load: error-rate EWMA")


@functools.lru_cache(maxsize=1024)
def deployment_event(entry: Entry) -> DeploymentStateEvent | None:
    doc = _json(entry)
    if doc is None or not isinstance(doc.get("deployment"), str):
        return None
    try:
        return DeploymentStateEvent(
            position=entry.position,
            time=_time(doc.get("time", 0)),
            source=str(doc.get("source", "")),
            kind=str(doc.get("kind", "")),
            deployment=doc["deployment"],
            model=str(doc.get("model", "")),
            breaker=doc.get("to"),
            breaker_from=doc.get("from"),
            reason=doc.get("reason"),
            healthy=doc.get("healthy"),
            health_detail=doc.get("detail"),
            drained=doc.get("drained"),
            in_flight=doc.get("in_flight"),
            requests=doc.get("requests"),
            latency_ewma_seconds=doc.get("latency_ewma_seconds"),
            error_rate_ewma=doc.get("error_rate_ewma"),
        )
    except (TypeError, ValueError):
        return None


def visible_models(info: Info, model: str | None) -> frozenset[str]:
    """The models whose deployments the caller may watch: ``model`` (a name or alias; NOT_FOUND
    when unknown, FORBIDDEN when the caller's tier or key does not allow it), else every model
    the caller may use (the admin: all)."""
    ctx = context(info)
    settings = ctx.services.settings
    principal = ctx.viewer.principal
    if model is not None:
        found = settings.model(model.strip())
        if found is None:
            names = ", ".join(m.name for m in settings.models)
            raise NotFound(f"No model is named {model!r}; the models: {names}.", param="model")
        if not principal.may_use(found.name, *found.aliases):
            raise Forbidden(
                f"This key may not use the model {found.name!r}, nor watch its deployments.",
                param="model",
                code="model_not_allowed",
            )
        return frozenset((found.name,))
    return frozenset(m.name for m in settings.models if principal.may_use(m.name, *m.aliases))


# -- alerts -----------------------------------------------------------------------------------


@shareable
@strawberry.type(description="An alert that started firing or resolved.")
class AlertEvent(_Published):
    state: str = strawberry.field(description="firing or resolved")
    rule: str
    severity: str
    fingerprint: str
    labels: JSON
    annotations: JSON
    starts_at: datetime
    ends_at: datetime | None = strawberry.field(description="when it resolved")


@functools.lru_cache(maxsize=1024)
def alert_event(entry: Entry) -> AlertEvent | None:
    doc = _json(entry)
    if doc is None or doc.get("kind") != "alert" or not isinstance(doc.get("rule"), str):
        return None
    try:
        ends = doc.get("ends_at")
        return AlertEvent(
            position=entry.position,
            time=_time(doc.get("time", 0)),
            source=str(doc.get("source", "")),
            state=str(doc.get("state", "")),
            rule=doc["rule"],
            severity=str(doc.get("severity", "")),
            fingerprint=str(doc.get("fingerprint", "")),
            labels=JSON(dict(doc.get("labels") or {})),
            annotations=JSON(dict(doc.get("annotations") or {})),
            starts_at=_time(doc.get("starts_at", 0)),
            ends_at=None if ends is None else _time(ends),
        )
    except (TypeError, ValueError):
        return None
