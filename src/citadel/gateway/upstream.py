"""Upstream attempts: the first 200 response head from a deployment of the model or its fallbacks.

Timeouts: ``connect`` bounds opening a connection, ``first_byte`` bounds the wait for the response
head (and any one stall of the body), ``total`` bounds the whole request. Each is a 504 when it
fires before the response started (what happens once it has started is ``citadel.gateway.call``'s).

A connection failure (nothing was sent) is retried on another deployment of the model, if any; so
are a 5xx and a 429. When the model has none left, its fallback models the caller may use are tried
in order, while the attempt limit, the router's retry budget and the deadline allow. A refusal of
the request itself (a 4xx) is not retried: another deployment would refuse it too.

``Upstream.open`` never ends the request: it raises the failure with ``call.target`` set to the
deployment that failed last (None when none was tried), and the call's owner
(``citadel.gateway.call.Call.serve``) settles it. Any exception other than the failures it raises
(a cancellation included) frees the router slot of the attempt under way before it propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from citadel.accounts.auth import Principal
from citadel.errors import ApiError, Unavailable, UpstreamError, UpstreamRefusal, UpstreamTimeout
from citadel.gateway.meter import Meter, Target
from citadel.gateway.passthrough import Passthrough
from citadel.http.client import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    Origin,
    ProtocolError,
    ReadTimeout,
    UpstreamResponse,
)
from citadel.http.server import Request
from citadel.openai.requests import Endpoint, ParsedRequest, with_upstream_fields
from citadel.openai.upstream_errors import read_upstream_error
from citadel.routing.router import DeploymentState
from citadel.settings import Model, Settings

UPSTREAM_PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}
# Where a Responses request goes on a deployment that speaks the Responses API (``responses``).
RESPONSES_UPSTREAM_PATH = "/v1/responses"
# Headers the gateway sets itself or that describe the hop; all other x-* headers pass through.
_NOT_FORWARDED_PREFIXES = (b"x-citadel-", b"x-forwarded-", b"x-request-id", b"x-real-ip")
_ERROR_BODY_LIMIT = 64 * 1024
# Upstream statuses passed to the client whole: the request itself was refused (the client can
# fix it) or the server is at capacity (the client may wait). Other 4xx (401, 403, 404) are the
# gateway's configuration at fault, not the client's: a 502.
_REFUSALS = frozenset({400, 413, 422, 429})
_log = logging.getLogger("citadel.gateway")


class Forwarded(Protocol):
    """What the attempts read of a request and record on it (``citadel.gateway.call.Call``)."""

    endpoint: Endpoint
    request: Request
    request_id: bytes
    parsed: ParsedRequest
    passthrough: Passthrough | None  # a Responses request, for deployments that speak the API
    principal: Principal
    deadline: float
    model: Model  # set to the fallback model being tried
    target: Target | None  # the deployment tried last
    selection: DeploymentState | None  # the router slot of the attempt that answered
    attempt_started: float


class _Attempt(Exception):
    """A failure before any byte reached the client; ``retry`` says another deployment may try."""

    def __init__(self, error: ApiError, *, retry: bool, upstream_fault: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry
        # False when the upstream did its job (e.g. it rejected the caller's bad request).
        self.counts_against_upstream = upstream_fault


class Upstream:
    """Opens a request's upstream response through the router, and counts upstream errors."""

    def __init__(self, settings: Settings, *, client: HttpClient, meter: Meter) -> None:
        self._settings = settings
        self._client = client
        self._router = meter.router
        self._meter = meter
        self._max_attempts = settings.routing.max_attempts
        self._targets = {
            d.name: Target(d, Origin.parse(d.url), (m.name, d.name))
            for m in settings.models
            for d in m.deployments
        }

    async def open(self, call: Forwarded) -> tuple[Target, UpstreamResponse]:
        """The first upstream response head that is a 200, trying other deployments and then
        fallback models while the attempt limit, the retry budget and the deadline allow."""
        router = self._router
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
                    raise failure  # call.target: the deployment that failed last
                attempts += 1
                state = selection.state
                target = self._targets[state.name]
                call.model = model
                call.target = target
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
                        raise failure from attempt
                    tried |= {state.name}
                    continue
                except BaseException:
                    router.release(state, time.monotonic())
                    raise
                call.selection = state
                call.attempt_started = began
                return target, response
        if failure is None:  # no deployment was tried: none is named (metrics, ledger)
            call.target = None
            raise Unavailable(
                f"No deployment of model '{call.model.name}' can take requests now: all are "
                "drained, unhealthy or have an open circuit.",
                code="no_deployment_available",
            )
        raise failure  # call.target: the deployment that failed last

    def _fallbacks(self, call: Forwarded) -> list[Model]:
        """The model's fallbacks the caller may use, in order."""
        models = []
        for name in call.model.fallbacks:
            model = self._settings.model(name)
            if model is not None and call.principal.may_use(model.name, *model.aliases):
                models.append(model)
        return models

    async def _send(self, target: Target, call: Forwarded) -> UpstreamResponse:
        deployment = target.deployment
        timeouts = call.model.timeouts
        headers = [(b"content-type", b"application/json"), (b"x-request-id", call.request_id)]
        if deployment.api_key:
            headers.append((b"authorization", b"Bearer " + deployment.api_key.encode()))
        for name, value in call.request.headers.items():
            if name.startswith(b"x-") and not name.startswith(_NOT_FORWARDED_PREFIXES):
                headers.append((name, value))
        passthrough = call.passthrough
        if passthrough is not None and deployment.responses:  # forwarded as-is (passthrough)
            path = RESPONSES_UPSTREAM_PATH
            body = passthrough.upstream_body(deployment.upstream_model)
        else:
            path = UPSTREAM_PATHS[call.endpoint]
            body = with_upstream_fields(call.parsed, deployment.upstream_model)
        remaining = call.deadline - time.perf_counter()
        try:
            response = await self._client.request(
                "POST",
                target.origin,
                path,
                headers,
                body,
                connect_timeout=min(timeouts.connect, remaining),
                first_byte_timeout=min(timeouts.first_byte, remaining),
            )
        except ConnectTimeout as exc:
            self._meter.count_error(target, "timeout_connect")
            raise _Attempt(
                UpstreamTimeout(
                    f"Timed out after {timeouts.connect:g} s connecting to deployment "
                    f"'{deployment.name}' of model '{call.model.name}'.",
                    code="upstream_connect_timeout",
                ),
                retry=True,
            ) from exc
        except ConnectError as exc:
            self._meter.count_error(target, "connect")
            _log.warning(
                "upstream unreachable", extra={"deployment": deployment.name, "detail": str(exc)}
            )
            raise _Attempt(
                UpstreamError(
                    f"Could not connect to deployment '{deployment.name}' of model "
                    f"'{call.model.name}'.",
                    code="upstream_unreachable",
                ),
                retry=True,
            ) from exc
        except ReadTimeout as exc:
            total = remaining < timeouts.first_byte  # the total deadline came first
            self._meter.count_error(target, "timeout_total" if total else "timeout_first_byte")
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
            self._meter.count_error(target, "malformed")
            _log.warning(
                "upstream protocol error", extra={"deployment": deployment.name, "detail": str(exc)}
            )
            raise _Attempt(
                UpstreamError(
                    f"Deployment '{deployment.name}' of model '{call.model.name}' broke the "
                    "connection or sent a malformed response.",
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
        self, target: Target, call: Forwarded, response: UpstreamResponse
    ) -> ApiError:
        status = response.status
        try:
            async with asyncio.timeout(call.model.timeouts.first_byte):
                raw = await response.read()
        except (TimeoutError, ProtocolError, ReadTimeout):
            raw = b""
        finally:
            await response.aclose()
        fields = read_upstream_error(status, raw[:_ERROR_BODY_LIMIT])
        deployment = target.deployment.name
        if status in _REFUSALS:
            # The request itself was refused (or the server is at capacity): the client gets the
            # server's own answer, so it can react as it would to OpenAI (trim a prompt that is
            # too long, wait for Retry-After); which deployment answered is a header and a log line.
            self._meter.count_error(target, "status_429" if status == 429 else "status_4xx")
            _log.info(
                "upstream refused the request",
                extra={"deployment": deployment, "status": status, "code": fields.code},
            )
            headers = [(b"x-citadel-deployment", deployment.encode())]
            retry_after = response.header(b"retry-after")
            if status == 429 and retry_after is not None:
                headers.append((b"retry-after", retry_after))
            return UpstreamRefusal(
                status,
                fields.message,
                kind=fields.type,
                param=fields.param,
                code=fields.code,
                headers=tuple(headers),
            )
        where = f"deployment '{deployment}' of model '{call.model.name}'"
        detail = fields.message
        if status >= 500:
            self._meter.count_error(target, "status_5xx")
            cls: type[ApiError] = Unavailable if status == 503 else UpstreamError
            return cls(
                f"The upstream {where} answered {status}: {detail}", code=f"upstream_{status}"
            )
        self._meter.count_error(target, "status_4xx")
        return UpstreamError(
            f"The upstream {where} answered {status}: {detail}", code=f"upstream_{status}"
        )
