"""langchain-openai's ``ChatOpenAI`` through the gateway: ordinary calls and streams work, and a
prompt past the context window raises LangChain's own context-overflow error (which its users
catch to trim the history), since the gateway's 400 carries ``code: context_length_exceeded``."""

from __future__ import annotations

import pytest
from langchain_core.exceptions import ContextOverflowError
from langchain_openai import ChatOpenAI

from gateway_helpers import ADMIN_KEY, Stack

LONG = "word " * 8000  # ~10,000 estimated tokens, past sim-chat's 8,192-token window


def _model(stack: Stack) -> ChatOpenAI:
    return ChatOpenAI(
        model="sim-chat",
        base_url=stack.gateway + "/v1",
        api_key=ADMIN_KEY,  # type: ignore[arg-type]
        max_retries=0,
        max_tokens=16,
    )


def test_invoke_and_stream_through_the_gateway(stack: Stack) -> None:
    model = _model(stack)
    reply = model.invoke("Say hello")
    assert isinstance(reply.content, str)
    assert reply.content
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] > 0
    chunks = list(model.stream("Say hello"))
    assert "".join(str(c.content) for c in chunks)


def test_a_prompt_past_the_window_raises_langchains_context_overflow(stack: Stack) -> None:
    with pytest.raises(ContextOverflowError):
        _model(stack).invoke(LONG)
