"""Parse and validate the request bodies of the OpenAI endpoints.

This is on the gateway's hot path, so the body is decoded once with orjson and then checked with
plain ``isinstance`` tests on the resulting dict: no schema library, no copies. Only the fields the
gateway relies on (model, stream, token budget, prompt text) and the common sampling parameters are
checked; every other field is a vendor extension and passes through untouched, for the upstream to
judge.

Errors are :class:`~citadel.errors.BadRequest` with OpenAI-like messages and codes, and ``param``
naming the offending field as a path (``messages[2].role``, ``stream_options.include_usage``).
Errors about the body as a whole (empty, not JSON, not an object) have no field, so their ``param``
is ``None``, as OpenAI answers them.

A JSON ``null`` for an optional parameter means "not given", as OpenAI treats it.

Nesting is bounded at ``MAX_JSON_DEPTH`` levels (the top-level object is level 1), one limit both
ways: orjson parses up to 1,024 levels but serialises only 254, so without a bound below both a
body could parse and then fail on its way upstream. No OpenAI field nests anywhere near 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from citadel.errors import BadRequest
from citadel.openai.invalid import empty_array as _empty_array
from citadel.openai.invalid import empty_string as _empty_string
from citadel.openai.invalid import missing as _missing
from citadel.openai.invalid import type_name as _type_name
from citadel.openai.invalid import wrong_type as _wrong_type
from citadel.openai.params import check_parameters

__all__ = [
    "Endpoint",
    "ParsedRequest",
    "decode_body",
    "parse_body",
    "parse_request",
    "with_upstream_fields",
]

Endpoint = Literal["chat", "completion", "embedding"]

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MAX_STOP_SEQUENCES = 4
MAX_JSON_DEPTH = 64

_ROLES_LISTED = "'system', 'user', 'assistant', 'tool', 'developer', and 'function'"
_PROMPT_SHAPES = (
    "a string, an array of strings, an array of integers, or an array of arrays of integers"
)


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated request: the decoded body plus the fields the gateway acts on."""

    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    """The decoded JSON object, re-serialised for the upstream by :func:`with_upstream_fields`."""
    stream: bool
    include_usage: bool
    """``stream_options.include_usage`` as the client asked; the upstream is always asked."""
    max_tokens: int | None
    """``max_completion_tokens`` if given, else ``max_tokens``, else ``None``."""
    prompt_text: str
    """The text of the messages / prompt / input joined by newlines, for estimation and routing."""


def parse_request(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    """Decode and validate the body of a ``chat``, ``completion`` or ``embedding`` request."""
    return parse_body(endpoint, decode_body(raw))


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (400 when empty, not JSON, not an object, too deep)."""
    if not raw:
        raise BadRequest(
            "We could not parse the JSON body of your request: the body is empty.",
            code="invalid_json",
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if raw.isspace():
            raise BadRequest(
                "We could not parse the JSON body of your request: the body is empty.",
                code="invalid_json",
            ) from exc
        raise BadRequest(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise BadRequest(
            f"Invalid request body: expected a JSON object, but got {_type_name(body)} instead.",
            code="invalid_type",
        )
    # Each level opens a bracket, so fewer brackets than the limit cannot nest too deep (a count in
    # C, nothing on the common path); otherwise walk the parsed body to be exact.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _too_deep(body, MAX_JSON_DEPTH):
        raise BadRequest(
            f"We could not parse the JSON body of your request: it nests more than "
            f"{MAX_JSON_DEPTH} levels of arrays and objects, the most this API accepts.",
            code="json_too_deep",
        )
    return body


def parse_body(endpoint: Endpoint, body: dict[str, Any]) -> ParsedRequest:
    """Validate a decoded request body of a ``chat``, ``completion`` or ``embedding`` request."""
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if not model:
        raise _empty_string("model")

    if endpoint == "chat":
        prompt_text = _check_messages(body)
    elif endpoint == "completion":
        prompt_text = _check_prompt(body, "prompt", allow_empty=True)
    elif endpoint == "embedding":
        prompt_text = _check_prompt(body, "input", allow_empty=False)
    else:  # pragma: no cover - the Literal type rules it out; kept for untyped callers
        raise ValueError(f"unknown endpoint {endpoint!r}: expected chat, completion or embedding")

    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    if stream and endpoint == "embedding":
        raise BadRequest(
            "Invalid value for 'stream': embeddings cannot be streamed.",
            param="stream",
            code="invalid_value",
        )

    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _wrong_type("stream_options", "an object", stream_options)
        if not stream:
            raise BadRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        usage_flag = stream_options.get("include_usage")
        if usage_flag is not None:
            if not isinstance(usage_flag, bool):
                raise _wrong_type("stream_options.include_usage", "a boolean", usage_flag)
            include_usage = usage_flag

    max_tokens = _positive_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _positive_int(body, "max_tokens")
    else:
        _positive_int(body, "max_tokens")
    _positive_int(body, "n")
    _number_in_range(body, "temperature", 2)
    _number_in_range(body, "top_p", 1)
    _check_stop(body)
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
        raise _wrong_type("seed", "an integer", seed)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _wrong_type("user", "a string", user)
    check_parameters(endpoint, body)

    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        body=body,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        prompt_text=prompt_text,
    )


def with_upstream_fields(req: ParsedRequest, upstream_model: str) -> bytes:
    """Serialise the body for the upstream: its own model name, and usage always reported.

    A streamed chat or completion always asks the upstream for the final usage chunk, so the gateway
    can meter it; the gateway drops that chunk when the client did not ask for it
    (``req.include_usage``). The request's body is left unchanged.
    """
    body = {**req.body, "model": upstream_model}
    if req.stream and req.endpoint != "embedding":
        options = req.body.get("stream_options") or {}
        body["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(body)


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` levels of arrays and objects (it is level 1)."""
    level: list[Any] = [value]
    for _ in range(limit):
        below: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                below.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                below.extend(v for v in item if isinstance(v, dict | list))
        if not below:
            return False
        level = below
    return True


# -- chat messages -----------------------------------------------------------------------------


def _check_messages(body: dict[str, Any]) -> str:
    """Validate ``messages`` and return the text of their contents, joined by newlines."""
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise _empty_array("messages")
    texts: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{index}]", "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"messages[{index}].role")
        if not isinstance(role, str):
            raise _wrong_type(f"messages[{index}].role", "a string", role)
        if role not in CHAT_ROLES:
            raise BadRequest(
                f"Invalid value: '{role}'. Supported values are: {_ROLES_LISTED}.",
                param=f"messages[{index}].role",
                code="invalid_value",
            )
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            _check_content_parts(content, index, texts)
        elif content is None:
            # Only an assistant turn that calls tools may have no content.
            if role != "assistant" or not (
                message.get("tool_calls") or message.get("function_call")
            ):
                if "content" not in message:
                    raise _missing(f"messages[{index}].content")
                raise _wrong_type(
                    f"messages[{index}].content", "a string or an array of objects", content
                )
        else:
            raise _wrong_type(
                f"messages[{index}].content", "a string or an array of objects", content
            )
        # Tool-call arguments are prompt tokens too when the conversation is sent back.
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    texts.append(arguments)
    return "\n".join(texts)


