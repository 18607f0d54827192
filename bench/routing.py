"""Routing under trouble: a slow deployment, a failing one, and what cost-optimised routing saves.

Three scenarios, each over three simulated deployments (``citadel sim``) behind a real gateway
(``citadel serve gateway``), in one run:

1. **slow**: one deployment 5x slower than the other two. p50/p99 latency through an all-healthy
   pool with the default balancer (the reference), then through the pool with the slow one under
   round-robin and under each other balancer. Target: the default balancer's p99 within 1.25x of
   the all-healthy pool's.
2. **failing**: one deployment answers every request with 503. Success rate (HTTP 200 share) with
   breakers, retries and health checks on (the defaults) against the same pool with them off
   (round-robin, one attempt, no health checks, breakers that never trip). Target: >= 99.9 % on.
3. **cost**: three deployments of one model at different prices, the cheapest somewhat slower but
   within the latency target; a mixed workload (short and long replies, streamed and not). Spend
   (each response's usage x the price of the deployment that served it, ``x-citadel-deployment``)
   under cost_optimised against the default balancer and round-robin, at equal success.

Every balancer of a scenario is a model of its own in one gateway (its own deployments' names,
so its own router state), so they are measured by the same process, one after the other, in an
order rotated between runs. Each run starts fresh simulators and gateways (cold router state).
The gateway is pinned to one core; the simulators and the load generator (this process) to the
other. Load is closed-loop: ``--concurrency`` keep-alive connections, each sending its next request
when the previous one is answered, for ``--duration`` seconds (or ``--requests`` requests) after a
``--warmup``; the failing scenario has no warm-up (the breakers start cold) and sends at least
3,000 requests.

    .venv/bin/python bench/routing.py [--duration 10] [--concurrency 8] [--runs 3] [--json PATH]
    .venv/bin/python bench/routing.py --scenarios slow --runs 1 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this runs as a script
from gateway_overhead import (
    Service,
    free_port,
    http_request,
    running,
    source_version,
    wait_for_quiet,
)
from loadgen import install_uvloop, percentile

from citadel.settings import RoutingSettings

CHAT_PATH = "/v1/chat/completions"
RETRIES = "citadel_routing_retries_total"
DECISIONS = "citadel_routing_decisions_total"
API_KEY = "sk-bench"
DEFAULT_BALANCER = RoutingSettings().balancer  # what a model gets when it names none
SCENARIOS = ("slow", "failing", "cost")
SLOW_TARGET = 1.25  # default balancer's p99 / the all-healthy pool's p99
SUCCESS_TARGET = 0.999
FAILING_MIN_REQUESTS = 3000
REQUEST_TIMEOUT = 30.0  # seconds; a request slower than this counts as failed
ROUTING_OFF = (
    "routing:\n"
    "  max_attempts: 1\n"
    "  health: {enabled: false}\n"
    "  breaker: {consecutive_failures: 1000000, minimum_calls: 1000000}\n"
)
LONG_PROMPT = (
    "Summarise the following notes for a status report, keeping every figure. "
    + "The gateway routes requests over several deployments and tracks their latency. " * 12
)


# -- the load ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One request: HTTP status (0: no response), seconds, and what the gateway said."""

    kind: int  # index into the workload
    status: int
    latency: float
    ttfb: float
    deployment: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Load:
    samples: list[Sample] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of the measured window
    first_error: str = ""


def chat_body(model: str, max_tokens: int, stream: bool, prompt: str = "Say hello") -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


