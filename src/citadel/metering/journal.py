"""The usage journal: each usage event written to a local file before its response completes.

A gateway killed with SIGKILL must lose no usage event of a request it answered, yet the sinks
(``citadel.metering.sinks``) batch events in memory for half a second. So every event is also
appended, as one ``write()``, to this worker's journal segment the moment it is emitted; a segment
is deleted once every event in it has been delivered (to the Redis Stream, the spool or the SQL
ledger), and a worker that starts replays the segments a dead process left behind.

Theory of operation:

- Segments are ``<path>.<pid>.<run>.<n>``, one open at a time per worker, each held under an
  exclusive ``flock`` while its process lives. Each flush of the sink starts a new segment; a
  segment whose last event is older than the oldest undelivered one is unlinked.
- At start a worker tries to ``flock`` every segment of the prefix; one it can lock belongs to a
  dead process (the kernel drops a dead process's locks), so its events are queued again and the
  segment is deleted after they are delivered. An event delivered just before the crash may come
  back: the ledger stores each event id once, so that is harmless.
- Durability policy: ``write()`` without ``fsync``. The data is then in the kernel's page cache,
  which survives the death of the process (SIGKILL, OOM kill, a crash) — the failure this guards
  against. A power loss or kernel panic can still take the last moments of events; an fsync per
  event would cost a disk flush (milliseconds) on the hot path, so the journal does not pay for
  it. ``fsync_on_rotate`` flushes each segment to disk when it is rotated (every flush interval).
- A torn last line (the process died inside a write) is skipped on replay.

The methods are synchronous; ``append`` is a single ``os.write`` of one short line (microseconds,
measured in ``bench/journal.py``) and runs on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from citadel.metering.events import UsageEvent
from citadel.metering.ledger import decode_event, encode_event

__all__ = ["Journal", "Segment"]

_log = logging.getLogger("citadel.metering.journal")


@dataclass(slots=True)
class Segment:
    """One journal file, held locked; ``end`` counts the sink's events up to its last one."""

    path: Path
    fd: int
    end: int = 0


class Journal:
    """This worker's journal segments under ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, fsync_on_rotate: bool = False) -> None:
        self._prefix = Path(path)
        self._fsync = fsync_on_rotate
        self._current: Segment | None = None
        self._held: list[Segment] = []  # rotated, not yet delivered, oldest first
        self._serial = 0
        self._run = os.urandom(4).hex()  # a reused pid must not reuse a dead process's names

    @property
    def prefix(self) -> Path:
        return self._prefix

    def open(self) -> list[UsageEvent]:
        """Start this worker's first segment; return the events dead processes left (held until
        ``release`` says they are delivered)."""
        self._prefix.parent.mkdir(parents=True, exist_ok=True)
        left: list[UsageEvent] = []
        for path in sorted(self._prefix.parent.glob(self._prefix.name + ".*")):
            segment = self._claim(path)
            if segment is not None:
                left.extend(self._read(path))
                self._held.append(segment)
        self._current = self._new_segment()
        if left:
            _log.warning("usage journal: replaying %d events a stopped process left", len(left))
        return left

    def append(self, event: UsageEvent) -> None:
        """Write one event to the open segment (one ``write``: page cache, see the docstring)."""
        segment = self._current
        if segment is not None:
            os.write(segment.fd, encode_event(event) + b"\n")

    def rotate(self, count: int) -> None:
        """Close the open segment at event ``count`` (the sink's running total) and open another."""
        segment = self._current
        if segment is None:
            return
        segment.end = count
        if self._fsync:
            os.fsync(segment.fd)
        self._held.append(segment)
        self._current = self._new_segment()

    def release(self, delivered: int) -> None:
        """Delete the rotated segments all of whose events (counted up to ``delivered``) are out."""
        while self._held and self._held[0].end <= delivered:
            self._drop(self._held.pop(0))

    def close(self, *, delivered_all: bool) -> None:
        """At shutdown: delete every segment if everything was delivered, else leave them for the
        next start."""
        segments = [*self._held, *([self._current] if self._current else [])]
        self._held, self._current = [], None
        for segment in segments:
            if delivered_all:
                self._drop(segment)
            else:
                os.close(segment.fd)

    # -- files -----------------------------------------------------------------------------------

    def _new_segment(self) -> Segment:
        self._serial += 1
        name = f"{self._prefix.name}.{os.getpid()}.{self._run}.{self._serial}"
        path = self._prefix.with_name(name)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return Segment(path, fd)

    def _claim(self, path: Path) -> Segment | None:
        """The segment at ``path`` if no live process holds it."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return Segment(path, fd)

    def _read(self, path: Path) -> list[UsageEvent]:
        events: list[UsageEvent] = []
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_bytes().split(b"\n"):
                if line.strip():
                    try:
                        events.append(decode_event(line))
                    except ValueError:
                        _log.warning("usage journal %s: skipped a torn line", path)
        return events

    def _drop(self, segment: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        os.close(segment.fd)
