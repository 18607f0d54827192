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

(a) ``--idle N`` WebSocket connections (default 10,000), authenticated and then left idle, on
the service's one worker: its RSS before and while they are held (``/proc``), per connection,
and ``/health`` p50/p99 while they are held against the same with none (the reference). Each
key may hold 64 connections and subscriptions, so the bench makes one key per 30.

(c) ``--fanout 1000,10000``: that many WebSocket subscribers of ``alerts``, then
``--fanout-events`` events published one at a time (XADD, a pause between): per event, the time
from the XADD to each subscriber's frame (p50/p99 over every delivery) and to the last
subscriber's (p50/p99 over the events); the reference is a plain ``XREAD BLOCK`` reader of the
same stream in the same run. These clients are a few lines of asyncio protocol (the upgrade,
pongs, a timestamp per frame), so that one client process can hold 10,000 of them and cost far
less per frame than the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import resource
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


class RawWs(asyncio.Protocol):
    """A WebSocket client with no library: the upgrade, pongs to pings, and the arrival time
    and payload of every data frame."""

    def __init__(self, key: str) -> None:
        nonce = base64.b64encode(os.urandom(16)).decode()
        self.request = (
            "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
        ).encode()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.closed = False
        self.frames: list[tuple[float, bytes]] = []
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        assert self.transport is not None
        assert len(payload) < 126
        # Masked with a zero key: XOR with zeros leaves the payload as it is.
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(head.split(b"\r\n")[0].decode()))
                return
            self.upgraded, self.buffer = True, rest
            self.opened.set_result(None)
        buf = self.buffer
        while len(buf) >= 2:
            size, at = buf[1] & 0x7F, 2
            if size >= 126:
                at = 4 if size == 126 else 10
                if len(buf) < at:
                    break
                size = int.from_bytes(buf[2:at], "big")
            if len(buf) < at + size:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[at : at + size], buf[at + size :]
            if opcode == 0x9:
                self.send(payload, 0xA)
            elif opcode == 0x8:
                self.closed = True
            elif opcode in (0x1, 0x2):
                self.frames.append((now, payload))
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)
        self.buffer = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the upgrade"))

    async def frame(self, n: int) -> None:
        """Wait until ``n`` data frames have arrived."""
        while len(self.frames) < n:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter


