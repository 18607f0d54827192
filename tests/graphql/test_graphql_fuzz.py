"""schemathesis's GraphQL mode against the GraphQL API: every query and mutation of the schema,
with generated arguments, under the admin key. Its own GraphQL checks count every error reply as
a failure (an unknown id is "a server error" to it), so the run's record (a HAR file) is checked
here instead: no 5xx, and every error a clear one — a message and a code from the API's own set,
never INTERNAL_SERVER_ERROR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import free_port, process_output, start_process, stop_process

ADMIN = "sk-fuzz-admin"
CLEAR = {
    "GRAPHQL_PARSE_FAILED",
    "GRAPHQL_VALIDATION_FAILED",
    "BAD_USER_INPUT",
    "UNAUTHENTICATED",
    "FORBIDDEN",
    "NOT_FOUND",
    "CONFLICT",
    "RATE_LIMITED",
    "UNAVAILABLE",
    "QUERY_TOO_COSTLY",
    "QUERY_TOO_DEEP",
}


def test_schemathesis_graphql_mode_finds_no_server_error(tmp_path: Path) -> None:
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f'accounts: {{database: "sqlite+aiosqlite:///{tmp_path / "accounts.db"}"}}\n'
        f'metering: {{database: "sqlite+aiosqlite:///{tmp_path / "ledger.db"}"}}\n',
        encoding="utf-8",
    )
    port = free_port()
    command = [sys.executable, "-m", "citadel", "--config", str(config)]
    command += ["serve", "graphql-api", "--port", str(port)]
    proc = start_process(
        command, port, env={"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"}, timeout=60
    )
    har = tmp_path / "run.har"
    try:
        subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                *("run", f"http://127.0.0.1:{port}/graphql"),
                *("--header", f"Authorization: Bearer {ADMIN}"),
                *("--max-examples", "10", "--seed", "1", "--workers", "1"),
                *("--phases", "fuzzing", "--request-timeout", "10"),
                *("--report", "har", "--report-har-path", str(har)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp_path,
        )
    finally:
        output = process_output(proc)
        assert 0 == stop_process(proc), output
    assert "Traceback" not in output, output
    entries = json.loads(har.read_text())["log"]["entries"]
    operations = {
        json.loads(e["request"]["postData"]["text"])["query"].split("(")[0] for e in entries
    }
    assert len(entries) >= 28, "fewer cases than the schema has operations"
    assert len(operations) >= 20
    unclear = []
    for entry in entries:
        status = entry["response"]["status"]
        assert status < 500, entry["response"]["content"].get("text", "")[:500]
        reply = json.loads(entry["response"]["content"]["text"])
        for error in reply.get("errors") or []:
            code = (error.get("extensions") or {}).get("code")
            if code not in CLEAR or not error.get("message"):
                unclear.append((code, error.get("message", "")[:200]))
    assert [] == unclear
