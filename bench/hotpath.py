"""The per-request pieces of the gateway's production path, each against its old form, in one run.

Measures, in this process (uvloop, pinned to one core with ``--core``), the costs behind the
changes of docs/decisions.md "The production request path, made cheaper":

- a loop timer created and cancelled (what each request's read, idle and total timeouts did),
  against moving a deadline (``citadel.http.server._Deadline``);
- encoding an admission's EVALSHA: the Python encoder against ``hiredis.pack_command``;
- reading one SSE chunk: ``inspect_chunk`` (a frozen ``StreamChunkInfo`` per event) against
  ``read_chunk`` (a tuple);
- the limiter client's CPU per request (admit, then settle) against a Redis, at 1 and 16
  requests at a time, with settlements sent at once (``settle_delay=0``, the old way) and
  deferred to travel with the next admission (the default).

    .venv/bin/python bench/hotpath.py [--redis redis://127.0.0.1:6379/11] [--core 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import uvloop

# bench/ is sys.path[0] when this runs as a script; every limit set, none reached
from limiter import LIMITS

from citadel.http.server import _Deadline
from citadel.limits.redis import RedisLimiter
from citadel.openai.sse import inspect_chunk, read_chunk
from citadel.stores.redis import RedisClient, _encode_bytes, encode_command

CHUNK = (
    b'{"id":"chatcmpl-cba7b58bea45832d0000000000000000","object":"chat.completion.chunk",'
    b'"created":1796313091,"model":"sim-chat","choices":[{"index":0,"delta":{"content":" house"},'
    b'"logprobs":null,"finish_reason":null}]}'
)
ADMIT: tuple[str | int, ...] = (
    "EVALSHA",
    "0123456789abcdef0123456789abcdef01234567",
    7,
    *(f"citadel:{{u:usr_bfe1096f93684245}}:{k}" for k in ("rpm", "tpm", "leases", "keys")),
    "citadel:{u:usr_bfe1096f93684245}:day:2026-12-03",
    "citadel:{u:usr_bfe1096f93684245}:month:2026-12",
    "citadel:{u:usr_bfe1096f93684245}:cost:2026-12",
    *(1796313091123, 24, 40, "req_00966936ad8e965de9ba8da0edd7bc7c", 60000, 1796342400000),
    *(1798761600000, 60000, 120000, 100000000, 1000000000, 10000, 10**11, 10**12, 10**14),
)


def old_encode_command(args: tuple[str | int, ...]) -> bytes:
    """The Python encoder's ASCII fast path as it was (before hiredis.pack_command)."""
    out = [f"${len(text)}\r\n{text}\r\n" for text in (str(a) for a in args)]
    return (f"*{len(args)}\r\n" + "".join(out)).encode()


def redis_cpu(pid: int | None) -> float:
    """Redis's CPU seconds so far (0 when it is not a local process)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_call_us(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """The median over ``repeat`` runs of µs per call."""
    return statistics.median(
        t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat)
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timers(number: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    runs: dict[str, list[float]] = {"handle": [], "deadline": []}
    deadline = _Deadline(loop, lambda: None)
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(number):
            loop.call_later(30.0, print).cancel()
        runs["handle"].append((time.perf_counter() - started) / number * 1e6)
        started = time.perf_counter()
        for _ in range(number):
            deadline.arm(30.0)
            deadline.clear()
        runs["deadline"].append((time.perf_counter() - started) / number * 1e6)
    deadline.cancel()
    return statistics.median(runs["handle"]), statistics.median(runs["deadline"])


async def limiter(
    url: str, settle_delay: float, concurrency: int, requests: int
) -> tuple[float, float]:
    """CPU µs per admitted and settled request of the limiter's client side, and of Redis."""
    client = RedisClient.from_url(url, timeout=2.0)
    info = (await client.execute("INFO", "server")).decode()
    pid = next(
        int(line.split(":")[1]) for line in info.splitlines() if line.startswith("process_id")
    )
    server = pid if await asyncio.to_thread(Path(f"/proc/{pid}").exists) else None
    limits = RedisLimiter(client, "UTC", 60.0, settle_delay=settle_delay)
    settling: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        decision = await limits.admit(
            "usr_hotpath", LIMITS, lease_id=f"req_{i}", tokens=24, cost_micros=40, now=time.time()
        )
        assert decision.reservation is not None
        # As the gateway does: the settlement runs in the background, the next request goes on.
        task = loop.create_task(
            limits.reconcile(
                decision.reservation, LIMITS, tokens=24, cost_micros=40, now=time.time()
            )
        )
        settling.add(task)
        task.add_done_callback(settling.discard)

    async def worker(start: int) -> None:
        for i in range(start, requests, concurrency):
            await one(i)

    try:
        await one(-1)
        before, redis_before = cpu_seconds(), redis_cpu(server)
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        await asyncio.gather(*settling)
        spent, redis_spent = cpu_seconds() - before, redis_cpu(server) - redis_before
        return spent / requests * 1e6, redis_spent / requests * 1e6
    finally:
        await limits.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11", help="a scratch database")
    parser.add_argument("--core", type=int, default=None, help="pin this process to a core")
    parser.add_argument("--requests", type=int, default=20_000, help="limiter requests per point")
    parser.add_argument("--runs", type=int, default=3, help="limiter passes (medians)")
    args = parser.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    handle, moved = uvloop.run(timers(50_000))
    print(f"loop timer created+cancelled {handle:6.2f} µs   deadline moved+cleared {moved:6.2f} µs")
    python = per_call_us(lambda: old_encode_command(ADMIT), 50_000)
    assert old_encode_command(ADMIT) == encode_command(ADMIT) == _encode_bytes(ADMIT)
    packed = per_call_us(lambda: encode_command(ADMIT), 50_000)
    print(f"admission EVALSHA: Python encoder {python:6.2f} µs   hiredis {packed:6.2f} µs")
    old = per_call_us(lambda: inspect_chunk(CHUNK), 100_000)
    new = per_call_us(lambda: read_chunk(CHUNK), 100_000)
    print(f"SSE chunk: inspect_chunk {old:6.2f} µs   read_chunk {new:6.2f} µs")
    print("limiter, CPU µs per request (admit + settle), client / Redis (shared: others' load too)")
    for concurrency in (1, 16):
        figures: dict[float, list[tuple[float, float]]] = {0.0: [], 0.005: []}
        for _ in range(args.runs):
            for delay in figures:  # alternating, so drift in the machine's load hits both
                figures[delay].append(
                    uvloop.run(limiter(args.redis, delay, concurrency, args.requests))
                )
        (now_c, now_r), (def_c, def_r) = (
            (statistics.median(c for c, _ in v), statistics.median(r for _, r in v))
            for v in figures.values()
        )
        print(
            f"  c={concurrency:<2} settle at once {now_c:6.1f} / {now_r:5.1f}   "
            f"deferred {def_c:6.1f} / {def_r:5.1f}   ratio {def_c / now_c:.2f} / "
            f"{def_r / now_r if now_r else float('nan'):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
