"""Grafana's dashboard-linter rules, ported, with the exclusions its docs give: a query over a
recording rule needs no job/instance matcher. Pure: one dashboard's JSON in, findings out."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

_RANGE = re.compile(r"\[([^\]]+)\]")
_DS = {"type": "prometheus", "uid": "${datasource}"}
_LABELS = ("model", "deployment", "team")


def _target(where: str, target: dict[str, Any]) -> Iterator[str]:
    expr = target["expr"]
    if target.get("datasource") != _DS:
        yield f"{where}: target-datasource (not ${{datasource}})"
    for window in _RANGE.findall(expr):
        if window != "$__rate_interval":
            yield f"{where}: target-rate-interval ([{window}], not $__rate_interval)"
    for name in _LABELS:
        if f"${name}" in expr and not re.search(rf'{name}(_name)?=~"\${name}"', expr):
            yield f"{where}: template-label-promql (${name} outside its label)"


def lint(data: dict[str, Any]) -> list[str]:
    """Every finding on one dashboard; an empty list is a clean dashboard."""
    return list(_findings(data))


def _findings(data: dict[str, Any]) -> Iterator[str]:
    uid = data.get("uid", "?")
    variables = {v["name"]: v for v in data.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        yield f"{uid}: template-datasource (no datasource variable)"
    panels_text = json.dumps(data.get("panels", []))
    for name, v in variables.items():
        if name == "datasource":
            continue
        if v.get("datasource", {}).get("uid") != "${datasource}":
            yield f"{uid}: template {name} hard-codes its datasource"
        if f"${name}" not in panels_text:
            yield f"{uid}: template {name} is not used"
    for panel in data.get("panels", []):
        where = f"{uid}/{panel.get('title')}"
        if panel.get("datasource") != _DS:
            yield f"{where}: panel-datasource (not ${{datasource}})"
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            yield f"{where}: panel-units (no unit)"
        if not panel.get("targets"):
            yield f"{where}: no query"
        for target in panel.get("targets", []):
            yield from _target(where, target)
