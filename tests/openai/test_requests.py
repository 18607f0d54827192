"""Tests for parsing and validating OpenAI request bodies."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

from typing import Any

import orjson
import pytest

from citadel.errors import BadRequest
from citadel.openai.requests import Endpoint, parse_request, with_upstream_fields


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def _raw(body: Any) -> bytes:
    return orjson.dumps(body)


def _error(endpoint: Endpoint, raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_request(endpoint, raw)
    return info.value


def test_chat_request_parses_fields() -> None:
    """A typical streamed chat request yields its model, stream flags, budget and prompt text."""
    body = {
        "model": "llama-3-8b",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 1,
        "stop": ["\n\n"],
        "seed": -3,
        "user": "u-1",
        "n": 1,
        "guided_json": {"type": "object"},
    }

    req = parse_request("chat", _raw(body))

    assert "chat" == req.endpoint
    assert "llama-3-8b" == req.model
    assert body == req.body
    assert req.stream is True
    assert req.include_usage is True
    assert 64 == req.max_tokens
    assert 'You are terse.\nDescribe\n{"x":1}\n42' == req.prompt_text


def test_chat_defaults_without_optional_fields() -> None:
    """A minimal chat request does not stream, asks no usage and sets no token budget."""
    req = parse_request("chat", _raw(_chat()))

    assert (False, False, None, "hi") == (
        req.stream,
        req.include_usage,
        req.max_tokens,
        req.prompt_text,
    )


def test_null_optional_fields_mean_not_given() -> None:
    """JSON null for an optional parameter is accepted as absent, as OpenAI does."""
    body = _chat(stream=None, stream_options=None, max_tokens=None, temperature=None, stop=None)

    req = parse_request("chat", _raw(body))

    assert (False, None) == (req.stream, req.max_tokens)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    """When both budgets are given the newer max_completion_tokens is the one used."""
    req = parse_request("chat", _raw(_chat(max_tokens=10, max_completion_tokens=20)))

    assert 20 == req.max_tokens


def test_completion_request_parses_fields() -> None:
    """A completion request with a list of string prompts joins them as the prompt text."""
    body = {"model": "m", "prompt": ["a", "b"], "stream": True, "max_tokens": 5}

    req = parse_request("completion", _raw(body))

    assert ("completion", "m", True, False, 5, "a\nb") == (
        req.endpoint,
        req.model,
        req.stream,
        req.include_usage,
        req.max_tokens,
        req.prompt_text,
    )


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param("", id="empty-string"),
        pytest.param("Once upon", id="string"),
        pytest.param([1, 2, 3], id="token-ids"),
        pytest.param([[1, 2], [3]], id="token-id-lists"),
    ],
)
def test_completion_prompt_shapes_are_accepted(prompt: Any) -> None:
    """Each prompt shape OpenAI allows parses."""
    req = parse_request("completion", _raw({"model": "m", "prompt": prompt}))

    assert prompt == req.body["prompt"]


def test_embedding_request_parses_fields() -> None:
    """An embedding request takes its prompt text from input and never streams."""
    req = parse_request("embedding", _raw({"model": "e5", "input": ["x", "y"], "dimensions": 8}))

    assert ("embedding", "e5", False, None, "x\ny") == (
        req.endpoint,
        req.model,
        req.stream,
        req.max_tokens,
        req.prompt_text,
    )


def test_token_id_prompts_have_no_text() -> None:
    """A prompt given as token ids has empty prompt text."""
    req = parse_request("embedding", _raw({"model": "e5", "input": [[1, 2], [3]]}))

    assert "" == req.prompt_text


def _orjson_message(raw: bytes) -> str:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return str(exc)
    raise AssertionError(f"{raw!r} is valid JSON")


@pytest.mark.parametrize(
    ("endpoint", "raw", "reason"),
    [
        pytest.param("chat", b"", "the body is empty.", id="empty"),
        pytest.param("chat", b"  \n", "the body is empty.", id="blank"),
        pytest.param("chat", b'{"model": "m",}', _orjson_message(b'{"model": "m",}'), id="comma"),
        pytest.param("embedding", b"\xff", _orjson_message(b"\xff"), id="not-utf8"),
        pytest.param("completion", b'{"model": NaN}', _orjson_message(b'{"model": NaN}'), id="nan"),
    ],
)
def test_unparsable_body_is_invalid_json(endpoint: Endpoint, raw: bytes, reason: str) -> None:
    """A body that is not JSON is a 400 invalid_json error with no param, quoting the parser."""
    error = _error(endpoint, raw)

    assert (
        400,
        "invalid_json",
        None,
        f"We could not parse the JSON body of your request: {reason}",
    ) == (error.status, error.code, error.param, error.message)


def test_top_level_must_be_an_object() -> None:
    """A JSON array at the top level is a 400 naming the type received."""
    error = _error("chat", b"[1, 2]")

    assert (
        400,
        None,
        "Invalid request body: expected a JSON object, but got an array instead.",
    ) == (
        error.status,
        error.param,
        error.message,
    )


ERROR_CASES: list[Any] = [
    # model
    (
        "chat",
        {"messages": [{"role": "user", "content": "x"}]},
        "model",
        "'model' is a required property",
    ),
    (
        "chat",
        _chat(model=7),
        "model",
        "Invalid type for 'model': expected a string, but got an integer instead.",
    ),
    (
        "embedding",
        {"model": "", "input": "x"},
        "model",
        (
            "Invalid 'model': empty string. Expected a string with minimum length "
            "1, but got an empty string instead."
        ),
    ),
    # messages
    ("chat", {"model": "m"}, "messages", "'messages' is a required property"),
    (
        "chat",
        _chat(messages="hi"),
        "messages",
        "Invalid type for 'messages': expected an array, but got a string instead.",
    ),
    (
        "chat",
        _chat(messages=[]),
        "messages",
        (
            "Invalid 'messages': empty array. Expected an array with minimum length "
            "1, but got an empty array instead."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": "a"}, "b"]),
        "messages[1]",
        "Invalid type for 'messages[1]': expected an object, but got a string instead.",
    ),
    (
        "chat",
        _chat(messages=[{"content": "a"}]),
        "messages[0].role",
        "'messages[0].role' is a required property",
    ),
    (
        "chat",
        _chat(messages=[{"role": 1, "content": "a"}]),
        "messages[0].role",
        "Invalid type for 'messages[0].role': expected a string, but got an integer instead.",
    ),
    (
        "chat",
        _chat(
            messages=[
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "robot", "content": "c"},
            ]
        ),
        "messages[2].role",
        (
            "Invalid value: 'robot'. Supported values are: 'system', 'user', "
            "'assistant', 'tool', 'developer', and 'function'."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "user"}]),
        "messages[0].content",
        "'messages[0].content' is a required property",
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": None}]),
        "messages[0].content",
        (
            "Invalid type for 'messages[0].content': expected a string or an array "
            "of objects, but got null instead."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "assistant", "content": None}]),
        "messages[0].content",
        (
            "Invalid type for 'messages[0].content': expected a string or an array "
            "of objects, but got null instead."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": 5}]),
        "messages[0].content",
        (
            "Invalid type for 'messages[0].content': expected a string or an array "
            "of objects, but got an integer instead."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": []}]),
        "messages[0].content",
        (
            "Invalid 'messages[0].content': empty array. Expected an array with "
            "minimum length 1, but got an empty array instead."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": ["hi"]}]),
        "messages[0].content[0]",
        "Invalid type for 'messages[0].content[0]': expected an object, but got a string instead.",
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]),
        "messages[0].content[0].type",
        "'messages[0].content[0].type' is a required property",
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": [{"type": 3}]}]),
        "messages[0].content[0].type",
        (
            "Invalid type for 'messages[0].content[0].type': expected a string, but "
            "got an integer instead."
        ),
    ),
    (
        "chat",
        _chat(messages=[{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]),
        "messages[0].content[0].text",
        (
            "Invalid type for 'messages[0].content[0].text': expected a string, but "
            "got an array instead."
        ),
    ),
    # prompt / input
    ("completion", {"model": "m"}, "prompt", "'prompt' is a required property"),
    (
        "completion",
        {"model": "m", "prompt": {"a": 1}},
        "prompt",
        (
            "Invalid type for 'prompt': expected a string, an array of strings, an "
            "array of integers, or an array of arrays of integers, but got an "
            "object instead."
        ),
    ),
    (
        "completion",
        {"model": "m", "prompt": []},
        "prompt",
        (
            "Invalid 'prompt': empty array. Expected an array with minimum length "
            "1, but got an empty array instead."
        ),
    ),
    (
        "completion",
        {"model": "m", "prompt": ["a", 1]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected a string, but got an integer instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": [1, "a"]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an integer, but got a string instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": [1, True]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an integer, but got a boolean instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": [3, -1]},
        "prompt[1]",
        (
            "Invalid 'prompt[1]': integer below minimum value. Expected a value >= "
            "0, but got -1 instead."
        ),
    ),
    (
        "completion",
        {"model": "m", "prompt": [[1], 2]},
        "prompt[1]",
        "Invalid type for 'prompt[1]': expected an array of integers, but got an integer instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": [[1], [2, 2.5]]},
        "prompt[1][1]",
        "Invalid type for 'prompt[1][1]': expected an integer, but got a decimal instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": [{"a": 1}]},
        "prompt[0]",
        (
            "Invalid type for 'prompt[0]': expected a string, an integer, or an "
            "array of integers, but got an object instead."
        ),
    ),
    ("embedding", {"model": "e"}, "input", "'input' is a required property"),
    (
        "embedding",
        {"model": "e", "input": ""},
        "input",
        (
            "Invalid 'input': empty string. Expected a string with minimum length "
            "1, but got an empty string instead."
        ),
    ),
    (
        "embedding",
        {"model": "e", "input": []},
        "input",
        (
            "Invalid 'input': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead."
        ),
    ),
    (
        "embedding",
        {"model": "e", "input": ["a", ""]},
        "input[1]",
        (
            "Invalid 'input[1]': empty string. Expected a string with minimum "
            "length 1, but got an empty string instead."
        ),
    ),
    (
        "embedding",
        {"model": "e", "input": [[1], []]},
        "input[1]",
        (
            "Invalid 'input[1]': empty array. Expected an array with minimum length "
            "1, but got an empty array instead."
        ),
    ),
    (
        "embedding",
        {"model": "e", "input": 5},
        "input",
        (
            "Invalid type for 'input': expected a string, an array of strings, an "
            "array of integers, or an array of arrays of integers, but got an "
            "integer instead."
        ),
    ),
    # stream
    (
        "chat",
        _chat(stream="true"),
        "stream",
        "Invalid type for 'stream': expected a boolean, but got a string instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": "p", "stream": 1},
        "stream",
        "Invalid type for 'stream': expected a boolean, but got an integer instead.",
    ),
    (
        "embedding",
        {"model": "e", "input": "x", "stream": True},
        "stream",
        "Invalid value for 'stream': embeddings cannot be streamed.",
    ),
    (
        "chat",
        _chat(stream=True, stream_options=True),
        "stream_options",
        "Invalid type for 'stream_options': expected an object, but got a boolean instead.",
    ),
    (
        "chat",
        _chat(stream_options={"include_usage": True}),
        "stream_options",
        "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
    ),
    (
        "chat",
        _chat(stream=False, stream_options={}),
        "stream_options",
        "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
    ),
    (
        "chat",
        _chat(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
        (
            "Invalid type for 'stream_options.include_usage': expected a boolean, "
            "but got a string instead."
        ),
    ),
    # token budget and n
    (
        "chat",
        _chat(max_tokens="10"),
        "max_tokens",
        "Invalid type for 'max_tokens': expected an integer, but got a string instead.",
    ),
    (
        "chat",
        _chat(max_tokens=True),
        "max_tokens",
        "Invalid type for 'max_tokens': expected an integer, but got a boolean instead.",
    ),
    (
        "chat",
        _chat(max_tokens=10.0),
        "max_tokens",
        "Invalid type for 'max_tokens': expected an integer, but got a decimal instead.",
    ),
    (
        "chat",
        _chat(max_tokens=0),
        "max_tokens",
        (
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= "
            "1, but got 0 instead."
        ),
    ),
    (
        "chat",
        _chat(max_completion_tokens=-5),
        "max_completion_tokens",
        (
            "Invalid 'max_completion_tokens': integer below minimum value. Expected "
            "a value >= 1, but got -5 instead."
        ),
    ),
    (
        "chat",
        _chat(max_completion_tokens=5, max_tokens="5"),
        "max_tokens",
        "Invalid type for 'max_tokens': expected an integer, but got a string instead.",
    ),
    (
        "completion",
        {"model": "m", "prompt": "p", "n": 0},
        "n",
        "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
    ),
    (
        "chat",
        _chat(n=False),
        "n",
        "Invalid type for 'n': expected an integer, but got a boolean instead.",
    ),
    # sampling
    (
        "chat",
        _chat(temperature="hot"),
        "temperature",
        "Invalid type for 'temperature': expected a number, but got a string instead.",
    ),
    (
        "chat",
        _chat(temperature=True),
        "temperature",
        "Invalid type for 'temperature': expected a number, but got a boolean instead.",
    ),
    (
        "chat",
        _chat(temperature=2.5),
        "temperature",
        (
            "Invalid 'temperature': decimal above maximum value. Expected a value "
            "<= 2, but got 2.5 instead."
        ),
    ),
    (
        "chat",
        _chat(temperature=-0.1),
        "temperature",
        (
            "Invalid 'temperature': decimal below minimum value. Expected a value "
            ">= 0, but got -0.1 instead."
        ),
    ),
    (
        "completion",
        {"model": "m", "prompt": "p", "top_p": 1.5},
        "top_p",
        "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.5 instead.",
    ),
    (
        "chat",
        _chat(top_p=[1]),
        "top_p",
        "Invalid type for 'top_p': expected a number, but got an array instead.",
    ),
    (
        "chat",
        _chat(stop=5),
        "stop",
        (
            "Invalid type for 'stop': expected a string or an array of strings, but "
            "got an integer instead."
        ),
    ),
    (
        "chat",
        _chat(stop=["a", "b", "c", "d", "e"]),
        "stop",
        (
            "Invalid 'stop': array too long. Expected an array with maximum length "
            "4, but got an array with length 5 instead."
        ),
    ),
    (
        "chat",
        _chat(stop=["a", None]),
        "stop[1]",
        "Invalid type for 'stop[1]': expected a string, but got null instead.",
    ),
    (
        "chat",
        _chat(seed=1.5),
        "seed",
        "Invalid type for 'seed': expected an integer, but got a decimal instead.",
    ),
    (
        "chat",
        _chat(seed=False),
        "seed",
        "Invalid type for 'seed': expected an integer, but got a boolean instead.",
    ),
    (
        "embedding",
        {"model": "e", "input": "x", "user": 42},
        "user",
        "Invalid type for 'user': expected a string, but got an integer instead.",
    ),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "message"),
    ERROR_CASES,
    ids=[f"{case[0]}-{case[2]}-{i}" for i, case in enumerate(ERROR_CASES)],
)
def test_invalid_field_is_a_400_naming_its_param(
    endpoint: Endpoint, body: dict[str, Any], param: str, message: str
) -> None:
    """Each invalid field is a 400 whose param names it and whose message says what was expected."""
    error = _error(endpoint, _raw(body))

    assert (400, "invalid_request_error", param, message) == (
        error.status,
        error.type,
        error.param,
        error.message,
    )


def test_error_body_is_openai_shaped() -> None:
    """A validation error renders as OpenAI's error object with message, type, param and code."""
    error = _error("chat", _raw(_chat(max_tokens="10")))

    expected = {
        "error": {
            "message": (
                "Invalid type for 'max_tokens': expected an integer, but got a string instead."
            ),
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "invalid_type",
        }
    }
    assert expected == orjson.loads(error.body())


