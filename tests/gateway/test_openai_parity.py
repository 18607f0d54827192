"""OpenAI parity at the gateway's edges, through the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import openai
import pytest

from gateway_helpers import ADMIN_KEY, Stack, chat, error_of, post_json

CHAT = "/v1/chat/completions"
LONG = "word " * 8000  # ~10,000 estimated tokens, past sim-chat's 8,192-token window


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
    assert error["message"].startswith("This model's maximum context length is 8192 tokens.")


def test_reply_budget_counts_against_the_context_window(stack: Stack) -> None:
    """A short prompt with a max_tokens past the window is refused too, naming both parts."""
    status, _, body = post_json(stack.gateway, CHAT, chat(max_tokens=9000))
    assert 400 == status
    assert "in the completion" in error_of(body)["message"]


def test_sdk_raises_bad_request_with_the_context_code(stack: Stack) -> None:
    """The openai SDK raises BadRequestError whose code is context_length_exceeded."""
    client = openai.OpenAI(base_url=stack.gateway + "/v1", api_key=ADMIN_KEY, max_retries=0)
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
