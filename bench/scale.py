"""Aggregate throughput with 1, 2 and 3 gateway replicas, against one Redis and a Redis Cluster.

Hosts are network namespaces (tests/netns.py; needs root): three gateway replicas, one
simulator, and one Redis server, one server with a replica on its own host ("replicated": the
like-for-like comparison, since the Cluster's replicas apply every write too), or a Cluster of
three masters and three replicas on three hosts. Every feature is on: per-user limits (requests
and tokens per minute, concurrency, daily
and monthly token quotas, monthly cost), the usage stream and the shared routing state, all in
Redis. For each replica count the load generator (this process) drives each loaded replica with
``-c`` connections for ``-d`` seconds and reports:

- aggregate requests/s and p99 latency;
- the CPU of each replica (% of one core) and Redis's CPU per request (all its processes,
  replicas included, less what they use idle, measured first; µs), the figure that carries to
  larger machines: it should stay flat per request
  whatever the number of replicas, and within 10 % between one server and the Cluster.

This machine has two cores, so the aggregate cannot grow with replicas here; the per-request
figures are the point.

    sudo python bench/scale.py [-d 4] [-c 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import CHAT_BODY, cpu_seconds, percentile, run_load
from netns import Hosts, until

from citadel.accounts.sql import open_store

SIM_PORT, GW_PORT = 8100, 8000


def healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


async def make_key(database: str) -> str:
    store = await open_store(database, migrate=True)
    try:
        user = await store.create_user(name="bench", email="bench@example.com", tier="bench")
        _, secret = await store.create_key(user.id, name="bench")
        return secret
    finally:
        await store.aclose()


def start_site(hosts: Hosts, topology: str, tmp: Path) -> tuple[list[str], list[int], str]:
    """The replicas' URLs and pids, the Redis pids, and the API key."""
    from netns import start_redis

    redis_url = start_redis(hosts, topology)
    sim = hosts.add("sim")
    hosts.run("sim", [sys.executable, "-m", "citadel", "sim", "--host", sim.address])
    until(lambda: healthy(f"http://{sim.address}:{SIM_PORT}"), "the simulator")
    database = f"sqlite+aiosqlite:///{tmp / 'accounts.db'}"
    config = tmp / "citadel.yaml"
    big = 10**9
    config.write_text(
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 60, default_tier: bench}}
limits: {{backend: "{redis_url}", failure_mode: closed, store_timeout_seconds: 0.5}}
tiers:
  bench: {{requests_per_minute: {big}, tokens_per_minute: {big}, concurrent_requests: 10000,
          tokens_per_day: {big}, tokens_per_month: {big}, cost_per_month_usd: 1000000}}
models:
  - name: sim-chat
    price: {{input_per_1k: 0.001, output_per_1k: 0.002}}
    deployments: [{{name: sim-a, url: "http://{sim.address}:{SIM_PORT}", model: sim-chat}}]
