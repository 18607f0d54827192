"""The streaming service against the gateway, in one run: what the WebSocket and the resumable
SSE add to a streamed completion, and how fast live events reach subscribers.

    .venv/bin/python bench/streaming.py [--completions 200] [--concurrency 16] [--events 5000]

Started here: the simulator, the gateway (:8000's code, one worker) and the streaming service,
both on Redis (``--redis``, default DB 15), on a fresh SQLite accounts database.

(b) the same streamed chat completions at ``--concurrency``, three ways: the gateway's SSE (the
reference), the streaming service's WebSocket (``/v1/ws``) and its resumable SSE (each event in
the feed before it is sent). Printed: time to first token p50 and the difference from the
gateway's, and tokens/s with the ratio to the gateway's.

(e) live events: ``--events`` entries XADDed to the ``alerts`` topic's stream as fast as one
pipeline goes, to ``--subscribers`` SSE subscribers of ``/v1/events`` (at most 64: the per-key
connection cap): events/s delivered to each, and the delivery latency p50/p99 (publish time in
the payload to the moment a subscriber parses it). The reference is the same events read with a
plain ``XREAD BLOCK`` loop on Redis, in the same run (ratio of events/s). A subscriber that falls
more than 1,000 events behind gets ``lagged`` instead (counted and printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sk-admin-bench-streaming-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "citadel", *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code in (200, 503):
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def body(tokens: int) -> dict[str, Any]:
    return {
        "model": "sim-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
    }


async def sse_one(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    async with client.stream("POST", url, json=body(tokens), headers=AUTH) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content"' in line and not first:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


async def ws_one(
    ws: Any, mid: str, tokens: int, inbox: asyncio.Queue[dict[str, Any]]
) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    await ws.send(orjson.dumps({"type": "chat.completion", "id": mid, "body": body(tokens)}))
    while True:
        message = await inbox.get()
        if message["type"] == "chunk" and not first:
            first = time.perf_counter() - started
        if message["type"] in ("done", "error", "cancelled"):
            return first, time.perf_counter() - started


async def completions(
    kind: str, port: int, n: int, concurrency: int, tokens: int
) -> tuple[list[float], float]:
    """TTFTs and tokens/s for ``n`` completions at ``concurrency``."""
    results: list[tuple[float, float]] = []
    started = time.perf_counter()
    if kind == "websocket":
        sockets = []
        for _ in range(concurrency):
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", additional_headers=AUTH)
            sockets.append(ws)

        async def lane(ws: Any, count: int) -> None:
            inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

            async def read() -> None:
                async for raw in ws:
                    await inbox.put(orjson.loads(raw))

            reader = asyncio.create_task(read())
            results.extend([await ws_one(ws, f"r{i}", tokens, inbox) for i in range(count)])
            reader.cancel()

        await asyncio.gather(*(lane(ws, n // concurrency) for ws in sockets))
        for ws in sockets:
            await ws.close()
    else:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:

            async def sse_lane(count: int) -> None:
                results.extend([await sse_one(client, url, tokens) for _ in range(count)])

            await asyncio.gather(*(sse_lane(n // concurrency) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return [r[0] for r in results], len(results) * tokens / wall


async def events(port: int, redis_url: str, count: int, subscribers: int) -> dict[str, float]:
    from citadel.feed.redis import stream_key
    from citadel.stores.redis import RedisClient

    key = stream_key("alerts")
    latencies: list[float] = []
    received = [0] * subscribers
    done_at = [0.0] * subscribers
    ready = asyncio.Event()
    connected = [0]
    lagged = [0]

    async def subscriber(i: int, client: httpx.AsyncClient) -> None:
        url = f"http://127.0.0.1:{port}/v1/events?topics=alerts"
        async with client.stream("GET", url, headers=AUTH) as r:
            async for line in r.aiter_lines():
                if line.startswith(": connected"):
                    connected[0] += 1
                    if connected[0] == subscribers:
                        ready.set()
                if line.startswith("data: "):
                    data = orjson.loads(line[6:])
                    if "missed" in data:  # a lagged notice: this subscriber fell behind
                        lagged[0] += data["missed"]
                        received[i] += data["missed"]
                    else:
                        latencies.append(time.time() - data["t"])
                        received[i] += 1
                    if received[i] >= count:
                        done_at[i] = time.perf_counter()
                        return

    async def raw_reader(start: str) -> float:
        client = RedisClient.from_url(redis_url, timeout=5)
        got, position = 0, start
        try:
            while got < count:
                reply = await client.execute(
                    "XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", key, position
                )
                if reply:
                    rows = reply[0][1]
                    got += len(rows)
                    position = rows[-1][0]
            return time.perf_counter()
        finally:
            await client.aclose()

    publisher = RedisClient.from_url(redis_url, timeout=5)
    limits = httpx.Limits(max_connections=subscribers + 1)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(subscriber(i, client)) for i in range(subscribers)]
        await asyncio.wait_for(ready.wait(), 30)
        last = await publisher.execute("XREVRANGE", key, "+", "-", "COUNT", 1)
        raw = asyncio.create_task(raw_reader(last[0][0].decode() if last else "0-0"))
        started = time.perf_counter()
        for offset in range(0, count, 500):
            batch = [
                ("XADD", key, "MAXLEN", "~", 10_000, "*", "e", orjson.dumps({"t": time.time()}))
                for _ in range(min(500, count - offset))
            ]
            await publisher.pipeline(batch)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        raw_done = await raw
    await publisher.aclose()
    per_sub = [count / (t - started) for t in done_at]
    latencies.sort()
    return {
        "events_per_s_per_subscriber": statistics.median(per_sub),
        "raw_xread_events_per_s": count / (raw_done - started),
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "lagged": lagged[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--subscribers", type=int, default=32)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    if args.subscribers > 64:
        parser.error("--subscribers: at most 64 (the per-key connection cap)")
    with tempfile.TemporaryDirectory() as tmp:
        sim, gw, st = free_port(), free_port(), free_port()
        config = Path(tmp) / "citadel.yaml"
        config.write_text(
            f"""
