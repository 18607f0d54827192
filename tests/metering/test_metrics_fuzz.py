"""schemathesis against the custom-metrics service's own OpenAPI document, over a ledger with
events in it: no 5xx, no reply (JSON or CSV) outside the document."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from test_metrics_api import ENV as API_ENV
from test_metrics_api import _config, _seed

from conformance import fuzz
from support import free_port, process_output, start_process, stop_process

ADMIN = "sk-fuzz-admin"
ENV = {**API_ENV, "CITADEL_ADMIN_KEY": ADMIN}


def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(tmp_path: Path) -> None:
    """Every operation, 25 examples each: all checks pass."""
    uri = f"sqlite+aiosqlite:///{tmp_path / 'citadel.db'}"
    asyncio.run(_seed(uri, 300))
    port = free_port()
    command = [sys.executable, "-m", "citadel", "--config", _config(tmp_path, uri)]
    command += ["serve", "custom-metrics", "--port", str(port)]
    proc = start_process(command, port, env=ENV)
    try:
        fuzz(port, ADMIN, examples=25)
    finally:
        output = process_output(proc)
        assert 0 == stop_process(proc), output
    assert "Traceback" not in output, output
