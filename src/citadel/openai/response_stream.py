"""Chat Completions stream chunks as the Responses API's typed stream events.

Theory of operation. A streamed response opens with ``response.created`` and
``response.in_progress`` and ends with ``response.completed`` (or ``response.incomplete`` when the
model hit its token limit, ``response.failed`` when the upstream broke); between them each output
item is opened (``response.output_item.added``), filled with deltas and closed
(``response.output_item.done``). A chat chunk's ``delta.content`` goes to one ``message`` item,
whose one ``output_text`` part gets ``response.output_text.delta`` events; each ``delta.tool_calls``
index is a ``function_call`` item with ``response.function_call_arguments.delta`` events. An item
is opened on its first delta and every open item is closed, in order, when the stream ends, so
the events form the same nesting whatever the chunking. Every event carries the next
``sequence_number``; the final event holds the whole ``response`` object, usage included.

Pure: dicts in, SSE-framed bytes out (``event: <type>`` plus ``data: <json>``).
"""

from __future__ import annotations

from typing import Any

import orjson

from citadel.openai.responses import (
    ResponsesRequest,
    function_call_item,
    message_item,
    new_item_id,
    output_text_part,
    response_object,
    response_usage,
)

__all__ = ["ResponseStream"]


class _Item:
    __slots__ = ("call_id", "id", "index", "kind", "name", "parts")

    def __init__(self, kind: str, item_id: str, index: int, call_id: str = "", name: str = ""):
        self.kind = kind
        self.id = item_id
        self.index = index
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []


class ResponseStream:
    """Translates one chat stream into Responses events; ``response`` is the final object."""

    __slots__ = (
        "_calls",
        "_created_at",
        "_finish",
        "_items",
        "_message",
        "_req",
        "_sequence",
        "_usage",
        "request",
        "response",
        "response_id",
    )

    def __init__(self, req: ResponsesRequest, *, response_id: str, created_at: int) -> None:
        self._req = req
        self.request = req
        self.response_id = response_id
        self._created_at = created_at
        self._sequence = 0
        self._items: list[_Item] = []
        self._message: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self.response: dict[str, Any] | None = None

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _snapshot(self, status: str) -> dict[str, Any]:
        return response_object(
            self._req,
            response_id=self.response_id,
            created_at=self._created_at,
            status=status,
            output=[],
        )

    def start(self) -> bytes:
        """The opening events: ``response.created`` and ``response.in_progress``."""
        snapshot = self._snapshot("in_progress")
        return self._event("response.created", {"response": snapshot}) + self._event(
            "response.in_progress", {"response": snapshot}
        )

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events for one chat chunk (often none, e.g. for the role-only first chunk)."""
        out: list[bytes] = []
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = response_usage(usage)
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return b""
        choice = choices[0]
        if not isinstance(choice, dict):
            return b""
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return b""
        content = delta.get("content")
        if isinstance(content, str) and content:
            out.append(self._text_delta(content))
        out.extend(
            self._call_delta(call)
            for call in delta.get("tool_calls") or ()
            if isinstance(call, dict)
        )
        return b"".join(out)

    def _open(self, item: _Item, doc: dict[str, Any]) -> bytes:
        self._items.append(item)
        return self._event("response.output_item.added", {"output_index": item.index, "item": doc})

    def _text_delta(self, text: str) -> bytes:
        out = b""
        item = self._message
        if item is None:
            item = self._message = _Item("message", new_item_id("msg"), len(self._items))
            out = self._open(item, message_item(item.id, "", "in_progress"))
            out += self._event(
                "response.content_part.added",
                {
                    "item_id": item.id,
                    "output_index": item.index,
                    "content_index": 0,
                    "part": output_text_part(""),
                },
            )
        item.parts.append(text)
        return out + self._event(
            "response.output_text.delta",
            {
                "item_id": item.id,
                "output_index": item.index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            },
        )

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            item = _Item(
                "function_call",
                new_item_id("fc"),
                len(self._items),
                call_id=call.get("id") or new_item_id("call"),
                name=function.get("name") or "",
            )
            self._calls[index] = item
            out = self._open(
                item, function_call_item(item.id, item.call_id, item.name, "", "in_progress")
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.parts.append(arguments)
            out += self._event(
                "response.function_call_arguments.delta",
                {"item_id": item.id, "output_index": item.index, "delta": arguments},
            )
        return out

    def finish(self) -> bytes:
        """Close every open item and end with ``response.completed`` or ``.incomplete``."""
        out: list[bytes] = []
        output: list[dict[str, Any]] = []
        for item in self._items:
            text = "".join(item.parts)
            where = {"item_id": item.id, "output_index": item.index}
            if item.kind == "message":
                doc = message_item(item.id, text)
                out.append(
                    self._event(
                        "response.output_text.done",
                        {**where, "content_index": 0, "text": text, "logprobs": []},
                    )
                )
                out.append(
                    self._event(
                        "response.content_part.done",
                        {**where, "content_index": 0, "part": output_text_part(text)},
                    )
                )
            else:
                doc = function_call_item(item.id, item.call_id, item.name, text)
                out.append(
                    self._event(
                        "response.function_call_arguments.done",
                        {**where, "name": item.name, "arguments": text},
                    )
                )
            output.append(doc)
            out.append(
                self._event("response.output_item.done", {"output_index": item.index, "item": doc})
            )
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(
            self._finish or ""
        )
        status = "incomplete" if incomplete else "completed"
        self.response = response_object(
            self._req,
            response_id=self.response_id,
            created_at=self._created_at,
            status=status,
            output=output,
            usage=self._usage,
            incomplete_reason=incomplete,
        )
        out.append(self._event(f"response.{status}", {"response": self.response}))
        return b"".join(out)

    def fail(self, message: str, code: str) -> bytes:
        """End a stream the upstream broke: an ``error`` event, then ``response.failed``."""
        failed = self._snapshot("failed")
        failed["error"] = {"code": "server_error", "message": message}
        self.response = failed
        return self._event("error", {"code": code, "message": message, "param": None}) + (
            self._event("response.failed", {"response": failed})
        )
