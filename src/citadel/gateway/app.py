"""Wiring of the gateway service (:8000): ``create_app(settings, deps)``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass, field
from functools import partial

import orjson

from citadel.accounts.auth import AdminKeyAuthenticator, Authenticator, KeyAuthenticator
from citadel.accounts.store import AccountStore
from citadel.errors import StoreUnavailable
from citadel.feed import Feed
from citadel.feed.open import shared_feed
from citadel.feed.publisher import Publisher
from citadel.gateway.document import openapi_document
from citadel.gateway.proxy import MODELS_PREFIX, SERVES, Gateway
from citadel.gateway.responses import (
    RESPONSES_PATH,
    MemoryResponseStore,
    RedisResponseStore,
    ResponsesApi,
    ResponseStore,
)
from citadel.gateway.upstream import UPSTREAM_PATHS
from citadel.http.client import HttpClient
from citadel.http.edge import CorsPolicy, OpenAiEdge
from citadel.http.server import Request, Response
from citadel.limits.decision import Limiter
from citadel.metering.events import UsageSink
from citadel.metering.sinks import RedisStreamSink, SqlLedgerSink
from citadel.metrics import Registry
from citadel.routing.health import HealthProber
from citadel.routing.load import LoadReporter
from citadel.routing.router import Router
from citadel.routing.shared import SharedRoutingState, SyncLoop
from citadel.service import App, DependencyHealth, service_app
from citadel.settings import Settings

_LAST_USED_FLUSH_SECONDS = 10.0


@dataclass(slots=True, kw_only=True)
class GatewayDeps:
    """What the gateway talks to; built by ``default_deps`` or by a test."""

    client: HttpClient
    authenticator: Authenticator
    registry: Registry = field(default_factory=Registry)
    usage: UsageSink | None = None
    limiter: Limiter | None = None
    accounts: AccountStore | None = None
    # The event feed the router publishes deployment changes to (None: nobody reads them).
    feed: Feed | None = None


def default_deps(settings: Settings) -> GatewayDeps:
    """Production wiring: pooled upstream client, API keys from the accounts store, the limiter.

    Called inside each worker process; the store and the limiter connect lazily, on first use.
    """
    from citadel.accounts.sql import open_store_lazily
    from citadel.limits.backend import create_limiter

    registry = Registry()
    accounts = open_store_lazily(settings.accounts.database)
    usage = usage_sink(settings)
    limiter = create_limiter(
        settings.limits.backend,
        timezone=settings.limits.timezone,
        lease_ttl=settings.limits.lease_ttl_seconds,
        timeout=settings.limits.store_timeout_seconds,
    )
    return GatewayDeps(
        client=HttpClient(
            max_connections_per_origin=settings.gateway.max_connections_per_deployment
        ),
        authenticator=KeyAuthenticator(
            accounts,
            admin_key=settings.gateway.admin_key,
            tiers={t.name: t for t in settings.tiers},
            default_tier=settings.accounts.default_tier,
            ttl=settings.accounts.key_cache_ttl_seconds,
            registry=registry,
            cache_size=settings.accounts.key_cache_size,
            accept_legacy=settings.accounts.accept_legacy_keys,
        ),
        registry=registry,
        limiter=limiter,
        accounts=accounts,
        usage=usage,
        feed=shared_feed(settings),
    )


def usage_sink(settings: Settings) -> RedisStreamSink | SqlLedgerSink:
    """Usage events to the Redis Stream the ledger writer drains when Redis is configured (with a
    spool file for outages); otherwise straight into the SQL ledger (the embedded default)."""
    from citadel.metering.journal import Journal
    from citadel.metering.sinks import RedisStreamSink, SqlLedgerSink
    from citadel.metering.spool import Spool
    from citadel.routing.shared import redis_url
    from citadel.stores.endpoint import connect_redis
    from citadel.stores.sql import build_engine

    metering = settings.metering
    journal = (
        Journal(metering.journal_path, fsync_on_rotate=metering.journal_fsync)
        if metering.journal
        else None
    )
    url = redis_url(settings)
    if url is not None:
        return RedisStreamSink(
            connect_redis(url, timeout=settings.limits.store_timeout_seconds * 4),
            stream=metering.stream,
            flush_seconds=metering.flush_seconds,
            batch_size=metering.batch_size,
            spool=Spool(metering.spool_path),
            journal=journal,
            owns_store=True,  # closed at shutdown, with the sink (create_app: usage.aclose)
        )
    database = metering.database or settings.accounts.database
    return SqlLedgerSink(
        build_engine(database),
        flush_seconds=metering.flush_seconds,
        batch_size=metering.batch_size,
        migrate=database.startswith("sqlite"),
        journal=journal,
        owns_store=True,  # disposed of at shutdown, with the sink (create_app: usage.aclose)
    )


def response_store(settings: Settings) -> ResponseStore:
    """Stored Responses API responses: in Redis when the gateway has one (every worker and replica
    sees them), else in this process's memory."""
    from citadel.routing.shared import redis_url
    from citadel.stores.endpoint import connect_redis

    url = redis_url(settings)
    if url is None:
        return MemoryResponseStore()
    return RedisResponseStore(connect_redis(url, timeout=settings.limits.store_timeout_seconds * 4))


def admin_only_deps(settings: Settings) -> GatewayDeps:
    """No accounts, no limits: only the admin key (for tests and benchmarks of the bare path)."""
    return GatewayDeps(
        client=HttpClient(
            max_connections_per_origin=settings.gateway.max_connections_per_deployment
        ),
        authenticator=AdminKeyAuthenticator(settings.gateway.admin_key),
    )


