"""The streaming service's endpoints: WebSocket chat and subscriptions, SSE chat, live events.

The wire protocol is in docs/streaming.md. Each connection's live events go through a feed
``Subscription`` with a bounded queue: a slow reader gets ``lagged`` rather than growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, cast

import orjson
from litestar import Request, WebSocket, get, post, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.handlers import BaseRouteHandler
from litestar.params import FromQuery
from litestar.response import Response as LitestarResponse
from litestar.response import Stream

from citadel.accounts.auth import Authenticator, Principal
from citadel.errors import ApiError, BadRequest, PayloadTooLarge, RateLimited, Unauthorized
from citadel.feed import Entry, Feed, Lagged, Subscription, parse_position
from citadel.feed.open import USAGE
from citadel.gateway.proxy import Gateway
from citadel.gateway.responses import ResponsesApi
from citadel.http.server import Request as HttpRequest
from citadel.http.server import Response as HttpResponse
from citadel.http.server import StreamResponse
from citadel.metering.ledger import decode_event
from citadel.metrics import (
    STREAMING_BYTES,
    STREAMING_CANCELLED,
    STREAMING_CONNECTIONS,
    STREAMING_LAGGED,
    STREAMING_MESSAGES,
    Registry,
)
from citadel.openai.requests import Endpoint
from citadel.streaming.generations import Generations
from citadel.streaming.relay import call_gateway, close_body, sse_payloads
from citadel.web import errors

__all__ = ["StreamingApi", "handlers"]

_log = logging.getLogger("citadel.streaming")

TOPICS: Final = ("usage", "deployments", "alerts", "metrics")
MAX_MESSAGE: Final = 1 << 20  # bytes of one client WebSocket message
MAX_CONNECTIONS_PER_KEY: Final = 64
MAX_IN_FLIGHT: Final = 16  # completions at once on one socket
QUEUE: Final = 1000  # live events buffered per subscription before ``lagged``
SUBPROTOCOL: Final = "citadel.v1"
_TOKEN_PREFIX: Final = "bearer."
# Close codes (RFC 6455 and the 4000-4999 private range), documented in docs/streaming.md.
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_RESTART = 1008, 1009, 1011, 1012
CLOSE_UNAUTHORIZED, CLOSE_TOO_MANY = 4401, 4429
_ENDPOINTS: Final[dict[str, Endpoint]] = {"chat.completion": "chat", "completion": "completion"}


class StreamingApi:
    """The service's state: the gateway, the feed, open connections per key."""

    def __init__(
        self, gateway: Gateway, authenticator: Authenticator, feed: Feed, registry: Registry
    ) -> None:
        self.gateway = gateway
        self.auth = authenticator
        self.feed = feed
        self.generations = Generations(feed)
        self.responses = ResponsesApi(gateway)  # its stored responses: this process's memory
        self.open: Tally[str] = Tally()
        self.sockets: set[WebSocket[Any, Any, Any]] = set()
        self._connections = registry.gauge(STREAMING_CONNECTIONS)
        self._messages = registry.counter(STREAMING_MESSAGES)
        self._bytes = registry.counter(STREAMING_BYTES)
        self._lagged = registry.counter(STREAMING_LAGGED)
        self._cancelled = registry.counter(STREAMING_CANCELLED)
        self._cancelled.inc((), 0)  # a series from the start, so rate() reads 0, not nothing

    def sent(self, protocol: str, data: bytes) -> None:
        self._messages.inc((protocol,))
        self._bytes.inc((protocol,), len(data))

    def lagged(self, topic: str, missed: int) -> None:
        self._lagged.inc((topic,), missed)

    def cancelled(self) -> None:
        self._cancelled.inc(())

    @contextlib.contextmanager
    def connection(self, protocol: str, principal: Principal) -> Any:
        if self.open[principal.key_id] >= MAX_CONNECTIONS_PER_KEY:
            raise RateLimited(
                f"Too many open streaming connections for this key (at most "
                f"{MAX_CONNECTIONS_PER_KEY}); close one first.",
                code="too_many_connections",
            )
        self.open[principal.key_id] += 1
        self._connections.inc((protocol,))
        try:
            yield
        finally:
            self.open[principal.key_id] -= 1
            if not self.open[principal.key_id]:
                del self.open[principal.key_id]
            self._connections.dec((protocol,))

    async def shutdown(self) -> None:
        """Tell every WebSocket client to reconnect elsewhere (1012: service restart)."""
        for socket in list(self.sockets):
            with contextlib.suppress(Exception):
                await socket.close(CLOSE_RESTART, "service restarting; reconnect")


