"""The simulator's scheduler over real sockets: --max-num-seqs and --kv-cache-tokens make
requests wait, and vLLM's three gauges (running, waiting, KV-cache use) say so."""

# the house style writes `assert expected == actual` (STYLE.md)

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator

import pytest
from test_sim_app import PROMPT_TOKENS, metric

from support import free_port, start_process, stop_process, wait_for


def open_stream(port: int, max_tokens: int, model: str = "sim-chat") -> socket.socket:
    """A streamed chat sent and not read: it runs (or waits) until the socket closes."""
    body = json.dumps(
        {
            "model": model,
            "max_tokens": max_tokens,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-sim-tbt-ms: 200\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body)
    return sock


@pytest.fixture
def limited() -> Iterator[tuple[str, int]]:
    port = free_port()
    args = [sys.executable, "-m", "citadel", "sim", "--port", str(port)]
    proc = start_process([*args, "--max-num-seqs", "2", "--kv-cache-tokens", "200"], port)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        stop_process(proc)


def gauges(url: str) -> tuple[float, float, float]:
    labels = {"model_name": "sim-chat"}
    return (
        metric(url, "vllm:num_requests_running", **labels),
        metric(url, "vllm:num_requests_waiting", **labels),
        metric(url, "vllm:kv_cache_usage_perc", **labels),
    )


def test_max_num_seqs_queues_the_rest_and_a_freed_slot_admits_the_next(
    limited: tuple[str, int],
) -> None:
    url, port = limited
    assert (0, 0, 0) == gauges(url)
    need = PROMPT_TOKENS + 20  # prompt and completion held in the cache
    socks = [open_stream(port, 20) for _ in range(3)]
    try:
        wait_for("two running, one waiting", lambda: gauges(url)[:2] == (2, 1), 5)
        assert pytest.approx(2 * need / 200) == gauges(url)[2]
        socks.pop(0).close()  # a running client leaves: the waiting request is admitted
        wait_for("the waiting request admitted", lambda: gauges(url)[:2] == (2, 0), 5)
        socks.append(open_stream(port, 20))
        wait_for("the new request waiting", lambda: gauges(url)[1] == 1, 5)
        socks.pop().close()  # a waiting client leaves: no longer waiting, nothing freed
        wait_for("the waiter gone", lambda: gauges(url)[:2] == (2, 0), 5)
    finally:
        for sock in socks:
            sock.close()
    wait_for("everything released", lambda: gauges(url) == (0, 0, 0), 5)


def test_a_full_kv_cache_makes_a_request_wait_and_a_huge_one_runs_alone(
    limited: tuple[str, int],
) -> None:
    url, port = limited
    big = open_stream(port, 150)  # 161 of 200 tokens
    try:
        wait_for("the big request running", lambda: gauges(url)[0] == 1, 5)
        assert pytest.approx((PROMPT_TOKENS + 150) / 200) == gauges(url)[2]
        small = open_stream(port, 50)  # 61 more would pass 200: it waits with a slot free
        try:
            wait_for("the small one waiting", lambda: gauges(url)[:2] == (1, 1), 5)
        finally:
            small.close()
    finally:
        big.close()
    wait_for("everything released", lambda: gauges(url) == (0, 0, 0), 5)
    huge = open_stream(port, 400)  # more than the whole cache: runs, as nothing else does
    try:
        wait_for("the huge request running", lambda: gauges(url)[:2] == (1, 0), 5)
        assert 1.0 == gauges(url)[2]  # capped at all of it
    finally:
        huge.close()


def test_bad_scheduler_flags_are_refused_by_name() -> None:
    import subprocess

    for flag, value in (("--max-num-seqs", "-1"), ("--kv-cache-tokens", "0")):
        done = subprocess.run(
            [sys.executable, "-m", "citadel", "sim", flag, value],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert 0 != done.returncode
        assert flag in done.stderr
