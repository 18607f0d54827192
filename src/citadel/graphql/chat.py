"""``chatCompletion(input)``: one chat completion through the gateway's own path, in process;
``chatCompletionStream(input)``: the same, streamed, its tokens delivered as they arrive.

The service holds a ``citadel.gateway.proxy.Gateway`` over its own router (the live state
``models { deployments }`` shows), the limiter, the accounts' authenticator and a usage sink to
the ledger (the gateway's ``usage_sink``: the Redis stream with Redis, else the SQL ledger). A
``chatCompletion`` is handed to ``Gateway.forward`` as the gateway's HTTP server would hand it:
the caller's own ``Authorization`` header, the JSON body, a fresh request id. So it is
authenticated, limited, routed, retried and metered exactly as a request to :8000 is, and its
refusals are the gateway's (a 429 of a limit is ``RATE_LIMITED`` with the limit's words).

``stream`` asks the gateway for ``stream: true`` (with ``stream_options.include_usage``) and
yields one ``ChatCompletionChunk`` per SSE event the deployment sends, as the gateway relays it:
nothing is buffered, so the first token reaches the subscriber while the model still generates.
A subscriber that leaves closes the gateway's stream, which cancels the upstream request.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import strawberry
from strawberry.scalars import JSON

from citadel.errors import BadRequest, Unavailable
from citadel.gateway.proxy import Gateway
from citadel.http.server import Request, Response, StreamResponse
from citadel.streaming.relay import close_body, sse_payloads

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionInput",
    "ChatMessageInput",
    "complete",
    "stream",
]

_PATH = "/v1/chat/completions"


@strawberry.input(description="One message of the conversation.")
class ChatMessageInput:
    role: str = strawberry.field(description="system, user, assistant or tool")
    content: str


@strawberry.input(description="An OpenAI chat completion request (`stream` is the field's choice).")
class ChatCompletionInput:
    model: str = strawberry.field(description="a model, an alias, or auto")
    messages: list[ChatMessageInput]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    task: str | None = strawberry.field(
        default=None, description="routing hint for auto (e.g. code)"
    )
    extra: JSON | None = strawberry.field(
        default=None,
        description="any other fields of OpenAI's request body, passed as they are",
    )


@strawberry.type(description="What the model said, as OpenAI's `message`.")
class ChatMessage:
    role: str
    content: str | None


@strawberry.type
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None


@strawberry.type
class CompletionUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@strawberry.type(description="OpenAI's chat.completion object, as the gateway answered it.")
class ChatCompletion:
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage | None
    request_id: str = strawberry.field(description="the gateway's request id (in the ledger)")
    deployment: str | None = strawberry.field(description="the deployment that answered")
    raw: JSON = strawberry.field(description="the whole response body")


@strawberry.type(description="One event of a streamed completion, as the deployment sent it.")
class ChatCompletionChunk:
    index: int = strawberry.field(description="0, 1, 2... in the order they arrived")
    id: str
    model: str
    role: str | None = strawberry.field(description="in the first chunk: assistant")
    content: str | None = strawberry.field(description="the tokens of this chunk")
    finish_reason: str | None = strawberry.field(description="in the last chunk: stop, length")
    usage: CompletionUsage | None = strawberry.field(description="in the last chunk")
    request_id: str = strawberry.field(description="the gateway's request id (in the ledger)")
    deployment: str | None = strawberry.field(description="the deployment that answers")
    raw: JSON = strawberry.field(description="the whole chunk (OpenAI's chat.completion.chunk)")


def _body(given: ChatCompletionInput, *, streamed: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if given.extra is not None:
        if not isinstance(given.extra, dict):
            raise BadRequest("'extra' must be a JSON object.", param="input.extra")
        body.update(given.extra)
    if "stream" in body or "stream_options" in body:
        field = "stream" if "stream" in body else "stream_options"
        raise BadRequest(
            f"Leave '{field}' out of 'extra': chatCompletion is not streamed, "
            "chatCompletionStream is.",
            param=f"input.extra.{field}",
        )
    body["model"] = given.model
    body["messages"] = [{"role": m.role, "content": m.content} for m in given.messages]
    for name in ("max_tokens", "temperature", "top_p", "stop", "seed", "task"):
        value = getattr(given, name)
        if value is not None:
            body[name] = value
    if streamed:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _request(authorization: bytes | None, body: dict[str, Any]) -> Request:
    """The request the gateway's HTTP server would hand ``forward``, with a fresh request id."""
    headers = {b"content-type": b"application/json"}
    if authorization is not None:
        headers[b"authorization"] = authorization
    request = Request("POST", _PATH, "", headers, orjson.dumps(body), client="graphql")
    request.request_id = os.urandom(12).hex()
    return request


