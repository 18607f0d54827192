"""Tests for token estimation."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

from typing import Any

import orjson
import pytest

from citadel.openai.requests import Endpoint, parse_request
from citadel.openai.tokens import estimate_prompt_tokens, estimate_tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("a", 1, id="one-char-is-one-token"),
        pytest.param("abcdef", 2, id="six-chars"),
        pytest.param("x" * 400, 100, id="four-hundred-chars"),
    ],
)
def test_estimate_tokens_is_a_quarter_of_the_characters(text: str, expected: int) -> None:
    """Non-empty text estimates at about four characters per token, never below one."""
    assert expected == estimate_tokens(text)


def test_chat_prompt_adds_message_overhead() -> None:
    """A chat prompt counts its text plus 3 tokens per message and 3 to prime the reply."""
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "x" * 40},
            {"role": "user", "content": "y" * 39},
        ],
    }
    req = parse_request("chat", orjson.dumps(body))

    assert 20 + 3 * 2 + 3 == estimate_prompt_tokens(req)


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        pytest.param("completion", {"model": "m", "prompt": "x" * 80}, 20, id="completion-text"),
        pytest.param("completion", {"model": "m", "prompt": [5, 6, 7]}, 3, id="completion-ids"),
        pytest.param("completion", {"model": "m", "prompt": ""}, 0, id="completion-empty"),
        pytest.param(
            "embedding", {"model": "m", "input": [[1, 2], [3]]}, 3, id="embedding-id-lists"
        ),
        pytest.param(
            "embedding", {"model": "m", "input": ["abcd", "efgh"]}, 2, id="embedding-texts"
        ),
    ],
)
def test_prompt_estimate_counts_text_or_token_ids(
    endpoint: Endpoint, body: dict[str, Any], expected: int
) -> None:
    """Completion and embedding prompts count their text estimate, or their ids if given as ids."""
    req = parse_request(endpoint, orjson.dumps(body))

    assert expected == estimate_prompt_tokens(req)
