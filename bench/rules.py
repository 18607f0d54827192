"""What the generated rules cost Prometheus, at 10, 100 and 1,000 deployments.

For each size it writes a synthetic installation (models of 10 deployments each, the default
SLOs per model), serves matching series from a small exporter in this process (the gateway's
request counter and its latency and TTFT histograms per deployment, growing every second),
starts a real Prometheus (Debian package) scraping it every 5 s with the generated rules on a
30x clock (every group evaluates each second), and after ``--seconds`` prints:

- rules, and the series the recording rules create (``count({__name__=~"...:..."})``),
- Prometheus's own ``prometheus_rule_group_last_duration_seconds`` per group, median of 7
  evaluations (the slowest group and the recording group), against a Sloth-style hand-written
  set for one SLO in the same run (the reference: two ratio rules and one alert, evaluated by
  the same Prometheus),
- the query cost the recording rules save: the p99 latency panel's query over the recording
  rule against the raw ``histogram_quantile(rate(_bucket))`` it replaces, median of 15 calls each
  through ``/api/v1/query``, and their ratio.

    .venv/bin/python bench/rules.py [--sizes 10,100,1000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from citadel import metrics as m
from citadel.observability.names import default_slos
from citadel.observability.rules import dump, rule_groups

SPEEDUP = 30
SLOTH = """groups:
- name: sloth-reference
  interval: %ds
  rules:
%s
  - alert: SlothPage
    expr: (slo:ratio:1h > (14.4 * 0.005)) and (slo:ratio:5m > (14.4 * 0.005))
    for: 1s
