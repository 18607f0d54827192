"""The production request path against nginx, in one run on this machine.

One gateway worker pinned to its own core with every feature on: a user's API key stored in
PostgreSQL (a scratch database, dropped afterwards), a tier whose every limit is set (requests and
tokens per minute, concurrency, tokens per day and month, cost per month: every limit checked and
reserved, none reached), the limiter in Redis, usage events through the Redis Stream with
``citadel ledger-writer`` draining it into the PostgreSQL ledger, routing over two deployments (two
simulators), metrics on (they always are; the bench scrapes them once per point). Against it, in
the same run, nginx (a ~15-line config written to a temporary directory: one process, an upstream
keep-alive pool over the same two simulators) pinned to the same core. The simulators, the load
generator, Redis (a private ``redis-server`` unless ``--redis`` names one) and the ledger writer
share the other core.

Prints requests/s, p50 and p99 at c=1, 16 and 64, plain and streaming (stream latencies are times
to the first body byte), each as a share of nginx's; the p50 the gateway adds over nginx at c=1;
the streaming time to first byte against nginx's at c=16; the fall from c=16 to c=64; and the CPU
per request of the gateway, Redis, the simulators and the ledger writer (/proc/PID/stat).

With ``--streams``, long-lived streams too: 500, 2,000 and 5,000 open at once (the simulator at
100 ms to the first token and 50 ms between tokens, through its x-sim-* headers), through the
gateway and through nginx: time to first byte p50/p99, SSE events relayed per second of the
worker's CPU time, the worker's RSS per open stream (a fresh worker per point, so the figure is
not a previous point's high-water mark). With ``--profile``, py-spy samples the worker under c=16
load, and Redis's INFO commandstats and SLOWLOG are printed. Medians of ``--runs`` passes.

    .venv/bin/python bench/production.py [--runs 3] [--duration 5] [--streams] [--profile]
    .venv/bin/python bench/production.py --quick    # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this runs as a script
from gateway_overhead import (
    ROOT,
    WARMUP_SECONDS,
    Bench,
    Point,
    Service,
    _f,
    _interrupt,
    create_user_key,
    find_wrk,
    free_port,
    gateway_metric,
    median,
    print_point,
    redis_command,
    redis_info,
    redis_pid,
    smoke_test,
    source_version,
    wait_for_quiet,
)
from streamload import raise_nofile, rss_bytes

BENCH_DIR = Path(__file__).resolve().parent
STREAMLOAD = BENCH_DIR / "streamload.py"
POSTGRES = os.environ.get("CITADEL_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
# Every limit of a tier set, none within reach: each is checked and reserved on every request.
PROD_TIER: dict[str, float] = {
    "requests_per_minute": 100_000_000,
    "tokens_per_minute": 1_000_000_000,
    "concurrent_requests": 100_000,
    "tokens_per_day": 100_000_000_000,
    "tokens_per_month": 1_000_000_000_000,
    "cost_per_month_usd": 1_000_000_000.0,
}
# A price, so that the cost limit has something to reserve and settle.
PRICE = "{input_per_1k: 0.0005, output_per_1k: 0.0015}"
STREAM_HEADERS = {"x-sim-ttft-ms": "100", "x-sim-tbt-ms": "50"}
TARGETS = ("nginx", "gateway")
# The issue's targets (issue 20), printed as met or missed.
TARGET_SHARE_C16 = 0.50
TARGET_FALL = 0.15
TARGET_ADDED_P50_MS = 0.25
TARGET_TTFB_MS = 0.5
TARGET_EVENTS_PER_CPU_S = 50_000
TARGET_STREAM_TTFB_P99 = 1.5

NGINX_CONF = """\
daemon off;
master_process off;
worker_rlimit_nofile 65536;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 32768; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream sim {{ {servers} keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=8192;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://sim; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off; proxy_read_timeout 60s;
        }}
    }}
}}
"""


# -- the stack ------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_postgres(server: str) -> Iterator[str]:
    """A database of its own on ``server`` (trust auth), dropped afterwards."""
    import asyncpg  # type: ignore[import-untyped]

    name = f"citadel_bench_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(f"{server}/postgres", timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at {server}: {exc}") from exc
    try:
        yield f"{server}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def postgres_count(uri: str, table: str) -> int:
    import asyncpg

    async def count() -> int:
        connection = await asyncpg.connect(uri, timeout=10)
        try:
            value: int = await connection.fetchval(f"SELECT count(*) FROM {table}")
            return value
        finally:
            await connection.close()

    return asyncio.run(count())


class RedisServer:
    """A private redis-server on a loopback port, pinned to the load core, stopped by pid."""

    def __init__(self, core: int, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: pass --redis URL")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = ["taskset", "-c", str(core), binary, "--port", str(self.port)]
        command += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(workdir), "--slowlog-log-slower-than", "100"]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_command(self.url, "PING")
                return
            except (OSError, RuntimeError, Exception):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def nginx_service(
    workdir: Path, sim_ports: Sequence[int], core: int, env: dict[str, str]
) -> Service:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    servers = " ".join(f"server 127.0.0.1:{p};" for p in sim_ports)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, servers=servers, port=port))
    return Service("nginx", [binary, "-p", str(workdir), "-c", str(conf)], port, core, env)


def write_config(path: Path, sim_ports: Sequence[int], redis: str, database: str) -> None:
    tier = ", ".join(f"{name}: {value}" for name, value in PROD_TIER.items())
    deployments = "".join(
        f'      - {{name: sim-{chr(97 + i)}, url: "http://127.0.0.1:{port}", model: sim-chat}}\n'
        for i, port in enumerate(sim_ports)
    )
    work = path.parent
    path.write_text(
        "env: production\n"
        "gateway: {max_connections_per_deployment: 8192}\n"
        "metrics: {require_token: false}\n"
        "models:\n"
        "  - name: sim-chat\n"
        f"    price: {PRICE}\n"
        "    deployments:\n"
        f"{deployments}"
        "tiers:\n"
        f"  bench: {{{tier}}}\n"
        f'limits: {{backend: "{redis}"}}\n'
        f'accounts: {{database: "{database}", default_tier: bench}}\n'
        f'metering: {{spool_path: "{work}/usage.spool", journal_path: "{work}/usage.journal"}}\n'
    )


class Stack:
    """Everything one run needs, started once (the gateway may be restarted: ``restart``)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, database: str) -> None:
        self.args = args
        self.workdir = workdir
        self.database = database
        self.services: list[Service] = []
        self.env = {**os.environ, "CITADEL_ADMIN_KEY": "sk-bench-admin"}
        for name in ("REDIS_ENDPOINT", "SQL_DATABASE_ENDPOINT", "CITADEL_CONFIG"):
            self.env.pop(name, None)
        self.redis_server: RedisServer | None = None
        if args.redis:
            self.redis = args.redis
        else:
            self.redis_server = RedisServer(args.load_core, workdir)
            self.redis = self.redis_server.url
        redis_command(self.redis, "FLUSHDB")
        self.redis_pid = redis_pid(self.redis)
        self.sim_ports = [free_port(), free_port()]
        self.config = workdir / "citadel.yaml"
        write_config(self.config, self.sim_ports, self.redis, database)
        python = sys.executable
        done = subprocess.run(
            [python, "-m", "citadel", "--config", str(self.config), "migrate"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"citadel migrate failed: {done.stderr.strip()[-2000:]}")
        self.user_key = create_user_key(str(self.config), self.env)
        self.sims: list[Service] = []
        for i, port in enumerate(self.sim_ports):
            command = [python, "-m", "citadel", "sim", "--port", str(port)]
            self.sims.append(Service(f"simulator-{i}", command, port, args.load_core, self.env))
        self.services += self.sims
        for sim in self.sims:
            sim.wait_healthy()
        ledger = [python, "-m", "citadel", "--config", str(self.config), "ledger-writer"]
        self.ledger = Service("ledger-writer", ledger, 0, args.load_core, self.env)
        self.services.append(self.ledger)
        self.nginx = nginx_service(workdir, self.sim_ports, args.gateway_core, self.env)
        self.services.append(self.nginx)
        self.nginx.wait_healthy()
        self.gateway = self.start_gateway()

    def start_gateway(self) -> Service:
        port = free_port()
        command = [sys.executable, "-m", "citadel", "--config", str(self.config), "serve"]
        command += ["gateway", "--port", str(port), "--workers", "1"]
        gateway = Service("gateway", command, port, self.args.gateway_core, self.env)
        self.services.append(gateway)
        gateway.wait_healthy()
        smoke_test(port, self.user_key, "gateway (user key)", limited=True)
        return gateway

    def restart_gateway(self) -> None:
        self.gateway.stop()
        self.services.remove(self.gateway)
        self.gateway = self.start_gateway()

    def check_alive(self) -> None:
        for service in self.services:
            if service.proc.poll() is not None:
                raise RuntimeError(
                    f"{service.name} died (code {service.proc.returncode}):\n{service.log_tail()}"
                )

    def watch(self, target: str) -> dict[str, int]:
        """The processes whose CPU a point reports."""
        pids = {f"sim{i}": sim.pid for i, sim in enumerate(self.sims)}
        if target == "nginx":
            return {"nginx": self.nginx.pid, **pids}
        pids = {"gateway": self.gateway.pid, **pids, "ledger": self.ledger.pid}
        if self.redis_pid is not None:
            pids["redis"] = self.redis_pid
        return pids

    def port(self, target: str) -> int:
        return self.nginx.port if target == "nginx" else self.gateway.port

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.redis_server is not None:
            self.redis_server.stop()


# -- the matrix: c=1, 16, 64, plain and streaming ------------------------------------------------


def run_matrix(stack: Stack, bench: Bench, args: argparse.Namespace) -> list[Point]:
    points: list[Point] = []
    for run in range(1, args.runs + 1):
        order = TARGETS if run % 2 else TARGETS[::-1]  # who goes first alternates by pass
        for mode in args.mode_list:
            for conc in args.concurrencies:
                for target in order:
                    stack.check_alive()
                    wait_for_quiet(args.quiet_wait)
                    point = bench.measure(
                        mode, conc, target, stack.port(target), stack.watch(target)
                    )
                    point.target = target
                    point.run = run
                    points.append(point)
                    print_point(point)
        if stack.gateway.port:  # metrics on: one scrape per pass, as Prometheus would
            gateway_metric(stack.gateway.port, "citadel_requests_total")
    return points


def cpu_us_per_request(point: Point, name: str) -> float | None:
    if name == "sim":
        percent = sum(v for k, v in point.cpu.items() if k.startswith("sim"))
    elif name in point.cpu:
        percent = point.cpu[name]
    else:
        return None
    return percent / 100.0 / point.rps * 1e6 if point.rps else None


CPU_NAMES = ("gateway", "nginx", "redis", "sim", "ledger", "load", "other")


def summarize(points: list[Point], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in args.mode_list:
        for conc in args.concurrencies:
            row: dict[str, Any] = {"mode": mode, "concurrency": conc}
            for target in TARGETS:
                mine = [
                    p for p in points if (p.mode, p.concurrency, p.target) == (mode, conc, target)
                ]
                if not mine:
                    continue
                row[target] = {
                    "rps": median([p.rps for p in mine]),
                    "p50_ms": median([p.p50_ms for p in mine]),
                    "p99_ms": median([p.p99_ms for p in mine]),
                    "errors": sum(p.failed for p in mine),
                    "cpu_us": {
                        name: median([cpu_us_per_request(p, name) for p in mine])
                        for name in CPU_NAMES
                    },
                    "cpu_percent": {
                        name: median([p.cpu.get(name) for p in mine])
                        for name in ("gateway", "nginx", "other")
                    },
                }
            n, g = row.get("nginx"), row.get("gateway")
            if n and g:
                row["share_rps"] = g["rps"] / n["rps"] if n["rps"] else None
                for q in ("p50", "p99"):
                    a, b = n[f"{q}_ms"], g[f"{q}_ms"]
                    row[f"added_{q}_ms"] = None if a is None or b is None else b - a
            rows.append(row)
    return rows


def fall(rows: list[dict[str, Any]], mode: str, target: str) -> float | None:
    at = {r["concurrency"]: r.get(target, {}).get("rps") for r in rows if r["mode"] == mode}
    hi, lo = at.get(16), at.get(64)
    return 1.0 - lo / hi if hi and lo is not None else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def print_matrix(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    print()
    print(
        f"Medians of {args.runs} run(s); latencies in ms (streams: time to first byte); "
        "'share' = gateway / nginx."
    )
    header = (
        f"{'mode':<7}{'conc':>5}{'nginx rps':>11}{'gw rps':>9}{'share':>7}"
        f"{'nginx p50':>11}{'gw p50':>9}{'added':>9}{'nginx p99':>11}{'gw p99':>9}{'added':>9}"
        "  errors"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        n, g = row.get("nginx", {}), row.get("gateway", {})
        errors = f"nginx {n.get('errors', 0)}, gw {g.get('errors', 0)}"
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}{_f(n.get('rps'), '%.0f'):>11}"
            f"{_f(g.get('rps'), '%.0f'):>9}{_f(row.get('share_rps'), '%.2f'):>7}"
            f"{_f(n.get('p50_ms'), '%.3f'):>11}{_f(g.get('p50_ms'), '%.3f'):>9}"
            f"{_f(row.get('added_p50_ms'), '%+.3f'):>9}"
            f"{_f(n.get('p99_ms'), '%.3f'):>11}{_f(g.get('p99_ms'), '%.3f'):>9}"
            f"{_f(row.get('added_p99_ms'), '%+.3f'):>9}  {errors}"
        )
    print()
    print("CPU per request, µs (medians); sim = both simulators; 'other %' = the rest of the")
    print("machine meanwhile, in % of a core (a high figure: a noisy point).")
    header = (
        f"{'mode':<7}{'conc':>5}{'gateway':>9}{'redis':>7}{'sim':>6}{'ledger':>8}{'load':>6}"
        f"{'gw core %':>11}{'nginx':>8}{'sim':>6}{'nginx core %':>14}{'other %':>9}"
    )
    print(header)
    for row in rows:
        g, n = row.get("gateway", {}), row.get("nginx", {})
        gu, nu = g.get("cpu_us", {}), n.get("cpu_us", {})
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}{_f(gu.get('gateway'), '%.0f'):>9}"
            f"{_f(gu.get('redis'), '%.0f'):>7}{_f(gu.get('sim'), '%.0f'):>6}"
            f"{_f(gu.get('ledger'), '%.0f'):>8}{_f(gu.get('load'), '%.0f'):>6}"
            f"{_f(g.get('cpu_percent', {}).get('gateway'), '%.0f'):>11}"
            f"{_f(nu.get('nginx'), '%.0f'):>8}{_f(nu.get('sim'), '%.0f'):>6}"
            f"{_f(n.get('cpu_percent', {}).get('nginx'), '%.0f'):>14}"
            f"{_f(g.get('cpu_percent', {}).get('other'), '%.0f'):>9}"
        )
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    verdicts: dict[str, Any] = {}

    def verdict(name: str, value: float | None, ok: bool | None, text: str) -> None:
        verdicts[name] = value
        if value is None:
            print(f"  {text.split(':')[0]}: not measured")
        else:
            print(f"  {text}, {'met' if ok else 'MISSED'}")

    print()
    print("Against issue 20's targets:")
    share = by.get(("plain", 16), {}).get("share_rps")
    verdict(
        "share_plain_c16",
        share,
        share is not None and share >= TARGET_SHARE_C16,
        f"plain c=16 requests/s >= {TARGET_SHARE_C16:.0%} of nginx's: {_f(share, '%.2f')}",
    )
    for mode in args.mode_list:
        for target in TARGETS:
            drop = fall(rows, mode, target)
            if target == "gateway":
                verdict(
                    f"fall_{mode}",
                    drop,
                    drop is not None and drop <= TARGET_FALL,
                    f"{mode} fall c=16 -> c=64 <= {TARGET_FALL:.0%}: gateway {_pct(drop)}"
                    f" (nginx {_pct(fall(rows, mode, 'nginx'))})",
                )
    added = by.get(("plain", 1), {}).get("added_p50_ms")
    verdict(
        "added_p50_c1",
        added,
        added is not None and added <= TARGET_ADDED_P50_MS,
        f"plain c=1 p50 over nginx <= +{TARGET_ADDED_P50_MS} ms: {_f(added, '%+.3f')} ms",
    )
    ttfb = by.get(("stream", 16), {}).get("added_p50_ms")
    verdict(
        "ttfb_c16",
        ttfb,
        ttfb is not None and ttfb <= TARGET_TTFB_MS,
        f"stream c=16 time to first byte p50 within {TARGET_TTFB_MS} ms of nginx's: "
        f"{_f(ttfb, '%+.3f')} ms",
    )
    return verdicts


