"""Prometheus recording and alerting rules, generated from the metric catalogue and the SLOs.

Pure: no I/O. ``rule_groups`` gives the groups Prometheus loads (``rules_yaml`` as a file);
``promtool_tests`` gives a ``promtool test rules`` file with a firing and a quiet case for every
alert rule, built from the same ``Alert`` objects, so an alert cannot exist without its cases.
Every expression holds on Prometheus 2.42 and 3.x: ``predict_linear`` (never ``holt_winters``),
bucket bounds matched both as ``1.0`` and ``1`` (3.x normalises ``le``), no 3.x-only functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from citadel import metrics as m
from citadel.observability.names import (
    BURN_WINDOWS,
    WINDOWS,
    Slo,
    record,
    recorded,
    slo_error_ratio,
)

# vLLM saturation: KV-cache use worth forecasting from, and the queue lengths (requests) that
# count as saturated (predicted) and as already queueing (now).
_KV_NOW = 0.5
_QUEUE_FULL = 100
_QUEUE_NOW = 5
RUNBOOK = "https://github.com/citadel-llm/citadel/blob/main/docs/runbooks.md"
SLO_RATIO = "slo:sli_error:ratio_rate"
_UNTIL_MONTH_END = (
    "scalar((days_in_month() - day_of_month() + 1) * 86400 - hour() * 3600 - minute() * 60)"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """Synthetic series for promtool (selector, values notation) and when to look."""

    series: tuple[tuple[str, str], ...]
    at: str
    interval: str = "30s"


@dataclass(frozen=True, kw_only=True, slots=True)
class Alert:
    """One alerting rule, with the promtool cases that prove it fires and stays quiet."""

    name: str
    expr: str
    for_: str
    severity: str
    service: str
    summary: str
    description: str
    fire: Case
    quiet: Case
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        return self.name.lower()

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, "service": self.service, **self.labels},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{RUNBOOK}#{self.anchor}",
            },
        }


def _counter_pair(name: str, labels: str, good: float, bad: float, steps: int) -> list[str]:
    return [f"{name}{{{labels}}}", f"0+{good}x{steps}", f"0+{bad}x{steps}"]


def _slo_series(slo: Slo, bad_fraction: float, steps: int) -> tuple[tuple[str, str], ...]:
    """1000 events per step, ``bad_fraction`` of them bad, for the SLO's model."""
    bad = round(1000 * bad_fraction, 6)
    route = f'model="{slo.model}",deployment="{slo.model}-a"'
    if slo.kind == "availability":
        name = m.GATEWAY_REQUESTS.name
        return (
            (f'{name}{{endpoint="chat",{route},status="200"}}', f"0+{1000 - bad}x{steps}"),
            (f'{name}{{endpoint="chat",{route},status="500"}}', f"0+{bad}x{steps}"),
        )
    spec = m.GATEWAY_TTFT if slo.kind == "ttft" else m.GATEWAY_TPOT
    return (
        (
            f'{spec.name}_bucket{{{route},le="{float(slo.threshold_seconds)!r}"}}',
            f"0+{1000 - bad}x{steps}",
        ),
        (f"{spec.name}_count{{{route}}}", f"0+1000x{steps}"),
    )


def _burn_expr(slo: Slo, severity: str) -> str:
    sel = f'{{slo="{slo.name}"}}'
    parts = [
        f"({SLO_RATIO}{long}{sel} > ({factor} * {slo.budget}) "
        f"and {SLO_RATIO}{short}{sel} > ({factor} * {slo.budget}))"
        for sev, factor, long, short in BURN_WINDOWS
        if sev == severity
    ]
    return " or ".join(parts)