accounts: {{database: "sqlite+aiosqlite:///{tmp}/accounts.db"}}
metering: {{stream: "citadel:{{usage}}:bench", spool_path: "{tmp}/spool", journal: false}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "http://127.0.0.1:{sim}", model: sim-chat}}]
"""
        )
        env = {
            "CITADEL_ADMIN_KEY": ADMIN,
            "REDIS_ENDPOINT": args.redis,
            "CITADEL_LOG_LEVEL": "warning",
        }
        base = ["--config", str(config)]
        subprocess.run(
            [sys.executable, "-m", "citadel", *base, "migrate"],
            check=True,
            capture_output=True,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")},
        )
        procs = [start(["sim", "--port", str(sim), "--tbt-ms", "5", "--ttft-ms", "20"], sim, env)]
        try:
            procs.append(
                start([*base, "serve", "gateway", "--port", str(gw), "--workers", "1"], gw, env)
            )
            procs.append(start([*base, "serve", "streaming-api", "--port", str(st)], st, env))
            n, c, k = args.completions, args.concurrency, args.tokens
            asyncio.run(completions("sse", gw, c, c, k))  # warm-up
            asyncio.run(completions("websocket", st, c, c, k))
            rows = {
                "gateway SSE (reference)": asyncio.run(completions("sse", gw, n, c, k)),
                "streaming WebSocket": asyncio.run(completions("websocket", st, n, c, k)),
                "streaming SSE (resumable)": asyncio.run(completions("sse", st, n, c, k)),
            }
            ref_ttft = statistics.median(rows["gateway SSE (reference)"][0]) * 1000
            ref_tps = rows["gateway SSE (reference)"][1]
            print(f"(b) {n} streamed completions of {k} tokens at c={c}")
            print(f"{'':28} {'TTFT p50 ms':>12} {'added ms':>9} {'tokens/s':>10} {'ratio':>6}")
            for name, (ttfts, tps) in rows.items():
                ttft = statistics.median(ttfts) * 1000
                added, ratio = ttft - ref_ttft, tps / ref_tps
                print(f"{name:28} {ttft:12.2f} {added:+9.2f} {tps:10.0f} {ratio:6.2f}")
            e = asyncio.run(events(st, args.redis, args.events, args.subscribers))
            print(f"(e) {args.events} events to {args.subscribers} SSE subscribers of /v1/events")
            print(
                f"events/s per subscriber {e['events_per_s_per_subscriber']:.0f}; plain XREAD "
                f"{e['raw_xread_events_per_s']:.0f} (ratio "
                f"{e['events_per_s_per_subscriber'] / e['raw_xread_events_per_s']:.2f}); "
                f"delivery p50 {e['p50_ms']:.1f} ms, p99 {e['p99_ms']:.1f} ms; "
                f"dropped as lagged: {e['lagged']:.0f}"
            )
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
