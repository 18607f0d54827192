"""The OpenAI wire protocol: request parsing and validation, SSE framing, token estimates.

Pure code on bytes and plain data; the gateway's adapters do the I/O.
"""

from citadel.openai.requests import Endpoint, ParsedRequest, parse_request, with_upstream_fields
from citadel.openai.sse import (
    DONE,
    SseDecoder,
    StreamChunkInfo,
    encode_data,
    event_data,
    inspect_chunk,
)
from citadel.openai.tokens import estimate_prompt_tokens, estimate_tokens

__all__ = [
    "DONE",
    "Endpoint",
    "ParsedRequest",
    "SseDecoder",
    "StreamChunkInfo",
    "encode_data",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "event_data",
    "inspect_chunk",
    "parse_request",
    "with_upstream_fields",
]
