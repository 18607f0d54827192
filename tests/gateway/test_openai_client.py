"""The official openai client, sync and async, against the gateway in front of the simulator."""

from __future__ import annotations

import asyncio

import openai
import pytest

from gateway_helpers import ADMIN_KEY, Stack


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway + "/v1", api_key=ADMIN_KEY, max_retries=0)


def test_chat_completion_relays_content_and_usage(stack: Stack) -> None:
    """A non-streaming chat completion comes back whole, with the simulator's usage."""
    reply = client(stack).chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "Say hello"}], max_tokens=7
    )
    content = reply.choices[0].message.content
    assert content is not None
    assert reply.usage is not None
    assert 7 == reply.usage.completion_tokens
    assert len(content.split()) == reply.usage.completion_tokens
    assert "length" == reply.choices[0].finish_reason
    assert "sim-chat" == reply.model


def test_alias_and_renamed_upstream_model_answer_with_the_requested_name(stack: Stack) -> None:
    """The response names the model the client asked for, not the upstream's name for it."""
    c = client(stack)
    for name in ("default", "renamed"):
        reply = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        assert name == reply.model


def test_streaming_chat_passes_chunks_and_hides_usage_unless_asked(stack: Stack) -> None:
    """A stream yields one chunk per token and no usage chunk when the client did not ask."""
    chunks = list(
        client(stack).chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=5,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert 5 == len(text.split())
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_streaming_chat_with_include_usage_gets_the_usage_chunk(stack: Stack) -> None:
    """With stream_options.include_usage the last chunk carries usage and no choices."""
    chunks = list(
        client(stack).chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert [] == last.choices
    assert last.usage is not None
    assert 6 == last.usage.completion_tokens
    assert last.usage.prompt_tokens > 0


def test_completions_and_embeddings_and_models(stack: Stack) -> None:
    """Legacy completions, embeddings (base64 by default in the client) and the model list work."""
    c = client(stack)
    completion = c.completions.create(model="sim-chat", prompt="Once upon a time", max_tokens=4)
    assert 4 == len(completion.choices[0].text.split())
    embedding = c.embeddings.create(model="sim-embed", input=["hello", "world"])
    assert 2 == len(embedding.data)
    assert 64 == len(embedding.data[0].embedding)
    floats = c.embeddings.create(model="sim-embed", input="hello", encoding_format="float")
    assert pytest.approx(embedding.data[0].embedding, rel=1e-6) == floats.data[0].embedding
    ids = {m.id for m in c.models.list()}
    assert {"sim-chat", "sim-embed", "default", "renamed"} <= ids


def test_async_client_streaming_and_not(stack: Stack) -> None:
    """The async client works too, with concurrent requests on pooled connections."""

    async def main() -> tuple[list[int], str]:
        async with openai.AsyncOpenAI(
            base_url=stack.gateway + "/v1", api_key=ADMIN_KEY, max_retries=0
        ) as c:
            replies = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model="sim-chat",
                        messages=[{"role": "user", "content": f"hello {i}"}],
                        max_tokens=3,
                    )
                    for i in range(20)
                )
            )
            stream = await c.chat.completions.create(
                model="sim-chat",
                messages=[{"role": "user", "content": "stream"}],
                max_tokens=4,
                stream=True,
            )
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return [r.usage.completion_tokens for r in replies if r.usage], text

    counts, text = asyncio.run(asyncio.wait_for(main(), 30))
    assert [3] * 20 == counts
    assert 4 == len(text.split())


def test_seed_makes_output_deterministic(stack: Stack) -> None:
    """The same seed gives the same text through the gateway; another seed differs."""
    c = client(stack)

    def ask(seed: int) -> str:
        reply = c.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "hi"}], seed=seed
        )
        return reply.choices[0].message.content or ""

    assert ask(1) == ask(1)
    assert ask(1) != ask(2)
