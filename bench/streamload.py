"""Hold many long-lived SSE streams open at once over raw asyncio sockets, the shape of LLM traffic.

N keep-alive connections are opened gradually (``--ramp`` seconds) and each sends the same
streaming POST back to back, so about N streams are open at any moment. Over the measured window it
records each stream's time to first body byte (request written to the first event), counts the
SSE events received (``data:`` lines, counted in the raw bytes without decoding them), samples the
number of streams open and the resident memory of the ``--rss-pid`` processes halfway through the
window, and reports the CPU time of the ``--watch-pid`` processes over the window. Every wait is
bounded: a connection that gets no byte for ``--stall`` seconds counts as a socket error.

    python bench/streamload.py --url http://127.0.0.1:8000/v1/chat/completions -c 2000 -d 10 \\
        -H 'x-sim-ttft-ms: 100' -H 'x-sim-tbt-ms: 50' --json

Used by ``production.py --streams``; the response parsing is ``loadgen.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# bench/ is sys.path[0] when this runs as a script
from loadgen import (
    CHAT_BODY,
    LoadResult,
    _Connection,
    _Window,
    build_request,
    cpu_seconds,
    install_uvloop,
    system_busy_seconds,
)

_MARK = b"data:"


@dataclass(slots=True)
class _Counters:
    events: int = 0  # SSE events received inside the window
    open: int = 0  # streams sent and not yet complete
    last_byte: float = 0.0  # when any connection last received a byte


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (as far as the hard limit, or past
    it when privileged); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for limits in ((wanted, max(hard, wanted)), (min(wanted, hard), hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int) -> int:
    """A process's resident set size (VmRSS), 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class _StreamConnection(_Connection):
    """loadgen's connection, also counting the events of each stream and the streams open."""

    def __init__(
        self, request: bytes, window: _Window, result: LoadResult, counters: _Counters
    ) -> None:
        super().__init__(request, window, result)
        self._counters = counters
        self._tail = b""  # the last bytes received: a "data:" split across two reads counts once

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        counters = self._counters
        counters.last_byte = now
        if self._window.start <= now <= self._window.end:
            counters.events += (self._tail + data).count(_MARK)
        self._tail = data[-(len(_MARK) - 1) :]
        super().data_received(data)

    def _send(self) -> None:
        self._counters.open += 1
        super()._send()

    def _complete(self, now: float) -> None:
        self._counters.open -= 1
        super()._complete(now)


async def hold_streams(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    ramp: float,
    settle: float,
    stall: float,
    headers: dict[str, str] | None = None,
    watch: dict[str, int] | None = None,
    rss: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Open ``concurrency`` connections over ``ramp`` s, let them ``settle`` s, then measure
    ``duration`` s; returns the summary (see the module's docstring)."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    request = build_request(host, port, path, body, all_headers)
    result = LoadResult(concurrency=concurrency, duration=duration)
    window = _Window(ramp + settle, duration)
    counters = _Counters(last_byte=time.perf_counter())
    loop = asyncio.get_running_loop()
    pids = {**(watch or {}), "load": 0}
    marks: list[tuple[float, dict[str, float]]] = []
    middle: dict[str, float] = {}

    def mark() -> None:
        cpu = {name: cpu_seconds(pid) if pid else time.process_time() for name, pid in pids.items()}
        cpu["system"] = system_busy_seconds()
        marks.append((time.perf_counter(), cpu))

    def sample_middle() -> None:
        middle["open"] = counters.open
        for name, pid in (rss or {}).items():
            middle[f"rss_{name}"] = rss_bytes(pid)

    loop.call_later(ramp + settle, mark)
    loop.call_later(ramp + settle + duration / 2, sample_middle)
    loop.call_later(ramp + settle + duration, mark)
    protocols: list[_StreamConnection] = []

    async def connection(delay: float) -> None:
        await asyncio.sleep(delay)
        while time.perf_counter() < window.end:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _StreamConnection(request, window, result, counters), host, port
                    ),
                    stall,
                )
            except (OSError, TimeoutError) as exc:
                result.socket_errors += 1
                result.first_error = result.first_error or f"connect: {exc!r}"
                await asyncio.sleep(0.05)
                continue
            protocols.append(proto)
            await proto.done

    async def watchdog() -> None:
        # Every connection's wait is bounded: no byte anywhere for `stall` s aborts them all.
        while time.perf_counter() < window.end + stall:
            await asyncio.sleep(0.5)
            if not any(not p.done.done() for p in protocols):
                if time.perf_counter() >= window.end:
                    return
                continue
            if time.perf_counter() - counters.last_byte > stall:
                result.first_error = result.first_error or f"no byte received for {stall:g} s"
                for proto in protocols:
                    if not proto.done.done():
                        proto.abort()
                        proto._fail("stalled")
                return
        for proto in protocols:  # past the window and the grace: whatever is left is stuck
            if not proto.done.done():
                proto.abort()
                proto._fail("still open after the window")

    step = ramp / concurrency if concurrency else 0.0
    dog = asyncio.create_task(watchdog())
    await asyncio.gather(*(connection(i * step) for i in range(concurrency)))
    dog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dog
    out = result.summary()
    out["events"] = counters.events
    out["events_per_second"] = counters.events / duration if duration else 0.0
    out.update(middle)
    if len(marks) == 2:
        (t0, cpu0), (t1, cpu1) = marks
        seconds = {name: cpu1[name] - cpu0[name] for name in cpu0}
        out["cpu_seconds"] = {k: v for k, v in seconds.items() if k != "system"}
        cpu = {name: 100.0 * value / (t1 - t0) for name, value in seconds.items()}
        system = cpu.pop("system")
        cpu["other"] = max(0.0, system - sum(cpu.values()))
        out["cpu"] = cpu
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--url", required=True, help="full URL to POST to")
    parser.add_argument("-c", "--concurrency", type=int, default=100, help="streams open (100)")
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds measured (10)")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to open them all (2)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before measuring (1)")
    parser.add_argument("--stall", type=float, default=15.0, help="give up after no byte (15 s)")
    parser.add_argument("--max-tokens", type=int, default=20, help="tokens per stream (20)")
    parser.add_argument(
        "-H", "--header", action="append", default=[], help="extra header 'Name: value'"
    )
    parser.add_argument("--watch-pid", action="append", default=[], metavar="NAME=PID")
    parser.add_argument("--rss-pid", action="append", default=[], metavar="NAME=PID")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    body = json.dumps({**CHAT_BODY, "max_tokens": args.max_tokens, "stream": True}).encode()
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            parser.error(f"bad header {item!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()

    def pids(items: list[str], flag: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for item in items:
            name, sep, pid = item.partition("=")
            if not sep or not pid.isdigit():
                parser.error(f"bad {flag} {item!r}: expected NAME=PID")
            found[name] = int(pid)
        return found

    limit = raise_nofile(args.concurrency + 256)
    if limit < args.concurrency + 64:
        parser.error(f"-c {args.concurrency}: only {limit} open files allowed (ulimit -n)")
    install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        summary = asyncio.run(
            hold_streams(
                args.url,
                body,
                concurrency=args.concurrency,
                duration=args.duration,
                ramp=args.ramp,
                settle=args.settle,
                stall=args.stall,
                headers=headers,
                watch=pids(args.watch_pid, "--watch-pid"),
                rss=pids(args.rss_pid, "--rss-pid"),
            )
        )
        if args.json:
            json.dump(summary, sys.stdout)
            print()
        else:
            for key, value in summary.items():
                print(f"{key:>20}: {value}")
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
