"""The usage ledger as the default rules' source (no Prometheus): per-model request rate, 5xx
ratio and p95 latency, and each team's budget use, from a real SQLite ledger and accounts store;
the default rule set without Prometheus reads them."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from citadel.accounts.sql import open_store
from citadel.alerting.app import alerting_settings
from citadel.alerting.defaults import DEFAULT_NAMES, LEDGER_ONLY
from citadel.alerting.definitions import LedgerQuery, parse_alerting
from citadel.alerting.ledger import LedgerMetrics, percentile
from citadel.cli import embedded_models
from citadel.metering.events import UsageEvent, new_event_id
from citadel.metering.ledger import Ledger
from citadel.metering.migrate import LEDGER
from citadel.settings import load_settings
from citadel.stores.sql import build_engine

from support import scratch_postgres

T0 = 1_764_547_200.0 + 10 * 86400  # 2025-12-11 00:00 UTC: mid-month


def event(t: float, *, model: str = "chat", status: int = 200, team: str = "", cost: int = 0,
          latency: float = 0.2) -> UsageEvent:  # fmt: skip
    return UsageEvent(
        event_id=new_event_id(t), time=t, request_id=uuid.uuid4().hex, user="usr_a", team=team,
        key_id="k", tier="free", endpoint="/v1/chat/completions", model=model, deployment="d",
        prompt_tokens=1, completion_tokens=1, latency_seconds=latency, ttft_seconds=None,
        status=status, streamed=False, cancelled=False, usage_estimated=False, cost_micros=cost,
    )  # fmt: skip


def test_the_default_rules_without_prometheus_read_the_ledger_and_add_the_budget() -> None:
    settings = load_settings(None, {})
    settings = settings.with_models(embedded_models(settings))
    rules = alerting_settings(settings).rules
    assert [*DEFAULT_NAMES, *LEDGER_ONLY] == [r.name for r in rules]
    assert all(r.ledger is not None and r.query is None for r in rules)
    metrics = [r.ledger.metric for r in rules if r.ledger is not None]
    assert ["model_request_rate", "model_error_ratio", "model_ttft_p95", "team_budget_use"] == (
        metrics
    )
    assert [15.0, 15.0, 30.0, 150.0] == [r.step_seconds for r in rules]
    budget = rules[-1]
    assert (1.0, None, "linear") == (budget.threshold, budget.horizon_seconds, budget.model)
    fast = dataclasses.replace(settings, alerting={"interval_seconds": 1})
    assert [1.0, 1.0, 1.0, 5.0] == [r.step_seconds for r in alerting_settings(fast).rules]
    prom = load_settings(None, {"PROMETHEUS_ENDPOINT": "http://127.0.0.1:9090"})
    prom = prom.with_models(embedded_models(prom))
    assert list(DEFAULT_NAMES) == [r.name for r in alerting_settings(prom).rules]


def test_ledger_metric_keys_are_checked() -> None:
    from citadel.errors import ConfigError

    def rule(ledger: dict[str, str]) -> dict[str, object]:
        return {"name": "R", "kind": "anomaly", "ledger": ledger}

    [ok] = parse_alerting({"rules": [rule({"metric": "model_error_ratio", "model": "m"})]}).rules
    assert LedgerQuery(metric="model_error_ratio", model="m") == ok.ledger
    with pytest.raises(ConfigError, match=r"alerting\.rules\[0\]\.ledger\.team"):
        parse_alerting({"rules": [rule({"metric": "model_error_ratio", "team": "t"})]})
    with pytest.raises(ConfigError, match=r"alerting\.rules\[0\]\.ledger\.model"):
        parse_alerting({"rules": [rule({"metric": "team_budget_use", "model": "m"})]})
    with pytest.raises(ConfigError, match=r"alerting\.rules\[0\]\.ledger\.team"):
        parse_alerting({"rules": [rule({"metric": "team_spend"})]})


def test_percentile_is_within_five_percent() -> None:
    import numpy as np

    from citadel.alerting.ledger import _BINS, _bin

    hist = np.zeros(_BINS)
    for ms in range(1, 1001):  # 1..1000 ms: p95 = 950 ms
        hist[_bin(float(ms))] += 1
    p95 = percentile(hist, 0.95)
    assert p95 is not None
    assert abs(p95 - 0.95) / 0.95 < 0.05
    assert percentile(np.zeros(_BINS), 0.95) is None


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty ledger database: SQLite in a file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'citadel.db'}"
        return
    with scratch_postgres() as uri:
        yield uri


def test_series_from_a_real_ledger_read_each_event_once(ledger_uri: str) -> None:
    """On SQLite and on PostgreSQL (the two stores ``citadel up`` and a deployment use)."""
    uri = ledger_uri
    settings = load_settings(None, {})

    async def run() -> None:
        await LEDGER.upgrade(uri)
        store = await open_store(uri, migrate=True)
        team = await store.create_team("Spenders")
        await store.set_team_budget(team.id, 10_000_000)  # $10
        idle = await store.create_team("Idle")
        await store.set_team_budget(idle.id, 10_000_000)
        engine = build_engine(uri)
        ledger = Ledger(engine)
        # 60 s of 10 req/s on "chat", a 5xx burst in seconds 40-49; "code" from second 30
        events = [event(T0 + s + i / 10, status=500 if 40 <= s < 50 and i < 5 else 200,
                        team=team.id, cost=10_000, latency=0.1 + s / 100)
                  for s in range(60) for i in range(10)]  # fmt: skip
        events += [event(T0 + s, model="code") for s in range(30, 60)]
        clock = [0.0]
        metrics = LedgerMetrics(engine, store, settings, settle_seconds=2.0, clock=lambda: clock[0])
        try:
            await ledger.write([e for e in events if e.time < T0 + 30])
            rate = LedgerQuery(metric="model_request_rate")
            [chat] = await metrics.series(rate, step=10.0, lookback=600.0, now=T0 + 32.0)
            assert [T0 + 10, T0 + 20, T0 + 30] == list(chat.times)  # [0, 30) settled
            assert [10.0, 10.0, 10.0] == list(chat.values)
            await ledger.write([e for e in events if e.time >= T0 + 30])
            by_model = await metrics.series(rate, step=10.0, lookback=600.0, now=T0 + 62.0)
            assert ["chat", "code"] == [s.labels["model"] for s in by_model]
            assert [10.0] * 6 == list(by_model[0].values)  # read once each, not twice
            assert [T0 + 40, T0 + 50, T0 + 60] == list(by_model[1].times)  # from its first
            assert [1.0] * 3 == list(by_model[1].values)  # one a second
            errors = LedgerQuery(metric="model_error_ratio", model="chat")
            [ratio] = await metrics.series(errors, step=10.0, lookback=600.0, now=T0 + 62.0)
            assert [0.0, 0.0, 0.0, 0.0, 0.5, 0.0] == list(ratio.values)
            latency = LedgerQuery(metric="model_latency_p95", model="chat")
            [p95] = await metrics.series(latency, step=10.0, lookback=600.0, now=T0 + 62.0)
            assert 0.1 < p95.values[0] < p95.values[-1] < 0.75  # the latency rises
            budget = LedgerQuery(metric="team_budget_use")
            [use] = await metrics.series(budget, step=10.0, lookback=600.0, now=T0 + 62.0)
            assert team.id == use.labels["team"]
            assert "10" == use.labels["budget_usd"]
            assert [T0 + 10 * k for k in range(1, 7)] == list(use.times)  # from its first spend
            assert [k / 10 for k in range(1, 7)] == [round(v, 6) for v in use.values]
        finally:
            await engine.dispose()
            await store.aclose()

    asyncio.run(run())


def test_citadel_up_wiring_on_postgresql_reads_the_ledger_the_gateway_writes() -> None:
    """``citadel up`` starts every service with the same ``--config`` and environment: with
    ``SQL_DATABASE_ENDPOINT`` (PostgreSQL) and no Prometheus, the predictive-alerting service's
    own wiring (``default_deps``) reads the ledger the gateway writes there (the gateway's
    database, ``metering.database or accounts.database``), and its default rules evaluate."""
    from citadel.alerting.app import AlertingDeps, default_deps
    from citadel.alerting.engine import Evaluator, LedgerSource

    with scratch_postgres() as uri:
        settings = load_settings(None, {"SQL_DATABASE_ENDPOINT": uri})
        settings = settings.with_models(embedded_models(settings))
        assert settings.endpoints.prometheus is None
        ledger_db = settings.metering.database or settings.accounts.database
        assert uri == ledger_db  # the gateway's ledger (citadel.gateway.app)

        async def run() -> None:
            await LEDGER.upgrade(uri)
            store = await open_store(uri, migrate=True)
            engine = build_engine(ledger_db)
            deps: AlertingDeps | None = None
            try:
                team = await store.create_team("Spenders")
                await store.set_team_budget(team.id, 1_000_000)  # $1
                now = time.time()
                start = math.floor((now - 300) / 15) * 15
                await Ledger(engine).write(
                    [event(start + s, model="sim-chat", team=team.id, cost=1_000,
                           status=500 if s % 10 == 0 else 200) for s in range(240)]
                )  # fmt: skip
                deps = default_deps(settings)
                assert deps.ledger_metrics is not None
                assert deps.spend is not None
                source = LedgerSource(deps.spend, deps.ledger_metrics)
                evaluator = Evaluator(detector_factory=deps.detector_factory)
                found = {}
                for rule in alerting_settings(settings).rules:
                    series = await source.fetch(rule, now=now)
                    found[rule.name] = (series, evaluator.evaluate(rule, series, now=now))
                [rate], _ = found["ModelRequestRateAnomaly"]
                assert "sim-chat" == rate.labels["model"]
                assert len(rate.values) >= 10
                assert max(rate.values) > 0
                [ratio], _ = found["ModelErrorRatioAnomaly"]
                assert any(0.0 < v < 1.0 for v in ratio.values)  # one in ten a 5xx
                [use], budget = found["TeamBudgetForecast"]
                assert team.id == use.labels["team"]
                assert 0 < use.values[-1] <= 0.24  # $0.24 at most of the $1
                assert budget.error is None
                assert all(e.error is None for _, e in found.values())
            finally:
                if deps is not None:
                    for close in reversed(deps.close):
                        await close()
                await engine.dispose()
                await store.aclose()

        asyncio.run(run())
