"""Alembic's environment for the usage-ledger tables: see ``citadel.migrations.run_environment``."""

from citadel.metering.migrate import LEDGER
from citadel.migrations import run_environment

run_environment(LEDGER)
