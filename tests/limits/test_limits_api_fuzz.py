"""schemathesis against the rate-limiting service's own OpenAPI document: no 5xx, no reply
outside the document (issue 16: 57 500s were found this way before the bounds)."""

from __future__ import annotations

import sys
from pathlib import Path

from conformance import fuzz
from support import free_port, process_output, start_process, stop_process

ADMIN = "sk-fuzz-admin"
CONFIG = """
tiers:
  pair: {requests_per_minute: 1000, concurrent_requests: 2, cost_per_month_usd: 1.5}
accounts: {database: "sqlite+aiosqlite:///DB", default_tier: pair}
"""


def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(tmp_path: Path) -> None:
    """Every operation, 30 examples each, the stateful phase included: all checks pass."""
    config = tmp_path / "citadel.yaml"
    config.write_text(CONFIG.replace("DB", str(tmp_path / "a.db")), encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "citadel", "--config", str(config)]
    command += ["serve", "rate-limiting-api", "--port", str(port)]
    proc = start_process(command, port, env={"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"})
    try:
        fuzz(port, ADMIN)
    finally:
        output = process_output(proc)
        assert 0 == stop_process(proc), output
    assert "Traceback" not in output, output