# -- long-lived streams ---------------------------------------------------------------------------


def hold(stack: Stack, args: argparse.Namespace, target: str, streams: int) -> dict[str, Any]:
    command = ["taskset", "-c", str(args.load_core), sys.executable, str(STREAMLOAD), "--json"]
    command += ["--url", f"http://127.0.0.1:{stack.port(target)}/v1/chat/completions"]
    command += ["-c", str(streams), "-d", str(args.stream_duration)]
    command += ["--ramp", str(stream_ramp(args, streams)), "--settle", "1", "--stall", "20"]
    command += ["--max-tokens", str(args.stream_tokens)]
    for name, value in STREAM_HEADERS.items():
        command += ["-H", f"{name}: {value}"]
    if target == "gateway":
        command += ["-H", f"Authorization: Bearer {stack.user_key}"]
    server = stack.gateway if target == "gateway" else stack.nginx
    command += ["--watch-pid", f"server={server.pid}", "--rss-pid", f"server={server.pid}"]
    for i, sim in enumerate(stack.sims):
        command += ["--watch-pid", f"sim{i}={sim.pid}"]
    timeout = stream_ramp(args, streams) + args.stream_duration + 90
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"streamload did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"streamload failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def stream_ramp(args: argparse.Namespace, streams: int) -> float:
    """Seconds to open ``streams`` connections: --stream-ramp, else 2 ms a stream (at least 1 s),
    so a busy worker's accept queue does not overflow while they open."""
    ramp: float = args.stream_ramp if args.stream_ramp is not None else max(1.0, streams / 500)
    return ramp


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def run_streams(stack: Stack, args: argparse.Namespace) -> list[dict[str, Any]]:
    points = []
    for run in range(1, args.runs + 1):
        for streams in args.stream_counts:
            for target in TARGETS if run % 2 else TARGETS[::-1]:
                stack.check_alive()
                if target == "gateway" and not args.quick:
                    stack.restart_gateway()  # RSS per stream from a fresh worker
                wait_for_quiet(args.quiet_wait)
                server = stack.gateway if target == "gateway" else stack.nginx
                idle_rss = rss_bytes(server.pid)
                overflows = listen_overflows()
                result = hold(stack, args, target, streams)
                overflows = listen_overflows() - overflows
                server_cpu = result.get("cpu_seconds", {}).get("server") or 0.0
                open_mid = result.get("open") or 0
                point = {
                    "run": run,
                    "target": target,
                    "streams": streams,
                    "open": open_mid,
                    "ttfb_p50_ms": result["ttfb_p50_ms"],
                    "ttfb_p99_ms": result["ttfb_p99_ms"],
                    "events_per_second": result["events_per_second"],
                    "events_per_cpu_second": result["events"] / server_cpu if server_cpu else None,
                    "server_cpu_percent": result.get("cpu", {}).get("server"),
                    "sim_cpu_percent": sum(
                        v for k, v in result.get("cpu", {}).items() if k.startswith("sim")
                    ),
                    "load_cpu_percent": result.get("cpu", {}).get("load"),
                    "other_cpu_percent": result.get("cpu", {}).get("other"),
                    "rss_per_stream_kb": (
                        (result.get("rss_server", 0) - idle_rss) / open_mid / 1024
                        if open_mid
                        else None
                    ),
                    "failed": result["errors"] + result["socket_errors"],
                    "listen_overflows": overflows,
                    "first_error": result.get("first_error", ""),
                }
                points.append(point)
                if point["failed"] and target == "gateway":
                    print(f"  the gateway's log ends:\n{stack.gateway.log_tail(6)}")
                err = (
                    f"  !! {point['failed']} failed: {point['first_error']} (listen queue "
                    f"overflows meanwhile: {overflows})"
                    if point["failed"]
                    else ""
                )
                print(
                    f"  run {run} streams={streams:<5} {target:<8} open {open_mid:>5}"
                    f"  ttfb p50 {_f(point['ttfb_p50_ms'], '%.1f')} p99 "
                    f"{_f(point['ttfb_p99_ms'], '%.1f')} ms  {point['events_per_second']:.0f} ev/s"
                    f"  server cpu {_f(point['server_cpu_percent'], '%.0f')}%"
                    f"  {_f(point['events_per_cpu_second'], '%.0f')} ev/cpu-s"
                    f"  rss/stream {_f(point['rss_per_stream_kb'], '%.1f')} KB{err}",
                    flush=True,
                )
    return points


