"""Every fault the simulator can inject gets a clear answer, and the gateway keeps serving."""

from __future__ import annotations

import time
from http import HTTPStatus

import orjson
import pytest

from gateway_helpers import Stack, chat, error_of, metric_value, post_json, request

CHAT = "/v1/chat/completions"


def still_serving(stack: Stack) -> None:
    status, _, body = post_json(stack.gateway, CHAT, chat())
    assert 200 == status, body


def sse_events(body: bytes) -> list[bytes]:
    return [
        block.removeprefix(b"data: ")
        for block in body.split(b"\n\n")
        if block.startswith(b"data: ")
    ]


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("status=500", 502, "upstream_500"),
        ("status=502", 502, "upstream_502"),
        ("status=503", 503, "upstream_503"),
    ],
)
def test_upstream_error_statuses_are_mapped(
    stack: Stack, fault: str, status: int, code: str
) -> None:
    """Upstream 5xx become 502 and overload (503) 503, the upstream status in the message."""
    got, _, body = post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": fault})
    assert status == got
    error = error_of(body)
    assert code == error["code"]
    assert fault.split("=")[1] in error["message"]
    still_serving(stack)


def test_upstream_429_stays_a_429_with_its_retry_after(stack: Stack) -> None:
    """An upstream 429 that no other deployment can take is the client's 429, Retry-After kept."""
    got, headers, body = post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": "status=429"})
    assert (429, "1") == (got, headers.get("retry-after"))
    error = error_of(body)
    assert ("rate_limit_exceeded", "simulated_fault") == (error["type"], error["code"])
    still_serving(stack)


@pytest.mark.parametrize("status", [400, 413, 422])
def test_upstream_client_errors_pass_through_whole(stack: Stack, status: int) -> None:
    """An upstream 400/413/422 keeps its status, type, code and message; the deployment is a
    header, not part of the message."""
    got, headers, body = post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": f"status={status}"})
    assert status == got
    assert {
        "message": f"Simulated fault: status {status} ({HTTPStatus(status).phrase}) injected on "
        "request.",
        "type": "invalid_request_error",
        "param": None,
        "code": "simulated_fault",
    } == error_of(body)
    assert "sim-a" == headers.get("x-citadel-deployment")


def test_upstream_400_is_the_callers_error(stack: Stack) -> None:
    """An upstream 400 (the request itself was refused) stays a 400."""
    got, _, body = post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": "status=400"})
    assert 400 == got
    assert "400" in error_of(body)["message"]


def test_malformed_upstream_body_is_a_502(stack: Stack) -> None:
    """A 200 whose body is not JSON is a 502 naming the deployment."""
    got, _, body = post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": "malformed"})
    assert 502 == got
    error = error_of(body)
    assert "upstream_malformed_body" == error["code"]
    assert "sim-a" in error["message"]
    still_serving(stack)


def test_upstream_closing_without_answer_is_a_502(stack: Stack) -> None:
    """An upstream that drops the connection without a response is a 502."""
    got, _, body = post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": "disconnect=1"})
    assert 502 == got
    error_of(body)
    still_serving(stack)


def test_first_byte_timeout_is_a_504(stack: Stack) -> None:
    """An upstream slower than first_byte (0.5 s for this model) is a 504 within about that time."""
    started = time.monotonic()
    got, _, body = post_json(
        stack.gateway, CHAT, {**chat(), "model": "impatient"}, {"x-sim-fault": "latency=3000"}
    )
    elapsed = time.monotonic() - started
    assert 504 == got
    assert "upstream_first_byte_timeout" == error_of(body)["code"]
    assert elapsed < 2.5
    still_serving(stack)


def test_hanging_upstream_is_a_504(stack: Stack) -> None:
    """An upstream that never answers is a 504, not a hang."""
    got, _, body = post_json(
        stack.gateway, CHAT, {**chat(), "model": "impatient"}, {"x-sim-fault": "hang"}
    )
    assert 504 == got
    error_of(body)


