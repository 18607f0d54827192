"""Cheap token estimates, without a tokenizer.

These are estimates, not counts: the limiter reserves tokens with them before a request is sent
and reconciles to the upstream's reported usage afterwards, so they need to be fast and roughly
right, not exact. The rule is OpenAI's rule of thumb for English text, about four characters per
token; code and non-Latin scripts run denser, which the reconciliation corrects.
"""

from __future__ import annotations

from typing import Any

from citadel.errors import BadRequest
from citadel.openai.requests import ParsedRequest

__all__ = [
    "CHARS_PER_TOKEN",
    "MESSAGE_OVERHEAD",
    "REPLY_PRIMING",
    "check_context_window",
    "estimate_prompt_tokens",
    "estimate_tokens",
]

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 3
"""Tokens the chat format adds around each message (OpenAI cookbook, num_tokens_from_messages)."""
REPLY_PRIMING = 3
"""Tokens that prime the assistant's reply (``<|start|>assistant<|message|>``)."""


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of ``text``: ``0`` if empty, else ``max(1, round(len(text) / 4))``."""
    if not text:
        return 0
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def estimate_prompt_tokens(req: ParsedRequest) -> int:
    """Estimate the prompt tokens of a request.

    Chat: the text estimate plus 3 tokens per message and 3 to prime the reply. Completion and
    embedding: the text estimate, or the number of ids when the prompt is given as token ids.
    """
    if req.endpoint == "chat":
        messages: list[Any] = req.body["messages"]
        return estimate_tokens(req.prompt_text) + MESSAGE_OVERHEAD * len(messages) + REPLY_PRIMING
    prompt = req.body["prompt" if req.endpoint == "completion" else "input"]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return len(prompt)
        if isinstance(first, list):
            return sum(len(ids) for ids in prompt)
    return estimate_tokens(req.prompt_text)


def check_context_window(req: ParsedRequest, context_window: int) -> None:
    """Refuse a request whose prompt estimate plus reply budget exceeds the model's window.

    The error is OpenAI's (400, ``param: messages``, ``code: context_length_exceeded``, its
    wording), which clients catch to trim the conversation and retry.
    """
    prompt = estimate_prompt_tokens(req)
    reply = 0 if req.endpoint == "embedding" else req.max_tokens or 0
    if prompt + reply <= context_window:
        return
    param = "messages" if req.endpoint == "chat" else "prompt"
    if req.endpoint == "embedding":
        param = "input"
    if prompt > context_window:
        # OpenAI's wording today for input past the window, which LangChain's ChatOpenAI also
        # matches to raise its ContextOverflowError (the code alone no longer reaches it: the
        # openai SDK 3's error text holds only the message)
        message = (
            f"Input tokens exceed the configured limit of {context_window} tokens. Your "
            f"messages resulted in {prompt} tokens. Please reduce the length of the messages."
        )
    else:  # the input fits, the reply budget does not: OpenAI's wording naming both parts
        message = (
            f"This model's maximum context length is {context_window} tokens. However, you "
            f"requested {prompt + reply} tokens ({prompt} in the messages, {reply} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    raise BadRequest(
        message,
        param=param,
        code="context_length_exceeded",
    )
