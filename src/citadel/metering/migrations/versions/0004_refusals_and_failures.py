"""Refused and failed requests in the ledger: ``reason`` and ``refused`` on each event, and
``refusals`` and ``failures`` counted in every rollup.

Revision ID: m0004
Revises: m0003
Create Date: 2026-12-02

Every request the gateway answers for a principal is now one event, whatever its end: served,
failed upstream (502, 503, 504), or refused by the caller's tier (403) or limits (429).

- ``usage_events.reason``: why the request was not served (the error's code, such as
  ``model_not_allowed``, ``requests_per_minute`` or ``no_deployment_available``); ``''`` when it
  was, and for every event stored before this revision.
- ``usage_events.refused``: refused by the tier or the limits before any upstream was tried.
- ``refusals`` and ``failures`` in each rollup: the refused events, and those with status >= 500.

The columns are added with defaults (no table rewrite on PostgreSQL 11 and later), so upgrading
takes a moment whatever the ledger's size. Rollup rows from before it count 0 refusals (none were
recorded then) and 0 failures: ``citadel.metering.ledger.rebuild_rollups`` recounts the failures
of old events from ``usage_events`` if wanted. Downgrading drops the columns.

Self-contained on purpose, like m0001: nothing is imported from ``citadel.metering``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "m0004"
down_revision = "m0003"
branch_labels = None
depends_on = None

_KEY = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
_ROLLUPS = tuple(
    f"usage_{unit}{suffix}"
    for suffix in ("", "_team", "_deployment", "_user")
    for unit in ("hourly", "daily")
)
_MEASURES = ("refusals", "failures")


def upgrade() -> None:
    op.add_column("usage_events", sa.Column("reason", _KEY, nullable=False, server_default=""))
    op.add_column(
        "usage_events",
        sa.Column("refused", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    for table in _ROLLUPS:
        for name in _MEASURES:
            op.add_column(
                table, sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            )


def downgrade() -> None:
    for table in reversed(_ROLLUPS):
        for name in reversed(_MEASURES):
            op.drop_column(table, name)
    op.drop_column("usage_events", "refused")
    op.drop_column("usage_events", "reason")
