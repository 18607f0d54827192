"""Prometheus and Alertmanager for ``citadel up``, when installed and none is configured.

With no ``PROMETHEUS_ENDPOINT`` (``endpoints.prometheus``) and the Debian packages'
``prometheus`` and ``prometheus-alertmanager`` on the PATH, ``citadel up`` runs both on loopback
ports (``ports.prometheus``, ``ports.alertmanager``) with the generated configuration: the rule
file, ``prometheus.yml`` scraping every service and model server, and ``alertmanager.yml``, all
under ``observability.data_dir`` with their data. The services are told where they are through
``PROMETHEUS_ENDPOINT`` and ``ALERTMANAGER_ENDPOINT`` in their environment. ``plan`` is the
whole decision: the processes to add, and the line to print when they cannot be had.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from citadel.settings import Settings

__all__ = ["Monitoring", "plan"]

PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
MISSING = (
    "citadel: Prometheus and Alertmanager not started: install them (Debian: apt-get install "
    "prometheus prometheus-alertmanager) or set PROMETHEUS_ENDPOINT"
)


@dataclass(frozen=True, slots=True)
class Monitoring:
    """What ``citadel up`` adds: processes (name, argv, port), environment for every child,
    and a note to print (why nothing was added)."""

    processes: list[tuple[str, list[str], int]] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    note: str | None = None


def _which(names: tuple[str, ...], path: str | None) -> str | None:
    return next((found for n in names if (found := shutil.which(n, path=path))), None)


def plan(settings: Settings, *, path: str | None = None) -> Monitoring:
    """Write the configuration and say how to run Prometheus and Alertmanager, or why not.
    ``settings`` are those served (the embedded models included); ``path`` is the PATH to
    search (default: this process's)."""
    if settings.endpoints.prometheus:
        return Monitoring()
    prometheus, alertmanager = (
        _which(PROMETHEUS_BINARIES, path),
        _which(ALERTMANAGER_BINARIES, path),
    )
    if prometheus is None or alertmanager is None:
        return Monitoring(note=MISSING)
    from citadel.observability.commands import (
        RULE_FILE,
        alertmanager_text,
        rules_text,
        write_atomic,
    )
    from citadel.observability.rules import dump
    from citadel.observability.scrape import prometheus_config

    host, ports = settings.host, settings.ports
    data = Path(settings.observability.data_dir).absolute()
    am_url = settings.endpoints.alertmanager or f"http://{host}:{ports.alertmanager}"
    write_atomic(data / "rules" / RULE_FILE, rules_text(settings))
    token_file = data / "metrics-token"
    token = settings.metrics_token()
    if token:
        write_atomic(token_file, token)
        os.chmod(token_file, 0o600)
    config = prometheus_config(
        settings,
        rule_files=(str(data / "rules" / "*.yml"),),
        alertmanager=am_url,
        token_file=str(token_file),
    )
    write_atomic(data / "prometheus.yml", dump(config))
    processes = [
        (
            "prometheus",
            [
                prometheus,
                f"--config.file={data / 'prometheus.yml'}",
                f"--storage.tsdb.path={data / 'prometheus'}",
                f"--web.listen-address={host}:{ports.prometheus}",
                "--web.enable-lifecycle",  # POST /-/reload after the rule files change
            ],
            ports.prometheus,
        )
    ]
    if not settings.endpoints.alertmanager:
        write_atomic(data / "alertmanager.yml", alertmanager_text())
        processes.append(
            (
                "alertmanager",
                [
                    alertmanager,
                    f"--config.file={data / 'alertmanager.yml'}",
                    f"--storage.path={data / 'alertmanager'}",
                    f"--web.listen-address={host}:{ports.alertmanager}",
                    "--cluster.listen-address=",  # one instance: no gossip port
                ],
                ports.alertmanager,
            )
        )
    environment = {
        "PROMETHEUS_ENDPOINT": f"http://{host}:{ports.prometheus}",
        "ALERTMANAGER_ENDPOINT": am_url,
    }
    return Monitoring(processes=processes, environment=environment)
