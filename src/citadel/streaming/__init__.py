"""The streaming service (:9096): model output over WebSocket and SSE, and live events from the
feed (``citadel.feed``); requests run through the gateway's own ``Gateway`` in-process."""

from citadel.streaming.app import StreamingDeps, create_app, default_deps

__all__ = ["StreamingDeps", "create_app", "default_deps"]
