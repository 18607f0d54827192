"""A small closed-loop HTTP/1.1 load generator over raw asyncio sockets.

N keep-alive connections each send the same POST back to back for a warm-up period and then for the
measured duration. For every request completed inside the measured window it records the latency
(request written to response complete) and the time to the first body byte (the first chunk of the
body after the headers; for a streamed response, the first event). Responses are framed by
``Content-Length`` or by chunked transfer encoding, read to the terminating ``0\\r\\n\\r\\n`` chunk.

Used by ``gateway_overhead.py`` for streaming and as the fallback when wrk is missing; also a CLI:

    python bench/loadgen.py --url http://127.0.0.1:8100/v1/chat/completions -c 16 -d 5 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

CHAT_BODY: dict[str, Any] = {
    "model": "sim-chat",
    "messages": [{"role": "user", "content": "Say hello"}],
    "max_tokens": 16,
}

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_HEADERS, _BODY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS = range(5)


@dataclass(slots=True)
class LoadResult:
    """What one load run measured; latencies in seconds, only requests inside the window."""

    concurrency: int
    duration: float
    requests: int = 0  # completed inside the window, any status
    errors: int = 0  # non-2xx responses inside the window
    socket_errors: int = 0  # connect/read failures, protocol errors, timeouts (whole run)
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    first_error: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core over the window

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Counts and percentiles (ms), without the raw samples."""
        out = asdict(self)
        del out["latencies"], out["ttfb"]
        out["rps"] = self.rps
        for name, samples in (("latency", self.latencies), ("ttfb", self.ttfb)):
            ordered = sorted(samples)
            for q in (50, 90, 99):
                value = percentile(ordered, q)
                out[f"{name}_p{q}_ms"] = None if value is None else value * 1000.0
        return out


