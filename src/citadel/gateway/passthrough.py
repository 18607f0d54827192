"""``/v1/responses`` forwarded as-is to deployments that speak the Responses API themselves.

A deployment with ``responses: true`` (vLLM serves the Responses API) gets a Responses request as
the client sent it, its model name swapped for the deployment's (``Passthrough.upstream_body``);
any other deployment of the same model, or of a fallback, gets the request's Chat Completions
translation instead (``citadel.gateway.responses``). Which one answered is decided per attempt
(``citadel.gateway.upstream``), and the ``Call`` records it in ``Passthrough.served``, so the
caller knows whether the reply is already a ``response`` object or still a chat completion.

The chat translation of the request is made either way: it is what the context window, the limits'
estimate and routing read, so a passed-through request is admitted and routed as any other.

:class:`ResponseEvents` reads what the gateway meters from a passed-through stream: the output
deltas (the first token's time, an estimate when no usage comes), the final event's ``response``
(its ``usage``, and the object that is stored) and the last ``sequence_number``, and makes the
``error`` and ``response.failed`` events that end a stream the upstream broke off.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "FINAL_EVENTS",
    "Passthrough",
    "ResponseEvents",
    "output_text",
    "response_usage_tokens",
]

FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""The events that end a Responses stream; each carries the whole ``response`` object."""
# Deltas of generated output: each is about one token (text, tool-call arguments, reasoning).
_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.refusal.delta",
    }
)


class Passthrough:
    """A Responses request as the client sent it, for the deployments that speak the API."""

    __slots__ = ("body", "response", "served")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.served = False
        """A deployment that speaks the Responses API answered (the reply is a ``response``)."""
        self.response: dict[str, Any] | None = None
        """The final ``response`` object of a passed-through stream, once it has ended."""

    def upstream_body(self, upstream_model: str) -> bytes:
        return orjson.dumps({**self.body, "model": upstream_model})


def response_usage_tokens(usage: object) -> tuple[int, int] | None:
    """A Responses ``usage`` object's (input, output) tokens, if it has them."""
    if isinstance(usage, dict):
        prompt = usage.get("input_tokens")
        completion = usage.get("output_tokens", 0)
        if type(prompt) is int and type(completion) is int:
            return prompt, completion
    return None


def output_text(output: object) -> str:
    """The text of a ``response`` object's output items (for an estimate when usage is missing)."""
    texts: list[str] = []
    for item in output if isinstance(output, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        texts.extend(
            part["text"]
            for part in (content if isinstance(content, list) else ())
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return "".join(texts)


class ResponseEvents:
    """What one passed-through Responses stream has said so far."""

    __slots__ = ("final", "pieces", "sequence", "snapshot", "texts")

    def __init__(self) -> None:
        self.pieces = 0
        self.texts: list[str] = []
        self.sequence = -1
        self.snapshot: dict[str, Any] | None = None  # the latest ``response`` object seen
        self.final: str | None = None  # the type of the final event, once it came

    def read(self, event: dict[str, Any]) -> bool:
        """Take in one event; whether it is an output delta (generated output)."""
        sequence = event.get("sequence_number")
        if type(sequence) is int:
            self.sequence = sequence
        kind = event.get("type")
        if kind in _DELTAS:
            self.pieces += 1
            delta = event.get("delta")
            if kind == "response.output_text.delta" and isinstance(delta, str):
                self.texts.append(delta)
            return True
        response = event.get("response")
        if isinstance(response, dict):
            self.snapshot = response
            if kind in FINAL_EVENTS:
                self.final = kind
        return False

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def fail(self, message: str, code: str) -> bytes:
        """The events that end a stream broken off before its final event: an ``error`` event
        and, when the stream had said which response it was, ``response.failed``."""
        out = self._event("error", {"code": code, "message": message, "param": None})
        if self.snapshot is not None:
            failed = {
                **self.snapshot,
                "status": "failed",
                "error": {"code": "server_error", "message": message},
            }
            out += self._event("response.failed", {"response": failed})
        return out
