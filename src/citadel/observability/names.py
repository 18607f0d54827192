"""The names the rules (:9094) and the dashboards (:9093) share: recording rules and SLOs.

One module for both, so a dashboard reads a recording rule by the same object the rule set
defines (``Recorded``), never by a retyped string. Recording rule names follow Prometheus's
``level:metric:operations`` convention. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from citadel import metrics as m
from citadel.errors import ConfigError

SloKind = Literal["availability", "ttft", "tpot"]
_SLO_KINDS: tuple[SloKind, ...] = ("availability", "ttft", "tpot")

# The SRE workbook's multi-window, multi-burn-rate table: (severity, factor, long, short).
BURN_WINDOWS: tuple[tuple[str, float, str, str], ...] = (
    ("page", 14.4, "1h", "5m"),
    ("page", 6.0, "6h", "30m"),
    ("ticket", 3.0, "1d", "2h"),
    ("ticket", 1.0, "3d", "6h"),
)
_5XX = 'status=~"5.."'
_REFUSED = 'decision!="allowed"'
WINDOWS: tuple[str, ...] = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True, kw_only=True, slots=True)
class Recorded:
    """One recording rule: its name, the expression it stores, and the metric it reads."""

    name: str
    expr: str
    source: m.MetricSpec
    unit: str = ""
    # Whether the rule reads per-model series: the rule set evaluates those once per model, in
    # that model's group (``rules.recording_groups``), the others once.
    per_model: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class Slo:
    """One objective for one model: ``objective`` per cent of events good over ``days``.

    availability: a request is good when it is not a 5xx; ttft/tpot: when the time is at most
    ``threshold_seconds`` (which must be a bucket bound of the histogram)."""

    model: str
    kind: SloKind
    objective: float  # per cent, in (0, 100)
    threshold_seconds: float = 0.0
    days: int = 30

    @property
    def name(self) -> str:
        return f"{self.model}-{self.kind}"

    @property
    def budget(self) -> float:
        """The error budget as a ratio (0.005 for 99.5 %)."""
        return round(1.0 - self.objective / 100.0, 12)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_slos(raw: object, models: Iterable[str] | None) -> tuple[Slo, ...]:
    """Read ``slos:`` (a list of mappings) from citadel.yaml; a ConfigError names the key.

    ``models`` are the configured models' names; None skips that check (no model configured:
    the embedded ones are checked when they are known, ``services.slos_for``)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("slos", raw, "a list of objectives")
    out: list[Slo] = []
    for i, item in enumerate(raw):
        slo = _slo(item, f"slos[{i}]", None if models is None else set(models))
        if any(s.name == slo.name for s in out):
            raise ConfigError(
                f"slos[{i}]", f"{slo.model} {slo.kind}", "one objective per model and kind"
            )
        out.append(slo)
    return tuple(out)


def _slo(item: object, where: str, known: set[str] | None) -> Slo:
    if not isinstance(item, dict):
        raise ConfigError(where, item, "a mapping with model, kind and objective")
    unknown = set(item) - {"model", "kind", "objective", "threshold_seconds", "days"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{where}.{key}",
            item[key],
            "no such key (model, kind, objective, threshold_seconds, days)",
        )
    model, kind = item.get("model"), item.get("kind", "availability")
    if not isinstance(model, str) or not model or (known is not None and model not in known):
        raise ConfigError(f"{where}.model", model, "a configured model's name")
    if kind not in _SLO_KINDS:
        raise ConfigError(f"{where}.kind", kind, "one of " + ", ".join(_SLO_KINDS))
    objective: Any = item.get("objective")
    if not _number(objective) or not 0 < objective < 100:
        raise ConfigError(f"{where}.objective", objective, "a per cent in (0, 100)")
    threshold: Any = item.get("threshold_seconds", 0.0 if kind == "availability" else 1.0)
    spec = m.GATEWAY_TTFT if kind == "ttft" else m.GATEWAY_TPOT
    if kind == "availability":
        if "threshold_seconds" in item:
            raise ConfigError(
                f"{where}.threshold_seconds", threshold, "no threshold for availability"
            )
    elif not _number(threshold) or float(threshold) not in spec.buckets:
        bounds = ", ".join(f"{b:g}" for b in spec.buckets)
        raise ConfigError(
            f"{where}.threshold_seconds", threshold, f"a bucket bound of {spec.name} ({bounds})"
        )
    days = item.get("days", 30)
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 366:
        raise ConfigError(f"{where}.days", days, "whole days in [1, 366]")
    return Slo(
        model=model,
        kind=kind,
        objective=float(objective),
        threshold_seconds=float(threshold),
        days=days,
    )


def default_slos(models: Sequence[str]) -> tuple[Slo, ...]:
    """Objectives when ``slos:`` is absent: 99.5 % non-5xx and 95 % of TTFT under 1 s."""
    return tuple(
        slo
        for model in models
        for slo in (
            Slo(model=model, kind="availability", objective=99.5),
            Slo(model=model, kind="ttft", objective=95.0, threshold_seconds=1.0),
        )
    )


def le(value: float) -> str:
    """A matcher for bucket bound ``value`` that holds on Prometheus 2 ("1.0") and 3 ("1")."""
    text = repr(float(value))
    short = text[:-2] if text.endswith(".0") else text
    return f'le=~"{short.replace(".", "[.]")}([.]0)?"' if short != text else f'le="{text}"'