def _refused(reply: Response) -> Unavailable:
    """A deployment's error answer, relayed by the gateway (after its retries)."""
    document = orjson.loads(reply.body) if reply.body else None
    error = document.get("error", {}) if isinstance(document, dict) else {}
    return Unavailable(
        f"The deployment answered {reply.status}: {error.get('message') or 'no detail'}."
    )


def _usage(value: Any) -> CompletionUsage | None:
    if not isinstance(value, dict):
        return None
    return CompletionUsage(
        prompt_tokens=int(value.get("prompt_tokens", 0)),
        completion_tokens=int(value.get("completion_tokens", 0)),
        total_tokens=int(value.get("total_tokens", 0)),
    )


async def complete(
    gateway: Gateway, authorization: bytes | None, given: ChatCompletionInput
) -> ChatCompletion:
    """Run ``given`` through ``gateway`` as the caller (ApiError: the gateway's refusal)."""
    request = _request(authorization, _body(given))
    reply = await gateway.forward("chat", request)
    if not isinstance(reply, Response):
        await close_body(reply.body)
        raise Unavailable("The gateway answered a stream to a request that was not streamed.")
    document = orjson.loads(reply.body)
    if reply.status != 200 or not isinstance(document, dict):
        raise _refused(reply)
    answer_headers = dict(reply.headers)
    return ChatCompletion(
        id=str(document.get("id", "")),
        object=str(document.get("object", "chat.completion")),
        created=int(document.get("created", 0)),
        model=str(document.get("model", "")),
        choices=[
            ChatChoice(
                index=int(choice.get("index", i)),
                message=ChatMessage(
                    role=str((choice.get("message") or {}).get("role", "assistant")),
                    content=(choice.get("message") or {}).get("content"),
                ),
                finish_reason=choice.get("finish_reason"),
            )
            for i, choice in enumerate(document.get("choices") or [])
        ],
        usage=_usage(document.get("usage")),
        request_id=request.request_id,
        deployment=_text(answer_headers.get(b"x-citadel-deployment")),
        raw=JSON(document),
    )


async def stream(
    gateway: Gateway, authorization: bytes | None, given: ChatCompletionInput
) -> AsyncGenerator[ChatCompletionChunk, None]:
    """``given`` through ``gateway`` with ``stream: true``: each SSE event as it arrives
    (ApiError: the gateway's refusal, before the first chunk or mid-stream)."""
    request = _request(authorization, _body(given, streamed=True))
    reply = await gateway.forward("chat", request)
    if isinstance(reply, Response):
        raise _refused(reply)
    return _chunks(reply, request.request_id)


async def _chunks(
    reply: StreamResponse, request_id: str
) -> AsyncGenerator[ChatCompletionChunk, None]:
    deployment = _text(dict(reply.headers).get(b"x-citadel-deployment"))
    index = 0
    try:
        async for event in sse_payloads(reply.body):
            if event is None:
                continue  # [DONE]: read on to the body's end, so the gateway meters it as done
            if "error" in event:
                error = event["error"] if isinstance(event["error"], dict) else {}
                raise Unavailable(
                    f"The deployment failed mid-stream: {error.get('message') or 'no detail'}."
                )
            choices = event.get("choices") or []
            first = choices[0] if choices and isinstance(choices[0], dict) else {}
            delta = first.get("delta") or {}
            yield ChatCompletionChunk(
                index=index,
                id=str(event.get("id", "")),
                model=str(event.get("model", "")),
                role=delta.get("role"),
                content=delta.get("content"),
                finish_reason=first.get("finish_reason"),
                usage=_usage(event.get("usage")),
                request_id=request_id,
                deployment=deployment,
                raw=JSON(event),
            )
            index += 1
    finally:
        await close_body(reply.body)  # a subscriber gone early: the upstream request is cancelled


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
