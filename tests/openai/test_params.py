"""Tests for the validation of OpenAI's optional parameters (types, ranges, enums)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from citadel.errors import BadRequest
from citadel.openai.requests import parse_request


def _chat(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"tools": "notalist"}, "tools", "invalid_type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
            "invalid_value",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
            "invalid_type",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        (
            {"tool_choice": {"type": "function"}},
            "tool_choice.function",
            "missing_required_parameter",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        ({"response_format": "json"}, "response_format", "invalid_type"),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "missing_required_parameter",
        ),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "integer_above_max_value"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"logprobs": "yes"}, "logprobs", "invalid_type"),
        ({"frequency_penalty": 5}, "frequency_penalty", "integer_above_max_value"),
        ({"presence_penalty": -2.5}, "presence_penalty", "decimal_below_min_value"),
        ({"presence_penalty": "high"}, "presence_penalty", "invalid_type"),
        ({"logit_bias": {"50256": 101}}, "logit_bias.50256", "integer_above_max_value"),
        ({"logit_bias": {"the": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": [1]}, "logit_bias", "invalid_type"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "invalid_value"),
        ({"modalities": ["text", "video"]}, "modalities[1]", "invalid_value"),
        ({"modalities": "text"}, "modalities", "invalid_type"),
        ({"metadata": {"k": 1}}, "metadata.k", "invalid_type"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "object_above_max_properties"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "string_above_max_length"),
        ({"parallel_tool_calls": 1}, "parallel_tool_calls", "invalid_type"),
    ],
)
def test_invalid_chat_parameter_is_a_400_naming_it(
    fields: dict[str, Any], param: str, code: str
) -> None:
    """Each invalid optional parameter is refused with its path in ``param`` and OpenAI's code."""
    with pytest.raises(BadRequest) as info:
        parse_request("chat", _chat(**fields))
    assert (param, code) == (info.value.param, info.value.code)
    assert 400 == info.value.status


def test_valid_parameters_and_unknown_fields_pass() -> None:
    """Valid values of every checked parameter, and unknown extensions, pass untouched."""
    fields = {
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
            {"type": "web_search"},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {}}},
        "logprobs": True,
        "top_logprobs": 20,
        "frequency_penalty": -2,
        "presence_penalty": 1.5,
        "logit_bias": {"50256": -100},
        "reasoning_effort": "low",
        "modalities": ["text"],
        "metadata": {"team": "a"},
        "parallel_tool_calls": False,
        "guided_json": {"type": "object"},
        "top_k": 5,
    }
    parsed = parse_request("chat", _chat(**fields))
    assert {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields} == parsed.body


def test_completion_logprobs_is_an_integer_up_to_five() -> None:
    """Legacy completions take ``logprobs`` as an integer in [0, 5], not a boolean."""
    parse_request("completion", orjson.dumps({"model": "m", "prompt": "x", "logprobs": 5}))
    with pytest.raises(BadRequest) as info:
        parse_request("completion", orjson.dumps({"model": "m", "prompt": "x", "logprobs": 6}))
    assert ("logprobs", "integer_above_max_value") == (info.value.param, info.value.code)
