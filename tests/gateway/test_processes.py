"""The gateway as an operator runs it: several workers on one port, and graceful shutdown."""

from __future__ import annotations

import http.client
import signal
import sys
import threading
import time
from pathlib import Path

import orjson

from gateway_helpers import ADMIN_KEY, Stack, chat, metric_value, request, write_config
from support import free_port, start_process, stop_process


def test_workers_share_a_port_and_metrics_add_up(stack: Stack, tmp_path: Path) -> None:
    """With --workers 2 every request is counted once in /metrics, whichever worker is scraped."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", int(stack.sim.rsplit(":", 1)[1]), free_port(), 9)
    proc = start_process(
        [
            sys.executable,
            "-m",
            "citadel",
            "--config",
            str(config),
            "serve",
            "gateway",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        port,
        env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(30):
            status, _, _ = request(base, "POST", "/v1/chat/completions", orjson.dumps(chat()))
            assert 200 == status
        deadline = time.monotonic() + 10
        seen: list[float] = []
        while time.monotonic() < deadline:
            _, _, text = request(base, "GET", "/metrics", auth=False)
            seen.append(metric_value(text.decode(), "citadel_gateway_requests_total", status="200"))
            if seen[-1] == 30 and len(seen) >= 3 and seen[-3:] == [30, 30, 30]:
                break
            time.sleep(0.3)
        assert [30.0, 30.0, 30.0] == seen[-3:]
    finally:
        assert 0 == stop_process(proc)


def test_sigterm_lets_a_stream_in_flight_finish(stack: Stack, tmp_path: Path) -> None:
    """SIGTERM stops accepting new connections but the stream in flight completes."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", int(stack.sim.rsplit(":", 1)[1]), free_port(), 9)
    proc = start_process(
        [
            sys.executable,
            "-m",
            "citadel",
            "--config",
            str(config),
            "serve",
            "gateway",
            "--port",
            str(port),
        ],
        port,
        env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
    )
    result: dict[str, object] = {}

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=orjson.dumps(chat(max_tokens=20, stream=True)),
            headers={
                "authorization": f"Bearer {ADMIN_KEY}",
                "content-type": "application/json",
                "x-sim-tbt-ms": "100",
            },
        )
        try:
            response = conn.getresponse()
            result["status"] = response.status
            result["body"] = response.read()
        finally:
            conn.close()

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)  # the stream is under way (it lasts about 2 s)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=20)
        assert 0 == proc.wait(timeout=20)
    finally:
        stop_process(proc)
    assert 200 == result["status"]
    body = result["body"]
    assert isinstance(body, bytes)
    assert body.endswith(b"data: [DONE]\n\n")
    assert 20 == body.count(b'"content":"') - body.count(b'"content":""')
