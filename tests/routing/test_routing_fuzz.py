"""schemathesis against the routing service's own OpenAPI document: no 5xx, no reply outside
the document, the dry run's gateway-checked body included."""

from __future__ import annotations

import sys
from pathlib import Path

from conformance import fuzz
from support import free_port, process_output, start_process, stop_process

ADMIN = "sk-fuzz-admin"
CONFIG = """
routing: {{health: {{interval_seconds: 0.5, timeout_seconds: 0.2}}}}
models:
  - name: general
    specialties: [chat]
    fallbacks: [coder]
    deployments:
      - {{name: gen-a, url: "http://127.0.0.1:{closed}", model: m}}
      - {{name: gen-b, url: "http://127.0.0.1:{closed}", model: m, weight: 2}}
  - name: coder
    specialties: [code]
    balancer: round_robin
    deployments: [{{name: code-a, url: "http://127.0.0.1:{closed}", model: m}}]
  - name: embed
    kind: embedding
    deployments: [{{name: embed-a, url: "http://127.0.0.1:{closed}", model: m}}]
"""


def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(tmp_path: Path) -> None:
    """Every operation, 20 examples each, the stateful phase included: all checks pass."""
    config = tmp_path / "citadel.yaml"
    config.write_text(CONFIG.format(closed=free_port()), encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "citadel", "--config", str(config)]
    command += ["serve", "routing-api", "--port", str(port)]
    proc = start_process(command, port, env={"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"})
    try:
        fuzz(port, ADMIN, examples=20)
    finally:
        output = process_output(proc)
        assert 0 == stop_process(proc), output
    assert "Traceback" not in output, output
