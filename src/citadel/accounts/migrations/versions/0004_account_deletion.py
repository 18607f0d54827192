"""Deleting users and teams: a ``deleted_at`` time on ``users`` and ``teams``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

A deleted user or team is kept, marked with the time it was deleted (NULL: not deleted), so
that the usage ledger's rows, which name them by id, still resolve to a name; the store hides
it from listings, refuses changes to it, and revokes a deleted user's keys. Adding a nullable
column rewrites nothing; downgrading drops the two columns (the deleted then look alive again,
with their keys still revoked and a deleted user still disabled).

Self-contained on purpose, like 0001: nothing is imported from ``citadel.accounts``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("teams", "users"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("users", "teams"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("deleted_at")
