"""``citadel serve prometheus-rules`` (:9094): see ``citadel.observability.services``."""

from citadel.observability.services import create_rules_app as create_app
from citadel.observability.services import default_deps

__all__ = ["create_app", "default_deps"]
