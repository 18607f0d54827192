"""The usage journal: every emitted event on disk until delivered, replayed after a crash."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sqlalchemy as sa

from citadel.metering.journal import Journal
from citadel.metering.schema import usage_events
from citadel.metering.sinks import SqlLedgerSink
from citadel.stores.sql import build_engine

from support import usage_event


def _segments(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + ".*"))


def test_events_a_killed_process_journaled_are_replayed_by_the_next(tmp_path: Path) -> None:
    """A process that appends events and dies without closing leaves them to the next opener."""
    prefix = tmp_path / "usage.journal"
    script = textwrap.dedent(
        f"""
        import os, signal
        from citadel.metering.journal import Journal
        from support import usage_event
        journal = Journal({str(prefix)!r})
        journal.open()
        for i in range(5):
            journal.append(usage_event(request_id=f"r{{i}}"))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=30, check=False)
    assert -9 == proc.returncode
    journal = Journal(prefix)
    left = journal.open()
    assert [f"r{i}" for i in range(5)] == [e.request_id for e in left]
    journal.rotate(len(left))
    journal.release(len(left))  # delivered: the dead process's segment is gone
    assert 1 == len(_segments(prefix))  # only this journal's open segment
    journal.close(delivered_all=True)
    assert [] == _segments(prefix)


def test_a_live_processs_segments_are_not_claimed(tmp_path: Path) -> None:
    """Two journals on one prefix (two workers) never take each other's events."""
    prefix = tmp_path / "usage.journal"
    first = Journal(prefix)
    first.open()
    first.append(usage_event())
    second = Journal(prefix)
    assert [] == second.open()
    first.close(delivered_all=False)
    second.close(delivered_all=True)
    assert 1 == len(_segments(prefix))  # the first one's undelivered segment stays


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    prefix = tmp_path / "usage.journal"
    (tmp_path / "usage.journal.1.dead.1").write_bytes(b"")
    journal = Journal(prefix)
    journal.open()
    journal.append(usage_event(request_id="whole"))
    journal.close(delivered_all=False)
    segment = next(p for p in _segments(prefix) if p.stat().st_size)
    with segment.open("ab") as f:
        f.write(b'[1,"torn')
    again = Journal(prefix)
    assert ["whole"] == [e.request_id for e in again.open()]
    again.close(delivered_all=True)


def test_the_sink_replays_the_journal_into_the_ledger_and_deletes_it(tmp_path: Path) -> None:
    """Events journaled by a sink that never flushed reach the ledger through the next sink."""
    prefix = tmp_path / "usage.journal"
    dead = Journal(prefix)
    dead.open()
    events = [usage_event(request_id=f"j{i}") for i in range(3)]
    for event in events:
        dead.append(event)
    os.close(dead._current.fd)  # type: ignore[union-attr]  # the process died: its lock is gone
    database = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"

    async def go() -> list[str]:
        sink = SqlLedgerSink(
            build_engine(database),
            flush_seconds=0.05,
            batch_size=100,
            migrate=True,
            owns_store=True,
            journal=Journal(prefix),
        )
        await sink.start()
        sink.emit(usage_event(request_id="live"))
        await asyncio.sleep(0.3)
        await sink.aclose()
        engine = build_engine(database)
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(usage_events.c.request_id))).all()
        await engine.dispose()
        return sorted(r[0] for r in rows)

    assert ["j0", "j1", "j2", "live"] == asyncio.run(go())
    assert [] == _segments(prefix)
