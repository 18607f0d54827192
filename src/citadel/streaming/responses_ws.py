"""OpenAI's Responses API over WebSocket (``GET /v1/responses`` upgraded): what the OpenAI SDK's
``client.responses.connect()`` speaks.

The client sends ``{"type": "response.create", ...}`` with the fields of a ``POST /v1/responses``
body at the top level (``stream`` is implied), and receives that response's typed events
(``response.created`` ... ``response.completed``) as JSON messages, each tagged with the
``stream_id`` the create carried, if any. Several responses may run at once on one socket when
each has its own ``stream_id`` (the SDK's lanes). Each one takes the gateway's own path in this
process: the gateway's Responses translation (``citadel.gateway.responses``), then auth, limits,
routing and metering like any chat request.

Errors are the Responses API's ``error`` event (``{"type": "error", "code", "message", "param",
"sequence_number"}``); the socket stays open. ``{"type": "response.cancel", "stream_id": ...}``
(ours, not OpenAI's) stops a running response and its upstream request. ``response.steer`` is
refused (unsupported). Authentication and close codes are those of ``/v1/ws``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import orjson

from citadel.errors import ApiError, BadRequest, RateLimited
from citadel.http.server import Request, StreamResponse
from citadel.streaming.api import MAX_IN_FLIGHT, WsSession
from citadel.streaming.relay import close_body, sse_data

__all__ = ["ResponsesSession"]

_DEFAULT_LANE: Final = ""  # the key of a create without a stream_id


class ResponsesSession(WsSession):
    """A /v1/ws session whose messages are Responses API client events."""

    async def error(self, error: Any, mid: object = None) -> None:
        event: dict[str, Any] = {
            "type": "error",
            "code": error.get("code") or error.get("type"),
            "message": error.get("message"),
            "param": error.get("param"),
            "sequence_number": 0,
        }
        if isinstance(mid, str) and mid:
            event["stream_id"] = mid
        await self.send(event)

    @staticmethod
    def request_id(message: object) -> object:
        return message.get("stream_id") if isinstance(message, dict) else None

    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        lane = message.get("stream_id", _DEFAULT_LANE)
        if not isinstance(lane, str) or len(lane) > 256:
            raise BadRequest(
                "stream_id: expected a string of at most 256 characters.", param="stream_id"
            )
        if kind == "response.cancel":
            task = self.tasks.get(lane)
            if task is None:
                raise BadRequest(
                    f"No response is running on stream_id {lane[:40]!r}.", param="stream_id"
                )
            task.cancel()
            return
        if kind == "response.steer":
            raise BadRequest(
                "response.steer is not supported here; send a new response.create with "
                "previous_response_id.",
                param="type",
                code="unsupported",
            )
        if kind != "response.create":
            raise BadRequest(
                f"type: unknown message type {str(kind)[:40]!r} (response.create, response.cancel)",
                param="type",
            )
        if lane in self.tasks:
            raise BadRequest(
                "A response is already running on this stream_id: wait for its end, or give "
                "each concurrent response a stream_id of its own.",
                param="stream_id",
                code="conflict",
            )
        if len(self.tasks) >= MAX_IN_FLIGHT:
            raise RateLimited(f"At most {MAX_IN_FLIGHT} responses in flight on one socket.")
        body = {k: v for k, v in message.items() if k not in ("type", "stream_id")}
        self.start(lane, self.respond(lane, {**body, "stream": True}))

    async def respond(self, lane: str, body: dict[str, Any]) -> None:
        headers = {b"authorization": self.authorization, b"content-type": b"application/json"}
        host = self.socket.client.host if self.socket.client else ""
        request = Request("POST", "/v1/responses", "", headers, orjson.dumps(body), client=host)
        reply = None
        try:
            answer = await self.api.responses.create(request)
            if not isinstance(answer, StreamResponse):
                await self.error(orjson.loads(answer.body).get("error") or {}, lane)
                return
            reply = answer
            async for data in sse_data(reply.body):
                event = orjson.loads(data)
                if lane:
                    event["stream_id"] = lane
                await self.send(event)
        except ApiError as exc:
            await self.error(orjson.loads(exc.body())["error"], lane)
        except asyncio.CancelledError:
            self.api.cancelled()
            with contextlib.suppress(Exception):
                cancelled: dict[str, Any] = {"type": "response.cancelled"}
                await self.send({**cancelled, "stream_id": lane} if lane else cancelled)
            raise
        finally:
            if reply is not None:
                await close_body(reply.body)
