"""Redis down: calls fail fast with StoreUnavailable, and the same client recovers by itself.

The restart tests run a redis-server of their own on a free port, so killing it harms no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from citadel.errors import StoreUnavailable
from citadel.limits.decision import Limits
from citadel.limits.redis import RedisLimiter
from citadel.stores.redis import RedisClient

from support import free_port

NOW = 1_800_000_000.0
LIMITS = Limits(requests_per_minute=1000, concurrent_requests=100)

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


class RedisServer:
    """A redis-server child process on one port, which the test can kill and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _answers(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis = RedisServer(free_port())
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()


async def admit(limiter: RedisLimiter) -> bool:
    decision = await limiter.admit(
        "outage", LIMITS, lease_id=uuid.uuid4().hex, tokens=1, cost_micros=0, now=NOW
    )
    return decision.allowed


def test_no_redis_is_store_unavailable_within_the_timeout() -> None:
    """With nothing listening, every call raises StoreUnavailable at once, not after a hang."""

    async def main() -> float:
        limiter = RedisLimiter(RedisClient("127.0.0.1", free_port(), timeout=0.2), "UTC", 600)
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="cannot connect"):
                await admit(limiter)
        with pytest.raises(StoreUnavailable):
            await limiter.ping()
        await limiter.aclose()
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.8


def test_the_same_client_recovers_when_redis_returns(server: RedisServer) -> None:
    """Killed: calls raise StoreUnavailable; restarted on the same port: the same client works,
    reloading its scripts into the new server."""

    async def main() -> None:
        limiter = RedisLimiter(RedisClient("127.0.0.1", server.port, timeout=0.5), "UTC", 600)
        try:
            assert await admit(limiter)
            server.kill()
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await admit(limiter)
                assert time.monotonic() - started < 0.6
            server.start()
            assert await admit(limiter)
            await limiter.ping()
        finally:
            await limiter.aclose()

    asyncio.run(main())


def test_a_restart_during_a_run_fails_calls_cleanly_and_the_run_recovers(
    server: RedisServer,
) -> None:
    """Under steady load, a Redis restart turns calls into StoreUnavailable, never another error
    or a hang, and calls are answered again once it is back."""

    async def main() -> tuple[int, int, int]:
        limiter = RedisLimiter(RedisClient("127.0.0.1", server.port, timeout=0.5), "UTC", 600)
        outcomes = {"answered": 0, "unavailable": 0, "after": 0}
        restarted = asyncio.Event()

        async def worker() -> None:
            while not restarted.is_set() or outcomes["after"] < 20:
                try:
                    await admit(limiter)
                except StoreUnavailable:
                    outcomes["unavailable"] += 1
                    await asyncio.sleep(0.01)
                else:
                    outcomes["answered"] += 1
                    if restarted.is_set():
                        outcomes["after"] += 1

        async def operator() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.start)
            restarted.set()

        try:
            async with asyncio.timeout(20):
                await asyncio.gather(operator(), *(worker() for _ in range(8)))
        finally:
            await limiter.aclose()
        return outcomes["answered"], outcomes["unavailable"], outcomes["after"]

    answered, unavailable, after = asyncio.run(main())
    assert answered > 20
    assert unavailable > 0
    assert after >= 20


def test_an_error_reply_is_store_unavailable() -> None:
    """A Redis that answers with errors (here LOADING, as after a restart) leaves the limits
    undecided: the limiter raises StoreUnavailable with the server's message."""

    async def main() -> str:
        writers: list[asyncio.StreamWriter] = []

        async def loading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            while await reader.read(65536):
                writer.write(b"-LOADING Redis is loading the dataset in memory\r\n")

        server = await asyncio.start_server(loading, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        limiter = RedisLimiter(RedisClient("127.0.0.1", port, timeout=1.0), "UTC", 600)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await admit(limiter)
            return str(caught.value)
        finally:
            await limiter.aclose()
            for writer in writers:
                writer.close()
            server.close()
            await server.wait_closed()

    assert "redis is unavailable: admit failed: LOADING" in asyncio.run(main())
