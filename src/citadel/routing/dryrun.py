"""The dry run of ``POST /v1/route``: which model a described request would get (a virtual model
such as ``auto`` resolved by task), which deployment, why, and why not the others.

The caller's ``tier`` (a body field; none: any model) narrows the choice as the gateway's does:
``auto`` chooses among the models the tier may use, and a model the tier may not use gets no
deployment, with the reason (the gateway answers it 403).

Theory of operation: the dry run repeats the gateway's decision over the router's live state
without any of its side effects. The request is parsed as the gateway would parse it, its tokens
estimated and its task classified; the model (or the virtual model's choice) is then evaluated,
and its fallbacks in turn while none of the chain's deployments could take the request. Each
evaluation filters the deployments as ``Router.select`` does (drained, breaker refusing, then
unhealthy unless none is healthy) and lets a balancer pick among the rest. Three things keep it
read-only: a breaker is never asked (a half-open one would count a probe), only its snapshot is
read; the live balancer is not advanced, a fresh one of the same kind, seeded, picks instead; and
no routing decision is counted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from citadel.errors import BadRequest, NotFound
from citadel.openai.requests import Endpoint, ParsedRequest, decode_body, parse_body
from citadel.openai.tokens import estimate_prompt_tokens
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
from citadel.routing.bodies import CandidateScore, Evaluation, Excluded, RouteResult
from citadel.routing.breaker import BreakerState
from citadel.routing.classifier import TASKS, classify
from citadel.routing.router import DeploymentState, Router
from citadel.settings import Model, Settings, Tier

__all__ = ["breaker_refusal", "dry_run"]

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


def dry_run(
    settings: Settings,
    router: Router,
    raw: bytes,
    task_header: str | None,
    clock: Callable[[], float],
) -> RouteResult:
    """The answer to ``POST /v1/route`` with body ``raw`` (and the ``x-citadel-task`` header);
    a bad body raises the 400 the gateway would give, naming the field, an unknown model the
    404."""
    parsed, endpoint, hint, tier = _parse_route(settings, raw, task_header)
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
    needed = prompt_tokens + (reply if reply is not None else settings.limits.default_max_tokens)
    task = (
        "embedding"
        if endpoint == "embedding"
        else classify(parsed.prompt_text, estimated_tokens=prompt_tokens, hint=hint)
    )

    def result(
        model: str | None,
        model_reason: str,
        reason: str,
        evaluations: list[Evaluation],
        chosen: Evaluation | None = None,
    ) -> RouteResult:
        return RouteResult(
            requested_model=parsed.model,
            virtual=virtual,
            endpoint=endpoint,
            stream=parsed.stream,
            task=task,
            prompt_tokens=prompt_tokens,
            needed_tokens=needed,
            model=model,
            model_reason=model_reason,
            deployment=None if chosen is None else chosen.deployment,
            deployment_model=None if chosen is None else chosen.model,
            reason=reason,
            evaluations=evaluations,
        )

    if model is None:
        choice = router.resolve(
            parsed.model,
            endpoint=endpoint,
            prompt_text=parsed.prompt_text,
            needed_tokens=needed,
            hint=hint,
            allowed=lambda m: tier is None or _tier_allows(tier, m),
            now=clock(),
        )
        if choice is None:
            which = "of this kind" if tier is None else f"of this kind tier '{tier.name}' may use"
            return result(
                None,
                f"no model {which} fits {needed} tokens with the reply",
                "no model fits, so no deployment is chosen",
                [],
            )
        model, model_reason = choice.model, choice.reason
    elif model.name == parsed.model:
        model_reason = f"{model.name} is named in the request"
    else:
        model_reason = f"{parsed.model} is an alias of {model.name}"
    if tier is not None and not _tier_allows(tier, model):
        return result(
            model.name,
            f"{model_reason}, but tier '{tier.name}' may not use it",
            f"tier '{tier.name}' may not use {model.name}: the gateway answers 403 "
            "(model_not_allowed), so no deployment is chosen",
            [],
        )
    if endpoint not in _SERVES[model.kind]:
        raise BadRequest(
            f"The model `{model.name}` is a {model.kind} model and does not serve "
            f"{endpoint} requests.",
            param="model",
            code="model_not_supported",
        )
    evaluations = []
    chosen: Evaluation | None = None
    for candidate_model in _chain(settings, model):
        evaluation = _evaluate(settings, router, candidate_model, clock())
        evaluations.append(evaluation)
        if evaluation.deployment is not None:
            chosen = evaluation
            break
    if chosen is None:
        tried = ", ".join(e.model for e in evaluations)
        reason = f"no deployment of {tried} can take the request; the gateway answers 503"
    elif chosen.model != model.name:
        reason = f"every deployment of {model.name} is out; fallback {chosen.model}: "
        reason += chosen.reason
    else:
        reason = chosen.reason
    return result(model.name, model_reason, reason, evaluations, chosen)


def _chain(settings: Settings, model: Model) -> list[Model]:
    """The model, then its fallbacks (each once)."""
    chain = [model]
    for name in model.fallbacks:
        fallback = settings.model(name)
        if fallback is not None and fallback not in chain:
            chain.append(fallback)
    return chain


def _tier_allows(tier: Tier, model: Model) -> bool:
    """Whether ``tier`` may use ``model`` (by its name or an alias), as the gateway decides."""
    return any(tier.allows(name) for name in (model.name, *model.aliases))


def _parse_route(
    settings: Settings, raw: bytes, task_header: str | None
) -> tuple[ParsedRequest, Endpoint | None, str | None, Tier | None]:
    """The described request, checked by the gateway's parser (``parse_request``, as its two
    steps: the body is decoded once); the endpoint its prompt field implies (None: no prompt
    given); the task hint (``task``, else the ``x-citadel-task`` header); and the caller's
    ``tier`` (None: not given)."""
    body = decode_body(raw)  # the gateway's 400 for an empty, unreadable, non-object or deep body
    tier_name = body.pop("tier", None)
    tier = None
    if tier_name is not None:
        tiers = {t.name: t for t in settings.tiers}
        if not isinstance(tier_name, str) or tier_name not in tiers:
            raise BadRequest(
                f"'tier' must be one of {', '.join(tiers)}; got {tier_name!r}.",
                param="tier",
                code="unknown_tier",
            )
        tier = tiers[tier_name]
    given = [name for name in _PROMPT_FIELDS if body.get(name) is not None]
    if len(given) > 1:
        raise BadRequest(
            f"Give at most one of 'messages', 'prompt' and 'input'; got {' and '.join(given)}.",
            param=given[1],
        )
    hint = body.get("task", task_header)
    if hint is not None and (not isinstance(hint, str) or hint.strip().lower() not in TASKS):
        raise BadRequest(
            f"'task' must be one of {', '.join(TASKS)}; got {hint!r}.",
            param="task",
            code="unknown_task",
        )
    if given:
        endpoint = _PROMPT_FIELDS[given[0]]
        return parse_body(endpoint, body), endpoint, hint, tier
    # No prompt: the other fields are still checked, as a completion with an empty prompt.
    return parse_body("completion", {**body, "prompt": ""}), None, hint, tier


def _first_endpoint(model: Model) -> Endpoint:
    kind = model.kind
    return "embedding" if kind == "embedding" else "completion" if kind == "completion" else "chat"


def breaker_refusal(state: DeploymentState, now: float) -> str | None:
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


def _evaluate(settings: Settings, router: Router, model: Model, now: float) -> Evaluation:
    """What ``Router.select`` would do for ``model``, and why, without its side effects."""
    excluded: list[Excluded] = []
    usable: list[DeploymentState] = []
    for state in router.deployments_of(model.name):
        reasons = []
        if state.drained:
            reasons.append("drained by an operator")
        refusal = breaker_refusal(state, now)
        if refusal is not None:
            reasons.append(refusal)
        if reasons:
            if not state.healthy:
                reasons.append(f"unhealthy: {state.health_detail}")
            excluded.append(Excluded(state.name, reasons))
        else:
            usable.append(state)
    healthy = [s for s in usable if s.healthy]
    if healthy:
        excluded += [
            Excluded(s.name, [f"unhealthy: {s.health_detail}"]) for s in usable if not s.healthy
        ]
    pool = healthy or usable
    name = model.balancer or settings.routing.balancer
    if not pool:
        return Evaluation(
            model=model.name,
            balancer=name,
            deployment=None,
            reason="every deployment is drained or has its breaker open",
            candidates=[],
            excluded=excluded,
        )
    candidates = [s.candidate(model, now) for s in pool]
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
    return Evaluation(
        model=model.name,
        balancer=name,
        deployment=chosen.name,
        reason=reason,
        note=_note(balancer),
        candidates=_scores(candidates, router, now),
        excluded=excluded,
    )


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


def _scores(candidates: Sequence[Candidate], router: Router, now: float) -> list[CandidateScore]:
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
            CandidateScore(
                deployment=c.name,
                weight=c.weight,
                in_flight=c.in_flight,
                max_concurrency=c.max_concurrency,
                full=c.full,
                latency_ewma_seconds=c.latency,
                load=round(load, 6),
                latency_score=round(max(latency, 0.001) * load, 6),
                cost_per_1k=c.cost_per_1k,
                healthy=state.healthy,
                breaker=state.breaker.snapshot(now).state,
            )
        )
    return rows
