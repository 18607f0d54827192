"""Routing state shared through Redis, so that gateway replicas agree on breakers and drains.

Theory of operation
-------------------
Every replica routes with its own ``Router``; this module makes the routers agree on two facts,
through keys under one hash tag (``citadel:{routing}:...``, one Redis Cluster slot):

- *Drained deployments*: a set (``...:drained``) that operators change through the routing
  service. It is the truth while Redis answers: each sync sets the local drain flags from it.
- *Open breakers*: when a replica's breaker opens on its own (failure rate, consecutive failures,
  slow calls, a failed probe), it writes ``...:open:<deployment>`` naming itself, expiring when
  its back-off ends. A replica that sees a deployment open elsewhere while its own breaker is
  closed holds its breaker open too (``force_open``), and resets it when the entry is gone: by
  then the replica that opened it is probing the deployment, and reopens it, and republishes,
  if the probes fail. A breaker held open for another replica is never published (it would
  echo back and forth and never expire), and nor are its own entries read back.

Expiry is relative (``PX`` milliseconds), so replicas need no common clock: each converts its
own monotonic ``open_until`` to a duration when it publishes, and a duration back when it reads.

Each replica also pushes its router's snapshot (JSON, expiring after ``SNAPSHOT_TTL`` seconds)
for the routing service to show. A sync is one pipelined batch: the pending openings, the
snapshot, and one Lua script that reads the drained set and every deployment's open entry.

Redis away: ``sync`` raises ``StoreUnavailable``, ``SyncLoop`` logs it once per outage and keeps
trying; each replica routes alone on its own breakers and drain flags until Redis returns.
Breaker openings are queued (``on_transition`` is synchronous) in a small bounded queue, kept
across failed syncs and dropped once their back-off is over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from citadel.errors import StoreUnavailable
from citadel.routing.breaker import BreakerState, Event, Transition
from citadel.routing.router import DeploymentState, Router
from citadel.settings import Settings
from citadel.stores.endpoint import RedisStore, connect_redis, shared_redis_url
from citadel.stores.redis import Script

__all__ = [
    "SNAPSHOT_TTL",
    "Pulled",
    "RemoteOpen",
    "SharedRoutingState",
    "SyncLoop",
    "deployment_rows",
    "redis_url",
]

_log = logging.getLogger("citadel.routing.shared")

SNAPSHOT_TTL: Final = 10.0  # seconds a replica's snapshot outlives its last push
_REPLICAS_TTL: Final = 86_400  # seconds the index of replicas outlives the last push
_PENDING_MAX: Final = 256  # breaker openings waiting to be published
_TIMEOUT: Final = 0.5  # seconds for one Redis reply

# KEYS[1] the drained set, KEYS[2..] each deployment's open entry. Returns the drained names,
# then one {index, value, ttl in ms} per open entry (index 1 = KEYS[2]).
_PULL: Final = Script(
    """