def print_streams(points: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    print()
    print(
        f"Long-lived streams (medians of {args.runs}): the simulator at 100 ms to the first token"
        f" and 50 ms between {args.stream_tokens} tokens; 'server' = the gateway worker or nginx."
    )
    header = (
        f"{'streams':>8}{'target':>9}{'open':>7}{'ttfb p50':>10}{'ttfb p99':>10}{'ev/s':>9}"
        f"{'server %':>10}{'ev/cpu-s':>10}{'KB/stream':>11}{'sim %':>7}{'load %':>8}{'other %':>9}"
    )
    print(header)
    rows = []
    for streams in args.stream_counts:
        row: dict[str, Any] = {"streams": streams}
        for target in TARGETS:
            mine = [p for p in points if (p["streams"], p["target"]) == (streams, target)]
            if not mine:
                continue
            m = {
                key: median([p[key] for p in mine])
                for key in mine[0]
                if key not in ("run", "target", "streams", "first_error")
            }
            row[target] = m
            print(
                f"{streams:>8}{target:>9}{_f(m['open'], '%.0f'):>7}"
                f"{_f(m['ttfb_p50_ms'], '%.1f'):>10}{_f(m['ttfb_p99_ms'], '%.1f'):>10}"
                f"{_f(m['events_per_second'], '%.0f'):>9}{_f(m['server_cpu_percent'], '%.0f'):>10}"
                f"{_f(m['events_per_cpu_second'], '%.0f'):>10}"
                f"{_f(m['rss_per_stream_kb'], '%.1f'):>11}{_f(m['sim_cpu_percent'], '%.0f'):>7}"
                f"{_f(m['load_cpu_percent'], '%.0f'):>8}{_f(m['other_cpu_percent'], '%.0f'):>9}"
                + (f"  !! {m['failed']:.0f} failed" if m["failed"] else "")
            )
        rows.append(row)
    verdicts: dict[str, Any] = {}
    for row in rows:
        g, n = row.get("gateway"), row.get("nginx")
        if row["streams"] != 2000 or not (g and n):
            continue
        rate = g["events_per_cpu_second"]
        ratio = g["ttfb_p99_ms"] / n["ttfb_p99_ms"] if n["ttfb_p99_ms"] else None
        verdicts["events_per_cpu_second_2000"] = rate
        verdicts["ttfb_p99_ratio_2000"] = ratio
        print(
            f"  2,000 streams: >= {TARGET_EVENTS_PER_CPU_S:,} events per worker CPU second: "
            f"{_f(rate, '%.0f')}, {'met' if rate and rate >= TARGET_EVENTS_PER_CPU_S else 'MISSED'}"
        )
        ok = ratio is not None and ratio <= TARGET_STREAM_TTFB_P99
        print(
            f"  2,000 streams: ttfb p99 within {TARGET_STREAM_TTFB_P99}x nginx's: "
            f"{_f(ratio, '%.2f')}x, {'met' if ok else 'MISSED'}"
        )
    return {"rows": rows, "verdicts": verdicts}


# -- the profile -----------------------------------------------------------------------------------


def run_profile(stack: Stack, bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on the worker under plain c=16 load, and Redis's command stats and slow log."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw = stack.workdir / "profile.txt"
    redis_command(stack.redis, "CONFIG", "RESETSTAT")
    redis_command(stack.redis, "SLOWLOG", "RESET")
    seconds = max(2, round(args.duration))
    # --native (the C frames: the event loop, hiredis, httptools) needs the worker paused while a
    # sample is read (py-spy refuses --native with --nonblocking); at 100 Hz that costs it little.
    record = [py_spy, "record", "--native", "-r", "100", "-d", str(seconds)]
    record += ["-f", "raw", "-o", str(raw), "-p", str(stack.gateway.pid)]
    # py-spy samples from the load core, so the worker's core is the worker's alone.
    spy = subprocess.Popen(
        ["taskset", "-c", str(args.load_core), *record],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    args_duration = args.duration
    args.duration = seconds + 1
    try:
        point = bench.measure("plain", 16, "gateway", stack.gateway.port, stack.watch("gateway"))
    finally:
        args.duration = args_duration
    try:
        _, err = spy.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.strip()[-1000:]}")
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        samples += count
        own[_frame(frames[-1])] += count
        # Inclusive time of Citadel's own functions only: the loop's frames are in every stack.
        for frame in {_frame(f) for f in frames if "citadel/" in f}:
            total[frame] += count
    stats = redis_info(stack.redis, "commandstats")
    commands = []
    for name, value in stats.items():
        fields = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
        commands.append(
            {
                "command": name.removeprefix("cmdstat_"),
                "calls": int(fields.get("calls", 0)),
                "usec": int(float(fields.get("usec", 0))),
                "usec_per_call": float(fields.get("usec_per_call", 0)),
            }
        )
    commands.sort(key=lambda c: -c["usec"])
    slowlog = redis_command(stack.redis, "SLOWLOG", "GET", "10")
    slow = [
        {
            "usec": entry[2],
            "command": " ".join(
                (a.decode(errors="replace") if isinstance(a, bytes) else str(a))[:40]
                for a in entry[3][:4]
            ),
        }
        for entry in slowlog or []
    ]
    profile = {
        "samples": samples,
        "rps": point.rps,
        "own": [(f, n / samples) for f, n in own.most_common(args.profile_top)] if samples else [],
        "total": [(f, n / samples) for f, n in total.most_common(args.profile_top)]
        if samples
        else [],
        "redis_commands": commands[:10],
        "slowlog": slow,
    }
    print()
    print(
        f"Profile: py-spy --native on the worker, plain c=16 through the gateway "
        f"({point.rps:.0f} req/s), {samples} samples."
    )
    print("Own time (the frame on top of the stack):")
    for frame, share in profile["own"]:
        print(f"  {share:6.1%}  {frame}")
    print("Inclusive time of Citadel's functions (the frame anywhere in the stack):")
    for frame, share in profile["total"]:
        print(f"  {share:6.1%}  {frame}")
    print("Redis INFO commandstats over the profile (by total time):")
    for c in commands[:10]:
        print(
            f"  {c['command']:<14}{c['calls']:>9} calls {c['usec']:>10} µs"
            f"  {c['usec_per_call']:.2f} µs/call"
        )
    print(f"Redis SLOWLOG GET 10 ({len(slow)} entries):")
    for entry in slow:
        print(f"  {entry['usec']:>6} µs  {entry['command']}")
    return profile


def _frame(frame: str) -> str:
    """py-spy's 'function (file.py:line)' without the line, the path shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{name} ({file})" if file else name


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point (5)")
    parser.add_argument("--runs", type=int, default=3, help="passes; medians are quoted (3)")
    parser.add_argument("--concurrency", default="1,16,64", help="connections (1,16,64)")
    parser.add_argument("--modes", default="plain,stream", help="plain and/or stream (both)")
    parser.add_argument("--streams", action="store_true", help="also long-lived streams")
    parser.add_argument("--only-streams", action="store_true", help="long-lived streams only")
    parser.add_argument(
        "--stream-counts", default="500,2000,5000", help="streams open at once (500,2000,5000)"
    )
    parser.add_argument("--stream-tokens", type=int, default=8, help="tokens per stream (8)")
    parser.add_argument("--stream-duration", type=float, default=10.0, help="seconds (10)")
    parser.add_argument(
        "--stream-ramp", type=float, default=None, help="seconds to open them (2 ms a stream)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy + Redis stats at c=16")
    parser.add_argument("--profile-top", type=int, default=25, help="profile entries shown (25)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="an existing Redis database (flushed); default: a private "
        "redis-server on the load core",
    )
    parser.add_argument("--postgres", default=POSTGRES, help=f"PostgreSQL server ({POSTGRES})")
    parser.add_argument("--gateway-core", type=int, default=0, help="gateway and nginx core (0)")
    parser.add_argument("--load-core", type=int, default=1, help="everything else (1)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="wait for quiet (30 s)")
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds in all (one run, c=4, 1 s points, 50 streams): what the test runs",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.concurrency = 1, 1.0, "4"
        args.stream_counts, args.stream_tokens = "50", 3
        args.stream_duration, args.stream_ramp, args.quiet_wait = 0.5, 0.2, 0.0
        args.streams = True
    try:
        args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
        args.stream_counts = [int(c) for c in str(args.stream_counts).split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency / --stream-counts: comma-separated numbers")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or not set(args.mode_list) <= {"plain", "stream"}:
        parser.error(f"--modes: plain and/or stream, not {args.modes!r}")
    cores = os.sched_getaffinity(0)
    for name in ("gateway_core", "load_core"):
        if getattr(args, name) not in cores:
            parser.error(f"--{name.replace('_', '-')}: core not available (have {sorted(cores)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = find_wrk(args.tool)
    os.sched_setaffinity(0, {args.load_core})
    signal.signal(signal.SIGTERM, _interrupt)
    raise_nofile(65536)  # inherited by the gateway, nginx and the load generators
    workdir = Path(tempfile.mkdtemp(prefix="citadel-bench-prod-"))
    bench = Bench(args, wrk)
    source = source_version()
    started = datetime.now(UTC)
    load = os.getloadavg()
    print(f"citadel source: {source}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    points: list[Point] = []
    stream_points: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    check: dict[str, Any] = {}
    try:
        with scratch_postgres(args.postgres) as database:
            stack = Stack(args, workdir, database)
            if True:
                try:
                    bench.keys["gateway"] = stack.user_key
                    print(
                        f"gateway pid {stack.gateway.pid}, nginx pid {stack.nginx.pid} on core "
                        f"{args.gateway_core}; simulators, Redis ({stack.redis}), ledger writer "
                        f"and load on core {args.load_core}; plain load: "
                        f"{'wrk' if wrk else 'loadgen.py'}; {args.duration:g} s per point after "
                        f"{WARMUP_SECONDS:g} s warm-up",
                        flush=True,
                    )
                    if not args.only_streams:
                        points = run_matrix(stack, bench, args)
                    if args.profile:
                        try:
                            profile = run_profile(stack, bench, args)
                        except RuntimeError as exc:  # the figures measured so far still count
                            print(f"profile failed: {exc}", file=sys.stderr)
                    if args.streams or args.only_streams:
                        stream_points = run_streams(stack, args)
                    check = drain_check(stack, database)
                finally:
                    stack.stop()
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        print(f"error: {exc!s}" if str(exc) else f"error: {exc!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)

    verdicts: dict[str, Any] = {}
    rows = summarize(points, args) if points else []
    if rows:
        verdicts.update(print_matrix(rows, args))
    streams: dict[str, Any] = {}
    if stream_points:
        streams = print_streams(stream_points, args)
        verdicts.update(streams["verdicts"])
    print(
        f"\nLedger: {check.get('ledger_rows')} usage events in PostgreSQL, "
        f"{check.get('stream_pending')} left pending in the stream. Load average at the end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    if args.json:
        document = {
            "date": started.isoformat(timespec="seconds"),
            "source": source,
            "load_average_start": load,
            "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "medians": rows,
            "verdicts": verdicts,
            "streams": streams.get("rows", []),
            "profile": profile,
            "ledger_check": check,
            "points": [asdict(p) for p in points],
            "stream_points": stream_points,
        }
        Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def drain_check(stack: Stack, database: str) -> dict[str, Any]:
    """Give the ledger writer a moment to drain the stream; count what reached PostgreSQL."""
    deadline = time.monotonic() + 30
    pending = None
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            groups = redis_command(stack.redis, "XPENDING", "citadel:{usage}:events", "ledger")
            pending = int(groups[0]) if groups else 0
            length = int(redis_command(stack.redis, "XLEN", "citadel:{usage}:events"))
        except Exception:
            pending, length = None, 0
        rows = postgres_count(database, "usage_events")
        if pending == 0 and rows >= length:
            break
        time.sleep(0.5)
    return {"ledger_rows": rows, "stream_pending": pending}


if __name__ == "__main__":
    sys.exit(main())
