"""``slos:`` and ``observability:`` in citadel.yaml: read at settings load, each bad value a
ConfigError naming its key, and fed to the multi-window, multi-burn-rate rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from citadel.cli import embedded_models
from citadel.errors import ConfigError
from citadel.observability.names import Slo
from citadel.observability.rules import rule_groups
from citadel.observability.services import default_deps, slos_for
from citadel.settings import Settings, load_settings

MODELS = [
    {"name": "chat", "deployments": [{"url": "http://127.0.0.1:8100"}]},
    {"name": "embed", "kind": "embedding", "deployments": [{"url": "http://127.0.0.1:8100"}]},
]


def settings(tmp_path: Path, **doc: Any) -> Settings:
    path = tmp_path / "citadel.yaml"
    path.write_text(yaml.safe_dump({"env": "test", **doc}))
    return load_settings(str(path), {})


def test_slos_are_read_and_become_one_rule_group_each(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        models=MODELS,
        slos=[
            {"model": "chat", "objective": 99.9, "days": 28},
            {"model": "chat", "kind": "ttft", "objective": 95, "threshold_seconds": 0.5},
            {"model": "chat", "kind": "tpot", "objective": 90, "threshold_seconds": 0.05},
        ],
    )
    assert s.slos == (
        Slo(model="chat", kind="availability", objective=99.9, days=28),
        Slo(model="chat", kind="ttft", objective=95.0, threshold_seconds=0.5),
        Slo(model="chat", kind="tpot", objective=90.0, threshold_seconds=0.05),
    )
    groups = {g["name"]: g for g in rule_groups(slos_for(s))}
    availability = groups["citadel-slo-chat-availability"]["rules"]
    budget = next(r for r in availability if r["record"] == "slo:error_budget_remaining:ratio")
    assert "[28d]" in budget["expr"]
    assert "/ 0.001" in budget["expr"]
    page = next(r for r in availability if r.get("alert") == "CitadelSLOBurnRatePage")
    assert "(14.4 * 0.001)" in page["expr"]
    assert "(6.0 * 0.001)" in page["expr"]
    assert 'le="0.05"' in str(groups["citadel-slo-chat-tpot"])


def test_without_slos_every_model_gets_availability_and_token_models_ttft(tmp_path: Path) -> None:
    s = settings(tmp_path, models=MODELS)
    assert s.slos is None
    assert [(x.model, x.kind) for x in slos_for(s)] == [
        ("chat", "availability"),
        ("chat", "ttft"),
        ("embed", "availability"),
    ]


def test_the_speedup_reaches_the_rules_service(tmp_path: Path) -> None:
    s = settings(tmp_path, models=MODELS, observability={"speedup": 60})
    deps = default_deps(s)
    assert deps.speedup == 60
    [group] = [g for g in rule_groups(deps.slos, speedup=deps.speedup) if "chat-avail" in g["name"]]
    assert group["interval"] == "1s"
    assert "[60s]" in group["rules"][2]["expr"]  # the 1 h window, a minute at 60x


@pytest.mark.parametrize(
    ("doc", "key", "expected"),
    [
        ({"slos": [{"model": "chat", "objective": 100}]}, "slos[0].objective", "(0, 100)"),
        ({"slos": [{"model": "chat", "objective": 0}]}, "slos[0].objective", "(0, 100)"),
        ({"slos": [{"model": "chat", "objective": -5}]}, "slos[0].objective", "(0, 100)"),
        ({"slos": [{"model": "chat", "objective": True}]}, "slos[0].objective", "(0, 100)"),
        ({"slos": [{"model": "chat", "objective": "99.9"}]}, "slos[0].objective", "(0, 100)"),
        ({"slos": [{"model": "chat"}]}, "slos[0].objective", "(0, 100)"),
        ({"slos": [{"model": "gpt-9", "objective": 99}]}, "slos[0].model", "configured model"),
        ({"slos": [{"objective": 99}]}, "slos[0].model", "configured model"),
        ({"slos": [{"model": "chat", "kind": "uptime", "objective": 99}]}, "slos[0].kind", "ttft"),
        (
            {
                "slos": [
                    {"model": "chat", "kind": "ttft", "objective": 95, "threshold_seconds": 0.3}
                ]
            },
            "slos[0].threshold_seconds",
            "a bucket bound of gen_ai_server_time_to_first_token_seconds (0.001, ",
        ),
        (
            {"slos": [{"model": "chat", "objective": 99, "threshold_seconds": 1}]},
            "slos[0].threshold_seconds",
            "no threshold for availability",
        ),
        ({"slos": [{"model": "chat", "objective": 99, "days": 0}]}, "slos[0].days", "[1, 366]"),
        ({"slos": [{"model": "chat", "objective": 99, "days": 7.5}]}, "slos[0].days", "[1, 366]"),
        ({"slos": [{"model": "chat", "objective": 99, "colour": 1}]}, "slos[0].colour", "no such"),
        (
            {"slos": [{"model": "chat", "objective": 99}, {"model": "chat", "objective": 98}]},
            "slos[1]",
            "one objective per model and kind",
        ),
        ({"slos": {"model": "chat"}}, "slos", "a list of objectives"),
        ({"slos": ["chat"]}, "slos[0]", "a mapping"),
        ({"observability": {"speedup": 0}}, "observability.speedup", "a number > 0"),
        ({"observability": {"speedup": 10_000}}, "observability.speedup", "up to 3600"),
        ({"observability": {"rules_directory": "x"}}, "observability.rules_directory", "known"),
    ],
)
def test_bad_slos_and_observability_settings_name_the_key(
    tmp_path: Path, doc: dict[str, Any], key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, models=MODELS, **doc)
    assert caught.value.key == key
    assert expected in str(caught.value)


def test_with_embedded_models_an_slo_is_checked_against_them(tmp_path: Path) -> None:
    good = settings(tmp_path, slos=[{"model": "sim-chat", "objective": 99}])
    assert [s.model for s in slos_for(good.with_models(embedded_models(good)))] == ["sim-chat"]
    bad = settings(tmp_path, slos=[{"model": "chat", "objective": 99}])  # loads: no models yet
    with pytest.raises(ConfigError, match=re.escape("slos[0].model")):
        slos_for(bad.with_models(embedded_models(bad)))
