"""The Prometheus rules service (:9094) and the dashboards service (:9093) on ``citadel.web``.

Rules: ``GET /v1/rules`` (the groups as JSON, and the file's YAML text), ``GET /v1/rules/{group}``,
``POST /v1/validate`` (a posted rule file, or the generated one, through the pure checks and,
when installed, ``promtool check rules``). Dashboards: ``GET /v1/dashboards`` and
``GET /v1/dashboards/{uid}`` (Grafana's classic JSON), and the live console at ``/`` with its
query proxy (``citadel.observability.console``). Everything but /health, /metrics, the docs and
the console's static page takes the admin key — or, for the dashboards service's reads, the
read-only key (the panels show per-team spend). The SLOs are the defaults over the configured
models (99.5 % non-5xx, 95 % of TTFT under 1 s) unless ``slos:`` sets them.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from litestar import Controller, Litestar, get, post
from litestar.params import FromPath, JSONBody

from citadel.errors import BadRequest, ConfigError, NotFound, Unavailable, UpstreamError
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

__all__ = [
    "ObservabilityDeps",
    "create_dashboards_app",
    "create_rules_app",
    "default_deps",
    "slos_for",
]


@dataclass(slots=True, kw_only=True)
class ObservabilityDeps:
    """What both services read: the SLOs, the rules' speed-up and their metrics registry."""

    slos: tuple[Slo, ...]
    speedup: float = 1.0
    registry: Registry = field(default_factory=Registry)
    console: Console | None = None  # None: made from the settings by create_dashboards_app


def slos_for(settings: Settings) -> tuple[Slo, ...]:
    """The objectives of this installation: ``slos:`` when given (each model checked against
    the models served, the embedded ones included), else the defaults: 99.5 % non-5xx for
    every model and 95 % of first tokens within 1 s for every model that streams tokens."""
    served = {mo.name: mo.kind for mo in settings.models}
    if settings.slos is not None:
        for i, slo in enumerate(settings.slos):
            if slo.model not in served:
                raise ConfigError(f"slos[{i}].model", slo.model, "a configured model's name")
        return settings.slos
    return tuple(
        slo
        for slo in default_slos(list(served))
        if slo.kind == "availability" or served[slo.model] != "embedding"
    )


def default_deps(settings: Settings) -> ObservabilityDeps:
    return ObservabilityDeps(slos=slos_for(settings), speedup=settings.observability.speedup)


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
    async def list_rules(
        self, slos: Injected[tuple[Slo, ...]], speedup: Injected[float]
    ) -> RuleSet:
        return RuleSet(
            groups=rule_groups(slos, speedup=speedup), yaml=rules_yaml(slos, speedup=speedup)
        )

    @get("/rules/{group:str}", summary="One rule group", responses=errors(404))
    async def get_group(
        self, group: FromPath[str], slos: Injected[tuple[Slo, ...]], speedup: Injected[float]
    ) -> dict[str, Any]:
        for g in rule_groups(slos, speedup=speedup):
            if g["name"] == group:
                return g
        raise NotFound(f"No rule group {group!r}.", param="group")

    @post("/validate", summary="Check a rule file (or the generated one)", status_code=200)
    async def validate(
        self, data: JSONBody[Validate], slos: Injected[tuple[Slo, ...]], speedup: Injected[float]
    ) -> Validation:
        text = data.rules if data.rules is not None else rules_yaml(slos, speedup=speedup)
        findings = pure_findings(text)
        output = None
        if promtool.available():
            outcome = await asyncio.to_thread(promtool.check_text, text)
            output = outcome.output
            if not outcome.ok:
                findings.append("promtool check rules failed")
        return Validation(valid=not findings, findings=findings, promtool=output)


class Applied(Struct):
    path: str
    groups: int
    reloaded: bool
    prometheus: str | None


def _post(url: str, timeout: float = 5.0) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=timeout):
        pass


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass(frozen=True, slots=True)
class Target:
    """Where ``POST /v1/apply`` writes the rule file, and the Prometheus it reloads."""

    path: Path
    prometheus: str | None


