"""The GraphQL API against the REST calls it replaces, in one run; and subscription fan-out.

    .venv/bin/python bench/graphql_api.py                      # 100 teams, 1,000 users, 100k events
    .venv/bin/python bench/graphql_api.py --events 1000000     # the issue's full data set (slow)
    .venv/bin/python bench/graphql_api.py --subscribers 1000 --redis redis://127.0.0.1:6379/7

Every service is ``python -m citadel serve ...`` on one SQLite database (accounts and ledger)
seeded here: ``--teams`` teams of ``--users / --teams`` users, and ``--events`` usage events of
those users over the last 30 days. Each comparison sends its calls back to back on keep-alive
connections for ``--duration`` seconds after a warm-up (concurrency 1) and prints p50, p99 and
requests/s of each side and the ratio GraphQL / REST:

(a) ``{ models { nodes { name deployments { nodes { name state } } } } }`` against the routing
    service's ``GET /v1/deployments`` (the same names and states);
(b) teams -> users -> each user's usage over 30 days, one GraphQL query, against the three REST
    calls that return the same data: ``GET /v1/teams`` and ``GET /v1/users`` (rate-limiting
    API) and ``GET /v1/usage?group_by=user`` (custom metrics), one after the other (their sum
    is one "request" of the REST side);
(c) ``--subscribers`` WebSocket subscribers (graphql-transport-ws) to ``usageEvents``, on the
    live feed in Redis: events are XADDed to the metering stream as a gateway does when a
    request ends, ``--fanout-events`` of them 100 ms apart; the latency of one event is from
    its XADD to its arrival at the last subscriber (p50 and p99 over the events).

Targets (issue 13): (b) no slower than 1.5x the REST calls; (c) p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

ADMIN = "sk-bench-graphql-admin"
HERE = Path(__file__).resolve().parent.parent
CONFIG = """
accounts: {{database: "sqlite+aiosqlite:///{db}", default_tier: open}}
tiers:
  open: {{}}
limits: {{backend: "{limiter}"}}
metering: {{stream: "{stream}"}}
{endpoints}
alerting: {{defaults: false}}
models:
  - name: general
    price: {{input_per_1k: 0.0005, output_per_1k: 0.0015}}
    deployments:
      - {{name: bench-a, url: "http://127.0.0.1:{closed}", model: m}}
      - {{name: bench-b, url: "http://127.0.0.1:{closed}", model: m}}
  - name: coder
    specialties: [code]
    deployments: [{{name: bench-c, url: "http://127.0.0.1:{closed}", model: m}}]
