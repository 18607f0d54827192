"""Client disconnects cancel the upstream request; metrics count what happened."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway_helpers import ADMIN_KEY, Stack, chat, metric_value, post_json, request


def scrape(base: str) -> str:
    status, _, body = request(base, "GET", "/metrics", auth=False)
    assert 200 == status
    return body.decode()


def stream_socket(stack: Stack, payload: dict[str, Any], header: bytes) -> socket.socket:
    """A raw socket that has sent one chat request with ``header``, for a test to read and drop."""
    body = orjson.dumps(payload)
    parts = urlsplit(stack.gateway)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {ADMIN_KEY}\r\n".encode()
        + header
        + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def test_client_disconnect_mid_stream_cancels_the_upstream_request(stack: Stack) -> None:
    """Closing the client socket mid-stream makes the gateway abandon the simulator's generation."""
    aborted_before = metric_value(scrape(stack.sim), "citadel_sim_requests_aborted_total")
    gone_before = metric_value(scrape(stack.gateway), "citadel_gateway_client_disconnects_total")
    with stream_socket(stack, chat(max_tokens=200, stream=True), b"x-sim-tbt-ms: 50") as sock:
        received = b""
        while b"content" not in received:
            received += sock.recv(4096)
    deadline = time.monotonic() + 10
    aborted = aborted_before
    while time.monotonic() < deadline and aborted == aborted_before:
        time.sleep(0.05)
        aborted = metric_value(scrape(stack.sim), "citadel_sim_requests_aborted_total")
    assert aborted_before + 1 == aborted
    gone = metric_value(scrape(stack.gateway), "citadel_gateway_client_disconnects_total")
    assert gone_before + 1 == gone


def test_a_client_leaving_after_done_is_a_completed_stream(stack: Stack) -> None:
    """The upstream's end lags [DONE]; a client that closes on [DONE] got it all: 200, not 499."""
    labels = {"endpoint": "chat", "model": "sim-chat", "deployment": "sim-a"}
    before = scrape(stack.gateway)
    with stream_socket(stack, chat(max_tokens=3, stream=True), b"x-sim-fault: linger=1500") as sock:
        received = b""
        while b"data: [DONE]" not in received:
            data = sock.recv(4096)
            assert data, "the gateway closed before [DONE]"
            received += data
    deadline = time.monotonic() + 10
    after = before
    ok = 0.0
    while time.monotonic() < deadline and ok == 0.0:
        time.sleep(0.05)
        after = scrape(stack.gateway)
        ok = metric_value(after, "citadel_gateway_requests_total", status="200", **labels)
        ok -= metric_value(before, "citadel_gateway_requests_total", status="200", **labels)
    assert 1 == ok
    gone = metric_value(after, "citadel_gateway_requests_total", status="499", **labels)
    assert gone == metric_value(before, "citadel_gateway_requests_total", status="499", **labels)
    assert metric_value(before, "citadel_gateway_client_disconnects_total") == metric_value(
        after, "citadel_gateway_client_disconnects_total"
    )


def test_requests_tokens_and_latency_are_counted(stack: Stack) -> None:
    """A completed request moves the request counter, the token counters and the histograms."""
    before = scrape(stack.gateway)
    status, _, body = post_json(stack.gateway, "/v1/chat/completions", chat(max_tokens=9))
    assert 200 == status
    usage = orjson.loads(body)["usage"]
    after = scrape(stack.gateway)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    labels = {"model": "sim-chat", "deployment": "sim-a"}
    assert 1 == delta("citadel_gateway_requests_total", status="200", endpoint="chat", **labels)
    assert 9 == delta("citadel_gateway_tokens_total", token_type="output", **labels)
    assert usage["prompt_tokens"] == delta(
        "citadel_gateway_tokens_total", token_type="input", **labels
    )
    assert 1 == delta("gen_ai_server_request_duration_seconds_count", **labels)
    assert 1 == delta("gen_ai_client_token_usage_count", token_type="output", **labels)


def test_streams_record_time_to_first_token(stack: Stack) -> None:
    """A stream records time to first token and time per output token."""
    before = scrape(stack.gateway)
    status, _, _ = post_json(
        stack.gateway,
        "/v1/chat/completions",
        chat(max_tokens=4, stream=True),
        {"x-sim-ttft-ms": "50"},
    )
    assert 200 == status
    after = scrape(stack.gateway)
    name = "gen_ai_server_time_to_first_token_seconds"
    labels = {"model": "sim-chat", "deployment": "sim-a"}
    assert 1 == metric_value(after, name + "_count", **labels) - metric_value(
        before, name + "_count", **labels
    )
    added = metric_value(after, name + "_sum", **labels) - metric_value(
        before, name + "_sum", **labels
    )
    assert added >= 0.05
    assert 0 < metric_value(after, "gen_ai_server_time_per_output_token_seconds_count", **labels)


def test_health_reports_models(stack: Stack) -> None:
    """/health is ok and lists the models dependency."""
    status, _, body = request(stack.gateway, "GET", "/health", auth=False)
    assert 200 == status
    doc = orjson.loads(body)
    assert "ok" == doc["status"]
    assert "ok" == doc["dependencies"]["models"]["status"]
