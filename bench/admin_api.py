"""The admin APIs before and after Litestar: p50 latency and requests/s of typical calls, old and
new code side by side in one run, and the ratio.

    .venv/bin/python bench/admin_api.py --old /tmp/citadel-old      # a checkout of the old code
    git worktree add /tmp/citadel-old ce256a0                        # (the last hand-built one)
    .venv/bin/python bench/admin_api.py --service custom-metrics --old /tmp/citadel-old
    .venv/bin/python bench/admin_api.py --service routing-api --old /tmp/citadel-old

Each side is ``python -m citadel serve SERVICE`` from its own ``src/`` on a fresh SQLite
database: for rate-limiting-api with the memory limiter, for custom-metrics over a ledger seeded
here with the same events on both sides; routing-api over three deployments (on a closed port:
its probes fail, nothing is sent) with the shared state on ``--redis``, read only (both sides
list the same keys; nothing is drained). One keep-alive connection sends each call back to back
for ``--duration`` seconds after a warm-up (concurrency 1: the cost of one request through each
stack). Sides alternate per call and per run; medians of ``--runs`` runs are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ADMIN = "sk-bench-admin"
CONFIG = """
tiers:
  open: {{}}
accounts: {{database: "sqlite+aiosqlite:///{db}", default_tier: open}}
limits: {{backend: "memory://"}}
models:
  - name: llama
    price: {{input_per_1k: 0.0005, output_per_1k: 0.0015}}
    reference_price: {{input_per_1k: 0.01, output_per_1k: 0.03}}
    deployments:
      - {{name: llama-a, url: "http://127.0.0.1:9", gpu_hour_usd: 2.5, gpus: 2}}
  - name: mistral
    price: {{input_per_1k: 0.0002, output_per_1k: 0.0006}}
    deployments:
      - {{name: mistral-a, url: "http://127.0.0.1:9", gpu_hour_usd: 0.8}}
"""
ROUTING_CONFIG = """
endpoints: {{redis: "{redis}"}}
models:
  - name: general
    deployments:
      - {{name: bench-a, url: "http://127.0.0.1:{closed}", model: m}}
      - {{name: bench-b, url: "http://127.0.0.1:{closed}", model: m}}
  - name: coder
    specialties: [code]
    deployments: [{{name: bench-c, url: "http://127.0.0.1:{closed}", model: m}}]
