"""Accounts: users, teams, API keys and per-user limit overrides, in SQL."""
