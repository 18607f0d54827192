"""What the simulator puts on the wire: whole response bodies, stream chunks, fault bodies and the
model list, in the shapes vLLM sends.

Stream chunks are formatted from byte templates pre-encoded once per response, not serialised per
token, because the simulator is the upstream of every benchmark and must never be the bottleneck.
"""

from __future__ import annotations

import base64
import http
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson

from citadel.openai.requests import Endpoint
from citadel.sim.config import SimConfig
from citadel.sim.job import Job
from citadel.sim.text import detokenize, embed

__all__ = [
    "ID_PREFIXES",
    "MALFORMED_BODY",
    "Chunks",
    "completion_body",
    "embedding_body",
    "fault_body",
    "malformed_stream",
    "models_body",
]

ID_PREFIXES: dict[Endpoint, str] = {
    "chat": "chatcmpl-",
    "completion": "cmpl-",
    "embedding": "embd-",
}
"""The prefix of a response id, by endpoint (the rest is unique per simulator and response)."""

MALFORMED_BODY = b'{"id":"chatcmpl-malformed","object":"chat.completion","choices":[{"index":0,'
_MALFORMED_EVENT = b'data: {"id":"chatcmpl-malformed","choices":[{"delta":{"content":\n\n'
_LITTLE_ENDIAN = sys.byteorder == "little"


def completion_body(job: Job, response_id: str) -> bytes:
    """The whole body of a chat or text completion."""
    count = job.count
    choices: list[dict[str, Any]] = []
    if job.endpoint == "chat":
        obj = "chat.completion"
        for index, tokens in enumerate(job.choices()):
            message = {"role": "assistant", "content": detokenize(tokens), "refusal": None}
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": job.finish,
                }
            )
    else:
        obj = "text_completion"
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
            "id": response_id,
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


def embedding_body(job: Job, response_id: str) -> bytes:
    """The body of an embeddings response: one vector per input, as floats or base64."""
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
            "id": response_id,
            "object": "list",
            "created": int(time.time()),
            "model": job.model,
            "data": data,
            "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens},
        }
    )


class Chunks:
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


def fault_body(status: int) -> bytes:
    """The OpenAI-style error body of an injected status fault."""
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


async def malformed_stream() -> AsyncIterator[bytes]:
    """A stream whose only event is cut off mid-JSON (the ``malformed`` fault)."""
    yield _MALFORMED_EVENT


def models_body(config: SimConfig, created: int) -> bytes:
    """The /v1/models body, with vLLM's fields."""
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
