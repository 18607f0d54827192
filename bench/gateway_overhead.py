"""What the gateway costs: the same load against the simulator directly and through the gateway.

Starts the simulator (pinned to the load core) and one gateway worker (pinned to its own core),
then for each mode (plain, stream), each concurrency and each of ``--runs`` passes measures
requests/s and p50/p99 latency, first directly and then through the gateway, and prints the medians
across passes: the gateway/direct throughput ratio and the latency the gateway adds. For streams
the latencies are times to the first body byte. Plain requests are driven by wrk when it is
installed (else by ``loadgen.py``), streams always by ``loadgen.py``; the load generator shares the
load core with the simulator, so the gateway has a core to itself. With ``--floor``, a bare byte
relay on the gateway's core is measured too: what any proxy hop costs on this machine.

With ``--limits``, the gateway also gets a Redis limiter and an accounts database, a tier whose
limits are all set but never reached, and a user of that tier with an API key; each point is then
measured through the same gateway twice, with the admin key (unlimited: no limiter call) and with
the user's key (one Lua call to admit, one to reconcile), and the difference is what the limiter
costs.

With ``--responses``, ``/v1/responses`` is measured twice more: translated to chat by the gateway
(against the gateway's chat path), and passed through as-is to a deployment with
``responses: true`` (against the simulator's own ``/v1/responses``, measured directly).

    .venv/bin/python bench/gateway_overhead.py [--duration 5] [--runs 3] [--concurrency 1,16,64]
    .venv/bin/python bench/gateway_overhead.py --limits          # c=1,16: limits off vs on
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

# bench/ is sys.path[0] when this runs as a script
from loadgen import CHAT_BODY, cpu_seconds, install_uvloop, system_busy_seconds

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LOADGEN = BENCH_DIR / "loadgen.py"
CHAT_PATH = "/v1/chat/completions"
API_KEY = "sk-bench"
PLAIN_BODY: dict[str, Any] = CHAT_BODY
STREAM_BODY: dict[str, Any] = {**PLAIN_BODY, "stream": True}
# --responses: the same request through the Responses API, translated to chat by the gateway.
RESPONSES_PATH = "/v1/responses"
RESPONSES_BODY: dict[str, Any] = {
    "model": PLAIN_BODY["model"],
    "input": PLAIN_BODY["messages"][0]["content"],
    "max_output_tokens": PLAIN_BODY["max_tokens"],
}
# --responses, pass-through: the same request for a model whose deployment speaks the Responses
# API itself (``responses: true``): the gateway forwards it as-is to the simulator's /v1/responses.
NATIVE_MODEL = "sim-native"
PASSTHROUGH_BODY: dict[str, Any] = {**RESPONSES_BODY, "model": NATIVE_MODEL}
RESPONSES_TARGET_MS = 0.1  # the most the translation may add to p50 at c=1
WARMUP_SECONDS = 1.0
HEALTH_TIMEOUT = 30.0
NOISY_OTHER_CPU = 20.0  # % of a core used by unrelated processes during a point

Mode = Literal["plain", "stream"]
Target = Literal[
    "direct", "relay", "gateway", "limits", "responses", "direct_responses", "passthrough"
]
MODES: tuple[Mode, ...] = ("plain", "stream")
TARGETS: tuple[Target, ...] = (
    *("direct", "relay", "gateway", "limits", "responses", "direct_responses", "passthrough"),
)
# --limits: a tier with every rate limit set (so each is checked) but far out of reach.
LIMITS_BACKEND = "redis://127.0.0.1:6379/11"
LIMITS_TARGET_MS = 0.3  # the most the limiter may add to p50 at c=1
BENCH_TIER = {"requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000}
BENCH_TIER["concurrent_requests"] = 10_000


@dataclass(slots=True)
class Point:
    """One measurement: one mode, one concurrency, one target, one pass. Latencies in ms."""

    mode: Mode
    concurrency: int
    target: Target
    run: int
    tool: str
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int  # non-2xx responses
    socket_errors: int  # connect/read/write errors and timeouts
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, by process
    note: str = ""
    # Streams: the whole response, first byte of the request to the end of the last chunk.
    total_p50_ms: float | None = None
    total_p99_ms: float | None = None

    @property
    def failed(self) -> int:
        return self.errors + self.socket_errors


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """A child process pinned to a core, waited for on GET /health, stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, core: int, env: dict[str, str]):
        self.name = name
        self.port = port
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"citadel-bench-{name}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *command],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the command, so this is the service itself

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before becoming "
                    f"healthy; its output:\n{self.log_tail()}"
                )
            try:
                status, body = http_request("GET", self.port, "/health", timeout=1.0)
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            else:
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} not healthy after {timeout:.0f} s (last: {last}); its output:\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored SIGTERM for 15 s; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def http_request(
    method: str,
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def running(services: list[Service]) -> Iterator[None]:
    """Stop every started service at the end, whatever happens."""
    try:
        yield
    finally:
        for service in reversed(services):
            service.stop()


# -- the floor: a byte relay ------------------------------------------------------------------


class _RelayUpstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        self._client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()


class _RelayClient(asyncio.Protocol):
    """Relays one client connection to its own upstream connection, bytes as they come."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._upstream: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        client = cast(asyncio.Transport, transport)
        self._connecting = asyncio.get_running_loop().create_task(self._connect(client))

    async def _connect(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: _RelayUpstream(client), "127.0.0.1", self._upstream_port
            )
        except OSError:
            client.close()
            return
        self._upstream = upstream
        for data in self._pending:
            self._upstream.write(data)
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._upstream is None:
            self._pending.append(data)
        else:
            self._upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upstream is not None:
            self._upstream.close()


def run_relay(port: int, upstream_port: int) -> int:
    """The cheapest proxy there is: no HTTP parsing, no pooling, no back-pressure (none needed
    for these small messages). What it adds over direct calls is the cost of the extra hop itself
    (two more sockets, two more cross-core wake-ups), the floor under any proxy on this machine.
    """

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _RelayClient(upstream_port), "127.0.0.1", port)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        async with server:
            await stop

    install_uvloop()
    asyncio.run(serve())
    return 0


# -- load ---------------------------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_WRK_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{auth}
"""


def wrk_time_ms(text: str) -> float:
    """wrk's '339.00us', '0.91ms', '1.20s' in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/sec, the 50 % and 99 % latencies, the request count and the errors."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rps and total):
        raise ValueError(f"unparsable wrk output:\n{output}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "rps": float(rps.group(1)),
        "p50_ms": wrk_time_ms(p50.group(1)) if p50 else None,
        "p99_ms": wrk_time_ms(p99.group(1)) if p99 else None,
        "requests": int(total.group(1)),
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(n) for n in sock.groups()) if sock else 0,
    }


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(self, args: argparse.Namespace, wrk: str | None) -> None:
        self.args = args
        self.wrk = wrk
        self.load_core: int = args.load_core
        self.lua_dir = Path(tempfile.mkdtemp(prefix="citadel-bench-"))
        # The API key each target is called with (none: the simulator or the relay).
        self.keys: dict[Target, str] = {
            "gateway": API_KEY,
            "responses": API_KEY,
            "passthrough": API_KEY,
        }

    def close(self) -> None:
        shutil.rmtree(self.lua_dir, ignore_errors=True)

    def lua_script(self, key: str | None, doc: dict[str, Any]) -> Path:
        raw = json.dumps(doc, separators=(",", ":"))
        path = self.lua_dir / f"script-{hash((key, raw)) & 0xFFFFFFFF:08x}.lua"
        if not path.exists():
            body = json.dumps(raw)  # a Lua string
            header = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
            path.write_text(_WRK_LUA.format(body=body, auth=header))
        return path

    def run_wrk(
        self,
        port: int,
        concurrency: int,
        key: str | None,
        watch: dict[str, int],
        path: str = CHAT_PATH,
        doc: dict[str, Any] = PLAIN_BODY,
    ) -> Point:
        url = f"http://127.0.0.1:{port}{path}"
        script = self.lua_script(key, doc)

        def wrk(seconds: int, latency: bool) -> str:
            command = ["taskset", "-c", str(self.load_core), self.wrk or "wrk", "-t1"]
            command += [f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s"]
            command += ["--latency"] if latency else []
            command += ["-s", str(script), url]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
            return done.stdout

        wrk(max(1, round(WARMUP_SECONDS)), latency=False)
        seconds = max(1, round(self.args.duration))

        def sample() -> dict[str, float]:
            cpu = {name: cpu_seconds(pid) for name, pid in watch.items()}
            cpu["load"] = children_cpu_seconds()  # wrk, once it has exited
            cpu["system"] = system_busy_seconds()
            return cpu

        before = sample()
        started = time.perf_counter()
        output = wrk(seconds, latency=True)
        elapsed = time.perf_counter() - started
        after = sample()
        cpu = {name: 100.0 * (after[name] - before[name]) / elapsed for name in before}
        system = cpu.pop("system")
        cpu["other"] = max(0.0, system - sum(cpu.values()))
        parsed = parse_wrk(output)
        return Point(
            mode="plain",
            concurrency=concurrency,
            target="direct",
            run=0,
            tool="wrk",
            cpu=cpu,
            **parsed,
        )

    def run_loadgen(
        self,
        port: int,
        mode: Mode,
        concurrency: int,
        key: str | None,
        watch: dict[str, int],
        path: str = CHAT_PATH,
        doc: dict[str, Any] = PLAIN_BODY,
    ) -> Point:
        body = json.dumps({**doc, "stream": True} if mode == "stream" else doc)
        command = ["taskset", "-c", str(self.load_core), sys.executable, str(LOADGEN)]
        command += ["--url", f"http://127.0.0.1:{port}{path}", "--json", "--body", body]
        command += ["-c", str(concurrency), "-d", str(self.args.duration)]
        command += ["--warmup", str(WARMUP_SECONDS)]
        command += ["-H", f"Authorization: Bearer {key}"] if key else []
        for name, pid in watch.items():
            command += ["--watch-pid", f"{name}={pid}"]
        timeout = WARMUP_SECONDS + self.args.duration + 60
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"loadgen did not finish within {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()}")
        summary = json.loads(done.stdout)
        # For streams, the latency that matters is the time to the first byte of the body.
        key = "ttfb" if mode == "stream" else "latency"
        return Point(
            mode=mode,
            concurrency=concurrency,
            target="direct",
            run=0,
            tool="loadgen",
            rps=summary["rps"],
            p50_ms=summary[f"{key}_p50_ms"],
            p99_ms=summary[f"{key}_p99_ms"],
            requests=summary["requests"],
            errors=summary["errors"],
            socket_errors=summary["socket_errors"],
            cpu=summary.get("cpu", {}),
            note=summary.get("first_error", ""),
            total_p50_ms=summary["latency_p50_ms"] if mode == "stream" else None,
            total_p99_ms=summary["latency_p99_ms"] if mode == "stream" else None,
        )

    def measure(
        self, mode: Mode, concurrency: int, target: Target, port: int, watch: dict[str, int]
    ) -> Point:
        key = self.keys.get(target)
        path, doc = {
            "responses": (RESPONSES_PATH, RESPONSES_BODY),
            "direct_responses": (RESPONSES_PATH, RESPONSES_BODY),  # the simulator's own
            "passthrough": (RESPONSES_PATH, PASSTHROUGH_BODY),
        }.get(target, (CHAT_PATH, PLAIN_BODY))
        if mode == "plain" and self.wrk:
            point = self.run_wrk(port, concurrency, key, watch, path, doc)
        else:
            point = self.run_loadgen(port, mode, concurrency, key, watch, path, doc)
        point.target = target
        return point


# -- report -------------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(points: list[Point], concurrencies: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        for conc in concurrencies:
            row: dict[str, Any] = {"mode": mode, "concurrency": conc}
            for target in TARGETS:
                mine = [
                    p for p in points if (p.mode, p.concurrency, p.target) == (mode, conc, target)
                ]
                if not mine:
                    continue
                row[target] = {
                    "rps": median([p.rps for p in mine]),
                    # CPU of the service under test per request, µs (gateway or relay)
                    "cpu_us_per_request": median([_cpu_per_request(p) for p in mine]),
                    "p50_ms": median([p.p50_ms for p in mine]),
                    "p99_ms": median([p.p99_ms for p in mine]),
                    "total_p50_ms": median([p.total_p50_ms for p in mine]),
                    "total_p99_ms": median([p.total_p99_ms for p in mine]),
                    "errors": sum(p.errors for p in mine),
                    "socket_errors": sum(p.socket_errors for p in mine),
                    "requests": sum(p.requests for p in mine),
                    "cpu": {
                        name: median([p.cpu.get(name) for p in mine])
                        for name in sorted({n for p in mine for n in p.cpu})
                    },
                    "runs": len(mine),
                    "tool": mine[0].tool,
                }
            pairs = (("direct", "gateway", ""), ("direct", "relay", "relay_"))
            # --limits: the same gateway with limits on (user key) against off (admin key).
            pairs += (("gateway", "limits", "limits_"),)
            # --responses: the Responses API (translated to chat) against the plain chat path.
            pairs += (("gateway", "responses", "responses_"),)
            # --responses, pass-through: the gateway forwarding /v1/responses as-is against the
            # simulator's own /v1/responses (what the gateway adds to the Responses API).
            pairs += (("direct_responses", "passthrough", "passthrough_"),)
            for base, target, prefix in pairs:
                if base not in row or target not in row:
                    continue
                direct, other = row[base], row[target]
                row[f"{prefix}ratio"] = other["rps"] / direct["rps"] if direct["rps"] else None
                for q in ("p50", "p99"):
                    d, g = direct[f"{q}_ms"], other[f"{q}_ms"]
                    row[f"{prefix}added_{q}_ms"] = None if d is None or g is None else g - d
            if "gateway" in row and "limits" in row:
                # Limits off and on are measured back to back in each run: the median of the
                # per-run differences is less exposed to drift in the machine's load.
                paired: dict[str, list[float | None]] = {"p50": [], "p99": [], "ratio": []}
                by_run: dict[int, dict[str, Point]] = {}
                for p in points:
                    if (p.mode, p.concurrency) == (mode, conc):
                        by_run.setdefault(p.run, {})[p.target] = p
                for pair in by_run.values():
                    off, on = pair.get("gateway"), pair.get("limits")
                    if off is None or on is None:
                        continue
                    for q in ("p50", "p99"):
                        a, b = getattr(off, f"{q}_ms"), getattr(on, f"{q}_ms")
                        paired[q].append(None if a is None or b is None else b - a)
                    paired["ratio"].append(on.rps / off.rps if off.rps else None)
                row["limits_paired_added_p50_ms"] = median(paired["p50"])
                row["limits_paired_added_p99_ms"] = median(paired["p99"])
                row["limits_paired_ratio"] = median(paired["ratio"])
            rows.append(row)
    return rows


def _cpu_per_request(point: Point) -> float | None:
    """CPU µs per request of the service under test (the gateway, else the relay)."""
    percent = point.cpu.get("gateway", point.cpu.get("relay"))
    if percent is None or not point.rps:
        return None
    return percent / 100.0 / point.rps * 1e6


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def print_table(rows: list[dict[str, Any]], runs: int) -> None:
    print()
    print(f"Medians of {runs} run(s). Latencies in ms; stream latencies = time to first byte.")
    header = (
        f"{'mode':<7}{'conc':>5}{'direct rps':>12}{'gateway rps':>13}{'ratio':>7}"
        f"{'direct p50':>12}{'gw p50':>9}{'added p50':>11}"
        f"{'direct p99':>12}{'gw p99':>9}{'added p99':>11}  errors"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        d, g = row.get("direct", {}), row.get("gateway", {})
        errors = []
        for target, data in (("direct", d), ("gw", g)):
            if data and (data["errors"] or data["socket_errors"]):
                errors.append(f"{target}: {data['errors']} non-2xx, {data['socket_errors']} socket")
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}"
            f"{_f(d.get('rps'), '%.0f'):>12}{_f(g.get('rps'), '%.0f'):>13}"
            f"{_f(row.get('ratio'), '%.2f'):>7}"
            f"{_f(d.get('p50_ms'), '%.3f'):>12}{_f(g.get('p50_ms'), '%.3f'):>9}"
            f"{_f(row.get('added_p50_ms'), '%+.3f'):>11}"
            f"{_f(d.get('p99_ms'), '%.3f'):>12}{_f(g.get('p99_ms'), '%.3f'):>9}"
            f"{_f(row.get('added_p99_ms'), '%+.3f'):>11}"
            f"  {'!! ' + '; '.join(errors) if errors else 'ok'}"
        )
    print()
    print("CPU in % of one core (medians); 'other' is everything else the machine ran meanwhile")
    print("(other users' jobs: a high figure means a noisy point).")
    print(f"{'':12}{'-- gateway points --------------':>33}{'-- direct points -----':>25}")
    print(
        f"{'mode':<7}{'conc':>5}{'gateway':>9}{'sim':>7}{'load':>7}{'other':>8}"
        f"{'sim':>9}{'load':>7}{'other':>8}"
    )
    for row in rows:
        g = row.get("gateway", {}).get("cpu", {})
        d = row.get("direct", {}).get("cpu", {})
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}{_f(g.get('gateway'), '%.0f'):>9}"
            f"{_f(g.get('sim'), '%.0f'):>7}{_f(g.get('load'), '%.0f'):>7}"
            f"{_f(g.get('other'), '%.0f'):>8}{_f(d.get('sim'), '%.0f'):>9}"
            f"{_f(d.get('load'), '%.0f'):>7}{_f(d.get('other'), '%.0f'):>8}"
        )


def print_floor(rows: list[dict[str, Any]]) -> None:
    if not any("relay" in row for row in rows):
        return
    print()
    print("The floor: the same load through a bare byte relay on the gateway's core (no HTTP).")
    print("'gateway own' = what the gateway adds beyond the relay = its own cost, ms.")
    print(
        f"{'mode':<7}{'conc':>5}{'relay rps':>11}{'ratio':>7}{'relay +p50':>12}{'relay +p99':>12}"
        f"{'gw own p50':>12}{'gw own p99':>12}"
    )
    for row in rows:
        r = row.get("relay")
        if not r:
            continue
        own = {}
        for q in ("p50", "p99"):
            g, f = row.get(f"added_{q}_ms"), row.get(f"relay_added_{q}_ms")
            own[q] = None if g is None or f is None else g - f
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}{_f(r['rps'], '%.0f'):>11}"
            f"{_f(row.get('relay_ratio'), '%.2f'):>7}"
            f"{_f(row.get('relay_added_p50_ms'), '%+.3f'):>12}"
            f"{_f(row.get('relay_added_p99_ms'), '%+.3f'):>12}"
            f"{_f(own['p50'], '%+.3f'):>12}{_f(own['p99'], '%+.3f'):>12}"
        )


def print_limits(rows: list[dict[str, Any]], check: dict[str, Any] | None) -> None:
    if not any("limits" in row for row in rows):
        return
    print()
    print("Limits on vs off: the same gateway, the user's key (tier 'bench': every rate limit set,")
    print("none reached) against the admin key (unlimited, no limiter call). 'added' = on - off,")
    print("ms (difference of medians; 'paired' = median of the per-run differences, the two being")
    print("measured back to back). CPU µs/req: the gateway's CPU per request.")
    header = (
        f"{'mode':<7}{'conc':>5}{'off rps':>9}{'on rps':>9}{'ratio':>7}"
        f"{'off p50':>9}{'on p50':>9}{'added p50':>11}{'paired':>9}"
        f"{'off p99':>9}{'on p99':>9}{'added p99':>11}"
        f"{'µs/req off':>12}{'on':>6}{'redis %':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        off, on = row.get("gateway"), row.get("limits")
        if not (off and on):
            continue
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}{_f(off['rps'], '%.0f'):>9}"
            f"{_f(on['rps'], '%.0f'):>9}{_f(row.get('limits_ratio'), '%.2f'):>7}"
            f"{_f(off['p50_ms'], '%.3f'):>9}{_f(on['p50_ms'], '%.3f'):>9}"
            f"{_f(row.get('limits_added_p50_ms'), '%+.3f'):>11}"
            f"{_f(row.get('limits_paired_added_p50_ms'), '%+.3f'):>9}"
            f"{_f(off['p99_ms'], '%.3f'):>9}{_f(on['p99_ms'], '%.3f'):>9}"
            f"{_f(row.get('limits_added_p99_ms'), '%+.3f'):>11}"
            f"{_f(off.get('cpu_us_per_request'), '%.0f'):>12}"
            f"{_f(on.get('cpu_us_per_request'), '%.0f'):>6}"
            f"{_f(on['cpu'].get('redis'), '%.0f'):>9}"
        )
    for row in rows:
        added = row.get("limits_added_p50_ms")
        if row["concurrency"] == 1 and added is not None:
            verdict = "met" if added <= LIMITS_TARGET_MS else "MISSED"
            print(
                f"Target: limits add <= {LIMITS_TARGET_MS:.3f} ms to p50 at c=1 "
                f"({row['mode']}): {added:+.3f} ms, {verdict}"
            )
    if check:
        print(
            f"Check: the limiter allowed {check['allowed']} requests with "
            f"{check['failures']} backend failures; Redis ran {check['evalsha']} EVALSHA "
            f"({_f(check.get('evalsha_per_admission'), '%.2f')} per admission: admit + "
            f"reconcile), {_f(check.get('evalsha_usec'), '%.1f')} µs each inside Redis."
        )


def print_responses(rows: list[dict[str, Any]]) -> None:
    """The Responses API rows: /v1/responses (translated to chat) against /v1/chat/completions,
    and passed through as-is against the simulator's own /v1/responses."""
    if not any("responses" in row for row in rows):
        return
    print()
    print("Responses API vs chat: the same request through /v1/responses (translated to chat and")
    print("back by the gateway) and through /v1/chat/completions. 'added' = responses - chat, ms.")
    print_pair_table(rows, "gateway", "responses", "responses_", ("chat", "resp"))
    for row in rows:
        added = row.get("responses_added_p50_ms")
        if row["concurrency"] == 1 and added is not None:
            verdict = "met" if added <= RESPONSES_TARGET_MS else "MISSED"
            print(
                f"Target: the translation adds <= {RESPONSES_TARGET_MS:.3f} ms to p50 at c=1 "
                f"({row['mode']}): {added:+.3f} ms, {verdict}"
            )
    if not any("passthrough" in row for row in rows):
        return
    print()
    print("Responses API passed through: /v1/responses of a model whose deployment speaks it")
    print(f"(responses: true, model {NATIVE_MODEL}), forwarded as-is by the gateway, against the")
    print("simulator's own /v1/responses directly. 'added' = through the gateway - direct, ms;")
    print("'chat added' = the same for /v1/chat/completions (the gateway's cost on chat).")
    print_pair_table(
        rows, "direct_responses", "passthrough", "passthrough_", ("direct", "gw"), "added_p50_ms"
    )


def print_pair_table(
    rows: list[dict[str, Any]],
    base: str,
    target: str,
    prefix: str,
    labels: tuple[str, str],
    chat_added: str | None = None,
) -> None:
    """One table of ``target`` against ``base`` (summarize's ``prefix``ed ratio and added
    latencies), the columns named by ``labels``; with ``chat_added``, that row field (the
    gateway's added p50 on chat) as a column after the added p50."""
    a, b = labels
    width = max(len(a), len(b)) + 6
    header = (
        f"{'mode':<7}{'conc':>5}{a + ' rps':>{width}}{b + ' rps':>{width}}{'ratio':>7}"
        f"{a + ' p50':>{width}}{b + ' p50':>{width}}{'added p50':>11}"
        + (f"{'chat added':>12}" if chat_added else "")
        + f"{a + ' p99':>{width}}{b + ' p99':>{width}}{'added p99':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        x, y = row.get(base), row.get(target)
        if not (x and y):
            continue
        extra = f"{_f(row.get(chat_added), '%+.3f'):>12}" if chat_added else ""
        print(
            f"{row['mode']:<7}{row['concurrency']:>5}{_f(x['rps'], '%.0f'):>{width}}"
            f"{_f(y['rps'], '%.0f'):>{width}}{_f(row.get(prefix + 'ratio'), '%.2f'):>7}"
            f"{_f(x['p50_ms'], '%.3f'):>{width}}{_f(y['p50_ms'], '%.3f'):>{width}}"
            f"{_f(row.get(prefix + 'added_p50_ms'), '%+.3f'):>11}{extra}"
            f"{_f(x['p99_ms'], '%.3f'):>{width}}{_f(y['p99_ms'], '%.3f'):>{width}}"
            f"{_f(row.get(prefix + 'added_p99_ms'), '%+.3f'):>11}"
        )


def print_notes(rows: list[dict[str, Any]]) -> None:
    notes: list[str] = []
    for row in rows:
        d, g = row.get("direct"), row.get("gateway")
        if not (d and g):
            continue
        where = f"{row['mode']} c={row['concurrency']}"
        gw_cpu = g["cpu"].get("gateway")
        up_cpu = (g["cpu"].get("sim") or 0.0) + (g["cpu"].get("load") or 0.0)
        if row["concurrency"] > 1 and gw_cpu is not None and gw_cpu < 85 and up_cpu > 85:
            notes.append(
                f"{where}: the gateway core was {gw_cpu:.0f}% busy while simulator + load used "
                f"{up_cpu:.0f}% of their core: the gateway figure is bounded by the simulator "
                f"and load generator, not by the gateway."
            )
        for target in TARGETS:
            data = row.get(target)
            if not data:
                continue
            other = data["cpu"].get("other")
            if other is not None and other > NOISY_OTHER_CPU:
                notes.append(
                    f"{where} {target}: {other:.0f}% of a core went to other processes or "
                    f"uncharged kernel work meanwhile (median): the figures may be noisy."
                )
            if data["errors"] or data["socket_errors"]:
                notes.append(
                    f"{where} {target}: {data['errors']} non-2xx responses and "
                    f"{data['socket_errors']} socket errors over {data['runs']} run(s): "
                    f"its figures are suspect."
                )
    if notes:
        print()
        print("Notes:")
        for note in notes:
            print(f"  - {note}")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the gateway's overhead over calling the simulator directly."
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point (5)")
    parser.add_argument("--runs", type=int, default=3, help="passes over the matrix (3)")
    parser.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated connection counts (1,16,64; with --limits 1,16)",
    )
    parser.add_argument(
        "--modes", default="plain,stream", help="comma-separated: plain, stream (both)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--tool",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator for plain requests: wrk if installed (auto), or loadgen.py",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="before each point, wait up to this long for other processes to go idle (30)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure a bare byte relay on the gateway's core: the cost of the hop itself",
    )
    parser.add_argument("--relay", nargs=2, type=int, help=argparse.SUPPRESS)  # PORT UPSTREAM
    parser.add_argument("--gateway-core", type=int, default=0, help="core for the gateway (0)")
    parser.add_argument(
        "--load-core", type=int, default=1, help="core for the simulator and load generator (1)"
    )
    parser.add_argument(
        "--sim-args", default="", help="extra simulator flags, e.g. '--ttft-ms 0 --tbt-ms 0'"
    )
    parser.add_argument(
        "--responses",
        action="store_true",
        help="also measure /v1/responses (translated to chat) against the gateway's chat path "
        f"(the translation may add at most {RESPONSES_TARGET_MS} ms at p50 at c=1), and "
        "passed through to a deployment with responses: true against the simulator's own "
        "/v1/responses",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="also measure the gateway with limits on: a user's key (a Redis limiter call to "
        "admit and one to reconcile) against the admin key (unlimited), in the same run",
    )
    parser.add_argument(
        "--limits-backend",
        default=LIMITS_BACKEND,
        metavar="URL",
        help=f"with --limits: the Redis database, flushed first ({LIMITS_BACKEND})",
    )
    args = parser.parse_args(argv)
    if args.relay:
        return args
    if args.concurrency is None:
        args.concurrency = "1,16" if args.limits else "1,16,64"
    try:
        args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency: expected numbers like 1,16,64, got {args.concurrency!r}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.mode_list) <= set(MODES) or not args.mode_list:
        parser.error(f"--modes: expected plain and/or stream, got {args.modes!r}")
    cores = os.sched_getaffinity(0)
    for name in ("gateway_core", "load_core"):
        if getattr(args, name) not in cores:
            parser.error(f"--{name.replace('_', '-')}: core not available (have {sorted(cores)})")
    if args.gateway_core == args.load_core:
        print("warning: the gateway shares its core with the load", file=sys.stderr)
    return args


