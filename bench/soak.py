"""Soak: mixed load with hostile clients against ``citadel up`` on Redis and PostgreSQL.

Starts ``citadel up`` (the simulator, every service and a ledger writer) with accounts and the
ledger in a new PostgreSQL database and limits, the usage stream and the routing state in Redis,
creates one user whose tier sets every limit (high enough never to refuse), and then for
``--minutes`` alternates one-minute windows:

- **quiet** windows: only the well-behaved clients — closed-loop keep-alive connections sending
  plain chat completions, streamed chat completions and embeddings with the user's key;
- **hostile** windows: the same well-behaved clients, plus slowloris connections (a header line
  every second, never finishing the head), oversized clients (a 64 KiB header), random-key
  clients (401s, from another loopback address so the failed-auth throttle refuses them and not
  the well-behaved ones) and clients that disconnect from a stream at a random point.

It prints the RSS of every process each minute, the responses by status, p50/p99 of the
well-behaved clients in quiet and in hostile windows (same run), the concurrency leases still
held at the end (:9098's usage of the user; must be 0), and the ledger's rows for the user
against the requests the clients sent with its key and saw answered or abandoned (must match).
Targets (issue 16): RSS growth under 5 % after the first minute; the hostile clients cost the
well-behaved ones at most 20 % of p99.

    .venv/bin/python bench/soak.py [--minutes 10] [--window 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import install_uvloop, percentile, system_busy_seconds

from citadel.accounts.sql import open_store

POSTGRES = os.environ.get("CITADEL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("CITADEL_BENCH_REDIS", "redis://127.0.0.1:6379/12")
ADMIN = "sk-soak-admin"
SERVICES = (
    "API_GATEWAY",
    "SIMULATOR",
    "CUSTOM_METRICS",
    "PREDICTIVE_ALERTING",
    "GRAFANA_DASHBOARDS",
    "PROMETHEUS_RULES",
    "GRAPHQL_API",
    "STREAMING_API",
    "ROUTING_API",
    "RATE_LIMITING_API",
)
HOSTILE_SOURCE = "127.0.0.2"  # random keys come from here: the throttle refuses this address

CHAT = {"model": "sim-chat", "messages": [{"role": "user", "content": "Say hello"}]}
BODIES = {
    "plain": json.dumps({**CHAT, "max_tokens": 16}).encode(),
    "stream": json.dumps({**CHAT, "max_tokens": 16, "stream": True}).encode(),
    "embeddings": json.dumps({"model": "sim-embed", "input": "Say hello"}).encode(),
}
PATHS = {
    "plain": "/v1/chat/completions",
    "stream": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request(path: str, body: bytes, key: str, port: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One response: its status and whether the connection stays open."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before a status line")
    status = int(status_line.split()[1])
    length, chunked, close = 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = value == "close"
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)
    return status, not close


@dataclass
class Tally:
    """What the clients saw: statuses per kind, latencies of the well-behaved per window kind."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"quiet": [], "hostile": []})
    keyed: int = 0  # requests with the user's key that were sent whole and answered or abandoned
    errors: Counter[str] = field(default_factory=Counter)


