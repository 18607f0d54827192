"""Running one OpenAI request through the gateway in-process, and reading its SSE output."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from citadel.gateway.proxy import Gateway
from citadel.gateway.upstream import UPSTREAM_PATHS
from citadel.http.server import Request, Response, StreamResponse
from citadel.openai.requests import Endpoint

__all__ = ["call_gateway", "close_body", "sse_data", "sse_payloads"]


async def call_gateway(
    gateway: Gateway, endpoint: Endpoint, authorization: bytes, body: bytes, client: str
) -> Response | StreamResponse:
    """The gateway's answer to one request, as if it had come to :8000 (ApiError on refusal)."""
    headers = {b"authorization": authorization, b"content-type": b"application/json"}
    request = Request("POST", UPSTREAM_PATHS[endpoint], "", headers, body, client=client)
    return await gateway.forward(endpoint, request)


async def sse_data(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The ``data:`` payload of each event of an SSE body (``[DONE]`` included), as bytes."""
    buffer = b""
    async for piece in body:
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                yield b"\n".join(lines)


async def sse_payloads(body: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any] | None]:
    """Each ``data:`` event of an SSE body as JSON; None for ``[DONE]``."""
    async for data in sse_data(body):
        yield None if data == b"[DONE]" else orjson.loads(data)


async def close_body(body: AsyncIterator[bytes]) -> None:
    """Close a gateway stream body: cancels its upstream request if it is still running."""
    close: Callable[[], Awaitable[None]] | None = getattr(body, "aclose", None)
    if close is not None:
        await close()
