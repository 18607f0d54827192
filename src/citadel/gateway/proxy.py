"""The gateway's request path: authenticate -> validate -> route -> forward -> meter.

Non-streaming requests are forwarded and their body relayed whole. Streaming requests ask the
upstream for usage (``stream_options.include_usage``), relay every SSE event as it arrives, drop the
usage event when the client did not ask for it, and count tokens themselves when the stream ends
without one. A client that goes away cancels the task serving it (see ``citadel.http.server``): the
upstream response is then closed, which closes its connection and stops the generation upstream.

Timeouts: ``connect`` bounds opening a connection, ``first_byte`` bounds the wait for the response
head (and any one stall of the body), ``total`` bounds the whole request. Each is a 504 when it
fires before the response started; once a stream has started, a failure ends it with an SSE error
event rather than a silent cut.

A connection failure (nothing was sent) is retried on another deployment of the model, if any.

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
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson

from citadel.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    StoreUnavailable,
    Unavailable,
    UnsupportedMedia,
    UpstreamError,
    UpstreamTimeout,
)
from citadel.gateway.auth import Authenticator, Principal
from citadel.http.client import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    Origin,
    ProtocolError,
    ReadTimeout,
    UpstreamResponse,
)
from citadel.http.server import Request, Response, StreamResponse
from citadel.limits.decision import LimitDecision, Limiter, Limits, Reservation
from citadel.limits.policy import cost_micros, ratelimit_headers, refusal_message
from citadel.metering.events import UsageEvent, UsageSink, new_event_id
from citadel.metrics import (
    GATEWAY_CLIENT_DISCONNECTS,
    GATEWAY_IN_FLIGHT,
    GATEWAY_REQUEST_DURATION,
    GATEWAY_REQUESTS,
    GATEWAY_TOKENS,
    GATEWAY_TOKENS_TOTAL,
    GATEWAY_TPOT,
    GATEWAY_TTFT,
    GATEWAY_UPSTREAM_ERRORS,
    LIMITER_DECISIONS,
    LIMITER_FAILURES,
    Registry,
)
from citadel.openai.requests import Endpoint, ParsedRequest, parse_request, with_upstream_fields
from citadel.openai.sse import SseDecoder, encode_data, event_data, inspect_chunk
from citadel.openai.tokens import estimate_prompt_tokens, estimate_tokens
from citadel.routing.router import DeploymentState, Router
from citadel.settings import Deployment, LimitsSettings, Model, Settings

_log = logging.getLogger("citadel.gateway")

UPSTREAM_PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}
# Which model kinds serve which endpoint: chat models also take legacy completions.
_SERVES: dict[str, frozenset[str]] = {
    "chat": frozenset({"chat", "completion"}),
    "completion": frozenset({"completion"}),
    "embedding": frozenset({"embedding"}),
}
# Headers the gateway sets itself or that describe the hop; all other x-* headers pass through.
_NOT_FORWARDED_PREFIXES = (b"x-citadel-", b"x-forwarded-", b"x-request-id", b"x-real-ip")
_ERROR_BODY_LIMIT = 64 * 1024


@dataclass(slots=True)
class _Target:
    """A deployment with its parsed origin and the label tuples its metrics use."""

    deployment: Deployment
    origin: Origin
    labels: tuple[str, str]


class _Attempt(Exception):
    """A failure before any byte reached the client; ``retry`` says another deployment may try."""

    def __init__(self, error: ApiError, *, retry: bool, upstream_fault: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry
        # False when the upstream did its job (e.g. it rejected the caller's bad request).
        self.counts_against_upstream = upstream_fault


class _MalformedEventError(Exception):
    """An upstream SSE event that is not JSON."""


class _StreamBody:
    """The relay as a stream body that cleans up even when it is closed before it started.

    An async generator closed before its first step never runs its ``finally``; the server closes
    a body it will not send (the client left first), and the upstream must be released then too.
    """

    __slots__ = ("_call", "_relay", "_started", "_upstream")

    def __init__(self, call: _Call, upstream: UpstreamResponse) -> None:
        self._call = call
        self._upstream = upstream
        self._relay = call.relay(upstream)
        self._started = False

    def __aiter__(self) -> _StreamBody:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        return await self._relay.__anext__()

    async def aclose(self) -> None:
        if self._started:
            await self._relay.aclose()
            return
        self._started = True
        await self._upstream.aclose()
        call = self._call
        call.cancelled()
        call.gateway._in_flight.dec((call.gauge_model,))
        call.finish(call.target, 499)


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
        self._client = client
        self._auth = authenticator
        self._usage = usage
        self._limiter = limiter
        self._max_attempts = settings.routing.max_attempts
        self._limits: LimitsSettings = settings.limits
        self._fail_closed = settings.limits.failure_mode == "closed"
        self.limiter_healthy = True
        self._reconciling: set[asyncio.Task[None]] = set()
        self._decisions = registry.counter(LIMITER_DECISIONS)
        self._limiter_failures = registry.counter(LIMITER_FAILURES)
        self.router = router if router is not None else Router(settings, registry=registry)
        self._targets = {
            d.name: _Target(d, Origin.parse(d.url), (m.name, d.name))
            for m in settings.models
            for d in m.deployments
        }
        self._requests = registry.counter(GATEWAY_REQUESTS)
        self._duration = registry.histogram(GATEWAY_REQUEST_DURATION)
        self._ttft = registry.histogram(GATEWAY_TTFT)
        self._tpot = registry.histogram(GATEWAY_TPOT)
        self._tokens = registry.histogram(GATEWAY_TOKENS)
        self._tokens_total = registry.counter(GATEWAY_TOKENS_TOTAL)
        self._in_flight = registry.gauge(GATEWAY_IN_FLIGHT)
        self._upstream_errors = registry.counter(GATEWAY_UPSTREAM_ERRORS)
        self._disconnects = registry.counter(GATEWAY_CLIENT_DISCONNECTS)
        created = int(time.time())
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "citadel"}
                    for m in settings.models
                    for name in (m.name, *m.aliases)
                ],
            }
        )

    # -- endpoints ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        await self._auth.authenticate(request.headers.get(b"authorization"))
        return Response(200, self._models_body)

    async def forward(self, endpoint: Endpoint, request: Request) -> Response | StreamResponse:
        started = time.perf_counter()
        wall = time.time()
        principal = await self._auth.authenticate(request.headers.get(b"authorization"))
        ctype = request.headers.get(b"content-type")
        if ctype is not None and not ctype.lower().startswith(b"application/json"):
            raise UnsupportedMedia(
                f"Unsupported content type {ctype.decode('latin-1')!r}: send application/json.",
                param="content-type",
            )
        parsed = parse_request(endpoint, request.body)
        model = self._settings.model(parsed.model)
        if model is None and parsed.model in self.router.virtual:
            model = self._specialise(endpoint, request, parsed, principal)
        if model is None:
            raise NotFound(
                f"The model `{parsed.model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if endpoint not in _SERVES[model.kind]:
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
        call = _Call(self, endpoint, request, parsed, model, principal, started, wall)
        if principal.limits is not None and self._limiter is not None:
            await self._admit(call)
        self._in_flight.inc((model.name,))
        try:
            target, upstream = await self._open(call)
        except BaseException:
            self._in_flight.dec((model.name,))
            raise
        call.target = target
        if parsed.stream:
            return StreamResponse(_StreamBody(call, upstream), headers=call.response_headers())
        try:
            return await call.whole(upstream)
        finally:
            self._in_flight.dec((model.name,))

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

    async def _admit(self, call: _Call) -> None:
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
        try:
            decision = await limiter.admit(
                call.principal.user,
                limits,
                lease_id=call.request.request_id,
                tokens=prompt + completion,
                cost_micros=cost_micros(call.model.price, prompt, completion),
                now=call.wall,
            )
        except StoreUnavailable as exc:
            self._limiter_down("admit")
            if self._fail_closed:
                raise Unavailable(
                    "Rate limits cannot be checked right now (the limiter store is unavailable) "
                    "and this gateway fails closed; retry shortly.",
                    code="limiter_unavailable",
                ) from exc
            return
        self.limiter_healthy = True
        if not decision.allowed:
            self._decisions.inc((call.principal.tier, decision.refused_by or "unknown"))
            raise RateLimited(
                refusal_message(decision, limits=limits),
                code=decision.refused_by,
                headers=tuple(ratelimit_headers(decision)),
            )
        self._decisions.inc((call.principal.tier, "allowed"))
        call.limit_decision = decision

    def _limiter_down(self, operation: str) -> None:
        self.limiter_healthy = False
        mode = "closed" if self._fail_closed else "open"
        self._limiter_failures.inc((operation, mode))
        _log.warning("limiter unavailable", extra={"operation": operation, "mode": mode})

    def _reconcile(self, call: _Call, reservation: Reservation) -> None:
        """Settle the reservation to actual usage in the background (never on the response)."""
        limiter = self._limiter
        limits = call.principal.limits
        if limiter is None or limits is None:
            return
        price = (call.target.deployment.price if call.target else None) or call.model.price
        task = asyncio.get_running_loop().create_task(
            self._settle(
                limiter,
                reservation,
                limits,
                call.prompt_tokens + call.completion_tokens,
                cost_micros(price, call.prompt_tokens, call.completion_tokens),
            )
        )
        self._reconciling.add(task)
        task.add_done_callback(self._reconciling.discard)

    async def _settle(
        self,
        limiter: Limiter,
        reservation: Reservation,
        limits: Limits,
        tokens: int,
        cost: int,
    ) -> None:
        try:
            await limiter.reconcile(
                reservation, limits, tokens=tokens, cost_micros=cost, now=time.time()
            )
        except StoreUnavailable:
            self._limiter_down("reconcile")
        except Exception:
            _log.exception("reconciliation failed")

    async def drain(self) -> None:
        """Wait for reconciliations still under way (at shutdown)."""
        if self._reconciling:
            await asyncio.wait(list(self._reconciling), timeout=5.0)

    # -- upstream ----------------------------------------------------------------------------

    async def _open(self, call: _Call) -> tuple[_Target, UpstreamResponse]:
        """The first upstream response head that is a 200, trying other deployments and then
        fallback models while the attempt limit, the retry budget and the deadline allow."""
        router = self.router
        now = time.monotonic()
        router.original_request(now)
        attempts = 0
        failure: ApiError | None = None
        chain = [call.model, *self._fallbacks(call)]
        for model in chain:
            tried: frozenset[str] = frozenset()
            while attempts < self._max_attempts:
                selection = router.select(model, tried, time.monotonic())
                if selection is None:
                    break
                if attempts and not router.may_retry(call.model.name, time.monotonic()):
                    assert failure is not None
                    router.release(selection.state, time.monotonic())
                    call.finish(None, failure.status)
                    raise failure
                attempts += 1
                state = selection.state
                target = self._targets[state.name]
                call.model = model
                router.begin(state)
                began = time.perf_counter()
                try:
                    response = await self._send(target, call)
                except _Attempt as attempt:
                    router.end(
                        state,
                        time.monotonic(),
                        success=not attempt.counts_against_upstream,
                        latency=time.perf_counter() - began,
                        error=attempt.error.message,
                    )
                    failure = attempt.error
                    if not attempt.retry or time.perf_counter() >= call.deadline:
                        call.finish(target, failure.status)
                        raise failure from attempt
                    tried |= {state.name}
                    continue
                except BaseException:
                    router.release(state, time.monotonic())
                    raise
                call.selection = state
                call.attempt_started = began
                return target, response
        if failure is None:
            failure = Unavailable(
                f"No deployment of model '{call.model.name}' can take requests now: all are "
                "drained, unhealthy or have an open circuit.",
                code="no_deployment_available",
            )
        call.finish(None, failure.status)
        raise failure

    def _fallbacks(self, call: _Call) -> list[Model]:
        """The model's fallbacks the caller may use, in order."""
        models = []
        for name in call.model.fallbacks:
            model = self._settings.model(name)
            if model is not None and call.principal.may_use(model.name, *model.aliases):
                models.append(model)
        return models

    async def _send(self, target: _Target, call: _Call) -> UpstreamResponse:
        deployment = target.deployment
        timeouts = call.model.timeouts
        headers = [(b"content-type", b"application/json"), (b"x-request-id", call.request_id)]
        if deployment.api_key:
            headers.append((b"authorization", b"Bearer " + deployment.api_key.encode()))
        for name, value in call.request.headers.items():
            if name.startswith(b"x-") and not name.startswith(_NOT_FORWARDED_PREFIXES):
                headers.append((name, value))
        body = with_upstream_fields(call.parsed, deployment.upstream_model)
        remaining = call.deadline - time.perf_counter()
        try:
            response = await self._client.request(
                "POST",
                target.origin,
                UPSTREAM_PATHS[call.endpoint],
                headers,
                body,
                connect_timeout=min(timeouts.connect, remaining),
                first_byte_timeout=min(timeouts.first_byte, remaining),
            )
        except ConnectTimeout as exc:
            self._upstream_error(target, "timeout_connect")
            raise _Attempt(
                UpstreamTimeout(
                    f"Timed out after {timeouts.connect:g} s connecting to deployment "
                    f"'{deployment.name}' of model '{call.model.name}'.",
                    code="upstream_connect_timeout",
                ),
                retry=True,
            ) from exc
        except ConnectError as exc:
            self._upstream_error(target, "connect")
            raise _Attempt(
                UpstreamError(
                    f"Could not connect to deployment '{deployment.name}' of model "
                    f"'{call.model.name}': {exc}.",
                    code="upstream_unreachable",
                ),
                retry=True,
            ) from exc
        except ReadTimeout as exc:
            total = remaining < timeouts.first_byte  # the total deadline came first
            self._upstream_error(target, "timeout_total" if total else "timeout_first_byte")
            raise _Attempt(
                UpstreamTimeout(
                    f"Deployment '{deployment.name}' of model '{call.model.name}' sent no "
                    f"response within {min(timeouts.first_byte, remaining):.3g} s"
                    + (" (the total timeout)." if total else " (the first-byte timeout)."),
                    code="upstream_total_timeout" if total else "upstream_first_byte_timeout",
                ),
                retry=not total,
            ) from exc
        except ProtocolError as exc:
            self._upstream_error(target, "malformed")
            raise _Attempt(
                UpstreamError(
                    f"Deployment '{deployment.name}' of model '{call.model.name}' broke the "
                    f"connection or sent a malformed response: {exc}.",
                    code="upstream_protocol_error",
                ),
                retry=True,
            ) from exc
        if response.status != 200:
            status = response.status
            error = await self._status_error(target, call, response)
            retryable = status >= 500 or status == 429
            raise _Attempt(error, retry=retryable, upstream_fault=retryable)
        return response

    async def _status_error(
        self, target: _Target, call: _Call, response: UpstreamResponse
    ) -> ApiError:
        status = response.status
        try:
            async with asyncio.timeout(call.model.timeouts.first_byte):
                raw = await response.read()
        except (TimeoutError, ProtocolError, ReadTimeout):
            raw = b""
        finally:
            await response.aclose()
        detail = _upstream_message(raw[:_ERROR_BODY_LIMIT])
        where = f"deployment '{target.deployment.name}' of model '{call.model.name}'"
        if status >= 500 or status == 429:
            self._upstream_error(target, "status_5xx" if status >= 500 else "status_429")
            cls: type[ApiError] = Unavailable if status in (429, 503) else UpstreamError
            return cls(
                f"The upstream {where} answered {status}: {detail}", code=f"upstream_{status}"
            )
        self._upstream_error(target, "status_4xx")
        if status in (400, 413, 422):  # the request itself was refused: the caller can fix it
            return BadRequest(f"The upstream {where} rejected the request ({status}): {detail}")
        return UpstreamError(
            f"The upstream {where} answered {status}: {detail}", code=f"upstream_{status}"
        )

    def _upstream_error(self, target: _Target, kind: str) -> None:
        self._upstream_errors.inc((*target.labels, kind))