def event_json(entry: Entry, principal: Principal) -> dict[str, Any] | None:
    """An event as a client sees it; None when this caller may not see it."""
    if entry.topic == USAGE:
        try:
            event = decode_event(entry.data)
        except Exception:
            return None
        if principal.limits is not None and event.user != principal.user:
            return None  # a user key sees only its own usage
        return dataclasses.asdict(event)
    try:
        value: Any = orjson.loads(entry.data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else {"value": value}


def parse_topics(text: str) -> list[str]:
    topics = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in topics if t not in TOPICS]
    if not topics or unknown:
        raise BadRequest(
            f"topics: expected a comma-separated list of {', '.join(TOPICS)}"
            + (f"; unknown: {', '.join(unknown)[:80]}" if unknown else ""),
            param="topics",
        )
    return list(dict.fromkeys(topics))


def parse_resume(text: str | None, topics: list[str]) -> dict[str, str | None]:
    """``usage=1-0;alerts=2-3`` (our SSE ids) as positions per topic."""
    after: dict[str, str | None] = dict.fromkeys(topics)
    if not text:
        return after
    for part in text.split(";"):
        topic, sep, position = part.partition("=")
        try:
            if not sep or topic not in after:
                raise ValueError(f"not a topic=position pair: {part[:40]!r}")
            parse_position(position)
        except ValueError as exc:
            raise BadRequest(f"Last-Event-ID: {exc}", param="Last-Event-ID") from None
        after[topic] = position
    return after


def resume_id(positions: Mapping[str, str]) -> str:
    return ";".join(f"{t}={p}" for t, p in positions.items())


async def merged(subs: list[Subscription]) -> AsyncIterator[Entry | Lagged]:
    """The items of several subscriptions as they come."""
    queue: asyncio.Queue[Entry | Lagged | None] = asyncio.Queue(maxsize=1)

    async def pump(sub: Subscription) -> None:
        async for item in sub:
            await queue.put(item)
        await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in subs]
    try:
        ended = 0
        while ended < len(subs):
            item = await queue.get()
            if item is None:
                ended += 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def authenticate(api: StreamingApi, authorization: str | None) -> Principal:
    return await api.auth.authenticate(authorization.encode() if authorization else None)


