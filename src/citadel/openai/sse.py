"""Server-Sent Events framing for OpenAI streams: bytes in, event blocks out, no I/O.

Theory of operation. An SSE stream is a sequence of events, each a run of ``field: value`` lines
ended by a blank line. The gateway forwards the upstream's events to the client unchanged, so the
decoder does not rebuild events: it cuts the byte stream at blank lines and hands back each block
raw, terminator included. Chunk boundaries from the network fall anywhere (inside a line, between
``\\r`` and ``\\n``), so the decoder keeps the unterminated tail and rescans only its last few bytes
when more data arrives; the blocks produced do not depend on how the stream was split.

A line ends with ``\\n`` or ``\\r\\n``, so a blank line is one of ``\\n\\n``, ``\\r\\n\\r\\n``,
``\\n\\r\\n`` or ``\\r\\n\\n``. Bare ``\\r`` line endings, which the SSE specification allows but no
model server sends, are not recognised. Blocks that hold only blank lines carry no event and are
dropped.

:func:`event_data` reads the ``data`` payload of a block and :func:`inspect_chunk` reads what the
gateway meters from an OpenAI chunk (content pieces, usage, errors, the ``[DONE]`` sentinel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "DONE",
    "SseDecoder",
    "StreamChunkInfo",
    "encode_data",
    "event_data",
    "inspect_chunk",
]

DONE: bytes = b"data: [DONE]\n\n"

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# The longest blank-line match is 4 bytes, so one that ends in new data starts at most 3 bytes
# before it: only that much of an unterminated tail needs rescanning.
_RESCAN = 3


class SseDecoder:
    """Cuts a byte stream into complete SSE event blocks, whatever the chunk boundaries."""

    __slots__ = ("_buffer", "_scan_from")

    def __init__(self) -> None:
        self._buffer = b""
        self._scan_from = 0

    @property
    def buffered(self) -> int:
        """The number of bytes held back as an unfinished event."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes from the stream; return the event blocks they complete, raw, in order."""
        if not data:
            return []
        buffer = self._buffer + data if self._buffer else data
        blocks: list[bytes] = []
        start = 0
        pos = self._scan_from
        if b"\r" in buffer:
            while True:
                match = _BLANK_LINE.search(buffer, pos)
                if match is None:
                    break
                end = match.end()
                block = buffer[start:end]
                if block.strip(b"\r\n"):
                    blocks.append(block)
                start = pos = end
        else:  # the common case (every OpenAI-compatible server): a plain find, no regex
            find = buffer.find
            while (at := find(b"\n\n", pos)) >= 0:
                end = at + 2
                if buffer[start:at].strip(b"\n"):
                    blocks.append(buffer[start:end])
                start = pos = end
        self._buffer = buffer[start:]
        self._scan_from = max(0, len(self._buffer) - _RESCAN)
        return blocks


def event_data(block: bytes) -> bytes | None:
    """The ``data`` payload of an event block, lines joined by ``\\n``; ``None`` if it has none."""
    if block.startswith(b"data: ") and block.find(b"\n") == len(block) - 2:
        return block[6:-2]  # the common case: one data line and the blank line
    values: list[bytes] = []
    for line in block.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            values.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            values.append(b"")
    if not values:
        return None
    return values[0] if len(values) == 1 else b"\n".join(values)


def encode_data(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` (a single line, such as compact JSON) as its data."""
    return b"data: " + payload + b"\n\n"


@dataclass(frozen=True, slots=True)
class StreamChunkInfo:
    """What the gateway needs to know about one chunk of an OpenAI stream."""

    is_done: bool
    """The chunk is the ``[DONE]`` sentinel."""
    is_usage_only: bool
    """The final chunk asked for by ``include_usage``: empty ``choices`` and a ``usage`` object."""
    usage: dict[str, int] | None
    """The integer fields of ``usage`` (nested details left out), if the chunk carries usage."""
    content_pieces: int
    """Choices that carry generated output: normally one token each."""
    text: str
    """The generated text of the chunk (``delta.content`` or ``text``), all choices concatenated."""
    error: dict[str, Any] | None
    """The error object of an error event."""
    malformed: bool = False
    """The payload is not a JSON object (nor ``[DONE]``): the stream is broken."""


_EMPTY = StreamChunkInfo(
    is_done=False, is_usage_only=False, usage=None, content_pieces=0, text="", error=None
)
_MALFORMED = StreamChunkInfo(
    is_done=False,
    is_usage_only=False,
    usage=None,
    content_pieces=0,
    text="",
    error=None,
    malformed=True,
)
_DONE_INFO = StreamChunkInfo(
    is_done=True, is_usage_only=False, usage=None, content_pieces=0, text="", error=None
)


def inspect_chunk(payload: bytes) -> StreamChunkInfo:
    """Read one ``data`` payload of an OpenAI stream; anything unreadable reads as an empty chunk.

    A choice counts as a content piece when it carries text, reasoning text (vLLM's
    ``reasoning_content``) or tool-call deltas, since each of those is generated output; only the
    text goes into ``text``.
    """
    if payload.strip() == b"[DONE]":
        return _DONE_INFO
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _MALFORMED
    if not isinstance(chunk, dict):
        return _MALFORMED

    error = chunk.get("error")
    if error is not None:
        return StreamChunkInfo(
            is_done=False,
            is_usage_only=False,
            usage=None,
            content_pieces=0,
            text="",
            error=error if isinstance(error, dict) else {"message": str(error)},
        )
    if chunk.get("object") == "error":  # vLLM's flat error body
        return StreamChunkInfo(
            is_done=False, is_usage_only=False, usage=None, content_pieces=0, text="", error=chunk
        )

    raw_usage = chunk.get("usage")
    usage: dict[str, int] | None = None
    if isinstance(raw_usage, dict):
        usage = {k: v for k, v in raw_usage.items() if type(v) is int}

    choices = chunk.get("choices")
    pieces = 0
    texts: list[str] = []
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    texts.append(content)
                    pieces += 1
                elif (
                    delta.get("reasoning_content")
                    or delta.get("reasoning")
                    or delta.get("tool_calls")
                ):
                    pieces += 1
            else:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    texts.append(text)
                    pieces += 1

    return StreamChunkInfo(
        is_done=False,
        is_usage_only=usage is not None and choices == [],
        usage=usage,
        content_pieces=pieces,
        text="".join(texts),
        error=None,
    )
