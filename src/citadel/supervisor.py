"""``citadel up``'s children, kept running: a child that exits is restarted with backoff.

Theory of operation: the supervisor starts every child, then polls them (every 0.2 s). A child
that exits while the supervisor is not stopping is logged (name, pid, exit status) and started
again after a delay that doubles with each exit in a row (0.5 s, 1 s, 2 s ... at most 30 s); a
child that then stays up for ``stable_seconds`` (30 s) has its delay reset. The other children are
left alone: they keep serving. Each restart prints a status line naming every child that has
restarted (``citadel: status: gateway restarted 1x (last exit -9)``), and SIGUSR1 prints it on
demand. SIGTERM or SIGINT stops all children (SIGTERM, then SIGKILL after the grace period).

``backoff`` is the pure part: the delay before restart number ``n`` in a row.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Supervisor", "backoff"]

_FIRST_DELAY = 0.5
_MAX_DELAY = 30.0
_POLL_SECONDS = 0.2


def backoff(exits_in_a_row: int) -> float:
    """Seconds to wait before restarting a child that exited ``exits_in_a_row`` times running."""
    return float(min(_FIRST_DELAY * 2 ** max(exits_in_a_row - 1, 0), _MAX_DELAY))


@dataclass(slots=True)
class _Child:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    in_a_row: int = 0
    last_exit: int | None = None
    restart_at: float | None = None  # monotonic time of the pending restart


class Supervisor:
    """Starts ``commands`` (name -> argv), restarts any that exits, stops all on a signal."""

    def __init__(
        self,
        commands: Sequence[tuple[str, list[str]]],
        *,
        grace: float,
        stable_seconds: float = 30.0,
        spawn: Callable[[list[str]], subprocess.Popen[bytes]] = subprocess.Popen,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._children = [_Child(name, command) for name, command in commands]
        self._grace = grace
        self._stable = stable_seconds
        self._spawn = spawn
        self._clock = clock
        self._stopping = False

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in self._children if c.process is not None}

    def status(self) -> str:
        """One line: which children restarted, how often, and how they last exited."""
        restarted = [
            f"{c.name} restarted {c.restarts}x (last exit {c.last_exit})"
            for c in self._children
            if c.restarts
        ]
        return "citadel: status: " + ("; ".join(restarted) or "no child has restarted")

    def start(self) -> None:
        for child in self._children:
            self._start(child)

    def stop(self, *_: object) -> None:
        self._stopping = True
        for child in self._children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Start every child, keep them up until a signal, then stop them; return 0."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGUSR1, lambda *_: print(self.status(), file=sys.stderr, flush=True))
        self.start()
        while not self._stopping:
            self.poll()
            time.sleep(_POLL_SECONDS)
        self.shutdown()
        return 0

    def poll(self) -> None:
        """Notice exits, schedule and perform restarts (one pass)."""
        now = self._clock()
        for child in self._children:
            process = child.process
            if process is None or self._stopping:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.restarts += 1
                    self._start(child)
                    print(self.status(), file=sys.stderr, flush=True)
                continue
            code = process.poll()
            if code is None:
                if child.in_a_row and now - child.started >= self._stable:
                    child.in_a_row = 0  # it stayed up: the next exit starts the backoff again
                continue
            child.last_exit = code
            child.in_a_row += 1
            delay = backoff(child.in_a_row)
            child.restart_at = now + delay
            print(
                f"citadel: {child.name} (pid {process.pid}) exited with {code}; "
                f"restarting in {delay:g} s",
                file=sys.stderr,
                flush=True,
            )

    def _start(self, child: _Child) -> None:
        child.process = self._spawn(child.command)
        child.started = self._clock()
        print(f"citadel: {child.name} started (pid {child.process.pid})", file=sys.stderr)

    def shutdown(self) -> None:
        """Stop every child and wait for each (SIGKILL after the grace period)."""
        self.stop()
        for child in self._children:
            process = child.process
            if process is None:
                continue
            try:
                process.wait(timeout=self._grace + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