class Soak:
    def __init__(self, port: int, key: str, tally: Tally) -> None:
        self.port = port
        self.key = key
        self.tally = tally
        self.window = "quiet"
        self.hostile = asyncio.Event()
        self.stop = asyncio.Event()

    async def _open(self, source: str | None = None) -> tuple[Any, Any]:
        local = (source, 0) if source else None
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, local_addr=local), 5
        )

    async def well_behaved(self, kind: str) -> None:
        payload = request(PATHS[kind], BODIES[kind], self.key, self.port)
        while not self.stop.is_set():
            try:
                reader, writer = await self._open()
            except (OSError, TimeoutError) as exc:
                self.tally.errors[f"connect {type(exc).__name__}"] += 1
                await asyncio.sleep(0.1)
                continue
            try:
                keep = True
                while keep and not self.stop.is_set():
                    window = self.window
                    started = time.perf_counter()
                    writer.write(payload)
                    status, keep = await asyncio.wait_for(read_reply(reader), 30)
                    self.tally.keyed += 1
                    self.tally.statuses[f"{kind} {status}"] += 1
                    if window == self.window:  # a request across a window change counts in none
                        self.tally.latencies[window].append(time.perf_counter() - started)
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.tally.errors[f"{kind} {type(exc).__name__}"] += 1
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _hostile_loop(self, name: str, once: Any, pause: float) -> None:
        while not self.stop.is_set():
            await self.hostile.wait()
            if self.stop.is_set():
                return
            try:
                outcome = await once()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                outcome = type(exc).__name__
            self.tally.statuses[f"{name} {outcome}"] += 1
            await asyncio.sleep(pause)

    async def slowloris(self) -> str:
        reader, writer = await self._open()
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            for i in range(120):  # the head deadline ends it long before
                if not self.hostile.is_set() or self.stop.is_set():
                    return "gave up"
                writer.write(f"X-Slow-{i}: 1\r\n".encode())
                try:
                    reply = await asyncio.wait_for(reader.read(200), 1.0)
                except TimeoutError:
                    continue
                return reply.split(b" ", 2)[1].decode("latin-1") if reply else "closed"
            return "never refused"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def oversized(self) -> str:
        reader, writer = await self._open()
        try:
            writer.write(
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
            )
            status, _ = await asyncio.wait_for(read_reply(reader), 10)
            return str(status)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def random_key(self) -> str:
        reader, writer = await self._open(HOSTILE_SOURCE)
        try:
            key = f"sk-cit-{secrets.token_urlsafe(32)}"
            writer.write(request("/v1/chat/completions", BODIES["plain"], key, self.port))
            status, _ = await asyncio.wait_for(read_reply(reader), 10)
            return str(status)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def disconnect(self) -> str:
        """A stream with the user's key, abandoned after a random number of bytes (0: before
        the first byte of the reply)."""
        reader, writer = await self._open()
        try:
            writer.write(request(PATHS["stream"], BODIES["stream"], self.key, self.port))
            await writer.drain()
            self.tally.keyed += 1  # sent whole: the gateway must account for it either way
            want = random.choice([0, 1, 200, 600, 1500])
            if want:
                await asyncio.wait_for(reader.read(want), 10)
            return "abandoned"
        finally:
            writer.transport.abort()

    async def run(self, minutes: int, window: float, sample: Any) -> None:
        tasks = [
            asyncio.create_task(self.well_behaved(kind))
            for kind in ("plain", "plain", "stream", "stream", "embeddings")
        ]
        tasks += [
            asyncio.create_task(self._hostile_loop("slowloris", self.slowloris, 0.2))
            for _ in range(8)
        ]
        tasks.append(asyncio.create_task(self._hostile_loop("oversized", self.oversized, 0.5)))
        tasks.append(asyncio.create_task(self._hostile_loop("random-key", self.random_key, 0.1)))
        tasks += [
            asyncio.create_task(self._hostile_loop("disconnect", self.disconnect, 0.2))
            for _ in range(2)
        ]
        start = time.monotonic()
        for minute in range(minutes):
            self.window = "hostile" if minute % 2 else "quiet"
            if self.window == "hostile":
                self.hostile.set()
            else:
                self.hostile.clear()
            await asyncio.sleep(start + (minute + 1) * window - time.monotonic())
            sample(minute + 1, self.window)
        self.stop.set()
        self.hostile.set()  # wake the hostile loops so they see the stop
        await asyncio.wait(tasks, timeout=40)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                out += children
                todo += children
    return out


