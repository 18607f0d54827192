"""One simulator request, validated and planned: model, prompts and their token counts, reply
length, delays and faults, decided before anything is served.

Requests are validated with the gateway's own parser, so the simulator rejects what the gateway
would; the simulator adds only its own limits (choices, context length, embedding dimensions) and
the per-request delay headers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from citadel.errors import BadRequest, NotFound
from citadel.http.server import Request
from citadel.openai.requests import Endpoint, parse_request
from citadel.sim.config import SimConfig
from citadel.sim.faults import NO_FAULTS, Faults, decide, parse_milliseconds
from citadel.sim.text import chat_prompt_tokens, count_words, generate

__all__ = ["Job", "Planner"]

_MAX_CHOICES = 128
_MAX_EMBEDDING_DIM = 65536
_TTFT_HEADER = "x-sim-ttft-ms"
_TBT_HEADER = "x-sim-tbt-ms"


class Job:
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


class Planner:
    """Turns requests into jobs; owns the fault draws (seeded from ``--fault-seed``)."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._models = frozenset(config.models)
        self._ttft = config.ttft_ms / 1000.0
        self._tbt = config.tbt_ms / 1000.0
        self._rng = random.Random(config.fault_seed)

    def plan(self, request: Request, endpoint: Endpoint, raw: bytes | None = None) -> Job:
        """The job of ``request`` (``raw`` its body when given: a Responses request's chat form)."""
        start = time.perf_counter()
        header = request.headers.get(b"x-sim-fault")
        if header is None and not self._config.injects_faults:
            faults = NO_FAULTS
        else:
            text = None if header is None else header.decode("latin-1")
            faults = decide(self._config, text, self._rng.random)
        parsed = parse_request(endpoint, request.body if raw is None else raw)
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
        job = Job(
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


def _plan_embedding(job: Job, body: dict[str, Any], config: SimConfig) -> None:
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
