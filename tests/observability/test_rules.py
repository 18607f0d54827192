"""The generated rules: promtool check + a firing and a quiet promtool case for every alert,
detection times on synthetic series, and SLO input errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from citadel import metrics as m
from citadel.errors import ConfigError
from citadel.observability import promtool
from citadel.observability.names import Slo, default_slos, parse_slos
from citadel.observability.rules import alerts, promtool_tests, rule_groups, rules_yaml, slo_alerts

SLOS = default_slos(["sim-chat"])
RUNBOOKS = Path(__file__).parents[2] / "docs" / "runbooks.md"
pytestmark = pytest.mark.skipif(not promtool.available(), reason="promtool not installed")


def _only(alert_name: str, slo: Slo, which: str) -> dict[str, object]:
    doc = promtool_tests([slo])
    doc["tests"] = [t for t in doc["tests"] if t["name"].startswith(f"{alert_name} {which}")]
    assert doc["tests"], alert_name
    return doc


def test_promtool_check_rules_accepts_the_generated_set() -> None:
    outcome = promtool.check_text(rules_yaml(SLOS))
    assert outcome.ok, outcome.output
    assert "SUCCESS" in outcome.output


def test_every_alert_has_a_firing_and_a_quiet_case_and_they_pass() -> None:
    doc = promtool_tests(SLOS)
    names = {a.name for a in alerts(SLOS)}
    for name in names:
        cases = [t["name"] for t in doc["tests"] if t["name"].split()[0] == name]
        assert any("fires" in c for c in cases), name
        assert any("quiet" in c for c in cases), name
    outcome = promtool.run_tests(SLOS)
    assert outcome.ok, outcome.output


def test_every_alert_is_complete_and_has_a_runbook_section() -> None:
    text = RUNBOOKS.read_text()
    anchors = set(re.findall(r"^## (\S+)", text, re.M))
    for group in rule_groups(SLOS):
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["for"], rule["alert"]
            assert re.search(r"[<>=]=?", rule["expr"]), rule["alert"]
            assert {"severity", "service"} <= set(rule["labels"])
            notes = rule["annotations"]
            assert notes["summary"]
            assert "{{" in notes["description"]
            assert rule["alert"] in anchors, f"docs/runbooks.md has no section {rule['alert']}"
            assert notes["runbook_url"].endswith("#" + rule["alert"].lower())


def test_rules_use_no_function_prometheus_3_renamed() -> None:
    text = rules_yaml(SLOS)
    assert "holt_winters" not in text
    assert "double_exponential" not in text
    assert 'le="1.0"' not in text  # 3.x normalises bucket bounds to "1"


def test_a_full_outage_of_a_999_slo_pages_within_two_minutes() -> None:
    slo = Slo(model="m", kind="availability", objective=99.9)
    page = next(a for a in slo_alerts(slo) if a.severity == "page")
    assert page.fire.at == "2m"
    assert page.fire.series[1][1].startswith("0+1000.0x")
    outcome = promtool.run_tests([slo], _only("CitadelSLOBurnRatePage", slo, "fires"))
    assert outcome.ok, outcome.output


def test_a_steady_1x_burn_for_six_hours_never_pages() -> None:
    slo = Slo(model="m", kind="availability", objective=99.9)
    doc = _only("CitadelSLOBurnRatePage", slo, "stays quiet")
    series = doc["tests"][0]["input_series"]  # type: ignore[index]
    series[0]["values"], series[1]["values"] = "0+999x720", "0+1x720"  # exactly the budget
    checks = doc["tests"][0]["promql_expr_test"]  # type: ignore[index]
    checks[:] = [{**checks[0], "eval_time": f"{t}m"} for t in range(30, 361, 30)]
    outcome = promtool.run_tests([slo], doc)
    assert outcome.ok, outcome.output


def test_the_budget_forecast_fires_six_hours_before_the_budget_is_spent() -> None:
    forecast = next(a for a in alerts(()) if a.name == "CitadelTeamBudgetForecast")
    step = float(forecast.fire.series[0][1].split("+")[1].split("x")[0])
    spent_at_hours = (1 / step) * 5 / 60  # 5 m steps
    fires_at_hours = int(forecast.fire.at.rstrip("h"))
    assert spent_at_hours - fires_at_hours >= 6
    assert forecast.quiet.series[0][1].startswith("0.5x")  # flat spend


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ([{"model": "sim-chat", "objective": 100}], "slos[0].objective"),
        ([{"model": "sim-chat", "objective": 0}], "slos[0].objective"),
        ([{"model": "nope", "objective": 99}], "slos[0].model"),
        (
            [{"model": "sim-chat", "kind": "ttft", "objective": 95, "threshold_seconds": 0.3}],
            "slos[0].threshold_seconds",
        ),
        ([{"model": "sim-chat", "objective": 99, "colour": 1}], "slos[0].colour"),
        ({"model": "sim-chat"}, "slos"),
    ],
)
def test_bad_slos_are_a_config_error_naming_the_key(raw: object, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_slos(raw, ["sim-chat"])


def test_parsed_slos_generate_one_group_each() -> None:
    slos = parse_slos(
        [
            {"model": "sim-chat", "objective": 99.9},
            {"model": "sim-chat", "kind": "ttft", "objective": 95, "threshold_seconds": 0.5},
        ],
        ["sim-chat"],
    )
    groups = yaml.safe_load(rules_yaml(slos))["groups"]
    assert [g["name"] for g in groups][2:] == [
        "citadel-slo-sim-chat-availability",
        "citadel-slo-sim-chat-ttft",
        "citadel-recording-sim-chat",
    ]
    assert 'le="0.5"' in yaml.safe_dump(groups[3])


def test_an_slo_with_no_failures_records_a_ratio_of_zero_not_nothing() -> None:
    """No 5xx series at all (a healthy model) is an error ratio of 0, and a budget left of 1;
    without it the ratio, the budget panel and the burn alerts would have no series."""
    slo = Slo(model="m", kind="availability", objective=99.9)
    name = 'citadel_gateway_requests_total{endpoint="chat",model="m",deployment="m-a"'
    case = {
        "interval": "30s",
        "input_series": [{"series": name + ',status="200"}', "values": "0+10x40"}],
        "promql_expr_test": [
            {
                "expr": f'{r}{{slo="m-availability"}}',
                "eval_time": "10m",
                "exp_samples": [
                    {
                        "labels": f'{r}{{model="m",slo="m-availability",slo_kind="availability"}}',
                        "value": v,
                    }
                ],
            }
            for r, v in (("slo:sli_error:ratio_rate5m", 0), ("slo:error_budget_remaining:ratio", 1))
        ],
    }
    outcome = promtool.run_tests([slo], {"rule_files": ["citadel.rules.yml"], "tests": [case]})
    assert outcome.ok, outcome.output


def test_recording_rules_cover_every_model_once_whether_it_has_its_own_group_or_not() -> None:
    """The per-deployment rules run model by model (``citadel-recording-m``) and, for any model
    not configured, in ``citadel-recording``: each series is recorded exactly once, and the
    quantiles read the bucket rate recorded in the same evaluation."""
    slo = Slo(model="m.1", kind="availability", objective=99.9)
    spec = m.GATEWAY_REQUEST_DURATION
    series = []
    for model in ("m.1", "m21", "other"):  # m21 would match an unescaped "m.1"
        route = f'model="{model}",deployment="{model}-a"'
        series.append(
            {"series": f'{m.GATEWAY_REQUESTS.name}{{{route},status="200"}}', "values": "0+30x40"}
        )
        # Every request in the second bucket: p99 is inside it, the same for every model.
        for bound in spec.buckets:
            count = "0+0x40" if bound == spec.buckets[0] else "0+30x40"
            series.append(
                {
                    "series": f'{spec.name}_bucket{{endpoint="chat",{route},le="{bound!r}"}}',
                    "values": count,
                }
            )
        series.append(
            {
                "series": f'{spec.name}_bucket{{endpoint="chat",{route},le="+Inf"}}',
                "values": "0+30x40",
            }
        )
    p99 = "model_deployment:gen_ai_server_request_duration_seconds:p99_5m"
    rate = "model_deployment:citadel_gateway_requests:rate5m"
    low, high = spec.buckets[0], spec.buckets[1]
    expected = low + (high - low) * 0.99
    case = {
        "interval": "30s",
        "input_series": series,
        "promql_expr_test": [
            {
                "expr": f"count by (model) ({name})",
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": f'{{model="{model}"}}', "value": 1}
                    for model in ("m.1", "m21", "other")
                ],
            }
            for name in (p99, rate)
        ]
        + [
            {
                "expr": f'{p99}{{model="{model}"}}',
                "eval_time": "10m",
                "exp_samples": [
                    {
                        "labels": f'{p99}{{model="{model}",deployment="{model}-a"}}',
                        "value": expected,
                    }
                ],
            }
            for model in ("m.1", "other")
        ],
    }
    outcome = promtool.run_tests([slo], {"rule_files": ["citadel.rules.yml"], "tests": [case]})
    assert outcome.ok, outcome.output
    # Not evaluated twice either: the shared group leaves the configured model out.
    shared = rule_groups([slo])[0]["rules"]
    assert all('model!~"m[.]1"' in r["expr"] for r in shared if r["record"].startswith("model"))


def test_each_platform_alerts_runbook_shows_its_expression_as_generated() -> None:
    """The runbook quotes each platform alert's expression; a changed rule must change it."""
    text = RUNBOOKS.read_text()
    for alert in alerts(()):
        section = text.split(f"## {alert.name}\n", 1)[1].split("\n## ", 1)[0]
        assert f"**Expression:** `{alert.expr}`" in section, alert.name