local out = {redis.call('SMEMBERS', KEYS[1])}
for i = 2, #KEYS do
  local value = redis.call('GET', KEYS[i])
  if value then
    out[#out + 1] = {i - 1, value, redis.call('PTTL', KEYS[i])}
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class RemoteOpen:
    """A breaker some replica has open: who, and for how many more seconds."""

    replica: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Pulled:
    """What one pull read: the drained deployments and the breakers open somewhere."""

    drained: frozenset[str]
    open: dict[str, RemoteOpen]


def redis_url(settings: Settings) -> str | None:
    """The Redis of the shared state: ``endpoints.redis`` (host:port becomes redis://), else a
    Redis ``limits.backend`` (any topology); None when there is none (memory:// included)."""
    return shared_redis_url(settings.endpoints.redis, settings.limits.backend)


def deployment_rows(router: Router, now: float) -> list[dict[str, Any]]:
    """The router's snapshot with times that mean something outside this process: the
    monotonic ``breaker_open_until`` becomes the seconds left (``breaker_open_seconds``), and
    ``breaker_held_open`` says the breaker is held open until reset (for another replica)."""
    rows = router.snapshot(now)
    for row in rows:
        until = row.pop("breaker_open_until")
        held = until is not None and math.isinf(until)
        row["breaker_open_seconds"] = (
            None if until is None or held else round(max(0.0, until - now), 3)
        )
        row["breaker_held_open"] = held
    return rows


class SharedRoutingState:
    """This replica's view of the shared keys; see the module docstring."""

    def __init__(self, client: RedisStore, *, replica: str, prefix: str = "citadel") -> None:
        self.client = client
        self.replica = replica
        base = f"{prefix}:{{routing}}"
        self._drained_key = f"{base}:drained"
        self._open_prefix = f"{base}:open:"
        self._snapshot_prefix = f"{base}:snapshot:"
        self._replicas_key = f"{base}:replicas"
        self._pending: collections.deque[tuple[str, float]] = collections.deque(maxlen=_PENDING_MAX)
        self.wake = asyncio.Event()  # set when an opening waits to be published
        self.forced: dict[str, str] = {}  # deployments held open here for another replica

    @property
    def pending(self) -> int:
        """Breaker openings waiting to be published."""
        return len(self._pending)

    @classmethod
    def from_settings(cls, settings: Settings, *, replica: str) -> SharedRoutingState | None:
        """The shared state on the configured Redis, or None when no Redis is configured."""
        url = redis_url(settings)
        if url is None:
            return None
        return cls(connect_redis(url, timeout=_TIMEOUT), replica=replica)

    # -- the keys -------------------------------------------------------------------------------

    async def drain(self, name: str, drained: bool) -> None:
        """Drain a deployment on every replica (or put it back)."""
        await self.client.execute("SADD" if drained else "SREM", self._drained_key, name)

    async def publish_open(self, name: str, open_until: float, now: float) -> None:
        """Tell the others that this replica's breaker of ``name`` is open until ``open_until``
        (both on this replica's clock); nothing when that is already past."""
        seconds = open_until - now
        if not seconds > 0:
            return
        value = orjson.dumps({"replica": self.replica, "until": time.time() + seconds})
        ttl_ms = max(1, math.ceil(min(seconds, 86_400.0) * 1000))
        await self.client.execute("SET", self._open_prefix + name, value, "PX", ttl_ms)

    async def pull(self, names: Sequence[str]) -> Pulled:
        """The drained set and the open entries of ``names``, in one round trip."""
        keys = [self._drained_key, *(self._open_prefix + name for name in names)]
        reply = await self.client.evalsha(_PULL, keys, [])
        drained = frozenset(_text(member) for member in reply[0])
        opened: dict[str, RemoteOpen] = {}
        for index, value, ttl_ms in reply[1:]:
            try:
                replica = str(orjson.loads(value)["replica"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not ours to read; it expires by itself
            seconds = math.inf if ttl_ms < 0 else ttl_ms / 1000
            opened[names[index - 1]] = RemoteOpen(replica, seconds)
        return Pulled(drained, opened)

    async def push_snapshot(self, rows: list[dict[str, Any]]) -> None:
        """Publish this replica's deployment rows for ``SNAPSHOT_TTL`` seconds."""
        body = orjson.dumps({"at": time.time(), "rows": rows})
        ttl_ms = int(SNAPSHOT_TTL * 1000)
        await asyncio.gather(
            self.client.execute("SET", self._snapshot_prefix + self.replica, body, "PX", ttl_ms),
            self.client.execute("SADD", self._replicas_key, self.replica),
            self.client.execute("EXPIRE", self._replicas_key, _REPLICAS_TTL),
        )

    async def replicas(self) -> dict[str, list[dict[str, Any]]]:
        """Each live replica's latest rows, by replica name; forgets the replicas gone quiet."""
        names = sorted(_text(m) for m in await self.client.execute("SMEMBERS", self._replicas_key))
        if not names:
            return {}
        bodies = await self.client.execute("MGET", *(self._snapshot_prefix + n for n in names))
        found: dict[str, list[dict[str, Any]]] = {}
        gone = []
        for name, body in zip(names, bodies, strict=True):
            if body is None:
                gone.append(name)
            else:
                found[name] = orjson.loads(body)["rows"]
        if gone:
            await self.client.execute("SREM", self._replicas_key, *gone)
        return found

    async def ping(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- the router -----------------------------------------------------------------------------

    def on_transition(self, state: DeploymentState, transition: Transition) -> None:
        """The ``on_transition`` of a ``Router``: queue this replica's own breaker openings."""
        if transition.to_state is not BreakerState.OPEN or transition.event is Event.FORCE_OPEN:
            return
        open_until = state.breaker.snapshot(transition.at).open_until
        if open_until is not None and math.isfinite(open_until):
            self._pending.append((state.name, open_until))
            self.wake.set()

    async def sync(self, router: Router, now: float, *, push: bool = True) -> None:
        """Publish the pending openings and (with ``push``) this replica's snapshot, pull, and
        apply what was pulled to ``router``; ``StoreUnavailable`` when Redis is away."""
        pending = list(self._pending)
        self._pending.clear()
        names = list(router.states)
        jobs: list[Awaitable[object]] = [self.publish_open(n, u, now) for n, u in pending]
        if push:
            jobs.append(self.push_snapshot(deployment_rows(router, now)))
        jobs.append(self.pull(names))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # Kept for the next sync; those whose back-off ends first are dropped then.
                self._pending.extendleft(reversed(pending))
                raise result
        pulled = results[-1]
        assert isinstance(pulled, Pulled)
        self.apply(router, pulled, now)

    def apply(self, router: Router, pulled: Pulled, now: float) -> None:
        """Set ``router``'s drain flags and held breakers from what was pulled."""
        for name, state in router.states.items():
            drained = name in pulled.drained
            if state.drained != drained:
                router.drain(name, drained)
            remote = pulled.open.get(name)
            if remote is not None and remote.replica == self.replica:
                remote = None  # our own entry, outliving our back-off by the publishing delay
            breaker = state.breaker
            if remote is not None:
                if breaker.state is BreakerState.CLOSED:
                    _record(router, state, breaker.force_open(now))
                    self.forced[name] = remote.replica
            elif name in self.forced:
                del self.forced[name]
                snapshot = breaker.snapshot(now)
                if snapshot.state is BreakerState.OPEN and snapshot.open_until == math.inf:
                    _record(router, state, breaker.reset(now))


def _record(router: Router, state: DeploymentState, transition: Transition | None) -> None:
    # The router counts every transition and sets the breaker-state gauge in one place; a
    # transition made here goes through it too, so the metrics show held breakers.
    if transition is not None:
        router._record_transition(state, transition)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SyncLoop:
    """Runs ``shared.sync(router, now)`` every ``interval`` seconds, and at once when a breaker
    opens, until stopped; one warning per outage of Redis, one line when it is back."""

    def __init__(
        self,
        shared: SharedRoutingState,
        router: Router,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        push: bool = True,
    ) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval={interval!r}: expected a finite number > 0")
        self.shared = shared
        self.router = router
        self.interval = interval
        self.clock = clock
        self.push = push
        self.available: bool | None = None  # None until the first sync ended
        self.last_error = ""
        self.last_sync: float | None = None  # on ``clock``
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> None:
        """One sync; an error is logged once per streak of failures, never raised."""
        try:
            await self.shared.sync(self.router, self.clock(), push=self.push)
        except Exception as exc:  # a bug must not stop the loop any more than an outage
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.available is not False:
                if isinstance(exc, StoreUnavailable):
                    _log.warning(
                        "shared routing state unavailable; this replica routes alone",
                        extra={"detail": exc.detail, "replica": self.shared.replica},
                    )
                else:
                    _log.exception("shared routing state sync failed")
            self.available = False
            return
        if self.available is False:
            _log.info("shared routing state is back", extra={"replica": self.shared.replica})
        self.available = True
        self.last_error = ""
        self.last_sync = self.clock()

    async def run(self) -> None:
        # An Event belongs to the event loop that first waits on it: one per run.
        wake = self.shared.wake = asyncio.Event()
        if self.shared.pending:
            wake.set()
        while True:
            wake.clear()  # an opening queued during the step sets it again
            await self.step()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await wake.wait()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
