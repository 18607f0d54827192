"""`citadel up` supervises its children: one that exits comes back, the others keep serving."""

from __future__ import annotations

import http.client
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from test_cli import SETTING_PREFIXES, chat

from citadel.supervisor import Supervisor, backoff

from support import UP_START, free_port, process_output, start_process, stop_process

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_backoff_doubles_from_half_a_second_to_thirty() -> None:
    assert [0.5, 1.0, 2.0, 4.0, 30.0] == [backoff(n) for n in (1, 2, 3, 4, 20)]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_child_that_exits_is_restarted_after_its_backoff_and_the_others_are_untouched(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Killing one child by pid: after the backoff it runs again under a new pid; the other
    keeps its process; the status line names the restarted one."""
    clock = _Clock()
    supervisor = Supervisor([("a", SLEEPER), ("b", SLEEPER)], grace=1, clock=clock)
    supervisor.start()
    try:
        first = supervisor.pids()
        os.kill(first["a"], signal.SIGKILL)
        time.sleep(0.2)  # the kill lands
        supervisor.poll()  # notices the exit, schedules the restart in 0.5 s
        assert first == supervisor.pids()  # not yet
        clock.now += 0.5
        supervisor.poll()
        after = supervisor.pids()
        assert first["a"] != after["a"]
        assert first["b"] == after["b"]
        assert "a restarted 1x (last exit -9)" in supervisor.status()
        err = capfd.readouterr().err
        assert f"a (pid {first['a']}) exited with -9; restarting in 0.5 s" in err
    finally:
        supervisor.shutdown()


def test_up_restarts_a_killed_gateway_while_the_others_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`citadel up`: SIGKILL the gateway child; the simulator answers meanwhile, the gateway comes
    back and serves, and the output says what restarted."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith(SETTING_PREFIXES)]:
        monkeypatch.delenv(name)
    gateway, simulator = free_port(), free_port()
    env = {
        "API_GATEWAY_PORT": str(gateway),
        "SIMULATOR_PORT": str(simulator),
        "RATE_LIMITING_API_PORT": str(free_port()),
        "ROUTING_API_PORT": str(free_port()),
        "CUSTOM_METRICS_PORT": str(free_port()),
        "PREDICTIVE_ALERTING_PORT": str(free_port()),
    }
    up = [sys.executable, "-m", "citadel", "up"]
    proc = start_process(up, gateway, env=env, timeout=UP_START)
    try:
        assert 200 == chat(gateway)[0]
        found = re.search(r"gateway started \(pid (\d+)\)", process_output(proc))
        assert found is not None, process_output(proc)
        os.kill(int(found.group(1)), signal.SIGKILL)
        meanwhile = _health(simulator)
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and status != 200:
            time.sleep(0.2)
            try:
                status = chat(gateway)[0]
            except OSError:
                status = 0
        output = process_output(proc)
    finally:
        code = stop_process(proc)
    assert 200 == meanwhile
    assert 200 == status, output
    assert "gateway restarted 1x (last exit -9)" in output
    assert 0 == code, output


def _health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()
