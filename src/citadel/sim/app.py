"""The simulator's HTTP adapter: a vLLM-like OpenAI-compatible model server on the service ``App``.

Theory of operation. Each request is validated with the gateway's own parser, planned (model,
prompt tokens, reply length, delays, faults) and then served: faults that precede the first byte
(latency, hang) are waited out in the handler; status and malformed faults answer at once; a whole
response sleeps its simulated duration once and answers; a stream sends its head at once, then its
first chunk after the time to first token and one chunk per token after that. With no delays
nothing sleeps at all, and stream chunks are formatted from pre-encoded byte templates, because the
simulator is the upstream of every benchmark and must never be the bottleneck.

``POST /v1/responses`` is served natively, as vLLM serves it: the request is validated and
translated to its chat form with the gateway's own Responses code (``citadel.openai.responses``),
planned and timed as that chat request, and answered as a ``response`` object or, streamed, as the
Responses API's typed events made from the chat chunks by the gateway's own builder
(``citadel.openai.response_stream``). The simulator stores nothing, so a ``previous_response_id``
is a 404. Its response ids are ``resp_`` and the same per-process prefix and counter as its chat
ids (``chatcmpl-<prefix><counter>``), which is how a test tells its replies from the gateway's
translations (``resp_`` and 48 random hex digits).

A client that goes away cancels the task serving it; the request is then counted in
``citadel_sim_requests_aborted_total`` and logged, which is how the gateway's tests prove that it
cancels upstream requests whose client left. A connection cut on purpose (the ``disconnect``
fault) is not an abort.

Before any of that a request is admitted by its model's ``Engine`` (``engine``): with
``--max-num-seqs`` or a full ``--kv-cache-tokens`` it waits there, counted in
``vllm:num_requests_waiting``, as vLLM's scheduler queues it.

Fault draws use a ``random.Random`` seeded from ``--fault-seed`` and owned by the app's planner, so
a run of the same requests gets the same faults. Planning is in ``job``, the bytes on the wire
(bodies and chunk templates) in ``bodies``; this module serves, streams and counts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator

import orjson

from citadel.errors import NotFound
from citadel.http.server import AbortConnection, Request, Response, StreamResponse
from citadel.metrics import (
    SIM_ABORTED,
    SIM_E2E,
    SIM_FAULTS,
    SIM_GENERATION_TOKENS,
    SIM_PROMPT_TOKENS,
    SIM_REQUESTS,
    SIM_TPOT,
    SIM_TTFT,
    Registry,
)
from citadel.openai.requests import decode_body
from citadel.openai.response_stream import ResponseStream
from citadel.openai.responses import (
    ResponsesRequest,
    parse_responses_request,
    response_from_chat,
)
from citadel.openai.sse import DONE
from citadel.service import App
from citadel.sim.bodies import (
    ID_PREFIXES,
    MALFORMED_BODY,
    Chunks,
    completion_body,
    embedding_body,
    fault_body,
    malformed_stream,
    models_body,
)
from citadel.sim.config import SimConfig
from citadel.sim.engine import Engine
from citadel.sim.faults import NO_FAULTS
from citadel.sim.job import Job, Planner
from citadel.sim.text import FIRST_PIECE_JSON, PIECE_JSON

__all__ = ["create_app"]

_log = logging.getLogger("citadel.sim")

_HANG_SECONDS = 3600.0


def create_app(config: SimConfig, registry: Registry | None = None) -> App:
    """The simulator as a service: /v1/models, chat, completions, embeddings and responses."""
    app = App(name="simulator", registry=registry)
    sim = _Simulator(config, app.registry)
    app.route("GET", "/v1/models", sim.models)
    app.route("POST", "/v1/chat/completions", sim.chat)
    app.route("POST", "/v1/completions", sim.completions)
    app.route("POST", "/v1/embeddings", sim.embeddings)
    app.route("POST", "/v1/responses", sim.responses)
    return app


def _kv_tokens(job: Job) -> int:
    """The KV cache a request holds while it runs: its prompt and, unless it embeds, every
    token of every choice it may generate."""
    if job.endpoint == "embedding":
        return job.prompt_tokens
    return job.prompt_tokens + job.count * len(job.prompts) * job.n


class _Simulator:
    """The handlers, and the state they share: the planner (and its fault draws), metrics, ids."""

    def __init__(self, config: SimConfig, registry: Registry) -> None:
        self._plan = Planner(config).plan
        self._model_json = {m: orjson.dumps(m) for m in config.models}
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count()
        self._engines = {
            model: Engine(
                model,
                max_num_seqs=config.max_num_seqs,
                kv_cache_tokens=config.kv_cache_tokens,
                registry=registry,
            )
            for model in config.models
        }
        self._ttft_hist = registry.histogram(SIM_TTFT)
        self._tpot_hist = registry.histogram(SIM_TPOT)
        self._e2e_hist = registry.histogram(SIM_E2E)
        self._prompt_tokens = registry.counter(SIM_PROMPT_TOKENS)
        self._generation_tokens = registry.counter(SIM_GENERATION_TOKENS)
        self._success = registry.counter(SIM_REQUESTS)
        self._aborted = registry.counter(SIM_ABORTED)
        self._faults_injected = registry.counter(SIM_FAULTS)
        self._models_body = models_body(config, int(time.time()))

    # -- handlers ----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return Response(200, self._models_body)

    async def chat(self, request: Request) -> Response | StreamResponse:
        return await self._serve(self._plan(request, "chat"))

    async def completions(self, request: Request) -> Response | StreamResponse:
        return await self._serve(self._plan(request, "completion"))

    async def embeddings(self, request: Request) -> Response | StreamResponse:
        return await self._serve(self._plan(request, "embedding"))

    async def responses(self, request: Request) -> Response | StreamResponse:
        """The Responses API, natively: planned as its chat form, answered in its own shapes."""
        req = parse_responses_request(decode_body(request.body))
        if req.previous_response_id is not None:
            raise NotFound(
                f"Response with id '{req.previous_response_id[:64]}' not found "
                "(the simulator stores no responses).",
                param="previous_response_id",
                code="response_not_found",
            )
        chat = req.chat
        if chat.get("stream"):
            chat["stream_options"] = {"include_usage": True}  # for response.completed's usage
        return await self._serve(self._plan(request, "chat", orjson.dumps(chat)), req)

    # -- serving -----------------------------------------------------------------------------

    async def _serve(
        self, job: Job, native: ResponsesRequest | None = None
    ) -> Response | StreamResponse:
        faults = job.faults
        if faults is not NO_FAULTS:
            for kind in faults.kinds:
                self._faults_injected.inc((kind,))
        engine, need = self._engines[job.model], _kv_tokens(job)
        if not engine.try_admit(need):
            try:
                await engine.admit(need)  # queued behind --max-num-seqs or a full KV cache
            except asyncio.CancelledError:
                self._abort(job, 0)
                raise
        handed_to_stream = False
        try:
            if faults.latency_ms > 0:
                await asyncio.sleep(faults.latency_ms / 1000.0)
            if faults.hang:
                await asyncio.sleep(_HANG_SECONDS)
                raise AbortConnection
            if faults.status is not None:
                # An overloaded server says when to come back, as OpenAI and vLLM do.
                after = [(b"retry-after", b"1")] if faults.status == 429 else []
                return Response(faults.status, fault_body(faults.status), after)
            if faults.malformed:
                if job.stream:
                    return StreamResponse(malformed_stream())
                return Response(200, MALFORMED_BODY)
            if job.stream:
                # The stream's body now owns the running count: the server iterates it as soon
                # as this returns (a connection lost before then cancels this task instead).
                handed_to_stream = True
                if native is not None:
                    return StreamResponse(self._response_events(job, native))
                return StreamResponse(self._stream(job))
            reply = await self._whole(job)
            if native is not None:
                doc = response_from_chat(
                    native,
                    orjson.loads(reply.body),
                    response_id=self._new_id("resp_"),
                    created_at=int(time.time()),
                )
                reply.body = orjson.dumps(doc)
            return reply
        except asyncio.CancelledError:
            self._abort(job, 0)
            raise
        finally:
            if not handed_to_stream:
                engine.release(need)

    async def _whole(self, job: Job) -> Response:
        """Sleep the whole simulated duration at once, then answer."""
        count = job.count
        cut = job.faults.disconnect_after
        if cut is not None:
            tokens = min(cut, count)
            delay = job.ttft + job.tbt * max(tokens - 1, 0)
            if delay > 0:
                await asyncio.sleep(delay)
            raise AbortConnection
        decode = job.tbt * (count - 1) if count > 1 else 0.0
        delay = job.ttft + decode
        if delay > 0:
            await asyncio.sleep(delay)
        response_id = self._new_id(ID_PREFIXES[job.endpoint])
        if job.endpoint == "embedding":
            body = embedding_body(job, response_id)
        else:
            body = completion_body(job, response_id)
        e2e = time.perf_counter() - job.start
        self._finished(job, e2e - decode, e2e, count * len(job.prompts) * job.n)
        return Response(200, body)

    async def _stream(self, job: Job) -> AsyncGenerator[bytes, None]:
        """The SSE body: role chunk (chat), one chunk per token and choice, finish, usage, DONE."""
        chunks = Chunks(
            job.endpoint,
            self._new_id(ID_PREFIXES[job.endpoint]),
            int(time.time()),
            self._model_json[job.model],
        )
        choices = job.choices()
        count, ttft, tbt = job.count, job.ttft, job.tbt
        cut = job.faults.disconnect_after
        if cut is not None:
            cut = min(cut, count)
        clock = time.perf_counter
        sent = 0
        first_token_at = 0.0
        done = False
        try:
            base = clock()
            if ttft > 0:
                await asyncio.sleep(ttft)
            if job.endpoint == "chat":
                for index in range(len(choices)):
                    yield chunks.role(index)
            pieces = FIRST_PIECE_JSON
            for i in range(count):
                if i == cut:
                    done = True
                    raise AbortConnection
                if i and tbt > 0:
                    wait = base + ttft + i * tbt - clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                for index, tokens in enumerate(choices):
                    yield chunks.token(index, pieces[tokens[i]])
                if not i:
                    first_token_at = clock()
                    pieces = PIECE_JSON
                sent = i + 1
            if cut is not None:  # asked to cut after the last token: before the finish chunk
                done = True
                raise AbortConnection
            for index in range(len(choices)):
                yield chunks.finish(index, job.finish)
            if job.include_usage:
                completion = count * len(choices)
                yield chunks.usage(job.prompt_tokens, completion)
            yield DONE
            if job.faults.linger_ms > 0:
                await asyncio.sleep(job.faults.linger_ms / 1000.0)
            done = True
            end = clock()
            ttft_seen = (first_token_at or end) - job.start
            self._finished(job, ttft_seen, end - job.start, count * len(choices))
        finally:
            self._engines[job.model].release(_kv_tokens(job))
            if not done:
                self._abort(job, sent)

    async def _response_events(self, job: Job, req: ResponsesRequest) -> AsyncIterator[bytes]:
        """A Responses stream: ``response.created`` at once, then the chat stream's chunks (same
        timing, faults and metrics) as the typed events, ending with ``response.completed``."""
        events = ResponseStream(req, response_id=self._new_id("resp_"), created_at=int(time.time()))
        chunks = self._stream(job)
        started = False
        try:
            yield events.start()
            started = True
            async for chunk in chunks:
                out = events.finish() if chunk == DONE else events.feed(orjson.loads(chunk[6:-2]))
                if out:  # the role, finish and usage chunks make no event of their own
                    yield out
        finally:
            if started:
                await chunks.aclose()
            else:  # the chat stream never ran: its bookkeeping is done here
                self._engines[job.model].release(_kv_tokens(job))
                self._abort(job, 0)

    # -- bookkeeping -------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):016x}"

    def _finished(self, job: Job, ttft: float, e2e: float, generated: int) -> None:
        labels = job.labels
        if job.endpoint != "embedding":
            self._ttft_hist.observe(labels, ttft)
            if job.count > 1:
                self._tpot_hist.observe(labels, (e2e - ttft) / (job.count - 1))
            self._generation_tokens.inc(labels, generated)
        self._e2e_hist.observe(labels, e2e)
        self._prompt_tokens.inc(labels, job.prompt_tokens)
        self._success.inc((job.model, job.finish))

    def _abort(self, job: Job, tokens_sent: int) -> None:
        self._aborted.inc(job.labels)
        _log.info(
            "request aborted by client",
            extra={
                "model": job.model,
                "endpoint": job.endpoint,
                "request_id": job.request_id,
                "tokens_sent": tokens_sent,
                "elapsed_seconds": round(time.perf_counter() - job.start, 6),
            },
        )
