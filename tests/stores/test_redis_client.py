"""The thin Redis client against the real Redis (logical DB 15, keys unique to each test)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from citadel.errors import ConfigError, StoreUnavailable
from citadel.stores.redis import RedisClient, RedisError, Script, _encode_bytes, encode_command

from support import free_port

REDIS_URL = "redis://127.0.0.1:6379/15"


def run(body: Callable[[RedisClient], Awaitable[Any]], *, timeout: float = 1.0) -> Any:
    async def main() -> Any:
        client = RedisClient.from_url(REDIS_URL, timeout=timeout)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def key(name: str) -> str:
    return f"test:client:{uuid.uuid4().hex}:{name}"


def test_encode_command_writes_resp_arrays_of_bulk_strings() -> None:
    """Every argument travels as a bulk string: bytes as is, text as UTF-8, numbers in decimal."""
    assert b"*4\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$2\r\n42\r\n$3\r\n0.5\r\n" == encode_command(
        ("SET", "é", 42, 0.5)
    )


def test_encode_command_ascii_fast_path_matches() -> None:
    """ASCII text and ints, the hot path, encode to the same RESP as the general path."""
    assert b"*3\r\n$6\r\nINCRBY\r\n$3\r\nk:1\r\n$2\r\n-5\r\n" == encode_command(
        ["INCRBY", "k:1", -5]
    )


def test_encode_command_hiredis_path_matches_the_python_path() -> None:
    """hiredis packs what the Python encoder would write, for every kind of argument; a
    bytearray (which hiredis does not take) still encodes, through the Python path."""
    samples: list[tuple[Any, ...]] = [
        ("EVALSHA", "0" * 40, 2, "citadel:{u:x}:rpm", "k:é", 2**70, -3, 0.1, 1e-07, b"\xff\x00"),
        ("SET", "k", 1 / 3),
        ("SET", "k", float("inf")),
    ]
    for args in samples:
        assert encode_command(args) == _encode_bytes(args)
        assert encode_command(list(args)) == _encode_bytes(args)
    assert (
        encode_command(("SET", "k", bytearray(b"ab")))
        == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nab\r\n"
    )


def test_encode_command_refuses_bools() -> None:
    """A bool is refused rather than sent as 'True'."""
    with pytest.raises(TypeError, match="bool"):
        encode_command(("SET", "k", True))


def test_a_thousand_concurrent_commands_get_their_own_replies_in_order() -> None:
    """Commands from concurrent callers are pipelined and each caller gets its own reply."""
    counter, echo = key("counter"), key("echo")

    async def body(client: RedisClient) -> tuple[list[Any], list[Any]]:
        incrs = await asyncio.gather(*(client.execute("INCR", counter) for _ in range(1000)))
        echoes = await asyncio.gather(*(client.execute("ECHO", f"{echo}{i}") for i in range(1000)))
        await client.execute("DEL", counter)
        return incrs, echoes

    incrs, echoes = run(body)
    assert list(range(1, 1001)) == incrs
    assert [f"{echo}{i}".encode() for i in range(1000)] == echoes


def test_a_pipeline_returns_every_reply_in_order_with_errors_in_place() -> None:
    """One write, many commands: the replies in order, an error reply returned where it fell,
    and the connection usable afterwards; a batch mixed with concurrent single calls too."""
    counter, text = key("counter"), key("text")

    async def body(client: RedisClient) -> tuple[list[Any], Any, Any]:
        await client.execute("SET", text, "not a number")
        commands: list[tuple[str, ...]] = [("INCR", counter)] * 600
        commands[300] = ("INCR", text)
        replies, single = await asyncio.gather(
            client.pipeline(commands), client.execute("ECHO", "between")
        )
        return replies, single, await client.execute("GET", counter)

    replies, single, final = run(body)
    assert list(range(1, 301)) == replies[:300]
    assert isinstance(replies[300], RedisError)
    assert list(range(301, 600)) == replies[301:]
    assert (b"between", b"599") == (single, final)


def test_a_pipeline_to_a_server_that_is_down_raises_store_unavailable() -> None:
    """No Redis: the pipeline fails as a whole, like a single call."""

    async def main() -> None:
        client = RedisClient("127.0.0.1", free_port(), timeout=0.2)
        try:
            with pytest.raises(StoreUnavailable):
                await client.pipeline([("PING",), ("PING",)])
        finally:
            await client.aclose()

    asyncio.run(main())


def test_replies_are_decoded_by_type() -> None:
    """Status, integer, bulk, nil and array replies come back as bytes, int, None and list."""
    name = key("types")

    async def body(client: RedisClient) -> list[Any]:
        replies = [
            await client.execute("SET", name, "v"),
            await client.execute("GET", name),
            await client.execute("GET", key("missing")),
            await client.execute("RPUSH", name + ":list", 1, 2),
            await client.execute("LRANGE", name + ":list", 0, -1),
        ]
        await client.execute("DEL", name, name + ":list")
        return replies

    assert [b"OK", b"v", None, 2, [b"1", b"2"]] == run(body)


def test_an_error_reply_raises_redis_error_and_the_connection_stays_usable() -> None:
    """A server error raises RedisError with the server's message; later calls still work."""
    name = key("text")

    async def body(client: RedisClient) -> list[str]:
        await client.execute("SET", name, "not a number")
        caught = []
        for command in (("INCR", name), ("NOSUCHCOMMAND",)):
            try:
                await client.execute(*command)
            except RedisError as exc:
                caught.append(str(exc))
        assert b"PONG" == await client.execute("PING")
        await client.execute("DEL", name)
        return caught

    incr_error, unknown_error = run(body)
    assert "ERR value is not an integer or out of range" == incr_error
    assert unknown_error.startswith("ERR unknown command")