def make_keys(config: Path, count: int) -> list[str]:
    """``count`` API keys of one new user, straight into the accounts database."""
    from citadel.accounts.sql import open_store

    async def make() -> list[str]:
        store = await open_store(
            f"sqlite+aiosqlite:///{config.parent / 'accounts.db'}", migrate=False
        )
        try:
            user = await store.create_user(
                name="bench", email=f"bench-{os.urandom(6).hex()}@example.com", tier="free"
            )
            return [(await store.create_key(user.id, name=f"b{i}"))[1] for i in range(count)]
        finally:
            await store.aclose()

    return asyncio.run(make())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def open_many(port: int, keys: list[str], n: int, per_key: int) -> list[RawWs]:
    loop = asyncio.get_running_loop()
    clients: list[RawWs] = []
    for offset in range(0, n, 250):  # 250 handshakes at a time: the listen backlog is ~2048
        batch = [RawWs(keys[i // per_key]) for i in range(offset, min(n, offset + 250))]
        await asyncio.gather(
            *(loop.create_connection(lambda c=c: c, "127.0.0.1", port) for c in batch)
        )
        await asyncio.wait_for(asyncio.gather(*(c.opened for c in batch)), 60)
        clients += batch
    return clients


async def health_times(port: int, calls: int) -> list[float]:
    times = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(calls):
            started = time.perf_counter()
            (await client.get(f"http://127.0.0.1:{port}/health")).raise_for_status()
            times.append(time.perf_counter() - started)
    return sorted(times)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def idle(port: int, pid: int, keys: list[str], n: int, calls: int) -> dict[str, float]:
    reference = await health_times(port, calls)
    before = rss_kib(pid)
    clients = await open_many(port, keys, n, 30)
    await asyncio.sleep(3)  # let the service settle (allocations, the per-key counts)
    held = rss_kib(pid)
    loaded = await health_times(port, calls)
    still_open = sum(not c.closed for c in clients)
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    await asyncio.sleep(1)
    return {
        "connections": n,
        "open_after": still_open,
        "rss_before_mib": before / 1024,
        "rss_held_mib": held / 1024,
        "kib_per_connection": (held - before) / n,
        "health_ref_p50_ms": pct(reference, 0.5) * 1000,
        "health_ref_p99_ms": pct(reference, 0.99) * 1000,
        "health_p50_ms": pct(loaded, 0.5) * 1000,
        "health_p99_ms": pct(loaded, 0.99) * 1000,
    }


async def fanout(
    port: int, redis_url: str, keys: list[str], n: int, events: int
) -> dict[str, float]:
    from citadel.feed.redis import stream_key
    from citadel.stores.redis import RedisClient

    key = stream_key("alerts")
    clients = await open_many(port, keys, n, 30)
    for c in clients:
        c.send(b'{"type":"subscribe","id":"s","topics":["alerts"]}')
    await asyncio.wait_for(asyncio.gather(*(c.frame(1) for c in clients)), 120)
    assert all(b'"subscribed"' in c.frames[0][1] for c in clients), clients[0].frames[0]
    publisher = RedisClient.from_url(redis_url, timeout=5)
    reader = RedisClient.from_url(redis_url, timeout=5)
    deliveries: list[float] = []
    last: list[float] = []
    raw: list[float] = []
    missed = 0
    try:
        for i in range(events):
            position = await reader.execute("XREVRANGE", key, "+", "-", "COUNT", 1)
            after = position[0][0].decode() if position else "0-0"
            read = asyncio.create_task(
                reader.execute("XREAD", "COUNT", 10, "BLOCK", 5000, "STREAMS", key, after)
            )
            await asyncio.sleep(0.05)  # the XREAD is blocked before the event exists
            started = time.perf_counter()
            await publisher.execute("XADD", key, "MAXLEN", "~", 10_000, "*", "e", b'{"n":%d}' % i)
            await read
            raw.append(time.perf_counter() - started)
            waiting = [c.frame(i + 2) for c in clients if not c.closed]
            with contextlib.suppress(TimeoutError):  # a socket closed meanwhile never gets it
                await asyncio.wait_for(asyncio.gather(*waiting), 30)
            times = [c.frames[i + 1][0] - started for c in clients if len(c.frames) > i + 1]
            missed += len(clients) - len(times)
            deliveries += times
            last.append(max(times))
            await asyncio.sleep(0.2)
    finally:
        await publisher.aclose()
        await reader.aclose()
        for c in clients:
            assert c.transport is not None
            c.transport.close()
    lagged = sum(b'"lagged"' in payload for c in clients for _, payload in c.frames)
    await asyncio.sleep(1)
    return {
        "subscribers": n,
        "events": events,
        "p50_ms": pct(deliveries, 0.5) * 1000,
        "p99_ms": pct(deliveries, 0.99) * 1000,
        "last_p50_ms": pct(last, 0.5) * 1000,
        "last_p99_ms": pct(last, 0.99) * 1000,
        "xread_p50_ms": pct(raw, 0.5) * 1000,
        "lagged": lagged,
        "missed": missed,
    }


def raise_nofile(need: int) -> None:
    """The soft descriptor limit up to the hard one (the services started here inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < need:
        raise SystemExit(f"RLIMIT_NOFILE is {soft}; {need} descriptors are needed (ulimit -Hn)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--subscribers", type=int, default=32)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--idle", type=int, default=10_000, help="(a) idle connections")
    parser.add_argument("--health-calls", type=int, default=300)
    parser.add_argument("--fanout", default="1000,10000", help="(c) subscriber counts")
    parser.add_argument("--fanout-events", type=int, default=10)
    parser.add_argument("--parts", default="a,b,c,e", help="which of a, b, c, e to run")
    args = parser.parse_args()
    if args.subscribers > 64:
        parser.error("--subscribers: at most 64 (the per-key connection cap)")
    parts = set(args.parts.split(","))
    sizes = [int(n) for n in args.fanout.split(",") if n] if "c" in parts else []
    most = max([args.idle if "a" in parts else 0, *sizes])
    raise_nofile(most + 1000)
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
            keys = make_keys(config, -(-most // 30)) if most else []
            if "a" in parts:
                a = asyncio.run(idle(st, procs[-1].pid, keys, args.idle, args.health_calls))
                print(
                    f"(a) {a['connections']} idle WebSocket connections ({a['open_after']:.0f} "
                    f"still open when measured): RSS {a['rss_before_mib']:.1f} -> "
                    f"{a['rss_held_mib']:.1f} MiB, {a['kib_per_connection']:.1f} KiB per "
                    f"connection; /health p50/p99 {a['health_p50_ms']:.2f}/"
                    f"{a['health_p99_ms']:.2f} ms held, {a['health_ref_p50_ms']:.2f}/"
                    f"{a['health_ref_p99_ms']:.2f} ms with none (reference)",
                    flush=True,
                )
            for size in sizes:
                f = asyncio.run(fanout(st, args.redis, keys, size, args.fanout_events))
                print(
                    f"(c) one event to {size} WebSocket subscribers, {f['events']:.0f} events: "
                    f"delivery p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms; last "
                    f"subscriber p50 {f['last_p50_ms']:.1f} ms, p99 {f['last_p99_ms']:.1f} ms; "
                    f"plain XREAD p50 {f['xread_p50_ms']:.2f} ms (reference); "
                    f"lagged: {f['lagged']:.0f}; not delivered: {f['missed']:.0f}",
                    flush=True,
                )
            if not parts & {"b", "e"}:
                return 0
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
