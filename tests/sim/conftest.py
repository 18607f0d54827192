"""A simulator process for the tests of this directory, and an official OpenAI client for it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from support import free_port, start_process, stop_process


@dataclass(frozen=True)
class SimServer:
    """A running simulator: its base URL and its process."""

    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def sim() -> Iterator[SimServer]:
    """The simulator with default flags, started once for the session."""
    port = free_port()
    proc = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(port)], port)
    try:
        yield SimServer(f"http://127.0.0.1:{port}", proc)
    finally:
        stop_process(proc)


@pytest.fixture
def client(sim: SimServer) -> Iterator[openai.OpenAI]:
    """The official (sync) OpenAI client pointed at the simulator, without retries."""
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sim", max_retries=0, timeout=10) as c:
        yield c
