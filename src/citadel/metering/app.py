"""Wiring of the custom-metrics service (:9091): ``create_app(settings, deps)``.

Business intelligence over the usage ledger, behind the admin key (``Authorization: Bearer``):
the analytics API of ``citadel.metering.api`` (usage, the largest users, teams or models,
budgets, each deployment's real cost per 1000 tokens, savings against a commercial API), in JSON
or CSV, its parameters and replies defined in ``citadel.metering.bodies``.

``/metrics`` adds the business metrics (``citadel_business_*``, ``citadel_ledger_*``), computed
from the rollups at most every ``metrics_ttl`` seconds by ``citadel.metering.business``, to the
service's own. ``/health`` reports the ledger database (critical), the accounts database, Redis
and the ledger writer's lag. When a ledger writer is given (Redis configured) the service runs it
in-process from start-up until the server has stopped taking requests
(``citadel.metering.writer_task``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from litestar import Litestar

from citadel.accounts.store import AccountStore
from citadel.errors import ApiError, BadRequest, StoreUnavailable, Unavailable
from citadel.health import DependencyHealth, HealthCheck, store_scheme
from citadel.metering.analytics import Analytics
from citadel.metering.api import CONTROLLERS, Reader, provide_reader
from citadel.metering.business import BusinessMetrics
from citadel.metering.ranges import QueryError
from citadel.metering.writer_task import CHECK_TIMEOUT, LedgerWriterLike, WriterTask, writer_lag
from citadel.metrics import Registry
from citadel.settings import Settings
from citadel.web import create_service

__all__ = ["LedgerWriterLike", "MeteringDeps", "create_app", "default_deps"]

Hook = Callable[[], Awaitable[None]]

_LAG_DEGRADED: Final = 100_000  # events waiting beyond which the writer is falling behind


class Pingable(Protocol):
    async def ping(self) -> None: ...


@dataclass(slots=True, kw_only=True)
class MeteringDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    analytics: Analytics
    accounts: AccountStore
    registry: Registry = field(default_factory=Registry)
    clock: Callable[[], float] = time.time  # Unix seconds
    writer: LedgerWriterLike | None = None  # run in-process when given
    redis: Pingable | None = None  # the usage stream's Redis, for /health
    metrics_ttl: float = 15.0  # seconds the business metrics are reused between scrapes
    startup: tuple[Hook, ...] = ()
    shutdown: tuple[Hook, ...] = ()


def ledger_uri(settings: Settings) -> str:
    return settings.metering.database or settings.accounts.database


def default_deps(settings: Settings) -> MeteringDeps:
    """Production wiring: the ledger and accounts databases, connected on first use, and a
    ledger writer draining the usage stream when Redis is configured. Embedded SQLite databases
    are created or upgraded at start; PostgreSQL ones by ``citadel migrate``."""
    import os
    import socket

    from citadel.accounts.migrate import ACCOUNTS
    from citadel.accounts.sql import open_store_lazily
    from citadel.errors import ConfigError
    from citadel.metering.migrate import LEDGER
    from citadel.metering.writer import LedgerWriter, redis_url
    from citadel.stores.endpoint import RedisStore, connect_redis
    from citadel.stores.sql import build_engine

    uri = ledger_uri(settings)
    engine = build_engine(uri)
    accounts_uri = settings.accounts.database
    startup: list[Hook] = []
    shutdown: list[Hook] = [engine.dispose]
    if accounts_uri.startswith("sqlite"):

        async def upgrade_accounts_db() -> None:
            await ACCOUNTS.upgrade(accounts_uri)

        startup.append(upgrade_accounts_db)
    if uri.startswith("sqlite"):

        async def upgrade_ledger_db() -> None:
            await LEDGER.upgrade(uri)

        startup.append(upgrade_ledger_db)
    redis: RedisStore | None = None
    writer: LedgerWriter | None = None
    try:
        url = redis_url(settings.endpoints.redis, settings.limits.backend)
    except ConfigError:  # no Redis: the gateway writes the ledger itself
        url = None
    if url is not None:
        metering = settings.metering
        redis = connect_redis(url, timeout=5.0)
        writer = LedgerWriter(
            redis,
            engine,
            stream=metering.stream,
            group=metering.group,
            consumer=f"{socket.gethostname()}-{os.getpid()}",
            batch_size=metering.batch_size,
            keep_seconds=metering.stream_keep_seconds,
        )
        shutdown.insert(0, redis.aclose)
    return MeteringDeps(
        analytics=Analytics(engine),
        accounts=open_store_lazily(accounts_uri),
        writer=writer,
        redis=redis,
        startup=tuple(startup),
        shutdown=tuple(shutdown),
    )


def _unavailable(exc: StoreUnavailable) -> ApiError:
    what = "The usage ledger" if exc.store == "sql" else exc.store
    return Unavailable(f"{what} is unavailable: {exc.detail}. Try again later.")


def create_app(settings: Settings, deps: MeteringDeps) -> Litestar:
    """The custom-metrics service: the analytics API, /docs, /openapi.json, /health, /metrics.

    Start-up runs ``deps.startup``, then the ledger writer; at shut-down (after the server has
    stopped taking requests) the writer stops first, finishing its batch, then the accounts store
    and the ``deps.shutdown`` hooks close, in the order given."""
    runner = None if deps.writer is None else WriterTask(deps.writer)
    business = BusinessMetrics(settings, deps)
    reader = Reader(settings, deps.analytics, deps.accounts, deps.clock)

    async def ledger_lag() -> dict[str, object]:
        return {"ledger_lag": await writer_lag(deps.writer)}

    on_startup = [*deps.startup]
    on_shutdown = [*reversed(deps.shutdown), deps.accounts.aclose]  # run last first
    if runner is not None:
        on_startup.append(runner.start)
        on_shutdown.append(runner.stop)
    return create_service(
        "custom-metrics",
        title="Citadel custom metrics",
        description="Usage, cost, budgets, real cost per deployment and savings against a "
        "commercial API, from the usage ledger. JSON, or CSV with `?format=csv`. Authenticate "
        "with the admin key.",
        settings=settings,
        registry=deps.registry,
        admin=CONTROLLERS,
        dependencies={"reader": provide_reader(reader)},
        health=_health_checks(settings, deps, runner),
        health_extra=ledger_lag,
        # first: it brings the writer's error count in the registry up to date
        metrics_extra=business.render,
        errors={
            QueryError: lambda exc: BadRequest(exc.message, param=exc.param),
            StoreUnavailable: _unavailable,
        },
        on_startup=on_startup,
        on_shutdown=on_shutdown,
    )


def _health_checks(
    settings: Settings, deps: MeteringDeps, runner: WriterTask | None
) -> dict[str, HealthCheck]:
    async def bounded(check: Pingable, uri: str, critical: bool) -> DependencyHealth:
        # Bounded here, within /health's own deadline, because only a check that answers can
        # say that it is critical.
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await check.ping()
        except StoreUnavailable as exc:
            return DependencyHealth("down", exc.detail, critical=critical)
        except TimeoutError:
            detail = f"no answer within {CHECK_TIMEOUT} s"
            return DependencyHealth("down", detail, critical=critical)
        return DependencyHealth("ok", store_scheme(uri))

    async def ledger() -> DependencyHealth:
        return await bounded(deps.analytics, ledger_uri(settings), critical=True)

    async def accounts() -> DependencyHealth:
        return await bounded(deps.accounts, settings.accounts.database, critical=False)

    async def redis() -> DependencyHealth:
        if deps.redis is None:
            return DependencyHealth(
                "disabled", "no Redis configured: the ledger is written directly"
            )
        return await bounded(deps.redis, "redis://", critical=False)

    async def writer() -> DependencyHealth:
        if runner is None:
            return DependencyHealth("disabled", "no ledger writer runs in this service")
        failure = runner.failure()
        if failure is not None:
            return DependencyHealth("down", f"the ledger writer stopped: {failure}")
        lag = await writer_lag(runner.writer)
        if lag is None:
            return DependencyHealth("degraded", "the writer's lag is unknown (Redis unreachable?)")
        detail = f"{lag} events waiting, {runner.writer.stats().failures} failed batches"
        return DependencyHealth("degraded" if lag > _LAG_DEGRADED else "ok", detail)

    return {"ledger": ledger, "accounts": accounts, "redis": redis, "ledger_writer": writer}
