"""Tests for SSE framing and for reading OpenAI stream chunks."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.openai.sse import (
    CHUNK,
    CHUNK_DONE,
    CHUNK_ERROR,
    CHUNK_MALFORMED,
    CHUNK_USAGE_ONLY,
    DONE,
    SseDecoder,
    StreamChunkInfo,
    encode_data,
    event_data,
    inspect_chunk,
    read_chunk,
)

EMPTY = StreamChunkInfo(
    is_done=False, is_usage_only=False, usage=None, content_pieces=0, text="", error=None
)


def _chat_chunk(content: str | None, *, usage: object = None) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "llama",
            "choices": [
                {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
            ],
            "usage": usage,
        }
    )


def test_decoder_returns_complete_blocks_raw() -> None:
    """Complete events come back byte for byte, terminator included, and the tail is held."""
    decoder = SseDecoder()

    blocks = decoder.feed(b"data: a\n\ndata: b\r\n\r\nevent: x\ndata: c")

    assert [b"data: a\n\n", b"data: b\r\n\r\n"] == blocks
    assert len(b"event: x\ndata: c") == decoder.buffered


def test_decoder_completes_an_event_split_inside_its_terminator() -> None:
    """An event whose blank line arrives split between chunks is released when it completes."""
    decoder = SseDecoder()

    first = decoder.feed(b"data: a\r\n\r")
    second = decoder.feed(b"\ndata: b\n")
    third = decoder.feed(b"\n")

    assert ([], [b"data: a\r\n\r\n"], [b"data: b\n\n"]) == (first, second, third)
    assert 0 == decoder.buffered


def test_decoder_accepts_mixed_line_endings() -> None:
    """A blank line made of mixed LF and CRLF line endings ends an event."""
    blocks = SseDecoder().feed(b"data: a\n\r\ndata: b\r\n\n")

    assert [b"data: a\n\r\n", b"data: b\r\n\n"] == blocks


def test_decoder_drops_blocks_of_only_blank_lines() -> None:
    """Extra blank lines between events carry no event and are not returned."""
    blocks = SseDecoder().feed(b"\n\ndata: a\n\n\n\n: keep-alive\n\n")

    assert [b"data: a\n\n", b": keep-alive\n\n"] == blocks


def test_decoder_ignores_empty_feeds() -> None:
    """Feeding no bytes returns no blocks."""
    assert [] == SseDecoder().feed(b"")


_LINE_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
_EVENT = st.tuples(
    st.lists(
        st.tuples(st.sampled_from(["data", "event", "id", ""]), _LINE_TEXT), min_size=1, max_size=4
    ),
    st.sampled_from([b"\n", b"\r\n"]),
)


def _encode_event(fields: list[tuple[str, str]], newline: bytes) -> bytes:
    lines = [f"{name}: {value}".encode() for name, value in fields]
    return b"".join(line + newline for line in lines) + newline


@given(events=st.lists(_EVENT, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_a_stream_decodes_to_the_same_blocks(
    events: list[tuple[list[tuple[str, str]], bytes]], cuts: list[int]
) -> None:
    """However a stream of encoded events is cut into chunks, the decoder yields the events."""
    encoded = [_encode_event(fields, newline) for fields, newline in events]
    stream = b"".join(encoded)
    positions = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    decoder = SseDecoder()

    blocks: list[bytes] = []
    for start, end in itertools.pairwise(positions):
        blocks.extend(decoder.feed(stream[start:end]))

    assert encoded == blocks
    assert 0 == decoder.buffered


@given(payload=st.binary().filter(lambda b: b"\n" not in b and b"\r" not in b))
def test_encoded_data_round_trips(payload: bytes) -> None:
    """A single-line payload encoded as an event decodes to one block with that payload."""
    blocks = SseDecoder().feed(encode_data(payload))

    assert [payload] == [event_data(block) for block in blocks]


def test_event_data_joins_data_lines() -> None:
    """Several data lines are joined with newlines; other fields and comments are ignored."""
    block = b': comment\nevent: message\ndata: {"a":\r\ndata:1}\ndata\nid: 7\n\n'

    assert b'{"a":\n1}\n' == event_data(block)


def test_event_data_is_none_without_data() -> None:
    """A block with no data line has no payload."""
    assert event_data(b": keep-alive\n\n") is None


def test_done_is_the_encoded_sentinel() -> None:
    """DONE is the [DONE] sentinel encoded as an event."""
    assert encode_data(b"[DONE]") == DONE


def test_inspect_done() -> None:
    """The [DONE] sentinel is recognised."""
    info = inspect_chunk(b"[DONE]")

    assert (True, False, 0) == (info.is_done, info.is_usage_only, info.content_pieces)


def test_inspect_chat_content_chunk() -> None:
    """A vLLM chat chunk with content counts one piece and carries its text."""
    info = inspect_chunk(_chat_chunk("Hello"))

    expected = StreamChunkInfo(
        is_done=False, is_usage_only=False, usage=None, content_pieces=1, text="Hello", error=None
    )
    assert expected == info


def test_inspect_role_only_chunk() -> None:
    """The first chunk, carrying only the role and empty content, counts no piece."""
    payload = orjson.dumps(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        }
    )

    assert EMPTY == inspect_chunk(payload)


def test_inspect_several_choices() -> None:
    """A chunk with n choices counts each choice that carries text."""
    payload = orjson.dumps(
        {
            "choices": [
                {"index": 0, "delta": {"content": "a"}},
                {"index": 1, "delta": {"content": "b"}},
                {"index": 2, "delta": {}, "finish_reason": "stop"},
            ]
        }
    )

    info = inspect_chunk(payload)

    assert (2, "ab") == (info.content_pieces, info.text)


def test_inspect_reasoning_and_tool_call_deltas_count_as_pieces() -> None:
    """Reasoning text and tool-call deltas are generated output, though not content text."""
    payload = orjson.dumps(
        {
            "choices": [
                {"index": 0, "delta": {"content": None, "reasoning_content": "hmm"}},
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
                },
            ]
        }
    )

    info = inspect_chunk(payload)

    assert (2, "") == (info.content_pieces, info.text)


def test_inspect_completion_chunk() -> None:
    """A completions chunk carries its text in choices[].text."""
    payload = orjson.dumps(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [{"index": 0, "text": " world", "logprobs": None, "finish_reason": None}],
            "usage": None,
        }
    )

    info = inspect_chunk(payload)

    assert (1, " world", None) == (info.content_pieces, info.text, info.usage)


def test_inspect_usage_only_chunk() -> None:
    """The include_usage chunk has empty choices and the integer usage fields."""
    payload = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 30,
                "total_tokens": 42,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }
    )

    expected = StreamChunkInfo(
        is_done=False,
        is_usage_only=True,
        usage={"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        content_pieces=0,
        text="",
        error=None,
    )
    assert expected == inspect_chunk(payload)


def test_inspect_content_chunk_with_usage_is_not_usage_only() -> None:
    """A chunk carrying both content and usage (continuous usage stats) is not usage-only."""
    info = inspect_chunk(_chat_chunk("x", usage={"prompt_tokens": 1, "total_tokens": 2}))

    assert (False, {"prompt_tokens": 1, "total_tokens": 2}, 1) == (
        info.is_usage_only,
        info.usage,
        info.content_pieces,
    )


def test_inspect_error_event() -> None:
    """An OpenAI-style error event carries its error object."""
    error = {"message": "boom", "type": "server_error", "param": None, "code": 500}

    info = inspect_chunk(orjson.dumps({"error": error}))

    assert (error, False, 0) == (info.error, info.is_done, info.content_pieces)


def test_inspect_flat_vllm_error() -> None:
    """vLLM's flat error body (object: error) is read as an error."""
    body = {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}

    assert body == inspect_chunk(orjson.dumps(body)).error