"""
SLOTH_RATIO = """  - record: slo:ratio:%s
    expr: sum(rate(citadel_gateway_requests_total{model="m0",status=~"5.."}[%s]))
      / sum(rate(citadel_gateway_requests_total{model="m0"}[%s]))"""


class Exporter:
    """Series of ``deployments`` deployments (10 per model), counting up every second."""

    def __init__(self, deployments: int) -> None:
        self.routes = [(f"m{d // 10}", f"m{d // 10}-d{d}") for d in range(deployments)]
        self.started = time.monotonic()
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def render(self) -> str:
        t = time.monotonic() - self.started
        out = []
        for i, (model, dep) in enumerate(self.routes):
            route = f'model="{model}",deployment="{dep}"'
            ok, bad = 100 * t, (i % 7) * t
            out.append(f'{m.GATEWAY_REQUESTS.name}{{endpoint="chat",{route},status="200"}} {ok}')
            out.append(f'{m.GATEWAY_REQUESTS.name}{{endpoint="chat",{route},status="500"}} {bad}')
            for spec, extra in (
                (m.GATEWAY_REQUEST_DURATION, 'endpoint="chat",'),
                (m.GATEWAY_TTFT, ""),
            ):
                total = 0.0
                for j, bound in enumerate(spec.buckets):
                    total += ok / (j + 2)
                    out.append(f'{spec.name}_bucket{{{extra}{route},le="{bound!r}"}} {total}')
                out.append(f'{spec.name}_bucket{{{extra}{route},le="+Inf"}} {ok}')
                out.append(f"{spec.name}_count{{{extra}{route}}} {ok}")
                out.append(f"{spec.name}_sum{{{extra}{route}}} {ok * 0.3}")
        return "\n".join(out) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        body = response.read()
    return json.loads(body) if path.startswith("/api") else body.decode()


def query(port: int, expr: str) -> list[Any]:
    doc = get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return list(doc["data"]["result"])


def timed(port: int, expr: str, calls: int = 15) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        query(port, expr)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure(deployments: int, seconds: float, interval: int = 1) -> dict[str, Any]:
    exporter = Exporter(deployments)
    models = sorted({model for model, _ in exporter.routes})
    groups = [
        {**g, "interval": f"{interval}s"}
        for g in rule_groups(default_slos(models), speedup=SPEEDUP)
    ]
    sloth = SLOTH % (interval, "\n".join(SLOTH_RATIO % (w, w, w) for w in ("5m", "1h")))
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "citadel.yml").write_text(dump({"groups": groups}))
        Path(tmp, "sloth.yml").write_text(sloth)
        port = free_port()
        target = {"targets": [f"127.0.0.1:{exporter.port}"]}
        config = {
            # Scrapes every 5 s (this exporter renders 1,000 deployments in about a second);
            # the rules still evaluate every second.
            "global": {
                "scrape_interval": "5s",
                "scrape_timeout": "5s",
                "evaluation_interval": f"{interval}s",
            },
            "rule_files": [f"{tmp}/citadel.yml", f"{tmp}/sloth.yml"],
            "scrape_configs": [{"job_name": "synthetic", "static_configs": [target]}],
        }
        Path(tmp, "prometheus.yml").write_text(dump(config))
        proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={tmp}/prometheus.yml",
             f"--storage.tsdb.path={tmp}/tsdb", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    get(port, "/-/ready")
                    break
                except OSError:
                    time.sleep(0.2)
            time.sleep(seconds)
            samples: dict[str, list[float]] = {}
            for _ in range(7):  # the median of 7 evaluations, an interval apart
                for line in get(port, "/metrics").splitlines():
                    if line.startswith("prometheus_rule_group_last_duration_seconds{"):
                        name = line.split('rule_group="', 1)[1].split('"', 1)[0].split(";", 1)[1]
                        samples.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
                time.sleep(interval)
            slowest_rules = sorted(
                (
                    (rule.get("evaluationTime", 0.0) * 1000, group["name"], rule["name"])
                    for group in get(port, "/api/v1/rules")["data"]["groups"]
                    for rule in group["rules"]
                ),
                reverse=True,
            )[:3]
            durations = {k: statistics.median(v) for k, v in samples.items()}
            recorded = query(port, 'count({__name__=~".+:.+"})')
            rec = "model_deployment:gen_ai_server_request_duration_seconds:p99_5m"
            raw = (
                "histogram_quantile(0.99, sum by (model, deployment, le) "
                f"(rate({m.GATEWAY_REQUEST_DURATION.name}_bucket[{300 // SPEEDUP}s])))"
            )
            fast, slow = timed(port, rec), timed(port, raw)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            exporter.close()
    citadel = {k: v for k, v in durations.items() if k.startswith("citadel-")}
    recording = [v for k, v in citadel.items() if k.startswith("citadel-recording")]
    slo = [v for k, v in citadel.items() if k.startswith("citadel-slo-")]
    return {
        "deployments": deployments,
        "interval_s": interval,
        "groups": len(groups),
        "rules": sum(len(g["rules"]) for g in groups),
        "recorded_series": int(float(recorded[0]["value"][1])) if recorded else 0,
        "slowest_group": max(citadel, key=lambda k: citadel[k]),
        "slowest_ms": max(citadel.values()) * 1000,
        "recording_ms": max(recording) * 1000,
        "slo_median_ms": statistics.median(slo) * 1000 if slo else 0.0,
        "group_ms_per_second": sum(citadel.values()) * 1000 / interval,
        "slowest_rules": slowest_rules,
        "sloth_ms": durations.get("sloth-reference", 0.0) * 1000,
        "raw_query_ms": slow * 1000,
        "recorded_query_ms": fast * 1000,
        "query_speedup": slow / fast if fast else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--interval",
        type=int,
        default=1,
        help="seconds between evaluations of every group (1: the 30x clock of the windows; "
        "30 is production's: at 1 s, Prometheus runs 30 times production's evaluations)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not shutil.which("prometheus"):
        print("bench/rules.py needs Prometheus (Debian: apt-get install prometheus)")
        return 2
    head = ("deploy", "rules", "rec.series", "slowest group ms", "recording ms", "sloth 1 SLO ms")
    widths = (7, 6, 10, 28, 12, 14)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)),
          f"{'raw q ms':>9} {'rec q ms':>9} {'x':>6}", flush=True)  # fmt: skip
    rows = []
    for n in args.sizes.split(","):
        rows.append(r := measure(int(n), args.seconds, args.interval))
        print(f"{r['deployments']:>7} {r['rules']:>6} {r['recorded_series']:>10} "
              f"{r['slowest_group'][:20]:>20} {r['slowest_ms']:>7.2f} {r['recording_ms']:>12.2f} "
              f"{r['sloth_ms']:>14.2f} {r['raw_query_ms']:>9.2f} {r['recorded_query_ms']:>9.2f} "
              f"{r['query_speedup']:>6.1f}", flush=True)  # fmt: skip
        print(f"        {r['groups']} groups every {r['interval_s']} s: SLO group median "
              f"{r['slo_median_ms']:.2f} ms, all groups {r['group_ms_per_second']:.0f} ms of "
              "evaluation per second; slowest rules: "
              + "; ".join(f"{g}/{n} {ms:.1f} ms" for ms, g, n in r["slowest_rules"]),
              flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
