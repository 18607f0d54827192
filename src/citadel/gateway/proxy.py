"""The gateway's request path: authenticate -> validate -> route -> forward -> meter.

``Gateway.forward`` checks the request, resolves its model (a virtual name such as ``auto`` is
specialised to a model for the request's task), admits it against the caller's limits, opens the
request to its ``Call`` (``citadel.gateway.call``), the one owner of the rest of its life: the
upstream attempts (``citadel.gateway.upstream``: retries, fallbacks), the body whole or the SSE
relay, and whatever ends it, the settling (``citadel.gateway.meter``).

Limits: before forwarding, one limiter call checks and reserves every limit of the caller's tier,
of its API key (its own budget and per-minute limits) and its team's budget (the prompt's
estimated tokens plus ``max_tokens`` are reserved); a refusal is a 429 with
``Retry-After`` and the ``x-ratelimit-*`` headers, which successful responses carry too. When the
request ends, however it ends (done, failed upstream, client gone), the reservation is reconciled
to the actual usage in the background, which also releases the concurrency lease. When the limiter
backend is unreachable the gateway fails open (admits, counts the failure) or closed (503), as
configured.

The ledger: every request answered for a principal is one usage event. Those a ``Call`` serves
get theirs when the call ends (``Call.finish``); those answered before (a bad body, an unknown
model, the tier's 403, the limits' 429 or 400, the fail-closed 503) get one from ``unserved``,
with the error's code as the reason and no deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from urllib.parse import unquote

import orjson

from citadel.accounts.auth import Authenticator, Principal
from citadel.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
)
from citadel.gateway.call import CLIENT_CLOSED, CLIENT_CLOSED_REASON, Call, error_reason
from citadel.gateway.meter import Meter
from citadel.gateway.passthrough import Passthrough
from citadel.gateway.throttle import AuthThrottle, client_address, parse_networks
from citadel.gateway.upstream import UPSTREAM_PATHS, Upstream
from citadel.http.client import HttpClient
from citadel.http.server import Request, Response, StreamResponse
from citadel.limits.decision import LimitDecision, Limiter
from citadel.limits.policy import cost_micros, ratelimit_headers, refusal_message
from citadel.metering.events import UsageSink
from citadel.metrics import AUTH_FAILURES, LIMITER_DECISIONS, Registry
from citadel.openai.requests import Endpoint, ParsedRequest, parse_request
from citadel.openai.tokens import check_context_window, estimate_prompt_tokens
from citadel.routing.router import Router
from citadel.settings import LimitsSettings, Model, Settings

_log = logging.getLogger("citadel.gateway")

# Which model kinds serve which endpoint: chat models also take legacy completions.
SERVES: dict[str, frozenset[str]] = {
    "chat": frozenset({"chat", "completion"}),
    "completion": frozenset({"completion"}),
    "embedding": frozenset({"embedding"}),
}

MODELS_PREFIX = "/v1/models/"
# OpenAI's 429 ``type``: which kind of limit refused the request (the rest are token or spend).
_LIMIT_KINDS = {"requests_per_minute": "requests", "concurrent_requests": "requests"}
# Error codes of the gateway's policy refusals (the tier's 403, a request over a minute's tokens);
# a limit's 429 is a ``_LimitRefusal``.
_REFUSAL_CODES = frozenset({"model_not_allowed", "tokens_per_minute_exceeded"})


class _LimitRefusal(RateLimited):
    """The 429 of a limit that refused the request; ``limit`` names it (the ledger's reason)."""

    def __init__(
        self, message: str, *, limit: str, kind: str, headers: tuple[tuple[bytes, bytes], ...]
    ) -> None:
        super().__init__(message, kind=kind, headers=headers)
        self.limit = limit


def _settle_abandoned(call: Call, admission: asyncio.Future[LimitDecision]) -> None:
    """An admission whose client left while it ran: return what it reserved, meter a 499."""
    if admission.cancelled() or admission.exception() is not None:
        return
    decision = admission.result()
    if decision.allowed:
        call.limit_decision = decision
        call.cancelled()
        call.finish(None, CLIENT_CLOSED, CLIENT_CLOSED_REASON)


class Gateway:
    """Forwards OpenAI requests to the deployments of the requested model."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: HttpClient,
        authenticator: Authenticator,
        registry: Registry,
        usage: UsageSink | None = None,
        limiter: Limiter | None = None,
        router: Router | None = None,
    ) -> None:
        self._settings = settings
        self._auth = authenticator
        self._limiter = limiter
        self._limits: LimitsSettings = settings.limits
        self._fail_closed = settings.limits.failure_mode == "closed"
        self._decisions = registry.counter(LIMITER_DECISIONS)
        self._auth_failures = registry.counter(AUTH_FAILURES)
        self._trusted = parse_networks(settings.gateway.trusted_proxies)
        self._throttle = AuthThrottle(
            limit=settings.gateway.auth_failure_limit,
            window=settings.gateway.auth_failure_window_seconds,
        )
        self.router = router if router is not None else Router(settings, registry=registry)
        self.meter = Meter(
            registry=registry,
            router=self.router,
            usage=usage,
            limiter=limiter,
            fail_closed=self._fail_closed,
        )
        self.upstream = Upstream(settings, client=client, meter=self.meter)
        # Some deployment speaks the Responses API itself (``responses: true``).
        self.speaks_responses = any(d.responses for m in settings.models for d in m.deployments)
        created = int(time.time())

        def entry(name: str) -> bytes:
            return orjson.dumps(
                {"id": name, "object": "model", "created": created, "owned_by": "citadel"}
            )

        self._models = {name: entry(name) for m in settings.models for name in (m.name, *m.aliases)}
        self._virtual = {name: entry(name) for name in sorted(self.router.virtual)}
        # The list each set of allowed models sees (a tier's `models:` and a key's own list),
        # built once per set.
        self._listings: dict[tuple[tuple[str, ...], tuple[str, ...] | None], bytes] = {}

    # -- endpoints ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        """The models (and aliases) the caller's tier and key may use, and the virtual names
        (``auto``) when it may use any model."""
        principal = await self._authenticate(request)
        listing = (principal.models, principal.key_models)
        body = self._listings.get(listing)
        if body is None:
            allowed = [
                self._models[name]
                for m in self._settings.models
                if principal.may_use(m.name, *m.aliases)
                for name in (m.name, *m.aliases)
            ]
            if allowed:
                allowed += self._virtual.values()
            body = b'{"object":"list","data":[' + b",".join(allowed) + b"]}"
            self._listings[listing] = body
        return Response(200, body)

    async def _authenticate(self, request: Request) -> Principal:
        """The caller, or a 401; a 429 first for an address that failed too often lately."""
        address = client_address(
            request.client, request.headers.get(b"x-forwarded-for"), self._trusted
        )
        now = time.monotonic()
        wait = self._throttle.retry_after(address, now)
        if wait:
            self._auth_failures.inc(("throttled",))
            raise RateLimited(
                f"Too many failed authentications from your address; retry in {wait} s.",
                code="too_many_authentication_failures",
                headers=((b"retry-after", str(wait).encode()),),
            )
        try:
            return await self._auth.authenticate(request.headers.get(b"authorization"))
        except Unauthorized as exc:
            if exc.code != "missing_api_key":  # a guess, not a client that forgot its key
                self._throttle.failed(address, now)
            raise

    async def retrieve_model(self, request: Request) -> Response:
        """``GET /v1/models/{model}``: a model or alias the gateway serves and the caller's tier
        may use, or a virtual name (``auto``); else 404 (as OpenAI answers both)."""
        principal = await self._authenticate(request)
        name = unquote(request.path.removeprefix(MODELS_PREFIX))
        model = self._settings.model(name)
        body = self._models.get(name) or self._virtual.get(name)
        if model is not None and not principal.may_use(model.name, *model.aliases):
            body = None
        if body is None:
            raise NotFound(
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return Response(200, body)

    async def authenticate(self, request: Request) -> Principal:
        """The caller, or a 401 (a 429 for an address that failed too often lately)."""
        return await self._authenticate(request)

    @staticmethod
    def check_json(request: Request) -> None:
        """A 415 unless the body is declared JSON (or not declared at all)."""
        ctype = request.headers.get(b"content-type")
        if ctype is not None and not ctype.lower().startswith(b"application/json"):
            raise UnsupportedMedia(
                f"Unsupported content type {ctype.decode('latin-1')!r}: send application/json.",
                param="content-type",
            )

    async def authenticate_json(self, request: Request) -> Principal:
        """The caller of a request with a JSON body (401 or 415 otherwise)."""
        principal = await self._authenticate(request)
        self.check_json(request)
        return principal

    async def forward(self, endpoint: Endpoint, request: Request) -> Response | StreamResponse:
        started = time.perf_counter()
        wall = time.time()
        principal = await self._authenticate(request)
        try:
            self.check_json(request)
            parsed = parse_request(endpoint, request.body)
        except ApiError as exc:
            self.unserved(principal, request, exc, endpoint=endpoint, started=started, wall=wall)
            raise
        return await self.dispatch(request, parsed, principal, started, wall)

    def unserved(
        self,
        principal: Principal,
        request: Request,
        exc: ApiError,
        *,
        endpoint: str,
        started: float,
        wall: float,
        model: str = "",
        streamed: bool = False,
    ) -> None:
        """The usage event of a request answered with ``exc`` before any deployment was asked."""
        limit = exc.limit if isinstance(exc, _LimitRefusal) else None
        self.meter.unserved(
            principal,
            request_id=request.request_id,
            endpoint=endpoint,
            model=model,
            status=exc.status,
            reason=limit or error_reason(exc),
            refused=limit is not None or exc.code in _REFUSAL_CODES,
            streamed=streamed,
            started=started,
            wall=wall,
        )

    async def dispatch(
        self,
        request: Request,
        parsed: ParsedRequest,
        principal: Principal,
        started: float,
        wall: float,
        *,
        label: str | None = None,
        passthrough: Passthrough | None = None,
    ) -> Response | StreamResponse:
        """Resolve the model, check the request against it, admit it and serve it; ``label``
        names the endpoint in metrics and the ledger when it is not ``parsed.endpoint``;
        ``passthrough`` is the Responses request for deployments that speak the Responses API."""
        endpoint = parsed.endpoint
        name = parsed.model
        try:
            call = self._admitted_call(request, parsed, principal, started, wall, label)
            call.passthrough = passthrough
            name = call.model.name
            if principal.limits is not None and self._limiter is not None:
                await self._admit(call)
        except ApiError as exc:
            model = self._settings.model(name)  # an alias is recorded as its model
            self.unserved(
                principal,
                request,
                exc,
                endpoint=label or endpoint,
                started=started,
                wall=wall,
                model=model.name if model is not None else name,
                streamed=parsed.stream,
            )
            raise
        return await call.serve(self.upstream)

    def _admitted_call(
        self,
        request: Request,
        parsed: ParsedRequest,
        principal: Principal,
        started: float,
        wall: float,
        label: str | None = None,
    ) -> Call:
        """The request's ``Call``, once its model is resolved and it may be sent to it (else the
        404, 400 or 403 that says why not)."""
        endpoint = parsed.endpoint
        model = self._settings.model(parsed.model)
        if model is None and parsed.model in self.router.virtual:
            model = self._specialise(endpoint, request, parsed, principal)
        if model is None:
            raise NotFound(
                f"The model `{parsed.model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if endpoint not in SERVES[model.kind]:
            raise BadRequest(
                f"The model `{parsed.model}` is a {model.kind} model and does not serve "
                f"{UPSTREAM_PATHS[endpoint]}.",
                param="model",
                code="model_not_supported",
            )
        if not principal.tier_may_use(model.name, *model.aliases):
            raise Forbidden(
                f"Your tier '{principal.tier}' may not use the model `{parsed.model}`.",
                param="model",
                code="model_not_allowed",
            )
        if not principal.key_may_use(model.name, *model.aliases):
            allowed = ", ".join(principal.key_models or ())
            raise Forbidden(
                f"This API key may not use the model `{parsed.model}`; it may use: {allowed}.",
                param="model",
                code="model_not_allowed",
            )
        check_context_window(parsed, model.context_window)
        return Call(self.meter, endpoint, request, parsed, model, principal, started, wall, label)

    def _specialise(
        self, endpoint: Endpoint, request: Request, parsed: ParsedRequest, principal: Principal
    ) -> Model:
        """The model a virtual name (``auto``) stands for, for this request's task."""
        hint = request.header(b"x-citadel-task")
        prompt = estimate_prompt_tokens(parsed)
        needed = prompt + (
            0 if endpoint == "embedding" else parsed.max_tokens or self._limits.default_max_tokens
        )
        try:
            choice = self.router.resolve(
                parsed.model,
                endpoint=endpoint,
                prompt_text=parsed.prompt_text,
                needed_tokens=needed,
                hint=hint,
                allowed=lambda m: principal.may_use(m.name, *m.aliases),
                now=time.monotonic(),
            )
        except ValueError as exc:
            raise BadRequest(str(exc), param="x-citadel-task", code="unknown_task") from exc
        if choice is None:
            raise BadRequest(
                f"No model you may use fits this request ({needed} tokens with the reply).",
                param="model",
                code="no_model_fits",
            )
        return choice.model

    # -- limits ------------------------------------------------------------------------------

    async def _admit(self, call: Call) -> None:
        """Reserve the caller's limits for this request, or raise the 429 (or fail-closed 503)."""
        limiter = self._limiter
        limits = call.principal.limits
        assert limiter is not None
        assert limits is not None
        parsed = call.parsed
        prompt = estimate_prompt_tokens(parsed)
        completion = 0
        if call.endpoint != "embedding":
            completion = parsed.max_tokens or self._limits.default_max_tokens
        key = call.principal.scope_limits("key")
        tpms = [t for t in (limits.tokens_per_minute, key and key.tokens_per_minute) if t]
        tpm = min(tpms, default=None)
        if tpm is not None and prompt + completion > tpm:
            # Waiting cannot help a request larger than a whole minute's budget: a 400, no
            # Retry-After (OpenAI answers a 429 here, and clients retry it for nothing).
            raise BadRequest(
                f"Request too large for model `{parsed.model}` on tokens per minute: limit {tpm}, "
                f"requested {prompt + completion} ({prompt} in the prompt, {completion} for the "
                "reply). Lower max_tokens or shorten the prompt.",
                param="max_tokens" if completion else "messages",
                code="tokens_per_minute_exceeded",
            )
        admission = asyncio.ensure_future(
            limiter.admit(
                call.principal.user,
                limits,
                lease_id=call.request.request_id,
                tokens=prompt + completion,
                cost_micros=cost_micros(call.model.price, prompt, completion),
                now=call.wall,
                scopes=call.principal.scopes,
            )
        )
        try:
            # Shielded: a client that leaves mid-admission must not strand a reservation the
            # store made; the admission completes and the call is settled as a 499.
            decision = await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(partial(_settle_abandoned, call))
            raise
        except StoreUnavailable as exc:
            self.meter.limiter_down("admit")
            if self._fail_closed:
                raise Unavailable(
                    "Rate limits cannot be checked right now (the limiter store is unavailable) "
                    "and this gateway fails closed; retry shortly.",
                    code="limiter_unavailable",
                ) from exc
            return
        self.meter.limiter_healthy = True
        if not decision.allowed:
            self._decisions.inc((call.principal.tier, decision.refused_by or "unknown"))
            name = decision.refused_by or "requests_per_minute"
            scope = decision.refused_scope or "user"
            refused_limits = limits if scope == "user" else call.principal.scope_limits(scope)
            limit = name if scope == "user" else f"{scope}_{name}"  # team_cost_per_month
            raise _LimitRefusal(
                refusal_message(decision, limits=refused_limits),
                limit=limit,
                kind=_LIMIT_KINDS.get(name, "tokens"),
                headers=(*ratelimit_headers(decision), (b"x-citadel-limit", limit.encode())),
            )
        self._decisions.inc((call.principal.tier, "allowed"))
        call.limit_decision = decision

    async def drain(self) -> None:
        """Wait for reconciliations still under way (at shutdown)."""
        await self.meter.drain()