def rss_mib(pid: int) -> tuple[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [w.decode() for w in cmdline if w]
    # `python -m citadel [--config F] serve NAME | sim | up`, or `citadel ledger-writer`
    name = next(
        (words[i + 1] for i, w in enumerate(words[:-1]) if w == "serve"),
        next((w for w in words if w in ("sim", "up")), "ledger-writer"),
    )
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return name, kib / 1024


def get_json(url: str, key: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as reply:
        return json.loads(reply.read())


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


async def make_user(database: str) -> tuple[str, str]:
    store = await open_store(database, migrate=True)
    try:
        user = await store.create_user(name="soak", email="soak@example.com", tier="soak")
        _, secret = await store.create_key(user.id, name="soak")
        return user.id, secret
    finally:
        await store.aclose()


async def admin_sql(sql: str) -> None:
    connection = await asyncpg.connect(f"{POSTGRES}/postgres", timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def ledger_rows(database: str, user_id: str) -> int:
    connection = await asyncpg.connect(database, timeout=5)
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM usage_events WHERE user_id=$1", user_id)
        )
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10, help="windows to run (default 10)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per window")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    install_uvloop()

    name = f"citadel_soak_{uuid.uuid4().hex[:10]}"
    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    database = f"{POSTGRES}/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="citadel-soak-"))
    stream = f"citadel:{{usage-soak-{os.getpid()}}}:events"
    big = 10**9
    (tmp / "citadel.yaml").write_text(
        f"""
env: production
accounts: {{database: "{database}", default_tier: soak}}
endpoints: {{redis: "{REDIS}"}}
limits: {{backend: "{REDIS}"}}
metering: {{stream: "{stream}", flush_seconds: 0.2, database: "{database}"}}
metrics: {{require_token: false}}
tiers:
  soak: {{requests_per_minute: {big}, tokens_per_minute: {big}, concurrent_requests: 1000,
         tokens_per_day: {big}, tokens_per_month: {big}, cost_per_month_usd: 1000000}}
"""
    )
    ports = {service: free_port() for service in SERVICES}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CITADEL_")},
        **{f"{service}_PORT": str(port) for service, port in ports.items()},
        "CITADEL_ADMIN_KEY": ADMIN,
    }
    config = ["--config", str(tmp / "citadel.yaml")]
    # PostgreSQL tables are made by `citadel migrate` (SQLite ones by the services themselves)
    subprocess.run([sys.executable, "-m", "citadel", *config, "migrate"], env=env, check=True)
    user_id, key = asyncio.run(make_user(database))
    log = (tmp / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "citadel", *config, "up"],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = ports["API_GATEWAY"]
    tally = Tally()
    rss: dict[str, list[float]] = {}
    figures: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 180  # a busy two-core machine starts ten processes slowly
        while not all(healthy(ports[s]) for s in ("API_GATEWAY", "RATE_LIMITING_API")):
            if time.monotonic() > deadline or up.poll() is not None:
                raise SystemExit(f"citadel up did not start; see {tmp / 'up.log'}")
            time.sleep(0.5)
        busy = [system_busy_seconds(), time.monotonic()]

        def sample(minute: int, window: str) -> None:
            now_busy, now = system_busy_seconds(), time.monotonic()
            load = (now_busy - busy[0]) / (now - busy[1]) * 100
            busy[:] = [now_busy, now]
            row = [rss_mib(pid) for pid in [up.pid, *descendants(up.pid)]]
            parts = []
            for entry in row:
                if entry is not None:
                    rss.setdefault(entry[0], []).append(entry[1])
                    parts.append(f"{entry[0]} {entry[1]:.0f}")
            print(
                f"minute {minute:>2} ({window:<7}, machine {load:.0f} % busy): MiB "
                + ", ".join(parts)
            )

        asyncio.run(Soak(gateway, key, tally).run(args.minutes, args.window, sample))

        # settle: every event reaches the ledger through the stream and the writer
        usage: Any = None
        rows = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = asyncio.run(ledger_rows(database, user_id))
            usage = get_json(
                f"http://127.0.0.1:{ports['RATE_LIMITING_API']}/v1/users/{user_id}/usage", ADMIN
            )
            leases = next(
                (u["used"] for u in usage["limits"] if u["name"] == "concurrent_requests"), None
            )
            if rows >= tally.keyed and leases == 0:
                break
            time.sleep(1)
        leases = next(u["used"] for u in usage["limits"] if u["name"] == "concurrent_requests")
        figures = report(tally, rss, rows, leases)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
        subprocess.run(
            ["redis-cli", "-u", REDIS, "DEL", stream, f"{stream}:dead"],
            capture_output=True,
            check=False,
        )
        asyncio.run(admin_sql(f'DROP DATABASE "{name}" WITH (FORCE)'))
    if args.json and figures:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures.get("ok") else 1


def report(tally: Tally, rss: dict[str, list[float]], rows: int, leases: float) -> dict[str, Any]:
    print("\nresponses by status:")
    for name, count in sorted(tally.statuses.items()):
        print(f"  {name:<24} {count:>8}")
    for name, count in sorted(tally.errors.items()):
        print(f"  error: {name:<17} {count:>8}")
    ms: dict[str, dict[str, float | None]] = {}
    for window, values in tally.latencies.items():
        ordered = sorted(v * 1000 for v in values)
        ms[window] = {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99)}
        print(f"well-behaved, {window:<7} windows: {len(ordered):>7} requests, ", end="")
        print(f"p50 {ms[window]['p50'] or 0:.2f} ms, p99 {ms[window]['p99'] or 0:.2f} ms")
    quiet_p99, hostile_p99 = ms["quiet"]["p99"] or 0, ms["hostile"]["p99"] or 0
    cost = (hostile_p99 / quiet_p99 - 1) * 100 if quiet_p99 else 0.0
    growth = {
        name: (values[-1] / values[0] - 1) * 100 for name, values in rss.items() if len(values) >= 2
    }
    worst = max(growth.values(), default=0.0)
    print(f"hostile clients' cost to the well-behaved p99: {cost:+.1f} % (target ≤ 20 %)")
    print(f"RSS growth after the first minute, worst process: {worst:+.1f} % (target < 5 %)")
    print(f"concurrency leases held at the end: {leases:g} (must be 0)")
    print(f"ledger rows {rows}, requests sent with the key and answered or abandoned {tally.keyed}")
    ok = leases == 0 and rows == tally.keyed and worst < 5 and cost <= 20
    print("ALL TARGETS MET" if ok else "A TARGET IS MISSED")
    return {
        "statuses": dict(tally.statuses),
        "errors": dict(tally.errors),
        "latency_ms": ms,
        "p99_cost_percent": cost,
        "rss_mib": rss,
        "rss_growth_percent": growth,
        "leases": leases,
        "ledger_rows": rows,
        "keyed_requests": tally.keyed,
        "median_p50_ms": statistics.median(
            [v for v in (ms["quiet"]["p50"], ms["hostile"]["p50"]) if v is not None] or [0]
        ),
        "ok": ok,
    }


if __name__ == "__main__":
    raise SystemExit(main())