def slo_alerts(slo: Slo) -> list[Alert]:
    """The page and ticket burn-rate alerts of one SLO (SRE workbook, multi-window)."""
    what = {"availability": "requests failing (5xx)", "ttft": "slow first tokens"}.get(
        slo.kind, "slow output tokens"
    )
    common = {
        "service": "gateway",
        "labels": {"slo": slo.name, "model": slo.model, "slo_kind": slo.kind},
        "quiet": Case(series=_slo_series(slo, slo.budget * 0.5, 240), at="2h"),
    }
    return [
        Alert(
            name="CitadelSLOBurnRatePage",
            expr=_burn_expr(slo, "page"),
            for_="1m",
            severity="page",
            summary=f"{slo.model}: {slo.kind} error budget burning fast",
            description=(
                f"{slo.model} is spending its {slo.objective} % {slo.kind} budget at 6x-14.4x: "
                f"{what}, {{{{ $value | humanizePercentage }}}} of events over the long window."
            ),
            fire=Case(series=_slo_series(slo, 1.0, 40), at="2m"),
            **common,  # type: ignore[arg-type]
        ),
        Alert(
            name="CitadelSLOBurnRateTicket",
            expr=_burn_expr(slo, "ticket"),
            for_="15m",
            severity="ticket",
            summary=f"{slo.model}: {slo.kind} error budget burning",
            description=(
                f"{slo.model} is spending its {slo.objective} % {slo.kind} budget at 1x-3x: "
                f"{what}, {{{{ $value | humanizePercentage }}}} of events over the long window."
            ),
            fire=Case(series=_slo_series(slo, 1.0, 200), at="1h"),
            **common,  # type: ignore[arg-type]
        ),
    ]


def _gauge_case(series: str, value: str, steps: int, at: str) -> Case:
    return Case(series=((series, f"{value}x{steps}"),), at=at)


def _pair(series: str, fire: str, quiet: str, steps: int, at: str) -> tuple[Case, Case]:
    return _gauge_case(series, fire, steps, at), _gauge_case(series, quiet, steps, at)


