"""Wiring of the GraphQL service (:9095): ``create_app(settings, deps)``.

One typed graph over the same stores the REST services read (``citadel.graphql.schema``), served
by Strawberry's Litestar integration on the shared base (``citadel.web.create_service``:
/health, /metrics, error bodies): ``POST /graphql`` and ``GET /graphql?query=...`` (queries only),
WebSocket subscriptions on ``/graphql`` (``graphql-transport-ws``, and the legacy ``graphql-ws``),
and the GraphiQL playground at ``GET /graphql`` for a browser, from files shipped in the package.

Access: the caller's API key, ``Authorization: Bearer <key>`` (over WebSocket: the header, or
``{"authorization": "Bearer <key>"}`` in ``connection_init``'s payload). The admin key sees
everything; a user's key its own user, team, keys and usage (``citadel.graphql.context``). No key,
or a wrong one: 401 over HTTP; over WebSocket the connection is closed with 4403. The playground
page needs the admin key: as a Bearer header, or as the password of HTTP Basic authentication,
which a browser asks for and then sends with the page's own queries.

The service runs a ``Router`` of its own over the gateways' settings with active health checks
and, when Redis is configured, the shared routing state (breakers opened by any replica, drains),
as the routing service does: ``models { deployments }`` is that live state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import orjson
from litestar import Litestar, Request, Response, WebSocket
from strawberry.exceptions import ConnectionRejectionError
from strawberry.litestar import make_graphql_controller
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from citadel.accounts.auth import ADMIN, Authenticator, KeyAuthenticator
from citadel.accounts.store import AccountStore
from citadel.errors import ApiError, StoreUnavailable, Unauthorized, Unavailable
from citadel.feed import Feed
from citadel.feed.publisher import Publisher
from citadel.gateway.proxy import Gateway
from citadel.graphql.alerting import AlertingView
from citadel.graphql.context import Context, Services, Viewer
from citadel.graphql.observe import GraphQLMetrics
from citadel.graphql.persisted import MemoryQueryStore, QueryStore, query_store
from citadel.graphql.playground import playground_handlers, playground_page
from citadel.graphql.protect import CostBudget
from citadel.graphql.schema import build_schema
from citadel.health import DependencyHealth, store_scheme
from citadel.http.client import HttpClient
from citadel.limits.decision import Limiter
from citadel.metering.analytics import Analytics
from citadel.metering.events import UsageSink
from citadel.metering.sinks import RedisStreamSink, SqlLedgerSink
from citadel.metrics import Registry
from citadel.routing.api import Routing
from citadel.routing.health import HealthProber
from citadel.routing.load import LoadReporter
from citadel.routing.router import Router
from citadel.routing.shared import SharedRoutingState, SyncLoop
from citadel.settings import Settings
from citadel.web import create_service

__all__ = ["GraphQLDeps", "create_app", "default_deps"]

Hook = Callable[[], Awaitable[None]]

PATH: Final = "/graphql"
GRAPHQL_RESPONSE: Final = "application/graphql-response+json"
_CHECK_TIMEOUT: Final = 1.5  # seconds; /health gives each check 2
_INIT_WAIT: Final = timedelta(seconds=5)  # a WebSocket must send connection_init by then


@dataclass(slots=True, kw_only=True)
class GraphQLDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    accounts: AccountStore
    analytics: Analytics
    limiter: Limiter
    feed: Feed
    client: HttpClient  # the router's health probes
    registry: Registry = field(default_factory=Registry)
    shared: SharedRoutingState | None = None
    limiter_is_shared: bool = True
    clock: Callable[[], float] = time.time
    startup: tuple[Hook, ...] = ()
    shutdown: tuple[Hook, ...] = ()
    max_depth: int | None = None  # None: graphql.max_depth
    max_cost: int | None = None  # None: graphql.max_cost
    cost_per_minute: int | None = None  # None: graphql.cost_per_minute (0: no budget)
    init_wait: timedelta = _INIT_WAIT
    persisted: QueryStore | None = None  # persisted queries (None: this process's memory)
    # chatCompletion's path: the usage sink to the ledger and the client to the deployments
    usage: UsageSink | None = None
    upstream: HttpClient | None = None


def default_deps(settings: Settings) -> GraphQLDeps:
    """Production wiring: the accounts and ledger databases (connected on first use), the
    limiter of ``limits.backend``, the live feed (Redis Streams, else memory) and, with Redis,
    the shared routing state. Embedded SQLite databases are created or upgraded at start."""
    from citadel.accounts.migrate import ACCOUNTS
    from citadel.accounts.sql import open_store_lazily
    from citadel.feed.open import open_feed
    from citadel.limits.backend import create_limiter
    from citadel.metering.app import ledger_uri
    from citadel.metering.migrate import LEDGER
    from citadel.stores.sql import build_engine

    accounts_uri = settings.accounts.database
    uri = ledger_uri(settings)
    engine = build_engine(uri)
    startup: list[Hook] = []
    if accounts_uri.startswith("sqlite"):

        async def upgrade_accounts() -> None:
            await ACCOUNTS.upgrade(accounts_uri)

        startup.append(upgrade_accounts)
    if uri.startswith("sqlite"):

        async def upgrade_ledger() -> None:
            await LEDGER.upgrade(uri)

        startup.append(upgrade_ledger)
    from citadel.gateway.app import usage_sink

    limits = settings.limits
    replica = f"graphql-api@{socket.gethostname()}:{os.getpid()}"
    return GraphQLDeps(
        accounts=open_store_lazily(accounts_uri),
        analytics=Analytics(engine),
        limiter=create_limiter(
            limits.backend,
            timezone=limits.timezone,
            lease_ttl=limits.lease_ttl_seconds,
            timeout=limits.store_timeout_seconds,
        ),
        feed=open_feed(settings),
        client=HttpClient(max_connections_per_origin=4),
        shared=SharedRoutingState.from_settings(settings, replica=replica),
        limiter_is_shared=not limits.backend.startswith("memory"),
        startup=tuple(startup),
        shutdown=(engine.dispose,),
        usage=usage_sink(settings),
        persisted=query_store(settings),
        upstream=HttpClient(
            max_connections_per_origin=settings.gateway.max_connections_per_deployment
        ),
    )


def _authorization(value: str | None) -> bytes | None:
    """The header as the gateway's authenticator takes it; HTTP Basic (the playground in a
    browser) becomes ``Bearer <password>``."""
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return value.encode("latin-1")
        return f"Bearer {decoded.partition(':')[2]}".encode()
    return value.encode("latin-1", "replace")


def _accepts_graphql_response(request: Request[Any, Any, Any]) -> bool:
    """Whether the client accepts the GraphQL-over-HTTP media type (``Accept``)."""
    return GRAPHQL_RESPONSE in request.headers.get("accept", "").lower()


def _as_graphql_response(result: Response[Any]) -> Response[Any]:
    """An answer as ``application/graphql-response+json``: a request error (nothing executed:
    no ``data``, and no error of a field) is a 4xx without ``data`` (429 for the cost budget,
    else 400), as the GraphQL-over-HTTP specification asks of that media type."""
    content = result.content
    if result.status_code != 200 or not isinstance(content, bytes | str):
        return result
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return result
    status = 200
    if isinstance(body, dict) and body.get("data") is None and body.get("errors"):
        errors = body["errors"]
        if all(isinstance(e, dict) and not e.get("path") for e in errors):
            body.pop("data", None)
            budget = any(
                (e.get("extensions") or {}).get("reason") == "query_cost_budget_exceeded"
                for e in errors
            )
            status = 429 if budget else 400
    headers = {
        k: v
        for k, v in result.headers.items()
        if k.lower() not in ("content-type", "content-length")
    }
    return Response(
        orjson.dumps(body), status_code=status, media_type=GRAPHQL_RESPONSE, headers=headers
    )


def _wants_playground(request: Request[Any, Any, Any]) -> bool:
    if request.method != "GET" or "query" in request.query_params:
        return False
    accept = request.headers.get("accept", "")
    return "text/html" in accept


def create_app(settings: Settings, deps: GraphQLDeps) -> Litestar:
    """The GraphQL service: /graphql (HTTP, WebSocket, playground), /health and /metrics."""
    # This service's router (chatCompletion's path, and its own health probes) publishes its
    # changes to the feed like every gateway's, so deploymentState sees them too.
    publisher = Publisher(deps.feed, source=f"graphql-api@{socket.gethostname()}:{os.getpid()}")
    router = Router(
        settings,
        registry=deps.registry,
        on_transition=deps.shared.on_transition if deps.shared is not None else None,
        events=publisher.sink("deployments"),
    )
    load = LoadReporter(router)
    loop = (
        None
        if deps.shared is None
        else SyncLoop(deps.shared, router, interval=1.0, clock=time.monotonic, push=False)
    )
    prober = HealthProber(settings, deps.client, router.set_health)
    services = Services(
        settings=settings,
        accounts=deps.accounts,
        analytics=deps.analytics,
        limiter=deps.limiter,
        router=router,
        feed=deps.feed,
        shared=deps.shared,
        limiter_is_shared=deps.limiter_is_shared,
        clock=deps.clock,
        alerting=AlertingView(
            settings, deps.analytics, http=deps.client, clock=deps.clock, accounts=deps.accounts
        ),
        routing=Routing(
            settings=settings, router=router, shared=deps.shared, loop=loop, clock=time.monotonic
        ),
    )
    authenticator: Authenticator = KeyAuthenticator(
        deps.accounts,
        admin_key=settings.gateway.admin_key,
        tiers={t.name: t for t in settings.tiers},
        default_tier=settings.accounts.default_tier,
        ttl=min(settings.accounts.key_cache_ttl_seconds, 5.0),
        registry=deps.registry,
        cache_size=settings.accounts.key_cache_size,
        accept_legacy=settings.accounts.accept_legacy_keys,
    )
    upstream = deps.upstream if deps.upstream is not None else HttpClient()
    services.gateway = Gateway(
        settings,
        client=upstream,
        authenticator=authenticator,
        registry=deps.registry,
        usage=deps.usage,
        limiter=deps.limiter,
        router=router,
    )
    protection = settings.graphql
    persisted = deps.persisted if deps.persisted is not None else MemoryQueryStore()
    per_minute = (
        protection.cost_per_minute if deps.cost_per_minute is None else deps.cost_per_minute
    )
    schema = build_schema(
        introspection=settings.env != "production",
        max_depth=protection.max_depth if deps.max_depth is None else deps.max_depth,
        max_cost=protection.max_cost if deps.max_cost is None else deps.max_cost,
        budget=None
        if per_minute <= 0
        else CostBudget(
            deps.limiter,
            per_minute,
            fail_closed=settings.limits.failure_mode == "closed",
            clock=deps.clock,
        ),
        persisted=persisted,
        metrics=GraphQLMetrics(deps.registry),
    )

    async def viewer_of(authorization: str | None) -> Viewer:
        return Viewer(await authenticator.authenticate(_authorization(authorization)))

    async def custom_context() -> dict[str, Any]:
        return {"citadel": None}

    base = make_graphql_controller(
        schema,
        path=PATH,
        graphql_ide=None,
        context_getter=custom_context,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL),
        connection_init_wait_timeout=deps.init_wait,
    )
    page = playground_page(PATH)

    class GraphQLController(base):  # type: ignore[misc, valid-type]
        opt = {"reads_own_query": True}  # noqa: RUF012 - GET's query, variables, operationName

        async def execute_request(
            self, request: Request[Any, Any, Any], context: Any, root_value: Any
        ) -> Response[Any]:
            authorization = request.headers.get("authorization")
            if _wants_playground(request):
                viewer = await _playground_viewer(viewer_of, authorization)
                if viewer is None:
                    return Response(
                        b"The GraphQL playground needs the admin key: sign in with any user "
                        b"name and the admin key as the password.\n",
                        status_code=401,
                        media_type="text/plain",
                        headers={"www-authenticate": 'Basic realm="Citadel GraphQL"'},
                    )
                return Response(page, media_type="text/html")
            context["citadel"] = Context(
                services, await viewer_of(authorization), _authorization(authorization)
            )
            result: Response[Any] = await super().execute_request(request, context, root_value)
            if _accepts_graphql_response(request):
                return _as_graphql_response(result)
            return result

        async def on_ws_connect(self, context: dict[str, Any]) -> dict[str, object] | None:
            params = context.get("connection_params") or {}
            given = params.get("authorization") or params.get("Authorization")
            socket_: WebSocket[Any, Any, Any] = context["socket"]
            authorization = given if isinstance(given, str) else None
            if authorization is None:
                authorization = socket_.headers.get("authorization")
            try:
                viewer = await viewer_of(authorization)
            except ApiError as exc:
                raise ConnectionRejectionError({"message": exc.message}) from exc
            context["citadel"] = Context(services, viewer, _authorization(authorization))
            return None

    async def accounts_health() -> DependencyHealth:
        return await _checked(deps.accounts.ping, store_scheme(settings.accounts.database))

    async def ledger_health() -> DependencyHealth:
        from citadel.metering.app import ledger_uri

        return await _checked(deps.analytics.ping, store_scheme(ledger_uri(settings)))

    async def limiter_health() -> DependencyHealth:
        await deps.limiter.ping()
        return DependencyHealth("ok", store_scheme(settings.limits.backend))

    async def schema_health() -> DependencyHealth:
        types = len(schema._schema.type_map)
        return DependencyHealth("ok", f"{types} types")

    starts: list[Hook] = [*deps.startup, publisher.start, prober.start, load.start]
    stops: list[Hook] = [
        prober.stop,
        load.stop,
        services.gateway.drain,
        upstream.aclose,
        deps.client.aclose,
        publisher.aclose,
        deps.feed.aclose,
        deps.accounts.aclose,
        deps.limiter.aclose,
        persisted.aclose,
        *deps.shutdown,
    ]
    usage = deps.usage
    if isinstance(usage, RedisStreamSink | SqlLedgerSink):
        starts.append(usage.start)
        stops.insert(2, usage.aclose)  # after the gateway's calls drained
    if deps.shared is not None and loop is not None:
        starts.append(loop.start)
        stops[:0] = [loop.stop, deps.shared.aclose]
    return create_service(
        "graphql-api",
        title="Citadel GraphQL",
        description="One typed graph over models, deployments, accounts, usage and costs; "
        "POST /graphql, subscriptions over WebSocket, GraphiQL at GET /graphql.",
        settings=settings,
        registry=deps.registry,
        public=[GraphQLController, *playground_handlers()],
        health={
            "schema": schema_health,
            "accounts": accounts_health,
            "ledger": ledger_health,
            "limiter": limiter_health,
        },
        errors={StoreUnavailable: lambda exc: Unavailable(str(exc))},
        on_startup=starts,
        on_shutdown=stops,
    )


async def _playground_viewer(
    viewer_of: Callable[[str | None], Awaitable[Viewer]], authorization: str | None
) -> Viewer | None:
    """The admin viewer of the playground page, else None (the page is the admin's only)."""
    try:
        viewer = await viewer_of(authorization)
    except Unauthorized:
        return None
    return viewer if viewer.principal is ADMIN else None


async def _checked(ping: Callable[[], Awaitable[None]], detail: str) -> DependencyHealth:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT):
            await ping()
    except StoreUnavailable as exc:
        return DependencyHealth("down", exc.detail, critical=True)
    except TimeoutError:
        return DependencyHealth("down", f"no answer within {_CHECK_TIMEOUT} s", critical=True)
    return DependencyHealth("ok", detail)
