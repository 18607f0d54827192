"""Bad input gets a 4xx with an OpenAI-style error body naming the problem: never a 500."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

from gateway_helpers import Stack, chat, error_of, post_json, request

CHAT = "/v1/chat/completions"


def test_malformed_json_is_a_400_naming_json(stack: Stack) -> None:
    """A body that is not JSON is a 400 with code invalid_json."""
    status, headers, body = request(stack.gateway, "POST", CHAT, b'{"model": "sim-chat",')
    assert 400 == status
    assert "invalid_json" == error_of(body)["code"]
    assert headers["x-request-id"]


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "sim-chat"}, "messages"),
        ({"model": "sim-chat", "messages": "hello"}, "messages"),
        (
            {"model": "sim-chat", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (chat(max_tokens="ten"), "max_tokens"),
        (chat(temperature=7), "temperature"),
        (chat(stream="yes"), "stream"),
        ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_missing_and_mistyped_fields_are_400s_naming_the_field(
    stack: Stack, doc: dict[str, object], param: str
) -> None:
    """Each missing or mistyped field is a 400 whose error names it in `param`."""
    status, _, body = post_json(stack.gateway, CHAT, doc)
    assert 400 == status
    error = error_of(body)
    assert param == error["param"]
    assert "invalid_request_error" == error["type"]


def test_top_level_array_is_a_400(stack: Stack) -> None:
    """A JSON body that is not an object is a 400."""
    status, _, body = request(stack.gateway, "POST", CHAT, b"[1, 2]")
    assert 400 == status
    error_of(body)


def test_body_over_the_limit_is_a_413(stack: Stack) -> None:
    """A body over the 1 MiB default limit is a 413, and the gateway keeps serving."""
    huge = chat(content="x" * (1_100_000))
    status, _, body = post_json(stack.gateway, CHAT, huge)
    assert 413 == status
    assert "request_too_large" == error_of(body)["code"]
    assert 200 == post_json(stack.gateway, CHAT, chat())[0]


def test_unknown_model_is_a_404(stack: Stack) -> None:
    """An unknown model is a 404 naming the model."""
    status, _, body = post_json(stack.gateway, CHAT, {**chat(), "model": "gpt-nonexistent"})
    assert 404 == status
    error = error_of(body)
    assert "model_not_found" == error["code"]
    assert "gpt-nonexistent" in error["message"]


def test_embedding_model_on_chat_endpoint_is_a_400(stack: Stack) -> None:
    """A model of the wrong kind for the endpoint is a 400 naming the model."""
    status, _, body = post_json(stack.gateway, CHAT, {**chat(), "model": "sim-embed"})
    assert 400 == status
    assert "model" == error_of(body)["param"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer sk-wrong"}, "invalid_api_key"),
        ({"authorization": "Basic abc"}, "invalid_authorization"),
    ],
)
def test_missing_or_wrong_key_is_a_401(stack: Stack, headers: dict[str, str], code: str) -> None:
    """No key, a wrong key, or another scheme is a 401."""
    status, _, body = post_json(stack.gateway, CHAT, chat(), headers, auth=False)
    assert 401 == status
    error = error_of(body)
    assert "authentication_error" == error["type"]
    assert code == error["code"]


def test_models_list_needs_a_key(stack: Stack) -> None:
    """GET /v1/models without a key is a 401."""
    assert 401 == request(stack.gateway, "GET", "/v1/models", auth=False)[0]


def test_unsupported_content_type_is_a_415(stack: Stack) -> None:
    """A form-encoded body (curl -d's default) is a 415."""
    status, _, body = request(
        stack.gateway,
        "POST",
        CHAT,
        b"model=sim-chat",
        {"content-type": "application/x-www-form-urlencoded"},
    )
    assert 415 == status
    error_of(body)


def test_unknown_path_and_wrong_method(stack: Stack) -> None:
    """An unknown path is a 404 and a GET on a POST endpoint a 405, both OpenAI-shaped."""
    status, _, body = request(stack.gateway, "GET", "/v1/nothing-here")
    assert 404 == status
    error_of(body)
    status, _, body = request(stack.gateway, "GET", CHAT)
    assert 405 == status
    error_of(body)


def test_garbage_bytes_get_a_400_and_a_closed_connection(stack: Stack) -> None:
    """Bytes that are not HTTP get a 400 and the connection closes: never a hang."""
    parts = urlsplit(stack.gateway)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400")


def test_request_id_is_the_gateways_and_the_callers_is_kept(stack: Stack) -> None:
    """The gateway answers with its own x-request-id (as OpenAI does); a caller's comes back as
    x-client-request-id."""
    status, headers, _ = post_json(stack.gateway, CHAT, chat(), {"x-request-id": "abc-123"})
    assert 200 == status
    assert "abc-123" == headers["x-client-request-id"]
    assert headers["x-request-id"].startswith("req_")
    assert int(headers["openai-processing-ms"]) >= 0
    assert "sim-chat" == headers["x-citadel-model"]
    assert "sim-a" == headers["x-citadel-deployment"]


@pytest.mark.parametrize("levels", [65, 300, 1023])
def test_deeply_nested_json_is_a_400_not_a_500(stack: Stack, levels: int) -> None:
    """A body nested past 64 levels is refused with a 400 naming the limit."""
    raw = b'{"model": "sim-chat", "messages": [{"role": "user", "content": "x"}], "x": '
    raw += b"[" * levels + b"]" * levels + b"}"
    status, _, body = request(stack.gateway, "POST", CHAT, raw)
    assert 400 == status
    assert "64 levels" in error_of(body)["message"]