class ApplyController(Controller):
    path = "/v1"
    tags = ("rules",)

    @post(
        "/apply",
        summary="Write the generated rules to observability.rules_dir and reload Prometheus",
        status_code=200,
        responses=errors(400, 502, 503),
    )
    async def apply(
        self,
        slos: Injected[tuple[Slo, ...]],
        speedup: Injected[float],
        target: Injected[Target],
    ) -> Applied:
        """The rule file is checked first (the pure checks, and promtool when installed), then
        written whole through a rename, then Prometheus is asked to reload
        (``POST /-/reload``, which needs ``--web.enable-lifecycle``). A rule file that fails
        the checks is not written; a failed reload leaves Prometheus on its previous rules."""
        from citadel.observability.commands import write_atomic

        text = rules_yaml(slos, speedup=speedup)
        findings = pure_findings(text)
        if not findings and promtool.available():
            outcome = await asyncio.to_thread(promtool.check_text, text)
            findings = [] if outcome.ok else [outcome.output]
        if findings:
            raise BadRequest("The generated rules fail their checks: " + "; ".join(findings))
        try:
            await asyncio.to_thread(write_atomic, target.path, text)
        except OSError as exc:
            raise Unavailable(
                f"Cannot write the rule file {target.path}: {exc.strerror or exc}.",
                param="observability.rules_dir",
            ) from None
        groups = len(rule_groups(slos, speedup=speedup))
        endpoint = target.prometheus
        if not endpoint:
            return Applied(path=str(target.path), groups=groups, reloaded=False, prometheus=None)
        url = endpoint.rstrip("/") + "/-/reload"
        try:
            await asyncio.to_thread(_post, url)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace").strip()[:500]
            raise UpstreamError(
                f"Wrote {target.path}, but Prometheus at {endpoint} refused the reload "
                f"(HTTP {exc.code}: {detail or exc.reason}); it keeps its previous rules. "
                "Is it started with --web.enable-lifecycle?"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"Wrote {target.path}, but Prometheus at {endpoint} is unreachable for the reload "
                f"({getattr(exc, 'reason', exc)}); it keeps its previous rules."
            ) from None
        return Applied(path=str(target.path), groups=groups, reloaded=True, prometheus=endpoint)


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


def _rules_loaded(settings: Settings, deps: ObservabilityDeps) -> Any:
    """Whether the Prometheus at PROMETHEUS_ENDPOINT runs the rules generated here: the same
    groups with the same rules (``GET /api/v1/rules``)."""
    url = settings.endpoints.prometheus
    wanted = {
        g["name"]: sorted(r.get("alert") or r["record"] for r in g["rules"])
        for g in rule_groups(deps.slos, speedup=deps.speedup)
    }

    async def check() -> DependencyHealth:
        if not url:
            return DependencyHealth(status="disabled", detail="not configured")
        try:
            doc = await asyncio.to_thread(_get_json, url.rstrip("/") + "/api/v1/rules")
        except (OSError, ValueError) as exc:
            return DependencyHealth(status="down", detail=f"unreachable: {exc}")
        loaded = {
            g["name"]: sorted(r["name"] for r in g["rules"])
            for g in doc.get("data", {}).get("groups", [])
            if g["name"] in wanted or g["name"].startswith("citadel-")
        }
        if loaded == wanted:
            return DependencyHealth(status="ok", detail=f"{len(wanted)} rule groups loaded")
        missing = sorted(set(wanted) - set(loaded))
        stale = sorted(n for n in set(wanted) & set(loaded) if wanted[n] != loaded[n])
        extra = sorted(set(loaded) - set(wanted))
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (("missing", missing), ("different", stale), ("extra", extra))
            if names
        ]
        return DependencyHealth(
            status="degraded",
            detail="Prometheus's rules differ from the generated ones; "
            + "; ".join(parts)
            + " (POST /v1/apply)",
        )

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
        admin=[RulesController, ApplyController],
        dependencies={
            "slos": provide(deps.slos),
            "speedup": provide(deps.speedup),
            "target": provide(
                Target(
                    Path(settings.observability.rules_dir).absolute() / promtool.RULE_FILE,
                    settings.endpoints.prometheus,
                )
            ),
        },
        health={"prometheus": _rules_loaded(settings, deps)},
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
