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
    text goes into ``text``. (``read_chunk`` is the same reading without the object.)
    """
    kind, found, pieces, text = read_chunk(payload)
    if kind == CHUNK_DONE:
        return _DONE_INFO
    if kind == CHUNK_MALFORMED:
        return _MALFORMED
    if kind == CHUNK_ERROR:
        return StreamChunkInfo(
            is_done=False,
            is_usage_only=False,
            usage=None,
            content_pieces=0,
            text="",
            error=found,
        )
    return StreamChunkInfo(
        is_done=False,
        is_usage_only=kind == CHUNK_USAGE_ONLY,
        usage=found,
        content_pieces=pieces,
        text=text,
        error=None,
    )


# What ``read_chunk`` found: a chunk (usage or not), the final usage-only chunk, [DONE], a payload
# that is not a JSON object, an error event.
CHUNK, CHUNK_USAGE_ONLY, CHUNK_DONE, CHUNK_MALFORMED, CHUNK_ERROR = range(5)
ChunkReading = tuple[int, dict[str, Any] | None, int, str]


def read_chunk(payload: bytes) -> ChunkReading:
    """``inspect_chunk`` as a tuple, for the relay's per-event path: (kind, usage or the error
    object, content pieces, text). Building a frozen ``StreamChunkInfo`` per event cost more
    than reading the event (bench/README.md), so the relay reads this instead."""
    if payload[:1] != b"{" and payload.strip() == b"[DONE]":
        return _DONE_READING
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _MALFORMED_READING
    if type(chunk) is not dict:
        return _MALFORMED_READING

    error = chunk.get("error")
    if error is not None:
        return CHUNK_ERROR, error if isinstance(error, dict) else {"message": str(error)}, 0, ""
    if chunk.get("object") == "error":  # vLLM's flat error body
        return CHUNK_ERROR, chunk, 0, ""

    raw_usage = chunk.get("usage")
    choices = chunk.get("choices")
    if raw_usage is None and type(choices) is list and len(choices) == 1:
        # The common chunk: one choice whose delta carries text.
        choice = choices[0]
        delta = choice.get("delta") if type(choice) is dict else None
        content = delta.get("content") if type(delta) is dict else None
        if type(content) is str and content:
            return CHUNK, None, 1, content
    usage: dict[str, Any] | None = None
    if isinstance(raw_usage, dict):
        usage = {k: v for k, v in raw_usage.items() if type(v) is int}

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
    kind = CHUNK_USAGE_ONLY if usage is not None and choices == [] else CHUNK
    return kind, usage, pieces, "".join(texts)


_DONE_READING: ChunkReading = (CHUNK_DONE, None, 0, "")
_MALFORMED_READING: ChunkReading = (CHUNK_MALFORMED, None, 0, "")
