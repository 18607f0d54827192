"""The routing API's bodies and replies, as ``msgspec.Struct``s: one definition gives the
validation (a bad field is a 400 naming it), the OpenAPI schema and the encoding.

``RouteRequest`` is the exception: it only describes ``POST /v1/route``'s body in the document.
That body is checked by the gateway's own parser (``citadel.openai.requests``) from the raw
bytes, so that a dry run refuses exactly what the gateway would refuse, with the same 400s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType

from citadel.routing.breaker import BreakerState
from citadel.routing.classifier import TASKS
from citadel.web import Struct

__all__ = [
    "CandidateScore",
    "Changed",
    "DeploymentRow",
    "Deployments",
    "Evaluation",
    "Excluded",
    "NoFields",
    "RouteRequest",
    "RouteResult",
    "SharedState",
    "Summary",
]

Endpoint = Literal["chat", "completion", "embedding"]


# -- bodies -----------------------------------------------------------------------------------


class NoFields(Struct):
    """An admin action's body: none, or ``{}``."""


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[Any] | None = None


# A string, or an array of strings, of token ids or of arrays of token ids (one msgspec type
# can hold only one array-like: the gateway's parser tells the three arrays apart).
Prompt = str | list[str | int | list[int]]
Task = Literal["code", "reasoning", "long-context", "chat", "embedding"]
assert get_args(Task) == TASKS


class RouteRequest(msgspec.Struct):
    """An OpenAI request body (at most one of messages, prompt, input) and `task`; other
    fields are checked as the gateway checks them (`citadel.openai.requests`)."""

    model: Annotated[
        str, Meta(description="a model, an alias or a virtual model", examples=["auto"])
    ]
    messages: list[Message] | None = None
    prompt: Prompt | None = None
    input: Prompt | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    stream: bool | None = None
    task: (
        Annotated[Task, Meta(description="as the x-citadel-task header (which it overrides)")]
        | None
    ) = None
    tier: (
        Annotated[
            str,
            Meta(description="the caller's tier: only the models it may use (none: any model)"),
        ]
        | None
    ) = None


# -- replies ----------------------------------------------------------------------------------


class DeploymentRow(msgspec.Struct, kw_only=True):
    """One deployment as this service's router sees it."""

    deployment: str
    model: str
    url: str
    breaker: BreakerState
    breaker_open_seconds: Annotated[float | None, Meta(description="back-off left when open")]
    breaker_held_open: Annotated[bool, Meta(description="held open for another replica")]
    breaker_forced_by: Annotated[str | None, Meta(description="that replica")]
    breaker_trips: int
    window_failure_rate: float
    healthy: bool
    health_detail: str
    drained: bool
    in_flight: int
    latency_ewma_seconds: float | None
    error_rate_ewma: float | None
    requests: int
    failures: int
    last_error: str
    reported_by: Annotated[
        int,
        Meta(description="gateway replicas whose rows are merged here; 0: this service's view"),
    ] = 0


class Summary(msgspec.Struct):
    deployments: int
    healthy: int
    unhealthy: int
    drained: int
    breaker_open: int
    breaker_half_open: int


class SharedState(msgspec.Struct):
    status: Literal["ok", "unavailable", "disabled"]
    detail: str


class Deployments(msgspec.Struct, kw_only=True):
    data: list[DeploymentRow]
    summary: Summary
    shared_state: SharedState
    view: Annotated[
        Literal["gateways", "routing-service"],
        Meta(
            description="gateways: `data` merges the gateway replicas' latest rows; "
            "routing-service: no replica reported, `data` is this service's own router"
        ),
    ] = "routing-service"
    replicas: (
        Annotated[
            dict[str, list[dict[str, Any]]] | None,
            Meta(
                description="Each gateway replica's latest rows, by replica; null when Redis is "
                "configured but unreachable; absent without Redis."
            ),
        ]
        | UnsetType
    ) = UNSET
    object: Literal["list"] = "list"


class Changed(msgspec.Struct):
    deployment: DeploymentRow
    shared: Annotated[bool, Meta(description="set in the shared state too (Redis)")]


class Excluded(msgspec.Struct):
    deployment: str
    reasons: list[str]


class CandidateScore(msgspec.Struct, kw_only=True):
    """A candidate with what the balancers weigh (`citadel.routing.balancer`)."""

    deployment: str
    weight: float
    in_flight: int
    max_concurrency: Annotated[int, Meta(description="0: unlimited")]
    full: bool
    latency_ewma_seconds: float | None
    load: Annotated[float, Meta(description="(in flight + 1) / weight")]
    latency_score: Annotated[float, Meta(description="max(latency, 1 ms) * load")]
    cost_per_1k: float
    healthy: bool
    breaker: BreakerState


class Evaluation(msgspec.Struct, kw_only=True):
    """What `Router.select` would do for one model."""

    model: str
    balancer: str
    deployment: str | None
    reason: str
    note: Annotated[str, Meta(description="when a deployment is chosen")] | UnsetType = UNSET
    candidates: list[CandidateScore]
    excluded: list[Excluded]


class RouteResult(msgspec.Struct, kw_only=True):
    requested_model: str
    virtual: bool
    endpoint: Endpoint
    stream: bool
    task: str
    prompt_tokens: int
    needed_tokens: int
    model: str | None
    model_reason: str
    deployment: str | None
    deployment_model: Annotated[str | None, Meta(description="a fallback's, maybe")]
    reason: str
    evaluations: Annotated[
        list[Evaluation],
        Meta(description="the model, then its fallbacks while none could take the request"),
    ]
    object: Literal["route.dry_run"] = "route.dry_run"
