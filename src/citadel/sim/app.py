"""The simulator's HTTP adapter: a vLLM-like OpenAI-compatible model server on the service ``App``.

Theory of operation. Each request is validated with the gateway's own parser, planned (model,
prompt tokens, reply length, delays, faults) and then served: faults that precede the first byte
(latency, hang) are waited out in the handler; status and malformed faults answer at once; a whole
response sleeps its simulated duration once and answers; a stream sends its head at once, then its
first chunk after the time to first token and one chunk per token after that. With no delays
nothing sleeps at all, and stream chunks are formatted from pre-encoded byte templates, because the
simulator is the upstream of every benchmark and must never be the bottleneck.

A client that goes away cancels the task serving it; the request is then counted in
``citadel_sim_requests_aborted_total`` and logged, which is how the gateway's tests prove that it
cancels upstream requests whose client left. A connection cut on purpose (the ``disconnect``
fault) is not an abort.

Fault draws use a ``random.Random`` seeded from ``--fault-seed`` and owned by the app, so a run of
the same requests gets the same faults.
"""

from __future__ import annotations

import asyncio
import base64
import http
import itertools
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import orjson

from citadel.errors import BadRequest, NotFound
from citadel.http.server import AbortConnection, Request, Response, StreamResponse
from citadel.metrics import (
    SIM_ABORTED,
    SIM_E2E,
    SIM_FAULTS,
    SIM_GENERATION_TOKENS,
    SIM_PROMPT_TOKENS,
    SIM_REQUESTS,
    SIM_RUNNING,
    SIM_TPOT,
    SIM_TTFT,
    Registry,
)
from citadel.openai.requests import Endpoint, parse_request
from citadel.openai.sse import DONE
from citadel.service import App
from citadel.sim.config import SimConfig
from citadel.sim.faults import NO_FAULTS, Faults, decide, parse_milliseconds
from citadel.sim.text import (
    FIRST_PIECE_JSON,
    PIECE_JSON,
    chat_prompt_tokens,
    count_words,
    detokenize,
    embed,
    generate,
)

__all__ = ["create_app"]

_log = logging.getLogger("citadel.sim")

_HANG_SECONDS = 3600.0
_MAX_CHOICES = 128
_MAX_EMBEDDING_DIM = 65536
_TTFT_HEADER = "x-sim-ttft-ms"
_TBT_HEADER = "x-sim-tbt-ms"
_LITTLE_ENDIAN = sys.byteorder == "little"

_MALFORMED_BODY = b'{"id":"chatcmpl-malformed","object":"chat.completion","choices":[{"index":0,'
_MALFORMED_EVENT = b'data: {"id":"chatcmpl-malformed","choices":[{"delta":{"content":\n\n'


def create_app(config: SimConfig, registry: Registry | None = None) -> App:
    """The simulator as a service: /v1/models, chat, completions and embeddings."""
    app = App(name="simulator", registry=registry)
    sim = _Simulator(config, app.registry)
    app.route("GET", "/v1/models", sim.models)
    app.route("POST", "/v1/chat/completions", sim.chat)
    app.route("POST", "/v1/completions", sim.completions)
    app.route("POST", "/v1/embeddings", sim.embeddings)
    return app


class _Job:
    """One request, validated and planned."""

    __slots__ = (
        "count",
        "dimensions",
        "encoding_format",
        "endpoint",
        "faults",
        "finish",
        "include_usage",
        "labels",
        "model",
        "n",
        "prompt_tokens",
        "prompts",
        "request_id",
        "seed",
        "start",
        "stream",
        "tbt",
        "ttft",
    )

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        model: str,
        prompts: Sequence[str],
        prompt_tokens: int,
        count: int,
        finish: str,
        n: int,
        seed: int,
        stream: bool,
        include_usage: bool,
        ttft: float,
        tbt: float,
        faults: Faults,
        request_id: str,
        start: float,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.labels = (model,)
        self.prompts = prompts
        self.prompt_tokens = prompt_tokens
        self.count = count
        self.finish = finish
        self.n = n
        self.seed = seed
        self.stream = stream
        self.include_usage = include_usage
        self.ttft = ttft
        self.tbt = tbt
        self.faults = faults
        self.request_id = request_id
        self.start = start
        self.encoding_format = "float"
        self.dimensions = 0

    def choices(self) -> list[Sequence[int]]:
        """The token ids of every choice, in choice-index order (n per prompt)."""
        return [
            generate(self.seed, self.model, prompt, self.count, j)
            for prompt in self.prompts
            for j in range(self.n)
        ]


