"""The predictive-alerting state as the graph shows it: ``forecasts``, ``anomalies``, ``alerts``.

The predictive-alerting service (:9092) keeps its latest evaluations and its alert book in its
own memory, and this service calls no other over HTTP. So it evaluates the same rules
(``citadel.alerting.app.alerting_settings``: the defaults and ``alerting.rules``) with the same
modules (``citadel.alerting.engine``: the evaluator, the scheduler, the alert book) over the same
sources (Prometheus for PromQL rules, the usage ledger for ledger rules), on demand and at most
once per ``alerting.interval_seconds``. It never delivers anything: no Alertmanager, no feed
events, and its scheduler's metrics go to a registry of its own (so ``citadel_alerting_*`` stay
the :9092 service's alone).

Scoping: the admin key sees every rule and alert. A user's key sees the ledger rules about its
own team (a team's spend forecast) and their alerts; PromQL rules watch the platform and are the
admin's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import strawberry
from strawberry.scalars import JSON

from citadel.accounts.store import AccountStore
from citadel.alerting.alertmanager import Alert as AlertRecord
from citadel.alerting.alertmanager import AlertBook
from citadel.alerting.app import AnalyticsSpend, alerting_settings, default_detector_factory
from citadel.alerting.bodies import EvaluationReply, FindingReply, ForecastReply
from citadel.alerting.definitions import AlertingSettings, Kind, Rule
from citadel.alerting.engine import Evaluation as EvaluationRecord
from citadel.alerting.engine import (
    Evaluator,
    LedgerSource,
    PrometheusSource,
    Scheduler,
    Source,
    SourceUnavailable,
)
from citadel.alerting.prometheus import PrometheusClient, Series
from citadel.alerting.teams import resolve_teams
from citadel.errors import CitadelError, ConfigError
from citadel.graphql.replies import FromReply, from_reply
from citadel.http.client import HttpClient
from citadel.metering.analytics import Analytics
from citadel.metrics import Registry
from citadel.settings import Settings

_log = logging.getLogger("citadel.graphql")

__all__ = ["Alert", "AlertingView", "Evaluation", "Finding", "ForecastPoint"]


def _time(when: float | None) -> datetime | None:
    return None if when is None else datetime.fromtimestamp(when, UTC)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


class _Missing:
    def __init__(self, reason: str) -> None:
        self._reason = reason

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        raise SourceUnavailable(f"rule {rule.name!r} cannot be evaluated: {self._reason}")


class AlertingView:
    """The rules' latest evaluations and the alerts firing, evaluated here on demand."""

    def __init__(
        self,
        settings: Settings,
        analytics: Analytics,
        *,
        http: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
        accounts: AccountStore | None = None,
    ) -> None:
        self.settings: AlertingSettings = alerting_settings(settings)
        self._accounts = accounts  # ledger rules' team names become ids (``_resolve``)
        self._clock = clock
        evaluator = Evaluator(
            detector_factory=default_detector_factory(),
            timezone=settings.limits.timezone,
            reselect_seconds=self.settings.reselect_seconds,
        )
        valid = max(4 * max(self.settings.interval_seconds, self.settings.resend_seconds), 300.0)
        self.book = AlertBook(resend_seconds=self.settings.resend_seconds, valid_seconds=valid)
        sources: dict[str, Source] = {
            "ledger": LedgerSource(AnalyticsSpend(analytics, settings.limits.timezone))
        }
        prometheus = settings.endpoints.prometheus
        if prometheus and http is not None:
            sources["prometheus"] = PrometheusSource(PrometheusClient(prometheus, http))
        else:
            sources["prometheus"] = _Missing("PROMETHEUS_ENDPOINT is not set")
        port = settings.ports.predictive_alerting
        self.scheduler = Scheduler(
            settings=self.settings,
            evaluator=evaluator,
            sources=sources,
            book=self.book,
            notifier=None,
            registry=Registry(),  # not this service's /metrics: those are :9092's figures
            clock=clock,
            generator_url=self.settings.generator_url
            or f"http://{settings.hostname}:{port}/v1/alerts",
            events=None,
        )
        self._lock = asyncio.Lock()

    async def _resolve(self) -> None:
        """Ledger rules' team names as ids, once, as the predictive-alerting service does at its
        start. A team neither service knows is that service's start error; here it is logged and
        the rule kept as written. An unreadable store is tried again at the next refresh."""
        accounts, self._accounts = self._accounts, None
        if accounts is None:
            return
        try:
            self.settings = self.scheduler.settings = await resolve_teams(self.settings, accounts)
        except ConfigError as exc:
            _log.warning("a ledger rule names an unknown team", extra={"error": str(exc)})
        except CitadelError:
            self._accounts = accounts

    async def refresh(self) -> None:
        """Evaluate every rule unless that was done less than an interval ago."""
        async with self._lock:
            await self._resolve()
            last = self.scheduler.last_run
            if last is None or self._clock() - last >= self.settings.interval_seconds:
                await self.scheduler.evaluate_all()

    async def latest(self, kind: Kind, *, team: str | None) -> list[EvaluationRecord]:
        """The latest evaluation of each rule of ``kind`` (a user: its team's ledger rules)."""
        await self.refresh()
        found = []
        for rule in self.settings.rules:
            evaluation = self.scheduler.latest.get(rule.name)
            if rule.kind == kind and evaluation is not None and _visible(rule, team):
                found.append(evaluation)
        return found

    async def firing(self, *, team: str | None) -> list[tuple[Rule, AlertRecord]]:
        """The alerts firing now, with their rules (a user: its team's)."""
        await self.refresh()
        rules = {rule.name: rule for rule in self.settings.rules}
        alerts = []
        for alert in sorted(self.book.firing(), key=lambda a: a.fingerprint):
            rule = rules.get(alert.labels.get("alertname", ""))
            if rule is not None and _visible(rule, team):
                alerts.append((rule, alert))
        return alerts

    def rule_visible(self, name: str, *, team: str | None) -> bool:
        """Whether the caller (``team`` None: the admin) may see the alerts of rule ``name``."""
        if team is None:
            return True
        rule = next((r for r in self.settings.rules if r.name == name), None)
        return rule is not None and _visible(rule, team)


