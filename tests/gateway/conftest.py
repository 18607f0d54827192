"""A simulator and a gateway in front of it, as real processes on loopback ports."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from gateway_helpers import ADMIN_KEY, Stack, blackhole, write_config
from support import free_port, start_process, stop_process


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sim_port, gw_port, dead_port = free_port(), free_port(), free_port()
    listener, fillers, hole_port = blackhole()
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
            yield Stack(
                f"http://127.0.0.1:{gw_port}",
                f"http://127.0.0.1:{sim_port}",
                gateway.pid,
                f"sqlite+aiosqlite:///{config.parent / 'accounts.db'}",
            )
        finally:
            stop_process(gateway)
    finally:
        stop_process(sim)
        for s in fillers:
            s.close()
        listener.close()