def build_request(port: int, body: bytes) -> bytes:
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _usage(body: bytes, stream: bool) -> tuple[int, int]:
    """Prompt and completion tokens from a response body (the last usage of a stream)."""
    try:
        if not stream:
            usage = json.loads(body).get("usage") or {}
        else:
            usage = {}
            for line in body.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:]).get("usage") or usage
    except (ValueError, AttributeError):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[bytes, bytes], bytes, float, float]:
    """Send one request, read its whole response: status, headers, body, ttfb and end times."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    first = 0.0
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        parts: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass  # trailers
                break
            data = await reader.readexactly(size + 2)
            first = first or time.perf_counter()
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        length = int(headers.get(b"content-length", b"0"))
        body = await reader.readexactly(length) if length else b""
        first = time.perf_counter()
    return status, headers, body, first, time.perf_counter()


async def run_load(
    port: int,
    bodies: Sequence[tuple[bytes, bool]],
    *,
    concurrency: int,
    duration: float,
    requests: int | None,
    warmup: float,
    min_requests: int = 0,
    usage: bool = False,
) -> Load:
    """Closed-loop load: ``concurrency`` connections, each sending the workload's requests in turn
    (worker ``i`` starts at kind ``i``) for ``warmup`` seconds unrecorded, then for ``duration``
    seconds (at least ``min_requests`` requests) or exactly ``requests`` requests."""
    requests_bytes = [(build_request(port, body), stream) for body, stream in bodies]
    load = Load()
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    sent = 0  # recorded requests started

    def more(now: float) -> bool:
        if now < start:
            return True
        if requests is not None:
            return sent < requests
        return now < end or sent < min_requests

    async def worker(index: int) -> None:
        nonlocal sent
        kind = index % len(requests_bytes)
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while more(loop.time()):
            recorded = loop.time() >= start
            if recorded:
                sent += 1
            request, stream = requests_bytes[kind]
            began = time.perf_counter()
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, headers, body, first, done = await _exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                load.first_error = load.first_error or repr(exc)
                if writer is not None:
                    writer.close()
                reader = writer = None
                if recorded:
                    load.samples.append(Sample(kind, 0, time.perf_counter() - began, 0.0))
                await asyncio.sleep(0.01)
            else:
                if recorded:
                    sample = Sample(
                        kind,
                        status,
                        done - began,
                        first - began,
                        headers.get(b"x-citadel-deployment", b"").decode(),
                    )
                    if usage and status == 200:
                        sample.prompt_tokens, sample.completion_tokens = _usage(body, stream)
                    load.samples.append(sample)
                if headers.get(b"connection", b"").lower() == b"close":
                    writer.close()
                    reader = writer = None
            kind = (kind + 1) % len(requests_bytes)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    load.elapsed = max(1e-9, loop.time() - start)
    return load


# -- simulators, gateways, scenarios -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sim:
    """One simulated deployment: its flags and the price its deployments are given."""

    name: str
    flags: tuple[str, ...] = ()
    price: float | None = None  # blended USD per 1k tokens (input half, output 1.5x)


@dataclass(frozen=True, slots=True)
class Variant:
    """One measured configuration: a model of its own over some of the simulators."""

    label: str
    gateway: str  # which gateway of the scenario serves it
    balancer: str
    sims: tuple[str, ...]

    @property
    def model(self) -> str:
        return "v-" + "".join(c if c.isalnum() else "-" for c in self.label)


@dataclass(slots=True)
class Scenario:
    name: str
    title: str
    sims: list[Sim]
    variants: list[Variant]
    gateways: dict[str, str]  # name -> extra YAML (the routing section)
    warmup: float
    min_requests: int = 0
    usage: bool = False
    workload: list[tuple[int, bool, str]] = field(
        default_factory=list
    )  # max_tokens, stream, prompt


def price_yaml(price: float | None) -> str:
    if price is None:
        return ""
    return f", price: {{input_per_1k: {price * 0.5:g}, output_per_1k: {price * 1.5:g}}}"


def gateway_config(scenario: Scenario, gateway: str, ports: dict[str, int], db: Path) -> str:
    sims = {sim.name: sim for sim in scenario.sims}
    lines = [
        f'accounts: {{database: "sqlite+aiosqlite:///{db}"}}',
        scenario.gateways[gateway].rstrip("\n"),
        "models:",
    ]
    for variant in scenario.variants:
        if variant.gateway != gateway:
            continue
        lines += [f"  - name: {variant.model}", f"    balancer: {variant.balancer}"]
        lines.append("    deployments:")
        for name in variant.sims:
            lines.append(
                f"      - {{name: {variant.model}-{name}, "
                f'url: "http://127.0.0.1:{ports[name]}", model: sim-chat'
                f"{price_yaml(sims[name].price)}}}"
            )
    return "\n".join(line for line in lines if line) + "\n"


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    base = args.base_latency_ms
    default = DEFAULT_BALANCER
    out: list[Scenario] = []
    if "slow" in args.scenario_list:
        healthy = ("fast-a", "fast-b", "fast-c")
        slow_pool = ("fast-a", "fast-b", "slow")
        others = [b for b in args.balancer_list if b not in ("round_robin", default)]
        variants = [Variant(f"healthy {default}", "on", default, healthy)]
        variants.append(Variant("slow round_robin", "on", "round_robin", slow_pool))
        variants.append(Variant(f"slow {default}", "on", default, slow_pool))
        variants += [Variant(f"slow {b}", "on", b, slow_pool) for b in others]
        flags = ("--latency-ms", f"{base:g}")
        out.append(
            Scenario(
                name="slow",
                title=(
                    f"Slow deployment: three deployments at {base:g} ms, one of them "
                    f"({base * 5:g} ms) 5x slower in the pool under test"
                ),
                sims=[
                    Sim("fast-a", flags),
                    Sim("fast-b", flags),
                    Sim("fast-c", flags),
                    Sim("slow", ("--latency-ms", f"{base * 5:g}")),
                ],
                variants=variants,
                gateways={"on": ""},
                warmup=args.warmup,
                workload=[(16, False, "Say hello")],
            )
        )
    if "failing" in args.scenario_list:
        flags = ("--latency-ms", f"{base:g}")
        pool = ("ok-a", "ok-b", "bad")
        out.append(
            Scenario(
                name="failing",
                title=(
                    "Failing deployment: three deployments, one answering every request with 503"
                ),
                sims=[
                    Sim("ok-a", flags),
                    Sim("ok-b", flags),
                    Sim("bad", (*flags, "--error-rate", "1", "--error-codes", "503")),
                ],
                variants=[
                    Variant(f"on {default}", "on", default, pool),
                    Variant("on round_robin", "on", "round_robin", pool),
                    Variant("off round_robin", "off", "round_robin", pool),
                ],
                gateways={"on": "", "off": ROUTING_OFF},
                warmup=0.0,  # the breakers start cold: the learning is part of the figure
                min_requests=FAILING_MIN_REQUESTS,
                workload=[(16, False, "Say hello")],
            )
        )
    if "cost" in args.scenario_list:
        fast = ("--ttft-ms", "20", "--tbt-ms", "1")
        cheap = ("--ttft-ms", "60", "--tbt-ms", "2")
        pool = ("p1.0", "p0.5", "p0.2")
        target = args.latency_target
        out.append(
            Scenario(
                name="cost",
                title=(
                    "Cost: one model on three deployments priced 1.0, 0.5 and 0.2 per 1k tokens "
                    "(blended); the cheapest slower (TTFT 60 ms, 2 ms/token against 20 ms, "
                    f"1 ms/token) but within the {target:g} s latency target"
                ),
                sims=[Sim("p1.0", fast, 1.0), Sim("p0.5", fast, 0.5), Sim("p0.2", cheap, 0.2)],
                variants=[
                    Variant("cost_optimised", "on", "cost_optimised", pool),
                    Variant(default, "on", default, pool),
                    Variant("round_robin", "on", "round_robin", pool),
                ],
                gateways={"on": f"routing: {{latency_target_seconds: {target:g}}}\n"},
                warmup=args.warmup,
                usage=True,
                workload=[
                    (16, False, "Say hello"),
                    (256, True, LONG_PROMPT),
                    (16, True, "Say hello"),
                    (256, False, LONG_PROMPT),
                ],
            )
        )
    return out


def routing_counters(port: int, model: str) -> Counter[str]:
    """The gateway's routing counters for one model: retries attempted and refused by the
    budget, and picks per deployment (``pick:<name>``). Empty when /metrics cannot be read."""
    counters: Counter[str] = Counter()
    try:
        status, body = http_request("GET", port, "/metrics", timeout=5.0)
    except (OSError, http.client.HTTPException):
        return counters
    if status != 200:
        return counters
    mine = f'model="{model}"'
    for line in body.decode().splitlines():
        if mine not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(RETRIES + "{"):
            counters["retries" if 'outcome="attempted"' in line else "refused"] += int(value)
        elif line.startswith(DECISIONS + "{"):
            deployment = line.split('deployment="', 1)[1].split('"', 1)[0]
            counters["pick:" + deployment.removeprefix(model + "-")] += int(value)
    return counters


def smoke(port: int, model: str) -> None:
    """One request must come back 200 (on a pool with a failing deployment, one of a few)."""
    statuses = []
    for _ in range(6):
        body = chat_body(model, 4, False)
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        status, text = http_request("POST", port, CHAT_PATH, body, headers, timeout=30.0)
        if status == 200:
            return
        statuses.append(f"{status} {text[:200]!r}")
    raise RuntimeError(f"gateway: {model} never answered 200: {statuses}")


def run_scenario(scenario: Scenario, args: argparse.Namespace, run: int) -> list[dict[str, Any]]:
    """Start the simulators and gateways of a scenario, measure each variant once, stop all."""
    python = sys.executable
    env = {**os.environ, "CITADEL_ADMIN_KEY": API_KEY}
    for name in ("REDIS_ENDPOINT", "SQL_DATABASE_ENDPOINT", "CITADEL_CONFIG"):
        env.pop(name, None)
    tmp = Path(tempfile.mkdtemp(prefix="citadel-routing-"))
    services: list[Service] = []
    results: list[dict[str, Any]] = []
    try:
        with running(services):
            ports = {sim.name: free_port() for sim in scenario.sims}
            for sim in scenario.sims:
                command = [python, "-m", "citadel", "sim", "--port", str(ports[sim.name])]
                command += ["--fault-seed", str(run), *sim.flags]
                services.append(Service(f"sim-{sim.name}", command, ports[sim.name], 1, env))
            for service in services:
                service.wait_healthy()
            gateways: dict[str, Service] = {}
            for gateway in scenario.gateways:
                config = tmp / f"{gateway}.yaml"
                config.write_text(gateway_config(scenario, gateway, ports, tmp / "accounts.db"))
                port = free_port()
                command = [python, "-m", "citadel", "--config", str(config), "serve", "gateway"]
                command += ["--port", str(port), "--workers", "1"]
                service = Service(f"gateway-{gateway}", command, port, args.gateway_core, env)
                services.append(service)
                gateways[gateway] = service
            for service in gateways.values():
                service.wait_healthy()
            for variant in scenario.variants:
                smoke(gateways[variant.gateway].port, variant.model)
            shift = (run - 1) % len(scenario.variants)
            order = scenario.variants[shift:] + scenario.variants[:shift]
            for variant in order:
                for service in services:
                    if service.proc.poll() is not None:
                        raise RuntimeError(
                            f"{service.name} died (code {service.proc.returncode}):\n"
                            f"{service.log_tail()}"
                        )
                wait_for_quiet(args.quiet_wait)
                gateway = gateways[variant.gateway]
                result = measure(scenario, variant, gateway, args)
                result["run"] = run
                results.append(result)
                print_point(scenario, result)
    finally:
        for path in tmp.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            tmp.rmdir()
    return results


def measure(
    scenario: Scenario, variant: Variant, gateway: Service, args: argparse.Namespace
) -> dict[str, Any]:
    bodies = [(chat_body(variant.model, n, s, p), s) for n, s, p in scenario.workload]
    before = routing_counters(gateway.port, variant.model)
    load = asyncio.run(
        run_load(
            gateway.port,
            bodies,
            concurrency=args.concurrency,
            duration=args.duration,
            requests=args.requests,
            warmup=scenario.warmup,
            min_requests=scenario.min_requests,
            usage=scenario.usage,
        )
    )
    after = routing_counters(gateway.port, variant.model)
    routing = {k: after[k] - before[k] for k in after} if after else None
    samples = load.samples
    ok = [s for s in samples if s.status == 200]
    latencies = sorted(s.latency for s in ok)
    ttfbs = sorted(s.ttfb for s in ok)
    by_deployment = Counter(s.deployment.removeprefix(variant.model + "-") for s in ok)
    prices = {sim.name: sim.price for sim in scenario.sims}
    spend = 0.0
    tokens = 0
    spend_by_kind = [0.0] * len(scenario.workload)
    ok_by_kind = [0] * len(scenario.workload)
    for s in ok:
        price = prices.get(s.deployment.removeprefix(variant.model + "-")) or 0.0
        cost = (s.prompt_tokens * price * 0.5 + s.completion_tokens * price * 1.5) / 1000.0
        spend += cost
        spend_by_kind[s.kind] += cost
        ok_by_kind[s.kind] += 1
        tokens += s.prompt_tokens + s.completion_tokens
    # The workload is an even mix of its kinds, but a closed loop completes a few more of the
    # quick ones: weigh each kind's mean spend equally, so every balancer pays for the same mix.
    per_request = None
    if all(ok_by_kind):
        per_request = statistics.fmean(
            t / n for t, n in zip(spend_by_kind, ok_by_kind, strict=True)
        )
    statuses = Counter(s.status for s in samples)

    def ms(ordered: list[float], q: float) -> float | None:
        value = percentile(ordered, q)
        return None if value is None else value * 1000.0

    by_kind: dict[str, dict[str, float | None]] = {}
    for kind, (max_tokens, stream, _) in enumerate(scenario.workload):
        mine = [s for s in ok if s.kind == kind]
        name = f"{'stream' if stream else 'plain'}-{max_tokens}"
        by_kind[name] = {
            "p50_ms": ms(sorted(s.latency for s in mine), 50),
            "p99_ms": ms(sorted(s.latency for s in mine), 99),
            "ttfb_p50_ms": ms(sorted(s.ttfb for s in mine), 50),
            "ttfb_p99_ms": ms(sorted(s.ttfb for s in mine), 99),
        }

    return {
        "variant": variant.label,
        "balancer": variant.balancer,
        "gateway": variant.gateway,
        "requests": len(samples),
        "ok": len(ok),
        "success": len(ok) / len(samples) if samples else None,
        "rps": len(samples) / load.elapsed,
        "p50_ms": ms(latencies, 50),
        "p90_ms": ms(latencies, 90),
        "p99_ms": ms(latencies, 99),
        "ttfb_p50_ms": ms(ttfbs, 50),
        "ttfb_p99_ms": ms(ttfbs, 99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "share": {name: n / len(ok) for name, n in sorted(by_deployment.items())} if ok else {},
        "spend": spend,
        "spend_per_1k_requests": None if per_request is None else 1000.0 * per_request,
        "tokens": tokens,
        "by_kind": by_kind,
        # From the gateway's /metrics over the whole point, warm-up included (None: unreadable)
        "retries": None if routing is None else routing.get("retries", 0),
        "retries_refused": None if routing is None else routing.get("refused", 0),
        "picks": {}
        if routing is None
        else {k[5:]: v for k, v in sorted(routing.items()) if k.startswith("pick:")},
        "first_error": load.first_error,
    }


# -- report --------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None or value != value else fmt % value


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def print_point(scenario: Scenario, r: dict[str, Any]) -> None:
    share = " ".join(f"{k}={v:.1%}" for k, v in r["share"].items())
    bad = {k: v for k, v in r["statuses"].items() if k != "200"}
    print(
        f"  run {r['run']} {scenario.name:<8}{r['variant']:<28}{r['requests']:>7} req "
        f"{r['rps']:>6.0f}/s  ok {r['success']:.4%}  p50 {_f(r['p50_ms'], '%.2f')} "
        f"p99 {_f(r['p99_ms'], '%.2f')} ms  [{share}]" + (f"  !! {bad}" if bad else ""),
        flush=True,
    )


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: medians across runs, plus pooled counts."""
    rows: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["variant"] for r in results):
        mine = [r for r in results if r["variant"] == label]
        row: dict[str, Any] = {"variant": label, "balancer": mine[0]["balancer"]}
        row["gateway"] = mine[0]["gateway"]
        row["runs"] = len(mine)
        for key in ("success", "rps", "p50_ms", "p90_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"):
            row[key] = median([r[key] for r in mine])
        for key in ("spend_per_1k_requests", "retries", "retries_refused"):
            row[key] = median([r[key] for r in mine])
        row["requests"] = sum(r["requests"] for r in mine)
        row["ok"] = sum(r["ok"] for r in mine)
        row["success_pooled"] = row["ok"] / row["requests"] if row["requests"] else None
        row["success_worst"] = min(
            (r["success"] for r in mine if r["success"] is not None), default=None
        )
        names = sorted({n for r in mine for n in r["share"]})
        row["share"] = {n: median([r["share"].get(n, 0.0) for r in mine]) for n in names}
        names = sorted({n for r in mine for n in r["picks"]})
        row["picks"] = {n: median([r["picks"].get(n, 0) for r in mine]) for n in names}
        row["by_kind"] = {
            kind: {
                key: median([r["by_kind"][kind][key] for r in mine])
                for key in mine[0]["by_kind"][kind]
            }
            for kind in mine[0]["by_kind"]
        }
        statuses: Counter[str] = Counter()
        for r in mine:
            statuses.update(r["statuses"])
        row["statuses"] = dict(statuses)
        rows[label] = row
    return rows