def _upstream_message(raw: bytes) -> str:
    """The message of an upstream error body, OpenAI-shaped or not."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:500] or "(empty body)"
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(doc.get("message"), str):
            return str(doc["message"])
        if isinstance(doc.get("detail"), str):
            return str(doc["detail"])
    return raw.decode("utf-8", "replace")[:500]


class _Call:
    """The state of one forwarded request, from admission to its usage event."""

    __slots__ = (
        "attempt_started",
        "completion_tokens",
        "deadline",
        "endpoint",
        "finished",
        "first_token_at",
        "gateway",
        "gauge_model",
        "limit_decision",
        "model",
        "parsed",
        "principal",
        "prompt_tokens",
        "request",
        "request_id",
        "selection",
        "started",
        "target",
        "usage_estimated",
        "wall",
    )

    def __init__(
        self,
        gateway: Gateway,
        endpoint: Endpoint,
        request: Request,
        parsed: ParsedRequest,
        model: Model,
        principal: Principal,
        started: float,
        wall: float,
    ) -> None:
        self.gateway = gateway
        self.endpoint = endpoint
        self.request = request
        self.request_id = request.request_id.encode()
        self.parsed = parsed
        self.model = model
        self.principal = principal
        self.started = started
        self.wall = wall
        self.deadline = started + model.timeouts.total
        self.target: _Target | None = None
        self.limit_decision: LimitDecision | None = None
        self.selection: DeploymentState | None = None
        self.attempt_started = started
        self.gauge_model = model.name
        self.finished = False
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_estimated = False

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        assert self.target is not None
        headers = [
            (b"x-citadel-model", self.model.name.encode()),
            (b"x-citadel-deployment", self.target.deployment.name.encode()),
        ]
        if self.limit_decision is not None:
            headers += ratelimit_headers(self.limit_decision)
        return headers

    # -- non-streaming -----------------------------------------------------------------------

    async def whole(self, upstream: UpstreamResponse) -> Response:
        target = self.target
        assert target is not None
        gateway = self.gateway
        try:
            async with asyncio.timeout(self.deadline - time.perf_counter()):
                raw = await upstream.read()
        except TimeoutError as exc:
            gateway._upstream_error(target, "timeout_total")
            self.finish(target, 504)
            raise UpstreamTimeout(
                f"Deployment '{target.deployment.name}' of model '{self.model.name}' did not "
                f"finish within the total timeout of {self.model.timeouts.total:g} s.",
                code="upstream_total_timeout",
            ) from exc
        except (ProtocolError, ReadTimeout) as exc:
            kind = "timeout_first_byte" if isinstance(exc, ReadTimeout) else "disconnect"
            gateway._upstream_error(target, kind)
            self.finish(target, 502)
            raise UpstreamError(
                f"Deployment '{target.deployment.name}' of model '{self.model.name}' broke off "
                f"its response: {exc}.",
                code="upstream_protocol_error",
            ) from exc
        except asyncio.CancelledError:
            self.cancelled()
            self.finish(target, 499)
            raise
        finally:
            await upstream.aclose()
        try:
            doc = orjson.loads(raw)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
        except (orjson.JSONDecodeError, TypeError) as exc:
            gateway._upstream_error(target, "malformed")
            self.finish(target, 502)
            raise UpstreamError(
                f"Deployment '{target.deployment.name}' of model '{self.model.name}' sent a "
                "malformed response body (not a JSON object).",
                code="upstream_malformed_body",
            ) from exc
        self._take_usage(doc.get("usage"))
        if self.prompt_tokens == 0 and self.completion_tokens == 0:
            self._estimate_from(doc)
        if doc.get("model") != self.parsed.model:
            doc["model"] = self.parsed.model
            raw = orjson.dumps(doc)
        self.finish(target, 200)
        return Response(200, raw, self.response_headers())

    def _estimate_from(self, doc: dict[str, Any]) -> None:
        self.usage_estimated = True
        self.prompt_tokens = estimate_prompt_tokens(self.parsed)
        texts: list[str] = []
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict):
                message = choice.get("message")
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    texts.append(message["content"])
                elif isinstance(choice.get("text"), str):
                    texts.append(choice["text"])
        self.completion_tokens = sum(estimate_tokens(t) for t in texts)

    def _take_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens", 0)
            if isinstance(prompt, int) and isinstance(completion, int):
                self.prompt_tokens = prompt
                self.completion_tokens = completion

    # -- streaming ---------------------------------------------------------------------------

    async def relay(self, upstream: UpstreamResponse) -> AsyncGenerator[bytes, None]:
        """Pass SSE events through as they arrive; see the module docstring for the rules."""
        target = self.target
        assert target is not None
        gateway = self.gateway
        wants_usage = self.parsed.include_usage
        decoder = SseDecoder()
        saw_usage = False
        pieces = 0
        texts: list[str] = []
        status = 200
        delivered = False  # the [DONE] sentinel has gone to the client: the stream is complete
        chunks = upstream.__aiter__()
        try:
            while True:
                try:
                    remaining = self.deadline - time.perf_counter()
                    if remaining < self.model.timeouts.first_byte:
                        async with asyncio.timeout(remaining):
                            chunk = await chunks.__anext__()
                    else:
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                out: list[bytes] = []
                done = False
                for block in decoder.feed(chunk):
                    payload = event_data(block)
                    if payload is None:
                        out.append(block)
                        continue
                    info = inspect_chunk(payload)
                    done = done or info.is_done
                    if info.malformed:
                        raise _MalformedEventError(payload[:80].decode("utf-8", "replace"))
                    if info.usage is not None:
                        saw_usage = True
                        self._take_usage(info.usage)
                        if info.is_usage_only and not wants_usage:
                            continue
                    if info.content_pieces:
                        if self.first_token_at is None:
                            self.first_token_at = time.perf_counter()
                        pieces += info.content_pieces
                        texts.append(info.text)
                    out.append(block)
                if out:
                    yield b"".join(out)
                    delivered = delivered or done
        except (asyncio.CancelledError, GeneratorExit):
            # A client that leaves after [DONE] (while the upstream's end is still on its way)
            # got the whole stream: that is a success, not a cancellation.
            if not delivered:
                self.cancelled()
                status = 499
            raise
        except _MalformedEventError:
            status = 502
            gateway._upstream_error(target, "malformed")
            yield encode_data(
                self._stream_error(_MalformedEventError("an event was not JSON"), status)
            )
        except (TimeoutError, ReadTimeout, ProtocolError) as exc:
            status = 504 if isinstance(exc, TimeoutError | ReadTimeout) else 502
            kind = {504: "timeout_total" if isinstance(exc, TimeoutError) else "timeout_first_byte"}
            gateway._upstream_error(target, kind.get(status, "disconnect"))
            yield encode_data(self._stream_error(exc, status))
        finally:
            await upstream.aclose()
            if not saw_usage:
                self.usage_estimated = True
                self.prompt_tokens = estimate_prompt_tokens(self.parsed)
                # Upstreams stream about one token per event; count text when they bundle more.
                self.completion_tokens = max(pieces, estimate_tokens("".join(texts)))
            gateway._in_flight.dec((self.gauge_model,))
            self.finish(target, status)

    def _route_outcome(self, state: DeploymentState, status: int) -> None:
        """Tell the router how the attempt that got a response head ended."""
        router = self.gateway.router
        now = time.monotonic()
        if status == 499:
            router.release(state, now)
            return
        ended = time.perf_counter()
        latency = (
            self.first_token_at - self.attempt_started
            if self.first_token_at is not None
            else ended - self.attempt_started
        )
        router.end(state, now, success=status < 500, latency=latency, error=str(status))

    def _stream_error(self, exc: Exception, status: int) -> bytes:
        assert self.target is not None
        where = f"deployment '{self.target.deployment.name}' of model '{self.model.name}'"
        if isinstance(exc, TimeoutError):
            message = f"The stream from {where} passed the total timeout."
        elif isinstance(exc, ReadTimeout):
            message = f"The stream from {where} stalled past the first-byte timeout."
        elif isinstance(exc, _MalformedEventError):
            message = f"The stream from {where} sent a malformed event: {exc}."
        else:
            message = f"The stream from {where} broke off: {exc}."
        code = "upstream_timeout" if status == 504 else "upstream_stream_broken"
        return orjson.dumps(
            {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
        )

    # -- metering ----------------------------------------------------------------------------

    def cancelled(self) -> None:
        self.gateway._disconnects.inc((self.model.name,))

    def finish(self, target: _Target | None, status: int) -> None:
        """Record metrics, reconcile limits and emit the usage event; never raises or blocks."""
        if self.finished:
            return
        self.finished = True
        gateway = self.gateway
        if self.limit_decision is not None and self.limit_decision.reservation is not None:
            gateway._reconcile(self, self.limit_decision.reservation)
        if self.selection is not None:
            self._route_outcome(self.selection, status)
        now = time.perf_counter()
        elapsed = now - self.started
        labels = target.labels if target is not None else (self.model.name, "")
        gateway._requests.inc((self.endpoint, *labels, str(status)))
        gateway._duration.observe((self.endpoint, *labels), elapsed)
        ttft: float | None = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.started
            gateway._ttft.observe(labels, ttft)
            if self.completion_tokens > 1:
                tpot = (now - self.first_token_at) / (self.completion_tokens - 1)
                gateway._tpot.observe(labels, tpot)
        if self.prompt_tokens or self.completion_tokens:
            gateway._tokens.observe((*labels, "input"), self.prompt_tokens)
            gateway._tokens_total.inc((*labels, "input"), self.prompt_tokens)
            if self.endpoint != "embedding":
                gateway._tokens.observe((*labels, "output"), self.completion_tokens)
                gateway._tokens_total.inc((*labels, "output"), self.completion_tokens)
        sink = gateway._usage
        if sink is None or target is None:
            return
        price = target.deployment.price or self.model.price
        try:
            sink.emit(
                UsageEvent(
                    event_id=new_event_id(self.wall),
                    time=self.wall,
                    request_id=self.request.request_id,
                    user=self.principal.user,
                    team=self.principal.team,
                    key_id=self.principal.key_id,
                    tier=self.principal.tier,
                    endpoint=self.endpoint,
                    model=self.model.name,
                    deployment=target.deployment.name,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    latency_seconds=elapsed,
                    ttft_seconds=ttft,
                    status=status,
                    streamed=self.parsed.stream,
                    cancelled=status == 499,
                    usage_estimated=self.usage_estimated,
                    cost_micros=cost_micros(price, self.prompt_tokens, self.completion_tokens),
                )
            )
        except Exception:  # metering must never break a response
            _log.exception("usage sink failed")
