"""Every generated dashboard is a valid model of grafana-foundation-sdk: its JSON decodes into
the SDK's typed ``Dashboard`` and encodes back to the same JSON (but for the interval-variable
fields the SDK writes on every variable, which ``grafana_json`` drops)."""

from __future__ import annotations

import json

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as gm

from citadel.observability.dashboards import DASHBOARDS, INTERVAL_ONLY, Dashboard, grafana_json


@pytest.mark.parametrize("board", DASHBOARDS, ids=lambda b: b.uid)
def test_each_dashboard_round_trips_through_the_sdks_model(board: Dashboard) -> None:
    data = grafana_json(board)
    model = gm.Dashboard.from_json(data)
    again = json.loads(json.dumps(model, cls=JSONEncoder))
    for variable in again["templating"]["list"]:
        for key in INTERVAL_ONLY:
            assert variable.pop(key) is not None  # the SDK's defaults, dropped by grafana_json
    assert again == data
    assert model.uid == board.uid
    assert len(model.panels or []) == len(board.panels)
