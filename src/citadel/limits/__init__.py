"""Limits: tiers, quotas, the limiter maths and its memory and Redis backends (pure and used
in-process by the gateway), and the rate-limiting service (:9098) on citadel.web: ``app.py``
wires, ``api.py`` serves, ``bodies.py`` the msgspec bodies. Nothing here imports the service
until it is asked for (``from citadel.limits import app``)."""
