"""``chatCompletion(input)``: one chat completion through the gateway's own path, in process.

The service holds a ``citadel.gateway.proxy.Gateway`` over its own router (the live state
``models { deployments }`` shows), the limiter, the accounts' authenticator and a usage sink to
the ledger (the gateway's ``usage_sink``: the Redis stream with Redis, else the SQL ledger). A
``chatCompletion`` is handed to ``Gateway.forward`` as the gateway's HTTP server would hand it:
the caller's own ``Authorization`` header, the JSON body, a fresh request id. So it is
authenticated, limited, routed, retried and metered exactly as a request to :8000 is, and its
refusals are the gateway's (a 429 of a limit is ``RATE_LIMITED`` with the limit's words).
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import strawberry
from strawberry.scalars import JSON

from citadel.errors import BadRequest, Unavailable
from citadel.gateway.proxy import Gateway
from citadel.http.server import Request, Response

__all__ = ["ChatCompletion", "ChatCompletionInput", "ChatMessageInput", "complete"]

_PATH = "/v1/chat/completions"


@strawberry.input(description="One message of the conversation.")
class ChatMessageInput:
    role: str = strawberry.field(description="system, user, assistant or tool")
    content: str


@strawberry.input(description="An OpenAI chat completion request (not streamed).")
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


def _body(given: ChatCompletionInput) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if given.extra is not None:
        if not isinstance(given.extra, dict):
            raise BadRequest("'extra' must be a JSON object.", param="input.extra")
        body.update(given.extra)
    if body.get("stream"):
        raise BadRequest(
            "chatCompletion is not streamed; leave 'stream' out of 'extra'.",
            param="input.extra.stream",
        )
    body["model"] = given.model
    body["messages"] = [{"role": m.role, "content": m.content} for m in given.messages]
    for name in ("max_tokens", "temperature", "top_p", "stop", "seed", "task"):
        value = getattr(given, name)
        if value is not None:
            body[name] = value
    return body


async def complete(
    gateway: Gateway, authorization: bytes | None, given: ChatCompletionInput
) -> ChatCompletion:
    """Run ``given`` through ``gateway`` as the caller (ApiError: the gateway's refusal)."""
    headers = {b"content-type": b"application/json"}
    if authorization is not None:
        headers[b"authorization"] = authorization
    request = Request("POST", _PATH, "", headers, orjson.dumps(_body(given)), client="graphql")
    request.request_id = os.urandom(12).hex()
    reply = await gateway.forward("chat", request)
    if not isinstance(reply, Response):
        raise Unavailable("The gateway answered a stream to a request that was not streamed.")
    document = orjson.loads(reply.body)
    if reply.status != 200 or not isinstance(document, dict):
        error = document.get("error", {}) if isinstance(document, dict) else {}
        raise Unavailable(
            f"The deployment answered {reply.status}: {error.get('message') or 'no detail'}."
        )
    answer_headers = dict(reply.headers)
    usage = document.get("usage")
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
        usage=None
        if not isinstance(usage, dict)
        else CompletionUsage(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            total_tokens=int(usage.get("total_tokens", 0)),
        ),
        request_id=request.request_id,
        deployment=_text(answer_headers.get(b"x-citadel-deployment")),
        raw=JSON(document),
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
