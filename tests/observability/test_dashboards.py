"""The generated dashboards: every catalogue metric on a panel, the linter's rules, stable uids."""

from __future__ import annotations

import re

from citadel.metrics import CATALOGUE
from citadel.observability.dashboards import DASHBOARDS, grafana_json
from citadel.observability.lint import lint
from citadel.observability.names import BY_NAME


def _exprs() -> list[str]:
    return [q.expr for d in DASHBOARDS for p in d.panels for q in p.queries]


def test_every_catalogue_metric_appears_in_a_panel() -> None:
    text = "\n".join(_exprs())
    read = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    sources = {BY_NAME[n].source.name for n in read if n in BY_NAME}
    missing = []
    for spec in CATALOGUE:
        names = {spec.name, f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        if not (names & read or spec.name in sources):
            missing.append(spec.name)
    assert missing == []


def test_uids_are_unique_and_stable_across_runs() -> None:
    uids = [grafana_json(d)["uid"] for d in DASHBOARDS]
    assert len(set(uids)) == len(uids) == 5
    assert [grafana_json(d) for d in DASHBOARDS] == [grafana_json(d) for d in DASHBOARDS]


def test_linter_rules_hold_with_zero_findings() -> None:
    assert [f for d in DASHBOARDS for f in lint(grafana_json(d))] == []


def test_the_linter_finds_what_it_should() -> None:
    data = grafana_json(DASHBOARDS[0])
    data["panels"][0]["datasource"] = {"type": "prometheus", "uid": "abc123"}
    data["panels"][1]["targets"][0]["expr"] = "rate(x[5m])"
    data["panels"][2]["fieldConfig"]["defaults"].pop("unit")
    found = " ".join(lint(data))
    assert "panel-datasource" in found
    assert "target-rate-interval" in found
    assert "panel-units" in found
