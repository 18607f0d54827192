"""The gateway's spool: usage events kept in a local append-only file while Redis is down.

    spool = Spool("citadel-usage.spool")
    spool.append(events)            # one write and one fsync per batch
    with spool.locked():            # replay and truncate as one step, against other processes
        events = spool.replay()
        ...send them...
        spool.truncate()

One event per line, in the ledger's wire format (``citadel.metering.ledger``). A crash can leave
the last line torn (written in part): ``replay`` skips any line that is not a whole event, and
``append`` first ends a torn line, so the events after it stay readable.

Several gateway workers may share one file: ``append`` takes an exclusive ``flock`` for its
write, and a replay holds ``locked()`` from reading to truncating, so no event appended between
the two is truncated unsent. The methods block (file I/O, fsync): call them off the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from citadel.metering.events import UsageEvent
from citadel.metering.ledger import decode_event, encode_event

__all__ = ["Spool"]

_log = logging.getLogger("citadel.metering.spool")


class Spool:
    """An append-only JSON-lines file of usage events, fsynced per batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._held: int | None = None  # the descriptor locked by ``locked()``

    @property
    def path(self) -> Path:
        return self._path

    def append(self, events: Iterable[UsageEvent]) -> int:
        """Add the events at the end of the file and fsync it; return how many were written."""
        lines = [encode_event(e) + b"\n" for e in events]
        if not lines:
            return 0
        data = b"".join(lines)
        with self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT) as fd:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a torn last line, so it cannot swallow the first event
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        return len(lines)

    def replay(self) -> list[UsageEvent]:
        """Every whole event in the file, in order; torn or unreadable lines are skipped."""
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return []
        events: list[UsageEvent] = []
        skipped = 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                events.append(decode_event(line))
            except ValueError:
                skipped += 1
        if skipped:
            _log.warning("usage spool %s: skipped %d unreadable lines", self._path, skipped)
        return events

    def truncate(self) -> None:
        """Empty the file (after its events were sent)."""
        with contextlib.suppress(FileNotFoundError), self._open(os.O_WRONLY) as fd:
            os.ftruncate(fd, 0)
            os.fsync(fd)

    def size(self) -> int:
        """The file's size in bytes (0 if missing): non-zero means events may wait in it."""
        try:
            return self._path.stat().st_size
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's lock: other processes' appends wait until the block ends."""
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held = fd
            yield
        finally:
            self._held = None
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _open(self, flags: int) -> Iterator[int]:
        """The file open with ``flags`` and locked, unless ``locked()`` holds it already."""
        fd = os.open(self._path, flags, 0o600)
        try:
            if self._held is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)
