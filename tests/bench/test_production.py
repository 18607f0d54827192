"""``bench/production.py --quick`` runs end to end, so the production-path benchmark cannot rot:
the whole stack (PostgreSQL key, Redis limits, the usage stream and its ledger writer, two
simulators, nginx) starts, every point is measured without errors, and the usage reached the
ledger. Figures are not asserted (they are the bench's to report, on a shared machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