def handlers(api: StreamingApi) -> list[BaseRouteHandler]:
    @post(
        "/v1/chat/completions",
        status_code=200,
        summary="Chat completions, as on the gateway (SSE when stream)",
    )
    async def chat(request: Request[Any, Any, Any]) -> LitestarResponse[bytes] | Stream:
        return await forward(request, "chat")

    @post(
        "/v1/completions",
        status_code=200,
        summary="Completions, as on the gateway (SSE when stream)",
    )
    async def completion(request: Request[Any, Any, Any]) -> LitestarResponse[bytes] | Stream:
        return await forward(request, "completion")

    async def forward(
        request: Request[Any, Any, Any], endpoint: Endpoint
    ) -> LitestarResponse[bytes] | Stream:
        body = await request.body()
        auth = request.headers.get("authorization", "").encode()
        host = request.client.host if request.client else ""
        reply = await call_gateway(api.gateway, endpoint, auth, body, host)
        if isinstance(reply, StreamResponse):
            headers = {k.decode(): v.decode() for k, v in reply.headers}
            headers.pop("content-type", None)
            try:
                principal = await api.auth.authenticate(auth)  # the gateway let it in: cached
                stream_id, events = await api.generations.start(principal.key_id, reply.body)
            except BaseException:
                await close_body(reply.body)
                raise
            headers["x-citadel-stream-id"] = stream_id
            return Stream(counted(events), media_type="text/event-stream", headers=headers)
        return litestar_reply(reply, counted)

    async def counted(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for piece in body:
                api.sent("sse", piece)
                yield piece
        finally:
            await close_body(body)

    @get(
        "/v1/streams/{stream_id:str}",
        summary="Attach to a streamed completion (resume with Last-Event-ID)",
        media_type="text/event-stream",
        responses=errors(401, 404),
    )
    async def attach(
        request: Request[Any, Any, Any], stream_id: str, after: FromQuery[str | None] = None
    ) -> Stream:
        principal = await authenticate(api, request.headers.get("authorization"))
        start = request.headers.get("last-event-id") or after
        if start is not None:
            try:
                parse_position(start)
            except ValueError as exc:
                raise BadRequest(f"Last-Event-ID: {exc}", param="Last-Event-ID") from None
        events = await api.generations.attach(stream_id, principal, start)
        return Stream(counted(events), media_type="text/event-stream")

    @get(
        "/v1/events",
        summary="Live events as Server-Sent Events, resumable by Last-Event-ID",
        media_type="text/event-stream",
        responses=errors(401, 403),
    )
    async def events(
        request: Request[Any, Any, Any],
        topics: FromQuery[str] = "usage",
        after: FromQuery[str | None] = None,
    ) -> Stream:
        principal = await authenticate(api, request.headers.get("authorization"))
        wanted = parse_topics(topics)
        start = parse_resume(request.headers.get("last-event-id") or after, wanted)
        return Stream(sse_events(principal, start), media_type="text/event-stream")

    async def sse_events(
        principal: Principal, start: dict[str, str | None]
    ) -> AsyncIterator[bytes]:
        with api.connection("sse", principal):
            async with contextlib.AsyncExitStack() as stack:
                subs = [
                    await stack.enter_async_context(api.feed.subscribe(t, after=a, queue=QUEUE))
                    for t, a in start.items()
                ]
                positions = {s.topic: s.position for s in subs}
                lost = [s.topic for s in subs if not s.recovered]
                if lost:
                    yield emit(
                        "sse",
                        sse("gap", {"recovered": False, "topics": lost}, resume_id(positions)),
                    )
                yield emit("sse", b": connected\n\n")
                async for item in merged(subs):
                    if isinstance(item, Lagged):
                        api.lagged(item.topic, item.missed)
                        positions[item.topic] = item.position
                        body = {
                            "topic": item.topic,
                            "missed": item.missed,
                            "position": item.position,
                        }
                        yield emit("sse", sse("lagged", body, resume_id(positions)))
                        continue
                    positions[item.topic] = item.position
                    shown = event_json(item, principal)
                    if shown is not None:
                        yield emit("sse", sse(item.topic, shown, resume_id(positions)))

    def emit(protocol: str, data: bytes) -> bytes:
        api.sent(protocol, data)
        return data

    @websocket("/v1/ws")
    async def ws(socket: WebSocket[Any, Any, Any]) -> None:
        await WsSession(api, socket).run()

    from citadel.streaming.responses_ws import ResponsesSession  # it builds on WsSession

    @websocket("/v1/responses")
    async def responses_ws(socket: WebSocket[Any, Any, Any]) -> None:
        await ResponsesSession(api, socket).run()

    @post(
        "/v1/responses", status_code=200, summary="Responses, as on the gateway (SSE when stream)"
    )
    async def responses(request: Request[Any, Any, Any]) -> LitestarResponse[bytes] | Stream:
        body = await request.body()
        headers = [(k.encode(), v.encode()) for k, v in request.headers.items()]
        host = request.client.host if request.client else ""
        internal = HttpRequest("POST", "/v1/responses", "", dict(headers), body, client=host)
        return litestar_reply(await api.responses.create(internal), counted)

    return [chat, completion, responses, attach, events, ws, responses_ws]


def litestar_reply(
    reply: HttpResponse | StreamResponse,
    counted: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]],
) -> LitestarResponse[bytes] | Stream:
    """The gateway's answer as Litestar's (a stream's bytes pass through ``counted``)."""
    headers = {k.decode(): v.decode() for k, v in reply.headers}
    ctype = headers.pop("content-type", "application/json")
    if isinstance(reply, StreamResponse):
        return Stream(counted(reply.body), media_type=ctype, headers=headers)
    return LitestarResponse(reply.body, status_code=reply.status, media_type=ctype, headers=headers)


def sse(event: str, data: object, event_id: str) -> bytes:
    return b"event: %s\nid: %s\ndata: %s\n\n" % (
        event.encode(),
        event_id.encode(),
        orjson.dumps(data),
    )