def test_assistant_with_tool_calls_may_omit_content() -> None:
    """An assistant message with tool calls may have null or missing content."""
    call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": call},
        {"role": "assistant", "content": None, "tool_calls": call},
    ]

    req = parse_request("chat", _raw(_chat(messages=messages)))

    assert "go\n{}\n{}" == req.prompt_text


def test_upstream_body_replaces_model_and_forces_usage() -> None:
    """A streamed request goes upstream under the upstream's model name, asking for usage."""
    body = _chat(stream=True, stream_options={"include_usage": False, "x": 1}, top_k=5)
    req = parse_request("chat", _raw(body))

    upstream = orjson.loads(with_upstream_fields(req, "meta-llama/Llama-3-8B"))

    assert {
        **body,
        "model": "meta-llama/Llama-3-8B",
        "stream_options": {"include_usage": True, "x": 1},
    } == upstream
    assert body == req.body
    assert req.include_usage is False


def test_upstream_body_adds_stream_options_when_absent() -> None:
    """A streamed completion without stream_options gets include_usage set for the upstream."""
    req = parse_request("completion", _raw({"model": "m", "prompt": "p", "stream": True}))

    upstream = orjson.loads(with_upstream_fields(req, "up"))

    assert {
        "model": "up",
        "prompt": "p",
        "stream": True,
        "stream_options": {"include_usage": True},
    } == upstream


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        pytest.param("chat", _chat(), id="chat"),
        pytest.param("embedding", {"model": "m", "input": "x"}, id="embedding"),
    ],
)
def test_upstream_body_without_stream_only_renames_model(
    endpoint: Endpoint, body: dict[str, Any]
) -> None:
    """A request that does not stream is forwarded with only its model changed."""
    req = parse_request(endpoint, _raw(body))

    upstream = orjson.loads(with_upstream_fields(req, "up"))

    assert {**body, "model": "up"} == upstream