def find_wrk(tool: str) -> str | None:
    if tool == "python":
        return None
    wrk = shutil.which("wrk")
    if wrk is None:
        message = (
            "wrk is not installed (Debian/Ubuntu: apt-get install -y wrk); "
            "plain requests use the Python load generator bench/loadgen.py instead"
        )
        if tool == "wrk":
            raise SystemExit(f"error: {message.split(';')[0]}")
        print(f"note: {message}", file=sys.stderr)
    return wrk


def smoke_test(port: int, key: str | None, what: str, limited: bool | None = None) -> None:
    """Both bodies answer 200; with ``limited`` set, check that the limiter did (or did not)
    see the request: its ``x-ratelimit-*`` headers are there exactly when limits apply."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for body in (PLAIN_BODY, STREAM_BODY):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
        try:
            conn.request("POST", CHAT_PATH, body=json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            status, text = response.status, response.read()
            has_limits = response.getheader("x-ratelimit-limit-requests") is not None
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError(f"{what}: POST {CHAT_PATH} gave HTTP {status}: {text[:300]!r}")
        if limited is not None and has_limits != limited:
            raise RuntimeError(
                f"{what}: x-ratelimit headers {'missing' if limited else 'present'}: "
                f"limits are {'not ' if limited else ''}applied to this key"
            )


def smoke_responses(gw_port: int, sim_port: int) -> None:
    """/v1/responses answers 200 translated and passed through; the pass-through's reply is the
    simulator's own (its ids carry the prefix of its chat ids; the translation mints its own)."""

    def post(port: int, path: str, body: dict[str, Any], key: str | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            status, text = response.status, response.read()
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError(f"POST {path} on :{port} gave HTTP {status}: {text[:300]!r}")
        doc: dict[str, Any] = json.loads(text)
        return doc

    prefix = post(sim_port, CHAT_PATH, PLAIN_BODY, None)["id"].removeprefix("chatcmpl-")[:16]
    translated = post(gw_port, RESPONSES_PATH, RESPONSES_BODY, API_KEY)["id"]
    native = post(gw_port, RESPONSES_PATH, PASSTHROUGH_BODY, API_KEY)["id"]
    if translated.startswith(f"resp_{prefix}") or not native.startswith(f"resp_{prefix}"):
        raise RuntimeError(
            f"/v1/responses: the pass-through's reply ({native}) is not the simulator's own, or "
            f"the translated one ({translated}) is"
        )


def run_matrix(
    bench: Bench,
    args: argparse.Namespace,
    sim: Service,
    gateway: Service,
    relay: Service | None,
    redis_pid: int | None = None,
) -> list[Point]:
    """Every pass, mode and concurrency: direct, (the relay,) then through the gateway (with
    ``--limits``: with the admin key and with the user's key, in alternating order by pass)."""
    targets: list[tuple[Target, int, dict[str, int]]] = [("direct", sim.port, {"sim": sim.pid})]
    if relay is not None:
        targets.append(("relay", relay.port, {"relay": relay.pid, "sim": sim.pid}))
    gw_watch = {"gateway": gateway.pid, "sim": sim.pid}
    if redis_pid is not None:
        gw_watch["redis"] = redis_pid
    targets.append(("gateway", gateway.port, gw_watch))
    if "limits" in bench.keys:
        targets.append(("limits", gateway.port, gw_watch))
    if args.responses:
        targets.append(("responses", gateway.port, gw_watch))
        targets.append(("direct_responses", sim.port, {"sim": sim.pid}))
        targets.append(("passthrough", gateway.port, gw_watch))
    services = [service for service in (sim, relay, gateway) if service is not None]
    points: list[Point] = []
    for run in range(1, args.runs + 1):
        order = list(targets)
        if run % 2 == 0 and "limits" in bench.keys:  # limits on first every other pass
            names = [target for target, _, _ in order]
            off, on = names.index("gateway"), names.index("limits")
            order[off], order[on] = order[on], order[off]
        for mode in args.mode_list:
            for conc in args.concurrencies:
                for target, port, watch in order:
                    for service in services:
                        if service.proc.poll() is not None:
                            raise RuntimeError(
                                f"{service.name} died (code {service.proc.returncode}):\n"
                                f"{service.log_tail()}"
                            )
                    wait_for_quiet(args.quiet_wait)
                    point = bench.measure(mode, conc, target, port, watch)
                    point.run = run
                    points.append(point)
                    print_point(point)
    return points


def wait_for_quiet(limit: float) -> None:
    """Wait (up to ``limit`` seconds) until the machine is idle but for us.

    Between points our own processes are idle, so CPU time used now is other people's work, which
    would distort the next point on a shared machine.
    """
    deadline = time.monotonic() + limit
    waited = False
    while True:
        before, started = system_busy_seconds(), time.perf_counter()
        time.sleep(0.5)
        busy = 100.0 * (system_busy_seconds() - before) / (time.perf_counter() - started)
        if busy < NOISY_OTHER_CPU or time.monotonic() >= deadline:
            break
        if not waited:
            print(f"  (other processes use {busy:.0f}% of a core; waiting for quiet)", flush=True)
            waited = True


def print_point(point: Point) -> None:
    errors = f"  !! {point.errors} non-2xx, {point.socket_errors} socket" if point.failed else ""
    note = f"  ({point.note})" if point.note else ""
    if point.total_p50_ms is not None:
        note = f"  (whole stream p50 {_f(point.total_p50_ms, '%.3f')} ms){note}"
    print(
        f"  run {point.run} {point.mode:<6} c={point.concurrency:<3} {point.target:<8}"
        f"{point.rps:>9.0f} rps  p50 {_f(point.p50_ms, '%.3f')} ms"
        f"  p99 {_f(point.p99_ms, '%.3f')} ms"
        f"  other cpu {point.cpu.get('other', 0.0):.0f}%{errors}{note}",
        flush=True,
    )


def source_version() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


# -- --limits: Redis, the accounts database, the user's key ----------------------------------


def redis_command(url: str, *command: str) -> Any:
    """One command through the gateway's own Redis client (a fresh connection)."""
    from citadel.stores.redis import RedisClient

    async def call() -> Any:
        client = RedisClient.from_url(url, timeout=5.0)
        try:
            return await client.execute(*command)
        finally:
            await client.aclose()

    return asyncio.run(call())


def redis_info(url: str, section: str) -> dict[str, str]:
    reply = redis_command(url, "INFO", section)
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    info: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            info[name.strip()] = value.strip()
    return info


def evalsha_stats(url: str) -> tuple[int, int]:
    """EVALSHA calls and the server's total µs in them so far (INFO commandstats)."""
    stat = redis_info(url, "commandstats").get("cmdstat_evalsha", "")
    fields = dict(item.split("=", 1) for item in stat.split(",") if "=" in item)
    return int(fields.get("calls", 0)), int(float(fields.get("usec", 0)))


def redis_pid(url: str) -> int | None:
    """Redis's process id when it runs on this machine (for its CPU use), else None."""
    pid = redis_info(url, "server").get("process_id", "")
    return int(pid) if pid.isdigit() and Path(f"/proc/{pid}").exists() else None


def limits_config(backend: str, database: Path) -> str:
    tier = ", ".join(f"{name}: {value}" for name, value in BENCH_TIER.items())
    return (
        "tiers:\n"
        f"  bench: {{{tier}}}\n"
        f'limits: {{backend: "{backend}"}}\n'
        f'accounts: {{database: "sqlite+aiosqlite:///{database}", default_tier: bench}}\n'
    )


def create_user_key(config: str, env: dict[str, str]) -> str:
    """A user of the tier 'bench' and an API key of theirs, with the CLI; returns the secret."""

    def cli(*command: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "citadel", "--config", config, *command, "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"citadel {' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    user = cli(
        "users", "create", "--name", "bench", "--email", "bench@example.com", "--tier", "bench"
    )
    key = cli("keys", "create", "--user", user["id"])
    secret: str = key["secret"]
    return secret


def gateway_metric(port: int, name: str, label: str = "") -> float:
    """The sum of a counter's samples on the gateway's /metrics (those containing ``label``)."""
    status, body = http_request("GET", port, "/metrics")
    if status != 200:
        raise RuntimeError(f"gateway /metrics gave HTTP {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.relay:  # this script, started by itself as the relay of --floor
        return run_relay(*args.relay)
    wrk = find_wrk(args.tool)
    # This process only waits; keep it off the gateway's core.
    os.sched_setaffinity(0, {args.load_core})
    # SIGTERM unwinds like Ctrl-C, so the simulator and the gateway are stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    python = sys.executable
    sim_port, gw_port = free_port(), free_port()
    env = {**os.environ, "CITADEL_ADMIN_KEY": API_KEY}
    # These would override the settings file's limiter and accounts database.
    for name in ("REDIS_ENDPOINT", "SQL_DATABASE_ENDPOINT"):
        env.pop(name, None)
    bench = Bench(args, wrk)
    config = tempfile.NamedTemporaryFile(  # noqa: SIM115 - removed in the finally below
        "w", prefix="citadel-bench-", suffix=".yaml", delete=False
    )
    config.write(
        "models:\n"
        "  - name: sim-chat\n"
        "    deployments:\n"
        f'      - {{name: sim-a, url: "http://127.0.0.1:{sim_port}", model: sim-chat}}\n'
    )
    if args.responses:  # a model whose deployment speaks the Responses API: passed through
        config.write(
            f"  - name: {NATIVE_MODEL}\n"
            "    deployments:\n"
            f'      - {{name: sim-n, url: "http://127.0.0.1:{sim_port}", model: sim-chat, '
            "responses: true}\n"
        )
    if args.limits:
        config.write(limits_config(args.limits_backend, bench.lua_dir / "accounts.db"))
    config.close()
    services: list[Service] = []
    points: list[Point] = []
    check: dict[str, Any] | None = None
    redis: int | None = None
    started = datetime.now(UTC)
    source = source_version()
    print(f"citadel source: {source}", flush=True)
    try:
        if args.limits:
            redis_command(args.limits_backend, "FLUSHDB")
            redis = redis_pid(args.limits_backend)
            bench.keys["limits"] = create_user_key(config.name, env)
        with running(services):
            sim_cmd = [python, "-m", "citadel", "sim", "--port", str(sim_port)]
            sim_cmd += args.sim_args.split()
            services.append(Service("simulator", sim_cmd, sim_port, args.load_core, env))
            services[-1].wait_healthy()
            gw_cmd = [python, "-m", "citadel", "--config", config.name, "serve", "gateway"]
            gw_cmd += ["--port", str(gw_port), "--workers", "1"]
            services.append(Service("gateway", gw_cmd, gw_port, args.gateway_core, env))
            services[-1].wait_healthy()
            sim, gateway = services
            relay: Service | None = None
            if args.floor:
                relay_port = free_port()
                relay_cmd = [python, str(Path(__file__).resolve()), "--relay"]
                relay_cmd += [str(relay_port), str(sim_port)]
                relay = Service("relay", relay_cmd, relay_port, args.gateway_core, env)
                services.append(relay)
                relay.wait_healthy()
            smoke_test(sim_port, None, "simulator")
            smoke_test(gw_port, API_KEY, "gateway", limited=False if args.limits else None)
            if args.limits:
                smoke_test(gw_port, bench.keys["limits"], "gateway (user key)", limited=True)
            if args.responses:
                smoke_responses(gw_port, sim_port)
            print(
                f"simulator pid {sim.pid} :{sim_port} on core {args.load_core}; "
                f"gateway pid {gateway.pid} :{gw_port} on core {args.gateway_core}; "
                f"load on core {args.load_core}; plain load: {'wrk' if wrk else 'loadgen.py'}, "
                f"stream load: loadgen.py; {args.duration:g} s per point after "
                f"{WARMUP_SECONDS:g} s warm-up",
                flush=True,
            )
            if args.limits:
                calls0, usec0 = evalsha_stats(args.limits_backend)
                allowed0 = gateway_metric(gw_port, "citadel_limiter_decisions_total", "allowed")
            points = run_matrix(bench, args, sim, gateway, relay, redis)
            if args.limits:
                time.sleep(0.5)  # reconciliations run in the background
                calls, usec = evalsha_stats(args.limits_backend)
                calls, usec = calls - calls0, usec - usec0
                allowed = gateway_metric(gw_port, "citadel_limiter_decisions_total", "allowed")
                allowed -= allowed0
                check = {
                    "allowed": int(allowed),
                    "failures": int(gateway_metric(gw_port, "citadel_limiter_failures_total")),
                    "evalsha": calls,
                    "evalsha_per_admission": calls / allowed if allowed else None,
                    "evalsha_usec": usec / calls if calls else None,
                }
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        print(f"error: {exc!s}" if str(exc) else f"error: {exc!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()
        with contextlib.suppress(OSError):
            os.unlink(config.name)

    rows = summarize(points, args.concurrencies)
    print_table(rows, args.runs)
    print_floor(rows)
    print_limits(rows, check)
    print_responses(rows)
    print_notes(rows)
    if args.json:
        document = {
            "date": started.isoformat(timespec="seconds"),
            "source": source,
            "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
            "settings": {
                "duration": args.duration,
                "runs": args.runs,
                "warmup": WARMUP_SECONDS,
                "concurrency": args.concurrencies,
                "gateway_core": args.gateway_core,
                "load_core": args.load_core,
                "plain_tool": "wrk" if wrk else "loadgen.py",
                "sim_args": args.sim_args,
                "floor": args.floor,
                "limits": args.limits_backend if args.limits else None,
            },
            "limits_check": check,
            "medians": rows,
            "points": [asdict(p) for p in points],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
