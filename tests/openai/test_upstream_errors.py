"""Tests for reading model servers' error bodies as OpenAI's error shape."""

from __future__ import annotations

import orjson
import pytest

from citadel.openai.upstream_errors import UpstreamErrorFields, read_upstream_error


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens.",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            UpstreamErrorFields(
                "This model's maximum context length is 8192 tokens.",
                "invalid_request_error",
                "messages",
                "context_length_exceeded",
            ),
        ),
        (
            400,
            {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400},
            UpstreamErrorFields("bad", "invalid_request_error", None, "400"),
        ),
        (
            422,
            {"detail": [{"loc": ["body", "messages", 0], "msg": "field required"}]},
            UpstreamErrorFields("field required", "invalid_request_error", "messages.0", None),
        ),
        (
            413,
            {"error": "too big"},
            UpstreamErrorFields("too big", "invalid_request_error", None, None),
        ),
        (
            429,
            {"error": {"message": "slow down"}},
            UpstreamErrorFields("slow down", "rate_limit_exceeded", None, None),
        ),
    ],
)
def test_error_fields_are_kept(status: int, body: object, expected: UpstreamErrorFields) -> None:
    """Every field the server sent is kept; the missing ones come from the status."""
    assert expected == read_upstream_error(status, orjson.dumps(body))


def test_plain_text_body_becomes_the_message() -> None:
    """A body that is not JSON is the message as text; an empty one names the status."""
    assert UpstreamErrorFields("Bad Request", "invalid_request_error", None, None) == (
        read_upstream_error(400, b"  Bad Request\n")
    )
    assert "HTTP 413" == read_upstream_error(413, b"").message