def _nested(levels: int) -> bytes:
    """A chat body whose extension field takes the body to ``levels`` levels of nesting."""
    inner = "[" * (levels - 1) + "]" * (levels - 1)
    return (
        b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "x": '
        + inner.encode()
        + b"}"
    )


def test_nesting_up_to_the_limit_parses_and_serialises_upstream() -> None:
    """A body 64 levels deep is accepted and goes upstream intact."""
    parsed = parse_request("chat", _nested(64))
    assert orjson.loads(_nested(64))["x"] == orjson.loads(with_upstream_fields(parsed, "m"))["x"]


@pytest.mark.parametrize(
    ("levels", "code"),
    [
        (65, "json_too_deep"),
        (255, "json_too_deep"),
        (1024, "json_too_deep"),
        (5000, "invalid_json"),
    ],
)
def test_nesting_past_the_limit_is_a_400(levels: int, code: str) -> None:
    """Past 64 levels is a 400 naming the limit; past orjson's own parse limit, invalid JSON."""
    error = _error("chat", _nested(levels))
    assert 400 == error.status
    assert code == error.code
    assert code == "invalid_json" or "64 levels" in error.message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Many brackets in a string are text, not depth."""
    parse_request("chat", _raw(_chat(messages=[{"role": "user", "content": "[{" * 500}])))
