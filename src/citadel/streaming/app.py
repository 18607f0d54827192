"""Wiring of the streaming service: the gateway in-process, the feed, the Litestar app."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from importlib import resources

from litestar import Litestar, Response, get

from citadel.errors import StoreUnavailable, Unavailable
from citadel.feed import Feed
from citadel.feed.memory import MemoryFeed
from citadel.feed.open import USAGE, open_feed
from citadel.feed.publisher import Publisher
from citadel.gateway.app import GatewayDeps
from citadel.gateway.proxy import Gateway
from citadel.metering.events import UsageEvent, UsageSink
from citadel.metering.ledger import encode_event
from citadel.metrics import Registry
from citadel.routing.load import LoadReporter
from citadel.routing.router import Router
from citadel.settings import Settings
from citadel.streaming.api import StreamingApi, handlers
from citadel.streaming.digest import MetricsDigest
from citadel.web import create_service
from citadel.web.cors import cors_middleware

__all__ = ["StreamingDeps", "create_app", "default_deps"]


class FeedTee:
    """A usage sink that also publishes each event to a memory feed (no Redis: the feed is
    this process's, and the events of its own requests are the ones it can show)."""

    def __init__(self, sink: UsageSink | None, feed: MemoryFeed) -> None:
        self._sink = sink
        self._feed = feed

    def emit(self, event: UsageEvent) -> None:
        if self._sink is not None:
            self._sink.emit(event)
        self._feed.publish_nowait(USAGE, encode_event(event))


@dataclass(slots=True, kw_only=True)
class StreamingDeps:
    gateway: GatewayDeps
    feed: Feed
    registry: Registry = field(default_factory=Registry)


def default_deps(settings: Settings) -> StreamingDeps:
    from citadel.gateway.app import default_deps as gateway_deps

    gateway = gateway_deps(settings)
    feed = open_feed(settings)
    if isinstance(feed, MemoryFeed):
        gateway.usage = FeedTee(gateway.usage, feed)
    return StreamingDeps(gateway=gateway, feed=feed, registry=gateway.registry)


@get("/demo", summary="A demo page: chat over WebSocket, live events", media_type="text/html")
async def demo() -> Response[bytes]:
    """Behind the admin key; the page asks for a key of its own to chat and subscribe with."""
    page = resources.files("citadel.streaming").joinpath("assets", "demo.html").read_bytes()
    return Response(page, media_type="text/html", headers={"cache-control": "no-store"})


def create_app(settings: Settings, deps: StreamingDeps) -> Litestar:
    g = deps.gateway
    source = f"streaming-api@{socket.gethostname()}:{os.getpid()}"
    publisher = Publisher(deps.feed, source=source)
    router = Router(settings, registry=deps.registry, events=publisher.sink("deployments"))
    gateway = Gateway(
        settings,
        client=g.client,
        authenticator=g.authenticator,
        registry=deps.registry,
        usage=g.usage,
        limiter=g.limiter,
        router=router,
    )
    load = LoadReporter(router)
    api = StreamingApi(gateway, g.authenticator, deps.feed, deps.registry)
    metrics = MetricsDigest(deps.feed, owner=source)
    starts = [getattr(g.usage, "start", None), publisher.start, metrics.start, load.start]
    grace = settings.gateway.shutdown_grace_seconds

    async def finish_generations() -> None:
        await api.generations.aclose(grace)

    closes = [
        getattr(g.usage, "aclose", None),
        g.client.aclose,
        deps.feed.aclose,
        finish_generations,
        load.stop,
        publisher.aclose,
        metrics.aclose,
        api.shutdown,
    ]
    return create_service(
        "streaming-api",
        title="Citadel streaming",
        description="Model output over WebSocket and SSE; live events with resume.",
        settings=settings,
        registry=deps.registry,
        public=handlers(api),
        admin=[demo],
        errors={StoreUnavailable: lambda exc: Unavailable(str(exc))},
        on_startup=[s for s in starts if s is not None],
        on_shutdown=[c for c in closes if c is not None],
        middleware=[cors_middleware(settings.gateway.cors_origins)],
    )
