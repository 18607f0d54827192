"""Helpers for tests that run Citadel as real processes on loopback ports, or need a database.

    port = free_port()
    proc = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(port)], port)
    try:
        ...
    finally:
        stop_process(proc)

A started process's stdout and stderr go to a temporary file, readable with ``process_output``
(to check its log lines) and quoted in the error if the process fails to start.

And for tests on the shared PostgreSQL server (``CITADEL_TEST_POSTGRES``), a database of their own:

    with scratch_postgres(prepare=upgrade) as uri:  # created, migrated; dropped afterwards
        ...

or, for a test parametrized over both backends, ``scratch_database("sqlite", path)`` (a new file)
or ``scratch_database("postgresql", path)`` (the above).

A test needing PostgreSQL fails, rather than skips, when the server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, Any

import asyncpg  # type: ignore[import-untyped]  # no stubs, no py.typed
import pytest

from citadel.metering.events import UsageEvent

__all__ = [
    "POSTGRES_SERVER",
    "free_port",
    "postgres_admin",
    "postgres_execute",
    "process_output",
    "scratch_database",
    "scratch_postgres",
    "start_process",
    "stop_process",
]

Prepare = Callable[[str], Coroutine[Any, Any, object]]
"""What readies a new database, given its URI: a migration's ``upgrade``, say."""

POSTGRES_SERVER = os.environ.get("CITADEL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")

_STOP_TIMEOUT = 10.0
UP_START = 60.0
"""How long `citadel up` (ten processes, each importing its framework) may take to serve: a bound
for a machine busy with other work, not a figure (on an idle two-core machine it takes ~10 s)."""
_POLL_INTERVAL = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_process(
    args: list[str], port: int, env: dict[str, str] | None = None, timeout: float = 15
) -> subprocess.Popen[bytes]:
    """Start ``args`` (``env`` added to this process's environment) and return once
    ``GET http://127.0.0.1:{port}/health`` answers 200; raise RuntimeError, with the process's
    output, if it exits or has not answered within ``timeout`` seconds."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - open until stop_process: the child writes to it
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.citadel_log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not _healthy(port):
        problem = None
        if proc.poll() is not None:
            problem = f"exited with status {proc.returncode}"
        elif time.monotonic() > deadline:
            problem = f"did not answer GET /health on port {port} within {timeout} s"
        if problem is not None:
            output = process_output(proc)
            stop_process(proc)
            raise RuntimeError(f"{' '.join(args)} {problem}; its output:\n{output}")
        time.sleep(_POLL_INTERVAL)
    return proc


def process_output(proc: subprocess.Popen[bytes]) -> str:
    """What a process started by ``start_process`` has written to stdout and stderr so far."""
    log: IO[bytes] | None = getattr(proc, "citadel_log", None)
    if log is None or log.closed:
        return ""
    # pread leaves the file offset alone: the child shares it and appends at it.
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")


def stop_process(proc: subprocess.Popen[bytes]) -> int:
    """Send SIGTERM, wait (SIGKILL after 10 s), and return the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log: IO[bytes] | None = getattr(proc, "citadel_log", None)
    if log is not None:
        log.close()
    return proc.returncode


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


async def postgres_execute(uri: str, sql: str) -> None:
    """Run one SQL statement on the PostgreSQL database at ``uri``."""
    connection = await asyncpg.connect(uri, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def postgres_admin(sql: str) -> None:
    """Run one SQL statement on the ``postgres`` database of ``POSTGRES_SERVER``."""
    await postgres_execute(f"{POSTGRES_SERVER}/postgres", sql)


@contextlib.contextmanager
def scratch_postgres(prepare: Prepare | None = None) -> Iterator[str]:
    """Create a database of its own on ``POSTGRES_SERVER``, run ``prepare(uri)`` on it if given
    (a migration's ``upgrade``, say), yield its URI, and drop it afterwards. Fails the test, with
    how to start PostgreSQL, if the server cannot be reached."""
    name = f"citadel_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(postgres_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_SERVER}: {exc}"
            " (start it: see README / .ci/run)"
        )
    uri = f"{POSTGRES_SERVER}/{name}"
    try:
        if prepare is not None:
            asyncio.run(prepare(uri))
        yield uri
    finally:
        asyncio.run(postgres_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def scratch_database(kind: str, sqlite_file: Path, prepare: Prepare | None = None) -> Iterator[str]:
    """A new database of ``kind``: ``"sqlite"``, at ``sqlite_file`` (which should not exist yet),
    or ``"postgresql"``, as ``scratch_postgres``; ``prepare(uri)`` run on it if given."""
    if kind == "postgresql":
        with scratch_postgres(prepare) as uri:
            yield uri
        return
    if kind != "sqlite":
        raise ValueError(f"no such kind of database: {kind!r}")
    uri = f"sqlite:///{sqlite_file}"
    if prepare is not None:
        asyncio.run(prepare(uri))
    yield uri


def usage_event(**fields: Any) -> UsageEvent:
    """A usage event with plausible values; ``fields`` replace any of them."""
    values: dict[str, Any] = {
        "event_id": os.urandom(16).hex(),
        "time": 1_717_243_200.0,
        "request_id": "req",
        "user": "usr_a",
        "team": "",
        "key_id": "key_1",
        "tier": "free",
        "endpoint": "chat",
        "model": "sim-chat",
        "deployment": "sim-a",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "latency_seconds": 0.1,
        "ttft_seconds": None,
        "status": 200,
        "streamed": False,
        "cancelled": False,
        "usage_estimated": False,
        "cost_micros": 7,
    }
    return UsageEvent(**(values | fields))
