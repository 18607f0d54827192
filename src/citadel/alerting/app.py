"""Wiring of the predictive-alerting service (:9092): ``create_app(settings, deps)``.

At start every PromQL rule is checked against Prometheus (a refused expression stops the service
with a ConfigError naming ``alerting.rules[i].query``; an unreachable Prometheus only delays the
check to each rule's first evaluation). Then the scheduler evaluates the rules every
``alerting.interval_seconds`` and the Alertmanager client delivers what fires and resolves.

Routes (``/v1/*`` take the admin key as ``Authorization: Bearer <key>``):

    GET  /health           status, dependencies, and each rule's models: trained at, points seen,
                           backtest error, last failure (no key)
    GET  /metrics          evaluations, their duration, model accuracy, alerts sent and dropped
    GET  /v1/rules         the definitions
    GET  /v1/forecasts     the latest evaluation of each forecast rule
    GET  /v1/anomalies     the latest evaluation of each anomaly rule
    GET  /v1/alerts        alerts firing now, and the delivery queue
    POST /v1/evaluate      evaluate every rule now; answers the evaluations
    GET  /openapi.json, /docs   the document and Swagger UI (``citadel.web``)

Handlers: ``api.py``; replies: ``bodies.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from litestar import Litestar

from citadel.accounts.store import AccountStore
from citadel.alerting.alertmanager import AlertBook, AlertmanagerClient, AlertmanagerError
from citadel.alerting.anomaly import default_detector
from citadel.alerting.api import CONTROLLERS, Alerting
from citadel.alerting.defaults import default_rules
from citadel.alerting.definitions import AlertingSettings, Rule, parse_alerting
from citadel.alerting.engine import (
    Detector,
    Evaluator,
    LedgerSource,
    PoolFitter,
    PrometheusSource,
    Scheduler,
    SeriesReader,
    Source,
    SourceUnavailable,
    SpendReader,
)
from citadel.alerting.prometheus import InvalidQuery, PrometheusClient, PrometheusError
from citadel.alerting.teams import resolve_teams
from citadel.errors import CitadelError, ConfigError
from citadel.feed import Feed
from citadel.feed.open import shared_feed
from citadel.feed.publisher import Publisher
from citadel.health import DependencyHealth, HealthCheck
from citadel.http.client import HttpClient
from citadel.metrics import Registry
from citadel.observability.names import default_slos
from citadel.settings import Settings
from citadel.web import create_service, provide

__all__ = ["AlertingDeps", "alerting_settings", "create_app", "default_deps", "validate_rules"]

_log = logging.getLogger("citadel.alerting")
_SHUTDOWN_FLUSH_SECONDS = 2.0
_SWITCH_SECONDS = 0.001  # the GIL's switch interval while the service runs (``_Service.start``)


@dataclass(slots=True, kw_only=True)
class AlertingDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    http: HttpClient = field(default_factory=HttpClient)
    prometheus: PrometheusClient | None = None
    alertmanager: AlertmanagerClient | None = None
    spend: SpendReader | None = None  # the usage ledger, for ledger rules
    ledger_metrics: SeriesReader | None = None  # the ledger's other metrics (per model, budgets)
    accounts: AccountStore | None = None  # resolves ledger rules' team names to ids at start
    detector_factory: Callable[[], Detector] | None = None
    registry: Registry = field(default_factory=Registry)
    clock: Callable[[], float] = time.time
    run_scheduler: bool = True  # False: rules are evaluated only by POST /v1/evaluate
    feed: Feed | None = None  # the event feed alerts are published to (None: nobody reads it)
    close: tuple[Callable[[], Awaitable[None]], ...] = ()


def default_detector_factory() -> Callable[[], Detector]:
    """The anomaly module's default detector (one fresh instance per series)."""
    return default_detector


class AnalyticsSpend:
    """A team's spend per hour of this month, from the metering analytics."""

    def __init__(self, analytics: Any, timezone: str) -> None:
        self._analytics = analytics
        self._timezone = timezone

    async def hourly_team_spend(self, team: str, *, now: float) -> list[tuple[float, int]]:
        from citadel.metering.ranges import month_range

        span = month_range(datetime.fromtimestamp(now, UTC), self._timezone)
        rows = await self._analytics.usage(
            span, group_by=("team",), bucket="hour", filters={"team": team}
        )
        by_hour = {row.bucket.timestamp(): int(row.cost_micros) for row in rows if row.bucket}
        start, end = span.start.timestamp(), min(span.end.timestamp(), now)
        hours: list[tuple[float, int]] = []
        hour = start
        while hour < end:  # hours without usage count as zero, so the series is regular
            hours.append((hour, by_hour.get(hour, 0)))
            hour += 3600.0
        return hours


