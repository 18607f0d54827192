"""``/v1/responses``: OpenAI's Responses API, served through the chat path.

``POST /v1/responses`` validates the request and translates it to a Chat Completions request
(``citadel.openai.responses``), which then takes the same path as any chat request — model
resolution, context window, limits, routing, retries, metering, the ledger — and translates the
reply back: a ``response`` object, or for ``stream: true`` the Responses API's typed events
(``citadel.openai.response_stream``) made from the chat stream as it arrives.

A model's deployment with ``responses: true`` speaks the Responses API itself (vLLM does): an
attempt on it forwards the request as the client sent it (``citadel.gateway.passthrough``) and the
reply, whole or streamed, comes back as the deployment made it (the model renamed as for chat),
metered from its own ``usage``; attempts on other deployments are translated as above. The chat
translation is made either way: limits, routing and the context window read it. A
``previous_response_id`` is the gateway's, so for a deployment that speaks the API it is
resolved here too, its conversation put before the input as input items.

Stored responses: with ``store`` (OpenAI's default) the finished ``response`` object is kept, so
``GET /v1/responses/{id}`` returns it, ``DELETE`` removes it, and ``previous_response_id``
continues its conversation (its input and output are put before the new input). Each response
is visible only to the key that made it. The store is Redis when the gateway has one (every
replica and worker sees every response; kept 30 days, as OpenAI keeps them), else this process's
memory, bounded (oldest out first); see docs/decisions.md.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from citadel.accounts.auth import Principal
from citadel.errors import ApiError, NotFound, StoreUnavailable
from citadel.gateway.passthrough import Passthrough
from citadel.http.server import Request, Response, StreamResponse
from citadel.openai.requests import decode_body, parse_body
from citadel.openai.response_stream import ResponseStream
from citadel.openai.responses import (
    ResponsesRequest,
    input_items,
    new_item_id,
    output_messages,
    parse_responses_request,
    response_from_chat,
)
from citadel.openai.sse import DONE, SseDecoder, event_data

if TYPE_CHECKING:
    from citadel.gateway.proxy import Gateway
    from citadel.stores.endpoint import RedisStore

__all__ = [
    "RESPONSES_PATH",
    "MemoryResponseStore",
    "RedisResponseStore",
    "ResponseStore",
    "ResponsesApi",
]

_log = logging.getLogger("citadel.gateway")

RESPONSES_PATH = "/v1/responses"
DEFAULT_STORE_SIZE = 10_000
STORED_SECONDS = 30 * 86_400  # how long Redis keeps a stored response (OpenAI: 30 days)


@dataclass(frozen=True, slots=True)
class _Stored:
    owner: str
    response: dict[str, Any]
    messages: list[dict[str, Any]]
    """The conversation as chat messages, this response's output included (for continuations)."""


def _not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id[:64]}' not found.",  # a client's text: bounded
        param="response_id",
        code="response_not_found",
    )