def create_app(settings: Settings, deps: GatewayDeps) -> App:
    """The gateway: the four OpenAI endpoints, /health and /metrics."""
    app = service_app("gateway", settings, deps.registry)
    app.edge = OpenAiEdge(CorsPolicy(settings.gateway.cors_origins))
    replica = f"gateway@{socket.gethostname()}:{os.getpid()}"
    shared = SharedRoutingState.from_settings(settings, replica=replica)
    publisher = None
    if deps.feed is not None:  # deployment changes to the event feed's ``deployments`` topic
        publisher = Publisher(deps.feed, source=replica)
        app.on_startup(publisher.start)
        app.on_shutdown(deps.feed.aclose)
        app.on_shutdown(publisher.aclose)
    router = Router(
        settings,
        registry=deps.registry,
        on_transition=shared.on_transition if shared is not None else None,
        events=publisher.sink("deployments") if publisher is not None else None,
    )
    if publisher is not None:  # and its load, sampled (citadel.routing.load)
        load = LoadReporter(router)
        app.on_startup(load.start)
        app.on_shutdown(load.stop)
    if shared is not None:  # replicas agree on open breakers and drained deployments
        sync = SyncLoop(shared, router)
        app.on_startup(sync.start)
        app.on_shutdown(shared.aclose)
        app.on_shutdown(sync.stop)
    gateway = Gateway(
        settings,
        client=deps.client,
        authenticator=deps.authenticator,
        registry=deps.registry,
        usage=deps.usage,
        limiter=deps.limiter,
        router=router,
    )
    prober = HealthProber(settings, deps.client, router.set_health)
    app.on_startup(prober.start)
    app.on_shutdown(prober.stop)
    for endpoint, path in UPSTREAM_PATHS.items():
        app.route("POST", path, partial(gateway.forward, endpoint))
    app.route("GET", "/v1/models", gateway.list_models)
    responses = ResponsesApi(gateway, response_store(settings))
    app.on_shutdown(responses.aclose)
    app.route("POST", RESPONSES_PATH, responses.create)
    app.route_prefix("GET", RESPONSES_PATH + "/", responses.retrieve)
    app.route_prefix("DELETE", RESPONSES_PATH + "/", responses.delete)
    app.route_prefix("GET", MODELS_PREFIX, gateway.retrieve_model)
    document = orjson.dumps(
        openapi_document(
            {
                endpoint: tuple(m.name for m in settings.models if endpoint in SERVES[m.kind])
                for endpoint in UPSTREAM_PATHS
            }
        )
    )

    async def openapi_json(request: Request) -> Response:
        return Response(200, document)

    app.route("GET", "/openapi.json", openapi_json)

    async def models_configured() -> DependencyHealth:
        if not settings.models:
            return DependencyHealth("down", "no model is configured", critical=True)
        count = sum(len(m.deployments) for m in settings.models)
        return DependencyHealth("ok", f"{len(settings.models)} models, {count} deployments")

    app.health_check("models", models_configured)
    fail_closed = settings.limits.failure_mode == "closed"
    limiter = deps.limiter
    if limiter is not None:

        async def limiter_health() -> DependencyHealth:
            try:
                await limiter.ping()
            except StoreUnavailable as exc:
                mode = "failing closed" if fail_closed else "failing open"
                return DependencyHealth("down", f"{exc} ({mode})", critical=fail_closed)
            return DependencyHealth("ok", settings.limits.backend.split("@")[-1])

        app.health_check("limiter", limiter_health)
        app.on_shutdown(limiter.aclose)
    accounts = deps.accounts
    if accounts is not None:

        async def accounts_health() -> DependencyHealth:
            try:
                await accounts.ping()
            except StoreUnavailable as exc:
                return DependencyHealth("down", f"{exc} (known keys keep working from cache)")
            return DependencyHealth("ok", settings.accounts.database.split("://")[0])

        app.health_check("accounts", accounts_health)
        app.on_shutdown(accounts.aclose)
        database = settings.accounts.database
        if database.startswith("sqlite"):  # the embedded default migrates itself

            async def migrate_sqlite() -> None:
                from citadel.accounts.migrate import ACCOUNTS

                await ACCOUNTS.upgrade(database)

            app.on_startup(migrate_sqlite)
    authenticator = deps.authenticator
    if isinstance(authenticator, KeyAuthenticator):
        flusher: list[asyncio.Task[None]] = []

        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(_LAST_USED_FLUSH_SECONDS)
                await authenticator.flush_last_used()

        async def start_flusher() -> None:
            flusher.append(asyncio.get_running_loop().create_task(flush_forever()))

        async def stop_flusher() -> None:
            for task in flusher:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await authenticator.flush_last_used()

        app.on_startup(start_flusher)
        app.on_shutdown(stop_flusher)
    usage = deps.usage
    if isinstance(usage, RedisStreamSink | SqlLedgerSink):
        app.on_startup(usage.start)
        app.on_shutdown(usage.aclose)

        async def ledger_health() -> DependencyHealth:
            stats = usage.stats()
            detail = (
                f"{stats.pending} pending, {stats.spooled} spooled, {stats.sent} sent, "
                f"{stats.failures} failures, {stats.dropped} dropped"
            )
            backlog = stats.pending > 10 * settings.metering.batch_size  # ten batches behind
            troubled = stats.spooled or stats.dropped or backlog
            return DependencyHealth("degraded" if troubled else "ok", detail)

        app.health_check("usage", ledger_health)
    app.on_shutdown(gateway.drain)
    app.on_shutdown(deps.client.aclose)
    return app