def platform_alerts() -> list[Alert]:
    """Operational and business-impact alerts; the budget forecast is ``predict_linear``."""
    util = m.BUSINESS_BUDGET_UTILISATION.name
    team_util = f'{util}{{scope="team"}}'
    cost = f'{m.BUSINESS_COST_PER_1K.name}{{kind="infrastructure"}}'
    refusals = record("tier:citadel_limiter_refusals:ratio_rate5m").name
    upstream = record("model_deployment:citadel_gateway_upstream_errors:rate5m").name
    route = 'model="m",deployment="m-a"'
    out: list[Alert] = []

    def add(
        name: str,
        expr: str,
        for_: str,
        severity: str,
        service: str,
        summary: str,
        description: str,
        cases: tuple[Case, Case],
    ) -> None:
        out.append(
            Alert(
                name=name,
                expr=expr,
                for_=for_,
                severity=severity,
                service=service,
                summary=summary,
                description=description,
                fire=cases[0],
                quiet=cases[1],
            )
        )

    add(
        "CitadelServiceDown",
        'up{job=~"citadel-.*"} == 0',
        "1m",
        "page",
        "prometheus",
        "{{ $labels.job }} is down",
        "Prometheus cannot scrape {{ $labels.instance }} ({{ $labels.job }}).",
        _pair('up{job="citadel-gateway",instance="127.0.0.1:8000"}', "0", "1", 20, "5m"),
    )
    add(
        "CitadelModelServerDown",
        'up{job="citadel-model-servers"} == 0',
        "2m",
        "page",
        "prometheus",
        "Model server {{ $labels.instance }} is down",
        "Prometheus cannot scrape the model server at {{ $labels.instance }}.",
        _pair('up{job="citadel-model-servers",instance="127.0.0.1:8100"}', "0", "1", 20, "5m"),
    )
    add(
        "CitadelBreakerOpen",
        f"{m.BREAKER_STATE.name} == 2",
        "5m",
        "ticket",
        "gateway",
        "Breaker of {{ $labels.deployment }} open",
        "The circuit breaker of {{ $labels.deployment }} has been open for 5 minutes.",
        _pair(f'{m.BREAKER_STATE.name}{{deployment="m-a"}}', "2", "0", 40, "10m"),
    )
    add(
        "CitadelDeploymentUnhealthy",
        f"{m.DEPLOYMENT_HEALTHY.name} == 0",
        "2m",
        "ticket",
        "gateway",
        "{{ $labels.deployment }} fails its health check",
        "{{ $labels.deployment }} has failed its active health check for 2 minutes.",
        _pair(f'{m.DEPLOYMENT_HEALTHY.name}{{deployment="m-a"}}', "0", "1", 20, "5m"),
    )
    add(
        "CitadelLimiterFailingOpen",
        f'sum by (operation) (rate({m.LIMITER_FAILURES.name}{{mode="open"}}[5m])) > 0',
        "1m",
        "page",
        "gateway",
        "The limiter is failing open",
        "Limits are not enforced: {{ $value | humanize }}/s {{ $labels.operation }} calls "
        "failed open against an unreachable backend.",
        _pair(
            f'{m.LIMITER_FAILURES.name}{{operation="admit",mode="open"}}', "0+1", "0+0", 40, "10m"
        ),
    )
    add(
        "CitadelLedgerLag",
        f"{m.LEDGER_LAG.name} > 10000",
        "10m",
        "ticket",
        "custom-metrics",
        "The usage ledger is behind",
        "{{ $value | humanize }} usage events are waiting to be written to the ledger.",
        _pair(m.LEDGER_LAG.name, "20000", "10", 60, "20m"),
    )
    add(
        "CitadelLedgerWriterErrors",
        f"rate({m.LEDGER_WRITER_ERRORS.name}[5m]) > 0",
        "5m",
        "ticket",
        "custom-metrics",
        "The ledger writer fails to store batches",
        "{{ $value | humanize }} ledger batches/s fail to be stored (each is retried).",
        _pair(m.LEDGER_WRITER_ERRORS.name, "0+1", "0+0", 40, "15m"),
    )
    add(
        "CitadelTierRefusals",
        f"{refusals} > 0.2",
        "10m",
        "ticket",
        "gateway",
        "Tier {{ $labels.tier }} refuses many requests",
        "{{ $value | humanizePercentage }} of tier {{ $labels.tier }}'s requests are refused "
        "by limits.",
        (
            Case(
                series=(
                    (f'{m.LIMITER_DECISIONS.name}{{tier="free",decision="allowed"}}', "0+10x60"),
                    (f'{m.LIMITER_DECISIONS.name}{{tier="free",decision="rpm"}}', "0+10x60"),
                ),
                at="20m",
            ),
            Case(
                series=(
                    (f'{m.LIMITER_DECISIONS.name}{{tier="free",decision="allowed"}}', "0+10x60"),
                    (f'{m.LIMITER_DECISIONS.name}{{tier="free",decision="rpm"}}', "0+0x60"),
                ),
                at="20m",
            ),
        ),
    )
    attempts = f"sum by (model, deployment) (rate({m.ROUTING_DECISIONS.name}[5m]))"
    decisions = f'{m.ROUTING_DECISIONS.name}{{{route},balancer="peak_ewma"}}'
    errors = f'{m.GATEWAY_UPSTREAM_ERRORS.name}{{{route},kind="connect"}}'
    add(
        "CitadelUpstreamErrors",
        f"sum by (model, deployment) ({upstream}) / {attempts} > 0.1",
        "5m",
        "ticket",
        "gateway",
        "{{ $labels.deployment }} fails upstream",
        "{{ $value | humanizePercentage }} of attempts on {{ $labels.deployment }} fail upstream.",
        (
            Case(series=((decisions, "0+10x60"), (errors, "0+5x60")), at="15m"),
            Case(series=((decisions, "0+10x60"), (errors, "0+0x60")), at="15m"),
        ),
    )
    kv = m.SIM_KV_CACHE.name
    waiting = m.SIM_WAITING.name
    server = 'job="citadel-model-servers",instance="127.0.0.1:8100",model_name="m"'
    add(
        "CitadelKVCacheSaturating",
        f"predict_linear({kv}[15m], 1800) >= 1 and {kv} > {_KV_NOW}",
        "5m",
        "ticket",
        "model-servers",
        "KV cache of {{ $labels.instance }} ({{ $labels.model_name }}) full within 30 minutes",
        "The model server at {{ $labels.instance }} holds {{ $value | humanizePercentage }} of "
        "its KV cache for {{ $labels.model_name }} and, at its rise over the last 15 minutes, "
        "fills it within 30 minutes: then requests queue and running ones are preempted.",
        _pair(f"{kv}{{{server}}}", "0.5+0.01", "0.9", 60, "20m"),
    )
    add(
        "CitadelModelServerQueueGrowing",
        f"predict_linear({waiting}[15m], 1800) > {_QUEUE_FULL} and {waiting} > {_QUEUE_NOW}",
        "5m",
        "ticket",
        "model-servers",
        "Queue of {{ $labels.instance }} ({{ $labels.model_name }}) growing",
        "{{ $value | humanize }} requests for {{ $labels.model_name }} wait at the model server "
        f"{{{{ $labels.instance }}}}, and at their growth over the last 15 minutes over "
        f"{_QUEUE_FULL} will within 30 minutes: add capacity or shed load.",
        _pair(f"{waiting}{{{server}}}", "0+2", "50", 60, "20m"),
    )
    add(
        "CitadelTeamBudgetForecast",
        f"predict_linear({team_util}[6h], {_UNTIL_MONTH_END}) > 1 and {team_util} < 1",
        "30m",
        "ticket",
        "custom-metrics",
        "Team {{ $labels.id }} will pass its budget this month",
        "At its spend rate of the last 6 hours, team {{ $labels.id }} (now at "
        "{{ $value | humanizePercentage }} predicted) passes its monthly budget before the "
        "month ends.",
        (
            Case(
                series=((f'{util}{{scope="team",id="t1"}}', "0+0.01x200"),), at="2h", interval="5m"
            ),
            Case(series=((f'{util}{{scope="team",id="t1"}}', "0.5x200"),), at="2h", interval="5m"),
        ),
    )
    add(
        "CitadelBudgetExhausted",
        f"{util} >= 1",
        "5m",
        "ticket",
        "custom-metrics",
        "{{ $labels.scope }} {{ $labels.id }} has spent its budget",
        "{{ $labels.scope }} {{ $labels.id }} is at {{ $value | humanizePercentage }} of its "
        "monthly budget.",
        _pair(f'{util}{{scope="user",id="u1"}}', "1.2", "0.4", 40, "10m"),
    )
    add(
        "CitadelDeploymentCostOutlier",
        f"{cost} > on (model) group_left () 1.5 * avg by (model) ({cost})",
        "1h",
        "ticket",
        "custom-metrics",
        "{{ $labels.deployment }} costs more than its peers",
        "{{ $labels.deployment }} serves {{ $labels.model }} at {{ $value | humanize }} USD "
        "per 1k tokens, over 1.5x the mean of its model's deployments.",
        (
            Case(
                series=(
                    (
                        f'{m.BUSINESS_COST_PER_1K.name}{{model="m",deployment="m-a",kind="infrastructure"}}',
                        "1x200",
                    ),
                    (
                        f'{m.BUSINESS_COST_PER_1K.name}{{model="m",deployment="m-b",kind="infrastructure"}}',
                        "10x200",
                    ),
                ),
                at="90m",
            ),
            Case(
                series=(
                    (
                        f'{m.BUSINESS_COST_PER_1K.name}{{model="m",deployment="m-a",kind="infrastructure"}}',
                        "1x200",
                    ),
                    (
                        f'{m.BUSINESS_COST_PER_1K.name}{{model="m",deployment="m-b",kind="infrastructure"}}',
                        "1.1x200",
                    ),
                ),
                at="90m",
            ),
        ),
    )
    add(
        "CitadelSavingsNegative",
        f"{m.BUSINESS_SAVINGS.name} < 0",
        "1h",
        "ticket",
        "custom-metrics",
        "{{ $labels.model }} costs more than the commercial reference",
        "Serving {{ $labels.model }} ourselves cost {{ $value | humanize }} USD more this month "
        "than its commercial reference price.",
        _pair(f'{m.BUSINESS_SAVINGS.name}{{model="m"}}', "-5", "5", 200, "90m"),
    )
    add(
        "CitadelAlertDeliveryFailing",
        f"rate({m.ALERTING_DELIVERY_FAILURES.name}[5m]) > 0",
        "10m",
        "ticket",
        "predictive-alerting",
        "Predictive alerts do not reach Alertmanager",
        "{{ $value | humanize }} posts/s to Alertmanager fail.",
        _pair(m.ALERTING_DELIVERY_FAILURES.name, "0+1", "0+0", 60, "20m"),
    )
    return out