"""
MODELS = "{ models { nodes { name deployments { nodes { name state } } } } }"
NESTED = """{ teams(first: 100) { nodes { id name users(first: %d) { nodes { id name
  usage { requests tokens costUsd } } } } } }"""
SUBSCRIBE = "subscription { usageEvents { eventId requestId model costUsd } }"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- the data set -------------------------------------------------------------------------------


def seed(db: Path, teams: int, users: int, events: int) -> float:
    """Teams, users and a ledger of usage over the last 30 days; the seconds it took."""
    from citadel.accounts.migrate import ACCOUNTS
    from citadel.accounts.sql import open_store
    from citadel.metering.events import UsageEvent, new_event_id
    from citadel.metering.ledger import Ledger
    from citadel.metering.migrate import LEDGER
    from citadel.stores.sql import build_engine

    started = time.perf_counter()
    uri = f"sqlite+aiosqlite:///{db}"
    rng = random.Random(13)

    async def main() -> None:
        await ACCOUNTS.upgrade(uri)
        await LEDGER.upgrade(uri)
        store = await open_store(uri, migrate=False)
        members: list[tuple[str, str]] = []
        try:
            made = [await store.create_team(f"Team {i:03d}") for i in range(teams)]
            for i in range(users):
                team = made[i % teams]
                user = await store.create_user(
                    name=f"User {i:04d}", email=f"u{i}@example.com", tier="open", team_id=team.id
                )
                members.append((user.id, team.id))
        finally:
            await store.aclose()
        engine = build_engine(uri)
        now = time.time()
        try:
            ledger = Ledger(engine)
            for start in range(0, events, 5000):
                batch = []
                for i in range(start, min(events, start + 5000)):
                    user, team = members[i % len(members)]
                    at = now - rng.uniform(60, 30 * 86400 - 3600)
                    batch.append(
                        UsageEvent(
                            event_id=new_event_id(at),
                            time=at,
                            request_id=f"req-{i}",
                            user=user,
                            team=team,
                            key_id="key",
                            tier="open",
                            endpoint="/v1/chat/completions",
                            model="general",
                            deployment=rng.choice(("bench-a", "bench-b")),
                            prompt_tokens=rng.randint(1, 3000),
                            completion_tokens=rng.randint(0, 1500),
                            latency_seconds=rng.uniform(0.1, 3.0),
                            ttft_seconds=None,
                            status=200,
                            streamed=False,
                            cancelled=False,
                            usage_estimated=False,
                            cost_micros=rng.randint(1, 20_000),
                        )
                    )
                await ledger.write(batch)
        finally:
            await engine.dispose()

    asyncio.run(main())
    return time.perf_counter() - started


# -- the services -------------------------------------------------------------------------------


def start(config: Path, service: str, redis: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE / "src"),
        "CITADEL_ADMIN_KEY": ADMIN,
        "CITADEL_ENV": "test",
        "CITADEL_LOG_LEVEL": "warning",
        "REDIS_ENDPOINT": redis,
    }
    command = [sys.executable, "-m", "citadel", "--config", str(config)]
    command += ["serve", service, "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            if call(conn, "GET", "/health")[0] in (200, 503):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{service} did not start")


def call(
    conn: http.client.HTTPConnection, method: str, path: str, body: object = None
) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    conn.request(method, path, b"" if body is None else orjson.dumps(body), headers)
    response = conn.getresponse()
    return response.status, response.read()


def measure(one: Callable[[], None], duration: float) -> tuple[float, float, float]:
    """p50 and p99 in milliseconds and requests/s of ``one`` called back to back."""
    for _ in range(3):
        one()
    times: list[float] = []
    deadline = time.perf_counter() + duration
    began = time.perf_counter()
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        one()
        times.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - began
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return statistics.median(times) * 1000, p99 * 1000, len(times) / elapsed


def graphql_call(port: int, query: str) -> Callable[[], None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def one() -> None:
        status, raw = call(conn, "POST", "/graphql", {"query": query})
        body = orjson.loads(raw)
        if status != 200 or body.get("errors"):
            raise RuntimeError(f"GraphQL answered {status}: {raw[:300]!r}")

    return one


def rest_calls(calls: list[tuple[int, str]]) -> Callable[[], None]:
    conns = {port: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for port, _ in calls}

    def one() -> None:
        for port, path in calls:
            status, raw = call(conns[port], "GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {raw[:300]!r}")

    return one


def compare(
    label: str, graphql: Callable[[], None], rest: Callable[[], None], duration: float
) -> None:
    gq = measure(graphql, duration)
    rs = measure(rest, duration)
    print(f"{label}")
    print(f"  GraphQL  p50 {gq[0]:8.2f} ms  p99 {gq[1]:8.2f} ms  {gq[2]:8.1f} req/s")
    print(f"  REST     p50 {rs[0]:8.2f} ms  p99 {rs[1]:8.2f} ms  {rs[2]:8.1f} req/s")
    print(f"  ratio GraphQL/REST p50 {gq[0] / rs[0]:.2f}x  p99 {gq[1] / rs[1]:.2f}x")


# -- (c) subscription fan-out ---------------------------------------------------------------------


async def fanout(port: int, redis: str, stream: str, subscribers: int, events: int) -> None:
    import websockets

    from citadel.metering.ledger import encode_event
    from citadel.stores.redis import RedisClient

    sys.path.insert(0, str(HERE / "tests"))
    from support import usage_event  # the test suite's event maker

    url = f"ws://127.0.0.1:{port}/graphql"
    arrivals: dict[str, list[float]] = {}
    ready = 0

    async def subscriber(index: int) -> None:
        nonlocal ready
        async with websockets.connect(
            url, subprotocols=["graphql-transport-ws"], max_queue=None, open_timeout=60
        ) as ws:
            init = {"type": "connection_init", "payload": {"authorization": f"Bearer {ADMIN}"}}
            await ws.send(orjson.dumps(init).decode())
            assert orjson.loads(await ws.recv())["type"] == "connection_ack"
            await ws.send(
                orjson.dumps(
                    {"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIBE}}
                ).decode()
            )
            ready += 1
            got = 0
            async for raw in ws:
                message = orjson.loads(raw)
                if message.get("type") != "next":
                    continue
                event_id = message["payload"]["data"]["usageEvents"]["eventId"]
                arrivals.setdefault(event_id, []).append(time.time())
                got += 1
                if got >= events:
                    return

    tasks = []
    for i in range(subscribers):  # connect in waves, as clients arrive
        tasks.append(asyncio.create_task(subscriber(i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while ready < subscribers and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # every subscription reached the feed's tail
    client = RedisClient.from_url(redis, timeout=5.0)
    sent: dict[str, float] = {}
    try:
        for i in range(events):
            event = usage_event(time=time.time(), request_id=f"fanout-{i}")
            sent[event.event_id] = time.time()
            await client.execute("XADD", stream, "*", "e", encode_event(event))
            await asyncio.sleep(0.1)
        done = asyncio.gather(*tasks)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, 60)
        await client.execute("DEL", stream)
    finally:
        await client.aclose()
        for task in tasks:
            task.cancel()
    latencies = []
    incomplete = 0
    for event_id, at in sent.items():
        got = arrivals.get(event_id, [])
        if len(got) < subscribers:
            incomplete += 1
            continue
        latencies.append((max(got) - at) * 1000)
    latencies.sort()
    print(
        f"(c) usageEvents fan-out to {subscribers} subscribers ({ready} connected), {events} events"
    )
    if not latencies:
        print("  no event reached every subscriber")
        return
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    first = [
        (min(arrivals[e]) - sent[e]) * 1000 for e in sent if len(arrivals.get(e, [])) >= subscribers
    ]
    print(
        f"  request end -> last subscriber: p50 {statistics.median(latencies):.1f} ms  "
        f"p99 {p99:.1f} ms  (first subscriber p50 {statistics.median(first):.1f} ms); "
        f"{incomplete} events missed by some subscriber"
    )


@contextlib.contextmanager
def profiled(pid: int, prefix: str | None, part: str) -> Iterator[None]:
    """py-spy sampling ``pid`` while the block runs (nothing without ``prefix``)."""
    if prefix is None:
        yield
        return
    out = f"{prefix}-{part}.txt"
    spy_bin = str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen(
        [spy_bin, "record", "--pid", str(pid), "--format", "raw", "--output", out,
         "--rate", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # attached
        yield
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(30)
        print(f"profile of ({part}): {out}")


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teams", type=int, default=100)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--fanout-events", type=int, default=50)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="record the graphql-api process with py-spy during (b) and (c): PREFIX-b.txt and "
        "PREFIX-c.txt, collapsed stacks (pip install py-spy)",
    )
    parser.add_argument("--only", choices=("a", "b", "c"), action="append", help="these parts")
    args = parser.parse_args()
    only = set(args.only or ("a", "b", "c"))
    per_team = max(1, min(100, -(-args.users // args.teams)))
    with tempfile.TemporaryDirectory(prefix="citadel-bench-graphql-") as tmp:
        db = Path(tmp) / "citadel.db"
        took = seed(db, args.teams, args.users, args.events)
        print(
            f"data set: {args.teams} teams, {args.users} users, {args.events} ledger events "
            f"(seeded in {took:.1f} s, SQLite)"
        )
        stream = f"citadel:{{usage}}:bench-graphql:{uuid.uuid4().hex}"
        closed = free_port()
        plain = Path(tmp) / "plain.yaml"
        plain.write_text(
            CONFIG.format(db=db, limiter="memory://", stream=stream, endpoints="", closed=closed)
        )
        live = Path(tmp) / "live.yaml"
        live.write_text(
            CONFIG.format(
                db=db,
                limiter="memory://",
                stream=stream,
                endpoints=f'endpoints: {{redis: "{args.redis}"}}',
                closed=closed,
            )
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            gql, gql_port = start(live, "graphql-api", args.redis)
            procs.append(gql)
            routing, routing_port = start(live, "routing-api", args.redis)
            procs.append(routing)
            limits, limits_port = start(plain, "rate-limiting-api", "")
            procs.append(limits)
            metrics, metrics_port = start(plain, "custom-metrics", "")
            procs.append(metrics)
            if "a" in only:
                compare(
                    "(a) models and their deployments' state",
                    graphql_call(gql_port, MODELS),
                    rest_calls([(routing_port, "/v1/deployments")]),
                    args.duration,
                )
            if "b" in only:
                with profiled(gql.pid, args.profile, "b"):
                    compare(
                        f"(b) teams -> users -> usage over 30 days ({args.teams} x {per_team})",
                        graphql_call(gql_port, NESTED % per_team),
                        rest_calls(
                            [
                                (limits_port, "/v1/teams"),
                                (limits_port, "/v1/users"),
                                (metrics_port, "/v1/usage?group_by=user"),
                            ]
                        ),
                        args.duration,
                    )
            if "c" in only and args.subscribers > 0:
                with profiled(gql.pid, args.profile, "c"):
                    asyncio.run(
                        fanout(gql_port, args.redis, stream, args.subscribers, args.fanout_events)
                    )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
