"""Tests for the Responses API's translation to and from Chat Completions."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from citadel.errors import BadRequest
from citadel.openai.response_stream import ResponseStream
from citadel.openai.responses import (
    input_items,
    output_messages,
    parse_responses_request,
    response_from_chat,
)

from openai_schemas import assert_conforms, assert_event_conforms

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_request_translates_to_chat() -> None:
    """Instructions, input items, tools, tool choice, format and limits map to chat's fields."""
    req = parse_responses_request(
        {
            "model": "m",
            "instructions": "Be terse.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "message", "role": "user", "content": "thanks"},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 64,
            "temperature": 0.5,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {}}},
            "reasoning": {"effort": "low"},
            "store": False,
        }
    )
    assert {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "user", "content": "thanks"},
        ],
        "temperature": 0.5,
        "max_completion_tokens": 64,
        "tools": [
            {
                "type": "function",
                "function": {k: v for k, v in TOOL.items() if k != "type"},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}},
        "reasoning_effort": "low",
    } == req.chat
    assert (False, None) == (req.store, req.previous_response_id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 3}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"type": "function_call"}]}, "input[0].call_id"),
        ({"model": "m", "input": "x", "tools": "notalist"}, "tools"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "m", "input": "x", "max_output_tokens": 4}, "max_output_tokens"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": "m", "input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"model": "m", "input": "x", "store": "yes"}, "store"),
        ({"model": 1, "input": "x"}, "model"),
    ],
)
def test_invalid_request_names_the_field(body: dict[str, Any], param: str) -> None:
    """A malformed Responses request is a 400 whose ``param`` is the offending field."""
    with pytest.raises(BadRequest) as info:
        parse_responses_request(body)
    assert param == info.value.param


def _chat_reply(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def test_reply_with_text_and_tool_call_conforms() -> None:
    """A chat reply becomes a ``response`` with a message and a function call, as OpenAI's."""
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [TOOL]})
    message = {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    }
    doc = response_from_chat(req, _chat_reply(message), response_id="resp_1", created_at=5)
    assert_conforms("Response", doc)
    assert ["message", "function_call"] == [item["type"] for item in doc["output"]]
    assert "Let me look." == doc["output"][0]["content"][0]["text"]
    assert ("call_1", '{"city":"Oslo"}') == (
        doc["output"][1]["call_id"],
        doc["output"][1]["arguments"],
    )
    assert (7, 3, 10) == (
        doc["usage"]["input_tokens"],
        doc["usage"]["output_tokens"],
        doc["usage"]["total_tokens"],
    )
    assert "completed" == doc["status"]
    assert [message] == output_messages(doc["output"])


def test_length_finish_is_incomplete() -> None:
    """A reply cut by the token limit is ``incomplete`` for ``max_output_tokens``."""
    req = parse_responses_request({"model": "m", "input": "hi", "max_output_tokens": 16})
    doc = response_from_chat(
        req,
        _chat_reply({"role": "assistant", "content": "a"}, "length"),
        response_id="r",
        created_at=1,
    )
    assert_conforms("Response", doc)
    assert ("incomplete", {"reason": "max_output_tokens"}) == (
        doc["status"],
        doc["incomplete_details"],
    )


def _events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        kind, data = block.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert kind.removeprefix(b"event: ").decode() == event["type"]
        events.append(event)
    return events


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_stream_events_nest_and_conform() -> None:
    """Chat chunks become typed events in order, numbered, each valid per OpenAI's schema."""
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [TOOL], "stream": True})
    stream = ResponseStream(req, response_id="resp_s", created_at=3)
    raw = stream.start()
    raw += stream.feed(_chunk({"role": "assistant", "content": ""}))
    raw += stream.feed(_chunk({"content": "Hel"}))
    raw += stream.feed(_chunk({"content": "lo"}))
    call = {"index": 0, "id": "call_9", "function": {"name": "get_weather", "arguments": ""}}
    raw += stream.feed(_chunk({"tool_calls": [call]}))
    raw += stream.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
    raw += stream.feed(_chunk({}, "tool_calls"))
    raw += stream.feed(
        {**_chunk({}), "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}}
    )
    raw += stream.finish()
    events = _events(raw)
    for event in events:
        assert_event_conforms(event)
    assert list(range(len(events))) == [e["sequence_number"] for e in events]
    assert [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ] == [e["type"] for e in events]
    final = events[-1]["response"]
    assert "Hello" == final["output"][0]["content"][0]["text"]
    assert ("call_9", "{}") == (final["output"][1]["call_id"], final["output"][1]["arguments"])
    assert 6 == final["usage"]["total_tokens"]
    assert final == stream.response


def test_failed_stream_ends_with_error_and_failed_events() -> None:
    """A broken upstream ends the stream with ``error``, then ``response.failed``; both conform."""
    req = parse_responses_request({"model": "m", "input": "hi", "stream": True})
    stream = ResponseStream(req, response_id="resp_f", created_at=3)
    events = _events(stream.start() + stream.fail("the upstream broke off", "upstream_error"))
    for event in events:
        assert_event_conforms(event)
    assert ["error", "response.failed"] == [e["type"] for e in events[2:]]


def test_input_items_are_the_inverse_of_the_translation() -> None:
    """A stored conversation (chat messages) as input items translates back to the same
    messages: text, parts with an image, tool calls and their outputs (for a deployment that
    takes the Responses API as it is, continuing a ``previous_response_id``)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        {"role": "tool", "tool_call_id": "call_2", "content": "warm"},
    ]
    items = input_items(messages)
    assert [i["type"] for i in items] == [
        *("message", "message", "message", "function_call", "function_call"),
        *("function_call_output", "function_call_output"),
    ]
    again = parse_responses_request({"model": "m", "input": items}).chat["messages"]
    assert again == messages