def test_inspect_string_error_is_wrapped() -> None:
    """An error given as a bare string becomes an error object with that message."""
    assert {"message": "overloaded"} == inspect_chunk(b'{"error": "overloaded"}').error


def test_inspect_garbage_is_malformed_and_odd_shapes_are_empty() -> None:
    """Payloads that are not JSON objects read as malformed; odd shapes as an empty chunk."""
    malformed = [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"']
    odd = [b'{"choices": "nope"}', b'{"choices": [1, null, {"delta": "x"}]}']

    assert [True] * len(malformed) == [inspect_chunk(p).malformed for p in malformed]
    assert [0] * len(malformed) == [inspect_chunk(p).content_pieces for p in malformed]
    assert [EMPTY] * len(odd) == [inspect_chunk(p) for p in odd]


@given(payload=st.binary())
def test_inspect_never_raises(payload: bytes) -> None:
    """Any bytes at all can be inspected."""
    assert isinstance(inspect_chunk(payload), StreamChunkInfo)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # the common chunk (read without the general walk), with and without vLLM's null usage
        (b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}', (CHUNK, None, 1, "hi")),
        (b'{"choices":[{"delta":{"content":"hi"}}],"usage":null}', (CHUNK, None, 1, "hi")),
        # the shapes the general walk reads
        (b'{"choices":[{"delta":{"content":""}}]}', (CHUNK, None, 0, "")),
        (b'{"choices":[{"delta":{"reasoning_content":"r"}}]}', (CHUNK, None, 1, "")),
        (b'{"choices":[{"text":"a"},{"text":"b"}]}', (CHUNK, None, 2, "ab")),
        (b'{"choices":["x"]}', (CHUNK, None, 0, "")),
        (
            b'{"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}',
            (CHUNK, {"prompt_tokens": 1}, 1, "x"),
        ),
        (
            b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"d":{}}}',
            (CHUNK_USAGE_ONLY, {"prompt_tokens": 1, "completion_tokens": 2}, 0, ""),
        ),
        (b" [DONE] ", (CHUNK_DONE, None, 0, "")),
        (b'{"choices":[{"delta":{"content":"x"}', (CHUNK_MALFORMED, None, 0, "")),
        (b"[1]", (CHUNK_MALFORMED, None, 0, "")),
        (
            b'{"error":"boom","choices":[{"delta":{"content":"x"}}]}',
            (CHUNK_ERROR, {"message": "boom"}, 0, ""),
        ),
    ],
)
def test_read_chunk_reads_what_inspect_chunk_reads(
    payload: bytes, expected: tuple[object, ...]
) -> None:
    """The relay's tuple reading (its fast path for the common chunk included) says what the
    ``StreamChunkInfo`` says."""
    assert read_chunk(payload) == expected
    info = inspect_chunk(payload)
    kind, found, pieces, text = expected
    assert info.is_done == (kind == CHUNK_DONE)
    assert info.malformed == (kind == CHUNK_MALFORMED)
    assert info.is_usage_only == (kind == CHUNK_USAGE_ONLY)
    assert (info.error if kind == CHUNK_ERROR else info.usage) == found
    assert (info.content_pieces, info.text) == (pieces, text)