"""
SERVICES = ("rate-limiting-api", "custom-metrics", "routing-api")
HERE = Path(__file__).resolve().parent.parent
EVENTS = 10_000  # in the custom-metrics ledger, over the last 40 days


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def seed_ledger(db: Path, count: int = EVENTS, seed: int = 7) -> None:
    """A ledger of ``count`` events of 40 users in 4 teams over the last 40 days."""
    from citadel.metering.events import UsageEvent, new_event_id
    from citadel.metering.ledger import Ledger
    from citadel.metering.migrate import LEDGER
    from citadel.stores.sql import build_engine

    rng = random.Random(seed)
    now = time.time()
    events = [
        UsageEvent(
            event_id=new_event_id(at := now - rng.uniform(60, 40 * 86400)),
            time=at,
            request_id=f"req-{i}",
            user=f"usr_{i % 40}",
            team=f"team_{i % 4}",
            key_id="key",
            tier="open",
            endpoint="/v1/chat/completions",
            model=(model := rng.choice(("llama", "mistral"))),
            deployment=f"{model}-a",
            prompt_tokens=rng.randint(1, 3000),
            completion_tokens=rng.randint(0, 1500),
            latency_seconds=rng.uniform(0.1, 3.0),
            ttft_seconds=None,
            status=rng.choice((200, 200, 200, 500)),
            streamed=False,
            cancelled=False,
            usage_estimated=False,
            cost_micros=rng.randint(1, 20_000),
        )
        for i in range(count)
    ]

    async def write() -> None:
        uri = f"sqlite+aiosqlite:///{db}"
        await LEDGER.upgrade(uri)
        engine = build_engine(uri)
        try:
            for at in range(0, len(events), 1000):
                await Ledger(engine).write(events[at : at + 1000])
        finally:
            await engine.dispose()

    asyncio.run(write())


def start(
    source: Path, tmp: Path, name: str, service: str, redis: str
) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp / f"{name}.yaml"
    db = tmp / f"{name}.db"
    if service == "custom-metrics":  # the same events on both sides
        seeded = tmp / "ledger.db"
        if not seeded.exists():
            seed_ledger(seeded)
        shutil.copyfile(seeded, db)
    if service == "routing-api":
        text = ROUTING_CONFIG.format(redis=redis, closed=free_port())
    else:
        text = CONFIG.format(db=db)
    config.write_text(text, encoding="utf-8")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(source / "src"),
        "CITADEL_ADMIN_KEY": ADMIN,
        "CITADEL_ENV": "test",
        "CITADEL_LOG_LEVEL": "warning",
        "REDIS_ENDPOINT": "",
    }
    command = [sys.executable, "-m", "citadel", "--config", str(config)]
    command += ["serve", service, "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if call(http.client.HTTPConnection("127.0.0.1", port), "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


def call(
    conn: http.client.HTTPConnection, method: str, path: str, body: object = None
) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    conn.request(method, path, b"" if body is None else orjson.dumps(body), headers)
    response = conn.getresponse()
    return response.status, response.read()


def metering_calls(port: int) -> dict[str, tuple[str, str, object]]:
    """The custom-metrics calls: one the ledger answers, one the framework answers alone
    (a refused parameter), and the scrape (business metrics cached for ``metrics_ttl``)."""
    return {
        "GET /v1/usage (ledger)": ("GET", "/v1/usage?group_by=team,model&bucket=day", None),
        "GET /v1/top?limit=0 (refused)": ("GET", "/v1/top?limit=0", None),
        "GET /metrics": ("GET", "/metrics", None),
    }


def routing_calls(port: int) -> dict[str, tuple[str, str, object]]:
    """The routing-api calls: a Redis-backed listing, a framework-only read, dry runs."""
    return {
        "GET /health": ("GET", "/health", None),
        "GET /v1/deployments (Redis)": ("GET", "/v1/deployments", None),
        "GET /v1/deployments/{name}": ("GET", "/v1/deployments/bench-a", None),
        "POST /v1/route": (
            "POST",
            "/v1/route",
            {"model": "auto", "messages": [{"role": "user", "content": "def f(): pass"}]},
        ),
        "POST /v1/route (bad)": ("POST", "/v1/route", {"model": "general", "max_tokens": 0}),
    }


def calls(port: int) -> dict[str, tuple[str, str, object]]:
    """The typical calls, on a user made for them."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    status, raw = call(conn, "POST", "/v1/users", {"name": "Ada", "email": "ada@example.com"})
    assert status == 201, raw
    user = orjson.loads(raw)["id"]
    return {
        "GET /health": ("GET", "/health", None),
        "GET /v1/users/{id}": ("GET", f"/v1/users/{user}", None),
        "GET /v1/tiers": ("GET", "/v1/tiers", None),
        "POST /v1/check": ("POST", "/v1/check", {"user_id": user, "tokens": 10}),
        "PATCH /v1/users/{id} (bad)": (
            "PATCH",
            f"/v1/users/{user}",
            {"overrides": {"tokens_per_day": -1}},
        ),
    }


def measure(port: int, request: tuple[str, str, object], duration: float) -> tuple[float, float]:
    """p50 in ms and requests/s of one call, back to back on one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    method, path, body = request
    warm = time.monotonic() + 0.5
    while time.monotonic() < warm:
        call(conn, method, path, body)
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < duration:
        call(conn, method, path, body)
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - start
    conn.close()
    return statistics.median(latencies) * 1000, len(latencies) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--new", type=Path, default=HERE, help="checkout of the new code")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per call and side")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--service", choices=SERVICES, default="rate-limiting-api")
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="routing-api's shared state"
    )
    args = parser.parse_args()
    typical = {"custom-metrics": metering_calls, "routing-api": routing_calls}.get(
        args.service, calls
    )
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        old, old_port = start(args.old, tmp, "old", args.service, args.redis)
        new, new_port = start(args.new, tmp, "new", args.service, args.redis)
        try:
            sides = {"old": typical(old_port), "new": typical(new_port)}
            ports = {"old": old_port, "new": new_port}
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for run in range(args.runs):
                for label in sides["old"]:
                    order = ("old", "new") if run % 2 == 0 else ("new", "old")
                    for side in order:
                        point = measure(ports[side], sides[side][label], args.duration)
                        results.setdefault((label, side), []).append(point)
        finally:
            for proc in (old, new):
                proc.terminate()
                proc.wait(10)
    print(f"{'call':<32}{'old p50 ms':>11}{'new p50 ms':>11}{'x':>6}{'old req/s':>11}"
          f"{'new req/s':>11}{'x':>6}")  # fmt: skip
    for label in sides["old"]:
        old_p50 = statistics.median(p for p, _ in results[(label, "old")])
        new_p50 = statistics.median(p for p, _ in results[(label, "new")])
        old_rps = statistics.median(r for _, r in results[(label, "old")])
        new_rps = statistics.median(r for _, r in results[(label, "new")])
        print(
            f"{label:<32}{old_p50:>11.3f}{new_p50:>11.3f}{new_p50 / old_p50:>6.2f}"
            f"{old_rps:>11.0f}{new_rps:>11.0f}{new_rps / old_rps:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
