"""Helpers for tests that run Citadel as real processes on loopback ports.

    port = free_port()
    proc = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(port)], port)
    try:
        ...
    finally:
        stop_process(proc)

A started process's stdout and stderr go to a temporary file, readable with ``process_output``
(to check its log lines) and quoted in the error if the process fails to start.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
from typing import IO

__all__ = ["free_port", "process_output", "start_process", "stop_process"]

_STOP_TIMEOUT = 10.0
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