class _Simulator:
    """The handlers, and the state they share: config, metrics, fault draws, ids."""

    def __init__(self, config: SimConfig, registry: Registry) -> None:
        self._config = config
        self._models = frozenset(config.models)
        self._model_json = {m: orjson.dumps(m) for m in config.models}
        self._ttft = config.ttft_ms / 1000.0
        self._tbt = config.tbt_ms / 1000.0
        self._rng = random.Random(config.fault_seed)
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count()
        self._running = registry.gauge(SIM_RUNNING)
        self._ttft_hist = registry.histogram(SIM_TTFT)
        self._tpot_hist = registry.histogram(SIM_TPOT)
        self._e2e_hist = registry.histogram(SIM_E2E)
        self._prompt_tokens = registry.counter(SIM_PROMPT_TOKENS)
        self._generation_tokens = registry.counter(SIM_GENERATION_TOKENS)
        self._success = registry.counter(SIM_REQUESTS)
        self._aborted = registry.counter(SIM_ABORTED)
        self._faults_injected = registry.counter(SIM_FAULTS)
        for model in config.models:
            self._running.set((model,), 0.0)
        self._models_body = _models_body(config, int(time.time()))

    # -- handlers ----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return Response(200, self._models_body)

    async def chat(self, request: Request) -> Response | StreamResponse:
        return await self._serve(self._plan(request, "chat"))

    async def completions(self, request: Request) -> Response | StreamResponse:
        return await self._serve(self._plan(request, "completion"))

    async def embeddings(self, request: Request) -> Response | StreamResponse:
        return await self._serve(self._plan(request, "embedding"))

    # -- planning ----------------------------------------------------------------------------

    def _plan(self, request: Request, endpoint: Endpoint) -> _Job:
        start = time.perf_counter()
        header = request.headers.get(b"x-sim-fault")
        if header is None and not self._config.injects_faults:
            faults = NO_FAULTS
        else:
            text = None if header is None else header.decode("latin-1")
            faults = decide(self._config, text, self._rng.random)
        parsed = parse_request(endpoint, request.body)
        model = parsed.model
        if model not in self._models:
            raise NotFound(
                f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
        body = parsed.body
        config = self._config
        if endpoint == "chat":
            prompts: Sequence[str] = (parsed.prompt_text,)
            counts = [chat_prompt_tokens(parsed.prompt_text, len(body["messages"]))]
        else:
            prompts, counts = _prompts(body["prompt" if endpoint == "completion" else "input"])
        n = body.get("n") or 1
        if n > _MAX_CHOICES:
            raise BadRequest(
                f"Invalid 'n': {n} choices; the simulator makes at most {_MAX_CHOICES}.",
                param="n",
                code="invalid_value",
            )
        seed = body.get("seed")
        max_tokens = parsed.max_tokens
        count = 0 if endpoint == "embedding" else (max_tokens or config.completion_tokens)
        longest = max(counts)
        if longest + count > config.max_model_len:
            where = "messages" if endpoint == "chat" else "input" if count == 0 else "prompt"
            raise BadRequest(
                f"This model's maximum context length is {config.max_model_len} tokens. "
                f"However, you requested {longest + count} tokens ({longest} in the {where}, "
                f"{count} in the completion). Please reduce the length of the {where} "
                "or completion.",
                param=where,
                code="context_length_exceeded",
            )
        headers = request.headers
        raw = headers.get(b"x-sim-ttft-ms")
        ttft = self._ttft if raw is None else _seconds(_TTFT_HEADER, raw)
        raw = headers.get(b"x-sim-tbt-ms")
        tbt = self._tbt if raw is None else _seconds(_TBT_HEADER, raw)
        job = _Job(
            endpoint=endpoint,
            model=model,
            prompts=prompts,
            prompt_tokens=sum(counts),
            count=count,
            finish="length" if max_tokens is not None and count else "stop",
            n=n,
            seed=config.seed if seed is None else seed,
            stream=parsed.stream,
            include_usage=parsed.include_usage,
            ttft=ttft,
            tbt=tbt,
            faults=faults,
            request_id=request.request_id,
            start=start,
        )
        if endpoint == "embedding":
            _plan_embedding(job, body, config)
        return job

    # -- serving -----------------------------------------------------------------------------

    async def _serve(self, job: _Job) -> Response | StreamResponse:
        faults = job.faults
        if faults is not NO_FAULTS:
            for kind in faults.kinds:
                self._faults_injected.inc((kind,))
        labels = job.labels
        self._running.inc(labels)
        handed_to_stream = False
        try:
            if faults.latency_ms > 0:
                await asyncio.sleep(faults.latency_ms / 1000.0)
            if faults.hang:
                await asyncio.sleep(_HANG_SECONDS)
                raise AbortConnection
            if faults.status is not None:
                return Response(faults.status, _fault_body(faults.status))
            if faults.malformed:
                if job.stream:
                    return StreamResponse(_malformed_stream())
                return Response(200, _MALFORMED_BODY)
            if job.stream:
                # The stream's body now owns the running count: the server iterates it as soon
                # as this returns (a connection lost before then cancels this task instead).
                handed_to_stream = True
                return StreamResponse(self._stream(job))
            return await self._whole(job)
        except asyncio.CancelledError:
            self._abort(job, 0)
            raise
        finally:
            if not handed_to_stream:
                self._running.dec(labels)

    async def _whole(self, job: _Job) -> Response:
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
        if job.endpoint == "embedding":
            body = self._embedding_body(job)
        else:
            body = self._completion_body(job)
        e2e = time.perf_counter() - job.start
        self._finished(job, e2e - decode, e2e, count * len(job.prompts) * job.n)
        return Response(200, body)

    def _completion_body(self, job: _Job) -> bytes:
        count = job.count
        choices: list[dict[str, Any]] = []
        if job.endpoint == "chat":
            obj, prefix = "chat.completion", "chatcmpl-"
            for index, tokens in enumerate(job.choices()):
                message = {"role": "assistant", "content": detokenize(tokens)}
                choices.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": job.finish,
                    }
                )
        else:
            obj, prefix = "text_completion", "cmpl-"
            for index, tokens in enumerate(job.choices()):
                choices.append(
                    {
                        "index": index,
                        "text": detokenize(tokens),
                        "logprobs": None,
                        "finish_reason": job.finish,
                    }
                )
        completion = count * len(choices)
        return orjson.dumps(
            {
                "id": self._new_id(prefix),
                "object": obj,
                "created": int(time.time()),
                "model": job.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": job.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": job.prompt_tokens + completion,
                },
            }
        )

    def _embedding_body(self, job: _Job) -> bytes:
        data: list[dict[str, Any]] = []
        for index, text in enumerate(job.prompts):
            vector = embed(job.model, text, job.dimensions)
            if job.encoding_format == "base64":
                if not _LITTLE_ENDIAN:  # pragma: no cover - the wire format is little-endian
                    vector.byteswap()
                value: Any = base64.b64encode(vector.tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"index": index, "object": "embedding", "embedding": value})
        return orjson.dumps(
            {
                "id": self._new_id("embd-"),
                "object": "list",
                "created": int(time.time()),
                "model": job.model,
                "data": data,
                "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens},
            }
        )

    async def _stream(self, job: _Job) -> AsyncIterator[bytes]:
        """The SSE body: role chunk (chat), one chunk per token and choice, finish, usage, DONE."""
        prefix = "chatcmpl-" if job.endpoint == "chat" else "cmpl-"
        chunks = _Chunks(
            job.endpoint, self._new_id(prefix), int(time.time()), self._model_json[job.model]
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
            self._running.dec(job.labels)
            if not done:
                self._abort(job, sent)

    # -- bookkeeping -------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):016x}"

    def _finished(self, job: _Job, ttft: float, e2e: float, generated: int) -> None:
        labels = job.labels
        if job.endpoint != "embedding":
            self._ttft_hist.observe(labels, ttft)
            if job.count > 1:
                self._tpot_hist.observe(labels, (e2e - ttft) / (job.count - 1))
            self._generation_tokens.inc(labels, generated)
        self._e2e_hist.observe(labels, e2e)
        self._prompt_tokens.inc(labels, job.prompt_tokens)
        self._success.inc((job.model, job.finish))

    def _abort(self, job: _Job, tokens_sent: int) -> None:
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


class _Chunks:
    """Stream chunks of one response, formatted from byte templates (vocabulary words need no
    JSON escaping beyond what ``PIECE_JSON`` holds, and the rest is fixed)."""

    __slots__ = ("_chat", "_head")

    def __init__(self, endpoint: Endpoint, chunk_id: str, created: int, model_json: bytes) -> None:
        self._chat = endpoint == "chat"
        obj = b"chat.completion.chunk" if self._chat else b"text_completion"
        self._head = b'data: {"id":"%b","object":"%b","created":%d,"model":%b,"choices":[' % (
            chunk_id.encode(),
            obj,
            created,
            model_json,
        )

    def role(self, index: int) -> bytes:
        return self._head + (
            b'{"index":%d,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n' % index
        )

    def token(self, index: int, piece_json: bytes) -> bytes:
        if self._chat:
            body = b'{"index":%d,"delta":{"content":%b},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            body = b'{"index":%d,"text":%b,"logprobs":null,"finish_reason":null}]}\n\n'
        return self._head + body % (index, piece_json)

    def finish(self, index: int, reason: str) -> bytes:
        if self._chat:
            body = b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%b"}]}\n\n'
        else:
            body = b'{"index":%d,"text":"","logprobs":null,"finish_reason":"%b"}]}\n\n'
        return self._head + body % (index, reason.encode())

    def usage(self, prompt: int, completion: int) -> bytes:
        return self._head + (
            b'],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
            % (prompt, completion, prompt + completion)
        )


