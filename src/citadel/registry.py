"""Citadel's services: the one list. ``citadel serve NAME`` serves them, ``citadel up`` starts
them all, ``citadel prometheus-config`` scrapes them (job ``citadel-NAME``).

Each entry names its port (an attribute of ``settings.Ports``) and a loader that imports the
module holding ``create_app(settings, deps)`` and ``default_deps(settings)``, on use only (so
``citadel serve gateway`` loads no Litestar, and this module stays import-free and pure).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

__all__ = ["SERVICES", "ServiceSpec"]


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    port: str  # the settings.Ports attribute
    load: Callable[[], ModuleType]  # the module with create_app and default_deps
    one_worker: bool = False  # more processes would repeat its work (a scheduler)
    environment: Mapping[str, str] = field(default_factory=dict)  # set before loading


def _gateway() -> ModuleType:
    from citadel.gateway import app

    return app


def _rate_limiting() -> ModuleType:
    from citadel.limits import app

    return app


def _routing() -> ModuleType:
    from citadel.routing import app

    return app


def _metering() -> ModuleType:
    from citadel.metering import app

    return app


def _alerting() -> ModuleType:
    from citadel.alerting import app

    return app


def _streaming() -> ModuleType:
    import citadel.streaming

    return citadel.streaming


def _graphql() -> ModuleType:
    import citadel.graphql

    return citadel.graphql


def _dashboards() -> ModuleType:
    from citadel.observability import dashboards_app

    return dashboards_app


def _rules() -> ModuleType:
    from citadel.observability import rules_app

    return rules_app


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec("gateway", "gateway", _gateway),
        ServiceSpec("rate-limiting-api", "rate_limiting_api", _rate_limiting),
        ServiceSpec("routing-api", "routing_api", _routing),
        ServiceSpec("custom-metrics", "custom_metrics", _metering),
        # One scheduler (more would send every alert more than once); one thread per forecast
        # fit, set before numpy loads OpenBLAS (see tests/conftest.py).
        ServiceSpec(
            "predictive-alerting",
            "predictive_alerting",
            _alerting,
            one_worker=True,
            environment={"OPENBLAS_NUM_THREADS": "1"},
        ),
        ServiceSpec("streaming-api", "streaming_api", _streaming),
        ServiceSpec("graphql-api", "graphql_api", _graphql),
        ServiceSpec("grafana-dashboards", "grafana_dashboards", _dashboards),
        ServiceSpec("prometheus-rules", "prometheus_rules", _rules),
    )
}
