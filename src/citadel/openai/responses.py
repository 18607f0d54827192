"""The Responses API (``POST /v1/responses``) translated to and from Chat Completions.

Pure functions on decoded JSON. :func:`parse_responses_request` validates a Responses request
and builds the equivalent chat request (:class:`ResponsesRequest` holds both);
:func:`response_from_chat` turns the chat reply into a ``response`` object.
``citadel.openai.response_stream`` does the same for streamed chunks, as the Responses API's
typed events.

The mapping, field by field:

- ``instructions`` becomes a leading ``system`` message; ``input`` as a string is one ``user``
  message; input items map to messages: a ``message`` item (``input_text``/``output_text`` parts
  become ``text`` parts, ``input_image`` an ``image_url`` part), consecutive ``function_call`` items
  one assistant message with ``tool_calls``, a ``function_call_output`` item a ``tool`` message.
- ``tools`` (flat function tools) become chat's nested ``{"type": "function", "function": ...}``;
  ``tool_choice`` likewise; ``max_output_tokens`` becomes ``max_completion_tokens``;
  ``text.format`` becomes ``response_format``; ``reasoning.effort`` ``reasoning_effort``.
- The reply's message text becomes an ``output_text`` part of a ``message`` item, each tool call a
  ``function_call`` item; a ``length`` finish is ``status: incomplete`` with
  ``incomplete_details.reason: max_output_tokens``; usage maps prompt/completion tokens to
  input/output tokens.

Fields the translation does not use (``store``, ``previous_response_id`` are the gateway's; the
sampling parameters chat shares are copied) stay in the echoed ``response`` object as sent.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from citadel.openai.invalid import empty_array, invalid_value, missing, wrong_type
from citadel.openai.params import REASONING_EFFORTS, check_metadata, check_number, check_tools

__all__ = [
    "ResponsesRequest",
    "function_call_item",
    "input_items",
    "message_item",
    "new_item_id",
    "output_messages",
    "output_text_part",
    "parse_responses_request",
    "response_from_chat",
    "response_object",
    "response_usage",
]

# Chat parameters with the same name and meaning in both APIs.
_SHARED = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "top_logprobs")
_ROLES = ("user", "assistant", "system", "developer")
_FORMATS = ("text", "json_object", "json_schema")


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated Responses request and the chat request it translates to."""

    body: dict[str, Any]
    """The Responses request as the client sent it (echoed in the ``response`` object)."""
    chat: dict[str, Any]
    """The equivalent Chat Completions request body (model name still the client's)."""
    store: bool
    previous_response_id: str | None


