"""The Prometheus rules service (:9094) and the dashboards service (:9093) on ``citadel.web``.

Rules: ``GET /v1/rules`` (the groups as JSON, and the file's YAML text), ``GET /v1/rules/{group}``,
``POST /v1/validate`` (a posted rule file, or the generated one, through the pure checks and,
when installed, ``promtool check rules``). Dashboards: ``GET /v1/dashboards`` and
``GET /v1/dashboards/{uid}`` (Grafana's classic JSON), and the live console at ``/`` with its
query proxy (``citadel.observability.console``). Everything but /health, /metrics, the docs and
the console's static page takes the admin key — or, for the dashboards service's reads, the
read-only key (the panels show per-team spend). The SLOs are the defaults over the
configured models (99.5 % non-5xx, 95 % of TTFT under 1 s).
"""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import msgspec
import yaml
from litestar import Controller, Litestar, get, post
from litestar.params import FromPath, JSONBody

from citadel.errors import NotFound
from citadel.health import DependencyHealth
from citadel.metrics import Registry
from citadel.observability import promtool
from citadel.observability.console import (
    Console,
    ConsoleController,
    ProvisionController,
    console_pages,
)
from citadel.observability.dashboards import BY_UID, DASHBOARDS, grafana_json
from citadel.observability.grafana import GrafanaError, differing
from citadel.observability.names import Slo, default_slos
from citadel.observability.rules import rule_groups, rules_yaml
from citadel.settings import Settings
from citadel.web import Injected, Struct, create_service, errors, provide

__all__ = ["ObservabilityDeps", "create_dashboards_app", "create_rules_app", "default_deps"]


@dataclass(slots=True, kw_only=True)
class ObservabilityDeps:
    """What both services read: the SLOs and their metrics registry."""

    slos: tuple[Slo, ...]
    registry: Registry = field(default_factory=Registry)
    console: Console | None = None  # None: made from the settings by create_dashboards_app


def default_deps(settings: Settings) -> ObservabilityDeps:
    return ObservabilityDeps(slos=default_slos([mo.name for mo in settings.models]))


class RuleSet(Struct):
    groups: list[dict[str, Any]]
    yaml: str


class Validate(Struct):
    rules: str | None = msgspec.field(default=None)


class Validation(Struct):
    valid: bool
    findings: list[str]
    promtool: str | None


def pure_findings(text: str) -> list[str]:
    """What a rule file must satisfy without promtool: YAML, groups, and complete alerts."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"not YAML: {exc}"]
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        return ["expected a mapping with a list of groups"]
    found = []
    for group in doc["groups"]:
        rules = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(rules, list):
            found.append(f"group {group!r}: expected a name and a list of rules")
            continue
        for rule in rules:
            if not isinstance(rule, dict) or "alert" not in rule:
                continue
            name = f"{group.get('name')}/{rule['alert']}"
            if not rule.get("for"):
                found.append(f"{name}: no for")
            labels = rule.get("labels") or {}
            found += [f"{name}: no {k} label" for k in ("severity", "service") if k not in labels]
            notes = rule.get("annotations") or {}
            found += [
                f"{name}: no {k} annotation"
                for k in ("summary", "description", "runbook_url")
                if k not in notes
            ]
    return found


class RulesController(Controller):
    path = "/v1"
    tags = ("rules",)

    @get("/rules", summary="Every generated rule group, as JSON and as the rule file's YAML")
    async def list_rules(self, slos: Injected[tuple[Slo, ...]]) -> RuleSet:
        return RuleSet(groups=rule_groups(slos), yaml=rules_yaml(slos))

    @get("/rules/{group:str}", summary="One rule group", responses=errors(404))
    async def get_group(
        self, group: FromPath[str], slos: Injected[tuple[Slo, ...]]
    ) -> dict[str, Any]:
        for g in rule_groups(slos):
            if g["name"] == group:
                return g
        raise NotFound(f"No rule group {group!r}.", param="group")

    @post("/validate", summary="Check a rule file (or the generated one)", status_code=200)
    async def validate(
        self, data: JSONBody[Validate], slos: Injected[tuple[Slo, ...]]
    ) -> Validation:
        text = data.rules if data.rules is not None else rules_yaml(slos)
        findings = pure_findings(text)
        output = None
        if promtool.available():
            outcome = await asyncio.to_thread(promtool.check_text, text)
            output = outcome.output
            if not outcome.ok:
                findings.append("promtool check rules failed")
        return Validation(valid=not findings, findings=findings, promtool=output)


class Summary(Struct):
    uid: str
    title: str
    panels: int


class DashboardsController(Controller):
    path = "/v1/dashboards"
    tags = ("dashboards",)

    @get(summary="The generated dashboards")
    async def list_dashboards(self) -> list[Summary]:
        return [Summary(uid=d.uid, title=d.title, panels=len(d.panels)) for d in DASHBOARDS]

    @get("/{uid:str}", summary="One dashboard as Grafana JSON", responses=errors(404))
    async def get_dashboard(self, uid: FromPath[str]) -> dict[str, Any]:
        board = BY_UID.get(uid)
        if board is None:
            raise NotFound(f"No dashboard {uid!r}.", param="uid")
        return grafana_json(board)


def _reachable(url: str | None, path: str) -> Any:
    async def check() -> DependencyHealth:
        if not url:
            return DependencyHealth(status="disabled", detail="not configured")

        def probe() -> None:
            with urllib.request.urlopen(url.rstrip("/") + path, timeout=1.5):
                pass

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            return DependencyHealth(status="down", detail=f"unreachable: {exc}")
        return DependencyHealth(status="ok")

    return check


def _grafana_sync(console: Console) -> Any:
    """Grafana reachable, and whether its dashboards are the generated ones (degraded if not)."""

    async def check() -> DependencyHealth:
        if console.grafana is None:
            return DependencyHealth(status="disabled", detail="not configured")
        try:
            stale = await differing(console.grafana)
        except GrafanaError as exc:
            return DependencyHealth(status="down", detail=str(exc))
        if stale:
            names = ", ".join(stale)
            return DependencyHealth(
                status="degraded", detail=f"not as generated: {names} (POST /v1/provision)"
            )
        return DependencyHealth(status="ok", detail="every dashboard as generated")

    return check


def create_rules_app(settings: Settings, deps: ObservabilityDeps) -> Litestar:
    return create_service(
        "prometheus-rules",
        title="Citadel Prometheus rules",
        settings=settings,
        registry=deps.registry,
        admin=[RulesController],
        dependencies={"slos": provide(deps.slos)},
        health={"prometheus": _reachable(settings.endpoints.prometheus, "/-/ready")},
    )


def create_dashboards_app(settings: Settings, deps: ObservabilityDeps) -> Litestar:
    console = deps.console or Console.from_settings(settings)
    return create_service(
        "grafana-dashboards",
        title="Citadel dashboards",
        settings=settings,
        registry=deps.registry,
        admin=[ProvisionController],
        readers=[DashboardsController, ConsoleController],
        public=console_pages(),
        dependencies={"console": provide(console)},
        on_shutdown=[console.aclose],
        health={
            "prometheus": _reachable(settings.endpoints.prometheus, "/-/ready"),
            "grafana": _grafana_sync(console),
        },
    )
