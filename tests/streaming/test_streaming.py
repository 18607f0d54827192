"""The streaming service on a real socket, in front of the simulator, with the real Redis:
the `websockets` client for /v1/ws, raw HTTP for SSE."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from citadel.stores.redis import RedisClient

from support import free_port, start_process, stop_process

REDIS_URL = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")
ADMIN_KEY = "sk-admin-streaming-test-key-0123456789"


@dataclass
class Stack:
    sim: int
    ports: list[int]  # two streaming-service replicas on one Redis
    config: Path
    env: dict[str, str]

    def url(self, replica: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[replica]}"

    def ws(self, replica: int = 0) -> str:
        return f"ws://127.0.0.1:{self.ports[replica]}/v1/ws"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("streaming")
    sim_port = free_port()
    stream = f"citadel:{{usage}}:test:{uuid.uuid4().hex}"
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "sqlite+aiosqlite:///{tmp / "accounts.db"}"}}
metering: {{stream: "{stream}", spool_path: "{tmp / "spool"}"}}
models:
  - name: sim-chat
    deployments:
      - {{name: sim-a, url: "http://127.0.0.1:{sim_port}", model: sim-chat}}
"""
    )
    sim = start_process(
        [sys.executable, "-m", "citadel", "sim", "--port", str(sim_port), "--tbt-ms", "20"],
        sim_port,
    )
    subprocess.run(
        [sys.executable, "-m", "citadel", "--config", str(config), "migrate"],
        check=True,
        capture_output=True,
    )
    procs, ports = [], [free_port(), free_port()]
    env = {"CITADEL_ADMIN_KEY": ADMIN_KEY, "REDIS_ENDPOINT": REDIS_URL}
    try:
        for port in ports:
            args = [sys.executable, "-m", "citadel", "--config", str(config)]
            args += ["serve", "streaming-api", "--port", str(port)]
            procs.append(start_process(args, port, env=env))
        yield Stack(sim_port, ports, config, env)
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(sim)

        async def clean() -> None:
            client = RedisClient.from_url(REDIS_URL, timeout=1.0)
            await client.execute("DEL", stream)
            await client.aclose()

        asyncio.run(clean())


def chat(tokens: int = 8) -> dict[str, Any]:
    return {
        "model": "sim-chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": tokens,
    }


AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def recv(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


def test_chat_over_websocket_streams_tokens_then_done_with_usage(stack: Stack) -> None:
    async def main() -> None:
        async with websockets.connect(stack.ws(), additional_headers=AUTH) as ws:
            started = time.monotonic()
            await ws.send(orjson.dumps({"type": "chat.completion", "id": "a", "body": chat(10)}))
            first = await recv(ws)
            first_at = time.monotonic() - started
            assert first["type"] == "chunk", first
            assert first["id"] == "a"
            assert first["chunk"]["object"] == "chat.completion.chunk"
            messages = [first]
            while messages[-1]["type"] == "chunk":
                messages.append(await recv(ws))
            done = messages[-1]
            total = time.monotonic() - started
            assert done == {"type": "done", "id": "a", "usage": done["usage"]}
            assert done["usage"]["completion_tokens"] == 10
            assert first_at < total / 2  # the first token came before the simulator finished

    asyncio.run(main())


def test_two_requests_on_one_socket_interleave_and_cancel_stops_one(stack: Stack) -> None:
    async def main() -> None:
        async with websockets.connect(stack.ws(), additional_headers=AUTH) as ws:
            await ws.send(orjson.dumps({"type": "chat.completion", "id": "x", "body": chat(12)}))
            await ws.send(orjson.dumps({"type": "chat.completion", "id": "y", "body": chat(40)}))
            order: list[str] = []
            ended: dict[str, str] = {}
            errors: list[Any] = []
            while len(ended) < 2:
                message = await recv(ws)
                if message["type"] == "chunk":
                    order.append(message["id"])
                    if message["id"] == "y" and order.count("y") == 3:
                        await ws.send(orjson.dumps({"type": "cancel", "id": "y"}))
                else:
                    ended[message["id"]] = message["type"]
                    errors.append(message)
            assert ended == {"x": "done", "y": "cancelled"}, errors
            assert order.count("x") == 12 + 2  # a role chunk, 12 tokens, a finish chunk
            assert 3 <= order.count("y") < 40
            first_y = order.index("y")
            assert "x" in order[first_y:]  # interleaved, not one after the other

    asyncio.run(main())


def test_bad_messages_get_clear_errors_and_the_socket_stays_usable(stack: Stack) -> None:
    async def main() -> None:
        async with websockets.connect(stack.ws(), additional_headers=AUTH) as ws:
            await ws.send("{not json")
            assert (await recv(ws))["error"]["message"] == "A message must be JSON."
            await ws.send(orjson.dumps({"type": "dance", "id": "1"}))
            error = await recv(ws)
            assert error["type"] == "error"
            assert "unknown message type 'dance'" in error["error"]["message"]
            await ws.send(
                orjson.dumps(
                    {
                        "type": "chat.completion",
                        "id": "m",
                        "body": {"model": "nope", "messages": []},
                    }
                )
            )
            error = await recv(ws)
            assert error["id"] == "m"
            assert error["type"] == "error"
            await ws.send(orjson.dumps({"type": "chat.completion", "id": "ok", "body": chat(2)}))
            kinds = [(await recv(ws))["type"]]
            while kinds[-1] == "chunk":
                kinds.append((await recv(ws))["type"])
            assert kinds[-1] == "done"
            assert len(kinds) >= 3
            await ws.send("x" * (2 << 20))
            assert (await recv(ws))["error"]["type"] == "invalid_request_error"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1009

    asyncio.run(main())


def test_a_bad_key_is_refused_with_4401_and_a_message_key_works(stack: Stack) -> None:
    async def main() -> None:
        bad = {"Authorization": "Bearer sk-wrong"}
        async with websockets.connect(stack.ws(), additional_headers=bad) as ws:
            assert (await recv(ws))["type"] == "error"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4401
        async with websockets.connect(stack.ws()) as ws:
            await ws.send(orjson.dumps({"type": "chat.completion", "id": "a", "body": chat(2)}))
            assert (await recv(ws))["error"]["code"] == "missing_api_key"
        async with websockets.connect(stack.ws()) as ws:
            await ws.send(orjson.dumps({"type": "auth", "key": ADMIN_KEY}))
            assert await recv(ws) == {"type": "authenticated"}
        protocols = ["citadel.v1", f"bearer.{ADMIN_KEY}"]
        async with websockets.connect(stack.ws(), subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "citadel.v1"
            await ws.send(orjson.dumps({"type": "chat.completion", "id": "a", "body": chat(1)}))
            assert (await recv(ws))["type"] == "chunk"

    asyncio.run(main())


def test_sse_chat_completions_work_as_on_the_gateway(stack: Stack) -> None:
    body = {**chat(5), "stream": True}
    with httpx.stream(
        "POST", stack.url() + "/v1/chat/completions", json=body, headers=AUTH, timeout=10
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    whole = httpx.post(stack.url() + "/v1/chat/completions", json=chat(3), headers=AUTH, timeout=10)
    assert whole.status_code == 200
    assert whole.json()["usage"]["completion_tokens"] == 3
    refused = httpx.post(stack.url() + "/v1/chat/completions", json=chat(3), timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "missing_api_key"


def user_key(stack: Stack) -> str:
    """A new user (default tier) and a key of theirs."""
    from citadel.accounts.sql import open_store

    async def make() -> str:
        store = await open_store(
            f"sqlite+aiosqlite:///{stack.config.parent / 'accounts.db'}", migrate=False
        )
        try:
            user = await store.create_user(
                name="t", email=f"{uuid.uuid4().hex}@example.com", tier="free"
            )
            _, secret = await store.create_key(user.id, name="test")
            return secret
        finally:
            await store.aclose()

    return asyncio.run(make())


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each SSE event."""
    event_id: str | None = None
    for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]
            event_id = None


def test_a_streamed_completion_resumes_on_another_replica_from_last_event_id(
    stack: Stack,
) -> None:
    """The client reads three events and drops the connection; the generation runs on, and
    /v1/streams/{id} on the other replica, from the last id it saw, gives the rest: with the
    three, every event exactly once, in order, ending in [DONE]."""
    body = {**chat(30), "stream": True}
    with httpx.stream(
        "POST", stack.url(0) + "/v1/chat/completions", json=body, headers=AUTH, timeout=10
    ) as r:
        assert r.status_code == 200
        stream_id = r.headers["x-citadel-stream-id"]
        seen = []
        for event_id, data in sse_events(r.iter_lines()):
            assert event_id is not None
            seen.append((event_id, data))
            if len(seen) == 3:
                break
    assert orjson.loads(seen[0][1])["object"] == "chat.completion.chunk"
    url = stack.url(1) + f"/v1/streams/{stream_id}"
    with httpx.stream("GET", url, headers={**AUTH, "Last-Event-ID": seen[-1][0]}, timeout=10) as r:
        assert r.status_code == 200
        rest = list(sse_events(r.iter_lines()))
    assert rest[-1][1] == "[DONE]"
    whole = list(sse_events(httpx.get(url, headers=AUTH, timeout=10).iter_lines()))
    assert seen + rest == whole  # from the start: the same events, each once, in order
    chunks = [orjson.loads(d) for _, d in whole[:-1]]
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(tokens) == 30  # the tokens generated after the client left are there too
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_attaching_refuses_other_keys_unknown_ids_and_bad_positions(stack: Stack) -> None:
    body = {**chat(2), "stream": True}
    r = httpx.post(stack.url() + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
    stream_id = r.headers["x-citadel-stream-id"]
    other = {"Authorization": f"Bearer {user_key(stack)}"}
    refused = httpx.get(stack.url() + f"/v1/streams/{stream_id}", headers=other)
    assert refused.status_code == 404
    assert refused.json()["error"]["param"] == "id"
    unknown = httpx.get(stack.url() + "/v1/streams/gen_" + "0" * 32, headers=AUTH)
    assert unknown.status_code == 404
    assert httpx.get(stack.url() + "/v1/streams/nonsense", headers=AUTH).status_code == 404
    bad = httpx.get(
        stack.url() + f"/v1/streams/{stream_id}", headers={**AUTH, "Last-Event-ID": "x"}
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "Last-Event-ID"
    assert httpx.get(stack.url() + f"/v1/streams/{stream_id}").status_code == 401


def test_usage_from_replica_a_reaches_a_subscriber_on_replica_b_and_sse_resumes(
    stack: Stack,
) -> None:
    async def main() -> None:
        async with websockets.connect(stack.ws(1), additional_headers=AUTH) as sub:
            await sub.send(orjson.dumps({"type": "subscribe", "id": "s", "topics": ["usage"]}))
            subscribed = await recv(sub)
            assert subscribed["type"] == "subscribed"
            assert subscribed["recovered"] is True
            start = subscribed["position"]
            async with websockets.connect(stack.ws(0), additional_headers=AUTH) as ws:
                for i in range(3):
                    await ws.send(
                        orjson.dumps({"type": "chat.completion", "id": f"r{i}", "body": chat(2)})
                    )
                done = 0
                while done < 3:
                    done += (await recv(ws))["type"] == "done"
            events = [await recv(sub) for _ in range(3)]
            assert [e["type"] for e in events] == ["event"] * 3
            assert all(e["data"]["model"] == "sim-chat" for e in events)
            ids = [e["data"]["event_id"] for e in events]
        # SSE from the position before those three: each exactly once, in order
        seen: list[str] = []
        last_id = ""
        async with httpx.AsyncClient(timeout=10) as client:
            headers = {**AUTH, "Last-Event-ID": start}
            async with client.stream(
                "GET", stack.url(1) + "/v1/events?topics=usage", headers=headers
            ) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("id: "):
                        last_id = line[4:]
                    if line.startswith("data: "):
                        seen.append(orjson.loads(line[6:])["event_id"])
                        if len(seen) == 2:
                            break
            headers = {**AUTH, "Last-Event-ID": last_id}
            async with client.stream(
                "GET", stack.url(0) + "/v1/events?topics=usage", headers=headers
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(orjson.loads(line[6:])["event_id"])
                        break
        assert seen == ids

    asyncio.run(main())


def test_a_gateway_publishes_deployment_changes_and_the_digest_shows_usage(stack: Stack) -> None:
    """A gateway process on the same Redis probes a deployment that is down: the health change
    reaches a /v1/events subscriber of the streaming service; requests through the streaming
    service show in the metrics digest."""
    name = f"dead-{uuid.uuid4().hex[:8]}"
    config = stack.config.parent / f"{name}.yaml"
    config.write_text(
        stack.config.read_text()
        + f"""
  - name: {name}
    deployments:
      - {{name: {name}-1, url: "http://127.0.0.1:9"}}
routing: {{health: {{interval_seconds: 0.2, timeout_seconds: 0.5, unhealthy_after: 1}}}}
"""
    )

    async def main() -> None:
        async with websockets.connect(stack.ws(1), additional_headers=AUTH) as sub:
            message = {"type": "subscribe", "id": "s", "topics": ["deployments", "metrics"]}
            await sub.send(orjson.dumps(message))
            assert (await recv(sub))["type"] == "subscribed"
            port = free_port()
            args = [sys.executable, "-m", "citadel", "--config", str(config)]
            gateway = start_process(
                [*args, "serve", "gateway", "--port", str(port)], port, env=stack.env
            )
            try:
                async with websockets.connect(stack.ws(0), additional_headers=AUTH) as ws:
                    for i in range(3):
                        body = {"type": "chat.completion", "id": f"m{i}", "body": chat(1)}
                        await ws.send(orjson.dumps(body))
                    done = 0
                    while done < 3:
                        done += (await recv(ws))["type"] == "done"
                health: dict[str, Any] | None = None
                digests: list[dict[str, Any]] = []
                for _ in range(200):
                    event = await recv(sub)
                    assert event["type"] == "event", event
                    data = event["data"]
                    if event["topic"] == "deployments" and data.get("deployment") == f"{name}-1":
                        health = data
                    if event["topic"] == "metrics":
                        digests.append(data)
                    served = sum(
                        d["models"].get("sim-chat", {}).get("requests_per_second", 0)
                        * d["interval_seconds"]
                        for d in digests
                    )
                    if health is not None and served >= 3 - 0.01:
                        break
            finally:
                stop_process(gateway)
        assert health is not None
        assert (health["kind"], health["healthy"]) == ("health", False)
        assert health["source"].startswith("gateway@")
        assert round(served) >= 3
        assert len({d["source"] for d in digests}) == 1  # one replica publishes the digest

    asyncio.run(main())


def test_events_refuse_bad_topics_positions_and_keys(stack: Stack) -> None:
    r = httpx.get(stack.url() + "/v1/events?topics=usage,nope", headers=AUTH)
    assert r.status_code == 400
    assert "unknown: nope" in r.json()["error"]["message"]
    r = httpx.get(
        stack.url() + "/v1/events?topics=usage", headers={**AUTH, "Last-Event-ID": "usage=x"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "Last-Event-ID"
    r = httpx.get(stack.url() + "/v1/events?topics=usage", headers={"Authorization": "Bearer no"})
    assert r.status_code == 401


def test_health_and_metrics(stack: Stack) -> None:
    health = httpx.get(stack.url() + "/health").json()
    assert health["status"] == "ok"
    assert health["service"] == "streaming-api"
    text = httpx.get(stack.url() + "/metrics").text
    assert 'citadel_streaming_messages_sent_total{protocol="websocket"}' in text
    assert "citadel_streaming_cancellations_total" in text
    asked = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST"}
    preflight = httpx.options(stack.url() + "/v1/chat/completions", headers=asked)
    assert preflight.status_code == 204  # development: gateway.cors_origins is "*"
    assert preflight.headers["access-control-allow-origin"] == "http://page.example"


def test_sigterm_tells_websocket_clients_to_reconnect_with_1012(stack: Stack) -> None:
    port = free_port()
    args = [sys.executable, "-m", "citadel", "--config", str(stack.config)]
    proc = start_process(
        [*args, "serve", "streaming-api", "--port", str(port)], port, env=stack.env
    )

    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with websockets.connect(url, additional_headers=AUTH) as ws:
            await ws.send(orjson.dumps({"type": "subscribe", "id": "s", "topics": ["alerts"]}))
            assert (await recv(ws))["type"] == "subscribed"
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012

    try:
        asyncio.run(main())
    finally:
        assert stop_process(proc) == 0


def test_too_many_connections_for_one_key_are_refused_with_4429(stack: Stack) -> None:
    async def main() -> None:
        sockets = [await websockets.connect(stack.ws(), additional_headers=AUTH) for _ in range(64)]
        try:
            async with websockets.connect(stack.ws(), additional_headers=AUTH) as extra:
                error = await recv(extra)
                assert error["error"]["code"] == "too_many_connections"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await recv(extra)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4429
        finally:
            for ws in sockets:
                await ws.close()
        await asyncio.sleep(0.2)
        async with websockets.connect(stack.ws(), additional_headers=AUTH) as again:
            await again.send(orjson.dumps({"type": "chat.completion", "id": "a", "body": chat(1)}))
            assert (await recv(again))["type"] == "chunk"

    asyncio.run(main())


def test_the_openai_sdk_speaks_responses_over_websocket(stack: Stack) -> None:
    """``client.responses.connect()``: a response.create gets the typed events, text deltas
    before the end, and a completed response with its usage; two lanes run side by side."""
    from openai import AsyncOpenAI
    from openai.lib.responses_websocket import (
        AsyncResponsesWebSocketSession,
        ResponsesWebSocketLimits,
    )

    async def main() -> None:
        async with AsyncOpenAI(api_key=ADMIN_KEY, base_url=stack.url() + "/v1") as client:
            async with client.responses.connect() as connection:
                await connection.response.create(model="sim-chat", input="hi", max_output_tokens=16)
                kinds: list[str] = []
                text = ""
                async for event in connection:
                    kinds.append(event.type)
                    if event.type == "response.output_text.delta":
                        text += event.delta
                    if event.type in ("response.completed", "response.incomplete", "error"):
                        break
                assert kinds[:2] == ["response.created", "response.in_progress"], event
                # the simulator always writes max_output_tokens tokens: the response is cut there
                assert kinds[-1] == "response.incomplete", kinds
                assert kinds.count("response.output_text.delta") == 16
                assert event.type == "response.incomplete"
                assert event.response.incomplete_details is not None
                assert event.response.incomplete_details.reason == "max_output_tokens"
                assert event.response.usage is not None
                assert event.response.usage.output_tokens == 16
                assert event.response.output_text == text
            async with client.responses.connect() as connection:
                limits = ResponsesWebSocketLimits(
                    max_lanes=4,
                    max_events_per_lane=256,
                    max_events=512,
                    max_bytes_per_lane=1 << 20,
                    max_bytes=1 << 21,
                )
                async with AsyncResponsesWebSocketSession(connection, limits=limits) as session:
                    lanes = [session.lane("a"), session.lane("b")]
                    for lane, tokens in zip(lanes, (16, 20), strict=True):
                        await lane.send(
                            {
                                "type": "response.create",
                                "model": "sim-chat",
                                "input": "hello",
                                "max_output_tokens": tokens,
                            }
                        )
                    finals = await asyncio.wait_for(
                        asyncio.gather(*(lane.get_final_response() for lane in lanes)), 15
                    )
                    assert [f.usage.output_tokens for f in finals if f.usage] == [16, 20]
                    assert all(f.status == "incomplete" for f in finals)

    asyncio.run(main())


def test_responses_over_websocket_refuse_bad_messages_with_error_events(stack: Stack) -> None:
    url = f"ws://127.0.0.1:{stack.ports[0]}/v1/responses"

    async def main() -> None:
        async with websockets.connect(url, additional_headers=AUTH) as ws:
            await ws.send(orjson.dumps({"type": "response.dance"}))
            error = await recv(ws)
            assert error["type"] == "error"
            assert "unknown message type" in error["message"]
            assert error["param"] == "type"
            create = {"type": "response.create", "stream_id": "x", "model": "nope", "input": "a"}
            await ws.send(orjson.dumps(create))
            error = await recv(ws)
            assert (error["type"], error["stream_id"]) == ("error", "x")
            assert "nope" in error["message"]
            await ws.send(orjson.dumps({"type": "response.steer", "input": "a"}))
            assert (await recv(ws))["code"] == "unsupported"
            long = {**create, "model": "sim-chat", "max_output_tokens": 200}
            await ws.send(orjson.dumps(long))
            assert (await recv(ws))["type"] == "response.created"
            await ws.send(orjson.dumps(long))  # the same stream_id while it runs
            kinds = []
            while True:
                event = await recv(ws)
                kinds.append(event["type"])
                if event["type"] == "error":
                    assert event["param"] == "stream_id"
                    break
            await ws.send(orjson.dumps({"type": "response.cancel", "stream_id": "x"}))
            while (event := await recv(ws))["type"] != "response.cancelled":
                assert event["type"] != "response.incomplete"
            assert event["stream_id"] == "x"
        async with websockets.connect(url) as ws:
            await ws.send(orjson.dumps({"type": "response.create", "model": "sim-chat"}))
            assert (await recv(ws))["code"] == "missing_api_key"

    asyncio.run(main())


def test_responses_over_http_work_as_on_the_gateway(stack: Stack) -> None:
    body = {"model": "sim-chat", "input": "hi", "max_output_tokens": 16}
    r = httpx.post(stack.url() + "/v1/responses", json=body, headers=AUTH, timeout=10)
    assert r.status_code == 200
    assert r.json()["usage"]["output_tokens"] == 16
    with httpx.stream(
        "POST", stack.url() + "/v1/responses", json={**body, "stream": True}, headers=AUTH
    ) as r:
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "response.created"
    assert events[-1] == "response.incomplete"


def test_the_demo_page_chats_over_the_websocket_and_shows_live_events(stack: Stack) -> None:
    """Headless Chromium opens /demo (the admin key on that request only), connects with a key
    typed into the page, chats, and sees the tokens and the usage event of its own request."""
    from playwright.sync_api import Route, expect, sync_playwright

    assert httpx.get(stack.url() + "/demo").status_code == 401

    def with_admin_key(route: Route) -> None:
        route.continue_(headers={**route.request.headers, "authorization": f"Bearer {ADMIN_KEY}"})

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.route(stack.url() + "/demo", with_admin_key)
            page.goto(stack.url() + "/demo")
            page.fill("#key", ADMIN_KEY)
            page.click("#connect")
            expect(page.locator("#state")).to_have_text("connected", timeout=10_000)
            page.wait_for_timeout(300)  # the events request is open before the chat starts
            page.click("#send")
            expect(page.locator("#status")).to_have_text("done: 20 tokens", timeout=15_000)
            assert len(page.locator("#tokens").inner_text().split()) >= 10
            usage = page.locator('#events li[data-topic="usage"]')
            expect(usage.first).to_contain_text("sim-chat 200 completion_tokens=20", timeout=15_000)
        finally:
            browser.close()
