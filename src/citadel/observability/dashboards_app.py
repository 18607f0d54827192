"""``citadel serve grafana-dashboards`` (:9093): see ``citadel.observability.services``."""

from citadel.observability.services import create_dashboards_app as create_app
from citadel.observability.services import default_deps

__all__ = ["create_app", "default_deps"]
