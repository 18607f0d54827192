"""A complete ``prometheus.yml`` for this installation, from the settings. Pure: no I/O."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from citadel.registry import SERVICES
from citadel.settings import Settings

# `citadel serve NAME` -> the Ports attribute; the scrape job is citadel-NAME.
SCRAPED: dict[str, str] = {name: spec.port for name, spec in SERVICES.items()}


TOKEN_FILE = "/etc/prometheus/citadel-metrics-token"


def duration(seconds: float) -> str:
    """Seconds as a Prometheus duration: ``15s``, or ``500ms`` (no decimal point is valid)."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def prometheus_config(
    settings: Settings,
    *,
    rule_files: tuple[str, ...] = ("rules/*.yml",),
    alertmanager: str | None = None,
    interval: str | None = None,
    services: tuple[str, ...] = tuple(SCRAPED),
    token_file: str = TOKEN_FILE,
) -> dict[str, Any]:
    """Scrape jobs for every Citadel service and every deployment's model server, the rule
    files and the Alertmanager target (``endpoints.alertmanager`` unless given). When the
    services' ``/metrics`` need a bearer token (``Settings.metrics_token``), each Citadel job
    reads it from ``token_file``; the interval defaults to
    ``observability.scrape_interval_seconds``."""
    host = settings.hostname
    token = settings.metrics_token() is not None

    def auth() -> dict[str, Any]:  # a fresh mapping per job: no YAML anchors in the file
        return (
            {"authorization": {"type": "Bearer", "credentials_file": token_file}} if token else {}
        )

    jobs: list[dict[str, Any]] = [
        {
            "job_name": f"citadel-{name}",
            **auth(),
            "static_configs": [{"targets": [f"{host}:{getattr(settings.ports, SCRAPED[name])}"]}],
        }
        for name in services
    ]
    if interval is None:
        interval = duration(settings.observability.scrape_interval_seconds)
    servers = sorted({_host_port(d.url) for mo in settings.models for d in mo.deployments})
    if servers:
        jobs.append({"job_name": "citadel-model-servers", "static_configs": [{"targets": servers}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rule_files),
        "scrape_configs": jobs,
    }
    target = alertmanager or settings.endpoints.alertmanager
    if target:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [_host_port(target)]}]}]
        }
    return config


def alertmanager_config(receiver_url: str | None = None) -> dict[str, Any]:
    """Routing by severity, and a ticket inhibited while the page of the same SLO fires."""
    receiver: dict[str, Any] = {"name": "citadel"}
    if receiver_url:
        receiver["webhook_configs"] = [{"url": receiver_url}]
    return {
        "route": {
            "receiver": "citadel",
            "group_by": ["alertname", "slo", "deployment", "id"],
            "group_wait": "10s",
            "group_interval": "1m",
            "repeat_interval": "4h",
        },
        "receivers": [receiver],
        "inhibit_rules": [
            {
                "source_matchers": ['severity="page"'],
                "target_matchers": ['severity="ticket"'],
                "equal": ["slo"],
            }
        ],
    }
