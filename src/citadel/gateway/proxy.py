"""The gateway's request path: authenticate -> validate -> route -> forward -> meter.

``Gateway.forward`` checks the request, resolves its model (a virtual name such as ``auto`` is
specialised to a model for the request's task), admits it against the caller's limits, opens the
request to its ``Call`` (``citadel.gateway.call``), the one owner of the rest of its life: the
upstream attempts (``citadel.gateway.upstream``: retries, fallbacks), the body whole or the SSE
relay, and whatever ends it, the settling (``citadel.gateway.meter``).

Limits: before forwarding, one limiter call checks and reserves every limit of the caller's tier
(the prompt's estimated tokens plus ``max_tokens`` are reserved); a refusal is a 429 with
``Retry-After`` and the ``x-ratelimit-*`` headers, which successful responses carry too. When the
request ends, however it ends (done, failed upstream, client gone), the reservation is reconciled
to the actual usage in the background, which also releases the concurrency lease. When the limiter
backend is unreachable the gateway fails open (admits, counts the failure) or closed (503), as
configured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from urllib.parse import unquote

import orjson

from citadel.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
)
from citadel.gateway.auth import Authenticator, Principal
from citadel.gateway.call import CLIENT_CLOSED, Call
from citadel.gateway.meter import Meter
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


def _settle_abandoned(call: Call, admission: asyncio.Future[LimitDecision]) -> None:
    """An admission whose client left while it ran: return what it reserved, meter a 499."""
    if admission.cancelled() or admission.exception() is not None:
        return
    decision = admission.result()
    if decision.allowed:
        call.limit_decision = decision
        call.cancelled()
        call.finish(None, CLIENT_CLOSED)


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
        created = int(time.time())
        self._models = {
            name: orjson.dumps(
                {"id": name, "object": "model", "created": created, "owned_by": "citadel"}
            )
            for m in settings.models
            for name in (m.name, *m.aliases)
        }
        self._models_body = b'{"object":"list","data":[' + b",".join(self._models.values()) + b"]}"

    # -- endpoints ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        await self._authenticate(request)
        return Response(200, self._models_body)

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
        """``GET /v1/models/{model}``: a model or alias the gateway serves, else 404."""
        await self._authenticate(request)
        name = unquote(request.path.removeprefix(MODELS_PREFIX))
        body = self._models.get(name)
        if body is None:
            raise NotFound(
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return Response(200, body)

    async def authenticate_json(self, request: Request) -> Principal:
        """The caller of a request with a JSON body (401 or 415 otherwise)."""
        principal = await self._authenticate(request)
        ctype = request.headers.get(b"content-type")
        if ctype is not None and not ctype.lower().startswith(b"application/json"):
            raise UnsupportedMedia(
                f"Unsupported content type {ctype.decode('latin-1')!r}: send application/json.",
                param="content-type",
            )
        return principal

    async def forward(self, endpoint: Endpoint, request: Request) -> Response | StreamResponse:
        started = time.perf_counter()
        wall = time.time()
        principal = await self.authenticate_json(request)
        parsed = parse_request(endpoint, request.body)
        return await self.dispatch(request, parsed, principal, started, wall)

    async def dispatch(
        self,
        request: Request,
        parsed: ParsedRequest,
        principal: Principal,
        started: float,
        wall: float,
        *,
        label: str | None = None,
    ) -> Response | StreamResponse:
        """Resolve the model, check the request against it, admit it and serve it; ``label``
        names the endpoint in metrics and the ledger when it is not ``parsed.endpoint``."""
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
        if not principal.may_use(model.name, *model.aliases):
            raise Forbidden(
                f"Your tier '{principal.tier}' may not use the model `{parsed.model}`.",
                param="model",
                code="model_not_allowed",
            )
        check_context_window(parsed, model.context_window)
        call = Call(self.meter, endpoint, request, parsed, model, principal, started, wall, label)
        if principal.limits is not None and self._limiter is not None:
            await self._admit(call)
        return await call.serve(self.upstream)

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
        tpm = limits.tokens_per_minute
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
            raise RateLimited(
                refusal_message(decision, limits=limits),
                kind=_LIMIT_KINDS.get(name, "tokens"),
                headers=(*ratelimit_headers(decision), (b"x-citadel-limit", name.encode())),
            )
        self._decisions.inc((call.principal.tier, "allowed"))
        call.limit_decision = decision

    async def drain(self) -> None:
        """Wait for reconciliations still under way (at shutdown)."""
        await self.meter.drain()
