"""Whatever ends a request, its concurrency slot comes back and one usage event records it.

Real gateway processes in front of the real simulator, on the in-memory limiter (usage into the
embedded SQL ledger) and on real Redis (usage into the Redis Stream the ledger writer drains).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
from test_limits import REDIS_DB, call, new_key, start_gateway
from test_usage_ledger import ledger_rows_of_key

from citadel.metering.ledger import decode_event

from gateway_helpers import Stack, chat
from support import stop_process

CHAT = "/v1/chat/completions"


def _config(tmp: Path, sim: str, backend: str) -> Path:
    database = f"sqlite+aiosqlite:///{tmp / 'accounts.db'}"
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 0.2, default_tier: pair}}
limits: {{backend: "{backend}", default_max_tokens: 20}}
metering: {{flush_seconds: 0.05}}
tiers:
  pair: {{concurrent_requests: 2}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "{sim}", model: sim-chat}}]
"""
    )
    return config


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(
    request: pytest.FixtureRequest, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """(kind, gateway URL, accounts database) for a gateway on one limiter backend."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"lifecycle-{kind}")
    backend = "memory://" if kind == "memory" else f"redis://127.0.0.1:6379/{REDIS_DB}"
    if kind == "redis":
        subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True, timeout=10)
    proc, url = start_gateway(_config(tmp, stack.sim, backend))
    try:
        yield kind, url, f"sqlite+aiosqlite:///{tmp / 'accounts.db'}"
    finally:
        stop_process(proc)


def _abandon(url: str, secret: str, doc: object, headers: dict[str, str], after: float) -> None:
    """Send a request, read at most the response head's first bytes, and hang up after ``after``."""
    parts = urlsplit(url)
    body = orjson.dumps(doc)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=5) as sock:
        sock.sendall(
            (
                f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"authorization: Bearer {secret}\r\ncontent-length: {len(body)}\r\n{head}\r\n"
            ).encode()
            + body
        )
        time.sleep(after)
    # closing the socket is the disconnect


def _stream_events(key_id: str) -> list[dict[str, object]]:
    """The usage events of key ``key_id`` in the Redis Stream the ledger writer drains."""
    out = subprocess.run(
        ["redis-cli", "-n", str(REDIS_DB), "--raw", "XRANGE", "citadel:{usage}:events", "-", "+"],
        check=True,
        capture_output=True,
        timeout=10,
    ).stdout.decode()
    events = [decode_event(line) for line in out.splitlines() if line.startswith(("{", "["))]
    return [{"request_id": e.request_id, "status": e.status} for e in events if e.key_id == key_id]


def _events(kind: str, database: str, key_id: str) -> list[dict[str, object]]:
    if kind == "memory":
        return ledger_rows_of_key(database, key_id)
    return _stream_events(key_id)


def _wait_events(kind: str, database: str, key_id: str, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    rows = _events(kind, database, key_id)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _events(kind, database, key_id)
    return rows


def _both_admitted(url: str, secret: str) -> list[int]:
    """Two requests at once, each holding its slot a while: both 200 only if no slot leaked."""
    statuses: list[int] = []

    def one() -> None:
        statuses.append(call(url, secret, chat(max_tokens=5), {"x-sim-ttft-ms": "300"})[0])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    return sorted(statuses)


def _abandon_two_and_check(
    gateway: tuple[str, str, str], doc: object, headers: dict[str, str], prefix: str
) -> None:
    """Abandon two requests of a ``concurrent_requests: 2`` user: both slots come back, and each
    request is one usage event with status 499."""
    kind, url, database = gateway
    key_id, secret = new_key(database, "pair")
    ids = [f"{prefix}-{uuid.uuid4().hex}" for _ in range(2)]
    threads = [
        threading.Thread(
            target=_abandon, args=(url, secret, doc, {"x-request-id": rid, **headers}, 0.4)
        )
        for rid in ids
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    time.sleep(0.3)  # the gateway notices the hang-ups and settles in the background
    assert [200, 200] == _both_admitted(url, secret)
    # The gateway names requests itself (the clients' ids are x-client-request-id and the log):
    # the key's events are the two abandoned ones and the two served after them.
    rows = _wait_events(kind, database, key_id, 4)
    assert [200, 200, 499, 499] == sorted(int(str(r["status"])) for r in rows)
    assert 4 == len({r["request_id"] for r in rows})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_clients_gone_before_the_first_byte_leave_no_slot_held(
    gateway: tuple[str, str, str], stream: bool
) -> None:
    """Two requests abandoned before the model's first byte free both slots and are metered 499."""
    doc = chat(max_tokens=5, stream=stream)
    _abandon_two_and_check(gateway, doc, {"x-sim-ttft-ms": "3000"}, "gone")


def test_a_client_gone_mid_stream_leaves_no_slot_held(gateway: tuple[str, str, str]) -> None:
    """Streams abandoned after some events free their slots and are metered 499."""
    doc = chat(max_tokens=50, stream=True)
    _abandon_two_and_check(gateway, doc, {"x-sim-tbt-ms": "100"}, "mid")
