"""The API gateway (:8000): authenticate, route, forward, meter."""
