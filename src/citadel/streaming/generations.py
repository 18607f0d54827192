"""Resumable generations: ``POST /v1/chat/completions`` with ``stream: true`` here runs the
completion in a task of its own that writes each SSE event to a feed topic of its own
(``gen.<id>``), so a client that lost its connection reconnects to ``GET /v1/streams/<id>``
(on any replica) with ``Last-Event-ID`` and receives the rest.

The first connection gets each event straight from the task (after it is in the feed, so the
``id:`` it carries is a position a resume can use); it does not wait for the feed's tail. The
generation runs to its end when that client goes away: it is kept ``RETENTION`` seconds after it
ends (the topic expires), and at most ``LIFETIME`` seconds in all. Its first entry names the key
that started it: only that key (or the admin key) may attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any, Final

import orjson

from citadel.accounts.auth import Principal
from citadel.errors import NotFound
from citadel.feed import Feed, Lagged
from citadel.streaming.relay import close_body, sse_data

__all__ = ["DONE", "LIFETIME", "RETENTION", "Generations", "topic_of"]

_log = logging.getLogger("citadel.streaming")

RETENTION: Final = 300.0  # seconds a finished generation stays resumable
LIFETIME: Final = 3600.0  # seconds a generation's topic lives at most (a replica died mid-way)
IDLE: Final = 60.0  # seconds an attached reader waits for the next event before giving up
DONE: Final = b"[DONE]"
_ID: Final = re.compile(r"^gen_[0-9a-f]{32}$")
_QUEUE: Final = 1000
_END: Final = (None, DONE)


def topic_of(stream_id: str) -> str:
    return f"gen.{stream_id}"


def sse_event(position: str | None, data: bytes) -> bytes:
    if position is None:
        return b"data: %s\n\n" % data
    return b"id: %s\ndata: %s\n\n" % (position.encode(), data)


def _failure(message: str, code: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return orjson.dumps({"error": error})


class Generations:
    """The generations this process runs, and attaching to any generation in the feed."""

    def __init__(self, feed: Feed, *, retention: float = RETENTION) -> None:
        self.feed = feed
        self.retention = retention
        self._running: set[asyncio.Task[None]] = set()

    def running(self) -> int:
        return len(self._running)

    async def start(
        self, owner: str, body: AsyncIterator[bytes]
    ) -> tuple[str, AsyncIterator[bytes]]:
        """Run the SSE ``body`` into a new generation; its id and the first reader's events."""
        stream_id = "gen_" + os.urandom(16).hex()
        topic = topic_of(stream_id)
        await self.feed.publish(topic, orjson.dumps({"owner": owner}))
        await self.feed.expire(topic, LIFETIME)
        first: asyncio.Queue[tuple[str | None, bytes]] = asyncio.Queue()
        task = asyncio.create_task(self._pump(topic, body, first), name=f"generation {stream_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return stream_id, self._first(first)

    async def _pump(
        self,
        topic: str,
        body: AsyncIterator[bytes],
        first: asyncio.Queue[tuple[str | None, bytes]],
    ) -> None:
        ended = False
        try:
            async for data in sse_data(body):
                position = await self.feed.publish(topic, data)
                first.put_nowait((position, data))
                ended = ended or data == DONE
            # read to the body's end, not just to [DONE]: the gateway then records the request
            # as served (200); closed early, it would count the client as gone (499)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("generation %s failed: %s", topic, exc)
        finally:
            if not ended:
                with contextlib.suppress(Exception):
                    failure = _failure("The generation stopped before its end.", "stream_broken")
                    first.put_nowait((await self.feed.publish(topic, failure), failure))
                    first.put_nowait((await self.feed.publish(topic, DONE), DONE))
            first.put_nowait(_END)
            with contextlib.suppress(Exception):
                await close_body(body)
            with contextlib.suppress(Exception):
                await self.feed.expire(topic, self.retention)

    @staticmethod
    async def _first(queue: asyncio.Queue[tuple[str | None, bytes]]) -> AsyncIterator[bytes]:
        while True:
            position, data = await queue.get()
            if position is None:
                return
            yield sse_event(position, data)
            if data == DONE:
                return

    async def attach(
        self, stream_id: str, principal: Principal, after: str | None
    ) -> AsyncIterator[bytes]:
        """The events of generation ``stream_id`` after ``after`` (None: from its start);
        NotFound when it is unknown, expired, or another key's."""
        topic = topic_of(stream_id) if _ID.match(stream_id) else None
        page = await self.feed.read(topic, "0-0", 1) if topic is not None else None
        owner: Any = None
        if page is not None and page.entries:
            with contextlib.suppress(orjson.JSONDecodeError):
                owner = orjson.loads(page.entries[0].data).get("owner")
        if (
            topic is None
            or owner is None
            or (principal.limits is not None and owner != principal.key_id)
        ):
            raise NotFound(
                f"No stream {stream_id[:48]!r}: unknown, another key's, or past its retention "
                f"({self.retention:g} s after it ended).",
                param="id",
            )
        assert page is not None
        return self._follow(topic, page.entries[0].position, after)

    async def _follow(self, topic: str, head: str, after: str | None) -> AsyncIterator[bytes]:
        position = after or head
        while True:
            async with self.feed.subscribe(topic, after=position, queue=_QUEUE) as sub:
                if not sub.recovered:
                    failure = _failure("Part of this stream is no longer kept.", "stream_trimmed")
                    yield sse_event(None, failure)
                while True:
                    try:
                        item = await asyncio.wait_for(anext(sub), IDLE)
                    except (TimeoutError, StopAsyncIteration):
                        failure = _failure(
                            f"The stream produced nothing for {IDLE:g} s.", "stream_stalled"
                        )
                        yield sse_event(None, failure)
                        yield sse_event(None, DONE)
                        return
                    if isinstance(item, Lagged):
                        break  # the log still holds them: read again from where this reader is
                    position = item.position
                    if position == head:
                        continue
                    yield sse_event(position, item.data)
                    if item.data == DONE:
                        return

    async def aclose(self, grace: float) -> None:
        """Let running generations finish within ``grace`` seconds, then cancel the rest."""
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
