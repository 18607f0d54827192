"""``bench/production.py --quick`` runs end to end, so the production-path benchmark cannot rot:
the whole stack (PostgreSQL key, Redis limits, the usage stream and its ledger writer, two
simulators, nginx) starts, every point is measured without errors, and the usage reached the
ledger. Figures are not asserted (they are the bench's to report, on a shared machine)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import production
import pytest

from support import POSTGRES_SERVER

BENCH = Path(__file__).parents[2] / "bench" / "production.py"


@pytest.mark.timeout(120)
def test_quick_production_bench_measures_both_targets_and_fills_the_ledger(tmp_path: Path) -> None:
    out = tmp_path / "production.json"
    cores = sorted(os.sched_getaffinity(0))
    command = [sys.executable, str(BENCH), "--quick", "--json", str(out)]
    command += ["--postgres", POSTGRES_SERVER, "--load-core", str(cores[-1])]
    command += ["--gateway-core", str(cores[0])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {(r["mode"], r["concurrency"]) for r in doc["medians"]} == {("plain", 4), ("stream", 4)}
    for row in doc["medians"]:
        for target in ("nginx", "gateway"):
            assert row[target]["rps"] > 0
            assert row[target]["errors"] == 0, row
        assert row["gateway"]["cpu_us"]["gateway"] is not None
        assert row["gateway"]["cpu_us"]["redis"] is not None  # Redis was used
        assert 0 < row["share_rps"]
    [streams] = doc["streams"]
    for target in ("nginx", "gateway"):
        point = streams[target]
        assert point["failed"] == 0
        assert point["open"] > 25  # of 50: most were open at the halfway sample
        assert point["events_per_second"] > 0
    # Every request through the gateway was metered into PostgreSQL through the stream.
    assert doc["ledger_check"]["stream_pending"] == 0
    assert (
        doc["ledger_check"]["ledger_rows"]
        > sum(p["requests"] for p in doc["points"] if p["target"] == "gateway") * 0.9
    )


def _target(rps: float, p50: float) -> dict[str, Any]:
    return {"rps": rps, "p50_ms": p50, "p99_ms": p50 * 4, "errors": 0, "cpu_us": {}}


def test_the_report_judges_every_target_of_the_issue(capsys: pytest.CaptureFixture[str]) -> None:
    """The printers over a full matrix (c=1, 16, 64) and 2,000 streams, as --quick never has."""
    rows = []
    for mode in ("plain", "stream"):
        for conc, (nginx, gateway) in {
            1: (4000, 2400),
            16: (14000, 7700),
            64: (19000, 7000),
        }.items():
            n, g = _target(nginx, 0.2), _target(gateway, 0.4)
            rows.append(
                {"mode": mode, "concurrency": conc, "nginx": n, "gateway": g}
                | {"share_rps": gateway / nginx, "added_p50_ms": 0.2, "added_p99_ms": 0.6}
            )
    args = argparse.Namespace(runs=3, mode_list=["plain", "stream"], stream_tokens=8)
    verdicts = production.print_matrix(rows, args)
    assert verdicts["share_plain_c16"] == pytest.approx(0.55)
    assert verdicts["fall_plain"] == pytest.approx(1 - 7000 / 7700)
    out = capsys.readouterr().out
    assert "plain c=16 requests/s >= 50% of nginx's: 0.55, met" in out
    assert "plain fall c=16 -> c=64 <= 15%: gateway +9% (nginx -36%), met" in out
    assert "plain c=1 p50 over nginx <= +0.25 ms: +0.200 ms, met" in out
    stream = {"open": 2000, "ttfb_p50_ms": 110.0, "events_per_second": 30000.0, "failed": 0}
    stream |= {"server_cpu_percent": 50.0, "sim_cpu_percent": 30.0, "load_cpu_percent": 20.0}
    stream |= {"other_cpu_percent": 1.0, "rss_per_stream_kb": 20.0, "listen_overflows": 0}
    points = [
        {"run": 1, "target": "nginx", "streams": 2000, "first_error": ""}
        | stream
        | {"ttfb_p99_ms": 200.0, "events_per_cpu_second": 150_000.0},
        {"run": 1, "target": "gateway", "streams": 2000, "first_error": ""}
        | stream
        | {"ttfb_p99_ms": 400.0, "events_per_cpu_second": 60_000.0},
    ]
    args.stream_counts = [2000]
    result = production.print_streams(points, args)
    assert result["verdicts"] == {
        "events_per_cpu_second_2000": 60_000.0,
        "ttfb_p99_ratio_2000": 2.0,
    }
    out = capsys.readouterr().out
    assert "events per worker CPU second: 60000, met" in out
    assert "ttfb p99 within 1.5x nginx's: 2.00x, MISSED" in out