def _visible(rule: Rule, team: str | None) -> bool:
    """Every rule for the admin (``team`` None); a user's team's ledger rules for a user."""
    if team is None:
        return True
    return rule.ledger is not None and rule.ledger.team == team


@from_reply(ForecastReply)
class ForecastPoint(FromReply):
    """A forecast at the end of its horizon, with its interval."""


@from_reply(FindingReply, nested={ForecastReply: ForecastPoint})
class Finding(FromReply):
    """The decision for one series of a rule, and why."""


@from_reply(EvaluationReply, nested={FindingReply: Finding})
class Evaluation(FromReply):
    """The latest evaluation of one alert rule (the predictive-alerting API's reply)."""

    @classmethod
    def of(cls, evaluation: EvaluationRecord) -> Evaluation:
        built: Evaluation = cls.of_reply(EvaluationReply.of(evaluation))
        return built


@strawberry.type(description="An alert firing now, as it is sent to Alertmanager.")
class Alert:
    rule: str
    severity: str
    fingerprint: str
    labels: JSON
    annotations: JSON
    starts_at: datetime
    ends_at: datetime = strawberry.field(description="valid until (re-sent while it fires)")
    generator_url: str

    @classmethod
    def of(cls, rule: Rule, alert: AlertRecord) -> Alert:
        labels: dict[str, Any] = dict(alert.labels)
        return cls(
            rule=rule.name,
            severity=rule.severity,
            fingerprint=alert.fingerprint,
            labels=JSON(labels),
            annotations=JSON(dict(alert.annotations)),
            starts_at=datetime.fromtimestamp(alert.starts_at, UTC),
            ends_at=datetime.fromtimestamp(alert.ends_at, UTC),
            generator_url=alert.generator_url,
        )