class WsSession:
    """One WebSocket: authentication, then chat requests and subscriptions by client ids."""

    def __init__(self, api: StreamingApi, socket: WebSocket[Any, Any, Any]) -> None:
        self.api = api
        self.socket = socket
        self.principal: Principal | None = None
        self.authorization = b""
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.lock = asyncio.Lock()
        self.held = contextlib.ExitStack()  # this socket's place in the per-key count

    async def error(self, error: Any, mid: object = None) -> None:
        """An OpenAI-style error, of request ``mid`` when known."""
        message = {"type": "error", "error": error}
        await self.send(message if mid is None else {**message, "id": mid})

    @staticmethod
    def request_id(message: object) -> object:
        """The id of the request a refused message was about, if it named one."""
        return client_id(message)

    async def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        async with self.lock:
            await self.socket.send_text(data.decode())
        self.api.sent("websocket", data)

    async def run(self) -> None:
        offered = [
            p.strip() for p in self.socket.headers.get("sec-websocket-protocol", "").split(",")
        ]
        token = next(
            (p[len(_TOKEN_PREFIX) :] for p in offered if p.startswith(_TOKEN_PREFIX)), None
        )
        header = self.socket.headers.get("authorization")
        if header is None and token is not None:
            header = f"Bearer {token}"
        await self.socket.accept(subprotocols=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        self.api.sockets.add(self.socket)
        try:
            if header is None or await self.login(header):
                await self.loop()
        except WebSocketDisconnect:
            pass
        except Exception:
            _log.exception("websocket session failed")
            with contextlib.suppress(Exception):
                await self.socket.close(CLOSE_INTERNAL, "internal error")
        finally:
            self.held.close()
            self.api.sockets.discard(self.socket)
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def login(self, header: str) -> bool:
        try:
            principal = await authenticate(self.api, header)
            self.held.enter_context(self.api.connection("websocket", principal))
        except ApiError as exc:
            await self.error(error_body(exc))
            code = CLOSE_TOO_MANY if isinstance(exc, RateLimited) else CLOSE_UNAUTHORIZED
            await self.socket.close(code, exc.message[:120])
            return False
        self.principal = principal
        self.authorization = header.encode()
        return True

    async def loop(self) -> None:
        while True:
            event = await self.socket.receive()
            if event["type"] == "websocket.disconnect":
                return
            text: str | bytes = cast("str | bytes", event.get("text") or event.get("bytes") or b"")
            if len(text) > MAX_MESSAGE:
                too_big = f"A message may be at most {MAX_MESSAGE} bytes."
                await self.error(error_body(PayloadTooLarge(too_big, param="message")))
                await self.socket.close(CLOSE_TOO_BIG, "message too big")
                return
            try:
                message = orjson.loads(text)
                if not isinstance(message, dict):
                    raise BadRequest("A message must be a JSON object.", param="message")
                if self.principal is None:
                    if message.get("type") != "auth" or not isinstance(message.get("key"), str):
                        raise Unauthorized(
                            'Authenticate first: send {"type": "auth", "key": "..."}, an '
                            "Authorization header or a bearer.<key> subprotocol.",
                            code="missing_api_key",
                        )
                    if not await self.login(f"Bearer {message['key']}"):
                        return
                    await self.send({"type": "authenticated"})
                    continue
                await self.handle(message)
            except orjson.JSONDecodeError:
                await self.error(error_body(BadRequest("A message must be JSON.", param="message")))
            except Unauthorized as exc:
                await self.error(error_body(exc))
                await self.socket.close(CLOSE_UNAUTHORIZED, exc.message[:120])
                return
            except ApiError as exc:
                await self.error(error_body(exc), self.request_id(message))

    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        mid = message.get("id")
        if kind == "cancel":
            task = self.tasks.get(str(mid))
            if task is None:
                raise BadRequest(f"Nothing is running under id {str(mid)[:40]!r}.", param="id")
            task.cancel()
            return
        if not isinstance(mid, str) or not 0 < len(mid) <= 128:
            raise BadRequest("id: expected a string of 1 to 128 characters.", param="id")
        if mid in self.tasks:
            raise BadRequest(f"id {mid[:40]!r} is already in use on this socket.", param="id")
        if kind in _ENDPOINTS:
            if len(self.tasks) >= MAX_IN_FLIGHT:
                raise RateLimited(f"At most {MAX_IN_FLIGHT} requests in flight on one socket.")
            body = message.get("body")
            if not isinstance(body, dict):
                raise BadRequest("body: expected the OpenAI request object.", param="body")
            self.start(mid, self.complete(mid, _ENDPOINTS[kind], body))
        elif kind == "subscribe":
            assert self.principal is not None
            topics = parse_topics(
                ",".join(message.get("topics") or [])
                if isinstance(message.get("topics"), list)
                else ""
            )
            after = message.get("after")
            start = parse_resume(after if isinstance(after, str) else None, topics)
            self.start(mid, self.subscribe(mid, start))
        elif kind == "unsubscribe":
            task = self.tasks.get(mid)
            if task is not None:
                task.cancel()
        else:
            raise BadRequest(
                f"type: unknown message type {str(kind)[:40]!r} (chat.completion, completion, "
                "cancel, subscribe, unsubscribe)",
                param="type",
            )

    def start(self, mid: str, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks[mid] = task
        task.add_done_callback(lambda _: self.tasks.pop(mid, None))

    async def complete(self, mid: str, endpoint: Endpoint, body: dict[str, Any]) -> None:
        body = {**body, "stream": True}
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        reply: StreamResponse | None = None
        usage: Any = None
        try:
            answer = await call_gateway(
                self.api.gateway,
                endpoint,
                self.authorization,
                orjson.dumps(body),
                client_host(self.socket),
            )
            if not isinstance(answer, StreamResponse):
                await self.send(
                    {"type": "error", "id": mid, "error": orjson.loads(answer.body).get("error")}
                )
                return
            reply = answer
            async for chunk in sse_payloads(reply.body):
                if chunk is None:
                    continue  # read on to the body's end: closed early, the gateway logs a 499
                if "error" in chunk:
                    await self.send({"type": "error", "id": mid, "error": chunk["error"]})
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    await self.send({"type": "chunk", "id": mid, "chunk": chunk})
            await self.send({"type": "done", "id": mid, "usage": usage})
        except ApiError as exc:
            await self.send({"type": "error", "id": mid, "error": error_body(exc)})
        except asyncio.CancelledError:
            self.api.cancelled()
            with contextlib.suppress(Exception):
                await self.send({"type": "cancelled", "id": mid})
            raise
        finally:
            if reply is not None:
                await close_body(reply.body)  # cancels the upstream request if still running

    async def subscribe(self, mid: str, start: dict[str, str | None]) -> None:
        assert self.principal is not None
        principal = self.principal
        try:
            with self.api.connection("websocket-subscription", principal):
                async with contextlib.AsyncExitStack() as stack:
                    subs = [
                        await stack.enter_async_context(
                            self.api.feed.subscribe(t, after=a, queue=QUEUE)
                        )
                        for t, a in start.items()
                    ]
                    positions = {s.topic: s.position for s in subs}
                    await self.send(
                        {
                            "type": "subscribed",
                            "id": mid,
                            "position": resume_id(positions),
                            "recovered": all(s.recovered for s in subs),
                        }
                    )
                    async for item in merged(subs):
                        positions[item.topic] = item.position
                        if isinstance(item, Lagged):
                            self.api.lagged(item.topic, item.missed)
                            await self.send(
                                {
                                    "type": "lagged",
                                    "id": mid,
                                    "topic": item.topic,
                                    "missed": item.missed,
                                    "position": resume_id(positions),
                                }
                            )
                            continue
                        shown = event_json(item, principal)
                        if shown is not None:
                            await self.send(
                                {
                                    "type": "event",
                                    "id": mid,
                                    "topic": item.topic,
                                    "position": resume_id(positions),
                                    "data": shown,
                                }
                            )
        except ApiError as exc:
            await self.send({"type": "error", "id": mid, "error": error_body(exc)})


def client_id(message: object) -> object:
    return message.get("id") if isinstance(message, dict) else None


def client_host(socket: WebSocket[Any, Any, Any]) -> str:
    return socket.client.host if socket.client else ""


def error_body(exc: ApiError) -> Any:
    return orjson.loads(exc.body())["error"]