def alerts(slos: Sequence[Slo]) -> list[Alert]:
    """Every alert rule: the platform's, then two per SLO."""
    return platform_alerts() + [a for slo in slos for a in slo_alerts(slo)]


def slo_group(slo: Slo) -> dict[str, Any]:
    """One SLO's group: its error ratio over every burn-rate window, the budget remaining over
    its period, and its two alerts."""
    labels = {"slo": slo.name, "model": slo.model, "slo_kind": slo.kind}
    rules: list[dict[str, Any]] = [
        {"record": r.name, "expr": r.expr, "labels": labels}
        for r in (slo_error_ratio(slo, w) for w in WINDOWS)
    ]
    period = f"{slo.days}d"
    rules.append(
        {
            "record": "slo:error_budget_remaining:ratio",
            "expr": f"1 - ({slo_error_ratio(slo, period).expr}) / {slo.budget}",
            "labels": labels,
        }
    )
    rules.append(
        {
            "record": "slo:objective:ratio",
            "expr": f"vector({slo.objective / 100})",
            "labels": labels,
        }
    )
    rules += [a.rule() for a in slo_alerts(slo)]
    return {"name": f"citadel-slo-{slo.name}", "interval": "30s", "rules": rules}


_DURATION = re.compile(r"(\d+)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RANGE = re.compile(r"\[(\d+[smhdw])\]")


def seconds(duration: str) -> int:
    """A Prometheus duration (``5m``, ``1h``, ``30d``) in seconds."""
    found = _DURATION.fullmatch(duration)
    if found is None:
        raise ValueError(f"not a duration: {duration!r}")
    return int(found[1]) * _SECONDS[found[2]]


def scaled(duration: str, speedup: float) -> str:
    """``duration`` divided by ``speedup``, at least one second (``1h`` / 60 = ``60s``)."""
    if speedup == 1:
        return duration
    return f"{max(1, round(seconds(duration) / speedup))}s"


def _speed_up(groups: list[dict[str, Any]], speedup: float) -> list[dict[str, Any]]:
    """Every range selector, ``for`` and group interval divided by ``speedup``: the same rules
    on a compressed clock, so an end-to-end test sees an SLO burn in seconds. Rule names keep
    their windows (``slo:sli_error:ratio_rate1h`` still means the one-hour ratio)."""
    if speedup == 1:
        return groups

    def expr(text: str) -> str:
        return _RANGE.sub(lambda r: f"[{scaled(r[1], speedup)}]", text)

    out = []
    for group in groups:
        rules = []
        for rule in group["rules"]:
            rule = {**rule, "expr": expr(rule["expr"])}
            if "for" in rule:
                rule["for"] = scaled(rule["for"], speedup)
            rules.append(rule)
        out.append({**group, "interval": scaled(group["interval"], speedup), "rules": rules})
    return out


def rule_groups(slos: Sequence[Slo], *, speedup: float = 1.0) -> list[dict[str, Any]]:
    """Every rule group Prometheus loads, in a stable order; ``speedup`` > 1 compresses every
    window and ``for`` by that factor (``observability.speedup``: tests and demos only)."""
    return _speed_up(_groups(slos), speedup)


def _literal(text: str) -> str:
    """``text`` as a regular expression matching it literally, with no backslash (which the
    PromQL string would need doubled): each metacharacter in a class of its own."""
    return "".join(f"[{c}]" if c in ".+*?()|{}$^[" else c for c in text)


def recording_groups(models: Sequence[str]) -> list[dict[str, Any]]:
    """The recording rules in groups: ``citadel-recording`` holds the rules that do not read
    per-model series, and the per-model rules for any model not in ``models`` (all of them when
    ``models`` is empty); then one ``citadel-recording-<model>`` group per model with that
    model's. Each group's cost grows with its model's deployments, not the installation's, and
    Prometheus evaluates groups concurrently, each at its own offset in the interval."""
    names = sorted(set(models))
    rest = f'model!~"{"|".join(map(_literal, names))}"' if names else ""
    groups = [
        {
            "name": "citadel-recording",
            "interval": "30s",
            "rules": [{"record": r.name, "expr": r.expr} for r in recorded(rest)],
        }
    ]
    for name in names:
        rules = [r for r in recorded(f'model="{name}"') if r.per_model]
        groups.append(
            {
                "name": f"citadel-recording-{name}",
                "interval": "30s",
                # The label (which the expressions' output carries already) tells promtool's
                # lint that these are not duplicates of the rules in citadel-recording.
                "rules": [
                    {"record": r.name, "expr": r.expr, "labels": {"model": name}} for r in rules
                ],
            }
        )
    return groups


def _groups(slos: Sequence[Slo]) -> list[dict[str, Any]]:
    first, *per_model = recording_groups([slo.model for slo in slos])
    return [
        first,
        {
            "name": "citadel-platform",
            "interval": "30s",
            "rules": [a.rule() for a in platform_alerts()],
        },
        *(slo_group(slo) for slo in slos),
        *per_model,
    ]


def dump(document: object) -> str:
    """YAML as Prometheus reads it: block style, keys in the order given."""
    return yaml.safe_dump(document, sort_keys=False, width=100, allow_unicode=True)


def rules_yaml(slos: Sequence[Slo], *, speedup: float = 1.0) -> str:
    """The rule file's text."""
    return dump({"groups": rule_groups(slos, speedup=speedup)})


def promtool_tests(slos: Sequence[Slo], rule_file: str = "citadel.rules.yml") -> dict[str, Any]:
    """A ``promtool test rules`` document: for every alert rule, a case in which it fires and
    one in which it does not (counted through ``ALERTS``, which promtool's evaluation writes)."""
    tests = []
    for alert in alerts(slos):
        matcher = f'alertname="{alert.name}",alertstate="firing"'
        for key, value in alert.labels.items():
            matcher += f',{key}="{value}"'
        for case, expected in ((alert.fire, [{"labels": "{}", "value": 1}]), (alert.quiet, [])):
            tests.append(
                {
                    "name": f"{alert.name} {'fires' if expected else 'stays quiet'}"
                    + (f" ({alert.labels['slo']})" if "slo" in alert.labels else ""),
                    "interval": case.interval,
                    "input_series": [{"series": s, "values": v} for s, v in case.series],
                    "promql_expr_test": [
                        {
                            "expr": f"count(ALERTS{{{matcher}}})",
                            "eval_time": case.at,
                            "exp_samples": expected,
                        }
                    ],
                }
            )
    return {"rule_files": [rule_file], "evaluation_interval": "30s", "tests": tests}
