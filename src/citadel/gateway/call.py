"""One forwarded request's life, from admission to its usage event: ``Call``, its one owner.

``Call.serve`` runs the request once it is admitted: it opens the upstream response
(``citadel.gateway.upstream``), then relays the body whole or as an SSE stream. Whatever ends the
request — done, failed upstream, a bug, the client gone before the first byte or mid-stream, a
cancellation — ``Call.finish`` runs exactly once: it frees the router's slot (or tells the router
how the attempt went), has the limiter settle the reservation to actual usage (which returns the
concurrency lease), records the metrics and emits one usage event (status 499 when the client
went away first). ``serve`` owns that until it hands a stream to the server; the stream body
(``StreamBody``) owns it from then on, including when the server closes it unstarted.

Non-streaming requests have their body relayed whole. Streaming requests ask the upstream for usage
(``stream_options.include_usage``, see ``citadel.openai.requests``), relay every SSE event as it
arrives, drop the usage event when the client did not ask for it, and count tokens themselves when
the stream ends without one. A client that goes away cancels the task serving it (see
``citadel.http.server``): the upstream response is then closed, which closes its connection and
stops the generation upstream.

A Responses request passed through to a deployment that speaks the Responses API
(``citadel.gateway.passthrough``) is relayed the same way, by ``relay_responses``: its typed events
pass as they arrive (model renamed), usage comes from the final event's ``response``, and a
failure mid-stream ends it with the Responses API's ``error`` and ``response.failed`` events.

Once a stream has started, a failure (the total timeout, a stall past the first-byte timeout, a
broken connection, an event that is not JSON) ends it with an SSE error event rather than a silent
cut; a failure before any byte reached the client is a 502 or a 504.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from citadel.accounts.auth import Principal
from citadel.errors import ApiError, UpstreamError, UpstreamTimeout
from citadel.gateway.meter import Meter, Target
from citadel.gateway.passthrough import (
    Passthrough,
    ResponseEvents,
    output_text,
    response_usage_tokens,
)
from citadel.gateway.upstream import Upstream
from citadel.http.client import ProtocolError, ReadTimeout, UpstreamResponse
from citadel.http.server import Request, Response, StreamResponse
from citadel.limits.decision import LimitDecision
from citadel.limits.policy import cost_micros, ratelimit_headers
from citadel.metering.events import UsageEvent, new_event_id
from citadel.openai.requests import Endpoint, ParsedRequest
from citadel.openai.sse import (
    CHUNK_DONE,
    CHUNK_ERROR,
    CHUNK_MALFORMED,
    CHUNK_USAGE_ONLY,
    SseDecoder,
    encode_data,
    event_data,
    read_chunk,
)
from citadel.openai.tokens import estimate_prompt_tokens, estimate_tokens
from citadel.routing.router import DeploymentState
from citadel.settings import Model

_log = logging.getLogger("citadel.gateway")

CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before the response ended
# The usage event's reason when the client left first, and when a bug ended the request.
CLIENT_CLOSED_REASON = "client_closed"
INTERNAL_ERROR_REASON = "internal_error"


def error_reason(exc: ApiError) -> str:
    """The reason a usage event gives for a request that ended in ``exc``: its error code."""
    return exc.code or exc.type


def _model_renames(upstream: str, asked: str) -> tuple[tuple[bytes, bytes], ...]:
    """The byte replacements that rename the model in a chunk (both common JSON spacings)."""
    if upstream == asked:
        return ()
    old, new = orjson.dumps(upstream), orjson.dumps(asked)
    return ((b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new))


class _MalformedEventError(Exception):
    """An upstream SSE event that is not JSON."""


class Call:
    """The state of one forwarded request, from admission to its usage event."""

    __slots__ = (
        "attempt_started",
        "completion_tokens",
        "deadline",
        "endpoint",
        "finished",
        "first_token_at",
        "gauge_model",
        "label",
        "limit_decision",
        "meter",
        "model",
        "parsed",
        "passthrough",
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
        meter: Meter,
        endpoint: Endpoint,
        request: Request,
        parsed: ParsedRequest,
        model: Model,
        principal: Principal,
        started: float,
        wall: float,
        label: str | None = None,
        passthrough: Passthrough | None = None,
    ) -> None:
        self.meter = meter
        self.endpoint = endpoint
        # what metrics and the ledger call the endpoint: the Responses API is served by the chat
        # path upstream but counted as "responses"
        self.label = label or endpoint
        self.request = request
        self.request_id = request.request_id.encode()
        self.parsed = parsed
        # a Responses request, for the deployments that speak the Responses API (None: any other)
        self.passthrough = passthrough
        self.model = model
        self.principal = principal
        self.started = started
        self.wall = wall
        self.deadline = started + model.timeouts.total
        self.target: Target | None = None
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

    # -- the one owner ---------------------------------------------------------------------

    async def serve(self, upstream: Upstream) -> Response | StreamResponse:
        """Open the upstream response and relay it; settle the call whatever ends it."""
        meter = self.meter
        meter.in_flight.inc((self.gauge_model,))
        streaming = False
        try:
            target, response = await upstream.open(self)
            native = False
            passthrough = self.passthrough
            if passthrough is not None and target.deployment.responses:
                native = passthrough.served = True
            if self.parsed.stream:
                streaming = True  # from here the stream body owns the end (StreamBody)
                return StreamResponse(
                    StreamBody(self, response, native=native), headers=self.response_headers()
                )
            return await self.whole(response, native=native)
        except asyncio.CancelledError:
            self.cancelled()
            self.finish(self.target, CLIENT_CLOSED, CLIENT_CLOSED_REASON)
            raise
        except ApiError as exc:
            self.finish(self.target, exc.status, error_reason(exc))
            raise
        except BaseException:
            self.finish(self.target, 500, INTERNAL_ERROR_REASON)
            raise
        finally:
            if not streaming:
                meter.in_flight.dec((self.gauge_model,))

    # -- non-streaming -----------------------------------------------------------------------

    async def whole(self, upstream: UpstreamResponse, *, native: bool = False) -> Response:
        """Relay a whole body (``native``: a Responses API ``response`` object)."""
        target = self.target
        assert target is not None
        meter = self.meter
        try:
            if upstream.complete:  # the usual small body came with the head: no timer needed
                raw = await upstream.read()
            else:
                async with asyncio.timeout(self.deadline - time.perf_counter()):
                    raw = await upstream.read()
        except TimeoutError as exc:
            meter.count_error(target, "timeout_total")
            raise UpstreamTimeout(
                f"Deployment '{target.deployment.name}' of model '{self.model.name}' did not "
                f"finish within the total timeout of {self.model.timeouts.total:g} s.",
                code="upstream_total_timeout",
            ) from exc
        except (ProtocolError, ReadTimeout) as exc:
            kind = "timeout_first_byte" if isinstance(exc, ReadTimeout) else "disconnect"
            meter.count_error(target, kind)
            raise UpstreamError(
                f"Deployment '{target.deployment.name}' of model '{self.model.name}' broke off "
                "its response.",
                code="upstream_protocol_error",
            ) from exc
        finally:
            await upstream.aclose()
        try:
            doc = orjson.loads(raw)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
        except (orjson.JSONDecodeError, TypeError) as exc:
            meter.count_error(target, "malformed")
            raise UpstreamError(
                f"Deployment '{target.deployment.name}' of model '{self.model.name}' sent a "
                "malformed response body (not a JSON object).",
                code="upstream_malformed_body",
            ) from exc
        if native:
            tokens = response_usage_tokens(doc.get("usage"))
            if tokens is not None:
                self.prompt_tokens, self.completion_tokens = tokens
        else:
            self._take_usage(doc.get("usage"))
        if self.prompt_tokens == 0 and self.completion_tokens == 0:
            self._estimate_from(doc)
        named = self.reply_model()
        if doc.get("model") != named:
            doc["model"] = named
            raw = orjson.dumps(doc)
        self.finish(target, 200)
        return Response(200, raw, self.response_headers())

    def reply_model(self) -> str:
        """The model a reply names: the one the client asked for (a name or alias), or for a
        virtual name (``auto``) the model that served it, as OpenAI names the snapshot that
        served an alias."""
        asked = self.parsed.model
        if asked == self.model.name or asked in self.model.aliases:
            return asked
        return self.model.name

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
        if "output" in doc:  # a Responses API response object
            texts.append(output_text(doc["output"]))
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
        meter = self.meter
        wants_usage = self.parsed.include_usage
        decoder = SseDecoder()
        # Chunks name the model as whole replies do (``whole``, ``reply_model``).
        renames = _model_renames(target.deployment.upstream_model, self.reply_model())
        saw_usage = False
        pieces = 0
        texts: list[str] = []
        status = 200
        reason = ""
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
                    read, usage, found, text = read_chunk(payload)
                    if read == CHUNK_DONE:
                        done = True
                    elif read == CHUNK_MALFORMED:
                        raise _MalformedEventError(payload[:80].decode("utf-8", "replace"))
                    elif usage is not None and read != CHUNK_ERROR:
                        saw_usage = True
                        self._take_usage(usage)
                        if read == CHUNK_USAGE_ONLY and not wants_usage:
                            continue
                    if found:
                        if self.first_token_at is None:
                            self.first_token_at = time.perf_counter()
                        pieces += found
                        texts.append(text)
                    for old, new in renames:
                        block = block.replace(old, new, 1)
                    out.append(block)
                if out:
                    yield b"".join(out)
                    delivered = delivered or done
        except (asyncio.CancelledError, GeneratorExit):
            # A client that leaves after [DONE] (while the upstream's end is still on its way)
            # got the whole stream: that is a success, not a cancellation.
            if not delivered:
                self.cancelled()
                status, reason = CLIENT_CLOSED, CLIENT_CLOSED_REASON
            raise
        except _MalformedEventError:
            status, reason = 502, "upstream_stream_broken"
            meter.count_error(target, "malformed")
            yield encode_data(
                self._stream_error(_MalformedEventError("an event was not JSON"), status)
            )
        except (TimeoutError, ReadTimeout, ProtocolError) as exc:
            status = 504 if isinstance(exc, TimeoutError | ReadTimeout) else 502
            reason = "upstream_timeout" if status == 504 else "upstream_stream_broken"
            kind = {504: "timeout_total" if isinstance(exc, TimeoutError) else "timeout_first_byte"}
            meter.count_error(target, kind.get(status, "disconnect"))
            yield encode_data(self._stream_error(exc, status))
        except Exception:
            # A bug: the stream breaks off (the server logs it), the call still ends.
            status, reason = 500, INTERNAL_ERROR_REASON
            raise
        finally:
            try:
                await upstream.aclose()
            finally:
                if not saw_usage:
                    self.usage_estimated = True
                    self.prompt_tokens = estimate_prompt_tokens(self.parsed)
                    # Upstreams stream about one token per event; count text when they bundle more.
                    self.completion_tokens = max(pieces, estimate_tokens("".join(texts)))
                meter.in_flight.dec((self.gauge_model,))
                self.finish(target, status, reason)

    def _stream_error(self, exc: Exception, status: int) -> bytes:
        message, code = self._stream_failure(exc, status)
        return orjson.dumps(
            {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
        )

    def _stream_failure(self, exc: Exception, status: int) -> tuple[str, str]:
        """The message and code a stream broken off by ``exc`` ends with."""
        assert self.target is not None
        where = f"deployment '{self.target.deployment.name}' of model '{self.model.name}'"
        if isinstance(exc, TimeoutError):
            message = f"The stream from {where} passed the total timeout."
        elif isinstance(exc, ReadTimeout):
            message = f"The stream from {where} stalled past the first-byte timeout."
        elif isinstance(exc, _MalformedEventError):
            message = f"The stream from {where} sent a malformed event: {exc}."
        else:
            message = f"The stream from {where} broke off."
            _log.warning("upstream stream broke off", extra={"where": where, "detail": str(exc)})
        code = "upstream_timeout" if status == 504 else "upstream_stream_broken"
        return message, code

    async def relay_responses(self, upstream: UpstreamResponse) -> AsyncGenerator[bytes, None]:
        """Pass a Responses API stream through as ``relay`` passes a chat stream (the module
        docstring), reading the deltas and the final event (``ResponseEvents``)."""
        target = self.target
        assert target is not None
        passthrough = self.passthrough
        assert passthrough is not None
        meter = self.meter
        decoder = SseDecoder()
        renames = _model_renames(target.deployment.upstream_model, self.parsed.model)
        events = ResponseEvents()
        status = 200
        reason = ""
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
                for block in decoder.feed(chunk):
                    payload = event_data(block)
                    if payload is not None and payload != b"[DONE]":
                        try:
                            event = orjson.loads(payload)
                        except orjson.JSONDecodeError:
                            event = None
                        if not isinstance(event, dict):
                            raise _MalformedEventError(payload[:80].decode("utf-8", "replace"))
                        if events.read(event) and self.first_token_at is None:
                            self.first_token_at = time.perf_counter()
                    for old, new in renames:
                        block = block.replace(old, new, 1)
                    out.append(block)
                if out:
                    yield b"".join(out)
            if events.final is None:  # the upstream ended the stream without its final event
                raise ProtocolError("the stream ended before its final event")
        except (asyncio.CancelledError, GeneratorExit):
            # A client that leaves after the final event got the whole stream: a success.
            if events.final is None:
                self.cancelled()
                status, reason = CLIENT_CLOSED, CLIENT_CLOSED_REASON
            raise
        except (_MalformedEventError, TimeoutError, ReadTimeout, ProtocolError) as exc:
            status = 504 if isinstance(exc, TimeoutError | ReadTimeout) else 502
            reason = "upstream_timeout" if status == 504 else "upstream_stream_broken"
            if isinstance(exc, _MalformedEventError):
                kind = "malformed"
                exc = _MalformedEventError("an event was not JSON")
            elif status == 504:
                kind = "timeout_total" if isinstance(exc, TimeoutError) else "timeout_first_byte"
            else:
                kind = "disconnect"
            meter.count_error(target, kind)
            yield events.fail(*self._stream_failure(exc, status))
        except Exception:
            status, reason = 500, INTERNAL_ERROR_REASON  # a bug: the stream breaks off
            raise
        finally:
            try:
                await upstream.aclose()
            finally:
                response = events.snapshot if events.final is not None else None
                tokens = response_usage_tokens(response.get("usage")) if response else None
                if tokens is not None:
                    self.prompt_tokens, self.completion_tokens = tokens
                else:
                    self.usage_estimated = True
                    self.prompt_tokens = estimate_prompt_tokens(self.parsed)
                    self.completion_tokens = max(
                        events.pieces, estimate_tokens("".join(events.texts))
                    )
                if response is not None:
                    if response.get("model") != self.parsed.model:
                        response["model"] = self.parsed.model
                    passthrough.response = response
                    if events.final == "response.failed" and status == 200:
                        status, reason = 502, "upstream_response_failed"
                meter.in_flight.dec((self.gauge_model,))
                self.finish(target, status, reason)

    # -- metering ----------------------------------------------------------------------------

    def cancelled(self) -> None:
        self.meter.disconnects.inc((self.model.name,))

    def finish(self, target: Target | None, status: int, reason: str = "") -> None:
        """Free the router slot, settle the limits, record metrics and emit the usage event
        (``reason``: why it was not served, "" when it was).

        Runs once per call (later calls do nothing); never raises or blocks.
        """
        if self.finished:
            return
        self.finished = True
        meter = self.meter
        now = time.perf_counter()
        price = (target.deployment.price if target is not None else None) or self.model.price
        cost = cost_micros(price, self.prompt_tokens, self.completion_tokens)
        decision = self.limit_decision
        limits = self.principal.limits
        if decision is not None and decision.reservation is not None and limits is not None:
            meter.settle(
                decision.reservation,
                limits,
                tokens=self.prompt_tokens + self.completion_tokens,
                cost=cost,
            )
        if self.selection is not None:
            start = self.attempt_started
            latency = (self.first_token_at if self.first_token_at is not None else now) - start
            meter.route_outcome(self.selection, status=status, latency=latency)
        elapsed = now - self.started
        labels = target.labels if target is not None else (self.model.name, "")
        meter.requests.inc((self.label, *labels, str(status)))
        meter.duration.observe((self.label, *labels), elapsed)
        ttft: float | None = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.started
            meter.ttft.observe(labels, ttft)
            if self.completion_tokens > 1:
                tpot = (now - self.first_token_at) / (self.completion_tokens - 1)
                meter.tpot.observe(labels, tpot)
        if self.prompt_tokens or self.completion_tokens:
            meter.tokens.observe((*labels, "input"), self.prompt_tokens)
            meter.tokens_total.inc((*labels, "input"), self.prompt_tokens)
            if self.endpoint != "embedding":
                meter.tokens.observe((*labels, "output"), self.completion_tokens)
                meter.tokens_total.inc((*labels, "output"), self.completion_tokens)
        if meter.usage is None:
            return
        meter.emit(
            UsageEvent(
                event_id=new_event_id(self.wall),
                time=self.wall,
                request_id=self.request.request_id,
                user=self.principal.user,
                team=self.principal.team,
                key_id=self.principal.key_id,
                tier=self.principal.tier,
                endpoint=self.label,
                model=self.model.name,
                deployment=target.deployment.name if target is not None else "",
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                latency_seconds=elapsed,
                ttft_seconds=ttft,
                status=status,
                streamed=self.parsed.stream,
                cancelled=status == CLIENT_CLOSED,
                usage_estimated=self.usage_estimated,
                cost_micros=cost,
                reason=reason,
            )
        )


class StreamBody:
    """The relay as a stream body that cleans up even when it is closed before it started.

    An async generator closed before its first step never runs its ``finally``; the server closes
    a body it will not send (the client left first), and the upstream must be released then too.
    """

    __slots__ = ("_call", "_relay", "_started", "_upstream")

    def __init__(self, call: Call, upstream: UpstreamResponse, *, native: bool = False) -> None:
        self._call = call
        self._upstream = upstream
        self._relay = call.relay_responses(upstream) if native else call.relay(upstream)
        self._started = False

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        return await self._relay.__anext__()

    async def aclose(self) -> None:
        if self._started:
            await self._relay.aclose()
            return
        self._started = True
        call = self._call
        try:
            await self._upstream.aclose()
        finally:
            call.cancelled()
            call.meter.in_flight.dec((call.gauge_model,))
            call.finish(call.target, CLIENT_CLOSED, CLIENT_CLOSED_REASON)
