"""OpenAI parity at the gateway's edges, through the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import orjson
import pytest

from gateway_helpers import ADMIN_KEY, Stack, chat, error_of, post_json, request
from openai_schemas import assert_conforms, assert_event_conforms

CHAT = "/v1/chat/completions"
LONG = "word " * 8000  # ~10,000 estimated tokens, past sim-chat's 8,192-token window


@pytest.fixture
def sdk(stack: Stack) -> Iterator[openai.OpenAI]:
    """The official client on the gateway (closed after the test), without retries."""
    with openai.OpenAI(base_url=stack.gateway + "/v1", api_key=ADMIN_KEY, max_retries=0) as client:
        yield client


def test_prompt_past_the_context_window_is_openais_400(stack: Stack) -> None:
    """A prompt longer than the model's context window is refused before routing, as OpenAI does."""
    status, _, body = post_json(stack.gateway, CHAT, chat(LONG))
    assert 400 == status
    error = error_of(body)
    assert ("invalid_request_error", "messages", "context_length_exceeded") == (
        error["type"],
        error["param"],
        error["code"],
    )
    assert error["message"].startswith("Input tokens exceed the configured limit of 8192 tokens.")


def test_reply_budget_counts_against_the_context_window(stack: Stack) -> None:
    """A short prompt with a max_tokens past the window is refused too, naming both parts."""
    status, _, body = post_json(stack.gateway, CHAT, chat(max_tokens=9000))
    assert 400 == status
    assert "in the completion" in error_of(body)["message"]


def test_sdk_raises_bad_request_with_the_context_code(sdk: openai.OpenAI) -> None:
    """The openai SDK raises BadRequestError whose code is context_length_exceeded."""
    client = sdk
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": LONG}]
        )
    assert "context_length_exceeded" == info.value.code


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ({"tools": "notalist"}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"frequency_penalty": 5}, "frequency_penalty"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_invalid_parameter_is_refused_by_the_gateway(
    stack: Stack, field: dict[str, object], param: str
) -> None:
    """The issue's invalid parameters get the gateway's own 400 naming them (no upstream call)."""
    status, headers, body = post_json(stack.gateway, CHAT, chat(**field))
    assert 400 == status
    assert param == error_of(body)["param"]
    assert "x-citadel-deployment" not in headers


def test_sdk_retrieves_models_and_aliases(sdk: openai.OpenAI) -> None:
    """``models.retrieve`` finds a model and an alias; an unknown name is a 404 model_not_found."""
    client = sdk
    assert ("sim-chat", "model") == (client.models.retrieve("sim-chat").id, "model")
    assert "default" == client.models.retrieve("default").id
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert "model_not_found" == info.value.code


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_sdk_creates_a_response_through_chat(sdk: openai.OpenAI) -> None:
    """``responses.create`` (with a tool) is served by a chat deployment, and stored."""
    client = sdk
    response = client.responses.create(
        model="sim-chat", input="Say hello", instructions="Be brief.", tools=[WEATHER]
    )
    assert ("completed", "sim-chat") == (response.status, response.model)
    assert response.output_text
    assert response.usage is not None
    assert response.usage.output_tokens > 0
    assert response.id == client.responses.retrieve(response.id).id
    follow = client.responses.create(
        model="sim-chat", input="And again", previous_response_id=response.id
    )
    assert follow.usage is not None
    assert follow.usage.input_tokens > response.usage.input_tokens  # the history was sent
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_sdk_streams_a_response(sdk: openai.OpenAI) -> None:
    """``responses.create(stream=True)`` yields typed events ending with the completed response."""
    client = sdk
    events = list(
        client.responses.create(model="sim-chat", input="Say hello", tools=[WEATHER], stream=True)
    )
    kinds = [e.type for e in events]
    assert ["response.created", "response.in_progress"] == kinds[:2]
    assert "response.completed" == kinds[-1]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert text == final.output_text
    assert final.usage is not None
    assert final.usage.total_tokens > 0
    assert [e.sequence_number for e in events] == list(range(len(events)))


