"""How the predictive-alerting service scales with its rules (issue 19, scale of evaluation).

For each rule count (default 10, 100 and 1,000: half forecast, half anomaly rules), starts
``citadel serve predictive-alerting`` as a process over a stand-in Prometheus served by this
process (``/api/v1/query_range`` answers one synthetic series per rule: a daily sine, a slow
trend and seeded noise at a 15 s step over the rule's hour of lookback), then polls ``/health``
every 50 ms from one keep-alive connection and reports:

- the first round (every model fitted), and the steady rounds after it (each fit kept, refitted
  every ``alerting.refit_seconds``, not every round), from ``/health``'s ``rounds.last_seconds``;
- ``/health``'s latency (p50, p99, max) during the first round and after it, and (p99, max,
  polls) of the polls answered while a steady round ran (``rounds.in_progress``);
- a reference: the p99 of a GET of the stand-in Prometheus (another process, a constant reply)
  polled beside each /health, the machine's own latency floor in the same run;
- rounds skipped (ticks a round overran).

    .venv/bin/python bench/alerting_scale.py                        # 10,100,1000, model auto
    .venv/bin/python bench/alerting_scale.py --rules 1000 --model linear --steady 2

The stand-in Prometheus runs in a process of its own (as a real one would), so its work counts in
the round time but not in the poller's latencies: sharing the poller's process (and GIL), its
answers held the poller's thread and added to the /health latencies it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

KEY = "sk-bench"


_SAMPLES: dict[tuple[int, float], list[object]] = {}


def sample(rule: int, t: float) -> list[object]:
    """One ``[t, "value"]`` pair of a rule's series, computed once (each round asks for the same
    hour again, two new points on: the stand-in should cost what a Prometheus would, not a
    ``random.Random`` per point per query)."""
    found = _SAMPLES.get((rule, t))
    if found is None:
        found = _SAMPLES[rule, t] = [t, f"{value(rule, t):.4f}"]
    return found


def value(rule: int, t: float) -> float:
    rng = random.Random(rule * 1_000_003 + int(t))
    day = 2 * math.pi * (t % 86400) / 86400
    return 100 + 10 * rule % 7 + 20 * math.sin(day + rule) + 1e-4 * (t % 86400) + rng.gauss(0, 2)


class Prometheus(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as Prometheus (Go) does: no 40 ms delayed-ACK stalls

    def log_message(self, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):
            super().handle()

    def _reply(self, doc: object) -> None:
        body = orjson.dumps(doc)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply({"status": "success", "data": {"version": "bench"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        if self.path.endswith("/api/v1/query"):
            self._reply({"status": "success", "data": {"resultType": "vector", "result": []}})
            return
        rule = int(form["query"].split('"')[1])
        start, end, step = float(form["start"]), float(form["end"]), float(form["step"])
        first = math.ceil(start / step) * step
        times = [first + i * step for i in range(int((end - first) // step) + 1)]
        values = [sample(rule, t) for t in times]
        result = [{"metric": {"rule": str(rule)}, "values": values}]
        self._reply({"status": "success", "data": {"resultType": "matrix", "result": result}})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(path: Path, prometheus: int, rules: int, model: str, interval: float) -> None:
    lines = [
        f'endpoints: {{prometheus: "http://127.0.0.1:{prometheus}"}}',
        "alerting:",
        "  defaults: false",
        f"  interval_seconds: {interval:g}",
        f"  resend_seconds: {max(60.0, interval):g}",
        "  rules:",
    ]
    for i in range(rules):
        query = f'synthetic{{rule="{i}"}}'
        if i % 2 == 0:
            lines.append(
                f"    - {{name: F{i}, kind: forecast, query: '{query}', threshold: 1000000000.0, "
                f"horizon_seconds: 1800, lookback_seconds: 3600, step_seconds: 15, "
                f"min_points: 20, model: {model}}}"
            )
        else:
            lines.append(
                f"    - {{name: A{i}, kind: anomaly, query: '{query}', "
                "lookback_seconds: 3600, step_seconds: 15, min_points: 20}"
            )
    path.write_text("\n".join(lines) + "\n")


def ping(conn: http.client.HTTPConnection) -> float:
    """The latency of one GET of the stand-in Prometheus (the reference)."""
    started = time.perf_counter()
    conn.request("GET", "/api/v1/status/buildinfo")
    conn.getresponse().read()
    return time.perf_counter() - started


def health(conn: http.client.HTTPConnection) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    conn.request("GET", "/health")
    response = conn.getresponse()
    body = response.read()
    return time.perf_counter() - started, orjson.loads(body)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(rules: int, model: str, steady: int, interval: float, prometheus: int) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "citadel.yaml"
        config(path, prometheus, rules, model, interval)
        proc = subprocess.Popen(
            [sys.executable, "-m", "citadel", "--config", str(path), "serve",
             "predictive-alerting", "--port", str(port)],
            env={**os.environ, "CITADEL_ADMIN_KEY": KEY},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    health(conn)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not start")
                time.sleep(0.2)
            # The machine's noise floor, polled beside /health: the stand-in Prometheus's GET
            # (another process, a constant reply), on a keep-alive connection of its own.
            ref = http.client.HTTPConnection("127.0.0.1", prometheus, timeout=30)
            reference: list[float] = []
            first: list[float] = []
            steady_lat: list[float] = []
            during: list[float] = []  # steady latencies of polls answered while a round ran
            rounds: list[float] = []
            seen = errors = 0
            state: dict[str, Any] = {}
            limit = time.monotonic() + 1800
            while seen < 1 + steady and time.monotonic() < limit:
                latency, doc = health(conn)
                reference.append(ping(ref))
                (first if seen == 0 else steady_lat).append(latency)
                if "rounds" not in doc:  # an error reply (counted in the latencies)
                    errors += 1
                    time.sleep(0.05)
                    continue
                state = doc["rounds"]
                if seen and state.get("in_progress"):
                    during.append(latency)
                if state["completed"] > seen:
                    seen = state["completed"]
                    rounds.append(float(state["last_seconds"]))
                time.sleep(0.05)
            return {
                "rules": rules,
                "first": rounds[0] if rounds else math.nan,
                "steady": statistics.median(rounds[1:]) if len(rounds) > 1 else math.nan,
                "steady_max": max(rounds[1:]) if len(rounds) > 1 else math.nan,
                "skipped": state.get("skipped", 0),
                "first_p99": pct(first, 0.99) * 1000,
                "steady_p50": pct(steady_lat, 0.5) * 1000,
                "steady_p99": pct(steady_lat, 0.99) * 1000,
                "steady_max_ms": max(steady_lat, default=math.nan) * 1000,
                "samples": len(steady_lat),
                "during_p99": pct(during, 0.99) * 1000,
                "during_max": max(during, default=math.nan) * 1000,
                "during_n": len(during),
                "errors": errors,
                "reference_p99": pct(reference, 0.99) * 1000,
            }
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", default="10,100,1000")
    parser.add_argument("--model", default="auto", choices=("auto", "linear", "arima", "ets"))
    parser.add_argument("--steady", type=int, default=3, help="steady rounds measured")
    parser.add_argument("--interval", type=float, default=30.0)
    args = parser.parse_args()
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    prometheus = multiprocessing.Process(target=serve_prometheus, args=(ports,), daemon=True)
    prometheus.start()
    port = ports.get(timeout=30)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores; model {args.model}")
    print(
        f"{'rules':>6} {'first s':>8} {'steady s':>9} {'max s':>6} {'skipped':>7} "
        f"{'first p99 ms':>12} {'steady p50':>10} {'p99 ms':>7} {'max ms':>7} "
        f"{'in-round p99':>12} {'max':>6} {'n':>5} {'ref p99':>7}"
    )
    try:
        for rules in (int(n) for n in args.rules.split(",")):
            r = run(rules, args.model, args.steady, args.interval, port)
            print(
                f"{r['rules']:>6} {r['first']:>8.2f} {r['steady']:>9.2f} {r['steady_max']:>6.2f} "
                f"{r['skipped']:>7} {r['first_p99']:>12.1f} {r['steady_p50']:>10.1f} "
                f"{r['steady_p99']:>7.1f} {r['steady_max_ms']:>7.1f} "
                f"{r['during_p99']:>12.1f} {r['during_max']:>6.1f} {r['during_n']:>5} "
                f"{r['reference_p99']:>7.1f}"
                + (f"  ({r['errors']} /health error replies)" if r["errors"] else ""),
                flush=True,
            )
    finally:
        prometheus.terminate()
        prometheus.join(10)


def serve_prometheus(ports: multiprocessing.Queue[int]) -> None:
    """The stand-in Prometheus, in its own process: puts its port on ``ports``, then serves."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Prometheus)
    ports.put(server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