def test_total_timeout_is_a_504(stack: Stack) -> None:
    """A response not finished within the total timeout (1 s for this model) is a 504."""
    started = time.monotonic()
    got, _, body = post_json(
        stack.gateway, CHAT, {**chat(), "model": "short"}, {"x-sim-fault": "latency=3000"}
    )
    assert 504 == got, body
    assert "upstream_total_timeout" == error_of(body)["code"]
    assert time.monotonic() - started < 2.5


def test_stream_past_the_total_timeout_ends_with_an_error_event(stack: Stack) -> None:
    """A stream that starts in time but runs past the total timeout (1.5 s) ends with an error."""
    got, _, body = post_json(
        stack.gateway,
        CHAT,
        {**chat(max_tokens=20, stream=True), "model": "impatient"},
        {"x-sim-tbt-ms": "200"},
    )
    assert 200 == got
    last = orjson.loads(sse_events(body)[-1])
    assert "upstream_timeout" == last["error"]["code"]
    assert "total timeout" in last["error"]["message"]


def test_connection_refused_is_a_502_naming_the_deployment(stack: Stack) -> None:
    """A deployment nobody listens on is a 502 naming it."""
    got, _, body = post_json(stack.gateway, CHAT, {**chat(), "model": "dead"})
    assert 502 == got
    error = error_of(body)
    assert "upstream_unreachable" == error["code"]
    assert "dead-a" in error["message"]


def test_connection_refused_is_retried_on_another_deployment(stack: Stack) -> None:
    """When one deployment refuses connections, the request is served by another."""
    for _ in range(4):
        got, headers, _ = post_json(stack.gateway, CHAT, {**chat(), "model": "half-dead"})
        assert 200 == got
        assert "sim-h" == headers["x-citadel-deployment"]


def test_connect_timeout_is_a_504(stack: Stack) -> None:
    """A deployment whose connect hangs is a 504 after the connect timeout (0.5 s)."""
    started = time.monotonic()
    got, _, body = post_json(stack.gateway, CHAT, {**chat(), "model": "blackhole"})
    assert 504 == got
    assert "upstream_connect_timeout" == error_of(body)["code"]
    assert time.monotonic() - started < 3


def test_stream_cut_mid_way_ends_with_an_error_event(stack: Stack) -> None:
    """An upstream closing a stream after 2 tokens ends the client's stream with an error event."""
    got, _, body = post_json(
        stack.gateway, CHAT, chat(max_tokens=10, stream=True), {"x-sim-fault": "disconnect=2"}
    )
    assert 200 == got
    events = sse_events(body)
    last = orjson.loads(events[-1])
    assert "upstream_stream_broken" == last["error"]["code"]
    contents = [
        orjson.loads(e)["choices"][0]["delta"].get("content")
        for e in events[:-1]
        if orjson.loads(e).get("choices")
    ]
    assert 2 == len([c for c in contents if c])
    still_serving(stack)


def test_malformed_stream_ends_with_an_error_event(stack: Stack) -> None:
    """A stream with a non-JSON event ends with an error event instead of relaying garbage."""
    got, _, body = post_json(stack.gateway, CHAT, chat(stream=True), {"x-sim-fault": "malformed"})
    assert 200 == got
    last = orjson.loads(sse_events(body)[-1])
    assert "upstream_stream_broken" == last["error"]["code"]


def test_upstream_errors_are_counted_by_kind(stack: Stack) -> None:
    """Upstream failures show in citadel_gateway_upstream_errors_total by kind."""
    post_json(stack.gateway, CHAT, chat(), {"x-sim-fault": "status=500"})
    _, _, text = request(stack.gateway, "GET", "/metrics")
    value = metric_value(
        text.decode(),
        "citadel_gateway_upstream_errors_total",
        deployment="sim-a",
        kind="status_5xx",
    )
    assert value >= 1
