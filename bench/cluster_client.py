"""The Cluster client's cost per call at 1, 8 and 32 concurrent callers, batched against not.

A Redis Cluster of three masters and three replicas on loopback (tests/redis_topologies.py);
one client (``citadel.stores.topology.ClusterClient``) runs a two-key Lua script (what an admit
is) from ``c`` concurrent callers. Printed per concurrency: calls/s, the client's CPU per call,
the Cluster's CPU per call (all six processes: replicas apply every write) and the connections
the client opened. ``--unbatched`` gives every call a redis-py call of its own (the client as it
was before it batched the calls of one turn of the loop), in the same run, as the reference.

    python bench/cluster_client.py [--calls 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redis_topologies import ClusterGroup, cluster

from citadel.stores.endpoint import parse
from citadel.stores.redis import Script
from citadel.stores.topology import ClusterClient

ADMIT = Script("redis.call('INCR', KEYS[1]); return redis.call('INCR', KEYS[2])")
CONCURRENCY = (1, 8, 32)


def cluster_cpu(group: ClusterGroup) -> float:
    total = 0.0
    for port in group.processes:
        info = subprocess.run(
            ["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True, text=True
        ).stdout
        for line in info.splitlines():
            if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                total += float(line.split(":")[1])
    return total


class Unbatched(ClusterClient):
    """Every call a redis-py call of its own: the reference."""

    async def execute(self, *args: Any) -> Any:
        return await self._call(lambda: self._client.execute_command(*args))


async def measure(
    client: ClusterClient, group: ClusterGroup, conc: int, calls: int
) -> dict[str, float]:
    async def caller(i: int) -> None:
        for _ in range(calls):
            await client.evalsha(ADMIT, [f"{{u{i}}}a", f"{{u{i}}}b"], [])

    await asyncio.gather(*(caller(i) for i in range(conc)))  # warm: connections, scripts
    redis0, cpu0, t0 = cluster_cpu(group), time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(conc)))
    n = conc * calls
    return {
        "rate": n / (time.perf_counter() - t0),
        "client": 1e6 * (time.process_time() - cpu0) / n,
        "redis": 1e6 * (cluster_cpu(group) - redis0) / n,
        "connections": len(client._opened),
    }


async def run(group: ClusterGroup, calls: int, runs: int) -> None:
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(runs):
        for name, kind in (("batched", ClusterClient), ("unbatched", Unbatched)):
            store = kind(parse(group.url), timeout=2.0)
            try:
                for conc in CONCURRENCY:
                    results.setdefault((name, conc), []).append(
                        await measure(store, group, conc, calls)
                    )
            finally:
                await store.aclose()
    print(f"{'client':<10} {'c':>3} {'calls/s':>8} {'client µs':>10} {'Redis µs':>9} {'conns':>6}")
    for (name, conc), rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"{name:<10} {conc:>3} {med['rate']:>8.0f} {med['client']:>10.0f} "
            f"{med['redis']:>9.1f} {med['connections']:>6.0f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per caller per point")
    parser.add_argument("--runs", type=int, default=3, help="passes; medians are printed")
    args = parser.parse_args(argv)
    with cluster() as group:
        asyncio.run(run(group, args.calls, args.runs))


if __name__ == "__main__":
    main()