def _responses_counted(stack: Stack) -> float:
    _, _, body = _get(stack, "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith('citadel_gateway_requests_total{endpoint="responses"')
    )


def test_responses_are_counted_as_responses_not_chat(stack: Stack, sdk: openai.OpenAI) -> None:
    """Metrics (and the ledger, from the same label) tell Responses requests from chat ones."""
    before = _responses_counted(stack)
    sdk.responses.create(model="sim-chat", input="Say hello", store=False)
    list(sdk.responses.create(model="sim-chat", input="Say hello", store=False, stream=True))
    assert 2 == _responses_counted(stack) - before


def test_sdk_retries_an_upstream_429_after_retry_after(sdk: openai.OpenAI) -> None:
    """An upstream 429 with Retry-After is a 429 the SDK waits for and retries."""
    client = sdk.with_options(max_retries=1)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        client.with_options(default_headers={"x-sim-fault": "status=429"}).chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "hi"}]
        )
    assert time.monotonic() - started >= 0.9  # it waited Retry-After: 1 once


def _get(stack: Stack, path: str) -> tuple[int, dict[str, str], bytes]:
    return request(stack.gateway, "GET", path, b"")


def test_every_reply_conforms_to_openais_schemas(stack: Stack) -> None:
    """Replies, stream chunks, events and errors of every endpoint match OpenAI's description."""
    status, _, body = post_json(stack.gateway, CHAT, chat())
    assert_conforms("CreateChatCompletionResponse", orjson.loads(body))
    status, _, body = post_json(stack.gateway, CHAT, chat(stream=True))
    for chunk in _sse_data(body):
        assert_conforms("CreateChatCompletionStreamResponse", chunk)
    status, _, body = post_json(
        stack.gateway, "/v1/completions", {"model": "sim-chat", "prompt": "Say"}
    )
    assert_conforms("CreateCompletionResponse", orjson.loads(body))
    status, _, body = post_json(
        stack.gateway, "/v1/embeddings", {"model": "sim-embed", "input": ["a", "b"]}
    )
    assert_conforms("CreateEmbeddingResponse", orjson.loads(body))
    assert_conforms("ListModelsResponse", orjson.loads(_get(stack, "/v1/models")[2]))
    assert_conforms("Model", orjson.loads(_get(stack, "/v1/models/sim-chat")[2]))
    status, _, body = post_json(stack.gateway, "/v1/responses", {"model": "sim-chat", "input": "x"})
    assert 200 == status
    assert_conforms("Response", orjson.loads(body))
    status, _, body = post_json(
        stack.gateway, "/v1/responses", {"model": "sim-chat", "input": "x", "stream": True}
    )
    events = [orjson.loads(b.split(b"\ndata: ", 1)[1]) for b in body.split(b"\n\n") if b]
    for event in events:
        assert_event_conforms(event)
    for status, body in [
        post_json(stack.gateway, CHAT, chat(tools="notalist"))[::2],
        post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": "status=422"})[::2],
        post_json(stack.gateway, CHAT, chat(LONG))[::2],
        _get(stack, "/v1/models/nope")[::2],
        post_json(stack.gateway, "/v1/responses", {"model": "sim-chat"})[::2],
    ]:
        assert status >= 400
        assert_conforms("ErrorResponse", orjson.loads(body))


def _sse_data(body: bytes) -> list[object]:
    return [
        orjson.loads(block.removeprefix(b"data: "))
        for block in body.split(b"\n\n")
        if block.startswith(b"data: ") and block != b"data: [DONE]"
    ]


def test_stream_chunks_name_the_model_the_client_asked_for(stack: Stack) -> None:
    """Streamed chunks of an alias or a renamed upstream model carry the client's model name."""
    for name in ("default", "renamed"):
        status, _, body = post_json(stack.gateway, CHAT, chat(stream=True, model=name))
        assert 200 == status
        chunks = _sse_data(body)
        assert chunks
        assert {name} == {c["model"] for c in chunks}  # type: ignore[index]