def test_evalsha_loads_a_script_the_server_does_not_know() -> None:
    """NOSCRIPT is answered by one SCRIPT LOAD and a retry; the script is then known."""
    script = Script(f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1] + 1}}")
    name = key("script")

    async def body(client: RedisClient) -> tuple[Any, Any, Any]:
        before = await client.execute("SCRIPT", "EXISTS", script.sha)
        reply = await client.evalsha(script, [name], [41])
        after = await client.execute("SCRIPT", "EXISTS", script.sha)
        return before, reply, after

    before, reply, after = run(body)
    assert [0] == before
    assert [name.encode(), 42] == reply
    assert [1] == after


def test_a_script_error_raises_redis_error() -> None:
    """An error raised inside a script reaches the caller as RedisError."""
    script = Script("return redis.error_reply('BOOM said the script')")

    async def body(client: RedisClient) -> str:
        with pytest.raises(RedisError) as caught:
            await client.evalsha(script, [], [])
        return str(caught.value)

    assert "BOOM said the script" == run(body)


def test_a_reply_slower_than_the_timeout_raises_store_unavailable() -> None:
    """A blocked command fails with StoreUnavailable at about the timeout, then calls work again."""
    name = key("blocked")

    async def body(client: RedisClient) -> tuple[float, Any]:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no reply"):
            await client.execute("BLPOP", name, 2)
        elapsed = time.monotonic() - started
        return elapsed, await client.execute("PING")

    elapsed, pong = run(body, timeout=0.2)
    assert 0.15 < elapsed < 1.0
    assert b"PONG" == pong


def test_a_timeout_fails_every_pending_call() -> None:
    """The calls pipelined behind a late reply fail with it instead of hanging."""
    name = key("blocked")

    async def body(client: RedisClient) -> list[Any]:
        return await asyncio.gather(
            client.execute("BLPOP", name, 2),
            client.execute("PING"),
            client.execute("PING"),
            return_exceptions=True,
        )

    replies = run(body, timeout=0.2)
    assert [StoreUnavailable] * 3 == [type(reply) for reply in replies]


def test_a_server_that_never_answers_is_unavailable_within_the_timeout() -> None:
    """A peer that accepts the connection but stays silent counts as down after the timeout."""

    async def main() -> float:
        accepted: list[asyncio.StreamWriter] = []

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RedisClient("127.0.0.1", port, timeout=0.1)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable):
                await client.ping()
            return time.monotonic() - started
        finally:
            await client.aclose()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) < 0.5