def _rate(spec: m.MetricSpec, suffix: str = "", matcher: str = "", window: str = "5m") -> str:
    braces = f"{{{matcher}}}" if matcher else ""
    return f"rate({spec.name}{suffix}{braces}[{window}])"


def slo_error_ratio(slo: Slo, window: str) -> Recorded:
    """The ratio of bad events over ``window`` for one SLO (the SLI's complement)."""
    model = f'model="{slo.model}"'
    if slo.kind == "availability":
        spec = m.GATEWAY_REQUESTS
        total = f"sum({_rate(spec, '', model, window)})"
        # No 5xx series at all is a ratio of 0, not no ratio: `or` fills the missing side.
        bad = f"(sum({_rate(spec, '', f'{model},{_5XX}', window)}) or {total} * 0)"
    else:
        spec = m.GATEWAY_TTFT if slo.kind == "ttft" else m.GATEWAY_TPOT
        good = f"sum({_rate(spec, '_bucket', f'{model},{le(slo.threshold_seconds)}', window)})"
        total = f"sum({_rate(spec, '_count', model, window)})"
        bad = f"({total} - {good})"
    return Recorded(
        name=f"slo:sli_error:ratio_rate{window}",
        expr=f"{bad} / {total}",
        source=spec,
        unit="percentunit",
    )


def _ratio(by: str, part: str, whole: str) -> str:
    """``part / whole`` summed by ``by``, 0 (not absent) where ``part`` has no series yet."""
    total = f"sum by ({by}) ({whole})"
    return f"(sum by ({by}) ({part}) or {total} * 0) / {total}"


def _and(*matchers: str) -> str:
    return ",".join(m for m in matchers if m)


def _quantiles(spec: m.MetricSpec, what: str, model: str) -> list[Recorded]:
    """The buckets' per-deployment 5m rate, recorded once, then p50/p95/p99 read from it (one
    ``rate`` over every bucket series per evaluation instead of one per quantile). A group
    evaluates its rules in order, so each quantile reads the rate of the same evaluation."""
    rate = Recorded(
        name=f"model_deployment_le:{what}_bucket:rate5m",
        expr=f"sum by (model, deployment, le) ({_rate(spec, '_bucket', model)})",
        source=spec,
        unit="reqps",
    )
    selector = f"{rate.name}{{{model}}}" if model else rate.name
    return [rate] + [
        Recorded(
            name=f"model_deployment:{what}:p{q}_5m",
            expr=f"histogram_quantile(0.{q}, {selector})",
            source=spec,
            unit="s",
        )
        for q in ("50", "95", "99")
    ]


def recorded(model: str = "") -> tuple[Recorded, ...]:
    """The recording rules dashboards and alerts read repeatedly (SLO ratios come apart).

    ``model`` is a label matcher (``model="m0"``, ``model!~"m0|m1"``) that every per-model rule
    applies to what it reads: the rule set evaluates them model by model, so that no group
    grows with the number of deployments (``docs/decisions.md`` 39)."""
    req, err = m.GATEWAY_REQUESTS, m.GATEWAY_UPSTREAM_ERRORS
    rules = [
        Recorded(
            name=f"model_deployment:citadel_gateway_requests:rate{w}",
            expr=f"sum by (model, deployment) ({_rate(req, matcher=model, window=w)})",
            source=req,
            unit="reqps",
        )
        for w in ("5m", "1h")
    ]
    rules += [
        Recorded(
            name="model:citadel_gateway_errors:ratio_rate5m",
            expr=_ratio("model", _rate(req, matcher=_and(model, _5XX)), _rate(req, matcher=model)),
            source=req,
            unit="percentunit",
        ),
        Recorded(
            name="model_deployment:citadel_gateway_upstream_errors:rate5m",
            expr=f"sum by (model, deployment, kind) ({_rate(err, matcher=model)})",
            source=err,
            unit="reqps",
        ),
        Recorded(
            name="model_deployment:citadel_gateway_tokens:rate5m",
            expr=(
                "sum by (model, deployment, token_type) "
                f"({_rate(m.GATEWAY_TOKENS_TOTAL, matcher=model)})"
            ),
            source=m.GATEWAY_TOKENS_TOTAL,
            unit="short",
        ),
        Recorded(
            name="tier:citadel_limiter_refusals:ratio_rate5m",
            expr=_ratio(
                "tier", _rate(m.LIMITER_DECISIONS, matcher=_REFUSED), _rate(m.LIMITER_DECISIONS)
            ),
            source=m.LIMITER_DECISIONS,
            unit="percentunit",
            per_model=False,
        ),
        Recorded(
            name="team_model:citadel_business_spend_usd:deriv1h",
            expr=f"sum by (team, model) (deriv({m.BUSINESS_SPEND.name}[1h]))",
            source=m.BUSINESS_SPEND,
            unit="currencyUSD",
            per_model=False,
        ),
    ]
    rules += _quantiles(m.GATEWAY_REQUEST_DURATION, "gen_ai_server_request_duration_seconds", model)
    rules += _quantiles(m.GATEWAY_TTFT, "gen_ai_server_time_to_first_token_seconds", model)
    return tuple(rules)


RECORDED: tuple[Recorded, ...] = recorded()
BY_NAME = {r.name: r for r in RECORDED}


def record(name: str) -> Recorded:
    """The recording rule named ``name``; KeyError names an unknown one."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown recording rule {name!r}") from None
