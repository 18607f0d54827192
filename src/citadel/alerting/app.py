"""Wiring of the predictive-alerting service (:9092): ``create_app(settings, deps)``.

At start every PromQL rule is checked against Prometheus (a refused expression stops the service
with a ConfigError naming ``alerting.rules[i].query``; an unreachable Prometheus only delays the
check to each rule's first evaluation). Then the scheduler evaluates the rules every
``alerting.interval_seconds`` and the Alertmanager client delivers what fires and resolves.

Routes (``/v1/*`` take the admin key as ``Authorization: Bearer <key>``):

    GET  /health           status, dependencies, and each rule's models: trained at, points seen,
                           backtest error, last failure
    GET  /metrics          evaluations, their duration, model accuracy, alerts sent and dropped
    GET  /v1/rules         the definitions
    GET  /v1/forecasts     the latest evaluation of each forecast rule
    GET  /v1/anomalies     the latest evaluation of each anomaly rule
    GET  /v1/alerts        alerts firing now, and the delivery queue
    POST /v1/evaluate      evaluate every rule now; answers the evaluations
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from citadel.alerting.alertmanager import AlertBook, AlertmanagerClient, AlertmanagerError
from citadel.alerting.anomaly import default_detector
from citadel.alerting.definitions import AlertingSettings, Rule, parse_alerting
from citadel.alerting.engine import (
    Detector,
    Evaluation,
    Evaluator,
    LedgerSource,
    PrometheusSource,
    Scheduler,
    Source,
    SourceUnavailable,
    SpendReader,
)
from citadel.alerting.prometheus import InvalidQuery, PrometheusClient, PrometheusError
from citadel.alerting.selector import ModelState
from citadel.errors import ConfigError
from citadel.feed import Feed
from citadel.feed.open import shared_feed
from citadel.feed.publisher import Publisher
from citadel.gateway.auth import AdminKeyAuthenticator
from citadel.http.client import HttpClient
from citadel.http.server import Request, Response
from citadel.metrics import Registry
from citadel.openapi import ApiRoutes, Operation, PathHandler
from citadel.service import App, DependencyHealth, service_app
from citadel.settings import Settings

__all__ = ["AlertingDeps", "create_app", "default_deps", "validate_rules"]

_log = logging.getLogger("citadel.alerting")
_SHUTDOWN_FLUSH_SECONDS = 2.0


@dataclass(slots=True, kw_only=True)
class AlertingDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    http: HttpClient = field(default_factory=HttpClient)
    prometheus: PrometheusClient | None = None
    alertmanager: AlertmanagerClient | None = None
    spend: SpendReader | None = None  # the usage ledger, for ledger rules
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
    close: list[Callable[[], Awaitable[None]]] = [http.aclose]
    rules = parse_alerting(settings.alerting).rules
    if any(rule.ledger is not None for rule in rules):
        from citadel.accounts.sql import build_engine
        from citadel.metering.analytics import Analytics

        engine = build_engine(settings.metering.database or settings.accounts.database)
        spend = AnalyticsSpend(Analytics(engine), settings.limits.timezone)
        close.append(engine.dispose)
    return AlertingDeps(
        http=http,
        prometheus=prometheus,
        alertmanager=alertmanager,
        spend=spend,
        detector_factory=default_detector_factory(),
        registry=registry,
        close=tuple(close),
        feed=shared_feed(settings),
    )


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


def create_app(settings: Settings, deps: AlertingDeps) -> App:
    """The predictive-alerting service: its JSON API, /docs, /openapi.json, /health, /metrics."""
    alerting = parse_alerting(settings.alerting)
    app = service_app("predictive-alerting", settings, deps.registry)
    api = ApiRoutes(
        app,
        title="Citadel predictive alerting",
        description="Forecasts and anomaly scores of the alert rules in citadel.yaml, and the "
        "alerts sent to Alertmanager. Authenticate with the admin key.",
    )
    port = settings.ports.predictive_alerting
    service = _Service(settings, alerting, deps, f"http://{settings.hostname}:{port}/v1/alerts")
    auth = AdminKeyAuthenticator(settings.gateway.admin_key)
    for operation, handler in service.routes():
        api.add(operation, auth.guard(handler))
    api.describe(
        Operation(
            method="GET",
            path="/health",
            summary="Service health, dependencies and each rule's forecasting models",
            response={"type": "object"},
            tags=("operations",),
            secured=False,
        )
    )
    api.describe(
        Operation(
            method="GET",
            path="/metrics",
            summary="Metrics",
            tags=("operations",),
            secured=False,
            content_type="text/plain",
        )
    )
    app.route("GET", "/health", service.health(app))
    if deps.prometheus is not None:
        app.health_check("prometheus", service.prometheus_health)
    if deps.alertmanager is not None:
        app.health_check("alertmanager", service.alertmanager_health)
    app.on_startup(service.start)
    app.on_shutdown(service.stop)
    return app


def _json(body: object, status: int = 200) -> Response:
    return Response(status, orjson.dumps(body))


class _Service:
    """The scheduler, the notifier and the handlers over one set of dependencies."""

    def __init__(
        self, settings: Settings, alerting: AlertingSettings, deps: AlertingDeps, generator: str
    ) -> None:
        self.alerting = alerting
        self.deps = deps
        self.evaluator = Evaluator(
            detector_factory=deps.detector_factory, timezone=settings.limits.timezone
        )
        valid = max(4 * max(alerting.interval_seconds, alerting.resend_seconds), 300.0)
        self.book = AlertBook(resend_seconds=alerting.resend_seconds, valid_seconds=valid)
        sources: dict[str, Source] = {"ledger": LedgerSource(deps.spend)}
        if deps.prometheus is not None:
            sources["prometheus"] = _ValidatingSource(deps.prometheus)
        else:
            sources["prometheus"] = _Missing("PROMETHEUS_ENDPOINT is not set")
        self.publisher = (
            Publisher(deps.feed, source=f"predictive-alerting@{socket.gethostname()}:{os.getpid()}")
            if deps.feed is not None
            else None
        )
        self.scheduler = Scheduler(
            settings=alerting,
            evaluator=self.evaluator,
            sources=sources,
            book=self.book,
            notifier=deps.alertmanager,
            registry=deps.registry,
            clock=deps.clock,
            generator_url=alerting.generator_url or generator,
            events=self.publisher.sink("alerts") if self.publisher is not None else None,
        )
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
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
            self._tasks.append(asyncio.create_task(self.scheduler.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        notifier = self.deps.alertmanager
        if notifier is not None and notifier.queued:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SHUTDOWN_FLUSH_SECONDS):
                    await notifier.flush()
        if self.publisher is not None:
            await self.publisher.aclose()
        if self.deps.feed is not None:
            await self.deps.feed.aclose()
        for close in self.deps.close:
            await close()

    # -- health ---------------------------------------------------------------------------------

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

    def health(self, app: App) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            status, dependencies = await app.check_health()
            body = {
                "status": status,
                "service": app.name,
                "version": app.version,
                "dependencies": dependencies,
                "last_evaluation": _iso(self.scheduler.last_run),
                "rules": self._rules_state(),
            }
            return _json(body, 503 if status == "down" else 200)

        return handler

    def _rules_state(self) -> list[dict[str, Any]]:
        models = self.evaluator.models()
        out: list[dict[str, Any]] = []
        for rule in self.alerting.rules:
            latest = self.scheduler.latest.get(rule.name)
            out.append(
                {
                    "rule": rule.name,
                    "kind": rule.kind,
                    "outcome": latest.outcome if latest else "pending",
                    "error": latest.error if latest else None,
                    "models": {
                        series: [_model_json(state) for state in states]
                        for series, states in models.get(rule.name, {}).items()
                    },
                }
            )
        return out

    # -- routes ---------------------------------------------------------------------------------

    def routes(self) -> list[tuple[Operation, PathHandler]]:
        listing: dict[str, Any] = {"type": "object", "properties": {"data": {"type": "array"}}}

        def op(method: str, path: str, summary: str) -> Operation:
            return Operation(
                method=method, path=path, summary=summary, response=listing, tags=("alerting",)
            )

        return [
            (op("GET", "/v1/rules", "The alert definitions"), self.rules),
            (
                op("GET", "/v1/forecasts", "The latest forecast of each forecast rule"),
                self.forecasts,
            ),
            (op("GET", "/v1/anomalies", "The latest score of each anomaly rule"), self.anomalies),
            (op("GET", "/v1/alerts", "Alerts firing now and the delivery queue"), self.alerts),
            (op("POST", "/v1/evaluate", "Evaluate every rule now"), self.evaluate),
        ]

    async def rules(self, request: Request, params: Mapping[str, str]) -> Response:
        return _json({"object": "list", "data": [_rule_json(r) for r in self.alerting.rules]})

    def _latest(self, kind: str) -> list[dict[str, object]]:
        found = [self.scheduler.latest.get(r.name) for r in self.alerting.rules if r.kind == kind]
        return [evaluation.to_json() for evaluation in found if evaluation is not None]

    async def forecasts(self, request: Request, params: Mapping[str, str]) -> Response:
        return _json({"object": "list", "data": self._latest("forecast")})

    async def anomalies(self, request: Request, params: Mapping[str, str]) -> Response:
        return _json({"object": "list", "data": self._latest("anomaly")})

    async def alerts(self, request: Request, params: Mapping[str, str]) -> Response:
        notifier = self.deps.alertmanager
        delivery: dict[str, object] | None = None
        if notifier is not None:
            delivery = {
                "alertmanager": notifier.url,
                "queued": notifier.queued,
                "dropped": notifier.dropped,
                "failures": notifier.failures,
                "retry_in_seconds": notifier.backoff,
                "last_error": notifier.last_error,
                "last_success": _iso(notifier.last_success),
            }
        alerts = [
            {**alert.to_json(), "status": "firing"}
            for alert in sorted(self.book.firing(), key=lambda a: a.fingerprint)
        ]
        return _json({"object": "list", "data": alerts, "delivery": delivery})

    async def evaluate(self, request: Request, params: Mapping[str, str]) -> Response:
        evaluations: list[Evaluation] = await self.scheduler.evaluate_all()
        return _json({"object": "list", "data": [e.to_json() for e in evaluations]})


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


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _model_json(state: ModelState) -> dict[str, object]:
    return {
        "model": state.name,
        "available": state.available,
        "selected": state.selected,
        "trained_at": _iso(state.trained_at),
        "points_seen": state.points_seen,
        "backtest_error": state.backtest_error,
        "last_failure": state.last_failure,
    }


def _rule_json(rule: Rule) -> dict[str, object]:
    return {
        "name": rule.name,
        "kind": rule.kind,
        "query": rule.query,
        "ledger": None
        if rule.ledger is None
        else {"metric": rule.ledger.metric, "team": rule.ledger.team},
        "threshold": rule.threshold,
        "direction": rule.direction,
        "horizon_seconds": rule.horizon_seconds,
        "lookback_seconds": rule.lookback_seconds,
        "step_seconds": rule.step_seconds,
        "min_points": rule.min_points,
        "model": rule.model,
        "score_threshold": rule.score_threshold,
        "severity": rule.severity,
        "labels": dict(rule.labels),
        "summary": rule.summary,
    }