class ResponseStore(Protocol):
    """Finished responses by id, each visible only to its owner (a key id, else a user)."""

    async def put(
        self, owner: str, response: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None: ...

    async def get(self, owner: str, response_id: str) -> _Stored:
        """The stored response, or ``NotFound`` (also when another owner made it)."""
        ...

    async def delete(self, owner: str, response_id: str) -> None: ...

    async def aclose(self) -> None: ...


class MemoryResponseStore:
    """This process's memory, at most ``size`` responses (the oldest go first)."""

    def __init__(self, size: int = DEFAULT_STORE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[str, _Stored] = OrderedDict()

    async def put(
        self, owner: str, response: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None:
        self._items[response["id"]] = _Stored(owner, response, messages)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    async def get(self, owner: str, response_id: str) -> _Stored:
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            raise _not_found(response_id)
        return stored

    async def delete(self, owner: str, response_id: str) -> None:
        await self.get(owner, response_id)
        del self._items[response_id]

    async def aclose(self) -> None:
        self._items.clear()


class RedisResponseStore:
    """Redis: one key a response (its own slot in a Cluster), expiring after ``ttl`` seconds."""

    def __init__(
        self, redis: RedisStore, *, ttl: int = STORED_SECONDS, prefix: str = "citadel:resp:"
    ):
        self._redis = redis
        self._ttl = ttl
        self._prefix = prefix

    async def put(
        self, owner: str, response: dict[str, Any], messages: list[dict[str, Any]]
    ) -> None:
        value = orjson.dumps({"owner": owner, "response": response, "messages": messages})
        await self._redis.execute("SET", self._prefix + response["id"], value, "EX", self._ttl)

    async def get(self, owner: str, response_id: str) -> _Stored:
        if len(response_id) > 64:  # ids are short: no key a client can make arbitrarily long
            raise _not_found(response_id)
        raw = await self._redis.execute("GET", self._prefix + response_id)
        if raw is None:
            raise _not_found(response_id)
        doc = orjson.loads(raw)
        if doc["owner"] != owner:
            raise _not_found(response_id)
        return _Stored(doc["owner"], doc["response"], doc["messages"])

    async def delete(self, owner: str, response_id: str) -> None:
        await self.get(owner, response_id)
        await self._redis.execute("DEL", self._prefix + response_id)

    async def aclose(self) -> None:
        await self._redis.aclose()


class _Translated:
    """The translated stream as a body that closes the chat stream even if closed unstarted.

    An async generator closed before its first step never runs its ``finally``; the server closes
    a body it will not send (the client left first), and the chat stream must be closed then too.
    """

    __slots__ = ("_events", "_inner", "_started")

    def __init__(self, events: AsyncGenerator[bytes, None], inner: AsyncIterator[bytes]) -> None:
        self._events = events
        self._inner = inner
        self._started = False

    def __aiter__(self) -> _Translated:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        return await self._events.__anext__()

    async def aclose(self) -> None:
        if self._started:
            await self._events.aclose()
            return
        self._started = True
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class _ThenKeep:
    """A passed-through stream as a body that stores its response once the stream has ended."""

    __slots__ = ("_after", "_inner")

    def __init__(self, inner: AsyncIterator[bytes], after: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._after = after

    def __aiter__(self) -> _ThenKeep:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            await self._after()
            raise

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


def _owner(principal: Principal) -> str:
    return principal.key_id or principal.user


def _native_body(body: dict[str, Any], history: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The request for a deployment that speaks the Responses API: as sent, but a continued
    conversation (the gateway's ``previous_response_id``) spelt out as input items."""
    if history is None:
        return body
    native = {k: v for k, v in body.items() if k != "previous_response_id"}
    current = body["input"]
    if isinstance(current, str):
        current = [{"type": "message", "role": "user", "content": current}]
    native["input"] = [*input_items(history), *current]
    return native


class ResponsesApi:
    """The handlers of ``/v1/responses`` and ``/v1/responses/{id}``."""

    def __init__(self, gateway: Gateway, store: ResponseStore | None = None) -> None:
        self._gateway = gateway
        self._store: ResponseStore = store if store is not None else MemoryResponseStore()
        # Whether any deployment speaks the Responses API (else no request needs a Passthrough).
        self._native = gateway.speaks_responses

    async def create(self, request: Request) -> Response | StreamResponse:
        started = time.perf_counter()
        wall = time.time()
        gateway = self._gateway
        principal = await gateway.authenticate(request)
        try:  # a request refused here is in the ledger too (dispatch meters the rest)
            gateway.check_json(request)
            body = decode_body(request.body)
            req, history = await self._request(principal, body)
            chat = req.chat
            if chat.get("stream"):
                chat["stream_options"] = {"include_usage": True}  # the final event carries usage
            parsed = parse_body("chat", chat)
        except ApiError as exc:
            gateway.unserved(
                principal, request, exc, endpoint="responses", started=started, wall=wall
            )
            raise
        passthrough = Passthrough(_native_body(body, history)) if self._native else None
        reply = await gateway.dispatch(
            request, parsed, principal, started, wall, label="responses", passthrough=passthrough
        )
        if passthrough is not None and passthrough.served:
            return await self._relayed(principal, req, reply, passthrough)
        response_id = new_item_id("resp")
        if isinstance(reply, StreamResponse):
            stream = ResponseStream(req, response_id=response_id, created_at=int(wall))
            reply.body = _Translated(self._events(stream, reply.body, principal), reply.body)
            return reply
        doc = response_from_chat(
            req, orjson.loads(reply.body), response_id=response_id, created_at=int(wall)
        )
        await self._keep(principal, req, doc)
        reply.body = orjson.dumps(doc)
        return reply

    async def _relayed(
        self,
        principal: Principal,
        req: ResponsesRequest,
        reply: Response | StreamResponse,
        passthrough: Passthrough,
    ) -> Response | StreamResponse:
        """A reply from a deployment that speaks the Responses API: relayed as it is, stored."""
        if isinstance(reply, StreamResponse):

            async def keep() -> None:
                if passthrough.response is not None:
                    await self._keep(principal, req, passthrough.response)

            reply.body = _ThenKeep(reply.body, keep)
            return reply
        if req.store or req.previous_response_id is not None:
            doc = orjson.loads(reply.body)  # a JSON object: Call.whole checked it
            if req.previous_response_id is not None:
                doc["previous_response_id"] = req.previous_response_id
                reply.body = orjson.dumps(doc)
            await self._keep(principal, req, doc)
        return reply

    async def _events(
        self, stream: ResponseStream, chunks: AsyncIterator[bytes], principal: Principal
    ) -> AsyncGenerator[bytes, None]:
        """The chat stream's events as Responses events; closing this closes the chat stream."""
        decoder = SseDecoder()
        yield stream.start()
        ended = False
        try:
            async for data in chunks:
                out: list[bytes] = []
                for block in decoder.feed(data):
                    if ended:
                        break
                    payload = event_data(block)
                    if payload is None:
                        continue
                    if payload == DONE[6:-2]:
                        out.append(stream.finish())
                        ended = True
                        continue
                    chunk = orjson.loads(payload)
                    error = chunk.get("error") if isinstance(chunk, dict) else None
                    if isinstance(error, dict):
                        out.append(
                            stream.fail(
                                str(error.get("message")), str(error.get("code") or "server_error")
                            )
                        )
                        ended = True
                    elif isinstance(chunk, dict):
                        out.append(stream.feed(chunk))
                if out:
                    yield b"".join(out)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if stream.response is not None and stream.response["status"] != "failed":
            await self._keep(principal, stream.request, stream.response)

    async def _request(
        self, principal: Principal, body: dict[str, Any]
    ) -> tuple[ResponsesRequest, list[dict[str, Any]] | None]:
        """The request ``body`` asks for, and the conversation it continues, if any."""
        history: list[dict[str, Any]] | None = None
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            history = (await self._store.get(_owner(principal), previous)).messages
        return parse_responses_request(body, history), history

    async def _keep(self, principal: Principal, req: ResponsesRequest, doc: dict[str, Any]) -> None:
        """Store a finished response. The reply was made (and billed) whatever happens here, so a
        store that is down costs the stored copy, logged, not the reply."""
        if not req.store or doc.get("status") == "failed":
            return
        if not isinstance(doc.get("id"), str) or not isinstance(doc.get("output"), list):
            _log.warning("response not stored: the upstream's response object has no id or output")
            return
        messages = [*req.chat["messages"], *output_messages(doc["output"])]
        try:
            await self._store.put(_owner(principal), doc, messages)
        except StoreUnavailable as exc:
            _log.warning("response %s not stored: %s", doc["id"], exc)

    def _response_id(self, request: Request) -> str:
        return request.path.removeprefix(RESPONSES_PATH + "/")

    async def retrieve(self, request: Request) -> Response:
        principal = await self._gateway.authenticate_json(request)
        stored = await self._store.get(_owner(principal), self._response_id(request))
        return Response(200, orjson.dumps(stored.response))

    async def delete(self, request: Request) -> Response:
        principal = await self._gateway.authenticate_json(request)
        response_id = self._response_id(request)
        await self._store.delete(_owner(principal), response_id)
        return Response(
            200, orjson.dumps({"id": response_id, "object": "response", "deleted": True})
        )

    async def aclose(self) -> None:
        await self._store.aclose()