def test_the_url_selects_the_database() -> None:
    """redis://host:port/15 talks to logical database 15."""
    name = key("db")

    async def body(client: RedisClient) -> tuple[Any, Any]:
        await client.execute("SET", name, "here")
        other = RedisClient.from_url("redis://127.0.0.1:6379/14", timeout=1.0)
        try:
            elsewhere = await other.execute("GET", name)
        finally:
            await other.aclose()
        here = await client.execute("GET", name)
        await client.execute("DEL", name)
        return here, elsewhere

    assert (b"here", None) == run(body)


def test_a_refused_password_is_store_unavailable() -> None:
    """A failed AUTH makes the store unavailable, with the server's reason."""

    async def main() -> str:
        client = RedisClient.from_url("redis://:wrong@127.0.0.1:6379/15", timeout=1.0)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await client.ping()
            return str(caught.value)
        finally:
            await client.aclose()

    assert "AUTH" in asyncio.run(main())


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis://", "redis://127.0.0.1:port", "redis://127.0.0.1/db"],
)
def test_a_bad_url_is_a_config_error(url: str) -> None:
    """A URL that is not redis://host[:port][/db] is refused when the client is made."""
    with pytest.raises(ConfigError, match="redis url"):
        RedisClient.from_url(url, timeout=1.0)


def test_a_closed_client_opens_a_new_connection_on_its_next_call() -> None:
    """aclose is not final: a later call, even under another event loop, connects again."""
    client = RedisClient.from_url(REDIS_URL, timeout=1.0)

    async def ping_and_close() -> Any:
        try:
            return await client.execute("PING")
        finally:
            await client.aclose()

    assert (b"PONG", b"PONG") == (asyncio.run(ping_and_close()), asyncio.run(ping_and_close()))


def test_the_client_runs_on_uvloop() -> None:
    """Under uvloop too, pipelined replies match their callers, errors raise, timeouts fire."""
    uvloop = pytest.importorskip("uvloop")
    counter, blocked = key("counter"), key("blocked")

    async def main() -> tuple[list[Any], type[Exception], type[Exception]]:
        client = RedisClient.from_url(REDIS_URL, timeout=0.2)
        try:
            incrs = await asyncio.gather(*(client.execute("INCR", counter) for _ in range(200)))
            errors = []
            for command in (("NOSUCHCOMMAND",), ("BLPOP", blocked, 2)):
                try:
                    await client.execute(*command)
                except Exception as exc:  # the type is what is checked
                    errors.append(type(exc))
            await client.execute("DEL", counter)
            return incrs, errors[0], errors[1]
        finally:
            await client.aclose()

    incrs, error, timeout = uvloop.run(main())
    assert list(range(1, 201)) == incrs
    assert (RedisError, StoreUnavailable) == (error, timeout)


def test_a_deferred_command_goes_with_the_next_command_or_after_its_delay() -> None:
    """A deferred command waits for the next one that is not, and is answered first (its place
    in the pipeline is kept); alone, it is sent once its delay has passed, not before."""
    counter = key("deferred")

    async def body(client: RedisClient) -> tuple[Any, Any, float, bool]:
        await client.execute("DEL", counter)
        later = asyncio.ensure_future(client.execute("INCR", counter, deferred=5.0))
        await asyncio.sleep(0)  # the INCR is queued
        # sent with this GET, ahead of it: the GET sees the INCR applied, long before 5 s
        seen = await client.execute("GET", counter)
        applied = await later
        started = time.perf_counter()
        alone = asyncio.ensure_future(client.execute("INCR", counter, deferred=0.05))
        await asyncio.sleep(0.02)
        early = alone.done()
        await alone
        return seen, applied, time.perf_counter() - started, early

    seen, applied, waited, early = run(body, timeout=2.0)
    assert seen == b"1"
    assert applied == 1
    assert not early
    assert waited >= 0.045