def default_deps(settings: Settings) -> AlertingDeps:
    """Production wiring: Prometheus and Alertmanager from their endpoints, the usage ledger's
    analytics for ledger rules, and the anomaly module's default detector."""
    http = HttpClient(max_connections_per_origin=8)
    endpoints = settings.endpoints
    registry = Registry()
    prometheus = PrometheusClient(endpoints.prometheus, http) if endpoints.prometheus else None
    alertmanager = (
        AlertmanagerClient(endpoints.alertmanager, http, registry=registry)
        if endpoints.alertmanager
        else None
    )
    spend: SpendReader | None = None
    metrics: SeriesReader | None = None
    accounts: AccountStore | None = None
    close: list[Callable[[], Awaitable[None]]] = [http.aclose]
    rules = alerting_settings(settings).rules
    if any(rule.ledger is not None for rule in rules):
        from citadel.accounts.sql import open_store_lazily
        from citadel.alerting.ledger import LedgerMetrics
        from citadel.metering.analytics import Analytics
        from citadel.stores.sql import build_engine

        engine = build_engine(settings.metering.database or settings.accounts.database)
        spend = AnalyticsSpend(Analytics(engine), settings.limits.timezone)
        close.append(engine.dispose)
        accounts = open_store_lazily(settings.accounts.database)
        close.append(accounts.aclose)
        if any(rule.ledger is not None and rule.ledger.metric != "team_spend" for rule in rules):
            metrics = LedgerMetrics(engine, accounts, settings)
    return AlertingDeps(
        http=http,
        prometheus=prometheus,
        alertmanager=alertmanager,
        spend=spend,
        ledger_metrics=metrics,
        accounts=accounts,
        detector_factory=default_detector_factory(),
        registry=registry,
        close=tuple(close),
        feed=shared_feed(settings),
    )


def alerting_settings(settings: Settings) -> AlertingSettings:
    """The ``alerting:`` section with the default rules for the configured models' SLOs: over
    Prometheus when ``endpoints.prometheus`` is set, else over the usage ledger."""
    models = [model.name for model in settings.models]
    top = parse_alerting({**settings.alerting, "rules": [], "defaults": False})
    defaults = default_rules(
        default_slos(models),
        ledger=settings.endpoints.prometheus is None,
        interval_seconds=top.interval_seconds,
    )
    return parse_alerting(settings.alerting, defaults)


async def validate_rules(rules: tuple[Rule, ...], client: PrometheusClient) -> None:
    """Ask Prometheus to parse every rule's PromQL; ConfigError names the first it refuses.
    PrometheusError if Prometheus cannot answer."""
    for i, rule in enumerate(rules):
        if rule.query is None:
            continue
        try:
            await client.validate(rule.name, rule.query)
        except InvalidQuery as exc:
            raise ConfigError(
                f"alerting.rules[{i}].query",
                rule.query,
                f"PromQL that Prometheus accepts (Prometheus said: {exc.detail})",
            ) from exc


def create_app(settings: Settings, deps: AlertingDeps) -> Litestar:
    """The predictive-alerting service: its JSON API, /docs, /openapi.json, /health, /metrics.
    The evaluation loop and the Alertmanager queue run from the app's start to its stop."""
    alerting = alerting_settings(settings)
    port = settings.ports.predictive_alerting
    service = _Service(settings, alerting, deps, f"http://{settings.hostname}:{port}/v1/alerts")
    health: dict[str, HealthCheck] = {}
    if deps.prometheus is not None:
        health["prometheus"] = service.prometheus_health
    if deps.alertmanager is not None:
        health["alertmanager"] = service.alertmanager_health
    return create_service(
        "predictive-alerting",
        title="Citadel predictive alerting",
        description="Forecasts and anomaly scores of the alert rules in citadel.yaml, and the "
        "alerts sent to Alertmanager. Authenticate with the admin key. `/health` adds "
        "`last_evaluation` and `rules`: each rule's last outcome and its forecasting models "
        "(trained at, points seen, backtest error, last failure).",
        settings=settings,
        registry=deps.registry,
        admin=CONTROLLERS,
        dependencies={"alerting": provide(service.state)},
        health=health,
        health_extra=service.state.health_extra,
        on_startup=(service.start,),
        on_shutdown=(*deps.close, service.stop),  # run last first: stop, then close
    )


