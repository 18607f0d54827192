"""The predictive-alerting API's handlers: thin reads of the scheduler's latest evaluations, the
alert book and the Alertmanager queue.

Injected (``app.py``): ``alerting`` (``Alerting``: the rules, the scheduler, the evaluator's
models, the alert book and the notifier).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar import Controller, get, post

from citadel.alerting.alertmanager import AlertBook, AlertmanagerClient
from citadel.alerting.bodies import (
    AlertReply,
    AlertsListing,
    DeliveryReply,
    EvaluationReply,
    ModelReply,
    RoundsReply,
    RuleReply,
    RuleStateReply,
    iso,
)
from citadel.alerting.definitions import AlertingSettings, Kind
from citadel.alerting.engine import Evaluator, Scheduler
from citadel.web import Injected, Listing

__all__ = ["CONTROLLERS", "Alerting"]


@dataclass(slots=True, kw_only=True)
class Alerting:
    """What the handlers read: the rules and the state the scheduler keeps."""

    settings: AlertingSettings
    scheduler: Scheduler
    evaluator: Evaluator
    book: AlertBook
    notifier: AlertmanagerClient | None

    def latest(self, kind: Kind) -> list[EvaluationReply]:
        found = [self.scheduler.latest.get(r.name) for r in self.settings.rules if r.kind == kind]
        return [EvaluationReply.of(e) for e in found if e is not None]

    async def health_extra(self) -> dict[str, object]:
        """What /health adds: the last evaluation round and each rule's models."""
        models = self.evaluator.models()
        rules: list[RuleStateReply] = []
        for rule in self.settings.rules:
            latest = self.scheduler.latest.get(rule.name)
            rules.append(
                RuleStateReply(
                    rule=rule.name,
                    kind=rule.kind,
                    outcome=latest.outcome if latest else "pending",
                    error=latest.error if latest else None,
                    models={
                        series: [ModelReply.of(state) for state in states]
                        for series, states in models.get(rule.name, {}).items()
                    },
                )
            )
        return {
            "last_evaluation": iso(self.scheduler.last_run),
            "rounds": msgspec.convert(self.scheduler.round_state(), RoundsReply),
            "rules": rules,
        }


State = Injected[Alerting]


class AlertingController(Controller):
    path = "/v1"
    tags = ["alerting"]  # noqa: RUF012 - Litestar's layer attribute

    @get("/rules", summary="The alert definitions")
    async def rules(self, alerting: State) -> Listing[RuleReply]:
        return Listing([RuleReply.of(rule) for rule in alerting.settings.rules])

    @get("/forecasts", summary="The latest forecast of each forecast rule")
    async def forecasts(self, alerting: State) -> Listing[EvaluationReply]:
        return Listing(alerting.latest("forecast"))

    @get("/anomalies", summary="The latest score of each anomaly rule")
    async def anomalies(self, alerting: State) -> Listing[EvaluationReply]:
        return Listing(alerting.latest("anomaly"))

    @get("/alerts", summary="Alerts firing now and the delivery queue")
    async def alerts(self, alerting: State) -> AlertsListing:
        notifier = alerting.notifier
        firing = sorted(alerting.book.firing(), key=lambda alert: alert.fingerprint)
        return AlertsListing(
            data=[AlertReply.of(alert) for alert in firing],
            delivery=None if notifier is None else DeliveryReply.of(notifier),
        )

    @post(
        "/evaluate",
        summary="Evaluate every rule now; answers the evaluations",
        status_code=200,
    )
    async def evaluate(self, alerting: State) -> Listing[EvaluationReply]:
        evaluations = await alerting.scheduler.evaluate_all()
        return Listing([EvaluationReply.of(e) for e in evaluations])


CONTROLLERS = (AlertingController,)
