"""A gateway killed with SIGKILL under load loses no usage event of a request it answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from test_limits import start_gateway
from test_usage_ledger import ledger_rows

from gateway_helpers import Stack, chat, post_json
from support import stop_process


def _config(tmp: Path, sim: str, *, journal: bool, flush_seconds: float = 0.5) -> Path:
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "sqlite+aiosqlite:///{tmp / "accounts.db"}"}}
metering:
  flush_seconds: {flush_seconds}
  journal: {"true" if journal else "false"}
  journal_path: "{tmp / "usage.journal"}"
  spool_path: "{tmp / "usage.spool"}"
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "{sim}", model: sim-chat}}]
"""
    )
    return config


def _load_then_kill(url: str, pid_kill: object, seconds: float) -> list[str]:
    """Requests from 4 clients for ``seconds``, then the kill; the ids answered 200."""
    served: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            try:
                status, headers, _ = post_json(
                    url, "/v1/chat/completions", chat(max_tokens=5), timeout=5
                )
            except OSError:
                return  # the gateway is gone
            if status == 200:
                served.append(headers["x-request-id"])  # the gateway's id, the ledger's key

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    pid_kill()  # type: ignore[operator]
    stop.set()
    for t in threads:
        t.join(timeout=10)
    return served


def test_sigkill_under_load_loses_no_answered_requests_usage(stack: Stack, tmp_path: Path) -> None:
    """Every request answered 200 before the SIGKILL is in the ledger once the gateway is back."""
    config = _config(tmp_path, stack.sim, journal=True)
    database = f"sqlite+aiosqlite:///{tmp_path / 'accounts.db'}"
    proc, url = start_gateway(config)
    try:
        served = _load_then_kill(url, proc.kill, 1.5)
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
    assert len(served) > 50  # a real load: some events were still in the sink's memory
    restarted, _ = start_gateway(config)  # replays the journal the killed process left
    try:
        deadline = time.monotonic() + 15
        rows = ledger_rows(database, served)
        while len(rows) < len(served) and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = ledger_rows(database, served)
    finally:
        stop_process(restarted)
    assert sorted(served) == sorted(str(r["request_id"]) for r in rows)
    assert {200} == {r["status"] for r in rows}
    assert [] == sorted(tmp_path.glob("usage.journal.*"))  # delivered, then deleted


def test_without_the_journal_a_sigkill_loses_events(stack: Stack, tmp_path: Path) -> None:
    """The control: with the journal off, the same kill loses the events still in memory (no
    flush is due before it)."""
    config = _config(tmp_path, stack.sim, journal=False, flush_seconds=5.0)
    database = f"sqlite+aiosqlite:///{tmp_path / 'accounts.db'}"
    proc, url = start_gateway(config)
    try:
        served = _load_then_kill(url, proc.kill, 1.2)
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
    restarted, _ = start_gateway(config)
    try:
        time.sleep(1.5)
        rows = ledger_rows(database, served)
    finally:
        stop_process(restarted)
    assert len(rows) < len(served)
