"""The predictive-alerting API's handlers: thin reads of the scheduler's latest evaluations, the
alert book and the Alertmanager queue.

Injected (``app.py``): ``alerting`` (``Alerting``: the rules, the scheduler, the evaluator's
models, the alert book and the notifier).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
from citadel.alerting.engine import Evaluation, Evaluator, Scheduler
from citadel.alerting.selector import ModelState
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
    _pending: list[msgspec.Raw] = field(default_factory=list)

    def latest(self, kind: Kind) -> list[EvaluationReply]:
        found = [self.scheduler.latest.get(r.name) for r in self.settings.rules if r.kind == kind]
        return [EvaluationReply.of(e) for e in found if e is not None]

    def __post_init__(self) -> None:
        self.scheduler.describe = describe_rule
        self._pending = [
            msgspec.Raw(
                _ENCODER.encode(
                    RuleStateReply(
                        rule=rule.name, kind=rule.kind, outcome="pending", error=None, models={}
                    )
                )
            )
            for rule in self.settings.rules
        ]

    async def health_extra(self) -> dict[str, object]:
        """What /health adds: the last evaluation round and each rule's models. Each rule's part
        was encoded when the rule was last evaluated (``describe_rule``, in the evaluation's
        thread), so a /health costs a join of 1,000 rules' bytes, not their encoding."""
        described = self.scheduler.described
        rules = [
            described.get(rule.name, pending)
            for rule, pending in zip(self.settings.rules, self._pending, strict=True)
        ]
        return {
            "last_evaluation": iso(self.scheduler.last_run),
            "rounds": msgspec.convert(self.scheduler.round_state(), RoundsReply),
            "rules": rules,
        }


_ENCODER = msgspec.json.Encoder()


def describe_rule(
    evaluation: Evaluation, models: Mapping[str, tuple[ModelState, ...]]
) -> msgspec.Raw:
    """A rule's /health entry (``RuleStateReply``), encoded."""
    reply = RuleStateReply(
        rule=evaluation.rule.name,
        kind=evaluation.rule.kind,
        outcome=evaluation.outcome,
        error=evaluation.error,
        models={
            series: [ModelReply.of(state) for state in states] for series, states in models.items()
        },
    )
    return msgspec.Raw(_ENCODER.encode(reply))


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