def _check_content_parts(parts: list[Any], index: int, texts: list[str]) -> None:
    """Validate an array of content parts; append the text of ``text`` parts to ``texts``."""
    if not parts:
        raise _empty_array(f"messages[{index}].content")
    for part_index, part in enumerate(parts):
        param = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, dict):
            raise _wrong_type(param, "an object", part)
        part_type = part.get("type")
        if part_type is None:
            raise _missing(f"{param}.type")
        if not isinstance(part_type, str):
            raise _wrong_type(f"{param}.type", "a string", part_type)
        if part_type == "text":
            text = part.get("text")
            if text is None:
                raise _missing(f"{param}.text")
            if not isinstance(text, str):
                raise _wrong_type(f"{param}.text", "a string", text)
            texts.append(text)


# -- completion prompt and embedding input ------------------------------------------------------


def _check_prompt(body: dict[str, Any], name: str, *, allow_empty: bool) -> str:
    """Validate ``prompt`` or ``input``: a string, strings, token ids, or lists of token ids.

    Returns the text joined by newlines; token-id prompts have no text (``""``).
    """
    value = body.get(name)
    if value is None:
        raise _missing(name)
    if isinstance(value, str):
        if not value and not allow_empty:
            raise _empty_string(name)
        return value
    if not isinstance(value, list):
        raise _wrong_type(name, _PROMPT_SHAPES, value)
    if not value:
        raise _empty_array(name)
    first = value[0]
    if isinstance(first, str):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise _wrong_type(f"{name}[{index}]", "a string", item)
            if not item and not allow_empty:
                raise _empty_string(f"{name}[{index}]")
        return "\n".join(value)
    if type(first) is int:
        _check_token_ids(value, name)
        return ""
    if isinstance(first, list):
        for index, item in enumerate(value):
            if not isinstance(item, list):
                raise _wrong_type(f"{name}[{index}]", "an array of integers", item)
            if not item:
                raise _empty_array(f"{name}[{index}]")
            _check_token_ids(item, f"{name}[{index}]")
        return ""
    raise _wrong_type(f"{name}[0]", "a string, an integer, or an array of integers", first)


def _check_token_ids(ids: list[Any], param: str) -> None:
    for index, token in enumerate(ids):
        if type(token) is not int:
            raise _wrong_type(f"{param}[{index}]", "an integer", token)
        if token < 0:
            raise BadRequest(
                f"Invalid '{param}[{index}]': integer below minimum value. "
                f"Expected a value >= 0, but got {token} instead.",
                param=f"{param}[{index}]",
                code="integer_below_min_value",
            )


# -- sampling parameters ------------------------------------------------------------------------


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:  # bool is a subclass of int, and not an integer here
        raise _wrong_type(name, "an integer", value)
    if value < 1:
        raise BadRequest(
            f"Invalid '{name}': integer below minimum value. "
            f"Expected a value >= 1, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    return value


def _number_in_range(body: dict[str, Any], name: str, maximum: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if type(value) is not float and type(value) is not int:
        raise _wrong_type(name, "a number", value)
    if value < 0:
        raise BadRequest(
            f"Invalid '{name}': decimal below minimum value. "
            f"Expected a value >= 0, but got {value} instead.",
            param=name,
            code="decimal_below_min_value",
        )
    if value > maximum:
        raise BadRequest(
            f"Invalid '{name}': decimal above maximum value. "
            f"Expected a value <= {maximum}, but got {value} instead.",
            param=name,
            code="decimal_above_max_value",
        )


def _check_stop(body: dict[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise BadRequest(
            f"Invalid 'stop': array too long. Expected an array with maximum length "
            f"{MAX_STOP_SEQUENCES}, but got an array with length {len(stop)} instead.",
            param="stop",
            code="array_above_max_length",
        )
    for index, item in enumerate(stop):
        if not isinstance(item, str):
            raise _wrong_type(f"stop[{index}]", "a string", item)