"""
    )
    secret = asyncio.run(make_key(database))
    urls, pids = [], []
    for i in (1, 2, 3):
        gw = hosts.add(f"gw-{i}")
        proc = hosts.run(
            gw.name,
            [
                *(sys.executable, "-m", "citadel", "--config", str(config), "serve", "gateway"),
                *("--host", gw.address, "--port", str(GW_PORT)),
            ],
            env={"CITADEL_ADMIN_KEY": "sk-bench-admin"},
        )
        url = f"http://{gw.address}:{GW_PORT}"
        try:
            until(lambda u=url: healthy(u), f"replica {i}", timeout=30)
        except AssertionError:
            print(Path(proc.citadel_log).read_text(), file=sys.stderr)  # type: ignore[attr-defined]
            raise
        urls.append(url)
        pids.append(proc.pid)
    return urls, pids, secret


def idle_rate(pids: list[int], seconds: float = 2.0) -> float:
    """CPU seconds per second that ``pids`` use with no load (timers, the Cluster's gossip)."""
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(seconds)
    return (sum(cpu_seconds(p) for p in pids) - before) / seconds


async def measure(
    urls: list[str],
    gw_pids: list[int],
    redis_pids: list[int],
    secret: str,
    c: int,
    d: float,
    idle: float,
) -> dict[str, Any]:
    body = orjson.dumps(CHAT_BODY)
    headers = {"Authorization": f"Bearer {secret}"}
    cpu0 = {pid: cpu_seconds(pid) for pid in [*gw_pids, *redis_pids]}
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            run_load(
                f"{url}/v1/chat/completions",
                body,
                concurrency=c,
                duration=d,
                warmup=1.0,
                headers=headers,
            )
            for url in urls
        )
    )
    wall = time.monotonic() - started  # warm-up included, as the CPU counters are
    used = {pid: cpu_seconds(pid) - cpu0[pid] for pid in cpu0}
    admitted = sum(r.statuses.get(200, 0) for r in results)
    latencies = sorted(x for r in results for x in r.latencies)
    total = sum(r.requests for r in results)
    rps = total / d
    # requests over the whole run (warm-up too), to match the CPU counters
    whole = rps * wall
    redis_cpu = sum(used[p] for p in redis_pids) - idle * wall  # the work the requests caused
    return {
        "rps": rps,
        "p99_ms": (percentile(latencies, 99) or 0.0) * 1000,
        "ok": admitted / total if total else 0.0,
        "replica_cpu": [100 * used[p] / wall for p in gw_pids[: len(urls)]],
        "redis_us_per_req": 1e6 * redis_cpu / whole if whole else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-d", "--duration", type=float, default=4.0)
    parser.add_argument("-c", "--connections", type=int, default=8, help="per loaded replica")
    parser.add_argument("--runs", type=int, default=3, help="passes; medians are reported")
    args = parser.parse_args(argv)
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for topology in ("server", "replicated", "cluster"):
        with tempfile.TemporaryDirectory() as tmp, Hosts() as hosts:
            urls, gw_pids, secret = start_site(hosts, topology, Path(tmp))
            redis_procs = [p for p in hosts.processes if "redis-server" in p.args]  # type: ignore[operator]
            redis_pids = [p.pid for p in redis_procs]
            idle = idle_rate(redis_pids)
            for _ in range(args.runs):
                for n in (1, 2, 3):
                    point = asyncio.run(
                        measure(
                            urls[:n],
                            gw_pids,
                            redis_pids,
                            secret,
                            args.connections,
                            args.duration,
                            idle,
                        )
                    )
                    rows.setdefault((topology, n), []).append(point)
    print(
        f"{'redis':8} {'replicas':>8} {'req/s':>8} {'p99 ms':>7} {'2xx':>5} "
        f"{'replica CPU %':>20} {'Redis CPU µs/req':>17}"
    )
    for (topology, n), points in rows.items():
        med = {
            k: statistics.median(p[k] for p in points)
            for k in ("rps", "p99_ms", "ok", "redis_us_per_req")
        }
        cpus = [statistics.median(p["replica_cpu"][i] for p in points) for i in range(n)]
        print(
            f"{topology:8} {n:>8} {med['rps']:>8.0f} {med['p99_ms']:>7.1f} {med['ok']:>5.0%} "
            f"{'/'.join(f'{c:.0f}' for c in cpus):>20} {med['redis_us_per_req']:>17.1f}"
        )
    for n in (1, 2, 3):
        one = statistics.median(p["redis_us_per_req"] for p in rows[("server", n)])
        paired = statistics.median(p["redis_us_per_req"] for p in rows[("replicated", n)])
        many = statistics.median(p["redis_us_per_req"] for p in rows[("cluster", n)])
        print(
            f"{n} replica(s): Redis CPU per request, Cluster / one server = {many / one:.2f}, "
            f"Cluster / server with a replica = {many / paired:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