def percentile(ordered: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of an already sorted list."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[min(len(ordered), int(rank)) - 1]


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One keep-alive HTTP/1.1 POST, ready to write."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Window:
    """The shared clock of one run: when to start counting, when to stop sending."""

    def __init__(self, warmup: float, duration: float) -> None:
        now = time.perf_counter()
        self.start = now + warmup
        self.end = self.start + duration


class _Connection(asyncio.Protocol):
    """One client connection sending the request back to back and parsing responses."""

    def __init__(self, request: bytes, window: _Window, result: LoadResult) -> None:
        self._request = request
        self._window = window
        self._result = result
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = _HEADERS
        self._remaining = 0  # body bytes (content-length) or chunk bytes still expected
        self._status = 0
        self._close_after = False
        self._sent_at = 0.0
        self._first_byte_at = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self._state != _HEADERS or self._buf or exc is not None:
                self._fail(f"connection lost mid-response: {exc!r}")
            else:
                self._fail("connection closed by the server")

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._buf += data
        try:
            self._parse(now)
        except (ValueError, IndexError) as exc:
            self._fail(f"bad response: {exc!r}")
            self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- request/response cycle

    def _send(self) -> None:
        assert self._transport is not None
        self._state = _HEADERS
        self._first_byte_at = 0.0
        self._sent_at = time.perf_counter()
        self._transport.write(self._request)

    def _fail(self, reason: str) -> None:
        self._result.socket_errors += 1
        if not self._result.first_error:
            self._result.first_error = reason
        if not self.done.done():
            self.done.set_result(None)

    def _body_byte(self, now: float) -> None:
        if not self._first_byte_at:
            self._first_byte_at = now

    def _complete(self, now: float) -> None:
        window = self._window
        if window.start <= now <= window.end:
            result = self._result
            result.requests += 1
            status = self._status
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if not 200 <= status < 300:
                result.errors += 1
            result.latencies.append(now - self._sent_at)
            result.ttfb.append((self._first_byte_at or now) - self._sent_at)
        if now >= window.end or self._close_after:
            if self._transport is not None:
                self._transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self._send()

    def _parse(self, now: float) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEADERS:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                self._status = int(head[0].split(" ", 2)[1])
                chunked = False
                length = 0
                self._close_after = False
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    value = value.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "transfer-encoding":
                        chunked = "chunked" in value
                    elif name == "connection":
                        self._close_after = value == "close"
                if chunked:
                    self._state = _CHUNK_SIZE
                elif length:
                    self._state = _BODY_LENGTH
                    self._remaining = length
                else:
                    self._complete(now)
                    continue
            elif state == _BODY_LENGTH:
                if not buf:
                    return
                self._body_byte(now)
                take = min(self._remaining, len(buf))
                del buf[:take]
                self._remaining -= take
                if self._remaining:
                    return
                self._complete(now)
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._state = _CHUNK_DATA
                    self._remaining = size + 2  # the data and its CRLF
            elif state == _CHUNK_DATA:
                if not buf:
                    return
                self._body_byte(now)
                take = min(self._remaining, len(buf))
                del buf[:take]
                self._remaining -= take
                if self._remaining:
                    return
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS: lines until an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._complete(now)


async def run_load(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
    headers: dict[str, str] | None = None,
    watch: dict[str, int] | None = None,
) -> LoadResult:
    """Run ``concurrency`` closed-loop connections for ``warmup + duration`` seconds.

    ``watch`` names processes whose CPU use over the measured window is reported in ``cpu``, as
    a percentage of one core, besides this process's own (``load``) and that of everything else
    running on the machine (``other``).
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    request = build_request(host, port, path, body, all_headers)
    result = LoadResult(concurrency=concurrency, duration=duration)
    window = _Window(warmup, duration)
    loop = asyncio.get_running_loop()
    deadline = window.end + 10.0  # in-flight requests may finish after the window closes
    pids = {**(watch or {}), "load": os.getpid()}
    marks: list[tuple[float, dict[str, float]]] = []

    def mark() -> None:
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu["system"] = system_busy_seconds()
        marks.append((time.perf_counter(), cpu))

    loop.call_later(warmup, mark)
    loop.call_later(warmup + duration, mark)

    async def worker() -> None:
        # A connection the server closes (Connection: close, an error) is reopened.
        while time.perf_counter() < window.end:
            try:
                _, proto = await loop.create_connection(
                    lambda: _Connection(request, window, result), host, port
                )
            except OSError as exc:
                result.socket_errors += 1
                result.first_error = result.first_error or f"connect: {exc!r}"
                await asyncio.sleep(0.05)
                continue
            try:
                await asyncio.wait_for(
                    asyncio.shield(proto.done), max(0.1, deadline - time.perf_counter())
                )
            except TimeoutError:
                result.socket_errors += 1
                result.first_error = result.first_error or "timeout waiting for a response"
                proto.abort()
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if len(marks) == 2:
        (t0, cpu0), (t1, cpu1) = marks
        result.cpu = {name: 100.0 * (cpu1[name] - cpu0[name]) / (t1 - t0) for name in cpu0}
        # Everything else the machine did meanwhile: other users' work makes a point noisy.
        system = result.cpu.pop("system")
        result.cpu["other"] = max(0.0, system - sum(result.cpu.values()))
    return result


def system_busy_seconds() -> float:
    """CPU time all cores spent busy so far (not idle, not waiting for I/O), from /proc/stat."""
    try:
        with open("/proc/stat") as file:
            fields = [int(n) for n in file.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (0 where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def install_uvloop() -> bool:
    """Use uvloop when it is importable; return whether it is."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--url", required=True, help="full URL to POST to")
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="connections (1)")
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds measured (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (1)")
    parser.add_argument("--stream", action="store_true", help='send "stream": true')
    parser.add_argument("--body", help="request body (JSON); default: a small chat request")
    parser.add_argument(
        "-H", "--header", action="append", default=[], help="extra header 'Name: value'"
    )
    parser.add_argument(
        "--watch-pid",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="report this process's CPU use over the measured window",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    if args.body is not None:
        body = args.body.encode()
    else:
        body = json.dumps({**CHAT_BODY, "stream": True} if args.stream else CHAT_BODY).encode()
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            parser.error(f"bad header {item!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    watch: dict[str, int] = {}
    for item in args.watch_pid:
        name, sep, pid = item.partition("=")
        if not sep or not pid.isdigit():
            parser.error(f"bad --watch-pid {item!r}: expected NAME=PID")
        watch[name] = int(pid)

    uvloop = install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        result = asyncio.run(
            run_load(
                args.url,
                body,
                concurrency=args.concurrency,
                duration=args.duration,
                warmup=args.warmup,
                headers=headers,
                watch=watch,
            )
        )
        summary = result.summary()
        summary["uvloop"] = uvloop
        if args.json:
            json.dump(summary, sys.stdout)
            print()
        else:
            for key, value in summary.items():
                print(f"{key:>16}: {value}")
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
