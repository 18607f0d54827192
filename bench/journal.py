"""What the usage journal costs on the hot path: ``emit`` with and without it, in the same run.

For each of ``--runs`` passes, times ``--events`` calls of ``SqlLedgerSink.emit`` (the call a
finished request makes; the sink's flush task is not started, so only the emit itself is timed)
one at a time (c=1), first with no journal (the reference), then with the journal on a file in a
temporary directory, and prints the median of the passes' p50/p99 per event and the difference:
what the journal adds to each request (one ``encode_event`` and one ``os.write`` to the page
cache). Target (issue 16): at most 0.02 ms at p50.

    .venv/bin/python bench/journal.py [--events 20000] [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from citadel.metering.events import UsageEvent, new_event_id
from citadel.metering.journal import Journal
from citadel.metering.sinks import SqlLedgerSink
from citadel.stores.sql import build_engine


def _event(i: int) -> UsageEvent:
    now = time.time()
    return UsageEvent(
        event_id=new_event_id(now),
        time=now,
        request_id=f"bench-{i}",
        user="usr_0123456789abcdef",
        team="team_0123456789abcdef",
        key_id="key_0123456789abcdef",
        tier="standard",
        endpoint="chat",
        model="sim-chat",
        deployment="sim-a",
        prompt_tokens=12,
        completion_tokens=16,
        latency_seconds=0.0021,
        ttft_seconds=0.0009,
        status=200,
        streamed=False,
        cancelled=False,
        usage_estimated=False,
        cost_micros=42,
    )


def _time_emits(sink: SqlLedgerSink, events: list[UsageEvent]) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for event in events:
        start = clock()
        sink.emit(event)
        out.append((clock() - start) / 1e6)
    return out


def _pass(n: int, directory: str, journal: bool) -> tuple[float, float]:
    engine = build_engine(f"sqlite+aiosqlite:///{directory}/bench.db")
    j = Journal(Path(directory) / "bench.journal") if journal else None
    if j is not None:
        j.open()
    sink = SqlLedgerSink(engine, flush_seconds=60, batch_size=10**9, journal=j)
    times = sorted(_time_emits(sink, [_event(i) for i in range(n)]))
    if j is not None:
        j.close(delivered_all=True)
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the journal file goes (a temp dir)")
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"no journal": [], "journal": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for _ in range(args.runs):
            rows["no journal"].append(_pass(args.events, directory, journal=False))
            rows["journal"].append(_pass(args.events, directory, journal=True))
    medians = {
        name: (statistics.median(p[0] for p in v), statistics.median(p[1] for p in v))
        for name, v in rows.items()
    }
    print(f"emit, c=1, {args.events} events x {args.runs} runs (pid {os.getpid()}); ms per event")
    for name, (p50, p99) in medians.items():
        print(f"  {name:<11} p50 {p50:.4f}  p99 {p99:.4f}")
    added = medians["journal"][0] - medians["no journal"][0]
    print(f"  journal adds p50 {added:+.4f} ms  (target <= 0.02 ms)")


if __name__ == "__main__":
    main()
