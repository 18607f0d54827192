"""The console (:9093) under a live installation: its query proxy's cache against asking
Prometheus directly, and each dashboard's page load to all panels drawn in Chromium.

1. Proxy: the same panel refresh (an unchanged range, so the service's one-step cache answers)
   ``--calls`` times through ``GET /v1/query``, against the same expression sent straight to
   Prometheus's ``/api/v1/query_range``, both over one keep-alive connection, in the same run.
   Printed: p50/p99 of each and the ratio (target: the cache at least 5x faster).
2. Page: for every dashboard, the time from navigation to every panel settled (drawn, empty or
   failed), from the page's own Performance API clock (target: under 1.5 s).

    PYTHONPATH=src python bench/console.py [--calls 300] [--warmup 30] [--deployments 1,50]

Each size in ``--deployments`` (per model, two models, all on the one simulator) is its own
installation, measured in turn.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from playwright.sync_api import sync_playwright

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "tests"))
sys.path.insert(0, str(_ROOT / "tests" / "observability"))

from citadel.observability.console import plan_window, render_expr  # noqa: E402
from citadel.observability.dashboards import BY_UID, DASHBOARDS  # noqa: E402

from console_stack import console_stack  # noqa: E402

_SETTLED = """() => {
  const panels = [...document.querySelectorAll("main .panel")];
  return panels.length > 0 && panels.every((p) => p.dataset.state !== "loading");
}"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(base: str, path: str, headers: dict[str, str], calls: int) -> list[float]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    out = []
    try:
        for _ in range(calls):
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            out.append((time.perf_counter() - start) * 1000)
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status} {body[:200]!r}")
    finally:
        conn.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of traffic first")
    parser.add_argument("--deployments", default="1,50", help="deployments per model, each run")
    args = parser.parse_args()
    for size in (int(n) for n in args.deployments.split(",")):
        print(f"== {size} deployment(s) per model, load average {os.getloadavg()[0]:.2f}")
        _measure(args, size)
    return 0


def _measure(args: argparse.Namespace, size: int) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        console_stack(Path(tmp), deployments=size) as stack,
    ):
        time.sleep(args.warmup)
        end = time.time()
        start = end - 900
        board, panel = "citadel-overview", 2  # latency: three recording-rule queries
        query = urlencode(
            {"dashboard": board, "panel": panel, "start": int(start), "end": int(end)}
        )
        key = {"authorization": f"Bearer {stack.readonly_key}"}
        proxy = _timed(stack.console, f"/v1/query?{query}", key, args.calls)
        window = plan_window(int(start), int(end), None)
        values = {"model": ".*", "deployment": ".*", "team": ".*"}
        direct: list[float] = []
        for q in BY_UID[board].panels[panel].queries:  # the proxy asks for each of them
            params = {
                "query": render_expr(q.expr, values, window),
                "start": window.start,
                "end": window.end,
                "step": window.step,
            }
            direct += _timed(
                stack.prometheus, f"/api/v1/query_range?{urlencode(params)}", {}, args.calls
            )
        per_refresh = [sum(direct[i :: args.calls]) for i in range(args.calls)]
        p50p, p99p = _percentile(proxy, 0.5), _percentile(proxy, 0.99)
        p50d, p99d = _percentile(per_refresh, 0.5), _percentile(per_refresh, 0.99)
        print(f"query proxy, cached refresh: p50 {p50p:.2f} ms  p99 {p99p:.2f} ms")
        print(
            f"Prometheus directly ({len(BY_UID[board].panels[panel].queries)} queries): "
            f"p50 {p50d:.2f} ms  p99 {p99d:.2f} ms"
        )
        print(f"ratio (Prometheus / cache) at p50: {p50d / p50p:.1f}x (target >= 5x)")

        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(stack.console + "/")
                key_js = json.dumps(stack.readonly_key)
                page.evaluate(f"sessionStorage.setItem('citadel.console.key', {key_js})")
                times = []
                for one in DASHBOARDS:
                    page.goto(f"{stack.console}/#/{one.uid}")
                    page.reload()  # a fresh navigation: the Performance API clock starts at 0
                    page.wait_for_function(_SETTLED, timeout=30_000)
                    drawn = page.evaluate("performance.now()")
                    times.append(drawn)
                    print(f"page {one.uid:<22} all panels settled at {drawn:7.0f} ms")
                print(
                    f"page load: median {statistics.median(times):.0f} ms, "
                    f"worst {max(times):.0f} ms (target < 1500 ms)"
                )
            finally:
                browser.close()


if __name__ == "__main__":
    sys.exit(main())
