"""Alembic's environment for the accounts tables: see ``citadel.migrations.run_environment``."""

from citadel.accounts.migrate import ACCOUNTS
from citadel.migrations import run_environment

run_environment(ACCOUNTS)