def new_item_id(prefix: str) -> str:
    """An id in OpenAI's style: ``resp_``, ``msg_``, ``fc_`` and 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def parse_responses_request(
    body: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> ResponsesRequest:
    """Validate a decoded Responses request and translate it to chat.

    ``history`` is the chat messages of the conversation so far (``previous_response_id``), put
    before this request's input.
    """
    model = body.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str):
        raise wrong_type("model", "a string", model)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise wrong_type("instructions", "a string", instructions)
        messages.append({"role": "system", "content": instructions})
    messages.extend(history or ())
    messages.extend(_input_messages(body.get("input")))
    chat: dict[str, Any] = {"model": model, "messages": messages}
    for name in _SHARED:
        if body.get(name) is not None:
            chat[name] = body[name]
    check_metadata(body.get("metadata"), "metadata")
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise wrong_type("stream", "a boolean", stream)
        if stream:
            chat["stream"] = True
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        check_number(max_output, "max_output_tokens", 16, 2**31, integer=True)
        chat["max_completion_tokens"] = max_output
    tools = body.get("tools")
    check_tools(tools, "tools", flat=True)
    if tools:
        chat["tools"] = [_chat_tool(t) for t in tools if t.get("type") == "function"]
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    effort = _reasoning_effort(body.get("reasoning"))
    if effort is not None:
        chat["reasoning_effort"] = effort
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise wrong_type("store", "a boolean", store)
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise wrong_type("previous_response_id", "a string", previous)
    return ResponsesRequest(
        body=body, chat=chat, store=store is not False, previous_response_id=previous
    )


def _input_messages(value: object) -> list[dict[str, Any]]:
    if value is None:
        raise missing("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise wrong_type("input", "a string or an array of input items", value)
    if not value:
        raise empty_array("input")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise wrong_type(where, "an object", item)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = _text_of(output, f"{where}.output")
            messages.append(
                {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": output}
            )
        else:
            raise invalid_value(
                f"{where}.type", kind, ("message", "function_call", "function_call_output")
            )
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role is None:
        raise missing(f"{where}.role")
    if role not in _ROLES:
        raise invalid_value(f"{where}.role", role, _ROLES)
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise wrong_type(f"{where}.content", "a string or an array of content parts", content)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        pwhere = f"{where}.content[{index}]"
        if not isinstance(part, dict):
            raise wrong_type(pwhere, "an object", part)
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _string(part, "text", pwhere)})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise (
                    missing(f"{pwhere}.image_url")
                    if url is None
                    else wrong_type(f"{pwhere}.image_url", "a string", url)
                )
            image: dict[str, Any] = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise invalid_value(
                f"{pwhere}.type", kind, ("input_text", "output_text", "input_image")
            )
    if role == "assistant" and all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _text_of(value: object, where: str) -> str:
    """The text of a ``function_call_output``'s output given as content parts."""
    if not isinstance(value, list):
        raise wrong_type(where, "a string or an array of content parts", value)
    return "".join(
        p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _string(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if value is None:
        raise missing(f"{where}.{name}")
    if not isinstance(value, str):
        raise wrong_type(f"{where}.{name}", "a string", value)
    return value


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(choice: object) -> object:
    if choice is None or isinstance(choice, str):
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise invalid_value("tool_choice", choice, ("none", "auto", "required"))
        return choice
    if not isinstance(choice, dict):
        raise wrong_type("tool_choice", "a string or an object", choice)
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}
    return choice


def _response_format(text: object) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise wrong_type("text", "an object", text)
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise wrong_type("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind not in _FORMATS:
        raise invalid_value("text.format.type", kind, _FORMATS)
    if kind != "json_schema":
        return {"type": kind}
    schema = {
        "name": _string(fmt, "name", "text.format"),
        **{k: fmt[k] for k in ("schema", "description", "strict") if k in fmt},
    }
    return {"type": "json_schema", "json_schema": schema}


def _reasoning_effort(reasoning: object) -> str | None:
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise wrong_type("reasoning", "an object", reasoning)
    effort = reasoning.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise invalid_value("reasoning.effort", effort, REASONING_EFFORTS)
    return effort


# -- the reply ---------------------------------------------------------------------------------


def response_usage(usage: object) -> dict[str, Any] | None:
    """Chat's ``usage`` as the Responses API's (input/output tokens and their details)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": prompt_details.get("cached_tokens") or 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": completion_details.get("reasoning_tokens") or 0
        },
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
) -> dict[str, Any]:
    """A ``response`` object echoing the request's settings, as OpenAI returns it."""
    body = req.body
    text = body.get("text") if isinstance(body.get("text"), dict) else None
    doc: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": (
            {"reason": incomplete_reason} if incomplete_reason is not None else None
        ),
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": req.previous_response_id,
        "reasoning": body.get("reasoning"),
        "store": req.store,
        "temperature": body.get("temperature", 1.0),
        "text": text or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [_echoed_tool(t) for t in body.get("tools") or ()],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
    }
    if usage is not None:
        doc["usage"] = usage
    if isinstance(body.get("user"), str):
        doc["user"] = body["user"]
    if status == "completed" or status == "incomplete":
        doc["completed_at"] = created_at if status == "completed" else None
    return doc


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as a ``response`` object lists it: every field, ``null`` when not given."""
    if tool.get("type") != "function":
        return tool
    return {
        **tool,
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def response_from_chat(
    req: ResponsesRequest, chat: dict[str, Any], *, response_id: str, created_at: int
) -> dict[str, Any]:
    """The ``response`` object for a (non-streamed) chat completion."""
    output: list[dict[str, Any]] = []
    finish = None
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    if isinstance(choice, dict):
        finish = choice.get("finish_reason")
        message = choice.get("message") or {}
        content = message.get("content")
        if isinstance(content, str) and content:
            output.append(message_item(new_item_id("msg"), content))
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            output.append(
                {
                    "type": "message",
                    "id": new_item_id("msg"),
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "refusal", "refusal": refusal}],
                }
            )
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            output.append(
                function_call_item(
                    new_item_id("fc"),
                    call.get("id") or new_item_id("call"),
                    function.get("name") or "",
                    function.get("arguments") or "",
                )
            )
    incomplete = "max_output_tokens" if finish == "length" else None
    if finish == "content_filter":
        incomplete = "content_filter"
    return response_object(
        req,
        response_id=response_id,
        created_at=created_at,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=response_usage(chat.get("usage")),
        incomplete_reason=incomplete,
    )


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [output_text_part(text)] if status == "completed" else [],
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output as chat messages, for the next turn of a stored conversation.

    The output may be an upstream's (a deployment that speaks the Responses API): items and
    parts of other kinds (reasoning, say) are left out, and nothing is assumed present.
    """
    messages: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    texts: list[str] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            content = item.get("content")
            texts.extend(
                p["text"]
                for p in (content if isinstance(content, list) else ())
                if isinstance(p, dict)
                and p.get("type") == "output_text"
                and isinstance(p.get("text"), str)
            )
        elif item.get("type") == "function_call":
            calls.append(
                {
                    "id": str(item.get("call_id") or ""),
                    "type": "function",
                    "function": {
                        "name": str(item.get("name") or ""),
                        "arguments": str(item.get("arguments") or ""),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    if texts or calls:
        messages.append(message)
    return messages


def input_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages (a stored conversation) as Responses input items, the inverse of the
    request translation: for a deployment that takes the Responses API as it is."""
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id"),
                    "output": message.get("content") or "",
                }
            )
            continue
        content = message.get("content")
        if isinstance(content, list):
            text_kind = "output_text" if role == "assistant" else "input_text"
            parts: list[dict[str, Any]] = []
            for part in content:
                if part.get("type") == "text":
                    parts.append({"type": text_kind, "text": part.get("text", "")})
                elif part.get("type") == "image_url":
                    image = part.get("image_url") or {}
                    parts.append(
                        {"type": "input_image", "image_url": image.get("url")}
                        | ({"detail": image["detail"]} if "detail" in image else {})
                    )
            items.append({"type": "message", "role": role, "content": parts})
        elif isinstance(content, str) and (content or role != "assistant"):
            items.append({"type": "message", "role": role, "content": content})
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments"),
                }
            )
    return items
