"""Limits: tiers, quotas, the limiter maths and its memory and Redis backends."""
