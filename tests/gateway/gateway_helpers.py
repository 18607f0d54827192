"""Small raw-HTTP helpers for gateway tests that need exact bytes and statuses."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

ADMIN_KEY = "sk-test-admin"


@dataclass(frozen=True)
class Stack:
    """A running gateway in front of a running simulator."""

    gateway: str  # base URL, e.g. http://127.0.0.1:PORT
    sim: str
    gateway_pid: int
    database: str = ""  # the accounts and usage ledger database (SQLite)


def request(
    base: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    auth: bool = True,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, lower-cased headers, body."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    sent = {"content-type": "application/json"} if body else {}
    if auth:
        sent["authorization"] = f"Bearer {ADMIN_KEY}"
    sent.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def post_json(
    base: str, path: str, doc: Any, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, str], bytes]:
    return request(base, "POST", path, orjson.dumps(doc), headers, **kw)


def error_of(body: bytes) -> dict[str, Any]:
    """The OpenAI-style error object of a body, checking its shape."""
    doc = orjson.loads(body)
    error = doc["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str)
    return dict(error)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        match = re.match(r"^([^{ ]+)(\{(.*)\})? (\S+)$", line)
        assert match is not None, line
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(4))
    return total


def chat(content: str = "Say hello", **extra: Any) -> dict[str, Any]:
    return {"model": "sim-chat", "messages": [{"role": "user", "content": content}], **extra}


def blackhole() -> tuple[socket.socket, list[socket.socket], int]:
    """A listener whose accept queue is full: connecting to it hangs until the caller gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    return listener, fillers, port


def write_config(path: Path, sim_port: int, dead_port: int, blackhole_port: int) -> Path:
    sim = f"http://127.0.0.1:{sim_port}"
    database = f"sqlite+aiosqlite:///{path.parent / 'accounts.db'}"
    path.write_text(
        # The breakers never trip here: these tests check how each fault is answered, and
        # sim-a's breaker would otherwise open after a few of them and make the answers depend
        # on which tests ran before (breakers are tested in tests/routing and test_routing.py).
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 0.2}}
routing:
  breaker: {{consecutive_failures: 1000000, minimum_calls: 1000000}}
models:
  - name: sim-chat
    aliases: [default]
    price: {{input_per_1k: 0.5, output_per_1k: 1.5}}
    deployments:
      - {{name: sim-a, url: "{sim}", model: sim-chat}}
  - name: sim-embed
    kind: embedding
    deployments:
      - {{name: sim-e, url: "{sim}", model: sim-embed}}
  - name: renamed
    deployments:
      - {{name: sim-r, url: "{sim}/v1", model: sim-chat}}
  - name: impatient
    timeouts: {{first_byte: 0.5, total: 1.5}}
    deployments:
      - {{name: sim-i, url: "{sim}", model: sim-chat}}
  - name: short
    timeouts: {{first_byte: 5, total: 1}}
    deployments:
      - {{name: sim-s, url: "{sim}", model: sim-chat}}
  - name: dead
    deployments:
      - {{name: dead-a, url: "http://127.0.0.1:{dead_port}", model: sim-chat}}
  - name: half-dead
    deployments:
      - {{name: dead-b, url: "http://127.0.0.1:{dead_port}", model: sim-chat}}
      - {{name: sim-h, url: "{sim}", model: sim-chat}}
  - name: blackhole
    timeouts: {{connect: 0.5}}
    deployments:
      - {{name: hole, url: "http://127.0.0.1:{blackhole_port}", model: sim-chat}}
"""
    )
    return path