def print_slow(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    default = DEFAULT_BALANCER
    ref = rows.get(f"healthy {default}")
    ref_p99 = ref["p99_ms"] if ref else None
    print()
    print(f"1. Slow deployment (p50/p99 of whole requests, ms; medians of {args.runs} run(s))")
    header = (
        f"{'pool':<9}{'balancer':<22}{'requests':>9}{'req/s':>8}{'p50':>8}{'p90':>8}{'p99':>8}"
        f"{'p99 / healthy':>15}{'to slow':>9}  errors"
    )
    print(header)
    print("-" * len(header))
    verdict: dict[str, Any] = {}
    for row in rows.values():
        pool, _, balancer = row["variant"].partition(" ")
        ratio = row["p99_ms"] / ref_p99 if ref_p99 and row["p99_ms"] is not None else None
        row["p99_ratio"] = ratio
        name = balancer + (" (default)" if balancer == default else "")
        errors = sum(v for k, v in row["statuses"].items() if k != "200")
        print(
            f"{pool:<9}{name:<22}{row['requests']:>9}{_f(row['rps'], '%.0f'):>8}"
            f"{_f(row['p50_ms'], '%.2f'):>8}{_f(row['p90_ms'], '%.2f'):>8}"
            f"{_f(row['p99_ms'], '%.2f'):>8}{_f(ratio, '%.2fx'):>15}"
            f"{row['share'].get('slow', 0.0):>9.1%}  {errors or 'ok'}"
        )
    mine = rows.get(f"slow {default}")
    if mine and mine.get("p99_ratio") is not None:
        ok = mine["p99_ratio"] <= SLOW_TARGET
        verdict["default_p99_ratio"] = mine["p99_ratio"]
        verdict["met"] = ok
        print(
            f"Target: the default ({default}) within {SLOW_TARGET:g}x of the all-healthy p99: "
            f"{mine['p99_ratio']:.2f}x, {'met' if ok else 'MISSED'}"
        )
    slow_rows = [r for r in rows.values() if r["variant"].startswith("slow ") and r["p99_ms"]]
    if slow_rows:
        best = min(slow_rows, key=lambda r: r["p99_ms"])
        verdict["best"] = best["balancer"]
        is_default = best["balancer"] == default
        print(
            f"Best on the slow pool by p99: {best['balancer']} ({best['p99_ms']:.2f} ms)"
            + ("" if is_default else f" -- not the default ({default})")
        )
    return verdict


def print_failing(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    print()
    print(
        f"2. Failing deployment (success = HTTP 200 share; medians of {args.runs} run(s), "
        "worst run, and all runs pooled)"
    )
    header = (
        f"{'routing':<9}{'balancer':<20}{'requests':>9}{'success':>10}{'worst':>10}"
        f"{'pooled':>10}{'p50':>8}{'p99':>8}{'retries':>9}{'refused':>9}{'to bad':>8}"
        "  statuses (all runs)"
    )
    print(header)
    print("-" * len(header))
    verdict: dict[str, Any] = {}
    for row in rows.values():
        mode, _, balancer = row["variant"].partition(" ")
        name = balancer + (" (default)" if balancer == DEFAULT_BALANCER else "")
        print(
            f"{mode:<9}{name:<20}{row['requests']:>9}{_pct(row['success']):>10}"
            f"{_pct(row['success_worst']):>10}{_pct(row['success_pooled']):>10}"
            f"{_f(row['p50_ms'], '%.2f'):>8}{_f(row['p99_ms'], '%.2f'):>8}"
            f"{_f(row['retries'], '%.0f'):>9}{_f(row['retries_refused'], '%.0f'):>9}"
            f"{_f(row['picks'].get('bad'), '%.0f'):>8}"
            f"  {row['statuses']}"
        )
    mine = rows.get(f"on {DEFAULT_BALANCER}")
    if mine and mine["success_worst"] is not None:
        ok = mine["success_worst"] >= SUCCESS_TARGET
        verdict = {"success_worst": mine["success_worst"], "met": ok}
        print(
            f"Target: >= {SUCCESS_TARGET:.1%} success with routing on: worst run "
            f"{mine['success_worst']:.4%}, {'met' if ok else 'MISSED'}"
        )
    return verdict


def print_cost(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    print()
    print(
        "3. Cost (spend = usage x the serving deployment's price, USD per 1,000 successful "
        f"requests of the mixed workload; medians of {args.runs} run(s)). Latency p50 in ms by "
        "request kind: plain-16 / plain-256 whole, stream-256 time to first byte; p99 of all."
    )
    header = (
        f"{'balancer':<22}{'requests':>9}{'success':>9}{'spend/1k req':>14}"
        f"{'p-16':>7}{'p-256':>7}{'s-256 ttfb':>11}{'p99':>7}  share p1.0 / p0.5 / p0.2"
    )
    print(header)
    print("-" * len(header))
    for row in rows.values():
        share = " / ".join(f"{row['share'].get(n, 0.0):.1%}" for n in ("p1.0", "p0.5", "p0.2"))
        name = row["balancer"] + (" (default)" if row["balancer"] == DEFAULT_BALANCER else "")
        kinds = row["by_kind"]
        print(
            f"{name:<22}{row['requests']:>9}{_pct(row['success']):>9}"
            f"{_f(row['spend_per_1k_requests'], '%.4f'):>14}"
            f"{_f(kinds.get('plain-16', {}).get('p50_ms'), '%.1f'):>7}"
            f"{_f(kinds.get('plain-256', {}).get('p50_ms'), '%.1f'):>7}"
            f"{_f(kinds.get('stream-256', {}).get('ttfb_p50_ms'), '%.1f'):>11}"
            f"{_f(row['p99_ms'], '%.1f'):>7}  {share}"
        )
    verdict: dict[str, Any] = {}
    cheap = rows.get("cost_optimised")
    if cheap and cheap["spend_per_1k_requests"]:
        for other in (DEFAULT_BALANCER, "round_robin"):
            row = rows.get(other)
            if not row or not row["spend_per_1k_requests"]:
                continue
            saved = 1.0 - cheap["spend_per_1k_requests"] / row["spend_per_1k_requests"]
            verdict[f"saved_vs_{other}"] = saved
            equal = abs((cheap["success"] or 0) - (row["success"] or 0)) < 0.001
            print(
                f"Spend saved by cost_optimised against {other}: {saved:.1%} "
                f"(success {_pct(cheap['success'])} vs {_pct(row['success'])}"
                f"{'' if equal else ', NOT equal'})"
            )
    return verdict


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Routing under trouble: slow and failing deployments, cost-optimised routing."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (10)")
    parser.add_argument("--requests", type=int, help="requests per point instead of --duration")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds unrecorded (1)")
    parser.add_argument("--concurrency", type=int, default=8, help="connections (8)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (3)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated: slow,failing,cost"
    )
    parser.add_argument(
        "--balancers",
        default="least_outstanding,power_of_two,weighted_random",
        help="slow scenario: balancers besides round_robin and the default",
    )
    parser.add_argument(
        "--base-latency-ms",
        type=float,
        default=10.0,
        help="first-byte delay of the normal deployments (slow, failing); the slow one has 5x (10)",
    )
    parser.add_argument(
        "--latency-target",
        type=float,
        default=2.0,
        help="cost scenario: routing.latency_target_seconds (2.0)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="before each point, wait up to this long for other processes to go idle (30)",
    )
    parser.add_argument("--gateway-core", type=int, default=0, help="core for the gateway (0)")
    parser.add_argument("--load-core", type=int, default=1, help="core for simulators and load (1)")
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenario_list or not set(args.scenario_list) <= set(SCENARIOS):
        parser.error(f"--scenarios: expected some of {','.join(SCENARIOS)}")
    args.balancer_list = [b.strip() for b in args.balancers.split(",") if b.strip()]
    cores = os.sched_getaffinity(0)
    for name in ("gateway_core", "load_core"):
        if getattr(args, name) not in cores:
            parser.error(f"--{name.replace('_', '-')}: core not available (have {sorted(cores)})")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.sched_setaffinity(0, {args.load_core})
    signal.signal(signal.SIGTERM, _interrupt)
    install_uvloop()
    started = datetime.now(UTC)
    source = source_version()
    print(
        f"citadel source: {source}; default balancer {DEFAULT_BALANCER}; c={args.concurrency}, "
        + (f"{args.requests} requests" if args.requests else f"{args.duration:g} s")
        + f" per point, {args.runs} run(s); gateway on core {args.gateway_core}, simulators and "
        f"load on core {args.load_core}",
        flush=True,
    )
    plan = scenarios(args)
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in plan}
    try:
        for run in range(1, args.runs + 1):
            for scenario in plan:
                results[scenario.name] += run_scenario(scenario, args, run)
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        print(f"error: {exc!s}" if str(exc) else f"error: {exc!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    summary: dict[str, Any] = {}
    verdicts: dict[str, Any] = {}
    printers = {"slow": print_slow, "failing": print_failing, "cost": print_cost}
    for scenario in plan:
        print()
        print(scenario.title)
        rows = summarize(results[scenario.name])
        verdicts[scenario.name] = printers[scenario.name](rows, args)
        summary[scenario.name] = list(rows.values())
    if args.json:
        document = {
            "date": started.isoformat(timespec="seconds"),
            "source": source,
            "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
            "settings": {
                k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))
            },
            "default_balancer": DEFAULT_BALANCER,
            "medians": summary,
            "verdicts": verdicts,
            "runs": results,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