class _Service:
    """The scheduler and the notifier over one set of dependencies, started and stopped with
    the app."""

    def __init__(
        self, settings: Settings, alerting: AlertingSettings, deps: AlertingDeps, generator: str
    ) -> None:
        self.alerting = alerting
        self.deps = deps
        self.fitter = PoolFitter(alerting.fit_processes) if alerting.fit_processes else None
        evaluator = Evaluator(
            detector_factory=deps.detector_factory,
            timezone=settings.limits.timezone,
            reselect_seconds=alerting.reselect_seconds,
            refit_seconds=alerting.refit_seconds,
            fitter=self.fitter,
        )
        valid = max(4 * max(alerting.interval_seconds, alerting.resend_seconds), 300.0)
        book = AlertBook(resend_seconds=alerting.resend_seconds, valid_seconds=valid)
        sources: dict[str, Source] = {"ledger": LedgerSource(deps.spend, deps.ledger_metrics)}
        if deps.prometheus is not None:
            sources["prometheus"] = _ValidatingSource(deps.prometheus)
        else:
            sources["prometheus"] = _Missing("PROMETHEUS_ENDPOINT is not set")
        self.publisher = (
            Publisher(deps.feed, source=f"predictive-alerting@{socket.gethostname()}:{os.getpid()}")
            if deps.feed is not None
            else None
        )
        scheduler = Scheduler(
            settings=alerting,
            evaluator=evaluator,
            sources=sources,
            book=book,
            notifier=deps.alertmanager,
            registry=deps.registry,
            clock=deps.clock,
            generator_url=alerting.generator_url or generator,
            events=self.publisher.sink("alerts") if self.publisher is not None else None,
            concurrency=max(8, alerting.fit_processes),  # reads overlap; fits queue for the pool
        )
        self.state = Alerting(
            settings=alerting,
            scheduler=scheduler,
            evaluator=evaluator,
            book=book,
            notifier=deps.alertmanager,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._switch = sys.getswitchinterval()

    async def start(self) -> None:
        # The rules are scored in threads (pure Python, holding the GIL): the event loop, which
        # answers /health, waits for a thread's switch interval each time it wants the GIL back,
        # so a shorter one (1 ms, from CPython's 5) bounds what a round adds to a reply.
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, _SWITCH_SECONDS))
        await self._resolve_teams()
        if self.publisher is not None:
            await self.publisher.start()
        prometheus = self.deps.prometheus
        if prometheus is not None:
            try:
                await validate_rules(self.alerting.rules, prometheus)
            except PrometheusError as exc:  # checked again at each rule's first evaluation
                _log.warning("could not validate the rules' PromQL yet", extra={"error": str(exc)})
        if self.deps.alertmanager is not None:
            self._tasks.append(asyncio.create_task(self.deps.alertmanager.run()))
        if self.deps.run_scheduler:
            self._tasks.append(asyncio.create_task(self.state.scheduler.run()))

    async def _resolve_teams(self) -> None:
        """Ledger rules' team names become ids; an unknown team stops the start (ConfigError).
        An unreachable accounts store leaves the rules as written, with a warning."""
        if self.deps.accounts is None:
            return
        try:
            alerting = await resolve_teams(self.alerting, self.deps.accounts)
        except ConfigError:
            raise
        except CitadelError as exc:
            _log.warning("could not resolve the ledger rules' teams", extra={"error": str(exc)})
            return
        self.alerting = self.state.settings = self.state.scheduler.settings = alerting

    async def stop(self) -> None:
        sys.setswitchinterval(self._switch)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.fitter is not None:
            self.fitter.close()
        notifier = self.deps.alertmanager
        if notifier is not None and notifier.queued:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SHUTDOWN_FLUSH_SECONDS):
                    await notifier.flush()
        if self.publisher is not None:
            await self.publisher.aclose()
        if self.deps.feed is not None:
            await self.deps.feed.aclose()

    async def prometheus_health(self) -> DependencyHealth:
        assert self.deps.prometheus is not None
        try:
            version = await self.deps.prometheus.ping()
        except PrometheusError as exc:
            return DependencyHealth("down", str(exc))
        return DependencyHealth("ok", f"Prometheus {version}")

    async def alertmanager_health(self) -> DependencyHealth:
        notifier = self.deps.alertmanager
        assert notifier is not None
        try:
            await notifier.ping()
        except AlertmanagerError as exc:
            return DependencyHealth("down", f"{exc}; {notifier.queued} alerts queued")
        if notifier.queued and notifier.last_error:
            return DependencyHealth("degraded", f"{notifier.queued} alerts queued")
        return DependencyHealth("ok", f"{notifier.queued} alerts queued")


class _ValidatingSource:
    """Prometheus range queries, each rule's PromQL checked once before its first query (when
    Prometheus could not check it at start)."""

    def __init__(self, client: PrometheusClient) -> None:
        self._source = PrometheusSource(client)
        self._client = client
        self._checked: set[str] = set()

    async def fetch(self, rule: Rule, *, now: float) -> list[Any]:
        if rule.query is not None and rule.name not in self._checked:
            await self._client.validate(rule.name, rule.query)  # InvalidQuery: the rule's error
            self._checked.add(rule.name)
        return await self._source.fetch(rule, now=now)


class _Missing:
    def __init__(self, reason: str) -> None:
        self._reason = reason

    async def fetch(self, rule: Rule, *, now: float) -> list[Any]:
        raise SourceUnavailable(f"rule {rule.name!r} cannot be evaluated: {self._reason}")