# -- helpers ------------------------------------------------------------------------------------


def _prompts(value: Any) -> tuple[Sequence[str], list[int]]:
    """The prompts of a completion ``prompt`` or embedding ``input`` (validated already), each as
    text to generate from, and their token counts (token-id prompts: one token per id)."""
    if isinstance(value, str):
        return (value,), [count_words(value)]
    first = value[0]
    if isinstance(first, str):
        return value, [count_words(text) for text in value]
    if isinstance(first, int):
        return (" ".join(map(str, value)),), [len(value)]
    return [" ".join(map(str, ids)) for ids in value], [len(ids) for ids in value]


def _plan_embedding(job: _Job, body: dict[str, Any], config: SimConfig) -> None:
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    elif encoding not in ("float", "base64"):
        raise BadRequest(
            f"Invalid value for 'encoding_format': {encoding!r}; expected 'float' or 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = config.embedding_dim
    elif type(dimensions) is not int or not 1 <= dimensions <= _MAX_EMBEDDING_DIM:
        raise BadRequest(
            f"Invalid value for 'dimensions': {dimensions!r}; expected an integer between 1 "
            f"and {_MAX_EMBEDDING_DIM}.",
            param="dimensions",
            code="invalid_value",
        )
    job.encoding_format = encoding
    job.dimensions = dimensions


def _seconds(header: str, raw: bytes) -> float:
    return parse_milliseconds(header, raw.decode("latin-1")) / 1000.0


def _fault_body(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    kind: Literal["invalid_request_error", "rate_limit_exceeded", "server_error"]
    if status == 429:
        kind = "rate_limit_exceeded"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    return orjson.dumps(
        {
            "error": {
                "message": f"Simulated fault: status {status} ({phrase}) injected on request.",
                "type": kind,
                "param": None,
                "code": "simulated_fault",
            }
        }
    )


async def _malformed_stream() -> AsyncIterator[bytes]:
    yield _MALFORMED_EVENT


def _models_body(config: SimConfig, created: int) -> bytes:
    data = [
        {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": model,
            "parent": None,
            "max_model_len": config.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{os.urandom(16).hex()}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for model in config.models
    ]
    return orjson.dumps({"object": "list", "data": data})
