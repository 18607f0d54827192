"""schemathesis against the gateway's own OpenAPI document, in CI: no 5xx, no status, content type
or body outside the document (issue 16, defect 13: the gateway could not be fuzzed before)."""

from __future__ import annotations

import sys
from pathlib import Path

from conformance import fuzz
from support import free_port, process_output, start_process, stop_process

ADMIN = "sk-fuzz-admin"


def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(tmp_path: Path) -> None:
    """Every operation of the gateway, 20 examples each, against the simulator: all checks pass."""
    sim_port, port = free_port(), free_port()
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "sqlite+aiosqlite:///{tmp_path / "a.db"}"}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "http://127.0.0.1:{sim_port}", model: sim-chat}}]
  - name: sim-embed
    kind: embedding
    deployments: [{{name: sim-e, url: "http://127.0.0.1:{sim_port}", model: sim-embed}}]
""",
        encoding="utf-8",
    )
    sim = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port)
    try:
        command = [sys.executable, "-m", "citadel", "--config", str(config)]
        command += ["serve", "gateway", "--port", str(port)]
        env = {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"}
        gateway = start_process(command, port, env=env)
        try:
            fuzz(port, ADMIN, examples=20)
        finally:
            output = process_output(gateway)
            assert 0 == stop_process(gateway), output
        assert "Traceback" not in output, output
    finally:
        stop_process(sim)
