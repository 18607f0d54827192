"""A simulator and a gateway in front of it, as real processes on loopback ports."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, start_process, stop_process

from gateway_helpers import ADMIN_KEY, Stack


def _blackhole() -> tuple[socket.socket, list[socket.socket], int]:
    """A listener whose accept queue is full: connecting to it hangs until the caller gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    return listener, fillers, port


def write_config(path: Path, sim_port: int, dead_port: int, blackhole_port: int) -> Path:
    sim = f"http://127.0.0.1:{sim_port}"
    path.write_text(
        f"""
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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sim_port, gw_port, dead_port = free_port(), free_port(), free_port()
    listener, fillers, hole_port = _blackhole()
    config = write_config(
        tmp_path_factory.mktemp("gw") / "citadel.yaml", sim_port, dead_port, hole_port
    )
    sim = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port)
    try:
        gateway = start_process(
            [
                sys.executable,
                "-m",
                "citadel",
                "--config",
                str(config),
                "serve",
                "gateway",
                "--port",
                str(gw_port),
            ],
            gw_port,
            env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
        )
        try:
            yield Stack(f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{sim_port}", gateway.pid)
        finally:
            stop_process(gateway)
    finally:
        stop_process(sim)
        for s in fillers:
            s.close()
        listener.close()
